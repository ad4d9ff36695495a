"""THE preprocessing function: one study's volumes (NIfTI or DICOM) -> model-ready tensors.

Training, evaluation and prediction all call :func:`preprocess_study` /
:func:`preprocess_volumes`, so a case gives the same tensor every time. Built on MONAI
dictionary transforms, applied per modality with the modality names as keys:

1. load through :func:`medmap.data.validate.check_volume` (same checks and messages as
   ``medmap validate``): a NIfTI file with nibabel, or a folder holding one DICOM series with
   SimpleITK (:mod:`medmap.data.dicom`, RAS affine as for NIfTI); require one voxel grid for
   all modalities;
2. channel first (``EnsureChannelFirstd``), orientation to RAS (``Orientationd``);
3. resampling to the organ's spacing (``Spacingd``, trilinear; :class:`StridedSpacingd` computes the same
   without copying the volume; steps 1-3 run per volume, the volumes in threads);
4. a *joint* foreground mask over the present modalities (each modality thresholded at 5%
   of its robust intensity range, union, largest connected component, holes filled), and a
   crop to its bounding box plus a margin (``CropForegroundd``), so modalities stay aligned.
   With ``crop: roi_mask`` in the organ config the crop is to the bounding box of the
   study's region-of-interest mask instead (e.g. a liver segmentation, resampled with the
   volumes), plus the same margin: a liver fills a few percent of an abdominal field of
   view and a few-voxel lesion is lost in it;
5. MRI intensity normalisation, per modality: z-score with the mean and standard deviation
   of the foreground voxels between its 0.5th and 99.5th percentiles, clip to +-``Z_CLIP``,
   zero outside the foreground. Never a CT window. With ``zero_outside_roi: true`` (and
   ``crop: roi_mask``) the ROI mask takes the foreground's place here: statistics over the
   organ, zero outside it;
6. pad or crop to the organ's ROI (``ResizeWithPadOrCropd``, centred, zero padding);
7. (lesion-level organ configs, ``crop: lesion_box`` or ``patch``, replace steps 1-6) each
   modality is cut around its own lesion box with a context margin, resampled to
   ``roi_size`` and normalised against the tissue around the lesion
   (:func:`medmap.data.lesion.cut_lesion_patch`); modalities may lie on different grids;
8. stack in the organ's modality order; a missing modality is an all-zero channel with
   ``present = False`` and is never read. Values are rounded to float16 precision (relative
   error <= 2**-11, about 0.005 at z = 10) so that the on-disk cache, which stores float16,
   returns exactly the tensor computed here.

Example:
    >>> from medmap.config import load_organ_config
    >>> brain = load_organ_config("brain")
    >>> out = preprocess_volumes({"t1": "t1.nii.gz", "flair": "flair.nii.gz"}, brain)  # doctest: +SKIP
    >>> out["images"].shape, out["present"].tolist()                                      # doctest: +SKIP
    (torch.Size([4, 80, 96, 80]), [True, False, False, True])
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Hashable, Mapping

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    CropForegroundd,
    EnsureChannelFirstd,
    MapTransform,
    Orientationd,
    ResizeWithPadOrCropd,
    Spacing,
)
from monai.networks.utils import to_norm_affine
from monai.utils.enums import LazyAttr
from scipy import ndimage

from medmap.config import OrganConfig, load_organ_config
from medmap.data.lesion import cut_lesion_patch, patch_box
from medmap.data.loading import map_ordered
from medmap.data.studylist import LesionBox, Study
from medmap.data.validate import check_roi_mask, check_same_grid, check_volume
from medmap.errors import StudyListError, VolumeError

if TYPE_CHECKING:
    from medmap.data.cache import PreprocessCache

#: Bump whenever the output of preprocessing changes for the same input; invalidates caches.
#: 3: the output affine of whole-volume configs carries the crop's z offset (MONAI 1.6's stale
#: spatial rank dropped it; the images are unchanged).
PREPROCESSING_VERSION = "3"
#: The same for the lesion-level path (``crop: lesion_box`` / ``patch``); unchanged by version 3.
LESION_PREPROCESSING_VERSION = "2"
#: Percentiles of the foreground voxels between which the z-score statistics are computed.
CLIP_PERCENTILES = (0.5, 99.5)
#: z-scores are clipped to +-Z_CLIP: far enough out that a small lesion keeps its contrast
#: (clipping raw intensities at the 99.5th percentile flattened any lesion smaller than 0.5%
#: of the foreground to the brightest normal tissue), close enough to tame spikes.
Z_CLIP = 8.0
#: A voxel is foreground in a modality when above this fraction of its robust range.
FOREGROUND_FRACTION = 0.05
#: Voxels kept around the foreground bounding box (at the organ's spacing).
CROP_MARGIN = 2
FOREGROUND_KEY = "foreground"
#: Key of the region-of-interest mask in the transform dictionaries (and the cache's file map).
ROI_KEY = "roi_mask"


def preprocessing_signature(organ: OrganConfig) -> dict[str, Any]:
    """Everything that determines the preprocessing output besides the files (cache key)."""
    signature = {
        "version": PREPROCESSING_VERSION,
        "modalities": list(organ.modalities),
        "spacing": [float(s) for s in organ.spacing],
        "roi_size": [int(s) for s in organ.roi_size],
        "clip_percentiles": list(CLIP_PERCENTILES),
        "foreground_fraction": FOREGROUND_FRACTION,
        "crop_margin": CROP_MARGIN,
    }
    if organ.crop != "foreground":  # only when set, so that foreground-crop cache keys stay as they were
        signature["crop"] = organ.crop
    if organ.zero_outside_roi:  # likewise
        signature["zero_outside_roi"] = True
    if organ.lesion_level:  # its own version: the whole-volume changes of version 3 left its output alone
        signature.update(version=LESION_PREPROCESSING_VERSION, margin_mm=[float(m) for m in organ.margin_mm],
                         patch_norm=organ.patch_norm, lesion_version="1")
        for key in ("spacing", "clip_percentiles", "foreground_fraction", "crop_margin"):
            signature.pop(key)
    return signature


class StridedSpacingd(MapTransform):
    """MONAI's ``Spacingd(pixdim, mode="bilinear", padding_mode="border", dtype=float32)``, the
    same output bit for bit, without its copy of the whole input volume into C order.

    MONAI computes the output grid (``Spacing`` in lazy mode: affine, shape, metadata) and
    this class does the resampling MONAI's ``AffineTransform`` would do, the same
    ``affine_grid`` and ``grid_sample`` calls, on the input as it lies in memory. A NIfTI
    volume lies in Fortran order; MONAI's ``src.contiguous()`` transposes all of it (about
    25 ms for a 1 mm brain volume) to then read 1 voxel in 64 of it at 4 mm. Inputs where the
    shortcut does not apply (C order, another dtype, pending lazy operations, an unchanged
    grid) go through ``Spacing`` itself.
    """

    def __init__(self, keys: list[str], pixdim: tuple[float, ...]) -> None:
        super().__init__(keys, allow_missing_keys=True)
        self.spacing = Spacing(pixdim=pixdim, mode="bilinear", padding_mode="border", dtype=np.float32)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.resample(d[key])
        return d

    def _monai(self, img: Any) -> Any:
        out = self.spacing(img)
        if isinstance(out, MetaTensor):
            # MONAI 1.6 leaves the MetaTensor's cached spatial rank at its default (2) here, and the crops
            # after it then drop their z translation from the affine; setting the affine re-syncs it
            out.affine = out.affine
        return out

    def resample(self, img: Any) -> Any:
        if (not isinstance(img, MetaTensor) or img.ndim != 4 or img.dtype != torch.float32 or img.is_contiguous()
                or img.pending_operations or img.device.type != "cpu"):
            return self._monai(img)
        pending = self.spacing(img, lazy=True)  # MONAI's grid: xform (output voxel -> input voxel) and shape
        op = pending.pending_operations[-1]
        size = [int(s) for s in op[LazyAttr.SHAPE]]
        if size == [int(s) for s in img.shape[1:]]:  # MONAI may keep the input as it is: let it decide
            return self._monai(img)
        xform = torch.as_tensor(op[LazyAttr.AFFINE], dtype=torch.float64)
        src = img.as_tensor()[None]  # [1, C, X, Y, Z], a view
        # monai.networks.layers.AffineTransform(normalized=False, align_corners=False, reverse_indexing=True)
        theta = to_norm_affine(affine=xform.to(src)[None].clone(), src_size=tuple(src.shape[2:]),
                               dst_size=tuple(size), align_corners=False, zero_centered=False)
        rev = torch.as_tensor([2, 1, 0])
        theta[:, :3] = theta[:, rev]
        theta[:, :, :3] = theta[:, :, rev]
        grid = torch.nn.functional.affine_grid(theta=theta[:, :3], size=[1, src.shape[1], *size], align_corners=False)
        out = torch.nn.functional.grid_sample(src, grid, mode="bilinear", padding_mode="border", align_corners=False)[0]
        result = MetaTensor(out, meta=dict(img.meta))
        result.affine = pending.peek_pending_affine()
        return result


class JointForegroundMaskd(MapTransform):
    """Add one foreground mask shared by all present modalities (union of per-modality masks).

    Each modality is thresholded at ``lo + fraction * (hi - lo)`` with ``lo``/``hi`` its 0.5th
    and 99.5th percentiles (robust to a few hot voxels); the union is reduced to its largest
    connected component (drops specks of background noise) and its holes are filled (keeps
    dark structures inside the organ, such as ventricles, in the foreground).
    """

    def __init__(self, keys: list[str], mask_key: str = FOREGROUND_KEY, fraction: float = FOREGROUND_FRACTION) -> None:
        super().__init__(keys, allow_missing_keys=True)
        self.mask_key = mask_key
        self.fraction = fraction

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        present = [k for k in self.key_iterator(d)]
        union: np.ndarray | None = None
        for key in present:
            x = np.asarray(d[key][0].detach().cpu().numpy(), dtype=np.float32)
            lo, hi = np.percentile(x, [0.5, 99.5])
            m = x > lo + self.fraction * (hi - lo)
            union = m if union is None else (union | m)
        assert union is not None, "JointForegroundMaskd needs at least one present modality"
        labels, n = ndimage.label(union)
        if n > 1:
            sizes = np.bincount(labels.ravel())
            sizes[0] = 0
            union = labels == int(sizes.argmax())
        union = ndimage.binary_fill_holes(union)
        if not union.any():  # nothing stands out: keep the whole field of view
            union = np.ones_like(union, dtype=bool)
        ref = d[present[0]]
        d[self.mask_key] = MetaTensor(torch.from_numpy(union[None].astype(np.float32)), meta=dict(ref.meta))
        return d


class RobustZScoreNormalized(MapTransform):
    """MRI intensity normalisation: robust z-score over the foreground, outliers clipped.

    For each modality: the mean and standard deviation are computed over the foreground
    voxels between the ``percentiles`` (robust to spikes and to the lesion itself); the
    volume is z-scored with them, clipped to ``[-z_clip, z_clip]``, and voxels outside the
    foreground are set to 0. Intensities are never clipped at a percentile: a lesion
    covering less than 0.5% of the foreground must stay brighter (or darker) than normal
    tissue.
    """

    def __init__(self, keys: list[str], mask_key: str = FOREGROUND_KEY,
                 percentiles: tuple[float, float] = CLIP_PERCENTILES, z_clip: float = Z_CLIP) -> None:
        super().__init__(keys, allow_missing_keys=True)
        self.mask_key = mask_key
        self.percentiles = percentiles
        self.z_clip = z_clip

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        mask = torch.as_tensor(d[self.mask_key]).as_subclass(torch.Tensor)[0] > 0
        for key in self.key_iterator(d):
            img = d[key]
            x = img.as_tensor()[0].to(torch.float32)
            fg = x[mask].numpy()
            lo, hi = (float(v) for v in np.percentile(fg, self.percentiles))
            core = fg[(fg >= lo) & (fg <= hi)].astype(np.float64)
            mean, std = float(core.mean()), float(core.std())
            x = ((x - mean) / (std if std > 1e-8 else 1.0)).clamp(-self.z_clip, self.z_clip)
            x = torch.where(mask, x, torch.zeros_like(x))
            out = img.clone()
            out[0] = x
            d[key] = out
        return d


def _geometry_transforms(organ: OrganConfig) -> list[MapTransform]:
    """Steps 2-3, per volume (each key on its own): channel first, RAS, the organ's spacing."""
    geometry = list(organ.modalities) + [ROI_KEY]  # the ROI mask (when given) is resampled and cropped with the volumes
    return [
        EnsureChannelFirstd(geometry, channel_dim="no_channel", allow_missing_keys=True),
        Orientationd(geometry, axcodes="RAS", labels=None, allow_missing_keys=True),
        StridedSpacingd(geometry, pixdim=tuple(organ.spacing)),  # = Spacingd(bilinear, border, float32)
    ]


