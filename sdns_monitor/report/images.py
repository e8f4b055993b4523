"""Images inline in the page: PNG bytes as `data:` URIs in <img> tags, so the page needs no
other file."""

from __future__ import annotations

import base64
import html
import io

import numpy as np
from PIL import Image

THUMB_PX = 84  # small frames are enlarged (whole pixels) to about this size


def png_bytes(image: np.ndarray, scale: int = 1) -> bytes:
    """A uint8 H x W x C image (C in 1, 3) as PNG bytes, enlarged `scale` times (nearest)."""
    pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    if scale > 1:
        pil = pil.resize((pil.width * scale, pil.height * scale), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    return buf.getvalue()


def data_uri(png: bytes) -> str:
    """PNG bytes as a `data:` URI, for an <img> that needs no other file."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def thumbnail(image: np.ndarray, alt: str) -> str:
    """An <img> of a small frame, enlarged by whole pixels to about THUMB_PX."""
    scale = max(1, THUMB_PX // max(image.shape[:2]))
    return f'<img class="thumb" src="{data_uri(png_bytes(image, scale))}" alt="{html.escape(alt)}">'


def plot_image(png: bytes, alt: str) -> str:
    """An <img> of a plot (figures.py), as wide as the page allows."""
    return f'<img class="plot" src="{data_uri(png)}" alt="{html.escape(alt)}">'
