"""Image files <-> ComfyUI IMAGE tensors [1, H, W, 3] float32 in [0, 1] (for the CLI)."""

from __future__ import annotations

import os
import tempfile

import numpy as np
import torch
from PIL import Image, ImageOps


def load_image(path: str) -> torch.Tensor:
    """Read any PIL-readable image (EXIF rotation applied, alpha dropped, grey expanded) as RGB."""
    try:
        with Image.open(path) as im:
            rgb = ImageOps.exif_transpose(im).convert("RGB")
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from None
    return torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 255.0)[None]


def save_png_atomic(image: torch.Tensor, path: str) -> None:
    """Write IMAGE [1, H, W, 3] as an 8-bit PNG via a temporary file and rename."""
    array = (image[0].clamp(0, 1).cpu().numpy() * 255.0).round().astype(np.uint8)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".png", dir=folder)
    os.close(fd)
    try:
        Image.fromarray(array).save(tmp, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
