"""The experiment config of a grid: its rows, label regimes and checks.

A config (``medmap/configs/experiments/*.yaml``) names the tasks, the seeds, the data, the
shared stage-1 and stage-2 settings, the grid **rows**, optional label **regimes** and the
**claims** to measure (:mod:`medmap.experiments.claims`). Row kinds:

* ``medmap``: stage-2 fine-tuning with ``ablation`` switches (and optional ``set``
  overrides), initialised from the stage-1 run whose sharing matches
  ``ablation.modality_aware`` (none when ``ablation.pretrained`` is false);
* ``cnn``: a supervised 3D CNN on stacked modalities
  (:func:`medmap.experiments.baselines.run_cnn_baseline`);
* ``linear_probe``: the CLIP-style linear probe on a frozen stage-1 run (``pretrain:
  shared`` by default);
* ``intensity``: the intensity-statistics baseline;
* ``zero_shot``: stage 1's zero-shot classifier on the test split, no labels
  (:func:`medmap.engines.zeroshot.zero_shot_classify`; ``prompts`` names another prompt set);
* ``drop_modality``: the test evaluation of a finished ``source`` row with each listed
  modality removed in turn (one table row per modality).

A row with ``labels_per_class: N`` trains on N labelled studies per class of the train split
(drawn with the run's seed, the same studies for every method); ``curve: NAME`` groups such
rows into one line of the label-efficiency plot. A regime (:class:`Regime`) runs every row,
or the rows it lists, once more with its own label budget and stage-2 settings.
``pretrain: {seed: S}`` makes every seed start from the one stage-1 run of seed S;
``pretrain: {config: {task: name}}`` gives each task its own stage-1 run, and
``pretrain: {task_set: {task: {...}}}`` that run its own settings.
``pretrain: {run: PATH}`` (``{run: {task: PATH}}`` with per-task stage-1 runs; ``medmap
experiment --stage1 [TASK=]PATH``) takes a finished ``medmap pretrain`` run as the
modality-aware stage 1 of every seed instead of training one.

Example:
    >>> cfg = load_experiment_config("tiny")
    >>> [r.name for r in parse_rows(cfg)][:2]
    ['full', 'shared_encoder']
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from medmap.config import load_yaml, resolve_config_path
from medmap.errors import ConfigError

ROW_KINDS = ("medmap", "cnn", "linear_probe", "intensity", "zero_shot", "drop_modality")
TOP_KEYS = {"name", "description", "tasks", "seeds", "data", "organs", "encoder", "pretrain", "finetune", "evaluate",
            "run", "rows", "regimes", "claims"}
REGIME_KEYS = {"name", "label", "labels_per_class", "set", "task_set", "rows", "tasks"}
PRETRAIN_KEYS = {"config", "overrides", "set", "task_set", "seed", "run"}


@dataclass(frozen=True)
class Row:
    """One row of the grid (before expansion over tasks and seeds)."""

    name: str
    kind: str
    label: str
    seeds: tuple[int, ...]
    tasks: tuple[str, ...]
    options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def ablation(self) -> dict[str, bool]:
        return dict(self.options.get("ablation") or {})

    def pretrain_setting(self) -> str | None:
        """``aware`` / ``shared`` stage-1 run this row starts from, or ``None``."""
        if self.kind == "medmap":
            if not self.ablation.get("pretrained", True):
                return None
            return "aware" if self.ablation.get("modality_aware", True) else "shared"
        if self.kind == "zero_shot":
            return "aware"
        if self.kind == "linear_probe":
            setting = str(self.options.get("pretrain", "shared"))
            if setting not in ("aware", "shared"):
                raise ConfigError(f"row '{self.name}': pretrain must be 'aware' or 'shared', got {setting!r}")
            return setting
        return None


def load_experiment_config(name_or_path: str | Path) -> dict[str, Any]:
    """A built-in experiment config (``paper_grid``, ``tiny``) or a YAML path, checked."""
    cfg = load_yaml(resolve_config_path(name_or_path, "experiments"))
    unknown = set(cfg) - TOP_KEYS
    if unknown:
        raise ConfigError(f"experiment config: unknown keys {sorted(unknown)}; known: {sorted(TOP_KEYS)}")
    for key in ("tasks", "seeds", "rows"):
        if not cfg.get(key):
            raise ConfigError(f"experiment config: '{key}' must be a non-empty list")
    cfg.setdefault("name", Path(str(name_or_path)).stem)
    check_pretrain_section(cfg)
    from medmap.experiments.claims import parse_claims

    parse_regimes(cfg, parse_rows(cfg))  # validate early
    parse_claims(cfg.get("claims"))
    return cfg


def check_pretrain_section(cfg: Mapping[str, Any]) -> None:
    """The ``pretrain`` section's keys, and the form of ``pretrain.run`` (one path, or one per
    task when ``pretrain.config`` names a config per task)."""
    p = cfg.get("pretrain") or {}
    if not isinstance(p, Mapping):
        raise ConfigError(f"experiment config: 'pretrain' must be a mapping, got {p!r}")
    unknown = set(p) - PRETRAIN_KEYS
    if unknown:
        raise ConfigError(f"experiment config: unknown pretrain keys {sorted(unknown)}; known: {sorted(PRETRAIN_KEYS)}")
    run = p.get("run")
    if run is None or isinstance(run, (str, Path)):
        return
    if not isinstance(run, Mapping) or not isinstance(p.get("config"), Mapping):
        raise ConfigError("experiment config: 'pretrain.run' must be a path, or a mapping task -> path when "
                          f"'pretrain.config' names a config per task; got {run!r}")
    strays = set(run) - {str(t) for t in cfg.get("tasks") or []}
    if strays:
        raise ConfigError(f"experiment config: 'pretrain.run' names {sorted(strays)}, not tasks of this grid")


def parse_rows(cfg: Mapping[str, Any], seeds: Sequence[int] | None = None) -> list[Row]:
    """The config's rows; ``seeds`` (from ``--seeds``) replaces every row's seed list."""
    tasks = tuple(str(t) for t in cfg["tasks"])
    rows: list[Row] = []
    names: set[str] = set()
    for i, raw in enumerate(cfg["rows"]):
        if not isinstance(raw, Mapping) or "name" not in raw:
            raise ConfigError(f"experiment config: rows[{i}] must be a mapping with a 'name'")
        name, kind = str(raw["name"]), str(raw.get("kind", "medmap"))
        if kind not in ROW_KINDS:
            raise ConfigError(f"row '{name}': kind must be one of {list(ROW_KINDS)}, got {kind!r}")
        if name in names:
            raise ConfigError(f"experiment config: two rows are named '{name}'")
        names.add(name)
        row_tasks = tuple(str(t) for t in raw.get("tasks") or tasks)
        bad = [t for t in row_tasks if t not in tasks]
        if bad:
            raise ConfigError(f"row '{name}': tasks {bad} are not in the experiment's tasks {list(tasks)}")
        row_seeds = tuple(int(s) for s in (seeds if seeds else raw.get("seeds") or cfg["seeds"]))
        options = {k: v for k, v in raw.items() if k not in ("name", "kind", "label", "seeds", "tasks")}
        if kind == "medmap":
            from medmap.models.medmap import ablation_switches

            ablation_switches({"ablation": options.get("ablation") or {}})  # validates the switch names
        rows.append(Row(name, kind, str(raw.get("label") or name), row_seeds, row_tasks, options))
    for r in rows:
        if r.kind == "drop_modality":
            src = next((x for x in rows if x.name == r.options.get("source")), None)
            if src is None or src.kind != "medmap":
                raise ConfigError(f"row '{r.name}': 'source' must name a medmap row, got {r.options.get('source')!r}")
    return rows


@dataclass(frozen=True)
class Regime:
    """A label regime of the grid: every row (or the listed ``rows``) runs once per regime.

    ``name`` is ``""`` for a config without ``regimes`` (runs then sit directly under
    ``runs/<task>/<row>``). ``labels_per_class`` restricts every row's training studies (a
    row's own ``labels_per_class`` wins); ``set`` / ``task_set`` are stage-2 settings of the
    regime (e.g. more epochs for few labels), merged after the grid's and before the row's.
    """

    name: str
    label: str = ""
    labels_per_class: int | None = None
    set: Mapping[str, Any] = field(default_factory=dict)
    task_set: Mapping[str, Any] = field(default_factory=dict)
    rows: tuple[str, ...] | None = None
    tasks: tuple[str, ...] | None = None

    def has(self, row: "Row", task: str | None = None) -> bool:
        """Whether ``row`` (on ``task``) runs in this regime."""
        in_task = task is None or self.tasks is None or task in self.tasks
        return in_task and (self.rows is None or row.name in self.rows)


def parse_regimes(cfg: Mapping[str, Any], rows: Sequence[Row]) -> list[Regime]:
    """The config's label regimes (one unnamed regime when it has none), checked."""
    raw = cfg.get("regimes")
    if raw is None:
        return [Regime("")]
    if not isinstance(raw, list) or not raw:
        raise ConfigError("experiment config: 'regimes' must be a non-empty list")
    names = {r.name for r in rows}
    out: list[Regime] = []
    for i, r in enumerate(raw):
        if not isinstance(r, Mapping) or not r.get("name"):
            raise ConfigError(f"experiment config: regimes[{i}] must be a mapping with a 'name'")
        unknown = set(r) - REGIME_KEYS
        if unknown:
            raise ConfigError(f"regime '{r['name']}': unknown keys {sorted(unknown)}; known: {sorted(REGIME_KEYS)}")
        listed = r.get("rows")
        bad = [n for n in listed or [] if n not in names]
        if bad:
            raise ConfigError(f"regime '{r['name']}': rows {bad} are not rows of the grid")
        per_class, tasks = r.get("labels_per_class"), r.get("tasks")
        out.append(Regime(str(r["name"]), str(r.get("label") or r["name"]), None if per_class is None else int(per_class),
                          dict(r.get("set") or {}), dict(r.get("task_set") or {}),
                          None if listed is None else tuple(str(n) for n in listed),
                          None if tasks is None else tuple(str(t) for t in tasks)))
    if len({r.name for r in out}) != len(out):
        raise ConfigError("experiment config: two regimes have the same name")
    return out
