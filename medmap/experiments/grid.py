"""Run a grid of MedMAP ablations and baselines from one config file, resumably.

``medmap experiment CONFIG --out DIR`` calls :func:`run_grid`. The config
(``medmap/configs/experiments/*.yaml``) names the tasks, the seeds, the data, the shared
stage-1 and stage-2 settings and the grid **rows**. Row kinds:

* ``medmap``: stage-2 fine-tuning with ``ablation`` switches (and optional ``set``
  overrides), initialised from the stage-1 run of the same seed whose sharing matches
  ``ablation.modality_aware`` (none when ``ablation.pretrained`` is false);
* ``cnn``: the supervised MONAI 3D CNN on stacked modalities
  (:func:`medmap.experiments.baselines.run_cnn_baseline`);
* ``linear_probe``: the CLIP-style linear probe on a frozen stage-1 run (``pretrain:
  shared`` by default);
* ``intensity``: the intensity-statistics baseline (MedMoM-Synth only);
* ``drop_modality``: the test evaluation of a finished ``source`` row with each listed
  modality removed in turn (one table row per modality).

A ``medmap`` or ``cnn`` row with ``labels_per_class: N`` trains on N labelled studies per
class of the train split (drawn with the run's seed, the same studies for every method);
``curve: NAME`` groups such rows into one line of the label-efficiency plot
(:func:`medmap.evaluation.plots.label_efficiency_plot`). ``pretrain: {seed: S}`` makes every
seed start from the one stage-1 run of seed S.

Layout of ``DIR`` (everything a later invocation needs to skip finished work)::

    DIR/experiment.yaml                         the resolved experiment config
    DIR/data/studies.jsonl                      MedMoM-Synth, generated once (data seed)
    DIR/organs/<task>.yaml                      organ configs with the grid's sizes
    DIR/pretrain/{aware,shared}_seed<s>/        stage-1 runs, shared by every row that uses them
    DIR/runs/<task>/<row>/seed<s>/              one run; finished = metrics/test/metrics.json
    DIR/results.md  results.csv  runs.csv       the tables (see medmap.experiments.table)
    DIR/timings.csv                             wall time of every job (to size a grid)

Each run is selected on the validation split; the test split is only predicted.
"""

from __future__ import annotations

import copy
import csv
import os
import socket
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import yaml

from medmap.config import (OrganConfig, apply_overrides, deep_merge, load_config, load_yaml, organ_config_from,
                           resolve_config_path)
from medmap.errors import ConfigError, MedMAPError
from medmap.experiments.table import RunResult, write_tables
from medmap.utils import atomic_write_json, atomic_write_text

ROW_KINDS = ("medmap", "cnn", "linear_probe", "intensity", "drop_modality")
PRETRAIN_DONE = "pretrain_done.json"
TOP_KEYS = {"name", "description", "tasks", "seeds", "data", "organs", "encoder", "pretrain", "finetune", "evaluate",
            "run", "rows", "regimes", "claims"}
REGIME_KEYS = {"name", "label", "labels_per_class", "set", "task_set", "rows", "tasks"}


# --------------------------------------------------------------------------- config
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
    from medmap.experiments.claims import parse_claims

    parse_regimes(cfg, parse_rows(cfg))  # validate early
    parse_claims(cfg.get("claims"))
    return cfg


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


# --------------------------------------------------------------------------- jobs
@dataclass
class Job:
    """One unit of work of the grid: done when ``done()`` is true."""

    key: str
    describe: str
    done: Callable[[], bool]
    run: Callable[[], Any]
    needs: tuple[str, ...] = ()
    result: Callable[[], RunResult | None] | None = None


