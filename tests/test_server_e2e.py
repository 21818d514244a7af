"""End to end over ComfyUI's HTTP API: the real server loads the pack, lists the nodes and
templates, validates every UI workflow and runs every API twin; the loaders' file lists and
messages, re-execution after a weight file changes, the tiled node's widget steps."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from workflow_check import check_ui_workflow, frontend_problems, localise, view_problems

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "scripts") not in sys.path:
    sys.path.append(str(ROOT / "scripts"))
from make_workflows import EXAMPLE_IMAGE, VIEW_SAFE, WORKFLOWS  # noqa: E402

UI_WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))
API_WORKFLOWS = sorted((ROOT / "workflows" / "api").glob("*.json"))
OUR_NODES = ("D3SRModelLoader", "D3SRUpscale", "D3SRTiledUpscale", "D3SROSEDiffLoader")
TEST_FILES = {"ckpt_name": "tiny-sd2.safetensors", "weights": "tiny-t399.safetensors",
              "image": "lr_test.png"}
# The OSEDiff example runs on a generated OSEDiff .pkl with the checkpoint that has a text
# encoder (its CLIP output feeds the loader; a .pkl fails without one).
WORKFLOW_FILES = {"OSEDiff Upscale x4 (released weights)": {"ckpt_name": "tiny-sd2-clip.safetensors",
                                                            "weights": "osediff-tiny.pkl"}}
UPSCALE = "D3SR Upscale x4"


@pytest.fixture(scope="module")
def object_info(server):
    return server.get("/object_info")


@pytest.fixture(scope="module")
def lr_image(server) -> tuple[int, int]:
    rng = np.random.default_rng(0)
    img = (rng.random((11, 15, 3)) * 255).astype(np.uint8)
    Image.fromarray(img).save(server.input_dir / TEST_FILES["image"])
    return 11, 15


def _options(object_info: dict, node: str, name: str) -> list:
    spec = object_info[node]["input"]["required"][name]
    return spec[0] if isinstance(spec[0], list) else spec[1]["options"]


def test_nodes_are_registered_with_tooltips(object_info):
    for node in OUR_NODES:
        assert node in object_info, f"{node} missing from /object_info"
        info = object_info[node]
        assert info["category"] == "image/upscaling/D3SR"
        for section in ("required", "optional"):
            for name, spec in info["input"].get(section, {}).items():
                assert len(spec) > 1 and spec[1].get("tooltip"), f"{node}.{name} has no tooltip"


def test_each_loader_lists_only_what_it_loads(object_info, models_dir):
    # models/d3sr holds D3SR .safetensors files and an OSEDiff .pkl (see conftest.models_dir)
    files = sorted(p.name for p in (models_dir / "d3sr").iterdir())
    assert any(f.endswith(".pkl") for f in files) and any(f.endswith(".safetensors") for f in files)
    assert sorted(_options(object_info, "D3SRModelLoader", "weights")) == \
        [f for f in files if f.endswith(".safetensors")]
    assert sorted(_options(object_info, "D3SROSEDiffLoader", "weights")) == \
        [f for f in files if f.endswith((".pkl", ".safetensors"))]


def test_templates_are_listed_with_thumbnails(server):
    templates = server.get("/workflow_templates")
    listed = {name for names in templates.values() for name in names}
    assert {p.stem for p in UI_WORKFLOWS} <= listed
    assert {p.stem for p in UI_WORKFLOWS} == set(WORKFLOWS), "run scripts/make_workflows.py"
    pack = next(k for k, names in templates.items() if UPSCALE in names)
    for path in UI_WORKFLOWS:
        thumb = path.with_suffix(".jpg")
        with Image.open(thumb) as im:  # what the template browser shows on the card
            assert im.format == "JPEG" and im.size[0] == im.size[1] >= 224, thumb.name
        # served where the frontend asks for it: /api/workflow_templates/<pack>/<name>.jpg
        url = f"{server.url}/api/workflow_templates/{urllib.parse.quote(pack)}/{urllib.parse.quote(thumb.name)}"
        with urllib.request.urlopen(url, timeout=30) as r:
            assert r.read() == thumb.read_bytes()


def test_every_ui_workflow_has_an_api_twin():
    assert UI_WORKFLOWS, "no workflows"
    assert [p.name for p in UI_WORKFLOWS] == [p.name for p in API_WORKFLOWS]


@pytest.mark.parametrize("path", UI_WORKFLOWS, ids=lambda p: p.stem)
def test_ui_workflow_is_valid(object_info, path):
    workflow = json.loads(path.read_text())
    problems = check_ui_workflow(workflow, object_info)
    problems += frontend_problems(workflow) + view_problems(workflow, VIEW_SAFE)
    assert not problems, "\n".join(problems)
    models = [m for n in workflow["nodes"] for m in n.get("properties", {}).get("models", [])]
    assert any("stable-diffusion-2-1-base" in m["url"] for m in models)


def test_templates_image_is_in_the_input_folder(server, object_info):
    # the pack copies it at start-up, so every template's Load Image finds it as shipped
    installed = server.input_dir / EXAMPLE_IMAGE
    assert installed.read_bytes() == (ROOT / "workflows" / EXAMPLE_IMAGE).read_bytes()
    images = set(_options(object_info, "LoadImage", "image"))
    for path in UI_WORKFLOWS:
        for n in json.loads(path.read_text())["nodes"]:
            if n["type"] == "LoadImage":
                assert n["widgets_values"][0] in images, f"{path.stem}: {n['widgets_values'][0]} not in input/"


def _import_pack(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
            del sys.modules[key]
    return module


def test_example_image_is_copied_once_and_never_replaces_a_file(tmp_path):
    import folder_paths
    before = folder_paths.get_input_directory()
    try:
        folder_paths.set_input_directory(str(tmp_path / "fresh"))
        _import_pack("d3sr_pack_fresh")
        copied = tmp_path / "fresh" / EXAMPLE_IMAGE
        assert copied.read_bytes() == (ROOT / "workflows" / EXAMPLE_IMAGE).read_bytes()
        assert os.stat(copied).st_mode & 0o444 == 0o444
        assert os.listdir(tmp_path / "fresh") == [EXAMPLE_IMAGE]  # no temporary file left
        mine = tmp_path / "mine"
        mine.mkdir()
        (mine / EXAMPLE_IMAGE).write_bytes(b"the user's own file")
        folder_paths.set_input_directory(str(mine))
        _import_pack("d3sr_pack_mine")
        assert (mine / EXAMPLE_IMAGE).read_bytes() == b"the user's own file"
    finally:
        folder_paths.set_input_directory(before)


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
    if "osediff" in path.stem.lower():      # OSEDiff's steps bring each side down to a multiple of 8
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


def _api(name: str) -> dict:
    return json.loads((ROOT / "workflows" / "api" / f"{name}.json").read_text())


def test_sd1_checkpoint_is_rejected_over_the_api(server, lr_image):
    graph = localise(_api(UPSCALE),
                     dict(TEST_FILES, ckpt_name="tiny-sd1.safetensors"), prefix="sd1")
    message = _error_message(server, graph)
    assert "SD1.x" in message and "2.1-base" in message


def test_corrupt_weight_file_is_rejected_over_the_api(server, lr_image, models_dir):
    bad = models_dir / "d3sr" / "corrupt.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    try:
        graph = localise(_api(UPSCALE), dict(TEST_FILES, weights="corrupt.safetensors"), prefix="corrupt")
        message = _error_message(server, graph)
        assert "corrupt.safetensors" in message and "truncated, corrupt" in message
    finally:
        bad.unlink()


def _refusal(server, graph: dict) -> str:
    """The node error /prompt answers for a graph it refuses (400), as one string."""
    status, body = server.post("/prompt", {"prompt": graph, "client_id": uuid.uuid4().hex})
    assert status == 400, (status, body)
    return json.dumps(body["node_errors"])


def test_missing_d3sr_weights_say_what_to_do(server, lr_image):
    # as shipped: the template asks for d3sr_x4.safetensors, which no models folder has
    graph = localise(_api(UPSCALE), {k: v for k, v in TEST_FILES.items() if k != "weights"}, prefix="missing")
    assert graph["2"]["inputs"]["weights"] == "d3sr_x4.safetensors"
    message = _refusal(server, graph)
    for words in ("d3sr_x4.safetensors", "not found", "No official D3SR weights", "docs/training.md",
                  "Load OSEDiff Model", "osediff.pkl"):
        assert words in message, (words, message)


def test_missing_osediff_weights_say_where_to_get_them(server, lr_image):
    name = "OSEDiff Upscale x4 (released weights)"
    files = {k: v for k, v in dict(TEST_FILES, **WORKFLOW_FILES[name]).items() if k != "weights"}
    graph = localise(_api(name), files, prefix="missing")
    message = _refusal(server, graph)
    for words in ("osediff.pkl", "not found", "raw.githubusercontent.com/cswry/OSEDiff", "models", "convert"):
        assert words in message, (words, message)


def test_pickle_in_the_d3sr_loader_is_refused_before_the_run(server, lr_image):
    graph = localise(_api(UPSCALE), dict(TEST_FILES, weights="osediff-tiny.pkl"), prefix="pkl")
    message = _refusal(server, graph)
    assert "osediff-tiny.pkl" in message and "Load OSEDiff Model" in message


def test_tiled_widgets_step_as_the_code_rounds(object_info):
    required = object_info["D3SRTiledUpscale"]["input"]["required"]
    tile, overlap = required["tile_size"][1], required["tile_overlap"][1]
    assert (tile["step"], tile["min"], tile["default"] % 64) == (64, 64, 0)   # SD2.1: 64-px UNet alignment
    assert (overlap["step"], overlap["min"], overlap["default"] % 64) == (64, 0, 0)
    assert overlap["max"] == tile["max"] // 2                                  # at most half a tile


def test_tiled_adjustment_is_logged_once_per_run(server, lr_image):
    # the tiny test UNet has two levels: sizes in 16-px steps (SD2.1: 64). 200 -> 192 (nearest),
    # overlap 300 -> capped at half the 192-px tile in 16-px steps = 96.
    graph = localise(_api("D3SR Tiled Upscale x4 (any size)"), TEST_FILES, prefix="adjusted")
    graph["4"]["inputs"].update(tile_size=200, tile_overlap=300, upscale_by=2.0)
    line = ("D3SR Tiled: tile_size 200 -> 192 px (a multiple of 16 for this model); "
            "tile_overlap 300 -> 96 px (at most half a tile, in 16-px steps).")
    before = server.log_path.read_text().count(line)
    entry = server.run_prompt(graph)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:2000]
    assert server.log_path.read_text().count(line) == before + 1
    graph["4"]["inputs"].update(tile_size=192, tile_overlap=32)
    entry = server.run_prompt(graph)  # values the code uses as given: nothing logged
    assert entry["status"]["status_str"] == "success"
    assert "D3SR Tiled: tile_size 192" not in server.log_path.read_text()
    assert "tile_overlap 32 ->" not in server.log_path.read_text()


def _saved(server, entry: dict) -> np.ndarray:
    img = next(i for out in entry["outputs"].values() for i in out.get("images", []))
    with Image.open(server.output_dir / img["subfolder"] / img["filename"]) as im:
        return np.asarray(im).astype(np.int16)


def _cached(entry: dict) -> list[str]:
    return next(m[1]["nodes"] for m in entry["status"]["messages"] if m[0] == "execution_cached")


def test_loader_runs_again_when_the_weight_file_changes(server, lr_image, models_dir):
    d3sr = models_dir / "d3sr"
    path = d3sr / "rewritten.safetensors"
    shutil.copyfile(d3sr / "tiny-t399.safetensors", path)
    try:
        graph = localise(_api(UPSCALE), dict(TEST_FILES, weights=path.name), prefix="rewritten")
        first = server.run_prompt(graph)
        assert first["status"]["status_str"] == "success"
        again = server.run_prompt(graph)   # same file: the loader's output is reused
        assert "2" in _cached(again)
        # the trainer replaces the file (new weights, new timestep) under the same name
        tmp = d3sr / ".rewritten.tmp"
        shutil.copyfile(d3sr / "tiny-t250.safetensors", tmp)
        os.replace(tmp, path)
        changed = server.run_prompt(graph)
        assert changed["status"]["status_str"] == "success"
        assert "2" not in _cached(changed), "the loader was not run again after its file changed"
        assert np.abs(_saved(server, changed) - _saved(server, first)).max() > 0
    finally:
        path.unlink(missing_ok=True)
