"""A hub repo whose main moved (outside review): a commit that changes no file the conversion reads
(a README edit, the usual case) must not re-convert the model; one that changes the config or weights must.

The hub cache here is laid out as huggingface_hub lays it out: each snapshot's files are symlinks to
blobs named by their content hash, shared between commits.
"""

import hashlib
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = "acme/tiny-qwen"

CODE = """
    import llm_sepweight as sw
    m = sw.convert({repo!r}, {dst!r}, progress=False)
    print("src", m.source["src"])
    """


def _commit(cache: Path, files: dict[str, bytes], n: int) -> None:
    """Snapshot number `n` of REPO holding `files`, made refs/main."""
    repo = cache / f"models--{REPO.replace('/', '--')}"
    commit = f"{n:040x}"
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        if not blob.exists():
            blob.write_bytes(data)
        os.symlink(os.path.relpath(blob, snap), snap / name)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)


def run_offline(code: str, hf_home: Path) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter with HF_HUB_OFFLINE=1, the hub cache in `hf_home`, no sockets."""
    script = "import socket\nsocket.socket.connect = socket.create_connection = None\n" + textwrap.dedent(code)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(hf_home), "HF_HUB_CACHE": str(hf_home / "hub")}
    env.pop("HF_TOKEN", None)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)


def _stats(root: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_mtime_ns, p.stat().st_ino) for p in sorted(root.iterdir())}


def test_a_readme_commit_does_not_reconvert_a_config_commit_does(qwen_checkpoints, tmp_path):
    src = qwen_checkpoints("qwen2").path
    files = {p.name: p.read_bytes() for p in src.iterdir() if p.is_file()}
    hf_home, dst = tmp_path / "hf", tmp_path / "sep"
    code = CODE.format(repo=REPO, dst=str(dst))
    _commit(hf_home / "hub", {**files, "README.md": b"v1"}, 1)
    proc = run_offline(code, hf_home)
    assert proc.returncode == 0, proc.stderr
    before = _stats(dst)

    _commit(hf_home / "hub", {**files, "README.md": b"v2: a typo fixed"}, 2)
    proc = run_offline(code, hf_home)
    assert proc.returncode == 0, proc.stderr
    assert _stats(dst) == before  # nothing re-read, re-hashed or rewritten

    config = files["config.json"].replace(b'"rms_norm_eps": 1e-06', b'"rms_norm_eps": 1e-05')
    assert config != files["config.json"]
    _commit(hf_home / "hub", {**files, "config.json": config}, 3)
    proc = run_offline(code, hf_home)
    assert proc.returncode == 0, proc.stderr
    assert (dst / "config.json").read_bytes() == config
    shutil.rmtree(hf_home)