def _joint_transforms(organ: OrganConfig) -> list[MapTransform]:
    """Steps 4-6, over all volumes of the study together: joint mask, crop, normalisation, ROI size."""
    keys = list(organ.modalities)
    geometry = keys + [ROI_KEY]
    crop_source = ROI_KEY if organ.crop == "roi_mask" else FOREGROUND_KEY
    return [
        JointForegroundMaskd(keys),
        CropForegroundd(
            geometry + [FOREGROUND_KEY],
            source_key=crop_source,  # crops to voxels > 0: any part of a resampled mask voxel counts
            margin=CROP_MARGIN,
            allow_smaller=True,
            allow_missing_keys=True,
            start_coord_key=None,
            end_coord_key=None,
        ),
        # z-score over the body, or over the ROI mask when only the organ is kept
        RobustZScoreNormalized(keys, mask_key=ROI_KEY if organ.zero_outside_roi else FOREGROUND_KEY),
        ResizeWithPadOrCropd(keys, spatial_size=tuple(organ.roi_size), mode="constant", allow_missing_keys=True),
    ]


def build_preprocessing(organ: OrganConfig) -> Compose:
    """The MONAI transform chain for one organ (keys: the organ's modalities, missing allowed).

    :func:`_compute` runs its first three steps (per volume) in the threads that read the
    files, then the rest on the study; the output is the same as this chain's.
    """
    return Compose(_geometry_transforms(organ) + _joint_transforms(organ))


