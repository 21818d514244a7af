"""Small models with seeded random weights, built from ComfyUI's own classes, for the tests,
the demo and benchmarks. They have the real architectures' layer names, so ComfyUI's loaders
detect them (SD2.x: model_channels 320, context 1024, linear transformer proj) and D3SR
files made for them load exactly like real ones. Their outputs are not meaningful images.

Development scaffolding: nothing the nodes or the trainer run imports this module. ComfyUI must
be importable first (`d3sr_core.host.import_comfy()`). Checkpoints are written atomically but
not fsynced: they are made again on every run.
"""

from __future__ import annotations

import math
import os

import torch

from d3sr_core import comfy_internals
from d3sr_core.architectures import KL_VAE_DDCONFIG, SD21_UNET_CONFIG
from d3sr_core.lora_layers import lora_shapes, lora_target_names
from d3sr_core.weight_format import EMBEDDING_SHAPE, D3SRWeights, atomic_save_safetensors, write_weights

# A two-level SD2-shaped UNet (37 M parameters) that ComfyUI still detects as SD2.x.
TINY_SD2_UNET_CONFIG = dict(
    SD21_UNET_CONFIG, num_res_blocks=[1, 1], channel_mult=[1, 1], transformer_depth=[1, 0],
    transformer_depth_output=[1, 1, 0, 0])

# Same size, SD1.x-shaped (context 768, conv proj): ComfyUI detects it as SD1.5.
TINY_SD1_UNET_CONFIG = dict(TINY_SD2_UNET_CONFIG, context_dim=768, use_linear_in_transformer=False,
                            num_head_channels=-1, num_heads=8)

# Three levels: its LoRA layer names only partly exist in the two-level model.
TINY_SD2_3LEVEL_UNET_CONFIG = dict(
    TINY_SD2_UNET_CONFIG, num_res_blocks=[1, 1, 1], channel_mult=[1, 1, 1],
    transformer_depth=[1, 0, 0], transformer_depth_output=[1, 1, 0, 0, 0, 0])

# SDXL-shaped (context 2048, pooled+size conditioning 2816) with SDXL's layer naming. ComfyUI's
# checkpoint detection only knows the real SDXL depths, so build it with supported_models.SDXL.
TINY_SDXL_UNET_CONFIG = dict(
    TINY_SD2_UNET_CONFIG, context_dim=2048, adm_in_channels=2816, num_classes="sequential",
    channel_mult=[1, 2], transformer_depth=[0, 1], transformer_depth_output=[0, 0, 1, 1])


def _scale_kind(name: str, p: torch.Tensor) -> int | str:
    """How seeded values for parameter `name` are scaled: its fan-in (a weight matrix or kernel),
    "norm" (a norm's weight) or "small" (biases and the rest)."""
    if p.ndim >= 2:
        return p[0].numel()
    return "norm" if "norm" in name and name.endswith("weight") else "small"


def _scale_(noise: torch.Tensor, kind: int | str) -> torch.Tensor:
    """N(0, 1) draws `noise` -> weights N(0, 1/fan_in), norm weights ~ 1, biases and the rest
    small (`kind` from _scale_kind); in place."""
    if kind == "norm":
        return noise.mul_(0.1).add_(1.0)
    if kind == "small":
        return noise.mul_(0.02)
    return noise.div_(math.sqrt(kind))


def seeded_init_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Fill every parameter deterministically: weights ~ N(0, 1/fan_in), norms ~ 1, biases small."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            # In place for float32 parameters (no temporary of the size of the model's largest
            # layer); the same draws and the same float32 arithmetic as a fresh randn tensor.
            noise = p if p.dtype == torch.float32 and p.is_contiguous() else torch.empty(p.shape)
            _scale_(noise.normal_(generator=gen), _scale_kind(name, p))
            if noise is not p:
                p.copy_(noise)
    return module


# A prime number of draws: a weight's rows (length fan_in < POOL_DRAWS) start at different
# places of the pool, so no two rows of a layer are equal.
POOL_DRAWS = 1_048_583


