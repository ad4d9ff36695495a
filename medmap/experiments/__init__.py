"""Experiment grids: MedMAP ablations and baselines on one data set, with one results table.

Example:
    >>> from medmap.experiments import run_grid
    >>> report = run_grid("tiny", "runs/experiments/tiny")   # doctest: +SKIP
    >>> report.tables["markdown"]                              # doctest: +SKIP
    PosixPath('runs/experiments/tiny/results.md')
"""

from medmap.experiments.grid import ExperimentGrid, GridReport, load_experiment_config, run_grid
from medmap.experiments.table import RunResult, TableRow, aggregate, write_tables

__all__ = ["ExperimentGrid", "GridReport", "RunResult", "TableRow", "aggregate", "load_experiment_config", "run_grid",
           "write_tables"]
