"""The named segments as ComfyUI's core BOUNDING_BOX value (Refine Masks' and Segment
Everything's `bboxes` output), read by core nodes, and Name Masks pairing masks drawn one per
box with the boxes' labels, on a real ComfyUI server.

The BOUNDING_BOX type is only a name on 0.3.75 (there the boxes are checked and paired); on a
core that has the box nodes (the 0.33.0 tree), core `DrawBBoxes` must draw our boxes where they
are. Core `SAM3_Detect` itself is not run here: a random-weight SAM 3 checkpoint in the format
0.33's loader detects is built (`synthetic.sam3`: `detector.*` / `tracker.*` keys, 506,593,208
parameters, 1.0 GB in fp16) and a server's Load Checkpoint must give a SAM 3 MODEL from it,
but SAM 3 has one fixed size (a ViT at 1008x1008 per box prompt) and one box took 465 s of wall
clock on the 2 CPU cores (shared with other jobs) of the machine these tests were written on;
the `freeseg_sam3` workflow is checked against the 0.33.0 server's node definitions and in its
frontend instead (test_workflows*.py).
"""

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from comfy_harness import MODEL_LINKS, ComfyServer, Graph, link, probed
from freeseg.app.client import ComfyError
from freeseg.app.paths import REPO

WIDTH, HEIGHT = 96, 64
CLASSES = "dog, cat, tree, sky"
BOX_KEYS = ("x", "y", "width", "height")


def refined_chain(g: Graph, image, n_clusters: int = 3, **label_inputs):
    """Checkpoint -> features -> clusters -> CLIP names (no background words: every mask named)
    -> Refine Masks, on `image`."""
    ckpt = g.node("CheckpointLoaderSimple", ckpt_name=MODEL_LINKS["sd15_ckpt"][1])
    clip_model = g.node("FreeSegCLIPLoader", model_name=MODEL_LINKS["open_clip_dir"][1], download=False, repo_id="")
    feats = g.node("FreeSegDiffusionFeatures", model=ckpt[0], vae=ckpt[2], image=image, clip=ckpt[1],
                   timestep=0, resolution=128, source="cross_attn_queries", seed=3)
    clusters = g.node("FreeSegClusterMasks", features=feats[0], n_clusters=n_clusters, method="kmeans", seed=3)
    inputs = {"background": "", "threshold": 0.0, **label_inputs}
    labelled = g.node("FreeSegCLIPLabel", segments=clusters[0], image=image, clip_model=clip_model[0],
                      class_names=CLASSES, crop_mode="masked", prompt="bare", **inputs)
    return g.node("FreeSegRefineMasks", segments=labelled[0], image=image, method="crf_guard")


def two_images(g: Graph, upload):
    first = g.node("LoadImage", image=upload(WIDTH, HEIGHT, seed=41))
    second = g.node("LoadImage", image=upload(WIDTH, HEIGHT, seed=42))
    return g.node("ImageBatch", image1=first[0], image2=second[0])


def expected_boxes(records: list[dict], batch: int) -> list[list[dict]]:
    """The boxes the JSON records describe (bbox [x0, y0, x1, y1], exclusive ends)."""
    out = [[] for _ in range(batch)]
    for r in records:
        x0, y0, x1, y1 = r["bbox"]
        out[r["image"]].append({"x": x0, "y": y0, "width": x1 - x0, "height": y1 - y0,
                                "label": r["label"], "score": r["score"]})
    return out


def test_box_outputs_are_added_last(client):
    """Saved workflows link outputs by slot: the new output comes after all the old ones."""
    info = client.object_info()
    refine, pipeline, name_masks = info["FreeSegRefineMasks"], info["FreeSegPipeline"], info["FreeSegNameMasks"]
    assert refine["output_name"] == ["segments", "masks", "labels", "union", "segs", "preview", "json", "bboxes"]
    assert pipeline["output_name"] == ["segments", "masks", "labels", "union", "segs", "preview", "json",
                                       "captions", "bboxes"]
    assert name_masks["output_name"] == refine["output_name"]
    for node in (refine, pipeline, name_masks):
        assert node["output"][-1] == "BOUNDING_BOX"
    assert name_masks["input"]["required"]["bboxes"][0] == "BOUNDING_BOX"
    assert name_masks["input"]["required"]["bboxes"][1].get("forceInput") is True


