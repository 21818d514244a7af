"""This pack's one-step upscale against the peers' diffusers + PEFT code path, on the FULL-SIZE
SD2.1-base architecture, and how close each part of it comes to the machine's matmul peak.

Both paths get the same seeded random weights (SD2.1-base UNet 865.9 M + SD's KL VAE, written
once as a ComfyUI checkpoint and converted to diffusers names with ComfyUI's own name maps), the
same rank-16 LoRA (alpha 16, random non-zero A and B) on the same 252 UNet layers, the same fixed
embedding [1, 77, 1024], timestep 399 and the same 128x128 input, upscaled x4 to 512x512:
  A (ours):  d3sr_core.upscale.upscale, colour fix 'none', on CheckpointLoaderSimple's MODEL and
             VAE (comfy.sd.load_checkpoint_guess_config) with the weight file applied by
             d3sr_core.model.load_d3sr (LoRA merged into the weights by ComfyUI's patcher);
  B (peers): as OSEDiff's inference code runs it: UNet2DConditionModel and AutoencoderKL
             `from_pretrained` (local folders), PEFT LoRA adapters (unmerged), torch bicubic x4,
             VAE encode (posterior mode here so both paths match; OSEDiff samples, same cost),
             one UNet call, DDPMScheduler.step with one inference step (= x0), decode.
Each path lives in its own fresh worker process (one model copy per process; peak memory is that
process's own), both loaded side by side; after a warm-up upscale that is also the equality check,
the timed upscales alternate between the two workers (A B, B A, ...). In the same run: FLOPs of one
upscale with torch.utils.flop_counter split into VAE encode / UNet / VAE decode, the machine's dense
matmul throughput (square torch.mm, same threads, same process), and achieved FLOP/s per part.

    python benchmarks/bench_peers.py [--runs 3]          CPU, fp32 -> benchmarks/results/peers_cpu.md
    python benchmarks/bench_peers.py --gpu [--dtypes fp16 bf16] [--runs 10]
                                                         CUDA -> benchmarks/results/peers_gpu_<card>.md
    python benchmarks/bench_peers.py --smoke             plumbing check: tiny UNet, CPU, 32 -> 128,
                                                         results written to a temporary folder only
Needs the benchmark-only packages: pip install -r benchmarks/requirements-peers.txt
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for _p in (str(ROOT), str(ROOT / "benchmarks")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch  # noqa: E402
from machine import mem_available_gb, peak_rss_gb, reset_peak_rss, rss_gb, wait_for_memory  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
REQUIREMENTS = "benchmarks/requirements-peers.txt"
TIMESTEP = 399
RANK = 16
LORA_STD = 0.02           # A and B entries ~ N(0, 0.02^2): a LoRA delta of the weights' own scale
REPLY = "@@bench "        # prefix of the workers' reply lines (ComfyUI also prints to stdout)
PARTS = ("encode", "unet", "decode")
GIB = 2 ** 30


# ---------------------------------------------------------------------------------------------
# Model files: one ComfyUI checkpoint + D3SR file, and the same weights in diffusers' layout
# ---------------------------------------------------------------------------------------------

def _synthetic():
    """The seeded-model builders (devtools.synthetic), imported once ComfyUI is on the path."""
    from devtools import synthetic
    return synthetic


def diffusers_unet_config(c: dict) -> dict:
    """UNet2DConditionModel's config for ComfyUI's (ldm) UNet config `c` (SD-family, one
    transformer per attention block, the same res-block count on every level)."""
    chans = [c["model_channels"] * m for m in c["channel_mult"]]
    nrb = c["num_res_blocks"]
    if len(set(nrb)) != 1 or max([*c["transformer_depth"], *c["transformer_depth_output"]]) > 1:
        raise ValueError("only uniform res blocks and transformer depth <= 1 are mapped")
    n, per = len(chans), nrb[0]
    down = ["CrossAttnDownBlock2D" if c["transformer_depth"][i * per] else "DownBlock2D" for i in range(n)]
    # transformer_depth_output lists the output blocks level 0 first; up_blocks run deepest first
    up = ["CrossAttnUpBlock2D" if c["transformer_depth_output"][(n - 1 - j) * (per + 1)] else "UpBlock2D"
          for j in range(n)]
    return dict(sample_size=64, in_channels=c["in_channels"], out_channels=c["out_channels"],
                down_block_types=down, up_block_types=up, block_out_channels=chans, layers_per_block=per,
                cross_attention_dim=c["context_dim"], attention_head_dim=[ch // c["num_head_channels"] for ch in chans],
                use_linear_projection=bool(c["use_linear_in_transformer"]), upcast_attention=False,
                flip_sin_to_cos=True, freq_shift=0, norm_num_groups=32, norm_eps=1e-5)


VAE_DIFFUSERS_CONFIG = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                            up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512],
                            layers_per_block=2, latent_channels=4, norm_num_groups=32, sample_size=512,
                            scaling_factor=0.18215)


def prepare_files(work: str, config_name: str, lr_size: int) -> dict:
    """Write, once, into `work`: sd.safetensors (ComfyUI checkpoint), d3sr.safetensors (rank-16
    LoRA + embedding), diffusers/unet and diffusers/vae (from_pretrained folders with the same
    tensors under diffusers' names), diffusers/lora.safetensors (A/B by diffusers module name)
    and diffusers/embedding.safetensors. Returns a summary."""
    from d3sr_core import host
    host.import_comfy(cpu=True)
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file

    from d3sr_core.osediff import unet_name_map, vae_name_map
    from d3sr_core.weight_format import atomic_save_safetensors, write_weights
    synthetic = _synthetic()
    config = getattr(synthetic, config_name)
    t0 = time.time()
    unet = synthetic.build_unet(config, seed=0)
    weights = synthetic.random_d3sr_weights(unet, timestep=TIMESTEP, rank=RANK, alpha=float(RANK), seed=0,
                                            lora_std=LORA_STD)
    write_weights(os.path.join(work, "d3sr.safetensors"), weights)
    unet_sd = unet.state_dict()
    vae_sd = synthetic.build_kl_vae(1).state_dict()
    ckpt = {"model.diffusion_model." + k: v for k, v in unet_sd.items()}
    ckpt.update({"first_stage_model." + k: v for k, v in vae_sd.items()})
    atomic_save_safetensors(os.path.join(work, "sd.safetensors"), ckpt, {})
    del ckpt

    ddir = os.path.join(work, "diffusers")
    with init_empty_weights():
        d_unet = UNet2DConditionModel(**diffusers_unet_config(config))
        d_vae = AutoencoderKL(**VAE_DIFFUSERS_CONFIG)
    converted = {}
    for label, model, ldm_sd, name_map in (
            ("unet", d_unet, unet_sd, unet_name_map(config)),
            ("vae", d_vae, vae_sd, vae_name_map(list(d_vae.state_dict())))):
        target = model.state_dict()
        out = {}
        for dname, meta in target.items():
            tensor = ldm_sd[name_map[dname]]
            out[dname] = tensor.reshape(meta.shape).contiguous()  # VAE attention: conv 1x1 -> Linear
        used = {name_map[d] for d in out}
        if used != set(ldm_sd):
            raise RuntimeError(f"{label}: {len(set(ldm_sd) - used)} ldm tensors have no diffusers name")
        os.makedirs(os.path.join(ddir, label), exist_ok=True)
        model.save_config(os.path.join(ddir, label))
        save_file(out, os.path.join(ddir, label, "diffusion_pytorch_model.safetensors"))
        converted[label] = len(out)
    # LoRA by diffusers module name (ldm module -> diffusers module through the same map).
    module_map = {ldm[: -len(".weight")]: d[: -len(".weight")]
                  for d, ldm in unet_name_map(config).items() if ldm.endswith(".weight")}
    lora = {}
    for name, (a, b, _alpha) in weights.lora.items():
        module = module_map[name[len("diffusion_model."):]]
        lora[module + ".lora_A.weight"], lora[module + ".lora_B.weight"] = a.contiguous(), b.contiguous()
    save_file(lora, os.path.join(ddir, "lora.safetensors"))
    save_file({"text_embedding": weights.text_embedding.contiguous()}, os.path.join(ddir, "embedding.safetensors"))
    lr = torch.rand(1, lr_size, lr_size, 3, generator=torch.Generator().manual_seed(0))
    save_file({"lr": lr}, os.path.join(work, "lr.safetensors"))
    return {"unet_params": sum(v.numel() for v in unet_sd.values()),
            "vae_params": sum(v.numel() for v in vae_sd.values()),
            "lora_layers": len(weights.lora),
            "lora_params": sum(a.numel() + b.numel() for a, b, _ in weights.lora.values()),
            "diffusers_tensors": converted, "seconds": round(time.time() - t0, 1)}


# ---------------------------------------------------------------------------------------------
# Workers (one per path, in their own process)
# ---------------------------------------------------------------------------------------------

def matmul_peak(device: torch.device, dtype: torch.dtype, sizes=(2048, 4096), runs: int = 5) -> dict:
    """Dense square torch.mm throughput (FLOP/s, 2 n^3 per product): the median of `runs` per
    size, the best size is the peak."""
    best, per_size = 0.0, {}
    for n in sizes:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        times = []
        for i in range(runs + 1):
            _sync(device)
            t = time.perf_counter()
            torch.mm(a, b)
            _sync(device)
            if i:                        # the first product is a warm-up
                times.append(time.perf_counter() - t)
        rate = 2 * n ** 3 / statistics.median(times)
        per_size[n] = rate
        best = max(best, rate)
    return {"peak": best, "per_size": per_size}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def flop_counter():
    """FlopCounterMode that also counts CPU fused attention (torch counts the CUDA kernels only)."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    def cpu_sdpa(query, key, value, *args, out_shape=None, **kwargs) -> int:  # called with shapes
        return sdpa_flop_count(query, key, value)
    extra = {}
    for name in ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_fused_attention_overrideable"):
        op = getattr(torch.ops.aten, name, None)
        if op is not None:
            extra[op] = cpu_sdpa
    return FlopCounterMode(display=False, custom_mapping=extra)


class PathA:
    """This pack: ComfyUI's checkpoint loader, load_d3sr, d3sr_core.upscale.upscale (colour fix none)."""

    def __init__(self, work: str, device: torch.device, dtype: torch.dtype) -> None:
        from d3sr_core import host
        host.import_comfy(cpu=device.type == "cpu")
        import comfy.sd
        import comfy.utils

        from d3sr_core import pipeline
        from d3sr_core.model import load_d3sr
        from d3sr_core.upscale import upscale
        comfy.utils.set_progress_bar_enabled(False)
        self._upscale, self.device = upscale, device
        ckpt = os.path.join(work, "sd.safetensors")
        model, _clip, vae, _ = comfy.sd.load_checkpoint_guess_config(
            ckpt, output_vae=dtype == torch.float32, output_clip=False, model_options={"dtype": dtype})
        if dtype != torch.float32:       # the VAE in the same dtype as the UNet (as peers run it)
            from safetensors import safe_open
            with safe_open(ckpt, framework="pt") as f:
                vae_sd = {k[len("first_stage_model."):]: f.get_tensor(k) for k in f.keys()
                          if k.startswith("first_stage_model.")}
            vae = comfy.sd.VAE(sd=vae_sd, dtype=dtype)
        self.d3sr = load_d3sr(model, vae, os.path.join(work, "d3sr.safetensors"))
        self.times: dict[str, float] = {}
        self.latents: dict[str, torch.Tensor] = {}
        self.counter = None
        self.flops: dict[str, int] = {}
        # Time (and count) the three parts where the pipeline calls them.
        for attr, part in (("encode_latent", "encode"), ("predict_x0", "unet"), ("decode_latent", "decode")):
            setattr(pipeline, attr, self._timed(getattr(pipeline, attr), part))

    def _timed(self, fn, part: str):
        def wrapper(*args, **kwargs):
            before = self.counter.get_total_flops() if self.counter is not None else 0
            _sync(self.device)
            t = time.perf_counter()
            out = fn(*args, **kwargs)
            _sync(self.device)
            self.times[part] = time.perf_counter() - t
            if self.counter is not None:
                self.flops[part] = self.counter.get_total_flops() - before
            if part != "decode":
                self.latents["z_l" if part == "encode" else "z_h"] = out.detach().float().cpu()
            return out
        return wrapper

    def upscale(self, lr: torch.Tensor) -> torch.Tensor:
        return self._upscale(self.d3sr, lr, 4.0, "none")


class PathB:
    """The peers' path (OSEDiff's inference code): diffusers UNet + VAE with PEFT LoRA adapters."""

    def __init__(self, work: str, device: torch.device, dtype: torch.dtype) -> None:
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from peft import LoraConfig
        from safetensors.torch import load_file
        ddir = os.path.join(work, "diffusers")
        self.device, self.dtype = device, dtype
        self.unet = UNet2DConditionModel.from_pretrained(os.path.join(ddir, "unet"), torch_dtype=dtype).to(device)
        self.vae = AutoencoderKL.from_pretrained(os.path.join(ddir, "vae"), torch_dtype=dtype).to(device)
        lora = load_file(os.path.join(ddir, "lora.safetensors"))
        modules = sorted({k.rsplit(".lora_", 1)[0] for k in lora})
        self.unet.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights="gaussian",
                                         target_modules=modules))
        with torch.no_grad():
            for m in modules:
                layer = self.unet.get_submodule(m)
                layer.lora_A["default"].weight.copy_(lora[m + ".lora_A.weight"])
                layer.lora_B["default"].weight.copy_(lora[m + ".lora_B.weight"])
        self.unet.eval()
        self.vae.eval()
        self.embedding = load_file(os.path.join(ddir, "embedding.safetensors"))["text_embedding"].to(device, dtype)
        self.scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                       beta_schedule="scaled_linear", clip_sample=False,
                                       steps_offset=1, prediction_type="epsilon")
        # One inference step at TIMESTEP, so step() returns x0 (diffusers >= 0.3x looks the
        # timestep up in the schedule; OSEDiff's older pin computed t - 1000 / 1 instead).
        self.scheduler.set_timesteps(timesteps=[TIMESTEP], device=device)
        self.scheduler.alphas_cumprod = self.scheduler.alphas_cumprod.to(device)
        self.timestep = torch.tensor([TIMESTEP], device=device)
        self.scaling = self.vae.config.scaling_factor
        self.times, self.latents, self.counter, self.flops = {}, {}, None, {}

    def _part(self, part: str, fn):
        before = self.counter.get_total_flops() if self.counter is not None else 0
        _sync(self.device)
        t = time.perf_counter()
        out = fn()
        _sync(self.device)
        self.times[part] = time.perf_counter() - t
        if self.counter is not None:
            self.flops[part] = self.counter.get_total_flops() - before
        return out

    @torch.no_grad()
    def upscale(self, lr: torch.Tensor) -> torch.Tensor:
        import torch.nn.functional as F
        x = lr.movedim(-1, 1).to(self.device).float()
        up = F.interpolate(x, size=(4 * x.shape[-2], 4 * x.shape[-1]), mode="bicubic",
                           align_corners=False).clamp(0.0, 1.0)
        lq = (up * 2 - 1).to(self.dtype)
        z = self._part("encode", lambda: self.vae.encode(lq).latent_dist.mode() * self.scaling)
        gen = torch.Generator(device=self.device).manual_seed(0)

        def unet_step():
            eps = self.unet(z, self.timestep, encoder_hidden_states=self.embedding).sample
            return self.scheduler.step(eps, self.timestep, z, generator=gen, return_dict=True).prev_sample
        z_h = self._part("unet", unet_step)
        img = self._part("decode", lambda: self.vae.decode(z_h / self.scaling).sample.clamp(-1, 1))
        self.latents = {"z_l": z.float().cpu(), "z_h": z_h.float().cpu()}
        return ((img.float() + 1) / 2).movedim(1, -1).cpu()


