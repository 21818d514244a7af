"""Drive a headless Chromium over the DevTools protocol (for the browser test and the template
screenshots): start it on loopback with a throw-away profile, open one page, evaluate
JavaScript, wait for conditions and take screenshots, each step with a bounded timeout.

The websocket client is aiohttp's (ComfyUI requires aiohttp), run on an event loop in a
background thread so the methods here are plain blocking calls. Every host name but the
loopback address is mapped to "not found", so the page can reach the local ComfyUI server
and nothing else.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

from d3sr_core.atomic_file import atomic_path  # noqa: E402

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
INSTALL_HINT = "install it with `apt-get install -y chromium` (Debian/Ubuntu) or set D3SR_CHROMIUM"


def find_chromium() -> str | None:
    """Path of a Chromium/Chrome binary: $D3SR_CHROMIUM, else the first of CANDIDATES on PATH."""
    explicit = os.environ.get("D3SR_CHROMIUM")
    if explicit:
        return explicit if os.path.isfile(explicit) and os.access(explicit, os.X_OK) else None
    for name in CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


def chromium_version(binary: str) -> str:
    """'Chromium 150.0....' as the binary reports it (empty string when it cannot say)."""
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    lines = [ln.strip() for ln in out.stdout.splitlines() if ln.strip()]
    return lines[-1] if lines else ""


class CDPError(RuntimeError):
    """A DevTools call failed, a script threw, or a wait ran out of time."""


class Chromium:
    """One headless Chromium with one page, `width` x `height` CSS pixels.

    Use as a context manager. `console` collects the page's console errors and uncaught
    exceptions as strings (for failure messages)."""

    def __init__(self, binary: str | None = None, width: int = 1280, height: int = 720,
                 start_timeout: float = 60.0) -> None:
        self.binary = binary or find_chromium()
        if not self.binary:
            raise FileNotFoundError(f"no Chromium found: {INSTALL_HINT}")
        self.width, self.height, self.start_timeout = width, height, start_timeout
        self.console: list[str] = []
        self.proc: subprocess.Popen | None = None
        self.profile = ""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self._session: aiohttp.ClientSession | None = None
        self._ws = None
        self._reader: asyncio.Task | None = None

    # ---- life cycle ---------------------------------------------------------------------
    def __enter__(self) -> Chromium:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        self.profile = tempfile.mkdtemp(prefix="d3sr-chromium-")
        cmd = [self.binary, "--headless=new", "--no-sandbox", "--disable-gpu",
               "--disable-dev-shm-usage", "--no-first-run", "--no-default-browser-check",
               "--disable-extensions", "--disable-background-networking", "--disable-sync",
               "--disable-component-update", "--mute-audio", "--hide-scrollbars",
               "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
               "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
               f"--user-data-dir={self.profile}", f"--window-size={self.width},{self.height}",
               "about:blank"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     start_new_session=True)
        port_file = Path(self.profile) / "DevToolsActivePort"
        deadline = time.monotonic() + self.start_timeout
        while not port_file.is_file() or not port_file.read_text().strip():
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace")[-3000:] if self.proc.stderr else ""
                raise CDPError(f"Chromium exited with {self.proc.returncode} at start:\n{err}")
            if time.monotonic() > deadline:
                raise CDPError(f"Chromium did not open its DevTools port in {self.start_timeout:.0f} s")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
            pages = [t for t in json.loads(r.read()) if t.get("type") == "page"]
        if not pages:
            raise CDPError("Chromium has no page target")
        self._thread.start()
        self._run(self._connect(pages[0]["webSocketDebuggerUrl"]), 30)
        self.call("Runtime.enable")
        self.call("Page.enable")
        self.call("Emulation.setDeviceMetricsOverride", {"width": self.width, "height": self.height,
                                                         "deviceScaleFactor": 1, "mobile": False})

    def close(self) -> None:
        if self._thread.is_alive():
            try:
                self._run(self._disconnect(), 10)
            except Exception:  # closing is best effort; the process is killed below anyway
                pass
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        if self.proc and self.proc.poll() is None:
            # Chromium's helpers (zygote, renderers, GPU process) share its process group
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        if self.proc and self.proc.stderr:
            self.proc.stderr.close()
        if self.profile:
            shutil.rmtree(self.profile, ignore_errors=True)

    # ---- protocol -----------------------------------------------------------------------
    def _run(self, coro, timeout: float):
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return fut.result(timeout)
        except TimeoutError:
            fut.cancel()
            raise CDPError(f"no answer from Chromium within {timeout:.0f} s") from None

    async def _connect(self, url: str) -> None:
        self._session = aiohttp.ClientSession()
        self._ws = await self._session.ws_connect(url, max_msg_size=0, timeout=aiohttp.ClientWSTimeout(ws_close=10))
        self._reader = asyncio.create_task(self._read())

    async def _disconnect(self) -> None:
        if self._ws is not None:
            await self._ws.close()
        if self._reader is not None:
            self._reader.cancel()
        if self._session is not None:
            await self._session.close()

    async def _read(self) -> None:
        async for msg in self._ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            data = json.loads(msg.data)
            if "id" in data:
                fut = self._pending.pop(data["id"], None)
                if fut is not None and not fut.done():
                    fut.set_result(data)
            elif data.get("method") == "Runtime.exceptionThrown":
                d = data["params"]["exceptionDetails"]
                self.console.append("exception: " + (d.get("exception", {}).get("description") or d.get("text", "")))
            elif data.get("method") == "Runtime.consoleAPICalled" and data["params"]["type"] == "error":
                args = data["params"].get("args", [])
                self.console.append("console.error: " + " ".join(
                    str(a.get("value", a.get("description", ""))) for a in args)[:500])
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(CDPError("the DevTools connection closed"))

    async def _call(self, method: str, params: dict) -> dict:
        msg_id = next(self._ids)
        fut = self._loop.create_future()
        self._pending[msg_id] = fut
        await self._ws.send_str(json.dumps({"id": msg_id, "method": method, "params": params}))
        return await fut

    def call(self, method: str, params: dict | None = None, timeout: float = 30.0) -> dict:
        """One DevTools command; its `result`, or CDPError with the protocol's error."""
        reply = self._run(self._call(method, params or {}), timeout)
        if "error" in reply:
            raise CDPError(f"{method}: {reply['error'].get('message')} {reply['error'].get('data', '')}")
        return reply.get("result", {})

    # ---- page helpers -------------------------------------------------------------------
    def navigate(self, url: str, timeout: float = 60.0) -> None:
        """Open `url` and wait until the document has loaded."""
        self.call("Page.navigate", {"url": url})
        self.wait_for("document.readyState === 'complete' && location.href !== 'about:blank'",
                      timeout, what=f"{url} to load")

    def evaluate(self, expression: str, timeout: float = 30.0):
        """Evaluate `expression` in the page (promises awaited); its JSON value."""
        result = self.call("Runtime.evaluate", {"expression": expression, "awaitPromise": True,
                                                "returnByValue": True, "timeout": int(timeout * 1000)},
                           timeout=timeout + 5)
        if "exceptionDetails" in result:
            d = result["exceptionDetails"]
            text = d.get("exception", {}).get("description") or d.get("text", "")
            raise CDPError(f"script failed: {text}\n--- script ---\n{expression[:1500]}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 30.0, what: str = "", poll: float = 0.2):
        """Poll `expression` until truthy; its value, or CDPError after `timeout` s."""
        deadline = time.monotonic() + timeout
        last_error = ""
        while True:
            try:
                value = self.evaluate(expression, timeout=max(1.0, min(10.0, deadline - time.monotonic())))
                if value:
                    return value
            except CDPError as e:
                if "SyntaxError" in str(e):  # a broken script never becomes true
                    raise
                last_error = str(e).splitlines()[0]
            if time.monotonic() > deadline:
                raise CDPError(f"timed out after {timeout:.0f} s waiting for {what or expression}"
                               + (f" (last error: {last_error})" if last_error else "")
                               + ("\npage errors:\n" + "\n".join(self.console[-10:]) if self.console else ""))
            time.sleep(poll)

    def capture(self, fmt: str = "png", quality: int = 85, clip: dict | None = None) -> bytes:
        """The viewport (or `clip` {x, y, width, height} in CSS px) as png or jpeg bytes."""
        params = {"format": fmt, "captureBeyondViewport": False}
        if fmt == "jpeg":
            params["quality"] = quality
        if clip:
            params["clip"] = dict(clip, scale=1)
        return base64.b64decode(self.call("Page.captureScreenshot", params, timeout=60)["data"])

    def screenshot(self, path: Path, clip: dict | None = None) -> Path:
        """Save the viewport (or `clip`) as a PNG file, atomically."""
        data = self.capture(clip=clip)
        with atomic_path(path) as tmp:
            Path(tmp).write_bytes(data)
        return Path(path)
