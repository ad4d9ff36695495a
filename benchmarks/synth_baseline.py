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
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import stats

PERCENTILES = (1, 5, 10, 25, 50, 75, 90, 95, 99, 99.9)


def modality_features(volume: np.ndarray, organ_mask: np.ndarray) -> np.ndarray:
    """Statistics of the z-scored intensities inside the organ mask."""
    body = volume[volume > 0]
    inside = volume[organ_mask].astype(np.float64)
    mu, sd = inside.mean(), inside.std() + 1e-6
    z = (inside - mu) / sd
    ref = body.mean() + 1e-6 if body.size else 1.0
    feats = list(np.percentile(z, PERCENTILES))
    feats += [float(stats.skew(z)), float(stats.kurtosis(z)), mu / ref, sd / ref, float((z > 2).mean()), float((z < -2).mean())]
    return np.asarray(feats, dtype=np.float64)


def study_features(record: tuple[str, dict[str, str], str]) -> dict[str, np.ndarray]:
    """Features of one study: modality -> feature vector."""
    base, modalities, mask_path = record
    mask = np.asarray(nib.load(Path(base) / mask_path).dataobj) > 0
    return {m: modality_features(np.asarray(nib.load(p).get_fdata(dtype=np.float32)), mask) for m, p in modalities.items()}


def evaluate(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray, seed: int = 0) -> dict[str, float]:
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegressionCV(Cs=8, cv=5, max_iter=3000, scoring="accuracy", random_state=seed))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # scikit-learn 1.9 API-transition notices
        clf.fit(x_train, y_train)
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
