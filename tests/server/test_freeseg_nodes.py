"""The FreeSeg-Diff nodes through a real ComfyUI server, on the random-weight fixtures.

Random weights make the masks meaningless; these tests check plumbing a user relies on:
shapes at the image's own resolution, dtypes, value ranges, labels drawn from the class
list, batches kept whole, SEGS structure, and the errors users see."""

import io
import json
import random

import pytest
from PIL import Image

from comfy_harness import MODEL_LINKS, Graph, probed
from freeseg.app.client import ComfyError

CLASSES = "dog, cat, tree, sky"


def segment_graph(g: Graph, image, n_clusters=3, resolution=256, method="crf", with_blip=True,
                  class_names=CLASSES, seed=None, **label_inputs):
    """Checkpoint -> caption -> features -> cluster -> CLIP label -> refine, on `image`."""
    seed = random.randrange(2**31) if seed is None else seed
    ckpt = g.node("CheckpointLoaderSimple", ckpt_name=MODEL_LINKS["sd15_ckpt"][1])
    clip_model = g.node("FreeSegCLIPLoader", model_name=MODEL_LINKS["open_clip_dir"][1], download=False, repo_id="")
    caption_inputs = {"image": image, "class_names": class_names, "max_new_tokens": 8}
    if with_blip:
        caption_inputs["blip2"] = g.node("FreeSegBLIP2Loader", model_name=MODEL_LINKS["blip2_dir"][1],
                                         download=False, repo_id="")[0]
    else:  # no captioner: an empty caption text, so the class names are the typed ones alone
        caption_inputs["captions"] = g.node("PrimitiveString", value="")[0]
    caption = g.node("FreeSegCaption", **caption_inputs)
    feats = g.node("FreeSegDiffusionFeatures", model=ckpt[0], vae=ckpt[2], image=image, clip=ckpt[1],
                   timestep=0, resolution=resolution, source="cross_attn_queries", seed=seed)
    clusters = g.node("FreeSegClusterMasks", features=feats[0], n_clusters=n_clusters, method="kmeans", seed=seed)
    labelled = g.node("FreeSegCLIPLabel", segments=clusters[0], image=image, clip_model=clip_model[0],
                      class_names=caption[1], crop_mode="masked", prompt="bare", threshold=0.0, **label_inputs)
    refined = g.node("FreeSegRefineMasks", segments=labelled[0], image=image, method=method)
    return caption, clusters, refined


def check_outputs(client, result, probes, batch, height, width):
    """The shared contract of Refine Masks' outputs for a batch of `batch` images."""
    masks, labels, union = (probed(result, probes[k]) for k in ("masks", "labels", "union"))
    segs, preview, records = (probed(result, probes[k]) for k in ("segs", "preview", "json"))
    class_lines = probed(result, probes["class_names"])["value"].split("\n")
    assert len(class_lines) == batch
    names = [l for l in labels["value"].splitlines() if l]
    assert masks["shape"] == [max(len(names), 1), height, width] and masks["dtype"] == "float32"
    if names:
        assert 0.0 <= masks["min"] and masks["max"] <= 1.0
    assert union["shape"] == [batch, height, width] and union["dtype"] == "float32"
    assert preview["shape"] == [batch, height, width, 3]
    records = json.loads(records["value"])
    assert [r["label"] for r in records] == names
    for r in records:
        allowed = [n.strip().lower() for n in class_lines[r["image"]].split(",")]
        assert r["label"].lower() in allowed, (r, class_lines)
        assert 0 <= r["image"] < batch and 0.0 <= r["score"] <= 1.0 and r["area"] >= 0
    assert segs["size"] == [height, width]
    assert len(segs["segs"]) == sum(1 for r in records if r["bbox"] is not None)
    for s in segs["segs"]:
        x0, y0, x1, y1 = s["crop_region"]
        assert s["label"] in names and 0.0 <= s["confidence"] <= 1.0
        assert s["cropped_mask"] == [y1 - y0, x1 - x0] and s["cropped_image"] == [1, y1 - y0, x1 - x0, 3]
        assert s["fields"] == ["cropped_image", "cropped_mask", "confidence", "crop_region", "bbox", "label",
                               "control_net_wrapper"]
    return names, records


def add_probes(g, caption, refined):
    return {"captions": g.probe(caption[0]), "class_names": g.probe(caption[1]), "masks": g.probe(refined[1]),
            "labels": g.probe(refined[2]), "union": g.probe(refined[3]), "segs": g.probe(refined[4]),
            "preview": g.probe(refined[5]), "json": g.probe(refined[6])}


