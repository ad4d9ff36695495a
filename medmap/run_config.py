"""Typed run configs: every key of a pre-training, fine-tuning or demo config, with its type
and its default, in one place.

A run config travels as a plain mapping (YAML on disk, ``--set key=value`` on the command
line, ``config.yaml`` in a run folder, hashed for ``--resume``); :func:`parse_run_config`
turns it into the dataclasses below, filling every key the mapping leaves out with the
default written here and rejecting an unknown key (with the list of valid ones) or a value
of the wrong type. The engines and the model, loss and text builders read the typed form
only, so a default lives here and nowhere else; the shipped YAML files are recipes that set
values, documented next to each key.

Example:
    >>> cfg = parse_run_config({"training": {"epochs": 3}}, "finetune")
    >>> cfg.training.epochs, cfg.training.grad_clip, cfg.ablation.cct
    (3, 1.0, True)
    >>> parse_run_config({"training": {"epoch": 3}}, "finetune")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    medmap.errors.ConfigError: unknown config key 'training.epoch'; valid keys in 'training': batch_size, ...
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, TypeVar, Union

from medmap.errors import ConfigError

T = TypeVar("T")


# ---------------------------------------------------------------- sections shared by the stages
@dataclass(frozen=True)
class RunSection:
    """``run``: how a run uses the machine; may change on ``--resume``."""

    device: str = "auto"            # auto | cpu | cuda | cuda:N
    threads: int | Literal["auto"] | None = "auto"  # CPU threads per process; auto = free cores / processes
                                    # (medmap.threads); null = PyTorch's default (one per core)
    num_workers: int = 0            # data-loader workers (> 0 only with spare cores)
    log_every: int = 1              # steps between log rows (stage 1)
    progress: bool = True           # progress bars


@dataclass(frozen=True)
class TextSection:
    """``text``: the frozen text encoder and its embedding cache."""

    model: str = "all-MiniLM-L6-v2"  # or a local sentence-transformers / Hugging Face folder
    cache_dir: str | None = None     # null = <study list folder>/.medmap_cache/text
    prompts: str | None = None       # prompt set (configs/prompts/<name>.yaml or a path); null = the organ's


@dataclass(frozen=True)
class TrainingSection:
    """``training``: the optimiser, schedule and checkpoints, as both stages read them."""

    epochs: int = 10
    steps: int | None = None        # total optimiser steps; null = epochs x steps per epoch
    batch_size: int = 8
    lr: float = 3.0e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.05
    min_lr_ratio: float = 0.0       # cosine floor, as a fraction of lr
    grad_clip: float = 1.0          # max gradient norm; 0 = no clipping
    precision: str = "auto"         # auto | fp32 | bf16 (medmap.precision)
    ckpt_every_steps: int = 0       # also checkpoint every N steps inside an epoch
    seed: int = 0


# ---------------------------------------------------------------- stage 1
@dataclass(frozen=True)
class PretrainData:
    organs: list[str] = field(default_factory=lambda: ["brain", "liver"])  # organ configs; a batch holds one organ
    train_split: str = "train"
    eval_split: str = "val"         # held-out split for retrieval and zero-shot evaluation
    cache_dir: str | None = None    # null = <study list folder>/.medmap_cache/preprocess
    augment: dict[str, Any] | None = None  # medmap.data.augment (checked there); null = none


@dataclass(frozen=True)
class PretrainEncoder:
    arch: str | dict[str, Any] = "cnn_small"  # configs/encoders/<name>.yaml, a YAML path or a mapping


@dataclass(frozen=True)
class PretrainAblation:
    modality_aware: bool = True     # false: one shared encoder for all sequences (as in stage 2)
    impression: bool = False        # true: also align the study embedding with the impression
                                    # (the shipped configs; false = the findings-only form of the paper)


@dataclass(frozen=True)
class ProjectionSection:
    """Stage 1's ``model``: the joint space and the projections into it."""

    embed_dim: int = 128            # joint space size k
    vision_proj: str = "linear"     # g_m: linear | mlp
    text_proj: str = "mlp"          # h: linear | mlp
    init_logit_scale: float = 1 / 0.07  # exp(t_m) at the start
    max_logit_scale: float = 100.0


@dataclass(frozen=True)
class ContrastiveLossSection:
    alpha: float = 0.75             # weight of volume-to-text; 1 - alpha for text-to-volume
    modality_weights: dict[str, float] = field(default_factory=dict)  # modality -> w_m (1 each)
    normalize_weights: bool = True  # divide by the sum of w_m of the groups in the batch
    min_group_size: int = 2
    impression_weight: float = 1.0  # weight of the study-impression term (with ablation.impression)


