"""A small ComfyUI HTTP client (urllib only) for the distributed KB build.

Speaks ComfyUI's ordinary API (POST /prompt, GET /history/ID, GET /queue, POST /queue,
POST /interrupt) and the pack's own read-only routes (GET /redi/info, GET /redi/kb/NAME/FILE)
plus POST /redi/kb/units/release.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path


class WorkerDown(OSError):
    """The worker did not answer (refused, reset, timed out)."""


class WorkerRefused(RuntimeError):
    """The worker answered, but not with what the build needs (message says what)."""


class ComfyClient:
    def __init__(self, base: str, timeout: float = 30.0) -> None:
        self.base = base.rstrip("/")
        self.timeout = timeout
        self.client_id = uuid.uuid4().hex

    def __repr__(self) -> str:
        return f"ComfyClient({self.base})"

    def _open(self, path: str, body: dict | None = None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, headers={"Content-Type": "application/json"} if data else {})
        try:
            return urllib.request.urlopen(req, timeout=self.timeout)
        except urllib.error.HTTPError:
            raise
        except (urllib.error.URLError, OSError) as e:
            raise WorkerDown(f"{self.base} does not answer ({getattr(e, 'reason', e)})") from e

    def get_json(self, path: str):
        try:
            with self._open(path) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            raise WorkerRefused(f"{self.base}{path} answered HTTP {e.code}") from e
        except (OSError, ValueError) as e:
            if isinstance(e, WorkerDown):
                raise
            raise WorkerDown(f"{self.base}{path}: {e}") from e

    def post_json(self, path: str, body: dict) -> tuple[int, dict]:
        try:
            with self._open(path, body) as r:
                raw = r.read()
                return r.status, json.loads(raw) if raw.strip() else {}
        except urllib.error.HTTPError as e:
            raw = e.read() or b"{}"
            try:
                return e.code, json.loads(raw)
            except ValueError:
                return e.code, {"error": raw[:500].decode(errors="replace")}
        except (OSError, ValueError) as e:
            if isinstance(e, WorkerDown):
                raise
            raise WorkerDown(f"{self.base}{path}: {e}") from e

    # --- ComfyUI API ----------------------------------------------------------------------
    def queue_prompt(self, graph: dict) -> str:
        status, body = self.post_json("/prompt", {"prompt": graph, "client_id": self.client_id})
        if status != 200 or "prompt_id" not in body:
            raise WorkerRefused(f"{self.base} refused the unit graph (HTTP {status}): {_prompt_error(body)}")
        return body["prompt_id"]

    def history(self, prompt_id: str) -> dict | None:
        """The /history entry of a finished prompt, or None while it is queued or running."""
        hist = self.get_json(f"/history/{urllib.parse.quote(prompt_id)}")
        entry = hist.get(prompt_id) if isinstance(hist, dict) else None
        if entry and entry.get("status", {}).get("status_str") in ("success", "error"):
            return entry
        return None

    def in_queue(self, prompt_id: str) -> bool:
        q = self.get_json("/queue")
        return any(item[1] == prompt_id for key in ("queue_running", "queue_pending") for item in q.get(key, []))

    def cancel(self, prompt_id: str) -> None:
        """Drop a prompt from the queue, or interrupt it if it is running (best effort)."""
        try:
            self.post_json("/queue", {"delete": [prompt_id]})
            self.post_json("/interrupt", {"prompt_id": prompt_id})
        except WorkerDown:
            pass

    # --- the pack's routes ------------------------------------------------------------------
    def info(self) -> dict:
        return self.get_json("/redi/info")

    def fetch(self, kb: str, name: str, dest: Path, max_bytes: int) -> None:
        """Download one KB file to `dest`, refusing anything larger than `max_bytes`."""
        path = f"/redi/kb/{urllib.parse.quote(kb)}/{urllib.parse.quote(name)}"
        try:
            with self._open(path) as r, open(dest, "wb") as f:
                got = 0
                while chunk := r.read(1 << 20):
                    got += len(chunk)
                    if got > max_bytes:
                        raise WorkerRefused(f"{self.base}{path} is larger than {max_bytes} bytes")
                    f.write(chunk)
        except urllib.error.HTTPError as e:
            raise WorkerRefused(f"{self.base}{path} answered HTTP {e.code}: {e.read()[:300].decode(errors='replace')}") from e
        except OSError as e:
            if isinstance(e, WorkerDown):
                raise
            raise WorkerDown(f"{self.base}{path}: {e}") from e

    def release(self, names: list[str] | None = None, build: str | None = None) -> None:
        """Ask the worker to delete unit KBs (by name, or every unit of a build). Best effort."""
        try:
            self.post_json("/redi/kb/units/release", {"names": names or [], "build": build or ""})
        except WorkerDown:
            pass


def _prompt_error(body: dict) -> str:
    err = body.get("error")
    parts = [err.get("message", "") + (f": {err.get('details')}" if err.get("details") else "")] if isinstance(err, dict) else [str(err or body)[:300]]
    for node in (body.get("node_errors") or {}).values():
        for e in node.get("errors", []):
            parts.append(f"{node.get('class_type')}: {e.get('message')} {e.get('details', '')}".strip())
    return "; ".join(p for p in parts if p)


def execution_error(entry: dict) -> str:
    """The exception message of a failed /history entry."""
    for kind, data in entry.get("status", {}).get("messages", []):
        if kind == "execution_error":
            return f"{data.get('node_type')}: {data.get('exception_message', '').strip()}"
    return "the prompt ended with an error"
