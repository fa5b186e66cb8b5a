"""The loss log of a run: ``loss_log.csv``, ``loss_log.json`` and ``loss_curve.png``, each written atomically.

The PNG is drawn with matplotlib (the ``plot`` extra: ``pip install 'llm_sft[plot]'``); without it
the CSV/JSON are written and one log line says how to get the picture. Steps whose loss is NaN or
infinite are left out of the picture (and kept, as such, in the CSV/JSON).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from .checkpoint import write_atomic
from .trainer import StepInfo

log = logging.getLogger(__name__)
INSTALL_PLOT = "pip install 'llm_sft[plot]'"


def _figure_class() -> Any | None:
    """matplotlib's ``Figure`` (drawn without pyplot: no global backend or state is touched), or None."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    return Figure


def plot_losses(history: Sequence[StepInfo], path: str | Path) -> Path:
    """Train loss per step (and eval loss where measured) as a PNG, written atomically; needs matplotlib.

    Example::

        plot_losses(log, "loss_curve.png")
    """
    path = Path(path)
    if not history:
        raise ValueError("the loss log is empty: nothing to plot")
    train = [(h.step, h.loss) for h in history if math.isfinite(h.loss)]
    evals = [(h.step, h.eval_loss) for h in history if h.eval_loss is not None and math.isfinite(h.eval_loss)]
    if not train:
        raise ValueError(f"no step has a finite loss (all {len(history)} are NaN or infinite): nothing to plot")
    figure = _figure_class()
    if figure is None:
        raise ImportError(f"plot_losses needs matplotlib: {INSTALL_PLOT}")
    fig = figure(figsize=(6.4, 4.0), dpi=100)  # 640 x 400 pixels
    ax = fig.subplots()
    ax.plot(*zip(*train), label="train", color="tab:blue")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval", color="tab:orange")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / target token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png")  # drawn in memory, then renamed into place: never half a file
    write_atomic(path, png.getvalue())
    return path


def write_loss_log(history: Sequence[StepInfo], folder: str | Path) -> dict[str, Path]:
    """Write ``loss_log.csv``, ``loss_log.json`` and ``loss_curve.png`` into ``folder``; their paths.

    Each file is written atomically. NaN / infinite losses are kept in the CSV/JSON, left out of
    the curve and warned about. There is no curve (no ``"png"`` key) when no step has a finite
    loss, or when matplotlib is not installed (one log line then says how to get it).

    Example::

        paths = write_loss_log(sft(part, ds, opt, 4, 1), "out")      # {"csv": ..., "json": ..., "png": ...}
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = [asdict(h) for h in history]
    out = {
        "csv": folder / "loss_log.csv",
        "json": folder / "loss_log.json",
        "png": folder / "loss_curve.png",
    }
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=[fl.name for fl in fields(StepInfo)])
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(out["csv"], text.getvalue().encode())
    write_atomic(out["json"], (json.dumps(rows, indent=1) + "\n").encode())
    bad = [h.step for h in history if not math.isfinite(h.loss)]
    if bad:
        warnings.warn(
            f"{len(bad)} of {len(history)} steps have a NaN or infinite loss (steps {bad[:10]}): the training "
            "diverged (lower the learning rate, clip gradients); the curve leaves them out",
            stacklevel=2,
        )
    if len(bad) == len(rows):
        del out["png"]
    elif _figure_class() is None:
        log.warning(
            "no %s in %s: matplotlib is not installed; %s to get the picture", out["png"].name, folder, INSTALL_PLOT
        )
        del out["png"]
    else:
        plot_losses(history, out["png"])
    return out
