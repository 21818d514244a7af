"""Start and drive a real headless ComfyUI server over its HTTP API (for the e2e tests)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path


def poll_delays(longest: float = 0.1) -> Iterator[float]:
    """Seconds to sleep between polls: 20 ms at first, growing by half each time up to `longest`
    (a short wait is seen at once, a long one costs few requests)."""
    delay = 0.02
    while True:
        yield delay
        delay = min(longest, delay * 1.5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """ComfyUI's main.py on 127.0.0.1 with the pack linked into a custom_nodes folder of its own."""

    def __init__(self, comfy_root: str, pack_root: Path, models_dir: Path, work: Path,
                 pack_name: str = "comfyui-d3sr", frontend: bool = False, port: int | None = None,
                 extra_models: Path | None = None) -> None:
        """frontend: serve the web page from the installed comfyui-frontend-package (for a
        browser); otherwise only the HTTP API answers (an empty --front-end-root).
        port: on 127.0.0.1; a free one when None. extra_models: a second models folder
        (checkpoints/, d3sr/) the loaders list too."""
        self.comfy_root, self.work, self.frontend = comfy_root, work, frontend
        self.extra_models = extra_models
        self.pack_name = pack_name
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.input_dir, self.output_dir = work / "input", work / "output"
        custom = work / "custom_nodes"
        self.user_dir = work / "user"
        for d in (self.input_dir, self.output_dir, custom, work / "frontend", self.user_dir):
            d.mkdir(parents=True, exist_ok=True)
        (custom / pack_name).symlink_to(pack_root, target_is_directory=True)
        self.config = work / "extra_model_paths.yaml"
        config = ("d3sr_tests:\n"
                  f"  base_path: {models_dir}\n"
                  "  checkpoints: checkpoints\n"
                  "  loras: loras\n"
                  "  d3sr: d3sr\n"
                  f"  custom_nodes: {custom}\n")
        if extra_models is not None:
            config += f"d3sr_tests_extra:\n  base_path: {extra_models}\n  checkpoints: checkpoints\n  d3sr: d3sr\n"
        self.config.write_text(config)
        self.log_path = work / "server.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 180.0) -> None:
        cmd = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--disable-api-nodes", "--extra-model-paths-config", str(self.config),
               "--user-directory", str(self.user_dir),
               "--input-directory", str(self.input_dir), "--output-directory", str(self.output_dir),
               "--disable-auto-launch", "--database-url", "sqlite:///:memory:"]
        if not self.frontend:
            cmd += ["--front-end-root", str(self.work / "frontend")]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=self.comfy_root, stdout=self._log,
                                     stderr=subprocess.STDOUT, env=env)
        deadline, delays = time.time() + timeout, poll_delays()
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}:\n{self.log()}")
            try:
                self.get("/system_stats")
                return
            except (urllib.error.URLError, ConnectionError):
                time.sleep(next(delays))
        raise TimeoutError(f"ComfyUI did not answer within {timeout} s:\n{self.log()}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        if self.proc:
            self._log.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.loads(r.read())

    def post(self, path: str, payload: dict) -> tuple[int, dict]:
        req = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def run_prompt(self, prompt: dict, timeout: float = 600.0) -> dict:
        """Queue an API-format graph, wait for it to finish, return its /history entry."""
        status, body = self.post("/prompt", {"prompt": prompt, "client_id": uuid.uuid4().hex})
        if status != 200:
            raise AssertionError(f"/prompt refused the graph ({status}): {json.dumps(body)[:2000]}")
        prompt_id = body["prompt_id"]
        deadline, delays = time.time() + timeout, poll_delays()
        while time.time() < deadline:
            hist = self.get(f"/history/{prompt_id}")
            if prompt_id in hist and hist[prompt_id].get("status", {}).get("completed") is not None:
                entry = hist[prompt_id]
                if entry["status"].get("status_str") in ("success", "error"):
                    return entry
            time.sleep(next(delays))
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout} s\n{self.log()}")
