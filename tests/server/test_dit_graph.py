"""DiT checkpoints through a real ComfyUI server: the random-weight Flux.1-dev and SD3.5 files
(synthetic/dit.py, real on-disk formats, detected by ComfyUI's own loaders) run the whole graph
caption -> features -> clusters -> names -> refine, with masks at the image's size.

Text encoders: T5-XXL (and CLIP-G) cannot be built here, so a full-size random CLIP-L stands in:
Flux gets it through DualCLIPLoader (both files CLIP-L, type ``sd3``: tokens [1, 77, 4096],
pooled [1, 2048], the widths the Flux fixture reads) into the features node's ``clip`` input;
SD3 gets the checkpoint's own CLIP (CLIP-L inside) through CLIPTextEncode into the node's
``conditioning`` input, so both ways of conditioning the pass are used.
"""

import random

import pytest

from comfy_harness import EXTRA_MODEL_LINKS, MODEL_LINKS, Graph, probed
from synthetic.dit import FLUX_DIT_CONFIG, SD3_DIT_CONFIG

WIDTH, HEIGHT = 100, 76
RESOLUTION = 128  # latent 16 x 16, 2 x 2 patches: an 8 x 8 token grid
CLASSES = "dog, cat, grass"


def loaders(g: Graph, family: str):
    """(MODEL, VAE, {features node conditioning inputs}) of the family's fixture, loaded the way
    users load the real files."""
    if family == "Flux":
        unet = g.node("UNETLoader", unet_name=EXTRA_MODEL_LINKS["flux_unet"][1], weight_dtype="default")
        clip_l = EXTRA_MODEL_LINKS["clip_l"][1]
        clip = g.node("DualCLIPLoader", clip_name1=clip_l, clip_name2=clip_l, type="sd3")
        vae = g.node("VAELoader", vae_name=EXTRA_MODEL_LINKS["flux_vae"][1])
        return unet[0], vae[0], {"clip": clip[0]}
    ckpt = g.node("CheckpointLoaderSimple", ckpt_name=EXTRA_MODEL_LINKS["sd3_ckpt"][1])
    empty = g.node("CLIPTextEncode", clip=ckpt[1], text="")
    return ckpt[0], ckpt[2], {"conditioning": empty[0]}


@pytest.mark.parametrize("family, timestep, channels", [
    ("Flux", 500, FLUX_DIT_CONFIG["hidden_size"]),
    ("SD3", 714, 64 * SD3_DIT_CONFIG["depth"]),
])
def test_dit_checkpoint_runs_the_full_graph(family, timestep, channels, models_client, models_upload):
    g = Graph()
    image = g.node("LoadImage", image=models_upload(WIDTH, HEIGHT, seed=41))
    model, vae, conditioning = loaders(g, family)
    seed = random.randrange(2**31)
    blip2 = g.node("FreeSegBLIP2Loader", model_name=MODEL_LINKS["blip2_dir"][1], download=False, repo_id="")
    caption = g.node("FreeSegCaption", image=image[0], blip2=blip2[0], class_names=CLASSES, max_new_tokens=8)
    feats = g.node("FreeSegDiffusionFeatures", model=model, vae=vae, image=image[0], timestep=timestep,
                   resolution=RESOLUTION, source="cross_attn_queries", seed=seed, **conditioning)
    clusters = g.node("FreeSegClusterMasks", features=feats[0], n_clusters=3, method="kmeans", seed=seed)
    clip_model = g.node("FreeSegCLIPLoader", model_name=MODEL_LINKS["open_clip_dir"][1], download=False, repo_id="")
    labelled = g.node("FreeSegCLIPLabel", segments=clusters[0], image=image[0], clip_model=clip_model[0],
                      class_names=caption[1], crop_mode="masked", prompt="bare", threshold=0.0,
                      background="")  # no background words: random weights name every mask
    refined = g.node("FreeSegRefineMasks", segments=labelled[0], image=image[0], method="crf")
    model_probe, feats_probe = g.probe(model), g.probe(feats[0])
    cmap, masks, labels, union = g.probe(clusters[1]), g.probe(refined[1]), g.probe(refined[2]), g.probe(refined[3])
    result = models_client.run(g.prompt)

    assert probed(result, model_probe)["config"] == {"Flux": "Flux", "SD3": "SD3"}[family]
    f = probed(result, feats_probe)
    # One block at the fixtures' depth (freeseg.dit.block_indices), its image tokens on the
    # 8 x 8 token grid of a 128 px image.
    assert f["family"] == family and f["finite"], f
    assert len(f["blocks"]) == 1 and f["shape"] == [1, channels, 8, 8], f
    assert probed(result, cmap)["shape"][0] == 1
    named = [l for l in probed(result, labels)["value"].splitlines() if l]
    assert 1 <= len(named) <= 3 and set(named) <= set(CLASSES.split(", "))
    assert probed(result, masks)["shape"] == [len(named), HEIGHT, WIDTH]
    assert probed(result, union)["shape"] == [1, HEIGHT, WIDTH]


