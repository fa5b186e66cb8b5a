"""Fetch only what a conversion needs from the Hugging Face Hub (config, tokenizer, needed shards).

Everything goes through ``huggingface_hub.snapshot_download(allow_patterns=...)``, which uses the
hub's cache: a second call downloads nothing, and with ``HF_HUB_OFFLINE=1`` it answers from the
cache alone. The weights the parts need are fetched in one call.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from .checkpoint import EXTRA_PATTERNS, classify, is_tied
from .errors import SepweightError
from .spec import PartSpec

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")  # in order of preference
SINGLES = ("model.safetensors", "pytorch_model.bin")


def looks_like_repo_id(src: str) -> bool:
    return bool(_REPO_ID.match(src)) and not Path(src).exists()


def fetch(repo_id: str, spec: PartSpec, revision: str | None = None) -> Path:
    """Download config/tokenizer files and the weight files that hold `spec`'s parts; return the folder.

    Two ``snapshot_download`` calls: the small files (config, tokenizer, shard index), then every
    needed weight file at once. With a sharded checkpoint only the shards named by the index for
    the wanted tensors are fetched; a tied head brings the embedding's shard
    (:meth:`PartSpec.stored_parts`). A legacy ``pytorch_model.bin`` costs one more call.

    Example::

        folder = fetch("Qwen/Qwen2.5-0.5B", PartSpec.parse("12-24 e"))
    """
    try:
        import huggingface_hub as hf
    except ImportError:  # pragma: no cover - it is a declared dependency
        raise SepweightError("converting from the hub needs huggingface_hub: pip install huggingface_hub") from None

    def download(patterns: list[str], rev: str | None, what: str) -> Path:
        try:
            return Path(hf.snapshot_download(repo_id, revision=rev, allow_patterns=patterns))
        except Exception as e:  # network, auth, missing repo, not cached offline: say which repo and why
            raise SepweightError(f"cannot download {what} from hub repo {repo_id!r}: {type(e).__name__}: {e}") from None

    folder = download([*EXTRA_PATTERNS, *INDEXES], revision, "config.json")
    # the snapshot folder is named by its commit: later calls ask for that commit, so a push to the
    # repo between two calls cannot mix two versions in one conversion
    pinned = folder.name if _COMMIT.match(folder.name) else revision
    if not (folder / "config.json").is_file():
        raise SepweightError(
            f"hub repo {repo_id!r} has no config.json (or, offline, it is not in the local cache); "
            "is it a transformers model?"
        )
    config = json.loads((folder / "config.json").read_text())
    wanted_parts = spec.resolve(int(config["num_hidden_layers"])).stored_parts(is_tied(config))
    for index_name in INDEXES:
        if (folder / index_name).is_file():
            weight_map: dict[str, str] = json.loads((folder / index_name).read_text())["weight_map"]
            shards = sorted({f for k, f in weight_map.items() if _wanted(k, wanted_parts)})
            download(shards, pinned, f"the {len(shards)} shard(s) {shards}")
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                raise SepweightError(
                    f"hub repo {repo_id!r}: shard {missing[0]!r} named in {index_name} was not fetched"
                )
            return folder
    for single in SINGLES:
        download([single], pinned, repr(single))
        if (folder / single).is_file():
            return folder
    raise SepweightError(f"hub repo {repo_id!r} has no safetensors or pytorch_model weights")


def _wanted(name: str, spec: PartSpec) -> bool:
    c = classify(name)
    if c is None:
        return False
    part = c[0]
    return (part == "begin" and spec.begin) or (part == "end" and spec.end) or part in (spec.layers or ())
