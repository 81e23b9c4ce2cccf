"""Coarse maps (ViT token grid, CNN feature map) → pixel maps on a tiled slice grid, cell by cell.

The model's input is k slices tiled into a √k × √k image. A coarse map over that image (12 × 12 rollout
tokens, a 6 × 6 Grad-CAM map) must be upsampled *within* each cell: interpolating across a cell border
mixes two different slices, which lie on opposite borders of the ROI. :func:`upsample_cells` is the
one place that does this mapping.

Rule, per axis: a pixel of cell ``j`` is interpolated linearly (``align_corners=False`` sample
positions) between the coarse samples whose centres lie inside cell ``j`` only; beyond the outermost
such centre the edge value is repeated. When the coarse grid divides evenly into the cells (4 × 4
tokens per 64-px cell at 192 px) this is exactly ``F.interpolate(..., "bilinear", align_corners=False)``
applied to each cell on its own. When it does not (AlexNet's 11 × 11 map over 3 cells), a coarse
sample belongs to the cell holding its centre; a cell holding no centre takes the nearest sample.
"""

from __future__ import annotations

import math

import torch

from ipmn.errors import IPMNError

__all__ = ["cell_upsample_weights", "upsample_cells"]


def cell_upsample_weights(n_out: int, n_in: int, cells: int) -> torch.Tensor:
    """(n_out, n_in) interpolation weights along one axis; every row sums to 1 and only uses samples
    of its own cell (see the module docstring)."""
    if cells < 1 or n_out % cells:
        raise IPMNError(f"{n_out} pixels cannot be split into {cells} equal cells")
    if n_in < 1:
        raise IPMNError("the coarse map is empty")
    c = n_out // cells
    centres = (torch.arange(n_in, dtype=torch.float64) + 0.5) * n_out / n_in  # in pixel units
    w = torch.zeros(n_out, n_in, dtype=torch.float64)
    for j in range(cells):
        own = ((centres >= j * c) & (centres < (j + 1) * c)).nonzero().flatten()
        if own.numel():
            lo, hi = int(own[0]), int(own[-1])
        else:  # coarser than the cells: the sample nearest to the cell's centre
            lo = hi = min(n_in - 1, max(0, int(math.floor((j + 0.5) * c * n_in / n_out))))
        for u in range(j * c, (j + 1) * c):
            s = min(max((u + 0.5) * n_in / n_out - 0.5, lo), hi)
            i0 = int(math.floor(s))
            frac = s - i0
            w[u, i0] += 1.0 - frac
            if frac > 0:
                w[u, i0 + 1] += frac
    return w


def upsample_cells(maps: torch.Tensor, size, k: int) -> torch.Tensor:
    """Upsample coarse maps ``(..., h, w)`` to ``(..., H, W)`` cell by cell on a √k × √k tiled image."""
    m = math.isqrt(int(k))
    if m * m != int(k) or k < 1:
        raise IPMNError(f"k must be a perfect square (1, 4, 9, ...), got {k}")
    height, width = (int(v) for v in size)
    wy = cell_upsample_weights(height, maps.shape[-2], m).to(maps.device, torch.float32)
    wx = cell_upsample_weights(width, maps.shape[-1], m).to(maps.device, torch.float32)
    return torch.einsum("Hh,...hw,Ww->...HW", wy, maps.float(), wx)
