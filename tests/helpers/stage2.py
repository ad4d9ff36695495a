"""Tiny organs, text banks, encoders and batches shared by the stage-2 model and loss tests."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from medmap.config import OrganConfig
from medmap.models.encoders import build_encoders

ROI = (8, 8, 12)  # -> a 2 x 2 x 3 token grid with TINY_ARCH
TEXT_DIM = 12
TINY_ARCH = {"type": "cnn", "channels": [4, 8], "subunits": 1, "dim": 16, "norm": "instance"}


def make_organ(num_modalities: int = 3, num_classes: int = 3) -> OrganConfig:
    return OrganConfig(
        name="toy",
        modalities=[f"m{i}" for i in range(num_modalities)],
        classes=[f"c{i}" for i in range(num_classes)],
        spacing=(1.0, 1.0, 1.0),
        roi_size=ROI,
    )


def make_bank(organ: OrganConfig, prompts: int = 2, seed: int = 0) -> SimpleNamespace:
    """A stand-in for ``medmap.text.prompts.TextBank`` with random embeddings."""
    g = torch.Generator().manual_seed(seed)
    return SimpleNamespace(
        classes=list(organ.classes),
        modalities=list(organ.modalities),
        class_emb=torch.randn(organ.num_classes, prompts, TEXT_DIM, generator=g),
        modality_emb=torch.randn(len(organ.modalities), TEXT_DIM, generator=g),
    )


def make_encoders(organ: OrganConfig, shared: bool = False):
    return build_encoders(TINY_ARCH, {m: ROI for m in organ.modalities}, shared=shared)


def make_run_config(**ablation: bool) -> dict:
    return {
        "encoder": {"arch": TINY_ARCH},
        "model": {"num_heads": 2, "mlp_ratio": 2.0, "dropout": 0.0, "cct": {"layers": 1}},
        "loss": {"sup": "focal", "gamma": 2.0, "lambda_sim": 1.0, "lambda_kl": 0.5},
        "ablation": dict(ablation),
    }


def make_batch(organ: OrganConfig, b: int = 3, seed: int = 0, present: torch.Tensor | None = None):
    g = torch.Generator().manual_seed(seed)
    m = len(organ.modalities)
    images = torch.randn(b, m, *ROI, generator=g)
    if present is None:
        present = torch.rand(b, m, generator=g) > 0.4
        present[:, 0] |= ~present.any(1)  # at least one modality per study
    images = images * present[:, :, None, None, None]  # missing = zeros, as the data layer does
    labels = torch.arange(b) % organ.num_classes
    return images, present, labels
