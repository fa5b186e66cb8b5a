"""int4 packing: the byte layouts torch's CPU int4 kernel takes, in pure torch.

``torch.ops.aten._convert_weight_to_int4pack_for_cpu(w_int32 [N, K], 2)`` packs by CPU capability,
so a folder records the layout of each tensor (QUANT_FORMAT.md). For the ``aten_cpu_*`` layouts,
``q [N, K]`` is viewed ``[N/BN, BN, K]``; for each (block, k) the BN rows become BN/2 bytes, byte
``j`` holding (low, high) nibble = rows ``(j, j + BN/2)`` ("half") or ``(2j, 2j + 1)`` ("pairs");
bytes ``[N/BN, K, BN/2]`` are viewed ``[N, K/2]``. ``rows`` is the plain layout for tensors the
kernel cannot take: ``packed[n, k // 2]``, low nibble = even ``k``.
"""

from __future__ import annotations

import torch

from .errors import SepweightError

# layout -> (BN, how a byte pairs the rows of a block); None for the kernel-free "rows" layout
LAYOUTS: dict[str, tuple[int, str] | None] = {
    "aten_cpu_avx512": (64, "half"),
    "aten_cpu_avx2": (32, "half"),
    "aten_cpu_default": (32, "pairs"),
    "rows": None,
}
KERNEL_ROWS = 64  # N must be a multiple of this for a kernel layout on every CPU (AVX512's BN)


def int4_layout() -> str:
    """The layout torch's int4 packing op produces on this CPU.

    Example::

        int4_layout()  # "aten_cpu_avx2" on an AVX2 machine
    """
    cap = torch.backends.cpu.get_cpu_capability().upper()
    if cap.startswith("AVX512"):
        return "aten_cpu_avx512"
    if cap == "AVX2":
        return "aten_cpu_avx2"
    return "aten_cpu_default"


def check_layout(layout: str, n: int, name: str = "weight") -> None:
    """Reject an unknown layout or a row count the layout's block size does not divide."""
    if layout not in LAYOUTS:
        raise SepweightError(f"{name}: unknown int4 layout {layout!r}; use one of {sorted(LAYOUTS)}")
    block = LAYOUTS[layout]
    if block is not None and n % block[0] != 0:
        raise SepweightError(
            f"{name}: {n} rows are not a multiple of {block[0]}, which layout {layout!r} needs; use layout 'rows'"
        )


def pack_int4(q: torch.Tensor, layout: str) -> torch.Tensor:
    """Pack int4 values ``q`` (integers 0..15, ``[N, K]``) into uint8 ``[N, K // 2]`` in ``layout``.

    Equals ``torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.int(), 2)`` on a CPU whose
    :func:`int4_layout` is ``layout``.

    Example::

        packed = pack_int4(torch.randint(0, 16, (64, 128), dtype=torch.uint8), int4_layout())
    """
    if q.dim() != 2 or q.is_floating_point() or q.is_complex() or q.dtype == torch.bool:
        raise SepweightError(f"pack_int4 takes a 2-D integer tensor of values 0..15, got {q.dtype} {list(q.shape)}")
    if q.shape[1] % 2:
        raise SepweightError(f"pack_int4: K={q.shape[1]} is odd; int4 packs two values per byte")
    check_layout(layout, q.shape[0], "pack_int4")
    if q.numel() and (int(q.min()) < 0 or int(q.max()) > 15):
        raise SepweightError(f"pack_int4: values must be in 0..15, got {int(q.min())}..{int(q.max())}")
    return _pack(q.to(torch.uint8), layout)


def _pack(q: torch.Tensor, layout: str) -> torch.Tensor:
    """pack_int4 without the checks (q uint8 0..15, shapes already valid)."""
    n, k = q.shape
    block = LAYOUTS[layout]
    if block is None:
        return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()  # (N, K/2)
    bn, pairing = block
    qq = q.reshape(n // bn, bn, k).transpose(1, 2)  # (N/BN, K, BN)
    if pairing == "half":
        lo, hi = qq[..., : bn // 2], qq[..., bn // 2 :]
    else:
        lo, hi = qq[..., 0::2], qq[..., 1::2]
    return (lo | (hi << 4)).contiguous().view(n, k // 2)  # (N/BN, K, BN/2) -> (N, K/2)


def unpack_int4(packed: torch.Tensor, layout: str) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: uint8 ``[N, K // 2]`` in ``layout`` -> uint8 values 0..15 ``[N, K]``.

    Rows ``a:b`` of a packed kernel layout (``a``, ``b`` multiples of the block size) unpack on their own.

    Example::

        q = unpack_int4(packed, "aten_cpu_avx2")  # (N, K)
    """
    if packed.dim() != 2 or packed.dtype != torch.uint8:
        raise SepweightError(f"unpack_int4 takes a 2-D uint8 tensor, got {packed.dtype} {list(packed.shape)}")
    check_layout(layout, packed.shape[0], "unpack_int4")
    n, half_k = packed.shape
    lo, hi = packed & 15, packed >> 4
    block = LAYOUTS[layout]
    if block is None:
        return torch.stack([lo, hi], -1).view(n, 2 * half_k)
    bn, pairing = block
    shape = (n // bn, half_k * 2, bn // 2)
    lo, hi = lo.view(shape), hi.view(shape)  # (N/BN, K, BN/2)
    qq = torch.cat([lo, hi], -1) if pairing == "half" else torch.stack([lo, hi], -1).view(*shape[:2], bn)
    return qq.transpose(1, 2).reshape(n, 2 * half_k)  # (N/BN, BN, K) -> (N, K)
