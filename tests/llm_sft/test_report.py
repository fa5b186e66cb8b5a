"""The loss log: NaN / infinite losses do not break the curve; every file is replaced atomically."""

import csv
import json
import math

import pytest

import llm_sft.report
from llm_sft import StepInfo, plot_losses, write_loss_log


def _log(losses, evals=None):
    evals = evals or [None] * len(losses)
    return [StepInfo(i + 1, 0, loss, 1e-3, 5, 9, 10.0, float(i), e) for i, (loss, e) in enumerate(zip(losses, evals))]


def test_nan_and_inf_losses_are_logged_and_left_out_of_the_curve(tmp_path):
    log = _log([2.0, 1.5, math.nan, math.inf], evals=[None, math.nan, None, 1.2])
    with pytest.warns(
        UserWarning, match=r"2 of 4 steps have a NaN or infinite loss \(steps \[3, 4\]\): the training diverged"
    ):
        paths = write_loss_log(log, tmp_path, use_matplotlib=False)
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = list(csv.DictReader(open(paths["csv"], newline="")))
    assert [r["loss"] for r in rows] == ["2.0", "1.5", "nan", "inf"]
    assert math.isnan(json.loads(paths["json"].read_text())[2]["loss"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss_curve.png", "loss_log.csv", "loss_log.json"]


def test_no_finite_loss_means_no_curve(tmp_path):
    with pytest.warns(UserWarning, match=r"2 of 2 steps have a NaN or infinite loss"):
        paths = write_loss_log(_log([math.nan, math.nan]), tmp_path, use_matplotlib=False)
    assert "png" not in paths and not (tmp_path / "loss_curve.png").exists()
    assert (tmp_path / "loss_log.csv").is_file() and (tmp_path / "loss_log.json").is_file()
    with pytest.raises(ValueError, match=r"no step has a finite loss \(all 2 are NaN or infinite\)"):
        plot_losses(_log([math.nan, math.inf]), tmp_path / "c.png", use_matplotlib=False)


def test_files_are_replaced_atomically(tmp_path, monkeypatch):
    """A run killed while writing the log leaves the previous complete files, never half of one."""
    write_loss_log(_log([2.0, 1.0]), tmp_path, use_matplotlib=False)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def killed_in_the_middle(self, rows):
        self.writerow(rows[0])
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(csv.DictWriter, "writerows", killed_in_the_middle)
        with pytest.raises(KeyboardInterrupt):
            write_loss_log(_log([2.0, 1.0, 0.5]), tmp_path, use_matplotlib=False)

    def half_a_png(series, path):
        open(path, "wb").write(b"\x89PNG")
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(llm_sft.report, "line_chart", half_a_png)
        with pytest.raises(KeyboardInterrupt):
            plot_losses(_log([2.0, 1.0, 0.5]), tmp_path / "loss_curve.png", use_matplotlib=False)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no temp file left either
