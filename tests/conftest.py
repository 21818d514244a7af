"""Shared fixtures: a real ComfyUI host (in-process and as an HTTP server) and model files
generated at test time from ComfyUI's own classes with seeded weights."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
# The pack's folder after ComfyUI's, so ComfyUI's top-level `nodes` module is not shadowed
# by the pack's `nodes/` package.
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

from d3sr_core import host  # noqa: E402

host.import_comfy(cpu=True)

sys.path.append(str(ROOT / "scripts"))
from comfy_server import ComfyServer  # noqa: E402


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    """A ComfyUI models folder: a tiny SD2 checkpoint (also as tiny-sd2-clip with a seeded
    full-size SD2 text encoder), an SD1.x-shaped one, D3SR files at two timesteps (T_L 399 and
    250), one whose layers do not match the tiny SD2 model, and an OSEDiff-format .pkl."""
    import torch
    from reference_osediff import make_osediff_dict

    from d3sr_core.weight_format import write_weights
    from devtools import synthetic

    root = tmp_path_factory.mktemp("models")
    for sub in ("checkpoints", "d3sr", "loras"):
        (root / sub).mkdir()
    synthetic.write_checkpoint(str(root / "checkpoints" / "tiny-sd2.safetensors"), seed=0)
    synthetic.write_checkpoint(str(root / "checkpoints" / "tiny-sd2-clip.safetensors"), seed=0,
                               text_encoder=True)
    torch.save(make_osediff_dict(str(root / "checkpoints" / "tiny-sd2.safetensors"))[0],
               root / "d3sr" / "osediff-tiny.pkl")
    synthetic.write_checkpoint(str(root / "checkpoints" / "tiny-sd1.safetensors"),
                               unet_config=synthetic.TINY_SD1_UNET_CONFIG, seed=3)
    unet = synthetic.build_unet(synthetic.TINY_SD2_UNET_CONFIG, seed=0)
    for t, seed in ((399, 10), (250, 11)):
        w = synthetic.random_d3sr_weights(unet, timestep=t, seed=seed)
        write_weights(str(root / "d3sr" / f"tiny-t{t}.safetensors"), w)
        write_weights(str(root / "loras" / f"tiny-t{t}.safetensors"), w)
    deeper = synthetic.build_unet(synthetic.TINY_SD2_3LEVEL_UNET_CONFIG, seed=5)
    write_weights(str(root / "d3sr" / "other-layers.safetensors"),
                  synthetic.random_d3sr_weights(deeper, seed=12))
    return root


@pytest.fixture(scope="session")
def tiny_sd2(models_dir):
    """(ModelPatcher, VAE) of the tiny SD2 checkpoint, loaded with ComfyUI's checkpoint loader."""
    import comfy.sd
    model, _clip, vae, _ = comfy.sd.load_checkpoint_guess_config(
        str(models_dir / "checkpoints" / "tiny-sd2.safetensors"))
    return model, vae


@pytest.fixture(scope="session")
def sd2_clip(models_dir):
    """ComfyUI's CLIP (SD2 text encoder, seeded weights) from tiny-sd2-clip, via the checkpoint loader."""
    import comfy.sd
    _model, clip, _vae, _ = comfy.sd.load_checkpoint_guess_config(
        str(models_dir / "checkpoints" / "tiny-sd2-clip.safetensors"), output_model=False, output_vae=False)
    assert clip is not None
    return clip


@pytest.fixture(scope="session")
def server(models_dir, tmp_path_factory):
    """A real ComfyUI server (the pinned host or $COMFYUI_PATH) with this pack loaded."""
    work = tmp_path_factory.mktemp("server")
    srv = ComfyServer(host.find_comfyui(), ROOT, models_dir, work)
    srv.start()
    yield srv
    srv.stop()


def pytest_report_header(config):
    return f"ComfyUI host: {host.find_comfyui()}"


os.environ.setdefault("D3SR_TEST", "1")