def pooled_init_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """seeded_init_'s scales on one seeded pool of POOL_DRAWS N(0, 1) draws: each parameter reads
    the scaled pool from a seeded offset, wrapping around. For the full-size text encoders (0.35 B
    and 0.8 B parameters), which the tests only compare with themselves through ComfyUI: the
    values must be fixed and varied, not independent, and drawing each costs 7 ns (5 s for SDXL's)."""
    gen = torch.Generator().manual_seed(seed)
    pool = torch.randn(POOL_DRAWS, generator=gen)
    scaled: dict[tuple, torch.Tensor] = {}         # the pool as _scale_ makes it, per scale and dtype
    with torch.no_grad():
        for name, p in module.named_parameters():
            start = int(torch.randint(POOL_DRAWS, (1,), generator=gen))
            kind = _scale_kind(name, p)
            if (kind, p.dtype) not in scaled:
                scaled[kind, p.dtype] = _scale_(pool.clone(), kind).to(p.dtype)
            src, flat, done = scaled[kind, p.dtype], p.view(-1), 0
            while done < flat.numel():
                take = min(flat.numel() - done, POOL_DRAWS - start)
                flat[done:done + take] = src[start:start + take]
                done, start = done + take, 0
    return module


def build_unet(config: dict, seed: int = 0, device: str = "cpu", dtype: torch.dtype = torch.float32
               ) -> torch.nn.Module:
    """A ComfyUI UNetModel with `config` and seeded weights."""
    return seeded_init_(comfy_internals.build_unet(config), seed).to(device=device, dtype=dtype)


def unet_layout(config: dict) -> torch.nn.Module:
    """A ComfyUI UNetModel with `config` on the meta device: its layer names and shapes without
    weights (what random_d3sr_weights reads), built in milliseconds."""
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    with torch.device("meta"):
        return UNetModel(**config, operations=comfy.ops.disable_weight_init)


def build_kl_vae(seed: int = 1) -> torch.nn.Module:
    """ComfyUI's AutoencoderKL with SD's config and seeded weights."""
    return seeded_init_(comfy_internals.build_kl_vae(KL_VAE_DDCONFIG), seed)


