"""The d3sr_core modules import each other without a cycle (read from the source with ast,
imports inside functions included), so every module can be imported and tested on its own."""

from __future__ import annotations

import ast
from pathlib import Path

CORE = Path(__file__).resolve().parent.parent / "d3sr_core"


def core_imports(path: Path) -> set[str]:
    """Names of the d3sr_core modules that the module at `path` imports (anywhere in it)."""
    names = {p.stem for p in CORE.glob("*.py")}
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:                     # from .x import y
                found.add(node.module.split(".")[0])
            elif node.level == 1:                                   # from . import x, y
                found.update(a.name for a in node.names)
            elif node.level == 0 and node.module and node.module.startswith("d3sr_core"):
                parts = node.module.split(".")
                found.update([parts[1]] if len(parts) > 1 else [a.name for a in node.names])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names
                         if a.name.startswith("d3sr_core.") and a.name.count(".") >= 1)
    return found & names - {path.stem}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as a list of nodes (first == last), or None."""
    state: dict[str, int] = {}          # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node], _ = 1, path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node], _ = 2, path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_import_parser_sees_lazy_and_absolute_imports(tmp_path):
    # the shape of the old cycle: a function-level `from .tiling import ...` inside pipeline.py
    src = tmp_path / "pipeline.py"
    src.write_text("from . import model\nimport d3sr_core.checks\n\ndef f():\n"
                   "    from .tiling import upscale_after_oom\n    from d3sr_core.colour_fix import adain\n")
    assert core_imports(src) == {"model", "checks", "tiling", "colour_fix"}


def test_no_import_cycle_in_d3sr_core():
    graph = {p.stem: core_imports(p) for p in CORE.glob("*.py")}
    assert graph["tiling"] >= {"pipeline"} and graph["upscale"] >= {"pipeline", "tiling"}
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


# ComfyUI modules the pack may import outside d3sr_core/comfy_internals.py: the calls any custom
# node makes (see that module's docstring). Anything else of ComfyUI goes through that module.
ORDINARY_COMFY = {"comfy.model_management", "comfy.model_patcher", "comfy.sd", "comfy.utils",
                  "comfy_api.latest", "folder_paths"}
HOST_MODULES = ("comfy", "comfy_api", "comfy_extras", "comfy_execution", "folder_paths", "nodes",
                "server", "execution")


def host_imports(path: Path) -> set[str]:
    """ComfyUI module names that the file at `path` imports (anywhere in it)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                 [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else [])
        found.update(n for n in names if n.split(".")[0] in HOST_MODULES)
    return found


def test_comfyui_internals_are_reached_only_through_comfy_internals():
    root = CORE.parent
    files = [root / "__init__.py", *[p for d in ("d3sr_core", "training", "nodes") for p in (root / d).rglob("*.py")]]
    outside = {str(p.relative_to(root)): sorted(host_imports(p) - ORDINARY_COMFY) for p in files
               if p.name != "comfy_internals.py"}
    assert {f: m for f, m in outside.items() if m} == {}
    assert host_imports(CORE / "comfy_internals.py") - ORDINARY_COMFY, "the parser sees the door's own imports"
    graph = {p.stem: core_imports(p) for p in CORE.glob("*.py")}
    assert graph["comfy_internals"] == set(), "the door sits below every other d3sr_core module"
