"""Tiny labelled 'brain' studies on disk for the engine tests (training runs in seconds)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import yaml

from medmap.data.studylist import Study, write_study_list

MODS = ["t1", "t1ce", "t2", "flair"]
SIDES = ["left frontal", "right frontal", "left occipital", "right occipital"]
REPO = Path(__file__).parents[2]


def make_tiny_brain_data(root: Path, n: int = 10, n_val: int = 3, n_test: int = 0, roi: int = 16) -> Path:
    """Write ``n`` studies (a bright sphere; tumour studies carry a bright blob) and a study list.

    Every third study lacks FLAIR. The last ``n_test`` studies are ``test``, the ``n_val``
    before them ``val``, the rest ``train``. A tiny brain organ config (``roi``^3 voxels at
    2.5 mm) is written next to the list as ``brain_tiny.yaml``.
    """
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    zz = np.stack(np.meshgrid(*[np.arange(20)] * 3, indexing="ij"))
    head = (((zz - 9.5) ** 2).sum(0) < 81).astype(np.float32)
    studies = []
    for i in range(n):
        where = i % 4
        tumour = i % 2 == 1
        centre = np.array([6 if where % 2 == 0 else 13, 12 if where < 2 else 7, 10])
        blob = (((zz - centre[:, None, None, None]) ** 2).sum(0) < 6).astype(np.float32)
        paths, findings = {}, {}
        mods = MODS if i % 3 else MODS[:3]
        for j, m in enumerate(mods):
            vol = head * (100 + 10 * j) + blob * (120 if tumour else 0) + rng.normal(0, 3, head.shape) * head
            p = root / f"s{i}" / f"{m}.nii.gz"
            p.parent.mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(vol.astype(np.float32), affine), p)
            paths[m] = p
            findings[m] = f"{m} signal abnormality in the {SIDES[where]} lobe" if tumour else "no abnormality seen"
        split = "test" if i >= n - n_test else ("val" if i >= n - n_test - n_val else "train")
        impression = f"intracranial tumour in the {SIDES[where]} lobe" if tumour else "no intracranial tumour"
        studies.append(Study(f"s{i}", f"p{i}", "brain", paths, findings, impression, "tumour" if tumour else "normal",
                             split))
    organ = yaml.safe_load((REPO / "medmap/configs/organs/brain.yaml").read_text())
    organ["roi_size"] = [roi, roi, roi]
    organ["spacing"] = [2.5, 2.5, 2.5]
    (root / "brain_tiny.yaml").write_text(yaml.safe_dump(organ))
    return write_study_list(studies, root / "studies.jsonl")


def tiny_finetune_config(data: Path, *overrides: str) -> dict:
    """The tiny fine-tuning config on ``make_tiny_brain_data``'s organ file, on the CPU, quiet."""
    from medmap.config import load_config

    items = [f"organ={data.parent / 'brain_tiny.yaml'}", "run.progress=false", "run.device=cpu", *overrides]
    return load_config("tiny", "finetune", items)


def tiny_finetune_run(data: Path, out: Path, epochs: int = 1) -> Path:
    """A tiny fine-tuned brain run (random encoders) in ``out``: for tests of what reads a run."""
    from medmap.engines.finetune import run_finetuning

    run_finetuning(tiny_finetune_config(data, f"training.epochs={epochs}"), data, out)
    return out
