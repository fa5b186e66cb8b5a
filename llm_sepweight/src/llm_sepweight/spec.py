"""Part specs: which pieces of a model a process holds, written as ``"b 0-12"``, ``"12-24 e"``, ``"f"``.

Grammar (whitespace-separated tokens, any order, each at most once):
- ``b``: the begin part (token embedding)
- ``e``: the end part (final norm + head)
- ``f``: the full model (alone)
- ``N``: the single layer N
- ``A-B``: layers A..B-1 (half-open, like ``range``)
Ranges may not overlap. ``str(spec)`` gives the canonical form.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .errors import SepweightError

_HELP = "valid tokens are b, e, f, N or A-B (half-open); examples: 'b 0-12', '12-24 e', 'f', '5'"
_RANGE = re.compile(r"^(\d+)-(\d+)$")


@dataclass(frozen=True)
class PartSpec:
    """A parsed spec; ``layers`` is None only for ``f`` before it is resolved against a model."""

    begin: bool = False
    end: bool = False
    layers: tuple[int, ...] | None = ()
    text: str = field(default="", compare=False)

    @property
    def is_full(self) -> bool:
        return self.layers is None

    @classmethod
    def parse(cls, spec: str | PartSpec) -> PartSpec:
        """Parse a spec string. Example: ``PartSpec.parse("b 0-12").layers == tuple(range(12))``."""
        if isinstance(spec, PartSpec):
            return spec
        if not isinstance(spec, str):
            raise SepweightError(f"part spec must be a string like 'b 0-12', got {type(spec).__name__}")
        tokens = spec.split()
        if not tokens:
            raise SepweightError(f"part spec is empty; {_HELP}")
        if "f" in tokens:
            if len(tokens) > 1:
                raise SepweightError(f"part spec {spec!r}: 'f' (full model) cannot be combined with other tokens")
            return cls(begin=True, end=True, layers=None, text=spec)
        begin = end = False
        covered: dict[int, str] = {}
        for tok in tokens:
            if tok in ("b", "e"):
                if begin if tok == "b" else end:
                    raise SepweightError(f"part spec {spec!r}: token {tok!r} appears twice")
                begin, end = begin or tok == "b", end or tok == "e"
                continue
            if tok.isdigit():
                lo, hi = int(tok), int(tok) + 1
            elif m := _RANGE.match(tok):
                lo, hi = int(m.group(1)), int(m.group(2))
                if hi <= lo:
                    raise SepweightError(
                        f"part spec {spec!r}: range {tok!r} is empty (ranges are half-open A-B with B > A)"
                    )
            else:
                raise SepweightError(f"part spec {spec!r}: token {tok!r} is not understood; {_HELP}")
            for i in range(lo, hi):
                if i in covered:
                    raise SepweightError(f"part spec {spec!r}: {tok!r} overlaps {covered[i]!r} at layer {i}")
                covered[i] = tok
        return cls(begin=begin, end=end, layers=tuple(sorted(covered)), text=spec)

    @classmethod
    def full(cls) -> PartSpec:
        return cls(begin=True, end=True, layers=None, text="f")

    def resolve(self, num_layers: int) -> PartSpec:
        """Expand ``f`` and check every layer exists in a model of ``num_layers`` layers."""
        if self.layers is None:
            return PartSpec(True, True, tuple(range(num_layers)), self.text)
        bad = [i for i in self.layers if i >= num_layers]
        if bad:
            raise SepweightError(
                f"part spec {self.text or str(self)!r} asks for layer {bad[0]}, but the model has "
                f"{num_layers} layers (valid: 0-{num_layers}, i.e. layers 0..{num_layers - 1})"
            )
        return self

    def stored_parts(self, tied: bool) -> PartSpec:
        """The parts a folder must store to serve this spec.

        A tied model's head *is* its embedding matrix, stored once in the begin file, so with a tied
        head ``e`` needs ``b``'s file too: a folder converted for ``"12-24 e"`` holds ``"b 12-24 e"``.

        Example::

            str(PartSpec.parse("12-24 e").stored_parts(tied=True))    # "b 12-24 e"
            str(PartSpec.parse("12-24 e").stored_parts(tied=False))   # "12-24 e"
        """
        if not tied or not self.end or self.begin:
            return self
        return PartSpec(begin=True, end=True, layers=self.layers, text=self.text)

    def __str__(self) -> str:
        if self.layers is None:
            return "f"
        parts = ["b"] if self.begin else []
        layers = list(self.layers)
        i = 0
        while i < len(layers):  # compress runs into half-open ranges
            j = i
            while j + 1 < len(layers) and layers[j + 1] == layers[j] + 1:
                j += 1
            parts.append(str(layers[i]) if i == j else f"{layers[i]}-{layers[j] + 1}")
            i = j + 1
        if self.end:
            parts.append("e")
        return " ".join(parts)

    def is_contiguous(self) -> bool:
        """True when the layers form one run (what a part-model chains through)."""
        ls = self.layers
        return ls is None or not ls or ls[-1] - ls[0] + 1 == len(ls)
