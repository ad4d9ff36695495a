"""Reject misspelt keys and wrongly typed values in run configs, before anything runs.

The valid keys of a run-config kind (``pretrain``, ``finetune``, ``demo``) are those of its
built-in configs together: every key the engines read is written, with its default and a
comment, in at least one shipped YAML file, so the shipped files are the schema. A value
must have the type the shipped files give that key (any number for a number; anything where
a shipped file has ``null``). A few sections are free-form and checked where they are used
(``encoder.arch``, ``data.augment``, ``loss.modality_weights``).

Example:
    >>> check_run_config({"training": {"epoch": 5}}, "finetune")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    medmap.errors.ConfigError: unknown config key 'training.epoch'; valid keys in 'training': ...
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

from medmap.errors import ConfigError

#: Kinds whose configs are checked (experiment grids and synth configs have their own checks).
CHECKED_KINDS = ("pretrain", "finetune", "demo")
#: Dotted keys whose values are free-form mappings or names, checked by their users.
FREE_FORM = ("encoder.arch", "data.augment", "loss.modality_weights", "organ", "synth.n", "tasks")
_ANY = object()
#: Keys that are no longer read: ``None`` (as saved in older run folders) is accepted, anything
#: else is an error that says what to use instead.
RETIRED = {"finetune": {("encoder", "pretrained"): "pass the stage-1 run to start from with --init RUN"}}
#: Keys that moved: read at their old place too (run folders saved before the move), checked at the new one.
MOVED = {"pretrain": {("encoder", "modality_aware"): ("ablation", "modality_aware")}}


@functools.lru_cache(maxsize=None)
def _schema(kind: str) -> dict[str, Any]:
    from medmap.config import CONFIG_ROOT, builtin_names, load_yaml

    schema: dict[str, Any] = {}
    for name in builtin_names(kind):
        _merge_schema(schema, load_yaml(CONFIG_ROOT / kind / f"{name}.yaml"), "")
    return schema


def _kind_of(value: Any) -> Any:
    if value is None:
        return _ANY
    if isinstance(value, bool):
        return bool
    if isinstance(value, (int, float)):
        return float
    if isinstance(value, (list, tuple)):
        return list
    return type(value)


def _merge_schema(schema: dict[str, Any], cfg: Mapping[str, Any], prefix: str) -> None:
    for key, value in cfg.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and dotted not in FREE_FORM:
            sub = schema.setdefault(key, {})
            if isinstance(sub, dict):
                _merge_schema(sub, value, dotted + ".")
            continue
        seen = schema.get(key)
        kind = _ANY if dotted in FREE_FORM else _kind_of(value)
        if seen is None:
            schema[key] = kind
        elif seen is not kind:
            schema[key] = _ANY  # two shipped files disagree (e.g. null and a number): anything goes


def check_run_config(cfg: Mapping[str, Any], kind: str) -> None:
    """Raise :class:`ConfigError` for the first unknown key or wrongly typed value in ``cfg``."""
    if kind not in CHECKED_KINDS:
        return
    cfg = _with_current_names(cfg, kind)
    _check(cfg, _schema(kind), "")


def _with_current_names(cfg: Mapping[str, Any], kind: str) -> Mapping[str, Any]:
    """``cfg`` as checked: moved keys at their new place, retired keys (``None`` only) dropped."""
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
    for (section, key), instead in RETIRED.get(kind, {}).items():
        sub = out.get(section)
        if isinstance(sub, Mapping) and key in sub:
            if sub[key] is not None:
                raise ConfigError(f"config key '{section}.{key}' is not read any more: {instead}")
            out[section] = {k: v for k, v in sub.items() if k != key}
    return out


def _check(cfg: Mapping[str, Any], schema: Mapping[str, Any], prefix: str) -> None:
    for key, value in cfg.items():
        dotted = f"{prefix}{key}"
        if key not in schema:
            where = f"in '{prefix[:-1]}'" if prefix else "at the top level"
            raise ConfigError(f"unknown config key '{dotted}'; valid keys {where}: {', '.join(sorted(schema))}")
        expected = schema[key]
        if isinstance(expected, dict):
            if value is None:
                continue
            if not isinstance(value, Mapping):
                raise ConfigError(f"config key '{dotted}' is a section ({', '.join(sorted(expected))}), got {value!r}")
            _check(value, expected, dotted + ".")
        elif expected is not _ANY and value is not None and _kind_of(value) is not expected:
            want = {float: "a number", bool: "true or false", str: "a string", list: "a list"}.get(expected, str(expected))
            raise ConfigError(f"config key '{dotted}' must be {want}, got {value!r}")
