"""OSEDiff's released weights (cswry/OSEDiff, `osediff.pkl`, on SD2.1-base) on the D3SR nodes.

OSEDiff is a one-step SR model like D3SR: the same pipeline (bicubic x4, encode, one UNet step,
x0, decode, colour fix) runs it with timestep 999, a CLIP prompt embedding, and two extra
pieces of weights: a LoRA on the VAE encoder and a fully trained UNet conv_in.

Its file is a `torch.save` dict: rank_unet, rank_vae (ints), unet_lora_{encoder,decoder,others}_
modules and vae_lora_encoder_modules (diffusers module names), state_dict_unet and
state_dict_vae (PEFT-named tensors: `<module>.lora_A.<adapter>.weight`, `.lora_B.`, and
conv_in's `conv_in.base_layer.weight/.bias`). PEFT's default lora_alpha is 8, so each
adapter's scale is 8 / rank. This module reads it with `torch.load(weights_only=True)` only
(no code in the file can run), converts the names to ComfyUI's (diffusers -> ldm through
ComfyUI's own maps), and returns `D3SRWeights` using the format's `vae_lora` and
`full_weights` extensions. Every tensor is either used or reported.

Command line:  python -m d3sr_core.osediff convert osediff.pkl osediff.safetensors
               [--checkpoint v2-1_512-ema-pruned.safetensors [--prompt TEXT]] [--force]
"""

from __future__ import annotations

import argparse
import errno
import os
import pickle
import re
import sys
from dataclasses import dataclass, field

import torch

from . import comfy_internals, host
from .architectures import KL_VAE_DDCONFIG, SD21_UNET_CONFIG
from .weight_format import (
    EMBEDDING_SHAPE,
    LORA_PREFIX,
    PICKLE_EXTENSIONS,
    VAE_LORA_PREFIX,
    D3SRWeights,
    read_weights,
    write_weights,
)

OSEDIFF_TIMESTEP = 999
OSEDIFF_SCALE = 4.0
PEFT_DEFAULT_ALPHA = 8.0   # OSEDiff's LoraConfig leaves lora_alpha at PEFT's default
MODULE_LISTS = {  # list key in the file -> (model, adapter name)
    "unet_lora_encoder_modules": ("unet", "default_encoder"),
    "unet_lora_decoder_modules": ("unet", "default_decoder"),
    "unet_lora_others_modules": ("unet", "default_others"),
    "vae_lora_encoder_modules": ("vae", "default_encoder"),
}
_PEFT_LORA = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])\.(?P<adapter>[^.]+)\.weight$")
_PLAIN = re.compile(r"^(?P<module>.+?)(?:\.base_layer)?\.(?P<param>weight|bias)$")


class OSEDiffFormatError(ValueError):
    """An OSEDiff file that cannot be used; the message names the cause and the fix."""


@dataclass
class ConversionReport:
    """Where every tensor of the file went. `unused` and `missing` must be empty to load."""

    applied: list[str] = field(default_factory=list)           # file keys used
    unused: dict[str, str] = field(default_factory=dict)       # file key -> why not
    missing: list[str] = field(default_factory=list)           # listed modules without tensors
    counts: dict[str, int] = field(default_factory=dict)       # what was made, for messages

    @property
    def ok(self) -> bool:
        return not self.unused and not self.missing

    def summary(self) -> str:
        made = ", ".join(f"{v} {k}" for k, v in self.counts.items())
        text = f"{len(self.applied)} tensors applied ({made})"
        if self.unused:
            items = list(self.unused.items())
            text += f"; {len(items)} NOT applied: " + "; ".join(f"{k}: {why}" for k, why in items[:5])
            text += " ..." if len(items) > 5 else ""
        if self.missing:
            text += (f"; {len(self.missing)} listed modules have no tensors (e.g. "
                     f"{', '.join(self.missing[:3])})")
        return text


