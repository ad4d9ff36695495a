"""Baselines of the experiment grid, each evaluated with the same metrics as MedMAP.

* **Intensity statistics** (:func:`run_intensity_baseline`): per modality, the raw volume is
  z-scored inside the organ mask and summarised by percentiles, skewness, kurtosis, tail
  fractions and the mask mean/SD relative to the foreground; logistic regression on all
  modalities (C by cross-validation on the train split). MedMoM-Synth only: it needs the
  generator's ``meta["organ_mask"]``. ``benchmarks/synth_baseline.py`` uses the same
  functions.
* **Supervised 3D CNN** (:func:`run_cnn_baseline`): a MONAI network
  (``monai.networks.nets.<name>``, e.g. ``DenseNet`` or ``ResNet``) on the stacked
  modalities of the shared preprocessing, with ``2 M`` input channels: the ``M`` volumes
  (a missing modality is zeros) followed by ``M`` constant presence channels (1 present,
  0 missing), so "missing" and "average intensity" (0 after z-scoring) differ. Same data
  pipeline, augmentation, class-balanced loss, optimiser, schedule and model selection on
  the validation split as stage 2.
* **CLIP-style linear probe** (:func:`run_linear_probe`): the frozen encoder(s) of a
  stage-1 run (by default the shared-encoder one), pooled features of every present
  modality concatenated in the organ's modality order (zeros for a missing one) together
  with the presence vector, or averaged over present modalities (``pool: mean``); a
  standardised scikit-learn ``LogisticRegression`` whose ``C`` is chosen on the
  validation split.

Each writes ``RUN_DIR/metrics/test/metrics.json`` (plus report and plots) through
:func:`medmap.evaluation.report.evaluate_and_report`; the test split is only predicted,
never used for a choice.
"""

from __future__ import annotations

import inspect
import math
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from medmap.config import OrganConfig, load_organ_config
from medmap.data.studylist import Study
from medmap.errors import ConfigError, StudyListError
from medmap.models.norms import instance_norms_as_group_norms
from medmap.run_config import CNNBaselineConfig, eval_batch_size, parse_run_config

PERCENTILES = (1, 5, 10, 25, 50, 75, 90, 95, 99, 99.9)


# --------------------------------------------------------------------------- shared helpers
def labelled_splits(study_list: str | Path, organ: OrganConfig, seed: int,
                    labels_per_class: int | None = None) -> dict[str, list[Study]]:
    """The organ's labelled studies by split (missing splits assigned by patient, as the engines do);
    ``labels_per_class`` keeps that many training studies per class, the same ones stage 2 draws
    with this seed (label-efficiency runs)."""
    from medmap.data.split import patient_splits
    from medmap.data.studylist import read_study_list

    studies = [s for s in read_study_list(study_list, organ=organ.name) if s.label is not None]
    if not studies:
        raise StudyListError(f"{study_list}: no labelled {organ.name} studies")
    studies = patient_splits(studies)
    out = {k: [s for s in studies if s.split == k] for k in ("train", "val", "test")}
    for k in ("train", "test"):
        if not out[k]:
            raise StudyListError(f"{study_list}: no labelled {organ.name} studies in the {k} split")
    if labels_per_class is not None:
        from medmap.data.split import labelled_subset

        out["train"] = labelled_subset(out["train"], int(labels_per_class), seed)
    return out


def full_probabilities(clf: Any, x: np.ndarray, num_classes: int) -> np.ndarray:
    """``predict_proba`` as ``[n, C]`` even when some classes were absent from training (p = 0)."""
    p = clf.predict_proba(x)
    out = np.zeros((len(x), num_classes), dtype=np.float64)
    out[:, np.asarray(clf.classes_, dtype=int)] = p
    return out


