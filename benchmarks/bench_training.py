"""Training speed and peak memory.

CPU (always): the tiny config (training/configs/tiny_cpu.yaml's models: two-level SD2-shaped
generator + small SDXL-shaped discriminator, random weights, 32x32 crops, batch 2, fp32), steps/s
over timed iterations after warm-up, peak resident memory. Writes
benchmarks/results/training_cpu.md.

CUDA (`--gpu`): the paper config's architecture with random weights (full SD2.1 UNet + KL VAE,
SDXL-base input + middle blocks, LoRA 16/16, 512x512 crops, bf16) at batch 1 and 8; steps/s and
peak CUDA memory, with the card named, in benchmarks/results/training_gpu.md. Without CUDA it
exits with a message and writes nothing.

CPU, paper architecture (`--paper-cpu`): seeded random weights in the FULL SD2.1-base (UNet + KL
VAE) and FULL SDXL-base UNet layouts (ComfyUI's UNetModel with the real configs; ComfyUI's own
detection must name them SD2.x and SDXL), stored in bf16 as checkpoint files under --work (default
/tmp/d3sr_paper_cpu, about 7.5 GB), seeded conditioning files in place of the text encoders, then
real runs of `training.train` (3 iterations each, D step + G step) with the paper config's
settings except crop, batch and degradation: batch 1, bf16 autocast and frozen weights, at two crop
sizes with and without gradient checkpointing, one process per run. Then the step-3 export is loaded
by `d3sr_core.model.load_d3sr` onto the ComfyUI-loaded full SD2.1 checkpoint and upscales a 32x32
image x4. Writes benchmarks/results/training_paper_cpu.md with the peak memory, seconds per
iteration, parameter counts, the export check and the projected memory per GPU at 512 px.

    python benchmarks/bench_training.py [--steps N] [--gpu] [--paper-cpu [--crops 64 128]]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import torch  # noqa: E402
from machine import (  # noqa: E402
    machine_name,
    mem_available_gb,
    peak_rss_gb,
    reset_peak_rss,
    rss_gb,
    wait_for_memory,
)

from d3sr_core import architectures, host  # noqa: E402
from d3sr_core.atomic_file import write_text_atomic  # noqa: E402

RESULTS = os.path.join(ROOT, "benchmarks", "results")
WHO = "bench_training --paper-cpu"   # how its messages start


def _config(setup: dict, out: str, crop: int, batch: int, device: str, precision: str,
            rank: int, pretrained_vgg: bool, degradation: str = "bicubic", checkpointing: bool = False):
    import yaml

    from training.config import load_config, merge
    base = os.path.join(ROOT, "training", "configs", "tiny_cpu.yaml")
    with open(base) as f:
        data = yaml.safe_load(f)
    data = merge(data, {
        "output_dir": out, "device": device,
        "models": {"generator": setup["generator"], "discriminator": setup["discriminator"]},
        "generator": {"lora_rank": rank, "lora_alpha": rank},
        "discriminator": {"lora_rank": rank, "lora_alpha": rank},
        "loss": {"pretrained_vgg": pretrained_vgg},
        "train": {"crop": crop, "batch_size": batch, "precision": precision,
                  "gradient_checkpointing": checkpointing},
        "data": {"folders": [setup["data"]], "degradation": degradation},
    })
    path = os.path.join(out, "bench.yaml")
    os.makedirs(out, exist_ok=True)
    with open(path, "w") as f:
        yaml.safe_dump(data, f)
    return load_config(path)


def time_steps(trainer, batch: int, crop: int, steps: int, warmup: int = 2) -> float:
    """Seconds per iteration (D step + G step) on random crops, after `warmup` iterations."""
    gen = torch.Generator().manual_seed(0)
    hr = [torch.rand(batch, 3, crop, crop, generator=gen)]
    for _ in range(warmup):
        trainer.train_step(hr)
    if trainer.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(hr)
    if trainer.device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def bench_cpu(steps: int) -> str:
    host.import_comfy(cpu=True)
    import logging
    logging.disable(logging.WARNING)
    from devtools.tiny_setup import prepare_tiny_setup
    from training.trainer import Trainer
    with tempfile.TemporaryDirectory() as tmp:
        setup = prepare_tiny_setup(os.path.join(tmp, "tiny"), images=4, size=48)
        cfg = _config(setup, os.path.join(tmp, "out"), crop=32, batch=2, device="cpu", precision="fp32",
                      rank=4, pretrained_vgg=False)
        trainer = Trainer(cfg)
        sec = time_steps(trainer, 2, 32, steps)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    load = os.getloadavg()
    text = "\n".join([
        "# Training benchmark, CPU, tiny config",
        "",
        f"Machine: {machine_name()}",
        f"Load average during the run (1/5/15 min): {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} "
        "(the machine is shared; a high load slows every number below)",
        "",
        "Setup: training/configs/tiny_cpu.yaml's models (two-level SD2-shaped UNet with SD's real KL VAE "
        "layout as the generator, a small SDXL-shaped UNet's input+middle blocks as the discriminator, "
        "random weights), LoRA rank 4, 32x32 HR crops, batch 2, fp32, EA-DISTS on random VGG16 weights, "
        f"bicubic degradation. One iteration = one D step + one G step; {steps} timed after 2 warm-up.",
        "",
        "| steps/s | s/step | peak RSS (MB) |",
        "|---|---|---|",
        f"| {1 / sec:.3f} | {sec:.2f} | {peak_mb:.0f} |",
        "",
        "Command: `python benchmarks/bench_training.py`",
        "",
    ])
    write_text_atomic(os.path.join(RESULTS, "training_cpu.md"), text)
    return text


def _write_full_checkpoints(folder: str) -> dict:
    """Random-weight SD2.1-base and SDXL-base checkpoints (bf16) for the GPU benchmark."""
    from safetensors.torch import save_file

    from d3sr_core.architectures import SD21_UNET_CONFIG, SDXL_UNET_CONFIG
    from devtools import synthetic
    paths = {"generator": os.path.join(folder, "sd21-random.safetensors"),
             "discriminator": os.path.join(folder, "sdxl-random.safetensors")}
    vae = {"first_stage_model." + k: v.to(torch.bfloat16).contiguous()
           for k, v in synthetic.build_kl_vae(1).state_dict().items()}
    for key, config, seed in (("generator", SD21_UNET_CONFIG, 0), ("discriminator", SDXL_UNET_CONFIG, 2)):
        unet = synthetic.build_unet(config, seed, dtype=torch.bfloat16)
        sd = {"model.diffusion_model." + k: v.contiguous() for k, v in unet.state_dict().items()}
        del unet
        sd.update(vae)
        save_file(sd, paths[key])
        del sd
    return paths


def bench_gpu(steps: int) -> str:
    if not torch.cuda.is_available():
        print("bench_training --gpu: CUDA is not available on this machine; no GPU numbers were measured.")
        sys.exit(0)
    host.import_comfy(cpu=False)
    from devtools.tiny_setup import prepare_tiny_setup
    from training.trainer import Trainer
    card = torch.cuda.get_device_name(0)
    header = [
        "# Training benchmark, GPU, paper architecture (random weights)",
        "",
        f"Card: {card}. Machine: {machine_name()}",
        "",
        "Full SD2.1 UNet + KL VAE generator (LoRA 16/16), SDXL-base input + middle blocks discriminator "
        "(LoRA 16/16, 1280->1280->1 head), 512x512 crops, bf16 autocast and frozen weights, EA-DISTS "
        f"(VGG16 random weights, same cost as pretrained), Real-ESRGAN degradation on the GPU; {steps} "
        "timed steps.",
        "",
        "| batch | gradient checkpointing | steps/s | s/step | peak CUDA memory (GiB) |",
        "|---|---|---|---|---|",
    ]
    rows: list[str] = []
    path = os.path.join(RESULTS, "training_gpu.md")
    with tempfile.TemporaryDirectory() as tmp:
        setup = prepare_tiny_setup(os.path.join(tmp, "tiny"), images=2, size=520)
        setup.update(_write_full_checkpoints(tmp))
        for batch, ckpt in ((1, False), (8, False), (8, True)):
            torch.cuda.reset_peak_memory_stats()
            cfg = _config(setup, os.path.join(tmp, f"out{batch}{ckpt}"), crop=512, batch=batch, device="cuda",
                          precision="bf16", rank=16, pretrained_vgg=False, degradation="realesrgan",
                          checkpointing=ckpt)
            trainer = None
            try:
                trainer = Trainer(cfg)
                sec = time_steps(trainer, batch, 512, steps)
                rows.append(f"| {batch} | {'on' if ckpt else 'off'} | {1 / sec:.3f} | {sec:.3f} | "
                            f"{torch.cuda.max_memory_allocated() / 2**30:.1f} |")
            except torch.cuda.OutOfMemoryError:
                rows.append(f"| {batch} | {'on' if ckpt else 'off'} | out of memory | | "
                            f"{torch.cuda.max_memory_allocated() / 2**30:.1f} |")
            del trainer
            torch.cuda.empty_cache()
            write_text_atomic(path, "\n".join(header + rows) + "\n")  # each row as it is measured
    return "\n".join(header + rows) + "\n"


# ---------------------------------------------------------------------------------------------
# --paper-cpu: the paper's full architectures, a few real iterations on this machine's CPU
# ---------------------------------------------------------------------------------------------

PAPER_WORK = "/tmp/d3sr_paper_cpu"
REPLY = "@@paper "


def _write_seeded_checkpoint(path: str, unet_config: dict, seed: int, dtype: torch.dtype) -> dict:
    """A checkpoint (model.diffusion_model.* + first_stage_model.*) of ComfyUI's UNetModel with
    `unet_config` and SD's KL VAE, filled by synthetic.seeded_init_ directly in `dtype` (the
    float32 model never exists: SDXL's would be 10 GB). Returns ComfyUI's detection of the file."""
    from d3sr_core import comfy_internals
    from d3sr_core.weight_format import atomic_save_safetensors
    from devtools import synthetic
    from training.model_files import family, read_unet_config
    unet = comfy_internals.build_unet(unet_config, device="meta", dtype=dtype)
    unet.to_empty(device="cpu")
    synthetic.seeded_init_(unet, seed)
    sd = {"model.diffusion_model." + k: v for k, v in unet.state_dict().items()}
    unet_params = sum(v.numel() for v in sd.values())
    vae = synthetic.build_kl_vae(seed + 1)
    sd.update({"first_stage_model." + k: v.to(dtype) for k, v in vae.state_dict().items()})
    atomic_save_safetensors(path, sd, {})
    del sd, unet, vae
    detected = {k: v for k, v in read_unet_config(path, "generated").items() if not k.startswith("_")}
    comfy_name = comfy_internals.supported_model_name(detected)
    same = {k: detected.get(k) == v for k, v in unet_config.items() if k in detected}
    return {"path": path, "unet_params": unet_params, "family": family(detected),
            "comfy_model_config": comfy_name,
            "detected_matches_config": all(same.values()), "mismatched": [k for k, ok in same.items() if not ok],
            "bytes": os.path.getsize(path)}


def paper_prepare(work: str, tiny: bool = False) -> dict:
    """Write the full-size SD2.1-base and SDXL-base checkpoints (bf16), the conditioning files and
    a few training images into `work` (`tiny`: the test models instead, a plumbing check)."""
    host.import_comfy(cpu=True)
    from safetensors.torch import save_file

    from devtools import synthetic
    from devtools.tiny_setup import prepare_tiny_setup
    os.makedirs(work, exist_ok=True)
    t0 = time.time()
    info = {"generator": _write_seeded_checkpoint(os.path.join(work, "sd21-base-random-bf16.safetensors"),
                                                  synthetic.TINY_SD2_UNET_CONFIG if tiny
                                                  else architectures.SD21_UNET_CONFIG, 0, torch.bfloat16),
            "discriminator": _write_seeded_checkpoint(os.path.join(work, "sdxl-base-random-bf16.safetensors"),
                                                      synthetic.MINI_SDXL_UNET_CONFIG if tiny
                                                      else architectures.SDXL_UNET_CONFIG, 2, torch.bfloat16),
            "tiny": tiny}
    gen = torch.Generator().manual_seed(5)
    info["embedding_file"] = os.path.join(work, "sd21-empty-prompt-seeded.safetensors")
    save_file({"text_embedding": torch.randn(1, 77, 1024, generator=gen)}, info["embedding_file"])
    info["sdxl_conditioning_file"] = os.path.join(work, "sdxl-empty-prompt-seeded.safetensors")
    save_file({"context": torch.randn(1, 77, 2048, generator=gen), "pooled": torch.randn(1, 1280, generator=gen)},
              info["sdxl_conditioning_file"])
    info["data"] = prepare_tiny_setup(os.path.join(work, "tiny"), images=4, size=192)["data"]
    info["seconds"] = round(time.time() - t0, 1)
    return info


def _paper_config(info: dict, out: str, crop: int, checkpointing: bool, steps: int) -> str:
    """The paper config (training/configs/d3sr_paper.yaml) with this run's models, crop, batch 1,
    bf16, checkpointing, steps; written next to the run's output. Returns the YAML path."""
    import yaml

    from training.config import load_config, merge
    with open(os.path.join(ROOT, "training", "configs", "d3sr_paper.yaml")) as f:
        data = yaml.safe_load(f)
    data = merge(data, {
        "output_dir": out, "device": "cpu",
        "models": {k: info[k] for k in ("embedding_file", "sdxl_conditioning_file")}
        | {"generator": info["generator"]["path"], "discriminator": info["discriminator"]["path"]},
        "train": {"steps": steps, "batch_size": 1, "crop": crop, "precision": "bf16", "frozen_dtype": "bf16",
                  "gradient_checkpointing": checkpointing},
        # Real-ESRGAN's blur kernels need crops >= 148 px (training.config checks it)
        "data": {"folders": [info["data"]], "num_workers": 0,
                 "degradation": "realesrgan" if crop >= 148 else "bicubic"},
        "log": {"every": 1, "checkpoint_every": steps, "keep_checkpoints": 1, "sample_every": 0,
                "tensorboard": False, "progress": False},
    })
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "paper_cpu.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(data, f)
    load_config(path)  # validate now: a bad override fails here, not in the child
    return path


