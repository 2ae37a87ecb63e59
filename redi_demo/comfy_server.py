"""A real ComfyUI server on 127.0.0.1, driven over HTTP like a user's client."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from redi_demo.host import host_comfy_dir

ROOT = Path(__file__).resolve().parents[1]
COMFY_DIR = host_comfy_dir()  # the host REDI_COMFY selects (scripts/bootstrap.sh installs it)
PACK_NAME = "ComfyUI-ReDi-Accelerate"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    def __init__(self, workdir: Path, python: str, extra_paths: dict[str, str] | None = None, kb_dir: Path | None = None) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / "server.log"
        self.output_dir = workdir / "output"
        # the KB folder (models/redi_kb); several servers given one share their KBs and libraries
        self.kb_dir = Path(kb_dir).resolve() if kb_dir is not None else workdir / "models" / "redi_kb"
        self._kb_yaml = str(self.kb_dir) if kb_dir is not None else "redi_kb"  # an absolute path stays itself under base_path
        self.python = python
        self.proc: subprocess.Popen | None = None
        self.extra_paths = extra_paths or {}  # more model folders under workdir/models, e.g. {"checkpoints": "checkpoints"}

    def start(self, timeout: float = 180.0) -> None:
        self.launch()
        self.wait_ready(timeout)

    def launch(self) -> None:
        """Start the process without waiting (start several, then `wait_ready` each)."""
        for d in ("output", "temp", "user", "input", "models/redi_kb"):
            (self.workdir / d).mkdir(parents=True, exist_ok=True)
        self.kb_dir.mkdir(parents=True, exist_ok=True)
        extra = self.workdir / "extra_model_paths.yaml"
        more = "".join(f"  {k}: {v}\n" for k, v in self.extra_paths.items())
        extra.write_text(f"redi_test:\n  base_path: {self.workdir / 'models'}\n  redi_kb: {self._kb_yaml}\n{more}")
        cmd = [
            self.python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
            "--disable-auto-launch", "--output-directory", str(self.output_dir),
            "--temp-directory", str(self.workdir / "temp"), "--user-directory", str(self.workdir / "user"),
            "--input-directory", str(self.workdir / "input"), "--database-url", "sqlite:///:memory:",
            "--disable-api-nodes", "--extra-model-paths-config", str(extra),
            "--disable-all-custom-nodes", "--whitelist-custom-nodes", PACK_NAME,
        ]
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, cwd=COMFY_DIR, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout: float = 180.0) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            try:
                self.get("/system_stats")
                return
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"ComfyUI did not answer within {timeout}s:\n{self.log()[-4000:]}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def get(self, path: str):
        with urllib.request.urlopen(self.base + path, timeout=30) as r:
            return json.loads(r.read())

    def post(self, path: str, body: dict):
        req = urllib.request.Request(self.base + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def queue(self, prompt: dict) -> tuple[int, dict]:
        return self.post("/prompt", {"prompt": prompt, "client_id": uuid.uuid4().hex})

    def run(self, prompt: dict, timeout: float = 600.0) -> dict:
        """Queue an API-format graph and wait for its /history entry."""
        status, body = self.queue(prompt)
        if status != 200:
            raise AssertionError(f"/prompt answered {status}: {json.dumps(body)[:3000]}")
        pid = body["prompt_id"]
        deadline = time.time() + timeout
        while time.time() < deadline:
            hist = self.get(f"/history/{pid}")
            if pid in hist and hist[pid].get("status", {}).get("completed") is not None:
                entry = hist[pid]
                if entry["status"].get("status_str") in ("success", "error"):
                    return entry
            time.sleep(0.3)
        raise AssertionError(f"prompt {pid} did not finish within {timeout}s")

    def images(self, entry: dict) -> list[Path]:
        """Files of the images a finished prompt saved (its /history entry's outputs)."""
        return [
            self.output_dir / img.get("subfolder", "") / img["filename"]
            for out in entry["outputs"].values()
            for img in out.get("images", [])
        ]

    @staticmethod
    def error_of(entry: dict) -> dict | None:
        for kind, data in entry["status"].get("messages", []):
            if kind == "execution_error":
                return data
        return None
