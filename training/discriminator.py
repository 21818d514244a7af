"""D3SR's latent diffusion discriminator: SDXL-base's UNet input blocks + middle block, with
LoRA, and a per-location MLP head giving one realism logit per latent patch.

Only `time_embed`, `label_emb`, `input_blocks` and `middle_block` are materialised: the UNet is
constructed on the meta device (no memory), its output blocks and `out` are dropped, and only
the kept tensors are read from the file, so the decoder half never reaches memory or a device.

Input: noised SD2.1 latents F(z, t) = sqrt(abar_t) z + sqrt(1 - abar_t) n, t ~ U{0..999}
([B, 4, h, w]); conditioning: SDXL's empty-prompt context [1, 77, 2048], pooled [1, 1280] and
the size conditioning (H, W, 0, 0, H, W) of the crop in pixels. Output: logits
[B, 1, h / 2^(levels-1), w / 2^(levels-1)] (SDXL: 64x64 latent -> 16x16).
Head (our default): 1x1 conv C -> C, SiLU, 1x1 conv C -> 1 (C = 1280 for SDXL).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from d3sr_core import comfy_internals
from d3sr_core.lora_layers import lora_target_names
from d3sr_core.schedule import alphas_cumprod

from .lora import LoRASet, freeze
from .model_files import ModelFileError, check_model_file
from .precision import at_least_fp32

log = logging.getLogger("d3sr.train")
KEPT_PREFIXES = ("time_embed.", "label_emb.", "input_blocks.", "middle_block.")
CONTEXT_SHAPE = (1, 77, 2048)
POOLED_SHAPE = (1, 1280)
PREFIX = "model.diffusion_model."


def _read_tensors(path: str, keys_wanted) -> dict[str, torch.Tensor]:
    """The tensors of checkpoint `path` whose names pass `keys_wanted` (safetensors: only those
    are read)."""
    if path.lower().endswith(".safetensors"):
        with safe_open(path, framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys() if keys_wanted(k)}
    import comfy.utils
    sd = comfy.utils.load_torch_file(path)
    return {k: v for k, v in sd.items() if keys_wanted(k)}


def encoder_half_on_meta(config: dict) -> nn.Module:
    """ComfyUI's UNetModel for the UNet `config` on the meta device with its output blocks and
    `out` removed (time/label embeddings, input blocks and middle block kept)."""
    config = dict(config, num_heads=-1, num_head_channels=64)  # ComfyUI's SD-family default (SDXL: 64)
    unet = comfy_internals.drop_unet_decoder(comfy_internals.build_unet(config, device="meta"))
    unet.config = config
    return unet


def load_sdxl_encoder_half(path: str, device: torch.device | str = "cpu",
                           dtype: torch.dtype = torch.float32) -> nn.Module:
    """ComfyUI's UNetModel for the SDXL file `path` with only time/label embeddings, input blocks
    and middle block materialised on `device` (frozen). Raises ModelFileError for a missing file
    or a non-SDXL UNet (e.g. the SD2.1 file)."""
    config = {k: v for k, v in check_model_file(path, "discriminator").items() if not k.startswith("_")}
    unet = encoder_half_on_meta(config)
    unet.to_empty(device=device)
    wanted = _read_tensors(path, lambda k: k.startswith(PREFIX) and k[len(PREFIX):].startswith(KEPT_PREFIXES))
    tensors = {k[len(PREFIX):]: v for k, v in wanted.items()}
    missing, unexpected = unet.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise ModelFileError(f"discriminator checkpoint '{path}': {len(missing)} missing / "
                             f"{len(unexpected)} unexpected UNet tensors (e.g. {(missing or unexpected)[:3]})")
    unet.to(dtype=dtype)
    return freeze(unet.eval())


def sdxl_empty_conditioning(path: str, cache_file: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(context [1, 77, 2048], pooled [1, 1280]) of the empty prompt: from `cache_file`
    (safetensors 'context'/'pooled') if given, else SDXL's two text encoders in `path` (loaded
    once, then freed), else zeros with a warning (checkpoints without text encoders)."""
    if cache_file:
        data = load_file(cache_file)
        ctx, pooled = data["context"].float(), data["pooled"].float()
        if tuple(ctx.shape) != CONTEXT_SHAPE or tuple(pooled.shape) != POOLED_SHAPE:
            raise ModelFileError(f"SDXL conditioning file '{cache_file}' holds {list(ctx.shape)} / "
                                 f"{list(pooled.shape)}, expected {list(CONTEXT_SHAPE)} / {list(POOLED_SHAPE)}")
        return ctx, pooled
    if not check_model_file(path, "discriminator")["_has_text_encoder"]:
        log.warning("the discriminator checkpoint has no text encoders: SDXL's empty-prompt "
                    "conditioning is zeros (set models.sdxl_conditioning_file for the real one)")
        return torch.zeros(CONTEXT_SHAPE), torch.zeros(POOLED_SHAPE)
    clip = load_sdxl_text_encoders(path)
    ctx, pooled = clip.encode_from_tokens(clip.tokenize(""), return_pooled=True)
    del clip
    return ctx.float().cpu(), pooled.float().cpu()


