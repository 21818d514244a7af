"""OSEDiff's weight file through the D3SR nodes, against an independent implementation of
OSEDiff's test script.

The OSEDiff-format file is generated from the tiny SD2 checkpoint (tests/reference_osediff.py).
The reference merges every LoRA into the raw ldm weights by hand, replaces conv_in, and runs the
script's steps on PIL images with Pillow's own resize and torchvision's ToTensor / ToPILImage:
bicubic x4, Lanczos down to a multiple of 8, one step at t = 999 (posterior mode), 8-bit output,
its AdaIN / wavelet colour fix. The prompt embedding comes from a real ComfyUI CLIP (the SD2 text
encoder with seeded weights, loaded from tiny-sd2-clip) fed Hugging Face's tokenization.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import comfy.sd1_clip
import numpy as np
import pytest
import torch
from PIL import Image
from reference_osediff import (
    ALPHA,
    RANK,
    make_osediff_dict,
    osediff_colour_fix,
    osediff_input,
    osediff_references,
    pil_resize,
    reference_modules,
)

from d3sr_core import osediff, resample, tiling
from d3sr_core.model import load_d3sr
from d3sr_core.upscale import upscale
from d3sr_core.weight_format import WeightFileError, read_weights
from devtools import synthetic

LEVEL = 1.0 / 255.0
PROMPT = "a (tall) building, sky"   # brackets: plain text to OSEDiff, emphasis in ComfyUI's syntax


@functools.lru_cache(maxsize=1)
def _hf_tokenizer():
    """transformers' CLIPTokenizer on the CLIP vocabulary with SD2.1's pad token "!" (read once)."""
    from transformers import CLIPTokenizer
    return CLIPTokenizer.from_pretrained(str(Path(comfy.sd1_clip.__file__).parent / "sd1_tokenizer"),
                                         pad_token="!")


def script_tokens(text: str) -> dict:
    """OSEDiff's tokenization: `tokenizer(text, max_length=77, padding="max_length",
    truncation=True)` with transformers' CLIPTokenizer on the CLIP vocabulary and SD2.1's pad
    token "!", as ComfyUI's SD2 token dict (every weight 1)."""
    ids = _hf_tokenizer()(text, max_length=77, padding="max_length", truncation=True)["input_ids"]
    return {"h": [[(t, 1.0) for t in ids]]}


@functools.lru_cache(maxsize=8)
def literal_embedding(clip, text: str) -> torch.Tensor:
    """OSEDiff's prompt encoding: script_tokens(text) through the text encoder (ComfyUI's SD2
    encoder, fed the ids as they are). Computed once per (CLIP, text): a 354 M-parameter encoder
    run (2 s on one core); callers must not change the tensor."""
    return clip.encode_from_tokens(script_tokens(text)).float()


@pytest.fixture(scope="module")
def osediff_file(models_dir, tmp_path_factory) -> tuple[Path, dict, dict]:
    raw, truth = make_osediff_dict(str(models_dir / "checkpoints" / "tiny-sd2.safetensors"))
    path = tmp_path_factory.mktemp("osediff") / "osediff.pkl"
    torch.save(raw, path)
    return path, raw, truth


@pytest.fixture(scope="module")
def lr() -> torch.Tensor:
    return torch.rand(2, 12, 8, 3, generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def pkl_output(tiny_sd2, sd2_clip, osediff_file, lr):
    model, vae = tiny_sd2
    d3sr = osediff.load_osediff(model, vae, str(osediff_file[0]), clip=sd2_clip, prompt=PROMPT)
    return d3sr, upscale(d3sr, lr, 4.0, "none")


@pytest.fixture(scope="module")
def reference(models_dir, osediff_file):
    """Raw modules with OSEDiff's weights merged by hand: (UNet, VAE, VAE without its LoRA)."""
    return reference_modules(str(models_dir / "checkpoints" / "tiny-sd2.safetensors"), osediff_file[2])


def lr_uint8(shape: tuple[int, ...], seed: int) -> np.ndarray:
    return torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(seed),
                         dtype=torch.uint8).numpy()


@pytest.fixture(scope="module")
def script_outputs(sd2_clip, reference):
    """OSEDiff's script (tests/reference_osediff.py, prompt PROMPT read literally) on the LR image
    lr_uint8((h, w, 3), seed): outputs(size, seed, vae_lora=True) -> {colour fix: uint8
    [H, W, 3]}, with the hand-merged VAE-encoder LoRA or without it. Each is computed once per
    module (the tests compare against the same images) and must not be changed."""
    unet, vae, plain_vae = reference
    emb = literal_embedding(sd2_clip, PROMPT)
    cache: dict[tuple, dict[str, np.ndarray]] = {}

    def outputs(size: tuple[int, int], seed: int, vae_lora: bool = True) -> dict[str, np.ndarray]:
        key = (size, seed, vae_lora)
        if key not in cache:
            cache[key] = osediff_references(unet, vae if vae_lora else plain_vae, lr_uint8((*size, 3), seed), emb)
        return cache[key]
    return outputs


def test_prompt_is_read_literally(sd2_clip):
    """Brackets, backslashes and 'embedding:' are text, and long prompts are cut at 75 tokens
    as Hugging Face's tokenizer cuts them (not ComfyUI's word-preserving chunks): the encoder is
    fed Hugging Face's ids for every text, and the embedding is its output for those ids.
    (prompt_embedding is the encoder's output for osediff.literal_tokens: equal tokens give equal
    embeddings, so one text is encoded; each encoding is 2 s of CPU.)"""
    long = ", ".join(["a very detailed photograph of an old stone building"] * 12)
    for text in (PROMPT, "", "a \\(tall\\) tower (detailed:1.4) embedding:foo", long):
        assert osediff.literal_tokens(sd2_clip, text) == script_tokens(text), text
    assert torch.equal(osediff.prompt_embedding(sd2_clip, PROMPT), literal_embedding(sd2_clip, PROMPT))
    # ComfyUI's own syntax would have weighted "(tall)": the literal reading matters.
    weighted = sd2_clip.encode_from_tokens(sd2_clip.tokenize(PROMPT)).float()
    assert (weighted - literal_embedding(sd2_clip, PROMPT)).abs().max().item() > 1e-3


@pytest.mark.parametrize("size,method", [((8, 8), "adain"),       # 32 x 32: a multiple of 16 (the tiny UNet's)
                                         ((7, 11), "adain"),      # 28 x 44 -> Lanczos to 24 x 40
                                         ((10, 8), "adain"),      # 40 x 32: multiples of 8, one of 16
                                         ((11, 8), "wavelet"),    # 44 x 32 -> 40 x 32
                                         ((12, 9), "none")])      # 48 x 36 -> 48 x 32
def test_loader_and_upscale_equal_osediffs_script(script_outputs, pkl_output, size, method):
    """The OSEDiff loader + D3SRUpscale against OSEDiff's test-script steps written independently
    (tests/reference_osediff.py: Pillow's bicubic and Lanczos, the literal prompt, the posterior's
    mode, its colour fix on 8-bit images).

    OSEDiff truncates to 8 bits twice: the network's output, then the colour-fixed image. Two
    float implementations (here ComfyUI's patched model and hand-merged raw modules) differ by
    ~1e-6, which flips the first truncation by one level on a few pixels; the colour fix scales
    that level by its gain (sd of the input / sd of the output, about 1) before the second
    truncation, so there it may become 2. Hence, per image: the network's 8-bit output within 1
    level everywhere (flips on < 0.2 % of pixels); the colour fix applied to that same 8-bit
    image within 1 level of OSEDiff's colour fix; end to end within 1 level except at those
    flipped pixels (within 2 there)."""
    d3sr = pkl_output[0]
    seeds = (1, 2)
    lrs = [lr_uint8((*size, 3), seed) for seed in seeds]
    batch = torch.from_numpy(np.stack(lrs)).float() / 255
    outs = {m: upscale(d3sr, batch, 4.0, m) * 255 for m in dict.fromkeys((method, "none"))}
    out, net = outs[method], outs["none"]
    for x in (out, net):                                   # 8-bit levels, as OSEDiff's PNG
        assert (x - x.round()).abs().max() < 1e-3
    out, net = out.round(), net.round()
    for i, (seed, lr_img) in enumerate(zip(seeds, lrs)):
        script = script_outputs(size, seed)
        ref_net, ref = torch.from_numpy(script["none"]).float(), torch.from_numpy(script[method]).float()
        assert out.shape[1:] == ref.shape and net.shape[1:] == ref.shape
        flips = (net[i] - ref_net).abs()
        assert flips.max() <= 1 and (flips > 0).float().mean() < 0.002, flips.sum()
        ours_8bit = Image.fromarray(net[i].to(torch.uint8).numpy())
        if method != "none":
            fixed = osediff_colour_fix(ours_8bit, osediff_input(lr_img), method)
            assert (out[i] - torch.from_numpy(np.array(fixed)).float()).abs().max() <= 1
        levels = (out[i] - ref).abs()
        assert levels[flips == 0].max() <= 1 and levels.max() <= 2, \
            f"max {levels.max().item()}, mean {levels.mean().item():.5f} levels"


def test_each_osediff_step_matters(script_outputs, pkl_output):
    """The comparison above has teeth: the D3SR steps (torch's bicubic, float colour fix), or
    OSEDiff's without its VAE-encoder LoRA, are clearly further from OSEDiff's output."""
    d3sr = pkl_output[0]
    lr_img = lr_uint8((8, 8, 3), 1)
    ref = torch.from_numpy(script_outputs((8, 8), 1)["adain"]).double()
    image = torch.from_numpy(lr_img)[None].float() / 255
    as_d3sr = dataclasses.replace(d3sr, osediff_steps=False, upsampler="torch-bicubic")
    assert (upscale(as_d3sr, image, 4.0, "adain")[0].double() * 255 - ref).abs().max() > 2
    no_vae_lora = torch.from_numpy(script_outputs((8, 8), 1, vae_lora=False)["adain"]).double()
    assert (no_vae_lora - ref).abs().max() > 2


def test_tiled_upscale_follows_osediffs_steps(pkl_output):
    d3sr = pkl_output[0]
    image = torch.from_numpy(lr_uint8((2, 10, 11, 3), 4)).float() / 255     # 40 x 44 -> 40 x 40
    plain = upscale(d3sr, image, 4.0, "adain")
    one_tile = tiling.upscale_tiled(d3sr, image, 4.0, "adain", tile=512, vae_tile=512)
    assert plain.shape == one_tile.shape == (2, 40, 40, 3)
    assert (one_tile - plain).abs().max().item() <= LEVEL + 1e-6
    tiles = tiling.upscale_tiled(d3sr, image, 4.0, "wavelet", tile=32, overlap=8, vae_tile=32)   # 2 x 2 tiles
    assert tiles.shape == (2, 40, 40, 3) and (tiles * 255 - (tiles * 255).round()).abs().max() < 1e-3


@pytest.mark.parametrize("size,out", [((1, 1), (4, 4)), ((2, 5), (8, 16)), ((3, 9), (8, 32))])
def test_sides_under_8_px_are_padded_not_dropped(pkl_output, size, out):
    """OSEDiff's script cannot make a side under 8 px (Pillow refuses a size of 0); the pack keeps
    such a side and pads it for the VAE, and still brings the others down to a multiple of 8."""
    d3sr = pkl_output[0]
    image = torch.rand(1, *size, 3, generator=torch.Generator().manual_seed(5))
    assert upscale(d3sr, image, 4.0, "adain").shape == (1, *out, 3)


@pytest.mark.parametrize("in_hw,out_hw,kind", [((13, 19), (52, 76), "bicubic"), ((7, 30), (28, 120), "bicubic"),
                                               ((1, 1), (4, 4), "bicubic"), ((33, 17), (83, 43), "bicubic"),
                                               ((150, 97), (600, 388), "bicubic"),    # > 256 rows: chunks
                                               ((52, 76), (48, 72), "lanczos"), ((44, 96), (40, 96), "lanczos"),
                                               ((60, 9), (56, 9), "lanczos")])
def test_resample_is_pillows(in_hw, out_hw, kind):
    """d3sr_core.resample against Pillow itself (two single-axis calls: Pillow 9.5's order)."""
    arr = lr_uint8((*in_hw, 3), sum(in_hw))
    ours = resample.pillow_resize(torch.from_numpy(arr).permute(2, 0, 1)[None].float() / 255, out_hw, kind)
    ours = (ours[0].permute(1, 2, 0) * 255).round().to(torch.int16)
    filt = Image.BICUBIC if kind == "bicubic" else Image.LANCZOS
    theirs = torch.from_numpy(np.array(pil_resize(Image.fromarray(arr), out_hw[::-1], filt))).to(torch.int16)
    diff = (ours - theirs).abs().max().item()
    # Bicubic weights are polynomials: bit-identical. Lanczos uses sin(), whose last bit may
    # differ between C libraries, so one level is allowed there.
    assert diff == 0 if kind == "bicubic" else diff <= 1


def test_every_peft_key_is_applied(osediff_file):
    _path, raw, truth = osediff_file
    weights, report = osediff.convert_osediff(raw, synthetic.TINY_SD2_UNET_CONFIG)
    assert report.ok, report.summary()
    every = set(raw["state_dict_unet"]) | set(raw["state_dict_vae"])
    assert set(report.applied) == every and len(report.applied) == len(every)
    assert len(weights.lora) == len(truth["unet"]) and len(weights.vae_lora) == len(truth["vae"])
    assert set(weights.full_weights) == {"diffusion_model.input_blocks.0.0.weight",
                                         "diffusion_model.input_blocks.0.0.bias"}
    assert {a for _a, _b, a in weights.lora.values()} == {ALPHA}


def test_stray_keys_are_reported_not_dropped(osediff_file):
    _path, raw, _truth = osediff_file
    bad = dict(raw, state_dict_unet=dict(raw["state_dict_unet"]))
    sd = bad["state_dict_unet"]
    sd["mid_block.attentions.0.proj_in.lora_magnitude_vector.default_others.weight"] = torch.ones(320)
    sd["no_such_block.conv.lora_A.default_others.weight"] = torch.zeros(RANK, 320, 3, 3)
    sd["no_such_block.conv.lora_B.default_others.weight"] = torch.zeros(320, RANK, 1, 1)
    lone = "conv_out.lora_A.default_others.weight"
    sd[lone.replace("conv_out", "conv_extra")] = torch.zeros(RANK, 320, 3, 3)
    sd["extra_head.weight"] = torch.zeros(4, 4)                     # a parameter ComfyUI lacks
    sd["conv_out.base_layer.bias"] = torch.zeros(7)                  # wrong shape
    bad["unet_lora_others_modules"] = raw["unet_lora_others_modules"] + ["mid_block.listed_only"]
    _, report = osediff.convert_osediff(bad, synthetic.TINY_SD2_UNET_CONFIG, strict=False)
    stray = {k for k in sd if k not in raw["state_dict_unet"]}
    assert set(report.unused) == stray, report.summary()
    assert report.missing == ["mid_block.listed_only"]
    with pytest.raises(osediff.OSEDiffFormatError, match="lora_magnitude_vector"):
        osediff.convert_osediff(bad, synthetic.TINY_SD2_UNET_CONFIG)


def test_converted_safetensors_gives_identical_output(tiny_sd2, sd2_clip, sd2_clip_file, models_dir, osediff_file,
                                                      lr, pkl_output, tmp_path, capsys):
    model, vae = tiny_sd2
    # --checkpoint gives the UNet layout (the tiny one here); it has no text encoder, so no
    # embedding is stored and CLIP is connected at load time.
    out_path = tmp_path / "osediff.safetensors"
    no_clip = str(models_dir / "checkpoints" / "tiny-sd2.safetensors")
    args = ["convert", str(osediff_file[0]), str(out_path), "--checkpoint", no_clip]
    assert osediff.main(args) == 0
    printed = capsys.readouterr().out
    assert "NOT applied" not in printed and "no prompt embedding stored" in printed
    w = read_weights(str(out_path))
    assert w.timestep == 999 and w.vae_lora and w.full_weights and w.text_embedding_kind == "none"
    d3sr = osediff.load_osediff(model, vae, str(out_path), clip=sd2_clip, prompt=PROMPT)
    assert torch.equal(upscale(d3sr, lr, 4.0, "none"), pkl_output[1])
    # Without a stored embedding the plain D3SR loader refuses, naming the fix.
    with pytest.raises(WeightFileError, match="Load OSEDiff Model"):
        load_d3sr(model, vae, str(out_path))
    # An existing output is kept unless --force.
    stamp = out_path.stat().st_mtime_ns
    assert osediff.main(args) == 2 and "--force" in capsys.readouterr().err
    assert out_path.stat().st_mtime_ns == stamp

    # A checkpoint with its text encoder stores CLIP(prompt): the file then works in the plain
    # D3SR loader, no CLIP needed, with the identical result.
    ckpt = str(sd2_clip_file)
    assert osediff.main(args[:3] + ["--force", "--checkpoint", ckpt, "--prompt", PROMPT]) == 0
    assert "no prompt embedding stored" not in capsys.readouterr().out
    w = read_weights(str(out_path))
    assert w.text_embedding_kind == "prompt" and w.prompt == PROMPT
    assert torch.equal(upscale(load_d3sr(model, vae, str(out_path)), lr, 4.0, "none"), pkl_output[1])

    # A checkpoint without a text encoder cannot make the asked-for prompt embedding: an error, no file.
    other = tmp_path / "other.safetensors"
    assert osediff.main(["convert", str(osediff_file[0]), str(other), "--checkpoint", no_clip,
                         "--prompt", PROMPT]) == 2
    assert "has no text encoder" in capsys.readouterr().err and not other.exists()


def test_long_prompts_keep_the_first_75_tokens(tiny_sd2, sd2_clip, osediff_file):
    model, vae = tiny_sd2
    long = ", ".join(["a very detailed photograph of an old stone building"] * 12)
    d3sr = osediff.load_osediff(model, vae, str(osediff_file[0]), clip=sd2_clip, prompt=long)
    assert torch.equal(d3sr.text_embedding, literal_embedding(sd2_clip, long))
    # Changing the text after token 75 changes nothing the encoder is fed, before it it does.
    kept = osediff.literal_tokens(sd2_clip, long)
    assert osediff.literal_tokens(sd2_clip, long + " and a tower") == kept
    assert osediff.literal_tokens(sd2_clip, "an" + long[1:]) != kept


def test_users_model_and_vae_stay_untouched(tiny_sd2, osediff_file, pkl_output):
    model, vae = tiny_sd2
    d3sr, _ = pkl_output
    assert d3sr.vae is not vae and d3sr.vae.patcher is not vae.patcher
    assert len(d3sr.vae.patcher.patches) == len(osediff_file[2]["vae"])
    assert not vae.patcher.patches and not model.patches
    pixels = torch.rand(1, 32, 32, 3, generator=torch.Generator().manual_seed(1))
    before = vae.encode(pixels)
    adapted = d3sr.vae.encode(pixels)              # patches the shared modules ...
    after = vae.encode(pixels)                     # ... and ComfyUI swaps them back out
    assert torch.equal(before, after)
    assert (adapted - before).abs().max().item() > 1e-3


def test_clip_is_needed_for_a_pickle(tiny_sd2, osediff_file):
    model, vae = tiny_sd2
    with pytest.raises(ValueError, match="connect the CLIP"):
        osediff.load_osediff(model, vae, str(osediff_file[0]))
    with pytest.raises(ValueError, match="no CLIP is connected"):
        osediff.load_osediff(model, vae, str(osediff_file[0]), prompt="a cat")


class _Payload:
    """Unpickling this would call open(marker, 'w'), creating the marker file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_pickle_is_refused_without_running_code(tiny_sd2, sd2_clip, tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "osediff.pkl"
    torch.save({"rank_unet": 4, "rank_vae": 4, "state_dict_unet": {}, "state_dict_vae": {},
                "payload": _Payload(str(marker))}, path)
    model, vae = tiny_sd2
    with pytest.raises(osediff.OSEDiffFormatError, match=r"refused: .*open.*nothing in it was run"):
        osediff.load_osediff(model, vae, str(path), clip=sd2_clip)
    assert not marker.exists()
    assert osediff.main(["convert", str(path), str(tmp_path / "out.safetensors")]) == 2
    assert not marker.exists() and not (tmp_path / "out.safetensors").exists()


def test_not_an_osediff_file(tmp_path):
    path = tmp_path / "other.pkl"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(osediff.OSEDiffFormatError, match="not an OSEDiff weight file"):
        osediff.read_osediff_pickle(str(path))
    path.write_bytes(b"\x80\x04 truncated")
    with pytest.raises(osediff.OSEDiffFormatError, match="truncated, corrupt"):
        osediff.read_osediff_pickle(str(path))