def build_sd2_text_encoder(seed: int = 2, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """ComfyUI's SD2 text encoder (OpenCLIP ViT-H/14 text tower, 354 M parameters, full size:
    its config is fixed) with seeded weights (pooled_init_), made in float32 and stored in
    `dtype`."""
    from comfy.text_encoders import sd2_clip
    return pooled_init_(sd2_clip.SD2ClipModel(device="cpu", dtype=dtype), seed)


def sd2_text_encoder_tensors(seed: int = 2) -> dict[str, torch.Tensor]:
    """A seeded SD2 text encoder (build_sd2_text_encoder) as an SD2 checkpoint stores it:
    cond_stage_model.model.* in fp16 (0.7 GB; built in fp16, without a float32 copy)."""
    import comfy.supported_models
    clip_sd = build_sd2_text_encoder(seed, torch.float16).state_dict()
    saved = comfy.supported_models.SD20(TINY_SD2_UNET_CONFIG).process_clip_state_dict_for_saving(clip_sd)
    return {k: v.half() for k, v in saved.items()}


def write_checkpoint(path: str, unet_config: dict = TINY_SD2_UNET_CONFIG, seed: int = 0,
                     text_encoder: bool = False, extra_tensors: dict | None = None, vae: bool = True) -> str:
    """Write an SD-style checkpoint (model.diffusion_model.* + first_stage_model.*) that ComfyUI's
    CheckpointLoaderSimple loads. With `text_encoder` (SD2 configs only) it also holds a seeded
    SD2 text encoder in fp16 (cond_stage_model.model.*, 0.7 GB), so the loader returns a real
    CLIP. The UNet and VAE depend on `seed` only, not on `text_encoder`. `vae` False leaves the
    VAE out (for a file only the trainer's discriminator reads: ComfyUI's loader knows SD's
    VAE at full size only). Returns `path`."""
    sd = {"model.diffusion_model." + k: v for k, v in build_unet(unet_config, seed).state_dict().items()}
    if vae:
        sd.update({"first_stage_model." + k: v for k, v in build_kl_vae(seed + 1).state_dict().items()})
    if text_encoder:
        sd.update(sd2_text_encoder_tensors(seed + 2))
    sd.update(extra_tensors or {})
    atomic_save_safetensors(path, {k: v.contiguous() for k, v in sd.items()}, {}, durable=False)
    return path


def add_sd2_text_encoder(src: str, path: str, seed: int = 0) -> str:
    """Write `path`: the SD2 checkpoint `src` that write_checkpoint made with `seed`, plus the text
    encoder write_checkpoint(text_encoder=True) adds for that seed; the same tensors as that call,
    without building the UNet and VAE again. Returns `path`."""
    from safetensors.torch import load_file
    sd = load_file(src)
    sd.update(sd2_text_encoder_tensors(seed + 2))
    atomic_save_safetensors(path, {k: v.contiguous() for k, v in sd.items()}, {}, durable=False)
    return path


def random_d3sr_weights(unet: torch.nn.Module, timestep: int = 399, rank: int = 4,
                        alpha: float = 4.0, seed: int = 0, lora_std: float = 0.05) -> D3SRWeights:
    """D3SR weights with random (non-zero) LoRA on every target layer of `unet` (only its layer
    names and shapes are read: unet_layout will do) and a random embedding; lora_std sets the
    size of the A and B entries."""
    gen = torch.Generator().manual_seed(seed)
    modules = dict(unet.named_modules())
    lora = {}
    for name in lora_target_names(unet):
        a_shape, b_shape = lora_shapes(modules[name], rank)
        a = torch.randn(a_shape, generator=gen) * lora_std
        b = torch.randn(b_shape, generator=gen) * lora_std
        lora["diffusion_model." + name] = (a, b, alpha)
    emb = torch.randn(EMBEDDING_SHAPE, generator=gen)
    return D3SRWeights(lora=lora, text_embedding=emb, timestep=timestep, lora_rank=rank,
                       lora_alpha=alpha, training={"synthetic": True, "seed": seed})


def write_demo_files(models_dir: str, seed: int = 0, timestep: int = 399) -> tuple[str, str]:
    """Write a tiny random SD2 checkpoint and a matching D3SR file into a ComfyUI models folder
    (checkpoints/ and d3sr/). Returns their file names."""
    ckpt_name, d3sr_name = "d3sr-demo-tiny-sd2.safetensors", "d3sr-demo-random.safetensors"
    ckpt = os.path.join(models_dir, "checkpoints", ckpt_name)
    if not os.path.exists(ckpt):
        write_checkpoint(ckpt, seed=seed)
    weights_path = os.path.join(models_dir, "d3sr", d3sr_name)
    if not os.path.exists(weights_path):
        write_weights(weights_path, random_d3sr_weights(unet_layout(TINY_SD2_UNET_CONFIG), timestep=timestep,
                                                        seed=seed))
    return ckpt_name, d3sr_name


# A very small SDXL-shaped UNet (context 2048, adm 2816, SDXL layer naming) for fast CPU tests of
# the discriminator: model_channels 64 instead of 320, so ComfyUI's checkpoint detection does not
# know it, but the trainer's own SDXL check (context_dim, adm_in_channels) accepts it.
MINI_SDXL_UNET_CONFIG = dict(
    TINY_SDXL_UNET_CONFIG, model_channels=64)


def build_sdxl_text_encoders(seed: int = 2, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """ComfyUI's SDXL text encoders (SDXLClipModel: CLIP-L and OpenCLIP bigG, full size, 0.8 B
    parameters) with seeded weights (pooled_init_), made in float32 and stored in `dtype`
    (float16: the values a checkpoint holds, written without another conversion)."""
    from comfy import sdxl_clip
    return pooled_init_(sdxl_clip.SDXLClipModel(device="cpu", dtype=dtype), seed)


def write_sdxl_checkpoint(path: str, unet_config: dict = MINI_SDXL_UNET_CONFIG, seed: int = 0,
                          text_encoders: bool | torch.nn.Module = False, vae: bool = True) -> str:
    """Write an SDXL-style checkpoint (model.diffusion_model.* + first_stage_model.*) with an
    SDXL-shaped UNet. With `text_encoders` it also holds ComfyUI's SDXL text encoders in fp16
    (conditioner.embedders.*: 1.6 GB): True builds them seeded (build_sdxl_text_encoders with
    seed + 2), an SDXLClipModel given here is stored as it is. `vae` False leaves the VAE out
    (the trainer's discriminator never reads it). Returns `path`."""
    if unet_config.get("context_dim") != 2048 or unet_config.get("adm_in_channels") != 2816:
        raise ValueError("an SDXL-shaped UNet config needs context_dim 2048 and adm_in_channels 2816")
    extra = {}
    if text_encoders is not False:
        import comfy.supported_models
        clip = build_sdxl_text_encoders(seed + 2) if text_encoders is True else text_encoders
        saved = comfy.supported_models.SDXL(unet_config).process_clip_state_dict_for_saving(clip.state_dict())
        extra = {k: v.half() if v.is_floating_point() else v for k, v in saved.items()}
    return write_checkpoint(path, unet_config, seed, extra_tensors=extra, vae=vae)
