"""The D3SR weight file: one `.safetensors` format for the loader and the trainer.

Layout (format_version 1):
  metadata (all strings): format="d3sr", format_version="1", timestep (T_L, 1..999),
      base_model="sd2.1-base", prediction="epsilon", scale (e.g. "4"), lora_rank,
      lora_alpha, optional training (a JSON summary of how the file was made),
      optional upsampler: how the LR image is brought to the output size before the VAE
      encoder. "torch-bicubic" (the default when absent; what every file written before this
      key existed gets, and what the D3SR trainer uses): torch's bicubic, a = -0.75, in float.
      "pillow-bicubic": Pillow's BICUBIC (a = -0.5) on the image quantised to 8 bits, result
      rounded to 8 bits (d3sr_core.resample), as OSEDiff's test script does. D3SR's paper does
      not say which bicubic it used, so the choice is stored rather than assumed.
  tensors:
      d3sr.text_embedding                     [1, 77, 1024], the fixed conditioning
      diffusion_model.<ldm path>.lora_A.weight [r, in] or [r, in, kh, kw]
      diffusion_model.<ldm path>.lora_B.weight [out, r] or [out, r, 1, 1]
      diffusion_model.<ldm path>.alpha         0-dim, positive
  Every tensor is floating point (any float dtype) and finite.
The LoRA names are ones ComfyUI's own LoRA key map accepts for an SD2.x UNet, so the same
file also works in the stock `LoraLoaderModelOnly` node (which ignores the embedding).

Optional extensions (still format_version 1; added for OSEDiff, see docs/osediff.md). A file
that uses one lists it in metadata `extensions` (comma-separated); a reader rejects names it
does not know, and without the flag the extra tensors are rejected as unexpected, so an
older reader fails clearly instead of silently dropping part of the model:
  vae_lora: LoRA on SD's KL VAE (OSEDiff adapts the VAE encoder), applied to a clone of the
      VAE's patcher. Metadata vae_lora_rank, vae_lora_alpha. Tensors, named by the parameter
      paths of ComfyUI's `first_stage_model` (ldm names):
      vae.<ldm path>.lora_A.weight [r, in] or [r, in, kh, kw]   e.g. vae.encoder.down.0.block.0.conv1
      vae.<ldm path>.lora_B.weight [out, r] or [out, r, 1, 1]   vae.encoder.mid.attn_1.q, vae.quant_conv
      vae.<ldm path>.alpha         0-dim
  full_weights: UNet parameters replaced outright (OSEDiff trains conv_in fully):
      full.diffusion_model.<ldm parameter path>  e.g. full.diffusion_model.input_blocks.0.0.weight
      Applied as a difference to the connected model's weight, scaled by the LoRA strength.
  Metadata text_embedding (absent = "fixed"): "fixed" (trained with the LoRA), "prompt" (a CLIP
      encoding of metadata `prompt`), or "none" (zeros placeholder: the loader must compute a
      prompt embedding with CLIP; files converted from OSEDiff without a text encoder).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .atomic_file import atomic_path

FORMAT = "d3sr"
FORMAT_VERSION = "1"
BASE_MODEL = "sd2.1-base"
PREDICTION = "epsilon"
EMBEDDING_KEY = "d3sr.text_embedding"
EMBEDDING_SHAPE = (1, 77, 1024)
LORA_PREFIX = "diffusion_model."
VAE_LORA_PREFIX = "vae."
FULL_WEIGHT_PREFIX = "full."
EXT_VAE_LORA = "vae_lora"
EXT_FULL_WEIGHTS = "full_weights"
KNOWN_EXTENSIONS = (EXT_FULL_WEIGHTS, EXT_VAE_LORA)
EMBEDDING_KINDS = ("fixed", "prompt", "none")
UPSAMPLERS = ("torch-bicubic", "pillow-bicubic")    # metadata `upsampler`; the first is the default
PICKLE_EXTENSIONS = (".pkl", ".pt", ".pth", ".ckpt")   # never D3SR files; OSEDiff's release is one
_LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".alpha")


class WeightFileError(ValueError):
    """A D3SR weight file that cannot be used; the message names the cause and the fix."""


@dataclass
class D3SRWeights:
    """The contents of a D3SR weight file.

    lora: {"diffusion_model.<path>": (A [r, in, ...], B [out, r, ...], alpha)}
    text_embedding: [1, 77, 1024] float
    timestep: T_L in 1..999
    vae_lora: {"vae.<first_stage_model path>": (A, B, alpha)} (extension vae_lora)
    full_weights: {"diffusion_model.<parameter>": full tensor} (extension full_weights)
    text_embedding_kind: "fixed", "prompt" (CLIP encoding of `prompt`) or "none" (placeholder)
    upsampler: one of UPSAMPLERS (metadata `upsampler`, see the module docstring)
    """

    lora: dict[str, tuple[torch.Tensor, torch.Tensor, float]]
    text_embedding: torch.Tensor
    timestep: int
    scale: float = 4.0
    lora_rank: int = 16
    lora_alpha: float = 16.0
    base_model: str = BASE_MODEL
    prediction: str = PREDICTION
    training: dict[str, Any] | None = None
    extra_metadata: dict[str, str] = field(default_factory=dict)
    # Extensions (see the module docstring); empty / "fixed" for plain D3SR files.
    vae_lora: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = field(default_factory=dict)
    vae_lora_rank: int = 0
    vae_lora_alpha: float = 0.0
    full_weights: dict[str, torch.Tensor] = field(default_factory=dict)
    text_embedding_kind: str = "fixed"
    prompt: str = ""
    upsampler: str = UPSAMPLERS[0]

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        """The LoRA as flat tensors named `<path>.lora_A.weight` / `.lora_B.weight` / `.alpha`."""
        out: dict[str, torch.Tensor] = {}
        for name, (a, b, alpha) in self.lora.items():
            out[name + ".lora_A.weight"] = a
            out[name + ".lora_B.weight"] = b
            out[name + ".alpha"] = torch.tensor(float(alpha))
        return out

    def vae_lora_state_dict(self) -> dict[str, torch.Tensor]:
        """The VAE LoRA as flat tensors named `vae.<path>.lora_A.weight` / `.lora_B.weight` / `.alpha`."""
        return D3SRWeights(lora=self.vae_lora, text_embedding=self.text_embedding,
                           timestep=self.timestep).lora_state_dict()


def _fail(path: str, problem: str, fix: str) -> WeightFileError:
    return WeightFileError(f"D3SR weight file '{os.path.basename(path)}': {problem}. {fix}")


def _int_field(path: str, meta: dict[str, str], key: str, lo: int, hi: int) -> int:
    try:
        value = int(meta[key])
    except (KeyError, ValueError):
        raise _fail(path, f"metadata '{key}' is missing or not an integer ({meta.get(key)!r})",
                    "Re-export the file with the D3SR trainer or converter.") from None
    if not lo <= value <= hi:
        raise _fail(path, f"metadata '{key}'={value} is outside {lo}..{hi}",
                    "Re-export the file with a valid value.")
    return value


def _float_field(path: str, meta: dict[str, str], key: str) -> float:
    try:
        value = float(meta[key])
    except (KeyError, ValueError):
        raise _fail(path, f"metadata '{key}' is missing or not a number ({meta.get(key)!r})",
                    "Re-export the file with the D3SR trainer or converter.") from None
    if not math.isfinite(value) or value <= 0:
        raise _fail(path, f"metadata '{key}'={value} must be a positive number", "Re-export the file.")
    return value


def read_weights(path: str) -> D3SRWeights:
    """Read and validate a D3SR weight file; raise WeightFileError naming the problem."""
    meta, tensors = _open_weight_file(path)
    _check_identity(path, meta)
    timestep = _int_field(path, meta, "timestep", 1, 999)
    rank = _int_field(path, meta, "lora_rank", 1, 4096)
    alpha_meta = _float_field(path, meta, "lora_alpha")
    scale = _float_field(path, meta, "scale")
    training = None
    if "training" in meta:
        try:
            training = json.loads(meta["training"])
        except json.JSONDecodeError:
            raise _fail(path, "metadata 'training' is not valid JSON", "Re-export the file.") from None
    _check_tensor_values(path, tensors)
    emb = _pop_text_embedding(path, tensors)
    extensions, kind, upsampler = _options(path, meta)
    full = _pop_full_weights(path, tensors) if EXT_FULL_WEIGHTS in extensions else {}
    vae_lora, vae_rank, vae_alpha = {}, 0, 0.0
    if EXT_VAE_LORA in extensions:
        vae_rank = _int_field(path, meta, "vae_lora_rank", 1, 4096)
        vae_alpha = _float_field(path, meta, "vae_lora_alpha")
        vae_tensors = {k: tensors.pop(k) for k in list(tensors) if k.startswith(VAE_LORA_PREFIX)}
        vae_lora = _collect_lora(path, vae_tensors, vae_rank, VAE_LORA_PREFIX)

    lora = _collect_lora(path, tensors, rank)
    return D3SRWeights(lora=lora, text_embedding=emb.float(), timestep=timestep, scale=scale,
                       lora_rank=rank, lora_alpha=alpha_meta, base_model=meta["base_model"],
                       prediction=meta["prediction"], training=training,
                       extra_metadata={k: v for k, v in meta.items() if k not in _KNOWN_META},
                       vae_lora=vae_lora, vae_lora_rank=vae_rank, vae_lora_alpha=vae_alpha,
                       full_weights=full, text_embedding_kind=kind, prompt=meta.get("prompt", ""),
                       upsampler=upsampler)


def _open_weight_file(path: str) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(metadata, tensors) of a .safetensors file; a missing, pickle or unreadable file fails."""
    if not os.path.isfile(path):
        raise _fail(path, "file not found", "Put the file in ComfyUI/models/d3sr/ and refresh.")
    if path.lower().endswith(PICKLE_EXTENSIONS):
        raise _fail(path, "is a pickle file, not a D3SR .safetensors file",
                    "OSEDiff's osediff.pkl loads in the 'Load OSEDiff Model' node, or convert it "
                    "with: python -m d3sr_core.osediff convert osediff.pkl osediff.safetensors")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            return dict(f.metadata() or {}), {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for bad headers/sizes
        raise _fail(path, f"cannot be read as safetensors ({type(e).__name__}: {e}); the file is "
                    "truncated, corrupt or not a safetensors file",
                    "Download or export it again; an interrupted download is the usual cause.") from None


def _check_identity(path: str, meta: dict[str, str]) -> None:
    """The metadata says: a D3SR file, of a version this pack reads, for SD2.1-base epsilon."""
    if meta.get("format") != FORMAT:
        raise _fail(path, f"not a D3SR file (metadata 'format' is {meta.get('format')!r}, expected 'd3sr')",
                    "Pick a D3SR weight file; plain LoRAs go in the stock LoRA loader, and OSEDiff "
                    "weights must be converted first.")
    if meta.get("format_version") != FORMAT_VERSION:
        raise _fail(path, f"format_version {meta.get('format_version')!r} is not supported "
                    f"(this pack reads version {FORMAT_VERSION})", "Update the D3SR node pack.")
    if meta.get("base_model") != BASE_MODEL:
        raise _fail(path, f"made for base model {meta.get('base_model')!r}, this pack runs {BASE_MODEL!r}",
                    "Use a file trained on Stable Diffusion 2.1-base.")
    if meta.get("prediction") != PREDICTION:
        raise _fail(path, f"prediction {meta.get('prediction')!r} is not supported (expected 'epsilon')",
                    "Use a file trained on the epsilon-prediction SD2.1-base model.")


def _check_tensor_values(path: str, tensors: dict[str, torch.Tensor]) -> None:
    """Every tensor is floating point and finite."""
    not_float = [k for k, t in tensors.items() if not t.is_floating_point()]
    if not_float:
        raise _fail(path, f"{len(not_float)} tensor(s) are not floating point (first: {not_float[0]}, "
                    f"{str(tensors[not_float[0]].dtype).replace('torch.', '')})",
                    "D3SR files hold float tensors only; re-export the file with the D3SR trainer or converter.")
    bad = [k for k, t in tensors.items() if not torch.isfinite(t).all()]
    if bad:
        raise _fail(path, f"{len(bad)} tensor(s) hold NaN or Inf values (first: {bad[0]})",
                    "The training run diverged or the file is damaged; use an earlier checkpoint.")


def _pop_text_embedding(path: str, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """The (1, 77, 1024) text embedding, taken out of `tensors`."""
    emb = tensors.pop(EMBEDDING_KEY, None)
    if emb is None:
        raise _fail(path, f"tensor '{EMBEDDING_KEY}' is missing", "Re-export the file with the D3SR trainer.")
    if tuple(emb.shape) != EMBEDDING_SHAPE:
        raise _fail(path, f"text embedding has shape {list(emb.shape)}, expected {list(EMBEDDING_SHAPE)} "
                    "(SD2.1's 77 tokens x 1024 channels)",
                    "The file was made for another base model; use one made for SD2.1-base.")
    return emb


def _options(path: str, meta: dict[str, str]) -> tuple[list[str], str, str]:
    """(format extensions, text-embedding kind, upsampler), each one this pack knows."""
    extensions = [e for e in meta.get("extensions", "").split(",") if e]
    unknown = [e for e in extensions if e not in KNOWN_EXTENSIONS]
    if unknown:
        raise _fail(path, f"uses format extension(s) {', '.join(unknown)} this pack does not know",
                    "Update the D3SR node pack.")
    kind = meta.get("text_embedding", "fixed")
    if kind not in EMBEDDING_KINDS:
        raise _fail(path, f"metadata 'text_embedding' is {kind!r}, expected one of "
                    f"{', '.join(EMBEDDING_KINDS)}", "Re-export the file.")
    upsampler = meta.get("upsampler", UPSAMPLERS[0])
    if upsampler not in UPSAMPLERS:
        raise _fail(path, f"metadata 'upsampler' is {upsampler!r}, expected one of {', '.join(UPSAMPLERS)}",
                    "Re-export the file, or update the D3SR node pack if it is newer.")
    return extensions, kind, upsampler


def _pop_full_weights(path: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The 'full_weights' extension's tensors, taken out of `tensors`, keyed by UNet parameter."""
    full = {k[len(FULL_WEIGHT_PREFIX):]: tensors.pop(k) for k in list(tensors)
            if k.startswith(FULL_WEIGHT_PREFIX)}
    bad_full = [k for k in full if not k.startswith(LORA_PREFIX)]
    if not full or bad_full:
        raise _fail(path, "extension 'full_weights' needs tensors named "
                    f"'{FULL_WEIGHT_PREFIX}{LORA_PREFIX}<parameter>' "
                    f"({'none found' if not full else 'got ' + FULL_WEIGHT_PREFIX + bad_full[0]})",
                    "Re-export the file.")
    return full


_KNOWN_META = {"format", "format_version", "timestep", "base_model", "prediction", "scale",
               "lora_rank", "lora_alpha", "training", "extensions", "vae_lora_rank",
               "vae_lora_alpha", "text_embedding", "prompt", "upsampler"}


def _collect_lora(path: str, tensors: dict[str, torch.Tensor], rank: int, prefix: str = LORA_PREFIX
                  ) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        suffix = next((s for s in _LORA_SUFFIXES if key.endswith(s)), None)
        if suffix is None or not key.startswith(prefix):
            raise _fail(path, f"unexpected tensor '{key}'",
                        f"Only LoRA tensors named {prefix}<layer>.lora_A/.lora_B/.alpha, "
                        f"'{EMBEDDING_KEY}' and the extensions the metadata declares belong in a "
                        "version-1 file.")
        groups.setdefault(key[: -len(suffix)], {})[suffix] = t
    if not groups:
        raise _fail(path, "holds no LoRA tensors", "Re-export the file with the D3SR trainer.")
    lora = {}
    for name, parts in sorted(groups.items()):
        missing = [s for s in _LORA_SUFFIXES if s not in parts]
        if missing:
            raise _fail(path, f"layer '{name}' lacks {', '.join(missing)}", "Re-export the file.")
        a, b, alpha = parts[".lora_A.weight"], parts[".lora_B.weight"], parts[".alpha"]
        if a.ndim not in (2, 4) or b.ndim != a.ndim or a.shape[0] != rank or b.shape[1] != rank \
                or alpha.ndim != 0:
            raise _fail(path, f"layer '{name}' has inconsistent LoRA shapes A{list(a.shape)} "
                        f"B{list(b.shape)} alpha{list(alpha.shape)} for rank {rank}", "Re-export the file.")
        if not float(alpha) > 0:   # finite already (read_weights); zero or negative flips or kills the LoRA
            raise _fail(path, f"layer '{name}' has alpha {float(alpha):g}; it must be a positive number",
                        "Re-export the file.")
        lora[name] = (a, b, float(alpha))
    return lora


def write_weights(path: str, weights: D3SRWeights) -> None:
    """Write `weights` to `path` atomically (temporary file in the same folder, then rename)."""
    if weights.upsampler not in UPSAMPLERS:
        raise ValueError(f"upsampler {weights.upsampler!r} is not one of {', '.join(UPSAMPLERS)}")
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "timestep": str(int(weights.timestep)),
        "base_model": weights.base_model,
        "prediction": weights.prediction,
        "scale": f"{weights.scale:g}",
        "lora_rank": str(int(weights.lora_rank)),
        "lora_alpha": f"{weights.lora_alpha:g}",
        **weights.extra_metadata,
        "upsampler": weights.upsampler,
    }
    if weights.training is not None:
        meta["training"] = json.dumps(weights.training, sort_keys=True)
    tensors = {EMBEDDING_KEY: weights.text_embedding.detach().float().cpu().contiguous()}
    tensors.update({k: v.detach().cpu().contiguous() for k, v in weights.lora_state_dict().items()})
    extensions = []
    if weights.full_weights:
        extensions.append(EXT_FULL_WEIGHTS)
        tensors.update({FULL_WEIGHT_PREFIX + k: v.detach().cpu().contiguous()
                        for k, v in weights.full_weights.items()})
    if weights.vae_lora:
        extensions.append(EXT_VAE_LORA)
        meta["vae_lora_rank"] = str(int(weights.vae_lora_rank))
        meta["vae_lora_alpha"] = f"{weights.vae_lora_alpha:g}"
        tensors.update({k: v.detach().cpu().contiguous()
                        for k, v in weights.vae_lora_state_dict().items()})
    if extensions:
        meta["extensions"] = ",".join(sorted(extensions))
    if weights.text_embedding_kind != "fixed":
        meta["text_embedding"] = weights.text_embedding_kind
    if weights.prompt:
        meta["prompt"] = weights.prompt
    atomic_save_safetensors(path, tensors, meta)


def atomic_save_safetensors(path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str],
                            durable: bool = True) -> None:
    """save_file through atomic_path: readers never see half a file (`durable`: see atomic_path)."""
    with atomic_path(path, durable) as tmp:
        save_file(tensors, tmp, metadata=metadata)
