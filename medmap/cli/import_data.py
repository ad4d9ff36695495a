"""``medmap import DATASET ROOT --out STUDY_LIST``: write a study list from a public dataset.

Sub-commands (:mod:`medmap.data.importers`)::

    medmap import lld-mmri ROOT --out studies.jsonl [--layout volumes|patches]
    medmap import brats ROOT --out studies.jsonl [--normal IXI_ROOT]

Both take ``--split train=0.7,val=0.15,test=0.15 --seed S`` to assign patient-level,
stratified splits (:func:`medmap.data.split.assign_splits`); without it ``split`` is left
unset. Paths inside the list's folder are written relative to it, others absolute.
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

from medmap.config import builtin_names, load_organ_config
from medmap.data.importers import ImportResult, import_brats, import_lld_mmri
from medmap.data.importers.lld_mmri import LAYOUTS
from medmap.data.split import SPLITS, assign_splits, split_summary
from medmap.data.studylist import write_study_list
from medmap.errors import ConfigError, StudyListError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "import",
        help="write a study list from a public dataset (LLD-MMRI, BraTS + IXI)",
        description="Read a public MRI dataset in its download layout and write a study list (JSON Lines).",
    )
    sub = p.add_subparsers(dest="dataset", metavar="DATASET", required=True)
    lld = sub.add_parser(
        "lld-mmri",
        help="LLD-MMRI liver lesions (whole volumes with boxes, or pre-cropped patches)",
        description="One liver study per lesion: whole volumes (images/ + labels/Annotation.json, a box per "
                    "phase) or patches (classification_dataset/images/<case>/<phase>.nii.gz + labels.txt).",
    )
    lld.add_argument("root", metavar="ROOT", help="the LLD-MMRI folder")
    lld.add_argument("--layout", choices=LAYOUTS, help="the form to read (default: detected from the tree)")
    _common(lld)
    lld.set_defaults(func=run_lld)
    brats = sub.add_parser(
        "brats",
        help="BraTS 2021/2023 gliomas as tumour, optionally IXI volunteers as normal",
        description="One brain study per BraTS case (label tumour); --normal adds IXI subjects (label normal).",
    )
    brats.add_argument("root", metavar="ROOT", help="the BraTS folder holding the case folders")
    brats.add_argument("--normal", metavar="IXI_ROOT", help="an IXI folder: its subjects become normal studies")
    _common(brats)
    brats.set_defaults(func=run_brats)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, metavar="STUDY_LIST", help="the .jsonl study list to write")
    p.add_argument("--split", metavar="SPEC", help="assign patient-level splits, e.g. train=0.7,val=0.15,test=0.15")
    p.add_argument("--seed", type=int, default=0, help="random seed of --split (default 0)")
    p.add_argument("--force", action="store_true", help="overwrite STUDY_LIST if it exists")


def parse_split_spec(spec: str) -> tuple[float, float, float]:
    """``"train=0.7,val=0.15,test=0.15"`` -> ``(0.7, 0.15, 0.15)``; a split left out gets 0.

    >>> parse_split_spec("train=0.8,test=0.2")
    (0.8, 0.0, 0.2)
    """
    fractions = dict.fromkeys(SPLITS, 0.0)
    for part in filter(None, (x.strip() for x in spec.split(","))):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or name not in fractions:
            raise ConfigError(f"--split: expected name=fraction with name in {', '.join(SPLITS)}, got {part!r}")
        try:
            fractions[name] = float(value)
        except ValueError:
            raise ConfigError(f"--split: {name} must be a number, got {value!r}") from None
    if any(f < 0 for f in fractions.values()) or abs(sum(fractions.values()) - 1.0) > 1e-6:
        raise ConfigError(f"--split: fractions must be non-negative and sum to 1, got {spec!r}")
    return tuple(fractions[s] for s in SPLITS)  # type: ignore[return-value]


def _check_args(args: argparse.Namespace) -> tuple[float, float, float] | None:
    """Fail on a bad ``--out`` or ``--split`` before reading the dataset; the split fractions."""
    out = Path(args.out)
    if out.exists() and not args.force:
        raise StudyListError(f"{out} exists; use --force to overwrite it")
    return parse_split_spec(args.split) if args.split else None


def _write(result: ImportResult, args: argparse.Namespace, fractions: tuple[float, float, float] | None) -> Path:
    out = Path(args.out)
    studies = result.studies
    if fractions is not None:
        studies = assign_splits(studies, fractions, args.seed)
    write_study_list(studies, out)
    labels = Counter(s.label or "unlabelled" for s in studies)
    print(f"{len(studies)} studies of {len({s.patient_id for s in studies})} patients from {args.root} "
          f"({result.layout}):")
    for label, n in sorted(labels.items(), key=lambda kv: (kv[0] == "unlabelled", kv[0])):
        print(f"  {label}: {n}")
    for note in result.notes:
        print(f"note: {note}")
    if args.split:
        print(split_summary(studies))
    print(f"wrote {out}")
    return out


def _patch_configs() -> list[str]:
    """Built-in liver organ configs that read pre-cropped patches (``crop: patch``)."""
    names = []
    for name in builtin_names("organs"):
        try:
            cfg = load_organ_config(name)
        except ConfigError:
            continue
        if cfg.name == "liver" and cfg.crop == "patch":
            names.append(name)
    return names


def _next_steps(out: Path, organ_config: str, split: bool) -> None:
    print(f"next: medmap validate {out} --organ-config {organ_config}")
    if not split:
        print(f"      medmap split {out} --out {out.with_suffix('.split.jsonl')}   (stratified patient-level splits)")


def run_lld(args: argparse.Namespace) -> int:
    fractions = _check_args(args)
    result = import_lld_mmri(args.root, layout=args.layout)
    out = _write(result, args, fractions)
    if result.layout == "volumes":
        print("organ config: liver (crop: lesion_box; each phase cut around its own box)")
        _next_steps(out, "liver", bool(args.split))
        return 0
    patch = _patch_configs()
    if patch:
        print(f"organ config: {patch[0]} (crop: patch; the files are already lesion patches)")
        _next_steps(out, patch[0], bool(args.split))
        return 0
    print("organ config: no built-in liver config reads pre-cropped patches (crop: patch), and the built-in "
          "'liver' needs a lesion_box. Write one, e.g. liver_patch.yaml with the two lines\n"
          "      base: liver\n"
          "      crop: patch\n"
          "  (set margin_mm to the patches' context shell in mm: the challenge cropped 16 voxels in-plane and "
          "2 slices around each box) and pass it where a command takes an organ config.")
    _next_steps(out, "liver_patch.yaml", bool(args.split))
    return 0


def run_brats(args: argparse.Namespace) -> int:
    fractions = _check_args(args)
    result = import_brats(args.root, normal_root=args.normal)
    out = _write(result, args, fractions)
    if args.normal is None:
        print("note: every BraTS study is 'tumour'; add --normal IXI_ROOT for a tumour-vs-normal task")
    _next_steps(out, "brain", bool(args.split))
    return 0
