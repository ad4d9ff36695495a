"""MedMAP: 3D modality-aware vision-language pre-training for multi-sequence MRI."""

__version__ = "0.1.0"
