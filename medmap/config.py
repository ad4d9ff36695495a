"""Configuration files: organ (task) configs and run configs, stored as YAML data.

Organ configs live in ``medmap/configs/organs/<name>.yaml``; a user adds an organ by
writing one more file (or passing a path). Run configs (pre-training, fine-tuning,
synthetic data, encoder architectures) are plain nested dictionaries loaded from YAML,
with ``key.sub=value`` overrides from the command line.

Example:
    >>> from medmap.config import load_organ_config
    >>> cfg = load_organ_config("brain")
    >>> cfg.modalities
    ['t1', 't1ce', 't2', 'flair']
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from medmap.errors import ConfigError

CONFIG_ROOT = Path(str(resources.files("medmap") / "configs"))


#: Field-of-view crops of preprocessing (``OrganConfig.crop``).
CROPS = ("foreground", "roi_mask", "lesion_box", "patch")
#: Crops that cut each modality around a lesion (each modality may have its own grid).
LESION_CROPS = ("lesion_box", "patch")
#: Normalisations of lesion patches (``OrganConfig.patch_norm``); see medmap.data.lesion.
PATCH_NORMS = ("context", "zscore")


@dataclass(frozen=True)
class OrganConfig:
    """Everything the data layer and the models need to know about one organ (task).

    Attributes:
        name: task name, e.g. ``"brain"``.
        modalities: the modality vocabulary, in the fixed order used for tensors.
        classes: class names, in the order of label indices.
        spacing: target voxel spacing in millimetres (RAS x, y, z).
        roi_size: model input size in voxels after crop and pad/resize.
        class_prompts: one or more text prompts per class (stage-2 text bank, zero-shot),
            used when no ``prompts`` set is named.
        modality_descriptors: one short text per modality.
        min_modalities: a study with fewer present modalities is rejected.
        description: free text.
        crop: how preprocessing picks the field of view before padding to ``roi_size``:
            ``foreground`` (the body, found by intensity; the default), ``roi_mask`` (the
            bounding box of each study's ``roi_mask``, e.g. a liver segmentation, so that a
            small organ fills the input instead of a few percent of it), ``lesion_box``
            (each modality cut around its own ``lesion_box`` plus ``margin_mm`` and resampled
            to ``roi_size``; modalities may lie on different grids; ``spacing`` is unused) or
            ``patch`` (each file is already a lesion patch, resampled whole to ``roi_size``).
        margin_mm: lesion crops only: context kept around the box on each side (RAS x, y, z);
            for ``patch``, the width of the file's outer shell that is context.
        patch_norm: lesion crops only: ``context`` (divide by the median of the tissue around
            the box, minus 1) or ``zscore`` (robust z-score over the patch).
        prompts: a prompt set (built-in name under ``configs/prompts/`` or a YAML path;
            :mod:`medmap.text.descriptors`): impression-style, negated and per-sequence
            descriptors of every class, which replace ``class_prompts``.
        zero_outside_roi: with ``crop: roi_mask`` only: z-score each volume over the ROI mask
            instead of the body and set every voxel outside the mask to 0, so the encoder sees
            the organ and nothing around it.
    """

    name: str
    modalities: list[str]
    classes: list[str]
    spacing: tuple[float, float, float]
    roi_size: tuple[int, int, int]
    class_prompts: dict[str, list[str]] = field(default_factory=dict)
    modality_descriptors: dict[str, str] = field(default_factory=dict)
    min_modalities: int = 1
    description: str = ""
    crop: str = "foreground"
    zero_outside_roi: bool = False
    margin_mm: tuple[float, float, float] = (10.0, 10.0, 10.0)
    patch_norm: str = "context"
    prompts: str | None = None

    def __post_init__(self) -> None:
        where = f"organ config '{self.name}'"
        if not self.modalities:
            raise ConfigError(f"{where}: 'modalities' must list at least one modality")
        if len(set(self.modalities)) != len(self.modalities):
            raise ConfigError(f"{where}: duplicate modality names in {self.modalities}")
        if len(self.classes) < 2:
            raise ConfigError(f"{where}: 'classes' must list at least two classes")
        if len(set(self.classes)) != len(self.classes):
            raise ConfigError(f"{where}: duplicate class names in {self.classes}")
        if len(self.spacing) != 3 or any(float(s) <= 0 for s in self.spacing):
            raise ConfigError(f"{where}: 'spacing' must be three positive numbers, got {self.spacing}")
        if len(self.roi_size) != 3 or any(int(s) <= 0 for s in self.roi_size):
            raise ConfigError(f"{where}: 'roi_size' must be three positive integers, got {self.roi_size}")
        unknown = set(self.class_prompts) - set(self.classes)
        if unknown:
            raise ConfigError(f"{where}: class_prompts for unknown classes {sorted(unknown)}")
        unknown = set(self.modality_descriptors) - set(self.modalities)
        if unknown:
            raise ConfigError(f"{where}: modality_descriptors for unknown modalities {sorted(unknown)}")
        if not 1 <= self.min_modalities <= len(self.modalities):
            raise ConfigError(f"{where}: min_modalities must be between 1 and {len(self.modalities)}")
        reserved = {"roi_mask", "foreground"} & set(self.modalities)
        if reserved:
            raise ConfigError(f"{where}: {sorted(reserved)} cannot name a modality (preprocessing uses them)")
        if self.crop not in CROPS:
            raise ConfigError(f"{where}: 'crop' must be one of {', '.join(CROPS)}, got {self.crop!r}")
        if not isinstance(self.zero_outside_roi, bool):
            raise ConfigError(f"{where}: 'zero_outside_roi' must be true or false, got {self.zero_outside_roi!r}")
        if self.zero_outside_roi and self.crop != "roi_mask":
            raise ConfigError(f"{where}: 'zero_outside_roi: true' needs 'crop: roi_mask' (it masks with the study's roi_mask)")
        if len(self.margin_mm) != 3 or any(float(m) < 0 for m in self.margin_mm):
            raise ConfigError(f"{where}: 'margin_mm' must be three non-negative numbers, got {list(self.margin_mm)}")
        if self.patch_norm not in PATCH_NORMS:
            raise ConfigError(f"{where}: 'patch_norm' must be one of {', '.join(PATCH_NORMS)}, got {self.patch_norm!r}")

    @property
    def lesion_level(self) -> bool:
        """True when preprocessing cuts each modality around a lesion (``crop: lesion_box`` or ``patch``)."""
        return self.crop in LESION_CROPS

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def prompts_for(self, cls: str) -> list[str]:
        """Class prompts, falling back to a generic sentence when none are configured."""
        return list(self.class_prompts.get(cls) or [f"{self.name} MRI showing {cls}"])

    def descriptor_for(self, modality: str) -> str:
        return self.modality_descriptors.get(modality) or f"{modality} {self.name} MRI"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["spacing"] = list(self.spacing)
        d["roi_size"] = list(self.roi_size)
        d["margin_mm"] = list(self.margin_mm)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "OrganConfig":
        required = ("name", "modalities", "classes", "spacing", "roi_size")
        missing = [k for k in required if k not in d]
        if missing:
            raise ConfigError(f"organ config is missing keys {missing}")
        known = {f for f in cls.__dataclass_fields__}
        extra = set(d) - known
        if extra:
            raise ConfigError(f"organ config '{d.get('name')}' has unknown keys {sorted(extra)}")
        return cls(
            name=str(d["name"]),
            modalities=[str(m) for m in d["modalities"]],
            classes=[str(c) for c in d["classes"]],
            spacing=tuple(float(s) for s in d["spacing"]),  # type: ignore[arg-type]
            roi_size=tuple(int(s) for s in d["roi_size"]),  # type: ignore[arg-type]
            class_prompts={str(k): [str(p) for p in v] for k, v in (d.get("class_prompts") or {}).items()},
            modality_descriptors={str(k): str(v) for k, v in (d.get("modality_descriptors") or {}).items()},
            min_modalities=int(d.get("min_modalities", 1)),
            description=str(d.get("description", "")),
            crop=str(d.get("crop", "foreground")),
            zero_outside_roi=d.get("zero_outside_roi", False),
            margin_mm=_three_floats(d.get("margin_mm", (10.0, 10.0, 10.0)), d.get("name"), "margin_mm"),
            patch_norm=str(d.get("patch_norm", "context")),
            prompts=None if d.get("prompts") is None else str(d["prompts"]),
        )


def _three_floats(value: Any, name: Any, key: str) -> tuple[float, float, float]:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"organ config '{name}': '{key}' must be three numbers, got {value!r}") from None
    if len(out) != 3:
        raise ConfigError(f"organ config '{name}': '{key}' must be three numbers, got {value!r}")
    return out  # type: ignore[return-value]


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with a clear error for a missing or malformed file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from e
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must contain a mapping at the top level")
    return data


def builtin_names(kind: str) -> list[str]:
    """Names of the built-in configs of one kind (``organs``, ``encoders``, ...)."""
    return sorted(p.stem for p in (CONFIG_ROOT / kind).glob("*.yaml"))


def resolve_config_path(name_or_path: str | Path, kind: str) -> Path:
    """A path to an existing YAML file, or the built-in config of that name."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        return p
    builtin = CONFIG_ROOT / kind / f"{name_or_path}.yaml"
    if builtin.is_file():
        return builtin
    raise ConfigError(
        f"unknown {kind[:-1] if kind.endswith('s') else kind} config '{name_or_path}'; "
        f"built-in: {', '.join(builtin_names(kind)) or 'none'}, or give a path to a YAML file"
    )


