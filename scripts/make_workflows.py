"""Write the example workflows: a UI-format file in workflows/ (what ComfyUI lists as a template
of this pack, and what users share) and its API-format twin in workflows/api/ (what the tests
execute), both from one compact graph description below; plus the templates' example image
(workflows/d3sr_example_lr.png, drawn here, only when missing).

    python scripts/make_workflows.py            # the workflows (and the image if missing)
    python scripts/make_workflows.py --images   # also the template thumbnails and the README
                                                # screenshot, from the real frontend in Chromium

A graph is a list of Node(id, type, widgets, inputs, outputs, pos, size): widgets in the order
ComfyUI shows them, inputs {socket name: (source node id, output slot)}, outputs [(name, TYPE)],
pos/size in canvas units. The file name is the card title ComfyUI shows (1.32.9 shows custom
templates by file name). Each template carries a Markdown note with the three files it needs.
The tests check every file against the live server and in the browser.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import uuid
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # appended: ComfyUI's own `nodes` module must not be shadowed by ours
    sys.path.append(ROOT)

from d3sr_core.atomic_file import atomic_path, write_text_atomic  # noqa: E402

SD21_BASE = {"name": "v2-1_512-ema-pruned.safetensors",
             "url": "https://huggingface.co/stabilityai/stable-diffusion-2-1-base/resolve/main/"
                    "v2-1_512-ema-pruned.safetensors",
             "directory": "checkpoints"}
SD21_PAGE = "https://huggingface.co/stabilityai/stable-diffusion-2-1-base"
OSEDIFF_URL = "https://raw.githubusercontent.com/cswry/OSEDiff/main/preset/models/osediff.pkl"
CONVERT = "python -m d3sr_core.osediff convert osediff.pkl osediff.safetensors"
D3SR_WEIGHTS = "d3sr_x4.safetensors"
EXAMPLE_IMAGE = "d3sr_example_lr.png"   # the pack copies it into ComfyUI/input/ (see __init__.py)
EXAMPLE_SIZE = 128                      # px; x4 gives SD2.1-base's native 512
VIRTUAL = {"MarkdownNote", "Note"}      # frontend-only nodes: not in the API twin
VIEW = (1280, 720)                      # the canvas every saved view must show all nodes on
# The part of a 1280x720 page where nodes are not hidden by the frontend's own panels (1.32.9:
# side bar on the left, tabs and workflow name on top, the Run bar top right, the minimap
# bottom right): the saved view places every node inside.
VIEW_SAFE = (80, 140, 1000, 705)        # x0, y0, x1, y1 in CSS pixels
TITLE_H = 30                            # LiteGraph.NODE_TITLE_HEIGHT: drawn above pos


@dataclass
class Node:
    id: int
    type: str
    widgets: dict = field(default_factory=dict)       # widget name -> value, in display order
    inputs: dict = field(default_factory=dict)        # socket name -> (src id, src slot)
    outputs: list = field(default_factory=list)       # [(name, TYPE)]
    input_types: dict = field(default_factory=dict)   # socket name -> TYPE
    models: list = field(default_factory=list)        # download entries for the UI
    extra_widget_values: list = field(default_factory=list)  # UI-only widget values (e.g. upload)
    pos: tuple = (0, 0)
    size: tuple = (320, 110)


def checkpoint_node(id_: int, pos: tuple) -> Node:
    return Node(id_, "CheckpointLoaderSimple", {"ckpt_name": SD21_BASE["name"]},
                outputs=[("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")], models=[SD21_BASE],
                pos=pos, size=(300, 100))


def d3sr_loader_node(id_: int, ckpt: int, pos: tuple) -> Node:
    return Node(id_, "D3SRModelLoader", {"weights": D3SR_WEIGHTS, "strength": 1.0},
                inputs={"model": (ckpt, 0), "vae": (ckpt, 2)},
                input_types={"model": "MODEL", "vae": "VAE"}, outputs=[("d3sr_model", "D3SR_MODEL")],
                pos=pos, size=(300, 110))


def load_image_node(id_: int, pos: tuple) -> Node:
    return Node(id_, "LoadImage", {"image": EXAMPLE_IMAGE}, outputs=[("IMAGE", "IMAGE"), ("MASK", "MASK")],
                extra_widget_values=["image"], pos=pos, size=(300, 300))


def upscale_node(id_: int, loader: int, image: int, pos: tuple, tiled: bool = False) -> Node:
    widgets = {"upscale_by": 4.0, "colour_fix": "adain"}
    if tiled:
        widgets.update(tile_size=512, tile_overlap=64, vae_tile_size=0)
    return Node(id_, "D3SRTiledUpscale" if tiled else "D3SRUpscale", widgets,
                inputs={"d3sr_model": (loader, 0), "image": (image, 0)},
                input_types={"d3sr_model": "D3SR_MODEL", "image": "IMAGE"}, outputs=[("IMAGE", "IMAGE")],
                pos=pos, size=(300, 190 if tiled else 120))


def save_image_node(id_: int, src: int, prefix: str, pos: tuple) -> Node:
    return Node(id_, "SaveImage", {"filename_prefix": prefix}, inputs={"images": (src, 0)},
                input_types={"images": "IMAGE"}, pos=pos, size=(300, 330))


def note_node(id_: int, text: str, pos: tuple) -> Node:
    return Node(id_, "MarkdownNote", {"text": text}, pos=pos, size=(640, 120))


# The three-line recipes: which files, which folder, where from.
SD21_LINE = (f"1. `{SD21_BASE['name']}` → `ComfyUI/models/checkpoints/`, from "
             f"[{SD21_PAGE.split('//')[1]}]({SD21_PAGE}).")
NOTE_TITLE = "Before you press Run: the files this needs"
D3SR_NOTE = f"""{SD21_LINE}
2. `{D3SR_WEIGHTS}` (or any D3SR `.safetensors`) → `ComfyUI/models/d3sr/`: **no official D3SR weights exist**; \
train them (`docs/training.md` of this pack). Real results today: the *OSEDiff Upscale x4* template \
with OSEDiff's released weights.
3. `{EXAMPLE_IMAGE}` is copied into `ComfyUI/input/` by the pack; pick your own photo in Load Image.
"""

OSEDIFF_NOTE = f"""{SD21_LINE}
2. `osediff.pkl` → `ComfyUI/models/d3sr/`, from [{OSEDIFF_URL.split('//')[1]}]({OSEDIFF_URL}) \
(or convert it: `{CONVERT}`).
3. `{EXAMPLE_IMAGE}` is copied into `ComfyUI/input/` by the pack; pick your own photo in Load Image, \
then press R to refresh the file lists.
"""

# Columns: the loaders and the image left, the model loader and the upscaler in the middle,
# Save Image right; the note under the middle and right columns.
COL = (0, 340, 680)


def upscale_graph() -> list[Node]:
    return [
        checkpoint_node(1, (COL[0], 0)),
        d3sr_loader_node(2, 1, (COL[1], 0)),
        load_image_node(3, (COL[0], 160)),
        upscale_node(4, 2, 3, (COL[1], 170)),
        save_image_node(5, 4, "D3SR/x4", (COL[2], 0)),
        note_node(6, D3SR_NOTE, (COL[1], 380)),
    ]


def osediff_graph() -> list[Node]:
    """OSEDiff's released weights through the same upscaler (prompt from SD2.1's CLIP)."""
    return [
        checkpoint_node(1, (COL[0], 0)),
        Node(2, "D3SROSEDiffLoader", {"weights": "osediff.pkl", "strength": 1.0, "prompt": ""},
             inputs={"model": (1, 0), "vae": (1, 2), "clip": (1, 1)},
             input_types={"model": "MODEL", "vae": "VAE", "clip": "CLIP"},
             outputs=[("d3sr_model", "D3SR_MODEL")], pos=(COL[1], 0), size=(300, 200)),
        load_image_node(3, (COL[0], 160)),
        upscale_node(4, 2, 3, (COL[1], 260)),
        save_image_node(5, 4, "OSEDiff/x4", (COL[2], 0)),
        note_node(6, OSEDIFF_NOTE, (COL[1], 420)),
    ]


def tiled_graph() -> list[Node]:
    """D3SR at any output size: the tiled node with its default tiles (VAE tile automatic)."""
    return [
        checkpoint_node(1, (COL[0], 0)),
        d3sr_loader_node(2, 1, (COL[1], 0)),
        load_image_node(3, (COL[0], 160)),
        upscale_node(4, 2, 3, (COL[1], 170), tiled=True),
        save_image_node(5, 4, "D3SR/x4_tiled", (COL[2], 0)),
        note_node(6, D3SR_NOTE, (COL[1], 400)),
    ]


# File name (= the card title in ComfyUI's template browser) -> graph.
WORKFLOWS = {"D3SR Upscale x4": upscale_graph,
             "D3SR Tiled Upscale x4 (any size)": tiled_graph,
             "OSEDiff Upscale x4 (released weights)": osediff_graph}
README_SCREENSHOT = os.path.join("docs", "images", "template_d3sr_upscale_x4.png")


def to_api(graph: list[Node]) -> dict:
    """API format: {"id": {"class_type", "inputs": {name: value | [src, slot]}}}."""
    out = {}
    for n in graph:
        if n.type in VIRTUAL:
            continue
        inputs = dict(n.widgets)
        inputs.update({k: [str(src), slot] for k, (src, slot) in n.inputs.items()})
        out[str(n.id)] = {"class_type": n.type, "inputs": inputs, "_meta": {"title": n.type}}
    return out


def fit_view(graph: list[Node], safe: tuple = VIEW_SAFE) -> dict:
    """extra.ds {scale, offset} showing every node (title bar included) inside `safe` (CSS px
    of the page); the frontend draws canvas point p at (p + offset) * scale."""
    safe = (safe[0] + 2, safe[1] + 2, safe[2] - 2, safe[3] - 2)  # room for the rounding below
    x0 = min(n.pos[0] for n in graph)
    y0 = min(n.pos[1] - TITLE_H for n in graph)
    x1 = max(n.pos[0] + n.size[0] for n in graph)
    y1 = max(n.pos[1] + n.size[1] for n in graph)
    w, h = safe[2] - safe[0], safe[3] - safe[1]
    scale = min(1.0, w / (x1 - x0), h / (y1 - y0))
    # centred in the safe area
    left = safe[0] + (w - scale * (x1 - x0)) / 2
    top = safe[1] + (h - scale * (y1 - y0)) / 2
    return {"scale": round(scale, 4), "offset": [round(left / scale - x0, 2), round(top / scale - y0, 2)]}


def to_ui(graph: list[Node], name: str) -> dict:
    """UI (litegraph) format: nodes with positions, links, widgets_values by position."""
    links, link_of = [], {}
    for n in graph:
        for slot, (sock, (src, src_slot)) in enumerate(n.inputs.items()):
            link_id = len(links) + 1
            links.append([link_id, src, src_slot, n.id, slot, n.input_types[sock]])
            link_of[(n.id, sock)] = link_id
    nodes = []
    for order, n in enumerate(graph):
        outputs = []
        for slot, (out_name, typ) in enumerate(n.outputs):
            outs = [lk[0] for lk in links if lk[1] == n.id and lk[2] == slot]
            outputs.append({"name": out_name, "type": typ, "links": outs, "slot_index": slot})
        props = {} if n.type in VIRTUAL else {"Node name for S&R": n.type}
        if n.models:
            props["models"] = n.models
        node = {
            "id": n.id, "type": n.type, "pos": list(n.pos), "size": list(n.size),
            "flags": {}, "order": order, "mode": 0,
            "inputs": [{"name": k, "type": n.input_types[k], "link": link_of[(n.id, k)]} for k in n.inputs],
            "outputs": outputs, "properties": props,
            "widgets_values": list(n.widgets.values()) + n.extra_widget_values,
        }
        if n.type in VIRTUAL:
            node["title"], node["color"], node["bgcolor"] = NOTE_TITLE, "#432", "#653"
        nodes.append(node)
    return {"id": str(uuid.uuid5(uuid.NAMESPACE_URL, "d3sr/workflows/" + name)), "revision": 0,
            "last_node_id": max(n.id for n in graph), "last_link_id": len(links),
            "nodes": nodes, "links": links, "groups": [], "config": {},
            "extra": {"ds": fit_view(graph)}, "version": 0.4}


def draw_example_image(path: str, size: int = EXAMPLE_SIZE, seed: int = 0) -> None:
    """A small low-resolution test picture of our own making: a scene with edges, thin lines,
    text and texture drawn at 4x and downscaled (bicubic), as a photo's LR input would be."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFont

    big = size * 4
    rng = np.random.default_rng(seed)
    y = np.linspace(0, 1, big)[:, None, None]
    sky = (np.array([70, 130, 200]) * (1 - y) + np.array([200, 225, 245]) * y).repeat(big, 1)
    img = Image.fromarray(sky.astype(np.uint8))
    d = ImageDraw.Draw(img)
    s = big / 512
    d.ellipse([400 * s, 40 * s, 470 * s, 110 * s], fill=(255, 220, 120))
    d.polygon([(0, 300 * s), (140 * s, 170 * s), (260 * s, 290 * s), (380 * s, 190 * s),
               (512 * s, 300 * s), (512 * s, 512 * s), (0, 512 * s)], fill=(90, 110, 95))
    d.rectangle([0, 330 * s, big, big], fill=(80, 140, 60))
    for _ in range(900):  # grass blades: fine texture
        gx, gy = rng.uniform(0, big), rng.uniform(335 * s, big)
        d.line([gx, gy, gx + rng.uniform(-3, 3) * s, gy - rng.uniform(4, 12) * s],
               fill=tuple(int(v) for v in rng.integers([40, 100, 30], [90, 170, 70])), width=max(1, int(s)))
    d.rectangle([150 * s, 240 * s, 330 * s, 380 * s], fill=(200, 80, 60))            # house
    for bx in range(150, 330, 12):                                                   # brick joints
        d.line([bx * s, 240 * s, bx * s, 380 * s], fill=(150, 60, 45), width=1)
    for by in range(240, 380, 8):
        d.line([150 * s, by * s, 330 * s, by * s], fill=(150, 60, 45), width=1)
    d.polygon([(135 * s, 245 * s), (240 * s, 170 * s), (345 * s, 245 * s)], fill=(70, 50, 60))
    for wx in (175, 265):                                                            # windows
        d.rectangle([wx * s, 270 * s, (wx + 40) * s, 310 * s], fill=(230, 240, 250), outline=(40, 40, 40),
                    width=int(2 * s))
        d.line([(wx + 20) * s, 270 * s, (wx + 20) * s, 310 * s], fill=(40, 40, 40), width=int(2 * s))
        d.line([wx * s, 290 * s, (wx + 40) * s, 290 * s], fill=(40, 40, 40), width=int(2 * s))
    d.rectangle([225 * s, 320 * s, 255 * s, 380 * s], fill=(90, 60, 40))             # door
    for fx in range(20, 140, 10):                                                    # fence
        d.line([fx * s, 360 * s, fx * s, 410 * s], fill=(240, 240, 230), width=int(2 * s))
    d.line([15 * s, 375 * s, 140 * s, 375 * s], fill=(240, 240, 230), width=int(2 * s))
    d.ellipse([380 * s, 230 * s, 480 * s, 330 * s], fill=(50, 110, 50))              # tree
    d.rectangle([422 * s, 320 * s, 438 * s, 390 * s], fill=(100, 70, 40))
    font = ImageFont.load_default(size=int(44 * s))
    d.text((30 * s, 430 * s), "D3SR x4", fill=(255, 255, 255), font=font, stroke_width=int(2 * s),
           stroke_fill=(30, 30, 30))
    small = img.resize((size, size), Image.Resampling.BICUBIC)
    with atomic_path(path) as tmp:
        small.save(tmp, format="PNG", optimize=True)


