"""Start and stop a real ComfyUI server for the integration tests.

The server (`freeseg.app.server.ComfyServer`) runs `main.py --cpu` from the ComfyUI tree the
environment script installed, on loopback and a free port, with `--base-directory` in a
temporary folder that holds our pack (linked into `custom_nodes/`) and the random-weight
fixtures (linked into `models/`: `MODEL_LINKS`). The fixtures themselves are built by
``synthetic.cache``; test pictures come from ``synthetic.scenes.write_test_image``.
"""

from __future__ import annotations

import contextlib
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Iterator

# The server launcher lives in the library (the embedded mode of `python -m freeseg segment`
# uses it too); re-exported here so the tests keep importing it from the harness.
from freeseg.app.server import PACK_NAME, ComfyServer, default_comfy_dir, free_port, link  # noqa: F401

COMFY_DIR = default_comfy_dir()

# Where each random-weight fixture goes in the server's models/ folder.
MODEL_LINKS = {
    "sd15_ckpt": ("checkpoints", "freeseg-tiny-sd15.safetensors"),
    "sdxl_unet": ("diffusion_models", "freeseg-tiny-sdxl.safetensors"),
    "sdxl_vae": ("vae", "freeseg-tiny-sdxl-vae.safetensors"),
    "pixart_unet": ("diffusion_models", "freeseg-tiny-pixart-sigma.safetensors"),  # a DiT family refused
    "blip2_dir": ("blip2", "tiny-blip2"),
    "open_clip_dir": ("open_clip", "tiny-open-clip"),
}

# Fixtures only the second server (`models_server`) offers besides MODEL_LINKS, so the session
# server keeps one model per loader (the clients pick the only one there). The DiTs
# (synthetic/dit.py): Flux.1-dev and its 16-channel VAE, an SD3.5 checkpoint, and the CLIP-L that
# stands in for both DualCLIPLoader files (T5-XXL and CLIP-G cannot be built here).
EXTRA_MODEL_LINKS = {
    "sd2_ckpt": ("checkpoints", "freeseg-tiny-sd2-v.safetensors"),
    "blip_dir": ("blip", "tiny-blip"),
    "flux_unet": ("diffusion_models", "freeseg-tiny-flux1-dev.safetensors"),
    "flux_vae": ("vae", "freeseg-tiny-flux-ae.safetensors"),
    "sd3_ckpt": ("checkpoints", "freeseg-tiny-sd3.5.safetensors"),
    "clip_l": ("text_encoders", "freeseg-tiny-clip-l.safetensors"),
}


class Graph:
    """Builds an API-format prompt: `n = g.node("Class", input=value or other_node[i])`."""

    def __init__(self):
        self.prompt: dict = {}

    def node(self, class_type: str, **inputs) -> "NodeRef":
        node_id = str(len(self.prompt) + 1)
        self.prompt[node_id] = {"class_type": class_type,
                                "inputs": {k: (v.ref if isinstance(v, Out) else v) for k, v in inputs.items()}}
        return NodeRef(node_id)

    def probe(self, value: "Out", name: str = "") -> "NodeRef":
        return self.node("FreeSegTestProbe", value=value, name=name)


class Out:
    def __init__(self, node_id: str, index: int):
        self.ref = [node_id, index]


class NodeRef:
    def __init__(self, node_id: str):
        self.id = node_id

    def __getitem__(self, index: int) -> Out:
        return Out(self.id, index)


def probed(result: dict, node: NodeRef) -> dict:
    """What a FreeSegTestProbe node reported, from a history entry."""
    import json

    return json.loads(result["outputs"][node.id]["probe"][0])


class NotComfyHandler(BaseHTTPRequestHandler):
    """A web server that is no ComfyUI: HTML to every GET."""

    def do_GET(self):  # noqa: N802 (http.server's name)
        body = b"<html><body>Welcome to nginx!</body></html>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def stand_in_server(handler: type[BaseHTTPRequestHandler] = NotComfyHandler) -> Iterator[str]:
    """A stand-in HTTP server on loopback in its own thread; yields its URL, shut down after."""
    httpd = HTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
