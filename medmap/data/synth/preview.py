"""PNG montages of a MedMoM-Synth benchmark: one row per class (brain: per subtype), one
column per sequence, axial slice through the lesion centre.

Example:
    >>> from medmap.data.synth.preview import write_previews
    >>> write_previews("data/synth")  # doctest: +SKIP
    [PosixPath('data/synth/preview/liver.png'), PosixPath('data/synth/preview/brain.png')]
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from medmap.data.studylist import Study, read_study_list


def _row_key(s: Study) -> str:
    sub = s.meta.get("subtype")
    return f"{s.label} ({sub})" if sub else str(s.label)


def _pick_examples(studies: list[Study]) -> dict[str, Study]:
    """One study per row: the one with lesion size closest to 30 mm (typical size)."""
    rows: dict[str, Study] = {}
    for s in sorted(studies, key=lambda s: s.study_id):
        key = _row_key(s)
        size = float(s.meta.get("size_mm") or 0.0)
        best = rows.get(key)
        if best is None or abs(size - 30) < abs(float(best.meta.get("size_mm") or 0.0) - 30):
            rows[key] = s
    return dict(sorted(rows.items()))


def write_previews(folder: str | Path, out: str | Path | None = None) -> list[Path]:
    """Write ``<organ>.png`` montages for every organ found in ``folder/studies.jsonl``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    out = Path(out) if out is not None else folder / "preview"
    out.mkdir(parents=True, exist_ok=True)
    studies = read_study_list(folder / "studies.jsonl")
    written = []
    for organ in sorted({s.organ for s in studies}):
        rows = _pick_examples([s for s in studies if s.organ == organ])
        mods = list(next(iter(rows.values())).modalities)
        fig, axes = plt.subplots(len(rows), len(mods) + 1, figsize=(1.9 * (len(mods) + 1), 1.9 * len(rows)), squeeze=False)
        for r, (key, s) in enumerate(rows.items()):
            centre = s.meta.get("centre_vox")
            lesion = None
            lm = s.meta.get("lesion_mask")
            if lm:
                lesion = np.asarray(nib.load(folder / lm).dataobj)
            for c, mod in enumerate(mods + ["lesion"]):
                ax = axes[r, c]
                ax.axis("off")
                if mod == "lesion":
                    vol = lesion if lesion is not None else None
                else:
                    vol = np.asarray(nib.load(s.modalities[mod]).get_fdata(dtype=np.float32))
                if vol is None:
                    continue
                z = int(centre[2]) if centre else vol.shape[2] // 2
                sl = np.rot90(vol[:, :, z])  # RAS: x right, y anterior up after rotation
                if mod == "lesion":
                    ax.imshow(sl, cmap="gray", vmin=0, vmax=1)
                else:
                    lo, hi = np.percentile(vol[vol > 0], [0.5, 99.5]) if (vol > 0).any() else (0, 1)
                    ax.imshow(sl, cmap="gray", vmin=lo, vmax=hi)
                if r == 0:
                    ax.set_title(mod, fontsize=8)
                if c == 0:
                    ax.text(-0.05, 0.5, f"{key}\n{float(s.meta.get('size_mm') or 0):.0f} mm", transform=ax.transAxes,
                            fontsize=7, ha="right", va="center")
        fig.subplots_adjust(left=0.12, right=0.99, top=0.95, bottom=0.01, wspace=0.03, hspace=0.05)
        path = out / f"{organ}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written
