"""FreeSeg-Diff Save Segments: a client that only uses /prompt, /history and /view (no websocket,
no text outputs) gets every mask, every overlay and labels.json."""

import io
import json
import random
import time
import urllib.parse
import urllib.request

import numpy as np
from PIL import Image

import pytest

from comfy_harness import MODEL_LINKS, Graph, probed
from freeseg.app.client import ComfyError

CLASSES = "dog, cat, tree, sky"


def http(url: str, payload: dict | None = None) -> bytes:
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"} if data else {})
    with urllib.request.urlopen(request, timeout=30) as resp:
        return resp.read()


def run_file_only(url: str, prompt: dict, timeout: float = 300.0) -> dict:
    """POST /prompt, then poll GET /history/<id> until the entry is there; the history entry."""
    prompt_id = json.loads(http(f"{url}/prompt", {"prompt": prompt}))["prompt_id"]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        entry = json.loads(http(f"{url}/history/{prompt_id}")).get(prompt_id)
        if entry is not None and entry.get("status", {}).get("completed") is not None:
            return entry
        time.sleep(0.5)
    raise AssertionError(f"prompt {prompt_id} did not finish in {timeout} s")


def download_all(url: str, outputs: dict) -> dict[str, bytes]:
    """Every file any output lists as {"filename", "subfolder", "type"}, fetched through /view."""
    files = {}
    for node_output in outputs.values():
        for items in node_output.values():
            for item in items if isinstance(items, list) else []:
                if isinstance(item, dict) and "filename" in item:
                    query = urllib.parse.urlencode({k: item.get(k, "") for k in ("filename", "subfolder", "type")})
                    files[item["filename"]] = http(f"{url}/view?{query}")
    return files


def test_file_only_client_gets_masks_overlays_and_labels(client, server, upload):
    seed = random.randrange(2**31)
    prefix = f"freeseg_test/save_{seed}"
    g = Graph()
    a, b = (g.node("LoadImage", image=upload(90, 70, seed=s)) for s in (41, 42))
    image = g.node("ImageBatch", image1=a[0], image2=b[0])[0]
    ckpt = g.node("CheckpointLoaderSimple", ckpt_name=MODEL_LINKS["sd15_ckpt"][1])
    clip_model = g.node("FreeSegCLIPLoader", model_name=MODEL_LINKS["open_clip_dir"][1], download=False, repo_id="")
    feats = g.node("FreeSegDiffusionFeatures", model=ckpt[0], vae=ckpt[2], image=image, clip=ckpt[1],
                   timestep=0, resolution=128, source="cross_attn_queries", seed=seed)
    clusters = g.node("FreeSegClusterMasks", features=feats[0], n_clusters=4, method="kmeans", seed=seed)
    labelled = g.node("FreeSegCLIPLabel", segments=clusters[0], image=image, clip_model=clip_model[0],
                      class_names=CLASSES, crop_mode="masked", prompt="bare", threshold=0.0)
    refined = g.node("FreeSegRefineMasks", segments=labelled[0], image=image, method="guided")
    saved = g.node("FreeSegSaveSegments", segments=refined[0], image=image, filename_prefix=prefix)
    probes = {"labels": g.probe(refined[2]), "json": g.probe(refined[6]), "masks": g.probe(refined[1])}

    entry = run_file_only(server.url, g.prompt)
    assert entry["status"]["status_str"] == "success", entry["status"]
    files = download_all(server.url, {saved.id: entry["outputs"][saved.id]})
    (labels_name,) = [n for n in files if n.endswith("_labels.json")]
    doc = json.loads(files[labels_name])
    assert labels_name.startswith(f"save_{seed}_00001_")
    assert (doc["width"], doc["height"]) == (90, 70) and doc["labels"] == labels_name

    # The same segmentation as Refine Masks' outputs: labels in order, the JSON records, the masks.
    labels = [l for l in probed(entry, probes["labels"])["value"].splitlines() if l]
    records = json.loads(probed(entry, probes["json"])["value"])
    assert labels and [m["label"] for m in doc["masks"]] == labels
    assert [{k: m[k] for k in records[0]} for m in doc["masks"]] == records
    assert {m["image"] for m in doc["masks"]} <= {0, 1}
    total = 0.0
    for i, m in enumerate(doc["masks"]):
        assert m["index"] == i and m["file"] in files and m["label"] in CLASSES.split(", ")
        png = Image.open(io.BytesIO(files[m["file"]]))
        assert png.mode == "L" and png.size == (90, 70)
        pixels = np.asarray(png).astype(float) / 255.0
        assert int((pixels > 0.5).sum()) == m["area"]
        total += pixels.sum()
    assert abs(total - probed(entry, probes["masks"])["sum"]) <= 0.5 / 255 * 90 * 70 * len(doc["masks"])

    # One overlay per image of the batch, RGB at the image's size.
    assert [i["index"] for i in doc["images"]] == [0, 1]
    for item in doc["images"]:
        overlay = Image.open(io.BytesIO(files[item["overlay"]]))
        assert overlay.mode == "RGB" and overlay.size == (90, 70)
        assert item["class_names"] == CLASSES.split(", ")
    assert set(files) == {labels_name} | {i["overlay"] for i in doc["images"]} | {m["file"] for m in doc["masks"]}

    # The frontend shows the PNGs; labels.json is listed as a file.
    ui = entry["outputs"][saved.id]
    assert all(f["type"] == "output" and f["subfolder"] == "freeseg_test" for f in ui["images"] + ui["files"])
    assert [f["filename"] for f in ui["files"]] == [labels_name]


def test_save_segments_is_listed_as_an_output_node(client):
    node = client.object_info("FreeSegSaveSegments")["FreeSegSaveSegments"]
    assert node["output_node"] is True and node["output"] == []
    assert node["display_name"] == "FreeSeg-Diff Save Segments"
    assert node["input"]["required"]["filename_prefix"][1]["default"] == "freeseg/segments"


@pytest.mark.parametrize("prefix", ["../outside", "/tmp/absolute", "", "."])
def test_a_prefix_outside_the_output_folder_is_refused_at_queue_time(client, upload, prefix):
    g = Graph()
    image = g.node("LoadImage", image=upload(64, 64, seed=43))
    ckpt = g.node("CheckpointLoaderSimple", ckpt_name=MODEL_LINKS["sd15_ckpt"][1])
    feats = g.node("FreeSegDiffusionFeatures", model=ckpt[0], vae=ckpt[2], image=image[0], timestep=0,
                   resolution=128, source="cross_attn_queries", seed=0)
    clusters = g.node("FreeSegClusterMasks", features=feats[0], n_clusters=2, method="kmeans", seed=0)
    g.node("FreeSegSaveSegments", segments=clusters[0], image=image[0], filename_prefix=prefix)
    with pytest.raises(ComfyError, match="filename_prefix"):
        client.queue(g.prompt)
