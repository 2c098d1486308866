"""FreeSeg-Diff Save Segments: a client that only uses /prompt, /history and /view (no websocket,
no text outputs) gets every mask, every overlay and labels.json, whatever the labels and the
filename_prefix; prefixes whose files /view would not serve are refused before anything is written."""

import io
import json
import os
import random
import time
import urllib.parse
import urllib.request

import numpy as np
from PIL import Image

import pytest

from comfy_harness import MODEL_LINKS, Graph, probed
from freeseg.app.client import ComfyError
from freeseg.app.output import write_segmentation
from freeseg.labels_file import LABEL_CHARS, LABELS_FORMAT, mask_file_name

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


def test_file_only_client_gets_masks_overlays_and_labels(client, server, upload, tmp_path):
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
    # One layout with `freeseg segment`'s labels.json: the same version and the same keys.
    cli_doc = write_segmentation(str(tmp_path), "/x/p.png", [np.ones((2, 3), bool)],
                                 [{"label": "dog", "score": 0.5, "mask": 0}], Image.new("RGB", (3, 2)))
    assert doc["format"] == cli_doc["format"] == LABELS_FORMAT and doc["backend"] == "comfyui"
    assert set(doc) == set(cli_doc) and set(doc["masks"][0]) >= set(cli_doc["masks"][0])
    assert set(doc["images"][0]) == set(cli_doc["images"][0])
    assert [(i["source"], i["caption"]) for i in doc["images"]] == [("", ""), ("", "")]

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


# Labels that once broke the save or that a file name cannot hold as they are: 240+ characters
# (the save stopped after the overlay), slashes and backslashes, dots, non-ASCII, nothing
# ASCII-safe at all, and the characters Windows forbids with an annotation /view strips.
ODD_LABELS = [
    "very long label " * 20,
    "cat/dog\\bird",
    "a.b..c...",
    "\u65e5\u672c\u306e\u732b caf\u00e9",
    "..\\/..",
    '<>:"|?* [output]',
]


def labelled_graph(upload, class_lines: list[str]):
    """One uploaded picture repeated once per line of `class_lines`, clustered into two masks and
    named by CLIP Label with that line's single name and no background words, so every mask of
    image b gets `class_lines[b]`. Same inputs -> same nodes, so ComfyUI's cache runs the
    features once for all the tests that use it."""
    g = Graph()
    picture = g.node("LoadImage", image=upload(64, 64, seed=44))
    image = g.node("RepeatImageBatch", image=picture[0], amount=len(class_lines))[0]
    ckpt = g.node("CheckpointLoaderSimple", ckpt_name=MODEL_LINKS["sd15_ckpt"][1])
    clip_model = g.node("FreeSegCLIPLoader", model_name=MODEL_LINKS["open_clip_dir"][1], download=False, repo_id="")
    feats = g.node("FreeSegDiffusionFeatures", model=ckpt[0], vae=ckpt[2], image=image, timestep=0,
                   resolution=128, source="cross_attn_queries", seed=0)
    clusters = g.node("FreeSegClusterMasks", features=feats[0], n_clusters=2, method="kmeans", seed=0)
    labelled = g.node("FreeSegCLIPLabel", segments=clusters[0], image=image, clip_model=clip_model[0],
                      class_names="\n".join(class_lines), crop_mode="masked", prompt="bare", threshold=0.0,
                      background="")
    return g, image, labelled[0]


def written_files(root: str) -> set[tuple[str, str]]:
    """(subfolder relative to the output folder, file name) of every file under `root`."""
    output = os.path.dirname(root)
    return {(os.path.relpath(folder, output), name) for folder, _, names in os.walk(root) for name in names}