def _fail(path: str, problem: str, fix: str) -> OSEDiffFormatError:
    return OSEDiffFormatError(f"OSEDiff file '{os.path.basename(path)}': {problem}. {fix}")


_BLOCKED_GLOBAL = re.compile(r"GLOBAL (?P<name>[\w.]+)")
_UNKNOWN_CALL = re.compile(r"call reduce for unrecognized function (?P<name><[^>]*>|\S+)")
_TORCH_ADVICE = ("weights_only", "weights only load failed", "trust", "safe_globals", "documentation",
                 "file an issue", "pytorch.org")
_OS_MODULES = {"posix": "os", "nt": "os"}   # os.system pickles as posix.system (nt.system on Windows)


def _short(text: str, limit: int = 120) -> str:
    """`text` in one line, cut at a word boundary (with an ellipsis) if longer than `limit`."""
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    cut = text[:limit].rsplit(" ", 1)[0]
    return cut.rstrip(",;:") + " ..."


def _refusal(message: str) -> str:
    """Why torch's weights-only unpickler refused a file, in one line: what the file asked to
    import or call, or the unpickler's own reason. Torch's advice to load the file with
    weights_only=False is never repeated."""
    message = re.sub(r"\x1b\[[0-9;]*m", "", message)
    found = _BLOCKED_GLOBAL.search(message)
    if found:
        name = found["name"]
        module, _, attr = name.partition(".")
        what = (f"'{_OS_MODULES[module]}.{attr}' (pickled as '{name}')" if module in _OS_MODULES and attr
                else f"'{name}'")
        return (f"refused: it asks to import {what}, which a weight file never needs; the safe "
                "loader stopped there and nothing in it was run")
    found = _UNKNOWN_CALL.search(message)
    if found:
        return (f"refused: it asks to call {found['name']}, which a weight file never needs; the safe "
                "loader stopped there and nothing in it was run")
    lines = [line.strip() for line in re.split(r"\n|(?<=\.) ", message) if line.strip()]
    reasons = [line for line in lines if not any(a in line.lower() for a in _TORCH_ADVICE)]
    reason = _short(reasons[-1].removeprefix("WeightsUnpickler error:").strip()) if reasons else "unpickling failed"
    return (f"refused by the safe loader ({reason}): it is truncated, corrupt, or uses pickle "
            "features a weight file never needs; nothing in it was run")


def _check_names(path: str, key: str, names: list[str]) -> None:
    """Names are quoted in messages: control characters (a newline, a terminal escape) refused."""
    bad = [n for n in names if not n.isprintable()]
    if bad:
        raise _fail(path, f"name {_short(repr(bad[0]), 80)} in '{key}' holds control characters",
                    "Download it again.")


def _check_state_dict(path: str, key: str, sd: object) -> None:
    """A state dict of the file: named floating-point tensors, LoRA A/B matrices 2-D or 4-D."""
    if not isinstance(sd, dict) or not all(isinstance(n, str) and isinstance(t, torch.Tensor)
                                           for n, t in sd.items()):
        raise _fail(path, f"'{key}' is not a dict of named tensors", "Download it again.")
    _check_names(path, key, list(sd))
    not_float = [n for n, t in sd.items() if not t.is_floating_point()]
    if not_float:
        raise _fail(path, f"tensor '{not_float[0]}' in '{key}' has dtype "
                    f"{str(sd[not_float[0]].dtype).replace('torch.', '')}, not floating point",
                    "Download it again.")
    bad_rank = [n for n, t in sd.items() if ".lora_" in n and t.ndim not in (2, 4)]
    if bad_rank:
        raise _fail(path, f"LoRA tensor '{bad_rank[0]}' in '{key}' has {sd[bad_rank[0]].ndim} "
                    "dimensions, expected 2 or 4", "Download it again.")
    bad = [n for n, t in sd.items() if not torch.isfinite(t).all()]
    if bad:
        raise _fail(path, f"{len(bad)} tensor(s) hold NaN or Inf (first: {bad[0]})", "Download it again.")