def test_refine_masks_boxes_one_list_per_image_as_the_records_say(client, upload):
    g = Graph()
    batch = two_images(g, upload)
    refined = refined_chain(g, batch[0])
    boxes, records, labels = g.probe(refined[7]), g.probe(refined[6]), g.probe(refined[2])
    result = client.run(g.prompt)
    got = probed(result, boxes)
    records = json.loads(probed(result, records)["value"])
    assert got["kind"] == "list" and len(got["value"]) == 2  # one list per image, even an empty one
    assert records and got["value"] == expected_boxes(records, 2)
    flat = [box for frame in got["value"] for box in frame]
    assert [b["label"] for b in flat] == probed(result, labels)["value"].split("\n")  # the order of `masks`
    for box in flat:
        assert all(isinstance(box[k], int) for k in BOX_KEYS) and box["width"] > 0 and box["height"] > 0
        assert box["x"] + box["width"] <= WIDTH and box["y"] + box["height"] <= HEIGHT


def test_segment_everything_boxes_after_its_captions(client, upload):
    g = Graph()
    image = g.node("LoadImage", image=upload(WIDTH, HEIGHT, seed=46))
    ckpt = g.node("CheckpointLoaderSimple", ckpt_name=MODEL_LINKS["sd15_ckpt"][1])
    clip_model = g.node("FreeSegCLIPLoader", model_name=MODEL_LINKS["open_clip_dir"][1], download=False, repo_id="")
    pipe = g.node("FreeSegPipeline", model=ckpt[0], vae=ckpt[2], image=image[0], clip_model=clip_model[0],
                  class_names=CLASSES, n_clusters=3, seed=5, clip=ckpt[1])
    records, captions, boxes = g.probe(pipe[6]), g.probe(pipe[7]), g.probe(pipe[8])
    result = client.run(g.prompt)
    assert probed(result, captions)["kind"] == "str"
    assert probed(result, boxes)["value"] == expected_boxes(json.loads(probed(result, records)["value"]), 1)


def test_nothing_named_gives_an_empty_list_for_the_image(client, upload):
    g = Graph()
    image = g.node("LoadImage", image=upload(WIDTH, HEIGHT, seed=43))
    # every mask must beat the background word "thing" by this much: none can
    refined = refined_chain(g, image[0], background="thing", threshold=1.0)
    boxes, records = g.probe(refined[7]), g.probe(refined[6])
    result = client.run(g.prompt)
    assert json.loads(probed(result, records)["value"]) == []
    assert probed(result, boxes)["value"] == [[]]


def test_name_masks_gives_masks_drawn_from_the_boxes_their_labels(client, upload):
    """Masks one per box, in box order (what SAM3 Detect gives with individual_masks on): here
    Refine Masks' own masks, so Name Masks must give back the same segments."""
    g = Graph()
    batch = two_images(g, upload)
    refined = refined_chain(g, batch[0])
    named = g.node("FreeSegNameMasks", masks=refined[1], bboxes=refined[7], image=batch[0])
    probes = {k: (g.probe(refined[i]), g.probe(named[i])) for k, i in
              (("masks", 1), ("labels", 2), ("json", 6), ("bboxes", 7), ("segs", 4))}
    result = client.run(g.prompt)
    got = {k: (probed(result, a), probed(result, b)) for k, (a, b) in probes.items()}
    assert got["labels"][1]["value"] == got["labels"][0]["value"] and got["labels"][1]["value"]
    assert got["bboxes"][1] == got["bboxes"][0]
    assert got["masks"][1]["shape"] == got["masks"][0]["shape"] and got["masks"][1]["sum"] == got["masks"][0]["sum"]
    theirs, ours = json.loads(got["json"][0]["value"]), json.loads(got["json"][1]["value"])
    keys = ("image", "label", "score", "area", "bbox")
    assert [{k: r[k] for k in keys} for r in ours] == [{k: r[k] for k in keys} for r in theirs]
    assert [s["label"] for s in got["segs"][1]["segs"]] == [s["label"] for s in got["segs"][0]["segs"]]


