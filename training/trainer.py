"""One rank's D3SR training state and its iteration (D step, then G step).

    L_D = softplus(-D(F(z_H, t))) + softplus(D(F(z_H_hat, t)))          (patch means)
    L_G = MSE(x_H_hat, y) + lambda2 EA-DISTS(x_H_hat, y) + lambda1 softplus(-D(F(z_H_hat, t)))
with z_H = 0.18215 E(x_H) of the plain HR, y the loss target (the unsharp-masked HR with
data.usm_target 'sharpened', else the HR), z_H_hat = the generator's one step on the LR degraded
from y and bicubic-upsampled, x_H_hat its decoding, F(z, t) = sqrt(abar_t) z + sqrt(1 - abar_t) n,
t ~ U{0..999}; the MSE on loss.mse_range's pixel range (training.losses.pixel_mse).
Across ranks both networks are wrapped in DistributedDataParallel, which averages the trainable
gradients (LoRA, head, and the embedding when generator.train_embedding is set; the frozen
networks live outside the wrapped modules).
ComfyUI must be imported for the rank's device (d3sr_core.host.import_comfy) before this module.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from d3sr_core.pipeline import bicubic_upsample
from d3sr_core.weight_format import D3SRWeights

from .checkpoint import atomic_torch_save, checkpoint_path, prune, rng_state, set_rng_state, write_export
from .config import Config, ConfigError
from .data import list_images, make_degradation, scan_images, training_pair
from .discriminator import (
    Discriminator,
    d_loss,
    g_adv_loss,
    load_sdxl_encoder_half,
    noise_latent,
    sdxl_empty_conditioning,
)
from .distributed import resolve_device
from .generator import Generator, empty_prompt_embedding, load_generator_models
from .losses import build_perceptual, pixel_mse
from .model_files import check_model_file
from .precision import at_least_fp32, precision

METRICS = ("loss_d", "d_real", "d_fake", "loss_g", "loss_mse", "loss_perceptual", "loss_gan", "d_fake_g")


class Trainer:
    """Holds the generator, discriminator, optimizers and the step counter of one rank."""

    def __init__(self, cfg: Config, rank: int = 0, world: int = 1, device: torch.device | None = None,
                 image_paths: list[str] | None = None) -> None:
        self.cfg, self.rank, self.world = cfg, rank, world
        self.device = device or resolve_device(cfg)
        self.amp_dtype, frozen_dtype = precision(cfg, self.device)
        tc = cfg.train
        if tc.batch_size % (world * cfg.optim.grad_accum):
            raise ConfigError(f"train.batch_size {tc.batch_size} must be divisible by ranks ({world}) x "
                              f"optim.grad_accum ({cfg.optim.grad_accum})")
        self.micro_batch = tc.batch_size // world // cfg.optim.grad_accum

        # Everything that can be wrong is checked before any large load.
        check_model_file(cfg.models.generator, "generator")
        check_model_file(cfg.models.discriminator, "discriminator")
        if image_paths is None:
            image_paths, _ = scan_images(list_images(cfg.data.folders), tc.crop)
        self.image_paths = image_paths

        self.G = self._build_generator(frozen_dtype)
        self.D = self._build_discriminator(frozen_dtype)
        self.perceptual = build_perceptual(cfg)
        if self.perceptual is not None:
            self.perceptual.to(self.device)
        self.degrade = make_degradation(cfg.data.degradation, tc.scale, cfg.data.realesrgan)
        self._build_optimizers()
        self.ema = ({k: v.detach().clone() for k, v in self.G.state_dict().items()}
                    if tc.ema_decay else None)
        self.step = 0
        # DDP wrappers (their construction broadcasts rank 0's parameters); the plain modules
        # stay self.G / self.D for evaluation, export and the gradient-free uses.
        self.g_ddp: nn.Module = self.G
        self.d_ddp: nn.Module = self.D
        if world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.g_ddp = DistributedDataParallel(self.G, device_ids=ids, broadcast_buffers=False)
            self.d_ddp = DistributedDataParallel(self.D, device_ids=ids, broadcast_buffers=False)

    def _build_generator(self, frozen_dtype: torch.dtype) -> Generator:
        cfg, gc = self.cfg, self.cfg.generator
        model, clip, vae = load_generator_models(cfg.models.generator, dtype=frozen_dtype)
        embedding = empty_prompt_embedding(clip, cfg.models.embedding_file)
        del clip
        g = Generator(model, vae, embedding, gc.timestep, gc.lora_rank, gc.lora_alpha, seed=cfg.seed,
                      gradient_checkpointing=cfg.train.gradient_checkpointing).to(self.device)
        g.embedding.requires_grad_(gc.train_embedding)  # frozen (paper) unless the option is on
        g.move_frozen(self.device, frozen_dtype)
        return g

    def _build_discriminator(self, frozen_dtype: torch.dtype) -> Discriminator:
        cfg, dc = self.cfg, self.cfg.discriminator
        unet_d = load_sdxl_encoder_half(cfg.models.discriminator, self.device, frozen_dtype)
        context, pooled = sdxl_empty_conditioning(cfg.models.discriminator, cfg.models.sdxl_conditioning_file)
        return Discriminator(unet_d, context, pooled, dc.lora_rank, dc.lora_alpha, seed=cfg.seed + 1,
                             head_channels=dc.head_channels,
                             gradient_checkpointing=cfg.train.gradient_checkpointing).to(self.device)

    def _build_optimizers(self) -> None:
        oc = self.cfg.optim
        self.g_params = [p for p in self.G.parameters() if p.requires_grad]
        self.d_params = [p for p in self.D.parameters() if p.requires_grad]
        self.opt_g = torch.optim.AdamW(self.g_params, lr=oc.lr_generator, betas=tuple(oc.betas),
                                       weight_decay=oc.weight_decay)
        self.opt_d = torch.optim.AdamW(self.d_params, lr=oc.lr_discriminator, betas=tuple(oc.betas),
                                       weight_decay=oc.weight_decay)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)

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
        """HR crops -> the loss target and the LR degraded from it on the device
        (training.data.training_pair), the LR's bicubic upsampling, z_L, z_H (of the plain HR:
        the discriminator's real sample), t and noise."""
        gen = self._generator(micro)
        hr = hr.to(self.device, non_blocking=True).float()
        dc = self.cfg.data
        target, lr = training_pair(hr, self.degrade, gen, dc.usm_target, dc.usm_weight, dc.usm_threshold,
                                   dc.usm_radius)
        lr_up = bicubic_upsample(lr, tuple(hr.shape[-2:]))
        b = hr.shape[0]
        with self._autocast():      # one pass of the VAE's encoder over both
            z_l, z_h = self.G.encode(torch.cat([lr_up, hr])).split(b)
        lo, hi = self.cfg.train.d_timesteps
        t_real = torch.randint(lo, hi + 1, (b,), generator=gen)
        t_fake = t_real if self.cfg.train.timestep_sharing else torch.randint(lo, hi + 1, (b,), generator=gen)
        n_real = torch.randn(z_h.shape, generator=gen)
        n_fake = torch.randn(z_h.shape, generator=gen)
        dev = self.device
        return {"hr": hr, "target": target, "lr_up": lr_up, "z_l": z_l, "z_h": z_h, "t_real": t_real.to(dev),
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
        m: dict[str, float] = dict.fromkeys(METRICS, 0.0)
        m["grad_norm_d"] = self._d_step(batches, m)
        m["grad_norm_g"], x_hat = self._g_step(batches, m)
        self.scaler.update()  # once per iteration, after both optimizers stepped
        self._update_ema()
        self.step += 1
        self._last = {"lr_up": batches[-1]["lr_up"][:1], "hr": batches[-1]["hr"][:1],
                      "sr": x_hat[:1].detach().clamp(0, 1)}
        m["lr_g"] = self.opt_g.param_groups[0]["lr"]
        m["lr_d"] = self.opt_d.param_groups[0]["lr"]
        return m

    def _d_step(self, batches: list[dict], m: dict[str, float]) -> float:
        """Discriminator step (generator output without gradient; real and fake in one call);
        adds its losses to `m`, returns D's gradient norm."""
        accum, size = len(batches), tuple(batches[0]["hr"].shape[-2:])
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
        return self._clip_and_step(self.d_params, self.opt_d)

    def _g_step(self, batches: list[dict], m: dict[str, float]) -> tuple[float, torch.Tensor]:
        """Generator step: the discriminator (unwrapped, parameters frozen) only passes gradients.
        Adds its losses to `m`; returns (G's gradient norm, the last micro-batch's output)."""
        lc, accum, size = self.cfg.loss, len(batches), tuple(batches[0]["hr"].shape[-2:])
        for p in self.d_params:
            p.requires_grad_(False)
        self.opt_g.zero_grad(set_to_none=True)
        for i, b in enumerate(batches):
            with self._grad_sync(self.g_ddp, i == accum - 1):
                with self._autocast():
                    z_hat = self.g_ddp(b["z_l"]).float()
                    x_hat = at_least_fp32(self.G.decode(z_hat))
                    target = b["target"].to(x_hat.dtype)
                    mse = pixel_mse(x_hat, target, lc.mse_range)
                    perc = (self.perceptual(x_hat, target).mean() if self.perceptual is not None
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
        return self._clip_and_step(self.g_params, self.opt_g), x_hat

    @torch.no_grad()
    def _update_ema(self) -> None:
        if self.ema is None:
            return
        decay = self.cfg.train.ema_decay
        for k, v in self.G.state_dict().items():
            self.ema[k].mul_(decay).add_(v.detach(), alpha=1 - decay)

    # -- state -----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything a resume needs, as tensors, numbers, strings and plain containers only
        (training.checkpoint loads it with torch.load(weights_only=True))."""
        return {"step": self.step, "generator": self.G.state_dict(), "discriminator": self.D.state_dict(),
                "opt_g": self.opt_g.state_dict(), "opt_d": self.opt_d.state_dict(),
                "scaler": self.scaler.state_dict(), "ema": self.ema, "rng": rng_state(),
                "world_size": self.world, "config": self.cfg.summary()}

    def load_state_dict(self, state: dict) -> None:
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

    def export_weights(self) -> D3SRWeights:
        """The current generator (EMA copy when train.ema_decay is set) as D3SRWeights."""
        training = {"trainer": "d3sr-comfyui training/train.py", "step": self.step,
                    "world_size": self.world, "ema": self.ema is not None, "config": self.cfg.summary()}
        return self.G.export_weights(self.cfg.train.scale, training, state=self.ema)

    def save(self, folder: str) -> str:
        """Write step-N.pt and its D3SR export atomically (call on rank 0 only)."""
        path = checkpoint_path(folder, self.step)
        write_export(folder, self.step, self.export_weights())
        atomic_torch_save(path, self.state_dict())
        prune(folder, self.cfg.log.keep_checkpoints)
        return path