def read_osediff_pickle(path: str) -> dict:
    """Load an OSEDiff `.pkl` with torch.load(weights_only=True) and check its structure.

    A pickle that needs anything but tensors, numbers, strings, lists and dicts (for example
    one that would run code) is refused before anything in it executes. Every problem, from a
    refused import to a damaged byte anywhere in the file, raises OSEDiffFormatError.
    """
    if not os.path.isfile(path):
        raise _fail(path, "file not found", "Put osediff.pkl in ComfyUI/models/d3sr/ and refresh.")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise _fail(path, _refusal(str(e)),
                    "Download osediff.pkl again from github.com/cswry/OSEDiff (preset/models/); "
                    "never load weight files of unknown origin.") from None
    except Exception as e:  # the safe unpickler runs no code, so any other error
        # (RuntimeError, EOFError, KeyError, IndexError, struct.error, AssertionError, ...) means
        # a damaged file; reported in one line, never as a traceback.
        raise _fail(path, f"cannot be read ({type(e).__name__}: {_short(str(e), 160)}); it is "
                    "truncated, corrupt or not a torch file", "Download it again.") from None
    if not isinstance(raw, dict):
        raise _fail(path, f"holds a {type(raw).__name__}, not OSEDiff's dict", "Pick osediff.pkl.")
    need = ("rank_unet", "rank_vae", "state_dict_unet", "state_dict_vae")
    absent = [k for k in need if k not in raw]
    if absent:
        keys = ", ".join(k if isinstance(k, str) and k.isprintable() else repr(k) for k in list(raw)[:8])
        raise _fail(path, f"lacks {', '.join(absent)} (keys: {_short(keys)})",
                    "This is not an OSEDiff weight file; pick osediff.pkl.")
    for k in ("rank_unet", "rank_vae"):
        if not isinstance(raw[k], int) or isinstance(raw[k], bool) or raw[k] < 1:
            raise _fail(path, f"'{k}' is {_short(repr(raw[k]), 40)}, expected a positive integer",
                        "Download it again.")
    for k in ("state_dict_unet", "state_dict_vae"):
        _check_state_dict(path, k, raw[k])
    for k in MODULE_LISTS:
        if k in raw and not (isinstance(raw[k], list) and all(isinstance(n, str) for n in raw[k])):
            raise _fail(path, f"'{k}' is not a list of module names", "Download it again.")
        _check_names(path, k, raw.get(k, []))
    return raw


def expected_shapes(unet_config: dict) -> tuple[dict[str, torch.Size], dict[str, torch.Size]]:
    """Parameter shapes of ComfyUI's UNet for `unet_config` and of SD's KL VAE, by ldm name
    (built on the meta device: no memory, well under a second)."""
    unet = comfy_internals.build_unet(unet_config, device="meta")
    vae = comfy_internals.build_kl_vae(KL_VAE_DDCONFIG, device="meta")
    return ({k: v.shape for k, v in unet.state_dict().items()},
            {k: v.shape for k, v in vae.state_dict().items()})


def unet_name_map(unet_config: dict) -> dict[str, str]:
    """diffusers UNet parameter name -> ldm name, from ComfyUI's own map."""
    return comfy_internals.unet_diffusers_to_ldm(unet_config)


def vae_name_map(diffusers_names: list[str]) -> dict[str, str]:
    """diffusers VAE parameter names -> ldm names, through ComfyUI's own VAE conversion."""
    return comfy_internals.vae_diffusers_to_ldm(diffusers_names)


