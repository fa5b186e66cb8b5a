"""The loss log of a run: ``loss_log.csv``, ``loss_log.json`` and ``loss_curve.png``.

The PNG is drawn with matplotlib when it is installed (``pip install llm_sft[plot]``), otherwise
with the small built-in writer in :mod:`llm_sft.png`, so a run always leaves a picture.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import asdict, fields
from pathlib import Path

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
    train = [(h.step, h.loss) for h in history]
    evals = [(h.step, h.eval_loss) for h in history if h.eval_loss is not None]
    if not train:
        raise ValueError("the loss log is empty: nothing to plot")
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
    with open(out["csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[fl.name for fl in fields(StepInfo)])
        writer.writeheader()
        writer.writerows(rows)
    out["json"].write_text(json.dumps(rows, indent=1) + "\n")
    if rows:
        plot_losses(history, out["png"], use_matplotlib)
    return out
