"""Fixtures for llm_lora_mmap's tests: tiny Qwen checkpoints converted to sepweight folders once per session."""

from __future__ import annotations

import os
import sys

# pytest runs with --import-mode=importlib, so test modules cannot import their neighbours; this makes
# lora_helpers.py (the PEFT oracle helpers) importable from this directory's tests.
sys.path.insert(0, os.path.dirname(__file__))
