"""OSEDiff's weight file through the D3SR nodes, against an independent plain computation.

The OSEDiff-format file is generated here from the tiny SD2 checkpoint: PEFT names over the
diffusers module names (written out by hand below, not taken from ComfyUI's maps), three UNet
adapters, conv_in's trained weight and bias, and a LoRA on the VAE encoder. The reference
merges every LoRA into the raw ldm weights by hand (scale alpha / rank, PEFT's alpha 8),
replaces conv_in, and runs OSEDiff's one step at t = 999 with tests/reference_d3sr.py.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import pytest
import torch
from reference_d3sr import d3sr_reference
from safetensors.torch import load_file

from d3sr_core import osediff, pipeline, synthetic
from d3sr_core.model import load_d3sr
from d3sr_core.weight_format import WeightFileError, read_weights

TOL = 1e-4
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


class FakeClip:
    """Stands in for SD2.1's CLIP (the tiny checkpoint has none): a fixed embedding per text."""

    def tokenize(self, text: str) -> str:
        return text

    def encode_from_tokens(self, tokens: str) -> torch.Tensor:
        gen = torch.Generator().manual_seed(zlib.crc32(tokens.encode()))
        return torch.randn(1, 154, 1024, generator=gen)      # two 77-token chunks


@pytest.fixture(scope="module")
def osediff_file(models_dir, tmp_path_factory) -> tuple[Path, dict, dict]:
    raw, truth = make_osediff_dict(str(models_dir / "checkpoints" / "tiny-sd2.safetensors"))
    path = tmp_path_factory.mktemp("osediff") / "osediff.pkl"
    torch.save(raw, path)
    return path, raw, truth


@pytest.fixture(scope="module")
def lr() -> torch.Tensor:
    return torch.rand(2, 12, 16, 3, generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def pkl_output(tiny_sd2, osediff_file, lr):
    model, vae = tiny_sd2
    d3sr = osediff.load_osediff(model, vae, str(osediff_file[0]), clip=FakeClip(), prompt="building, sky")
    return d3sr, pipeline.upscale(d3sr, lr, 4.0, "none")


def test_pkl_matches_plain_osediff_forward(models_dir, osediff_file, lr, pkl_output):
    path, raw, truth = osediff_file
    d3sr, out = pkl_output
    assert d3sr.timestep == 999 and out.shape == (2, 48, 64, 3)
    emb = FakeClip().encode_from_tokens("building, sky")[:, :77]
    assert torch.equal(d3sr.text_embedding, emb)
    ckpt = str(models_dir / "checkpoints" / "tiny-sd2.safetensors")
    unet, vae, plain_vae = reference_modules(ckpt, truth)
    ref = d3sr_reference(unet, vae, lr.movedim(-1, 1), 4.0, 999, emb, multiple=16)
    err = (out.movedim(-1, 1) - ref).abs().max().item()
    assert err < TOL, f"max abs difference {err}"
    # The VAE-encoder LoRA must matter (it is the part most easily dropped silently).
    no_vae_lora = d3sr_reference(unet, plain_vae, lr.movedim(-1, 1), 4.0, 999, emb, multiple=16)
    assert (no_vae_lora - ref).abs().max().item() > 100 * TOL


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


def test_converted_safetensors_gives_identical_output(tiny_sd2, models_dir, osediff_file, lr,
                                                      pkl_output, tmp_path, capsys):
    model, vae = tiny_sd2
    out_path = tmp_path / "osediff.safetensors"
    ckpt = str(models_dir / "checkpoints" / "tiny-sd2.safetensors")
    args = ["convert", str(osediff_file[0]), str(out_path), "--checkpoint", ckpt]
    assert osediff.main(args) == 0
    assert "0 NOT applied" not in capsys.readouterr().out
    w = read_weights(str(out_path))
    assert w.timestep == 999 and w.vae_lora and w.full_weights and w.text_embedding_kind == "none"
    d3sr = osediff.load_osediff(model, vae, str(out_path), clip=FakeClip(), prompt="building, sky")
    out = pipeline.upscale(d3sr, lr, 4.0, "none")
    assert torch.equal(out, pkl_output[1])
    # Without a stored embedding the plain D3SR loader refuses, naming the fix.
    with pytest.raises(WeightFileError, match="Load OSEDiff Model"):
        load_d3sr(model, vae, str(out_path))
    # An existing output is kept unless --force.
    stamp = out_path.stat().st_mtime_ns
    assert osediff.main(args) == 2 and "--force" in capsys.readouterr().err
    assert out_path.stat().st_mtime_ns == stamp
    assert osediff.main(args + ["--force"]) == 0


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


def test_malicious_pickle_is_refused_without_running_code(tiny_sd2, tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "osediff.pkl"
    torch.save({"rank_unet": 4, "rank_vae": 4, "state_dict_unet": {}, "state_dict_vae": {},
                "payload": _Payload(str(marker))}, path)
    model, vae = tiny_sd2
    with pytest.raises(osediff.OSEDiffFormatError, match=r"refused: .*open.*nothing in it was run"):
        osediff.load_osediff(model, vae, str(path), clip=FakeClip())
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