def _param_counts(trainer) -> dict:
    """Trainable and frozen parameter counts (and frozen bytes) of a Trainer."""
    def count(params) -> int:
        return sum(p.numel() for p in params)

    frozen = {"generator UNet": trainer.G.base.diffusion_model, "KL VAE": trainer.G.autoencoder,
              "discriminator SDXL input+middle blocks": trainer.D.unet}
    out = {"G LoRA": trainer.G.lora.num_parameters(), "G embedding": trainer.G.embedding.numel(),
           "G embedding trained": bool(trainer.G.embedding.requires_grad),
           "D LoRA": trainer.D.lora.num_parameters(), "D head": count(trainer.D.head.parameters()),
           "trainable total": count(trainer.g_params) + count(trainer.d_params),
           "frozen": {k: count(m.parameters()) for k, m in frozen.items()},
           "frozen bytes": sum(p.numel() * p.element_size() for m in frozen.values() for p in m.parameters()),
           "perceptual (VGG16, fp32)": count(trainer.perceptual.parameters()) if trainer.perceptual else 0}
    return out


def paper_worker(config_path: str, out_json: str) -> None:
    """One `training.loop.train` run (in its own process): memory before the first step, peak
    during the steps, seconds per step, parameter counts -> `out_json`."""
    import logging

    host.import_comfy(cpu=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from training.config import load_config
    from training.loop import train
    from training.trainer import Trainer
    record: dict = {"steps": []}
    original = Trainer.train_step

    def instrumented(trainer, hr_micro_batches):
        if not record["steps"]:                 # models loaded, nothing trained yet
            record.update(before_steps_gb=rss_gb(), load_peak_gb=peak_rss_gb(), params=_param_counts(trainer),
                          peak_reset=reset_peak_rss())
        t = time.perf_counter()
        metrics = original(trainer, hr_micro_batches)
        record["steps"].append({"seconds": time.perf_counter() - t, "peak_gb": peak_rss_gb(), "rss_gb": rss_gb(),
                                **{k: metrics[k] for k in ("loss_d", "loss_g", "loss_mse", "loss_gan")}})
        return metrics

    Trainer.train_step = instrumented
    t0 = time.perf_counter()
    record["exit_code"] = train(load_config(config_path))
    record["total_s"] = time.perf_counter() - t0
    record["process_peak_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    record["threads"] = torch.get_num_threads()
    with open(out_json, "w") as f:
        json.dump(record, f, indent=1)


def paper_export_check(checkpoint: str, weights: str) -> dict:
    """The trainer's export on the ComfyUI-loaded full SD2.1 checkpoint: load_d3sr (what the
    D3SRModelLoader node runs) and d3sr_core.upscale.upscale of a 32x32 image x4."""
    host.import_comfy(cpu=True)
    import comfy.sd
    import comfy.utils

    from d3sr_core import comfy_internals
    from d3sr_core.model import load_d3sr
    from d3sr_core.upscale import upscale
    comfy.utils.set_progress_bar_enabled(False)
    t0 = time.perf_counter()
    model, _clip, vae, _ = comfy.sd.load_checkpoint_guess_config(checkpoint, output_vae=True, output_clip=False)
    d3sr = load_d3sr(model, vae, weights)
    image = torch.rand(1, 32, 32, 3, generator=torch.Generator().manual_seed(0))
    out = upscale(d3sr, image, 4.0, "adain")
    return {"model_config": comfy_internals.model_config_name(model.model), "lora_patches": len(d3sr.model.patches),
            "timestep": d3sr.timestep, "output_shape": list(out.shape), "finite": bool(torch.isfinite(out).all()),
            "output_std": float(out.std()), "seconds": round(time.perf_counter() - t0, 1), "rss_gb": rss_gb()}


def _child(args: list[str], label: str) -> dict:
    """Run this script with `args` in a fresh process; its last REPLY line is the result."""
    print(f"== {label}", flush=True)
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), *args], stdout=subprocess.PIPE, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(REPLY)]
    if proc.returncode or not lines:
        raise SystemExit(f"bench_training --paper-cpu: {label} failed (exit {proc.returncode}); its log is above")
    return json.loads(lines[-1][len(REPLY):])


