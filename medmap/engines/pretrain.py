"""Stage 1 engine: modality-aware contrastive pre-training and its evaluation.

``medmap pretrain --data STUDY_LIST --config FILE --out RUN_DIR`` runs :func:`run_pretraining`:

1. read the study list, assign missing splits by patient (:func:`medmap.data.split.patient_splits`);
2. embed every distinct findings text and class prompt **once**, through the on-disk
   :class:`~medmap.text.cache.TextEmbeddingCache` (rank 0 first, the others then read the
   cache); the loop below only looks embeddings up in a :class:`~medmap.text.prompts.TextTable`;
3. train :class:`~medmap.models.pretrain.MedMAPPretrainModel` with
   :class:`~medmap.losses.contrastive.AsymmetricContrastiveLoss` on modality-balanced batches
   (:class:`~medmap.data.sampler.OrganBatchSampler`: ``K`` whole studies of one organ per rank, all their
   modalities; an organ's global batch is split across DDP ranks);
4. AdamW, warm-up + cosine, in the shared :class:`~medmap.engines.trainer.TrainingLoop`
   (precision, clipping, atomic checkpoints every ``training.ckpt_every_steps`` steps and at
   the end, bit-identical ``--resume``, ``checkpoints/best`` by held-out mean v2t R@5 every
   ``eval.every_steps`` steps and at the end);
5. evaluate on the held-out split: per-modality retrieval R@1/5/10 both ways, with chance
   levels, and zero-shot classification from class prompts; ``RUN_DIR/metrics/``.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import ConcatDataset, DataLoader

from medmap.config import OrganConfig, load_organ_config
from medmap.data.cache import PreprocessCache, default_cache_root
from medmap.data.dataset import StudyDataset, collate_studies
from medmap.data.sampler import OrganBatchSampler
from medmap.data.studylist import Study, read_study_list
from medmap.data.validate import preflight_studies
from medmap.engines.common import (
    DistInfo,
    barrier,
    build_adamw,
    check_resume_config,
    cleanup_distributed,
    configure_threads,
    claim_run_dir,
    find_checkpoint,
    save_resolved_config,
    setup_distributed,
    warmup_cosine_schedule,
)
from medmap.errors import ConfigError, StudyListError
from medmap.engines.trainer import LoopPlan, StepResult, TrainingLoop, Validation
from medmap.evaluation.retrieval import retrieval_metrics
from medmap.losses.contrastive import build_contrastive_loss
from medmap.models.joint import ZeroShotWeights, joint_logits, project_class_text
from medmap.models.pretrain import MedMAPPretrainModel, build_pretrain_model
from medmap.precision import autocast_context
from medmap.run_config import PretrainConfig, pretrain_config
from medmap.text.cache import run_text_cache
from medmap.text.prompts import TextBank, TextTable, build_text_bank
from medmap.utils import atomic_write_json, atomic_write_text, derive_seed, seed_everything


# --------------------------------------------------------------------------- data
@dataclass
class PretrainData:
    """Everything the loop needs about the data, prepared before training."""

    organs: dict[str, OrganConfig]
    train: list[Study]
    held_out: list[Study]
    held_out_split: str
    table: TextTable
    banks: dict[str, TextBank]


def _organ_datasets(
    studies: Sequence[Study], organs: Mapping[str, OrganConfig], cache: PreprocessCache | None, augment: Any
) -> tuple[ConcatDataset, list[str]]:
    parts, organ_of = [], []
    for name, organ in organs.items():
        ss = [s for s in studies if s.organ == name]
        if ss:
            parts.append(StudyDataset(ss, organ, cache=cache, augment=augment))
            organ_of += [name] * len(ss)
    if not parts:
        raise StudyListError("no studies of the configured organs in this split")
    return ConcatDataset(parts), organ_of


def study_texts(studies: Sequence[Study]) -> list[str]:
    """Every findings text of the present modalities of ``studies``."""
    return [s.findings[m] for s in studies for m in s.modalities if s.findings.get(m)]


def prepare_data(cfg: Mapping[str, Any] | PretrainConfig, study_list: str | Path, info: DistInfo) -> PretrainData:
    """Read and split the studies and embed all texts (rank 0 first, others from the cache)."""
    from medmap.data.split import patient_splits

    cfg = pretrain_config(cfg)
    dcfg = cfg.data
    organs = {o.name: o for o in (load_organ_config(x) for x in dcfg.organs)}
    studies = [s for s in read_study_list(study_list) if s.organ in organs]
    if not studies:
        raise StudyListError(f"{study_list}: no studies of organs {', '.join(organs)}")
    studies = patient_splits(studies)
    train = [s for s in studies if s.split == dcfg.train_split]
    split = dcfg.eval_split
    held_out = [s for s in studies if s.split == split]
    if not train:
        raise StudyListError(f"{study_list}: no studies in the training split")
    impressions = cfg.ablation.impression
    train = _with_text(train, study_list, "training", info.is_main, impressions)
    held_out = _with_text(held_out, study_list, None, info.is_main, impressions)
    preflight_studies(train + held_out, default_cache_root(study_list) / "preflight.json")  # before the text encoder
    default_text_dir = default_cache_root(study_list) / "text"
    texts = study_texts(train) + study_texts(held_out)
    if impressions:
        texts += [s.impression for s in train + held_out if s.impression]
    tables: dict[str, Any] = {}

    def build() -> None:
        cache = run_text_cache(cfg.text, default_text_dir, progress=info.is_main and cfg.run.progress)
        tables["table"] = TextTable(texts, cache)
        tables["banks"] = {n: build_text_bank(o, cache, cfg.text.prompts) for n, o in organs.items()}

    if info.is_main:
        build()
    barrier(info)
    if not info.is_main:
        build()  # every text is on disk now: no encoder is loaded here
    return PretrainData(organs, train, held_out, split, tables["table"], tables["banks"])


def _has_findings(study: Study) -> bool:
    return any((study.findings or {}).get(m) for m in study.modalities)


def _with_text(studies: list[Study], study_list: str | Path, required: str | None, verbose: bool,
               impressions: bool) -> list[Study]:
    """Stage 1 pairs each sequence with its findings text (and, with the impression alignment,
    the study with its impression): keep the studies that have any of these texts."""
    kept = [s for s in studies if _has_findings(s) or (impressions and s.impression)]
    what = "findings or an impression" if impressions else "findings"
    if required and not kept:
        raise StudyListError(f"{study_list}: none of the {len(studies)} {required} studies has {what}; stage 1 "
                             "pairs every sequence with its findings text ('findings': {modality: text})"
                             + (" and the study with its 'impression'" if impressions else ""))
    if len(kept) < len(studies) and verbose:
        print(f"note: {len(studies) - len(kept)} of {len(studies)} {required or 'held-out'} studies have no {what} "
              "and are left out of stage 1")
    return kept


def batch_text(batch: Mapping[str, Any], table: TextTable, present: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Frozen embeddings ``[B, M, D]``, text ids ``[B, M]`` and the mask of usable pairs.

    A modality is a usable pair when its volume is present and it has a findings text.
    """
    b, m = present.shape
    emb = torch.zeros(b, m, table.embeddings.shape[1])
    ids = torch.full((b, m), -1, dtype=torch.long)
    usable = present.clone()
    for i, texts in enumerate(batch["findings"]):
        for j, t in enumerate(texts):
            if usable[i, j] and t:
                k = table.index[t]
                emb[i, j] = table.embeddings[k]
                ids[i, j] = k
            else:
                usable[i, j] = False
    return emb, ids, usable


