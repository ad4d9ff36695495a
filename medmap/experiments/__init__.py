"""Experiment grids: MedMAP ablations and baselines on one data set, with one results table.

``schema`` (the config: rows, regimes), ``grid`` (the plan: folders, configs, jobs), ``runner``
(workers, claims on jobs, tables), ``table`` and ``claims`` (the results), ``baselines``.

Example:
    >>> from medmap.experiments import run_grid
    >>> report = run_grid("tiny", "runs/experiments/tiny")   # doctest: +SKIP
    >>> report.tables["markdown"]                              # doctest: +SKIP
    PosixPath('runs/experiments/tiny/results.md')
"""

from medmap.experiments.grid import ExperimentGrid
from medmap.experiments.runner import GridReport, run_grid
from medmap.experiments.schema import load_experiment_config
from medmap.experiments.table import RunResult, TableRow, aggregate, write_tables

__all__ = ["ExperimentGrid", "GridReport", "RunResult", "TableRow", "aggregate", "load_experiment_config", "run_grid",
           "write_tables"]
