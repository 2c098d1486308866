"""A small client for ComfyUI's HTTP and websocket API (stdlib + websocket-client).

It never imports ComfyUI: it talks to any ComfyUI server by URL.

    client = ComfyClient("http://127.0.0.1:8188")
    name = client.upload_image("photo.png")
    result = client.run(prompt)            # queue, follow the websocket, return the history entry
    data = client.view(result["outputs"]["9"]["images"][0])
"""

from __future__ import annotations

import json
import mimetypes
import os
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from typing import Any, Callable, Optional


class ComfyError(RuntimeError):
    """A ComfyUI server refused or failed a request; `details` holds the server's JSON."""

    def __init__(self, message: str, details: Optional[dict] = None):
        super().__init__(message)
        self.details = details or {}


class ComfyClient:
    """Talks to one ComfyUI server.

    Args:
        url: base URL, e.g. ``http://127.0.0.1:8188``.
        timeout: seconds for each plain HTTP request.
    """

    def __init__(self, url: str, timeout: float = 30.0):
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.client_id = uuid.uuid4().hex

    # -- plain HTTP -------------------------------------------------------------------------
    def _request(self, path: str, data: Optional[bytes] = None, headers: Optional[dict] = None,
                 method: Optional[str] = None) -> bytes:
        req = urllib.request.Request(self.url + path, data=data, headers=headers or {}, method=method)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return resp.read()
        except urllib.error.HTTPError as e:
            body = e.read()
            try:
                details = json.loads(body)
            except ValueError:
                details = {"body": body.decode("utf-8", "replace")}
            raise ComfyError(f"{method or ('POST' if data else 'GET')} {path} failed with HTTP {e.code}: "
                             f"{_summarise(details)}", details) from None
        except urllib.error.URLError as e:
            raise ComfyError(f"cannot reach the ComfyUI server at {self.url}: {e.reason}") from None

    def get_json(self, path: str) -> Any:
        """GET `path` and decode its JSON body."""
        return json.loads(self._request(path))

    def post_json(self, path: str, payload: Any) -> Any:
        """POST `payload` as JSON to `path` and decode the JSON answer (None if empty)."""
        body = self._request(path, json.dumps(payload).encode(), {"Content-Type": "application/json"})
        return json.loads(body) if body.strip() else None

    def is_up(self) -> bool:
        """True when the server answers ``/system_stats``."""
        try:
            self.get_json("/system_stats")
            return True
        except ComfyError:
            return False

    def object_info(self, node_class: Optional[str] = None) -> dict:
        """The node definitions the server declares (all, or one class)."""
        return self.get_json("/object_info" + (f"/{node_class}" if node_class else ""))

    def upload_image(self, path: str, name: Optional[str] = None, overwrite: bool = True) -> str:
        """Upload an image file to the server's input folder; returns the name to give LoadImage."""
        name = name or os.path.basename(path)
        with open(path, "rb") as f:
            payload = f.read()
        boundary = uuid.uuid4().hex
        ctype = mimetypes.guess_type(name)[0] or "application/octet-stream"
        parts = [
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{name}\"\r\n"
            f"Content-Type: {ctype}\r\n\r\n".encode() + payload + b"\r\n",
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"overwrite\"\r\n\r\n"
            f"{'true' if overwrite else 'false'}\r\n".encode(),
            f"--{boundary}--\r\n".encode(),
        ]
        body = self._request("/upload/image", b"".join(parts),
                             {"Content-Type": f"multipart/form-data; boundary={boundary}"})
        info = json.loads(body)
        return f"{info['subfolder']}/{info['name']}" if info.get("subfolder") else info["name"]

    def queue(self, prompt: dict) -> str:
        """Queue an API-format prompt; returns its prompt id. A rejected prompt raises ComfyError
        whose message lists the server's ``node_errors``."""
        answer = self.post_json("/prompt", {"prompt": prompt, "client_id": self.client_id})
        return answer["prompt_id"]

    def history(self, prompt_id: str) -> Optional[dict]:
        """The history entry of a finished prompt, or None while it is not finished."""
        return self.get_json(f"/history/{prompt_id}").get(prompt_id)

    def view(self, file_info: dict) -> bytes:
        """The bytes of an output file given as ``{"filename", "subfolder", "type"}``."""
        query = urllib.parse.urlencode({k: file_info.get(k, "") for k in ("filename", "subfolder", "type")})
        return self._request(f"/view?{query}")

    def interrupt(self) -> None:
        """Ask the server to stop the running prompt."""
        self._request("/interrupt", b"{}", {"Content-Type": "application/json"})

    # -- websocket --------------------------------------------------------------------------
    def run(self, prompt: dict, timeout: float = 600.0,
            on_event: Optional[Callable[[str, dict], None]] = None) -> dict:
        """Queue `prompt`, follow the websocket until it ends, and return its history entry.

        `on_event(type, data)` sees every JSON websocket message of this prompt (``progress``,
        ``executing``, ``executed``, ...). Raises ComfyError if the prompt fails or is
        interrupted (the message carries the server's exception text).
        """
        import websocket  # websocket-client

        ws_url = self.url.replace("http", "ws", 1) + f"/ws?clientId={self.client_id}"
        ws = websocket.create_connection(ws_url, timeout=timeout)
        try:
            prompt_id = self.queue(prompt)
            deadline = time.monotonic() + timeout
            while True:
                ws.settimeout(max(1.0, deadline - time.monotonic()))
                try:
                    raw = ws.recv()
                except websocket.WebSocketTimeoutException:
                    raise ComfyError(f"prompt {prompt_id} did not finish within {timeout:.0f} s") from None
                if not isinstance(raw, str):
                    continue  # binary preview frames
                msg = json.loads(raw)
                kind, data = msg.get("type"), msg.get("data") or {}
                if data.get("prompt_id") not in (None, prompt_id):
                    continue
                if on_event is not None and data.get("prompt_id") == prompt_id:
                    on_event(kind, data)
                if kind == "execution_error":
                    raise ComfyError(f"node {data.get('node_id')} ({data.get('node_type')}) failed: "
                                     f"{data.get('exception_message', '').strip()}", data)
                if kind == "execution_interrupted":
                    raise ComfyError(f"prompt {prompt_id} was interrupted", data)
                if kind == "executing" and data.get("node") is None and data.get("prompt_id") == prompt_id:
                    break
        finally:
            ws.close()
        entry = self.history(prompt_id)
        if entry is None:
            raise ComfyError(f"prompt {prompt_id} finished but is missing from /history")
        return entry


def _summarise(details: dict) -> str:
    """One readable line from ComfyUI's error JSON (``error`` and ``node_errors``)."""
    err = details.get("error")
    parts = []
    if isinstance(err, dict):
        parts.append(f"{err.get('message', '')} {err.get('details', '')}".strip())
    elif err:
        parts.append(str(err))
    for node_id, node_err in (details.get("node_errors") or {}).items():
        for e in node_err.get("errors", []):
            parts.append(f"node {node_id} ({node_err.get('class_type')}): {e.get('message')}: {e.get('details')}")
    return "; ".join(p for p in parts if p) or json.dumps(details)[:500]