@dataclass(frozen=True)
class PretrainTraining(TrainingSection):
    epochs: int = 8
    lr: float = 5.0e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    warmup_steps: int = 0
    ckpt_every_steps: int = 50


@dataclass(frozen=True)
class ZeroShotSection:
    """How zero-shot scores weigh their parts (medmap.models.joint)."""

    study: float = 1.0              # the study embedding against impression-style class prompts
    sequences: float = 1.0          # each sequence against its own class descriptors
    negatives: bool = False         # subtract the negated prompts' similarity (prompt sets that have them; hurt on the liver)


@dataclass(frozen=True)
class EvalSection:
    """Stage 1's held-out evaluation (retrieval and zero-shot)."""

    ks: list[int] = field(default_factory=lambda: [1, 5, 10])
    batch_size: int = 4
    every_steps: int = 0            # > 0: evaluate every N steps and keep checkpoints/best
    zero_shot: ZeroShotSection = field(default_factory=ZeroShotSection)


@dataclass(frozen=True)
class PretrainConfig:
    """A stage-1 (``medmap pretrain``) run config."""

    data: PretrainData = field(default_factory=PretrainData)
    text: TextSection = field(default_factory=TextSection)
    encoder: PretrainEncoder = field(default_factory=PretrainEncoder)
    ablation: PretrainAblation = field(default_factory=PretrainAblation)
    model: ProjectionSection = field(default_factory=ProjectionSection)
    loss: ContrastiveLossSection = field(default_factory=ContrastiveLossSection)
    training: PretrainTraining = field(default_factory=PretrainTraining)
    eval: EvalSection = field(default_factory=EvalSection)
    run: RunSection = field(default_factory=RunSection)


# ---------------------------------------------------------------- stage 2
@dataclass(frozen=True)
class FinetuneEncoder:
    arch: str | dict[str, Any] | None = None  # required: configs/encoders/<name>.yaml, a YAML path or a mapping


@dataclass(frozen=True)
class CSASection:
    conv_blocks: int = 1            # FiLM-modulated 3D conv blocks (local stream)
    transformer_blocks: int = 1     # self-attention + cross-attention-to-text blocks (global stream)


@dataclass(frozen=True)
class CCTSection:
    layers: int = 2                 # two-way cross-attention layers L
    self_attention: bool = False    # each token stream also attends to itself in every layer


@dataclass(frozen=True)
class JointHeadSection:
    """Stage 2's ``model.joint``: the joint-space similarity head (``model.sim_head: joint``),
    whose projections must be those of the stage-1 run it starts from."""

    embed_dim: int = 128            # stage 1's model.embed_dim
    vision_proj: str = "linear"     # stage 1's model.vision_proj
    text_proj: str = "mlp"          # stage 1's model.text_proj
    study: bool = True              # stage 1's ablation.impression (the study projection)
    zero_shot: "ZeroShotSection" = field(default_factory=lambda: ZeroShotSection())


@dataclass(frozen=True)
class ClassifierModelSection:
    """Stage 2's ``model`` (see :class:`medmap.models.medmap.MedMAPModelConfig`)."""

    num_heads: int = 4
    mlp_ratio: float = 4.0
    dropout: float = 0.1
    csa: CSASection = field(default_factory=CSASection)
    cct: CCTSection = field(default_factory=CCTSection)
    pooling: str = "mean"           # v*: mean | max | attention
    prediction: str = "avg"         # avg of the two heads | cls | sim
    tau_init: float = 10.0
    tau_max: float = 100.0
    token_positions: bool = False
    token_fusion: str = "sequence"  # sequence | location
    sequence_exchange: bool = False
    sim_head: str = "cct"           # cct: tau cos(v*, q*_c) (the paper) | joint: stage 1's zero-shot classifier, refined
    joint: JointHeadSection = field(default_factory=JointHeadSection)


@dataclass(frozen=True)
class FinetuneLossSection:
    sup: str = "ce"                 # ce | focal (classifier head)
    gamma: float = 2.0              # focal loss only
    class_weights: str | list[float] | None = None  # null | balanced | [w_0, ..., w_C-1]
    lambda_sim: float = 1.0         # CE on the similarity head
    lambda_kl: float = 0.5          # KL(p_cls || p_sim)
    kl_detach: str = "none"         # none | cls | sim
    label_smoothing: float = 0.0


