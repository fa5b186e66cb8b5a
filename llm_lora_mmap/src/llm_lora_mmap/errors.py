"""The one exception llm_lora_mmap raises for bad input (adapters, targets, folders, hyperparameters)."""

from __future__ import annotations


class LoraError(ValueError):
    """An adapter, target module, folder or hyperparameter is invalid.

    The message names the file/key/module and says what to do about it.
    """
