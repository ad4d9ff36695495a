"""``medmap predict --html``: a self-contained page a person can read (and that a browser renders)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from medmap.cli.main import main
from medmap.config import OrganConfig, load_yaml
from medmap.data.studylist import LesionBox
from medmap.evaluation.html_report import boxes_in_input, draw_box, input_affines
from tests.helpers.tiny_studies import make_tiny_brain_data, tiny_finetune_run

STUDY_ID = "<script>alert(\"x\")&"


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_brain_data(tmp_path_factory.mktemp("html"), n=6, n_val=1, n_test=1)


@pytest.fixture(scope="module")
def ft_run(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny fine-tuned brain run (random encoders, one epoch: the page, not the model, is tested)."""
    return tiny_finetune_run(data, tmp_path_factory.mktemp("htmlrun") / "run")


@pytest.fixture(scope="module")
def saliency_page(ft_run: Path, data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict]:
    return _predict_html(ft_run, data, tmp_path_factory.mktemp("page"))


def _lesion_run(ft_run: Path, tmp_path: Path) -> Path:
    run = tmp_path / "lesion_run"
    shutil.copytree(ft_run, run, ignore=shutil.ignore_patterns("tb", "last"))
    organ = yaml.safe_load((run / "organ.yaml").read_text())
    (run / "organ.yaml").write_text(yaml.safe_dump({**organ, "crop": "lesion_box", "margin_mm": [4.0, 4.0, 4.0]}))
    return run


def _predict_html(run: Path, data: Path, out: Path, *extra: str) -> tuple[str, dict]:
    study = data.parent / "s5"  # t2 and t1 of a tumour study (the others are left out)
    vols = [f"t1={study / 't1.nii.gz'}", f"t2={study / 't2.nii.gz'}"]
    assert main(["predict", str(run), *vols, "--study-id", STUDY_ID, "--out", str(out), "--html", *extra]) == 0
    pred = json.loads((out / f"{STUDY_ID}_prediction.json").read_text())
    page = Path(pred["report_html"])
    assert page == out / f"{STUDY_ID}_report.html"
    return page.read_text(), pred


def _assert_self_contained(page: str) -> None:
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:|//)""", page, re.I)
    assert "<script" not in page.lower() and "<link" not in page.lower() and "@import" not in page
    imgs = re.findall(r"<img\b[^>]*>", page)
    assert imgs and all(re.search(r'src="data:image/png;base64,[A-Za-z0-9+/=]+"', i) for i in imgs)


def test_predict_html_page_is_self_contained_and_complete(ft_run: Path, saliency_page: tuple[str, dict]) -> None:
    page, pred = saliency_page
    _assert_self_contained(page)
    # sequences: the given ones and the missing ones, by name
    used = set(re.findall(r'<tr class="used" data-modality="([^"]+)"', page))
    missing = set(re.findall(r'<tr class="missing" data-modality="([^"]+)"', page))
    assert used == set(pred["modalities_used"]) == {"t1", "t2"}
    assert missing == set(pred["modalities_missing"]) == {"t1ce", "flair"}
    assert "missing: t1ce, flair" in page
    # one figure per given sequence
    assert re.findall(r'<figure data-modality="([^"]+)"', page) == ["t1", "t2"]
    # the probabilities of the JSON, highest first, the predicted class highlighted
    rows = re.findall(r'<tr( class="predicted")? data-class="([^"]+)" data-p="([^"]+)"', page)
    assert {c: float(p) for _, c, p in rows} == pytest.approx(pred["probabilities"], abs=1e-9)
    assert [float(p) for _, _, p in rows] == sorted(pred["probabilities"].values(), reverse=True)
    assert [c for mark, c, _ in rows if mark] == [pred["predicted_class"]]
    for c, p in pred["probabilities"].items():
        assert f"{100 * p:.1f}%" in page
    # provenance, the disclaimer, the saliency overlay
    assert str(ft_run.resolve()) in page and "best (" in page
    assert "Research tool, not a diagnosis" in page
    assert "Grad-CAM saliency for the predicted class" in page
    # the study id is shown, escaped
    assert "<script>" not in page and "&lt;script&gt;alert(&quot;x&quot;)&amp;" in page