def write_files() -> None:
    image = os.path.join(ROOT, "workflows", EXAMPLE_IMAGE)
    if not os.path.exists(image):
        draw_example_image(image)
        print("wrote", os.path.relpath(image, ROOT))
    for name, make in WORKFLOWS.items():
        graph = make()
        for path, data in ((os.path.join(ROOT, "workflows", name + ".json"), to_ui(graph, name)),
                           (os.path.join(ROOT, "workflows", "api", name + ".json"), to_api(graph))):
            write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")
            print("wrote", os.path.relpath(path, ROOT))


def write_images() -> None:
    """Thumbnails (workflows/<name>.jpg, square, what the template browser shows on a card) and
    the README screenshot, from the templates loaded in the real frontend."""
    sys.path.append(os.path.join(ROOT, "scripts"))
    from comfy_ui_session import ui_session

    from d3sr_core import host
    with ui_session(host.find_comfyui(), os.path.join(ROOT, "out", "make_workflows")) as ui:
        for name in WORKFLOWS:
            ui.load_template(name)
            if name == "D3SR Upscale x4":
                ui.screenshot_png(os.path.join(ROOT, README_SCREENSHOT), colours=96)
                print("wrote", README_SCREENSHOT)
            ui.thumbnail(os.path.join(ROOT, "workflows", name + ".jpg"))
            print("wrote", os.path.join("workflows", name + ".jpg"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", action="store_true",
                        help="also render the thumbnails and the README screenshot (needs Chromium "
                             "and comfyui-frontend-package)")
    args = parser.parse_args()
    write_files()
    if args.images:
        write_images()


if __name__ == "__main__":
    main()
