"""Stage 2 engine: fine-tuning MedMAP for abnormality detection, with model selection on val.

``medmap finetune --data STUDY_LIST --organ liver --config liver [--init PRETRAIN_RUN] --out RUN_DIR``
runs :func:`run_finetuning`:

1. read the organ's labelled studies, keep given splits and assign missing ones by patient;
2. embed the organ's class prompts and modality descriptors once with the frozen text
   encoder (through the on-disk cache) and store the embeddings in the run folder, so
   neither training nor prediction ever runs the text encoder again;
3. build :class:`~medmap.models.medmap.MedMAPClassifier`; initialise its encoders from a
   stage-1 run (``--init``; skipped when ``ablation.pretrained`` is false);
4. train with :class:`~medmap.losses.finetune.MedMAPLoss`, AdamW (encoders at
   ``encoder_lr_scale`` when pre-trained), warm-up + cosine, in the shared
   :class:`~medmap.engines.trainer.TrainingLoop` (precision, clipping, atomic checkpoints,
   bit-identical ``--resume``);
5. after every ``training.val_every`` epochs and at the end, evaluate on the **validation** split and keep ``checkpoints/best``
   by ``training.select_metric``; the test split is never read here (``medmap evaluate``).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader

from medmap.config import load_organ_config, load_yaml
from medmap.data.cache import PreprocessCache, default_cache_root
from medmap.data.dataset import StudyDataset, collate_studies
from medmap.data.sampler import OrganBatchSampler
from medmap.data.split import labelled_subset, patient_splits
from medmap.data.studylist import read_study_list
from medmap.data.validate import preflight_studies
from medmap.engines.common import (
    DistInfo,
    barrier,
    build_adamw,
    check_resume_config,
    claim_run_dir,
    cleanup_distributed,
    configure_threads,
    find_checkpoint,
    load_checkpoint,
    save_resolved_config,
    setup_distributed,
    warmup_cosine_schedule,
)
from medmap.engines.trainer import LoopPlan, StepResult, TrainingLoop, Validation
from medmap.errors import CheckpointError, ConfigError, StudyListError
from medmap.evaluation.metrics import compute_metrics
from medmap.evaluation.report import evaluate_and_report
from medmap.inference import ORGAN_FILE, RUN_INFO_FILE, load_text_bank, predict_probabilities, save_text_bank
from medmap.losses.finetune import build_medmap_loss, class_weights_from_labels
from medmap.models.freeze import EncoderFreeze
from medmap.models.medmap import build_medmap_classifier, load_encoders_from_pretrain
from medmap.run_config import FinetuneConfig, PretrainConfig, eval_batch_size, finetune_config, pretrain_config
from medmap.text.cache import run_text_cache
from medmap.text.prompts import build_text_bank
from medmap.utils import atomic_write_json, atomic_write_text, derive_seed, seed_everything


def resolve_init_checkpoint(init: str | Path) -> Path:
    """The weights file of a stage-1 run folder (``best``, else ``last``), a checkpoint
    folder, or a ``.safetensors`` file."""
    p = Path(init)
    if p.is_file():
        return p
    if (p / "model.safetensors").is_file():
        return p / "model.safetensors"
    for which in ("best", "last"):
        ck = find_checkpoint(p, which)
        if ck is not None:
            return ck / "model.safetensors"
    raise CheckpointError(f"--init {init}: no stage-1 checkpoint found (expected checkpoints/best or checkpoints/last)")


def _init_run_config(init: Path) -> PretrainConfig | None:
    """The stage-1 config of the run whose checkpoint ``init`` is (``None`` for a bare weights file)."""
    run_dir = init.parent.parent.parent if init.parent.parent.name == "checkpoints" else None
    if run_dir is None or not (run_dir / "config.yaml").is_file():
        return None
    return pretrain_config(load_yaml(run_dir / "config.yaml"))


def _check_init_arch(cfg: FinetuneConfig, init: Path) -> None:
    """Refuse an ``--init`` run whose encoder arch / sharing (or, for the joint similarity head,
    whose projections) differ from this config's."""
    pre = _init_run_config(init)
    if pre is None:
        return
    arch = cfg.encoder.arch
    if arch is not None and pre.encoder.arch != arch:
        raise ConfigError(f"--init run used encoder.arch={pre.encoder.arch!r} but this config has {arch!r}; "
                          f"set encoder.arch={pre.encoder.arch} (e.g. --set encoder.arch={pre.encoder.arch})")
    if pre.ablation.modality_aware != cfg.ablation.modality_aware:
        raise ConfigError("--init run and this config disagree on modality-aware vs shared encoders "
                          "(ablation.modality_aware of the stage-1 run and of this config)")
    if cfg.model.sim_head == "joint" and cfg.ablation.text:
        j, want = cfg.model.joint, {"embed_dim": pre.model.embed_dim, "vision_proj": pre.model.vision_proj,
                                    "text_proj": pre.model.text_proj, "study": pre.ablation.impression}
        differ = [f"model.joint.{k}={v}" for k, v in want.items() if getattr(j, k) != v]
        if differ:
            raise ConfigError(f"--init run's projections differ from model.joint; set {' '.join('--set ' + d for d in differ)}")