def _check_modalities(paths: Mapping[str, Any], organ: OrganConfig) -> None:
    unknown = [m for m in paths if m not in organ.modalities]
    if unknown:
        raise VolumeError(
            f"unknown modality {', '.join(repr(m) for m in unknown)} for organ '{organ.name}' "
            f"(expected some of {', '.join(organ.modalities)})"
        )
    if len(paths) < organ.min_modalities:
        raise VolumeError(
            f"{len(paths)} modalities given; organ '{organ.name}' needs at least {organ.min_modalities} "
            f"of {', '.join(organ.modalities)}"
        )


def _compute(paths: Mapping[str, Path], organ: OrganConfig, roi_mask: Path | None = None,
             round_float16: bool = True) -> dict[str, torch.Tensor]:
    data: dict[str, MetaTensor] = {}
    grids: dict[str, tuple[tuple[int, ...], np.ndarray]] = {}
    files: dict[str, Path] = {m: paths[m] for m in organ.modalities if m in paths}
    if roi_mask is not None:  # after the volumes: the first volume is the reference grid
        files[ROI_KEY] = roi_mask

    def load(item: tuple[str, Path]) -> tuple[tuple[int, ...], np.ndarray, MetaTensor]:
        key, file = item
        img = check_roi_mask(file) if key == ROI_KEY else check_volume(file)
        affine = np.asarray(img.affine, dtype=np.float64)
        voxels = np.asarray(img.get_fdata(dtype=np.float32))
        if key == ROI_KEY:
            voxels = (voxels != 0).astype(np.float32)
        # the file's (Fortran) memory order is kept: StridedSpacingd samples it without a transposed copy
        tensor = MetaTensor(torch.from_numpy(voxels), affine=torch.from_numpy(affine),
                            meta={"filename_or_obj": str(file), "space": "RAS"})  # nibabel affines are RAS
        # steps 2-3 act on each volume alone: done here, in this file's thread
        return tuple(img.shape), affine, Compose(_geometry_transforms(organ))({key: tensor})[key]

    # the files are read and resampled in threads (decompression, numpy and torch release the GIL);
    # errors come in file order, as when read one after the other
    for key, (shape, affine, tensor) in zip(files, map_ordered(load, list(files.items()))):
        grids[key] = (shape, affine)
        data[key] = tensor
    check_same_grid(grids)
    out = Compose(_joint_transforms(organ))(data)
    roi = tuple(int(s) for s in organ.roi_size)
    images = torch.zeros((len(organ.modalities), *roi), dtype=torch.float32)
    present = torch.zeros(len(organ.modalities), dtype=torch.bool)
    affine: torch.Tensor | None = None
    for i, modality in enumerate(organ.modalities):
        if modality in data:
            t = out[modality]
            images[i] = t.as_tensor()[0].to(torch.float32)
            present[i] = True
            if affine is None:
                affine = torch.as_tensor(t.affine, dtype=torch.float64).clone()
    assert affine is not None
    # float16-representable values: the cache stores float16 and must return identical tensors.
    if round_float16:
        images = images.to(torch.float16).to(torch.float32)
    return {"images": images, "present": present, "affine": affine}