def test_predict_html_without_saliency(ft_run: Path, data: Path, tmp_path: Path) -> None:
    page, pred = _predict_html(ft_run, data, tmp_path / "p", "--no-saliency")
    _assert_self_contained(page)
    assert pred["saliency_png"] is None
    assert "Saliency was not computed" in page and "Grad-CAM saliency for" not in page
    assert re.findall(r'<figure data-modality="([^"]+)"', page) == ["t1", "t2"]


def test_lesion_level_page_draws_each_sequence_box(ft_run: Path, data: Path, tmp_path: Path) -> None:
    run = _lesion_run(ft_run, tmp_path)
    page, _ = _predict_html(run, data, tmp_path / "p", "--lesion-box", "t1=4,5,6,12,13,14",
                            "--lesion-box", "t2=3,5,6,12,13,14")
    _assert_self_contained(page)
    assert "input is cut around it, so it is drawn in each sequence's own patch" in page
    assert "<b>t1</b>: 4, 5, 6, 12, 13, 14" in page and "<b>t2</b>: 3, 5, 6, 12, 13, 14" in page


def test_lesion_box_lies_at_the_margin_of_each_sequence_patch(ft_run: Path, data: Path) -> None:
    """The tiny studies are on a 2 mm grid: voxels 4..12 span 7..25 mm; with a 4 mm margin the
    patch spans 3..29 mm in 16 voxels of 1.625 mm, so the box edges fall at 4 / 1.625 - 0.5."""
    organ = OrganConfig.from_dict({**load_yaml(ft_run / "organ.yaml"), "crop": "lesion_box", "margin_mm": [4, 4, 4]})
    study = data.parent / "s5"
    paths = {"t1": study / "t1.nii.gz", "t2": study / "t2.nii.gz"}
    box = LesionBox("voxel", boxes={"t1": (4, 4, 4, 12, 12, 12), "t2": (2, 4, 4, 12, 12, 12)})
    inputs = {"affine": np.eye(4), "present": np.array([m in paths for m in organ.modalities])}
    affines = input_affines(organ, inputs, paths, box)
    boxes = boxes_in_input(box, paths, affines)
    assert set(boxes) == {"t1", "t2"}
    lo, hi = boxes["t1"]
    assert lo == pytest.approx([4 / 1.625 - 0.5] * 3) and hi == pytest.approx([16 - 4 / 1.625 - 0.5] * 3)
    lo2, hi2 = boxes["t2"]  # a wider box on t2: its own patch, the same margin in mm
    assert lo2[0] == pytest.approx(4 / (30 / 16) - 0.5) and hi2[1:] == pytest.approx(hi[1:])
    # a world box on a full-volume grid maps through that grid's affine
    full = OrganConfig.from_dict(load_yaml(ft_run / "organ.yaml"))
    grid = np.diag([2.5, 2.5, 2.5, 1.0])
    world = LesionBox("world", box=(5.0, 5.0, 5.0, 15.0, 15.0, 15.0))
    lo3, hi3 = boxes_in_input(world, paths, input_affines(full, {**inputs, "affine": grid}, paths, world))["t1"]
    assert lo3 == pytest.approx([2.0] * 3) and hi3 == pytest.approx([6.0] * 3)


def test_draw_box_is_solid_on_the_planes_that_cut_it() -> None:
    fig = Figure()
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    box = (np.array([1.5, 2.5, 3.5]), np.array([5.5, 8.5, 9.5]))
    rect = draw_box(ax, box, plane_axis=2, index=4, spacing=np.array([2.0, 1.0, 3.0]))
    assert rect.get_xy() == pytest.approx((4.0, 3.0)) and rect.get_width() == 8.0 and rect.get_height() == 6.0
    assert rect.get_linestyle() == "-"
    assert draw_box(ax, box, plane_axis=0, index=0, spacing=np.ones(3)).get_linestyle() == "--"


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Chromium is not installed")
def test_page_renders_in_headless_chromium(saliency_page: tuple[str, dict], tmp_path: Path) -> None:
    from PIL import Image

    _, pred = saliency_page
    shot = tmp_path / "shot.png"
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                        "--disable-background-networking", "--disable-component-update", "--disable-sync",
                        f"--user-data-dir={profile}", f"--screenshot={shot}", "--window-size=900,1400",
                        Path(pred["report_html"]).as_uri()], capture_output=True, timeout=60, check=False)
    assert shot.is_file(), "Chromium wrote no screenshot"
    img = Image.open(shot).convert("RGB")
    assert img.size == (900, 1400)
    pixels = np.asarray(img)
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50  # text, tables and images, not a blank page