def load_organ_config(name_or_path: str | Path | OrganConfig) -> OrganConfig:
    """Load a built-in organ config by name (``brain``, ``liver``) or a YAML file by path.

    A config with a ``base`` key (a built-in name or a path) is that organ config with the
    other keys replaced, e.g. ``brain_4mm.yaml``: ``{base: brain, spacing: [4, 4, 4], roi_size: [40, 48, 40]}``.
    """
    if isinstance(name_or_path, OrganConfig):
        return name_or_path
    return organ_config_from(load_yaml(resolve_config_path(name_or_path, "organs")))


def organ_config_from(spec: dict[str, Any], _depth: int = 0) -> OrganConfig:
    """An organ config from a mapping; ``spec["base"]`` (if any) is loaded first and updated."""
    spec = dict(spec)
    base = spec.pop("base", None)
    if base is None:
        return OrganConfig.from_dict(spec)
    if _depth > 8:
        raise ConfigError(f"organ config: 'base' chain too long (a cycle?) at '{base}'")
    merged = organ_config_from(load_yaml(resolve_config_path(base, "organs")), _depth + 1).to_dict()
    merged.update(spec)
    return OrganConfig.from_dict(merged)


def load_config(name_or_path: str | Path, kind: str, overrides: list[str] | None = None) -> dict[str, Any]:
    """Load a run config (built-in name or path) and apply ``a.b=value`` overrides.

    A config with a ``base`` key (a built-in name, or a path, relative to the file that
    names it) is that config with the given keys replaced, section by section, so a user's
    file holds only what it changes::

        base: liver              # medmap/configs/finetune/liver.yaml
        training: {epochs: 20}   # every other key as in the base
    """
    from medmap.run_config import check_run_config

    cfg = apply_overrides(run_config_from(resolve_config_path(name_or_path, kind), kind), overrides or [])
    check_run_config(cfg, kind)
    return cfg