class ExperimentGrid:
    """The planned grid: paths, resolved run configs and the job list.

    Args:
        cfg: experiment config (:func:`load_experiment_config`).
        out: output folder.
        seeds: replaces every row's seeds (``--seeds``).
        only: restrict the jobs to these rows (entry names, or expanded ``drop_modality`` names).
    """

    def __init__(self, cfg: Mapping[str, Any], out: str | Path, seeds: Sequence[int] | None = None,
                 only: Sequence[str] | None = None) -> None:
        self.cfg = copy.deepcopy(dict(cfg))
        self.out = Path(out)
        self.rows = parse_rows(self.cfg, seeds)
        self.regimes = parse_regimes(self.cfg, self.rows)
        self.tasks = [str(t) for t in self.cfg["tasks"]]
        self.only = set(only or [])
        known = {r.name for r in self.rows} | {n for r in self.rows for n in self._drop_names(r)}
        unknown = self.only - known
        if unknown:
            raise ConfigError(f"--only {sorted(unknown)}: no such rows; rows: {', '.join(r.name for r in self.rows)}")
        self.n_bootstrap = int((self.cfg.get("evaluate") or {}).get("n_bootstrap", 1000))
        self.device = str((self.cfg.get("run") or {}).get("device", "auto"))
        self.progress = bool((self.cfg.get("run") or {}).get("progress", False))
        threads = (self.cfg.get("run") or {}).get("threads")
        self.threads = int(threads) if threads else None

    # ---------------------------------------------------------------- paths
    @property
    def study_list(self) -> Path:
        given = (self.cfg.get("data") or {}).get("study_list")
        return Path(given) if given else self.out / "data" / "studies.jsonl"

    def organ_path(self, task: str) -> Path:
        return self.out / "organs" / f"{task}.yaml"

    @property
    def pretrain_per_task(self) -> bool:
        """One stage-1 run per task (``pretrain.config`` maps tasks to configs) or one for all tasks."""
        return isinstance((self.cfg.get("pretrain") or {}).get("config"), Mapping)

    def pretrain_scope(self, task: str) -> str:
        """The stage-1 run of ``task``: ``""`` (one run on every task) or the task's name."""
        return task if self.pretrain_per_task else ""

    def pretrain_dir(self, setting: str, seed: int, scope: str = "") -> Path:
        return self.out / "pretrain" / scope / f"{setting}_seed{seed}"

    def pretrain_seed(self, seed: int) -> int:
        """The stage-1 run a fine-tuning seed starts from: its own seed, or ``pretrain.seed`` when
        the grid shares one stage-1 run among all seeds (the spread then covers stage 2 only)."""
        shared = (self.cfg.get("pretrain") or {}).get("seed")
        return int(seed) if shared is None else int(shared)

    def run_dir(self, task: str, row: str, seed: int, regime: str = "") -> Path:
        return self.out / "runs" / task / regime / row / f"seed{seed}"

    def regime(self, name: str) -> Regime:
        return next(r for r in self.regimes if r.name == name)

    # ---------------------------------------------------------------- organs and configs
    def organ_config(self, task: str) -> OrganConfig:
        """The task's organ config with the grid's replacements (``organs.<task>``)."""
        spec = {"base": task, **((self.cfg.get("organs") or {}).get(task) or {})}
        organ = organ_config_from(spec)
        if organ.name != task:
            raise ConfigError(f"organs.{task}: the organ config is named '{organ.name}', expected '{task}'")
        return organ

    def _arch(self) -> Any:
        return (self.cfg.get("encoder") or {}).get("arch")

    def pretrain_config(self, setting: str, seed: int, scope: str = "") -> dict[str, Any]:
        p = dict(self.cfg.get("pretrain") or {})
        name = p.get("config", "default")
        name = name[scope] if isinstance(name, Mapping) else name
        cfg = load_config(name, "pretrain", list(p.get("overrides") or []))
        cfg = deep_merge(cfg, p.get("set") or {})
        cfg = deep_merge(cfg, (p.get("task_set") or {}).get(scope) or {})
        cfg["data"]["organs"] = [str(self.organ_path(t)) for t in ([scope] if scope else self.tasks)]
        if self._arch() is not None:
            cfg["encoder"]["arch"] = copy.deepcopy(self._arch())
        cfg["encoder"]["modality_aware"] = setting == "aware"
        cfg["training"]["seed"] = int(seed)
        cfg.setdefault("run", {}).update(device=self.device, progress=self.progress)
        return cfg

    def labels_per_class(self, row: Row, regime: Regime) -> int | None:
        """A row's own ``labels_per_class``, else its regime's (``None``: every training label)."""
        own = row.options.get("labels_per_class")
        return int(own) if own is not None else regime.labels_per_class

    def finetune_config(self, task: str, row: Row, seed: int, regime: Regime | None = None) -> dict[str, Any]:
        regime = regime or self.regimes[0]
        f = dict(self.cfg.get("finetune") or {})
        name = f.get("config", task)
        name = name.get(task, task) if isinstance(name, Mapping) else name
        cfg = load_config(name, "finetune", list(f.get("overrides") or []))
        for part in (f.get("set"), (f.get("task_set") or {}).get(task), regime.set, regime.task_set.get(task),
                     row.options.get("set")):
            cfg = deep_merge(cfg, part or {})
        cfg = apply_overrides(cfg, list(row.options.get("overrides") or []))
        per_class = self.labels_per_class(row, regime)
        if per_class is not None:
            cfg.setdefault("data", {})["labels_per_class"] = per_class
        cfg["organ"] = str(self.organ_path(task))
        if self._arch() is not None:
            cfg.setdefault("encoder", {})["arch"] = copy.deepcopy(self._arch())
        cfg["ablation"] = {**(cfg.get("ablation") or {}), **row.ablation}
        cfg.setdefault("training", {})["seed"] = int(seed)
        cfg.setdefault("run", {}).update(device=self.device, progress=self.progress)
        return cfg

    def cnn_config(self, task: str, row: Row, seed: int, regime: Regime | None = None) -> dict[str, Any]:
        """Training settings default to the task's stage-2 ones (same pipeline and budget)."""
        regime = regime or self.regimes[0]
        as_medmap = Row(row.name, "medmap", row.label, row.seeds, row.tasks,
                        {k: v for k, v in row.options.items() if k == "labels_per_class"})
        ft = self.finetune_config(task, as_medmap, seed, regime)
        t = ft.get("training") or {}
        training = {k: t[k] for k in ("epochs", "batch_size", "lr", "weight_decay", "warmup_epochs", "grad_clip",
                                      "precision", "select_metric") if k in t}
        training = {**training, **(row.options.get("training") or {}), "seed": int(seed)}
        return {"organ": ft["organ"], "net": copy.deepcopy(row.options.get("net") or {"name": "DenseNet121"}),
                "training": training, "data": {"augment": (ft.get("data") or {}).get("augment"),
                                               "labels_per_class": self.labels_per_class(row, regime)},
                "run": {"device": self.device}}

    # ---------------------------------------------------------------- plan
    def _drop_names(self, row: Row) -> list[str]:
        if row.kind != "drop_modality":
            return []
        names = []
        for task in row.tasks:
            for m in self._drop_modalities(row, task):
                names.append(f"{row.options['source']}_without_{m}")
        return list(dict.fromkeys(names))

    def _drop_modalities(self, row: Row, task: str) -> list[str]:
        mods = row.options.get("modalities", "all")
        organ_mods = self.organ_config(task).modalities
        if mods == "all":
            return list(organ_mods)
        if isinstance(mods, Mapping):
            mods = mods.get(task, [])
        bad = [m for m in mods if m not in organ_mods]
        if bad:
            raise ConfigError(f"row '{row.name}': {bad} are not {task} modalities ({', '.join(organ_mods)})")
        return [str(m) for m in mods]

    def _selected(self, row: Row, name: str | None = None) -> bool:
        return not self.only or row.name in self.only or (name is not None and name in self.only)

    def _wanted_by_a_drop_row(self, row: Row, task: str, seed: int, regime: Regime) -> bool:
        return any(d.kind == "drop_modality" and d.options["source"] == row.name and task in d.tasks
                   and seed in d.seeds and regime.has(d, task)
                   and (self._selected(d) or any(n in self.only for n in self._drop_names(d))) for d in self.rows)

    def jobs(self) -> list[Job]:
        """Every job of the grid (filtered by ``only``, with the jobs they depend on), in run order."""
        runs: list[Job] = []
        needed_pretrain: set[tuple[str, str, int]] = set()
        by_name = {r.name: r for r in self.rows}
        for regime in self.regimes:
            for row in [r for r in self.rows if r.kind != "drop_modality" and regime.has(r)]:
                for task in [t for t in row.tasks if regime.has(row, t)]:
                    for seed in row.seeds:
                        if not (self._selected(row) or self._wanted_by_a_drop_row(row, task, seed, regime)):
                            continue
                        setting, scope, pseed = row.pretrain_setting(), self.pretrain_scope(task), self.pretrain_seed(seed)
                        needs = ("data",) + ((_pretrain_key(scope, setting, pseed),) if setting else ())
                        if setting:
                            needed_pretrain.add((scope, setting, pseed))
                        runs.append(self._run_job(task, row, seed, regime, needs))
            for row in [r for r in self.rows if r.kind == "drop_modality" and regime.has(r)]:
                src = by_name[row.options["source"]]
                if not regime.has(src):
                    continue
                for task in [t for t in row.tasks if t in src.tasks and regime.has(src, t)]:
                    for m in self._drop_modalities(row, task):
                        if not self._selected(row, f"{src.name}_without_{m}"):
                            continue
                        for seed in [s for s in row.seeds if s in src.seeds]:  # only runs the source row makes
                            runs.append(self._drop_job(task, src, m, seed, regime))
        pre = [self._pretrain_job(*k) for k in sorted(needed_pretrain, key=lambda x: (x[2], x[0], x[1]))]
        return [self._data_job(), *pre, *runs]

    def _data_job(self) -> Job:
        return Job("data", f"data: {self.study_list}", self.study_list.is_file, self._make_data)

    def _pretrain_job(self, scope: str, setting: str, seed: int) -> Job:
        d = self.pretrain_dir(setting, seed, scope)
        what = f"{scope}, " if scope else ""
        return Job(_pretrain_key(scope, setting, seed), f"stage 1 ({what}{setting} encoders, seed {seed}): {d}",
                   lambda: (d / PRETRAIN_DONE).is_file(), lambda: self._pretrain(setting, seed, scope), ("data",))

    def _run_job(self, task: str, row: Row, seed: int, regime: Regime, needs: tuple[str, ...]) -> Job:
        d = self.run_dir(task, row.name, seed, regime.name)
        metrics = d / "metrics" / "test" / "metrics.json"
        where = f"{task}{'/' + regime.name if regime.name else ''}"
        return Job(_run_key(task, regime.name, row.name, seed), f"{where} / {row.name} ({row.kind}), seed {seed}: {d}",
                   metrics.is_file, lambda: self._run(task, row, seed, regime), needs,
                   lambda: _result(metrics, task, row.name, seed, row.label, regime.name))

    def _drop_job(self, task: str, src: Row, modality: str, seed: int, regime: Regime) -> Job:
        d = self.run_dir(task, src.name, seed, regime.name)
        metrics = d / "metrics" / f"test_without_{modality}" / "metrics.json"
        name = f"{src.name}_without_{modality}"
        label = f"{src.label}, {modality} dropped at test"

        def run() -> Any:
            from medmap.engines.evaluate import evaluate_run

            return evaluate_run(d, split="test", n_bootstrap=self.n_bootstrap, drop_modalities=[modality],
                                device=self.device)

        where = f"{task}{'/' + regime.name if regime.name else ''}"
        return Job(_run_key(task, regime.name, name, seed, "drop"), f"{where} / {name}, seed {seed}: {metrics.parent}",
                   metrics.is_file, run, (_run_key(task, regime.name, src.name, seed),),
                   lambda: _result(metrics, task, name, seed, label, regime.name))

    # ---------------------------------------------------------------- work
    def write_organs(self) -> None:
        for task in self.tasks:
            text = yaml.safe_dump(self.organ_config(task).to_dict(), sort_keys=False)
            p = self.organ_path(task)
            if not p.is_file() or p.read_text() != text:
                atomic_write_text(p, text)

    def _make_data(self) -> Path:
        from medmap.data.studylist import read_study_list, write_study_list
        from medmap.data.synth.generate import generate, load_synth_config

        d = dict(self.cfg.get("data") or {})
        synth = load_synth_config(d.get("synth_config", "default"), list(d.get("synth_overrides") or []))
        synth = deep_merge(synth, d.get("synth_set") or {})
        n = d.get("n", 100)
        studies = []
        for task in self.tasks:
            folder = self.out / "data" / task
            count = int(n.get(task, 0) if isinstance(n, Mapping) else n)
            if count < 1:
                raise ConfigError(f"data.n: no study count for task '{task}'")
            lst = folder / "studies.jsonl"
            if not lst.is_file():
                generate(folder, [task], count, seed=int(d.get("seed", 0)), config=synth,
                         workers=int(d.get("workers", 1)), progress=self.progress)
            for s in read_study_list(lst):
                meta = dict(s.meta or {})
                for key in ("organ_mask", "lesion_mask"):  # meta paths are relative to the list folder
                    if meta.get(key):
                        meta[key] = f"{task}/{meta[key]}"
                studies.append(_replace(s, meta=meta))
        return write_study_list(studies, self.study_list)

    def _pretrain(self, setting: str, seed: int, scope: str = "") -> Any:
        from medmap.engines.pretrain import run_pretraining

        d = self.pretrain_dir(setting, seed, scope)
        metrics = run_pretraining(self.pretrain_config(setting, seed, scope), self.study_list, d, resume=True)
        atomic_write_json(d / PRETRAIN_DONE, {"setting": setting, "seed": seed, "scope": scope, "metrics": metrics})
        return metrics

    def _run(self, task: str, row: Row, seed: int, regime: Regime) -> Any:
        d = self.run_dir(task, row.name, seed, regime.name)
        per_class = self.labels_per_class(row, regime)
        setting = row.pretrain_setting()
        stage1 = self.pretrain_dir(setting, self.pretrain_seed(seed), self.pretrain_scope(task)) if setting else None
        if row.kind == "medmap":
            from medmap.engines.evaluate import evaluate_run
            from medmap.engines.finetune import run_finetuning

            if not (d / "metrics" / "finetune_summary.json").is_file():
                run_finetuning(self.finetune_config(task, row, seed, regime), self.study_list, d, resume=True, init=stage1)
            return evaluate_run(d, split="test", n_bootstrap=self.n_bootstrap, device=self.device)
        if row.kind == "cnn":
            from medmap.experiments.baselines import run_cnn_baseline

            return run_cnn_baseline(self.cnn_config(task, row, seed, regime), self.study_list, d, self.n_bootstrap)
        if row.kind == "linear_probe":
            from medmap.experiments.baselines import run_linear_probe

            return run_linear_probe(stage1, self.study_list, self.organ_path(task), d, seed=seed,
                                    n_bootstrap=self.n_bootstrap, pool=str(row.options.get("pool", "concat")),
                                    cs=[float(c) for c in row.options.get("cs", (0.01, 0.1, 1.0, 10.0))],
                                    device=self.device, labels_per_class=per_class)
        if row.kind == "intensity":
            from medmap.experiments.baselines import run_intensity_baseline

            return run_intensity_baseline(self.study_list, self.organ_path(task), d, seed=seed,
                                          n_bootstrap=self.n_bootstrap, workers=int(row.options.get("workers", 1)),
                                          labels_per_class=per_class)
        raise ConfigError(f"row '{row.name}': kind {row.kind!r} is not a run")  # pragma: no cover

    def label_efficiency_points(self, results: Sequence[RunResult]) -> dict[str, list[tuple[str, float, float]]]:
        """Per task, ``(curve, labelled studies per class, balanced accuracy)`` of every finished run of
        a row with a ``curve``; a run with every training label sits at the train split's mean count
        per class."""
        rows = {r.name: r for r in self.rows if r.options.get("curve")}
        out: dict[str, list[tuple[str, float, float]]] = {}
        full: dict[str, float] = {}
        for res in results:
            row = rows.get(res.row)
            score = res.metrics.get("balanced_accuracy")
            if row is None or score is None:
                continue
            x = self.labels_per_class(row, self.regime(res.regime))
            if x is None:
                if res.task not in full:
                    from medmap.experiments.baselines import labelled_splits

                    organ = self.organ_config(res.task)
                    full[res.task] = len(labelled_splits(self.study_list, organ, 0)["train"]) / organ.num_classes
                x = full[res.task]
            out.setdefault(res.task, []).append((str(row.options["curve"]), float(x), float(score)))
        return out

    def results(self) -> list[RunResult]:
        """Every finished run of the whole grid (``only`` ignored), in row order."""
        everything = ExperimentGrid(self.cfg, self.out, None, None)
        everything.rows = self.rows  # keep --seeds
        out = []
        for job in everything.jobs():
            if job.result is not None and job.done():
                r = job.result()
                if r is not None:
                    out.append(r)
        return out


