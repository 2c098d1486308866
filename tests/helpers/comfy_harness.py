"""Start and stop a real ComfyUI server for the integration tests.

The server runs `main.py --cpu` from the ComfyUI tree the environment script installed, on
loopback and a free port, with `--base-directory` in a temporary folder that holds our pack
(linked into `custom_nodes/`) and the random-weight fixtures (linked into `models/`).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

from freeseg.client import ComfyClient

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIXTURE_CACHE = os.environ.get("FREESEG_FIXTURE_CACHE", os.path.join(REPO, ".cache", "fixtures"))
COMFY_DIR = os.environ.get("FREESEG_COMFYUI_DIR", os.path.join(REPO, ".venv", "ComfyUI"))
PACK_NAME = "freeseg-diff"

# Where each random-weight fixture goes in the server's models/ folder.
MODEL_LINKS = {
    "sd15_ckpt": ("checkpoints", "freeseg-tiny-sd15.safetensors"),
    "sdxl_unet": ("diffusion_models", "freeseg-tiny-sdxl.safetensors"),
    "sdxl_vae": ("vae", "freeseg-tiny-sdxl-vae.safetensors"),
    "sd3_unet": ("diffusion_models", "freeseg-tiny-sd3.safetensors"),
    "blip2_dir": ("blip2", "tiny-blip2"),
    "open_clip_dir": ("open_clip", "tiny-open-clip"),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def link(src: str, dst: str) -> None:
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    if not os.path.lexists(dst):
        os.symlink(src, dst)


class ComfyServer:
    """A ComfyUI server process; `client` talks to it, `log()` returns its output so far."""

    def __init__(self, base_dir: str, extra_args: tuple[str, ...] = ()):
        self.base_dir = base_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.client = ComfyClient(self.url)
        self.log_path = os.path.join(base_dir, "server.log")
        self.extra_args = extra_args
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 120.0) -> "ComfyServer":
        if not os.path.isfile(os.path.join(COMFY_DIR, "main.py")):
            raise RuntimeError(f"no ComfyUI at {COMFY_DIR}: run scripts/setup_env.sh first")
        link(REPO, os.path.join(self.base_dir, "custom_nodes", PACK_NAME))
        cmd = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--base-directory", self.base_dir, "--database-url", "sqlite:///:memory:",
               "--disable-auto-launch", "--disable-api-nodes", *self.extra_args]
        env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=COMFY_DIR, stdout=self._log, stderr=subprocess.STDOUT,
                                     env=env, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            if self.client.is_up():
                return self
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"ComfyUI did not answer within {timeout:.0f} s:\n{self.log()[-4000:]}")

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        self._log.close()


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