def _report(studies: Sequence[Study], y: np.ndarray, p: np.ndarray, organ: OrganConfig, run_dir: Path, split: str,
            title: str, n_bootstrap: int, extra: Mapping[str, Any]) -> dict[str, Any]:
    """Metrics, report and per-study predictions (``predictions.csv``) of one split."""
    from medmap.evaluation.report import evaluate_and_report, write_predictions

    out = run_dir / "metrics" / split
    metrics = evaluate_and_report(y, p, organ.classes, out, title=f"{organ.name}: {title} ({split})",
                                  extra={"split": split, **extra}, n_bootstrap=n_bootstrap if split == "test" else 0)
    write_predictions(out / "predictions.csv", [s.study_id for s in studies], y, p, organ.classes)
    metrics["output_dir"] = str(out)
    return metrics


# --------------------------------------------------------------------------- intensity statistics
def modality_features(volume: np.ndarray, organ_mask: np.ndarray) -> np.ndarray:
    """Statistics of the z-scored intensities inside the organ mask (16 numbers)."""
    from scipy import stats

    body = volume[volume > 0]
    inside = volume[organ_mask].astype(np.float64)
    if inside.size == 0:
        raise StudyListError("organ mask is empty")
    mu, sd = inside.mean(), inside.std() + 1e-6
    z = (inside - mu) / sd
    ref = body.mean() + 1e-6 if body.size else 1.0
    feats = list(np.percentile(z, PERCENTILES))
    feats += [float(stats.skew(z)), float(stats.kurtosis(z)), mu / ref, sd / ref, float((z > 2).mean()), float((z < -2).mean())]
    return np.asarray(feats, dtype=np.float64)


def lesion_modality_features(image: np.ndarray, inside: np.ndarray) -> np.ndarray:
    """Statistics of a lesion patch (:func:`medmap.data.lesion.cut_lesion_patch`) inside its box (16 numbers):
    percentiles, mean and SD, the mean of the box's central core and of the rest of the box
    (rim against centre: rings, fill-in, scars), and the fractions well above / below the
    surrounding tissue."""
    idx = np.argwhere(inside)
    lo, hi = idx.min(axis=0), idx.max(axis=0)
    quarter = (hi - lo) / 4
    core = np.zeros_like(inside)
    a, b = np.floor(lo + quarter).astype(int), np.ceil(hi - quarter).astype(int) + 1
    core[a[0]:b[0], a[1]:b[1], a[2]:b[2]] = True
    core &= inside
    v = image[inside].astype(np.float64)
    rim = image[inside & ~core]
    feats = list(np.percentile(v, PERCENTILES))
    feats += [v.mean(), v.std(), float(image[core].mean()), float(rim.mean()) if rim.size else float(v.mean()),
              float((v > 0.5).mean()), float((v < -0.3).mean())]
    return np.asarray(feats, dtype=np.float64)


def lesion_study_features(record: tuple[Mapping[str, str], Any, OrganConfig]) -> dict[str, np.ndarray]:
    """Features of one lesion-level study, ``(modality -> path, LesionBox or None, organ)`` -> modality -> vector,
    computed on the same patches as the models see."""
    from medmap.data.lesion import cut_lesion_patch, patch_box
    from medmap.data.validate import check_volume

    modalities, lesion_box, organ = record
    out = {}
    for m, path in modalities.items():
        img = check_volume(path)
        box = lesion_box.for_modality(m) if lesion_box is not None else None
        space = lesion_box.space if box is not None else "voxel"
        if box is None:
            box = patch_box(img.shape, img.affine, organ.margin_mm)
        cut = cut_lesion_patch(img, box, space, organ.margin_mm, organ.roi_size, organ.patch_norm)
        out[m] = lesion_modality_features(cut.image, cut.inside)
    return out


def study_features(record: tuple[str, Mapping[str, str], str]) -> dict[str, np.ndarray]:
    """Features of one study, ``(list folder, modality -> path, organ-mask path)`` -> modality -> vector."""
    import nibabel as nib

    base, modalities, mask_path = record
    mask = np.asarray(nib.load(Path(base) / mask_path).dataobj) > 0
    return {m: modality_features(np.asarray(nib.load(p).get_fdata(dtype=np.float32)), mask) for m, p in modalities.items()}