def _pretrain_key(scope: str, setting: str, seed: int) -> str:
    return f"pretrain:{scope + ':' if scope else ''}{setting}:{seed}"


def _run_key(task: str, regime: str, row: str, seed: int, kind: str = "run") -> str:
    return f"{kind}:{task}:{regime + ':' if regime else ''}{row}:{seed}"


def _replace(study: Any, **changes: Any) -> Any:
    import dataclasses

    return dataclasses.replace(study, **changes)


def _result(path: Path, task: str, row: str, seed: int, label: str, regime: str = "") -> RunResult | None:
    import json

    try:
        return RunResult(task, row, seed, json.loads(path.read_text()), label, regime)
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------- driver
class JobClaims:
    """Claim files that let several processes share one grid folder without running a job twice.

    ``acquire(key)`` creates ``<folder>/<key>.claim`` atomically (``O_EXCL``) with this host and
    process id; it fails while another live process holds the claim. A claim left by a process
    that died on this host (a killed worker) is taken over. ``release(key)`` removes it.

    Example::

        claims = JobClaims(Path("runs/grid/claims"))
        if claims.acquire("run:brain:full:0"):
            try:
                ...  # run the job
            finally:
                claims.release("run:brain:full:0")
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.owner = f"{socket.gethostname()} {os.getpid()}"

    def path(self, key: str) -> Path:
        return self.folder / (key.replace(":", "_").replace("/", "_") + ".claim")

    def acquire(self, key: str) -> bool:
        """Claim ``key``; ``False`` if another live process holds it."""
        path = self.path(key)
        for _ in range(2):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if not self._stale(path):
                    return False
                path.unlink(missing_ok=True)  # its owner died on this host: take it over
                continue
            with os.fdopen(fd, "w") as f:
                f.write(self.owner)
            return True
        return False

    def release(self, key: str) -> None:
        path = self.path(key)
        try:
            if path.read_text() == self.owner:
                path.unlink()
        except OSError:
            pass

    @staticmethod
    def _stale(path: Path) -> bool:
        """True when the claim's owner is a process of this host that no longer runs."""
        try:
            host, pid = path.read_text().rsplit(" ", 1)
        except (OSError, ValueError):
            return False  # being written right now, or unreadable: leave it alone
        if host != socket.gethostname():
            return False
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return True
        except (PermissionError, ValueError):
            return False
        return False


