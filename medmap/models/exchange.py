"""Cross-sequence exchange: let the encoders of different sequences see each other at every scale.

One encoder per sequence (the paper's modality-aware design) keeps each sequence's features
apart until CSA and CCT, on a coarse token grid. Measured on MedMoM-Synth brain, that is too
late: the voxel-level contrast between sequences (enhancement on T1ce against T1, oedema
bright on FLAIR where CSF is not) is what an early-fusion CNN learns first, and per-sequence
encoders fused on the token grid learnt far more slowly (docs/results.md, "What made the
models learn"). HyperDenseNet (Dolz et al., 2019) keeps one path per MRI sequence and connects
them densely at every layer; this module is the light form of that idea:

after stage ``s`` of every sequence's CNN encoder, each sequence's feature map ``h_m`` gets
``h_m <- h_m + W_m^s [h_1 * p_1; ...; h_M * p_M]`` with ``W^s`` a 1x1x1 convolution over the
concatenated feature maps of all sequences (``p_k`` = 1 when sequence ``k`` is present, so a
missing sequence contributes nothing and receives nothing). ``W^s`` starts at zero, so at
the start of fine-tuning every encoder computes exactly what stage 1 taught it; the
encoders' own weights (and their stage-1 checkpoints) are unchanged by the module.

Example:
    >>> import torch
    >>> ex = CrossSequenceExchange([4, 8], num_modalities=3)
    >>> feats = [torch.randn(2, 4, 6, 6, 4) for _ in range(3)]
    >>> out = ex(0, feats, torch.ones(2, 3, dtype=torch.bool))
    >>> all(torch.equal(a, b) for a, b in zip(out, feats))   # zero-initialised: identity at start
    True
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn


class CrossSequenceExchange(nn.Module):
    """Zero-initialised 1x1x1 exchange between the feature maps of ``num_modalities`` encoders.

    Args:
        channels: channels of each encoder stage's output (the same for every sequence).
        num_modalities: ``M``.
    """

    def __init__(self, channels: Sequence[int], num_modalities: int) -> None:
        super().__init__()
        self.num_modalities = int(num_modalities)
        self.mix = nn.ModuleList(nn.Conv3d(num_modalities * c, num_modalities * c, kernel_size=1) for c in channels)
        for conv in self.mix:
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)

    def forward(self, stage: int, feats: Sequence[Tensor], present: Tensor) -> list[Tensor]:
        """Args: the stage index; ``M`` feature maps ``[B, C, ...]`` in modality order (any
        values where absent); ``present`` bool ``[B, M]``. Returns the updated maps."""
        keep = [present[:, m].view(-1, *([1] * (feats[m].dim() - 1))) for m in range(len(feats))]
        stacked = torch.cat([torch.where(k, f, 0.0) for f, k in zip(feats, keep)], dim=1)
        deltas = self.mix[stage](stacked).chunk(self.num_modalities, dim=1)
        return [torch.where(k, f + d, 0.0) for f, d, k in zip(feats, deltas, keep)]
