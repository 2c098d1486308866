"""Features captured while sampling (Capture Features -> sampler -> Captured Features) and
latents into Diffusion Features, through a real ComfyUI server on the random-weight SD1.5
checkpoint.

The cosine checks compare the features of the sampler's last model call (the "normal"
schedule ends at SD's sigma_min, the sigma of timestep 0) with Diffusion Features on the
sampler's final latent at timestep 0. The two UNet inputs differ by sigma_min times two
different noises (the sampler's predicted noise vs Diffusion Features' seeded noise): that
small difference is what the cosine allows for."""

import json
import random

import pytest

from comfy_harness import MODEL_LINKS, Graph
from freeseg.app.client import ComfyError

SIZE = 128  # pixels (the smallest resolution); latent 16x16, feature grid 8x8 (paper)


def compared(result: dict, node) -> dict:
    return json.loads(result["outputs"][node.id]["compare"][0])


def generate(g: Graph, model, clip, positive="", negative=None, cfg=1.0, seed=1, batch=1, steps=4):
    """A KSampler run with `model`; `negative` None: the zeroed positive (ConditioningZeroOut)."""
    pos = g.node("CLIPTextEncode", text=positive, clip=clip)[0] if isinstance(positive, str) else positive
    neg = (g.node("ConditioningZeroOut", conditioning=pos)[0] if negative is None else negative)
    empty = g.node("EmptyLatentImage", width=SIZE, height=SIZE, batch_size=batch)
    return g.node("KSampler", model=model, seed=seed, steps=steps, cfg=cfg, sampler_name="euler",
                  scheduler="normal", positive=pos, negative=neg, latent_image=empty[0], denoise=1.0)


def capture_node(g: Graph, model, **options):
    inputs = {"keep": "last_call", "sigma": 0.0292, "source": "cross_attn_queries", "detail": "paper", **options}
    return g.node("FreeSegCaptureFeatures", model=model, **inputs)


def features_node(g: Graph, ckpt, latent, clip=True, **options):
    inputs = {"timestep": 0, "resolution": SIZE, "source": "cross_attn_queries", "seed": 0, "detail": "paper",
              **options}
    if clip:
        inputs["clip"] = ckpt[1]
    return g.node("FreeSegDiffusionFeatures", model=ckpt[0], latent=latent, **inputs)


def checkpoint(g: Graph):
    return g.node("CheckpointLoaderSimple", ckpt_name=MODEL_LINKS["sd15_ckpt"][1])


