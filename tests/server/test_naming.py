"""Naming rules through a real ComfyUI server on the random-weight fixtures: the paper
protocol and the open-vocabulary default, on FreeSeg-Diff Segment Everything and on the
CLIP Label node (random weights make the names meaningless; these tests check that every
name comes from the allowed list, shapes, and the errors users see)."""

import random

import pytest

from comfy_harness import MODEL_LINKS, Graph, probed
from freeseg.app.client import ComfyError
from freeseg.nouns import extract_nouns

VOC = ("aeroplane, bicycle, bird, boat, bottle, bus, car, cat, chair, cow, diningtable, dog, horse, "
       "motorbike, person, pottedplant, sheep, sofa, train, tvmonitor")
VOC_LIST = [c.strip() for c in VOC.split(",")]


def models(g: Graph):
    ckpt = g.node("CheckpointLoaderSimple", ckpt_name=MODEL_LINKS["sd15_ckpt"][1])
    clip_model = g.node("FreeSegCLIPLoader", model_name=MODEL_LINKS["open_clip_dir"][1], download=False, repo_id="")
    blip = g.node("FreeSegBLIP2Loader", model_name=MODEL_LINKS["blip2_dir"][1], download=False, repo_id="")
    return ckpt, clip_model, blip


def run_pipeline(client, upload, rule, class_names, seed):
    g = Graph()
    image = g.node("LoadImage", image=upload(90, 70, seed=seed))
    ckpt, clip_model, blip = models(g)
    pipe = g.node("FreeSegPipeline", model=ckpt[0], vae=ckpt[2], image=image[0], clip_model=clip_model[0],
                  class_names=class_names, n_clusters=4, seed=random.randrange(2**31), rule=rule, blip2=blip[0],
                  clip=ckpt[1])
    masks, labels, captions = g.probe(pipe[1]), g.probe(pipe[2]), g.probe(pipe[7])
    result = client.run(g.prompt)
    names = [l for l in probed(result, labels)["value"].splitlines() if l]
    assert probed(result, masks)["shape"] == [max(len(names), 1), 70, 90]
    return names, probed(result, captions)["value"]


def test_segment_everything_paper_rule(client, upload):
    names, caption = run_pipeline(client, upload, "paper", VOC, seed=21)
    assert len(caption.splitlines()) == 1
    assert set(names) <= set(VOC_LIST) and len(names) <= 4


def test_segment_everything_open_rule(client, upload):
    names, caption = run_pipeline(client, upload, "open", "dog, cat", seed=22)
    # only the caption's nouns and the given names can name a mask, never a background word
    assert set(names) <= set(extract_nouns(caption)) | {"dog", "cat"}


def test_clip_label_paper_rule_in_a_chain(client, upload):
    g = Graph()
    image = g.node("LoadImage", image=upload(80, 64, seed=23))
    ckpt, clip_model, blip = models(g)
    caption = g.node("FreeSegCaption", image=image[0], class_names="", max_new_tokens=8, blip2=blip[0])
    feats = g.node("FreeSegDiffusionFeatures", model=ckpt[0], vae=ckpt[2], image=image[0], clip=ckpt[1], timestep=0,
                   resolution=128, source="cross_attn_queries", seed=1)
    clusters = g.node("FreeSegClusterMasks", features=feats[0], n_clusters=3, method="kmeans", seed=1)
    labelled = g.node("FreeSegCLIPLabel", segments=clusters[0], image=image[0], clip_model=clip_model[0],
                      class_names="", crop_mode="masked", prompt="bare", threshold=0.0, rule="paper",
                      background="", classes=VOC, captions=caption[0], clip=ckpt[1])
    refined = g.node("FreeSegRefineMasks", segments=labelled[0], image=image[0], method="crf")
    labels = g.probe(refined[2])
    result = client.run(g.prompt)
    names = [l for l in probed(result, labels)["value"].splitlines() if l]
    assert set(names) <= set(VOC_LIST)


@pytest.mark.parametrize("inputs, message", [
    ({"rule": "paper", "classes": VOC}, "clip"),
    ({"rule": "paper", "classes": ""}, "classes"),
    ({"rule": "closed"}, "rule"),
])
def test_clip_label_refuses_bad_naming_inputs(client, upload, inputs, message):
    g = Graph()
    image = g.node("LoadImage", image=upload(48, 48, seed=24))
    ckpt, clip_model, _ = models(g)
    feats = g.node("FreeSegDiffusionFeatures", model=ckpt[0], vae=ckpt[2], image=image[0], clip=ckpt[1], timestep=0,
                   resolution=128, source="cross_attn_queries", seed=0)
    clusters = g.node("FreeSegClusterMasks", features=feats[0], n_clusters=2, method="kmeans", seed=0)
    labelled = g.node("FreeSegCLIPLabel", segments=clusters[0], image=image[0], clip_model=clip_model[0],
                      class_names="dog", crop_mode="masked", prompt="bare", threshold=0.0, **inputs)
    g.probe(g.node("FreeSegRefineMasks", segments=labelled[0], image=image[0], method="none")[2])
    with pytest.raises(ComfyError) as err:
        client.run(g.prompt)
    assert message in str(err.value)


@pytest.mark.parametrize("class_names, with_blip, message", [(VOC, False, "blip2"), ("", True, "class_names")])
def test_segment_everything_paper_rule_needs_its_inputs(client, upload, class_names, with_blip, message):
    g = Graph()
    image = g.node("LoadImage", image=upload(48, 48, seed=25))
    ckpt, clip_model, blip = models(g)
    extra = {"blip2": blip[0]} if with_blip else {}
    pipe = g.node("FreeSegPipeline", model=ckpt[0], vae=ckpt[2], image=image[0], clip_model=clip_model[0],
                  class_names=class_names, n_clusters=2, seed=0, rule="paper", clip=ckpt[1], **extra)
    g.probe(pipe[2])
    with pytest.raises(ComfyError) as err:
        client.run(g.prompt)
    assert message in str(err.value)


def test_features_without_clip_warn_once_about_zero_conditioning(server, client, upload):
    """Without the CLIP input the UNet is conditioned on zeros, not the paper's empty prompt:
    the log says so once per session, however often it happens."""
    for seed in (26, 27):
        g = Graph()
        image = g.node("LoadImage", image=upload(48, 48, seed=seed))
        ckpt = g.node("CheckpointLoaderSimple", ckpt_name=MODEL_LINKS["sd15_ckpt"][1])
        feats = g.node("FreeSegDiffusionFeatures", model=ckpt[0], vae=ckpt[2], image=image[0], timestep=0,
                       resolution=128, source="cross_attn_queries", seed=seed)
        g.probe(g.node("FreeSegClusterMasks", features=feats[0], n_clusters=2, method="kmeans", seed=0)[1])
        client.run(g.prompt)
    assert server.log().count("conditioned on zeros instead of the empty-prompt embedding") == 1
