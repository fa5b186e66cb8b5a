"""The one exception llm_sepweight raises for bad input (files, keys, specs, configs)."""

from __future__ import annotations


class SepweightError(ValueError):
    """A checkpoint, sepweight folder, spec or argument is invalid.

    The message names the file/key/field and says what to do about it.
    """
