"""PNG figures of the tiled grid (T1/T2 side by side, optionally with an attention map overlaid)."""

from __future__ import annotations

import os

import numpy as np

from ipmn.io import atomic_path


def grid_png(dest: str | os.PathLike, image: np.ndarray, modalities, saliency: np.ndarray | None = None,
             title: str = "", k: int = 9, alpha: float = 0.45) -> None:
    """``image`` is (channels, H, W) in [0, 1]; ``saliency`` (H, W) in [0, 1] is overlaid in colour."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    n = image.shape[0]
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 4.6), squeeze=False)
    side = int(round(k**0.5))
    cell = image.shape[-1] // side
    for c in range(n):
        ax = axes[0, c]
        ax.imshow(image[c], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        if saliency is not None:
            ax.imshow(saliency, cmap="jet", vmin=0, vmax=1, alpha=alpha, interpolation="bilinear")
        for i in range(1, side):
            ax.axhline(i * cell - 0.5, color="yellow", lw=0.6)
            ax.axvline(i * cell - 0.5, color="yellow", lw=0.6)
        ax.set_title(str(modalities[c]).upper(), fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=10)
    fig.text(0.5, 0.01, "slices inferior→superior, top-left to bottom-right; patient right on the left", ha="center", fontsize=7)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    with atomic_path(dest) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
