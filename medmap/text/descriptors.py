"""Class descriptors: what each class looks like, per sequence, and how a report names it.

A *prompt set* is a YAML file (built in: ``medmap/configs/prompts/<name>.yaml``; or a user's
own, by path) with, for every class of an organ:

* ``study``: impression-style sentences that name the diagnosis ("hepatocellular
  carcinoma"); scored against the study embedding (stage 1's impression alignment);
* ``negative`` (optional): the negated forms ("no hepatocellular carcinoma"); a class's
  score is then its positive minus its negative similarity, as in CheXzero;
* ``sequences``: per sequence, findings-style descriptors of the class's appearance on that
  sequence ("non-rim arterial phase hyperenhancement"); each is scored only against its own
  sequence's embedding (the findings alignment of stage 1);
* ``sources``: the keys of the top-level ``sources`` that each class's wording is taken from.

Several sentences per slot are a prompt ensemble (the mean of their normalised embeddings).
The same file is the stage-2 text bank (``text.prompts``) and the zero-shot classifier
(``medmap zeroshot --prompts FILE``).

Example:
    >>> ps = load_prompt_set("liver")
    >>> ps.classes["hcc"].study[0]
    'hepatocellular carcinoma'
    >>> sorted(ps.classes["cyst"].sequences)[:2]
    ['arterial', 'delay']
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from medmap.config import OrganConfig, load_yaml, resolve_config_path
from medmap.errors import ConfigError

TOP_KEYS = ("organ", "sources", "classes")
CLASS_KEYS = ("sources", "study", "negative", "sequences")


@dataclass(frozen=True)
class ClassDescriptors:
    """One class's prompts: impression-style, negated, and per-sequence findings-style."""

    study: list[str]
    negative: list[str] = field(default_factory=list)
    sequences: dict[str, list[str]] = field(default_factory=dict)
    sources: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class PromptSet:
    """A prompt set read from ``path`` (see the module docstring)."""

    organ: str
    classes: dict[str, ClassDescriptors]
    sources: dict[str, str]
    path: str

    def check_organ(self, organ: OrganConfig) -> None:
        """Raise :class:`ConfigError` unless every class of ``organ`` has prompts here and every
        sequence named here is one of the organ's modalities."""
        where = f"prompt set {self.path}"
        missing = [c for c in organ.classes if c not in self.classes]
        extra = [c for c in self.classes if c not in organ.classes]
        if missing or extra:
            raise ConfigError(f"{where}: classes must be those of organ '{organ.name}' ({', '.join(organ.classes)}); "
                              + (f"missing {missing}" if missing else f"unknown {extra}"))
        for c, d in self.classes.items():
            unknown = [m for m in d.sequences if m not in organ.modalities]
            if unknown:
                raise ConfigError(f"{where}: class '{c}' has descriptors for unknown sequences {unknown} "
                                  f"(organ '{organ.name}' has {', '.join(organ.modalities)})")

    def has_negatives(self) -> bool:
        return all(d.negative for d in self.classes.values())

    def sequences_described(self, modalities: list[str]) -> list[str]:
        """The sequences for which *every* class has descriptors (only those are scored)."""
        return [m for m in modalities if all(d.sequences.get(m) for d in self.classes.values())]


def load_prompt_set(name_or_path: str | Path) -> PromptSet:
    """Read and check a prompt set: a built-in name (``liver``, ``brain``) or a YAML path.

    Raises:
        ConfigError: one line naming the file and the first problem (unknown key, empty
            slot, a class's source not among ``sources``, not a list of strings).
    """
    path = resolve_config_path(name_or_path, "prompts")
    spec = load_yaml(path)
    where = f"prompt set {path}"
    unknown = sorted(set(spec) - set(TOP_KEYS))
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown}; valid: {', '.join(TOP_KEYS)}")
    sources = spec.get("sources") or {}
    if not isinstance(sources, Mapping) or not all(isinstance(v, str) for v in sources.values()):
        raise ConfigError(f"{where}: 'sources' must map a short name to a citation")
    raw_classes = spec.get("classes")
    if not isinstance(raw_classes, Mapping) or not raw_classes:
        raise ConfigError(f"{where}: 'classes' must map each class name to its prompts")
    classes = {str(c): _class_descriptors(v, f"{where}: class '{c}'", sources) for c, v in raw_classes.items()}
    return PromptSet(organ=str(spec.get("organ", "")), classes=classes, sources={str(k): v for k, v in sources.items()},
                     path=str(path))


def _class_descriptors(spec: Any, where: str, sources: Mapping[str, str]) -> ClassDescriptors:
    if not isinstance(spec, Mapping):
        raise ConfigError(f"{where} must be a mapping with keys {', '.join(CLASS_KEYS)}")
    unknown = sorted(set(spec) - set(CLASS_KEYS))
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown}; valid: {', '.join(CLASS_KEYS)}")
    study = _texts(spec.get("study"), f"{where}: 'study'", required=True)
    negative = _texts(spec.get("negative"), f"{where}: 'negative'", required=False)
    seqs = spec.get("sequences") or {}
    if not isinstance(seqs, Mapping):
        raise ConfigError(f"{where}: 'sequences' must map a sequence name to a list of descriptors")
    sequences = {str(m): _texts(v, f"{where}: sequence '{m}'", required=True) for m, v in seqs.items()}
    cited = _texts(spec.get("sources"), f"{where}: 'sources'", required=False)
    uncited = [s for s in cited if s not in sources]
    if uncited:
        raise ConfigError(f"{where}: sources {uncited} are not among the file's 'sources' ({', '.join(sources) or 'none'})")
    return ClassDescriptors(study=study, negative=negative, sequences=sequences, sources=cited)


def _texts(value: Any, where: str, required: bool) -> list[str]:
    if value is None and not required:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value) or (required and not value):
        raise ConfigError(f"{where} must be a {'non-empty ' if required else ''}list of non-empty strings, got {value!r}")
    return [v.strip() for v in value]


__all__ = ["ClassDescriptors", "PromptSet", "load_prompt_set"]