@dataclass
class GridReport:
    """What :func:`run_grid` did."""

    jobs: list[str]
    ran: list[str]
    skipped: list[str]
    failed: dict[str, str]
    tables: dict[str, Path]


def run_grid(cfg: Mapping[str, Any] | str | Path, out: str | Path, only: Sequence[str] | None = None,
             seeds: Sequence[int] | None = None, dry_run: bool = False, fail_fast: bool = False,
             log: Callable[[str], None] = print, poll_s: float = 10.0) -> GridReport:
    """Run (or continue) every unfinished job of the grid, then write the results tables.

    Args:
        cfg: experiment config dict, built-in name or YAML path.
        out: output folder; rerunning with the same folder skips finished jobs.
        only: run only these rows (and the stage-1 runs / data they need).
        seeds: replace the config's seeds.
        dry_run: print the plan with each job's status and write nothing.
        fail_fast: stop at the first failing job (default: record it, skip what depends on
            it, continue, and report it; its traceback goes to ``DIR/failures/``).
        log: where progress lines go.
        poll_s: seconds between looks at jobs held by other workers.

    Several processes may run the same grid on the same ``out`` folder at once (``medmap
    experiment --workers N`` starts them): each job is claimed first (:class:`JobClaims`), a
    job waits until the jobs it needs are finished, and the results tables are rewritten by
    whichever process ends.

    Returns:
        A :class:`GridReport`; the tables are ``DIR/results.md``, ``results.csv``, ``runs.csv``.
    """
    if not isinstance(cfg, Mapping):
        cfg = load_experiment_config(cfg)
    grid = ExperimentGrid(cfg, out, seeds, only)
    jobs = grid.jobs()
    report = GridReport([j.key for j in jobs], [], [], {}, {})
    if dry_run:
        for j in jobs:
            log(f"[{'done' if j.done() else 'todo'}] {j.describe}")
        return report
    if grid.threads:
        from medmap.engines.common import configure_threads

        configure_threads(grid.threads)  # for every job this process runs (stage 1, stage 2, baselines)
    grid.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(grid.out / "experiment.yaml", yaml.safe_dump(dict(cfg), sort_keys=False))
    grid.write_organs()
    claims = JobClaims(grid.out / "claims")
    by_key = {j.key: j for j in jobs}
    position = {j.key: i for i, j in enumerate(jobs, 1)}
    pending, stop = list(jobs), False
    while pending and not stop:
        waiting: list[Job] = []
        for j in pending:
            i = position[j.key]
            if j.done():
                if j.key not in report.ran:
                    report.skipped.append(j.key)
                continue
            blocked = [n for n in j.needs if n in report.failed]
            if blocked:
                report.failed[j.key] = f"skipped: {', '.join(blocked)} failed"
                log(f"[{i}/{len(jobs)}] skip {j.describe} ({report.failed[j.key]})")
                continue
            if any(n in by_key and not by_key[n].done() for n in j.needs) or not claims.acquire(j.key):
                waiting.append(j)  # another worker runs it, or something it needs
                continue
            log(f"[{i}/{len(jobs)}] {j.describe}")
            t0 = time.time()
            try:
                j.run()
            except Exception as e:  # noqa: BLE001 - one failed run must not lose the rest of a long grid
                if fail_fast:
                    raise
                report.failed[j.key] = f"{type(e).__name__}: {e}"
                (grid.out / "failures").mkdir(exist_ok=True)
                atomic_write_text(grid.out / "failures" / f"{j.key.replace(':', '_')}.txt", traceback.format_exc())
                log(f"    FAILED: {report.failed[j.key]}")
                if not isinstance(e, MedMAPError) and j.key == "data":
                    stop = True  # nothing else can run
                    break
                continue
            finally:
                claims.release(j.key)
            _append_timing(grid.out / "timings.csv", j.key, time.time() - t0)
            report.ran.append(j.key)
        if not stop and waiting and len(waiting) == len(pending):
            time.sleep(poll_s)  # every job left is held by another worker
        pending = waiting
    report.tables = write_grid_tables(cfg, grid.out, seeds)
    log(f"tables: {report.tables['markdown']} and {report.tables['csv']}")
    if report.failed:
        log(f"{len(report.failed)} job(s) failed or were skipped: {', '.join(report.failed)}")
    return report


