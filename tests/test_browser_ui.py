"""The ComfyUI user's first minutes, in the real web page: headless Chromium on the frontend
package the pinned ComfyUI names (comfyui-frontend-package 1.32.9), driven over the DevTools
protocol (scripts/chromium_cdp.py, scripts/comfy_ui_session.py).

For each template: the template browser lists it with its thumbnail; picked there, it loads
with no missing-node dialog and no missing-model entry the template's note does not explain,
its Load Image finds the pack's example image, and its saved view shows every node on a
1280x720 page. With generated tiny models under the templates' own file names, Run (the
page's app.queuePrompt) puts an image in Save Image. The node library shows the four nodes
under image/upscaling/D3SR, the search finds them, and their titles fit the default width.

Screenshots of each loaded template and of one finished run go to out/browser_ui/.
Skipped, with the reason, only when no Chromium is installed and $D3SR_REQUIRE_BROWSER is
unset (.ci/run sets it, so CI fails instead).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest
from PIL import Image
from workflow_check import ALLOWED_SOURCES, ALLOWED_SUFFIXES, note_text

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "scripts") not in sys.path:
    sys.path.append(str(ROOT / "scripts"))

from chromium_cdp import INSTALL_HINT, chromium_version, find_chromium  # noqa: E402
from comfy_ui_session import THUMB_PX, page_session  # noqa: E402
from make_workflows import EXAMPLE_IMAGE, EXAMPLE_SIZE, VIEW, WORKFLOWS  # noqa: E402

ARTIFACTS = ROOT / "out" / "browser_ui"
TEMPLATES = list(WORKFLOWS)
OUR_TITLES = {"D3SRModelLoader": "Load D3SR Model", "D3SROSEDiffLoader": "Load OSEDiff Model",
              "D3SRUpscale": "D3SR Super-Resolution", "D3SRTiledUpscale": "D3SR Super-Res (tiled)"}
# Generated tiny models under the file names the templates ship with (conftest.models_dir).
SHIPPED_AS = {"checkpoints/v2-1_512-ema-pruned.safetensors": "checkpoints/tiny-sd2-clip.safetensors",
              "d3sr/d3sr_x4.safetensors": "d3sr/tiny-t399.safetensors",
              "d3sr/osediff.pkl": "d3sr/osediff-tiny.pkl"}
# Frontend panels a node must not sit under in the saved view: the left side bar, the tabs and
# the workflow name / Run bar on top (measured on 1.32.9 at 1280x720); the minimap is measured.
PANELS_LEFT, PANELS_TOP = 60, 132


def _template(name: str) -> dict:
    return json.loads((ROOT / "workflows" / f"{name}.json").read_text())


@pytest.fixture(scope="module")
def ui(server, models_dir):
    """The session's ComfyUI server (conftest: with the frontend, and server.extra_models, a
    models folder first without the templates' files, then holding links to the tiny models
    under their names, tiny-sd2-clip among them, and empty again afterwards: the API tests on
    the same server see the models folders they were written for), and its page open in Chromium."""
    binary = find_chromium()
    if binary is None:
        if os.environ.get("D3SR_REQUIRE_BROWSER"):
            pytest.fail(f"D3SR_REQUIRE_BROWSER is set but no Chromium was found: {INSTALL_HINT}")
        pytest.skip(f"no Chromium: {INSTALL_HINT} (make setup installs it when run as root)")
    pytest.importorskip("comfyui_frontend_package", reason="comfyui-frontend-package is not installed: "
                        "run `make setup` (requirements-dev.txt pins it)")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with page_session(server) as session:
        session.models, session.models_source = server.extra_models, models_dir
        version = chromium_version(binary)
        (ARTIFACTS / "browser.txt").write_text(f"{version}\npage ready in {time.monotonic() - started:.1f} s\n")
        yield session
        _models_in_place(session, present=False)
        (ARTIFACTS / "page_errors.txt").write_text("\n".join(session.browser.console) + "\n")


def _models_in_place(ui, present: bool) -> None:
    for shipped, tiny in SHIPPED_AS.items():
        link = ui.models / shipped
        if present and not link.exists():
            link.symlink_to(ui.models_source / tiny)
        elif not present and link.is_symlink():
            link.unlink()


def test_template_browser_lists_every_template_with_its_thumbnail(ui):
    listed = ui.js("fetch('/api/workflow_templates').then(r => r.json())")
    pack = next(k for k, names in listed.items() if TEMPLATES[0] in names)
    assert set(TEMPLATES) <= set(listed[pack])
    cards = {c["name"]: c for c in ui.open_templates()}
    ui.screenshot(ARTIFACTS / "template_browser.png")
    for name in TEMPLATES:
        assert name in cards, f"the template browser shows no card for '{name}'"
        card = cards[name]
        assert name in card["text"]  # the card's title is the file name: readable on purpose
        # the card shows our square thumbnail (the frontend fetches it from
        # /api/workflow_templates/<pack>/<name>.jpg), not its 224-px default-template.png
        assert "default-template" not in card["img"] and card["imgWidth"] == THUMB_PX, card


@pytest.mark.parametrize("name", TEMPLATES)
def test_template_loads_with_everything_explained(ui, name):
    _models_in_place(ui, present=False)  # as on a fresh install: none of the templates' model files
    loaded = ui.load_template(name)
    if loaded["dialogs"]:
        ui.browser.screenshot(ARTIFACTS / f"dialog on loading - {name}.png")
    ui.screenshot(ARTIFACTS / f"loaded - {name}.png")
    assert loaded["workflow"] == name
    assert not loaded["missingNodes"], f"missing nodes: {loaded['missingNodes']}"
    assert "global-missing-nodes" not in loaded["dialogs"]
    note = note_text(_template(name))
    for m in loaded["missingModels"]:  # the frontend lists these in its Missing Models dialog
        assert m["name"] in note, f"missing model {m['name']} is not explained in the note"
        assert m["url"].startswith(ALLOWED_SOURCES) and m["name"].endswith(ALLOWED_SUFFIXES), m
    dialog = "\n".join(loaded["dialogTexts"])
    assert "not allowed" not in dialog and "Only allowed suffixes" not in dialog, dialog
    # Load Image: the shipped image is in its list, and its preview loads
    image = ui.js("(() => { const n = app.graph.nodes.find(n => n.type === 'LoadImage');"
                  " const w = n.widgets.find(w => w.name === 'image');"
                  " return {value: w.value, options: w.options.values} })()")
    assert image["value"] in image["options"], f"Load Image asks for {image['value']}: not in the input folder"
    assert image["value"] == EXAMPLE_IMAGE
    size = ui.browser.wait_for("(() => { const n = app.graph.nodes.find(n => n.type === 'LoadImage');"
                               " const i = n.imgs && n.imgs[0]; return i && i.complete && i.naturalWidth"
                               " ? [i.naturalWidth, i.naturalHeight] : null })()", 20, what="the Load Image preview")
    assert size == [EXAMPLE_SIZE, EXAMPLE_SIZE]
    # the saved view shows every node on a 1280x720 page, clear of the frontend's panels
    boxes = ui.node_boxes()
    assert (boxes["innerWidth"], boxes["innerHeight"]) == VIEW
    mm = boxes["minimap"]
    for b in boxes["nodes"]:
        where = f"{b['title']} at ({b['x0']:.0f}, {b['y0']:.0f})-({b['x1']:.0f}, {b['y1']:.0f})"
        assert b["x0"] >= PANELS_LEFT and b["y0"] >= PANELS_TOP, where
        assert b["x1"] <= VIEW[0] and b["y1"] <= VIEW[1], where
        if mm:
            assert b["x1"] <= mm["x0"] or b["y1"] <= mm["y0"] or b["x0"] >= mm["x1"] or b["y0"] >= mm["y1"], \
                f"{where} is under the minimap"
    # titles are drawn whole: no node narrower than its title needs
    widths = ui.js("app.graph.nodes.map(n => { const c = document.createElement('canvas').getContext('2d');"
                   " c.font = n.titleFontStyle; return [n.title, n.size[0],"
                   " c.measureText(n.title).width + LiteGraph.NODE_TITLE_HEIGHT * 1.33] })")
    for title, width, need in widths:
        assert width >= need, f"'{title}' needs {need:.0f} px, the node is {width:.0f}"


def _small_image(ui) -> str:
    """A 32 x 32 crop of the example image in the server's input folder; its file name."""
    name = "d3sr_test_32.png"
    if not (ui.server.input_dir / name).exists():
        with Image.open(ROOT / "workflows" / EXAMPLE_IMAGE) as im:
            im.crop((0, 0, 32, 32)).save(ui.server.input_dir / name)
    return name