@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_capture_leaves_generation_bit_identical(client, cfg):
    g = Graph()
    ckpt = checkpoint(g)
    cap = capture_node(g, ckpt[0])
    seed = random.randrange(2**31)
    patched = generate(g, cap[0], ckpt[1], "a house", cfg=cfg, seed=seed, batch=2)
    plain = generate(g, ckpt[0], ckpt[1], "a house", cfg=cfg, seed=seed, batch=2)
    same = g.node("FreeSegTestCompare", a=patched[0], b=plain[0])
    feats = g.node("FreeSegCapturedFeatures", capture=cap[1], latent=patched[0])
    probe = g.probe(feats[0])
    result = client.run(g.prompt)
    report = compared(result, same)
    assert report["equal"] and report["shape"][0] == [2, 4, SIZE // 8, SIZE // 8]
    described = json.loads(result["outputs"][probe.id]["probe"][0])
    assert described["kind"] == "features" and described["shape"][0] == 2  # the cond half only
    assert described["shape"][2:] == [SIZE // 16, SIZE // 16] and described["finite"]


@pytest.mark.parametrize("detail", ["paper", "fine"])
def test_last_call_matches_features_of_the_final_latent(client, detail):
    g = Graph()
    ckpt = checkpoint(g)
    cap = capture_node(g, ckpt[0], detail=detail)
    out = generate(g, cap[0], ckpt[1], "", cfg=1.0, seed=random.randrange(2**31), batch=2)
    captured = g.node("FreeSegCapturedFeatures", capture=cap[1], latent=out[0])
    direct = features_node(g, ckpt, out[0], detail=detail)
    cmp = g.node("FreeSegTestCompare", a=captured[0], b=direct[0])
    report = compared(client.run(g.prompt), cmp)
    assert report["blocks"][0] == report["blocks"][1]
    assert report["image_size"] == [[SIZE, SIZE], [SIZE, SIZE]] and report["timestep"] == [0, 0]
    if detail == "paper":  # the equal split of the channels holds for one level's query blocks
        assert min(report["cosine"]) >= 0.99, report


def test_cfg_keeps_the_conditional_half(client):
    """cfg 3 batches the positive and negative conditioning in one call: the captured features
    are those of the positive one. Positive empty prompt and negative zeros, then swapped; each
    time the capture is nearer Diffusion Features with the positive's conditioning (clip: the
    empty prompt; no clip: zeros) than with the negative's."""
    g = Graph()
    ckpt = checkpoint(g)
    text = g.node("CLIPTextEncode", text="", clip=ckpt[1])[0]
    zeros = g.node("ConditioningZeroOut", conditioning=text)[0]
    reports = []
    for positive, negative in ((text, zeros), (zeros, text)):
        cap = capture_node(g, ckpt[0])
        out = generate(g, cap[0], ckpt[1], positive, negative, cfg=3.0, seed=random.randrange(2**31))
        captured = g.node("FreeSegCapturedFeatures", capture=cap[1], latent=out[0])
        reports.append([g.node("FreeSegTestCompare", a=captured[0], b=features_node(g, ckpt, out[0], clip=c)[0])
                        for c in (True, False)])
    result = client.run(g.prompt)
    (empty_empty, empty_zeros), (zeros_empty, zeros_zeros) = [[compared(result, n)["cosine"] for n in pair]
                                                              for pair in reports]
    assert min(empty_empty) >= 0.99 and min(zeros_zeros) >= 0.99
    assert sum(empty_empty) > sum(empty_zeros) and sum(zeros_zeros) > sum(zeros_empty)


def test_nearest_sigma_keeps_that_call(client):
    g = Graph()
    ckpt = checkpoint(g)
    cap = capture_node(g, ckpt[0], keep="nearest_sigma", sigma=1000.0)  # the first call
    out = generate(g, cap[0], ckpt[1], "", seed=random.randrange(2**31))
    captured = g.node("FreeSegCapturedFeatures", capture=cap[1], latent=out[0])
    cmp = g.node("FreeSegTestCompare", a=captured[0], b=features_node(g, ckpt, out[0])[0])
    report = compared(client.run(g.prompt), cmp)
    assert report["timestep"][0] == 999 and report["timestep"][1] == 0


def test_nothing_recorded_says_to_run_the_sampler(client):
    g = Graph()
    ckpt = checkpoint(g)
    cap = capture_node(g, ckpt[0])
    out = generate(g, ckpt[0], ckpt[1], "", seed=random.randrange(2**31))  # the plain MODEL
    g.probe(g.node("FreeSegCapturedFeatures", capture=cap[1], latent=out[0])[0])
    with pytest.raises(ComfyError) as err:
        client.run(g.prompt)
    message = str(err.value)
    assert "FreeSegCapturedFeatures" in message and "capture: nothing was recorded" in message
    assert "run the sampler again" in message


def test_latents_of_another_run_are_refused(client):
    """Prompt 1 samples with the captured MODEL; prompt 2 keeps that sampler (cached, not run
    again) and runs a second one with the same MODEL, then asks for the features of the first
    one's latents: refused, never the second run's features."""
    seed = random.randrange(2**31)

    def graph(second: bool) -> tuple[Graph, object]:
        g = Graph()
        ckpt = checkpoint(g)
        cap = capture_node(g, ckpt[0])
        first = generate(g, cap[0], ckpt[1], "", seed=seed)
        latent = first[0]
        if second:  # the first latents, unchanged, after the second sampler ran
            other = generate(g, cap[0], ckpt[1], "", seed=seed + 1)
            zero = g.node("LatentMultiply", samples=other[0], multiplier=0.0)
            latent = g.node("LatentAdd", samples1=first[0], samples2=zero[0])[0]
        return g, g.probe(g.node("FreeSegCapturedFeatures", capture=cap[1], latent=latent)[0])

    g, probe = graph(False)
    assert json.loads(client.run(g.prompt)["outputs"][probe.id]["probe"][0])["kind"] == "features"
    g, _ = graph(True)
    with pytest.raises(ComfyError) as err:
        client.run(g.prompt)
    message = str(err.value)
    assert "capture: these latents are not the output of the last sampling run" in message
    assert "run the sampler again" in message


def test_latent_input_equals_image_and_vae(client, upload):
    g = Graph()
    ckpt = checkpoint(g)
    image = g.node("LoadImage", image=upload(SIZE, SIZE, seed=4))
    latent = g.node("VAEEncode", pixels=image[0], vae=ckpt[2])
    from_latent = features_node(g, ckpt, latent[0])
    from_image = g.node("FreeSegDiffusionFeatures", model=ckpt[0], vae=ckpt[2], image=image[0], clip=ckpt[1],
                        timestep=0, resolution=SIZE, source="cross_attn_queries", seed=0, detail="paper")
    cmp = g.node("FreeSegTestCompare", a=from_latent[0], b=from_image[0])
    report = compared(client.run(g.prompt), cmp)
    assert report["max_abs_diff"] <= 1e-3 and min(report["cosine"]) > 0.9999, report
    assert report["image_size"] == [[SIZE, SIZE], [SIZE, SIZE]]


def test_latent_of_another_size_is_resized(client):
    g = Graph()
    ckpt = checkpoint(g)
    empty = g.node("EmptyLatentImage", width=192, height=128, batch_size=1)
    probe = g.probe(features_node(g, ckpt, empty[0])[0])
    described = json.loads(client.run(g.prompt)["outputs"][probe.id]["probe"][0])
    assert described["shape"] == [1, described["shape"][1], SIZE // 16, SIZE // 16] and described["finite"]


def test_features_without_image_vae_or_latent_name_the_inputs(client, upload):
    g = Graph()
    ckpt = checkpoint(g)
    image = g.node("LoadImage", image=upload(SIZE, SIZE, seed=4))
    g.probe(g.node("FreeSegDiffusionFeatures", model=ckpt[0], image=image[0], timestep=0, resolution=SIZE,
                   source="cross_attn_queries", seed=0)[0])
    with pytest.raises(ComfyError) as err:
        client.run(g.prompt)
    message = str(err.value)
    assert "vae: connect image and vae" in message and "or latent" in message