def _lora_pairs(state: dict[str, torch.Tensor], report: ConversionReport
                ) -> tuple[dict[tuple[str, str], dict[str, tuple[str, torch.Tensor]]], dict[str, torch.Tensor]]:
    """Split PEFT tensors into LoRA pairs {(module, adapter): {"A"/"B": (key, tensor)}} and plain
    parameters {key: tensor}; anything else goes to report.unused."""
    pairs: dict[tuple[str, str], dict[str, tuple[str, torch.Tensor]]] = {}
    plain = {}
    for key, t in state.items():
        m = _PEFT_LORA.match(key)
        if m:
            pairs.setdefault((m["module"], m["adapter"]), {})[m["ab"]] = (key, t)
        elif "lora_" in key:
            report.unused[key] = "unsupported PEFT tensor (only plain LoRA A/B pairs are)"
        elif _PLAIN.match(key):
            plain[key] = t
        else:
            report.unused[key] = "not a LoRA tensor or a layer parameter"
    return pairs, plain


def _convert_pairs(pairs: dict, name_map: dict[str, str], shapes: dict[str, torch.Size],
                   rank: int, alpha: float, prefix: str, declared: dict[str, str],
                   report: ConversionReport) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """LoRA pairs on diffusers module names -> {prefix + ldm module: (A, B, alpha)}, checked
    against the target shapes; Linear LoRA on a 1x1 conv (the VAE's attention) is reshaped."""
    out: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
    for (module, adapter), parts in sorted(pairs.items()):
        keys = [k for k, _ in parts.values()]
        why, item = _check_pair(module, adapter, parts, name_map, shapes, rank, declared)
        if why is None:
            name = prefix + item[0]
            if name in out:
                why = "layer adapted by two adapters (not supported)"
            else:
                out[name] = (item[1], item[2], alpha)
                report.applied.extend(keys)
        if why is not None:
            report.unused.update({k: why for k in keys})
    return out


def _check_pair(module: str, adapter: str, parts: dict, name_map: dict[str, str],
                shapes: dict[str, torch.Size], rank: int, declared: dict[str, str]
                ) -> tuple[str | None, tuple]:
    """(None, (ldm module, A, B)) when the pair fits its layer, else (reason, ())."""
    if len(parts) != 2:
        return f"lora_{'B' if 'A' in parts else 'A'} of this pair is missing", ()
    if declared and declared.get(module) not in (None, adapter):
        return f"adapter '{adapter}' but the file lists this module under '{declared[module]}'", ()
    target = name_map.get(module + ".weight")
    if target is None or target not in shapes:
        return f"no layer '{module}' in ComfyUI's model", ()
    a, b = parts["A"][1].float(), parts["B"][1].float()
    weight_shape = shapes[target]
    if len(weight_shape) == 4 and a.ndim == 2 and weight_shape[2:] == (1, 1):
        a, b = a[:, :, None, None], b[:, :, None, None]
    expected = (b.shape[0], a.shape[1], *a.shape[2:])
    if a.shape[0] != rank or b.shape[1] != rank:
        return f"rank {a.shape[0]}, but the file says {rank}", ()
    if tuple(weight_shape) != expected:
        return f"LoRA gives {list(expected)}, layer {target} is {list(weight_shape)}", ()
    return None, (target[: -len(".weight")], a.contiguous(), b.contiguous())


def _declared(raw: dict, model: str, report: ConversionReport,
              pairs: dict) -> dict[str, str]:
    """module -> adapter from the file's module lists; listed modules without tensors are
    reported as missing."""
    declared = {}
    for key, (kind, adapter) in MODULE_LISTS.items():
        if kind == model:
            for module in raw.get(key, []):
                declared[module] = adapter
    have = {m for (m, _a) in pairs}
    report.missing.extend(sorted(m for m in declared if m not in have))
    return declared