def fit_intensity_classifier(x: np.ndarray, y: np.ndarray, seed: int = 0, cv: int = 5) -> Any:
    """Standardised logistic regression, ``C`` by ``cv``-fold cross-validation on (x, y) only.

    With fewer than two studies in the rarest class, cross-validation is impossible and
    ``C = 1`` is used.
    """
    from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    folds = min(cv, int(np.bincount(y)[np.unique(y)].min()))
    if folds >= 2:
        head = LogisticRegressionCV(Cs=8, cv=folds, max_iter=3000, scoring="accuracy", random_state=seed)
    else:
        head = LogisticRegression(C=1.0, max_iter=3000, random_state=seed)
    clf = make_pipeline(StandardScaler(), head)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # scikit-learn API-transition notices
        clf.fit(x, y)
    return clf


def intensity_feature_matrix(studies: Sequence[Study], organ: OrganConfig, list_dir: Path,
                             workers: int = 1) -> np.ndarray:
    """All-modality intensity features ``[n, 16 M]``; a missing modality contributes zeros.

    Whole-organ tasks use the statistics inside the generator's organ mask; lesion-level
    tasks (``crop: lesion_box`` or ``patch``) those inside each modality's lesion box, on
    the patches of the shared preprocessing.
    """
    width = len(PERCENTILES) + 6
    if organ.lesion_level:
        recs = [({m: str(p) for m, p in s.modalities.items()}, s.lesion_box, organ) for s in studies]
        if workers > 1:
            with ProcessPoolExecutor(workers) as ex:
                lfeats = list(ex.map(lesion_study_features, recs, chunksize=4))
        else:
            lfeats = [lesion_study_features(r) for r in recs]
        return np.stack([np.concatenate([f.get(m, np.zeros(width)) for m in organ.modalities]) for f in lfeats])
    records = []
    for s in studies:
        mask = (s.meta or {}).get("organ_mask")
        if not mask:
            raise StudyListError(f"study '{s.study_id}' has no meta['organ_mask']: the intensity baseline "
                                 "needs MedMoM-Synth studies (or an organ mask recorded the same way)")
        records.append((str(list_dir), {m: str(p) for m, p in s.modalities.items()}, str(mask)))
    if workers > 1:
        with ProcessPoolExecutor(workers) as ex:
            feats = list(ex.map(study_features, records, chunksize=4))
    else:
        feats = [study_features(r) for r in records]
    return np.stack([np.concatenate([f.get(m, np.zeros(width)) for m in organ.modalities]) for f in feats])


def run_intensity_baseline(study_list: str | Path, organ: str | Path | OrganConfig, run_dir: str | Path,
                           seed: int = 0, n_bootstrap: int = 1000, workers: int = 1,
                           labels_per_class: int | None = None) -> dict[str, Any]:
    """Fit the intensity-statistics baseline on train (or ``labels_per_class`` training studies
    per class) and write its test metrics.

    Returns:
        The test metrics (``RUN_DIR/metrics/test/metrics.json``).
    """
    organ = load_organ_config(organ)
    run_dir = Path(run_dir)
    splits = labelled_splits(study_list, organ, seed, labels_per_class)
    base = Path(study_list).resolve().parent
    y = {k: np.array([organ.classes.index(s.label) for s in v]) for k, v in splits.items()}
    t0 = time.time()
    x_train = intensity_feature_matrix(splits["train"], organ, base, workers)
    x_test = intensity_feature_matrix(splits["test"], organ, base, workers)
    clf = fit_intensity_classifier(x_train, y["train"], seed=seed)
    p = full_probabilities(clf, x_test, organ.num_classes)
    return _report(splits["test"], y["test"], p, organ, run_dir, "test", "intensity-statistics baseline", n_bootstrap,
                   {"baseline": "intensity_statistics", "n_train": len(x_train), "seed": seed,
                    "fit_time_s": time.time() - t0})


