"""A small client for ComfyUI's HTTP and websocket API (stdlib + websocket-client).

It never imports ComfyUI: it talks to any ComfyUI server by URL.

    client = ComfyClient("http://127.0.0.1:8188")
    name = client.upload_image("photo.png")
    result = client.run(prompt)            # queue, follow the websocket, return the history entry
    data = client.view(result["outputs"]["9"]["images"][0])

As a command (`python -m freeseg.app.client IMAGE --out DIR`) it uploads an image, fills an
API-format workflow (default `workflows/api/freeseg_full.json`) by node class type, runs it
with a progress bar on stderr, downloads every output file into DIR and prints the labels
JSON (the FreeSegRefineMasks `json` output) on stdout.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import mimetypes
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from typing import Any, Callable, Optional, TextIO


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
            on_event: Optional[Callable[[str, dict], None]] = None, strict: bool = False) -> dict:
        """Queue `prompt`, follow the websocket until it ends, and return its history entry.

        `on_event(type, data)` sees every JSON websocket message of this prompt (``progress``,
        ``executing``, ``executed``, ...). Raises ComfyError if the prompt fails or is
        interrupted (the message carries the server's exception text). `strict`: see `queue`.
        """
        import websocket  # websocket-client

        ws_url = self.url.replace("http", "ws", 1) + f"/ws?clientId={self.client_id}"
        try:
            ws = websocket.create_connection(ws_url, timeout=timeout)
        except (OSError, websocket.WebSocketException) as e:
            raise ComfyConnectionError(f"cannot open the websocket of the ComfyUI server at {self.url}: {e}") from None
        try:
            prompt_id = self.queue(prompt, strict=strict)
            deadline = time.monotonic() + timeout
            while True:
                ws.settimeout(max(1.0, deadline - time.monotonic()))
                try:
                    raw = ws.recv()
                except websocket.WebSocketTimeoutException:
                    try:
                        self.cancel(prompt_id)  # do not leave it running (it may be retried elsewhere)
                    except ComfyError:
                        pass
                    raise ComfyError(f"prompt {prompt_id} did not finish within {timeout:.0f} s") from None
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


# -- workflow automation ------------------------------------------------------------------------

PACK_DIR = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_URL = "http://127.0.0.1:8188"
DEFAULT_WORKFLOW = os.path.join(PACK_DIR, "workflows", "api", "freeseg_full.json")
NONE_FOUND = "(none found)"  # the pack's loaders list this when their folder is empty

# Output slots of the nodes whose results we collect: FreeSegRefineMasks / FreeSegPipeline
# (masks, labels, preview, json; the pipeline also captions) and FreeSegCaption.
SEGMENTER_SLOTS = {
    "FreeSegRefineMasks": {"masks": 1, "labels": 2, "preview": 5, "json": 6},
    "FreeSegPipeline": {"masks": 1, "labels": 2, "preview": 5, "json": 6, "captions": 7},
}
CAPTION_SLOTS = {"FreeSegCaption": {"captions": 0, "class_names": 1}}
IMAGE_OUTPUT_NODES = ("SaveImage", "PreviewImage")

# --checkpoint / --blip2 / --clip: (option, class type, input, what it is, models/ subfolder, what goes there)
MODEL_CHOICES = {
    "checkpoint": ("--checkpoint", "CheckpointLoaderSimple", "ckpt_name", "checkpoint", "checkpoints",
                   "an SD1.5/SD2.x/SDXL checkpoint (.safetensors)"),
    "blip2": ("--blip2", "FreeSegBLIP2Loader", "model_name", "BLIP / BLIP-2 captioner", "blip",
              "a BLIP folder <name>/ (config.json, model.safetensors, processor and tokenizer files; the "
              "paper's: Salesforce/blip-image-captioning-base; a BLIP-2 folder goes in models/blip2/)"),
    "clip": ("--clip", "FreeSegCLIPLoader", "model_name", "open_clip model", "open_clip",
             "an open_clip folder <name>/ (open_clip_config.json, open_clip_model.safetensors, e.g. "
             "timm/vit_base_patch32_clip_224.openai)"),
}


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


def load_workflow(path: str) -> dict:
    """An API-format workflow from a JSON file (checked by `check_prompt`); ComfyError for a
    missing file, bad JSON, a UI-format workflow (which ComfyUI's /prompt does not take) or a
    malformed node."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as e:
        raise ComfyError(f"cannot read the workflow {path}: {e.strerror}") from None
    except ValueError as e:
        raise ComfyError(f"the workflow {path} is not valid JSON: {e}") from None
    if isinstance(data, dict) and "nodes" in data and "links" in data:
        raise ComfyError(f"{path} is a UI workflow: export it in API format (Workflow > Export (API)) "
                         "or use the file under workflows/api/")
    check_prompt(data, f"the workflow {path}")
    return data


def nodes_of(prompt: dict, *class_types: str) -> list[str]:
    """Ids of the nodes of the given class types, in id order."""
    return sorted((k for k, n in prompt.items() if n["class_type"] in class_types), key=_id_key)


def _id_key(node_id: str) -> tuple:
    return (0, int(node_id), "") if node_id.isdigit() else (1, 0, node_id)


def _is_link(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


def missing_node_types(prompt: dict, object_info: dict) -> list[str]:
    """The class types `prompt` uses that the server's /object_info does not declare (sorted)."""
    return sorted({n["class_type"] for n in prompt.values()} - set(object_info))


def missing_nodes_message(missing: list[str], url: str) -> str:
    """One line naming the node types a server lacks and what to install."""
    what = ", ".join(missing)
    if any(m.startswith("FreeSeg") for m in missing):
        fix = ("install the freeseg-diff node pack there (clone it into ComfyUI/custom_nodes/, pip install "
               "-r freeseg-diff/requirements.txt) and restart ComfyUI")
    else:
        fix = "install the node pack(s) that provide them and restart ComfyUI"
    return f"the ComfyUI server at {url} has no node type(s) {what}: {fix}"


def combo_options(object_info: dict, class_type: str, input_name: str) -> Optional[list]:
    """The choices the server lists for a combo input (None when it is not a combo)."""
    node = object_info.get(class_type) or {}
    for section in ("required", "optional"):
        spec = (node.get("input") or {}).get(section, {}).get(input_name)
        if spec is None:
            continue
        if isinstance(spec[0], list):
            return list(spec[0])
        if len(spec) > 1 and isinstance(spec[1], dict) and "options" in spec[1]:
            return list(spec[1]["options"])
    return None


def parse_override(text: str) -> tuple[str, str, Any]:
    """``Class.input=value`` -> (class, input, value); the value is JSON when it parses as JSON
    (numbers, true/false, quoted strings), else the text itself."""
    key, sep, raw = text.partition("=")
    class_type, dot, input_name = key.strip().partition(".")
    if not sep or not dot or not class_type or not input_name:
        raise ComfyError(f"--set {text!r}: expected CLASS.INPUT=VALUE, e.g. FreeSegDiffusionFeatures.resolution=256")
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw
    return class_type, input_name.strip(), value


def set_input(prompt: dict, class_type: str, input_name: str, value: Any, required: bool = True,
              literal_only: bool = False) -> int:
    """Set `input_name` on every `class_type` node (that has it as a value, not a link, when
    `literal_only`); returns how many were set. ComfyError when `required` and none was."""
    count = 0
    for node_id in nodes_of(prompt, class_type):
        inputs = prompt[node_id]["inputs"]
        if literal_only and (input_name not in inputs or _is_link(inputs[input_name])):
            continue
        inputs[input_name] = value
        count += 1
    if required and not count:
        raise ComfyError(f"the workflow has no {class_type} node with an input {input_name!r} to set")
    return count


def fill_workflow(prompt: dict, image: Optional[str] = None, class_names: Optional[str] = None,
                  n_clusters: Optional[int] = None, seed: Optional[int] = None,
                  checkpoint: Optional[str] = None, blip2: Optional[str] = None, clip: Optional[str] = None,
                  overrides: Optional[list] = None) -> dict:
    """A copy of the API workflow with its inputs filled by node class type (never by id).

    image: LoadImage.image. class_names: FreeSegCaption / FreeSegPipeline.class_names (and
    FreeSegCLIPLabel's when it is typed in, not linked). n_clusters: FreeSegClusterMasks /
    FreeSegPipeline. seed: the same nodes plus FreeSegDiffusionFeatures (its noise).
    checkpoint / blip2 / clip: the loaders' file names. overrides: (class, input, value) triples.
    """
    out = copy.deepcopy(prompt)
    if image is not None:
        set_input(out, "LoadImage", "image", image)
    if class_names is not None:
        n = set_input(out, "FreeSegCaption", "class_names", class_names, required=False)
        n += set_input(out, "FreeSegPipeline", "class_names", class_names, required=False)
        n += set_input(out, "FreeSegCLIPLabel", "class_names", class_names, required=False, literal_only=True)
        if not n:
            raise ComfyError("the workflow has no FreeSegCaption, FreeSegPipeline or FreeSegCLIPLabel node "
                             "taking class names")
    if n_clusters is not None:
        if not (set_input(out, "FreeSegClusterMasks", "n_clusters", n_clusters, required=False)
                + set_input(out, "FreeSegPipeline", "n_clusters", n_clusters, required=False)):
            raise ComfyError("the workflow has no FreeSegClusterMasks or FreeSegPipeline node for the cluster count")
    if seed is not None:
        if not (set_input(out, "FreeSegClusterMasks", "seed", seed, required=False)
                + set_input(out, "FreeSegPipeline", "seed", seed, required=False)):
            raise ComfyError("the workflow has no FreeSegClusterMasks or FreeSegPipeline node for the seed")
        set_input(out, "FreeSegDiffusionFeatures", "seed", seed, required=False)
    for role, value in (("checkpoint", checkpoint), ("blip2", blip2), ("clip", clip)):
        if value is not None:
            _, class_type, input_name = MODEL_CHOICES[role][:3]
            set_input(out, class_type, input_name, value)
    for class_type, input_name, value in overrides or []:
        set_input(out, class_type, input_name, value)
    return out


def drop_nodes(prompt: dict, class_type: str) -> dict:
    """A copy without the `class_type` nodes and without the inputs linked to them (use it for
    optional inputs only, e.g. FreeSegCaption's `blip2`)."""
    out = {k: copy.deepcopy(n) for k, n in prompt.items() if n["class_type"] != class_type}
    gone = set(prompt) - set(out)
    for node in out.values():
        node["inputs"] = {k: v for k, v in node["inputs"].items() if not (_is_link(v) and v[0] in gone)}
    return out


def typed_class_names(prompt: dict) -> str:
    """The class names typed into the workflow's caption / pipeline / label nodes (joined)."""
    names = []
    for node_id in nodes_of(prompt, "FreeSegCaption", "FreeSegPipeline", "FreeSegCLIPLabel"):
        value = prompt[node_id]["inputs"].get("class_names")
        if isinstance(value, str) and value.strip():
            names.append(value.strip())
    return ", ".join(names)


def choose_models(prompt: dict, object_info: dict, url: str, explicit: Optional[dict] = None) -> dict:
    """Check (and where needed pick) the model file of each loader against what the server lists.

    A name given in `explicit` (``{"checkpoint"|"blip2"|"clip": name}``) must be on the server.
    Otherwise the workflow's name is kept when the server has it, else the server's only one is
    taken. Without any BLIP-2 model the captioner is left out when class names are typed in.
    Returns the (copied) prompt; ComfyError says what to pass or to put where.
    """
    out = copy.deepcopy(prompt)
    explicit = explicit or {}
    for role, (flag, class_type, input_name, what, folder, goes) in MODEL_CHOICES.items():
        ids = nodes_of(out, class_type)
        wanted = explicit.get(role)
        if not ids:
            if wanted is not None:
                raise ComfyError(f"{flag} {wanted}: the workflow has no {class_type} node")
            continue
        options = combo_options(object_info, class_type, input_name)
        if options is None:
            continue
        options = [o for o in options if o != NONE_FOUND]
        if wanted is not None:
            if wanted not in options:
                raise ComfyError(f"{flag} {wanted!r}: the server at {url} has no such {what}; it has: "
                                 f"{', '.join(options) or 'none'}")
            set_input(out, class_type, input_name, wanted)
            continue
        for node_id in ids:
            current = out[node_id]["inputs"].get(input_name)
            if current in options or _is_link(current) or out[node_id]["inputs"].get("download") is True:
                continue
            if len(options) == 1:
                out[node_id]["inputs"][input_name] = options[0]
            elif not options:
                if role == "blip2" and typed_class_names(out):
                    out = drop_nodes(out, class_type)
                    break
                extra = " (or type class names: --class-names)" if role == "blip2" else ""
                raise ComfyError(f"the server at {url} has no {what}: put {goes} in its models/{folder}/{extra}")
            else:
                raise ComfyError(f"the workflow's {what} {current!r} is not on the server at {url}; pick one "
                                 f"with {flag}: {', '.join(options)}")
    return out


def ensure_outputs(prompt: dict) -> tuple[dict, dict]:
    """A copy of the prompt with an output node on every result we collect, and their ids.

    Roles: ``json``, ``labels``, ``captions``, ``class_names`` (PreviewAny text), ``preview``
    and ``masks`` (SaveImage / PreviewImage; masks through MaskToImage). Existing output nodes
    are used; missing ones are added (PreviewAny, PreviewImage: temporary files only).
    ComfyError when the workflow has no FreeSegRefineMasks / FreeSegPipeline node.
    """
    out = copy.deepcopy(prompt)
    segs = nodes_of(out, *SEGMENTER_SLOTS)
    if len(segs) != 1:
        raise ComfyError("the workflow must have exactly one FreeSegRefineMasks or FreeSegPipeline node "
                         f"(it has {len(segs)})")
    seg = segs[0]
    slots = SEGMENTER_SLOTS[out[seg]["class_type"]]
    sources: dict[str, list] = {role: [seg, slot] for role, slot in slots.items() if role != "masks"}
    for cap in nodes_of(out, *CAPTION_SLOTS)[:1]:
        for role, slot in CAPTION_SLOTS[out[cap]["class_type"]].items():
            sources.setdefault(role, [cap, slot])
    next_id = max([int(k) for k in out if k.isdigit()] + [0]) + 1

    def add(class_type: str, inputs: dict, title: str) -> str:
        nonlocal next_id
        node_id = str(next_id)
        next_id += 1
        out[node_id] = {"class_type": class_type, "inputs": inputs, "_meta": {"title": title}}
        return node_id

    def consumer(class_types: tuple, input_name: str, source: list) -> Optional[str]:
        for node_id in nodes_of(out, *class_types):
            if out[node_id]["inputs"].get(input_name) == source:
                return node_id
        return None

    roles: dict[str, str] = {}
    for role, source in sources.items():
        if role == "preview":
            roles[role] = (consumer(IMAGE_OUTPUT_NODES, "images", source)
                           or add("PreviewImage", {"images": source}, "freeseg client: preview"))
        else:
            roles[role] = (consumer(("PreviewAny",), "source", source)
                           or add("PreviewAny", {"source": source}, f"freeseg client: {role}"))
    to_image = consumer(("MaskToImage",), "mask", [seg, slots["masks"]])
    to_image = to_image or add("MaskToImage", {"mask": [seg, slots["masks"]]}, "freeseg client: masks to image")
    roles["masks"] = (consumer(IMAGE_OUTPUT_NODES, "images", [to_image, 0])
                      or add("PreviewImage", {"images": [to_image, 0]}, "freeseg client: masks"))
    return out, roles


def output_files(entry: dict) -> list[tuple[str, dict]]:
    """(node id, file info) of every file a history entry lists, in node id order."""
    found = []
    for node_id in sorted(entry.get("outputs", {}), key=_id_key):
        for value in entry["outputs"][node_id].values():
            if isinstance(value, list):
                found += [(node_id, v) for v in value if isinstance(v, dict) and "filename" in v]
    return found


def output_text(entry: dict, node_id: Optional[str]) -> Optional[str]:
    """The text a PreviewAny node showed, from a history entry (None when absent)."""
    texts = (entry.get("outputs", {}).get(node_id) or {}).get("text") if node_id else None
    return "\n".join(str(t) for t in texts) if texts else None


def format_node_errors(details: dict, prompt: Optional[dict] = None) -> list[str]:
    """Readable lines from a rejected prompt's ``error`` and ``node_errors``."""
    err = details.get("error")
    head = err.get("message", "") if isinstance(err, dict) else str(err or "")
    if isinstance(err, dict) and err.get("details"):
        head += f": {err['details']}"
    lines = [f"ComfyUI rejected the prompt: {head or 'invalid prompt'}"]
    for node_id, node_err in sorted((details.get("node_errors") or {}).items(), key=lambda kv: _id_key(kv[0])):
        title = ((prompt or {}).get(node_id) or {}).get("_meta", {}).get("title")
        where = f"node {node_id} ({node_err.get('class_type')}" + (f", {title!r})" if title else ")")
        for e in node_err.get("errors", []):
            detail = f" - {e['details']}" if e.get("details") else ""
            lines.append(f"  {where}: {e.get('message')}{detail}")
    return lines


def one_line(text: str) -> str:
    """`text` with all whitespace runs (newlines too) collapsed to single spaces."""
    return " ".join(str(text).split())


def shown(text: str) -> str:
    """`text` as printable UTF-8: the bytes of a file name that are not UTF-8 (which Python
    holds as surrogate escapes) written ``\\xNN``."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate that is no escaped byte
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


class ProgressBar:
    """A plain text progress bar on stderr, fed with ComfyClient.run's websocket events.

    On a terminal it redraws one line; otherwise it writes a line per node started."""

    def __init__(self, prompt: dict, stream: Optional[TextIO] = None, width: int = 30):
        self.prompt = prompt
        self.total = max(len(prompt), 1)
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self.done: set[str] = set()
        self.current: Optional[str] = None
        self.step = (0, 0)
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.shown = False
        self.last = ""

    def __call__(self, kind: str, data: dict) -> None:
        if kind == "execution_cached":
            self.done.update(str(n) for n in data.get("nodes") or [])
        elif kind == "executing":
            if self.current is not None:
                self.done.add(self.current)
            node = data.get("node")
            self.current = None if node is None else str(node)
            self.step = (0, 0)
            if node is None:
                self.done.update(self.prompt)
        elif kind == "progress":
            self.step = (int(data.get("value") or 0), int(data.get("max") or 0))
            if not self.tty:
                return
        elif kind == "execution_success":
            self.done.update(self.prompt)
            self.current = None
        else:
            return
        self.draw()

    def fraction(self) -> float:
        """How much of the prompt has run (0..1)."""
        part = self.step[0] / self.step[1] if self.step[1] else 0.0
        current = part if self.current is not None and self.current not in self.done else 0.0
        return min(1.0, (len(self.done & set(self.prompt)) + current) / self.total)

    def draw(self) -> None:
        frac = self.fraction()
        filled = int(round(frac * self.width))
        bar = "#" * filled + "-" * (self.width - filled)
        what = ""
        if self.current is not None:
            node = self.prompt.get(self.current, {})
            what = node.get("_meta", {}).get("title") or node.get("class_type", self.current)
            if self.step[1]:
                what += f" {self.step[0]}/{self.step[1]}"
        line = f"[{bar}] {frac * 100:3.0f}% {what}".rstrip()
        if self.tty:
            self.stream.write("\r" + line.ljust(100)[:100])
        elif line != self.last:
            self.stream.write(line + "\n")
        self.last = line
        self.stream.flush()
        self.shown = True

    def close(self) -> None:
        """End the bar's line (call once the run is over, or failed)."""
        if self.shown and self.tty:
            self.stream.write("\n")
            self.stream.flush()
        self.shown = False


def upload_name(path: str) -> str:
    """A content-addressed upload name (`freeseg-<sha1>.<ext>`), so re-running the same image
    does not add files and never overwrites a different picture on the server."""
    with open(path, "rb") as f:
        digest = hashlib.sha1(f.read()).hexdigest()[:16]
    return f"freeseg-{digest}{os.path.splitext(path)[1].lower() or '.png'}"


def prepare(client: ComfyClient, workflow: dict, image_path: Optional[str], class_names: Optional[str] = None,
            n_clusters: Optional[int] = None, seed: Optional[int] = None, models: Optional[dict] = None,
            overrides: Optional[list] = None) -> tuple[dict, dict]:
    """Everything before queueing: checks the server has the workflow's node types, uploads the
    image, fills the workflow, checks / picks the model names and adds the output nodes.

    Returns (prompt, roles) as `ensure_outputs` does. Raises ComfyError (unreachable server,
    missing node types, missing models, bad inputs)."""
    info = client.object_info()
    missing = missing_node_types(workflow, info)
    if missing:
        raise ComfyError(missing_nodes_message(missing, client.url))
    image = None
    if image_path is not None:
        if not os.path.isfile(image_path):
            raise ComfyError(f"no image file {image_path}")
        image = client.upload_image(image_path, name=upload_name(image_path))
    prompt = fill_workflow(workflow, image=image, class_names=class_names, n_clusters=n_clusters, seed=seed,
                           overrides=overrides)
    prompt = choose_models(prompt, info, client.url, models)
    return ensure_outputs(prompt)


def execute(client: ComfyClient, prompt: dict, timeout: float = 3600.0, quiet: bool = False) -> dict:
    """Run the prompt with a progress bar on stderr (unless `quiet`); returns the history entry."""
    bar = None if quiet else ProgressBar(prompt)
    try:
        return client.run(prompt, timeout=timeout, on_event=bar, strict=True)
    except ComfyError as e:
        e.prompt = prompt
        raise
    finally:
        if bar is not None:
            bar.close()


def download_outputs(client: ComfyClient, entry: dict, out_dir: str) -> list[str]:
    """Save every output file of a history entry into `out_dir` (by its file name; a clash gets
    a numeric suffix); returns the paths written."""
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for _, info in output_files(entry):
        base = os.path.basename(str(info["filename"])) or "output"
        path, stem, ext, n = os.path.join(out_dir, base), *os.path.splitext(base), 1
        while path in written:
            path = os.path.join(out_dir, f"{stem}-{n}{ext}")
            n += 1
        with open(path, "wb") as f:
            f.write(client.view(info))
        written.append(path)
    return written


def report_error(err: ComfyError, prompt: Optional[dict] = None, stream: Optional[TextIO] = None) -> None:
    """Print a ComfyError for a command-line user: a rejected prompt's node errors one per line,
    anything else on one line."""
    stream = stream if stream is not None else sys.stderr
    if "node_errors" in err.details:
        for line in format_node_errors(err.details, prompt if prompt is not None else err.prompt):
            print(f"error: {line}" if not line.startswith("  ") else line, file=stream)
    else:
        print(f"error: {one_line(str(err))}", file=stream)


def out_folder_error(out: str) -> Optional[str]:
    """Why `out` cannot be the output folder (it, or a folder above it, is an existing file),
    or None."""
    path = os.path.abspath(out)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        what = "is" if path == os.path.abspath(out) else f"is inside {shown(path)}, which is"
        return f"--out {shown(out)} {what} an existing file, not a folder"
    return None


def add_workflow_arguments(parser: argparse.ArgumentParser) -> None:
    """The options `python -m freeseg.app.client` and `python -m freeseg segment` share."""
    parser.add_argument("--workflow", default=DEFAULT_WORKFLOW,
                        help="API-format workflow JSON (default: workflows/api/freeseg_full.json)")
    parser.add_argument("--class-names", default=None, metavar="NAMES",
                        help="extra class names, comma-separated (added to the caption's nouns)")
    parser.add_argument("--clusters", type=int, default=None, metavar="K", help="masks per image (paper: 4)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the noise and the k-means start")
    parser.add_argument("--checkpoint", default=None, metavar="NAME", help="checkpoint file name (models/checkpoints)")
    parser.add_argument("--blip2", default=None, metavar="NAME",
                        help="BLIP / BLIP-2 folder name (models/blip or models/blip2)")
    parser.add_argument("--clip", default=None, metavar="NAME", help="open_clip folder or file name (models/open_clip)")
    parser.add_argument("--resolution", type=int, default=None, metavar="PX",
                        help="resolution of the diffusion features pass (workflow default: 512)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="CLASS.INPUT=VALUE",
                        help="set any input of the workflow's nodes of a class, e.g. FreeSegRefineMasks.method=guided")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for the run (default 3600)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def workflow_settings(args: argparse.Namespace) -> tuple[dict, list]:
    """(models, overrides) from the shared options (ComfyError for a malformed --set)."""
    models = {role: getattr(args, role) for role in MODEL_CHOICES if getattr(args, role) is not None}
    overrides = [parse_override(o) for o in args.overrides]
    if args.resolution is not None:
        overrides.insert(0, ("FreeSegDiffusionFeatures", "resolution", args.resolution))
    return models, overrides


def main(argv: Optional[list[str]] = None) -> int:
    """`python -m freeseg.app.client IMAGE [--url URL] [--out DIR] ...`: run a workflow on a server."""
    parser = argparse.ArgumentParser(
        prog="python -m freeseg.app.client",
        description="Run a FreeSeg-Diff workflow on a ComfyUI server: upload IMAGE, fill the workflow, queue it, "
                    "download its output files into --out and print the labels JSON.")
    parser.add_argument("image", metavar="IMAGE", help="the picture to segment")
    parser.add_argument("--url", default=DEFAULT_URL, help=f"ComfyUI server (default {DEFAULT_URL})")
    parser.add_argument("--out", default="freeseg-output", metavar="DIR",
                        help="folder for the downloaded output files (default ./freeseg-output)")
    add_workflow_arguments(parser)
    args = parser.parse_args(argv)
    problem = out_folder_error(args.out)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    client = ComfyClient(args.url)
    prompt = None
    try:
        models, overrides = workflow_settings(args)
        workflow = load_workflow(args.workflow)
        prompt, roles = prepare(client, workflow, args.image, class_names=args.class_names,
                                n_clusters=args.clusters, seed=args.seed, models=models, overrides=overrides)
        entry = execute(client, prompt, timeout=args.timeout, quiet=args.quiet)
        written = download_outputs(client, entry, args.out)
    except ComfyError as e:
        report_error(e, prompt)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    labels = output_text(entry, roles.get("json"))
    try:
        records = json.loads(labels) if labels is not None else []
    except ValueError:
        records = labels
    print(f"saved {len(written)} file(s) in {args.out}", file=sys.stderr)
    print(json.dumps(records, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