def test_evaluator_runs_the_flux_workflow(models_client, models_server, tmp_path):
    """The README's command for users with the weights, `freeseg eval --backend comfyui
    --workflow workflows/api/freeseg_flux.json`, on a 2-image VOC-layout split (random ground
    truth) with the workflow's model names swapped for the fixtures as in test_workflows."""
    import json
    import os
    import subprocess
    import sys

    import numpy as np
    from PIL import Image

    import workflow_tools as wt
    from freeseg.app.paths import REPO
    from synthetic.scenes import write_test_image

    voc = tmp_path / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / sub).mkdir(parents=True)
    stems = ["2007_000001", "2007_000002"]
    rng = np.random.default_rng(0)
    for i, stem in enumerate(stems):
        png = write_test_image(str(tmp_path / f"{stem}.png"), 64, 48, seed=50 + i)
        Image.open(png).convert("RGB").save(voc / "JPEGImages" / f"{stem}.jpg", quality=95)
        gt = rng.choice(np.array([0, 8, 12], dtype=np.uint8), size=(48, 64))
        Image.fromarray(gt, mode="L").save(voc / "SegmentationClass" / f"{stem}.png")
    (voc / "ImageSets/Segmentation/val.txt").write_text("\n".join(stems) + "\n")
    with open(os.path.join(wt.API_DIR, "freeseg_flux.json"), encoding="utf-8") as f:
        api = json.load(f)
    workflow = wt.adapt_api(api, {node: "example.png" for node in wt.load_image_ids(api)})  # eval sets the image
    (tmp_path / "flux.json").write_text(json.dumps(workflow))
    out = tmp_path / "eval"
    result = subprocess.run(
        [sys.executable, "-m", "freeseg", "eval", "--dataset", "voc", "--root", str(voc), "--backend", "comfyui",
         "--workflow", str(tmp_path / "flux.json"), "--url", models_server.url,
         "--blip2", MODEL_LINKS["blip2_dir"][1], "--mode", "open", "--resolution", "128", "--clusters", "3",
         "--no-progress", "--out", str(out), "--json"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    scores = json.loads(result.stdout)
    assert 0.0 <= scores["miou"] <= 1.0
    (pred_dir,) = (out / "predictions").iterdir()
    assert sorted(p.stem for p in pred_dir.iterdir()) == stems


def test_segment_everything_on_a_dit_checkpoint(models_client, models_upload):
    """Segment Everything (one node) on the SD3.5 checkpoint with its own CLIP: the features are
    taken at the family's timestep and resolution (freeseg.dit.FAMILIES, 1024 px), and the masks
    and boxes come back at the image's size."""
    g = Graph()
    image = g.node("LoadImage", image=models_upload(WIDTH, HEIGHT, seed=43))
    ckpt = g.node("CheckpointLoaderSimple", ckpt_name=EXTRA_MODEL_LINKS["sd3_ckpt"][1])
    clip_model = g.node("FreeSegCLIPLoader", model_name=MODEL_LINKS["open_clip_dir"][1], download=False, repo_id="")
    pipe = g.node("FreeSegPipeline", model=ckpt[0], vae=ckpt[2], image=image[0], clip_model=clip_model[0],
                  class_names=CLASSES, n_clusters=3, seed=random.randrange(2**31), clip=ckpt[1])
    masks, labels, union = g.probe(pipe[1]), g.probe(pipe[2]), g.probe(pipe[3])
    result = models_client.run(g.prompt)
    named = [l for l in probed(result, labels)["value"].splitlines() if l]
    assert len(named) <= 3 and set(named) <= set(CLASSES.split(", "))
    assert probed(result, masks)["shape"] == [max(len(named), 1), HEIGHT, WIDTH]
    assert probed(result, union)["shape"] == [1, HEIGHT, WIDTH]