@dataclass(frozen=True)
class AblationSection:
    """The paper's ablations: a switch set to false removes that component."""

    pretrained: bool = True         # false: encoders start from random init (no stage 1)
    modality_aware: bool = True     # false: one shared encoder for all modalities
    csa: bool = True                # false: plain linear token projection
    cct: bool = True                # false: masked mean per modality, concatenate, MLP
    kl: bool = True                 # false: lambda_kl = 0
    text: bool = True               # false: pure vision (no text bank, no similarity head)


@dataclass(frozen=True)
class FinetuneData:
    cache_dir: str | None = None    # null = <study list folder>/.medmap_cache
    labels_per_class: int | None = None  # label-efficiency runs: this many labelled studies per class
    augment: dict[str, Any] | None = None  # medmap.data.augment (checked there); null = none
    stratified_batches: bool = False  # every training batch holds the classes in their proportions


@dataclass(frozen=True)
class FinetuneTraining(TrainingSection):
    optimizer: str = "adamw"
    encoder_lr_scale: float = 1.0   # lr factor of pre-trained encoders
    warmup_epochs: float = 0.0
    ckpt_every: int = 1             # epochs between checkpoints/last
    val_every: int = 1              # epochs between validations; the last epoch is always validated
    val_every_steps: int = 0        # > 0: also validate every N steps (finer model selection, time to accuracy)
    val_at_start: bool = False      # also validate before the first step (a joint head starts as the zero-shot classifier)
    eval_batch_size: int | None = None  # studies per forward pass in validation; null = 4 x batch_size
    ema_decay: float | None = None  # validate and keep (best) a moving average of the weights; null = as trained
    select_metric: str = "balanced_accuracy"  # model selection on the validation split only
    mode: str = "full"              # full | frozen_encoders | lp_ft | last_stages (medmap.models.freeze)
    lp_fraction: float = 0.5        # lp_ft: share of the steps with frozen encoders
    trainable_stages: int = 1       # last_stages: how many of each encoder's last stages train


@dataclass(frozen=True)
class FinetuneConfig:
    """A stage-2 (``medmap finetune``) run config."""

    organ: str | None = None        # organ config (built-in name or YAML path); required
    encoder: FinetuneEncoder = field(default_factory=FinetuneEncoder)
    model: ClassifierModelSection = field(default_factory=ClassifierModelSection)
    loss: FinetuneLossSection = field(default_factory=FinetuneLossSection)
    ablation: AblationSection = field(default_factory=AblationSection)
    data: FinetuneData = field(default_factory=FinetuneData)
    text: TextSection = field(default_factory=TextSection)
    training: FinetuneTraining = field(default_factory=FinetuneTraining)
    run: RunSection = field(default_factory=RunSection)


# ---------------------------------------------------------------- the demo
@dataclass(frozen=True)
class DemoSynth:
    organs: list[str] = field(default_factory=lambda: ["brain", "liver"])
    n: int | dict[str, int] = 100   # studies, or studies per organ
    config: str | None = None       # synth config name or path
    overrides: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class DemoEvaluate:
    split: str = "test"
    bootstrap: int = 1000


@dataclass(frozen=True)
class DemoStage:
    config: str = "default"         # a built-in run config name or a YAML path
    overrides: list[str] = field(default_factory=list)  # key=value, as with --set


@dataclass(frozen=True)
class DemoTask:
    pretrain: DemoStage = field(default_factory=DemoStage)
    finetune: DemoStage = field(default_factory=DemoStage)
    labels_per_class: int | None = None  # stage 2 and the baselines learn from this many labelled studies per class
                                    # (drawn with the seed); null = every training label. Stage 1 reads every report.
    cnn: dict[str, Any] | None = None  # the early-fusion CNN baseline on the same labels: {net: ..., training: ...}


@dataclass(frozen=True)
class DemoConfig:
    """``medmap demo``: data, then per task stage 1 and stage 2 (each a config name plus overrides)."""

    seed: int = 0
    synth: DemoSynth = field(default_factory=DemoSynth)
    tasks: dict[str, DemoTask] = field(default_factory=dict)
    evaluate: DemoEvaluate = field(default_factory=DemoEvaluate)