def batch_impressions(batch: Mapping[str, Any], table: TextTable) -> tuple[Tensor, Tensor, Tensor]:
    """Frozen impression embeddings ``[B, D]``, their text ids ``[B]`` and which studies have one."""
    b = len(batch["impression"])
    emb = torch.zeros(b, table.embeddings.shape[1])
    ids = torch.full((b,), -1, dtype=torch.long)
    ok = torch.zeros(b, dtype=torch.bool)
    for i, t in enumerate(batch["impression"]):
        if t and t in table.index:
            k = table.index[t]
            emb[i], ids[i], ok[i] = table.embeddings[k], k, True
    return emb, ids, ok


# --------------------------------------------------------------------------- evaluation
@torch.no_grad()
def embed_held_out(
    model: MedMAPPretrainModel, dataset: StudyDataset, table: TextTable, device: torch.device, precision: str, batch_size: int
) -> dict[str, Any]:
    """Per modality: projected volume and text embeddings, text ids; per study: label, presence,
    the sequence embeddings (``study_v``) and, with the impression alignment, the study embedding
    (``study_s``); impression pairs for retrieval under ``per_modality["study"]``."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_studies)
    mods = dataset.organ.modalities
    per_mod: dict[str, dict[str, list[Tensor]]] = {m: {"v": [], "t": [], "ids": []} for m in [*mods, "study"]}
    labels, study_v, study_s = [], [], []
    for batch in loader:
        present = batch["present"]
        emb, ids, usable = batch_text(batch, table, present)
        images = batch["images"].to(device)
        b = images.shape[0]
        vs = torch.zeros(b, len(mods), model.embed_dim)
        pooled: dict[str, tuple[Tensor, Tensor]] = {}
        with autocast_context(precision, device):
            for j, m in enumerate(mods):
                rows = present[:, j].nonzero(as_tuple=True)[0]
                if rows.numel() == 0:
                    continue
                z = model.encoders(images[rows, j : j + 1], m).pooled
                pooled[m] = (rows.to(device), z)
                v = model.project_volume(z, m).float().cpu()
                vs[rows, j] = v
                ok = usable[rows, j]
                if ok.any():
                    per_mod[m]["v"].append(v[ok])
                    per_mod[m]["t"].append(model.encode_text(emb[rows[ok], j].to(device)).float().cpu())
                    per_mod[m]["ids"].append(ids[rows[ok], j])
            if model.study_alignment and pooled:
                s, _ = model.encode_study(pooled, b)
                s = s.float().cpu()
                study_s.append(s)
                imp, imp_ids, imp_ok = batch_impressions(batch, table)
                if imp_ok.any():
                    per_mod["study"]["v"].append(s[imp_ok])
                    per_mod["study"]["t"].append(model.encode_text(imp[imp_ok].to(device)).float().cpu())
                    per_mod["study"]["ids"].append(imp_ids[imp_ok])
        labels.append(batch["label"])
        study_v.append((vs, present))
    merged = {m: {k: torch.cat(x) for k, x in d.items() if x} for m, d in per_mod.items()}
    return {"per_modality": merged, "labels": torch.cat(labels), "study_v": study_v,
            "study_s": study_s if study_s else None}


@torch.no_grad()
def zero_shot_logits(
    model: MedMAPPretrainModel, bank: TextBank, study_v: list[tuple[Tensor, Tensor]], device: torch.device,
    study_s: list[Tensor] | None = None, weights: ZeroShotWeights = ZeroShotWeights(),
) -> Tensor:
    """Zero-shot class logits ``[N, C]`` of the studies embedded by :func:`embed_held_out`
    (:func:`medmap.models.joint.joint_logits`: the study embedding against the impression-style
    prompts, each sequence against its own class descriptors). Shared by
    :func:`zero_shot_metrics` and :mod:`medmap.engines.zeroshot`."""
    text = project_class_text(lambda u: model.encode_text(u.to(device)).float().cpu(), bank)
    scale = model.logit_scale().detach().cpu()
    seq_scale = scale[torch.tensor([model.modality_index(m) for m in bank.modalities])]
    study_scale = model.study_scale().detach().cpu() if model.study_alignment else 1.0
    out = []
    for i, (vs, present) in enumerate(study_v):
        s = study_s[i] if study_s is not None else None
        out.append(joint_logits(vs, present, s, text, seq_scale, study_scale, weights))
    return torch.cat(out) if out else torch.zeros(0, bank.class_emb.shape[0])


def zero_shot_metrics(
    model: MedMAPPretrainModel, bank: TextBank, emb: Mapping[str, Any], device: torch.device,
    weights: ZeroShotWeights = ZeroShotWeights(),
) -> dict[str, Any]:
    """Zero-shot classification of the studies of :func:`embed_held_out` (``emb``) from the
    bank's class prompts and descriptors (:func:`zero_shot_logits`)."""
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score

    c = bank.class_emb.shape[0]
    labels = emb["labels"]
    logits = zero_shot_logits(model, bank, emb["study_v"], device, emb.get("study_s"), weights)
    keep = labels >= 0
    y = labels[keep].numpy()
    if len(y) == 0:
        return {"n": 0}
    prob = logits[keep].softmax(-1).numpy()
    pred = prob.argmax(1)
    out: dict[str, Any] = {
        "n": int(len(y)),
        "accuracy": float((pred == y).mean()),
        "balanced_accuracy": float(balanced_accuracy_score(y, pred)),
        "chance_accuracy_majority": float(np.bincount(y).max() / len(y)),
        "chance_balanced_accuracy": 1.0 / c,
    }
    present_classes = np.unique(y)
    try:
        if c == 2:
            out["macro_auc"] = float(roc_auc_score(y, prob[:, 1])) if len(present_classes) == 2 else None
        elif len(present_classes) == c:
            out["macro_auc"] = float(roc_auc_score(y, prob, multi_class="ovr", average="macro"))
        else:  # classes missing from the held-out split: average one-vs-rest over present ones
            aucs = [roc_auc_score(y == k, prob[:, k]) for k in present_classes if 0 < (y == k).sum() < len(y)]
            out["macro_auc"] = float(np.mean(aucs)) if aucs else None
            out["macro_auc_note"] = f"over the {len(aucs)} classes present in the split"
    except ValueError:
        out["macro_auc"] = None
    return out