# --------------------------------------------------------------------------- supervised 3D CNN
class EarlyFusionCNN(nn.Module):
    """The small early-fusion CNN baseline: MedMAP's own CNN trunk
    (:class:`~medmap.models.encoders.CNN3DEncoder`, MONAI residual units) on all modalities
    stacked as channels, mean-pooled tokens, a linear head. Against MedMAP it isolates *early*
    fusion (every voxel's sequences seen together from the first convolution) from one
    encoder per sequence. ``pool`` is the token pooling (``mean``; ``max`` for detection of
    a small finding in a large field of view).

    >>> EarlyFusionCNN(4, 3, channels=[4, 8])(torch.zeros(2, 4, 16, 16, 8)).shape
    torch.Size([2, 3])
    """

    def __init__(self, in_channels: int, num_classes: int, channels: Sequence[int] = (16, 32, 64), subunits: int = 2,
                 dim: int = 64, norm: str = "instance", dropout: float = 0.0, pool: str = "mean") -> None:
        super().__init__()
        from medmap.models.encoders import CNN3DEncoder

        self.trunk = CNN3DEncoder(channels=channels, subunits=subunits, dim=dim, norm=norm, dropout=dropout,
                                  in_channels=in_channels, pool=pool)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.trunk(x).pooled)


class StackedModalityCNN(nn.Module):
    """A 3D classification network on ``[images * present, present]`` (``2 M`` channels).

    Args:
        net: ``{"name": <class in monai.networks.nets>, **kwargs}`` (the channel and class
            arguments, ``in_channels``/``out_channels`` or ``n_input_channels``/``num_classes``,
            are filled in; ``spatial_dims`` defaults to 3), or ``{"name": "EarlyFusionCNN",
            **kwargs}`` for :class:`EarlyFusionCNN`.
        num_modalities: ``M``.
        num_classes: ``C``.

    Example:
        >>> m = StackedModalityCNN({"name": "DenseNet", "init_features": 4, "growth_rate": 4,
        ...                         "block_config": [1, 1]}, num_modalities=2, num_classes=3)
        >>> m(torch.zeros(1, 2, 16, 16, 16), torch.tensor([[True, False]])).shape
        torch.Size([1, 3])
    """

    def __init__(self, net: Mapping[str, Any], num_modalities: int, num_classes: int) -> None:
        super().__init__()
        import monai.networks.nets as nets

        kwargs = dict(net)
        name = str(kwargs.pop("name", ""))
        self.num_classes = num_classes
        if name == "EarlyFusionCNN":
            self.net = EarlyFusionCNN(2 * num_modalities, num_classes, **kwargs)
            return
        cls = getattr(nets, name, None)
        if not name or not isinstance(cls, type):
            raise ConfigError(f"cnn baseline: net.name must be a class of monai.networks.nets (e.g. DenseNet, ResNet), got {name!r}")
        params = inspect.signature(cls).parameters
        in_ch = 2 * num_modalities
        if "in_channels" in params:
            kwargs.update(in_channels=in_ch, out_channels=num_classes)
        elif "n_input_channels" in params:
            kwargs.update(n_input_channels=in_ch, num_classes=num_classes)
        else:
            raise ConfigError(f"cnn baseline: monai.networks.nets.{name} takes neither in_channels nor n_input_channels")
        kwargs.setdefault("spatial_dims", 3)
        try:
            self.net = cls(**kwargs)
        except TypeError as e:
            raise ConfigError(f"cnn baseline: bad arguments for monai.networks.nets.{name}: {e}") from e
        instance_norms_as_group_norms(self.net)  # as in MedMAP's encoders: the same function, faster on CPU

    def forward(self, images: Tensor, present: Tensor) -> Tensor:
        pres = present.to(images.dtype)[:, :, None, None, None].expand_as(images)
        return self.net(torch.cat([images * pres, pres], dim=1))


