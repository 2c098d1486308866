"""The command line that reaches servers, `python -m freeseg segment` (any workflow on any
server; the output folder), and the workflow editing and transport under it, against the real
ComfyUI server, one embedded-server run with --random-weights, and their error messages.

The unit tests at the top need no server (they run against fake /object_info dicts and a
stub HTTP server); the rest use the session's server with the random-weight fixtures."""

from __future__ import annotations

import copy
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler

import numpy as np
import pytest
from PIL import Image

from comfy_harness import MODEL_LINKS, stand_in_server
from freeseg.app.paths import REPO
from freeseg.app import client, console
from freeseg.app import workflow as wf
from freeseg.app.segment import build_parser, pick_models, segment_diffusers
from freeseg.app.output import write_segmentation
from freeseg.labels_file import LABELS_FORMAT, mask_file_name

PYTHON = sys.executable
WORKFLOW = os.path.join(REPO, "workflows", "api", "freeseg_full.json")
CLASS_NAMES = "dog, cat, tree, sky"  # the random BLIP-2 writes no real nouns
FAST = ["--resolution", "128", "--set", "FreeSegCaption.max_new_tokens=8"]
WIDTH, HEIGHT = 80, 56


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `python -m <args>` from the repository root (as a user would)."""
    return subprocess.run([PYTHON, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> str:
    """A small synthetic picture: two discs on a gradient."""
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH]
    img = np.stack([xx / WIDTH, yy / HEIGHT, np.full_like(xx, 0.3, float)], -1)
    img[(xx - 25) ** 2 + (yy - 30) ** 2 < 15 ** 2] = (0.9, 0.2, 0.2)
    img[(xx - 58) ** 2 + (yy - 20) ** 2 < 12 ** 2] = (0.1, 0.2, 0.9)
    path = str(tmp_path_factory.mktemp("cli") / "picture.png")
    Image.fromarray((img * 255).astype(np.uint8)).save(path)
    return path


def renumbered(prompt: dict, offset: int = 100) -> dict:
    """The same workflow with other node ids (filling must go by class type, not id)."""
    new = {k: str(int(k) + offset) for k in prompt}
    out = {}
    for k, node in prompt.items():
        node = copy.deepcopy(node)
        node["inputs"] = {n: [new[v[0]], v[1]] if wf.is_link(v) else v for n, v in node["inputs"].items()}
        out[new[k]] = node
    return out


def truncated_jpeg(path: str) -> str:
    """A JPEG cut off halfway (PIL opens it, but cannot load its pixels)."""
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    with open(path, "wb") as f:
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
    return path


def without_inputs(path: str, how: str) -> str:
    """freeseg_full plus a node "99" with no `inputs` (how="missing") or `inputs: null` (how="null")."""
    with open(WORKFLOW, encoding="utf-8") as f:
        workflow = json.load(f)
    workflow["99"] = {"class_type": "PreviewAny"} if how == "missing" else {"class_type": "PreviewAny", "inputs": None}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(workflow, f)
    return path


# -- no server --------------------------------------------------------------------------------------


def test_prompts_with_a_node_without_inputs_are_never_sent(tmp_path):
    """ComfyUI 0.3.75 answers HTTP 200 to such a prompt and its prompt worker dies: the client
    refuses it before any request, naming the node."""
    good = {"1": {"class_type": "LoadImage", "inputs": {"image": "x.png"}}}
    client.check_prompt(good, "p")
    for node, why in (({"class_type": "PreviewAny"}, "node '2' (PreviewAny) has no inputs object"),
                      ({"class_type": "PreviewAny", "inputs": None}, "node '2' (PreviewAny) has no inputs object"),
                      ({"class_type": "PreviewAny", "inputs": []}, "node '2' (PreviewAny) has no inputs object"),
                      ({"inputs": {}}, "node '2' has no class_type string"),
                      ("PreviewAny", "node '2' is not an object")):
        prompt = dict(good, **{"2": node})
        with pytest.raises(client.ComfyError, match="^" + re.escape(f"the prompt: {why}")):
            client.ComfyClient("http://127.0.0.1:9").queue(prompt)  # nothing listens there: refused before sending
    for how in ("missing", "null"):
        path = without_inputs(str(tmp_path / f"{how}.json"), how)
        with pytest.raises(client.ComfyError, match=f"^the workflow {path}: node '99' \\(PreviewAny\\) has no inputs"):
            wf.load_workflow(path)


def test_out_that_is_a_file_is_refused_before_anything_runs(tmp_path, image):
    taken = tmp_path / "taken.txt"
    taken.write_text("keep me")
    dead = "http://127.0.0.1:9"  # never asked: the check comes first
    for out, what in ((taken, "is an existing file"), (taken / "sub", f"is inside {taken}, which is an existing file")):
        for command in (("freeseg", "segment", image), ("freeseg", "segment", os.path.dirname(image))):
            result = cli(*command, "--out", str(out), "--url", dead, timeout=60)
            assert result.returncode == 2 and not result.stdout, result.stderr
            assert result.stderr.strip().splitlines() == [f"error: --out {out} {what}, not a folder"]
    assert taken.read_text() == "keep me"


def test_a_server_that_answers_no_json_is_named(tmp_path, image):
    with stand_in_server() as url:
        runs = [cli("freeseg", "segment", image, "--out", str(tmp_path / "one"), "--url", url, timeout=60),
                cli("freeseg", "segment", os.path.dirname(image), "--out", str(tmp_path / "dir"), "--url", url,
                    timeout=60)]
    for result in runs:
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
        (line,) = result.stderr.strip().splitlines()
        assert line.startswith(f"error: the server at {url} is not a ComfyUI server: it answered GET /object_info "
                               "with something that is not JSON ('<html><body>Welcome to nginx!"), line
    assert not any((tmp_path / d).exists() for d in ("one", "dir"))



def test_missing_node_types_are_named():
    workflow = wf.load_workflow(WORKFLOW)
    info = {t: {} for t in ("LoadImage", "CheckpointLoaderSimple", "PreviewAny", "SaveImage", "MaskToImage")}
    missing = wf.missing_node_types(workflow, info)
    assert missing == ["FreeSegBLIP2Loader", "FreeSegCLIPLabel", "FreeSegCLIPLoader", "FreeSegCaption",
                       "FreeSegClusterMasks", "FreeSegDiffusionFeatures", "FreeSegRefineMasks",
                       "FreeSegSaveSegments"]
    message = wf.missing_nodes_message(missing, "http://h:1")
    assert "http://h:1" in message and "FreeSegRefineMasks" in message and "freeseg-diff" in message
    assert wf.missing_node_types(workflow, {t: {} for t in {n["class_type"] for n in workflow.values()}}) == []


def test_fill_goes_by_class_type_and_outputs_are_found_or_added():
    workflow = renumbered(wf.load_workflow(WORKFLOW))
    filled = wf.fill_workflow(workflow, image="x.png", class_names="dog, cat", n_clusters=3, seed=7,
                              checkpoint="c.safetensors", blip2="b", clip="o",
                              overrides=[wf.parse_override("FreeSegDiffusionFeatures.resolution=256")])
    by_type = {n["class_type"]: n["inputs"] for n in filled.values()}
    assert by_type["LoadImage"]["image"] == "x.png"
    assert by_type["FreeSegCaption"]["class_names"] == "dog, cat"
    assert wf.is_link(by_type["FreeSegCLIPLabel"]["class_names"])  # linked to the caption: left alone
    assert (by_type["FreeSegClusterMasks"]["n_clusters"], by_type["FreeSegClusterMasks"]["seed"]) == (3, 7)
    assert by_type["FreeSegDiffusionFeatures"]["resolution"] == 256
    assert by_type["CheckpointLoaderSimple"]["ckpt_name"] == "c.safetensors"
    assert (by_type["FreeSegBLIP2Loader"]["model_name"], by_type["FreeSegCLIPLoader"]["model_name"]) == ("b", "o")
    assert workflow != filled and wf.nodes_of(workflow, "LoadImage") == wf.nodes_of(filled, "LoadImage")

    prompt, roles = wf.ensure_outputs(filled)
    refine = wf.nodes_of(prompt, "FreeSegRefineMasks")[0]
    assert prompt[roles["json"]]["inputs"]["source"] == [refine, 6]
    assert prompt[roles["labels"]]["inputs"]["source"] == [refine, 2]
    assert prompt[roles["preview"]]["inputs"]["images"] == [refine, 5]
    assert roles["json"] in workflow and roles["masks"] in workflow  # the workflow's own output nodes
    caption = wf.nodes_of(prompt, "FreeSegCaption")[0]
    assert roles["captions"] not in workflow and prompt[roles["captions"]]["inputs"]["source"] == [caption, 0]
    with pytest.raises(client.ComfyError, match="--set"):
        wf.parse_override("resolution=3")


def test_model_choice_and_node_error_formatting():
    workflow = wf.load_workflow(WORKFLOW)
    info = {"CheckpointLoaderSimple": {"input": {"required": {"ckpt_name": [["only.safetensors"], {}]}}},
            "FreeSegBLIP2Loader": {"input": {"required": {"model_name": ["COMBO", {"options": ["(none found)"]}]}}},
            "FreeSegCLIPLoader": {"input": {"required": {"model_name": [["a", "b"], {}]}}}}
    with pytest.raises(client.ComfyError, match="pick one with --clip: a, b"):
        wf.choose_models(wf.fill_workflow(workflow, class_names="dog"), info, "U")
    with pytest.raises(client.ComfyError, match="no BLIP / BLIP-2 captioner: put a BLIP folder"):
        wf.choose_models(workflow, info, "U", {"clip": "b"})
    with pytest.raises(client.ComfyError, match="--checkpoint 'x': the server at U has no such checkpoint"):
        wf.choose_models(workflow, info, "U", {"checkpoint": "x"})
    # With class names typed in and no BLIP-2 on the server, the captioner is left out.
    prompt = wf.choose_models(wf.fill_workflow(workflow, class_names="dog"), info, "U", {"clip": "b"})
    assert not wf.nodes_of(prompt, "FreeSegBLIP2Loader")
    caption = prompt[wf.nodes_of(prompt, "FreeSegCaption")[0]]["inputs"]
    assert "blip2" not in caption  # and an empty caption text instead: the typed names alone
    assert prompt[caption["captions"][0]] == {"class_type": "PrimitiveString", "inputs": {"value": ""},
                                              "_meta": {"title": "No caption (class names alone)"}}
    assert prompt[wf.nodes_of(prompt, "CheckpointLoaderSimple")[0]]["inputs"]["ckpt_name"] == "only.safetensors"

    details = {"error": {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation"},
               "node_errors": {"8": {"class_type": "FreeSegClusterMasks", "dependent_outputs": ["12"], "errors": [
                   {"type": "value_bigger_than_max", "message": "Value 99 bigger than max of 64",
                    "details": "n_clusters"}]}}}
    lines = client.format_node_errors(details, workflow)
    assert lines[0] == "ComfyUI rejected the prompt: Prompt outputs failed validation"
    assert lines[1] == ("  node 8 (FreeSegClusterMasks, 'FreeSeg-Diff Cluster Masks'): Value 99 bigger than max "
                        "of 64 - n_clusters")


def test_progress_bar_text():
    out = io.StringIO()
    prompt = {"1": {"class_type": "A", "inputs": {}}, "2": {"class_type": "B", "inputs": {}, "_meta": {"title": "Bee"}}}
    bar = console.ProgressBar(prompt, stream=out, width=10)
    for kind, data in [("execution_cached", {"nodes": ["1"]}), ("executing", {"node": "2"}),
                       ("progress", {"value": 1, "max": 2, "node": "2"}), ("executing", {"node": None}),
                       ("execution_success", {})]:
        bar(kind, data)
    bar.close()
    assert out.getvalue().splitlines() == ["[#####-----]  50%", "[#####-----]  50% Bee", "[##########] 100%"]


def test_output_folder_layout(tmp_path):
    masks = [np.zeros((4, 6), bool), np.ones((4, 6), np.float32) * 0.7]
    masks[0][1:3, 2:5] = True
    records = [{"label": "Red car!", "score": 0.5, "area": 999, "mask": 3}, {"label": "sky", "score": 0.25}]
    (tmp_path / "mask_7_old.png").write_bytes(b"")
    doc = write_segmentation(str(tmp_path), "/x/pic.jpg", masks, records, Image.new("RGB", (6, 4)), "a car",
                             ["car", "sky"], settings={"n_clusters": 2})
    assert doc["masks"][0] == {"index": 0, "image": 0, "mask": 3, "file": "mask_0_Red_car.png", "label": "Red car!",
                               "score": 0.5, "area": 6, "bbox": [2, 1, 5, 3]}
    assert doc["masks"][1]["file"] == mask_file_name(1, "sky") == "mask_1_sky.png"
    assert mask_file_name(2, "potted plant") == "mask_2_potted_plant.png"  # as freeseg.backends.diffusers names them
    assert (doc["format"], doc["width"], doc["height"], doc["backend"], doc["settings"], doc["labels"]) == (
        LABELS_FORMAT, 6, 4, "comfyui", {"n_clusters": 2}, "labels.json")
    assert doc["images"] == [{"index": 0, "source": "/x/pic.jpg", "overlay": "overlay.png", "caption": "a car",
                              "class_names": ["car", "sky"]}]
    assert sorted(os.listdir(tmp_path)) == ["labels.json", "mask_0_Red_car.png", "mask_1_sky.png", "overlay.png"]
    assert json.loads((tmp_path / "labels.json").read_text()) == doc
    m = Image.open(tmp_path / "mask_0_Red_car.png")
    assert m.mode == "L" and m.size == (6, 4) and set(np.unique(np.asarray(m))) == {0, 255}


def test_missing_weights_say_what_to_put_where(tmp_path, image):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "a.safetensors").write_bytes(b"")
    with pytest.raises(Exception) as err:
        pick_models(str(tmp_path), {}, None)
    text = str(err.value)
    assert f"{tmp_path}/blip/<name>/ (config.json" in text and f"{tmp_path}/blip2/<name>/" in text
    assert f"{tmp_path}/open_clip/<name>/ (open_clip_config.json, open_clip_model.safetensors" in text
    assert "checkpoints/" not in text.split("\n", 1)[1]  # the checkpoint is there
    result = cli("freeseg", "segment", image, "--out", str(tmp_path / "o"), "--models", str(tmp_path),
                 "--clip", "x", timeout=60)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "--clip 'x': not in" in result.stderr


def test_diffusers_backend_calls_freeseg_pipeline(tmp_path, monkeypatch, image):
    """--backend diffusers: FreeSegPipeline.from_pretrained on the picked model paths, then
    segment_to_folder (stand-ins here: the real ones have their own tests)."""
    for sub, name in (("checkpoints", "sd.safetensors"), ("blip2", "b2/config.json"),
                      ("open_clip", "oc/open_clip_config.json")):
        (tmp_path / sub / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / sub / name).write_text("{}")
    calls = {}

    class FakePipeline:
        @classmethod
        def from_pretrained(cls, sd, clip=None, blip2=None, *, device=None, **overrides):
            calls["load"] = dict(sd=sd, clip=clip, blip2=blip2, device=device, **overrides)
            return cls()

    def segment_to_folder(pipeline, image_path, out_dir, class_names=None):
        calls["run"] = (image_path, out_dir, class_names)
        return {"backend": "diffusers", "masks": []}

    import freeseg.app.segment as app_segment
    import freeseg.backends.diffusers as backend

    monkeypatch.setattr(backend, "FreeSegPipeline", FakePipeline)
    monkeypatch.setattr(app_segment, "segment_to_folder", segment_to_folder)
    args = build_parser().parse_args([image, "--out", str(tmp_path / "o"), "--backend", "diffusers", "--models",
                                      str(tmp_path), "--clusters", "3", "--cpu"])
    assert segment_diffusers(args, {}, "dog, cat") == {"backend": "diffusers", "masks": []}
    assert calls["load"] == {"sd": str(tmp_path / "checkpoints" / "sd.safetensors"),
                             "clip": str(tmp_path / "open_clip" / "oc"), "blip2": str(tmp_path / "blip2" / "b2"),
                             "device": "cpu", "n_clusters": 3}
    assert calls["run"] == (image, str(tmp_path / "o"), "dog, cat")


class _NoPackServer(BaseHTTPRequestHandler):
    """A stand-in for a ComfyUI server without the pack: /object_info lists core nodes only."""

    def do_GET(self):  # noqa: N802 (http.server's name)
        body = json.dumps({t: {"input": {}} for t in ("LoadImage", "CheckpointLoaderSimple", "SaveImage",
                                                       "PreviewAny", "MaskToImage")}).encode()
        self.send_response(200 if self.path.startswith("/object_info") else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_cli_names_missing_node_types_and_unreachable_server(tmp_path, image):
    with stand_in_server(_NoPackServer) as url:
        result = cli("freeseg", "segment", image, "--out", str(tmp_path / "o"), "--url", url, timeout=60)
    assert result.returncode == 1, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert url in line and "FreeSegCaption" in line and "FreeSegRefineMasks" in line and "freeseg-diff" in line

    dead = url  # closed now
    for source in (image, os.path.dirname(image)):
        result = cli("freeseg", "segment", source, "--out", str(tmp_path / "o"), "--url", dead, timeout=60)
        assert result.returncode != 0
        (line,) = result.stderr.strip().splitlines()
        assert line.startswith("error: cannot reach the ComfyUI server at " + dead), line
    assert not (tmp_path / "o").exists()


# -- the session's server -----------------------------------------------------------------------------


def test_segment_cli_with_model_names_shows_progress(server, tmp_path, image):
    """Model names, cluster count and seed given: the run uses them and draws its progress bar
    on stderr (node titles included); stdout is the labels document."""
    out = tmp_path / "out"
    result = cli("freeseg", "segment", image, "--url", server.url, "--out", str(out), "--class-names", CLASS_NAMES,
                 "--clusters", "3", "--seed", "1", "--checkpoint", MODEL_LINKS["sd15_ckpt"][1],
                 "--blip2", MODEL_LINKS["blip2_dir"][1], "--clip", MODEL_LINKS["open_clip_dir"][1], *FAST)
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc == json.loads((out / "labels.json").read_text())
    assert doc["masks"] and all(m["label"] in CLASS_NAMES.split(", ") and m["image"] == 0 for m in doc["masks"])
    assert len(doc["masks"]) <= 3 and doc["settings"]["n_clusters"] == 3 and doc["settings"]["seed"] == 1
    assert "[" + "#" * 30 + "] 100%" in result.stderr and "FreeSeg-Diff Diffusion Features" in result.stderr


def test_segment_cli_on_a_server_writes_the_output_folder(server, tmp_path, image):
    out = tmp_path / "seg"
    # no model names: the server's only checkpoint / BLIP-2 / open_clip are picked
    result = cli("freeseg", "segment", image, "--out", str(out), "--url", server.url, "--class-names", CLASS_NAMES,
                 "--quiet", *FAST)
    assert result.returncode == 0, result.stderr
    doc = json.loads((out / "labels.json").read_text())
    assert json.loads(result.stdout) == doc
    assert (doc["format"], doc["width"], doc["height"], doc["backend"]) == (LABELS_FORMAT, WIDTH, HEIGHT, "comfyui")
    (info,) = doc["images"]
    assert info["source"] == image and info["overlay"] == "overlay.png"
    assert isinstance(info["caption"], str) and info["caption"]  # captioned by the (random) BLIP-2
    assert set(CLASS_NAMES.split(", ")) <= set(info["class_names"])
    assert doc["settings"]["resolution"] == 128 and doc["settings"]["use_caption"] is True
    assert doc["timings"]["total"] > 0
    assert doc["masks"] and sorted(os.listdir(out)) == sorted(["labels.json", "overlay.png"]
                                                              + [m["file"] for m in doc["masks"]])
    for i, seg in enumerate(doc["masks"]):
        assert seg["index"] == i and seg["file"] == mask_file_name(i, seg["label"])
        assert seg["label"] in info["class_names"] and seg["image"] == 0
        mask = Image.open(out / seg["file"])
        pixels = np.asarray(mask)
        assert mask.mode == "L" and mask.size == (WIDTH, HEIGHT) and set(np.unique(pixels)) <= {0, 255}
        assert seg["area"] == int((pixels == 255).sum()) > 0
        ys, xs = np.nonzero(pixels)
        assert seg["bbox"] == [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]
        assert 0.0 <= seg["score"] <= 1.0
    overlay = Image.open(out / "overlay.png")
    assert overlay.mode == "RGB" and overlay.size == (WIDTH, HEIGHT)


def test_rejected_prompt_prints_node_errors(server, tmp_path, image):
    # Only n_clusters is wrong: ComfyUI accepts the outputs that validate (the caption previews)
    # and reports the rest; the client takes such a prompt back and fails like a rejected one.
    # With max_new_tokens wrong too, no output validates and ComfyUI answers HTTP 400.
    for extra in ([], ["--set", "FreeSegCaption.max_new_tokens=0"]):
        result = cli("freeseg", "segment", image, "--url", server.url, "--out", str(tmp_path / "o"), "--class-names",
                     CLASS_NAMES, "--clusters", "999", *FAST, *extra)
        assert result.returncode == 1 and "Traceback" not in result.stderr
        lines = result.stderr.strip().splitlines()
        assert lines[0] == "error: ComfyUI rejected the prompt: Prompt outputs failed validation", lines
        cluster = [l for l in lines if "(FreeSegClusterMasks, 'FreeSeg-Diff Cluster Masks')" in l]
        caption = [l for l in lines if "(FreeSegCaption, 'FreeSeg-Diff Caption')" in l]
        assert cluster and "999" in cluster[0] and "n_clusters" in cluster[0], lines
        assert bool(caption) == bool(extra) and all("max_new_tokens" in l for l in caption), lines
        assert not (tmp_path / "o").exists() and not result.stdout
    deadline = time.monotonic() + 30
    while server.client.get_json("/queue") != {"queue_running": [], "queue_pending": []}:
        assert time.monotonic() < deadline, "the partly valid prompt was left on the server's queue"
        time.sleep(0.2)


@pytest.mark.skipif(os.name != "posix", reason="file names are bytes and links are plain on POSIX only")
def test_folder_with_a_link_loop_a_non_utf8_name_and_a_truncated_jpeg(server, tmp_path, image):
    """A `**` glob over a folder that links back to itself: each file once; caf\\xe9.png (not
    UTF-8) is segmented and the index is written; a truncated JPEG fails alone with its reason,
    and single-image mode refuses it with the same reason."""
    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    with open(os.fsencode(str(root)) + b"/caf\xe9.png", "wb") as f:
        Image.open(image).save(f, format="PNG")
    broken = truncated_jpeg(str(root / "sub" / "truncated.jpg"))
    os.symlink(str(root), str(root / "sub" / "loop"))
    out = tmp_path / "out"
    result = cli("freeseg", "segment", str(root / "**" / "*.*"), "--out", str(out), "--url", server.url,
                 "--class-names", CLASS_NAMES, "--quiet", *FAST)
    assert result.returncode == 3 and "Traceback" not in result.stderr, result.stderr
    index = json.loads((out / "index.json").read_text(encoding="utf-8"))
    assert [(e["image"], e["folder"], e["status"]) for e in index["images"]] == [
        (f"{root}/caf\\xe9.png", "caf\\xe9", "done"), (broken, "sub__truncated", "failed")]
    assert index["images"][0]["masks"] and (out / "caf\\xe9" / "labels.json").is_file()
    reason = f"cannot read the image {broken}: image file is truncated"
    assert index["images"][1]["error"].startswith(reason)
    rows = (out / "index.csv").read_text(encoding="utf-8").splitlines()
    assert len(rows) == 1 + len(index["images"][0]["masks"]) + 1
    assert rows[-1].startswith(f"{broken},sub__truncated,failed")

    # One image: the same check, the same reason, before any upload; a file that is no image
    # names the user's file, not the server's copy of it.
    (tmp_path / "bad.png").write_bytes(b"this is not a PNG")
    for path, why in ((broken, reason), (str(tmp_path / "bad.png"), f"cannot read the image {tmp_path}/bad.png: ")):
        single = cli("freeseg", "segment", path, "--out", str(tmp_path / "single"), "--url", server.url, "--quiet",
                     timeout=60)
        assert single.returncode == 1 and "Traceback" not in single.stderr, single.stderr
        (line,) = single.stderr.strip().splitlines()
        assert line.startswith(f"error: {why}") and "freeseg-" not in line and "left to try" not in line, line
        assert not (tmp_path / "single").exists()


def test_a_workflow_node_without_inputs_is_never_sent(server, tmp_path, image, upload):
    """A --workflow with a node without inputs (or inputs: null) is refused before anything is
    sent, naming the node; the server goes on running prompts (ComfyUI 0.3.75 would have lost its
    prompt worker)."""
    before = len(server.client.get_json("/history"))
    for how, command in (("missing", ("freeseg", "segment", os.path.dirname(image), "--out", str(tmp_path / "c"),
                                      "--url", server.url)),
                         ("null", ("freeseg", "segment", image, "--out", str(tmp_path / "s"), "--url", server.url))):
        path = without_inputs(str(tmp_path / f"{how}.json"), how)
        result = cli(*command, "--workflow", path, timeout=60)
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
        (line,) = result.stderr.strip().splitlines()
        assert line.startswith(f"error: the workflow {path}: node '99' (PreviewAny) has no inputs object"), line
    assert len(server.client.get_json("/history")) == before  # nothing was queued
    prompt = {"1": {"class_type": "LoadImage", "inputs": {"image": upload(32, 24, seed=5)}},
              "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}}
    assert server.client.run(prompt, timeout=60)["outputs"]["2"]["images"]  # the prompt worker still runs


def comfy_processes(base: str) -> dict[int, str]:
    """{pid: command line} of the live processes whose command line names `base` (Linux /proc)."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode("utf-8", "replace")
            with open(f"/proc/{pid}/stat") as f:
                zombie = f.read().rsplit(")", 1)[1].split()[0] == "Z"
        except OSError:
            continue
        if base in cmdline and "main.py" in cmdline and not zombie:
            found[int(pid)] = cmdline
    return found


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds the ComfyUI process through /proc")
def test_ctrl_c_while_the_embedded_server_starts_stops_it(model_files, tmp_path, image):
    """SIGINT to the command while its embedded ComfyUI is still starting: exit 130, and no
    ComfyUI process of it is left running."""
    proc = subprocess.Popen([PYTHON, "-m", "freeseg", "segment", image, "--out", str(tmp_path / "o"),
                             "--random-weights", "--cpu", *FAST], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()
    children: dict[int, str] = {}
    base = None
    try:
        deadline = time.monotonic() + 300
        while not children:
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)[-3000:]
            starting = [ln for ln in list(lines) if ln.startswith("starting ComfyUI from")]
            if starting and base is None:
                base = starting[0].split("models: ", 1)[1].rsplit("/models)", 1)[0]
            children = comfy_processes(base) if base else {}
            time.sleep(0.05)
        log = os.path.join(base, "server.log")
        while not os.path.getsize(log):  # ComfyUI is under way (it outlived an early interruption by seconds)
            assert time.monotonic() < deadline, "the embedded ComfyUI printed nothing"
            time.sleep(0.05)
        (pid, cmdline), = children.items()
        port = cmdline.split("--port ", 1)[1].split()[0]
        assert not client.ComfyClient(f"http://127.0.0.1:{port}", timeout=2).is_up()  # still starting
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 130
        reader.join(timeout=10)
        assert "error: interrupted" in "".join(lines) and "Traceback" not in "".join(lines), "".join(lines)
        assert not comfy_processes(base), "the embedded ComfyUI outlived the command"
        assert not os.path.exists(base)  # its temporary base folder is gone too
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in comfy_processes(base) if base else {}:  # never leave a server behind
            try:
                os.killpg(pid, signal.SIGKILL)
            except OSError:
                pass