def write_grid_tables(cfg: Mapping[str, Any], out: str | Path, seeds: Sequence[int] | None = None) -> dict[str, Path]:
    """(Re)write ``results.md``, ``results.csv`` and ``runs.csv`` from every finished run in ``out``,
    and, for a grid with ``claims``, ``claims.md``, ``claims.csv`` and ``rows.png``."""
    grid = ExperimentGrid(cfg, out, seeds)
    notes = [f"Experiment `{cfg.get('name', '')}`; test split; model selection on the validation split only."]
    results = grid.results()
    labels = {r.name: r.label for r in grid.regimes}
    paths = write_tables(results, grid.out, title=f"Results: {cfg.get('name', 'experiment')}", notes=notes,
                         regime_labels=labels)
    if cfg.get("claims"):
        paths.update(write_claims_and_figure(grid, results))
    curves = grid.label_efficiency_points(results)
    for task, points in curves.items():
        from medmap.evaluation.plots import label_efficiency_plot

        organ = grid.organ_config(task)
        paths[f"label_efficiency_{task}"] = label_efficiency_plot(
            points, grid.out / f"label_efficiency_{task}.png", title=f"{task}: label efficiency (test split)",
            chance=1.0 / organ.num_classes)
    return paths


def _predictions_path(grid: ExperimentGrid, r: RunResult) -> Path:
    """Where a finished run's test predictions are (a dropped-sequence row: its source run's folder)."""
    if "_without_" in r.row and r.row.split("_without_")[0] in {x.name for x in grid.rows}:
        src, seq = r.row.split("_without_", 1)
        return grid.run_dir(r.task, src, r.seed, r.regime) / "metrics" / f"test_without_{seq}" / "predictions.csv"
    return grid.run_dir(r.task, r.row, r.seed, r.regime) / "metrics" / "test" / "predictions.csv"


