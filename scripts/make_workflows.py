"""Write the example workflows: a UI-format file in workflows/ (what ComfyUI lists as a template
and users share) and its API-format twin in workflows/api/ (what the tests execute), both from
one compact graph description below. Run: python scripts/make_workflows.py

A graph is a list of Node(id, type, widgets, inputs, outputs): widgets in the order ComfyUI
shows them, inputs {socket name: (source node id, output slot)}, outputs [(name, TYPE)].
The e2e tests check every file against the live server's /object_info.
"""

from __future__ import annotations

import json
import os
import sys
import uuid
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from d3sr_core.atomic_file import write_text_atomic  # noqa: E402

SD21_BASE = {"name": "v2-1_512-ema-pruned.safetensors",
             "url": "https://huggingface.co/stabilityai/stable-diffusion-2-1-base/resolve/main/"
                    "v2-1_512-ema-pruned.safetensors",
             "directory": "checkpoints"}
EXAMPLE_IMAGE = "d3sr_example_lr.png"


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


def checkpoint_node(id_: int) -> Node:
    return Node(id_, "CheckpointLoaderSimple", {"ckpt_name": SD21_BASE["name"]},
                outputs=[("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")], models=[SD21_BASE])


def d3sr_loader_node(id_: int, ckpt: int) -> Node:
    return Node(id_, "D3SRModelLoader", {"weights": "d3sr_x4.safetensors", "strength": 1.0},
                inputs={"model": (ckpt, 0), "vae": (ckpt, 2)},
                input_types={"model": "MODEL", "vae": "VAE"}, outputs=[("d3sr_model", "D3SR_MODEL")])


def load_image_node(id_: int) -> Node:
    return Node(id_, "LoadImage", {"image": EXAMPLE_IMAGE}, outputs=[("IMAGE", "IMAGE"), ("MASK", "MASK")],
                extra_widget_values=["image"])


def save_image_node(id_: int, src: int, prefix: str) -> Node:
    return Node(id_, "SaveImage", {"filename_prefix": prefix}, inputs={"images": (src, 0)},
                input_types={"images": "IMAGE"})


def upscale_graph() -> list[Node]:
    return [
        checkpoint_node(1),
        d3sr_loader_node(2, 1),
        load_image_node(3),
        Node(4, "D3SRUpscale", {"upscale_by": 4.0, "colour_fix": "adain"},
             inputs={"d3sr_model": (2, 0), "image": (3, 0)},
             input_types={"d3sr_model": "D3SR_MODEL", "image": "IMAGE"}, outputs=[("IMAGE", "IMAGE")]),
        save_image_node(5, 4, "D3SR/x4"),
    ]


OSEDIFF = {"name": "osediff.pkl",
           "url": "https://raw.githubusercontent.com/cswry/OSEDiff/main/preset/models/osediff.pkl",
           "directory": "d3sr"}


def osediff_graph() -> list[Node]:
    """OSEDiff's released weights through the same upscaler (prompt from SD2.1's CLIP)."""
    return [
        checkpoint_node(1),
        Node(2, "D3SROSEDiffLoader", {"weights": "osediff.pkl", "strength": 1.0, "prompt": ""},
             inputs={"model": (1, 0), "vae": (1, 2), "clip": (1, 1)},
             input_types={"model": "MODEL", "vae": "VAE", "clip": "CLIP"},
             outputs=[("d3sr_model", "D3SR_MODEL")], models=[OSEDIFF]),
        load_image_node(3),
        Node(4, "D3SRUpscale", {"upscale_by": 4.0, "colour_fix": "adain"},
             inputs={"d3sr_model": (2, 0), "image": (3, 0)},
             input_types={"d3sr_model": "D3SR_MODEL", "image": "IMAGE"}, outputs=[("IMAGE", "IMAGE")]),
        save_image_node(5, 4, "OSEDiff/x4"),
    ]


def tiled_graph() -> list[Node]:
    """D3SR at any output size: the tiled node with its default tiles (VAE tile automatic)."""
    return [
        checkpoint_node(1),
        d3sr_loader_node(2, 1),
        load_image_node(3),
        Node(4, "D3SRTiledUpscale", {"upscale_by": 4.0, "colour_fix": "adain", "tile_size": 512,
                                     "tile_overlap": 64, "vae_tile_size": 0},
             inputs={"d3sr_model": (2, 0), "image": (3, 0)},
             input_types={"d3sr_model": "D3SR_MODEL", "image": "IMAGE"}, outputs=[("IMAGE", "IMAGE")]),
        save_image_node(5, 4, "D3SR/x4_tiled"),
    ]


WORKFLOWS = {"d3sr_upscale_x4": upscale_graph, "osediff_upscale_x4": osediff_graph,
             "d3sr_tiled_upscale_x4": tiled_graph}


def to_api(graph: list[Node]) -> dict:
    """API format: {"id": {"class_type", "inputs": {name: value | [src, slot]}}}."""
    out = {}
    for n in graph:
        inputs = dict(n.widgets)
        inputs.update({k: [str(src), slot] for k, (src, slot) in n.inputs.items()})
        out[str(n.id)] = {"class_type": n.type, "inputs": inputs, "_meta": {"title": n.type}}
    return out


def to_ui(graph: list[Node], name: str) -> dict:
    """UI (litegraph) format: nodes with positions, links, widgets_values by position."""
    links, link_of = [], {}
    for n in graph:
        for slot, (name, (src, src_slot)) in enumerate(n.inputs.items()):
            link_id = len(links) + 1
            links.append([link_id, src, src_slot, n.id, slot, n.input_types[name]])
            link_of[(n.id, name)] = link_id
    nodes = []
    for order, n in enumerate(graph):
        outputs = []
        for slot, (name, typ) in enumerate(n.outputs):
            outs = [lk[0] for lk in links if lk[1] == n.id and lk[2] == slot]
            outputs.append({"name": name, "type": typ, "links": outs, "slot_index": slot})
        props = {"Node name for S&R": n.type}
        if n.models:
            props["models"] = n.models
        nodes.append({
            "id": n.id, "type": n.type, "pos": [60 + 330 * order, 120 + 40 * (order % 2)],
            "size": [300, 60 + 26 * (len(n.widgets) + max(len(n.inputs), len(n.outputs)))],
            "flags": {}, "order": order, "mode": 0,
            "inputs": [{"name": k, "type": n.input_types[k], "link": link_of[(n.id, k)]} for k in n.inputs],
            "outputs": outputs, "properties": props,
            "widgets_values": list(n.widgets.values()) + n.extra_widget_values,
        })
    return {"id": str(uuid.uuid5(uuid.NAMESPACE_URL, "d3sr/workflows/" + name)), "revision": 0,
            "last_node_id": max(n.id for n in graph), "last_link_id": len(links),
            "nodes": nodes, "links": links, "groups": [], "config": {},
            "extra": {"ds": {"scale": 1.0, "offset": [0, 0]}}, "version": 0.4}


def main() -> None:
    for name, make in WORKFLOWS.items():
        graph = make()
        for path, data in ((os.path.join(ROOT, "workflows", name + ".json"), to_ui(graph, name)),
                           (os.path.join(ROOT, "workflows", "api", name + ".json"), to_api(graph))):
            write_text_atomic(path, json.dumps(data, indent=2) + "\n")
            print("wrote", os.path.relpath(path, ROOT))


if __name__ == "__main__":
    main()