def test_full_chain_single_image(client, upload):
    g = Graph()
    image = g.node("LoadImage", image=upload(200, 150, seed=1))
    caption, clusters, refined = segment_graph(g, image[0], n_clusters=3, resolution=256)
    probes = add_probes(g, caption, refined)
    probes["cluster_map"] = g.probe(clusters[1])
    save = g.node("SaveImage", images=refined[5], filename_prefix="freeseg_preview")
    progress = []
    result = client.run(g.prompt, on_event=lambda k, d: progress.append(d["node"]) if k == "progress" else None)
    names, _ = check_outputs(client, result, probes, batch=1, height=150, width=200)
    assert len(probed(result, probes["captions"])["value"].splitlines()) == 1
    cmap = probed(result, probes["cluster_map"])
    assert cmap["shape"] == [1, 150, 200] and cmap["min"] >= 0 and cmap["max"] <= 1
    (saved,) = result["outputs"][save.id]["images"]
    assert Image.open(io.BytesIO(client.view(saved))).size == (200, 150)
    assert progress, "the nodes reported no progress"


def test_batch_of_three_odd_sized_images_keeps_every_image(client, upload):
    g = Graph()
    a, b, c = (g.node("LoadImage", image=upload(97, 61, seed=s)) for s in (2, 3, 4))
    batch = g.node("ImageBatch", image1=g.node("ImageBatch", image1=a[0], image2=b[0])[0], image2=c[0])
    caption, clusters, refined = segment_graph(g, batch[0], n_clusters=4, resolution=128, method="guided")
    probes = add_probes(g, caption, refined)
    result = client.run(g.prompt)
    check_outputs(client, result, probes, batch=3, height=61, width=97)
    assert len(probed(result, probes["captions"])["value"].splitlines()) == 3


def test_rgba_and_grey_inputs_and_vocabulary_only(client, upload):
    for mode in ("RGBA", "L"):
        g = Graph()
        image = g.node("LoadImage", image=upload(80, 72, seed=5, mode=mode))
        caption, _, refined = segment_graph(g, image[0], n_clusters=2, resolution=128, method="none",
                                            with_blip=False, class_names="red thing, blue thing")
        probes = add_probes(g, caption, refined)
        result = client.run(g.prompt)
        names, _ = check_outputs(client, result, probes, batch=1, height=72, width=80)
        assert probed(result, probes["class_names"])["value"] == "red thing, blue thing"
        assert set(names) <= {"red thing", "blue thing"}


def test_select_mask_gives_right_shape_even_when_label_absent(client, upload):
    g = Graph()
    image = g.node("LoadImage", image=upload(64, 48, seed=6))
    # no background words: the only class name wins every mask (open rule, no tie by position)
    _, _, refined = segment_graph(g, image[0], n_clusters=2, resolution=128, method="none", with_blip=False,
                                  class_names="dog", background="")
    present = g.probe(g.node("FreeSegSelectMask", segments=refined[0], labels="dog")[0])
    absent = g.probe(g.node("FreeSegSelectMask", segments=refined[0], labels="giraffe")[0])
    by_index = g.probe(g.node("FreeSegSelectMask", segments=refined[0], labels="0, 1")[0])
    result = client.run(g.prompt)
    p, a, i = probed(result, present), probed(result, absent), probed(result, by_index)
    for m in (p, a, i):
        assert m["shape"] == [1, 48, 64] and m["dtype"] == "float32"
    assert a["max"] == 0.0
    assert p["min"] == 1.0  # both masks are "dog"
    assert i["min"] == 1.0  # masks 0 and 1 of a 2-cluster partition cover the image


def test_pipeline_node_default_outputs(client, upload):
    g = Graph()
    image = g.node("LoadImage", image=upload(90, 70, seed=7))
    ckpt = g.node("CheckpointLoaderSimple", ckpt_name=MODEL_LINKS["sd15_ckpt"][1])
    clip_model = g.node("FreeSegCLIPLoader", model_name=MODEL_LINKS["open_clip_dir"][1], download=False, repo_id="")
    blip = g.node("FreeSegBLIP2Loader", model_name=MODEL_LINKS["blip2_dir"][1], download=False, repo_id="")
    pipe = g.node("FreeSegPipeline", model=ckpt[0], vae=ckpt[2], image=image[0], clip_model=clip_model[0],
                  class_names="dog, cat", n_clusters=4, seed=random.randrange(2**31), blip2=blip[0], clip=ckpt[1])
    masks, labels, union = g.probe(pipe[1]), g.probe(pipe[2]), g.probe(pipe[3])
    result = client.run(g.prompt)
    names = [l for l in probed(result, labels)["value"].splitlines() if l]
    assert probed(result, masks)["shape"] == [max(len(names), 1), 70, 90]
    assert probed(result, union)["shape"] == [1, 70, 90]
    assert len(names) <= 4