def evaluate_pretraining(
    model: MedMAPPretrainModel, data: PretrainData, cfg: Mapping[str, Any] | PretrainConfig, device: torch.device,
    cache: PreprocessCache | None
) -> dict[str, Any]:
    """Retrieval per modality and zero-shot classification per organ on the held-out split."""
    cfg = pretrain_config(cfg)
    ks, precision = cfg.eval.ks, cfg.training.precision
    was_training = model.training
    model.eval()
    result: dict[str, Any] = {"split": data.held_out_split, "retrieval": {}, "zero_shot": {}}
    for name, organ in data.organs.items():
        studies = [s for s in data.held_out if s.organ == name]
        if not studies:
            continue
        ds = StudyDataset(studies, organ, cache=cache)
        emb = embed_held_out(model, ds, data.table, device, precision, cfg.eval.batch_size)
        for m, d in emb["per_modality"].items():
            if "v" in d and len(d["v"]) >= 2:
                key = m if m != "study" else f"{name} impression"
                result["retrieval"][key] = {"organ": name, **retrieval_metrics(d["v"], d["t"], d["ids"], ks)}
        result["zero_shot"][name] = zero_shot_metrics(model, data.banks[name], emb, device, zero_shot_weights(cfg))
    model.train(was_training)
    r = {k: v for k, v in result["retrieval"].items() if not k.endswith(" impression")}  # the mean is over sequences
    if r:
        # checkpoints/best: v2t R@5, the mean over the sequences and (with the impression alignment) the studies
        parts = [float(np.mean([x["v2t_R@5"] for x in r.values()]))] if all("v2t_R@5" in x for x in r.values()) else []
        parts += [x["v2t_R@5"] for k, x in result["retrieval"].items() if k.endswith(" impression") and "v2t_R@5" in x]
        if parts:
            result["select_v2t_R@5"] = float(np.mean(parts))
        for k in ks:
            for direction in ("v2t", "t2v"):
                result[f"mean_{direction}_R@{k}"] = float(np.mean([x[f"{direction}_R@{k}"] for x in r.values()]))
                result[f"mean_{direction}_R@{k}_chance"] = float(np.mean([x[f"{direction}_R@{k}_chance"] for x in r.values()]))
    return result


