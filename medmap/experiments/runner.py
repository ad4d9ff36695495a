"""Run (or continue) a planned grid with several worker processes, then write its tables.

``medmap experiment CONFIG --out DIR`` calls :func:`run_grid`. Several processes may share
one ``DIR``: each job is claimed first (:class:`JobClaims`), a job waits for the jobs it
needs, and whichever process ends rewrites the tables (:func:`write_grid_tables`).

Example:
    >>> report = run_grid("tiny", "runs/experiments/tiny")   # doctest: +SKIP
    >>> report.tables["markdown"]                              # doctest: +SKIP
    PosixPath('runs/experiments/tiny/results.md')
"""

from __future__ import annotations

import csv
import os
import socket
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import yaml

from medmap.errors import MedMAPError
from medmap.experiments.grid import ExperimentGrid, Job
from medmap.experiments.schema import load_experiment_config
from medmap.experiments.table import RunResult, write_tables
from medmap.utils import atomic_write_text


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
             log: Callable[[str], None] = print, poll_s: float = 10.0, tasks: Sequence[str] | None = None) -> GridReport:
    """Run (or continue) every unfinished job of the grid, then write the results tables.

    Args:
        cfg: experiment config dict, built-in name or YAML path.
        out: output folder; rerunning with the same folder skips finished jobs.
        only: run only these rows (and the stage-1 runs / data they need).
        seeds: replace the config's seeds.
        tasks: run only these tasks' jobs (the data job makes every task's studies).
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
    grid = ExperimentGrid(cfg, out, seeds, only, tasks)
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


def write_claims_and_figure(grid: ExperimentGrid, results: Sequence[RunResult]) -> dict[str, Path]:
    """Each claim's paired difference (``claims.md`` / ``.csv``, :mod:`medmap.experiments.claims`) and
    one figure panel per task and regime with every row's score (``rows.png``)."""
    from medmap.evaluation.plots import row_scores_figure
    from medmap.experiments.claims import measure_claims, parse_claims, row_scores, write_claims

    runs: dict[tuple[str, str, str], dict[str, Path]] = {}
    label_of: dict[str, str] = {}
    for r in results:
        path = r.source.parent / "predictions.csv" if r.source is not None else None
        if path is not None and path.is_file():
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