def _compute_lesion(paths: Mapping[str, Path], organ: OrganConfig, lesion_box: LesionBox | None) -> dict[str, torch.Tensor]:
    """Lesion-level preprocessing: each modality cut around its own box (medmap.data.lesion)."""
    roi = tuple(int(s) for s in organ.roi_size)
    images = torch.zeros((len(organ.modalities), *roi), dtype=torch.float32)
    present = torch.zeros(len(organ.modalities), dtype=torch.bool)
    affine: np.ndarray | None = None

    def cut(modality: str) -> Any:
        img = check_volume(paths[modality])
        space, box = "voxel", lesion_box.for_modality(modality) if lesion_box is not None else None
        if lesion_box is not None and box is not None:
            space = lesion_box.space
        elif organ.crop == "patch":
            box = patch_box(img.shape, img.affine, organ.margin_mm)
        else:
            raise VolumeError(f"{paths[modality]}: no lesion box for modality '{modality}' (organ config '{organ.name}' "
                              "cuts each modality around its own box: add it to 'lesion_box.boxes')")
        try:
            return cut_lesion_patch(img, box, space, organ.margin_mm, roi, organ.patch_norm)
        except VolumeError as e:
            raise VolumeError(f"{paths[modality]}: {e}") from e

    # modalities in threads (decompression releases the GIL); the first error in modality order, as serially
    order = [(i, m) for i, m in enumerate(organ.modalities) if m in paths]
    for (i, _), patch in zip(order, map_ordered(cut, [m for _, m in order])):
        images[i] = torch.from_numpy(patch.image)
        present[i] = True
        if affine is None:
            affine = patch.affine
    assert affine is not None
    images = images.to(torch.float16).to(torch.float32)  # the cache stores float16
    return {"images": images, "present": present, "affine": torch.from_numpy(affine)}


