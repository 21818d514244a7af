"""Check a UI-format workflow against a live server's /object_info (node types, widgets,
link types, required inputs) and turn API-format graphs into runnable test graphs."""

from __future__ import annotations

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
FILE_WIDGETS = {"ckpt_name", "weights", "image", "lora_name"}  # user files: any name is fine


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
