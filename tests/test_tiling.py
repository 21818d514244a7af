"""D3SRTiledUpscale's core (d3sr_core.tiling): equality with the plain path, seams, sizes,
progress / interrupt, and the out-of-memory fallback (simulated: CPUs do not raise OOM)."""

from __future__ import annotations

import logging
import math

import comfy.model_management as mm
import comfy.utils
import pytest
import torch

from d3sr_core import pipeline, tiling
from d3sr_core.colour_fix import apply_colour_fix
from d3sr_core.model import load_d3sr
from d3sr_core.upscale import upscale


@pytest.fixture(scope="module")
def d3sr(tiny_sd2, models_dir):
    model, vae = tiny_sd2
    return load_d3sr(model, vae, str(models_dir / "d3sr" / "tiny-t399.safetensors"))


def smooth_image(h: int, w: int) -> torch.Tensor:
    """IMAGE [1, h, w, 3]: slow sinusoids, a different phase per channel."""
    y = torch.linspace(0, 1, h)[:, None]
    x = torch.linspace(0, 1, w)[None, :]
    chans = [0.5 + 0.3 * torch.sin(2 * math.pi * (0.8 * x + p)) * torch.cos(2 * math.pi * (0.6 * y + p))
             for p in (0.0, 0.3, 0.6)]
    return torch.stack(chans, -1)[None]