def _init_joint_head(model: nn.Module, weights: Path, organ_modalities: list[str]) -> int:
    """Start the joint similarity head from stage 1's projections (``model.sim_head: joint``);
    returns the number of tensors set."""
    from safetensors.torch import load_file

    from medmap.models.joint import load_joint_head

    pre = _init_run_config(weights)
    if pre is not None:
        stage1_modalities: list[str] = []
        for spec in pre.data.organs:
            stage1_modalities += [m for m in load_organ_config(spec).modalities if m not in stage1_modalities]
    else:
        stage1_modalities = list(organ_modalities)
    return len(load_joint_head(model.joint_head, load_file(str(weights)), stage1_modalities))


def _loader(ds: StudyDataset, batches: list[list[int]], num_workers: int) -> DataLoader:
    return DataLoader(ds, batch_sampler=batches, collate_fn=collate_studies, num_workers=num_workers)


def run_finetuning(
    cfg: Mapping[str, Any],
    study_list: str | Path,
    run_dir: str | Path,
    resume: bool = False,
    init: str | Path | None = None,
) -> dict[str, Any]:
    """Fine-tune stage 2 and select the best epoch on the validation split.

    Args:
        cfg: resolved fine-tuning config (``medmap/configs/finetune/<organ>.yaml``).
        study_list: JSON Lines study list (other organs' studies are ignored).
        run_dir: run folder to create (or to continue with ``resume``).
        resume: continue from ``RUN_DIR/checkpoints/last``.
        init: stage-1 run folder or weights to initialise the encoders from.

    Returns:
        On rank 0, a summary with the best validation metrics; ``{}`` on other ranks.
    """
    typed = finetune_config(cfg)  # misspelt keys and wrong types fail before anything is written
    if typed.organ is None:
        raise ConfigError("fine-tuning config: 'organ' is required (a built-in organ name or a YAML path)")
    run_dir = Path(run_dir)
    configure_threads(typed.run.threads, typed.run.num_workers)
    info = setup_distributed(typed.run.device)
    try:
        with claim_run_dir(run_dir, resume, info):  # every rank checks, so none waits for the others
            return _finetune(cfg, typed, Path(study_list), run_dir, resume, init, info)
    finally:
        cleanup_distributed(info)