def write_claims_and_figure(grid: ExperimentGrid, results: Sequence[RunResult]) -> dict[str, Path]:
    """Each claim's paired difference (``claims.md`` / ``.csv``, :mod:`medmap.experiments.claims`) and
    one figure panel per task and regime with every row's score (``rows.png``)."""
    from medmap.evaluation.plots import row_scores_figure
    from medmap.experiments.claims import measure_claims, parse_claims, row_scores, write_claims

    runs: dict[tuple[str, str, str], dict[str, Path]] = {}
    label_of: dict[str, str] = {}
    for r in results:
        path = _predictions_path(grid, r)
        if path.is_file():
            runs.setdefault((r.task, r.regime, r.row), {})[str(r.seed)] = path
            label_of[r.row] = r.label
    classes = {t: list(grid.organ_config(t).classes) for t in grid.tasks}
    labels = {r.name: r.label for r in grid.regimes}
    n_boot = max(grid.n_bootstrap, 1000)
    paths = write_claims(measure_claims(parse_claims(grid.cfg.get("claims")), runs, classes, n_boot), grid.out, labels)
    panels = []
    for task, regime in dict.fromkeys((t, g) for t, g, _ in runs):
        rows = [(label_of[row], *row_scores(seed_paths, classes[task], n_boot))
                for (t, g, row), seed_paths in runs.items() if (t, g) == (task, regime) and "_without_" not in row]
        title = f"{task}: {labels.get(regime, regime)}" if regime else task
        panels.append((title, rows, 1.0 / len(classes[task])))
    if panels:
        paths["rows_figure"] = row_scores_figure(panels, grid.out / "rows.png")
    return paths


def _append_timing(path: Path, key: str, seconds: float) -> None:
    new = not path.is_file()
    with path.open("a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(["job", "seconds"])
        w.writerow([key, f"{seconds:.1f}"])
