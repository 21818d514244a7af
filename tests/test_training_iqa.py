"""MUSIQ, MANIQA and CLIPIQA in `python -m training.evaluate` through pyiqa (optional extra).

With pyiqa installed, the three metrics are built from weight files generated here: pyiqa's own
architectures (full layouts: MUSIQ, MANIQA with its ViT-B/8, OpenAI CLIP RN50) created with
pretrained=False under a fixed seed and saved. The command must load them without any network
access, and its per-image values must equal the same architectures loaded with the same
tensors by hand, applied to the image read by Pillow. Without pyiqa or weights, the columns
say why.
"""

from __future__ import annotations

import json
import math
import socket
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image

from training import evaluate, iqa_noref

SIZE = 64  # small images: pyiqa resizes them as it does real ones (MUSIQ scales, MANIQA crops)


def _images(folder: Path, count: int = 2) -> Path:
    rng = np.random.default_rng(3)
    for sub in ("out", "gt"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for i in range(count):
        base = rng.random((8, 8, 3))
        img = np.kron(base, np.ones((SIZE // 8, SIZE // 8, 1))) + 0.1 * rng.random((SIZE, SIZE, 3))
        arr = np.clip(img / 1.1 * 255, 0, 255).round().astype(np.uint8)
        Image.fromarray(arr).save(folder / "out" / f"im{i}.png")
        Image.fromarray(arr).save(folder / "gt" / f"im{i}.png")
    return folder


def _block_network(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


# ---------------------------------------------------------------- without pyiqa / weights


def test_unrequested_columns_say_how_to_ask(tmp_path):
    _images(tmp_path, 1)
    json_path = tmp_path / "m.json"
    code = evaluate.main(["--outputs", str(tmp_path / "out"), "--gt", str(tmp_path / "gt"), "--no-niqe",
                          "--quiet", "--device", "cpu", "--json", str(json_path)])
    assert code == 0
    payload = json.loads(json_path.read_text())
    for name in ("MUSIQ", "MANIQA", "CLIPIQA"):
        assert "--no-reference" in payload["not_computed"][name]
    assert "musiq" not in payload["mean"]


def test_missing_weights_say_where_to_put_them(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    _block_network(monkeypatch)
    _images(tmp_path, 1)
    json_path = tmp_path / "m.json"
    code = evaluate.main(["--outputs", str(tmp_path / "out"), "--gt", str(tmp_path / "gt"), "--no-niqe",
                          "--quiet", "--device", "cpu", "--json", str(json_path),
                          "--no-reference", "musiq,maniqa,clipiqa"])
    assert code == 0
    why = json.loads(json_path.read_text())["not_computed"]
    assert "musiq_koniq_ckpt-e95806b9.pth" in why["MUSIQ"] and str(tmp_path / "torch") in why["MUSIQ"]
    assert "MANIQA_PIPAL-ae6d356b.pth" in why["MANIQA"]
    assert "RN50.pt" in why["CLIPIQA"]
    assert all("\n" not in reason for reason in why.values())
    assert "MUSIQ: not computed (no weights" in capsys.readouterr().out


@pytest.mark.parametrize(("args", "message"), [
    (["--no-reference", "brisque"], "unknown metric 'brisque'"),
    (["--no-reference", "musiq", "--iqa-weights", "musiq"], "is not NAME=FILE"),
    (["--no-reference", "musiq", "--iqa-weights", "musiq=/nonexistent/m.pth"], "does not exist"),
    (["--iqa-weights", "clipiqa=%(file)s"], "which --no-reference does not ask for"),
])
def test_bad_options_are_one_line_errors(tmp_path, capsys, args, message):
    _images(tmp_path, 1)
    some_file = tmp_path / "w.pth"
    some_file.write_bytes(b"x")
    args = [a % {"file": some_file} if "%(file)s" in a else a for a in args]
    code = evaluate.main(["--outputs", str(tmp_path / "out"), "--gt", str(tmp_path / "gt"), "--no-niqe",
                          "--quiet", *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1


def test_unreadable_weight_file_says_why(tmp_path):
    pytest.importorskip("pyiqa")
    bad = tmp_path / "musiq.pth"
    bad.write_bytes(b"not a torch file")
    scorer, reason = iqa_noref.build_metric("musiq", bad)
    assert scorer is None and "cannot be read as a weights-only state dict" in reason and "\n" not in reason


# ---------------------------------------------------------------- with pyiqa and generated weights


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    pyiqa = pytest.importorskip("pyiqa")
    from pyiqa.archs.clip_model import CLIP

    folder = tmp_path_factory.mktemp("iqa_weights")
    states = {}
    torch.manual_seed(0)
    states["musiq"] = pyiqa.create_metric("musiq", pretrained=False, device="cpu").net.state_dict()
    torch.manual_seed(1)
    with iqa_noref._timm_backbone_not_downloaded():
        states["maniqa"] = pyiqa.create_metric("maniqa-pipal", pretrained=False, device="cpu").net.state_dict()
    torch.manual_seed(2)
    # OpenAI CLIP RN50: embed 1024, 224 px, ResNet (3, 4, 6, 3) width 64; text 77 x 49408, width 512,
    # 8 heads, 12 layers.
    states["clipiqa"] = CLIP(1024, 224, (3, 4, 6, 3), 64, None, 77, 49408, 512, 8, 12).state_dict()
    paths = {}
    for name, state in states.items():
        paths[name] = folder / f"{name}.pth"
        # MANIQA's file as pyiqa's training writes it ('params'), the others as plain state dicts.
        torch.save({"params": state} if name == "maniqa" else state, paths[name])
    return paths


def _reference_scores(paths: dict[str, Path], image_path: Path) -> dict[str, float]:
    """The same pyiqa architectures, loaded by hand, on the image read by Pillow."""
    from pyiqa.archs.clipiqa_arch import CLIPIQA
    from pyiqa.archs.maniqa_arch import MANIQA
    from pyiqa.archs.musiq_arch import MUSIQ

    x = torch.from_numpy(np.asarray(Image.open(image_path).convert("RGB"), dtype=np.float32) / 255.0)
    x = x.permute(2, 0, 1)[None]
    musiq = MUSIQ(pretrained=False)
    musiq.load_state_dict(torch.load(paths["musiq"], weights_only=True))
    with iqa_noref._timm_backbone_not_downloaded():
        maniqa = MANIQA(pretrained=False, train_dataset="pipal")
    maniqa.load_state_dict(torch.load(paths["maniqa"], weights_only=True)["params"])
    # pyiqa's own CLIP loader: it tries TorchScript first and, on a state dict, reads the handle
    # that attempt consumed (EOFError); make the attempt fail before reading, as it would on an
    # intact handle, so pyiqa's own state-dict path (torch.load, weights-only default) runs.
    def not_torchscript(*_args, **_kwargs):
        raise RuntimeError("not a TorchScript archive")
    with mock.patch.object(torch.jit, "load", not_torchscript):
        clipiqa = CLIPIQA(backbone=str(paths["clipiqa"]))
    with torch.no_grad():
        return {name: float(net.eval()(x).reshape(-1)[0])
                for name, net in (("musiq", musiq), ("maniqa", maniqa), ("clipiqa", clipiqa))}


def test_three_metrics_from_generated_weights_offline(weights, tmp_path, monkeypatch):
    _images(tmp_path, 2)
    _block_network(monkeypatch)
    json_path = tmp_path / "m.json"
    spec = ",".join(f"{name}={path}" for name, path in weights.items())
    code = evaluate.main(["--outputs", str(tmp_path / "out"), "--gt", str(tmp_path / "gt"), "--no-niqe",
                          "--quiet", "--device", "cpu", "--json", str(json_path),
                          "--no-reference", "musiq,maniqa,clipiqa", "--iqa-weights", spec])
    assert code == 0
    payload = json.loads(json_path.read_text())
    assert not set(payload["not_computed"]) & {"MUSIQ", "MANIQA", "CLIPIQA"}, payload["not_computed"]
    rows = payload["per_image"]
    for name in ("musiq", "maniqa", "clipiqa"):
        values = [row[name] for row in rows]
        assert all(v is not None and math.isfinite(v) for v in values), (name, values)
        assert payload["mean"][name] == pytest.approx(np.mean(values), rel=1e-9)
    # CLIPIQA is a probability; MANIQA's head ends in ReLU: both ranges hold for any weights.
    assert all(0.0 <= row["clipiqa"] <= 1.0 and row["maniqa"] >= 0.0 for row in rows)
    reference = _reference_scores(weights, tmp_path / "out" / "im0.png")
    for name, value in reference.items():
        # float32 networks, same operations: agreement to 1e-4 of the value's scale.
        assert rows[0][name] == pytest.approx(value, rel=1e-4, abs=1e-6), name
