"""The transport: a small client for ComfyUI's HTTP and websocket API (stdlib +
websocket-client), its errors and the check of a prompt before it is sent.

It never imports ComfyUI: it talks to any ComfyUI server by URL.

    client = ComfyClient("http://127.0.0.1:8188")
    name = client.upload_image("photo.png")
    result = client.run(prompt)            # queue, follow it to its end, return the history entry
    data = client.view(result["outputs"]["9"]["images"][0])

`run` follows a prompt through the Jobs API (``GET /api/jobs/{id}``: pending, in_progress,
completed, failed, cancelled) where the server offers it (newer ComfyUI, e.g. 0.33.0), the
websocket giving only the progress events; on servers without it (0.3.75) through the websocket
(``executing`` with no node = done). ``/history/{id}`` is read once the prompt is over, and its
``{}`` (which it answers for a prompt not finished as for an unknown one) is waited out, never
read as an unknown prompt.

Editing workflows (filling inputs by node class type, picking models, adding output nodes) is
``workflow.py``; the command line that reaches servers is ``python -m freeseg segment``
(``segment.py``)."""

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
        self.prompt: Optional[dict] = None  # the prompt it concerns, when known (for node titles)


class ComfyConnectionError(ComfyError):
    """The server could not be reached, the connection to it broke, or it answered something
    that is not ComfyUI's JSON (the server is at fault, not the request): a caller with several
    servers retries elsewhere."""


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
        self._jobs: Optional[bool] = None

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
            raise ComfyConnectionError(f"cannot reach the ComfyUI server at {self.url}: {e.reason}") from None
        except (ConnectionError, TimeoutError) as e:  # reset / timed out while reading the answer
            raise ComfyConnectionError(f"lost the connection to the ComfyUI server at {self.url}: {e}") from None

    def _decode(self, method: str, path: str, body: bytes) -> Any:
        """The JSON of an answer; ComfyConnectionError naming the URL when it is not JSON (not a
        ComfyUI server, or a proxy's error page)."""
        try:
            return json.loads(body)
        except ValueError:
            start = one_line(body[:120].decode("utf-8", "replace"))
            raise ComfyConnectionError(f"the server at {self.url} is not a ComfyUI server: it answered {method} "
                                       f"{path} with something that is not JSON ({start!r})") from None

    def get_json(self, path: str) -> Any:
        """GET `path` and decode its JSON body."""
        return self._decode("GET", path, self._request(path))

    def post_json(self, path: str, payload: Any) -> Any:
        """POST `payload` as JSON to `path` and decode the JSON answer (None if empty)."""
        body = self._request(path, json.dumps(payload).encode(), {"Content-Type": "application/json"})
        return self._decode("POST", path, body) if body.strip() else None

    def is_up(self) -> bool:
        """True when the server answers ``/system_stats``."""
        try:
            self.get_json("/system_stats")
            return True
        except ComfyError:
            return False

    def object_info(self, node_class: Optional[str] = None) -> dict:
        """The node definitions the server declares (all, or one class); ComfyConnectionError
        when the answer is not a JSON object (not a ComfyUI server)."""
        path = "/object_info" + (f"/{node_class}" if node_class else "")
        info = self.get_json(path)
        if not isinstance(info, dict):
            raise ComfyConnectionError(f"the server at {self.url} is not a ComfyUI server: GET {path} answered a "
                                       f"JSON {type(info).__name__}, not an object")
        return info

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
        info = self._decode("POST", "/upload/image", body)
        if not isinstance(info, dict) or not isinstance(info.get("name"), str):
            raise ComfyConnectionError(f"the server at {self.url} is not a ComfyUI server: POST /upload/image "
                                       "answered no file name")
        return f"{info['subfolder']}/{info['name']}" if info.get("subfolder") else info["name"]

    def queue(self, prompt: dict, strict: bool = False) -> str:
        """Queue an API-format prompt; returns its prompt id. A rejected prompt raises ComfyError
        whose message lists the server's ``node_errors``.

        ComfyUI queues the outputs that validate and reports the others in ``node_errors``; with
        `strict`, such a partly valid prompt is taken off the queue again (or interrupted) and
        raises ComfyError like a rejected one. The prompt is checked first (`check_prompt`): one
        that could stop the server's prompt worker is never sent."""
        check_prompt(prompt, "the prompt")
        answer = self.post_json("/prompt", {"prompt": prompt, "client_id": self.client_id})
        if not isinstance(answer, dict) or not isinstance(answer.get("prompt_id"), str):
            raise ComfyConnectionError(f"the server at {self.url} is not a ComfyUI server: POST /prompt answered no "
                                       "prompt id")
        prompt_id = answer["prompt_id"]
        if strict and answer.get("node_errors"):
            self.cancel(prompt_id)
            details = {"error": {"type": "prompt_outputs_failed_validation",
                                 "message": "Prompt outputs failed validation", "details": ""},
                       "node_errors": answer["node_errors"]}
            raise ComfyError(f"POST /prompt: {_summarise(details)}", details)
        return prompt_id

    def cancel(self, prompt_id: str) -> None:
        """Take a prompt off the queue, or interrupt it if it is running (only that prompt)."""
        self.post_json("/queue", {"delete": [prompt_id]})
        running = self.get_json("/queue").get("queue_running", [])
        if any(len(item) > 1 and item[1] == prompt_id for item in running):
            self.post_json("/interrupt", {"prompt_id": prompt_id})

    def history(self, prompt_id: str) -> Optional[dict]:
        """The history entry of a finished prompt, or None while it is not finished (or unknown:
        ``/history/{id}`` answers ``{}`` for both)."""
        return self.get_json(f"/history/{prompt_id}").get(prompt_id)

    def jobs_api(self) -> bool:
        """Whether the server offers the Jobs API (``GET /api/jobs``; newer ComfyUI). Asked once."""
        if self._jobs is None:
            try:
                answer = self.get_json("/api/jobs?limit=1")
                self._jobs = isinstance(answer, dict) and isinstance(answer.get("jobs"), list)
            except ComfyConnectionError:
                raise
            except ComfyError:  # 404: an older server
                self._jobs = False
        return self._jobs

    def job(self, prompt_id: str) -> Optional[dict]:
        """The Jobs API's record of a prompt (``status``, ``execution_error``, ...), None when the
        server does not know it (HTTP 404)."""
        try:
            return self.get_json(f"/api/jobs/{prompt_id}")
        except ComfyConnectionError:
            raise
        except ComfyError as e:
            if "HTTP 404" in str(e):
                return None
            raise

    def finished_entry(self, prompt_id: str, wait: float = 10.0) -> dict:
        """The history entry of a prompt known to be over; ``{}`` from /history is waited out
        for up to `wait` seconds (the entry is being written), then ComfyError."""
        deadline = time.monotonic() + wait
        while True:
            entry = self.history(prompt_id)
            if entry is not None:
                return entry
            if time.monotonic() > deadline:
                raise ComfyError(f"prompt {prompt_id} finished but is missing from /history")
            time.sleep(0.1)

    def view(self, file_info: dict) -> bytes:
        """The bytes of an output file given as ``{"filename", "subfolder", "type"}``."""
        query = urllib.parse.urlencode({k: file_info.get(k, "") for k in ("filename", "subfolder", "type")})
        return self._request(f"/view?{query}")

    def interrupt(self) -> None:
        """Ask the server to stop the running prompt."""
        self._request("/interrupt", b"{}", {"Content-Type": "application/json"})

    # -- following a prompt -----------------------------------------------------------------
    def run(self, prompt: dict, timeout: float = 600.0,
            on_event: Optional[Callable[[str, dict], None]] = None, strict: bool = False) -> dict:
        """Queue `prompt`, follow it until it ends (the Jobs API where the server offers it,
        else the websocket: see the module docstring) and return its history entry.

        `on_event(type, data)` sees every JSON websocket message of this prompt (``progress``,
        ``executing``, ``executed``, ...). Raises ComfyError if the prompt fails or is
        interrupted (the message carries the server's exception text). `strict`: see `queue`.
        """
        jobs = self.jobs_api()
        ws = self._websocket(timeout) if on_event is not None or not jobs else None
        try:
            prompt_id = self.queue(prompt, strict=strict)
            deadline = time.monotonic() + timeout
            if jobs:
                self._follow_job(prompt_id, deadline, timeout, ws, on_event)
            else:
                self._follow_websocket(prompt_id, deadline, timeout, ws, on_event)
        finally:
            if ws is not None:
                ws.close()
        return self.finished_entry(prompt_id)

    def _websocket(self, timeout: float) -> Any:
        import websocket  # websocket-client

        ws_url = self.url.replace("http", "ws", 1) + f"/ws?clientId={self.client_id}"
        try:
            return websocket.create_connection(ws_url, timeout=timeout)
        except (OSError, websocket.WebSocketException) as e:
            raise ComfyConnectionError(f"cannot open the websocket of the ComfyUI server at {self.url}: {e}") from None

    def _timed_out(self, prompt_id: str, timeout: float) -> ComfyError:
        try:
            self.cancel(prompt_id)  # do not leave it running (it may be run elsewhere)
        except ComfyError:
            pass
        return ComfyError(f"prompt {prompt_id} did not finish within {timeout:.0f} s")

    def _follow_job(self, prompt_id: str, deadline: float, timeout: float, ws: Any,
                    on_event: Optional[Callable[[str, dict], None]], poll: float = 0.2) -> None:
        """Poll ``/api/jobs/{id}`` until the prompt is over (websocket events, if any, go to
        `on_event` in between). A prompt the server does not know for 10 s raises ComfyError."""
        unknown_since, ended = None, False
        while True:
            if time.monotonic() > deadline:
                raise self._timed_out(prompt_id, timeout)
            if ended:
                time.sleep(poll)
            else:
                ws, ended = self._events(ws, prompt_id, on_event, poll)
            job = self.job(prompt_id)
            if job is None:
                unknown_since = unknown_since or time.monotonic()
                if time.monotonic() - unknown_since > 10.0:
                    raise ComfyError(f"the server at {self.url} does not know prompt {prompt_id} (GET /api/jobs)")
                continue
            unknown_since = None
            status = job.get("status")
            if status in ("completed", "failed", "cancelled") and not ended:
                self._events(ws, prompt_id, on_event, 2.0, to_end=True)  # the last events (the bar's 100%)
            if status == "completed":
                return
            if status == "failed":
                err = job.get("execution_error") or {}
                raise ComfyError(f"node {err.get('node_id')} ({err.get('node_type')}) failed: "
                                 f"{str(err.get('exception_message', '')).strip()}", err)
            if status == "cancelled":
                raise ComfyError(f"prompt {prompt_id} was interrupted", job)

    @staticmethod
    def _events(ws: Any, prompt_id: str, on_event: Optional[Callable[[str, dict], None]], seconds: float,
                to_end: bool = False) -> tuple[Any, bool]:
        """Hand the prompt's websocket events to `on_event` for `seconds` (a sleep without a
        websocket), or with `to_end` until its last one (``executing`` with no node, or its error). Returns
        (the websocket, None once it broke: the events are lost, the Jobs API still says how the
        prompt ends; whether the last event came)."""
        import websocket

        if ws is None:
            if not to_end:
                time.sleep(seconds)
            return None, False
        until = time.monotonic() + seconds
        while time.monotonic() < until:
            ws.settimeout(max(0.01, until - time.monotonic()))
            try:
                raw = ws.recv()
            except websocket.WebSocketTimeoutException:
                break
            except (OSError, websocket.WebSocketException):
                return None, False
            if not isinstance(raw, str):
                continue
            msg = json.loads(raw)
            kind, data = msg.get("type"), msg.get("data") or {}
            if data.get("prompt_id") != prompt_id:
                continue
            if on_event is not None:
                on_event(kind, data)
            if kind == "executing" and data.get("node") is None:
                return ws, True
            if kind in ("execution_error", "execution_interrupted"):
                return ws, True
        return ws, False

    def _follow_websocket(self, prompt_id: str, deadline: float, timeout: float, ws: Any,
                          on_event: Optional[Callable[[str, dict], None]]) -> None:
        """Read the websocket until the prompt is over (``executing`` with no node)."""
        import websocket

        while True:
            ws.settimeout(max(1.0, deadline - time.monotonic()))
            try:
                raw = ws.recv()
            except websocket.WebSocketTimeoutException:
                raise self._timed_out(prompt_id, timeout) from None
            except (OSError, websocket.WebSocketException) as e:
                raise ComfyConnectionError(f"lost the connection to the ComfyUI server at {self.url}: {e}") from None
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
                return


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


