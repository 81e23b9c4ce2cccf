"""PNG figures of the tiled grid (one panel per modality, optionally with the attention map overlaid).

Drawn with Pillow and numpy only: matplotlib costs ~1 s to import, too much for the predict path.
"""

from __future__ import annotations

import os
import unicodedata

import numpy as np

from ipmn.io import atomic_path


def jet(values: np.ndarray) -> np.ndarray:
    """The classic 'jet' colour map: values in [0, 1] → uint8 RGB."""
    v = np.clip(values, 0.0, 1.0)[..., None]
    rgb = np.clip(1.5 - np.abs(4.0 * v - np.array([3.0, 2.0, 1.0])), 0.0, 1.0)
    return (rgb * 255).astype(np.uint8)


def overlay(gray: np.ndarray, saliency: np.ndarray | None, alpha: float = 0.45) -> np.ndarray:
    base = np.repeat((np.clip(gray, 0, 1) * 255).astype(np.float32)[..., None], 3, axis=-1)
    if saliency is None:
        return base.astype(np.uint8)
    heat = jet(saliency).astype(np.float32)
    # no tint where attention is low, so the anatomy stays readable
    weight = alpha * np.clip((saliency - 0.2) / 0.8, 0, 1)[..., None] ** 0.5
    return (base * (1 - weight) + heat * weight).astype(np.uint8)


_FALLBACKS = {"\u2013": "-", "\u2014": "-", "\u2212": "-", "\u00d7": "x", "\u00b5": "u", "\u2264": "<=",
              "\u2265": ">=", "\u2192": "->", "\u2190": "<-", "\u00b1": "+/-", "\u00b0": " deg"}


def drawable_text(text: str, font) -> str:
    """``text`` with every character ``font`` has no glyph for (it would render as a box) replaced by an
    ASCII stand-in: dashes → "-", × → "x", accents dropped (é → e), anything else → "?"."""
    notdef = _glyph(font, "\uffff")
    out = []
    for ch in str(text):
        if ord(ch) < 128 or _glyph(font, ch) != notdef:
            out.append(ch)
            continue
        plain = _FALLBACKS.get(ch) or unicodedata.normalize("NFKD", ch).encode("ascii", "ignore").decode()
        out.append(plain or "?")
    return "".join(out)


def _glyph(font, ch: str) -> tuple:
    mask = font.getmask(ch)
    return mask.size, bytes(np.asarray(mask).tobytes())


def grid_png(dest: str | os.PathLike, image: np.ndarray, modalities, saliency: np.ndarray | None = None,
             title: str = "", k: int = 9, scale: int = 2) -> None:
    """``image`` is (channels, H, W) in [0, 1]; ``saliency`` (H, W) in [0, 1] is overlaid in colour."""
    from PIL import Image, ImageDraw

    side = int(round(k**0.5))
    n, h, w = image.shape
    cell = w // side
    gap, top, bottom = 8, 22, 16
    panels = []
    for c in range(n):
        rgb = overlay(image[c], saliency)
        rgb[[i * cell for i in range(1, side)], :, :] = (230, 230, 0)  # cell borders
        rgb[:, [i * cell for i in range(1, side)], :] = (230, 230, 0)
        panels.append(np.kron(rgb, np.ones((scale, scale, 1), np.uint8)))
    width = n * w * scale + (n + 1) * gap
    canvas = Image.new("RGB", (width, h * scale + top + bottom), (20, 20, 20))
    draw = ImageDraw.Draw(canvas)
    font = draw.getfont()
    for c, panel in enumerate(panels):
        x0 = gap + c * (w * scale + gap)
        canvas.paste(Image.fromarray(panel), (x0, top))
        draw.text((x0 + 2, 4), str(modalities[c]).upper(), fill=(255, 255, 255))
    if title:
        draw.text((gap + 40, 4), drawable_text(title, font), fill=(255, 255, 255))
    draw.text((gap, top + h * scale + 2), "slices inferior->superior, top-left to bottom-right; patient right on the left",
              fill=(180, 180, 180))
    with atomic_path(dest) as tmp:
        canvas.save(tmp, format="PNG")