# ---------------------------------------------------------------- the supervised CNN baseline
@dataclass(frozen=True)
class CNNTraining:
    epochs: int = 10
    batch_size: int = 2
    lr: float = 1.0e-3
    weight_decay: float = 0.01
    warmup_epochs: float = 0.0
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0
    precision: str = "auto"
    select_metric: str = "balanced_accuracy"
    val_every_steps: int = 0        # > 0: also validate every N steps
    eval_batch_size: int | None = None  # studies per forward pass in validation and test; null = 4 x batch_size
    ema_decay: float | None = None  # as training.ema_decay of the fine-tuning configs
    seed: int = 0


@dataclass(frozen=True)
class CNNData:
    augment: dict[str, Any] | None = None
    labels_per_class: int | None = None
    stratified_batches: bool = False  # as data.stratified_batches of the fine-tuning configs


@dataclass(frozen=True)
class CNNRun:
    device: str = "auto"


@dataclass(frozen=True)
class CNNBaselineConfig:
    """The MONAI CNN baseline of an experiment grid (:func:`medmap.experiments.baselines.run_cnn_baseline`)."""

    organ: str | None = None
    net: dict[str, Any] = field(default_factory=lambda: {"name": "DenseNet121"})  # a MONAI network and its arguments
    training: CNNTraining = field(default_factory=CNNTraining)
    data: CNNData = field(default_factory=CNNData)
    run: CNNRun = field(default_factory=CNNRun)


RUN_CONFIG_TYPES: dict[str, type] = {"pretrain": PretrainConfig, "finetune": FinetuneConfig, "demo": DemoConfig,
                                     "cnn_baseline": CNNBaselineConfig}

#: Keys that are no longer read: the values older run folders saved are accepted (and dropped),
#: anything else is an error that says what to use instead.
RETIRED: dict[str, dict[tuple[str, str], tuple[tuple[Any, ...], str]]] = {"finetune": {
    ("encoder", "pretrained"): ((None,), "pass the stage-1 run to start from with --init RUN"),
    ("training", "optimizer"): (("adamw",), "the optimiser is always AdamW"),
}}
#: Keys that moved: read at their old place too (run folders saved before the move).
MOVED = {"pretrain": {("encoder", "modality_aware"): ("ablation", "modality_aware")}}


def eval_batch_size(training: FinetuneTraining | CNNTraining) -> int:
    """Studies per forward pass in validation: ``training.eval_batch_size``, or 4 x the training
    batch (no gradients are kept, so four times the studies fit in about the memory of one
    training batch, and the larger batch costs ~30 % less per study on a CPU).

    >>> eval_batch_size(FinetuneTraining(batch_size=8)), eval_batch_size(FinetuneTraining(eval_batch_size=5))
    (32, 5)
    """
    size = training.eval_batch_size if training.eval_batch_size is not None else 4 * training.batch_size
    if size < 1:
        raise ConfigError(f"config key 'training.eval_batch_size' must be at least 1, got {size}")
    return int(size)


def parse_run_config(cfg: Mapping[str, Any] | Any, kind: str) -> Any:
    """The typed run config of ``kind`` (``pretrain``, ``finetune`` or ``demo``) for ``cfg``.

    A typed config is returned as it is. Raises :class:`ConfigError` for the first unknown
    key or wrongly typed value.
    """
    cls = RUN_CONFIG_TYPES[kind]
    if isinstance(cfg, cls):
        return cfg
    return _section(cls, _with_current_names(cfg, kind), "")


def pretrain_config(cfg: Mapping[str, Any] | PretrainConfig) -> PretrainConfig:
    """:func:`parse_run_config` for stage 1."""
    return parse_run_config(cfg, "pretrain")


def finetune_config(cfg: Mapping[str, Any] | FinetuneConfig) -> FinetuneConfig:
    """:func:`parse_run_config` for stage 2."""
    return parse_run_config(cfg, "finetune")


def check_run_config(cfg: Mapping[str, Any], kind: str) -> None:
    """Raise :class:`ConfigError` for the first unknown key or wrongly typed value (other kinds: no check)."""
    if kind in RUN_CONFIG_TYPES:
        parse_run_config(cfg, kind)


def run_config_dict(cfg: Any) -> dict[str, Any]:
    """A typed run config as a plain mapping, every key filled in."""
    return dataclasses.asdict(cfg)