DEFAULT_URL = "http://127.0.0.1:8188"


def check_prompt(prompt: Any, what: str) -> None:
    """ComfyError unless `prompt` is an API-format prompt: a non-empty object whose every node is
    an object with a ``class_type`` string and an ``inputs`` object. ComfyUI 0.3.75 answers HTTP
    200 to a prompt with a node without ``inputs`` (or ``inputs: null``), and its prompt worker
    thread dies on it: the server still answers but never runs another prompt. `what` names the
    prompt in the message (e.g. the workflow file)."""
    if not isinstance(prompt, dict) or not prompt:
        raise ComfyError(f"{what} is not an API-format workflow ({{node_id: {{class_type, inputs}}}})")
    for node_id, node in prompt.items():
        if not isinstance(node, dict):
            raise ComfyError(f"{what}: node {node_id!r} is not an object ({{class_type, inputs}})")
        if not isinstance(node.get("class_type"), str) or not node["class_type"]:
            raise ComfyError(f"{what}: node {node_id!r} has no class_type string")
        if not isinstance(node.get("inputs"), dict):
            raise ComfyError(f"{what}: node {node_id!r} ({node['class_type']}) has no inputs object (an empty one "
                             "is {}): refused, as ComfyUI stops running prompts after such a node")


def node_id_key(node_id: str) -> tuple:
    """Sort key of prompt node ids: numbers in numeric order, then the other ids."""
    return (0, int(node_id), "") if node_id.isdigit() else (1, 0, node_id)


def format_node_errors(details: dict, prompt: Optional[dict] = None) -> list[str]:
    """Readable lines from a rejected prompt's ``error`` and ``node_errors``."""
    err = details.get("error")
    head = err.get("message", "") if isinstance(err, dict) else str(err or "")
    if isinstance(err, dict) and err.get("details"):
        head += f": {err['details']}"
    lines = [f"ComfyUI rejected the prompt: {head or 'invalid prompt'}"]
    for node_id, node_err in sorted((details.get("node_errors") or {}).items(), key=lambda kv: node_id_key(kv[0])):
        title = ((prompt or {}).get(node_id) or {}).get("_meta", {}).get("title")
        where = f"node {node_id} ({node_err.get('class_type')}" + (f", {title!r})" if title else ")")
        for e in node_err.get("errors", []):
            detail = f" - {e['details']}" if e.get("details") else ""
            lines.append(f"  {where}: {e.get('message')}{detail}")
    return lines


def one_line(text: str) -> str:
    """`text` with all whitespace runs (newlines too) collapsed to single spaces."""
    return " ".join(str(text).split())
