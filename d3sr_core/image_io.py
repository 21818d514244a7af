"""Image files <-> float pixels: the one reader and writer of the CLI, training and evaluation.

Reading (`read_image`): every mode PIL opens, returned as RGB float32 [H, W, 3] with the
file's real range mapped to [0, 1]:
  8-bit modes (1, L, P, RGB, RGBA, LA, PA, CMYK, YCbCr, ...)   value / 255
  16-bit grey (I;16, I;16B, I;16L, I;16N) and 32-bit integer I   value / 65535
      (I must hold 0..65535, as PIL gives 16-bit PNGs on some versions)
  16-bit RGB / RGBA / grey+alpha PNG and uncompressed 16-bit RGB TIFF   value / 65535
      (PIL keeps only the high byte of these; the low byte is decoded in a second pass)
  32-bit float grey (F, e.g. float TIFF)   kept as stored (not rescaled, not clipped)
EXIF orientation is applied, alpha is dropped (the colour under it is kept), grey is
repeated to RGB. NaN or infinite pixels, and anything PIL cannot decode, raise
ImageReadError (a ValueError) naming the file.

Writing: 8-bit PNG through `atomic_file.atomic_path` (readers never see half a file),
from float [0, 1] pixels (clamped, rounded); non-finite pixels are refused, not written black.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

from .atomic_file import atomic_path

# Every image file the CLI, the trainer and the evaluator pick up from a folder.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")

_GREY16_MODES = {"I;16", "I;16B", "I;16L", "I;16N"}
# PIL decodes these 16-bit raw modes to their high bytes; decoding the same bytes with the
# partner raw mode gives the low bytes ("LA;16B" read as RGBA gives L-high, L-low, A-high, A-low).
_LOW_BYTE_RAWMODE = {"RGB;16B": "RGB;16L", "RGB;16L": "RGB;16B", "RGBA;16B": "RGBA;16L",
                     "RGBA;16L": "RGBA;16B", "LA;16B": "RGBA"}
_EXIF_ORIENTATION = 0x0112
# EXIF orientation -> the array operation that shows the image upright (as ImageOps.exif_transpose).
_ORIENT: dict[int, Callable[[np.ndarray], np.ndarray]] = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.swapaxes(0, 1),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: a[::-1, ::-1].swapaxes(0, 1),
    8: lambda a: np.rot90(a, 1),
}


class ImageReadError(ValueError):
    """An image file that cannot be used; the one-line message names the file and the cause."""


def is_image_file(name: str | os.PathLike) -> bool:
    """True when `name` ends in one of IMAGE_EXTENSIONS (any case)."""
    return os.fspath(name).lower().endswith(IMAGE_EXTENSIONS)


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _orientation(im: Image.Image) -> int:
    try:
        return int(im.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:  # a damaged EXIF block does not make the pixels unreadable
        return 1


def _with_rawmode(tile, rawmode: str):
    """The same decoder tile reading its bytes with another raw mode."""
    args = tile[3]
    args = rawmode if isinstance(args, str) else (rawmode, *args[1:])
    return tile._replace(args=args) if hasattr(tile, "_replace") else (*tile[:3], args)


def _rawmode(im: Image.Image) -> str | None:
    """The raw mode all of `im`'s tiles decode from, if they agree (before loading)."""
    modes = {t[3] if isinstance(t[3], str) else (t[3][0] if t[3] else None) for t in im.tile}
    return modes.pop() if len(modes) == 1 else None


def _sixteen_bit_colour(im: Image.Image, path: str) -> np.ndarray | None:
    """RGB [H, W, 3] float32 in [0, 1] of a 16-bit RGB / RGBA / LA file, or None for others."""
    rawmode = _rawmode(im)
    if rawmode not in _LOW_BYTE_RAWMODE:
        return None
    high = np.asarray(im).astype(np.float32)
    with Image.open(path) as again:
        again.tile = [_with_rawmode(t, _LOW_BYTE_RAWMODE[rawmode]) for t in again.tile]
        low = np.asarray(again).astype(np.float32)
    if rawmode == "LA;16B":
        grey = (low[..., 0] * 256.0 + low[..., 1]) / 65535.0
        return np.repeat(grey[..., None], 3, axis=-1)
    return (high[..., :3] * 256.0 + low[..., :3]) / 65535.0


