"""A self-contained HTML page for one prediction (``medmap predict ... --html``).

The page holds everything inline: the images are base64 PNG ``data:`` URIs, the style is one
``<style>`` block, there is no script and no link to anything outside the file, so it can be
mailed, archived or opened offline. It shows

* the predicted class and every class probability (sorted, the predicted one highlighted);
* which of the organ's sequences were given and which were missing;
* for every given sequence, the model's input (after preprocessing) in three planes through
  the Grad-CAM peak, with the saliency map overlaid and a colour bar (or without overlay when
  saliency was not computed), and the lesion box when one was given, drawn in that
  sequence's own input;
* the study id, run folder and checkpoint, and a note that this is a research tool.

Example:
    >>> pred = load_run("runs/brain").predict(paths, "s1", saliency_dir="out", keep_inputs=True)  # doctest: +SKIP
    >>> write_report(pred, predictor.organ, "out/s1_report.html", paths=paths, run_dir="runs/brain")  # doctest: +SKIP
"""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from medmap.config import OrganConfig
from medmap.data.lesion import patch_box, world_box
from medmap.data.studylist import LesionBox
from medmap.data.validate import check_volume_header
from medmap.utils import atomic_write_text

#: saliency below this fraction of the peak is not drawn (keeps the anatomy visible)
OVERLAY_THRESHOLD = 0.1
#: opacity of the saliency overlay at the peak (it fades with the saliency)
OVERLAY_ALPHA = 0.6
SALIENCY_CMAP = "jet"
DISCLAIMER = ("Research tool, not a diagnosis. This page shows the output of a machine-learning model "
              "trained for research; it has not been validated for clinical use and must not be used to "
              "make decisions about a patient's care.")

#: (plane name, normal axis, orientation labels: left, right, bottom, top) for RAS input grids
PLANES: tuple[tuple[str, int, tuple[str, str, str, str]], ...] = (
    ("axial", 2, ("L", "R", "P", "A")),
    ("coronal", 1, ("L", "R", "I", "S")),
    ("sagittal", 0, ("P", "A", "I", "S")),
)

Box = tuple[np.ndarray, np.ndarray]


# --------------------------------------------------------------------------- geometry
def input_affines(organ: OrganConfig, inputs: Mapping[str, Any], paths: Mapping[str, str | Path],
                  lesion_box: LesionBox | None) -> dict[str, np.ndarray]:
    """Voxel -> world (RAS mm) affine of every given sequence's model input.

    Full-volume configs share one input grid (``inputs["affine"]``); lesion-level configs cut
    each sequence around its own box, so each has its own patch grid (rebuilt here with the
    formula of :func:`medmap.data.lesion.cut_lesion_patch`).
    """
    shared = np.asarray(inputs["affine"], dtype=np.float64)
    mods = [m for m, ok in zip(organ.modalities, _as_numpy(inputs["present"])) if ok]
    if not organ.lesion_level:
        return {m: shared for m in mods}
    out: dict[str, np.ndarray] = {}
    roi = np.asarray(organ.roi_size, dtype=np.float64)
    margin = np.asarray(organ.margin_mm, dtype=np.float64)
    for m in mods:
        space, box = _box_of(organ, lesion_box, m, paths)
        lo, hi = world_box(box, space, _file_affine(paths[m]))
        r_lo = lo - margin
        step = (hi + margin - r_lo) / roi
        aff = np.diag([*step, 1.0])
        aff[:3, 3] = r_lo + step / 2
        out[m] = aff
    return out


def boxes_in_input(lesion_box: LesionBox | None, paths: Mapping[str, str | Path],
                   affines: Mapping[str, np.ndarray]) -> dict[str, Box]:
    """The lesion box of every given sequence in its input's voxel coordinates.

    Returns ``{modality: (lo, hi)}`` with ``lo``/``hi`` the box edges as continuous voxel
    indices of the input grid (voxel ``i`` spans ``i - 0.5 .. i + 0.5``); sequences without a
    box are left out.
    """
    if lesion_box is None:
        return {}
    out: dict[str, Box] = {}
    for m, aff in affines.items():
        box = lesion_box.for_modality(m)
        if box is None:
            continue
        lo, hi = world_box(box, lesion_box.space, _file_affine(paths[m]) if lesion_box.space == "voxel" else np.eye(4))
        out[m] = world_to_index_box(lo, hi, aff)
    return out


