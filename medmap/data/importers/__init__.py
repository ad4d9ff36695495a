"""Readers of public MRI datasets in their download layouts, writing MedMAP study lists.

Each importer walks a dataset folder and returns :class:`medmap.data.studylist.Study`
objects with the organ config's modality and class names (``medmap import``,
:mod:`medmap.cli.import_data`, writes them with :func:`medmap.data.studylist.write_study_list`):

* :func:`import_lld_mmri` -- LLD-MMRI liver lesions, whole volumes with per-series boxes or
  pre-cropped patches (:mod:`medmap.data.importers.lld_mmri`);
* :func:`import_brats` -- BraTS 2021 / 2023 glioma cases as ``tumour``, optionally with IXI
  healthy volunteers as ``normal`` (:mod:`medmap.data.importers.brats`).

Malformed input raises :class:`medmap.errors.StudyListError` naming the case.

Example:
    >>> from medmap.data.importers import import_brats
    >>> result = import_brats("BraTS2021_Training_Data", normal_root="IXI")  # doctest: +SKIP
    >>> result.studies[0].modalities["flair"]                                # doctest: +SKIP
    PosixPath('/data/BraTS2021_Training_Data/BraTS2021_00000/BraTS2021_00000_flair.nii.gz')
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from medmap.data.studylist import Study

#: File endings of NIfTI volumes, longest first.
NIFTI_SUFFIXES = (".nii.gz", ".nii")


@dataclass
class ImportResult:
    """What an importer found.

    Attributes:
        studies: the studies, in a deterministic order.
        layout: the layout read (``volumes``, ``patches``, ``brats2021``, ...).
        notes: things worth telling the user that are not errors (skipped files, ...).
    """

    studies: list[Study]
    layout: str
    notes: list[str] = field(default_factory=list)


def nifti_stem(path: Path) -> str | None:
    """The file name without ``.nii.gz`` / ``.nii``, or ``None`` for other files.

    >>> nifti_stem(Path("a/C+A.nii.gz"))
    'C+A'
    """
    for suffix in NIFTI_SUFFIXES:
        if path.name.endswith(suffix) and len(path.name) > len(suffix):
            return path.name[: -len(suffix)]
    return None


# Imported last: the submodules use ImportResult and nifti_stem from this package.
from medmap.data.importers.brats import import_brats  # noqa: E402
from medmap.data.importers.lld_mmri import detect_layout, import_lld_mmri  # noqa: E402

__all__ = ["ImportResult", "detect_layout", "import_brats", "import_lld_mmri", "nifti_stem"]
