"""Training-only augmentation of a preprocessed study (TorchIO).

The present modalities of one study are the channels of one ``torchio.ScalarImage``, so
every *spatial* transform (flip, affine) is drawn once and applied identically to all of
them (the sequences stay aligned), in one resampling call for all of them. Missing
modalities (``present == False``) are left out and stay all-zero. Intensity transforms act
on present modalities only: the bias field is one smooth field for the whole study (one
receive coil, one session), noise has one drawn level and independent values per channel,
and scale/shift is drawn per modality and leaves the zero background untouched.

Never use this in evaluation or prediction: :class:`~medmap.data.dataset.StudyDataset`
applies it only when given one, and only training code builds one.

Default config (every key optional; ``prob`` is the chance a transform is applied)::

    enabled: true
    flip:        {prob: 0.5, axes: [0]}        # RAS axis 0 = left-right; set prob 0 for the liver,
                                               # and when texts name a side (stage-1 pre-training)
    affine:      {prob: 0.5, degrees: 10, scales: 0.1, translation_mm: 5}
    bias_field:  {prob: 0.3, coefficients: 0.3}
    scale_shift: {prob: 0.5, scale: 0.1, shift: 0.1}  # x * U(1 +- scale) + U(+- shift), per modality
    noise:       {prob: 0.3, std: 0.05}        # Gaussian, std drawn from U(0, std) (z-score units)
    sequence_dropout: {prob: 0.0}              # each present sequence removed with this chance (at
                                               # least one kept): training for missing sequences

Example:
    >>> augment = build_augmentation({"flip": {"prob": 0.0}}, seed=0)
    >>> sample = augment(sample)  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable

import numpy as np
import torch
import torchio as tio

from medmap.config import deep_merge
from medmap.errors import ConfigError

DEFAULT_AUGMENTATION: dict[str, Any] = {
    "enabled": True,
    "flip": {"prob": 0.5, "axes": [0]},
    "affine": {"prob": 0.5, "degrees": 10.0, "scales": 0.1, "translation_mm": 5.0},
    "bias_field": {"prob": 0.3, "coefficients": 0.3},
    "scale_shift": {"prob": 0.5, "scale": 0.1, "shift": 0.1},
    "noise": {"prob": 0.3, "std": 0.05},
    "sequence_dropout": {"prob": 0.0},
}

Sample = dict[str, Any]


def _check_keys(cfg: dict[str, Any]) -> None:
    unknown = set(cfg) - set(DEFAULT_AUGMENTATION)
    if unknown:
        raise ConfigError(f"augmentation config: unknown keys {sorted(unknown)}; known: {sorted(DEFAULT_AUGMENTATION)}")
    for name, sub in cfg.items():
        if name == "enabled":
            continue
        if not isinstance(sub, dict):
            raise ConfigError(f"augmentation config: '{name}' must be a mapping")
        extra = set(sub) - set(DEFAULT_AUGMENTATION[name])
        if extra:
            raise ConfigError(f"augmentation config '{name}': unknown keys {sorted(extra)}")
        p = float(sub["prob"])
        if not 0.0 <= p <= 1.0:
            raise ConfigError(f"augmentation config '{name}.prob' must be in [0, 1], got {p}")


class StudyAugmentation:
    """Callable ``sample -> sample`` augmenting ``images`` of a preprocessed study.

    Reproducible: the random draws of the n-th call of an epoch depend only on ``seed``, the
    epoch, the data-loader worker's seed (when inside a worker) and n; the global RNG state is
    left untouched. The engines call :meth:`set_position` at the start of every epoch, so a
    resumed run draws exactly what the uninterrupted run drew.

    Args:
        cfg: augmentation config (see module docstring), merged over the defaults.
        seed: base seed.
    """

    def __init__(self, cfg: dict[str, Any] | None = None, seed: int = 0) -> None:
        self.cfg = deep_merge(DEFAULT_AUGMENTATION, cfg or {})
        _check_keys(self.cfg)
        self.seed = int(seed)
        self.epoch = 0
        self.calls = 0
        c = self.cfg
        spatial: list[tio.Transform] = []
        if c["flip"]["prob"] > 0:
            spatial.append(tio.RandomFlip(axes=tuple(int(a) for a in c["flip"]["axes"]), flip_probability=float(c["flip"]["prob"])))
        if c["affine"]["prob"] > 0:
            a = c["affine"]
            spatial.append(
                tio.RandomAffine(
                    scales=float(a["scales"]),
                    degrees=float(a["degrees"]),
                    translation=float(a["translation_mm"]),
                    default_pad_value=0.0,  # the preprocessed background is 0
                    p=float(a["prob"]),
                )
            )
        intensity: list[tio.Transform] = []
        if c["bias_field"]["prob"] > 0:
            intensity.append(tio.RandomBiasField(coefficients=float(c["bias_field"]["coefficients"]), p=float(c["bias_field"]["prob"])))
        self._spatial = tio.Compose(spatial) if spatial else None
        self._bias = tio.Compose(intensity) if intensity else None
        self._noise = (
            tio.RandomNoise(std=(0.0, float(c["noise"]["std"])), p=float(c["noise"]["prob"])) if c["noise"]["prob"] > 0 else None
        )

    def set_position(self, epoch: int, calls: int = 0) -> None:
        """Continue as at the start of ``epoch`` after ``calls`` samples of it were augmented."""
        self.epoch, self.calls = int(epoch), int(calls)

    def _call_seed(self) -> int:
        info = torch.utils.data.get_worker_info()
        worker_seed = int(info.seed) if info is not None else 0
        digest = hashlib.sha256(f"{self.seed}:{self.epoch}:{worker_seed}:{self.calls}".encode()).digest()
        self.calls += 1
        return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)

    def __call__(self, sample: Sample) -> Sample:
        if not self.cfg["enabled"]:
            return sample
        images: torch.Tensor = sample["images"]
        present = torch.as_tensor(sample["present"], dtype=torch.bool)
        idx = [int(i) for i in torch.nonzero(present).flatten()]
        if not idx:
            return sample
        seed = self._call_seed()
        affine = np.asarray(torch.as_tensor(sample["affine"], dtype=torch.float64))
        out = images.clone()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            subject = tio.Subject(study=tio.ScalarImage(tensor=images[idx].clone(), affine=affine))
            for t in (self._spatial, self._bias):
                if t is not None:
                    subject = t(subject)
            x_all = subject["study"].data.to(torch.float32)
            gen = torch.Generator().manual_seed(seed)
            ss = self.cfg["scale_shift"]
            for j, i in enumerate(idx):
                x = x_all[j]
                if ss["prob"] > 0 and torch.rand((), generator=gen) < ss["prob"]:
                    scale = 1.0 + (2 * torch.rand((), generator=gen) - 1) * float(ss["scale"])
                    shift = (2 * torch.rand((), generator=gen) - 1) * float(ss["shift"])
                    x = torch.where(x != 0, x * scale + shift, x)
                out[i] = x
            if self._noise is not None:
                out[idx] = self._noise(out[idx])
        result = dict(sample)
        result["images"] = out.to(images.dtype)
        if self.cfg["sequence_dropout"]["prob"] > 0:
            result.update(self._drop_sequences(result["images"], present, idx, seed))
        return result

    def _drop_sequences(self, images: torch.Tensor, present: torch.Tensor, idx: list[int], seed: int) -> Sample:
        """Remove each present sequence with probability ``sequence_dropout.prob``, keeping at
        least one: the removed ones become what a missing sequence is (zeros, ``present`` false).
        Its own generator, so the other transforms draw the same with or without it."""
        gen = torch.Generator().manual_seed(seed ^ 0x5EC0D)
        drop = torch.rand(len(idx), generator=gen) < float(self.cfg["sequence_dropout"]["prob"])
        if bool(drop.all()):
            drop[int(torch.randint(len(idx), (1,), generator=gen))] = False
        images, present = images.clone(), present.clone()
        for i, d in zip(idx, drop.tolist()):
            if d:
                images[i] = 0
                present[i] = False
        return {"images": images, "present": present}


def build_augmentation(cfg: dict[str, Any] | None, seed: int = 0) -> Callable[[Sample], Sample]:
    """Build the training augmentation (see :class:`StudyAugmentation`); ``enabled: false`` -> identity."""
    return StudyAugmentation(cfg, seed=seed)
