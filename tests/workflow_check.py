"""Check a UI-format workflow against a live server's /object_info (node types, widgets,
link types, required inputs) and against what the frontend accepts (model download entries,
the note that explains them, the saved view), and turn API-format graphs into runnable test
graphs."""

from __future__ import annotations

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
FILE_WIDGETS = {"ckpt_name", "weights", "image", "lora_name"}  # user files: any name is fine
VIRTUAL_NODES = {"Note", "MarkdownNote"}   # drawn by the frontend, never sent to the server
# What comfyui-frontend-package 1.32.9's missing-models dialog accepts for a download entry
# (anything else shows "Download not allowed from source" / "Only allowed suffixes").
ALLOWED_SOURCES = ("https://civitai.com/", "https://huggingface.co/", "http://localhost:")
ALLOWED_SUFFIXES = (".safetensors", ".sft")
TITLE_HEIGHT = 30  # LiteGraph.NODE_TITLE_HEIGHT


def _inputs(info: dict) -> list[tuple[str, list, bool]]:
    """(name, spec, required) in the order the UI shows them."""
    order = info.get("input_order", {})
    out = []
    for section, required in (("required", True), ("optional", False)):
        specs = info["input"].get(section, {})
        for name in order.get(section, list(specs)):
            out.append((name, specs[name], required))
    return out


def _is_widget(spec: list) -> bool:
    return isinstance(spec[0], list) or spec[0] in WIDGET_TYPES


def _combo_options(spec: list) -> list | None:
    if isinstance(spec[0], list):
        return spec[0]
    if spec[0] == "COMBO":
        return spec[1].get("options") if len(spec) > 1 else None
    return None


def check_ui_workflow(workflow: dict, object_info: dict) -> list[str]:
    """Problems found (empty when the workflow is valid for this server)."""
    problems = []
    nodes = {n["id"]: n for n in workflow["nodes"]}
    for n in workflow["nodes"]:
        if n["type"] in VIRTUAL_NODES:
            continue
        info = object_info.get(n["type"])
        if info is None:
            problems.append(f"node {n['id']}: unknown type {n['type']}")
            continue
        inputs = _inputs(info)
        widgets = [(name, spec) for name, spec, _ in inputs if _is_widget(spec)]
        values = n.get("widgets_values", [])
        if len(values) < len(widgets):
            problems.append(f"node {n['id']} {n['type']}: {len(values)} widget values for "
                            f"{len(widgets)} widgets")
        for (name, spec), value in zip(widgets, values[: len(widgets)], strict=True):
            opts = _combo_options(spec)
            if opts is not None and value not in opts and name not in FILE_WIDGETS:
                problems.append(f"node {n['id']} {n['type']}: {name}={value!r} not in {opts}")
            if spec[0] in ("INT", "FLOAT") and len(spec) > 1:
                lo, hi = spec[1].get("min", float("-inf")), spec[1].get("max", float("inf"))
                if not lo <= value <= hi:
                    problems.append(f"node {n['id']} {n['type']}: {name}={value} outside {lo}..{hi}")
        linked = {i["name"] for i in n.get("inputs", []) if i.get("link") is not None}
        for name, spec, required in inputs:
            if required and not _is_widget(spec) and name not in linked:
                problems.append(f"node {n['id']} {n['type']}: required input {name} not connected")
    for link_id, src, src_slot, dst, dst_slot, typ in workflow["links"]:
        src_info, dst_node = object_info.get(nodes[src]["type"]), nodes[dst]
        if src_info is None or dst_node["type"] not in object_info:
            continue
        out_type = src_info["output"][src_slot]
        if out_type != typ:
            problems.append(f"link {link_id}: output type {out_type} but link says {typ}")
        in_name = dst_node["inputs"][dst_slot]["name"]
        specs = dict((name, spec) for name, spec, _ in _inputs(object_info[dst_node["type"]]))
        if in_name not in specs or specs[in_name][0] != typ:
            problems.append(f"link {link_id}: {dst_node['type']}.{in_name} does not take {typ}")
    return problems


def model_entries(workflow: dict) -> list[dict]:
    """The download entries of every node (properties.models) and of the workflow (models)."""
    return [m for n in workflow["nodes"] for m in n.get("properties", {}).get("models", [])] + \
        list(workflow.get("models", []))


def file_names(workflow: dict) -> list[str]:
    """The file names the workflow's file widgets ask for (checkpoint, weights, image, ...)."""
    names = []
    for n in workflow["nodes"]:
        if n["type"] in VIRTUAL_NODES:
            continue
        for v in n.get("widgets_values", []):
            if isinstance(v, str) and v.lower().endswith((".safetensors", ".sft", ".pkl", ".ckpt", ".pt",
                                                          ".pth", ".png", ".jpg", ".jpeg", ".webp")):
                names.append(v)
    return names


def note_text(workflow: dict) -> str:
    """The text of the workflow's Note / MarkdownNote nodes."""
    return "\n".join(str(v) for n in workflow["nodes"] if n["type"] in VIRTUAL_NODES
                     for v in n.get("widgets_values", []))


def frontend_problems(workflow: dict) -> list[str]:
    """What the frontend would reject or leave unexplained: download entries it refuses, files
    the note does not name, a note missing, a saved view that does not show every node."""
    problems = []
    for m in model_entries(workflow):
        if not m.get("url", "").startswith(ALLOWED_SOURCES):
            problems.append(f"model {m.get('name')}: download not allowed from {m.get('url')}")
        if not m.get("name", "").endswith(ALLOWED_SUFFIXES):
            problems.append(f"model {m.get('name')}: the frontend accepts only {ALLOWED_SUFFIXES}")
    note = note_text(workflow)
    if not note:
        problems.append("no Note / MarkdownNote node")
    for name in file_names(workflow):
        if name not in note:
            problems.append(f"the note does not say where {name} comes from")
    return problems


def view_problems(workflow: dict, safe: tuple[float, float, float, float]) -> list[str]:
    """Nodes (with their saved sizes and title bars) that the saved view extra.ds does not place
    inside `safe` (x0, y0, x1, y1 in page pixels)."""
    ds = workflow.get("extra", {}).get("ds")
    if not ds:
        return ["no saved view (extra.ds)"]
    s, (ox, oy) = ds["scale"], ds["offset"]
    problems = []
    for n in workflow["nodes"]:
        (x, y), (w, h) = n["pos"], n["size"]
        x0, y0 = (x + ox) * s, (y - TITLE_HEIGHT + oy) * s
        x1, y1 = (x + w + ox) * s, (y + h + oy) * s
        if x0 < safe[0] or y0 < safe[1] or x1 > safe[2] or y1 > safe[3]:
            problems.append(f"node {n['id']} {n['type']} at ({x0:.0f}, {y0:.0f})-({x1:.0f}, {y1:.0f}) "
                            f"is outside {safe}")
    return problems


def localise(api_graph: dict, files: dict[str, str], prefix: str) -> dict:
    """Replace file-name widgets (by input name) and SaveImage prefixes for a test run."""
    out = {}
    for node_id, node in api_graph.items():
        inputs = dict(node["inputs"])
        for name, value in files.items():
            if name in inputs and not isinstance(inputs[name], list):
                inputs[name] = value
        if node["class_type"] == "SaveImage":
            inputs["filename_prefix"] = f"{prefix}/{node_id}"
        out[node_id] = {"class_type": node["class_type"], "inputs": inputs}
    return out