def test_every_listed_file_downloads_whatever_the_prefix_and_labels(client, server, upload):
    seed = random.randrange(2**31)
    top = f"fs_odd_{seed}"
    prefixes = [
        f"{top}/zq..x/seg",  # ".." inside a folder name: /view serves it
        f"{top}/trailing/",  # names the file "trailing"; the next save of that name must not overwrite it
        f"{top}/./trailing//",  # (a different string: ComfyUI would reuse the first node's result for the same)
        f"{top}/a/./b/../\u00fcn\u00ef c\u00f6d\u00e9 %width%x%height%",
        f"{top}/back\\slash.v1",
        f"{top}/" + "p" * 120,  # the longest file-name part taken
    ]
    g, image, segments = labelled_graph(upload, ODD_LABELS)
    saves = [g.node("FreeSegSaveSegments", segments=segments, image=image, filename_prefix=p) for p in prefixes]
    entry = client.run(g.prompt)

    listed = []
    for save in saves:
        ui = entry["outputs"][save.id]
        files = download_all(server.url, {save.id: ui})  # raises on any answer but 200
        assert len(files) == len(ui["images"]) + len(ui["files"]), "a file name is listed twice"
        (labels_name,) = [f["filename"] for f in ui["files"]]
        doc = json.loads(files[labels_name])
        # labels.json keeps every label in full; the file names hold them as short ASCII.
        assert [i["class_names"] for i in doc["images"]] == [[" ".join(l.split())] for l in ODD_LABELS]
        assert {m["label"] for m in doc["masks"]} == {" ".join(l.split()) for l in ODD_LABELS}
        for m in doc["masks"]:
            assert m["label"] == doc["images"][m["image"]]["class_names"][0]
            assert m["file"].endswith("_" + mask_file_name(m["index"], m["label"]))  # the CLI's rule
            png = Image.open(io.BytesIO(files[m["file"]]))
            assert png.mode == "L" and png.size == (64, 64) and int((np.asarray(png) > 127).sum()) == m["area"]
        for item in doc["images"]:
            assert Image.open(io.BytesIO(files[item["overlay"]])).size == (64, 64)
        names = {labels_name} | {i["overlay"] for i in doc["images"]} | {m["file"] for m in doc["masks"]}
        assert set(files) == names and all(len(n.encode()) <= 255 for n in names)
        listed += [(f["subfolder"], f["filename"]) for f in ui["images"] + ui["files"]]

    assert len(" ".join(ODD_LABELS[0].split())) > 240
    assert any(name.endswith("_0_very_long_label_very_long_label_very_long_label_very_long_la.png")
               for _, name in listed)
    assert {sub for sub, _ in listed} == {f"{top}/zq..x", top, f"{top}/a"}
    assert any(name.startswith("\u00fcn\u00ef c\u00f6d\u00e9 64x64_00001_") for _, name in listed)
    # Nothing listed twice (the two "trailing/" saves count on), nothing written that is not listed.
    assert len(set(listed)) == len(listed)
    assert written_files(os.path.join(server.base_dir, "output", top)) == set(listed)


@pytest.mark.parametrize("prefix", ["../outside", "/tmp/absolute", "", ".", "zq..x/seg..v1", "..\\x", "seg..",
                                    "line\nbreak", "p" * 121, "x" * 256 + "/seg"])
def test_a_prefix_outside_the_output_folder_or_not_served_by_view_is_refused_at_queue_time(client, upload, prefix):
    g = Graph()
    image = g.node("LoadImage", image=upload(64, 64, seed=43))
    ckpt = g.node("CheckpointLoaderSimple", ckpt_name=MODEL_LINKS["sd15_ckpt"][1])
    feats = g.node("FreeSegDiffusionFeatures", model=ckpt[0], vae=ckpt[2], image=image[0], timestep=0,
                   resolution=128, source="cross_attn_queries", seed=0)
    clusters = g.node("FreeSegClusterMasks", features=feats[0], n_clusters=2, method="kmeans", seed=0)
    g.node("FreeSegSaveSegments", segments=clusters[0], image=image[0], filename_prefix=prefix)
    with pytest.raises(ComfyError, match="filename_prefix"):
        client.queue(g.prompt)


def test_a_linked_prefix_view_would_not_serve_fails_before_anything_is_written(client, server, upload):
    """Linked from another node, the prefix is only known when the node runs: it is refused
    there, before the first file (or folder) is written."""
    top = f"fs_linked_{random.randrange(2**31)}"
    g, image, segments = labelled_graph(upload, ODD_LABELS)
    prefix = g.node("PrimitiveString", value=f"{top}/zq..x/seg..v1")
    g.node("FreeSegSaveSegments", segments=segments, image=image, filename_prefix=prefix[0])
    with pytest.raises(ComfyError, match=r"filename_prefix .*'seg\.\.v1' holds '\.\.'.*/view"):
        client.run(g.prompt)
    assert not os.path.exists(os.path.join(server.base_dir, "output", top))


def test_the_cli_writer_names_mask_files_by_the_same_rule(tmp_path):
    """`freeseg segment`'s writer: long, odd and empty labels give short ASCII file names (the
    rule Save Segments uses), the full labels stay in labels.json."""
    labels = [ODD_LABELS[0], "", *ODD_LABELS[1:]]
    masks = [np.eye(4, 6, k=i, dtype=bool) for i in range(len(labels))]
    doc = write_segmentation(str(tmp_path), "/x/pic.jpg", masks, [{"label": l, "score": 0.5} for l in labels],
                             Image.new("RGB", (6, 4)))
    files = [m["file"] for m in doc["masks"]]
    assert [m["label"] for m in doc["masks"]] == labels
    assert files == [mask_file_name(i, l) for i, l in enumerate(labels)]
    assert files[0] == "mask_0_very_long_label_very_long_label_very_long_label_very_long_la.png"
    assert len(files[0]) == len("mask_0_.png") + LABEL_CHARS
    assert files[1:] == ["mask_1_mask.png", "mask_2_cat_dog_bird.png", "mask_3_a_b_c.png", "mask_4_cafe.png",
                         "mask_5_mask.png", "mask_6_output.png"]
    assert sorted(os.listdir(tmp_path)) == sorted(files + ["labels.json", "overlay.png"])
