"""Fetch only what a conversion needs from the Hugging Face Hub (config, tokenizer, needed shards)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from .checkpoint import EXTRA_FILES, classify
from .errors import SepweightError
from .spec import PartSpec

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def looks_like_repo_id(src: str) -> bool:
    return bool(_REPO_ID.match(src)) and not Path(src).exists()


def fetch(repo_id: str, spec: PartSpec, revision: str | None = None) -> Path:
    """Download config/tokenizer files and the weight files that hold `spec`'s parts; return the folder.

    Uses the hub's cache, so a second call downloads nothing. With a sharded checkpoint only the
    shards named by the index for the wanted tensors are fetched.
    """
    try:
        import huggingface_hub as hf
    except ImportError:  # pragma: no cover - it is a declared dependency
        raise SepweightError("converting from the hub needs huggingface_hub: pip install huggingface_hub") from None
    try:
        names = set(hf.list_repo_files(repo_id, revision=revision))
    except Exception as e:  # network, auth, missing repo: say which repo and why
        raise SepweightError(f"cannot list files of hub repo {repo_id!r}: {type(e).__name__}: {e}") from None

    def get(name: str) -> Path:
        try:
            return Path(hf.hf_hub_download(repo_id, name, revision=revision))
        except Exception as e:
            raise SepweightError(
                f"cannot download {name!r} from hub repo {repo_id!r}: {type(e).__name__}: {e}"
            ) from None

    if "config.json" not in names:
        raise SepweightError(f"hub repo {repo_id!r} has no config.json; is it a transformers model?")
    folder = get("config.json").parent
    for extra in EXTRA_FILES:
        if extra in names:
            get(extra)
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if index_name in names:
            index = get(index_name)
            config = json.loads((folder / "config.json").read_text())
            resolved = spec.resolve(int(config["num_hidden_layers"]))
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            wanted = sorted({f for k, f in weight_map.items() if _wanted(k, resolved)})
            for shard in wanted:
                get(shard)
            return folder
    for single in ("model.safetensors", "pytorch_model.bin"):
        if single in names:
            get(single)
            return folder
    raise SepweightError(f"hub repo {repo_id!r} has no safetensors or pytorch_model weights")


def _wanted(name: str, spec: PartSpec) -> bool:
    c = classify(name)
    if c is None:
        return False
    part = c[0]
    return (part == "begin" and spec.begin) or (part == "end" and spec.end) or part in (spec.layers or ())