def _with_current_names(cfg: Mapping[str, Any], kind: str) -> dict[str, Any]:
    """``cfg`` with moved keys at their new place and retired keys (``None`` only) dropped."""
    out = dict(cfg)
    for (section, key), (new_section, new_key) in MOVED.get(kind, {}).items():
        sub = out.get(section)
        if isinstance(sub, Mapping) and key in sub:
            moved = dict(out.get(new_section) or {})
            if new_key in moved and moved[new_key] != sub[key]:
                raise ConfigError(f"config keys '{section}.{key}' (its old place) and '{new_section}.{new_key}' disagree")
            moved.setdefault(new_key, sub[key])
            out[section] = {k: v for k, v in sub.items() if k != key}
            out[new_section] = moved
    for (section, key), (accepted, instead) in RETIRED.get(kind, {}).items():
        sub = out.get(section)
        if isinstance(sub, Mapping) and key in sub:
            if sub[key] not in accepted:
                raise ConfigError(f"config key '{section}.{key}' is not read any more: {instead}")
            out[section] = {k: v for k, v in sub.items() if k != key}
    return out


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _section(cls: type[T], values: Mapping[str, Any], prefix: str) -> T:
    hints = _hints(cls)
    kwargs = {}
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if key not in hints:
            where = f"in '{prefix[:-1]}'" if prefix else "at the top level"
            raise ConfigError(f"unknown config key '{dotted}'; valid keys {where}: {', '.join(sorted(hints))}")
        kwargs[key] = _value(hints[key], value, dotted)
    return cls(**kwargs)


def _value(hint: Any, value: Any, dotted: str) -> Any:
    """``value`` converted to ``hint`` (a section, a union, a list, a mapping or a scalar)."""
    if dataclasses.is_dataclass(hint):
        if value is None:
            return hint()
        if not isinstance(value, Mapping):
            keys = ", ".join(sorted(_hints(hint)))
            raise ConfigError(f"config key '{dotted}' is a section ({keys}), got {value!r}")
        return _section(hint, value, dotted + ".")
    if typing.get_origin(hint) is dict and dataclasses.is_dataclass(typing.get_args(hint)[1]):
        if not isinstance(value, Mapping):
            raise ConfigError(f"config key '{dotted}' must be a mapping of sections, got {value!r}")
        return {str(k): _value(typing.get_args(hint)[1], v, f"{dotted}.{k}") for k, v in value.items()}
    if typing.get_origin(hint) in (Union, types.UnionType):
        return _union(typing.get_args(hint), value, dotted)
    converted = _convert(hint, value)
    if converted is _BAD:
        raise ConfigError(f"config key '{dotted}' must be {_describe(hint)}, got {value!r}")
    return converted


def _union(options: tuple[Any, ...], value: Any, dotted: str) -> Any:
    if value is None and type(None) in options:
        return None
    for option in options:
        if option is not type(None):
            converted = _convert(option, value)
            if converted is not _BAD:
                return converted
    described = " or ".join(_describe(o) for o in options)
    raise ConfigError(f"config key '{dotted}' must be {described}, got {value!r}")


_BAD = object()


def _convert(hint: Any, value: Any) -> Any:
    """``value`` as ``hint``, or ``_BAD`` (numbers: any int or float; an int field takes 2.0 as 2)."""
    origin = typing.get_origin(hint) or hint
    if hint is Any:
        return value
    if value is None or isinstance(value, bool) and hint is not bool:
        return _BAD
    if hint is bool:
        return value if isinstance(value, bool) else _BAD
    if hint is int:
        return int(value) if isinstance(value, (int, float)) and float(value).is_integer() else _BAD
    if hint is float:
        return float(value) if isinstance(value, (int, float)) else _BAD
    if hint is str:
        return value if isinstance(value, str) else _BAD
    if origin is Literal:
        return value if value in typing.get_args(hint) else _BAD
    if origin is list:
        if not isinstance(value, (list, tuple)):
            return _BAD
        (item,) = typing.get_args(hint) or (Any,)
        items = [_convert(item, v) for v in value]
        return _BAD if any(v is _BAD for v in items) else items
    if origin is dict:
        if not isinstance(value, Mapping):
            return _BAD
        _, item = typing.get_args(hint) or (str, Any)
        items = {str(k): _convert(item, v) for k, v in value.items()}
        return _BAD if any(v is _BAD for v in items.values()) else items
    raise TypeError(f"run_config: unsupported field type {hint!r}")  # a programming error, not user input


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint) or hint
    if origin is Literal:
        return " or ".join(repr(a) for a in typing.get_args(hint))
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", list: "a list",
             dict: "a mapping", type(None): "null"}
    return names.get(origin, str(hint))
