"""How hard is MedMoM-Synth? A simple, honest baseline on intensity statistics.

For every study and modality, the volume is z-scored inside the organ mask (the
generator's ``meta["organ_mask"]``) and summarised by percentiles, mean, standard
deviation and skewness of the z-scored intensities in the mask (the mean is 0 and the
standard deviation 1 by construction, so the raw mean and standard deviation relative to
the whole body/brain are added). A logistic regression (standardised features, C chosen
by 5-fold cross-validation on the train split) is trained on the train split and scored
on the test split, for each single modality and for all modalities together; chance is
the majority-class rate of the test split.

Usage::

    python benchmarks/synth_baseline.py data/synth            # all organs in the list
    python benchmarks/synth_baseline.py data/synth --organ liver --eval-split val

Use ``--eval-split val`` while tuning the generator; report ``test`` only.
"""

from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

# The features and the classifier live in the package, shared with the experiment grid's
# "intensity statistics" row (medmap experiment ...).
from medmap.experiments.baselines import PERCENTILES, fit_intensity_classifier, modality_features, study_features  # noqa: E402,F401


def evaluate(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray, seed: int = 0) -> dict[str, float]:
    from sklearn.metrics import balanced_accuracy_score

    clf = fit_intensity_classifier(x_train, y_train, seed=seed)
    pred = clf.predict(x_test)
    return {"accuracy": float((pred == y_test).mean()), "balanced_accuracy": float(balanced_accuracy_score(y_test, pred))}


def run(folder: Path, organ: str, eval_split: str, workers: int) -> dict[str, object]:
    from medmap.config import load_organ_config
    from medmap.data.studylist import read_study_list

    studies = read_study_list(folder / "studies.jsonl", organ=organ)
    organ_cfg = load_organ_config(organ)
    records = [(str(folder), {m: str(p) for m, p in s.modalities.items()}, s.meta["organ_mask"]) for s in studies]
    with ProcessPoolExecutor(workers) as ex:
        feats = list(ex.map(study_features, records, chunksize=4))
    y = np.array([organ_cfg.classes.index(s.label) for s in studies])
    split = np.array([s.split for s in studies])
    tr, te = split == "train", split == eval_split
    counts = np.bincount(y[te], minlength=organ_cfg.num_classes)
    result: dict[str, object] = {"organ": organ, "n_train": int(tr.sum()), f"n_{eval_split}": int(te.sum()),
                                 "chance_accuracy": float(counts.max() / counts.sum()),
                                 "chance_balanced_accuracy": 1.0 / organ_cfg.num_classes}
    mods = organ_cfg.modalities
    rows = {}
    for m in mods:
        x = np.stack([f[m] for f in feats])
        rows[m] = evaluate(x[tr], y[tr], x[te], y[te])
    x_all = np.stack([np.concatenate([f[m] for m in mods]) for f in feats])
    rows["all"] = evaluate(x_all[tr], y[tr], x_all[te], y[te])
    result["baseline"] = rows
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", type=Path, help="a MedMoM-Synth output folder (with studies.jsonl)")
    ap.add_argument("--organ", choices=["brain", "liver", "all"], default="all")
    ap.add_argument("--eval-split", choices=["val", "test"], default="test")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None, help="also write the results as JSON")
    args = ap.parse_args(argv)
    organs = ["brain", "liver"] if args.organ == "all" else [args.organ]
    results = []
    for organ in organs:
        r = run(args.folder, organ, args.eval_split, args.workers)
        results.append(r)
        print(f"\n{organ}: train n={r['n_train']}, {args.eval_split} n={r[f'n_{args.eval_split}']}, "
              f"chance acc={r['chance_accuracy']:.3f}, chance bal-acc={r['chance_balanced_accuracy']:.3f}")
        print(f"{'modalities':<12} {'accuracy':>9} {'bal. acc':>9}")
        for m, v in r["baseline"].items():  # type: ignore[union-attr]
            print(f"{m:<12} {v['accuracy']:>9.3f} {v['balanced_accuracy']:>9.3f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
