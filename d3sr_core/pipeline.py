"""The one-step D3SR pipeline on ComfyUI's models.

  x_L = bicubic(LR, output size), in [0, 1] (ComfyUI's VAE maps it to [-1, 1]), padded at the
        bottom/right to a multiple of 8 for the VAE (cropped off again after decoding)
  z_L = 0.18215 * E(x_L)                      (posterior mode)
  z_H = (z_L - sqrt(1 - abar) * eps(z_L, T_L, c)) / sqrt(abar)
  x_H = D(z_H / 0.18215)
`predict_x0` is the single UNet step that the plain, tiled and training paths all call; the
trainer's VAE steps are `autoencoder_encode / autoencoder_decode` (the same maths on the bare
autoencoder, without ComfyUI's memory management, the decode not clamped).
The UNet runs on latents of any size: ComfyUI's UNet upsamples each level to the shape of its
skip connection, so only the VAE's factor 8 is padded (padding to the UNet's 64 px would feed
made-up content into its global attention and change the picture).
With `D3SRModel.osediff_steps` the input and output follow OSEDiff's test script instead
(`prepare_input`, colour_fix's `eight_bit`); see docs/osediff.md.
The batch entry point with its out-of-memory fallback to tiles is `d3sr_core.upscale.upscale`
(it sits above this module and `tiling`, which builds on this one).
Images are ComfyUI IMAGE tensors [B, H, W, C] in [0, 1] unless a docstring says BCHW.
"""

from __future__ import annotations

from collections.abc import Callable

import comfy.model_management as mm
import torch
import torch.nn.functional as F

from . import comfy_internals
from .checks import MAX_FACTOR as MAX_FACTOR  # re-exported: the nodes' and tiling's limit
from .colour_fix import apply_colour_fix
from .model import D3SRModel
from .resample import pillow_resize
from .schedule import sigma_for_timestep

VAE_MULTIPLE = 8      # the KL VAE's downsampling: pixel sizes are padded to multiples of this


class D3SROutOfMemoryError(RuntimeError):
    """Raised when one upscale does not fit in device memory."""


class NonFiniteOutputError(RuntimeError):
    """The upscale produced NaN or infinite values; the message names the likely causes."""


_OOM_MESSAGES = ("out of memory", "can't allocate memory", "failed to allocate memory")


def is_out_of_memory(error: BaseException) -> bool:
    """True for ComfyUI's OOM exception (CUDA) and for the plain RuntimeErrors that CPU and MPS
    allocators raise when memory runs out ("DefaultCPUAllocator: can't allocate memory", "MPS
    backend out of memory")."""
    if isinstance(error, D3SROutOfMemoryError):  # our own final verdict: not retried
        return False
    if isinstance(error, mm.OOM_EXCEPTION):
        return True
    return isinstance(error, RuntimeError) and any(m in str(error).lower() for m in _OOM_MESSAGES)


def output_size(height: int, width: int, factor: float) -> tuple[int, int]:
    """The exact output size round(factor * size), at least 1 pixel."""
    return max(1, round(height * factor)), max(1, round(width * factor))


def pixel_multiple(base_model: torch.nn.Module) -> int:
    """8 for the VAE times the UNet's downsampling (64 px on SD2.1). Images are NOT padded to
    it (only to VAE_MULTIPLE); the tiled path starts its UNet tiles on multiples of it, so each
    tile's downsampling grid lines up with the whole image's."""
    mult = comfy_internals.unet_config(base_model).get("channel_mult", (1, 2, 4, 4))
    return 8 * 2 ** (len(mult) - 1)


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Pad BCHW `x` at the bottom/right to multiples of `multiple` (reflect; replicate when the
    image is too small to reflect)."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph == 0 and pw == 0:
        return x
    mode = "reflect" if ph < h and pw < w else "replicate"
    return F.pad(x, (0, pw, 0, ph), mode=mode)


def check_image(image: torch.Tensor) -> None:
    """Raise ValueError unless `image` is a ComfyUI IMAGE: [B, H, W, 3] float."""
    if image.ndim != 4 or image.shape[-1] != 3:
        shape = list(image.shape)
        hint = (" It has an alpha channel: drop it with a 'Split Image with Alpha' node first."
                if image.ndim == 4 and image.shape[-1] == 4 else
                " Convert it to RGB (e.g. grey images: 'Image to RGB' style nodes) first.")
        raise ValueError(f"D3SR expects an RGB IMAGE batch [B, H, W, 3], got shape {shape}.{hint}")
    if image.shape[0] == 0 or image.shape[1] == 0 or image.shape[2] == 0:
        raise ValueError(f"D3SR got an empty image batch of shape {list(image.shape)}.")
    bad = ~torch.isfinite(image)
    if bad.any():
        which = [i + 1 for i in bad.flatten(1).any(1).nonzero().flatten().tolist()]
        raise ValueError(f"D3SR got {int(bad.sum())} NaN or infinite pixel value(s) in image(s) "
                         f"{', '.join(map(str, which[:5]))} of {image.shape[0]}. Fix the node or file "
                         "that made the image (its output is not a valid picture).")