@torch.no_grad()
def _predict_cnn(model: StackedModalityCNN, loader: DataLoader, device: torch.device, precision: str) -> tuple[np.ndarray, np.ndarray]:
    from medmap.precision import autocast_context

    model.eval()
    ys, ps = [], []
    for batch in loader:
        with autocast_context(precision, device):
            logits = model(batch["images"].to(device), batch["present"].to(device))
        ps.append(logits.float().softmax(-1).cpu().numpy())
        ys.append(batch["label"].numpy())
    return np.concatenate(ys), np.concatenate(ps)


def run_cnn_baseline(cfg: Mapping[str, Any], study_list: str | Path, run_dir: str | Path,
                     n_bootstrap: int = 1000) -> dict[str, Any]:
    """Train the stacked-modality MONAI CNN, select the epoch on val, evaluate on test.

    Args:
        cfg: ``organ`` (name or YAML path), ``net`` (see :class:`StackedModalityCNN`),
            ``training`` (``epochs``, ``batch_size``, ``lr``, ``weight_decay``,
            ``warmup_epochs``, ``grad_clip``, ``precision``, ``select_metric``, ``ema_decay``, ``seed``),
            ``data.augment`` (as in stage 2), ``run.device``.
        study_list: the study list.
        run_dir: run folder; an interrupted run continues from ``checkpoints/last``.
        n_bootstrap: bootstrap resamples of the test CIs.

    Returns:
        The test metrics (``RUN_DIR/metrics/test/metrics.json``).
    """
    from medmap.data.cache import PreprocessCache, default_cache_root
    from medmap.data.dataset import StudyDataset, collate_studies
    from medmap.data.sampler import OrganBatchSampler
    from medmap.data.validate import preflight_studies
    from medmap.engines.common import (DistInfo, build_adamw, check_resume_config, find_checkpoint, load_checkpoint,
                                       save_resolved_config, warmup_cosine_schedule)
    from medmap.engines.trainer import LoopPlan, StepResult, TrainingLoop, Validation
    from medmap.evaluation.metrics import compute_metrics
    from medmap.losses.finetune import class_weights_from_labels
    from medmap.utils import pick_device, seed_everything

    typed: CNNBaselineConfig = parse_run_config(cfg, "cnn_baseline")
    run_dir = Path(run_dir)
    organ = load_organ_config(typed.organ)
    tcfg = typed.training
    seed = tcfg.seed
    seed_everything(seed)
    device = pick_device(typed.run.device)
    splits = labelled_splits(study_list, organ, seed, typed.data.labels_per_class)
    if not splits["val"]:
        raise StudyListError(f"{study_list}: the CNN baseline selects its epoch on the val split, which is empty")
    preflight_studies([s for v in splits.values() for s in v], default_cache_root(study_list) / "preflight.json")
    last = find_checkpoint(run_dir, "last")  # a finished or interrupted run is resumed
    check_resume_config(last, cfg)  # before config.yaml is written: a refused resume changes nothing
    run_dir.mkdir(parents=True, exist_ok=True)
    save_resolved_config(run_dir, cfg)
    pcache = PreprocessCache(default_cache_root(study_list) / "preprocess")
    augment = None
    acfg = typed.data.augment
    if acfg and acfg.get("enabled", True):
        from medmap.data.augment import build_augmentation

        augment = build_augmentation(acfg, seed=seed)
    train_ds = StudyDataset(splits["train"], organ, cache=pcache, augment=augment)
    eval_ds = {k: StudyDataset(splits[k], organ, cache=pcache) for k in ("val", "test")}
    bs, eval_bs = tcfg.batch_size, eval_batch_size(tcfg)
    eval_loader = {k: DataLoader(d, batch_size=eval_bs, shuffle=False, collate_fn=collate_studies)
                   for k, d in eval_ds.items()}

    model = StackedModalityCNN(typed.net, len(organ.modalities), organ.num_classes).to(device)
    labels = np.array([train_ds.label_index(s) for s in splits["train"]])
    loss_fn = nn.CrossEntropyLoss(weight=class_weights_from_labels(labels, organ.num_classes).float().to(device))
    optimizer = build_adamw(model.parameters(), lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    sampler = OrganBatchSampler([organ.name] * len(train_ds), bs, 1, 0, seed,
                                labels=labels if typed.data.stratified_batches else None)
    steps_per_epoch = sampler.steps_per_epoch()
    total = tcfg.epochs * steps_per_epoch
    scheduler = warmup_cosine_schedule(optimizer, int(tcfg.warmup_epochs * steps_per_epoch), total, tcfg.min_lr_ratio)
    plan = LoopPlan(total, steps_per_epoch, seed, precision=tcfg.precision, grad_clip=tcfg.grad_clip,
                    validate_every_epochs=1, validate_every_steps=tcfg.val_every_steps, ckpt_every_epochs=1,
                    select_metric=tcfg.select_metric, ema_decay=tcfg.ema_decay)
    loop = TrainingLoop(run_dir, cfg, model, optimizer, scheduler, plan, DistInfo(device=device), tensorboard=False)
    logger = loop.start(last)

    def step_fn(batch: dict[str, Any]) -> StepResult:
        with loop.autocast():
            logits = model(batch["images"].to(device), batch["present"].to(device))
        return StepResult(loss_fn(logits.float(), batch["label"].to(device)))

    def validate() -> Validation:
        y, p = _predict_cnn(model, eval_loader["val"], device, plan.precision)
        score = compute_metrics(y, p, organ.classes, n_bootstrap=0).get(plan.select_metric)
        score = -math.inf if score is None else float(score)
        return Validation(score, {f"val_{plan.select_metric}": score})

    t0 = time.time()
    loop.run(lambda epoch, skip: iter(DataLoader(train_ds, batch_sampler=sampler.rank_batches(epoch, skip),
                                                 collate_fn=collate_studies)), step_fn, validate, augment, sampler)
    logger.close()
    precision = plan.precision
    load_checkpoint(run_dir / "checkpoints" / "best", model, restore_rng=False)
    extra = {"baseline": "monai_cnn", "net": dict(cfg.get("net") or {}), "seed": seed,
             "train_time_s": time.time() - t0, "input": "2M channels: volumes (missing = 0) + presence"}
    y, p = _predict_cnn(model, eval_loader["val"], device, precision)
    _report(splits["val"], y, p, organ, run_dir, "val", "3D CNN baseline", 0, extra)
    y, p = _predict_cnn(model, eval_loader["test"], device, precision)
    return _report(splits["test"], y, p, organ, run_dir, "test", "3D CNN baseline", n_bootstrap, extra)


# --------------------------------------------------------------------------- CLIP-style linear probe
def load_pretrain_model(pretrain_run: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """The stage-1 model of a pre-training run folder (``best`` weights, else ``last``), frozen."""
    from safetensors.torch import load_file, load_model

    from medmap.config import load_yaml
    from medmap.engines.finetune import resolve_init_checkpoint
    from medmap.models.pretrain import build_pretrain_model

    pretrain_run = Path(pretrain_run)
    cfg = load_yaml(pretrain_run / "config.yaml")
    weights = resolve_init_checkpoint(pretrain_run)
    sd = load_file(str(weights))
    text_w = [v for k, v in sd.items() if k.startswith("text_proj.") and k.endswith("weight") and v.ndim == 2]
    if not text_w:
        raise ConfigError(f"{weights}: no text projection weights; is it a stage-1 checkpoint?")
    organs = {o.name: o for o in (load_organ_config(x) for x in cfg["data"]["organs"])}
    model = build_pretrain_model(cfg, organs, text_dim=int(text_w[0].shape[1]))
    load_model(model, str(weights), strict=True, device="cpu")
    model.eval().requires_grad_(False)
    return model, cfg


@torch.no_grad()
def frozen_features(model: nn.Module, dataset: Any, device: torch.device, pool: str = "concat",
                    batch_size: int = 4) -> np.ndarray:
    """Pooled encoder features of every study (see the module docstring for ``pool``)."""
    from medmap.data.dataset import collate_studies

    mods = dataset.organ.modalities
    out = []
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_studies):
        images, present = batch["images"].to(device), batch["present"]
        b = images.shape[0]
        feats = torch.zeros(b, len(mods), model.encoders.dim)
        for j, m in enumerate(mods):
            rows = present[:, j].nonzero(as_tuple=True)[0]
            if rows.numel():
                feats[rows, j] = model.encoders(images[rows, j : j + 1], m).pooled.float().cpu()
        pres = present.float()
        if pool == "mean":
            x = (feats * pres[..., None]).sum(1) / pres.sum(1, keepdim=True).clamp(min=1)
        else:
            x = torch.cat([feats.flatten(1), pres], dim=1)
        out.append(x.numpy())
    return np.concatenate(out)


def run_linear_probe(pretrain_run: str | Path, study_list: str | Path, organ: str | Path | OrganConfig,
                     run_dir: str | Path, seed: int = 0, n_bootstrap: int = 1000, pool: str = "concat",
                     cs: Sequence[float] = (0.01, 0.1, 1.0, 10.0), device: str = "auto",
                     labels_per_class: int | None = None) -> dict[str, Any]:
    """Linear probe on frozen stage-1 encoder features; ``C`` chosen by val balanced accuracy;
    ``labels_per_class`` trains it on that many training studies per class.

    Returns:
        The test metrics (``RUN_DIR/metrics/test/metrics.json``).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from medmap.data.cache import PreprocessCache, default_cache_root
    from medmap.data.dataset import StudyDataset
    from medmap.engines.common import save_resolved_config
    from medmap.utils import pick_device, seed_everything

    if pool not in ("concat", "mean"):
        raise ConfigError(f"linear probe: pool must be 'concat' or 'mean', got {pool!r}")
    seed_everything(seed)
    organ = load_organ_config(organ)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_resolved_config(run_dir, {"baseline": "linear_probe", "pretrain_run": str(pretrain_run), "organ": organ.name,
                                   "pool": pool, "cs": [float(c) for c in cs], "seed": seed})
    dev = pick_device(device)
    model, _ = load_pretrain_model(pretrain_run)
    model.to(dev)
    if any(m not in model.encoders.modalities for m in organ.modalities):
        raise ConfigError(f"stage-1 run {pretrain_run} has no encoder for some {organ.name} modalities")
    splits = labelled_splits(study_list, organ, seed, labels_per_class)
    if not splits["val"]:
        raise StudyListError(f"{study_list}: the linear probe chooses C on the val split, which is empty")
    pcache = PreprocessCache(default_cache_root(study_list) / "preprocess")
    x = {k: frozen_features(model, StudyDataset(v, organ, cache=pcache), dev, pool) for k, v in splits.items() if v}
    y = {k: np.array([organ.classes.index(s.label) for s in v]) for k, v in splits.items()}
    best, best_c = -math.inf, float(cs[0])
    for c in cs:
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=float(c), max_iter=3000, random_state=seed))
        clf.fit(x["train"], y["train"])
        score = balanced_accuracy_score(y["val"], clf.predict(x["val"]))
        if score > best:
            best, best_c = score, float(c)
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=best_c, max_iter=3000, random_state=seed))
    clf.fit(x["train"], y["train"])
    extra = {"baseline": "linear_probe", "pretrain_run": str(pretrain_run), "pool": pool, "C": best_c,
             "val_balanced_accuracy": float(best), "seed": seed}
    _report(splits["val"], y["val"], full_probabilities(clf, x["val"], organ.num_classes), organ, run_dir, "val",
            "linear probe", 0, extra)
    return _report(splits["test"], y["test"], full_probabilities(clf, x["test"], organ.num_classes), organ, run_dir, "test",
                   "linear probe", n_bootstrap, extra)
