"""The beyond-the-paper node inputs through a real ComfyUI server, on the random-weight fixtures:
automatic and class-list counts, batch-shared clustering and naming, instances, pick by
pointing, the fine feature grid, and the errors for bad values. Random weights make the masks
meaningless, so the checks are the answers the plumbing must give whatever the masks are."""

import json
import random

import pytest

from comfy_harness import MODEL_LINKS, Graph, probed
from freeseg.app.client import ComfyError


def chain(g: Graph, image, resolution=128, n_clusters=3, cluster=None, refine=None, detail="paper",
          class_names="dog, cat, tree"):
    """features -> cluster -> CLIP label (vocabulary only) -> refine; returns (clusters, refined)."""
    seed = random.randrange(2**31)
    ckpt = g.node("CheckpointLoaderSimple", ckpt_name=MODEL_LINKS["sd15_ckpt"][1])
    clip_model = g.node("FreeSegCLIPLoader", model_name=MODEL_LINKS["open_clip_dir"][1], download=False, repo_id="")
    feats = g.node("FreeSegDiffusionFeatures", model=ckpt[0], vae=ckpt[2], image=image, clip=ckpt[1], timestep=0,
                   resolution=resolution, source="cross_attn_queries", seed=seed, detail=detail)
    clusters = g.node("FreeSegClusterMasks", features=feats[0], n_clusters=n_clusters, method="kmeans", seed=seed,
                      **(cluster or {}))
    labelled = g.node("FreeSegCLIPLabel", segments=clusters[0], image=image, clip_model=clip_model[0],
                      class_names=class_names, crop_mode="masked", prompt="bare", threshold=0.0)
    refined = g.node("FreeSegRefineMasks", segments=labelled[0], image=image, method="none", **(refine or {}))
    return clusters, refined


def test_automatic_and_class_list_counts(client, upload):
    g = Graph()
    a, b = (g.node("LoadImage", image=upload(72, 56, seed=s)) for s in (21, 22))
    batch = g.node("ImageBatch", image1=a[0], image2=b[0])[0]
    auto, auto_refined = chain(g, batch, n_clusters=0, cluster={"max_clusters": 4})
    per_class, _ = chain(g, batch, n_clusters=4, cluster={"k_from": "class_names", "class_offset": 1,
                                                          "class_names": "dog, cat\nsky"})
    fixed, _ = chain(g, batch, n_clusters=4)
    probes = {name: g.probe(node[1]) for name, node in (("auto", auto), ("class", per_class), ("fixed", fixed))}
    records = g.probe(auto_refined[6])
    result = client.run(g.prompt)
    got = {name: probed(result, p) for name, p in probes.items()}
    for m in got.values():
        assert m["shape"] == [2, 56, 72] and m["min"] == 0.0 and m["max"] == 1.0
    assert 2 <= got["auto"]["distinct"] <= 4
    # K = 2 names + 1 and 1 name + 1: masks 0..2 over the batch, map values {0, 0.5, 1}
    assert got["class"]["distinct"] == 3
    assert got["fixed"]["distinct"] == 4
    for r in json.loads(probed(result, records)["value"]):
        assert r["mask"] < 4


def test_shared_batch_gives_one_labelling(client, upload):
    g = Graph()
    a = g.node("LoadImage", image=upload(64, 48, seed=23))
    batch = g.node("ImageBatch", image1=a[0], image2=a[0])[0]
    clusters, refined = chain(g, batch, n_clusters=3, cluster={"shared_batch": True},
                              class_names="dog, cat\ncat, tree")
    records = g.probe(refined[6])
    cmap = g.probe(clusters[1])
    result = client.run(g.prompt)
    recs = json.loads(probed(result, records)["value"])
    per_image = [sorted((r["mask"], r["label"]) for r in recs if r["image"] == i) for i in (0, 1)]
    assert per_image[0] == per_image[1] and per_image[0]
    assert {r["label"] for r in recs} <= {"dog", "cat", "tree"}
    assert probed(result, cmap)["shape"] == [2, 48, 64]


def test_instances_split_named_masks(client, upload):
    g = Graph()
    image = g.node("LoadImage", image=upload(80, 64, seed=24))[0]
    ckpt_free_chain = chain(g, image, n_clusters=4, refine={"instances": False})
    whole = g.probe(ckpt_free_chain[1][6])
    split = g.node("FreeSegRefineMasks", segments=ckpt_free_chain[1][0], image=image, method="none",
                   instances=True, min_area=0.0)
    split_json, split_masks, split_segs = g.probe(split[6]), g.probe(split[1]), g.probe(split[4])
    result = client.run(g.prompt)
    whole_recs = json.loads(probed(result, whole)["value"])
    parts = json.loads(probed(result, split_json)["value"])
    assert whole_recs and all("instance" not in r for r in whole_recs)
    assert probed(result, split_masks)["shape"] == [len(parts), 64, 80]
    assert len(probed(result, split_segs)["segs"]) == len(parts)
    # the parts of one mask follow one another with instance 0, 1, 2, ...; with min_area 0
    # they add up to it (a name may hold several masks: compare per name)
    assert parts[0]["instance"] == 0
    for before, part in zip(parts, parts[1:]):
        assert part["instance"] in (0, before["instance"] + 1)
    for label in {r["label"] for r in whole_recs}:
        whole_of = [r for r in whole_recs if r["label"] == label]
        parts_of = [p for p in parts if p["label"] == label]
        assert sum(p["instance"] == 0 for p in parts_of) == len(whole_of)
        assert sum(p["area"] for p in parts_of) == sum(r["area"] for r in whole_of)


