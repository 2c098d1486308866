"""`python -m freeseg segment DIR --ray`: Ray actors that each start their own embedded ComfyUI
(``freeseg.app.cluster``, a local Ray, CPU, the random-weight fixtures). A worker's server killed
mid-run: Ray restarts its actor (a fresh server) and reruns its images, every image is written
exactly once; a server that never starts is named with its reason. (Servers given by --url on
Ray: tests/server/test_multi_server.py.)"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from freeseg.app.paths import REPO
from synthetic.scenes import write_test_image

PYTHON = sys.executable
CLASS_NAMES = "dog, cat, tree, sky"  # the random BLIP-2 writes no real nouns
FAST = ["--resolution", "128", "--set", "FreeSegCaption.max_new_tokens=8", "--clusters", "3", "--seed", "1"]


def segment(*args: str) -> subprocess.Popen:
    return subprocess.Popen([PYTHON, "-m", "freeseg", "segment", *args, "--class-names", CLASS_NAMES, *FAST],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def server_pid(port: str) -> int:
    """The ComfyUI process listening on `port` (its command line holds ``--port PORT``)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        if b"main.py" in args and b"--port" in args and args[args.index(b"--port") + 1] == port.encode():
            return int(pid)
    raise AssertionError(f"no ComfyUI process on port {port}")


def test_embedded_workers_on_ray_with_a_server_killed_mid_run(model_files, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(3):
        write_test_image(str(photos / f"img{i}.png"), 64, 48, 200 + i)
    out = tmp_path / "out"
    proc = segment(str(photos), "--out", str(out), "--ray", "--workers", "2", "--per-server", "1",
                   "--random-weights")
    ports, head, deadline = [], "", time.monotonic() + 400
    while len(ports) < 2:
        line = proc.stderr.readline()
        assert line and time.monotonic() < deadline, f"the workers did not start:\n{head}{line}"
        head += line
        ports += re.findall(r"^worker \d: embedded http://127\.0\.0\.1:(\d+) ", line)
    while not list(out.glob("*/done.json")):  # an image is done: kill a server holding the next ones
        assert proc.poll() is None and time.monotonic() < deadline, head + proc.communicate()[1]
        time.sleep(0.1)
    os.kill(server_pid(ports[1]), signal.SIGKILL)
    try:
        stdout, err = proc.communicate(timeout=500)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the run did not finish within 500 s:\n" + head + proc.communicate()[1][-3000:])
    err = head + err
    assert proc.returncode == 0, err[-4000:]
    summary = json.loads(stdout)
    assert (summary["images"], summary["done"], summary["failed"]) == (3, 3, 0)
    done_lines = [ln for ln in err.splitlines() if ln.startswith("[") and " done img" in ln]
    assert sorted(ln.rsplit(" ", 1)[1] for ln in done_lines) == ["img0", "img1", "img2"]  # each written once
    index = json.loads((out / "index.json").read_text())
    assert all(e["status"] == "done" and e["masks"] for e in index["images"])
    assert "RANDOM test fixtures" in err


def test_an_embedded_server_that_never_starts_is_named(tmp_path):
    fake = tmp_path / "ComfyUI"
    fake.mkdir()
    (fake / "main.py").write_text("import sys\nprint('this ComfyUI cannot start')\nsys.exit(3)\n")
    photos = tmp_path / "photos"
    photos.mkdir()
    write_test_image(str(photos / "img0.png"), 64, 48, 0)
    models = tmp_path / "models"
    for name in ("checkpoints/sd.safetensors", "open_clip/oc/open_clip_config.json"):  # names to pick, no weights
        (models / name).parent.mkdir(parents=True)
        (models / name).write_text("{}")
    proc = segment(str(photos), "--out", str(tmp_path / "out"), "--ray", "--comfyui", str(fake), "--models",
                   str(models))
    stdout, err = proc.communicate(timeout=300)
    assert proc.returncode == 1 and not stdout, err[-3000:]
    assert "error: embedded worker 1: the embedded ComfyUI did not start: ComfyUI exited with 3" in err, err[-3000:]
