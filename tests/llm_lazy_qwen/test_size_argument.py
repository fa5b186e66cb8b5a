"""``size_argument``: the one argparse ``type`` for sizes (--memory-budget in the chat, pipeline and sft CLIs)."""

from __future__ import annotations

import argparse

import pytest

from llm_lazy_qwen import parse_size, size_argument


def test_equals_parse_size() -> None:
    for text in ("6GiB", "800MB", "6G", "1024"):
        assert size_argument(text) == parse_size(text)


@pytest.mark.parametrize("text", ["6 gigs", "0", "-1GB", ""])
def test_bad_size_is_an_argparse_error(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="memory_budget"):
        size_argument(text)


def test_parser_prints_the_message(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="x")
    parser.add_argument("--memory-budget", type=size_argument)
    with pytest.raises(SystemExit) as e:
        parser.parse_args(["--memory-budget", "lots"])
    assert e.value.code == 2
    assert "argument --memory-budget: memory_budget 'lots' is not a size" in capsys.readouterr().err
