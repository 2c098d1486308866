"""The captioners through a real ComfyUI server: one loader for BLIP (models/blip, the paper's
captioner) and BLIP-2 (models/blip2), the Caption node's prompt and minimum length, and the
full chain and the paper-preset node on the random BLIP fixture."""

import random

import pytest

from comfy_harness import EXTRA_MODEL_LINKS, MODEL_LINKS, Graph, probed
from freeseg.app.client import ComfyError

BLIP = EXTRA_MODEL_LINKS["blip_dir"][1]
BLIP2 = MODEL_LINKS["blip2_dir"][1]


def caption_chain(g: Graph, image, captioner: str, prompt: str, min_new_tokens: int, max_new_tokens: int = 8,
                  class_names: str = "dog, cat"):
    """Loader -> Caption -> features -> cluster -> CLIP label -> refine, on the SD1.5 fixture."""
    seed = random.randrange(2**31)
    ckpt = g.node("CheckpointLoaderSimple", ckpt_name=MODEL_LINKS["sd15_ckpt"][1])
    blip = g.node("FreeSegBLIP2Loader", model_name=captioner, download=False, repo_id="")
    caption = g.node("FreeSegCaption", image=image, class_names=class_names, max_new_tokens=max_new_tokens,
                     prompt=prompt, min_new_tokens=min_new_tokens, blip2=blip[0])
    clip_model = g.node("FreeSegCLIPLoader", model_name=MODEL_LINKS["open_clip_dir"][1], download=False, repo_id="")
    feats = g.node("FreeSegDiffusionFeatures", model=ckpt[0], vae=ckpt[2], image=image, clip=ckpt[1], timestep=0,
                   resolution=128, source="cross_attn_queries", seed=seed)
    clusters = g.node("FreeSegClusterMasks", features=feats[0], n_clusters=3, method="kmeans", seed=seed)
    labelled = g.node("FreeSegCLIPLabel", segments=clusters[0], image=image, clip_model=clip_model[0],
                      class_names=caption[1], crop_mode="masked", prompt="bare", threshold=0.0)
    refined = g.node("FreeSegRefineMasks", segments=labelled[0], image=image, method="crf")
    return caption, refined


def test_loader_lists_blip_and_blip2_folders(models_client):
    info = models_client.object_info()["FreeSegBLIP2Loader"]
    options = info["input"]["required"]["model_name"][1]["options"]
    assert BLIP in options and BLIP2 in options
    assert info["input"]["required"]["repo_id"][1]["default"] == "Salesforce/blip-image-captioning-base"
    caption = models_client.object_info()["FreeSegCaption"]["input"]
    # prompt and min_new_tokens are optional: API prompts written before them get the paper's values.
    assert caption["optional"]["prompt"][1]["default"] == "a picture of "
    assert (caption["required"]["max_new_tokens"][1]["default"], caption["optional"]["min_new_tokens"][1]["default"]) \
        == (26, 6)


def test_full_chain_with_blip_prompt_and_min_length(models_client, models_upload):
    g = Graph()
    image = g.node("LoadImage", image=models_upload(96, 72, seed=21))
    caption, refined = caption_chain(g, image[0], BLIP, prompt="a picture of ", min_new_tokens=6)
    captions, class_names = g.probe(caption[0]), g.probe(caption[1])
    masks, labels = g.probe(refined[1]), g.probe(refined[2])
    result = models_client.run(g.prompt)
    (text,) = probed(result, captions)["value"].split("\n")
    # The random BLIP writes word pieces of its tiny vocabulary, never the end token: the caption
    # is the 8 new tokens, without the prompt.
    assert text and not text.startswith("a picture of")
    names = [n.strip() for n in probed(result, class_names)["value"].split(",")]
    assert names[-2:] == ["dog", "cat"]
    named = [l for l in probed(result, labels)["value"].splitlines() if l]
    assert probed(result, masks)["shape"] == [max(len(named), 1), 72, 96]
    assert set(named) <= set(names)


def test_caption_node_without_prompt_and_min_inputs_uses_the_paper_values(models_client, models_upload):
    """An API prompt that predates the prompt / min_new_tokens inputs still runs (paper values)."""
    g = Graph()
    image = g.node("LoadImage", image=models_upload(40, 30, seed=25))
    blip = g.node("FreeSegBLIP2Loader", model_name=BLIP, download=False, repo_id="")
    caption = g.node("FreeSegCaption", image=image[0], class_names="dog", max_new_tokens=8, blip2=blip[0])
    captions = g.probe(caption[0])
    (text,) = probed(models_client.run(g.prompt), captions)["value"].split("\n")
    assert text and not text.startswith("a picture of")


def test_blip2_without_prompt(models_client, models_upload):
    g = Graph()
    image = g.node("LoadImage", image=models_upload(64, 48, seed=22))
    caption, refined = caption_chain(g, image[0], BLIP2, prompt="", min_new_tokens=2, max_new_tokens=4)
    captions, masks = g.probe(caption[0]), g.probe(refined[3])
    result = models_client.run(g.prompt)
    assert len(probed(result, captions)["value"].split("\n")) == 1
    assert probed(result, masks)["shape"] == [1, 48, 64]


@pytest.mark.parametrize("inputs, named", [
    ({"max_new_tokens": 8, "min_new_tokens": 9, "prompt": "a picture of "}, "min_new_tokens"),
    ({"max_new_tokens": 8, "min_new_tokens": -1, "prompt": ""}, "min_new_tokens"),
    ({"max_new_tokens": 0, "min_new_tokens": 0, "prompt": ""}, "max_new_tokens"),
    ({"max_new_tokens": 8, "min_new_tokens": 2, "prompt": "two\nlines"}, "prompt"),
    ({"max_new_tokens": 8, "min_new_tokens": 2, "prompt": "x" * 201}, "prompt"),
])
def test_bad_caption_options_are_refused_at_queue_time(models_client, models_upload, inputs, named):
    g = Graph()
    image = g.node("LoadImage", image=models_upload(32, 32, seed=23))
    caption = g.node("FreeSegCaption", image=image[0], class_names="dog", **inputs)
    g.probe(caption[0])
    with pytest.raises(ComfyError) as err:
        models_client.run(g.prompt)
    assert "FreeSegCaption" in str(err.value) and named in str(err.value)
    # The server still answers.
    assert "FreeSegCaption" in models_client.object_info()


def test_segment_everything_with_blip_paper_preset(models_client, models_upload):
    g = Graph()
    image = g.node("LoadImage", image=models_upload(80, 60, seed=24))
    ckpt = g.node("CheckpointLoaderSimple", ckpt_name=MODEL_LINKS["sd15_ckpt"][1])
    clip_model = g.node("FreeSegCLIPLoader", model_name=MODEL_LINKS["open_clip_dir"][1], download=False, repo_id="")
    blip = g.node("FreeSegBLIP2Loader", model_name=BLIP, download=False, repo_id="")
    pipe = g.node("FreeSegPipeline", model=ckpt[0], vae=ckpt[2], image=image[0], clip_model=clip_model[0],
                  class_names="dog", n_clusters=2, seed=random.randrange(2**31), blip2=blip[0], clip=ckpt[1])
    captions, union = g.probe(pipe[7]), g.probe(pipe[3])
    result = models_client.run(g.prompt)
    (text,) = probed(result, captions)["value"].split("\n")
    assert text and not text.startswith("a picture of")
    assert probed(result, union)["shape"] == [1, 60, 80]
