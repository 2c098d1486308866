"""Several ComfyUI servers on Ray: `python -m freeseg segment DIR --url A --url B` and
`python -m freeseg eval --backend comfyui --url A --url B` (several servers run as Ray actors
bound to them, on a local Ray: ``freeseg.app.cluster``), on two real servers on loopback
(random-weight fixtures, 64x48 images, resolution 128: the nodes' minimum).

At most two servers run at once (this module starts its own, never the session's: one of them
is stopped mid-run). The folder test: the work is split across both, server B is stopped and
server A's actor process is killed while they hold images, every image is still done (redone by
a live or restarted worker) and written exactly once, a broken image fails alone with its reason
in the index, and the outputs equal a single-server run (in-process, without Ray) on a fresh
server; a rerun resumes (nothing queued).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from comfy_harness import MODEL_LINKS, ComfyServer, free_port, link, stand_in_server
from freeseg.app.paths import REPO
from synthetic.scenes import write_test_image
from freeseg.app.remote import upload_name

PYTHON = sys.executable
CLASS_NAMES = "dog, cat, tree, sky"  # the random BLIP-2 writes no real nouns
FAST = ["--resolution", "128", "--set", "FreeSegCaption.max_new_tokens=8", "--clusters", "3", "--seed", "1"]
N_IMAGES = 4


def start_server(base: str, model_files: dict) -> ComfyServer:
    for key, (folder, name) in MODEL_LINKS.items():
        link(model_files[key], os.path.join(base, "models", folder, name))
    return ComfyServer(base).start()


def history_size(server: ComfyServer) -> int:
    """Prompts the server has finished."""
    return len(server.client.get_json("/history"))


def runs_of(server: ComfyServer, paths: list[str]) -> int:
    """Prompts the server has finished that load one of the pictures `paths` (by the name the
    client uploads them under), so prompts other tests left on the server do not count."""
    names = {upload_name(p) for p in paths}
    return sum(any(n.get("class_type") == "LoadImage" and n.get("inputs", {}).get("image") in names
                   for n in entry["prompt"][2].values())
               for entry in server.client.get_json("/history").values())


def picture(path: str, seed: int) -> str:
    """A 64x48 test picture (a different one per seed)."""
    return write_test_image(path, 64, 48, seed)


@pytest.fixture(scope="module")
def servers(model_files, tmp_path_factory):
    """Two servers, "a" and "b" (a test may stop and replace one: the dict is shared)."""
    running = {name: start_server(str(tmp_path_factory.mktemp(f"comfy-{name}")), model_files) for name in "ab"}
    yield running
    for srv in running.values():
        srv.stop()


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    """N_IMAGES pictures and one broken file (bytes that are no image)."""
    root = tmp_path_factory.mktemp("photos")
    for i in range(N_IMAGES):
        picture(str(root / f"img{i}.png"), seed=i)
    (root / "broken.png").write_bytes(b"this is not a PNG")
    return str(root)


def segment(*args: str) -> subprocess.Popen:
    return subprocess.Popen([PYTHON, "-m", "freeseg", "segment", *args, "--class-names", CLASS_NAMES, *FAST],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: float = 600) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"the segment command did not finish within {timeout} s:\n{err[-3000:]}")
    return proc.returncode, out, err


def folder_outputs(out: str, name: str) -> dict:
    """Everything a run wrote for one image: labels.json (without the timings) and the pixels
    of every PNG."""
    with open(os.path.join(out, name, "labels.json"), encoding="utf-8") as f:
        doc = json.load(f)
    doc.pop("timings")
    files = sorted(n for n in os.listdir(os.path.join(out, name)) if n.endswith(".png"))
    return {"labels": doc, "files": files,
            "pixels": [np.asarray(Image.open(os.path.join(out, name, n))).tolist() for n in files]}


def read_stderr_until(proc: subprocess.Popen, pattern: str, timeout: float = 300) -> tuple[re.Match, str]:
    """Read the command's stderr line by line until a line matches `pattern`; (the match, the
    text read so far)."""
    text, deadline = "", time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        assert line or proc.poll() is None, f"the command ended before {pattern!r}:\n{text}"
        text += line
        found = re.search(pattern, line)
        if found:
            return found, text
    pytest.fail(f"no {pattern!r} within {timeout} s:\n{text}")


def test_folder_on_two_servers_with_one_stopped_and_a_worker_killed_mid_run(servers, folder, tmp_path,
                                                                             model_files):
    a, b = servers["a"], servers["b"]
    two = str(tmp_path / "two")
    proc = segment(folder, "--out", two, "--url", a.url, "--url", b.url, "--per-server", "2")
    found, head = read_stderr_until(proc, rf"worker 1: url {re.escape(a.url)} on \S+ \(pid (\d+)\)")
    actor_a = int(found.group(1))
    deadline = time.monotonic() + 300
    while history_size(b) < 1:  # b has finished an image (and holds the next ones): stop it now
        assert proc.poll() is None, "the run ended before server b finished an image:\n" + proc.communicate()[1]
        assert time.monotonic() < deadline, "server b finished no image within 300 s"
        time.sleep(0.1)
    b.stop()
    os.kill(actor_a, signal.SIGKILL)  # and the actor process of server a: Ray restarts it
    code, out, err = finish(proc)
    err = head + err
    assert code == 3, err  # finished, with a failed image
    assert f"warning: {b.url} failed: " in err and "(1 worker(s) left)" in err, err
    assert history_size(a) >= 1  # the work was split across both

    names = [f"img{i}" for i in range(N_IMAGES)]
    summary = json.loads(out)
    assert (summary["images"], summary["done"], summary["failed"]) == (N_IMAGES + 1, N_IMAGES, 1)
    index = json.loads(open(os.path.join(two, "index.json")).read())
    assert [e["folder"] for e in index["images"]] == ["broken"] + names  # input order (sorted)
    broken = index["images"][0]
    assert broken["status"] == "failed" and "cannot read the image" in broken["error"] and not broken["masks"]
    assert all(e["status"] == "done" and e["masks"] for e in index["images"][1:])
    for e in index["images"][1:]:
        for m in e["masks"]:
            assert os.path.isfile(os.path.join(two, m["file"])) and m["label"] in CLASS_NAMES.split(", ")
    done_lines = [ln for ln in err.splitlines() if ln.startswith("[") and " done img" in ln]
    assert sorted(ln.rsplit(" ", 1)[1] for ln in done_lines) == names  # every image done exactly once
    assert f"error: {os.path.join(folder, 'broken.png')}: cannot read the image" in err
    assert "ETA" in done_lines[0] and f"{N_IMAGES + 1}/{N_IMAGES + 1} images" in err
    csv_text = open(os.path.join(two, "index.csv")).read().splitlines()
    assert csv_text[0] == "image,folder,status,index,label,score,area,bbox,mask_file,error"
    assert len(csv_text) == 1 + 1 + sum(len(e["masks"]) for e in index["images"][1:])

    # The reference: one fresh server (no cache from the run above), one prompt at a time.
    servers["b"] = b = start_server(b.base_dir, model_files)
    one = str(tmp_path / "one")
    code, out, err = finish(segment(folder, "--out", one, "--url", b.url, "--per-server", "1", "--quiet"))
    assert code == 3 and not [ln for ln in err.splitlines() if ln.startswith("[")], err  # --quiet: no bar
    for name in names:
        assert folder_outputs(two, name) == folder_outputs(one, name), name

    # Resume: every image is done, only the broken one is tried again; nothing reaches a server.
    before = history_size(a), history_size(b)
    code, out, err = finish(segment(folder, "--out", two, "--url", a.url, "--url", b.url))
    assert code == 3 and json.loads(out)["done"] == N_IMAGES, err
    assert f"{N_IMAGES + 1}/{N_IMAGES + 1} images, {N_IMAGES} already done, 1 failed" in err
    assert (history_size(a), history_size(b)) == before

    # One image, the first server unreachable and the second no ComfyUI (HTML): their workers do
    # not start and are dropped with their reason, the image is done on the next (from its cache:
    # the same prompt).
    dead = f"http://127.0.0.1:{free_port()}"
    with stand_in_server() as html:
        code, out, err = finish(segment(os.path.join(folder, "img0.png"), "--out", str(tmp_path / "single"),
                                        "--url", dead, "--url", html, "--url", a.url, "--quiet"))
    assert code == 0 and f"warning: dropping {dead}: cannot reach" in err, err
    assert f"warning: dropping {html}: the server at {html} is not a ComfyUI server" in err, err
    assert json.loads(out)["masks"] and folder_outputs(str(tmp_path), "single") == folder_outputs(two, "img0")

    # A workflow the servers refuse stops the folder run at once, with ComfyUI's node errors.
    code, out, err = finish(segment(folder, "--out", str(tmp_path / "refused"), "--url", a.url, "--url", b.url,
                                    "--set", "FreeSegClusterMasks.n_clusters=999"))
    assert code == 1 and "Traceback" not in err, err
    assert "error: ComfyUI rejected the prompt" in err and "n_clusters" in err
    assert not os.path.exists(tmp_path / "refused" / "index.json")


def test_interrupted_folder_run_resumes(servers, tmp_path):
    """Ctrl-C (SIGINT) mid-run: exit 130, the image in flight finishes and is kept; the rerun
    does only the images left, and the index then lists every image as done."""
    a = servers["a"]
    photos = tmp_path / "photos"
    photos.mkdir()
    pictures = [picture(str(photos / f"new{i}.png"), seed=100 + i) for i in range(3)]  # no server has seen them
    out = tmp_path / "out"
    proc = segment(str(photos), "--out", str(out), "--url", a.url, "--per-server", "1", "--ray")
    deadline = time.monotonic() + 300
    while not (out / "new0" / "done.json").exists():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, "no image done within 300 s"
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    code, _, err = finish(proc)
    assert code == 130 and "interrupted (rerun the same command to resume)" in err, err
    done = sorted(p.parent.name for p in out.glob("*/done.json"))
    assert "new0" in done and len(done) < 3
    assert runs_of(a, pictures) == len(done)  # nothing queued after the interruption
    code, out_text, err = finish(segment(str(photos), "--out", str(out), "--url", a.url))
    assert code == 0 and json.loads(out_text)["done"] == 3, err
    assert runs_of(a, pictures) == 3  # each image ran once in all
    index = json.loads((out / "index.json").read_text())
    assert [e["status"] for e in index["images"]] == ["done"] * 3


def voc_dataset(root) -> str:
    """A 3-image Pascal-VOC-layout split: the pictures and random ground truth (0 / 8 / 12)."""
    voc = root / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / sub).mkdir(parents=True)
    stems = [f"2007_00000{i}" for i in range(3)]
    rng = np.random.default_rng(0)
    for i, stem in enumerate(stems):
        picture(str(voc / "JPEGImages" / f"{stem}.png"), seed=10 + i)
        Image.open(voc / "JPEGImages" / f"{stem}.png").convert("RGB").save(voc / "JPEGImages" / f"{stem}.jpg",
                                                                            quality=95)
        os.remove(voc / "JPEGImages" / f"{stem}.png")
        gt = rng.choice(np.array([0, 8, 12], dtype=np.uint8), size=(48, 64))
        Image.fromarray(gt, mode="L").save(voc / "SegmentationClass" / f"{stem}.png")
    (voc / "ImageSets/Segmentation/val.txt").write_text("\n".join(stems) + "\n")
    return str(voc)


def sdxl_workflow(path) -> str:
    """freeseg_full with the checkpoint loader replaced by UNETLoader + VAELoader (a bare SDXL UNet)."""
    with open(os.path.join(REPO, "workflows", "api", "freeseg_full.json"), encoding="utf-8") as f:
        wf = json.load(f)
    wf["3"] = {"class_type": "UNETLoader", "inputs": {"unet_name": MODEL_LINKS["sdxl_unet"][1],
                                                      "weight_dtype": "default"}}
    wf["30"] = {"class_type": "VAELoader", "inputs": {"vae_name": MODEL_LINKS["sdxl_vae"][1]}}
    feats = wf["7"]["inputs"]
    feats["vae"] = ["30", 0]
    feats.pop("clip")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(wf, f)
    return str(path)


def evaluate_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "freeseg", "eval", "--dataset", "voc", "--backend", "comfyui",
                           "--set", "FreeSegCaption.max_new_tokens=8", "--clusters", "3", "--seed", "1",
                           "--no-progress", *args], cwd=REPO, capture_output=True, text=True, timeout=600)


def test_eval_comfyui_backend_on_two_servers_and_sdxl(servers, tmp_path):
    a, b = servers["a"], servers["b"]
    root = voc_dataset(tmp_path)
    out = tmp_path / "eval"
    before = history_size(a), history_size(b)
    result = evaluate_cli("--root", root, "--url", a.url, "--url", b.url, "--mode", "open", "--resolution", "128",
                          "--out", str(out), "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    scores = json.loads(result.stdout)
    assert 0.0 <= scores["miou"] <= 1.0 and 0.0 <= scores["miou_per_image"] <= 1.0
    assert "3 image(s) scored, 0 from cache" in result.stderr
    assert history_size(a) > before[0] and history_size(b) > before[1]  # both servers took images
    (pred_dir,) = (out / "predictions").iterdir()
    preds = sorted(pred_dir.iterdir())
    assert [p.stem for p in preds] == [f"2007_00000{i}" for i in range(3)]
    assert all(Image.open(p).size == (64, 48) for p in preds)
    # The same settings again, on one server (in-process, no Ray): every image from the cache (the
    # key does not depend on the servers), the same scores.
    again = evaluate_cli("--root", root, "--url", a.url, "--mode", "open", "--resolution", "128",
                         "--out", str(out), "--json")
    assert again.returncode == 0 and json.loads(again.stdout) == scores
    assert "0 image(s) scored, 3 from cache" in again.stderr
    # The label maps re-scored from the folder give the same figures (one source of truth).
    rescored = subprocess.run([PYTHON, "-m", "freeseg", "eval", "--dataset", "voc", "--root", root, "--predictions",
                               str(pred_dir), "--json"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert json.loads(rescored.stdout) == scores

    # An SDXL UNet through another workflow (UNETLoader + VAELoader), on one server.
    sdxl = evaluate_cli("--root", root, "--url", a.url, "--workflow", sdxl_workflow(tmp_path / "sdxl.json"),
                        "--mode", "open", "--resolution", "128", "--limit", "1", "--json")
    assert sdxl.returncode == 0, sdxl.stderr[-3000:]
    assert 0.0 <= json.loads(sdxl.stdout)["miou"] <= 1.0

    # Errors the user can fix, without a traceback.
    bad = evaluate_cli("--root", root, "--url", a.url, "--checkpoint", "no-such.safetensors", "--mode", "open")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "--checkpoint 'no-such.safetensors'" in bad.stderr and a.url in bad.stderr
