"""llm_lazy_qwen tests use the shared `sep` fixture of tests/conftest.py."""
