"""Training-only augmentation of a preprocessed study (torch, one call for all sequences).

Every *spatial* transform (flip, affine) is drawn once per study and applied identically to
all of its present sequences (they stay aligned), in one ``grid_sample`` call for all of
them. The affine (rotation, scaling, translation) is drawn in world millimetres and degrees,
about the centre of the volume, and carried to voxels through the study's affine, so it is
the same physical motion whatever the voxel spacing. Missing modalities (``present ==
False``) are left out and stay all-zero. Intensity transforms act on present modalities
only: the bias field is one smooth multiplicative field for the whole study (one receive
coil, one session; ``exp`` of a random polynomial of degree 3 over the volume, as TorchIO's
``RandomBiasField``), noise has one drawn level and independent values per channel, and
scale/shift is drawn per modality and leaves the zero background untouched.

Earlier versions called TorchIO per study; the draws were the same kinds, but its per-call
overhead (a subject copy, global-RNG seeding and one SimpleITK resampling per sequence) made
it several times slower (``python -m medmap.benchmark --sections step_costs``,
docs/performance.md). Everything here is a few tensor operations on the whole study.

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

import torch
import torch.nn.functional as F

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
        gen = torch.Generator().manual_seed(seed)  # every draw of this call; the global RNG is untouched
        c = self.cfg
        x = images[idx].to(torch.float32)
        if _happens(c["flip"]["prob"], gen):
            x = x.flip([int(a) + 1 for a in c["flip"]["axes"]])
        if _happens(c["affine"]["prob"], gen):
            a = c["affine"]
            x = random_affine(x, torch.as_tensor(sample["affine"], dtype=torch.float64), float(a["degrees"]),
                              float(a["scales"]), float(a["translation_mm"]), gen)
        if _happens(c["bias_field"]["prob"], gen):
            x = x * bias_field(x.shape[1:], float(c["bias_field"]["coefficients"]), gen)
        ss = c["scale_shift"]
        for j in range(len(idx)):
            if _happens(ss["prob"], gen):
                scale = 1.0 + _uniform(gen, float(ss["scale"]))
                shift = _uniform(gen, float(ss["shift"]))
                x[j] = torch.where(x[j] != 0, x[j] * scale + shift, x[j])
        if _happens(c["noise"]["prob"], gen):
            std = float(torch.rand((), generator=gen, dtype=torch.float64)) * float(c["noise"]["std"])
            x = x + std * torch.randn(x.shape, generator=gen)
        out = images.clone()
        out[idx] = x.to(images.dtype)
        result = dict(sample)
        result["images"] = out
        if c["sequence_dropout"]["prob"] > 0:
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


def _uniform(gen: torch.Generator, half_width: float) -> float:
    """One draw from ``U(-half_width, half_width)``."""
    return (2.0 * float(torch.rand((), generator=gen, dtype=torch.float64)) - 1.0) * half_width


def _happens(prob: float, gen: torch.Generator) -> bool:
    """Whether a transform with probability ``prob`` is applied (no draw when ``prob`` is 0)."""
    return prob > 0 and float(torch.rand((), generator=gen, dtype=torch.float64)) < prob


def _rotation(angles_rad: torch.Tensor) -> torch.Tensor:
    """``R = Rz Ry Rx`` (float64 ``[3, 3]``) for rotations about the world x, y and z axes."""
    cx, cy, cz = torch.cos(angles_rad).tolist()
    sx, sy, sz = torch.sin(angles_rad).tolist()
    rx = torch.tensor([[1, 0, 0], [0, cx, -sx], [0, sx, cx]], dtype=torch.float64)
    ry = torch.tensor([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]], dtype=torch.float64)
    rz = torch.tensor([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]], dtype=torch.float64)
    return rz @ ry @ rx


def random_affine(x: torch.Tensor, affine: torch.Tensor, degrees: float, scales: float, translation_mm: float,
                  gen: torch.Generator) -> torch.Tensor:
    """Resample ``x`` (``[C, X, Y, Z]``, one study's sequences) under one random world-space affine:
    rotation angles ``U(+-degrees)`` and scale factors ``U(1 +- scales)`` per world axis and a
    translation ``U(+-translation_mm)`` per axis (see :func:`world_affine`).

    >>> g = torch.Generator().manual_seed(0)
    >>> random_affine(torch.ones(2, 8, 8, 4), torch.eye(4, dtype=torch.float64), 10.0, 0.1, 2.0, g).shape
    torch.Size([2, 8, 8, 4])
    """
    angles = (2 * torch.rand(3, generator=gen, dtype=torch.float64) - 1) * degrees
    factors = 1.0 + (2 * torch.rand(3, generator=gen, dtype=torch.float64) - 1) * scales
    shift_mm = (2 * torch.rand(3, generator=gen, dtype=torch.float64) - 1) * translation_mm
    return world_affine(x, affine, angles, factors, shift_mm)


def world_affine(x: torch.Tensor, affine: torch.Tensor, angles_deg: torch.Tensor, factors: torch.Tensor,
                 shift_mm: torch.Tensor) -> torch.Tensor:
    """Resample ``x`` (``[C, X, Y, Z]``) so that the output at world offset ``w`` from the volume
    centre shows the input at ``R S w + shift_mm`` (``R = Rz Ry Rx`` of ``angles_deg``, ``S =
    diag(factors)``); trilinear, zero outside the volume.

    ``affine`` (voxel -> world mm) carries the motion to voxel indices, so anisotropic voxels
    see the same physical rotation as isotropic ones.

    >>> x = torch.arange(4.0).reshape(1, 4, 1, 1).expand(1, 4, 2, 2)
    >>> spacing_2mm = torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0], dtype=torch.float64))
    >>> no_turn, unit = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    >>> shift = torch.tensor([2.0, 0.0, 0.0], dtype=torch.float64)   # 2 mm = one voxel along x
    >>> world_affine(x, spacing_2mm, no_turn, unit, shift)[0, :, 0, 0]
    tensor([1., 2., 3., 0.])
    """
    linear = affine[:3, :3].to(torch.float64)
    world = _rotation(torch.deg2rad(angles_deg.to(torch.float64))) @ torch.diag(factors.to(torch.float64))
    voxel = torch.linalg.solve(linear, world @ linear)         # the same map on centred voxel indices
    voxel_shift = torch.linalg.solve(linear, shift_mm.to(torch.float64))
    half = (torch.tensor(x.shape[1:], dtype=torch.float64) - 1).clamp(min=1) / 2
    # grid_sample's normalised coordinates (align_corners=True): u = centred index / half, axes reversed
    theta_lin = (voxel * half[None, :] / half[:, None]).flip(0, 1)
    theta_shift = (voxel_shift / half).flip(0)
    theta = torch.cat([theta_lin, theta_shift[:, None]], dim=1)[None].to(torch.float32)
    grid = F.affine_grid(theta, [1, x.shape[0], *x.shape[1:]], align_corners=True)
    return F.grid_sample(x[None], grid, mode="bilinear", padding_mode="zeros", align_corners=True)[0]


def bias_field(shape: tuple[int, ...] | torch.Size, coefficients: float, gen: torch.Generator,
               order: int = 3) -> torch.Tensor:
    """A smooth multiplicative field ``exp(sum_{i+j+k <= order} c_ijk x^i y^j z^k)`` on ``[-1, 1]^3``
    with ``c ~ U(+-coefficients)`` (``[X, Y, Z]``, float32): TorchIO's ``RandomBiasField`` model.

    >>> f = bias_field((4, 4, 4), 0.0, torch.Generator().manual_seed(0))
    >>> bool((f == 1).all())
    True
    """
    axes = [torch.linspace(-1.0, 1.0, int(n), dtype=torch.float64) for n in shape]
    xx, yy, zz = torch.meshgrid(*axes, indexing="ij")
    px, py, pz = ([v**i for i in range(order + 1)] for v in (xx, yy, zz))  # powers, computed once
    log_field = torch.zeros(tuple(int(n) for n in shape), dtype=torch.float64)
    for i in range(order + 1):
        for j in range(order + 1 - i):
            for k in range(order + 1 - i - j):
                log_field += _uniform(gen, coefficients) * px[i] * py[j] * pz[k]
    return torch.exp(log_field).to(torch.float32)