def zero_shot_weights(cfg: Mapping[str, Any] | PretrainConfig) -> ZeroShotWeights:
    """The ``eval.zero_shot`` weights of a stage-1 config."""
    z = pretrain_config(cfg).eval.zero_shot
    return ZeroShotWeights(study=z.study, sequences=z.sequences, negatives=z.negatives)


def metrics_markdown(metrics: Mapping[str, Any]) -> str:
    """A Markdown report of :func:`evaluate_pretraining`'s output."""
    lines = [f"# Stage-1 evaluation ({metrics['split']} split)", ""]
    r = metrics["retrieval"]
    if r:
        ks = sorted({int(k.split("@")[1]) for x in r.values() for k in x if k.startswith("v2t_R@") and "chance" not in k})
        head = ["modality", "organ", "volumes", "texts"]
        for d in ("v2t", "t2v"):
            head += [f"{d} R@{k} (chance)" for k in ks]
        lines += ["## Retrieval", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for m, x in r.items():
            row = [m, x["organ"], str(int(x["n_volumes"])), str(int(x["n_texts"]))]
            for d in ("v2t", "t2v"):
                row += [f"{x[f'{d}_R@{k}']:.3f} ({x[f'{d}_R@{k}_chance']:.3f})" for k in ks]
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    lines += ["## Zero-shot classification from class prompts", "", "| organ | n | accuracy | balanced acc. | macro AUC | majority-class acc. |", "|---|---|---|---|---|---|"]
    for organ, z in metrics["zero_shot"].items():
        if not z.get("n"):
            lines.append(f"| {organ} | 0 | - | - | - | - |")
            continue
        auc = "n/a" if z.get("macro_auc") is None else f"{z['macro_auc']:.3f}"
        lines.append(
            f"| {organ} | {z['n']} | {z['accuracy']:.3f} | {z['balanced_accuracy']:.3f} | {auc} | {z['chance_accuracy_majority']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def write_metrics(run_dir: Path, metrics: Mapping[str, Any], name: str) -> None:
    atomic_write_json(run_dir / "metrics" / f"{name}.json", metrics)
    atomic_write_text(run_dir / "metrics" / f"{name}.md", metrics_markdown(metrics))


# --------------------------------------------------------------------------- training
def _stage1_loss(out: Mapping[str, Tensor], ids: Tensor, imp_ids: Tensor | None, loss_fn: nn.Module,
                 study_loss_fn: nn.Module, cfg: PretrainConfig, device: torch.device) -> tuple[Tensor, dict[str, float]]:
    """``L_pre`` over the findings pairs plus ``impression_weight x`` the study-impression term."""
    scale = out["logit_scale"].float()
    loss = scale.sum() * 0.0
    logs: dict[str, float] = {"mean_logit_scale": float(scale.detach().mean())}
    if "v" in out:
        pi = out["pair_index"].cpu()
        findings = loss_fn(out["v"].float(), out["t"].float(), ids[pi[:, 0], pi[:, 1]].to(device), out["modality"], scale)
        loss = loss + findings
        logs.update(pairs=float(out["v"].shape[0]), loss_findings=float(findings.detach()))
    if "s" in out and imp_ids is not None:
        rows = out["study_rows"].cpu()
        group = torch.zeros(rows.numel(), dtype=torch.long, device=device)
        study = study_loss_fn(out["s"].float(), out["s_text"].float(), imp_ids[rows].to(device), group,
                              out["study_scale"].float().reshape(1))
        loss = loss + cfg.loss.impression_weight * study
        logs.update(loss_impression=float(study.detach()), study_scale=float(out["study_scale"].detach()))
    return loss, logs


def run_pretraining(
    cfg: Mapping[str, Any], study_list: str | Path, run_dir: str | Path, resume: bool = False
) -> dict[str, Any]:
    """Train stage 1 and evaluate it; returns the final metrics (on rank 0, ``{}`` elsewhere).

    Args:
        cfg: resolved pre-training config (see ``medmap/configs/pretrain/default.yaml``).
        study_list: the JSON Lines study list.
        run_dir: run folder (created; with ``resume`` it must hold a checkpoint or be new).
        resume: continue from ``RUN_DIR/checkpoints/last`` if present.
    """
    raw, cfg = cfg, pretrain_config(cfg)  # misspelt keys and wrong types fail before anything is written
    run_dir = Path(run_dir)
    tcfg = cfg.training
    configure_threads(cfg.run.threads, cfg.run.num_workers)
    info = setup_distributed(cfg.run.device)
    guard = contextlib.ExitStack()
    try:
        guard.enter_context(claim_run_dir(run_dir, resume, info))  # every rank checks, so none waits for the others
        seed = tcfg.seed
        seed_everything(seed + info.rank)
        last = find_checkpoint(run_dir, "last") if resume else None
        check_resume_config(last, raw)  # before config.yaml is written: a refused resume changes nothing
        if info.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            save_resolved_config(run_dir, raw)  # as given: its hash guards --resume
        data = prepare_data(cfg, study_list, info)
        pcache = PreprocessCache(cfg.data.cache_dir or default_cache_root(study_list) / "preprocess")
        augment = None
        acfg = cfg.data.augment
        if acfg and acfg.get("enabled", True):
            from medmap.data.augment import build_augmentation

            augment = build_augmentation(acfg, seed=derive_seed(seed, 7919, info.rank))
        train_ds, organ_of = _organ_datasets(data.train, data.organs, pcache, augment)
        sampler = OrganBatchSampler(organ_of, tcfg.batch_size, info.world_size, info.rank, seed)
        steps_per_epoch = sampler.steps_per_epoch()
        if steps_per_epoch == 0:
            raise ConfigError("not enough training studies for one batch on every rank")
        total_steps = tcfg.steps or tcfg.epochs * steps_per_epoch

        model = build_pretrain_model(cfg, data.organs, text_dim=data.table.embeddings.shape[1]).to(info.device)
        loss_fn = build_contrastive_loss(cfg, model)
        study_loss_fn = build_contrastive_loss(cfg, model, study=True)
        decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "pos_embed" not in n]
        no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "pos_embed" not in n)]
        optimizer = build_adamw(
            [{"params": decay, "weight_decay": tcfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=tcfg.lr,
            betas=tcfg.betas,
        )
        scheduler = warmup_cosine_schedule(optimizer, tcfg.warmup_steps, total_steps, tcfg.min_lr_ratio)
        plan = LoopPlan(total_steps, steps_per_epoch, seed, precision=tcfg.precision, grad_clip=tcfg.grad_clip,
                        log_every=max(1, cfg.run.log_every), validate_every_steps=cfg.eval.every_steps,
                        ckpt_every_steps=tcfg.ckpt_every_steps, select_metric="select_v2t_R@5")
        loop = TrainingLoop(run_dir, raw, model, optimizer, scheduler, plan, info, progress=cfg.run.progress)
        logger = loop.start(last)
        train_model: nn.Module = model
        if info.distributed:
            train_model = nn.parallel.DistributedDataParallel(
                model, device_ids=[info.device.index] if info.device.type == "cuda" else None, find_unused_parameters=True
            )
        final: dict[str, Any] = {}

        def step_fn(batch: dict[str, Any]) -> StepResult:
            organ = data.organs[batch["organ"]]
            present = batch["present"]
            emb, ids, usable = batch_text(batch, data.table, present)
            imp, imp_ids, imp_ok = batch_impressions(batch, data.table) if model.study_alignment else (None, None, None)
            with loop.autocast():
                out = train_model(batch["images"].to(info.device), present.to(info.device), organ.modalities,
                                  emb.to(info.device), usable.to(info.device),
                                  None if imp is None else imp.to(info.device), None if imp_ok is None else imp_ok.to(info.device))
            loss, logs = _stage1_loss(out, ids, imp_ids, loss_fn, study_loss_fn, cfg, info.device)
            return StepResult(loss, {"epoch": loop.step // steps_per_epoch, **logs}, {"organ": organ.name})

        def validate() -> Validation | None:
            if not data.held_out:
                return None
            metrics = evaluate_pretraining(model, data, cfg, info.device, pcache)
            final.update(metrics, step=loop.step)  # the last one is the final model's
            logs = {k: v for k, v in metrics.items() if k.startswith("mean_") and "chance" not in k}
            for organ_name, z in metrics.get("zero_shot", {}).items():  # logged, never selected on
                if z.get("balanced_accuracy") is not None:
                    logs[f"zero_shot_{organ_name}_balanced_accuracy"] = z["balanced_accuracy"]
            return Validation(metrics.get("select_v2t_R@5", -math.inf), logs)

        t0 = time.time()
        num_workers = cfg.run.num_workers
        loop.run(lambda epoch, skip: iter(DataLoader(train_ds, batch_sampler=sampler.rank_batches(epoch, skip),
                                                     collate_fn=collate_studies, num_workers=num_workers)),
                 step_fn, validate, augment, sampler)
        if info.is_main:
            logger.log(loop.step, {"train_time_s": time.time() - t0})
            if not final and data.held_out:  # a finished run resumed: evaluate its final model again
                final.update(evaluate_pretraining(model, data, cfg, info.device, pcache), step=loop.step)
            if final:
                write_metrics(run_dir, final, f"pretrain_{data.held_out_split}")
            logger.close()
        barrier(info)
        return final
    finally:
        guard.close()
        cleanup_distributed(info)
