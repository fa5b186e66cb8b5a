"""The loss log of a run: ``loss_log.csv``, ``loss_log.json`` and ``loss_curve.png``, each written atomically.

The PNG is drawn with matplotlib when it is installed (``pip install llm_sft[plot]``), otherwise
with the small built-in writer in :mod:`llm_sft.png`, so a run always leaves a picture. Steps
whose loss is NaN or infinite are left out of the picture (and kept, as such, in the CSV/JSON).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import asdict, fields
from pathlib import Path

from .checkpoint import write_atomic
from .png import BLUE, ORANGE, line_chart
from .trainer import StepInfo


def plot_losses(history: Sequence[StepInfo], path: str | Path, use_matplotlib: bool | None = None) -> Path:
    """Train loss per step (and eval loss where measured) as a PNG.

    Args:
        use_matplotlib: None = when importable; False = always the built-in writer.

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
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")  # drawn aside, renamed into place
    try:
        _draw(train, evals, tmp, use_matplotlib)
        write_atomic(path, tmp.read_bytes())
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _draw(
    train: list[tuple[int, float]], evals: list[tuple[int, float]], path: Path, use_matplotlib: bool | None
) -> Path:
    if use_matplotlib is not False:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            if use_matplotlib:
                raise
        else:
            fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
            ax.plot(*zip(*train), label="train", color="tab:blue")
            if evals:
                ax.plot(*zip(*evals), "o-", label="eval", color="tab:orange")
            ax.set_xlabel("step")
            ax.set_ylabel("loss (nats / target token)")
            ax.grid(alpha=0.3)
            ax.legend()
            fig.tight_layout()
            fig.savefig(path)
            plt.close(fig)
            return path
    series = [("train", train, BLUE)] + ([("eval", evals, ORANGE)] if evals else [])
    return line_chart(series, path)


def write_loss_log(
    history: Sequence[StepInfo], folder: str | Path, use_matplotlib: bool | None = None
) -> dict[str, Path]:
    """Write ``loss_log.csv``, ``loss_log.json`` and ``loss_curve.png`` into ``folder``; their paths.

    Each file is written atomically. NaN / infinite losses are kept in the CSV/JSON, left out of
    the curve and warned about; when no step has a finite loss there is no curve (no ``"png"`` key).

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
    if len(bad) < len(rows):
        plot_losses(history, out["png"], use_matplotlib)
    else:
        del out["png"]
    return out
