"""``medmap split STUDY_LIST --out NEW_LIST``: patient-level stratified train/val/test split.

Splits already in the list are kept (a patient with a split keeps it for all its studies)
unless ``--reassign`` is given; the other patients are split with the seed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from medmap.data.split import DEFAULT_FRACTIONS, assign_splits, ensure_splits, split_summary
from medmap.data.studylist import read_study_list, write_study_list
from medmap.errors import StudyListError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "split",
        help="assign patient-level stratified train/val/test splits",
        description="Write a copy of a study list with train/val/test splits, by patient, stratified by (organ, label).",
    )
    p.add_argument("study_list", metavar="STUDY_LIST", help="the .jsonl study list")
    p.add_argument("--out", required=True, metavar="NEW_LIST", help="where to write the list with splits")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument(
        "--fractions",
        type=float,
        nargs=3,
        default=list(DEFAULT_FRACTIONS),
        metavar=("TRAIN", "VAL", "TEST"),
        help="fractions of patients (default 0.7 0.15 0.15)",
    )
    p.add_argument("--reassign", action="store_true", help="ignore splits already in the list")
    p.add_argument("--force", action="store_true", help="overwrite NEW_LIST if it exists")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.exists() and not args.force:
        raise StudyListError(f"{out} exists; use --force to overwrite it")
    if out.resolve() == Path(args.study_list).resolve():
        raise StudyListError("--out must differ from STUDY_LIST")
    studies = read_study_list(args.study_list)
    if args.reassign:
        studies = assign_splits(studies, args.fractions, args.seed)
    else:
        studies = ensure_splits(studies, args.seed, args.fractions)
    write_study_list(studies, out)
    print(split_summary(studies))
    print(f"wrote {out}")
    return 0
