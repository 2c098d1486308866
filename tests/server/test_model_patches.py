"""The features node on a patched MODEL, as users' graphs give it (IPAdapter-style attention
patches): it copies the patches' options the way core does and sets what the sampler sets."""

import random
import uuid

from comfy_harness import MODEL_LINKS, Graph, probed


def test_attention_patch_sees_the_sampler_entries_and_is_not_deep_copied(client, upload):
    tag = f"patch-{random.randrange(2**31)}"  # a new tag: nothing comes from the cache
    g = Graph()
    a, b = (g.node("LoadImage", image=upload(80, 64, seed=s)) for s in (31, 32))
    batch = g.node("ImageBatch", image1=a[0], image2=b[0])
    ckpt = g.node("CheckpointLoaderSimple", ckpt_name=MODEL_LINKS["sd15_ckpt"][1])
    patched = g.node("FreeSegTestAttnPatch", model=ckpt[0], tag=tag)
    feats = g.node("FreeSegDiffusionFeatures", model=patched[0], vae=ckpt[2], image=batch[0], clip=ckpt[1],
                   timestep=200, resolution=128, source="cross_attn_queries", seed=0)
    report = g.node("FreeSegTestPatchReport", after=feats[0], tag=tag)
    result = client.run(g.prompt)
    seen = probed(result, report)
    calls = seen["calls"]
    assert calls and sum(call["batch"] for call in calls) % 2 == 0, "the attn2 patch did not run for both images"
    for call in calls:
        sigma = call["sigmas"][0]
        assert call["sigmas"] == [sigma] * call["batch"]  # one sigma per image of the pass, as the sampler's
        assert sigma > 0 and call["sample_sigmas"] == [sigma, 0.0]  # one step from the pass's sigma to 0
        assert call["cond_or_uncond"] == [0] and call["state_is_shared"]
    uuids = {u for call in calls for u in call["uuids"]}
    assert len(uuids) == 1 and uuid.UUID(uuids.pop())  # one conditioning, one uuid for the run
    assert len({call["sigmas"][0] for call in calls}) == 1  # the same timestep for both images
    # The node's own model.clone() copies what core's clone copies (0.3.75 deep-copies
    # model_options, newer cores do not); the node adds no deep copy of its own.
    assert seen["deep_copies"] == seen["copies_per_clone"]