def preprocess_volumes(
    paths: Mapping[str, str | Path],
    organ: OrganConfig | str | Path,
    cache: PreprocessCache | None = None,
    roi_mask: str | Path | None = None,
    lesion_box: LesionBox | None = None,
) -> dict[str, torch.Tensor]:
    """Preprocess the volumes of one study, given as modality -> NIfTI path (prediction entry).

    Args:
        paths: modality name -> NIfTI file or DICOM series folder; any subset of the organ's
            modalities.
        organ: organ config, or a built-in name / YAML path.
        cache: optional :class:`~medmap.data.cache.PreprocessCache`.
        roi_mask: the study's region-of-interest mask (NIfTI on the volumes' grid); required
            by, and only read for, organ configs with ``crop: roi_mask``.
        lesion_box: the lesion's box (per modality or for the study); required by organ
            configs with ``crop: lesion_box``, optional with ``crop: patch``, ignored otherwise.

    Returns:
        ``{"images": float32 [M, X, Y, Z], "present": bool [M], "affine": float64 [4, 4]}``,
        modalities in the organ's order, ``affine`` mapping voxels of the preprocessed grid
        to RAS millimetres.

    Raises:
        VolumeError: an unknown modality, too few modalities, a volume failing
            :func:`~medmap.data.validate.check_volume`, modalities on different grids, or
            (``crop: roi_mask``) a missing, empty or misaligned ROI mask.
    """
    organ = load_organ_config(organ)
    files = {str(m): Path(p) for m, p in paths.items()}
    _check_modalities(files, organ)
    if organ.lesion_level:
        if organ.crop == "lesion_box" and lesion_box is None:
            raise VolumeError(
                f"organ config '{organ.name}' cuts each modality around the lesion (crop: lesion_box) and no box was "
                "given: add 'lesion_box' to the study list line, or pass --lesion-box to medmap predict"
            )
        if cache is None:
            return _compute_lesion(files, organ, lesion_box)
        signature = {**preprocessing_signature(organ), "lesion_box": None if lesion_box is None else lesion_box.to_json()}
        return cache.get_or_compute(files, signature, lambda: _compute_lesion(files, organ, lesion_box))
    mask: Path | None = None
    if organ.crop == "roi_mask":
        if roi_mask is None:
            raise VolumeError(
                f"organ config '{organ.name}' crops to a region-of-interest mask (crop: roi_mask) and none was "
                "given: add 'roi_mask' to the study list line, or pass --roi-mask to medmap predict"
            )
        mask = Path(roi_mask)
    if cache is None:
        return _compute(files, organ, mask)
    keyed = files if mask is None else {**files, ROI_KEY: mask}
    return cache.get_or_compute(keyed, preprocessing_signature(organ), lambda: _compute(files, organ, mask))


def preprocess_study(
    study: Study,
    organ: OrganConfig | str | Path,
    cache: PreprocessCache | None = None,
) -> dict[str, torch.Tensor]:
    """Preprocess one :class:`~medmap.data.studylist.Study` (training/evaluation entry).

    Same output as :func:`preprocess_volumes`. Raises :class:`StudyListError` when the
    study belongs to another organ.
    """
    organ = load_organ_config(organ)
    if study.organ != organ.name:
        raise StudyListError(f"study '{study.study_id}' is a {study.organ} study, not {organ.name}")
    try:
        return preprocess_volumes(study.modalities, organ, cache=cache, roi_mask=study.roi_mask,
                                  lesion_box=study.lesion_box)
    except VolumeError as e:
        raise VolumeError(f"study '{study.study_id}': {e}") from e
