"""``medmap predict``: class probabilities and a saliency map for a new study.

Example::

    medmap predict runs/liver --study study.json          # a JSON object as in a study-list line
    medmap predict runs/brain t1=sub/t1.nii.gz flair=sub/flair.nii.gz --out pred/
    medmap predict runs/liver_roi t2wi=s/t2wi.nii.gz --roi-mask s/liver_mask.nii.gz   # crop: roi_mask runs
    medmap predict runs/liver t2wi=s/t2wi.nii.gz arterial=s/art.nii.gz --lesion-box 40,52,20,51,63,26   # lesion level
    medmap predict runs/liver t2wi=... arterial=... --lesion-box t2wi=40,52,20,51,63,26 --lesion-box arterial=38,50,21,49,61,27
    medmap predict runs/brain t1=sub/t1.nii.gz --html     # also a self-contained HTML page to read
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from medmap.data.studylist import LesionBox, parse_box
from medmap.errors import StudyListError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "predict",
        help="predict a new study with a fine-tuned run",
        description="Preprocess a study with the shared preprocessing function, print and write class "
        "probabilities, and write a Grad-CAM saliency map (NIfTI + PNG overlay through its peak).",
    )
    p.add_argument("run_dir", type=Path, help="fine-tuning run folder")
    p.add_argument("volumes", nargs="*", metavar="MODALITY=PATH",
                   help="the study's volumes, e.g. t1=t1.nii.gz; PATH may also be a folder holding one DICOM series")
    p.add_argument("--study", type=Path, default=None,
                   help="JSON file with one study (as one study-list line; relative paths resolve against its folder)")
    p.add_argument("--study-id", default=None)
    p.add_argument("--roi-mask", type=Path, default=None,
                   help="the study's organ mask (NIfTI on the volumes' grid), for runs whose organ config has "
                   "crop: roi_mask; overrides a 'roi_mask' in --study")
    p.add_argument("--lesion-box", action="append", default=[], metavar="[MODALITY=]X0,Y0,Z0,X1,Y1,Z1",
                   help="the lesion's box, for lesion-level runs (crop: lesion_box): one box for every modality, or "
                   "MODALITY=box once per modality (each in its own file's voxel indices); overrides a 'lesion_box' "
                   "in --study")
    p.add_argument("--box-space", choices=["voxel", "world"], default="voxel",
                   help="coordinates of --lesion-box: voxel indices of each file (default) or world RAS millimetres")
    p.add_argument("--out", type=Path, default=Path("predictions"), help="output folder (default ./predictions)")
    p.add_argument("--no-saliency", action="store_true", help="skip the Grad-CAM saliency map")
    p.add_argument("--html", action="store_true",
                   help="also write STUDY_report.html: one self-contained page (images inline, no network) with "
                   "the class probabilities, the sequences used and missing, and each sequence's input slices "
                   "with the saliency overlay and the lesion box")
    p.add_argument("--checkpoint", default="best", choices=["best", "last"])
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default=None, choices=["auto", "fp32", "bf16"],
                   help="autocast precision of the model (default: the run's training.precision; auto = float32 on CPUs, bf16 on GPUs that have it)")
    p.add_argument("--threads", default="auto", metavar="N|auto",
                   help="PyTorch CPU threads (default auto: the free cores shared with the threads that read the "
                   "sequences in parallel; on an idle 2-core machine that is 1, the fastest measured)")
    p.set_defaults(func=run)


def parse_volumes(items: list[str]) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for item in items:
        if "=" not in item:
            raise StudyListError(f"volume argument '{item}' must look like MODALITY=PATH")
        m, p = item.split("=", 1)
        if m in out:
            raise StudyListError(f"modality '{m}' given twice")
        out[m.strip()] = Path(p)
    return out


def parse_lesion_box(items: list[str], space: str) -> LesionBox | None:
    """``--lesion-box`` arguments -> a :class:`LesionBox`: one bare box, or ``MODALITY=box`` per modality.

    >>> parse_lesion_box(["1,2,3,4,5,6"], "voxel").box
    (1.0, 2.0, 3.0, 4.0, 5.0, 6.0)
    >>> sorted(parse_lesion_box(["t2wi=1,2,3,4,5,6", "dwi=0,0,0,2,2,2"], "voxel").boxes)
    ['dwi', 't2wi']
    """
    if not items:
        return None
    named = [i for i in items if "=" in i]
    if named and len(named) != len(items) or (not named and len(items) > 1):
        raise StudyListError("--lesion-box: give one box for the whole study, or MODALITY=box for each modality")
    if not named:
        return LesionBox(space, box=parse_box(items[0], "--lesion-box"))
    boxes = {}
    for item in items:
        m, value = item.split("=", 1)
        if m.strip() in boxes:
            raise StudyListError(f"--lesion-box: modality '{m.strip()}' given twice")
        boxes[m.strip()] = parse_box(value, f"--lesion-box {m.strip()}")
    return LesionBox(space, boxes=boxes)


def read_study_json(path: Path) -> tuple[str, dict[str, Path], Path | None, LesionBox | None]:
    """``(study_id, modality -> path, roi_mask, lesion_box)`` from a JSON file holding one study-list line."""
    from medmap.data.studylist import _parse_line

    if not path.is_file():
        raise StudyListError(f"study file not found: {path}")
    try:
        obj = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise StudyListError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from e
    if isinstance(obj, dict):
        obj.setdefault("patient_id", obj.get("study_id", "unknown"))
        obj.setdefault("study_id", path.stem)
        obj.setdefault("organ", "unknown")
    study = _parse_line(obj, str(path), path.resolve().parent)
    return study.study_id, study.modalities, study.roi_mask, study.lesion_box


def run(args: argparse.Namespace) -> int:
    from medmap.inference import load_run, write_prediction
    from medmap.threads import configure_threads

    if args.study is not None and args.volumes:
        raise StudyListError("give either --study or MODALITY=PATH arguments, not both")
    if args.study is not None:
        study_id, paths, roi_mask, lesion_box = read_study_json(args.study)
    elif args.volumes:
        paths = parse_volumes(args.volumes)
        study_id, roi_mask, lesion_box = "study", None, None
    else:
        raise StudyListError("nothing to predict: give --study STUDY.json or MODALITY=PATH arguments")
    study_id = args.study_id or study_id
    roi_mask = args.roi_mask or roi_mask
    lesion_box = parse_lesion_box(args.lesion_box, args.box_space) or lesion_box
    # the sequences are read, decompressed and resampled by a pool of threads that shares the cores with torch
    configure_threads(args.threads if args.threads == "auto" else int(args.threads), num_workers=1)
    predictor = load_run(args.run_dir, which=args.checkpoint, device=args.device, precision=args.precision)
    pred = predictor.predict(paths, study_id=study_id, saliency_dir=None if args.no_saliency else args.out,
                             roi_mask=roi_mask, lesion_box=lesion_box, keep_inputs=args.html)
    if args.html:
        from medmap.evaluation.html_report import write_report

        page = write_report(pred, predictor.organ, args.out / f"{study_id}_report.html", paths=paths,
                            lesion_box=lesion_box, run_dir=args.run_dir.resolve(),
                            checkpoint=_checkpoint_label(args.run_dir, args.checkpoint))
        pred.extra["report_html"] = str(page)
    out_json = write_prediction(pred, args.out / f"{study_id}_prediction.json")
    print(json.dumps(pred.to_json(), indent=1))
    print(f"prediction written to {out_json}")
    if args.html:
        print(f"report written to {pred.extra['report_html']}")
    return 0


def _checkpoint_label(run_dir: Path, which: str) -> str:
    """``which`` and its weights file, when the run folder has the usual layout."""
    weights = run_dir / "checkpoints" / which / "model.safetensors"
    return f"{which} ({weights.resolve()})" if weights.is_file() else which