def bench_paper_cpu(args: argparse.Namespace) -> str:
    work = args.work
    os.makedirs(work, exist_ok=True)
    free = shutil.disk_usage(work).free / 2 ** 30
    info_path = os.path.join(work, "models.json")
    if not os.path.exists(info_path):
        if free < 10:
            raise SystemExit(f"bench_training --paper-cpu: {work} has {free:.0f} GB free; the bf16 checkpoints "
                             "need about 7.5 GB (use --work on a larger disk)")
        wait_for_memory(8, args.wait_min, WHO)
        info = _child(["--paper-prepare", "--work", work] + (["--paper-tiny"] if args.paper_tiny else []),
                      "writing the seeded checkpoints (bf16)")
        with open(info_path, "w") as f:
            json.dump(info, f, indent=1)
    with open(info_path) as f:
        info = json.load(f)
    runs = []
    crops = sorted(args.crops)
    for checkpointing in (True, False) if not args.only_checkpointing else (True,):
        for crop in crops:
            out = os.path.join(work, f"run-crop{crop}-{'ckpt' if checkpointing else 'nockpt'}")
            shutil.rmtree(out, ignore_errors=True)
            cfg = _paper_config(info, out, crop, checkpointing, args.paper_steps)
            wait_for_memory(args.min_available_gb, args.wait_min, WHO)
            available = mem_available_gb()
            rec = _child(["--paper-worker", cfg, "--work", work], f"training, crop {crop}, gradient checkpointing "
                         f"{'on' if checkpointing else 'off'} (MemAvailable {available:.1f} GB)")
            rec.update(crop=crop, checkpointing=checkpointing, out=out, config=cfg, available_before_gb=available)
            runs.append(rec)
    main_run = next(r for r in runs if r["checkpointing"] and r["crop"] == crops[-1])
    from training.checkpoint import export_path
    export = export_path(os.path.join(main_run["out"], "checkpoints"), args.paper_steps)
    wait_for_memory(8, args.wait_min, WHO)
    check = _child(["--paper-export", export, "--work", work], "export check: load_d3sr + upscale 32 -> 128")
    text = paper_report(info, runs, main_run, export, check, args)
    if info.get("tiny"):
        return "PLUMBING CHECK with the tiny test models (not written to benchmarks/results):\n\n" + text
    write_text_atomic(os.path.join(RESULTS, "training_paper_cpu.md"), text)
    return text


