"""Where a token sits on its modality's token grid, as a learned embedding.

Encoder tokens carry *what* a region shows; once they are flattened into one sequence for
CSA's attention and CCT, *where* it is (the centre of a lesion patch against its rim, the
same place in another sequence) is lost unless it is added. :class:`GridPositionEmbedding`
maps each token's normalised grid coordinates (``-1 .. 1`` per axis, so any grid size works
and grids of the same region line up across sequences) through a small MLP to a ``d``-vector
that is added to the token.

Example:
    >>> import torch
    >>> pos = GridPositionEmbedding(dim=8)
    >>> pos((3, 3, 2)).shape
    torch.Size([18, 8])
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def grid_coordinates(grid: tuple[int, int, int], device: torch.device | None = None) -> Tensor:
    """``[N, 3]`` coordinates in ``[-1, 1]`` of the cells of a row-major ``grid`` (centre 0)."""
    axes = [torch.linspace(-1.0, 1.0, g, device=device) if g > 1 else torch.zeros(1, device=device) for g in grid]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)


class GridPositionEmbedding(nn.Module):
    """``e(x, y, z) = W2 GELU(W1 [x, y, z, x^2, y^2, z^2])``; the squares let one layer tell
    the centre from the rim. The output layer starts at zero, so an untrained embedding
    changes nothing."""

    def __init__(self, dim: int, hidden: int | None = None) -> None:
        super().__init__()
        hidden = hidden or dim
        self.net = nn.Sequential(nn.Linear(6, hidden), nn.GELU(), nn.Linear(hidden, dim))
        nn.init.zeros_(self.net[2].weight)
        nn.init.zeros_(self.net[2].bias)

    def forward(self, grid: tuple[int, int, int]) -> Tensor:
        xyz = grid_coordinates(grid, self.net[0].weight.device).to(self.net[0].weight.dtype)
        return self.net(torch.cat([xyz, xyz * xyz], dim=-1))
