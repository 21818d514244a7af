"""End to end over ComfyUI's HTTP API: the real server loads the pack, lists the nodes and
templates, validates every UI workflow and runs every API twin."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from workflow_check import check_ui_workflow, localise

ROOT = Path(__file__).resolve().parents[1]
UI_WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))
API_WORKFLOWS = sorted((ROOT / "workflows" / "api").glob("*.json"))
OUR_NODES = ("D3SRModelLoader", "D3SRUpscale", "D3SRTiledUpscale", "D3SROSEDiffLoader")
TEST_FILES = {"ckpt_name": "tiny-sd2.safetensors", "weights": "tiny-t399.safetensors",
              "image": "lr_test.png"}
# The OSEDiff example runs on a generated OSEDiff .pkl with the checkpoint that has a text
# encoder (its CLIP output feeds the loader; a .pkl fails without one).
WORKFLOW_FILES = {"osediff_upscale_x4": {"ckpt_name": "tiny-sd2-clip.safetensors",
                                         "weights": "osediff-tiny.pkl"}}


@pytest.fixture(scope="module")
def object_info(server):
    return server.get("/object_info")


@pytest.fixture(scope="module")
def lr_image(server) -> tuple[int, int]:
    rng = np.random.default_rng(0)
    img = (rng.random((21, 30, 3)) * 255).astype(np.uint8)
    Image.fromarray(img).save(server.input_dir / TEST_FILES["image"])
    return 21, 30


def test_nodes_are_registered_with_tooltips(object_info, models_dir):
    for node in OUR_NODES:
        assert node in object_info, f"{node} missing from /object_info"
        info = object_info[node]
        assert info["category"] == "image/upscaling/D3SR"
        for section in ("required", "optional"):
            for name, spec in info["input"].get(section, {}).items():
                assert len(spec) > 1 and spec[1].get("tooltip"), f"{node}.{name} has no tooltip"
    weights = object_info["D3SRModelLoader"]["input"]["required"]["weights"]
    options = weights[0] if isinstance(weights[0], list) else weights[1]["options"]
    assert sorted(options) == sorted(p.name for p in (models_dir / "d3sr").iterdir())


def test_templates_are_listed(server):
    templates = server.get("/workflow_templates")
    listed = {name for names in templates.values() for name in names}
    assert {p.stem for p in UI_WORKFLOWS} <= listed


def test_every_ui_workflow_has_an_api_twin():
    assert UI_WORKFLOWS, "no workflows"
    assert [p.name for p in UI_WORKFLOWS] == [p.name for p in API_WORKFLOWS]


@pytest.mark.parametrize("path", UI_WORKFLOWS, ids=lambda p: p.stem)
def test_ui_workflow_is_valid(object_info, path):
    problems = check_ui_workflow(json.loads(path.read_text()), object_info)
    assert not problems, "\n".join(problems)
    models = [m for n in json.loads(path.read_text())["nodes"]
              for m in n.get("properties", {}).get("models", [])]
    assert any("stable-diffusion-2-1-base" in m["url"] for m in models)


@pytest.mark.parametrize("path", API_WORKFLOWS, ids=lambda p: p.stem)
def test_api_workflow_runs(server, lr_image, path):
    files = dict(TEST_FILES, **WORKFLOW_FILES.get(path.stem, {}))
    graph = localise(json.loads(path.read_text()), files, prefix=path.stem)
    entry = server.run_prompt(graph)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:3000]
    saved = [img for out in entry["outputs"].values() for img in out.get("images", [])]
    assert saved, "the workflow saved no image"
    factor = next(n["inputs"]["upscale_by"] for n in graph.values() if "upscale_by" in n["inputs"])
    expected = (round(lr_image[1] * factor), round(lr_image[0] * factor))
    if "osediff" in path.stem:      # OSEDiff's steps bring each side down to a multiple of 8
        expected = tuple(s - s % 8 for s in expected)
    for img in saved:
        with Image.open(server.output_dir / img["subfolder"] / img["filename"]) as im:
            assert im.size == expected
            assert np.asarray(im).std() > 0  # not a blank image


def _error_message(server, graph: dict) -> str:
    entry = server.run_prompt(graph)
    assert entry["status"]["status_str"] == "error"
    errors = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
    assert errors, entry["status"]
    return errors[0]["exception_message"]


def test_sd1_checkpoint_is_rejected_over_the_api(server, lr_image):
    graph = localise(json.loads((ROOT / "workflows/api/d3sr_upscale_x4.json").read_text()),
                     dict(TEST_FILES, ckpt_name="tiny-sd1.safetensors"), prefix="sd1")
    message = _error_message(server, graph)
    assert "SD1.x" in message and "2.1-base" in message


def test_corrupt_weight_file_is_rejected_over_the_api(server, lr_image, models_dir):
    bad = models_dir / "d3sr" / "corrupt.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    try:
        graph = localise(json.loads((ROOT / "workflows/api/d3sr_upscale_x4.json").read_text()),
                         dict(TEST_FILES, weights="corrupt.safetensors"), prefix="corrupt")
        message = _error_message(server, graph)
        assert "corrupt.safetensors" in message and "truncated, corrupt" in message
    finally:
        bad.unlink()
