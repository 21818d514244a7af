"""Pillow's 8-bit resampling (`Image.resize` with BICUBIC or LANCZOS), reproduced in torch.

OSEDiff's test script upsamples its 8-bit input with Pillow's bicubic and then resizes it to a
multiple of 8 with Pillow's Lanczos. To give the same pixels, this module follows Pillow's
algorithm step by step rather than approximating it with `F.interpolate` (whose bicubic uses
a = -0.75 and no 8-bit rounding; up to 7 levels apart):

  * separable filters: cubic convolution with a = -0.5 (support 2) and Lanczos-3 (support 3);
    when shrinking, the filter is stretched by the scale (antialiasing);
  * for output pixel i the filter is centred at (i + 0.5) * in / out; taps outside the image
    are dropped and the remaining weights renormalised to sum to 1 (no edge padding);
  * weights are converted to 22-bit fixed point (rounded half away from zero), and each pass
    (horizontal first, then vertical) rounds its result to 8 bits and clamps it to 0..255.

Why torch and not Pillow itself: it runs on the batch where it is (CPU or GPU) without a
round trip through PIL images, one channel layout, and no dependence on which Pillow the host
has installed. The weights are computed in Python floats with the same operations, in the same
order, as Pillow's C code, and the passes use integer arithmetic, so the result is bit-identical
to Pillow's (tests/test_osediff.py checks it against Pillow on several sizes).
"""

from __future__ import annotations

import functools
import math

import torch

PRECISION_BITS = 32 - 8 - 2          # Pillow's fixed-point precision for 8-bit images
FILTERS = ("bicubic", "lanczos")


def _bicubic(x: float) -> float:
    a = -0.5
    x = abs(x)
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    if x < 2.0:
        return (((x - 5) * x + 8) * x - 4) * a
    return 0.0


def _sinc(x: float) -> float:
    if x == 0.0:
        return 1.0
    x = x * math.pi
    return math.sin(x) / x


def _lanczos(x: float) -> float:
    if -3.0 <= x < 3.0:
        return _sinc(x) * _sinc(x / 3)
    return 0.0


_KERNELS = {"bicubic": (_bicubic, 2.0), "lanczos": (_lanczos, 3.0)}


@functools.lru_cache(maxsize=64)
def coefficients(in_size: int, out_size: int, kind: str) -> tuple[list[int], list[list[int]]]:
    """Per output pixel: the first input index and the fixed-point weights of its taps, as
    Pillow computes them for resizing an axis of `in_size` to `out_size`."""
    fn, base_support = _KERNELS[kind]
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = base_support * filterscale
    inv = 1.0 / filterscale
    starts, weights = [], []
    for i in range(out_size):
        center = (i + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)          # int(): truncation, as C's cast
        hi = min(int(center + support + 0.5), in_size)
        w = [fn((x - center + 0.5) * inv) for x in range(lo, hi)]
        total = 0.0
        for v in w:
            total += v
        if total != 0.0:
            w = [v / total for v in w]
        one = 1 << PRECISION_BITS
        starts.append(lo)
        weights.append([int(v * one - 0.5) if v < 0 else int(v * one + 0.5) for v in w])
    return starts, weights


def _resize_rows(x: torch.Tensor, out_size: int, kind: str, as_float: bool = False,
                 chunk: int = 256) -> torch.Tensor:
    """One Pillow pass along the rows (dim -2) of an int32 tensor [..., H, W] holding 0..255:
    fixed-point weighted sum plus one half, shifted down and clamped to 0..255. Returns int32
    levels, or float32 k / 255 with `as_float`. Works `chunk` output rows at a time, so the
    temporaries stay small next to the result (the tiled upscaler calls this at full size)."""
    starts, weights = coefficients(x.shape[-2], out_size, kind)
    taps = max(len(w) for w in weights)
    index = torch.zeros(out_size, taps, dtype=torch.long)
    kernel = torch.zeros(out_size, taps, dtype=torch.int32)
    for i, (start, w) in enumerate(zip(starts, weights)):
        index[i, : len(w)] = torch.arange(start, start + len(w))
        kernel[i, : len(w)] = torch.tensor(w, dtype=torch.int32)
    index, kernel = index.to(x.device), kernel.to(x.device)
    out = torch.empty(*x.shape[:-2], out_size, x.shape[-1], device=x.device,
                      dtype=torch.float32 if as_float else torch.int32)
    for lo in range(0, out_size, chunk):
        rows = slice(lo, min(lo + chunk, out_size))
        acc = torch.full_like(out[..., rows, :], 1 << (PRECISION_BITS - 1), dtype=torch.int32)
        for j in range(taps):   # padded taps have weight 0 (index 0 is always valid)
            acc.addcmul_(x.index_select(-2, index[rows, j]), kernel[rows, j, None])
        out[..., rows, :] = (acc.clamp_(min=0) >> PRECISION_BITS).clamp_(max=255)
    return out.div_(255.0) if as_float else out


def to_levels(x: torch.Tensor) -> torch.Tensor:
    """Float [0, 1] -> int32 levels 0..255, rounded (an image loaded from an 8-bit file,
    k / 255, gives back exactly k)."""
    return (x.float() * 255.0).round_().clamp_(0, 255).to(torch.int32)


def pillow_resize(x: torch.Tensor, size: tuple[int, int], kind: str = "bicubic") -> torch.Tensor:
    """BCHW float [0, 1] -> BCHW float32 at `size` (H, W), holding exact 8-bit levels k / 255:
    what `PIL.Image.resize((W, H), BICUBIC or LANCZOS)` gives for the image quantised to 8 bits
    (rounded). An axis whose size does not change is left as it is, as Pillow does."""
    if kind not in FILTERS:
        raise ValueError(f"unknown filter {kind!r}; choose one of {', '.join(FILTERS)}")
    h, w = size
    if h < 1 or w < 1:
        raise ValueError(f"cannot resize to {w}x{h}")
    levels = to_levels(x)
    if w != levels.shape[-1]:      # horizontal pass first, as Pillow 9.5 (on the transposed image)
        last = h == levels.shape[-2]
        levels = _resize_rows(levels.transpose(-1, -2).contiguous(), w, kind, as_float=last)
        levels = levels.transpose(-1, -2).contiguous()
    if h != levels.shape[-2]:
        levels = _resize_rows(levels, h, kind, as_float=True)
    return levels if levels.is_floating_point() else levels.float() / 255.0