def run_config_from(path: Path, kind: str, _depth: int = 0) -> dict[str, Any]:
    """The run config in ``path`` with its ``base`` chain merged in (see :func:`load_config`)."""
    spec = load_yaml(path)
    base = spec.pop("base", None)
    if base is None:
        return spec
    if _depth > 8:
        raise ConfigError(f"{path}: 'base' chain too long (a cycle?) at '{base}'")
    near = path.parent / str(base)
    base_path = near if near.suffix in (".yaml", ".yml") and near.is_file() else resolve_config_path(base, kind)
    return deep_merge(run_config_from(base_path, kind, _depth + 1), spec)


def apply_overrides(cfg: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``cfg`` with dotted ``key.sub=value`` overrides (values parsed as YAML).

    Example:
        >>> apply_overrides({"optim": {"lr": 1e-3}}, ["optim.lr=5e-4"])
        {'optim': {'lr': 0.0005}}
    """
    out = copy.deepcopy(cfg)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key.sub=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ConfigError(f"override '{item}': the value is not valid YAML ({str(e).splitlines()[0]})") from e
        if isinstance(value, str):
            try:  # YAML 1.1 reads 1e-3 (no dot) as a string; on the command line it means a number
                value = float(value) if value.strip().lower() not in ("nan", "inf", "-inf", "infinity") else value
            except ValueError:
                pass
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"override '{item}': '{part}' is not a section")
            node = nxt
        node[parts[-1]] = value
    return out


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursively merge ``update`` into a copy of ``base``."""
    out = copy.deepcopy(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def resolve_run_config(
    name_or_path: str | Path, kind: str, overrides: list[str], run_dir: str | Path, resume: bool
) -> dict[str, Any]:
    """The config of a training command: on ``--resume`` the run's own saved ``config.yaml``
    (overrides may then only change the volatile ``run.*`` keys, checked on load), otherwise
    the named / given config with ``overrides`` applied."""
    saved = Path(run_dir) / "config.yaml"
    if resume and not saved.is_file():
        raise ConfigError(f"--resume: {run_dir} holds no run (no config.yaml); leave out --resume to start one there")
    if resume:  # the engines check the keys on entry
        return apply_overrides(load_yaml(saved), overrides)
    return load_config(name_or_path, kind, overrides)