def worker(path: str, work: str, device_name: str, dtype_name: str) -> None:
    """Serve commands (one JSON object per stdin line) for one path; replies on stdout."""
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype_name]
    device = torch.device(device_name)
    reply_stream = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)                                   # everything else the libraries print -> stderr

    def reply(obj: dict) -> None:
        reply_stream.write(REPLY + json.dumps(obj) + "\n")
        reply_stream.flush()

    t0 = time.perf_counter()
    runner = (PathA if path == "A" else PathB)(work, device, dtype)
    from safetensors.torch import load_file, save_file
    lr = load_file(os.path.join(work, "lr.safetensors"))["lr"]
    reply({"ready": True, "load_s": time.perf_counter() - t0, "rss_gb": rss_gb(), "load_peak_gb": peak_rss_gb(),
           "threads": torch.get_num_threads()})
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["op"]
        if op == "quit":
            break
        if op == "check":                          # the warm-up upscale, saved for the comparison
            out = runner.upscale(lr)
            save_file({k: v.contiguous() for k, v in {"image": out, **runner.latents}.items()}, cmd["file"])
            reply({"shape": list(out.shape)})
        elif op == "reset_peak":
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            reply({"reset": reset_peak_rss()})
        elif op == "run":
            _sync(device)
            t, cpu = time.perf_counter(), time.process_time()
            runner.upscale(lr)
            _sync(device)
            reply({"total": time.perf_counter() - t, "cpu": time.process_time() - cpu, "parts": dict(runner.times)})
        elif op == "memory":
            info = {"rss_gb": rss_gb(), "steady_peak_gb": peak_rss_gb(),
                    "process_peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20}
            if device.type == "cuda":
                info["cuda_peak_gb"] = torch.cuda.max_memory_allocated() / GIB
            reply(info)
        elif op == "flops":
            with flop_counter() as counter:
                runner.counter = counter
                runner.upscale(lr)
            runner.counter = None
            reply({"parts": dict(runner.flops), "total": counter.get_total_flops()})
        elif op == "matmul_peak":
            reply(matmul_peak(device, dtype, tuple(cmd.get("sizes", (2048, 4096)))))
        elif op == "profile":
            reply({"table": profile_table(runner, lr, device, cmd.get("rows", 12))})
    reply({"bye": True})


def profile_table(runner, lr: torch.Tensor, device: torch.device, rows: int) -> str:
    """torch.profiler's top ops by self time over one upscale."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        runner.upscale(lr)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=48)


class Worker:
    """A worker subprocess for one path, driven line by line."""

    def __init__(self, path: str, work: str, device: str, dtype: str) -> None:
        self.path = path
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", path, "--work", work,
               "--device", device, "--dtype", dtype]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.ready = self._read()

    def _read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(REPLY):
                return json.loads(line[len(REPLY):])
        raise RuntimeError(f"worker {self.path} exited with code {self.proc.wait()} (its stderr is above)")

    def ask(self, op: str, **kwargs) -> dict:
        self.proc.stdin.write(json.dumps({"op": op, **kwargs}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.ask("quit")
            except (RuntimeError, BrokenPipeError):
                pass
        self.proc.wait()


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------

def compare(work: str) -> dict:
    """Max and mean |A - B| of the output image (and the latents) of the two check runs."""
    from safetensors.torch import load_file
    a, b = load_file(os.path.join(work, "out_A.safetensors")), load_file(os.path.join(work, "out_B.safetensors"))
    out = {}
    for k in ("image", "z_l", "z_h"):
        d = (a[k].double() - b[k].double()).abs()
        out[k] = {"max": float(d.max()), "mean": float(d.mean()), "scale": float(a[k].double().abs().max())}
    img = a["image"]
    out["image_unclamped_fraction"] = float(((img > 0) & (img < 1)).double().mean())
    out["image_std"] = float(img.double().std())
    return out


def run(args: argparse.Namespace, device: str, dtype: str, work: str) -> dict:
    """Check, time (interleaved), measure memory, count FLOPs and the matmul peak for one dtype.

    Both workers live side by side when the machine has the memory for both (runs alternate
    A B, B A, ...); otherwise one at a time in `args.blocks` blocks per path (A, B, B, A, ...), each
    a fresh process with a warm-up upscale before its timed runs."""
    together = mem_available_gb() >= args.need_gb["A"] + args.need_gb["B"] + 1 and not args.one_at_a_time
    times: dict[str, list[dict]] = {"A": [], "B": []}
    memory: dict[str, dict] = {}
    flops: dict[str, dict] = {}
    ready: dict[str, dict] = {}
    profiles: dict[str, str] = {}
    peaks: list[dict] = []
    peak_sizes = [256, 512] if args.smoke else [2048, 4096]

    def start(path: str) -> Worker:
        wait_for_memory(args.need_gb[path], args.wait_min, "bench_peers.py")
        print(f"[{dtype}] starting worker {path} (MemAvailable {mem_available_gb():.1f} GB)", flush=True)
        w = Worker(path, work, device, dtype)
        ready.setdefault(path, w.ready)
        print(f"[{dtype}] worker {path} ready: {w.ready}", flush=True)
        return w

    def timed(w: Worker, label: str) -> None:
        times[w.path].append(w.ask("run"))
        print(f"[{dtype}] {label} {w.path}: {times[w.path][-1]['total']:.3f} s", flush=True)

    def finish(w: Worker) -> None:
        mem = w.ask("memory")
        old = memory.get(w.path)
        memory[w.path] = mem if old is None else {k: max(v, old[k]) for k, v in mem.items()}
        peaks.append(w.ask("matmul_peak", sizes=peak_sizes))
        if w.path not in flops:
            flops[w.path] = w.ask("flops")
            if args.profile:
                profiles[w.path] = w.ask("profile")["table"]

    workers: dict[str, Worker] = {}
    try:
        if together:
            for path in ("A", "B"):
                workers[path] = start(path)
            for path, w in workers.items():
                w.ask("check", file=os.path.join(work, f"out_{path}.safetensors"))
                w.ask("reset_peak")
            for r in range(args.runs):
                for path in (("A", "B") if r % 2 == 0 else ("B", "A")):
                    timed(workers[path], f"run {r + 1}")
            for w in workers.values():
                finish(w)
        else:
            per_block = -(-args.runs // args.blocks)
            for b in range(args.blocks):
                for path in (("A", "B") if b % 2 == 0 else ("B", "A")):
                    w = workers[path] = start(path)
                    if b < 2:          # each path's first session: the warm-up is the saved check
                        w.ask("check", file=os.path.join(work, f"out_{path}.safetensors"))
                    else:
                        w.ask("run")   # warm-up
                    w.ask("reset_peak")
                    for i in range(per_block):
                        timed(w, f"block {b + 1} run {i + 1}")
                    finish(w)
                    w.close()
                    del workers[path]
    finally:
        for w in workers.values():
            w.close()
    diff = compare(work)
    print(f"[{dtype}] same output: {json.dumps(diff)}", flush=True)
    med = {p: {"total": statistics.median(t["total"] for t in ts),
               "cpu": statistics.median(t["cpu"] for t in ts),
               **{part: statistics.median(t["parts"][part] for t in ts) for part in PARTS}}
           for p, ts in times.items()}
    peak = {"peak": statistics.median(p["peak"] for p in peaks), "all": [p["peak"] for p in peaks],
            "per_size": peaks[0]["per_size"]}
    return {"dtype": dtype, "diff": diff, "times": times, "median": med, "memory": memory, "flops": flops,
            "peak": peak, "profiles": profiles, "ready": ready, "together": together}


def efficiency_rows(res: dict, path: str) -> list[str]:
    """FLOP table rows for one path: FLOPs, median seconds, achieved FLOP/s, fraction of peak."""
    peak = res["peak"]["peak"]
    rows, total_flops = [], res["flops"][path]["total"]
    for part in PARTS:
        f, s = res["flops"][path]["parts"][part], res["median"][path][part]
        rows.append(f"| {path} | {part} | {f / 1e9:.1f} | {s:.3f} | {f / s / 1e9:.1f} | {f / s / peak:.2f} |")
    s = res["median"][path]["total"]
    rows.append(f"| {path} | **whole upscale** | {total_flops / 1e9:.1f} | {s:.3f} | {total_flops / s / 1e9:.1f} "
                f"| **{total_flops / s / peak:.2f}** |")
    return rows


def report(results: list[dict], args: argparse.Namespace, prep: dict, device: str, title: str) -> str:
    from machine import machine_name
    load = os.getloadavg()
    cmd = "python benchmarks/bench_peers.py " + " ".join(sys.argv[1:])
    import diffusers
    import peft
    lines = [f"# This pack vs the peers' diffusers + PEFT path ({title})", "",
             f"Machine: {machine_name()}", "",
             f"Command: `{cmd.strip()}`", "",
             f"Versions: Python {platform.python_version()}, torch {torch.__version__}, diffusers "
             f"{diffusers.__version__}, peft {peft.__version__}.", "",
             f"Load average at the end (1/5/15 min): {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}. The machine "
             "is shared with other jobs: the two paths' runs are interleaved (A B, B A, ...) so that load "
             "changes hit both alike; absolute seconds move with the load, the ratios much less.", "",
             f"Model: {prep.get('config')} with seeded random weights (UNet {prep['unet_params'] / 1e6:.1f} M, "
             f"KL VAE {prep['vae_params'] / 1e6:.1f} M parameters), rank-{RANK} LoRA (alpha {RANK}, A and B "
             f"~ N(0, {LORA_STD}^2)) on {prep['lora_layers']} layers ({prep['lora_params'] / 1e6:.2f} M), fixed "
             f"embedding, timestep {TIMESTEP}; input {args.lr_size}x{args.lr_size} -> "
             f"{4 * args.lr_size}x{4 * args.lr_size}, colour fix none.", "",
             "- A (ours): `d3sr_core.upscale.upscale` on `comfy.sd.load_checkpoint_guess_config` + "
             "`d3sr_core.model.load_d3sr` (LoRA merged by ComfyUI's patcher).",
             "- B (peers, as OSEDiff's inference): diffusers `UNet2DConditionModel` + `AutoencoderKL` "
             "`from_pretrained`, PEFT adapters unmerged, VAE posterior mode, one UNet call, `DDPMScheduler.step` "
             "(one inference step = x0), decode.", ""]
    for res in results:
        d, m, mem = res["diff"], res["median"], res["memory"]
        a, b = m["A"]["total"], m["B"]["total"]
        lines += [f"## {res['dtype']}", "",
                  "### Same output", "",
                  f"Max |A - B| over the 512x512 output image in [0, 1]: **{d['image']['max']:.2e}** (mean "
                  f"{d['image']['mean']:.1e}); latents z_L {d['z_l']['max']:.1e}, z_H {d['z_h']['max']:.1e} "
                  f"(max |z_H| {d['z_h']['scale']:.1f}). {100 * d['image_unclamped_fraction']:.0f}% of the output "
                  f"values lie strictly inside (0, 1) (not clamped), image std {d['image_std']:.3f}.", ""]
        n = len(res["times"]["A"])
        how = ("both workers loaded side by side, runs alternating A B, B A, ..." if res["together"] else
               f"one worker at a time (not enough free memory for both): {args.blocks} sessions per path in the "
               "order A B B A ..., each a fresh process with a warm-up upscale before its timed runs")
        lines += ["### Time and memory", "",
                  f"Median of {n} timed upscales per path ({how}); each path in its own fresh process, after a "
                  "warm-up upscale (the first one is the check above). CPU time is the worker process's user + "
                  "system time over the upscale (all threads), less sensitive to other jobs than wall time.", "",
                  "| | A: this pack | B: diffusers + PEFT | A / B |", "|---|---|---|---|",
                  f"| whole upscale, wall (s) | {a:.3f} | {b:.3f} | **{a / b:.3f}** |",
                  f"| whole upscale, CPU time (s) | {m['A']['cpu']:.3f} | {m['B']['cpu']:.3f} | "
                  f"{m['A']['cpu'] / m['B']['cpu']:.3f} |"]
        for part in PARTS:
            lines.append(f"| {part} (s) | {m['A'][part]:.3f} | {m['B'][part]:.3f} | "
                         f"{m['A'][part] / m['B'][part]:.3f} |")
        other_a = a - sum(m["A"][p] for p in PARTS)
        other_b = b - sum(m["B"][p] for p in PARTS)
        lines.append(f"| rest: bicubic, padding, casts, patching checks (s) | {other_a:.3f} | {other_b:.3f} | |")
        for key, label in (("process_peak_gb", "process peak RSS, load included (GiB)"),
                           ("steady_peak_gb", "peak RSS during the timed upscales (GiB)")):
            lines.append(f"| {label} | {mem['A'][key]:.2f} | {mem['B'][key]:.2f} | "
                         f"**{mem['A'][key] / mem['B'][key]:.3f}** |")
        if "cuda_peak_gb" in mem["A"]:
            ca, cb = mem["A"]["cuda_peak_gb"], mem["B"]["cuda_peak_gb"]
            lines.append(f"| peak CUDA memory allocated (GiB) | {ca:.2f} | {cb:.2f} | **{ca / cb:.3f}** |")
        lines.append(f"| load time (s) | {res['ready']['A']['load_s']:.1f} | {res['ready']['B']['load_s']:.1f} | |")
        lines += ["", "Each timed run (s): A " + ", ".join(f"{t['total']:.2f}" for t in res["times"]["A"])
                  + "; B " + ", ".join(f"{t['total']:.2f}" for t in res["times"]["B"]), ""]
        pk = res["peak"]
        lines += ["### FLOPs and efficiency", "",
                  f"Dense {res['dtype']} matmul peak of this machine: **{pk['peak'] / 1e9:.1f} GFLOP/s**: square "
                  "`torch.mm` (2 n^3 FLOPs), the best size's median of 5, measured in each worker session right "
                  "after its timed runs (same threads, same load), median over the sessions ("
                  + ", ".join(f"{v / 1e9:.0f}" for v in pk["all"]) + "; first session per size: "
                  + ", ".join(f"n={n}: {v / 1e9:.1f}" for n, v in pk["per_size"].items())
                  + f"; {res['ready']['A']['threads']} threads). FLOPs from "
                  "`torch.utils.flop_counter.FlopCounterMode` (matmuls, convolutions and attention; CPU fused "
                  "attention counted with torch's SDPA formula), seconds = medians of the timed runs.", "",
                  "| path | part | GFLOP | s | GFLOP/s | fraction of peak |", "|---|---|---|---|---|---|",
                  *efficiency_rows(res, "A"), *efficiency_rows(res, "B"), ""]
        if res["profiles"]:
            for path, table in res["profiles"].items():
                lines += [f"Top ops by self time, path {path} (one upscale, torch.profiler):", "", "```",
                          table.rstrip(), "```", ""]
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=None, help="timed upscales per path (default 3 CPU, 10 GPU)")
    p.add_argument("--gpu", action="store_true", help="CUDA, fp16 and bf16 (see --dtypes)")
    p.add_argument("--dtypes", nargs="+", default=None, choices=["fp32", "fp16", "bf16"])
    p.add_argument("--smoke", action="store_true", help="plumbing check: tiny UNet, 32 -> 128, one run, CPU; "
                   "writes its report into a temporary folder, never into benchmarks/results")
    p.add_argument("--profile", action="store_true", help="add torch.profiler's top ops of each path")
    p.add_argument("--work", help="folder for the generated model files (default: a temporary folder)")
    p.add_argument("--out-dir", default=str(RESULTS))
    p.add_argument("--one-at-a-time", action="store_true",
                   help="never hold both workers at once (chosen anyway when memory is short)")
    p.add_argument("--blocks", type=int, default=2,
                   help="one-at-a-time mode: worker sessions per path (runs are split over them)")
    p.add_argument("--wait-min", type=float, default=30,
                   help="wait up to this long for enough free memory before starting each worker")
    p.add_argument("--worker", choices=["A", "B"], help=argparse.SUPPRESS)
    p.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--config", default="SD21_UNET_CONFIG", help=argparse.SUPPRESS)
    p.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    p.add_argument("--dtype", default="fp32", help=argparse.SUPPRESS)
    p.add_argument("--lr-size", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args.worker, args.work, args.device, args.dtype)
        return 0
    if args.prepare:
        print(REPLY + json.dumps(prepare_files(args.work, args.config, args.lr_size)), flush=True)
        return 0

    missing = [m for m in ("diffusers", "peft", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        print(f"bench_peers.py: {', '.join(missing)} not installed (benchmark-only dependencies). Install "
              f"them with: {sys.executable} -m pip install -r {REQUIREMENTS}", file=sys.stderr)
        return 2
    if args.gpu and not torch.cuda.is_available():
        print("bench_peers.py --gpu: no CUDA GPU is visible; nothing was measured.", file=sys.stderr)
        return 0
    device = "cuda" if args.gpu else "cpu"
    dtypes = args.dtypes or (["fp16", "bf16"] if args.gpu else ["fp32"])
    args.runs = args.runs or (1 if args.smoke else 10 if args.gpu else 3)
    config = "TINY_SD2_UNET_CONFIG" if args.smoke else "SD21_UNET_CONFIG"
    args.lr_size = args.lr_size or (32 if args.smoke else 128)
    # Memory each worker needs on the CPU (fp32 weights + ComfyUI's unpatched copies for A).
    args.need_gb = {"A": 2.0, "B": 1.5} if args.smoke or args.gpu else {"A": 9.0, "B": 5.0}
    out_dir = tempfile.mkdtemp(prefix="bench_peers_smoke_") if args.smoke else args.out_dir

    with tempfile.TemporaryDirectory(prefix="bench_peers_") as tmp:
        work = args.work or tmp
        os.makedirs(work, exist_ok=True)
        if not os.path.exists(os.path.join(work, "diffusers", "embedding.safetensors")):
            print(f"writing the seeded {config} model files into {work} (MemAvailable {mem_available_gb():.1f} GB)",
                  flush=True)
            out = subprocess.run([sys.executable, os.path.abspath(__file__), "--prepare", "--work", work,
                                  "--config", config, "--lr-size", str(args.lr_size)],
                                 stdout=subprocess.PIPE, text=True, check=True)
            prep = json.loads(next(line for line in out.stdout.splitlines() if line.startswith(REPLY))[len(REPLY):])
            with open(os.path.join(work, "prepare.json"), "w") as f:
                json.dump(prep, f)
        with open(os.path.join(work, "prepare.json")) as f:
            prep = json.load(f)
        prep["config"] = ("the tiny two-level SD2-shaped UNet (plumbing only)" if args.smoke
                          else "full SD2.1-base architecture")
        print("model files:", prep, flush=True)
        results = [run(args, device, dt, work) for dt in dtypes]

    if args.gpu:
        card = torch.cuda.get_device_name(0)
        name = "peers_gpu_" + re.sub(r"[^A-Za-z0-9]+", "_", card).strip("_").lower() + ".md"
        title = f"{card}, {'/'.join(dtypes)}"
    else:
        name, title = "peers_cpu.md", "CPU, " + "/".join(dtypes)
    if args.smoke:
        title += ", SMOKE RUN: tiny UNet, numbers meaningless"
    text = report(results, args, prep, device, title)
    from d3sr_core.atomic_file import write_text_atomic
    os.makedirs(out_dir, exist_ok=True)
    write_text_atomic(os.path.join(out_dir, name), text)
    print(text)
    print("wrote", os.path.join(out_dir, name))
    if args.smoke:
        ok = all(r["diff"]["image"]["max"] < 1e-3 for r in results)
        print("smoke:", "same output in both paths" if ok else "OUTPUTS DIFFER")
        return 0 if ok else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
