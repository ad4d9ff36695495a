"""Load a fine-tuned MedMAP run and predict new studies (no training code is imported).

A fine-tuning run folder holds everything prediction needs: the resolved config, the organ
config, the frozen text bank's embeddings (so the text encoder is not needed to predict)
and the selected weights. Preprocessing is the same function that training used
(:func:`medmap.data.preprocess.preprocess_volumes`).

Example:
    >>> from medmap.inference import load_run
    >>> predictor = load_run("runs/demo/finetune_liver")                    # doctest: +SKIP
    >>> pred = predictor.predict({"t2wi": "t2.nii.gz", "arterial": "art.nii.gz"})  # doctest: +SKIP
    >>> pred.predicted_class, pred.probabilities["hcc"]                     # doctest: +SKIP
    ('hcc', 0.81)
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, load_model, save_file
from torch import Tensor

from medmap.config import OrganConfig, load_yaml
from medmap.data.cache import PreprocessCache
from medmap.data.preprocess import preprocess_volumes
from medmap.data.studylist import LesionBox, Study
from medmap.errors import CheckpointError, StudyListError, VolumeError
from medmap.models.medmap import MedMAPClassifier, build_medmap_classifier
from medmap.precision import autocast_context
from medmap.run_config import finetune_config
from medmap.utils import atomic_write_bytes, atomic_write_json, pick_device

TEXT_BANK_FILE = "text_bank.safetensors"
ORGAN_FILE = "organ.yaml"
CONFIG_FILE = "config.yaml"
RUN_INFO_FILE = "run_info.json"


# --------------------------------------------------------------------------- text bank on disk
@dataclass
class StoredTextBank:
    """The frozen text embeddings a fine-tuned model was trained with.

    Same fields the model reads from :class:`medmap.text.prompts.TextBank`; stored in the
    run folder so that prediction never needs the text encoder.
    """

    classes: list[str]
    modalities: list[str]
    class_emb: Tensor
    class_mask: Tensor
    modality_emb: Tensor
    text_model: str = ""
    descriptor_emb: Tensor | None = None
    descriptor_mask: Tensor | None = None
    negative_emb: Tensor | None = None
    negative_mask: Tensor | None = None

    def to(self, device: torch.device) -> "StoredTextBank":
        moved = {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in vars(self).items()}
        return StoredTextBank(**moved)


#: Text-bank tensors that only a prompt set gives (medmap.text.descriptors).
OPTIONAL_BANK_TENSORS = ("descriptor_emb", "descriptor_mask", "negative_emb", "negative_mask")


def save_text_bank(bank: Any, run_dir: str | Path, text_model: str = "") -> Path:
    """Write a text bank's embeddings (and its class / modality order) into a run folder."""
    path = Path(run_dir) / TEXT_BANK_FILE
    tensors = {
        "class_emb": bank.class_emb.detach().float().contiguous().cpu(),
        "class_mask": bank.class_mask.detach().to(torch.uint8).contiguous().cpu(),
        "modality_emb": bank.modality_emb.detach().float().contiguous().cpu(),
    }
    for name in OPTIONAL_BANK_TENSORS:  # a prompt set's descriptors and negated prompts
        x = getattr(bank, name, None)
        if x is not None:
            tensors[name] = (x.detach().to(torch.uint8) if x.dtype == torch.bool else x.detach().float()).contiguous().cpu()
    meta = {"classes": json.dumps(list(bank.classes)), "modalities": json.dumps(list(bank.modalities)),
            "text_model": text_model}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata=meta)
    atomic_write_bytes(path, tmp.read_bytes())
    tmp.unlink(missing_ok=True)
    return path


