"""Zero-shot classification with a stage-1 (pre-training) run: class prompts, no fine-tuning.

``medmap zeroshot STAGE1_RUN --data STUDY_LIST --organ ORGAN [--split test]`` runs
:func:`zero_shot_classify`. Each study is scored against the organ's prompt set exactly as
stage 1 scores its held-out split during pre-training (:func:`~medmap.engines.pretrain.embed_held_out`
and :func:`~medmap.engines.pretrain.zero_shot_logits`: the study embedding against the
impression-style class prompts, each sequence against its own class descriptors;
:mod:`medmap.models.joint`); the softmax over classes is the predicted probability. ``--prompts
FILE`` scores with a user's own prompt set instead (:mod:`medmap.text.descriptors`).
The outputs are those of ``medmap evaluate`` (``metrics.json`` with bootstrap CIs, ``report.md``,
plots, ``predictions.csv``), by default in ``STAGE1_RUN/metrics/zeroshot_<organ>_<split>/``,
so zero-shot and fine-tuned models are compared on the same footing.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from safetensors.torch import load_model

from medmap.config import OrganConfig, load_organ_config, load_yaml
from medmap.data.cache import PreprocessCache, default_cache_root
from medmap.data.dataset import StudyDataset
from medmap.data.split import patient_splits
from medmap.data.studylist import SPLITS, read_study_list
from medmap.data.validate import preflight_studies
from medmap.engines.common import find_checkpoint
from medmap.engines.pretrain import embed_held_out, zero_shot_logits, zero_shot_weights
from medmap.errors import CheckpointError, ConfigError, MedMAPError, StudyListError
from medmap.evaluation.report import evaluate_and_report, write_predictions
from medmap.models.joint import ZeroShotWeights
from medmap.models.pretrain import MedMAPPretrainModel, build_pretrain_model
from medmap.run_config import PretrainConfig, pretrain_config
from medmap.text.cache import run_text_cache
from medmap.text.prompts import TextBank, TextTable, build_text_bank
from medmap.utils import pick_device

MODEL_FILE = "model.safetensors"


@dataclasses.dataclass
class Stage1Run:
    """A stage-1 run folder, read for zero-shot use."""

    run_dir: Path
    cfg: PretrainConfig
    organs: dict[str, OrganConfig]
    checkpoint: Path


def read_stage1_run(run_dir: str | Path, which: str = "auto") -> Stage1Run:
    """The config, organ configs and checkpoint folder of a stage-1 run.

    Args:
        which: ``best``, ``last`` or ``auto`` (``best``, else ``last``).

    Raises:
        CheckpointError: not a stage-1 run folder, or no complete checkpoint.
        ConfigError: an organ config the run was pre-trained with cannot be read.
    """
    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.yaml"
    cfg = load_yaml(cfg_path) if cfg_path.is_file() else {}
    has_organs = isinstance(cfg.get("data"), dict) and bool(cfg["data"].get("organs"))
    if not has_organs or "organ" in cfg or (run_dir / "organ.yaml").is_file():
        raise CheckpointError(f"{run_dir} is not a stage-1 (pre-training) run folder "
                              "(needs the config.yaml with data.organs written by 'medmap pretrain')")
    try:
        typed = pretrain_config(cfg)
    except MedMAPError as e:
        raise CheckpointError(f"{run_dir}/config.yaml is not a readable stage-1 config ({e})") from e
    organs: dict[str, OrganConfig] = {}
    for spec in typed.data.organs:
        try:
            o = load_organ_config(spec)
        except MedMAPError as e:
            raise ConfigError(f"{run_dir}: cannot read the organ config {spec!r} it was pre-trained with ({e})") from e
        organs[o.name] = o
    if which not in ("auto", "best", "last"):
        raise ConfigError(f"checkpoint must be best, last or auto, got {which!r}")
    ckpt = None
    for name in (["best", "last"] if which == "auto" else [which]):
        ckpt = find_checkpoint(run_dir, name)
        if ckpt is not None:
            break
    if ckpt is None:
        raise CheckpointError(f"{run_dir} has no complete stage-1 checkpoint "
                              f"(checkpoints/{'best or last' if which == 'auto' else which}/{MODEL_FILE})")
    return Stage1Run(run_dir, typed, organs, ckpt)


def load_stage1_model(run: Stage1Run, text_dim: int) -> MedMAPPretrainModel:
    """The stage-1 model with the run's weights (safetensors, strict)."""
    model = build_pretrain_model(run.cfg, run.organs, text_dim=text_dim)
    try:
        load_model(model, str(run.checkpoint / MODEL_FILE), strict=True, device="cpu")
    except Exception as e:
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"weights in {run.checkpoint} do not fit the stage-1 model of {run.run_dir / 'config.yaml'} "
                              f"with {text_dim}-d text embeddings (another text model?): {first}") from e
    return model.eval()