def test_sdxl_diffusion_model_without_clip(client, upload):
    g = Graph()
    image = g.node("LoadImage", image=upload(120, 88, seed=8))
    unet = g.node("UNETLoader", unet_name=MODEL_LINKS["sdxl_unet"][1], weight_dtype="default")
    vae = g.node("VAELoader", vae_name=MODEL_LINKS["sdxl_vae"][1])
    feats = g.node("FreeSegDiffusionFeatures", model=unet[0], vae=vae[0], image=image[0], timestep=0,
                   resolution=256, source="cross_attn_queries", seed=random.randrange(2**31))
    clusters = g.node("FreeSegClusterMasks", features=feats[0], n_clusters=3, method="agglomerative", seed=0)
    cmap = g.probe(clusters[1])
    result = client.run(g.prompt)
    m = probed(result, cmap)
    assert m["shape"] == [1, 88, 120] and m["min"] >= 0.0 and m["max"] <= 1.0


def test_decoder_source_and_timestep(client, upload):
    g = Graph()
    image = g.node("LoadImage", image=upload(64, 64, seed=9))
    ckpt = g.node("CheckpointLoaderSimple", ckpt_name=MODEL_LINKS["sd15_ckpt"][1])
    feats = g.node("FreeSegDiffusionFeatures", model=ckpt[0], vae=ckpt[2], image=image[0], timestep=300,
                   resolution=128, source="decoder_blocks", seed=random.randrange(2**31))
    clusters = g.node("FreeSegClusterMasks", features=feats[0], n_clusters=2, method="kmeans", seed=1)
    cmap = g.probe(clusters[1])
    result = client.run(g.prompt)
    assert probed(result, cmap)["shape"] == [1, 64, 64]


def test_missing_model_error_names_the_folder(client, upload):
    g = Graph()
    g.probe(g.node("FreeSegCLIPLoader", model_name="no-such-model", download=False, repo_id="")[0])
    with pytest.raises(ComfyError) as err:
        client.run(g.prompt)
    assert "model_name" in str(err.value)


def test_non_unet_family_is_refused_with_a_clear_error(client, upload):
    g = Graph()
    image = g.node("LoadImage", image=upload(64, 64, seed=10))
    unet = g.node("UNETLoader", unet_name=MODEL_LINKS["pixart_unet"][1], weight_dtype="default")
    vae = g.node("VAELoader", vae_name=MODEL_LINKS["sdxl_vae"][1])
    feats = g.node("FreeSegDiffusionFeatures", model=unet[0], vae=vae[0], image=image[0], timestep=0,
                   resolution=128, source="cross_attn_queries", seed=0)
    g.probe(g.node("FreeSegClusterMasks", features=feats[0], n_clusters=2, method="kmeans", seed=0)[1])
    with pytest.raises(ComfyError) as err:
        client.run(g.prompt)
    message = str(err.value)
    assert "FreeSegDiffusionFeatures" in message and "PixArtSigma" in message and "model: " in message
    assert "SD1.x, SD2.x and SDXL" in message


def test_interrupt_stops_the_unet_pass(client, upload):
    g = Graph()
    a, b = (g.node("LoadImage", image=upload(64, 64, seed=s)) for s in (11, 12))
    batch = g.node("RepeatImageBatch", image=g.node("ImageBatch", image1=a[0], image2=b[0])[0], amount=4)
    ckpt = g.node("CheckpointLoaderSimple", ckpt_name=MODEL_LINKS["sd15_ckpt"][1])
    feats = g.node("FreeSegDiffusionFeatures", model=ckpt[0], vae=ckpt[2], image=batch[0], timestep=0,
                   resolution=256, source="cross_attn_queries", seed=random.randrange(2**31))
    g.probe(g.node("FreeSegClusterMasks", features=feats[0], n_clusters=2, method="kmeans", seed=0)[1])
    seen = []

    def on_event(kind, data):
        if kind == "executing" and data.get("node") == feats.id:
            client.interrupt()  # the 8 images share one UNet pass here: it stops midway
        if kind == "progress" and data.get("node") == feats.id:
            seen.append(data["value"])

    with pytest.raises(ComfyError, match="interrupted"):
        client.run(g.prompt, on_event=on_event)
    assert not seen or seen[-1] < 8, seen


def test_nothing_named_gives_empty_masks_of_the_right_shape(client, upload):
    g = Graph()
    image = g.node("LoadImage", image=upload(70, 50, seed=13))
    caption, _, refined = segment_graph(g, image[0], n_clusters=3, resolution=128, method="crf",
                                        with_blip=False, class_names="")
    probes = add_probes(g, caption, refined)
    result = client.run(g.prompt)
    names, records = check_outputs(client, result, probes, batch=1, height=50, width=70)
    assert names == [] and records == []
    masks, union = probed(result, probes["masks"]), probed(result, probes["union"])
    assert masks["shape"] == [1, 50, 70] and masks["max"] == 0.0
    assert union["shape"] == [1, 50, 70] and union["max"] == 0.0
