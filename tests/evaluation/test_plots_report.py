import json

import numpy as np
import pytest

from medmap.evaluation.plots import label_efficiency_figure, label_efficiency_plot, write_all_plots
from medmap.evaluation.report import evaluate_and_report


def _data(c, n=40, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, n)
    logits = rng.normal(size=(n, c)) + 2.0 * np.eye(c)[y]
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return y, p


@pytest.mark.parametrize("c", [2, 4])
def test_plots_are_written(tmp_path, c):
    y, p = _data(c)
    paths = write_all_plots(y, p, [f"k{i}" for i in range(c)], tmp_path)
    assert set(paths) == {"confusion_matrix", "roc", "reliability"}
    for path in paths.values():
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_roc_with_a_class_missing_still_plots(tmp_path):
    y, p = _data(3)
    y[y == 2] = 0
    assert write_all_plots(y, p, ["a", "b", "c"], tmp_path)["roc"].exists()


def test_evaluate_and_report_writes_json_and_markdown(tmp_path):
    y, p = _data(2, n=30)
    m = evaluate_and_report(y, p, ["normal", "tumour"], tmp_path, title="brain, test split",
                            extra={"checkpoint": "best"}, n_bootstrap=100)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["accuracy"] == pytest.approx(m["accuracy"])
    assert saved["context"] == {"checkpoint": "best"}
    md = (tmp_path / "report.md").read_text()
    assert md.startswith("# brain, test split")
    assert "flattened one-hot accuracy (not top-1" in md
    assert f"{m['accuracy']:.4f}" in md and "![roc](roc.png)" in md
    assert "| normal |" in md and "95% CI" in md


def test_label_efficiency_axis_labels_only_the_measured_points(tmp_path):
    # 5 and 20 per class span less than a decade of the log axis: no minor tick may be labelled
    points = [("MedMAP", 5, 0.5), ("MedMAP", 5, 0.6), ("MedMAP", 20, 0.8), ("CNN", 5, 0.4), ("CNN", 20, 0.7)]
    fig = label_efficiency_figure(points, chance=1 / 7)
    ax = fig.axes[0]
    fig.canvas.draw()
    assert [t.get_text() for t in ax.get_xticklabels()] == ["5", "20"]
    assert [t.get_text() for t in ax.get_xticklabels(minor=True) if t.get_text()] == []
    assert label_efficiency_plot(points, tmp_path / "le.png").read_bytes()[:4] == b"\x89PNG"