def _finetune(raw: Mapping[str, Any], cfg: FinetuneConfig, study_list: Path, run_dir: Path,
              resume: bool, init: str | Path | None, info: DistInfo) -> dict[str, Any]:
    tcfg, abl = cfg.training, cfg.ablation
    seed = tcfg.seed
    seed_everything(seed + info.rank)
    organ = load_organ_config(cfg.organ)
    last = find_checkpoint(run_dir, "last") if resume else None
    check_resume_config(last, raw)  # before config.yaml is written: a refused resume changes nothing
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_resolved_config(run_dir, raw)  # as given: its hash guards --resume
        atomic_write_text(run_dir / ORGAN_FILE, yaml.safe_dump(organ.to_dict(), sort_keys=False))

    # ---- data
    studies = read_study_list(study_list, organ=organ.name)
    studies = [s for s in studies if s.label is not None]
    if not studies:
        raise StudyListError(f"{study_list}: no labelled {organ.name} studies")
    studies = patient_splits(studies)
    train = [s for s in studies if s.split == "train"]
    val = [s for s in studies if s.split == "val"]
    if not train or not val:
        raise StudyListError(f"{study_list}: fine-tuning needs labelled {organ.name} studies in both the train "
                             f"and the val split (got {len(train)} train, {len(val)} val)")
    dcfg = cfg.data
    if dcfg.labels_per_class is not None:  # label-efficiency runs: a few labelled studies per class
        train = labelled_subset(train, dcfg.labels_per_class, seed)
    cache_root = Path(dcfg.cache_dir or default_cache_root(study_list))
    preflight_studies(train + val, default_cache_root(study_list) / "preflight.json")  # bad files fail now
    pcache = PreprocessCache(cache_root / "preprocess" if not dcfg.cache_dir else cache_root)
    augment = None
    acfg = dcfg.augment
    if acfg and acfg.get("enabled", True):
        from medmap.data.augment import build_augmentation

        augment = build_augmentation(acfg, seed=derive_seed(seed, 7919, info.rank))
    train_ds = StudyDataset(train, organ, cache=pcache, augment=augment)
    val_ds = StudyDataset(val, organ, cache=pcache)
    train_labels = np.array([train_ds.label_index(s) for s in train])

    # ---- frozen text bank, embedded once (rank 0 first, the others read the cache / file)
    bank = None
    if abl.text:
        if info.is_main and last is None:
            tcache = run_text_cache(cfg.text, cache_root / "text")
            built = build_text_bank(organ, tcache, cfg.text.prompts)
            save_text_bank(built, run_dir, text_model=tcache.model_id)
        barrier(info)
        bank = load_text_bank(run_dir).to(info.device)

    # ---- model
    model = build_medmap_classifier(organ, cfg, int(bank.modality_emb.shape[1]) if bank is not None else None)
    init_report: dict[str, Any] = {"init": None}
    if abl.pretrained and init is not None and last is None:
        weights = resolve_init_checkpoint(init)
        _check_init_arch(cfg, weights)
        rep = load_encoders_from_pretrain(model, weights)
        init_report = {"init": str(weights), "loaded": len(rep.loaded), "missing": rep.missing[:20],
                       "unexpected": len(rep.unexpected), "summary": rep.summary()}
        if model.joint_head is not None:
            init_report["joint_head_loaded"] = _init_joint_head(model, weights, organ.modalities)
        if info.is_main:
            print(f"encoders initialised from {weights}: {rep.summary()}")
    elif abl.pretrained and init is None and last is None and info.is_main:
        print("note: no --init stage-1 run given; encoders start from random initialisation")
    model = model.to(info.device)
    pretrained = init_report["init"] is not None
    if last is not None:
        prev = _read_json(run_dir / RUN_INFO_FILE)
        pretrained = prev.get("init") is not None

    # ---- loss, optimiser, schedule
    cw = None
    if cfg.loss.class_weights == "balanced":
        cw = class_weights_from_labels(train_labels, organ.num_classes)
    loss_fn = build_medmap_loss(cfg, organ.num_classes, class_weights=cw).to(info.device)
    groups = model.parameter_groups(tcfg.lr, tcfg.weight_decay, tcfg.encoder_lr_scale if pretrained else 1.0)
    optimizer = build_adamw(groups, lr=tcfg.lr, betas=tcfg.betas)
    batch_size, val_batch = tcfg.batch_size, eval_batch_size(tcfg)
    sampler = OrganBatchSampler([organ.name] * len(train), batch_size, info.world_size, info.rank, seed,
                                labels=train_labels if dcfg.stratified_batches else None)
    steps_per_epoch = sampler.steps_per_epoch()
    if steps_per_epoch == 0:
        raise ConfigError(f"{len(train)} training studies are too few for one batch on each of {info.world_size} ranks")
    total_steps = tcfg.steps or tcfg.epochs * steps_per_epoch
    scheduler = warmup_cosine_schedule(optimizer, int(tcfg.warmup_epochs * steps_per_epoch), total_steps,
                                       tcfg.min_lr_ratio)
    plan = LoopPlan(total_steps, steps_per_epoch, seed, precision=tcfg.precision, grad_clip=tcfg.grad_clip,
                    log_every=max(1, cfg.run.log_every), validate_every_epochs=max(1, tcfg.val_every),
                    validate_every_steps=tcfg.val_every_steps,
                    ckpt_every_steps=tcfg.ckpt_every_steps,
                    ckpt_every_epochs=max(1, tcfg.ckpt_every), select_metric=tcfg.select_metric,
                    ema_decay=tcfg.ema_decay, validate_at_start=tcfg.val_at_start)
    loop = TrainingLoop(run_dir, raw, model, optimizer, scheduler, plan, info, progress=cfg.run.progress,
                        desc=f"finetune {organ.name}")
    freeze = EncoderFreeze(model, tcfg.mode, total_steps, tcfg.lp_fraction, tcfg.trainable_stages)
    logger = loop.start(last)
    if last is None and info.is_main:
        atomic_write_json(run_dir / RUN_INFO_FILE, {
            "stage": "finetune", "organ": organ.name, "study_list": str(study_list.resolve()),
            "n_train": len(train), "n_val": len(val), "world_size": info.world_size,
            "steps_per_epoch": steps_per_epoch, "total_steps": total_steps, **init_report,
        })
    train_model: nn.Module = model
    if info.distributed:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[info.device.index] if info.device.type == "cuda" else None, find_unused_parameters=True)
    num_workers = cfg.run.num_workers

    def step_fn(batch: dict[str, Any]) -> StepResult:
        freeze.apply(loop.step)
        with loop.autocast():
            out = train_model(batch["images"].to(info.device), batch["present"].to(info.device), bank)
        loss, parts = loss_fn({k: (v.float() if torch.is_tensor(v) else v) for k, v in out.items()},
                              batch["label"].to(info.device))
        return StepResult(loss, {f"loss_{k}": float(v) for k, v in parts.items()})

    def validate() -> Validation:
        y, p, _ = predict_probabilities(model, _loader(val_ds, _chunks(len(val_ds), val_batch), num_workers),
                                        bank, info.device, plan.precision)
        m = compute_metrics(y, p, organ.classes, n_bootstrap=0)
        score = float(m.get(plan.select_metric) if m.get(plan.select_metric) is not None else -math.inf)
        logs = {f"val_{k}": float(m[k]) for k in ("accuracy", "balanced_accuracy", "macro_auc", "macro_f1", "ece")
                if m.get(k) is not None}
        return Validation(score, logs, f"val {plan.select_metric}={score:.4f} acc={m['accuracy']:.4f}")

    t0 = time.time()
    loop.run(lambda epoch, skip: iter(_loader(train_ds, sampler.rank_batches(epoch, skip), num_workers)),
             step_fn, validate, augment, sampler)
    summary: dict[str, Any] = {}
    if info.is_main:
        train_time = time.time() - t0
        logger.log(loop.step, {"train_time_s": train_time})
        logger.close()
        val_loader = _loader(val_ds, _chunks(len(val_ds), val_batch), num_workers)
        summary = _write_summary(run_dir, model, organ.name, organ.classes, val_loader, bank, info, loop, train_time)
    barrier(info)
    return summary