def convert_osediff(raw: dict, unet_config: dict | None = None, name: str = "osediff.pkl",
                    lora_alpha: float = PEFT_DEFAULT_ALPHA, strict: bool = True
                    ) -> tuple[D3SRWeights, ConversionReport]:
    """An OSEDiff dict (from read_osediff_pickle) -> D3SRWeights for the UNet of `unet_config`
    (default: SD2.1-base's) with timestep 999 and a zeros placeholder embedding (kind "none":
    the loader computes the prompt embedding with CLIP).

    strict: raise OSEDiffFormatError when any tensor is not applied or a listed module lacks
    tensors (the report lists them); otherwise return the report for the caller to show.
    """
    unet_config = unet_config or SD21_UNET_CONFIG
    report = ConversionReport()
    unet_shapes, vae_shapes = expected_shapes(unet_config)

    # UNet: LoRA pairs, plus plain parameters (conv_in's trained weight and bias) as full weights.
    pairs, plain = _lora_pairs(raw["state_dict_unet"], report)
    declared = _declared(raw, "unet", report, pairs)
    unet_map = unet_name_map(unet_config)
    lora = _convert_pairs(pairs, unet_map, unet_shapes, raw["rank_unet"], lora_alpha, LORA_PREFIX,
                          declared, report)
    full = {}
    for key, t in plain.items():
        m = _PLAIN.match(key)
        target = unet_map.get(f"{m['module']}.{m['param']}")
        if target is None or target not in unet_shapes:
            report.unused[key] = "no UNet parameter of this name in ComfyUI's model"
        elif tuple(unet_shapes[target]) != tuple(t.shape):
            report.unused[key] = f"shape {list(t.shape)}, parameter is {list(unet_shapes[target])}"
        else:
            full[LORA_PREFIX + target] = t.float().contiguous()
            report.applied.append(key)

    # VAE: LoRA pairs only (OSEDiff's VAE is otherwise frozen).
    vae_pairs, vae_plain = _lora_pairs(raw["state_dict_vae"], report)
    for key in vae_plain:
        report.unused[key] = "full VAE weights are not supported (OSEDiff saves only LoRA)"
    vae_declared = _declared(raw, "vae", report, vae_pairs)
    vae_map = vae_name_map([m + ".weight" for m, _ in vae_pairs])
    vae_lora = _convert_pairs(vae_pairs, vae_map, vae_shapes, raw["rank_vae"], lora_alpha,
                              VAE_LORA_PREFIX, vae_declared, report)

    adapters = sorted({a for _m, a in pairs} | {f"vae:{a}" for _m, a in vae_pairs})
    report.counts = {"UNet LoRA layers": len(lora), "UNet full weights": len(full),
                     "VAE LoRA layers": len(vae_lora)}
    if not lora:
        report.missing.append("(no UNet LoRA at all)")
    if strict and not report.ok:
        raise _fail(name, "not every tensor can be applied: " + report.summary(),
                    "The file does not match OSEDiff's SD2.1-base layout; download osediff.pkl "
                    "again, or report the file to the D3SR pack's issue tracker.")
    weights = D3SRWeights(
        lora=lora, text_embedding=torch.zeros(EMBEDDING_SHAPE), timestep=OSEDIFF_TIMESTEP,
        scale=OSEDIFF_SCALE, lora_rank=raw["rank_unet"], lora_alpha=lora_alpha,
        training={"source": "OSEDiff (github.com/cswry/OSEDiff)", "converted_from": name,
                  "adapters": adapters, "peft_lora_alpha": lora_alpha},
        extra_metadata={"source": "osediff"}, vae_lora=vae_lora, vae_lora_rank=raw["rank_vae"],
        vae_lora_alpha=lora_alpha, full_weights=full, text_embedding_kind="none",
        upsampler="pillow-bicubic")
    return weights, report


