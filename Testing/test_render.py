"""Grid PNG text: every character drawn must be a glyph of the font (no .notdef boxes)."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from ipmn.render import drawable_text, grid_png


def _mask(font, ch):
    m = font.getmask(ch)
    return m.size, bytes(np.asarray(m).tobytes())


def test_drawable_text_replaces_missing_glyphs():
    font = ImageDraw.Draw(Image.new("RGB", (4, 4))).getfont()
    notdef = _mask(font, "\uffff")
    title = "central window (slices 2\u201310 of 14) \u00d7 caf\u00e9"
    assert _mask(font, "\u2013") == notdef or _mask(font, "\u00d7") == notdef  # the font lacks some
    shown = drawable_text(title, font)
    assert all(_mask(font, ch) != notdef for ch in shown if not ch.isspace())
    assert "slices 2-10" in shown and "cafe" in shown
    assert drawable_text("plain ASCII (p=0.51)", font) == "plain ASCII (p=0.51)"


def test_grid_png_title_with_en_dash_renders_like_hyphen(tmp_path):
    image = np.zeros((2, 192, 192), np.float32)
    grid_png(tmp_path / "dash.png", image, ("t1", "t2"), title="slices 2\u201310")
    grid_png(tmp_path / "hyphen.png", image, ("t1", "t2"), title="slices 2-10")
    a = np.asarray(Image.open(tmp_path / "dash.png"))
    b = np.asarray(Image.open(tmp_path / "hyphen.png"))
    assert np.array_equal(a, b)