def test_select_by_points(client, upload):
    g = Graph()
    image = g.node("LoadImage", image=upload(64, 48, seed=25))[0]
    _, refined = chain(g, image, n_clusters=3)
    plain = g.node("FreeSegSelectMask", segments=refined[0], labels="", points="0,0")
    as_json = g.node("FreeSegSelectMask", segments=refined[0], labels="", points='[{"x": 0, "y": 0}]')
    by_index = g.node("FreeSegSelectMask", segments=refined[0], labels="0")
    both = g.node("FreeSegSelectMask", segments=refined[0], labels="1", points="0.5,0.5; 63,47")
    probes = [g.probe(n[0]) for n in (plain, as_json, by_index, both)] + [g.probe(plain[1]), g.probe(both[1])]
    result = client.run(g.prompt)
    p, j, i, b, picked, picked_both = (probed(result, x) for x in probes)
    assert p["shape"] == [1, 48, 64] and p["max"] == 1.0
    assert p["sum"] == j["sum"] == i["sum"]  # pixel (0,0) lies in mask 0 (canonical order)
    assert picked["value"].startswith("0:")
    indices = {int(part.split(":")[0]) for part in picked_both["value"].split(", ")}
    assert {0, 1} <= indices and b["sum"] >= p["sum"]


def test_fine_detail_runs_at_the_image_size(client, upload):
    g = Graph()
    image = g.node("LoadImage", image=upload(70, 50, seed=26))[0]
    clusters, refined = chain(g, image, resolution=128, n_clusters=3, detail="fine")
    cmap, masks = g.probe(clusters[1]), g.probe(refined[1])
    result = client.run(g.prompt)
    assert probed(result, cmap)["shape"] == [1, 50, 70] and probed(result, cmap)["distinct"] == 3
    assert probed(result, masks)["shape"][1:] == [50, 70]


@pytest.mark.parametrize("node, inputs, message", [
    ("FreeSegClusterMasks", {"k_from": "bogus"}, "k_from"),
    ("FreeSegDiffusionFeatures", {"detail": "bogus"}, "detail"),
    ("FreeSegClusterMasks", {"class_offset": 99}, "class_offset"),
    ("FreeSegRefineMasks", {"min_area": 0.9}, "min_area"),
    ("FreeSegSelectMask", {"points": "10,10 nonsense"}, "points"),
    ("FreeSegSelectMask", {"points": "500,5"}, "outside"),
])
def test_bad_beyond_inputs_are_refused(client, upload, node, inputs, message):
    g = Graph()
    image = g.node("LoadImage", image=upload(40, 30, seed=27))[0]
    cluster = inputs if node == "FreeSegClusterMasks" else None
    detail = inputs.get("detail", "paper")
    refine = inputs if node == "FreeSegRefineMasks" else None
    _, refined = chain(g, image, n_clusters=2, cluster=cluster, refine=refine, detail=detail)
    select = {"labels": "", "points": "1,1", **(inputs if node == "FreeSegSelectMask" else {})}
    g.probe(g.node("FreeSegSelectMask", segments=refined[0], **select)[0])
    with pytest.raises(ComfyError) as err:
        client.run(g.prompt)
    assert node in str(err.value) and message in str(err.value)


def test_video_workflow_runs_with_one_labelling(client, tmp_path):
    import workflow_tools as wt

    with open(f"{wt.API_DIR}/freeseg_video.json") as f:
        prompt = wt.adapt_api(json.load(f), {})
    name = client.upload_image(wt.write_clip(str(tmp_path / "freeseg_clip.mp4")))
    (video_id,) = wt.load_video_ids(prompt)
    prompt[video_id]["inputs"]["file"] = name
    result = client.run(prompt)
    by_title = {n["_meta"]["title"]: k for k, n in prompt.items()}
    (records_text,) = result["outputs"][by_title["Segments (JSON, image = frame)"]]["text"]
    records = json.loads(records_text)
    assert records and {r["image"] for r in records} <= set(range(4))
    names_by_mask = {}
    for r in records:  # one labelling: a mask index has one name in every frame
        assert names_by_mask.setdefault(r["mask"], r["label"]) == r["label"], records
    saved = result["outputs"][by_title["Save the selected segment, frame by frame"]]["images"]
    assert len(saved) == 4
    assert result["outputs"][by_title["Save preview video"]]
