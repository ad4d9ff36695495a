"""The planned grid: every run's folder, resolved config and job, in run order.

:class:`ExperimentGrid` expands the rows of an experiment config
(:mod:`medmap.experiments.schema`) over tasks, label regimes and seeds into :class:`Job` s
that :func:`medmap.experiments.runner.run_grid` runs. Layout of ``DIR`` (everything a later
invocation needs to skip finished work)::

    DIR/experiment.yaml                         the resolved experiment config
    DIR/data/studies.jsonl                      MedMoM-Synth, generated once (data seed)
    DIR/organs/<task>.yaml                      organ configs with the grid's sizes
    DIR/pretrain/[<task>/]{aware,shared}_seed<s>/   stage-1 runs, shared by every row that uses them
                                                (``pretrain.run``: an existing run stands in for the aware ones)
    DIR/runs/<task>/[<regime>/]<row>/seed<s>/   one run; finished = metrics/test/metrics.json
    DIR/results.md  results.csv  runs.csv       the tables (see medmap.experiments.table)
    DIR/claims.md  claims.csv  rows.png         the claims and the row-score figure (with ``claims``)
    DIR/timings.csv                             wall time of every job (to size a grid)

Each run is selected on the validation split; the test split is only predicted.

Example:
    >>> grid = ExperimentGrid(load_experiment_config("tiny"), "runs/tiny")
    >>> [j.key for j in grid.jobs()][:2]
    ['data', 'pretrain:aware:0']
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import yaml

from medmap.config import OrganConfig, apply_overrides, deep_merge, load_config, organ_config_from
from medmap.errors import ConfigError
from medmap.experiments.schema import (Regime, Row, check_pretrain_section, load_experiment_config, parse_regimes,
                                       parse_rows)
from medmap.experiments.table import RunResult
from medmap.utils import atomic_write_json, atomic_write_text

PRETRAIN_DONE = "pretrain_done.json"


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
        tasks: restrict the jobs to these of the config's tasks (``--tasks``); ``None``: all.
    """

    def __init__(self, cfg: Mapping[str, Any], out: str | Path, seeds: Sequence[int] | None = None,
                 only: Sequence[str] | None = None, tasks: Sequence[str] | None = None) -> None:
        self.cfg = copy.deepcopy(dict(cfg))
        check_pretrain_section(self.cfg)
        self.out = Path(out)
        self.rows = parse_rows(self.cfg, seeds)
        self.regimes = parse_regimes(self.cfg, self.rows)
        self.tasks = [str(t) for t in self.cfg["tasks"]]
        self.task_filter = set(tasks or [])
        if self.task_filter - set(self.tasks):
            raise ConfigError(f"--tasks {sorted(self.task_filter - set(self.tasks))}: not tasks of this grid "
                              f"({', '.join(self.tasks)})")
        self.only = set(only or [])
        known = {r.name for r in self.rows} | {n for r in self.rows for n in self._drop_names(r)}
        unknown = self.only - known
        if unknown:
            raise ConfigError(f"--only {sorted(unknown)}: no such rows; rows: {', '.join(r.name for r in self.rows)}")
        self.n_bootstrap = int((self.cfg.get("evaluate") or {}).get("n_bootstrap", 1000))
        self.device = str((self.cfg.get("run") or {}).get("device", "auto"))
        self.progress = bool((self.cfg.get("run") or {}).get("progress", False))
        threads = (self.cfg.get("run") or {}).get("threads")
        if threads not in (None, "auto"):
            if isinstance(threads, bool) or not isinstance(threads, (int, float)) or not float(threads).is_integer():
                raise ConfigError(f"experiment config key 'run.threads' must be an integer or 'auto' or null, got {threads!r}")
            threads = int(threads)
        # per worker process, for its every job (stage 1, stage 2, baselines); None: each job's own run.threads
        self.threads: int | str | None = threads or None
        for task in self.tasks:
            linked = self.linked_stage1(self.pretrain_scope(task))
            if linked is not None:
                _check_linked_stage1(linked, task, self.organ_config(task).modalities)

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

    def linked_stage1(self, scope: str) -> Path | None:
        """The finished ``medmap pretrain`` run named by ``pretrain.run`` for this scope (it stands in
        for the modality-aware stage 1 of every seed), or ``None``."""
        given = (self.cfg.get("pretrain") or {}).get("run")
        if isinstance(given, Mapping):
            given = given.get(scope)
        return Path(given) if given else None

    def pretrain_dir(self, setting: str, seed: int, scope: str = "") -> Path:
        linked = self.linked_stage1(scope) if setting == "aware" else None
        return linked or self.out / "pretrain" / scope / f"{setting}_seed{seed}"

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
        if scope:  # a stage-1 run per task: the task's own settings on top
            cfg = deep_merge(cfg, (p.get("task_set") or {}).get(scope) or {})
        cfg["data"]["organs"] = [str(self.organ_path(t)) for t in ([scope] if scope else self.tasks)]
        if self._arch() is not None:
            cfg["encoder"]["arch"] = copy.deepcopy(self._arch())
        cfg.setdefault("ablation", {})["modality_aware"] = setting == "aware"
        cfg["training"]["seed"] = int(seed)
        cfg.setdefault("run", {}).update(device=self.device, progress=self.progress)
        if self.threads:  # the grid's setting wins over the stage config's (shipped: auto)
            cfg["run"]["threads"] = self.threads
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
        if self.threads:  # the grid's setting wins over the stage config's (shipped: auto)
            cfg["run"]["threads"] = self.threads
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
        data = {"augment": (ft.get("data") or {}).get("augment"), "labels_per_class": self.labels_per_class(row, regime)}
        if (ft.get("data") or {}).get("stratified_batches"):  # only when on: the configs of finished runs stay as they were
            data["stratified_batches"] = True
        return {"organ": ft["organ"], "net": copy.deepcopy(row.options.get("net") or {"name": "DenseNet121"}),
                "training": training, "data": data, "run": {"device": self.device}}

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

    def _task_selected(self, task: str) -> bool:
        return not self.task_filter or task in self.task_filter

    def _selected(self, row: Row, name: str | None = None) -> bool:
        return not self.only or row.name in self.only or (name is not None and name in self.only)

    def _wanted_by_a_drop_row(self, row: Row, task: str, seed: int, regime: Regime) -> bool:
        return any(d.kind == "drop_modality" and d.options["source"] == row.name and task in d.tasks
                   and seed in d.seeds and regime.has(d, task)
                   and (self._selected(d) or any(n in self.only for n in self._drop_names(d))) for d in self.rows)

    def jobs(self) -> list[Job]:
        """Every job of the grid (filtered by ``only`` and ``tasks``, with the jobs they depend on), in run order."""
        runs: list[Job] = []
        needed_pretrain: set[tuple[str, str, int]] = set()
        by_name = {r.name: r for r in self.rows}
        for regime in self.regimes:
            for row in [r for r in self.rows if r.kind != "drop_modality" and regime.has(r)]:
                for task in [t for t in row.tasks if regime.has(row, t) and self._task_selected(t)]:
                    for seed in row.seeds:
                        if not (self._selected(row) or self._wanted_by_a_drop_row(row, task, seed, regime)):
                            continue
                        setting, scope, pseed = row.pretrain_setting(), self.pretrain_scope(task), self.pretrain_seed(seed)
                        if setting == "aware" and self.linked_stage1(scope) is not None:
                            pseed = 0  # one linked run serves every seed
                        needs = ("data",) + ((_pretrain_key(scope, setting, pseed),) if setting else ())
                        if setting:
                            needed_pretrain.add((scope, setting, pseed))
                        runs.append(self._run_job(task, row, seed, regime, needs))
            for row in [r for r in self.rows if r.kind == "drop_modality" and regime.has(r)]:
                src = by_name[row.options["source"]]
                if not regime.has(src):
                    continue
                for task in [t for t in row.tasks if t in src.tasks and regime.has(src, t) and self._task_selected(t)]:
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
        if setting == "aware" and self.linked_stage1(scope) is not None:
            return Job(_pretrain_key(scope, setting, seed), f"stage 1 ({what}aware encoders): the existing run {d}",
                       lambda: d.is_dir(), lambda: _check_linked_stage1(d), ("data",))
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

            labels = row.options.get("labels", "given")
            if labels not in ("given", "mined"):
                raise ConfigError(f"row '{row.name}': labels must be 'given' or 'mined', got {labels!r}")
            study_list = self.mined_study_list(task) if labels == "mined" else self.study_list
            return run_cnn_baseline(self.cnn_config(task, row, seed, regime), study_list, d, self.n_bootstrap)
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
        if row.kind == "zero_shot":
            from medmap.engines.zeroshot import zero_shot_classify

            return zero_shot_classify(stage1, self.study_list, task, split="test", n_bootstrap=self.n_bootstrap,
                                      out_dir=d / "metrics" / "test", device=self.device, prompts=row.options.get("prompts"))
        raise ConfigError(f"row '{row.name}': kind {row.kind!r} is not a run")  # pragma: no cover

    def mined_study_list(self, task: str) -> Path:
        """The study list with every training study of ``task`` labelled from its impression by the
        nearest class prompt in the frozen text space (:func:`medmap.text.mining.mine_labels`);
        val and test keep their labels. Written once, with ``mined_labels.json`` next to it."""
        from medmap.data.cache import default_cache_root
        from medmap.data.split import patient_splits
        from medmap.data.studylist import read_study_list, write_study_list
        from medmap.run_config import finetune_config as typed_finetune_config
        from medmap.text.cache import run_text_cache
        from medmap.text.mining import mine_labels

        path = self.out / "data" / f"studies_mined_{task}.jsonl"
        if path.is_file():
            return path
        organ = self.organ_config(task)
        studies = patient_splits(read_study_list(self.study_list, organ=organ.name))
        train = [s for s in studies if s.split == "train"]
        text = typed_finetune_config(self.finetune_config(task, self.rows[0], 0)).text
        mined, report = mine_labels(train, organ, run_text_cache(text, default_cache_root(self.study_list) / "text"))
        by_id = {s.study_id: s for s in mined}
        out = [by_id.get(s.study_id, s) for s in studies]
        atomic_write_json(path.with_name(f"mined_labels_{task}.json"), report)
        return write_study_list(out, path)

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
            x = 0 if row.kind == "zero_shot" else self.labels_per_class(row, self.regime(res.regime))
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


