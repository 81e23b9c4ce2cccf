"""Flips and quarter turns of a window's slices: training augmentation and test-time augmentation (TTA).

A window is ``(C, k, h, w)``: ``k`` consecutive ROI slices of every channel. Transforming the *untiled*
window acts on each slice in place, so a slice never moves to another cell of the √k × √k grid (a flip
or turn of the tiled 192-px image would). :class:`Dihedral` is one such transform ("rotate ``rot``
quarter turns counter-clockwise, then optionally flip left-right") with its :meth:`~Dihedral.inverse`;
:func:`cellwise` applies any per-slice function to an already tiled image (``(..., √k·h, √k·w)``),
which is how TTA maps computed on a transformed grid are brought back.

* training (paper): per sample a random flip and a random number of quarter turns, identical on every
  slice and channel — drawn by :func:`ipmn.windows.epoch_plan` from ``(seed, epoch)`` and applied by
  :func:`augment_window`; ``train.quarter_turns: false`` keeps the flips only (anisotropic pixels);
* TTA: :func:`tta_transforms` — identity, hflip, rot90, rot180, rot270 (and the flipped turns), or
  without the turns that swap the axes for a flips-only model.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from ipmn.errors import IPMNError
from ipmn.vocab import is_perfect_square


def _dihedral(t, hflip: bool, rot: int):
    """Rotate the last two axes by ``rot`` quarter turns (counter-clockwise), then optionally flip left-right."""
    if isinstance(t, np.ndarray):
        t = np.rot90(t, rot % 4, axes=(-2, -1)) if rot % 4 else t
        return np.flip(t, axis=-1) if hflip else t
    if rot % 4:
        t = torch.rot90(t, rot % 4, dims=(-2, -1))
    return torch.flip(t, dims=(-1,)) if hflip else t


def _dihedral_inverse(t, hflip: bool, rot: int):
    if isinstance(t, np.ndarray):
        t = np.flip(t, axis=-1) if hflip else t
        return np.rot90(t, -(rot % 4), axes=(-2, -1)) if rot % 4 else t
    if hflip:
        t = torch.flip(t, dims=(-1,))
    return torch.rot90(t, -(rot % 4), dims=(-2, -1)) if rot % 4 else t


class Dihedral:
    """One flip/quarter-turn of every slice: ``t(window)`` and ``t.inverse(window)`` on ``(..., h, w)``."""

    def __init__(self, hflip: bool = False, rot: int = 0, name: str | None = None):
        self.hflip, self.rot = bool(hflip), int(rot) % 4
        parts = ([f"rot{90 * self.rot}"] if self.rot else []) + (["hflip"] if self.hflip else [])
        self.name = name or "+".join(parts) or "identity"

    def __call__(self, t):
        return _dihedral(t, self.hflip, self.rot)

    def inverse(self, t):
        return _dihedral_inverse(t, self.hflip, self.rot)

    def __repr__(self) -> str:
        return f"Dihedral({self.name})"


def augment_window(window: np.ndarray, hflip: bool, rot: int) -> np.ndarray:
    """A training sample's augmentation, on the untiled ``(C, k, h, w)`` window (a contiguous copy)."""
    return np.ascontiguousarray(_dihedral(window, hflip, rot)) if (hflip or rot % 4) else window


# ------------------------------------------------------------------------------------------------ tiled images
def cellwise(fn: Callable, k: int = 9, cell: int = 64) -> Callable:
    """Wrap ``fn`` (acting on ``(..., k, cell, cell)`` slices) so that it acts on a tiled grid image
    ``(..., √k·cell, √k·cell)`` slice by slice, each cell staying in place."""
    if not is_perfect_square(k) or cell < 1:
        raise IPMNError(f"k must be a perfect square and cell positive, got k={k}, cell={cell}")
    n = math.isqrt(k)
    size = n * cell

    def apply(t: torch.Tensor) -> torch.Tensor:
        if t.ndim < 2 or tuple(t.shape[-2:]) != (size, size):
            raise IPMNError(f"expected a ({size}, {size}) grid image ({n}x{n} cells of {cell} px), got {tuple(t.shape)}")
        lead = t.shape[:-2]
        slices = t.reshape(*lead, n, cell, n, cell).transpose(-3, -2).reshape(*lead, k, cell, cell)
        slices = fn(slices)
        if tuple(slices.shape[-2:]) != (cell, cell):
            raise ValueError("cellwise: fn must keep the cell shape")
        return slices.reshape(*lead, n, n, cell, cell).transpose(-3, -2).reshape(*lead, size, size)

    return apply


class _OnTiles:
    """A :class:`Dihedral` (or its inverse) applied to every cell of a tiled image."""

    def __init__(self, op: Dihedral, k: int, cell: int, inverse: bool):
        self.op, self.inverse = op, inverse
        self.name = op.name
        self._apply = cellwise(op.inverse if inverse else op, k, cell)

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        return self._apply(t)

    def __repr__(self) -> str:
        return f"{self.name}{'^-1' if self.inverse else ''}"


TTA_VIEWS = (("identity", False, 0), ("hflip", True, 0), ("rot90", False, 1), ("rot180", False, 2), ("rot270", False, 3))
TTA_FLIPPED_TURNS = (("rot90+hflip", True, 1), ("rot180+hflip", True, 2), ("rot270+hflip", True, 3))


def tta_transforms(k: int = 9, cell: int = 64, with_flip_rot: bool = False,
                   quarter_turns: bool = True) -> list[tuple[Callable, Callable]]:
    """Test-time augmentations as ``(forward, inverse)`` pairs acting cell-wise on tiled ``(..., H, W)`` images.

    ``forward`` transforms grids; ``inverse`` maps an explanation computed on the transformed grid back
    onto the original one. Each callable has a ``name``. ``with_flip_rot`` adds the flipped turns (the
    full dihedral group, 8 in all). ``quarter_turns=False`` (a model trained with flips only,
    ``train.quarter_turns: false``) keeps the views that do not swap the axes: identity, hflip, rot180
    (and rot180+hflip, the up-down flip).
    """
    views = TTA_VIEWS + (TTA_FLIPPED_TURNS if with_flip_rot else ())
    if not quarter_turns:
        views = tuple(v for v in views if v[2] % 2 == 0)
    ops = [Dihedral(flip, rot, name) for name, flip, rot in views]
    return [(_OnTiles(op, k, cell, inverse=False), _OnTiles(op, k, cell, inverse=True)) for op in ops]


def random_cell_transform(x: torch.Tensor, k: int = 9, cell: int = 64, generator: torch.Generator | None = None):
    """Per sample of a tiled batch ``(B, C, H, W)`` a random flip (p=0.5) and a random number of quarter
    turns, identical on every cell (slice) and channel of that sample."""
    if x.ndim != 4:
        raise IPMNError(f"random_cell_transform takes (B, C, H, W), got {tuple(x.shape)}")
    flips = torch.randint(0, 2, (x.shape[0],), generator=generator).tolist()
    rots = torch.randint(0, 4, (x.shape[0],), generator=generator).tolist()
    return torch.stack([cellwise(Dihedral(bool(f), int(r)), k, cell)(x[i]) for i, (f, r) in enumerate(zip(flips, rots, strict=True))])
