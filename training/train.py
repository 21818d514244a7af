"""D3SR adversarial training: `python -m training.train --config CONFIG [--resume [CKPT]]`,
multi-process with `torchrun --nproc_per_node N -m training.train --config CONFIG`.

One iteration = one discriminator step, then one generator step:
    L_D = softplus(-D(F(z_H, t))) + softplus(D(F(z_H_hat, t)))          (patch means)
    L_G = MSE(x_H_hat, x_H) + lambda2 EA-DISTS(x_H_hat, x_H) + lambda1 softplus(-D(F(z_H_hat, t)))
with z_H = 0.18215 E(x_H), z_H_hat = the generator's one step on the degraded, bicubic-upsampled
LR, x_H_hat its decoding, F(z, t) = sqrt(abar_t) z + sqrt(1 - abar_t) n, t ~ U{0..999}.
Data parallel across ranks with DistributedDataParallel (NCCL on GPUs, gloo on CPUs): each rank
runs its share of the batch; DDP averages the trainable gradients (LoRA, head, embedding; the
frozen networks live outside the wrapped modules), overlapping the all-reduce with backward.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import signal
import sys
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from d3sr_core.atomic_file import write_text_atomic

from .config import Config, load_config

log = logging.getLogger("d3sr.train")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ---------------------------------------------------------------------------------------------
# Environment
# ---------------------------------------------------------------------------------------------

def resolve_device(cfg: Config, local_rank: int = 0) -> torch.device:
    if cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("device: cuda was asked for but CUDA is not available")
    return torch.device("cuda", local_rank)


def precision(cfg: Config, device: torch.device) -> tuple[torch.dtype | None, torch.dtype]:
    """(autocast dtype or None for fp32, dtype of the frozen networks)."""
    p = cfg.train.precision
    if p == "auto":
        p = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    amp = None if p == "fp32" else DTYPES[p]
    frozen = cfg.train.frozen_dtype
    frozen_dtype = (amp or torch.float32) if frozen == "auto" else DTYPES[frozen]
    return amp, frozen_dtype


class StopSignal:
    """Turns SIGINT/SIGTERM into a flag the loop checks after each step (then it checkpoints)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}

    def restore(self) -> None:
        """Put the previous handlers back (train() called in-process, e.g. by tests)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, _frame) -> None:
        if self.signum is None:
            log.warning("received %s: finishing this step, then writing a checkpoint",
                        signal.Signals(signum).name)
        self.signum = signum


def init_distributed(cfg: Config) -> tuple[int, int, torch.device]:
    """(rank, world, device); under torchrun it initialises the process group: NCCL when this
    rank trains on a GPU, gloo on CPUs (`device: cpu` on a GPU machine included)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0")) if world > 1 else 0
    device = resolve_device(cfg, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world <= 1:
        return 0, 1, device
    if device.type == "cuda":
        dist.init_process_group(backend="nccl", device_id=device)
    else:
        dist.init_process_group(backend="gloo")
    return dist.get_rank(), dist.get_world_size(), device


# ---------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------

def random_vgg16_features(seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded random VGG16 `features.N` tensors (He init): for tests with loss.pretrained_vgg false."""
    from .dists import VGG16_BLOCKS
    widths = (64, 128, 256, 512, 512)
    gen = torch.Generator().manual_seed(seed)
    out, in_ch = {}, 3
    for block, width in zip(VGG16_BLOCKS, widths):
        for index in block:
            std = math.sqrt(2 / (9 * in_ch))
            out[f"features.{index}.weight"] = torch.randn(width, in_ch, 3, 3, generator=gen) * std
            out[f"features.{index}.bias"] = torch.zeros(width)
            in_ch = width
    return out


def build_perceptual(cfg: Config) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None:
    """EA-DISTS (or DISTS) from training.dists, (B,3,H,W) x 2 -> (B,); None when disabled."""
    lc = cfg.loss
    if lc.perceptual == "none" or lc.lambda_perceptual == 0:
        return None
    from .dists import DISTS, EADISTS, STAGE_CHANNELS
    if lc.pretrained_vgg:
        dists = DISTS(vgg_path=lc.vgg_path)
    else:
        log.warning("loss.pretrained_vgg is false: EA-DISTS uses RANDOM VGG weights (tests only)")
        n = sum(STAGE_CHANNELS)
        dists = DISTS(random_vgg16_features(cfg.seed), {"alpha": torch.ones(n), "beta": torch.ones(n)})
    return (EADISTS(dists) if lc.perceptual == "ea_dists" else dists).eval()


# ---------------------------------------------------------------------------------------------
# Trainer
# ---------------------------------------------------------------------------------------------

class Trainer:
    """Holds the generator, discriminator, optimizers and the step counter of one rank."""

    def __init__(self, cfg: Config, rank: int = 0, world: int = 1, device: torch.device | None = None,
                 image_paths: list[str] | None = None) -> None:
        from .data import list_images, make_degradation, scan_images
        from .discriminator import Discriminator, load_sdxl_encoder_half, sdxl_empty_conditioning
        from .generator import Generator, empty_prompt_embedding, load_generator_models
        from .model_files import check_discriminator_file, check_generator_file

        self.cfg, self.rank, self.world = cfg, rank, world
        self.device = device or resolve_device(cfg)
        self.amp_dtype, frozen_dtype = precision(cfg, self.device)
        tc = cfg.train
        per_rank = tc.batch_size // world
        if tc.batch_size % (world * cfg.optim.grad_accum):
            from .config import ConfigError
            raise ConfigError(f"train.batch_size {tc.batch_size} must be divisible by ranks ({world}) x "
                              f"optim.grad_accum ({cfg.optim.grad_accum})")
        self.micro_batch = per_rank // cfg.optim.grad_accum

        # Everything that can be wrong is checked before any large load.
        check_generator_file(cfg.models.generator)
        check_discriminator_file(cfg.models.discriminator)
        if image_paths is None:
            image_paths, _ = scan_images(list_images(cfg.data.folders), tc.crop)
        self.image_paths = image_paths

        model, clip, vae = load_generator_models(cfg.models.generator, dtype=frozen_dtype)
        embedding = empty_prompt_embedding(clip, cfg.models.embedding_file)
        del clip
        gc = cfg.generator
        self.G = Generator(model, vae, embedding, gc.timestep, gc.lora_rank, gc.lora_alpha, seed=cfg.seed,
                           gradient_checkpointing=tc.gradient_checkpointing).to(self.device)
        self.G.embedding.requires_grad_(gc.train_embedding)
        self.G.move_frozen(self.device, frozen_dtype)
        unet_d = load_sdxl_encoder_half(cfg.models.discriminator, self.device, frozen_dtype)
        context, pooled = sdxl_empty_conditioning(cfg.models.discriminator, cfg.models.sdxl_conditioning_file)
        dc = cfg.discriminator
        self.D = Discriminator(unet_d, context, pooled, dc.lora_rank, dc.lora_alpha, seed=cfg.seed + 1,
                               head_channels=dc.head_channels,
                               gradient_checkpointing=tc.gradient_checkpointing).to(self.device)
        self.perceptual = build_perceptual(cfg)
        if self.perceptual is not None:
            self.perceptual.to(self.device)
        self.degrade = make_degradation(cfg.data.degradation, tc.scale, cfg.data.realesrgan)

        oc = cfg.optim
        self.g_params = [p for p in self.G.parameters() if p.requires_grad]
        self.d_params = [p for p in self.D.parameters() if p.requires_grad]
        self.opt_g = torch.optim.AdamW(self.g_params, lr=oc.lr_generator, betas=tuple(oc.betas),
                                       weight_decay=oc.weight_decay)
        self.opt_d = torch.optim.AdamW(self.d_params, lr=oc.lr_discriminator, betas=tuple(oc.betas),
                                       weight_decay=oc.weight_decay)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.ema = ({k: v.detach().clone() for k, v in self.G.state_dict().items()}
                    if tc.ema_decay else None)
        self.step = 0
        # DDP wrappers (their construction broadcasts rank 0's parameters); the plain modules
        # stay self.G / self.D for evaluation, export and the gradient-free uses.
        self.g_ddp: nn.Module = self.G
        self.d_ddp: nn.Module = self.D
        if world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.g_ddp = DDP(self.G, device_ids=ids, broadcast_buffers=False)
            self.d_ddp = DDP(self.D, device_ids=ids, broadcast_buffers=False)

    # -- randomness ------------------------------------------------------------------------
    def _generator(self, micro: int) -> torch.Generator:
        """A CPU generator for (seed, step, rank, micro-step): degradation, t and noise."""
        key = ((self.cfg.seed * 1_000_003 + self.step) * 1_009 + self.rank) * 101 + micro
        return torch.Generator().manual_seed(key % 2**63)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                              enabled=self.amp_dtype is not None)

    @torch.no_grad()
    def prepare(self, hr: torch.Tensor, micro: int) -> dict:
        """HR crops -> LR (degraded on the device), its bicubic upsampling, z_L, z_H, t and noise."""
        from d3sr_core.pipeline import bicubic_upsample
        gen = self._generator(micro)
        hr = hr.to(self.device, non_blocking=True).float()
        lr = self.degrade(hr, gen)
        lr_up = bicubic_upsample(lr, tuple(hr.shape[-2:]))
        with self._autocast():
            z_l, z_h = self.G.encode(lr_up).float(), self.G.encode(hr).float()
        b = hr.shape[0]
        lo, hi = self.cfg.train.d_timesteps
        t_real = torch.randint(lo, hi + 1, (b,), generator=gen)
        t_fake = t_real if self.cfg.train.timestep_sharing else torch.randint(lo, hi + 1, (b,), generator=gen)
        n_real = torch.randn(z_h.shape, generator=gen)
        n_fake = torch.randn(z_h.shape, generator=gen)
        dev = self.device
        return {"hr": hr, "lr_up": lr_up, "z_l": z_l, "z_h": z_h, "t_real": t_real.to(dev),
                "t_fake": t_fake.to(dev), "n_real": n_real.to(dev), "n_fake": n_fake.to(dev)}

    def _grad_sync(self, wrapper: nn.Module, last_micro: bool):
        """DDP all-reduces on the last micro-batch only (gradient accumulation)."""
        if last_micro or wrapper is self.G or wrapper is self.D:
            return contextlib.nullcontext()
        return wrapper.no_sync()

    def _clip_and_step(self, params, opt) -> float:
        self.scaler.unscale_(opt)
        clip = self.cfg.optim.grad_clip
        norm = torch.nn.utils.clip_grad_norm_(params, clip if clip else float("inf"))
        self.scaler.step(opt)
        return float(norm)

    def train_step(self, hr_micro_batches: list[torch.Tensor]) -> dict[str, float]:
        """One iteration (D step then G step) over this rank's micro-batches of HR crops
        (BCHW [0, 1]); returns the losses of this rank (means over micro-batches)."""
        return self.update([self.prepare(hr, i) for i, hr in enumerate(hr_micro_batches)])

    def update(self, batches: list[dict]) -> dict[str, float]:
        """The D step then the G step on prepared micro-batches (`prepare`), gradients
        accumulated over them."""
        from .discriminator import d_loss, g_adv_loss, noise_latent
        lc, accum = self.cfg.loss, len(batches)
        size = tuple(batches[0]["hr"].shape[-2:])
        m: dict[str, float] = {k: 0.0 for k in ("loss_d", "d_real", "d_fake", "loss_g", "loss_mse",
                                               "loss_perceptual", "loss_gan", "d_fake_g")}

        # Discriminator step (generator output without gradient); real and fake in one call.
        self.opt_d.zero_grad(set_to_none=True)
        for i, b in enumerate(batches):
            with torch.no_grad(), self._autocast():
                z_hat = self.G(b["z_l"]).float()
            with self._grad_sync(self.d_ddp, i == accum - 1):
                with self._autocast():
                    x_t = torch.cat([noise_latent(b["z_h"], b["t_real"], b["n_real"]),
                                     noise_latent(z_hat, b["t_fake"], b["n_fake"])])
                    real, fake = self.d_ddp(x_t, torch.cat([b["t_real"], b["t_fake"]]), size).chunk(2)
                    loss = d_loss(real, fake)
                self.scaler.scale(loss / accum).backward()
            m["loss_d"] += loss.item() / accum
            m["d_real"] += real.float().mean().item() / accum
            m["d_fake"] += fake.float().mean().item() / accum
        m["grad_norm_d"] = self._clip_and_step(self.d_params, self.opt_d)

        # Generator step: the discriminator (unwrapped, parameters frozen) only passes gradients.
        for p in self.d_params:
            p.requires_grad_(False)
        self.opt_g.zero_grad(set_to_none=True)
        for i, b in enumerate(batches):
            with self._grad_sync(self.g_ddp, i == accum - 1):
                with self._autocast():
                    z_hat = self.g_ddp(b["z_l"]).float()
                    x_hat = self.G.decode(z_hat)
                    mse = F.mse_loss(x_hat.float(), b["hr"])
                    perc = (self.perceptual(x_hat.float(), b["hr"]).mean() if self.perceptual is not None
                            else torch.zeros((), device=self.device))
                    fake = self.D(noise_latent(z_hat, b["t_fake"], b["n_fake"]), b["t_fake"], size)
                    adv = g_adv_loss(fake)
                    loss = mse + lc.lambda_perceptual * perc + lc.lambda_gan * adv
                self.scaler.scale(loss / accum).backward()
            for k, v in (("loss_g", loss), ("loss_mse", mse), ("loss_perceptual", perc), ("loss_gan", adv),
                         ("d_fake_g", fake.float().mean())):
                m[k] += v.item() / accum
        for p in self.d_params:
            p.requires_grad_(True)
        m["grad_norm_g"] = self._clip_and_step(self.g_params, self.opt_g)
        self.scaler.update()  # once per iteration, after both optimizers stepped
        self._update_ema()
        self.step += 1
        self._last = {"lr_up": batches[-1]["lr_up"][:1], "hr": batches[-1]["hr"][:1],
                      "sr": x_hat[:1].detach().clamp(0, 1)}
        m["lr_g"] = self.opt_g.param_groups[0]["lr"]
        m["lr_d"] = self.opt_d.param_groups[0]["lr"]
        return m

    @torch.no_grad()
    def _update_ema(self) -> None:
        if self.ema is None:
            return
        decay = self.cfg.train.ema_decay
        for k, v in self.G.state_dict().items():
            self.ema[k].mul_(decay).add_(v.detach(), alpha=1 - decay)

    # -- state -----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        from .checkpoint import rng_state
        return {"step": self.step, "generator": self.G.state_dict(), "discriminator": self.D.state_dict(),
                "opt_g": self.opt_g.state_dict(), "opt_d": self.opt_d.state_dict(),
                "scaler": self.scaler.state_dict(), "ema": self.ema, "rng": rng_state(),
                "world_size": self.world, "config": self.cfg.summary()}

    def load_state_dict(self, state: dict) -> None:
        from .checkpoint import set_rng_state
        self.G.load_state_dict(state["generator"])
        self.D.load_state_dict(state["discriminator"])
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:  # EMA newly enabled on resume: it starts from the loaded weights
            saved = state.get("ema")
            self.ema = ({k: v.to(self.device) for k, v in saved.items()} if saved is not None
                        else {k: v.detach().clone() for k, v in self.G.state_dict().items()})
        set_rng_state(state["rng"])
        self.step = int(state["step"])

    def export_weights(self):
        """The current generator (EMA copy when train.ema_decay is set) as D3SRWeights."""
        training = {"trainer": "d3sr-comfyui training/train.py", "step": self.step,
                    "world_size": self.world, "ema": self.ema is not None, "config": self.cfg.summary()}
        if self.ema is None:
            return self.G.export_weights(self.cfg.train.scale, training)
        lora = {}
        for name in self.G.lora.names:
            key = name.replace(".", "__")
            lora["diffusion_model." + name] = (self.ema[f"lora.lora_A.{key}"].float().cpu(),
                                               self.ema[f"lora.lora_B.{key}"].float().cpu(), self.G.lora.alpha)
        return self.G.export_weights(self.cfg.train.scale, training, lora_override=lora,
                                     embedding_override=self.ema["embedding"])

    def save(self, folder: str) -> str:
        """Write step-N.pt and its D3SR export atomically (call on rank 0 only)."""
        from .checkpoint import atomic_torch_save, checkpoint_path, prune, write_export
        path = checkpoint_path(folder, self.step)
        write_export(folder, self.step, self.export_weights())
        atomic_torch_save(path, self.state_dict())
        prune(folder, self.cfg.log.keep_checkpoints)
        return path


# ---------------------------------------------------------------------------------------------
# Logging helpers
# ---------------------------------------------------------------------------------------------

class RunLog:
    """JSONL (always) + TensorBoard (when installed and enabled) on rank 0."""

    def __init__(self, cfg: Config, resume_step: int) -> None:
        self.path = os.path.join(cfg.output_dir, "log.jsonl")
        if os.path.exists(self.path):  # drop rows a resumed run will write again
            rows = []
            with open(self.path, encoding="utf-8") as f:
                for line in f:
                    try:
                        if json.loads(line).get("step", 0) <= resume_step:
                            rows.append(line if line.endswith("\n") else line + "\n")
                    except ValueError:  # a row cut off by a crash
                        if line.strip():
                            log.warning("%s: skipping an unreadable row: %.60s", self.path, line)
            write_text_atomic(self.path, "".join(rows))
        self.tb = None
        if cfg.log.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(os.path.join(cfg.output_dir, "tensorboard"))
            except ImportError:
                log.info("TensorBoard is not installed: logging to %s only", self.path)

    def write(self, step: int, values: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def save_sample(path: str, last: dict) -> None:
    """LR (bicubic-upsampled) | output | HR side by side as a PNG."""
    from PIL import Image
    row = torch.cat([last["lr_up"][0], last["sr"][0], last["hr"][0]], dim=-1).clamp(0, 1)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray((row.permute(1, 2, 0).float().cpu().numpy() * 255).round().astype("uint8")).save(path)


def run_eval(trainer: Trainer, out_dir: str) -> dict[str, float]:
    """Upscale eval_lr_folder with the current generator, then training.evaluate's metrics
    against eval_gt_folder. Returns {"eval/<metric>": mean}."""
    from PIL import Image

    from .evaluate import evaluate_folders, load_image, pair_files
    cfg = trainer.cfg
    os.makedirs(out_dir, exist_ok=True)
    for lr_path, _gt in pair_files(cfg.log.eval_lr_folder, cfg.log.eval_gt_folder):
        sr = trainer.G.super_resolve(load_image(lr_path).to(trainer.device), cfg.train.scale)
        arr = (sr[0].permute(1, 2, 0).cpu().numpy() * 255).round().astype("uint8")
        Image.fromarray(arr).save(os.path.join(out_dir, lr_path.stem + ".png"))
    result = evaluate_folders(out_dir, cfg.log.eval_gt_folder, device=str(trainer.device),
                              with_niqe=False, progress=False)
    return {f"eval/{k}": v for k, v in result.mean.items()}


# ---------------------------------------------------------------------------------------------
# Main loop
# ---------------------------------------------------------------------------------------------

def _workers_ignore_stop_signals(_worker_id: int) -> None:
    """DataLoader worker init: Ctrl-C / SIGTERM go to the whole process group, but only the main
    process should act on them (finish the step, checkpoint); the workers keep feeding it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _preflight(cfg: Config, ckpt_dir: str, resume: str | bool | None) -> tuple[list[str], str | None]:
    """Checks made once before training (rank 0): the data, the output folder and the
    evaluation set. Returns (usable image paths, checkpoint to resume from or None)."""
    from .checkpoint import latest_checkpoint, list_checkpoints
    from .config import ConfigError
    from .data import list_images, scan_images
    images = scan_images(list_images(cfg.data.folders), cfg.train.crop)[0]
    existing = list_checkpoints(ckpt_dir)
    if not resume and existing:
        raise ConfigError(f"output_dir '{cfg.output_dir}' already holds checkpoints (up to step "
                          f"{existing[-1][0]}): pass --resume to continue that run, or set another "
                          "output_dir (nothing was changed)")
    path = resume if isinstance(resume, str) else latest_checkpoint(ckpt_dir) if resume else None
    if path is not None and not os.path.isfile(path):
        raise ConfigError(f"--resume: checkpoint '{path}' not found")
    if cfg.log.eval_lr_folder or cfg.log.eval_gt_folder:
        check_eval_set(cfg)
    return images, path


def check_eval_set(cfg: Config) -> None:
    """ConfigError unless log.eval_lr_folder / eval_gt_folder pair up (every LR image has a
    ground truth of the same stem, `train.scale` times its size) and the metrics' weights load."""
    from PIL import Image

    from .config import ConfigError
    from .evaluate import pair_files
    lr_dir, gt_dir = cfg.log.eval_lr_folder, cfg.log.eval_gt_folder
    for name, folder in (("eval_lr_folder", lr_dir), ("eval_gt_folder", gt_dir)):
        if not folder or not os.path.isdir(folder):
            raise ConfigError(f"log.{name} '{folder}' is not a folder (set both eval folders, or neither)")
    try:  # the pairing run_eval and training.evaluate use
        pairs = pair_files(lr_dir, gt_dir)
    except FileNotFoundError as e:
        raise ConfigError(f"evaluation set (log.eval_lr_folder, log.eval_gt_folder): {e}") from None
    scale = cfg.train.scale
    for lr_path, gt_path in pairs:
        with Image.open(lr_path) as a, Image.open(gt_path) as b:
            if (round(a.width * scale), round(a.height * scale)) != b.size:
                raise ConfigError(f"evaluation pair '{lr_path.stem}': LR {a.width}x{a.height} x{scale} is "
                                  f"not the ground truth's {b.width}x{b.height}")
    from .dists import DISTS
    from .lpips_alex import LPIPSAlex
    try:
        LPIPSAlex(), DISTS()
    except Exception as e:
        raise ConfigError(f"evaluation during training needs the LPIPS and DISTS weights: {e}") from None


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def train(cfg: Config, resume: str | bool | None = None) -> int:
    """Run (or resume) training as configured; returns the process exit code."""
    stop = StopSignal()
    try:
        return _train(cfg, resume, stop)
    finally:
        stop.restore()


def _train(cfg: Config, resume: str | bool | None, stop: StopSignal) -> int:
    from d3sr_core import host
    rank, world, device = init_distributed(cfg)
    host.import_comfy(cpu=device.type == "cpu")
    if device.type == "cpu" and world > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    from .checkpoint import load_checkpoint
    from .data import CropDataset, ResumableShardSampler

    ckpt_dir = os.path.join(cfg.output_dir, "checkpoints")
    # Rank 0 checks the run and scans the data once; every rank gets its answer (same file list,
    # same checkpoint to resume from).
    box: list = [None]
    if rank == 0:
        try:
            box[0] = _preflight(cfg, ckpt_dir, resume)
        except Exception as e:
            box[0] = e
    if world > 1:
        dist.broadcast_object_list(box, src=0)
    if isinstance(box[0], Exception):
        raise box[0]
    image_paths, resume_path = box[0]
    trainer = Trainer(cfg, rank, world, device, image_paths=image_paths)

    if resume and resume_path is None:
        log.warning("--resume: no checkpoint in %s, starting from step 0", ckpt_dir)
    elif resume_path is not None:
        state = load_checkpoint(resume_path)
        if state.get("world_size", world) != world:
            log.warning("checkpoint was written with %s ranks, resuming with %s: the data order differs",
                        state.get("world_size"), world)
        trainer.load_state_dict(state)
        log.info("resumed from %s at step %d", resume_path, trainer.step)
    if world > 1:  # every rank must have read the same checkpoint (e.g. output_dir not shared)
        steps = torch.tensor([trainer.step, -trainer.step], device=device)
        dist.all_reduce(steps, op=dist.ReduceOp.MAX)
        if int(steps[0]) != -int(steps[1]):
            raise RuntimeError(f"ranks resumed at different steps ({-int(steps[1])}..{int(steps[0])}): "
                               "output_dir must be on storage every rank sees")

    dataset = CropDataset(trainer.image_paths, cfg.train.crop)
    per_step = trainer.micro_batch * cfg.optim.grad_accum
    sampler = ResumableShardSampler(len(dataset), rank, world, cfg.seed, start=trainer.step * per_step)
    workers = cfg.data.num_workers
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=trainer.micro_batch, sampler=sampler, num_workers=workers,
        pin_memory=device.type == "cuda", drop_last=True, persistent_workers=workers > 0,
        worker_init_fn=_workers_ignore_stop_signals if workers > 0 else None,
        prefetch_factor=cfg.data.prefetch_factor if workers > 0 else None)
    batches = iter(loader)

    runlog = RunLog(cfg, trainer.step) if rank == 0 else None
    if rank == 0:
        os.makedirs(ckpt_dir, exist_ok=True)
        write_text_atomic(os.path.join(cfg.output_dir, "config.json"), json.dumps(cfg.summary(), indent=2) + "\n")
    bar = None
    if rank == 0 and cfg.log.progress:
        from tqdm import tqdm
        bar = tqdm(total=cfg.train.steps, initial=trainer.step, unit="it", dynamic_ncols=True, file=sys.stderr)
    code, t0, last_saved = 0, time.time(), -1
    while trainer.step < cfg.train.steps:
        micro = [next(batches) for _ in range(cfg.optim.grad_accum)]
        metrics = trainer.train_step(micro)
        step = trainer.step
        if rank == 0:
            metrics["time"] = time.time() - t0
            if step % cfg.log.every == 0 or step == cfg.train.steps:
                runlog.write(step, metrics)
            if bar is not None:
                bar.update(1)
                bar.set_postfix({k: f"{metrics[k]:.4f}" for k in ("loss_d", "loss_mse", "loss_perceptual", "loss_gan")})
            if cfg.log.sample_every and step % cfg.log.sample_every == 0:
                save_sample(os.path.join(cfg.output_dir, "samples", f"step-{step:07d}.png"), trainer._last)
        stopping = stop.signum is not None
        if world > 1:
            flag = torch.tensor([1.0 if stopping else 0.0], device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            stopping = bool(flag.item())
        if stopping or step % cfg.log.checkpoint_every == 0 or step == cfg.train.steps:
            if rank == 0:
                path = trainer.save(ckpt_dir)
                last_saved = step
                log.info("step %d: checkpoint %s", step, path)
            _barrier(world)
        if stopping:
            log.warning("stopped by signal at step %d (checkpoint written); resume with --resume", step)
            break
        if rank == 0 and cfg.log.eval_lr_folder and step % cfg.log.eval_every == 0:
            try:  # after the checkpoint: a failing evaluation costs no training
                runlog.write(step, run_eval(trainer, os.path.join(cfg.output_dir, "eval", f"step-{step:07d}")))
            except Exception as e:
                log.error("step %d: evaluation failed, training goes on: %s: %s", step, type(e).__name__, e)
    if rank == 0:
        if last_saved != trainer.step:
            trainer.save(ckpt_dir)
        if bar is not None:
            bar.close()
        runlog.close()
    dump = os.environ.get("D3SR_RANK_STATE_DIR")  # tests: every rank's trainable state at the end
    if dump:
        os.makedirs(dump, exist_ok=True)
        torch.save({"generator": trainer.G.state_dict(), "discriminator": trainer.D.state_dict(),
                    "step": trainer.step}, os.path.join(dump, f"rank{rank}.pt"))
    _barrier(world)
    if world > 1:
        dist.destroy_process_group()
    return code


def prepare_tiny_setup(root: str, images: int = 6, size: int = 48, seed: int = 0) -> dict[str, str]:
    """Write what training/configs/tiny_cpu.yaml expects under `root`: models/tiny-sd2.safetensors
    (SD2-shaped, ComfyUI detects it as SD2.x), models/mini-sdxl.safetensors (SDXL-shaped) and
    data/ with `images` seeded smooth random RGB images of `size` x `size` pixels."""
    import numpy as np
    from PIL import Image

    from d3sr_core import host
    host.import_comfy()
    from d3sr_core import synthetic
    paths = {"generator": os.path.join(root, "models", "tiny-sd2.safetensors"),
             "discriminator": os.path.join(root, "models", "mini-sdxl.safetensors"),
             "data": os.path.join(root, "data")}
    if not os.path.exists(paths["generator"]):
        synthetic.write_checkpoint(paths["generator"], synthetic.TINY_SD2_UNET_CONFIG, seed=seed)
    if not os.path.exists(paths["discriminator"]):
        synthetic.write_sdxl_checkpoint(paths["discriminator"], synthetic.MINI_SDXL_UNET_CONFIG, seed=seed + 7)
    os.makedirs(paths["data"], exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(images):
        coarse = torch.from_numpy(rng.random((1, 3, 6, 6), dtype=np.float32))
        img = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
        arr = (img[0].permute(1, 2, 0).numpy() * 255).round().astype("uint8")
        Image.fromarray(arr).save(os.path.join(paths["data"], f"img{i:03d}.png"))
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML config (training/configs/*.yaml)")
    parser.add_argument("--make-tiny-setup", metavar="DIR",
                        help="write the generated models and images tiny_cpu.yaml uses into DIR, then exit")
    parser.add_argument("--resume", nargs="?", const=True, default=None,
                        help="continue from the newest checkpoint in output_dir (or the one given)")
    parser.add_argument("--output-dir", help="override output_dir")
    parser.add_argument("--steps", type=int, help="override train.steps")
    args = parser.parse_args(argv)
    if args.make_tiny_setup:
        print(json.dumps(prepare_tiny_setup(args.make_tiny_setup), indent=2))
        return 0
    if not args.config:
        parser.error("--config is required")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides: dict = {}
    if args.output_dir:
        overrides["output_dir"] = args.output_dir
    if args.steps:
        overrides["train"] = {"steps": args.steps}
    from .config import ConfigError
    from .data import DataError
    from .model_files import ModelFileError
    try:
        cfg = load_config(args.config, overrides)
        torch.manual_seed(cfg.seed)
        return train(cfg, args.resume)
    except (ConfigError, DataError, ModelFileError) as e:
        log.error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