def load_text_bank(run_dir: str | Path) -> StoredTextBank:
    path = Path(run_dir) / TEXT_BANK_FILE
    if not path.is_file():
        raise CheckpointError(f"{run_dir} has no {TEXT_BANK_FILE}; is it a fine-tuning run folder?")
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        t = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: truncated or corrupt text bank ({str(e).splitlines()[0][:120]}); "
                              "re-run the fine-tuning or copy the run folder again") from e
    optional = {k: (t[k].bool() if k.endswith("_mask") else t[k]) for k in OPTIONAL_BANK_TENSORS if k in t}
    return StoredTextBank(
        classes=json.loads(meta.get("classes", "[]")),
        modalities=json.loads(meta.get("modalities", "[]")),
        class_emb=t["class_emb"],
        class_mask=t["class_mask"].bool(),
        modality_emb=t["modality_emb"],
        text_model=meta.get("text_model", ""),
        **optional,
    )


# --------------------------------------------------------------------------- batched inference
@torch.no_grad()
def predict_probabilities(
    model: MedMAPClassifier,
    batches: Iterable[Mapping[str, Any]],
    text_bank: Any,
    device: torch.device,
    precision: str = "auto",
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Run ``model`` over collated batches; returns ``(labels [N], probs [N, C], study_ids)``.

    Shared by the fine-tuning engine (validation) and :func:`medmap.engines.evaluate.evaluate_run`.
    """
    model.eval()
    labels: list[np.ndarray] = []
    probs: list[np.ndarray] = []
    ids: list[str] = []
    for batch in batches:
        with autocast_context(precision, device):
            out = model(batch["images"].to(device), batch["present"].to(device), text_bank)
        probs.append(out["probs"].float().cpu().numpy())
        labels.append(batch["label"].cpu().numpy())
        ids.extend(batch["study_id"])
    if not probs:
        return np.zeros(0, dtype=np.int64), np.zeros((0, model.num_classes), dtype=np.float32), []
    return np.concatenate(labels), np.concatenate(probs), ids


# --------------------------------------------------------------------------- saliency
def grad_cam(model: MedMAPClassifier, images: Tensor, present: Tensor, text_bank: Any,
             target: int | None = None) -> tuple[Tensor, dict[str, Tensor], Tensor]:
    """Grad-CAM on the encoder token grids of one study.

    For every present modality ``m`` the map is ``ReLU(sum_d w_d Z_m[:, d])`` with ``w_d`` the
    mean over tokens of ``d score / d Z_m`` (``score`` = log-probability of ``target``, the
    predicted class by default), upsampled trilinearly from the token grid to the input ROI.
    The combined map is the sum over modalities, scaled to ``[0, 1]``.

    Args:
        model: a stage-2 model (in eval mode).
        images: ``[1, M, X, Y, Z]``; present: ``[1, M]``.
        text_bank: the model's text bank (ignored by pure-vision models).
        target: class index to explain.

    Returns:
        ``(combined [X, Y, Z], per_modality {name: [X, Y, Z]}, probs [C])``.
    """
    model.eval()
    with torch.enable_grad():
        out = model(images, present, text_bank)
        probs = out["probs"][0]
        cls = int(probs.argmax()) if target is None else int(target)
        score = torch.log(probs[cls].clamp_min(1e-12))
        names = list(out["tokens"])
        grads = torch.autograd.grad(score, [out["tokens"][n] for n in names], allow_unused=True)
    roi = images.shape[2:]
    per_mod: dict[str, Tensor] = {}
    for name, g in zip(names, grads):
        z = out["tokens"][name].detach()[0]  # [N, d]
        if g is None:
            cam = torch.zeros(out["token_grids"][name])
        else:
            w = g[0].mean(dim=0)  # [d]
            cam = F.relu((z * w).sum(dim=-1)).reshape(out["token_grids"][name])
        per_mod[name] = F.interpolate(cam[None, None].float(), size=tuple(roi), mode="trilinear", align_corners=False)[0, 0]
    combined = torch.stack(list(per_mod.values())).sum(0) if per_mod else torch.zeros(tuple(roi))
    if combined.max() > 0:
        combined = combined / combined.max()
    return combined.cpu(), {k: v.cpu() for k, v in per_mod.items()}, probs.detach().float().cpu()


def save_saliency(combined: Tensor, images: Tensor, present: Tensor, affine: Tensor | np.ndarray,
                  modalities: Sequence[str], out_dir: str | Path, stem: str) -> tuple[Path, Path]:
    """Write the saliency map as NIfTI (preprocessed grid, RAS affine) and a PNG overlay.

    The PNG shows, for every present modality, the axial, coronal and sagittal slices through
    the saliency peak with the map overlaid.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import nibabel as nib

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    aff = np.asarray(affine, dtype=np.float64)
    nii_path = out_dir / f"{stem}_saliency.nii.gz"
    nib.save(nib.Nifti1Image(combined.numpy().astype(np.float32), aff), str(nii_path))
    peak = np.unravel_index(int(combined.argmax()), tuple(combined.shape))
    mods = [m for i, m in enumerate(modalities) if bool(present[i])]
    fig, axes = plt.subplots(3, len(mods), figsize=(2.4 * len(mods), 7.2), squeeze=False)
    sal = combined.numpy()
    for j, m in enumerate(mods):
        vol = images[modalities.index(m)].numpy()
        views = [
            (vol[:, :, peak[2]], sal[:, :, peak[2]], f"{m} axial z={peak[2]}"),
            (vol[:, peak[1], :], sal[:, peak[1], :], f"coronal y={peak[1]}"),
            (vol[peak[0], :, :], sal[peak[0], :, :], f"sagittal x={peak[0]}"),
        ]
        for i, (img, s, title) in enumerate(views):
            ax = axes[i, j]
            ax.imshow(np.rot90(img), cmap="gray")
            ax.imshow(np.rot90(s), cmap="jet", alpha=0.35 * (np.rot90(s) > 0.05), vmin=0, vmax=1)
            ax.set_title(title, fontsize=8)
            ax.axis("off")
    fig.suptitle(f"{stem}: Grad-CAM saliency (peak at voxel {tuple(int(p) for p in peak)})", fontsize=9)
    fig.tight_layout()
    png_path = out_dir / f"{stem}_saliency.png"
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return nii_path, png_path


# --------------------------------------------------------------------------- predictor
@dataclass
class Prediction:
    """The result of predicting one study."""

    study_id: str
    organ: str
    probabilities: dict[str, float]
    predicted_class: str
    modalities_used: list[str]
    modalities_missing: list[str]
    preprocess_seconds: float = 0.0
    model_seconds: float = 0.0
    saliency_nifti: str | None = None
    saliency_png: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    #: with ``predict(..., keep_inputs=True)``: the model input (``images [M, X, Y, Z]``,
    #: ``present [M]``, ``affine``) and the Grad-CAM map ``[X, Y, Z]`` (``None`` without saliency);
    #: used by the HTML report, never written to the JSON
    inputs: dict[str, Tensor] | None = field(default=None, repr=False, compare=False)
    saliency: Tensor | None = field(default=None, repr=False, compare=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "study_id": self.study_id,
            "organ": self.organ,
            "predicted_class": self.predicted_class,
            "probabilities": self.probabilities,
            "modalities_used": self.modalities_used,
            "modalities_missing": self.modalities_missing,
            "preprocess_seconds": round(self.preprocess_seconds, 4),
            "model_seconds": round(self.model_seconds, 4),
            "saliency_nifti": self.saliency_nifti,
            "saliency_png": self.saliency_png,
            **self.extra,
        }


class MedMAPPredictor:
    """A fine-tuned model ready to predict studies of its organ.

    Build it with :func:`load_run`. Thread settings and device follow PyTorch defaults.
    """

    def __init__(self, model: MedMAPClassifier, organ: OrganConfig, text_bank: StoredTextBank | None,
                 device: torch.device, precision: str = "auto", run_dir: Path | None = None,
                 cache: PreprocessCache | None = None) -> None:
        self.model = model.to(device).eval()
        self.organ = organ
        self.text_bank = text_bank.to(device) if text_bank is not None else None
        self.device = device
        self.precision = precision
        self.run_dir = run_dir
        self.cache = cache

    @property
    def classes(self) -> list[str]:
        return list(self.organ.classes)

    def preprocess(self, paths: Mapping[str, str | Path], roi_mask: str | Path | None = None,
                   lesion_box: LesionBox | Mapping[str, Any] | None = None) -> dict[str, Tensor]:
        """The shared preprocessing function (with this predictor's cache, if any)."""
        return preprocess_volumes(paths, self.organ, cache=self.cache, roi_mask=roi_mask,
                                  lesion_box=as_lesion_box(lesion_box))

    def predict(self, paths: Mapping[str, str | Path], study_id: str = "study", saliency_dir: str | Path | None = None,
                roi_mask: str | Path | None = None, lesion_box: LesionBox | Mapping[str, Any] | None = None,
                keep_inputs: bool = False) -> Prediction:
        """Predict one study given as modality -> NIfTI path (or DICOM series folder).

        Args:
            paths: any non-empty subset of the organ's modalities.
            study_id: used in the output and the saliency file names.
            saliency_dir: when given, write a Grad-CAM NIfTI and PNG overlay there.
            roi_mask: the study's organ mask, for a run whose organ config crops to one
                (``crop: roi_mask``); ignored otherwise.
            lesion_box: the lesion's box, for a lesion-level run (``crop: lesion_box``): a
                :class:`~medmap.data.studylist.LesionBox` or its study-list form, e.g.
                ``{"space": "world", "box": [x0, y0, z0, x1, y1, z1]}`` or
                ``{"space": "voxel", "boxes": {"t2wi": [...], "arterial": [...]}}``.
            keep_inputs: keep the preprocessed input and the saliency map in the returned
                :class:`Prediction` (``inputs``, ``saliency``), e.g. to draw a report.

        Raises:
            VolumeError: a missing or unreadable file, an unknown modality, a bad volume or box.
        """
        for m, p in paths.items():
            if not Path(p).exists():  # a file, or a DICOM series folder (checked when read)
                raise VolumeError(f"{m}: file not found: {p}")
        t0 = time.perf_counter()
        sample = self.preprocess(paths, roi_mask=roi_mask, lesion_box=lesion_box)
        t1 = time.perf_counter()
        images = sample["images"][None].to(self.device)
        present = sample["present"][None].to(self.device)
        sal_nii = sal_png = combined = None
        # the probabilities come from one code path, with or without a saliency map, so that every
        # route (command line, API, evaluation) gives the same answer on the same machine
        with torch.no_grad(), autocast_context(self.precision, self.device):
            probs = self.model(images, present, self.text_bank)["probs"][0].float().cpu()
        t2 = time.perf_counter()
        if saliency_dir is not None:
            combined, _, _ = grad_cam(self.model, images, present, self.text_bank, target=int(probs.argmax()))
            nii, png = save_saliency(combined, sample["images"], sample["present"], sample["affine"],
                                     self.organ.modalities, saliency_dir, study_id)
            sal_nii, sal_png = str(nii), str(png)
        present_list = sample["present"].tolist()
        p = probs.tolist()
        return Prediction(
            study_id=study_id,
            organ=self.organ.name,
            probabilities={c: float(v) for c, v in zip(self.organ.classes, p)},
            predicted_class=self.organ.classes[int(np.argmax(p))],
            modalities_used=[m for m, ok in zip(self.organ.modalities, present_list) if ok],
            modalities_missing=[m for m, ok in zip(self.organ.modalities, present_list) if not ok],
            preprocess_seconds=t1 - t0,
            model_seconds=t2 - t1,
            saliency_nifti=sal_nii,
            saliency_png=sal_png,
            inputs=sample if keep_inputs else None,
            saliency=combined if keep_inputs else None,
        )

    def predict_study(self, study: Study, saliency_dir: str | Path | None = None) -> Prediction:
        """Predict a :class:`~medmap.data.studylist.Study` (its organ must match)."""
        if study.organ != self.organ.name:
            raise VolumeError(f"study '{study.study_id}' is a {study.organ} study; this model is for {self.organ.name}")
        return self.predict(study.modalities, study.study_id, saliency_dir, roi_mask=study.roi_mask,
                            lesion_box=study.lesion_box)


def as_lesion_box(box: LesionBox | Mapping[str, Any] | None) -> LesionBox | None:
    """A :class:`LesionBox` from itself or its study-list form (``{"space": ..., "box"|"boxes": ...}``)."""
    if box is None or isinstance(box, LesionBox):
        return box
    try:
        return LesionBox.from_json(dict(box), "lesion_box")
    except StudyListError as e:
        raise VolumeError(str(e)) from e


def _checkpoint_dir(run_dir: Path, which: str) -> Path:
    for name in ([which] if which != "auto" else ["best", "last"]):
        d = run_dir / "checkpoints" / name
        if (d / "model.safetensors").is_file():
            return d
    raise CheckpointError(f"{run_dir} has no complete '{which}' checkpoint (checkpoints/{which}/model.safetensors)")


def load_run(run_dir: str | Path, which: str = "best", device: str = "auto", precision: str | None = None,
             cache_dir: str | Path | None = None) -> MedMAPPredictor:
    """Load a fine-tuning run folder for prediction.

    Args:
        run_dir: folder written by ``medmap finetune``, or by ``medmap export`` (:mod:`medmap.export`).
        which: ``best`` (selected on the validation split), ``last`` or ``auto``; an exported
            folder holds one set of weights and ignores it.
        device: ``auto``, ``cpu``, ``cuda``, ...
        precision: ``auto|fp32|bf16``; default: the run's training precision.
        cache_dir: optional preprocessing cache for repeated predictions.

    Raises:
        CheckpointError: the folder is not a complete fine-tuning run, or an exported folder
            fails its manifest check (newer format, SHA-256 mismatch).
    """
    from medmap.export import is_export, verify_export

    run_dir = Path(run_dir)
    exported = is_export(run_dir)
    if exported:
        verify_export(run_dir)  # format version, SHA-256 of the files; another medmap/torch version warns
    if not (run_dir / CONFIG_FILE).is_file() or not (run_dir / ORGAN_FILE).is_file():
        raise CheckpointError(f"{run_dir} is not a fine-tuning run folder (needs {CONFIG_FILE} and {ORGAN_FILE})")
    cfg = finetune_config(load_yaml(run_dir / CONFIG_FILE))
    organ = OrganConfig.from_dict(load_yaml(run_dir / ORGAN_FILE))
    bank = load_text_bank(run_dir) if cfg.ablation.text else None
    model = build_medmap_classifier(organ, cfg, int(bank.modality_emb.shape[1]) if bank is not None else None)
    ckpt = run_dir if exported else _checkpoint_dir(run_dir, which)
    try:
        load_model(model, str(ckpt / "model.safetensors"), strict=True, device="cpu")
    except Exception as e:
        raise CheckpointError(f"weights in {ckpt} do not fit the model described by {run_dir / CONFIG_FILE}: {e}") from e
    dev = pick_device(device)
    prec = precision or cfg.training.precision
    cache = PreprocessCache(cache_dir) if cache_dir is not None else None
    return MedMAPPredictor(model, organ, bank, dev, prec, run_dir, cache)


def write_prediction(pred: Prediction, path: str | Path) -> Path:
    """Write a prediction as JSON, atomically."""
    return atomic_write_json(path, pred.to_json())


__all__ = [
    "MedMAPPredictor",
    "Prediction",
    "StoredTextBank",
    "grad_cam",
    "load_run",
    "load_text_bank",
    "predict_probabilities",
    "save_saliency",
    "save_text_bank",
    "write_prediction",
]
