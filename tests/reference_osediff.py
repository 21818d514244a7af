"""A generated OSEDiff-format weight dict for the tiny SD2 checkpoint, and OSEDiff's forward
written plainly: PEFT names over diffusers module names (written out by hand below, not taken
from ComfyUI's maps), three UNet adapters, conv_in's trained weight and bias, a LoRA on the VAE
encoder; the reference merges every LoRA into the raw ldm weights by hand (scale alpha / rank,
PEFT's alpha 8) and replaces conv_in.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from reference_d3sr import LATENT_SCALE, abar
from safetensors.torch import load_file
from torchvision.transforms import ToPILImage, ToTensor

from devtools import synthetic

RANK = 4
ALPHA = 8.0          # PEFT's default lora_alpha, which OSEDiff keeps

# ldm -> diffusers names of the tiny SD2 UNet (two levels, one res block each, a transformer
# on level 0 only), written out by hand so the test does not share ComfyUI's map.
UNET_BLOCKS = [
    ("input_blocks.0.0", "conv_in"),
    ("input_blocks.1.0", "down_blocks.0.resnets.0"),
    ("input_blocks.1.1", "down_blocks.0.attentions.0"),
    ("input_blocks.2.0.op", "down_blocks.0.downsamplers.0.conv"),
    ("input_blocks.3.0", "down_blocks.1.resnets.0"),
    ("middle_block.0", "mid_block.resnets.0"),
    ("middle_block.1", "mid_block.attentions.0"),
    ("middle_block.2", "mid_block.resnets.1"),
    ("output_blocks.0.0", "up_blocks.0.resnets.0"),
    ("output_blocks.1.0", "up_blocks.0.resnets.1"),
    ("output_blocks.1.1.conv", "up_blocks.0.upsamplers.0.conv"),
    ("output_blocks.2.0", "up_blocks.1.resnets.0"),
    ("output_blocks.2.1", "up_blocks.1.attentions.0"),
    ("output_blocks.3.0", "up_blocks.1.resnets.1"),
    ("output_blocks.3.1", "up_blocks.1.attentions.1"),
    ("out.2", "conv_out"),
]
RESNET_PARTS = {"in_layers.2": "conv1", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
VAE_PARTS = {"nin_shortcut": "conv_shortcut", "q": "to_q", "k": "to_k", "v": "to_v",
             "proj_out": "to_out.0"}


def unet_diffusers_name(ldm: str) -> str | None:
    for ldm_prefix, dif_prefix in sorted(UNET_BLOCKS, key=lambda p: -len(p[0])):
        if ldm == ldm_prefix:
            return dif_prefix
        if ldm.startswith(ldm_prefix + "."):
            rest = ldm[len(ldm_prefix) + 1:]
            if "resnets" in dif_prefix:
                rest = RESNET_PARTS.get(rest)
                if rest is None:           # emb_layers: OSEDiff does not adapt time_emb_proj
                    return None
            return f"{dif_prefix}.{rest}"
    return None


def vae_diffusers_name(ldm: str) -> str:
    """encoder.down.1.block.0.nin_shortcut -> encoder.down_blocks.1.resnets.0.conv_shortcut etc."""
    parts = ldm.split(".")
    if parts[:2] == ["encoder", "down"]:
        i = parts[2]
        if parts[3] == "block":
            head, tail = f"encoder.down_blocks.{i}.resnets.{parts[4]}", parts[5:]
        else:                                           # downsample.conv
            head, tail = f"encoder.down_blocks.{i}.downsamplers.0", parts[4:]
    elif parts[:2] == ["encoder", "mid"]:
        head = {"block_1": "encoder.mid_block.resnets.0", "block_2": "encoder.mid_block.resnets.1",
                "attn_1": "encoder.mid_block.attentions.0"}[parts[2]]
        tail = parts[3:]
    else:                                               # encoder.conv_in/conv_out, quant_conv
        return ldm
    return ".".join([head] + [VAE_PARTS.get(t, t) for t in tail])


def ckpt_parts(ckpt: str) -> tuple[dict, dict]:
    sd = load_file(ckpt)
    unet = {k[len("model.diffusion_model."):]: v for k, v in sd.items()
            if k.startswith("model.diffusion_model.")}
    vae = {k[len("first_stage_model."):]: v for k, v in sd.items() if k.startswith("first_stage_model.")}
    return unet, vae


def make_osediff_dict(ckpt: str, seed: int = 0, std: float = 0.05) -> tuple[dict, dict]:
    """(OSEDiff-format dict, {"unet"/"vae": {ldm weight key: (A, B)}, "conv_in": (w, b)}) with
    PEFT names; A/B shapes as PEFT makes them (Linear for diffusers' VAE attention)."""
    gen = torch.Generator().manual_seed(seed)
    unet_sd, vae_sd = ckpt_parts(ckpt)
    raw = {"rank_unet": RANK, "rank_vae": RANK, "unet_lora_encoder_modules": [],
           "unet_lora_decoder_modules": [], "unet_lora_others_modules": [],
           "vae_lora_encoder_modules": [], "state_dict_unet": {}, "state_dict_vae": {}}
    truth: dict = {"unet": {}, "vae": {}}

    def pair(w: torch.Tensor, linear: bool) -> tuple[torch.Tensor, torch.Tensor]:
        out, inp = w.shape[0], w.shape[1]
        a_shape = (RANK, inp) if linear else (RANK, inp, *w.shape[2:])
        b_shape = (out, RANK) if linear else (out, RANK, 1, 1)
        return torch.randn(a_shape, generator=gen) * std, torch.randn(b_shape, generator=gen) * std

    for key, w in unet_sd.items():
        if not key.endswith(".weight") or w.ndim < 2 or key.startswith("time_embed"):
            continue
        dname = unet_diffusers_name(key[: -len(".weight")])
        if dname is None:
            continue
        adapter = ("encoder" if "down_blocks" in dname or "conv_in" in dname else
                   "decoder" if "up_blocks" in dname else "others")
        a, b = pair(w, linear=w.ndim == 2)
        raw[f"unet_lora_{adapter}_modules"].append(dname)
        raw["state_dict_unet"][f"{dname}.lora_A.default_{adapter}.weight"] = a
        raw["state_dict_unet"][f"{dname}.lora_B.default_{adapter}.weight"] = b
        truth["unet"][key] = (a, b)
    w_in, b_in = unet_sd["input_blocks.0.0.weight"], unet_sd["input_blocks.0.0.bias"]
    conv_in = (torch.randn(w_in.shape, generator=gen) * w_in.std(), torch.randn(b_in.shape, generator=gen) * 0.1)
    raw["state_dict_unet"]["conv_in.base_layer.weight"] = conv_in[0]
    raw["state_dict_unet"]["conv_in.base_layer.bias"] = conv_in[1]
    truth["conv_in"] = conv_in

    for key, w in vae_sd.items():
        if not key.endswith(".weight") or w.ndim != 4:
            continue
        if not (key.startswith("encoder.") or key.startswith("quant_conv.")):
            continue
        dname = vae_diffusers_name(key[: -len(".weight")])
        linear = ".attentions." in dname                      # diffusers' VAE attention is Linear
        a, b = pair(w, linear)
        raw["vae_lora_encoder_modules"].append(dname)
        raw["state_dict_vae"][f"{dname}.lora_A.default_encoder.weight"] = a
        raw["state_dict_vae"][f"{dname}.lora_B.default_encoder.weight"] = b
        truth["vae"][key] = (a, b)
    return raw, truth


def merge(sd: dict, loras: dict) -> dict:
    out = dict(sd)
    for key, (a, b) in loras.items():
        w = out[key]
        delta = (b.reshape(b.shape[0], RANK) @ a.reshape(RANK, -1)).reshape(w.shape)
        out[key] = w + ALPHA / RANK * delta
    return out


def reference_modules(ckpt: str, truth: dict):
    """Raw ComfyUI modules with OSEDiff's weights merged in by hand: (UNet, VAE, VAE without
    the encoder LoRA)."""
    import comfy.ops
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    unet_sd, vae_sd = ckpt_parts(ckpt)
    unet_sd = dict(unet_sd, **{"input_blocks.0.0.weight": truth["conv_in"][0],
                               "input_blocks.0.0.bias": truth["conv_in"][1]})
    unet = UNetModel(**synthetic.TINY_SD2_UNET_CONFIG, operations=comfy.ops.disable_weight_init)
    unet.load_state_dict(merge(unet_sd, truth["unet"]))
    vaes = []
    for sd in (merge(vae_sd, truth["vae"]), vae_sd):
        vaes.append(AutoencoderKL(ddconfig=synthetic.KL_VAE_DDCONFIG, embed_dim=4))
        vaes[-1].load_state_dict(sd)
    return unet.eval(), vaes[0].eval(), vaes[1].eval()


# ---- OSEDiff's test script (test_osediff.py + osediff.py + wavelet_color_fix.py), written
# independently: PIL images, Pillow's own resize, torchvision's ToTensor / ToPILImage.

def pil_resize(image, size: tuple[int, int], resample):
    """Image.resize((w, h)) as Pillow 9.5 (OSEDiff's pinned version) does it: the horizontal pass,
    then the vertical one. Newer Pillow may run the vertical pass first when the height shrinks,
    so the two passes are made as separate calls (each one axis, identical in every version)."""
    w, h = size
    if w != image.width:
        image = image.resize((w, image.height), resample)
    if h != image.height:
        image = image.resize((w, h), resample)
    return image


def osediff_input(lr_uint8, scale: float = 4.0):
    """LR [h, w, 3] uint8 -> OSEDiff's `input_image` (PIL): bicubic x scale, then a Lanczos
    resize of each side down to a multiple of 8."""
    image = Image.fromarray(lr_uint8)
    image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BICUBIC)
    return pil_resize(image, (image.width - image.width % 8, image.height - image.height % 8),
                      Image.LANCZOS)