def _pixels(im: Image.Image, path: str) -> np.ndarray:
    """RGB float32 [H, W, 3] of an open image in its real range (module docstring)."""
    if im.mode in _GREY16_MODES:
        grey = np.asarray(im).astype(np.float32) / 65535.0
    elif im.mode == "I":
        values = np.asarray(im)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise ImageReadError(
                f"cannot read image {path}: 32-bit integer pixels from {values.min()} to "
                f"{values.max()}, outside the 16-bit range 0..65535; save it as an 8- or 16-bit image")
        grey = values.astype(np.float32) / 65535.0
    elif im.mode == "F":
        grey = np.asarray(im, dtype=np.float32)
    else:
        colour = _sixteen_bit_colour(im, path)
        if colour is not None:
            return colour
        return np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    return np.repeat(grey[..., None], 3, axis=-1)


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as RGB float32 [H, W, 3] (range: module docstring; [0, 1] for every
    integer format). Raises ImageReadError for unreadable files and NaN/Inf pixels."""
    path = os.fspath(path)
    try:
        with Image.open(path) as im:
            pixels = _pixels(im, path)   # first: reading EXIF may load the pixels (PNG)
            orientation = _orientation(im)
    except ImageReadError:
        raise
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, struct.error...) for damaged files
        raise ImageReadError(f"cannot read image {path}: {_one_line(e)}") from None
    pixels = _ORIENT.get(orientation, lambda a: a)(pixels)
    bad = int((~np.isfinite(pixels)).any(axis=-1).sum())
    if bad:
        raise ImageReadError(f"image {path} has {bad} pixel(s) with NaN or infinite values; "
                             "fix or re-export the file")
    return np.ascontiguousarray(pixels, dtype=np.float32)


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) as stored, from the header only (EXIF orientation may swap them in
    read_image's result). Raises ImageReadError when PIL cannot open the file."""
    path = os.fspath(path)
    try:
        with Image.open(path) as im:
            return im.size
    except Exception as e:
        raise ImageReadError(f"cannot read image {path}: {_one_line(e)}") from None


def load_image(path: str | os.PathLike) -> torch.Tensor:
    """read_image as a ComfyUI IMAGE: [1, H, W, 3] float32."""
    return torch.from_numpy(read_image(path))[None]


def load_image_bchw(path: str | os.PathLike) -> torch.Tensor:
    """read_image as a BCHW batch of one: [1, 3, H, W] float32."""
    return torch.from_numpy(read_image(path)).permute(2, 0, 1)[None].contiguous()


def to_uint8(pixels: torch.Tensor | np.ndarray) -> np.ndarray:
    """Float pixels in [0, 1] (any shape) -> uint8 (clamped, x255, rounded half to even).
    Raises ValueError for NaN or infinite values, which would otherwise turn black."""
    array = pixels.detach().float().cpu().numpy() if isinstance(pixels, torch.Tensor) else \
        np.asarray(pixels, dtype=np.float32)
    if not np.isfinite(array).all():
        raise ValueError(f"image holds {int((~np.isfinite(array)).sum())} NaN or infinite value(s); "
                         "not written")
    return (np.clip(array, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def write_png_atomic(array: np.ndarray, path: str | os.PathLike) -> None:
    """Write a uint8 [H, W, 3] (RGB) or [H, W] (grey) array as a PNG atomically."""
    if array.dtype != np.uint8 or array.ndim not in (2, 3):
        raise ValueError(f"write_png_atomic needs uint8 [H, W(, 3)], got {array.dtype} {list(array.shape)}")
    with atomic_path(path) as tmp:
        Image.fromarray(np.ascontiguousarray(array)).save(tmp, format="PNG")


def save_png_atomic(image: torch.Tensor, path: str | os.PathLike) -> None:
    """Write IMAGE [1, H, W, 3] (or [H, W, 3]) float in [0, 1] as an 8-bit PNG atomically."""
    write_png_atomic(to_uint8(image[0] if image.ndim == 4 else image), path)


def save_png_atomic_chw(image: torch.Tensor, path: str | os.PathLike) -> None:
    """Write [1, 3, H, W] (or [3, H, W]) float in [0, 1] as an 8-bit PNG atomically."""
    chw = image[0] if image.ndim == 4 else image
    write_png_atomic(to_uint8(chw.permute(1, 2, 0)), path)
