"""``medmap subgroups``: each run's errors per subgroup of the test studies, side by side.

Example::

    medmap subgroups runs/brain3000_ft runs/brain3000_densenet --data runs/brain3000/studies.jsonl \\
        --by meta.subtype --by meta.size_mm=15,25
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "subgroups",
        help="errors per subgroup (lesion size, subtype, site ...) of one or more runs",
        description="Split the studies of one or more runs' predictions by fields of the study list "
        "(dotted paths into each study's record, e.g. meta.subtype; FIELD=E1,E2 bins a number) and the "
        "true label, and print each run's errors and accuracy with a Wilson 95%% interval per subgroup.",
    )
    p.add_argument("runs", nargs="+", type=Path,
                   help="run folders (their metrics/test/predictions.csv) or predictions.csv files")
    p.add_argument("--data", type=Path, required=True, help="the study list the predictions were made on")
    p.add_argument("--by", action="append", default=[], metavar="FIELD[=E1,E2]",
                   help="grouping field, repeatable (e.g. meta.subtype, meta.size_mm=15,25)")
    p.add_argument("--name", action="append", default=[], metavar="NAME",
                   help="a column name per run, in order (default: the run folder names)")
    p.add_argument("--out", type=Path, default=None, help="also write the table to this Markdown file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from medmap.data.studylist import read_study_list
    from medmap.evaluation.subgroups import GroupBy, SubgroupError, read_run_predictions, render_subgroups, subgroup_errors
    from medmap.utils import atomic_write_text

    if args.name and len(args.name) != len(args.runs):
        raise SubgroupError(f"--name given {len(args.name)} times for {len(args.runs)} runs")
    names = args.name or [_default_name(p) for p in args.runs]
    if len(set(names)) != len(names):
        raise SubgroupError(f"two runs share the name {sorted(n for n in names if names.count(n) > 1)[0]!r}; give --name")
    by = [GroupBy.parse(b) for b in args.by]
    runs = {name: read_run_predictions(path) for name, path in zip(names, args.runs)}
    table = render_subgroups(subgroup_errors(runs, read_study_list(args.data), by), by, names)
    print(table, end="")
    if args.out is not None:
        atomic_write_text(args.out, table)
        print(f"written: {args.out}")
    return 0


def _default_name(path: Path) -> str:
    """The run folder's name, also for ``RUN/metrics/test/predictions.csv``."""
    if path.suffix == ".csv":
        parts = path.resolve().parts
        return parts[-4] if len(parts) >= 4 and parts[-3] == "metrics" else path.stem
    return path.resolve().name
