"""``medmap validate STUDY_LIST``: check a study list and every volume it names.

Prints one line per problem and exits with status 1 when there is any; otherwise prints a
one-line summary and exits with 0. (Status 2: the list itself cannot be read, or an organ
config given with ``--organ-config`` is invalid.)
"""

from __future__ import annotations

import argparse
from collections import Counter

from medmap.data.studylist import Study, iter_study_lines
from medmap.data.validate import validate_study_list


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "validate",
        help="check a study list and every NIfTI file it names",
        description="Check a study list (JSON Lines) and every volume it names; print one line per problem.",
    )
    p.add_argument("study_list", metavar="STUDY_LIST", help="the .jsonl study list")
    p.add_argument(
        "--organ-config",
        action="append",
        default=[],
        metavar="NAME_OR_PATH",
        help="organ config (built-in name or YAML path) for organs not built in; repeatable",
    )
    p.add_argument("--no-files", action="store_true", help="check the list only, do not open the volumes")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    problems = validate_study_list(args.study_list, args.organ_config or None, check_files=not args.no_files)
    if problems:
        for problem in problems:
            print(problem)
        print(f"{len(problems)} problem(s) found in {args.study_list}")
        return 1
    studies = [s for _, s in iter_study_lines(args.study_list) if isinstance(s, Study)]
    organs = Counter(s.organ for s in studies)
    n_volumes = sum(len(s.modalities) for s in studies)
    checked = "not opened" if args.no_files else "all readable"
    print(
        f"OK: {len(studies)} studies ({', '.join(f'{o}: {n}' for o, n in sorted(organs.items()))}), "
        f"{len({s.patient_id for s in studies})} patients, {n_volumes} volumes ({checked})"
    )
    return 0
