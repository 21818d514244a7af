"""The real ComfyUI web page in headless Chromium, as a new user meets it: a ComfyUI server with
this pack and the installed comfyui-frontend-package, the page opened over the DevTools
protocol, and the steps a user takes (open the template browser, pick a template, press Run,
look in the node library, search) as blocking calls with bounded timeouts.

Used by tests/test_browser_ui.py and by `scripts/make_workflows.py --images`.
What the frontend does is read through its own objects (window.app, the Pinia stores it
mounts), pinned to comfyui-frontend-package 1.32.9; the hooks installed here only record what
the page would show (missing-node and missing-model dialogs, queue answers) and pass through.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

from chromium_cdp import CDPError, Chromium
from comfy_server import ComfyServer, poll_delays

from d3sr_core.atomic_file import atomic_path

PACK_ROOT = Path(__file__).resolve().parents[1]
THUMB_PX = 448            # template cards are square (1.32.9 shows them at 224 CSS px)
THUMB_CLIP = {"x": 300, "y": 20, "width": 680, "height": 680}   # in focus mode (no panels)

# Installed once per page load: records what the page would show, keeps the frontend working.
HOOKS = r"""
(() => {
  if (window.__d3sr) return true;
  const pinia = document.querySelector('#vue-app').__vue_app__.config.globalProperties.$pinia;
  const rec = {missingNodes: [], missingModels: [], queued: [], loads: 0, pinia};
  const origLoad = app.loadGraphData;
  app.loadGraphData = async function () {  // counts finished loads (dialogs shown, graph set up)
    try { return await origLoad.apply(this, arguments); } finally { rec.loads++; }
  };
  const origNodes = app.showMissingNodesError, origModels = app.showMissingModelsError;
  app.showMissingNodesError = function (types) {
    rec.missingNodes.push(...types.map(t => typeof t === 'string' ? t : t.type));
    return origNodes.apply(this, arguments);
  };
  app.showMissingModelsError = function (models) {
    rec.missingModels.push(...models.map(m => ({name: m.name, url: m.url, directory: m.directory})));
    return origModels.apply(this, arguments);
  };
  const api = window.comfyAPI.api.api, origQueue = api.queuePrompt.bind(api);
  api.queuePrompt = async function () {
    try {
      const r = await origQueue(...arguments);
      rec.queued.push(r);
      return r;
    } catch (e) {
      rec.queued.push({error: JSON.stringify(e.response ?? String(e))});
      throw e;
    }
  };
  rec.store = name => pinia._s.get(name);
  rec.dialogKeys = () => pinia._s.get('dialog').dialogStack.map(d => d.key);
  window.__d3sr = rec;
  return true;
})()
"""


class ComfyPage:
    """One page of the ComfyUI frontend on `server`, driven through `browser`."""

    def __init__(self, browser: Chromium, server: ComfyServer) -> None:
        self.browser, self.server = browser, server

    def js(self, expression: str, timeout: float = 30.0):
        return self.browser.evaluate(expression, timeout)

    def open(self, timeout: float = 120.0) -> None:
        """Load the page and wait until the graph canvas and the node definitions are ready."""
        self.browser.navigate(self.server.url + "/", timeout)
        self.browser.wait_for("!!(window.app && window.app.graph && window.app.canvas && window.LiteGraph"
                              " && window.LiteGraph.registered_node_types['D3SRUpscale'])",
                              timeout, what="the ComfyUI page to start")
        self.js(HOOKS)

    # ---- dialogs -------------------------------------------------------------------------
    def close_dialogs(self) -> None:
        self.js("(() => { const d = __d3sr.store('dialog');"
                " for (const k of d.dialogStack.map(x => x.key).reverse()) d.closeDialog({key: k}); return 1 })()")
        self.browser.wait_for("document.querySelectorAll('.p-dialog').length === 0", 10,
                              what="the dialogs to close")

    # ---- templates -----------------------------------------------------------------------
    def open_templates(self) -> list[dict]:
        """Open the template browser; its cards [{name, title, img, imgWidth}] once shown."""
        self.close_dialogs()
        self.js("app.extensionManager.command.execute('Comfy.BrowseTemplates')")
        self.browser.wait_for("document.querySelectorAll('[data-testid^=\"template-workflow-\"]').length > 0",
                              30, what="the template browser")
        # Thumbnails are lazy: a card shows a skeleton (no <img>) until it has scrolled into view
        # and its image is fetched. Bring each card still without a loaded image into view, and
        # poll until every card has one, then scroll the list back to its top.
        try:
            self.browser.wait_for("""(() => {
                const cards = [...document.querySelectorAll('[data-testid^="template-workflow-"]')];
                const pending = cards.filter(c => { const i = c.querySelector('img');
                                                    return !i || !i.complete || !i.naturalWidth; });
                if (pending.length) pending[0].scrollIntoView({block: 'nearest'});
                return pending.length === 0; })()""", 30, what="the template thumbnails")
        except CDPError:
            pass  # a card that never gets its image shows up in the returned list (img '')
        self.js("document.querySelector('[data-testid^=\"template-workflow-\"]')"
                ".scrollIntoView({block: 'nearest'}); 1")
        return self.js("""[...document.querySelectorAll('[data-testid^="template-workflow-"]')].map(c => {
            const img = c.querySelector('img');
            return {name: c.dataset.testid.slice('template-workflow-'.length), text: c.innerText,
                    img: img ? img.src : '', imgWidth: img ? img.naturalWidth : 0};
        })""")

    def load_template(self, name: str, timeout: float = 30.0) -> dict:
        """Pick template `name` in the template browser, as a user does. Returns what loading
        showed: {missingNodes, missingModels, dialogs (keys), nodes, workflow}."""
        self.open_templates()
        self.js("__d3sr.missingNodes.length = 0; __d3sr.missingModels.length = 0;"
                "__d3sr.loadsBefore = __d3sr.loads;"
                "__d3sr.loadedBefore = app.extensionManager.workflow.activeWorkflow?.path ?? ''; 1")
        card = json.dumps(f'[data-testid="template-workflow-{name}"]')
        self.js(f"document.querySelector({card}).click(); 1")
        self.browser.wait_for(
            f"(() => {{ const w = app.extensionManager.workflow.activeWorkflow;"
            f" return !!w && w.path !== __d3sr.loadedBefore && w.filename.startsWith({json.dumps(name)})"
            f" && __d3sr.loads > __d3sr.loadsBefore && app.graph.nodes.length > 0"
            f" && !document.querySelector('[data-testid^=\"template-workflow-\"]') }})()",
            timeout, what=f"template '{name}' to load")
        self.browser.wait_for("document.fonts.status === 'loaded'", 10)
        return self.js("""({missingNodes: [...__d3sr.missingNodes], missingModels: [...__d3sr.missingModels],
            dialogs: __d3sr.dialogKeys(),
            dialogTexts: [...document.querySelectorAll('.p-dialog')].map(d => d.innerText),
            workflow: app.extensionManager.workflow.activeWorkflow.filename,
            nodes: app.graph.nodes.map(n => ({id: n.id, type: n.type, title: n.title,
                widgets: (n.widgets || []).map(w => [w.name, w.value])}))})""")

    def node_boxes(self) -> dict:
        """Where each node is drawn on the page (CSS px, title bar included), and the rects
        of the page's panels that cover the canvas."""
        return self.js("""(() => {
            const c = app.canvas, ds = c.ds, r = c.canvas.getBoundingClientRect(), T = LiteGraph.NODE_TITLE_HEIGHT;
            const nodes = app.graph.nodes.map(n => {
                const [x, y] = ds.convertOffsetToCanvas([n.pos[0], n.pos[1] - T]);
                return {id: n.id, type: n.type, title: n.title, x0: r.left + x, y0: r.top + y,
                        x1: r.left + x + n.size[0] * ds.scale, y1: r.top + y + (n.size[1] + T) * ds.scale};
            });
            const rect = e => {
                const b = e.getBoundingClientRect();
                return {x0: b.left, y0: b.top, x1: b.right, y1: b.bottom};
            };
            const visible = e => e && e.offsetParent !== null && e.getBoundingClientRect().width > 0;
            const mm = document.querySelector('.litegraph-minimap, .minimap-main-container, [class*="minimap"]');
            return {nodes, canvas: rect(c.canvas), scale: ds.scale, offset: [...ds.offset],
                    minimap: visible(mm) ? rect(mm) : null, innerWidth, innerHeight};
        })()""")

    # ---- running -------------------------------------------------------------------------
    def queue(self, timeout: float = 30.0) -> dict:
        """Press Run (app.queuePrompt, what the Run button calls); the server's answer."""
        self.close_dialogs()
        n = self.js("__d3sr.queued.length")
        self.js("app.queuePrompt(0, 1).then(() => 1)", timeout)
        self.browser.wait_for(f"__d3sr.queued.length > {n}", timeout, what="the queue answer")
        return self.js(f"__d3sr.queued[{n}]")

    def wait_for_run(self, prompt_id: str, timeout: float = 180.0) -> dict:
        """The /history entry of `prompt_id` once it finished (success or error)."""
        deadline, delays = time.monotonic() + timeout, poll_delays()
        while time.monotonic() < deadline:
            hist = self.server.get(f"/history/{prompt_id}")
            entry = hist.get(prompt_id)
            if entry and entry.get("status", {}).get("status_str") in ("success", "error"):
                return entry
            time.sleep(next(delays))
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout:.0f} s\n{self.server.log()}")

    def shown_outputs(self, node_id: int, timeout: float = 20.0) -> list[dict]:
        """The images the page shows on node `node_id` after a run (its node outputs)."""
        return self.browser.wait_for(
            f"(() => {{ const o = __d3sr.store('nodeOutput').nodeOutputs ?? {{}};"
            f" const v = Object.entries(o).find(([k]) => k.split(':').pop() === '{node_id}');"
            f" return v && v[1].images && v[1].images.length ? [...v[1].images].map(i =>"
            f" ({{filename: i.filename, subfolder: i.subfolder, type: i.type}})) : null }})()",
            timeout, what=f"node {node_id} to show its output")

    # ---- node library and search ---------------------------------------------------------
    def node_library(self, path: list[str], timeout: float = 20.0) -> list[str]:
        """Open the node library side panel, expand `path` (e.g. image/upscaling/D3SR) by
        clicking its folders, and return the node titles listed under the last one."""
        self.close_dialogs()
        self.js("(() => { const s = __d3sr.store('workspace').sidebarTab;"
                " if (s.activeSidebarTabId !== 'node-library') s.toggleSidebarTab('node-library'); return 1 })()")
        self.browser.wait_for("!!document.querySelector('[role=treeitem]')", timeout, what="the node library")
        for level, folder in enumerate(path, 1):
            sel = json.dumps(f'[role=treeitem][aria-level="{level}"][aria-label="{folder}"]')
            self.browser.wait_for(f"!!document.querySelector({sel})", timeout,
                                  what=f"folder '{folder}' in the node library")
            self.js(f"(() => {{ const e = document.querySelector({sel});"
                    f" if (e.getAttribute('aria-expanded') !== 'true')"
                    f" (e.querySelector('.p-tree-node-content') || e).click(); return 1 }})()")
            self.browser.wait_for(f"document.querySelector({sel}).getAttribute('aria-expanded') === 'true'",
                                  timeout, what=f"folder '{folder}' to open")
        last = json.dumps(f'[role=treeitem][aria-level="{len(path)}"][aria-label="{path[-1]}"]')
        leaves = self.js(f"[...document.querySelector({last}).querySelectorAll("
                         f"'[role=treeitem][aria-level=\"{len(path) + 1}\"]')].map(e => e.getAttribute('aria-label'))")
        self.js("(() => { const s = __d3sr.store('workspace').sidebarTab;"
                " if (s.activeSidebarTabId === 'node-library') s.toggleSidebarTab('node-library'); return 1 })()")
        return leaves

    def search_nodes(self, query: str, limit: int = 64) -> list[str]:
        """Display names the node search (canvas search box and node library) lists for `query`,
        in its order."""
        return self.js(f"__d3sr.store('nodeDef').nodeSearchService.searchNode({json.dumps(query)}, [],"
                       f" {{limit: {limit}}}).map(n => n.display_name)")

    def title_widths(self, node_types: list[str]) -> dict:
        """For each node type, a fresh node's default width, the width its title needs
        (text + LiteGraph's title margins) and the width without the title."""
        return self.js(f"""(() => {{
            const ctx = document.createElement('canvas').getContext('2d'), out = {{}};
            for (const t of {json.dumps(node_types)}) {{
                const n = LiteGraph.createNode(t); ctx.font = n.titleFontStyle;
                const need = ctx.measureText(n.title).width + LiteGraph.NODE_TITLE_HEIGHT * 1.33;
                const width = n.computeSize()[0], title = n.title;
                n.title = ''; const bare = n.computeSize()[0]; n.title = title;
                out[t] = {{title, need, width, bare}};
            }}
            return out;
        }})()""")

    # ---- pictures ------------------------------------------------------------------------
    def redraw(self) -> None:
        self.js("app.canvas.setDirty(true, true); app.canvas.draw(true, true);"
                "new Promise(r => requestAnimationFrame(() => requestAnimationFrame(() => r(1))))")

    def screenshot(self, path: Path) -> Path:
        self.close_dialogs()
        self.redraw()
        return self.browser.screenshot(Path(path))

    def screenshot_png(self, path: str, colours: int = 96) -> None:
        """The page as a small palette PNG (for the README)."""
        from PIL import Image
        self.close_dialogs()
        self.redraw()
        raw = self.browser.screenshot(Path(path).with_suffix(".raw.png"))
        with Image.open(raw) as im:
            small = im.convert("RGB").quantize(colours, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
            with atomic_path(path) as tmp:
                small.save(tmp, format="PNG", optimize=True)
        raw.unlink()

    def thumbnail(self, path: str) -> None:
        """A square JPEG of the whole graph: the view fitted into THUMB_CLIP, captured, resized."""
        from PIL import Image
        self.close_dialogs()
        c = THUMB_CLIP
        self.js("__d3sr.store('workspace').focusMode = true; 1")  # hide the panels
        self.js(f"""(() => {{
            const T = LiteGraph.NODE_TITLE_HEIGHT, ns = app.graph.nodes, m = 16;
            const x0 = Math.min(...ns.map(n => n.pos[0])), y0 = Math.min(...ns.map(n => n.pos[1] - T));
            const x1 = Math.max(...ns.map(n => n.pos[0] + n.size[0]));
            const y1 = Math.max(...ns.map(n => n.pos[1] + n.size[1]));
            const s = Math.min(({c['width']} - 2 * m) / (x1 - x0), ({c['height']} - 2 * m) / (y1 - y0));
            const ds = app.canvas.ds; ds.scale = s;
            ds.offset[0] = ({c['x']} + ({c['width']} - s * (x1 - x0)) / 2) / s - x0;
            ds.offset[1] = ({c['y']} + ({c['height']} - s * (y1 - y0)) / 2) / s - y0;
            return 1;
        }})()""")
        time.sleep(0.5)
        self.redraw()
        data = self.browser.capture(clip=c)
        self.js("__d3sr.store('workspace').focusMode = false; 1")
        with Image.open(io.BytesIO(data)) as im:
            thumb = im.convert("RGB").resize((THUMB_PX, THUMB_PX), Image.Resampling.LANCZOS)
            with atomic_path(path) as tmp:
                thumb.save(tmp, format="JPEG", quality=82, optimize=True)


class UISession:
    """A server with the frontend, a Chromium and one open page; `page` is the ComfyPage."""

    def __init__(self, server: ComfyServer, browser: Chromium) -> None:
        self.server, self.browser = server, browser
        self.page = ComfyPage(browser, server)

    def __getattr__(self, name):  # the page's steps, directly on the session
        return getattr(self.page, name)


@contextlib.contextmanager
def ui_session(comfy_root: str, work: str | Path, models_dir: Path | None = None) -> Iterator[UISession]:
    """Start ComfyUI (with the frontend; `models_dir` or an empty one) and Chromium, open the
    page; stop both afterwards, whatever happens."""
    work = Path(work)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    if models_dir is None:
        models_dir = work / "models"
        for sub in ("checkpoints", "d3sr"):
            (models_dir / sub).mkdir(parents=True)
    server = ComfyServer(comfy_root, PACK_ROOT, models_dir, work / "server", frontend=True)
    server.start()
    try:
        with page_session(server) as session:
            yield session
    finally:
        server.stop()


@contextlib.contextmanager
def page_session(server: ComfyServer) -> Iterator[UISession]:
    """Chromium with the page of a running `server` (started with frontend=True) open; Chromium
    stops afterwards, whatever happens, and the server keeps running."""
    with Chromium() as browser:
        session = UISession(server, browser)
        session.page.open()
        yield session
