"""`python -m d3sr_core`: file and folder upscaling with ComfyUI as a library."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "d3sr_core", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)


def test_folder_upscale_and_no_overwrite(models_dir, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((12, 17, 3)) * 255).astype(np.uint8)).save(src / "a.png")
    Image.fromarray((rng.random((9, 9)) * 255).astype(np.uint8), mode="L").save(src / "b.jpg")
    out = tmp_path / "out"
    args = ["--checkpoint", str(models_dir / "checkpoints" / "tiny-sd2.safetensors"),
            "--weights", str(models_dir / "d3sr" / "tiny-t399.safetensors"),
            "--input", str(src), "--output", str(out), "--factor", "2", "--cpu"]
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "wrote 2 image(s)" in r.stdout
    with Image.open(out / "a.png") as a, Image.open(out / "b.png") as b:
        assert a.size == (34, 24) and b.size == (18, 18) and a.mode == "RGB"
    before = (out / "a.png").read_bytes()
    r = run_cli(*args)
    assert "kept 2 existing" in r.stdout and (out / "a.png").read_bytes() == before


def test_missing_input_is_a_clear_error(models_dir, tmp_path):
    r = run_cli("--checkpoint", "x.safetensors", "--weights", "y.safetensors",
                "--input", str(tmp_path / "nothing"), "--output", str(tmp_path / "o"))
    assert r.returncode != 0 and "does not exist" in r.stderr