def literal_tokens(clip, text: str) -> dict:
    r"""ComfyUI's token dict for `text` read literally, as OSEDiff's tokenizer call reads it
    (`tokenizer(text, max_length=77, padding="max_length", truncation=True)`): start token, the
    first 75 tokens of the text, end token, padding to 77.

    ComfyUI's own `clip.tokenize` is not used for the words: it reads `(word)` / `(word:1.2)` as
    emphasis, `embedding:name` as a textual inversion, drops the backslash of `\(`, and moves a
    word that straddles token 75 into a second chunk. Its `disable_weights` option turns off
    only the first. So the text goes straight to the Hugging Face CLIP tokenizer that ComfyUI's
    SD tokenizer holds, and the start / end / pad tokens are ComfyUI's own for the model.
    """
    tok = comfy_internals.clip_tokenizer(clip)
    if tok is None:
        raise ValueError(f"The connected CLIP's tokenizer ({type(getattr(clip, 'tokenizer', None)).__name__}) "
                         "is not Stable Diffusion's CLIP tokenizer. Connect the CLIP output of the "
                         "SD2.1-base checkpoint.")
    length = EMBEDDING_SHAPE[1]
    words = tok.hf(text, max_length=length, truncation=True)["input_ids"][tok.tokens_start:]
    if tok.adds_end:
        words = words[:-1]
    ids = [tok.start, *words[: length - 2], tok.end]
    ids += [tok.pad] * (length - len(ids))
    return {tok.name: [[(t, 1.0) for t in ids]]}


def prompt_embedding(clip, text: str) -> torch.Tensor:
    """SD2.1's CLIP encoding of `text` through a ComfyUI CLIP: [1, 77, 1024] float32 on the CPU.
    The text is read literally, as OSEDiff reads it (no ComfyUI prompt syntax; `literal_tokens`),
    and only its first 75 tokens count (longer prompts are cut, as in OSEDiff)."""
    cond = clip.encode_from_tokens(literal_tokens(clip, text))
    if cond.ndim != 3 or cond.shape[-1] != EMBEDDING_SHAPE[2]:
        raise ValueError(f"The connected CLIP gives embeddings of shape {list(cond.shape)}; OSEDiff "
                         "needs SD2.1's (width 1024). Connect the CLIP output of the SD2.1-base "
                         "checkpoint.")
    return cond[:1, :EMBEDDING_SHAPE[1]].float().cpu().contiguous()


def is_pickle_file(path: str) -> bool:
    return path.lower().endswith(PICKLE_EXTENSIONS)


def load_osediff(model, vae, path: str, clip=None, prompt: str = "", strength: float = 1.0):
    """MODEL + VAE (SD2.1-base) + an OSEDiff `.pkl` or converted `.safetensors` -> D3SRModel.

    clip/prompt: the UNet's conditioning is CLIP(prompt) when a CLIP is given (an empty prompt
    is fine); without CLIP, a converted file's stored embedding is used, if it has one.
    The VAE encoder LoRA goes on a clone of the VAE's patcher; `model` and `vae` stay untouched.
    """
    from .model import check_base_model, d3sr_model_from_weights
    name = os.path.basename(path)
    check_base_model(model, vae)
    if is_pickle_file(path):
        raw = read_osediff_pickle(path)
        weights, _report = convert_osediff(raw, comfy_internals.unet_config(model.model), name=name)
    else:
        weights = read_weights(path)
    if clip is not None:
        weights.text_embedding = prompt_embedding(clip, prompt)
        weights.text_embedding_kind, weights.prompt = "prompt", prompt
    elif prompt.strip():
        raise ValueError("A prompt was given but no CLIP is connected: connect the CLIP output of "
                         "the SD2.1-base checkpoint to 'Load OSEDiff Model', or clear the prompt.")
    elif weights.text_embedding_kind == "none":
        raise ValueError(f"'{name}' holds no prompt embedding: connect the CLIP output of the "
                         "SD2.1-base checkpoint to 'Load OSEDiff Model' (an empty prompt works).")
    return d3sr_model_from_weights(model, vae, weights, strength, name=name)


