"""Stage specs: which part of the model each rank holds, checked to cover it exactly once.

Stage ``i`` runs on rank ``i``. Written as sepweight specs joined by commas, ``"b 0-8,8-16,16-24 e"``,
or ``"auto"``: an even split by bytes (what each host must hold, with the embedding on the first
stage and the head on the last) or by layer count.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from llm_sepweight import PartSpec, SepWeights

Balance = Literal["bytes", "layers"]


def parse_stages(parts: str | Sequence[str], num_layers: int) -> list[PartSpec]:
    """Parse and check explicit stage specs; they must chain ``b``, layers ``0..L-1`` in order, ``e``.

    Example::

        parse_stages("b 0-2, 2-3 e", num_layers=3)   # [PartSpec('b 0-2'), PartSpec('2-3 e')]
    """
    texts = [p.strip() for p in parts.split(",")] if isinstance(parts, str) else [str(p).strip() for p in parts]
    if not texts or any(not t for t in texts):
        msg = f"stage specs {parts!r}: give one spec per stage separated by commas, e.g. 'b 0-12,12-24 e'"
        raise ValueError(msg)
    specs = [PartSpec.parse(t) for t in texts]
    if len(specs) > 1 and any(s.is_full for s in specs):
        msg = f"stage specs {parts!r}: 'f' (the whole model) only works as the single stage of a 1-rank run"
        raise ValueError(msg)
    specs = [s.resolve(num_layers) for s in specs]
    check_stages(specs, num_layers)
    return specs


def check_stages(specs: Sequence[PartSpec], num_layers: int) -> None:
    """Raise ValueError unless the stages hold ``b`` first, every layer once in order, and ``e`` last.

    Example::

        check_stages([PartSpec.parse("b 0-2"), PartSpec.parse("1-3 e")], 3)
        # ValueError: ...: stage 1 '1-3 e' overlaps stage 0 'b 0-2' at layer 1
    """
    names = ", ".join(f"stage {i} {str(s)!r}" for i, s in enumerate(specs))
    for i, s in enumerate(specs):
        if s.begin != (i == 0):
            where = "the first stage must hold 'b' (the embedding)" if i == 0 else "only the first stage may hold 'b'"
            raise ValueError(f"{names}: {where}")
        if s.end != (i == len(specs) - 1):
            last = i == len(specs) - 1
            where = "the last stage must hold 'e' (norm + head)" if last else "only the last stage may hold 'e'"
            raise ValueError(f"{names}: {where}")
        if not s.is_contiguous():
            raise ValueError(f"{names}: stage {i} {str(s)!r} must hold one contiguous range of layers")
        if not s.layers and not (s.begin or s.end):
            raise ValueError(f"{names}: stage {i} holds nothing")
    expected = 0  # the next layer the chain must reach
    for i, s in enumerate(specs):
        layers = s.layers or ()
        if not layers:
            continue
        if layers[0] < expected:
            owner = next(j for j, t in enumerate(specs[:i]) if layers[0] in (t.layers or ()))
            msg = f"{names}: stage {i} {str(s)!r} overlaps stage {owner} {str(specs[owner])!r} at layer {layers[0]}"
            raise ValueError(msg)
        if layers[0] > expected:
            gap = f"{expected}" if layers[0] == expected + 1 else f"{expected}-{layers[0]}"
            raise ValueError(f"{names}: layer(s) {gap} are in no stage (stage {i} starts at layer {layers[0]})")
        expected = layers[-1] + 1
    if expected != num_layers:
        gap = f"{expected}-{num_layers}"
        raise ValueError(f"{names}: layer(s) {gap} of the model's {num_layers} are in no stage")


def split_layers(num_layers: int, num_stages: int) -> list[PartSpec]:
    """An even split by layer count (earlier stages get the remainder).

    Example::

        [str(s) for s in split_layers(24, 3)]   # ['b 0-8', '8-16', '16-24 e']
    """
    if not 1 <= num_stages <= max(num_layers, 1):
        raise ValueError(f"cannot split {num_layers} layers into {num_stages} stages of at least one layer each")
    base, extra = divmod(num_layers, num_stages)
    bounds = [0]
    for i in range(num_stages):
        bounds.append(bounds[-1] + base + (1 if i < extra else 0))
    return _specs(bounds, num_layers)


def split_bytes(sizes: Sequence[int], num_stages: int) -> list[PartSpec]:
    """A split that minimises the largest stage's bytes.

    ``sizes`` are ``[begin, layer 0, ..., layer L-1, end]`` in bytes; the result is the contiguous
    partition into ``num_stages`` non-empty groups with the smallest maximum (a stage may then hold
    only ``b`` or only ``e`` when the embedding or head is as big as several layers).

    Example::

        [str(s) for s in split_bytes([40, 10, 10, 10, 10, 40], 2)]   # ['b 0-2', '2-4 e']
    """
    n = len(sizes)
    if n < 2 or not 1 <= num_stages <= n:
        raise ValueError(f"cannot split {n - 2} layers plus embedding and head into {num_stages} non-empty stages")
    prefix = [0]
    for s in sizes:
        prefix.append(prefix[-1] + s)
    # best[k][j]: smallest max group size splitting items[:j] into k groups; cut[k][j]: start of the last group
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(num_stages + 1)]
    cut = [[0] * (n + 1) for _ in range(num_stages + 1)]
    best[0][0] = 0
    for k in range(1, num_stages + 1):
        for j in range(k, n + 1):
            for i in range(k - 1, j):
                value = max(best[k - 1][i], prefix[j] - prefix[i])
                if value < best[k][j]:
                    best[k][j], cut[k][j] = value, i
    starts, j = [], n
    for k in range(num_stages, 0, -1):
        starts.append(cut[k][j])
        j = cut[k][j]
    starts.reverse()
    # item index t is begin (0), layer t-1, or end (n-1): group boundaries in layer numbers
    num_layers = n - 2
    bounds = [0] + [min(max(t - 1, 0), num_layers) for t in starts[1:]] + [num_layers]
    return _specs(bounds, num_layers)


def _specs(bounds: list[int], num_layers: int) -> list[PartSpec]:
    """Stage i holds layers bounds[i]..bounds[i+1]-1; the first adds 'b', the last 'e'."""
    last = len(bounds) - 2
    specs = []
    for i in range(last + 1):
        layers = tuple(range(bounds[i], bounds[i + 1]))
        specs.append(PartSpec(begin=i == 0, end=i == last, layers=layers))
    check_stages(specs, num_layers)
    return specs


def part_sizes(source: SepWeights) -> list[int]:
    """``[begin, layer 0, ..., layer L-1, end]`` bytes of a sepweight folder (a tied head counts on the end)."""
    begin, layers, end = source.manifest.parts()
    if not (begin and end and layers == list(range(source.num_layers))):
        msg = (
            f"{source.root}: holds only {str(source.spec)!r}, so an automatic split by bytes cannot see every "
            "part's size; use balance='layers' (--balance layers) or give the stage specs explicitly"
        )
        raise ValueError(msg)
    head = source.nbytes("end") + (source.nbytes("begin") if source.tied else 0)
    return [
        source.nbytes("begin"),
        *(source.nbytes(i) for i in range(source.num_layers)),
        head,
    ]


def stage_specs(
    parts: str | Sequence[str],
    num_stages: int,
    source: SepWeights,
    balance: Balance = "bytes",
) -> list[PartSpec]:
    """The stage specs of a run: ``parts`` explicit, or ``"auto"`` split by ``balance``.

    Example::

        specs = stage_specs("auto", 3, SepWeights("qwen-sep"))           # by bytes
        specs = stage_specs("b 0-8,8-16,16-24 e", 3, SepWeights("qwen-sep"))
    """
    if balance not in ("bytes", "layers"):
        raise ValueError(f"balance must be 'bytes' or 'layers', got {balance!r}")
    if isinstance(parts, str) and parts.strip() == "auto":
        if balance == "layers":
            return split_layers(source.num_layers, num_stages)
        return split_bytes(part_sizes(source), num_stages)
    specs = parse_stages(parts, source.num_layers)
    if len(specs) != num_stages:
        msg = (
            f"{len(specs)} stage specs ({', '.join(repr(str(s)) for s in specs)}) for {num_stages} ranks; "
            "give one spec per rank (torchrun --nproc-per-node / --nnodes) or use 'auto'"
        )
        raise ValueError(msg)
    return specs
