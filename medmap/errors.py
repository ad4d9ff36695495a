"""Exceptions raised by MedMAP.

Every error a user can trigger with bad input derives from :class:`MedMAPError`, so the
command line can print a clear one-line message instead of a traceback.
"""


class MedMAPError(Exception):
    """Base class for all errors caused by user input or configuration."""


class ConfigError(MedMAPError):
    """A configuration file is missing, malformed or inconsistent."""


class StudyListError(MedMAPError):
    """A study list (JSON Lines) is malformed: bad JSON, missing keys, wrong types."""


class VolumeError(MedMAPError):
    """A NIfTI volume cannot be used: missing, corrupt, not 3D, NaN/Inf, constant, bad affine."""


class CheckpointError(MedMAPError):
    """A run folder or checkpoint is missing, incomplete or incompatible."""