def _mean_std(x: torch.Tensor, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    b, c = x.shape[:2]
    flat = x.reshape(b, c, -1)
    return flat.mean(dim=2).reshape(b, c, 1, 1), (flat.var(dim=2) + eps).sqrt().reshape(b, c, 1, 1)


def _blur(x: torch.Tensor, radius: int) -> torch.Tensor:
    k = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]], dtype=x.dtype) / 16.0
    x = torch.nn.functional.pad(x, (radius,) * 4, mode="replicate")
    return torch.nn.functional.conv2d(x, k[None, None].repeat(3, 1, 1, 1), groups=3, dilation=radius)


def _wavelet_split(x: torch.Tensor, levels: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    high = torch.zeros_like(x)
    for i in range(levels):
        low = _blur(x, 2 ** i)
        high += x - low
        x = low
    return high, low


def osediff_colour_fix(target, source, method: str):
    """OSEDiff's adain_color_fix / wavelet_color_fix on PIL images."""
    t, s = ToTensor()(target)[None], ToTensor()(source)[None]
    if method == "adain":
        (mt, st), (ms, ss) = _mean_std(t), _mean_std(s)
        out = (t - mt) / st * ss + ms
    else:
        out = _wavelet_split(t)[0] + _wavelet_split(s)[1]
    return ToPILImage()(out[0].clamp_(0.0, 1.0))


@torch.no_grad()
def osediff_references(unet, vae, lr_uint8, embedding: torch.Tensor,
                       methods: tuple[str, ...] = ("none", "adain", "wavelet")) -> dict[str, np.ndarray]:
    """OSEDiff's test script on one LR image [h, w, 3] uint8, with the posterior's mode instead
    of a sample, once per colour-fix method in `methods` ("none", "adain", "wavelet"): returns
    {method: output image as uint8 [H, W, 3] (numpy)}. The network runs once (the script's
    steps up to the 8-bit output do not depend on the colour fix)."""
    input_image = osediff_input(lr_uint8)
    lq = ToTensor()(input_image)[None] * 2 - 1
    z = vae.quant_conv(vae.encoder(lq))[:, :4] * LATENT_SCALE        # latent_dist.mode()
    eps = unet(z, torch.full((1,), 999.0), context=embedding)
    a = abar(999)
    x0 = (z - (1 - a) ** 0.5 * eps) / a ** 0.5                      # DDPMScheduler.step at t = 999
    out = vae.decoder(vae.post_quant_conv(x0 / LATENT_SCALE)).clamp(-1, 1)
    out_pil = ToPILImage()(out[0] * 0.5 + 0.5)
    return {m: np.array(out_pil if m == "none" else osediff_colour_fix(out_pil, input_image, m)) for m in methods}
