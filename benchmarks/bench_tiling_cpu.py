"""CPU benchmark of the tiled D3SR path with small seeded models (devtools.synthetic).

Measures, each run in a fresh subprocess (so ru_maxrss is that run's own peak):
  - peak process memory and time per output megapixel for 1024^2, 2048^2, 4096^2 outputs
    through `tiling.upscale_tiled` (x4 from 256^2, 512^2, 1024^2 inputs)
  - untiled (`upscale.upscale`) against tiled where both fit, and a tile / overlap sweep
  - our tiled VAE against ComfyUI's `VAE.encode_tiled` / `decode_tiled` (time, distance to the
    untiled VAE, and the seam measure of tests/test_tiling.py) with the full-size KL VAE
Writes benchmarks/results/tiling_cpu.md.

Models: the tiny SD2 UNet of the tests (37 M parameters). The VAE is ComfyUI's AutoencoderKL
either with SD's real config (`--vae kl`, 84 M parameters, about 7 TFLOP per output megapixel
for encode + decode, too slow on 2 cores for 4096^2) or the same architecture at 1/4 width
with one res block per level (`--vae small`, the default for the size sweep). Weights are
random, so only time and memory mean anything, not the images.

Run: python benchmarks/bench_tiling_cpu.py [--quick] [--sizes 1024 2048 4096] [--sizes-only]
--sizes runs in the order given; a size given more than once is measured each time (interleaved
with the others, so a changing machine load hits every size) and the median is reported.
--sizes-only runs the size sweep alone (the time-per-MP ratio), nothing else.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results", "tiling_cpu.md")
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
from machine import machine_name, rss_gb  # noqa: E402

SMALL_VAE = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3,
             "ch": 32, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 1, "attn_resolutions": [],
             "dropout": 0.0}


# ----------------------------------------------------------------------------- child side
def load_models(work: str, vae_kind: str):
    """(D3SRModel) from the files in `work`, with the KL or the small VAE."""
    sys.path.insert(0, ROOT)
    from d3sr_core import host
    host.import_comfy(cpu=True)
    import comfy.sd
    import comfy.utils

    from d3sr_core.model import load_d3sr
    model, _clip, vae, _ = comfy.sd.load_checkpoint_guess_config(os.path.join(work, "tiny-sd2.safetensors"))
    if vae_kind == "small":
        sd = comfy.utils.load_torch_file(os.path.join(work, "small-vae.safetensors"))
        vae = comfy.sd.VAE(sd=sd, config={"params": {"ddconfig": SMALL_VAE, "embed_dim": 4}})
    return load_d3sr(model, vae, os.path.join(work, "tiny-t399.safetensors"))


def lr_image(size: int, factor: float = 4.0):
    """IMAGE [1, size/f, size/f, 3]: smooth colours plus seeded noise, in [0, 1]."""
    import torch
    n = round(size / factor)
    gen = torch.Generator().manual_seed(size)
    y, x = torch.linspace(0, 1, n)[:, None], torch.linspace(0, 1, n)[None, :]
    base = torch.stack([0.5 + 0.3 * torch.sin(6.3 * (x + y + p)) for p in (0, 0.3, 0.6)], -1)
    return (base + 0.05 * torch.randn(n, n, 3, generator=gen)).clamp(0, 1)[None]


def child(args: argparse.Namespace) -> None:
    import torch
    d3sr = load_models(args.work, args.vae)
    from d3sr_core import tiling
    from d3sr_core.upscale import upscale
    loaded = rss_gb() * 1024
    # Warm-up on a small image (kernel selection, lazy allocations), not timed.
    tiling.upscale_tiled(d3sr, lr_image(64), 4.0, "adain", tile=64, overlap=16, vae_tile=64)
    image = lr_image(args.size)
    t0 = time.perf_counter()
    if args.mode == "plain":
        out = upscale(d3sr, image, 4.0, "adain")
    else:
        out = tiling.upscale_tiled(d3sr, image, 4.0, "adain", tile=args.tile, overlap=args.overlap,
                                   vae_tile=args.vae_tile)
    seconds = time.perf_counter() - t0
    assert out.shape == (1, args.size, args.size, 3) and torch.isfinite(out).all()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps({"seconds": seconds, "peak_mb": peak, "loaded_mb": loaded}))


def vae_child(args: argparse.Namespace) -> None:
    """Our tiled VAE vs ComfyUI's encode_tiled/decode_tiled on one image (KL VAE)."""
    import torch
    d3sr = load_models(args.work, "kl")
    from d3sr_core import tiling
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    n, tile = args.size, args.vae_tile
    overlap = tile // 4     # ComfyUI's passes use tile / 2 strips, so the overlap must stay below that
    img = lr_image(n, 1.0)                                                  # [1, n, n, 3]
    px = img.movedim(-1, 1)
    vae = d3sr.vae
    res = {}
    with torch.inference_mode():      # as ComfyUI runs nodes (its tiled VAE needs it)
        vae.decode(vae.encode(img[:, :64, :64]))                           # warm-up
        t0 = time.perf_counter()
        ref = vae.decode(vae.encode(img))
        res["untiled_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        z = tiling.tiled_encode(d3sr, px, (n, n), tile, overlap)
        ours = torch.zeros(1, 3, n, n)
        tiling.tiled_decode_(d3sr, z, ours, tile, overlap)
        res["ours_s"] = time.perf_counter() - t0
        ours = ours.movedim(1, -1)
        t0 = time.perf_counter()
        zc = vae.encode_tiled(img, tile_x=tile, tile_y=tile, overlap=overlap)
        comfy_out = vae.decode_tiled(zc, tile_x=tile // 8, tile_y=tile // 8, overlap=overlap // 8)
        res["comfy_s"] = time.perf_counter() - t0
    from test_tiling import border_ratio
    grid = tiling.TileGrid(n // 8, n // 8, tile // 8, overlap // 8)
    ours_b = {8 * v for s in grid.rows for v in (s.start, s.stop)} - {0, n}
    comfy_b = comfy_borders(n, tile, overlap)
    for name, out, borders in (("untiled", ref, ours_b), ("ours", ours, ours_b),
                               ("comfy", comfy_out, comfy_b)):
        res[f"{name}_mae"] = (out - ref).abs().mean().item()
        res[f"{name}_seam"] = max(border_ratio(out, borders, 1), border_ratio(out, borders, 2))
    print("RESULT " + json.dumps(res))


def comfy_borders(n: int, tile: int, overlap: int) -> set[int]:
    """Pixel lines where a tile of ComfyUI's tiled_scale starts or ends, for its three encode
    passes (pixel tiles) and three decode passes (latent tiles), on an n x n image."""
    out = set()
    for t, ov, unit in ((tile, overlap, 1), (tile // 8, overlap // 8, 8)):
        length = n // unit
        for size in (t, t // 2, t * 2):
            if length <= size:
                continue
            for it in range(0, length - ov, size - ov):
                pos = max(0, min(length - ov, it))
                out |= {pos * unit, (pos + min(size, length - pos)) * unit}
    return out - {0, n}


# ----------------------------------------------------------------------------- parent side
def make_models(work: str) -> None:
    sys.path.insert(0, ROOT)
    from d3sr_core import host
    host.import_comfy(cpu=True)
    from d3sr_core.weight_format import atomic_save_safetensors, write_weights
    from devtools import synthetic
    synthetic.write_checkpoint(os.path.join(work, "tiny-sd2.safetensors"), seed=0)
    unet = synthetic.build_unet(synthetic.TINY_SD2_UNET_CONFIG, seed=0)
    write_weights(os.path.join(work, "tiny-t399.safetensors"), synthetic.random_d3sr_weights(unet, seed=10))
    from d3sr_core import comfy_internals
    small = synthetic.seeded_init_(comfy_internals.build_kl_vae(SMALL_VAE), 7)
    atomic_save_safetensors(os.path.join(work, "small-vae.safetensors"),
                            {k: v.contiguous() for k, v in small.state_dict().items()}, {})


CACHE: dict = {}


def median_run(runs: list[dict]) -> dict:
    """The run with the median time (the lower middle one for an even count)."""
    return sorted(runs, key=lambda r: r["seconds"])[(len(runs) - 1) // 2]


def run_child(work: str, extra: list[str]) -> dict:
    """Run one measurement in a fresh process; results are kept in the --cache file, so a rerun
    after a failure repeats only what is missing."""
    key = " ".join(extra)
    if key in CACHE.get("runs", {}):
        print("   (cached)", key, flush=True)
        CACHE["hits"] = CACHE.get("hits", 0) + 1
        return CACHE["runs"][key]
    cmd = [sys.executable, os.path.abspath(__file__), "--work", work, *extra]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            out = json.loads(line[7:])
            out["wall_s"] = time.time() - t0
            print("  ", " ".join(extra), "->", {k: round(v, 3) for k, v in out.items()}, flush=True)
            if CACHE.get("path"):
                CACHE.setdefault("runs", {})[key] = out
                with open(CACHE["path"], "w") as f:
                    json.dump(CACHE["runs"], f, indent=1)
            return out
    raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096])
    p.add_argument("--quick", action="store_true", help="skip the sweep and the VAE comparison")
    p.add_argument("--sizes-only", action="store_true",
                   help="only the output-size sweep with the defaults (memory and time per MP)")
    p.add_argument("--vae-size", type=int, default=256, help="image size for the VAE comparison")
    p.add_argument("--out", default=RESULTS)
    p.add_argument("--cache", help="JSON file keeping each measurement (reused by a rerun)")
    # child options
    p.add_argument("--work")
    p.add_argument("--child", action="store_true")
    p.add_argument("--vae-child", action="store_true")
    p.add_argument("--mode", default="tiled")
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--tile", type=int, default=512)
    p.add_argument("--overlap", type=int, default=64)
    p.add_argument("--vae-tile", type=int, default=0)
    p.add_argument("--vae", default="small")
    p.add_argument("--run", type=int, default=0, help="repeat number (tells repeated runs apart in --cache)")
    args = p.parse_args()
    if args.child:
        return child(args)
    if args.vae_child:
        return vae_child(args)

    sys.path.insert(0, ROOT)
    from d3sr_core import host
    host.import_comfy(cpu=True)
    from d3sr_core import tiling
    if args.cache:
        CACHE["path"] = args.cache
        if os.path.exists(args.cache):
            with open(args.cache) as f:
                CACHE["runs"] = json.load(f)
    started, load0 = time.time(), os.getloadavg()
    lines = [f"# Tiled D3SR on CPU\n\nMachine: {machine_name()}.\n",
             f"Load average at start {load0[0]:.1f} (other jobs shared the cores; times are noisy).\n",
             f"Command: `python benchmarks/bench_tiling_cpu.py {' '.join(sys.argv[1:])}`\n"]
    with tempfile.TemporaryDirectory() as work:
        make_models(work)
        # 1. sizes: memory and time per MP through the tiled path (defaults)
        print("sizes (tiled, small VAE)", flush=True)
        runs: dict[int, list[dict]] = {}
        for s in args.sizes:   # in the order given: repeated sizes interleave with the others
            runs.setdefault(s, []).append(run_child(work, [
                "--child", "--size", str(s), "--tile", str(tiling.DEFAULT_TILE),
                "--overlap", str(tiling.DEFAULT_OVERLAP), "--run", str(len(runs.get(s, [])))]))
        sizes = {s: median_run(r) for s, r in sorted(runs.items())}
        lines.append("\n## Output size: peak memory and time per megapixel (tiled, defaults)\n")
        lines.append(f"Tiny SD2 UNet + small VAE, x4, tile {tiling.DEFAULT_TILE} px, overlap "
                     f"{tiling.DEFAULT_OVERLAP} px, VAE tile automatic ({tiling.VAE_TILE_CPU} px on CPU). "
                     "Peak = ru_maxrss of a fresh process (models + runtime included); 'after load' = "
                     "RSS once the models are loaded.\n")
        lines.append(f"Sizes run in this order (each a fresh process; median of a repeated size): "
                     f"{', '.join(map(str, args.sizes))}.\n")
        lines.append("| output | peak RSS (MB) | after load (MB) | time (s) | s per MP | runs (s) |")
        lines.append("|---|---|---|---|---|---|")
        for s, r in sizes.items():
            lines.append(f"| {s}x{s} | {r['peak_mb']:.0f} | {r['loaded_mb']:.0f} | {r['seconds']:.1f} | "
                         f"{r['seconds'] / (s * s / 1e6):.2f} | "
                         f"{', '.join(format(x['seconds'], '.1f') for x in runs[s])} |")
        lo, hi = min(sizes), max(sizes)
        if lo != hi:
            mem_ratio = sizes[hi]["peak_mb"] / sizes[lo]["peak_mb"]
            t_ratio = (sizes[hi]["seconds"] / hi ** 2) / (sizes[lo]["seconds"] / lo ** 2)
            lines.append(f"\nPeak {hi}^2 / {lo}^2 = **{mem_ratio:.2f}x** (goal <= 1.5x: "
                         f"{'met' if mem_ratio <= 1.5 else 'NOT met'}). Time per MP {hi}^2 / {lo}^2 = "
                         f"**{t_ratio:.2f}x** (goal <= 1.25x: {'met' if t_ratio <= 1.25 else 'NOT met'}).\n")

        # 1b. the same with tiles that come out exactly equal at every size (256 px UNet and VAE
        # tiles, 64 px overlap: the layout needs no shrinking), so per-MP cost isolates size
        if lo != hi and not args.sizes_only:
            print("fixed tile geometry", flush=True)
            fixed = {s: run_child(work, ["--child", "--size", str(s), "--tile", "256", "--overlap", "64",
                                         "--vae-tile", "256"]) for s in (lo, hi)}
            lines.append(f"\nWith the defaults the layout shrinks tiles to cover an image evenly: at {lo}^2 the "
                         "UNet and VAE tiles come out smaller than at large sizes, and attention makes the "
                         "cost per pixel grow with the tile area. With 256 px tiles (UNet and VAE), 64 px "
                         "overlap, every tile is exactly 256 px at both sizes:\n")
            lines.append("| output | peak RSS (MB) | time (s) | s per MP |")
            lines.append("|---|---|---|---|")
            for s, r in fixed.items():
                lines.append(f"| {s}x{s} | {r['peak_mb']:.0f} | {r['seconds']:.1f} | "
                             f"{r['seconds'] / (s * s / 1e6):.2f} |")
            f_ratio = (fixed[hi]["seconds"] / hi ** 2) / (fixed[lo]["seconds"] / lo ** 2)
            f_mem = fixed[hi]["peak_mb"] / fixed[lo]["peak_mb"]
            lines.append(f"\nTime per MP {hi}^2 / {lo}^2 = **{f_ratio:.2f}x**, peak **{f_mem:.2f}x**.\n")

        if not args.sizes_only:
            # 2. untiled vs tiled where both fit
            print("untiled vs tiled", flush=True)
            lines.append("\n## Tiled against untiled (where both fit)\n")
            lines.append("| output | untiled (s) | untiled peak (MB) | tiled (s) | tiled peak (MB) "
                         "| tiled / untiled time |")
            lines.append("|---|---|---|---|---|---|")
            for s in (512, 1024):
                plain = run_child(work, ["--child", "--mode", "plain", "--size", str(s)])
                tiled = sizes.get(s) or run_child(work, ["--child", "--size", str(s)])
                lines.append(f"| {s}x{s} | {plain['seconds']:.1f} | {plain['peak_mb']:.0f} | {tiled['seconds']:.1f} "
                             f"| {tiled['peak_mb']:.0f} | {tiled['seconds'] / plain['seconds']:.2f} |")

            if not args.quick:
                # 3. tile / overlap sweep at 1024^2
                print("sweep", flush=True)
                lines.append("\n## Tile and overlap sweep (1024x1024 output, small VAE)\n")
                lines.append("| tile (px) | overlap (px) | VAE tile (px) | time (s) | peak RSS (MB) |")
                lines.append("|---|---|---|---|---|")
                for tile, ov, vt in ((256, 64, 512), (512, 128, 512), (1024, 64, 512)):
                    r = run_child(work, ["--child", "--size", "1024", "--tile", str(tile), "--overlap", str(ov),
                                         "--vae-tile", str(vt)])
                    lines.append(f"| {tile} | {ov} | {vt} | {r['seconds']:.1f} | {r['peak_mb']:.0f} |")

                # 4. our tiled VAE vs ComfyUI's, full-size KL VAE
                print("VAE comparison (KL)", flush=True)
                n, vt = args.vae_size, args.vae_size // 2
                r = run_child(work, ["--vae-child", "--size", str(n), "--vae-tile", str(vt)])
                lines.append(f"\n## Tiled VAE: ours against ComfyUI's encode_tiled/decode_tiled\n\n"
                             f"SD's full KL VAE, a {n}x{n} image encoded and decoded with {vt} px tiles, "
                             f"{vt // 4} px overlap (both paths). 'MAE' = mean |tiled - untiled| in [0, 1]; "
                             "'seam' = the test's border/interior difference ratio at tile borders.\n")
                lines.append("| VAE path | time (s) | MAE to untiled | seam ratio |")
                lines.append("|---|---|---|---|")
                for name, label in (("untiled", "untiled"), ("ours", "ours (1 pass, raised-cosine)"),
                                    ("comfy", "ComfyUI (3 passes, linear feather)")):
                    lines.append(f"| {label} | {r[name + '_s']:.1f} | {r[name + '_mae']:.4f} | "
                                 f"{r[name + '_seam']:.2f} |")
    load1 = os.getloadavg()
    lines.append(f"\nTotal benchmark wall time {time.time() - started:.0f} s; load average at end "
                 f"{load1[0]:.1f}.\n")
    if CACHE.get("hits"):
        lines.append(f"{CACHE['hits']} of the measurements above were reused from an earlier invocation "
                     f"of the same script (--cache); each is still one fresh process.\n")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines))
    print("wrote", args.out)


if __name__ == "__main__":
    main()
