"""SD2.x through a real ComfyUI server: the random SD2 v-prediction checkpoint (OpenCLIP-H text
encoder, linear transformers, context 1024) is detected as SD2 and runs the whole graph."""

import random

from comfy_harness import EXTRA_MODEL_LINKS, MODEL_LINKS, Graph, probed
from synthetic.models import SD2_QUERY_CHANNELS


def test_sd2_checkpoint_runs_the_full_graph(models_client, models_upload):
    g = Graph()
    image = g.node("LoadImage", image=models_upload(100, 76, seed=31))
    ckpt = g.node("CheckpointLoaderSimple", ckpt_name=EXTRA_MODEL_LINKS["sd2_ckpt"][1])
    seed = random.randrange(2**31)
    feats = g.node("FreeSegDiffusionFeatures", model=ckpt[0], vae=ckpt[2], image=image[0], clip=ckpt[1],
                   timestep=0, resolution=128, source="cross_attn_queries", seed=seed)
    clusters = g.node("FreeSegClusterMasks", features=feats[0], n_clusters=3, method="kmeans", seed=seed)
    clip_model = g.node("FreeSegCLIPLoader", model_name=MODEL_LINKS["open_clip_dir"][1], download=False, repo_id="")
    labelled = g.node("FreeSegCLIPLabel", segments=clusters[0], image=image[0], clip_model=clip_model[0],
                      class_names="dog, cat, grass", crop_mode="masked", prompt="bare", threshold=0.0,
                      background="")  # no background words: random weights name every mask
    refined = g.node("FreeSegRefineMasks", segments=labelled[0], image=image[0], method="crf")
    model_probe, feats_probe = g.probe(ckpt[0]), g.probe(feats[0])
    masks, labels, union = g.probe(refined[1]), g.probe(refined[2]), g.probe(refined[3])
    result = models_client.run(g.prompt)

    model = probed(result, model_probe)
    assert (model["config"], model["model_type"], model["context_dim"]) == ("SD20", "V_PREDICTION", 1024)
    f = probed(result, feats_probe)
    # 128 px -> latent 16 -> the latent/4 blocks are 4x4; features on a resolution/16 = 8x8 grid.
    assert f["family"] == "SD20" and f["shape"] == [1, SD2_QUERY_CHANNELS, 8, 8] and f["finite"]
    assert f["blocks"] == ["input_7.attn2.to_q", "input_8.attn2.to_q", "output_3.attn2.to_q",
                           "output_4.attn2.to_q", "output_5.attn2.to_q"]
    named = [l for l in probed(result, labels)["value"].splitlines() if l]
    assert 1 <= len(named) <= 3 and set(named) <= {"dog", "cat", "grass"}
    assert probed(result, masks)["shape"] == [len(named), 76, 100]
    assert probed(result, union)["shape"] == [1, 76, 100]