@pytest.mark.parametrize("name", TEMPLATES)
def test_template_runs_from_the_page(ui, name):
    _models_in_place(ui, present=True)
    loaded = ui.load_template(name)
    assert not loaded["missingNodes"]
    # x1 keeps the CPU run short (the shipped x4 makes 512 px), and so does, after the first
    # template, a 32-px crop of the example image (that each template's Load Image finds the
    # example is test_template_loads_with_everything_explained's check); all else runs as shipped
    image = json.dumps(EXAMPLE_IMAGE if name == TEMPLATES[0] else _small_image(ui))
    ui.js("(() => { for (const n of app.graph.nodes) for (const w of n.widgets || []) {"
          " if (w.name === 'upscale_by') { w.value = 1; w.callback?.(1) }"
          f" if (n.type === 'LoadImage' && w.name === 'image') {{ w.value = {image}; w.callback?.({image}) }} }}"
          " return 1 })()")
    answer = ui.queue()
    assert "error" not in answer and not answer.get("node_errors"), answer
    ui.js("app.canvas.pause_rendering = true; 1")  # no redraws while the CPU runs the graph
    try:
        entry = ui.wait_for_run(answer["prompt_id"])
    finally:
        ui.js("app.canvas.pause_rendering = false; 1")
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:3000]
    save_id = next(str(n["id"]) for n in _template(name)["nodes"] if n["type"] == "SaveImage")
    saved = entry["outputs"][save_id]["images"]
    path = ui.server.output_dir / saved[0]["subfolder"] / saved[0]["filename"]
    side = EXAMPLE_SIZE if name == TEMPLATES[0] else 32      # x1 of the image it was given
    with Image.open(path) as out:
        assert out.size == (side, side)
    shown = ui.shown_outputs(int(save_id))
    assert shown[0]["filename"] == saved[0]["filename"]
    if name == TEMPLATES[0]:
        ui.browser.wait_for(f"(() => {{ const n = app.graph.getNodeById({save_id});"
                            f" return !!(n.imgs && n.imgs[0] && n.imgs[0].complete) }})()", 20,
                            what="Save Image to show the result")
        ui.screenshot(ARTIFACTS / f"finished run - {name}.png")


def test_node_library_shows_the_four_nodes(ui):
    leaves = ui.node_library(["image", "upscaling", "D3SR"])
    assert sorted(leaves) == sorted(OUR_TITLES.values())


def test_search_finds_the_nodes(ui):
    ours = set(OUR_TITLES.values())
    for query in ("super resolution", "super-resolution"):
        assert "D3SR Super-Resolution" in ui.search_nodes(query), query
    assert ours <= set(ui.search_nodes("SR")[:8])
    assert set(ui.search_nodes("d3sr")[:4]) == ours
    upscale = ui.search_nodes("upscale")
    # listed, after the core nodes whose names start with "Upscale" (the frontend ranks a
    # name that starts with the query first, shorter names first)
    assert {"D3SR Super-Resolution", "D3SR Super-Res (tiled)"} <= set(upscale[:12]), upscale[:12]


def test_titles_fit_the_default_node_width(ui):
    widths = ui.title_widths(list(OUR_TITLES))
    for node, w in widths.items():
        assert w["title"] == OUR_TITLES[node]
        assert w["need"] <= w["bare"], f"'{w['title']}' widens the node from {w['bare']} to {w['need']:.0f} px"
