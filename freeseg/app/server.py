"""Start and stop a ComfyUI server as a subprocess (`main.py`), without importing ComfyUI.

Used by `python -m freeseg segment` (the embedded mode) and by the integration tests.

The server runs `main.py` of a ComfyUI install on loopback and a free port, with
`--base-directory` pointing at a folder of its own: this pack is linked into its
`custom_nodes/`, and the caller puts (or links) the models into its `models/`.

    with ComfyServer(base_dir, comfy_dir="/path/to/ComfyUI") as server:
        server.client.object_info()
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from typing import IO, Optional, Sequence

from .client import ComfyClient
from .paths import REPO

PACK_NAME = "freeseg-diff"


def default_comfy_dir() -> str:
    """The ComfyUI install to run: ``$FREESEG_COMFYUI_DIR`` or the project's ``.venv/ComfyUI``."""
    return os.environ.get("FREESEG_COMFYUI_DIR") or os.path.join(REPO, ".venv", "ComfyUI")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def link(src: str, dst: str) -> None:
    """Symlink `dst` -> `src` (creating the parent folders) unless `dst` already exists."""
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    if not os.path.lexists(dst):
        os.symlink(src, dst)


def supported_flags(comfy_dir: str) -> Optional[set[str]]:
    """The ``--flags`` ComfyUI's argument parser declares (from ``comfy/cli_args.py``), or None
    when that file cannot be read (then every flag is assumed to exist)."""
    try:
        with open(os.path.join(comfy_dir, "comfy", "cli_args.py"), encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        return None
    return set(re.findall(r"[\"'](--[a-z0-9][a-z0-9-]*)[\"']", text))


def _term_with_parent() -> None:
    """In the child before exec (Linux): SIGTERM when the parent dies (``PR_SET_PDEATHSIG``)."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


class ComfyServer:
    """A ComfyUI server process; `client` talks to it, `log()` returns its output so far.

    Args:
        base_dir: the server's ``--base-directory`` (models/, custom_nodes/, input/, output/ ...).
        extra_args: more command-line arguments for ``main.py``.
        comfy_dir: the ComfyUI install whose ``main.py`` runs (default: `default_comfy_dir()`).
        python: the interpreter that runs it (default: this one).
        cpu: pass ``--cpu`` (no GPU).
        link_pack: link this pack into ``base_dir/custom_nodes/freeseg-diff``.
        port: the port (default: a free one).
        die_with_parent: (Linux) the server gets SIGTERM when the process that started it dies,
            even by SIGKILL (a Ray actor that owns it).
    """

    def __init__(self, base_dir: str, extra_args: Sequence[str] = (), comfy_dir: Optional[str] = None,
                 python: Optional[str] = None, cpu: bool = True, link_pack: bool = True,
                 port: Optional[int] = None, die_with_parent: bool = False):
        self.die_with_parent = die_with_parent
        self.base_dir = base_dir
        self.comfy_dir = comfy_dir or default_comfy_dir()
        self.python = python or sys.executable
        self.cpu = cpu
        self.link_pack = link_pack
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.client = ComfyClient(self.url)
        self.log_path = os.path.join(base_dir, "server.log")
        self.extra_args = tuple(extra_args)
        self.proc: Optional[subprocess.Popen] = None
        self._log: Optional[IO[str]] = None

    def command(self) -> list[str]:
        """The command line that starts the server (run in `comfy_dir`)."""
        flags = supported_flags(self.comfy_dir)
        cmd = [self.python, "main.py"] + (["--cpu"] if self.cpu else [])
        cmd += ["--listen", "127.0.0.1", "--port", str(self.port), "--base-directory", self.base_dir]
        optional = [("--database-url", "sqlite:///:memory:"), ("--disable-auto-launch", None),
                    ("--disable-api-nodes", None)]
        for flag, value in optional:
            if flags is None or flag in flags:
                cmd += [flag] + ([value] if value is not None else [])
        return cmd + list(self.extra_args)

    def start(self, timeout: float = 120.0) -> "ComfyServer":
        """Start the server and wait until it answers; RuntimeError (with the end of its log)
        when it exits or does not answer within `timeout` seconds. Whatever stops the wait (an
        error, Ctrl-C) stops the server first."""
        if not os.path.isfile(os.path.join(self.comfy_dir, "main.py")):
            raise RuntimeError(f"no ComfyUI main.py in {self.comfy_dir}: run scripts/setup_env.sh to build the "
                               "project's environment, or point to a ComfyUI install")
        os.makedirs(self.base_dir, exist_ok=True)
        if self.link_pack:
            link(REPO, os.path.join(self.base_dir, "custom_nodes", PACK_NAME))
        env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        self._log = open(self.log_path, "w")
        group = ({"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP} if os.name == "nt"
                 else {"start_new_session": True})
        if self.die_with_parent and sys.platform.startswith("linux"):
            group["preexec_fn"] = _term_with_parent
        self.proc = subprocess.Popen(self.command(), cwd=self.comfy_dir, stdout=self._log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, **group)
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
                if self.client.is_up():
                    return self
                time.sleep(0.25)
            raise RuntimeError(f"ComfyUI did not answer within {timeout:.0f} s:\n{self.log()[-4000:]}")
        except BaseException:
            self.stop()
            raise

    def log(self) -> str:
        """Everything the server printed so far."""
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def stop(self) -> None:
        """Stop the server (SIGTERM to its process group, SIGKILL after 20 s, or at once when
        the wait is interrupted)."""
        if self.proc is not None and self.proc.poll() is None:
            if os.name == "nt":
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(timeout=10)
            else:
                try:
                    os.killpg(self.proc.pid, signal.SIGTERM)
                    self.proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                    self.proc.wait(timeout=10)
                except ProcessLookupError:
                    pass
                except BaseException:  # interrupted while waiting (a second Ctrl-C): never leave it running
                    os.killpg(self.proc.pid, signal.SIGKILL)
                    raise
        self._close_log()

    def __enter__(self) -> "ComfyServer":
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.stop()