def _check_linked_stage1(run: Path, task: str = "", modalities: Sequence[str] = ()) -> bool:
    """True for a finished modality-aware ``medmap pretrain`` run with an encoder for each of
    ``modalities``; a clear error otherwise."""
    from safetensors import safe_open

    from medmap.engines.finetune import resolve_init_checkpoint

    config = run / "config.yaml"
    if not config.is_file():
        raise ConfigError(f"pretrain.run: {run} is not a stage-1 run folder (no config.yaml)")
    cfg = yaml.safe_load(config.read_text()) or {}
    if not (cfg.get("ablation") or {}).get("modality_aware", True):
        raise ConfigError(f"pretrain.run: {run} was trained with one shared encoder (ablation.modality_aware: false); "
                          "it cannot stand in for the modality-aware stage 1")
    if not any((run / "metrics").glob("pretrain_*.json")):  # written when the run ends
        raise ConfigError(f"pretrain.run: {run} has not finished (no metrics/pretrain_*.json); "
                          f"finish it with `medmap pretrain --data LIST --out {run} --resume`")
    with safe_open(str(resolve_init_checkpoint(run)), "pt") as weights:
        keys = list(weights.keys())
    missing = [m for m in modalities if not any(f"encoders.{m}." in k for k in keys)]
    if missing:
        raise ConfigError(f"pretrain.run: {run} has no stage-1 encoder for {task}'s {', '.join(missing)}")
    return True


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
        return RunResult(task, row, seed, json.loads(path.read_text()), label, regime, path)
    except (OSError, ValueError):
        return None