def zero_shot_classify(
    run_dir: str | Path,
    data: str | Path,
    organ: str,
    split: str = "test",
    which: str = "auto",
    n_bootstrap: int = 1000,
    batch_size: int = 4,
    out_dir: str | Path | None = None,
    device: str = "auto",
    prompts: str | Path | None = None,
    weights: ZeroShotWeights | None = None,
) -> dict[str, Any]:
    """Classify the labelled ``organ`` studies of ``split`` from class prompts; write metrics and report.

    Args:
        run_dir: a stage-1 run folder (``medmap pretrain``).
        data: the study list.
        organ: organ (task) name; one of the organs the run was pre-trained on.
        split: ``train``, ``val`` or ``test`` (missing splits are assigned by patient, as
            every engine does).
        which: checkpoint: ``auto`` (``best``, else ``last``), ``best`` or ``last``.
        n_bootstrap: bootstrap resamples for the 95% confidence intervals.
        batch_size: studies per forward pass.
        out_dir: default ``RUN_DIR/metrics/zeroshot_<organ>_<split>``.
        device: ``auto``, ``cpu``, ``cuda``.
        prompts: a prompt set (built-in name or YAML path); default: the run's ``text.prompts``,
            else the organ's.
        weights: how the zero-shot parts are weighed; default: the run's ``eval.zero_shot``.

    Returns:
        The metrics dict of :func:`medmap.evaluation.metrics.compute_metrics` (also in
        ``out_dir/metrics.json``), plus ``output_dir``.

    Raises:
        CheckpointError: not a stage-1 run, or its weights cannot be loaded.
        ConfigError: an organ the run was not pre-trained on, a bad split.
        StudyListError: no labelled studies of the organ in the split.
    """
    run_dir = Path(run_dir)
    if split not in SPLITS:
        raise ConfigError(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")
    run = read_stage1_run(run_dir, which)
    if organ not in run.organs:
        raise ConfigError(f"{run_dir} was pre-trained on {', '.join(run.organs)}, not {organ!r}")
    org = run.organs[organ]
    study_list = Path(data)
    if not study_list.is_file():
        raise StudyListError(f"study list not found: {study_list}")
    studies = [s for s in read_study_list(study_list, organ=org.name) if s.label is not None]
    studies = [s for s in patient_splits(studies) if s.split == split]
    if not studies:
        raise StudyListError(f"{study_list}: no labelled {org.name} studies in the {split} split")
    # zero-shot reads images only: findings and impressions are neither needed nor embedded
    studies = [dataclasses.replace(s, findings={}, impression="") for s in studies]
    cache_root = default_cache_root(study_list)
    preflight_studies(studies, cache_root / "preflight.json")
    text_cache = run_text_cache(run.cfg.text, cache_root / "text")
    prompt_spec = prompts if prompts is not None else run.cfg.text.prompts
    bank: TextBank = build_text_bank(org, text_cache, prompt_spec)
    weights = weights or zero_shot_weights(run.cfg)
    model = load_stage1_model(run, text_dim=bank.dim)
    dev = pick_device(device)
    model.to(dev)
    precision = run.cfg.training.precision
    pcache_dir = run.cfg.data.cache_dir or cache_root / "preprocess"
    ds = StudyDataset(studies, org, cache=PreprocessCache(pcache_dir))
    emb = embed_held_out(model, ds, TextTable([], text_cache), dev, precision, batch_size)
    logits = zero_shot_logits(model, bank, emb["study_v"], dev, emb.get("study_s"), weights)
    y = emb["labels"].numpy()
    probs = logits.softmax(-1).numpy()
    ids = [s.study_id for s in studies]  # embed_held_out keeps the dataset's order
    out = Path(out_dir) if out_dir is not None else run_dir / "metrics" / f"zeroshot_{org.name}_{split}"
    context = {"run": str(run_dir), "checkpoint": run.checkpoint.name, "method": "zero-shot from class prompts (stage 1, no fine-tuning)",
               "organ": org.name, "split": split, "study_list": str(study_list), "n_bootstrap": n_bootstrap,
               "text_model": text_cache.model_id,
               "prompt_set": str(prompt_spec or org.prompts or "organ class_prompts"),
               "class_prompts": {c: ps for c, ps in zip(org.classes, bank.class_prompts)},
               "zero_shot_weights": dataclasses.asdict(weights),
               "impression_alignment": model.study_alignment,
               "chance_balanced_accuracy": 1.0 / org.num_classes}
    metrics = evaluate_and_report(y, probs, org.classes, out, title=f"{org.name}: zero-shot on the {split} split",
                                  extra=context, n_bootstrap=n_bootstrap)
    write_predictions(out / "predictions.csv", ids, y, probs, org.classes)
    metrics["output_dir"] = str(out)
    return metrics


__all__ = ["Stage1Run", "load_stage1_model", "read_stage1_run", "zero_shot_classify"]
