"""Tiled D3SR: any output size in bounded memory.

The same one-step pipeline as `pipeline.upscale_one`, with every heavy stage run on tiles:
  1. bicubic upsample of the whole (small) input to the output size, as in the plain path
     (`pipeline.prepare_input`), padded to a multiple of 8 only (the UNet runs any latent size)
  2. VAE encode on overlapping pixel tiles, blended in latent space
  3. the UNet step (`pipeline.predict_x0`) on overlapping latent tiles, the tiles' x0
     predictions blended with raised-cosine ramps in the overlaps, normalised by the
     summed weights
  4. VAE decode on overlapping latent tiles, blended in pixel space straight into the output
  5. colour fix with statistics / low frequencies of the WHOLE image, applied in row strips
Full-size tensors that remain: the output image and its bicubic reference (3 floats per
output pixel each) and the latent (1/16 of that). Everything else is per tile.

Tile sizes are given in OUTPUT pixels. Images are ComfyUI IMAGE tensors [B, H, W, 3] in [0, 1]
unless a docstring says BCHW.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import comfy.model_management as mm
import comfy.utils
import torch
import torch.nn.functional as F

from . import comfy_internals, pipeline
from .checks import check_factor
from .colour_fix import COLOUR_FIXES, WAVELET_LEVELS, channel_stats, low_frequency, truncate_8bit
from .model import D3SRModel

logger = logging.getLogger(__name__)

# Defaults, in output pixels (see benchmarks/results/tiling_cpu.md for the measurements).
# DEFAULT_TILE 512: the crop size D3SR and OSEDiff are trained and evaluated at, so each UNet
# tile sees the token count the LoRA was trained for (and a 512^2 input is one tile, exactly
# the plain path). 256 px tiles measured 1.4x faster on a 2-core CPU (attention cost grows
# with tile area), at the price of 4x the tile borders and UNet calls at half the training
# resolution; pass tile_size 256 where CPU speed matters more. The own tiled VAE (one pass,
# raised-cosine blend) is used rather than ComfyUI's encode_tiled/decode_tiled (three passes
# with shifted tilings, averaged): 2.5x faster, seam-free in the seam test, but its per-tile
# GroupNorm statistics put it further from the untiled result on the random test VAE (MAE
# 0.14 vs 0.065 at 128 px tiles); larger VAE tiles (automatic: up to 1024 px) shrink that.
DEFAULT_TILE = 512
DEFAULT_OVERLAP = 64
MIN_TILE = 128            # OOM halving stops here
VAE_TILE_CPU = 512        # "automatic" VAE tile on a CPU: bounded RAM, no speed loss
VAE_TILE_MAX = 1024       # "automatic" VAE tile on an accelerator, when memory allows
VAE_OVERLAP = 64          # pixels of overlap between VAE tiles
COLOUR_STRIP = 256        # rows per strip when applying the colour fix

Step = Callable[[], None]


@dataclass(frozen=True)
class Span:
    """One tile along one axis: [start, stop) and the lengths of its rising / falling ramps."""

    start: int
    stop: int
    ramp_in: int
    ramp_out: int

    @property
    def size(self) -> int:
        return self.stop - self.start


def layout(length: int, tile: int, overlap: int, align: int = 1) -> list[Span]:
    """Cover [0, length) with the fewest FULL-SIZE tiles of `tile` that overlap by >= `overlap`.

    `tile` must be a multiple of `align`; starts are multiples of `align`. Every tile keeps the
    full `tile` size (the UNet sees the same number of tokens, the resolution the LoRA was
    trained at, at every image size; a tile's cost does not depend on the image size); the
    slack of covering `length` with whole tiles goes into larger overlaps, spread evenly over
    the gaps. Only an image no longer than one tile is one shorter tile.
    A `length` that is not a multiple of `align` is laid out as if rounded up to one, and the
    last tile is cut at `length` (it loses less than `align`).
    """
    if length <= tile:
        return [Span(0, length, 0, 0)]
    cut, length = length, _round_up(length, align)
    # Starts snap to `align`, so the overlap is kept in whole steps (rounded up, at most half a tile).
    overlap = max(0, min(_round_up(overlap, align), tile // 2 // align * align))
    n = math.ceil((length - overlap) / (tile - overlap))
    while True:
        starts = [round(i * (length - tile) / (n - 1) / align) * align for i in range(n)]
        if all(b - a <= tile - overlap for a, b in zip(starts, starts[1:])):
            break
        n += 1  # snapping the starts ate into an overlap: one more tile
    spans = []
    for i, start in enumerate(starts):
        ramp_in = starts[i - 1] + tile - start if i > 0 else 0
        ramp_out = start + tile - starts[i + 1] if i < n - 1 else 0
        spans.append(Span(start, min(start + tile, cut), ramp_in, ramp_out))
    return spans


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def ramp_weights(span: Span, scale: int = 1) -> torch.Tensor:
    """1-D blend weights for `span` sampled `scale` times per unit: 1 inside, raised-cosine
    ramps sin^2 / cos^2 over the overlaps, so two neighbours' weights add up to exactly 1."""
    n = span.size * scale
    w = torch.ones(n, dtype=torch.float64)
    for ramp, rising in ((span.ramp_in * scale, True), (span.ramp_out * scale, False)):
        if ramp <= 0:
            continue
        rise = torch.sin(0.5 * math.pi * (torch.arange(ramp, dtype=torch.float64) + 0.5) / ramp) ** 2
        if rising:
            w[:ramp] *= rise
        else:
            w[n - ramp:] *= rise.flip(0)
    return w.float()


def weight_sum(spans: list[Span], length: int, scale: int = 1) -> torch.Tensor:
    """Sum over `spans` of their ramp weights on [0, length * scale) (the 1-D normaliser)."""
    total = torch.zeros(length * scale)
    for s in spans:
        total[s.start * scale: s.stop * scale] += ramp_weights(s, scale)
    return total


class TileGrid:
    """A product grid of row spans x column spans on an [h, w] plane. Because the grid is a
    product, the summed 2-D weights are the outer product of the 1-D sums (no full-size
    weight map)."""

    def __init__(self, h: int, w: int, tile: int, overlap: int, align: int = 1) -> None:
        self.h, self.w = h, w
        self.rows = layout(h, tile, overlap, align)
        self.cols = layout(w, tile, overlap, align)

    def __len__(self) -> int:
        return len(self.rows) * len(self.cols)

    def __iter__(self) -> Iterator[tuple[Span, Span]]:
        for r in self.rows:
            for c in self.cols:
                yield r, c

    @property
    def tile_shape(self) -> tuple[int, int]:
        return self.rows[0].size, self.cols[0].size

    def weight(self, r: Span, c: Span, scale: int = 1) -> torch.Tensor:
        """[size_r * scale, size_c * scale] blend weights of one tile."""
        return ramp_weights(r, scale)[:, None] * ramp_weights(c, scale)[None, :]

    def norms(self, scale: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """The 1-D weight sums along rows [h * scale] and columns [w * scale]."""
        return weight_sum(self.rows, self.h, scale), weight_sum(self.cols, self.w, scale)


def _normalise_(acc: torch.Tensor, norm_rows: torch.Tensor, norm_cols: torch.Tensor) -> torch.Tensor:
    """Divide BCHW `acc` in place by the outer product of the 1-D weight sums."""
    h, w = acc.shape[-2:]
    acc.div_(norm_rows[:h, None].to(acc.device))
    return acc.div_(norm_cols[None, :w].to(acc.device))


def blend_tiles_(acc: torch.Tensor, grid: TileGrid, run_tile: Callable[[Span, Span], torch.Tensor],
                 scale: int = 1, step: Step | None = None) -> torch.Tensor:
    """Fill BCHW `acc` ([B, C, H, W], H <= grid.h * scale, W <= grid.w * scale) with the blend of
    `run_tile(r, c)` ([B, C, >= its part of acc]) over the tiles of `grid`, `scale` units of acc
    per grid unit: each tile weighted by its raised-cosine ramps, the sum normalised by the summed
    weights. Tiles are cropped to `acc` (those wholly outside it are not run). A single tile is
    copied unweighted, so a one-tile image equals the untiled path exactly. ComfyUI's interrupt
    is checked before every tile; `step` is called after each. `acc` is overwritten; returns it."""
    acc.zero_()
    h, w = acc.shape[-2:]
    single = len(grid) == 1
    for r, c in grid:
        mm.throw_exception_if_processing_interrupted()
        y0, y1 = r.start * scale, min(r.stop * scale, h)
        x0, x1 = c.start * scale, min(c.stop * scale, w)
        if y0 < y1 and x0 < x1:
            part = run_tile(r, c)[..., : y1 - y0, : x1 - x0].float().to(acc.device)
            if not single:
                part = part * grid.weight(r, c, scale)[: y1 - y0, : x1 - x0].to(acc.device)
            acc[..., y0:y1, x0:x1] += part
            del part
        if step:
            step()
    if not single:
        _normalise_(acc, *grid.norms(scale))
    return acc


def _padded_index(start: int, stop: int, size: int, reflect: bool) -> torch.Tensor:
    """Indices into an axis of `size` that reproduce `pipeline.pad_to_multiple` (reflect or
    replicate at the bottom/right) for positions [start, stop)."""
    idx = torch.arange(start, stop)
    if reflect:
        return torch.where(idx >= size, 2 * (size - 1) - idx, idx)
    return idx.clamp(max=size - 1)


def tiled_encode(d3sr: D3SRModel, pixels: torch.Tensor, padded_hw: tuple[int, int],
                 tile: int, overlap: int = VAE_OVERLAP, step: Step | None = None) -> torch.Tensor:
    """BCHW [0, 1] `pixels` (unpadded) -> scaled latent [B, 4, H/8, W/8] of the image padded
    to `padded_hw` (multiples of 8) exactly as `pad_to_multiple` would, one pixel tile at a time
    through ComfyUI's VAE. Tiles are blended in latent space."""
    h, w = pixels.shape[-2:]
    ph, pw = padded_hw
    reflect = ph - h < h and pw - w < w
    grid = TileGrid(ph // 8, pw // 8, max(1, tile // 8), overlap // 8)

    def encode(r: Span, c: Span) -> torch.Tensor:
        if len(grid) == 1:  # the same call as pad_to_multiple: bit-identical to the plain path
            crop = pixels if (ph, pw) == (h, w) else F.pad(
                pixels, (0, pw - w, 0, ph - h), mode="reflect" if reflect else "replicate")
        else:
            rows = _padded_index(r.start * 8, r.stop * 8, h, reflect)
            cols = _padded_index(c.start * 8, c.stop * 8, w, reflect)
            crop = pixels.index_select(-2, rows).index_select(-1, cols)
        return pipeline.vae_encode(d3sr.vae, crop)

    acc = blend_tiles_(torch.empty(pixels.shape[0], 4, ph // 8, pw // 8), grid, encode, step=step)
    return d3sr.model.model.process_latent_in(acc)


def tiled_denoise(d3sr: D3SRModel, z: torch.Tensor, tile: int, overlap: int, align: int,
                  step: Step | None = None) -> torch.Tensor:
    """The UNet step on overlapping latent tiles of the scaled latent `z` [B, 4, h, w] (tile and
    overlap in latent units, tile a multiple of `align`); x0 predictions blended with raised-cosine
    ramps and normalised by the summed weights. Returns [B, 4, h, w] float32."""
    patcher = d3sr.model
    grid = TileGrid(z.shape[-2], z.shape[-1], tile, overlap, align)
    memory = patcher.model.memory_required([z.shape[0], z.shape[1], *grid.tile_shape])
    mm.load_models_gpu([patcher], memory_required=memory)
    device = patcher.load_device
    opts = patcher.model_options.get("transformer_options", {})

    def denoise(r: Span, c: Span) -> torch.Tensor:
        z_tile = z[..., r.start:r.stop, c.start:c.stop].to(device)
        # Looked up on the module each time, so tests can wrap it (e.g. to simulate OOM).
        return pipeline.predict_x0(patcher.model, z_tile, d3sr.timestep, d3sr.text_embedding, opts)

    acc = torch.empty(z.shape, dtype=torch.float32, device=mm.intermediate_device())
    return blend_tiles_(acc, grid, denoise, step=step)


def tiled_decode_(d3sr: D3SRModel, z: torch.Tensor, out: torch.Tensor, tile: int,
                  overlap: int = VAE_OVERLAP, step: Step | None = None) -> torch.Tensor:
    """Decode the scaled latent `z` [B, 4, h, w] tile by tile into the BCHW buffer `out`
    ([B, 3, H, W] with H <= 8h, W <= 8w: the decode is cropped to it), blending the pixel tiles.
    `out` is overwritten; returns it."""
    grid = TileGrid(z.shape[-2], z.shape[-1], max(1, tile // 8), overlap // 8)
    latent = d3sr.model.model.process_latent_out(z)

    def decode(r: Span, c: Span) -> torch.Tensor:
        return pipeline.vae_decode(d3sr.vae, latent[..., r.start:r.stop, c.start:c.stop])

    return blend_tiles_(out, grid, decode, scale=8, step=step)


def _unchanged(x: torch.Tensor) -> torch.Tensor:
    return x


def colour_fix_(image: torch.Tensor, reference: torch.Tensor, method: str,
                strip: int = COLOUR_STRIP, eight_bit: bool = False) -> torch.Tensor:
    """`colour_fix.apply_colour_fix(image, reference, method, eight_bit).clamp(0, 1)` computed on
    the whole BCHW image but written in place, `strip` rows at a time (no full-size temporaries)."""
    if method not in COLOUR_FIXES:
        raise ValueError(f"unknown colour fix {method!r}; choose one of {', '.join(COLOUR_FIXES)}")
    h = image.shape[-2]
    if eight_bit:   # truncate_8bit, in place
        image.clamp_(0.0, 1.0).mul_(255.0).floor_().div_(255.0)
    if method == "none":
        return image.clamp_(0.0, 1.0)
    finish = truncate_8bit if eight_bit else _unchanged
    if method == "adain":
        # Statistics over the whole image (as colour_fix.adain); the affine map per strip.
        mu_i, sd_i = channel_stats(image, eps_in_variance=eight_bit)
        mu_r, sd_r = channel_stats(reference, eps_in_variance=eight_bit)
        for y in range(0, h, strip):
            rows = image[..., y: y + strip, :]
            rows.copy_(finish(((rows - mu_i) / sd_i * sd_r + mu_r).clamp(0, 1)))
        return image
    # wavelet: image - low(image) + low(reference). The a-trous blurs (dilations 1, 2, ...,
    # 2^(levels-1)) reach 2^levels - 1 rows, so a strip computed with that many halo rows is exact
    # in its centre. A strip's result is written only after the next strip has read its (still
    # original) halo rows.
    halo = 2 ** WAVELET_LEVELS - 1
    strip = max(strip, halo)
    pending: tuple[int, torch.Tensor] | None = None
    for y in range(0, h, strip):
        a, b = max(0, y - halo), min(h, y + strip + halo)
        lo, hi = y - a, min(h, y + strip) - a
        src = image[..., a:b, :]
        fixed = (src - low_frequency(src, WAVELET_LEVELS)
                 + low_frequency(reference[..., a:b, :], WAVELET_LEVELS))[..., lo:hi, :]
        if pending is not None:
            image[..., pending[0]: pending[0] + pending[1].shape[-2], :] = pending[1]
        pending = (y, finish(fixed.clamp_(0, 1)))
    if pending is not None:
        image[..., pending[0]: pending[0] + pending[1].shape[-2], :] = pending[1]
    return image


def auto_vae_tile(d3sr: D3SRModel) -> int:
    """The VAE tile (output pixels) for vae_tile=0: VAE_TILE_CPU on a CPU; on an accelerator the
    largest of 1024/768/512/384/256 whose estimated decode memory fits in half the free memory."""
    device = d3sr.vae.device
    if torch.device(device).type == "cpu":
        return VAE_TILE_CPU
    free = mm.get_free_memory(device)
    for px in (VAE_TILE_MAX, 768, 512, 384, 256):
        if comfy_internals.vae_decode_memory(d3sr.vae, [1, 4, px // 8, px // 8]) <= 0.5 * free:
            return px
    return 256


@dataclass(frozen=True)
class TilePlan:
    """How one image of a given output size is cut into tiles.

    padded: the output size (h, w) padded to multiples of 8 (pixels); align: UNet tile starts
    are multiples of this (latents: the UNet's downsampling); unet_tile / unet_overlap: in
    latents; vae_tile: VAE tile in output pixels (automatic resolved); steps: progress-bar
    steps for one image (VAE encode + UNet + VAE decode tiles)."""

    padded: tuple[int, int]
    align: int
    unet_tile: int
    unet_overlap: int
    vae_tile: int

    def unet_grid(self) -> TileGrid:
        """The UNet tiles on the latent [padded / 8]."""
        ph, pw = self.padded
        return TileGrid(ph // 8, pw // 8, self.unet_tile, self.unet_overlap, self.align)

    def vae_grid(self) -> TileGrid:
        """The VAE tiles (encode and decode) on the latent [padded / 8]."""
        ph, pw = self.padded
        return TileGrid(ph // 8, pw // 8, max(1, self.vae_tile // 8), VAE_OVERLAP // 8)

    @property
    def steps(self) -> int:
        return 2 * len(self.vae_grid()) + len(self.unet_grid())


def tile_plan(d3sr: D3SRModel, out_hw: tuple[int, int], tile: int, overlap: int, vae_tile: int
              ) -> TilePlan:
    """The tiles for one image of output size `out_hw` (tile, overlap, vae_tile in output
    pixels; vae_tile 0 = automatic)."""
    multiple = pipeline.pixel_multiple(d3sr.model.model)
    ph, pw = (_round_up(s, pipeline.VAE_MULTIPLE) for s in out_hw)
    align = multiple // 8
    return TilePlan(padded=(ph, pw), align=align,
                    unet_tile=max(align, round(tile / multiple) * align),
                    unet_overlap=max(0, round(overlap / 8)), vae_tile=vae_tile or auto_vae_tile(d3sr))


def _upscale_one_tiled(d3sr: D3SRModel, lr: torch.Tensor, factor: float, colour_fix: str,
                       out: torch.Tensor, plan: TilePlan, step: Step) -> None:
    """One BCHW [1, 3, h, w] image -> `out` [1, 3, H, W] (a view into the batch result)."""
    upsampled = pipeline.prepare_input(d3sr, lr, factor)
    z = tiled_encode(d3sr, upsampled, plan.padded, plan.vae_tile, VAE_OVERLAP, step)
    z = tiled_denoise(d3sr, z, plan.unet_tile, plan.unet_overlap, plan.align, step)
    tiled_decode_(d3sr, z, out, plan.vae_tile, VAE_OVERLAP, step)
    del z
    pipeline.check_output(d3sr, out)   # before the colour fix's clamp, as the plain path
    colour_fix_(out, upsampled, colour_fix, eight_bit=d3sr.osediff_steps)


@torch.no_grad()
def upscale_tiled(d3sr: D3SRModel, image: torch.Tensor, factor: float = 4.0,
                  colour_fix: str = "adain", tile: int = DEFAULT_TILE,
                  overlap: int = DEFAULT_OVERLAP, vae_tile: int = 0,
                  min_tile: int | None = None) -> torch.Tensor:
    """IMAGE [B, h, w, 3] -> IMAGE [B, round(f*h), round(f*w), 3] through tiles (for OSEDiff
    weights each side brought down to a multiple of 8: pipeline.result_size).

    tile / overlap: UNet tile and overlap in output pixels; vae_tile: VAE tile in output pixels
    (0 = automatic). A progress bar counts tiles (encode + UNet + decode); ComfyUI's interrupt
    is checked before every tile. On out-of-memory the tile (and an explicit VAE tile) is halved
    down to `min_tile` (default MIN_TILE), with a log line; D3SROutOfMemoryError if even that
    does not fit.
    """
    min_tile = MIN_TILE if min_tile is None else min_tile
    pipeline.check_image(image)
    image = image.cpu()  # the full-size buffers live in host memory; tiles go to the device
    factor = check_factor(factor)
    if tile < 8 or overlap < 0 or vae_tile < 0:
        raise ValueError(f"tile ({tile}) must be >= 8, overlap ({overlap}) and vae_tile ({vae_tile}) >= 0")
    b = image.shape[0]
    out_h, out_w = pipeline.result_size(d3sr, image.shape[1], image.shape[2], factor)
    result = torch.zeros(b, 3, out_h, out_w)
    plan = tile_plan(d3sr, (out_h, out_w), tile, overlap, vae_tile)
    pbar = comfy.utils.ProgressBar(b * plan.steps)
    done = 0

    def step() -> None:
        nonlocal done
        done += 1
        pbar.update(1)

    for i in range(b):
        lr = image[i: i + 1].movedim(-1, 1)
        while True:
            oom = False
            try:
                _upscale_one_tiled(d3sr, lr, factor, colour_fix, result[i: i + 1], plan, step)
                break
            except Exception as e:
                if not pipeline.is_out_of_memory(e):
                    raise
                oom = True  # retried outside the handler, so the failed tile's tensors are freed
            if oom:
                mm.soft_empty_cache()
                if tile <= min_tile:
                    raise pipeline.D3SROutOfMemoryError(
                        f"Out of memory upscaling to {out_w}x{out_h} on {mm.get_torch_device()} even "
                        f"with {tile} px tiles (the smallest tried). Free memory (close other "
                        "models), use a smaller upscale factor, or run ComfyUI with --lowvram.")
                new_tile = max(min_tile, tile // 2)
                new_vae = max(min_tile, vae_tile // 2) if vae_tile else 0
                logger.warning("D3SR tiled: out of memory with %d px tiles (VAE %s) on %s; retrying "
                               "image %d of %d with %d px tiles (VAE %s).", tile,
                               vae_tile or "auto", mm.get_torch_device(), i + 1, b, new_tile,
                               new_vae or "auto")
                tile, vae_tile = new_tile, new_vae
                plan = tile_plan(d3sr, (out_h, out_w), tile, overlap, vae_tile)
                pbar.update_absolute(done, done + (b - i) * plan.steps)
    return result.movedim(1, -1)
