"""Training speed and peak memory.

CPU (always): the tiny config (training/configs/tiny_cpu.yaml's models: two-level SD2-shaped
generator + small SDXL-shaped discriminator, random weights, 32x32 crops, batch 2, fp32), steps/s
over timed iterations after warm-up, peak resident memory. Writes
benchmarks/results/training_cpu.md.

CUDA (`--gpu`): the paper config's architecture with random weights (full SD2.1 UNet + KL VAE,
SDXL-base input + middle blocks, LoRA 16/16, 512x512 crops, bf16) at batch 1 and 8; steps/s and
peak CUDA memory, with the card named, in benchmarks/results/training_gpu.md. Without CUDA it
exits with a message and writes nothing.

    python benchmarks/bench_training.py [--steps N] [--gpu]
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import torch  # noqa: E402
from machine import machine_name  # noqa: E402

from d3sr_core import host  # noqa: E402
from d3sr_core.atomic_file import write_text_atomic  # noqa: E402

RESULTS = os.path.join(ROOT, "benchmarks", "results")


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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--gpu", action="store_true", help="the paper architecture on CUDA instead")
    args = parser.parse_args()
    print(bench_gpu(args.steps) if args.gpu else bench_cpu(args.steps))


if __name__ == "__main__":
    main()
