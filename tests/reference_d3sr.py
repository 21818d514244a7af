"""An independent, plain implementation of D3SR inference (D3SR.md's formulas), for tests.

It shares nothing with d3sr_core's pipeline: the LoRA is merged into the weights by hand,
abar comes from the schedule written out with numpy, and the raw ComfyUI UNet/VAE modules are
called directly (no ModelPatcher, no apply_model, no VAE wrapper).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

LATENT_SCALE = 0.18215


def abar(t: int) -> float:
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2
    return float(np.cumprod(1.0 - betas)[t])


def merged_unet(checkpoint: str, unet_config: dict, lora: dict, strength: float = 1.0):
    """The checkpoint's UNet with W += strength * alpha / r * B @ A for every LoRA layer."""
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    sd = load_file(checkpoint)
    prefix = "model.diffusion_model."
    unet_sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    for name, (a, b, alpha) in lora.items():
        key = name[len("diffusion_model."):] + ".weight"
        w = unet_sd[key]
        rank = a.shape[0]
        delta = (b.reshape(b.shape[0], rank) @ a.reshape(rank, -1)).reshape(w.shape)
        unet_sd[key] = w + strength * alpha / rank * delta
    unet = UNetModel(**unet_config, operations=comfy.ops.disable_weight_init)
    unet.load_state_dict(unet_sd)
    return unet.eval()


def raw_vae(checkpoint: str):
    from comfy.ldm.models.autoencoder import AutoencoderKL

    from d3sr_core.architectures import KL_VAE_DDCONFIG
    sd = load_file(checkpoint)
    prefix = "first_stage_model."
    vae = AutoencoderKL(ddconfig=KL_VAE_DDCONFIG, embed_dim=4)
    vae.load_state_dict({k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)})
    return vae.eval()


def pillow_bicubic(lr_bchw: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Pillow's own BICUBIC resize of each image, quantised to 8 bits (rounded) first."""
    from PIL import Image
    out = []
    for img in lr_bchw:
        arr = (img.permute(1, 2, 0).double() * 255).round().clamp(0, 255).to(torch.uint8).numpy()
        res = Image.fromarray(arr).resize((size[1], size[0]), Image.BICUBIC)
        out.append(torch.from_numpy(np.asarray(res).copy()).permute(2, 0, 1).float() / 255)
    return torch.stack(out)


@torch.no_grad()
def d3sr_reference(unet, vae, lr_bchw: torch.Tensor, factor: float, timestep: int,
                   embedding: torch.Tensor, multiple: int = 8, upsampler: str = "torch") -> torch.Tensor:
    """LR [B, 3, h, w] in [0, 1] -> SR [B, 3, round(f h), round(f w)] in [0, 1], no colour fix.
    The upsampled image is reflect-padded to `multiple` (the VAE's 8) and the UNet runs at that
    size; upsampler "torch" (F.interpolate bicubic) or "pillow" (Pillow's BICUBIC, 8 bits)."""
    out_h, out_w = round(lr_bchw.shape[2] * factor), round(lr_bchw.shape[3] * factor)
    if upsampler == "pillow":
        x = pillow_bicubic(lr_bchw, (out_h, out_w))
    else:
        x = F.interpolate(lr_bchw, size=(out_h, out_w), mode="bicubic", align_corners=False).clamp(0, 1)
    ph, pw = (-out_h) % multiple, (-out_w) % multiple
    x = F.pad(x, (0, pw, 0, ph), mode="reflect")
    moments = vae.quant_conv(vae.encoder(2.0 * x - 1.0))
    z_l = LATENT_SCALE * moments[:, :4]                      # posterior mode = mean
    a = abar(timestep)
    t = torch.full((x.shape[0],), float(timestep))
    eps = unet(z_l, t, context=embedding.expand(x.shape[0], -1, -1))
    z_h = (z_l - (1 - a) ** 0.5 * eps) / a ** 0.5
    img = vae.decoder(vae.post_quant_conv(z_h / LATENT_SCALE))
    return ((img + 1.0) / 2.0).clamp(0, 1)[:, :, :out_h, :out_w]