def check_output(d3sr: D3SRModel, pixels: torch.Tensor) -> None:
    """Raise NonFiniteOutputError when upscaled `pixels` (any layout) hold NaN or Inf values,
    instead of letting them leave the pipeline (saved, they would be a black image)."""
    bad = ~torch.isfinite(pixels)
    if not bad.any():
        return
    unet_dtype = getattr(d3sr.model.model, "get_dtype", lambda: None)()
    vae_dtype = getattr(d3sr.vae, "vae_dtype", None)
    dtypes = ", ".join(f"{name} in {str(dt).replace('torch.', '')}" for name, dt in
                       (("UNet", unet_dtype), ("VAE", vae_dtype)) if dt is not None)
    raise NonFiniteOutputError(
        f"D3SR produced {int(bad.sum())} NaN or infinite value(s) with weights '{d3sr.name or '?'}'"
        f"{f' ({dtypes})' if dtypes else ''}; nothing was returned. Likely causes: a weight file whose "
        "LoRA alphas or values are huge (re-export or retrain it), a LoRA strength far from 1, or "
        "float16 overflow on this device (start ComfyUI with --fp32-unet --fp32-vae, or --force-fp32).")


def bicubic_upsample(lr: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """BCHW [0, 1] -> BCHW [0, 1] at `size` (bicubic, align_corners=False, clamped)."""
    return F.interpolate(lr, size=size, mode="bicubic", align_corners=False).clamp(0.0, 1.0)


def osediff_size(height: int, width: int) -> tuple[int, int]:
    """OSEDiff's script brings the upsampled image down to a multiple of 8 (each side that is
    at least 8 px; a smaller side is kept and padded like the D3SR path)."""
    return tuple(s - s % VAE_MULTIPLE if s >= VAE_MULTIPLE else s for s in (height, width))


def result_size(d3sr: D3SRModel, height: int, width: int, factor: float) -> tuple[int, int]:
    """The size `upscale` returns for an h x w input: output_size, or for OSEDiff's steps that
    size brought down to a multiple of 8."""
    size = output_size(height, width, factor)
    return osediff_size(*size) if d3sr.osediff_steps else size


def prepare_input(d3sr: D3SRModel, lr: torch.Tensor, factor: float) -> torch.Tensor:
    """BCHW [0, 1] LR -> the upsampled image x_L at result_size (also the colour fix's reference).

    torch-bicubic: `bicubic_upsample` in float. pillow-bicubic: Pillow's bicubic on the image
    rounded to 8 bits (d3sr_core.resample), 8-bit result. OSEDiff's steps then resize it with
    Pillow's Lanczos to a multiple of 8, as its test script does (a resize, not a crop: the
    sides shrink by up to 7 px)."""
    size = output_size(lr.shape[-2], lr.shape[-1], factor)
    if d3sr.upsampler == "pillow-bicubic" or d3sr.osediff_steps:
        x = pillow_resize(lr, size, "bicubic")
    else:
        x = bicubic_upsample(lr.float(), size)
    if d3sr.osediff_steps and osediff_size(*size) != size:
        x = pillow_resize(x, osediff_size(*size), "lanczos")
    return x


# From this many image pixels up, the VAE runs faster on the CPU with channels-last tensors
# (benchmarks/results/channels_last_cpu.md, full SD2.1 VAE on 2 Xeon cores: decode 1.1-1.3x and
# encode 1.1-1.35x at 256-512 px, even at 128 px, slower below: oneDNN reorders each
# convolution's weights to the input's layout on every call, a fixed cost small images do not
# amortise). The UNet gains nothing measurable at any size and keeps the plain layout.
CHANNELS_LAST_MIN_PIXELS = 128 * 128


def _vae_channels_last(x: torch.Tensor, image_pixels: int) -> bool:
    """Whether the VAE should get `x` in channels-last order: on the CPU, for large images."""
    return x.device.type == "cpu" and image_pixels >= CHANNELS_LAST_MIN_PIXELS


def predict_x0(base_model: torch.nn.Module, z: torch.Tensor, timestep: int,
               context: torch.Tensor, transformer_options: dict | None = None) -> torch.Tensor:
    """One UNet evaluation on the clean scaled latent `z` [B, 4, h, w] at `timestep`:
    returns (z - sqrt(1 - abar) * eps) / sqrt(abar) as float32 on z's device.

    Goes through ComfyUI's `apply_model` (dtype casts, patches), which scales its input by
    1 / sqrt(sigma^2 + 1) and returns x - sigma * eps; feeding x = z * sqrt(sigma^2 + 1)
    makes that exactly the formula above. Autograd flows (the trainer uses this too).
    """
    sigma_value = sigma_for_timestep(timestep)
    sigma = torch.full((z.shape[0],), sigma_value, device=z.device, dtype=torch.float32)
    x = z.float() * (sigma_value ** 2 + 1.0) ** 0.5
    ctx = context.to(z.device)
    if ctx.shape[0] != z.shape[0]:
        ctx = ctx.expand(z.shape[0], *ctx.shape[1:])
    return base_model.apply_model(x, sigma, c_crossattn=ctx,
                                  transformer_options=transformer_options or {}).float()


def vae_encode(vae: object, pixels: torch.Tensor) -> torch.Tensor:
    """ComfyUI's `VAE.encode` of BCHW [0, 1] -> its (unscaled) latent [B, 4, H/8, W/8]. Large
    images on the CPU go as a contiguous BHWC tensor, as ComfyUI's own VAE Encode node gives
    them: ComfyUI's move back to BCHW is then channels-last (see CHANNELS_LAST_MIN_PIXELS)."""
    bhwc = pixels.movedim(1, -1)
    if _vae_channels_last(pixels, pixels.shape[-2] * pixels.shape[-1]):
        bhwc = bhwc.contiguous()
    return vae.encode(bhwc)


def vae_decode(vae: object, z: torch.Tensor) -> torch.Tensor:
    """ComfyUI's `VAE.decode` of an unscaled latent [B, 4, h, w] -> BCHW [0, 1] at 8x the size;
    channels-last for large images on the CPU (see CHANNELS_LAST_MIN_PIXELS)."""
    if _vae_channels_last(z, 64 * z.shape[-2] * z.shape[-1]):
        z = z.contiguous(memory_format=torch.channels_last)
    return vae.decode(z).movedim(-1, 1)


def encode_latent(d3sr: D3SRModel, pixels: torch.Tensor) -> torch.Tensor:
    """BCHW [0, 1] with sizes a multiple of 8 -> scaled latent [B, 4, H/8, W/8] (posterior mode)."""
    return d3sr.model.model.process_latent_in(vae_encode(d3sr.vae, pixels))


def decode_latent(d3sr: D3SRModel, z: torch.Tensor) -> torch.Tensor:
    """Scaled latent [B, 4, h, w] -> BCHW [0, 1] at 8x the size."""
    return vae_decode(d3sr.vae, d3sr.model.model.process_latent_out(z))


def autoencoder_encode(autoencoder: torch.nn.Module, base_model: torch.nn.Module,
                       pixels: torch.Tensor) -> torch.Tensor:
    """encode_latent on the bare autoencoder (comfy_internals.vae_autoencoder) where the caller
    has placed it, in its dtype, with no memory management: BCHW [0, 1], sizes a multiple of 8
    -> scaled latent [B, 4, H/8, W/8] (posterior mode), float32 or float64. The trainer's encode."""
    dtype = next(autoencoder.parameters()).dtype
    z = autoencoder.encode((2.0 * pixels - 1.0).to(dtype))
    return base_model.process_latent_in(z if z.dtype == torch.float64 else z.float())


def autoencoder_decode(autoencoder: torch.nn.Module, base_model: torch.nn.Module,
                       z: torch.Tensor) -> torch.Tensor:
    """decode_latent on the bare autoencoder, NOT clamped so that gradients flow (the trainer's
    decode): scaled latent [B, 4, h, w] -> BCHW (D(z / 0.18215) + 1) / 2, float32 or float64."""
    dtype = next(autoencoder.parameters()).dtype
    x = autoencoder.decode(base_model.process_latent_out(z).to(dtype))
    return ((x if x.dtype == torch.float64 else x.float()) + 1.0) / 2.0


def denoise_latent(d3sr: D3SRModel, z: torch.Tensor) -> torch.Tensor:
    """Load the patched UNet on its device (ComfyUI's memory management) and run predict_x0."""
    patcher = d3sr.model
    memory = patcher.model.memory_required(list(z.shape))
    mm.load_models_gpu([patcher], memory_required=memory)
    device = patcher.load_device
    opts = patcher.model_options.get("transformer_options", {})
    with torch.no_grad():
        out = predict_x0(patcher.model, z.to(device), d3sr.timestep, d3sr.text_embedding, opts)
    return out.to(mm.intermediate_device())


def upscale_one(d3sr: D3SRModel, lr: torch.Tensor, factor: float, colour_fix: str,
                denoise: Callable[[D3SRModel, torch.Tensor], torch.Tensor] = denoise_latent
                ) -> torch.Tensor:
    """One BCHW [0, 1] image batch -> BCHW [0, 1] of exactly result_size(d3sr, h, w, factor)."""
    upsampled = prepare_input(d3sr, lr, factor)
    out_h, out_w = upsampled.shape[-2:]
    padded = pad_to_multiple(upsampled, VAE_MULTIPLE)
    z_h = denoise(d3sr, encode_latent(d3sr, padded))
    mm.throw_exception_if_processing_interrupted()
    sr = decode_latent(d3sr, z_h)[..., :out_h, :out_w].float().cpu()
    check_output(d3sr, sr)   # before the colour fix and the clamp, which would hide an Inf
    return apply_colour_fix(sr, upsampled.cpu(), colour_fix, eight_bit=d3sr.osediff_steps).clamp(0.0, 1.0)