def convert_file(src: str, dst: str, force: bool = False, checkpoint: str | None = None,
                 prompt: str = "") -> ConversionReport:
    """OSEDiff `.pkl` -> D3SR-format `.safetensors` (atomic write; an existing `dst` is kept
    unless `force`). With `checkpoint` (SD2.1-base with its text encoder), the UNet layout comes
    from it and CLIP(prompt) is stored, so the file also works in 'Load D3SR Model' and the
    command line upscaler; without it the embedding is a placeholder (CLIP needed at load)."""
    if not dst.lower().endswith(".safetensors"):
        raise ValueError(f"output must be a .safetensors file, got {dst}")
    _check_output_path(dst)
    if os.path.exists(dst) and not force:
        raise FileExistsError(f"{dst} exists; pass --force to replace it")
    if prompt and not checkpoint:
        raise ValueError("--prompt needs --checkpoint (its text encoder computes the embedding)")
    raw = read_osediff_pickle(src)
    unet_config, clip = None, None
    if checkpoint:
        import comfy.sd
        model, clip, _vae, _ = comfy.sd.load_checkpoint_guess_config(
            checkpoint, output_vae=False, output_clip=True)
        unet_config = comfy_internals.unet_config(model.model)
    if checkpoint and clip is None and prompt:
        raise ValueError(f"'{checkpoint}' has no text encoder, so the prompt cannot be encoded: give the "
                         "full SD2.1-base checkpoint (v2-1_512-ema-pruned.safetensors) or leave out --prompt")
    weights, report = convert_osediff(raw, unet_config, name=os.path.basename(src))
    if clip is not None:
        weights.text_embedding = prompt_embedding(clip, prompt)
        weights.text_embedding_kind, weights.prompt = "prompt", prompt
    if os.path.exists(dst) and not force:   # checked again: conversion takes a while
        raise FileExistsError(f"{dst} exists; pass --force to replace it")
    try:
        write_weights(dst, weights)
    except OSError as e:   # atomic: a failed write leaves no partial file and any old one intact
        raise ValueError(_write_error(dst, e)) from None
    return report


_WRITE_HINTS = {errno.ENOSPC: "the disk is full; free some space or write elsewhere",
                getattr(errno, "EDQUOT", errno.ENOSPC): "the disk quota is used up; free some space or write "
                                                        "elsewhere",
                errno.EROFS: "the file system is read-only; choose another output folder",
                errno.EACCES: "no permission to write there; choose another output folder",
                errno.EPERM: "no permission to write there; choose another output folder",
                errno.EISDIR: "it is a folder; give a file name ending in .safetensors"}


def _write_error(dst: str, error: OSError) -> str:
    hint = _WRITE_HINTS.get(error.errno, "nothing was written")
    return f"cannot write {dst}: {error.strerror or error} ({hint})"


def _check_output_path(dst: str) -> None:
    """ValueError, before the conversion runs, for an output that is a folder or whose folder
    cannot be written."""
    if os.path.isdir(dst):
        raise ValueError(_write_error(dst, IsADirectoryError(errno.EISDIR, "is a folder")))
    folder = os.path.dirname(os.path.abspath(dst))
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(_write_error(dst, PermissionError(errno.EACCES, f"{folder} is not writable")))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m d3sr_core.osediff",
                                description="Convert OSEDiff's osediff.pkl to a D3SR .safetensors file.")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("convert", help="osediff.pkl -> D3SR-format .safetensors")
    c.add_argument("input", help="OSEDiff weights (.pkl)")
    c.add_argument("output", help="output file (.safetensors)")
    c.add_argument("--checkpoint", help="SD2.1-base checkpoint: store CLIP(prompt) in the file")
    c.add_argument("--prompt", default="", help="prompt to store (needs --checkpoint; default empty); "
                   "read literally as OSEDiff does: brackets are text, not ComfyUI emphasis")
    c.add_argument("--force", action="store_true", help="replace an existing output file")
    args = p.parse_args(argv)
    host.import_comfy()
    try:
        report = convert_file(args.input, args.output, args.force, args.checkpoint, args.prompt)
    except (OSEDiffFormatError, ValueError, OSError, RuntimeError) as e:   # one line, no traceback
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(f"wrote {args.output}: {report.summary()}")
    if read_weights(args.output).text_embedding_kind == "none":
        print("note: no prompt embedding stored; load the file with 'Load OSEDiff Model' and "
              "connect CLIP (or convert with --checkpoint to store one)")
    return 0


if __name__ == "__main__":
    host.run_main(main)