def test_segment_cli_embedded_random_weights(model_files, tmp_path, image):
    """The embedded mode: starts its own ComfyUI from .venv/ComfyUI on the random fixtures."""
    out = tmp_path / "embedded"
    result = cli("freeseg", "segment", image, "--out", str(out), "--random-weights", "--cpu", "--clusters", "3",
                 *FAST, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "MEANINGLESS" in result.stderr and result.stderr.count("#" * 40) >= 4  # framed, before and after
    doc = json.loads((out / "labels.json").read_text())
    assert doc["masks"] and all(m["label"] in CLASS_NAMES.split(", ") for m in doc["masks"])
    assert all((out / m["file"]).is_file() for m in doc["masks"])
    assert Image.open(out / "overlay.png").size == (WIDTH, HEIGHT)
    assert "freeseg-comfyui-" in result.stderr  # the temporary base folder it linked the models into


def test_segment_cli_diffusers_backend_random_weights(model_files, tmp_path, image):
    """The main job without ComfyUI: the diffusers pipeline on the random fixtures writes the
    same folder layout as the ComfyUI backend."""
    out = tmp_path / "diffusers"
    result = cli("freeseg", "segment", image, "--out", str(out), "--random-weights", "--backend", "diffusers",
                 "--clusters", "3", "--resolution", "128", "--class-names", CLASS_NAMES, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "MEANINGLESS" in result.stderr
    doc = json.loads((out / "labels.json").read_text())
    assert doc["backend"] == "diffusers" and doc["width"] == WIDTH and doc["height"] == HEIGHT
    assert doc["masks"] and all(m["label"] in CLASS_NAMES.split(", ") for m in doc["masks"])
    for m in doc["masks"]:
        mask = Image.open(out / m["file"])
        assert mask.mode == "L" and mask.size == (WIDTH, HEIGHT)
    assert Image.open(out / "overlay.png").size == (WIDTH, HEIGHT)


def test_prompts_are_followed_through_the_jobs_api_where_the_server_offers_it(server, comfyui_version, tmp_path):
    """Newer ComfyUI (0.33.0) serves /api/jobs/{id}: the client follows prompts through it (and
    needs no websocket when nobody wants the progress events); 0.3.75 does not: websocket +
    /history. Either way a finished prompt's history entry comes back, and a node that fails
    raises ComfyError with the node and the server's exception text."""
    version = tuple(int(p) for p in re.findall(r"\d+", comfyui_version)[:3])
    c = client.ComfyClient(server.url)
    assert c.jobs_api() is (version >= (0, 33, 0))
    unknown = "00000000-0000-4000-8000-000000000000"
    assert c.history(unknown) is None  # {}: not finished, or unknown: the client never tells them apart by it
    if c.jobs_api():
        assert c.job(unknown) is None
    good = str(tmp_path / "good.png")
    Image.new("RGB", (8, 8), (10, 200, 30)).save(good)
    (tmp_path / "bad.png").write_bytes(b"not a picture")
    events = []
    for on_event in (None, lambda kind, data: events.append(kind)):
        prompt = {"1": {"class_type": "LoadImage", "inputs": {"image": c.upload_image(good, name="jobs-good.png")}},
                  "2": {"class_type": "FreeSegTestProbe", "inputs": {"value": ["1", 0], "name": str(on_event)}}}
        entry = c.run(prompt, timeout=120, on_event=on_event)
        probe = json.loads(entry["outputs"]["2"]["probe"][0])
        assert probe["kind"] == "tensor" and probe["shape"] == [1, 8, 8, 3]
    assert "executing" in events or "executed" in events  # the progress events still reach the bar
    bad = {"1": {"class_type": "LoadImage", "inputs": {"image": c.upload_image(str(tmp_path / "bad.png"),
                                                                               name="jobs-bad.png")}},
           "2": {"class_type": "FreeSegTestProbe", "inputs": {"value": ["1", 0]}}}
    with pytest.raises(client.ComfyError, match=r"node 1 \(LoadImage\) failed: .*cannot identify image file"):
        c.run(bad, timeout=120)