def test_name_masks_refuses_masks_that_are_not_one_per_box(client, upload):
    """SAM3 Detect with individual_masks off gives one union mask per image: the counts differ."""
    g = Graph()
    image = g.node("LoadImage", image=upload(WIDTH, HEIGHT, seed=44))
    refined = refined_chain(g, image[0], n_clusters=4)
    named = g.node("FreeSegNameMasks", masks=refined[3], bboxes=refined[7], image=image[0])
    g.probe(named[2])
    with pytest.raises(ComfyError) as err:
        client.run(g.prompt)
    message = str(err.value)
    assert "FreeSegNameMasks" in message and "masks: 1 mask(s) for the" in message and "in bboxes" in message
    assert "for the 1 box(es)" not in message, message  # several named segments: the counts differ


def test_core_draw_bboxes_draws_our_boxes_where_they_are(client, upload):
    if "DrawBBoxes" not in client.object_info():
        pytest.skip("this ComfyUI has no core box nodes (DrawBBoxes: 2026 and later; the 0.33.0 tree has it)")
    g = Graph()
    image = g.node("LoadImage", image=upload(WIDTH, HEIGHT, seed=45))
    refined = refined_chain(g, image[0])
    black = g.node("EmptyImage", width=WIDTH, height=HEIGHT, batch_size=1, color=0)
    drawn = g.node("DrawBBoxes", image=black[0], bboxes=refined[7])
    saved = g.node("SaveImage", images=drawn[0], filename_prefix="freeseg_test/bboxes")
    boxes = g.probe(refined[7])
    result = client.run(g.prompt)
    (frame,) = probed(result, boxes)["value"]
    assert frame
    (file_info,) = result["outputs"][saved.id]["images"]
    pixels = np.asarray(Image.open(io.BytesIO(client.view(file_info))).convert("RGB")).astype(int)
    assert pixels.shape == (HEIGHT, WIDTH, 3)
    lit = pixels.sum(axis=2) > 0
    near = np.zeros_like(lit)  # the boxes' outlines (3 px wide) and the text inside them
    for box in frame:
        x0, y0 = box["x"], box["y"]
        x1, y1 = x0 + box["width"], y0 + box["height"]
        assert lit[min(y0, HEIGHT - 1), min(x0, WIDTH - 1)], box  # the top-left corner is drawn
        ye, xe = min(y1, HEIGHT - 1), min(x1, WIDTH - 1)
        assert lit[ye - 1:ye + 1, xe - 1:xe + 1].any(), box  # and the bottom-right one
        near[max(0, y0 - 2):y1 + 3, max(0, x0 - 2):x1 + 3] = True
    assert lit.any() and not (lit & ~near).any()  # nothing drawn away from our boxes


@pytest.fixture(scope="module")
def sam3_server(client, tmp_path_factory):
    """A server of this ComfyUI with only the random-weight SAM 3 checkpoint (built for the
    module in a subprocess; 1.0 GB) and the probe pack."""
    if "SAM3_Detect" not in client.object_info():
        pytest.skip("this ComfyUI has no core SAM 3 (SAM3_Detect: 2026 and later; the 0.33.0 tree has it)")
    path = tmp_path_factory.mktemp("sam3") / "freeseg-random-sam3.safetensors"
    subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); "
                    "from synthetic.sam3 import build_sam3_checkpoint; build_sam3_checkpoint(sys.argv[2])",
                    REPO, str(path)], check=True, timeout=900)
    base = str(tmp_path_factory.mktemp("comfy-base-sam3"))
    link(str(path), os.path.join(base, "models", "checkpoints", path.name))
    link(os.path.join(REPO, "tests", "helpers", "probe_pack"), os.path.join(base, "custom_nodes", "freeseg_test_probe"))
    srv = ComfyServer(base).start()
    yield srv, path.name
    srv.stop()
    path.unlink()


def test_random_sam3_checkpoint_loads_as_sam3_for_the_workflow(sam3_server):
    """The checkpoint freeseg_sam3's Load SAM 3 needs: core Load Checkpoint detects it as SAM 3."""
    srv, name = sam3_server
    g = Graph()
    model = g.probe(g.node("CheckpointLoaderSimple", ckpt_name=name)[0])
    got = probed(srv.client.run(g.prompt), model)
    assert got["kind"] == "model" and got["config"] == "SAM3", got