def world_to_index_box(lo: np.ndarray, hi: np.ndarray, affine: np.ndarray) -> Box:
    """An axis-aligned world box ``(lo, hi)`` as continuous voxel indices of a grid."""
    corners = np.array([[x, y, z, 1.0] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    idx = (np.linalg.inv(np.asarray(affine, np.float64)) @ corners.T).T[:, :3]
    return idx.min(axis=0), idx.max(axis=0)


def slice_position(saliency: np.ndarray | None, shape: Sequence[int], box: Box | None,
                   body: np.ndarray | None = None) -> tuple[tuple[int, int, int], str]:
    """Where to cut the planes, and how to say it.

    With a saliency map: its peak inside the lesion box when one is given (the region the
    prediction is about), else inside ``body`` (voxels with image data), else anywhere.
    Without one: the centre of the box, else of the input.
    """
    region = box_mask(box, shape) if box is not None else body
    if saliency is not None and float(saliency.max()) > 0:
        inside = region is not None and bool(region.any()) and float(saliency[region].max()) > 0
        masked = np.where(region, saliency, -1.0) if inside else saliency
        peak = np.unravel_index(int(np.argmax(masked)), saliency.shape)
        where = "the Grad-CAM peak" + ((" inside the lesion box" if box is not None else " inside the imaged region")
                                       if inside else "")
        return tuple(int(p) for p in peak), where  # type: ignore[return-value]
    if box is not None:
        centre = np.clip(np.round((box[0] + box[1]) / 2), 0, np.asarray(shape) - 1).astype(int)
        return tuple(int(c) for c in centre), "the centre of the lesion box"  # type: ignore[return-value]
    return tuple(int(s) // 2 for s in shape), "the centre of the input"  # type: ignore[return-value]


def box_mask(box: Box, shape: Sequence[int]) -> np.ndarray:
    """Boolean mask of the voxels whose centres lie inside ``box`` (continuous voxel indices)."""
    idx = np.indices(tuple(shape))
    lo, hi = box
    return np.all([(idx[k] >= lo[k]) & (idx[k] <= hi[k]) for k in range(3)], axis=0)


def peak_note(saliency: np.ndarray, position: Sequence[int]) -> str:
    """Where the map's overall peak is, when the planes do not pass through it."""
    peak = tuple(int(p) for p in np.unravel_index(int(np.argmax(saliency)), saliency.shape))
    if float(saliency[tuple(position)]) >= 0.995 * float(saliency.max()):
        return ""
    return (f" The map's overall peak is at voxel {peak}; at the shown position it is "
            f"{float(saliency[tuple(position)]):.0%} of that peak.")


def _box_of(organ: OrganConfig, lesion_box: LesionBox | None, modality: str,
            paths: Mapping[str, str | Path]) -> tuple[str, Sequence[float]]:
    box = lesion_box.for_modality(modality) if lesion_box is not None else None
    if box is not None:
        return lesion_box.space, box  # type: ignore[union-attr]
    _, shape, affine = check_volume_header(paths[modality])
    return "voxel", patch_box(shape, affine, organ.margin_mm)  # crop: patch without a box


def _file_affine(path: str | Path) -> np.ndarray:
    """Voxel -> world affine of a NIfTI file (header only) or a DICOM series folder, as preprocessing reads it."""
    return np.asarray(check_volume_header(path)[2], dtype=np.float64)


def _as_numpy(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


# --------------------------------------------------------------------------- figures
def figure_png(fig: Figure, dpi: int = 100) -> bytes:
    """A matplotlib figure as PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def grey_window(volume: np.ndarray) -> tuple[float, float]:
    """Display range of an input volume: 1st-99th percentile of its non-zero voxels."""
    values = volume[volume != 0]
    if values.size == 0:
        values = volume.ravel()
    lo, hi = (float(v) for v in np.percentile(values, [1, 99]))
    return (lo, hi) if hi > lo else (lo - 1.0, lo + 1.0)


def draw_box(ax: Any, box: Box, plane_axis: int, index: int, spacing: np.ndarray) -> Rectangle:
    """Draw a lesion box on one plane (solid where the plane cuts the box, dashed otherwise).

    ``box`` is in input voxel indices; the axes are in mm from the input's corner.
    """
    h_axis, v_axis = [a for a in range(3) if a != plane_axis]
    lo, hi = box
    inside = lo[plane_axis] <= index <= hi[plane_axis]
    x0, y0 = (lo[h_axis] + 0.5) * spacing[h_axis], (lo[v_axis] + 0.5) * spacing[v_axis]
    rect = Rectangle((x0, y0), (hi[h_axis] - lo[h_axis]) * spacing[h_axis], (hi[v_axis] - lo[v_axis]) * spacing[v_axis],
                     fill=False, edgecolor="#00e5ff", linewidth=1.6, linestyle="-" if inside else "--")
    ax.add_patch(rect)
    return rect


def sequence_figure(volume: np.ndarray, saliency: np.ndarray | None, position: Sequence[int], spacing: np.ndarray,
                    box: Box | None = None) -> bytes:
    """PNG of one sequence's input in axial, coronal and sagittal planes through ``position``:
    a row of the input alone (with the lesion box when given) and, when there is a saliency
    map, a row with the map overlaid and its colour bar, so the anatomy stays readable."""
    rows = 1 if saliency is None else 2
    fig = Figure(figsize=(10.5, 3.5 * rows))
    FigureCanvasAgg(fig)
    widths = [volume.shape[h] * spacing[h] for h, _ in (_plane_axes(p[1]) for p in PLANES)]
    grid = fig.add_gridspec(rows, 4, width_ratios=[*widths, 0.05 * max(widths)], left=0.05, right=0.92,
                            top=1 - 0.3 / (3.5 * rows), bottom=0.02, wspace=0.1, hspace=0.14)
    window = grey_window(volume)
    for row in range(rows):
        overlay = saliency if row == 1 else None
        for j, (name, axis, labels) in enumerate(PLANES):
            ax = fig.add_subplot(grid[row, j])
            _draw_plane(ax, volume, overlay, axis, int(position[axis]), spacing, window, box, labels)
            if row == 0:
                ax.set_title(f"{name} ({'xyz'[axis]} = {int(position[axis])})", fontsize=11)
            if j == 0:
                ax.set_ylabel("input" if row == 0 else "input + Grad-CAM", fontsize=11)
        cax = fig.add_subplot(grid[row, 3])
        if overlay is None:
            cax.axis("off")
            continue
        bar = fig.colorbar(ScalarMappable(Normalize(0, 1), colormaps[SALIENCY_CMAP]), cax=cax)
        bar.set_label("Grad-CAM (fraction of peak)", fontsize=9)
        bar.ax.tick_params(labelsize=8)
    return figure_png(fig)


def _draw_plane(ax: Any, volume: np.ndarray, saliency: np.ndarray | None, axis: int, index: int, spacing: np.ndarray,
                window: tuple[float, float], box: Box | None, labels: tuple[str, str, str, str]) -> None:
    """One plane: the input in grey (in mm, so the aspect is physical), the overlay, the box."""
    h, v = _plane_axes(axis)
    extent = (0.0, volume.shape[h] * spacing[h], 0.0, volume.shape[v] * spacing[v])
    grey = colormaps["gray"].with_extremes(bad="black")
    # voxels with no image data (outside the body or the file) are exactly 0: black
    ax.imshow(np.ma.masked_equal(np.take(volume, index, axis=axis).T, 0.0), cmap=grey, vmin=window[0],
              vmax=window[1], origin="lower", extent=extent, interpolation="nearest")
    if saliency is not None:
        s = np.clip(np.take(saliency, index, axis=axis).T, 0.0, 1.0)
        # opacity grows with the saliency, so that weak evidence leaves the anatomy visible
        ax.imshow(s, cmap=colormaps[SALIENCY_CMAP], vmin=0, vmax=1, origin="lower", extent=extent,
                  alpha=np.where(s >= OVERLAY_THRESHOLD, OVERLAY_ALPHA * s, 0.0), interpolation="nearest")
    if box is not None:
        draw_box(ax, box, axis, index, spacing)
    _orientation_labels(ax, labels)
    ax.set_xticks([])
    ax.set_yticks([])


def _plane_axes(normal: int) -> tuple[int, int]:
    h, v = [a for a in range(3) if a != normal]
    return h, v


def _orientation_labels(ax: Any, labels: tuple[str, str, str, str]) -> None:
    style = {"color": "yellow", "fontsize": 10, "fontweight": "bold", "transform": ax.transAxes}
    left, right, bottom, top = labels
    ax.text(0.02, 0.5, left, ha="left", va="center", **style)
    ax.text(0.98, 0.5, right, ha="right", va="center", **style)
    ax.text(0.5, 0.02, bottom, ha="center", va="bottom", **style)
    ax.text(0.5, 0.98, top, ha="center", va="top", **style)


# --------------------------------------------------------------------------- HTML pieces
def esc(value: Any) -> str:
    """HTML-escaped text (quotes too, so it is safe in attributes)."""
    return html.escape(str(value), quote=True)


def img_tag(png: bytes, alt: str) -> str:
    """An ``<img>`` holding ``png`` inline as a base64 ``data:`` URI."""
    data = base64.b64encode(png).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{esc(alt)}">'


def probability_table(probabilities: Mapping[str, float], predicted: str) -> str:
    """Class probabilities, highest first, as a table with inline bars; the predicted class highlighted."""
    rows = []
    for cls, p in sorted(probabilities.items(), key=lambda kv: -kv[1]):
        mark = ' class="predicted"' if cls == predicted else ""
        rows.append(
            f'<tr{mark} data-class="{esc(cls)}" data-p="{float(p)!r}"><td class="cls">{esc(cls)}'
            f'{" <span class=tag>predicted</span>" if cls == predicted else ""}</td>'
            f'<td class="num">{100 * float(p):.1f}%</td>'
            f'<td class="barcell"><div class="bar" style="width:{min(100.0, max(0.0, 100 * float(p))):.1f}%">'
            "</div></td></tr>"
        )
    return ('<table class="probs"><thead><tr><th>class</th><th>probability</th><th></th></tr></thead><tbody>'
            + "".join(rows) + "</tbody></table>")


def sequence_table(modalities: Sequence[str], used: Sequence[str], paths: Mapping[str, str | Path]) -> str:
    """The organ's sequences: given (with the file) or missing."""
    rows = []
    for m in modalities:
        if m in used:
            rows.append(f'<tr class="used" data-modality="{esc(m)}"><td>{esc(m)}</td><td class="ok">used</td>'
                        f'<td class="path">{esc(paths.get(m, ""))}</td></tr>')
        else:
            rows.append(f'<tr class="missing" data-modality="{esc(m)}"><td>{esc(m)}</td><td class="miss">missing</td>'
                        '<td class="path">not given; the model masks it out</td></tr>')
    return ('<table class="seqs"><thead><tr><th>sequence</th><th>status</th><th>file</th></tr></thead><tbody>'
            + "".join(rows) + "</tbody></table>")


def box_description(organ: OrganConfig, lesion_box: LesionBox | None) -> str:
    """One paragraph on the lesion box: as given, and whether the model's input is cut around it."""
    if lesion_box is None:
        if organ.crop == "patch":
            return ("<p>No lesion box given: each file is already a lesion patch "
                    "(organ config <code>crop: patch</code>).</p>")
        return ""
    given = lesion_box.to_json()
    boxes = {"all sequences": given["box"]} if "box" in given else given["boxes"]
    items = "".join(f"<li><b>{esc(m)}</b>: {esc(', '.join(f'{v:g}' for v in b))}</li>" for m, b in boxes.items())
    units = "voxel indices of each file" if lesion_box.space == "voxel" else "world RAS millimetres"
    use = ("the model's input is cut around it, so it is drawn in each sequence's own patch"
           if organ.lesion_level else
           f"this run's organ config (<code>crop: {esc(organ.crop)}</code>) does not use it; drawn for reference")
    return (f'<p>Lesion box (x0, y0, z0, x1, y1, z1 in {units}); {use}. Cyan: solid where the plane cuts the '
            f'box, dashed where it is the box\'s outline seen from outside.</p><ul class="boxes">{items}</ul>')


CSS = """
body{font-family:-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:0;background:#f4f5f7;color:#1d2430;
 font-size:15px;line-height:1.45}
main{max-width:1120px;margin:0 auto;padding:20px 28px 40px}
h1{font-size:24px;margin:6px 0 4px}
h2{font-size:18px;margin:26px 0 8px;border-bottom:1px solid #d5d9e0;padding-bottom:4px}
h3{font-size:16px;margin:18px 0 6px}
.disclaimer{background:#fff4d6;border:1px solid #e0b341;border-left:6px solid #d99a00;padding:10px 14px;margin:12px 0;
 border-radius:4px}
.result{background:#fff;border:1px solid #d5d9e0;border-radius:6px;padding:12px 16px;
 display:flex;gap:40px;flex-wrap:wrap}
.result .big{font-size:26px;font-weight:700;color:#0b5cad}
.result>div{flex:0 0 auto}.result>table{flex:1 1 0;min-width:0;background:none}
.meta td{padding:2px 14px 2px 0;vertical-align:top}.meta td:first-child{color:#5a6372;white-space:nowrap}
table{border-collapse:collapse;background:#fff}
.probs,.seqs{border:1px solid #d5d9e0;min-width:520px}
.probs th,.probs td,.seqs th,.seqs td{padding:5px 12px;border-bottom:1px solid #e6e9ee;text-align:left}
.probs td.num{text-align:right;font-variant-numeric:tabular-nums;width:80px}
.barcell{width:320px}.bar{height:14px;background:#9aa7b8;border-radius:2px;min-width:1px}
tr.predicted{background:#e6f0fb;font-weight:700}tr.predicted .bar{background:#0b5cad}
.tag{font-size:11px;background:#0b5cad;color:#fff;border-radius:3px;padding:1px 5px;margin-left:6px;font-weight:600}
.ok{color:#1a7f37;font-weight:600}.miss{color:#b42318;font-weight:600}
.path{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px;color:#3d4450;word-break:break-all}
code,.mono{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:13px;word-break:break-all}
figure{margin:8px 0 18px;background:#fff;border:1px solid #d5d9e0;border-radius:6px;padding:8px}
figure img{display:block;width:100%;height:auto}
figcaption{font-size:13px;color:#5a6372;margin-top:4px}
.note{color:#5a6372;font-size:13px}
"""


@dataclass
class ReportContext:
    """What the page says about where the prediction came from."""

    run_dir: str = ""
    checkpoint: str = ""
    created: str = ""


def header_html(pred: Any, ctx: ReportContext) -> str:
    p = pred.probabilities.get(pred.predicted_class, 0.0)
    return (
        f"<h1>MedMAP prediction: study {esc(pred.study_id)}</h1>"
        f'<div class="disclaimer"><b>{esc(DISCLAIMER.split(". ")[0])}.</b> {esc(DISCLAIMER.split(". ", 1)[1])}</div>'
        f'<div class="result"><div>predicted class<div class="big">{esc(pred.predicted_class)}</div>'
        f"probability {100 * p:.1f}%</div>"
        '<table class="meta">'
        f"<tr><td>study id</td><td class=mono>{esc(pred.study_id)}</td></tr>"
        f"<tr><td>organ</td><td>{esc(pred.organ)}</td></tr>"
        f"<tr><td>run folder</td><td class=mono>{esc(ctx.run_dir)}</td></tr>"
        f"<tr><td>checkpoint</td><td class=mono>{esc(ctx.checkpoint)}</td></tr>"
        f"<tr><td>created</td><td>{esc(ctx.created)}</td></tr></table></div>"
    )


def images_html(pred: Any, organ: OrganConfig, paths: Mapping[str, str | Path], lesion_box: LesionBox | None) -> str:
    """The per-sequence figures (or a note when the prediction kept no input)."""
    if pred.inputs is None:
        return '<p class="note">The model input was not kept (predict with keep_inputs=True to draw it).</p>'
    images = _as_numpy(pred.inputs["images"]).astype(np.float32)
    saliency = None if pred.saliency is None else _as_numpy(pred.saliency).astype(np.float32)
    affines = input_affines(organ, pred.inputs, paths, lesion_box)
    boxes = boxes_in_input(lesion_box, paths, affines)
    first_box = next(iter(boxes.values()), None)
    body = np.any(images[[i for i, m in enumerate(organ.modalities) if m in affines]] != 0, axis=0)
    position, where = slice_position(saliency, images.shape[1:], first_box, body)
    if saliency is not None:
        intro = (f"Grad-CAM saliency for the predicted class <b>{esc(pred.predicted_class)}</b>, overlaid on the "
                 "model's input (after preprocessing, lower row; the input alone above); the planes pass through "
                 f"{where}, "
                 f"voxel {position}. "
                 "Colours show where the model's evidence for that class is strongest, relative to the peak; the "
                 f"overlay fades with the value and is not drawn below {OVERLAY_THRESHOLD:.0%} of the peak. "
                 "A saliency map is not a segmentation." + peak_note(saliency, position))
    else:
        intro = (f"<b>Saliency was not computed</b> (<code>--no-saliency</code>): the model's input is shown without "
                 f"overlay; the planes pass through {where}, voxel {position}.")
    intro += (" Orientation letters: L/R left/right, A/P anterior/posterior, S/I superior/inferior of the patient "
              "(the patient's left is on the image's left).")
    parts = [f"<p>{intro}</p>", box_description(organ, lesion_box)]
    for i, m in enumerate(organ.modalities):
        if m not in affines:
            continue
        spacing = np.linalg.norm(affines[m][:3, :3], axis=0)
        png = sequence_figure(images[i], saliency, position, spacing, boxes.get(m))
        parts.append(f'<figure data-modality="{esc(m)}"><h3>{esc(m)}</h3>{img_tag(png, f"{m}: input slices")}'
                     f"<figcaption>{esc(m)}: input grid {'x'.join(str(s) for s in images.shape[1:])} voxels of "
                     f"{' x '.join(f'{s:.2g}' for s in spacing)} mm</figcaption></figure>")
    return "".join(parts)


def render_report(pred: Any, organ: OrganConfig, paths: Mapping[str, str | Path] | None = None,
                  lesion_box: LesionBox | None = None, run_dir: str | Path = "", checkpoint: str = "") -> str:
    """The report page of one :class:`~medmap.inference.Prediction` as an HTML string.

    Args:
        pred: a prediction made with ``keep_inputs=True`` (else the images are left out).
        organ: the run's organ config (sequence list, crop, margin).
        paths: modality -> the file given for it.
        lesion_box: the box given with the study, if any.
        run_dir, checkpoint: shown in the header.
    """
    paths = dict(paths or {})
    ctx = ReportContext(str(run_dir), checkpoint, datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
    missing = [m for m in organ.modalities if m not in pred.modalities_used]
    seq_note = (f"<p>{len(pred.modalities_used)} of {len(organ.modalities)} sequences given"
                + (f"; missing: {esc(', '.join(missing))}" if missing else "") + ".</p>")
    body = (
        header_html(pred, ctx)
        + "<h2>Class probabilities</h2>" + probability_table(pred.probabilities, pred.predicted_class)
        + "<h2>Sequences</h2>" + seq_note + sequence_table(organ.modalities, pred.modalities_used, paths)
        + "<h2>Where the model looked</h2>" + images_html(pred, organ, paths, lesion_box)
        + f'<p class="note">{esc(DISCLAIMER)}</p>'
    )
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>MedMAP prediction: {esc(pred.study_id)}</title><style>{CSS}</style></head>"
            f"<body><main>{body}</main></body></html>\n")


def write_report(pred: Any, organ: OrganConfig, path: str | Path, **kwargs: Any) -> Path:
    """Write :func:`render_report`'s page to ``path`` (atomically); returns the path."""
    return atomic_write_text(path, render_report(pred, organ, **kwargs))


__all__ = ["boxes_in_input", "draw_box", "input_affines", "probability_table", "render_report", "sequence_figure",
           "write_report"]
