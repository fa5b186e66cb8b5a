"""llm_lazy_qwen tests use the shared `sep` fixture of tests/conftest.py."""

import os
import sys

# pytest runs with --import-mode=importlib: make lazy_helpers.py importable from this directory's tests
sys.path.insert(0, os.path.dirname(__file__))