def test_layout_keeps_the_requested_overlap_after_alignment():
    # SD2.1 tiles start on 8-latent (64 px) steps: an overlap that is not a whole step is rounded up,
    # never down to a hard cut. Every tile keeps the full tile size (the slack goes into the
    # overlaps), except a one-tile image and the < align cut of the last tile at an unaligned end.
    # Brute force over lengths, overlaps and alignments.
    for align in (1, 2, 8):
        for tile in (8 * align, 64):
            tile = tile // align * align
            for overlap in range(0, tile // 2 + 1):
                for length in range(1, 40 * align + 1):
                    spans = tiling.layout(length, tile, overlap, align)
                    case = (length, tile, overlap, align, spans)
                    assert spans[0].start == 0 and spans[-1].stop == length, case
                    if length <= tile:
                        assert len(spans) == 1, case
                        continue
                    padded = -(-length // align) * align
                    assert all(s.size == tile for s in spans[:-1]), case
                    assert spans[-1].size == tile - (padded - length), case
                    kept = min(overlap, tile // 2 // align * align)
                    for a, b in zip(spans, spans[1:]):
                        assert a.start < b.start and b.start % align == 0, case
                        assert a.stop - b.start >= kept, case
                        assert a.ramp_out == b.ramp_in == a.start + tile - b.start, case
                    # the fewest tiles: one fewer full tile could not cover with that overlap
                    # (snapping the starts to `align` may cost one more)
                    fewest = math.ceil((padded - _round_up(kept, align)) / (tile - _round_up(kept, align)))
                    assert len(spans) <= fewest + 1, case


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


@pytest.mark.parametrize("length,tile,overlap,align", [(10, 4, 1, 1), (160, 48, 16, 8), (37, 8, 2, 1),
                                                       (64, 64, 8, 2), (30, 8, 8, 2), (100, 12, 6, 2),
                                                       (157, 48, 16, 8), (29, 8, 8, 2), (99, 12, 6, 2)])
def test_layout_covers_with_weights_summing_to_one(length, tile, overlap, align):
    spans = tiling.layout(length, tile, overlap, align)
    assert spans[0].start == 0 and spans[-1].stop == length
    for s in spans:
        assert s.start % align == 0
        # full-size tiles; only the last one is cut (by < align) where the length is not aligned
        assert s.size == tile or len(spans) == 1 or (s is spans[-1] and 0 < tile - s.size < align and length % align)
    for a, b in zip(spans, spans[1:]):
        assert b.start <= a.stop - min(overlap, tile // 2 // align * align)   # overlap kept
    total = tiling.weight_sum(spans, length)
    assert total.min() > 0.5      # blending divides by this sum, so it only has to be positive
    if all(s.ramp_in + s.ramp_out <= s.size for s in spans):   # no three tiles meet
        assert torch.allclose(total, torch.ones(length), atol=1e-6)
    assert all(tiling.ramp_weights(s).min() > 0 for s in spans)


@pytest.mark.parametrize("eight_bit", [False, True], ids=["float", "osediff_8bit"])
@pytest.mark.parametrize("method", ["adain", "wavelet", "none"])
def test_colour_fix_in_strips_equals_whole_image(method, eight_bit):
    gen = torch.Generator().manual_seed(1)
    image, ref = torch.rand(2, 3, 101, 67, generator=gen) * 1.2 - 0.1, torch.rand(2, 3, 101, 67, generator=gen)
    expected = apply_colour_fix(image, ref, method, eight_bit).clamp(0, 1)
    got = tiling.colour_fix_(image.clone(), ref, method, strip=32, eight_bit=eight_bit)
    # 8-bit: a float difference of 1e-7 may flip a truncation by one level.
    assert (got - expected).abs().max().item() < (1 / 255 + 1e-6 if eight_bit else 1e-5)
    if eight_bit:
        assert (got - expected).abs().gt(1e-6).float().mean() < 1e-3


def test_one_tile_equals_plain_upscale(d3sr):
    lr = torch.rand(2, 7, 9, 3, generator=torch.Generator().manual_seed(2))
    plain = upscale(d3sr, lr, 4.0, "adain")
    tiled = tiling.upscale_tiled(d3sr, lr, 4.0, "adain", tile=512, overlap=64, vae_tile=512)
    assert tiled.shape == plain.shape == (2, 28, 36, 3)
    assert (tiled - plain).abs().max().item() < 1e-5
    assert tiling.tile_plan(d3sr, (28, 36), 512, 64, 512).padded == (32, 40)   # 8 px, not 16 (48)


def test_tiles_on_a_latent_that_is_not_a_multiple_of_the_alignment(d3sr, monkeypatch):
    """52 x 68 px pads to 56 x 72 (latent 7 x 9; the tiny UNet's alignment is 2): UNet tiles of
    32 px start on 16 px steps, the last row of tiles is cut at the latent's edge (3 rows), and
    the UNet runs on exactly the grid's tiles. (The VAE runs in one 160 px tile: its tiling has
    tests of its own, and 32 px VAE tiles made this test cost 20 s.)"""
    plan = tiling.tile_plan(d3sr, (52, 68), 32, 8, 160)
    assert plan.padded == (56, 72)
    grid = plan.unet_grid()
    assert (grid.h, grid.w) == (7, 9)
    assert grid.rows[-1].stop == 7 and grid.rows[-1].size == 3
    seen, real = [], pipeline.predict_x0

    def spy(base_model, z, *args, **kwargs):
        seen.append(tuple(z.shape[-2:]))
        return real(base_model, z, *args, **kwargs)

    monkeypatch.setattr(pipeline, "predict_x0", spy)
    out = tiling.upscale_tiled(d3sr, smooth_image(13, 17), 4.0, "none", tile=32, overlap=8, vae_tile=160)
    assert out.shape == (1, 52, 68, 3) and torch.isfinite(out).all()
    assert seen == [(r.size, c.size) for r, c in grid]


def border_ratio(image: torch.Tensor, borders: set[int], axis: int, phase: int = 8) -> float:
    """Mean |x[k] - x[k-1]| across tile-border lines k over the same across interior lines.
    Borders sit on multiples of 8 px, and the VAE decoder's 8x upsampling gives lines a
    period-8 structure of their own, so interior lines are taken at the same phase."""
    x = image[0].movedim(-1, 0).double()                               # [3, H, W]
    n = x.shape[axis]
    diff = (x.narrow(axis, 1, n - 1) - x.narrow(axis, 0, n - 1)).abs()
    profile = diff.mean(dim=tuple(a for a in range(3) if a != axis))  # [n - 1]: k-1 -> k
    border = [profile[k - 1] for k in sorted(borders)]
    interior = [profile[k - 1] for k in range(phase, n, phase) if k not in borders]
    assert len(border) >= 2 and len(interior) >= 4
    return (sum(border) / len(border) / (sum(interior) / len(interior))).item()


def tile_borders(d3sr, out_hw, tile, overlap, vae_tile) -> tuple[set[int], set[int]]:
    """Output rows / columns where some UNet or VAE tile starts or ends."""
    plan = tiling.tile_plan(d3sr, out_hw, tile, overlap, vae_tile)
    grids = [plan.unet_grid(), plan.vae_grid()]
    rows = {8 * v for g in grids for s in g.rows for v in (s.start, s.stop) if 0 < 8 * v < out_hw[0]}
    cols = {8 * v for g in grids for s in g.cols for v in (s.start, s.stop) if 0 < 8 * v < out_hw[1]}
    return rows, cols


def test_no_seams_on_smooth_input(d3sr, monkeypatch):
    image = smooth_image(24, 24)                      # -> 96 x 96, 2 x 2 UNet tiles, 2 x 2 VAE tiles
    args = dict(tile=64, overlap=16, vae_tile=64)
    rows, cols = tile_borders(d3sr, (96, 96), **args)
    out = tiling.upscale_tiled(d3sr, image, 4.0, "none", **args)
    ratios = border_ratio(out, rows, 1), border_ratio(out, cols, 2)
    # A step at tile borders raises the difference there; within 10 % of the interior is seamless
    # (measured: 0.86 and 0.88; with box weights below, 1.58 and 1.34).
    assert max(ratios) <= 1.10, ratios
    # The measure has teeth: plain averaging of the overlaps (box weights) leaves visible steps.
    monkeypatch.setattr(tiling, "ramp_weights", lambda span, scale=1: torch.ones(span.size * scale))
    boxed = tiling.upscale_tiled(d3sr, image, 4.0, "none", **args)
    assert max(border_ratio(boxed, rows, 1), border_ratio(boxed, cols, 2)) > 1.15


@pytest.fixture
def progress():
    """Records (value, total) of every ComfyUI progress-bar update."""
    calls, previous = [], comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None:
                                             calls.append((value, total)))
    yield calls
    comfy.utils.set_progress_bar_global_hook(previous)


@pytest.mark.parametrize("size,factor,tile", [((13, 19), 2.5, 32),    # odd sizes, 2 x 3 tiles
                                              ((9, 30), 3.0, 48),     # non-square
                                              ((5, 7), 4.0, 512)])    # smaller than one tile
def test_output_size_is_exact_and_progress_counts_tiles(d3sr, progress, size, factor, tile):
    image = torch.rand(1, *size, 3, generator=torch.Generator().manual_seed(3))
    out = tiling.upscale_tiled(d3sr, image, factor, "adain", tile=tile, overlap=8, vae_tile=tile)
    out_hw = (round(size[0] * factor), round(size[1] * factor))
    assert out.shape == (1, *out_hw, 3)
    assert 0.0 <= out.min().item() and out.max().item() <= 1.0
    steps = tiling.tile_plan(d3sr, out_hw, tile, 8, tile).steps
    assert progress[-1] == (steps, steps) and len(progress) == steps
    assert steps == 3 if tile == 512 else steps > 3


def test_interrupt_is_checked_between_tiles(d3sr, progress):
    comfy.utils.set_progress_bar_global_hook(lambda *a, **k: mm.interrupt_current_processing(True))
    image = torch.rand(1, 12, 12, 3)
    with pytest.raises(mm.InterruptProcessingException):
        tiling.upscale_tiled(d3sr, image, 4.0, "none", tile=16, overlap=0, vae_tile=16)
    assert not mm.processing_interrupted()


# What running out of memory raises: ComfyUI's OOM exception (CUDA), and the plain RuntimeError
# of torch's CPU allocator (message as torch 2.x prints it).
CPU_OOM = ("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: "
           "you tried to allocate 1 bytes.")


def oom_above(monkeypatch, max_latent_pixels: int, cpu: bool = False) -> list[tuple[int, int]]:
    """Make pipeline.predict_x0 raise an out-of-memory error (ComfyUI's, or the CPU allocator's
    with `cpu`) for latents larger than `max_latent_pixels`; returns the latent sizes it saw."""
    real, seen = pipeline.predict_x0, []

    def predict(base_model, z, *args, **kwargs):
        seen.append(tuple(z.shape[-2:]))
        if z.shape[-2] * z.shape[-1] > max_latent_pixels:
            raise RuntimeError(CPU_OOM) if cpu else mm.OOM_EXCEPTION("simulated out of memory")
        return real(base_model, z, *args, **kwargs)

    monkeypatch.setattr(pipeline, "predict_x0", predict)
    return seen


@pytest.fixture(scope="module")
def oom_case(d3sr) -> tuple[torch.Tensor, torch.Tensor]:
    """(image, its x4 AdaIN upscale in 32 px tiles): the input of the out-of-memory fallback
    cases and what the fallback must give."""
    image = smooth_image(20, 24)                           # -> 80 x 96, latent 10 x 12
    return image, tiling.upscale_tiled(d3sr, image, 4.0, "adain", tile=32)


@pytest.mark.parametrize("cpu", [False, True], ids=["comfy_oom", "cpu_allocator"])
def test_plain_upscale_falls_back_to_tiles_on_oom(d3sr, oom_case, monkeypatch, caplog, cpu):
    image, expected = oom_case
    monkeypatch.setattr(tiling, "MIN_TILE", 32)
    seen = oom_above(monkeypatch, 4 * 4, cpu)              # only 32 px tiles fit
    with caplog.at_level(logging.WARNING):
        out = upscale(d3sr, image, 4.0, "adain")
    assert seen[0] == (10, 12) and (6, 6) in seen and seen[-1] == (4, 4)   # whole, 48 px (half), 32 px
    assert out.shape == (1, 80, 96, 3)
    assert (out - expected).abs().max().item() < 1e-6
    text = caplog.text
    assert "out of memory upscaling 24x20 to 96x80 in one piece" in text
    assert "retrying image 1 of 1 with 32 px tiles" in text


def test_other_runtime_errors_are_not_taken_for_oom(d3sr, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")
    monkeypatch.setattr(pipeline, "predict_x0", broken)
    for run in (lambda: upscale(d3sr, torch.rand(1, 12, 16, 3), 4.0, "none"),
                lambda: tiling.upscale_tiled(d3sr, torch.rand(1, 12, 16, 3), 4.0, "none", tile=32)):
        with pytest.raises(RuntimeError, match="cannot be multiplied"):
            run()


def test_one_pixel_output_gets_the_reference_colour(d3sr):
    # AdaIN on 1 pixel: the unbiased deviation would be NaN; the limit is the reference's mean.
    out = upscale(d3sr, torch.full((1, 1, 1, 3), 0.25), 1.0, "adain")
    assert out.shape == (1, 1, 1, 3) and torch.isfinite(out).all()
    assert torch.allclose(out, torch.full_like(out, 0.25), atol=1e-4)


def test_oom_even_at_the_floor_is_a_clear_error(d3sr, monkeypatch):
    monkeypatch.setattr(tiling, "MIN_TILE", 32)
    oom_above(monkeypatch, 0)
    with pytest.raises(pipeline.D3SROutOfMemoryError, match="even with 32 px tiles"):
        upscale(d3sr, torch.rand(1, 12, 16, 3), 4.0, "none")
