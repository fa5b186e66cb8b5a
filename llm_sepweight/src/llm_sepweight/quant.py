"""Weight-only quantization as stored in a quantized sepweight folder (QUANT_FORMAT.md).

A linear ``P`` with weight ``[N, K]`` becomes ``P.qweight`` plus ``P.scales`` (int8, symmetric per
output channel) or ``P.scales_and_zeros`` (int4, asymmetric per group of ``g`` inputs), laid out as
torch's CPU weight-only kernels take them::

    int8: w[n, k] = qweight[n, k] * scales[n]
    int4: w[n, k] = (q[n, k] - 8) * sz[n, k // g, 0] + sz[n, k // g, 1],   q = unpack_int4(qweight, layout)

:func:`dequantize` is the reference both kernels must equal.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .errors import SepweightError
from .quant_pack import KERNEL_ROWS, LAYOUTS, _pack, check_layout, int4_layout, unpack_int4
from .quant_search import scales_and_zeros

SCHEMES = ("int8", "int4")
GROUP_SIZES = (32, 64, 128, 256)  # what torch's int4 kernel accepts
METHODS = ("clip", "rtn")
# A method's version, bumped when what it writes for the same weights changes (search or importance):
# convert() keys a finished folder by it, so such a folder is re-quantized once. Absent = 1, which
# adds nothing to the key (folders written before versions existed stay valid).
# clip 2: columns weighed by E[x_k^2] / ||W[:, k]||^2 instead of E[x_k^2] (quant_importance.py).
METHOD_VERSIONS: dict[str, int] = {"clip": 2}


@dataclass(frozen=True)
class QuantSpec:
    """How one linear is stored: the manifest's per-tensor ``quant`` entry on ``P.qweight``.

    Example::

        spec = SepWeights("q4").linears(0)["mlp.down_proj"]
        spec.scheme, spec.shape, spec.group_size, spec.layout   # "int4", (64, 96), 32, "aten_cpu_avx2"
    """

    scheme: str  # "int8" | "int4"
    shape: tuple[int, int]  # (N, K) of the dequantized weight
    group_size: int | None = None  # int4 only
    layout: str | None = None  # int4 only: a key of LAYOUTS

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        n, k = self.shape if len(self.shape) == 2 else (0, 0)
        problem = None
        if self.scheme not in SCHEMES:
            problem = f"scheme {self.scheme!r} is not one of {SCHEMES}"
        elif len(self.shape) != 2 or n <= 0 or k <= 0:
            problem = f"shape {list(self.shape)} is not [N, K] with N, K > 0"
        elif self.scheme == "int8" and (self.group_size is not None or self.layout is not None):
            problem = "int8 has no group_size or layout (both must be null)"
        elif self.scheme == "int4" and (not isinstance(self.group_size, int) or self.group_size <= 0):
            problem = f"int4 needs a positive integer group_size, got {self.group_size!r}"
        elif self.scheme == "int4" and (k % self.group_size or k % 2):
            problem = f"K={k} is not even and a multiple of group_size {self.group_size}"
        elif self.scheme == "int4" and self.layout not in LAYOUTS:
            problem = f"layout {self.layout!r} is not one of {sorted(LAYOUTS)}"
        elif self.scheme == "int4" and LAYOUTS[self.layout] and n % LAYOUTS[self.layout][0]:
            problem = f"N={n} is not a multiple of layout {self.layout!r}'s block of {LAYOUTS[self.layout][0]} rows"
        if problem:
            raise SepweightError(f"quant entry {self.to_json()}: {problem}")

    @property
    def scales_key(self) -> str:
        return "scales" if self.scheme == "int8" else "scales_and_zeros"

    def tensor_shapes(self) -> dict[str, tuple[torch.dtype | None, tuple[int, ...]]]:
        """{suffix: (dtype or None for the scale dtype, shape)} of the tensors this linear is stored as."""
        n, k = self.shape
        if self.scheme == "int8":
            return {"qweight": (torch.int8, (n, k)), "scales": (None, (n,))}
        assert self.group_size is not None
        return {"qweight": (torch.uint8, (n, k // 2)), "scales_and_zeros": (None, (n, k // self.group_size, 2))}

    def to_json(self) -> dict[str, Any]:
        return {"scheme": self.scheme, "shape": list(self.shape), "group_size": self.group_size, "layout": self.layout}

    @classmethod
    def from_json(cls, raw: Mapping[str, Any], where: str = "quant entry") -> QuantSpec:
        try:
            return cls(raw["scheme"], tuple(raw["shape"]), raw.get("group_size"), raw.get("layout"))
        except (KeyError, TypeError, ValueError) as e:
            raise SepweightError(f"{where}: malformed quant entry {dict(raw)!r} ({type(e).__name__}: {e})") from None


def default_scale_dtype(dtype: torch.dtype) -> torch.dtype:
    """bf16 scales for bf16 weights, fp32 otherwise (QUANT_FORMAT.md)."""
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float32


def _check_weight(w: torch.Tensor, name: str) -> None:
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or not w.is_floating_point():
        got = f"{w.dtype} {list(w.shape)}" if isinstance(w, torch.Tensor) else type(w).__name__
        raise SepweightError(f"{name}: quantization takes a 2-D floating weight [out, in], got {got}")
    if w.numel() == 0:
        raise SepweightError(f"{name}: weight {list(w.shape)} is empty")
    if not bool(torch.isfinite(w).all()):
        raise SepweightError(f"{name}: weight has NaN or inf values; fix the checkpoint before quantizing it")


def quantize_int8(
    w: torch.Tensor, scale_dtype: torch.dtype | None = None, *, name: str = "weight"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: ``(qweight int8 [N, K], scales [N])``, ``w ~ qweight * scales``.

    The rows are rounded with the scale as stored (``scale_dtype``: bf16 for bf16 weights, else fp32).
    Equals what ``torch.ops.aten._weight_int8pack_mm(x, qweight, scales)`` multiplies by.

    Example::

        qweight, scales = quantize_int8(torch.randn(64, 128))
    """
    _check_weight(w, name)
    sd = scale_dtype or default_scale_dtype(w.dtype)
    s = (w.abs().amax(1).float() / 127).to(sd)  # (N,)
    inv = 1 / s.float().clamp_min(torch.finfo(sd).tiny)
    q = torch.empty(w.shape, dtype=torch.int8)
    rows = max(1, (1 << 22) // w.shape[1])  # bounded fp32 working memory
    for a in range(0, w.shape[0], rows):
        q[a : a + rows] = (w[a : a + rows].float() * inv[a : a + rows, None]).round_().clamp_(-128, 127)
    return q, s


def quantize_int4(
    w: torch.Tensor,
    group_size: int = 64,
    layout: str | None = None,
    method: str = "clip",
    scale_dtype: torch.dtype | None = None,
    *,
    name: str = "weight",
    importance: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric per-group int4: ``(qweight uint8 [N, K // 2] in layout, scales_and_zeros [N, K // g, 2])``.

    Args:
        layout: None picks this CPU's kernel layout (:func:`int4_layout`), or ``"rows"`` when N is not
            a multiple of 64.
        method: ``"clip"`` (default) searches each group's range for the least weight error;
            ``"rtn"`` is plain min/max round-to-nearest (see :mod:`llm_sepweight.quant_search`).
        scale_dtype: what scales and zeros are stored (and rounded) in; bf16 for bf16 weights, else fp32.
        importance: ``[K]`` non-negative weight of each input column in the clip search's error
            (e.g. the squared weight of the RMSNorm feeding this linear); None weighs all alike.

    Example::

        qweight, sz = quantize_int4(torch.randn(64, 128), group_size=32)
        w = dequantize({"qweight": qweight, "scales_and_zeros": sz}, QuantSpec("int4", (64, 128), 32, int4_layout()))
    """
    _check_weight(w, name)
    n, k = w.shape
    if group_size not in GROUP_SIZES:
        raise SepweightError(f"{name}: group size {group_size!r} is not one of {GROUP_SIZES}")
    if k % group_size:
        raise SepweightError(
            f"{name}: in_features K={k} is not a multiple of the group size {group_size}; "
            f"use a group size that divides {k} (one of {[g for g in GROUP_SIZES if k % g == 0] or 'none'}) or int8"
        )
    if method not in METHODS:
        raise SepweightError(f"{name}: quantization method {method!r} is not one of {METHODS}")
    layout = layout or default_layout(n)
    check_layout(layout, n, name)
    if importance is not None and (
        importance.shape != (k,) or not bool((importance >= 0).all()) or not bool(torch.isfinite(importance).all())
    ):
        raise SepweightError(
            f"{name}: importance must be [{k}] non-negative finite values, got {list(importance.shape)}"
        )
    sd = scale_dtype or default_scale_dtype(w.dtype)
    q, sz = scales_and_zeros(w, group_size, sd, method, importance)
    if not bool(torch.isfinite(sz).all()):
        big = float(w.abs().max())
        raise SepweightError(f"{name}: int4 scales overflow {sd} (max |w| = {big:.3g}); use fp32 scales")
    return _pack(q, layout), sz


def quantize_linear(
    w: torch.Tensor,
    scheme: str,
    group_size: int = 64,
    method: str = "clip",
    scale_dtype: torch.dtype | None = None,
    *,
    name: str = "weight",
    importance: torch.Tensor | None = None,
) -> tuple[dict[str, torch.Tensor], QuantSpec]:
    """One linear's stored tensors ``{"qweight": ..., "scales" | "scales_and_zeros": ...}`` and its QuantSpec.

    Example::

        tensors, spec = quantize_linear(torch.randn(128, 64), "int4", group_size=32)
        w = dequantize(tensors, spec)   # (128, 64)
    """
    if scheme == "int8":
        qweight, scales = quantize_int8(w, scale_dtype, name=name)
        return {"qweight": qweight, "scales": scales}, QuantSpec("int8", tuple(w.shape))
    if scheme == "int4":
        layout = default_layout(w.shape[0]) if w.dim() == 2 else "rows"
        qweight, sz = quantize_int4(w, group_size, layout, method, scale_dtype, name=name, importance=importance)
        return {"qweight": qweight, "scales_and_zeros": sz}, QuantSpec("int4", tuple(w.shape), group_size, layout)
    raise SepweightError(f"{name}: quantization scheme {scheme!r} is not one of {SCHEMES}")


def is_linear(part: int | str, key: str, quantize_head: bool = True) -> bool:
    """Whether a stored ``key`` of ``part`` is a linear weight a quantized folder quantizes (QUANT_FORMAT.md).

    ``P.weight`` with ``P`` ending in ``_proj`` in a layer, and ``lm_head.weight`` in the end part
    (a tied head is never stored there).

    Example::

        is_linear(3, "mlp.down_proj.weight"), is_linear("end", "lm_head.weight")   # True, True
    """
    if isinstance(part, int):
        return key.endswith("_proj.weight")
    return part == "end" and key == "lm_head.weight" and quantize_head


def default_layout(n: int) -> str:
    """This CPU's kernel layout, or ``rows`` when N is not a multiple of 64 (QUANT_FORMAT.md)."""
    return int4_layout() if n % KERNEL_ROWS == 0 else "rows"


def dequantize(
    tensors: Mapping[str, torch.Tensor], spec: QuantSpec, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The weight ``[N, K]`` a quantized linear stands for (the reference the kernels equal).

    ``tensors`` holds ``qweight`` and ``scales`` / ``scales_and_zeros``, under those names or as
    ``P.qweight`` ... (one linear). They may be rows ``a:b`` of the stored tensors (a head chunk;
    multiples of 64 for kernel layouts): the result then has ``b - a`` rows.

    Example::

        layer = SepWeights("q4").layer(0)
        spec = SepWeights("q4").linears(0)["self_attn.q_proj"]
        w = dequantize({k.removeprefix("self_attn.q_proj."): v for k, v in layer.items()}, spec, torch.bfloat16)
    """
    qweight, scales = _find(tensors, "qweight"), _find(tensors, spec.scales_key)
    n, k = qweight.shape[0], spec.shape[1]
    want = {s: shape for s, (_, shape) in spec.tensor_shapes().items()}
    for suffix, t in (("qweight", qweight), (spec.scales_key, scales)):
        if tuple(t.shape[1:]) != want[suffix][1:] or t.shape[0] != n:
            raise SepweightError(
                f"dequantize: {suffix} has shape {list(t.shape)}, {spec.to_json()} implies {[n, *want[suffix][1:]]}"
            )
    if spec.scheme == "int8":
        return (qweight.float() * scales.float()[:, None]).to(dtype)
    g = spec.group_size
    assert g is not None and spec.layout is not None
    q = unpack_int4(qweight, spec.layout).float().view(n, k // g, g)  # (N, G, g)
    w = (q - 8) * scales[..., 0:1].float() + scales[..., 1:2].float()
    return w.view(n, k).to(dtype)


def _find(tensors: Mapping[str, torch.Tensor], suffix: str) -> torch.Tensor:
    if suffix in tensors:
        return tensors[suffix]
    hits = [k for k in tensors if k.endswith("." + suffix)]
    if len(hits) != 1:
        raise SepweightError(f"dequantize: need exactly one {suffix!r} tensor, got keys {sorted(tensors)}")
    return tensors[hits[0]]
