"""Read a GGUF model (one file or split ``-00001-of-0000N`` files) with the ``gguf`` package.

Also the name table from llama.cpp's tensor names to sepweight parts, as transformers' GGUF loader
maps them (``blk.N.attn_q.weight`` -> layer N ``self_attn.q_proj.weight``), and llama's Q/K row
permutation undone exactly as transformers' ``LlamaTensorProcessor`` does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import SepweightError
from .manifest import Part

ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM"}
_SPLIT = re.compile(r"^(?P<stem>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")
_GLOBAL = {
    "token_embd.weight": ("begin", "embed_tokens.weight"),
    "output_norm.weight": ("end", "norm.weight"),
    "output.weight": ("end", "lm_head.weight"),
}
_LAYER = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_IGNORED = re.compile(r"^blk\.\d+\.attn_rot_embd$")  # precomputed rope tables some old converters wrote


def _gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise SepweightError("reading GGUF files needs the gguf package: pip install 'llm_sepweight[gguf]'") from None
    return gguf


@dataclass
class GGUFTensor:
    """One stored tensor: its raw data (blocks as uint8 rows for quantized types) and where it lives."""

    name: str
    path: Path
    ggml_type: int
    type_name: str  # "Q4_1", "F32", ...
    shape: tuple[int, ...]  # torch order: (out_features, in_features) for a linear
    data: np.ndarray  # memory-mapped; (rows, bytes per row) for block types

    def dequantize(self, rows: slice | np.ndarray = slice(None)) -> torch.Tensor:
        """These rows (a slice or an index array) as fp32 ``(rows, *shape[1:])``, through ``gguf.quants.dequantize``."""
        gguf = _gguf()
        data = np.asarray(self.data[rows])
        try:
            out = gguf.quants.dequantize(data, gguf.GGMLQuantizationType(self.ggml_type))
        except NotImplementedError:
            raise SepweightError(
                f"{self.path}: tensor {self.name!r} has quant type {self.type_name}, which the installed gguf "
                "package cannot dequantize; upgrade gguf (pip install -U gguf)"
            ) from None
        out = np.array(out, dtype=np.float32)  # a copy: the file is mapped read-only
        return torch.from_numpy(out).view(-1, *self.shape[1:]) if len(self.shape) > 1 else torch.from_numpy(out)


def classify(name: str, path: Path) -> tuple[Part, str] | None:
    """``(part, key relative to the part)`` for a GGUF tensor name; None for tensors we skip."""
    if name in _GLOBAL:
        return _GLOBAL[name]
    if m := _BLOCK.match(name):
        layer, rest = int(m.group(1)), m.group(2)
        base, _, suffix = rest.rpartition(".")
        if base in _LAYER and suffix in ("weight", "bias"):
            return layer, f"{_LAYER[base]}.{suffix}"
    if _IGNORED.match(name.rpartition(".")[0]):
        return None
    if name == "rope_freqs.weight":
        raise SepweightError(
            f"{path}: tensor 'rope_freqs.weight' means RoPE frequency scaling (Llama 3.1+ 'llama3' rope), "
            "which llm_lazy_qwen does not support"
        )
    raise SepweightError(
        f"{path}: tensor {name!r} is not part of the supported layout (token_embd, blk.N.attn_*/ffn_*, "
        "output_norm, output)"
    )


def unpermute_rows(n_rows: int, n_head: int) -> torch.Tensor:
    """Row order undoing llama.cpp's Q/K permutation: ``w_hf = w_gguf[idx]``.

    Equals transformers' ``_reverse_permute_weights``: ``w.reshape(n_head, dim, 2, ...).swapaxes(2, 1)``
    with ``dim = rows // n_head // 2``. Gathering whole rows works on GGUF blocks as they are.
    """
    dim = n_rows // n_head // 2
    return torch.arange(n_rows).reshape(n_head, dim, 2).transpose(1, 2).reshape(n_rows)  # (n_rows,)


def split_paths(path: Path) -> list[Path]:
    """All files of a model: ``[path]``, or every ``-0000k-of-0000N.gguf`` file when `path` is one of a split."""
    m = _SPLIT.match(path.name)
    if m is None:
        return [path]
    count = int(m.group("count"))
    paths = [path.with_name(f"{m.group('stem')}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise SepweightError(f"{path}: split GGUF model is missing file(s) {missing}; download all {count} parts")
    return paths


@dataclass
class GGUFModel:
    """Metadata (from the first file) and tensors (from all files) of a GGUF model."""

    paths: list[Path]
    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensor]

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture"))

    def key(self, name: str, default: Any = None) -> Any:
        """An architecture key: ``key("block_count")`` reads ``llama.block_count``."""
        return self.metadata.get(f"{self.architecture}.{name}", default)


def open_gguf(path: str | Path) -> GGUFModel:
    """Open a GGUF model; a split model is given by any of its files.

    Example::

        model = open_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")
        model.architecture, model.tensors["blk.0.attn_q.weight"].type_name   # ('llama', 'Q4_1')
    """
    path = Path(path)
    if not path.is_file():
        raise SepweightError(f"{path}: no such GGUF file")
    paths = split_paths(path)
    metadata: dict[str, Any] = {}
    tensors: dict[str, GGUFTensor] = {}
    for i, p in enumerate(paths):
        reader = _read(p)
        if i == 0:
            metadata = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
        for t in reader.tensors:
            if t.name in tensors:
                raise SepweightError(f"{p}: tensor {t.name!r} is also in {tensors[t.name].path}")
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))
            tensors[t.name] = GGUFTensor(t.name, p, int(t.tensor_type), t.tensor_type.name, shape, t.data)
    arch = metadata.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise SepweightError(f"{path}: GGUF architecture {arch!r} is not supported; supported: {sorted(ARCHITECTURES)}")
    return GGUFModel(paths, metadata, tensors)


def _read(path: Path) -> Any:
    gguf = _gguf()

    class _CheckedReader(gguf.GGUFReader):
        """GGUFReader that names the tensor a truncated or unknown-typed file fails on."""

        def _build_tensors(self, start_offs: int, fields: list[Any]) -> None:
            size = len(self.data)
            for field in fields:
                _, name_data, _, dims, raw_dtype, offset = field.parts
                name = bytes(name_data).decode("utf-8", "replace")
                try:
                    qtype = gguf.GGMLQuantizationType(int(raw_dtype[0]))
                except ValueError:
                    raise SepweightError(
                        f"{path}: tensor {name!r} has unknown quant type id {int(raw_dtype[0])}; "
                        "the installed gguf package does not know it (pip install -U gguf)"
                    ) from None
                block, type_size = gguf.GGML_QUANT_SIZES[qtype]
                n = int(np.prod(dims.astype(np.int64)))
                end = start_offs + int(offset[0]) + n * type_size // block
                if end > size:
                    raise SepweightError(
                        f"{path}: tensor {name!r} ends at byte {end} but the file has {size} bytes; "
                        "the file is truncated (download it again)"
                    )
            super()._build_tensors(start_offs, fields)

    try:
        return _CheckedReader(path)
    except SepweightError:
        raise
    except Exception as e:  # the reader raises ValueError/IndexError/... on a damaged header
        raise SepweightError(
            f"{path}: not a readable GGUF file ({type(e).__name__}: {e}); is it truncated or not a GGUF?"
        ) from None