def load_sdxl_text_encoders(path: str):
    """ComfyUI's SDXL CLIP (CLIP-L + OpenCLIP bigG) from an SDXL checkpoint, reading only the
    text-encoder tensors. It goes through ComfyUI's SDXL model config (key conversion, CLIP
    target) as its checkpoint loader does, but with the UNet layout from our own check, so any
    SDXL-shaped file works, not only those ComfyUI's UNet detection knows."""
    config = {k: v for k, v in check_model_file(path, "discriminator").items() if not k.startswith("_")}
    sd = _read_tensors(path, lambda k: k.startswith("conditioner.embedders."))
    loaded = comfy_internals.sdxl_text_encoders(config, sd)
    if loaded is None:
        raise ModelFileError(f"discriminator checkpoint '{path}' has no SDXL text encoders "
                             "(conditioner.embedders.0/1)")
    clip, missing = loaded
    missing = [k for k in missing if ".logit_scale" not in k and ".text_projection.weight" not in k]
    if missing:
        raise ModelFileError(f"discriminator checkpoint '{path}': {len(missing)} text-encoder tensors are "
                             f"missing (e.g. {missing[:3]})")
    return clip


def size_conditioning(pooled: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """SDXL's adm vector [1, 2816]: pooled [1, 1280] + sinusoidal(256) of
    (height, width, crop_top 0, crop_left 0, target height, target width), in pixels."""
    parts = [comfy_internals.sinusoidal_embedding(v, 256) for v in (height, width, 0, 0, height, width)]
    return torch.cat([pooled.float().reshape(1, -1), torch.flatten(torch.cat(parts)).unsqueeze(0)], dim=1)


def noise_latent(z: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """F(z, t) = sqrt(abar_t) z + sqrt(1 - abar_t) n; z, noise [B, 4, h, w], t [B] integer."""
    abar = alphas_cumprod(torch.float64).to(z.device)[t.long()].to(torch.float32).view(-1, 1, 1, 1)
    return abar.sqrt() * z + (1.0 - abar).sqrt() * noise


def d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Non-saturating discriminator loss averaged over patches:
    -E log D(real) - E log(1 - D(fake)) = softplus(-real).mean() + softplus(fake).mean()."""
    return F.softplus(-at_least_fp32(real_logits)).mean() + F.softplus(at_least_fp32(fake_logits)).mean()


def g_adv_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """-E log D(fake) = softplus(-fake).mean() (non-saturating generator loss)."""
    return F.softplus(-at_least_fp32(fake_logits)).mean()


class Discriminator(nn.Module):
    """Parameters: LoRA on the SDXL input/middle blocks and the head. The frozen half-UNet is
    held outside the module tree; context/pooled are buffers."""

    def __init__(self, unet: nn.Module, context: torch.Tensor, pooled: torch.Tensor, rank: int = 16,
                 alpha: float = 16.0, seed: int = 1, head_channels: int | None = None,
                 gradient_checkpointing: bool = False) -> None:
        super().__init__()
        self._frozen = {"unet": unet}
        self.lora = LoRASet(unet, lora_target_names(unet), rank, alpha, seed)
        channels = comfy_internals.encoder_channels(unet)
        if channels is None:
            raise ValueError("cannot tell the middle block's channel count")
        hidden = head_channels or channels
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            self.head = nn.Sequential(nn.Conv2d(channels, hidden, 1), nn.SiLU(), nn.Conv2d(hidden, 1, 1))
        self.register_buffer("context", context.float().reshape(CONTEXT_SHAPE).clone())
        self.register_buffer("pooled", pooled.float().reshape(POOLED_SHAPE).clone())
        self.checkpointing = bool(gradient_checkpointing)
        self._adm_cache: dict[tuple[int, int], torch.Tensor] = {}

    @property
    def unet(self) -> nn.Module:
        return self._frozen["unet"]

    def move_frozen(self, device: torch.device, dtype: torch.dtype | None = None) -> None:
        self.unet.to(device=device, dtype=dtype)

    def adm(self, height: int, width: int) -> torch.Tensor:
        """Size conditioning [1, 2816] for a crop of height x width pixels (cached)."""
        key = (int(height), int(width))
        if key not in self._adm_cache:
            self._adm_cache[key] = size_conditioning(self.pooled.cpu(), *key)
        return self._adm_cache[key].to(self.pooled.device)

    def _block(self, block: nn.Module, h, emb, ctx):
        if self.checkpointing and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(comfy_internals.run_block, block, h, emb, ctx,
                                                     use_reentrant=False)
        return comfy_internals.run_block(block, h, emb, ctx)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        """x_t [B, 4, h, w] noised latent, t [B] timesteps, image_size (H, W) pixels ->
        logits [B, 1, h', w'] in the head's dtype (float32)."""
        unet = self.unet
        dtype = next(unet.parameters()).dtype
        b = x_t.shape[0]
        y = self.adm(*image_size).expand(b, -1).to(dtype)
        emb = comfy_internals.unet_embedding(unet, t, y, dtype)
        ctx = self.context.to(dtype).expand(b, -1, -1)
        h = x_t.to(dtype)
        for block in unet.input_blocks:
            h = self._block(block, h, emb, ctx)
        h = self._block(unet.middle_block, h, emb, ctx)
        return self.head(h.to(self.head[0].weight.dtype))