def _write_summary(run_dir: Path, model: nn.Module, organ: str, classes: Sequence[str], val_loader: DataLoader,
                   bank: Any, info: DistInfo, loop: TrainingLoop, train_time: float) -> dict[str, Any]:
    """The validation report of the selected checkpoint and ``metrics/finetune_summary.json``."""
    best = find_checkpoint(run_dir, "best")
    if best is not None:
        load_checkpoint(best, model, restore_rng=False)
    y, p, _ = predict_probabilities(model, val_loader, bank, info.device, loop.plan.precision)
    val_metrics = evaluate_and_report(y, p, classes, run_dir / "metrics" / "val",
                                      title=f"{organ}: validation split (model selection)")
    summary = {"organ": organ, "best_epoch": loop.best_epoch, "select_metric": loop.plan.select_metric,
               "best_score": loop.best_score,
               "val": {k: val_metrics.get(k) for k in ("accuracy", "balanced_accuracy", "macro_auc", "macro_f1")},
               "train_time_s": train_time, "steps": loop.step}
    atomic_write_json(run_dir / "metrics" / "finetune_summary.json", summary)
    return summary


def _chunks(n: int, size: int) -> list[list[int]]:
    return [list(range(i, min(n, i + size))) for i in range(0, n, size)]


def _read_json(path: Path) -> dict[str, Any]:
    """Read the run-info JSON (a small helper so resumption knows how the run started)."""
    import json

    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
