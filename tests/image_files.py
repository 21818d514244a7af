"""Writers for image files PIL cannot write (16-bit colour PNG, 16-bit RGB TIFF), built byte by
byte from the PNG and TIFF specifications, so the readers are checked against known values."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np

PNG_COLOUR_TYPES = {1: 0, 2: 4, 3: 2, 4: 6}      # channels -> grey, grey+alpha, RGB, RGBA
ADAM7 = [(0, 0, 8, 8), (0, 4, 8, 8), (4, 0, 8, 4), (0, 2, 4, 4), (2, 0, 4, 2), (0, 1, 2, 2), (1, 0, 2, 1)]


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _paeth(a: int, b: int, c: int) -> int:
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    return a if pa <= pb and pa <= pc else b if pb <= pc else c


def _filter_rows(rows: list[bytes], bpp: int) -> bytes:
    """Each scanline with a filter byte, cycling through the five PNG filter types."""
    out, prev = b"", bytes(len(rows[0]))
    for i, row in enumerate(rows):
        kind = i % 5
        filtered = bytearray(len(row))
        for x, value in enumerate(row):
            a = row[x - bpp] if x >= bpp else 0
            b, c = prev[x], prev[x - bpp] if x >= bpp else 0
            predictor = (0, a, b, (a + b) // 2, _paeth(a, b, c))[kind]
            filtered[x] = (value - predictor) % 256
        out += bytes([kind]) + bytes(filtered)
        prev = row
    return out


def write_png16(path: Path, values: np.ndarray, interlace: bool = False) -> None:
    """uint16 [H, W] or [H, W, C] (C = 2 grey+alpha, 3 RGB, 4 RGBA) -> a 16-bit PNG."""
    values = values.astype(">u2")
    if values.ndim == 2:
        values = values[..., None]
    h, w, channels = values.shape
    passes = ADAM7 if interlace else [(0, 0, 1, 1)]
    data = b""
    for y0, x0, dy, dx in passes:
        sub = values[y0::dy, x0::dx]
        if sub.size:
            data += _filter_rows([r.tobytes() for r in sub.reshape(sub.shape[0], -1)], 2 * channels)
    header = struct.pack(">IIBBBBB", w, h, 16, PNG_COLOUR_TYPES[channels], 0, 0, int(interlace))
    Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) +
                           _chunk(b"IDAT", zlib.compress(data)) + _chunk(b"IEND", b""))


def write_tiff_rgb16(path: Path, values: np.ndarray) -> None:
    """uint16 [H, W, 3] -> an uncompressed little-endian 16-bit RGB TIFF (one strip)."""
    h, w, _ = values.shape
    pixels = values.astype("<u2").tobytes()
    short, long_ = 3, 4
    entries = [(256, short, 1, w), (257, short, 1, h), (258, short, 3, None), (259, short, 1, 1),
               (262, short, 1, 2), (273, long_, 1, None), (277, short, 1, 3), (278, short, 1, h),
               (279, long_, 1, len(pixels)), (284, short, 1, 1)]
    ifd_size = 2 + 12 * len(entries) + 4
    bits_at, pixels_at = 8 + ifd_size, 8 + ifd_size + 6
    ifd = struct.pack("<H", len(entries))
    for tag, kind, count, value in entries:
        value = bits_at if tag == 258 else pixels_at if tag == 273 else value
        ifd += struct.pack("<HHIHH" if kind == short and count == 1 else "<HHII", tag, kind, count,
                           *((value, 0) if kind == short and count == 1 else (value,)))
    Path(path).write_bytes(b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0) +
                           struct.pack("<HHH", 16, 16, 16) + pixels)
