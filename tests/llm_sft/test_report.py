"""The loss log: drawn with matplotlib; without it the CSV/JSON and one line saying how to get the picture.

NaN / infinite losses do not break the curve; every file is replaced atomically.
"""

import csv
import importlib.util
import json
import logging
import math
import struct
import sys

import pytest

from llm_sft import StepInfo, plot_losses, write_loss_log

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
needs_matplotlib = pytest.mark.skipif(
    importlib.util.find_spec("matplotlib") is None, reason="the plot extra (matplotlib) is not installed"
)


def _log(losses, evals=None):
    evals = evals or [None] * len(losses)
    return [StepInfo(i + 1, 0, loss, 1e-3, 5, 9, 10.0, float(i), e) for i, (loss, e) in enumerate(zip(losses, evals))]


@pytest.fixture
def no_matplotlib(monkeypatch):
    """Every ``import matplotlib...`` fails, as where the plot extra is not installed."""
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")] + [
        "matplotlib",
        "matplotlib.figure",
        "matplotlib.pyplot",
    ]:
        monkeypatch.setitem(sys.modules, name, None)  # None in sys.modules: the import raises ImportError


@needs_matplotlib
def test_the_curve_is_drawn_with_matplotlib(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="llm_sft"):
        paths = write_loss_log(_log([2.0, 1.5, 1.2], evals=[None, 1.6, None]), tmp_path)
    png = paths["png"].read_bytes()
    assert png[:8] == PNG_MAGIC and struct.unpack(">II", png[16:24]) == (640, 400)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss_curve.png", "loss_log.csv", "loss_log.json"]
    assert not caplog.records


def test_without_matplotlib_the_log_is_written_and_one_line_says_how_to_get_the_picture(
    tmp_path, caplog, no_matplotlib
):
    with caplog.at_level(logging.INFO, logger="llm_sft"):
        paths = write_loss_log(_log([2.0, 1.5]), tmp_path)
    assert sorted(paths) == ["csv", "json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss_log.csv", "loss_log.json"]
    assert [r["loss"] for r in csv.DictReader(open(paths["csv"], newline=""))] == ["2.0", "1.5"]
    assert [r.getMessage() for r in caplog.records] == [
        f"no loss_curve.png in {tmp_path}: matplotlib is not installed; pip install 'llm_sft[plot]' to get the picture"
    ]
    with pytest.raises(ImportError, match=r"plot_losses needs matplotlib: pip install 'llm_sft\[plot\]'"):
        plot_losses(_log([2.0, 1.5]), tmp_path / "c.png")


@needs_matplotlib
def test_nan_and_inf_losses_are_logged_and_left_out_of_the_curve(tmp_path):
    log = _log([2.0, 1.5, math.nan, math.inf], evals=[None, math.nan, None, 1.2])
    with pytest.warns(
        UserWarning, match=r"2 of 4 steps have a NaN or infinite loss \(steps \[3, 4\]\): the training diverged"
    ):
        paths = write_loss_log(log, tmp_path)
    assert paths["png"].read_bytes()[:8] == PNG_MAGIC
    rows = list(csv.DictReader(open(paths["csv"], newline="")))
    assert [r["loss"] for r in rows] == ["2.0", "1.5", "nan", "inf"]
    assert math.isnan(json.loads(paths["json"].read_text())[2]["loss"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss_curve.png", "loss_log.csv", "loss_log.json"]


def test_no_finite_loss_means_no_curve(tmp_path):
    with pytest.warns(UserWarning, match=r"2 of 2 steps have a NaN or infinite loss"):
        paths = write_loss_log(_log([math.nan, math.nan]), tmp_path)
    assert "png" not in paths and not (tmp_path / "loss_curve.png").exists()
    assert (tmp_path / "loss_log.csv").is_file() and (tmp_path / "loss_log.json").is_file()
    with pytest.raises(ValueError, match=r"no step has a finite loss \(all 2 are NaN or infinite\)"):
        plot_losses(_log([math.nan, math.inf]), tmp_path / "c.png")


@needs_matplotlib
def test_files_are_replaced_atomically(tmp_path, monkeypatch):
    """A run killed while writing the log leaves the previous complete files, never half of one."""
    from matplotlib.figure import Figure

    write_loss_log(_log([2.0, 1.0]), tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def killed_in_the_middle(self, rows):
        self.writerow(rows[0])
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(csv.DictWriter, "writerows", killed_in_the_middle)
        with pytest.raises(KeyboardInterrupt):
            write_loss_log(_log([2.0, 1.0, 0.5]), tmp_path)

    def half_a_png(self, fname, **kwargs):
        (fname.write if hasattr(fname, "write") else open(fname, "wb").write)(PNG_MAGIC[:4])
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(Figure, "savefig", half_a_png)
        with pytest.raises(KeyboardInterrupt):
            plot_losses(_log([2.0, 1.0, 0.5]), tmp_path / "loss_curve.png")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no temp file left either