def _activation_fit(runs: list[dict], checkpointing: bool) -> tuple[float, float] | None:
    """(a0 GB, k GB per pixel) of activation(crop) = a0 + k * crop^2 through the two smallest and
    largest crops measured with this checkpointing setting; None if fewer than two."""
    pts = sorted((r["crop"], r["activation_gb"]) for r in runs if r["checkpointing"] == checkpointing)
    if len(pts) < 2:
        return None
    (c1, a1), (c2, a2) = pts[0], pts[-1]
    k = (a2 - a1) / (c2 ** 2 - c1 ** 2)
    return a1 - k * c1 ** 2, k


def paper_report(info: dict, runs: list[dict], main_run: dict, export: str, check: dict,
                 args: argparse.Namespace) -> str:
    for r in runs:
        r["step_peak_gb"] = max(s["peak_gb"] for s in r["steps"])
        r["activation_gb"] = r["step_peak_gb"] - r["before_steps_gb"]
    p = main_run["params"]
    load = os.getloadavg()
    g, d = info["generator"], info["discriminator"]
    lines = [
        "# Training at the paper's architecture, CPU (random weights)", "",
        f"Machine: {machine_name()}", "",
        f"Command: `python benchmarks/bench_training.py --paper-cpu {' '.join(sys.argv[2:])}`".replace("  ", " "), "",
        f"Load average at the end (1/5/15 min): {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (shared machine: "
        "seconds are slowed by the other jobs; memory is not).", "",
        "## Models (seeded random weights, ComfyUI's UNetModel, stored bf16)", "",
        "| file | UNet parameters | ComfyUI detects | size on disk |", "|---|---|---|---|",
        f"| generator: SD2.1-base UNet + KL VAE | {g['unet_params'] / 1e6:.1f} M | {g['family']} "
        f"({g['comfy_model_config']}; detected config = built config: {g['detected_matches_config']}) | "
        f"{g['bytes'] / 1e9:.2f} GB |",
        f"| discriminator: SDXL-base UNet (full) + KL VAE | {d['unet_params'] / 1e6:.1f} M | {d['family']} "
        f"({d['comfy_model_config']}; detected config = built config: {d['detected_matches_config']}) | "
        f"{d['bytes'] / 1e9:.2f} GB |", "",
        "No text encoders: models.embedding_file holds a seeded [1, 77, 1024] SD2.1 embedding and "
        "models.sdxl_conditioning_file a seeded context [1, 77, 2048] + pooled [1, 1280] (the trainer's "
        "precomputed-conditioning options).", "",
        "## Settings", "",
        "training/configs/d3sr_paper.yaml (LoRA 16/16 on both UNets, embedding "
        f"{'trained' if p['G embedding trained'] else 'frozen'}, EA-DISTS with the "
        "pretrained VGG16, lambda 1.0 / 0.5, AdamW 5e-5, grad clip 1.0, T_L 399) except: device cpu, batch 1, "
        "train.precision bf16 (autocast) and frozen_dtype bf16, gradient checkpointing as listed, crops "
        f"{', '.join(str(c) for c in sorted({r['crop'] for r in runs}))} px, bicubic degradation below 148 px "
        "(Real-ESRGAN's 21-tap blurs need crops >= 148; the degradation runs before the networks and holds "
        f"no activations), data.num_workers 0, {args.paper_steps} iterations (D step + G step) per run, "
        "one fresh process per run, checkpoint + D3SR export at the last step.", "",
        "## Parameters", "",
        "| | count |", "|---|---|",
        f"| G LoRA (rank 16) | {p['G LoRA'] / 1e6:.2f} M |",
        f"| G fixed embedding ({'trained' if p['G embedding trained'] else 'frozen'}) | {p['G embedding']:,} |",
        f"| D LoRA (rank 16) | {p['D LoRA'] / 1e6:.2f} M |",
        f"| D head | {p['D head'] / 1e6:.2f} M |",
        f"| trainable total | {p['trainable total'] / 1e6:.2f} M |",
        *[f"| frozen: {k} | {v / 1e6:.1f} M |" for k, v in p["frozen"].items()],
        f"| frozen total (bf16: {p['frozen bytes'] / 1e9:.2f} GB) | {sum(p['frozen'].values()) / 1e6:.1f} M |",
        f"| EA-DISTS VGG16 (frozen, fp32) | {p['perceptual (VGG16, fp32)'] / 1e6:.1f} M |", "",
        "## Runs", "",
        "Memory is this process's resident set: before the first step (all models loaded), the peak during "
        "the steps (kernel peak-RSS mark reset before the first step), and the whole process's peak "
        "(ru_maxrss, loading included). Activation = step peak - before.", "",
        "| crop | checkpointing | s / iteration (each) | before steps (GB) | step peak (GB) | activation (GB) "
        "| process peak (GB) | losses at the last step (D / G) |", "|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        last = r["steps"][-1]
        each = ", ".join(f"{st['seconds']:.1f}" for st in r["steps"])
        lines.append(f"| {r['crop']} | {'on' if r['checkpointing'] else 'off'} | "
                     f"{each} | {r['before_steps_gb']:.2f} | "
                     f"{r['step_peak_gb']:.2f} | {r['activation_gb']:.2f} | {r['process_peak_gb']:.2f} | "
                     f"{last['loss_d']:.3f} / {last['loss_g']:.3f} |")
    peak = max(r["process_peak_gb"] for r in runs)
    lines += ["", f"Highest process peak over all runs: **{peak:.2f} GB** (the machine has 24 GB).", ""]
    lines += ["## Export through the node's loader", "",
              f"`{os.path.basename(export)}` (step {args.paper_steps} of the crop-{main_run['crop']} checkpointed run) "
              "loaded by `d3sr_core.model.load_d3sr` (what D3SRModelLoader runs) onto the full SD2.1 checkpoint "
              f"loaded by `comfy.sd.load_checkpoint_guess_config` ({check['model_config']}): {check['lora_patches']} "
              f"LoRA patches, T_L {check['timestep']}; `d3sr_core.upscale.upscale` of a 32x32 image x4 gave "
              f"{check['output_shape']} (expected [1, 128, 128, 3]), finite {check['finite']}, std "
              f"{check['output_std']:.3f}, in {check['seconds']} s.", ""]
    lines += paper_projection(runs, p)
    return "\n".join(lines) + "\n"


def paper_projection(runs: list[dict], params: dict) -> list[str]:
    """Projected memory per GPU at 512 px crops, batch 2 per GPU, from the measured activations."""
    static = params["frozen bytes"] / 2 ** 30 + 16 * params["trainable total"] / 2 ** 30 \
        + 4 * params["perceptual (VGG16, fp32)"] / 2 ** 30
    lines = ["## Projected memory per GPU: 512 px crops, batch 2 per GPU (4 GPUs, global 8)", "",
             f"Static part: frozen weights in bf16 ({params['frozen bytes'] / 2 ** 30:.2f} GiB) + trainable "
             "parameters with their gradients and AdamW moments (16 bytes each, fp32: "
             f"{16 * params['trainable total'] / 2 ** 30:.2f} GiB) + VGG16 fp32 "
             f"({4 * params['perceptual (VGG16, fp32)'] / 2 ** 30:.2f} GiB) = **{static:.2f} GiB**.", "",
             "Activations: the measured activation memory a(c) at crop c is fitted as a0 + k c^2 through the "
             "two crops (activations of convolutions, norms and linear layers grow with the pixel count; a0 "
             "holds what does not, e.g. the optimizer's first-step allocations); per GPU at 512 px and batch "
             "2: a0 + 2 k 512^2. This assumes attention that stores O(tokens) for backward, as PyTorch's "
             "flash / memory-efficient SDPA on GPUs do (on the CPU ComfyUI's sub-quadratic attention is used; "
             "at 64-128 px its quadratic part is negligible). Not included: the CUDA context and allocator "
             "slack (typically 0.5-1.5 GiB).", "",
             "| gradient checkpointing | a0 (GB) | k (MB per 1000 px) | activations at 512 px, batch 2 (GB) "
             "| projected total per GPU (GB) |", "|---|---|---|---|---|"]
    for ckpt in (True, False):
        fit = _activation_fit(runs, ckpt)
        if fit is None:
            lines.append(f"| {'on' if ckpt else 'off'} | not measured | | | |")
            continue
        a0, k = fit
        act = max(a0, 0.0) + 2 * k * 512 ** 2
        lines.append(f"| {'on' if ckpt else 'off'} | {a0:.2f} | {k * 1e3 * 1e3:.3f} | {act:.1f} | "
                     f"**{static + act:.1f}** |")
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--gpu", action="store_true", help="the paper architecture on CUDA instead")
    parser.add_argument("--paper-cpu", action="store_true",
                        help="full SD2.1 + SDXL architectures, a few real iterations on the CPU")
    parser.add_argument("--crops", type=int, nargs="+", default=[64, 128], help="--paper-cpu crop sizes")
    parser.add_argument("--paper-steps", type=int, default=3, help="--paper-cpu iterations per run")
    parser.add_argument("--only-checkpointing", action="store_true",
                        help="--paper-cpu: skip the runs without gradient checkpointing")
    parser.add_argument("--work", default=PAPER_WORK, help="--paper-cpu folder for the generated files")
    parser.add_argument("--min-available-gb", type=float, default=16,
                        help="--paper-cpu: wait for this much available memory before each training run")
    parser.add_argument("--wait-min", type=float, default=60, help="--paper-cpu: longest wait for memory")
    parser.add_argument("--paper-tiny", action="store_true",
                        help="--paper-cpu plumbing check with the tiny test models (use another --work)")
    parser.add_argument("--paper-prepare", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--paper-worker", metavar="CONFIG", help=argparse.SUPPRESS)
    parser.add_argument("--paper-export", metavar="WEIGHTS", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.paper_prepare:
        print(REPLY + json.dumps(paper_prepare(args.work, args.paper_tiny)), flush=True)
    elif args.paper_worker:
        out_json = os.path.join(os.path.dirname(args.paper_worker), "bench_record.json")
        paper_worker(args.paper_worker, out_json)
        with open(out_json) as f:
            print(REPLY + json.dumps(json.load(f)), flush=True)
    elif args.paper_export:
        ckpt = os.path.join(args.work, "sd21-base-random-bf16.safetensors")
        print(REPLY + json.dumps(paper_export_check(ckpt, args.paper_export)), flush=True)
    elif args.paper_cpu:
        print(bench_paper_cpu(args))
    else:
        print(bench_gpu(args.steps) if args.gpu else bench_cpu(args.steps))


if __name__ == "__main__":
    main()
