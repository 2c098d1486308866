"""Bad and edge inputs through a real ComfyUI server, as an unfriendly API client sends them.

Every case asserts a clear error (``node_errors`` from ``/prompt`` naming the node and input,
or an execution error naming the input) or a correct empty result, and that the server still
answers afterwards. The server of this module is set up like a shared one: started without
``FREESEG_ENABLE_DOWNLOADS`` (so downloads are off), its model folders hold, besides the
fixtures, truncated weights and folders that ask for remote code (hand-copied and
downloaded-style, tests/helpers/remote_code_models.py), whose code must never run. A bounded
soak at the end checks that the server's memory stays flat over many prompts."""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from unittest import mock

import numpy as np
import pytest
from PIL import Image

import remote_code_models as evil
from comfy_harness import MODEL_LINKS, ComfyServer, Graph, link, probed
from freeseg.app.paths import REPO
from synthetic.scenes import write_test_image
from freeseg.app.client import ComfyError

CKPT = MODEL_LINKS["sd15_ckpt"][1]
CLIP = MODEL_LINKS["open_clip_dir"][1]
BLIP = MODEL_LINKS["blip2_dir"][1]


# Folders asking for remote code in the hostile server's models/, with the words their refusal
# names (the file, and the key): (kind, folder, fixture, attacks, downloaded from, words).
EVIL_MODELS = [
    ("FreeSegCLIPLoader", "evil-clip", "open_clip_dir", evil.ATTACKS, None, [evil.MODULE, "code file"]),
    ("FreeSegCLIPLoader", "evil-clip-downloaded", "open_clip_dir", ("auto_map", "kwargs"), "owner/evil-clip-downloaded",
     ["open_clip_config.json", "model_cfg.text_cfg.tokenizer_kwargs.trust_remote_code"]),
    ("FreeSegBLIP2Loader", "evil-blip", "blip_dir", ("code", "auto_map"), None, [evil.MODULE, "code file"]),
    ("FreeSegBLIP2Loader", "evil-blip-downloaded", "blip_dir", ("auto_map",), "owner/evil-blip-downloaded",
     ["tokenizer_config.json", "auto_map"]),
]


@pytest.fixture(scope="module")
def hostile(model_files, tmp_path_factory):
    """A server with downloads off (as every server is without FREESEG_ENABLE_DOWNLOADS), broken
    models and folders asking for remote code beside the fixtures; yields it. Afterwards the
    sentinel the malicious modules would write must not exist."""
    base = str(tmp_path_factory.mktemp("comfy-hostile"))
    sentinel = os.path.join(base, "SENTINEL")
    for key, (folder, name) in MODEL_LINKS.items():
        link(model_files[key], os.path.join(base, "models", folder, name))
    link(os.path.join(REPO, "tests", "helpers", "probe_pack"), os.path.join(base, "custom_nodes", "freeseg_test_probe"))
    clip_dir, blip_dir = (os.path.join(base, "models", kind) for kind in ("open_clip", "blip2"))
    # a folder whose weights are cut short, the same as a single file named after its architecture,
    # and a BLIP-2 folder with a cut-short model.safetensors
    shutil.copytree(model_files["open_clip_dir"], os.path.join(clip_dir, "truncated-clip"))
    truncate(os.path.join(clip_dir, "truncated-clip", "open_clip_model.safetensors"))
    shutil.copy(os.path.join(model_files["open_clip_dir"], "open_clip_model.safetensors"),
                os.path.join(clip_dir, "ViT-B-32.safetensors"))
    truncate(os.path.join(clip_dir, "ViT-B-32.safetensors"))
    shutil.copytree(model_files["blip2_dir"], os.path.join(blip_dir, "truncated-blip2"))
    truncate(os.path.join(blip_dir, "truncated-blip2", "model.safetensors"))
    for class_type, name, fixture, attacks, repo_id, _ in EVIL_MODELS:
        evil.build(model_files[fixture], os.path.join(clip_dir if "CLIP" in class_type else blip_dir, name), sentinel,
                   attacks, downloaded_from=repo_id)
    with mock.patch.dict(os.environ):
        os.environ.pop("FREESEG_ENABLE_DOWNLOADS", None)
        srv = ComfyServer(base).start()
    yield srv
    srv.stop()
    assert not os.path.exists(sentinel), "code from a model folder ran in the server"


def truncate(path: str) -> None:
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


@pytest.fixture(scope="module")
def client(hostile):
    return hostile.client


@pytest.fixture(autouse=True)
def server_answers_afterwards(client):
    """After every case the server still answers and has nothing stuck in its queue."""
    yield
    assert client.is_up()
    deadline = time.monotonic() + 30
    while client.get_json("/queue")["queue_running"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert client.get_json("/queue")["queue_running"] == []


@pytest.fixture(scope="module")
def upload(client, tmp_path_factory):
    folder = tmp_path_factory.mktemp("hostile-images")

    def _upload(width: int, height: int, seed: int = 0, mode: str = "RGB") -> str:
        return client.upload_image(write_test_image(str(folder / f"img_{width}x{height}_{seed}_{mode}.png"),
                                                    width, height, seed, mode))

    return _upload


def refused(client, prompt: dict, node_id: str, *words: str) -> str:
    """Queue `prompt`; it must be refused with node_errors for `node_id` whose text holds `words`."""
    with pytest.raises(ComfyError) as err:
        client.queue(prompt)
    node_errors = err.value.details.get("node_errors") or {}
    assert node_id in node_errors, (node_id, err.value.details)
    text = json.dumps(node_errors[node_id])
    for word in words:
        assert word in text, (word, node_errors[node_id])
    return text


def failed(client, prompt: dict, *words: str) -> str:
    """Run `prompt`; it must fail at run time with an error whose message holds `words`."""
    with pytest.raises(ComfyError) as err:
        client.run(prompt)
    message = str(err.value)
    for word in words:
        assert word in message, (word, message)
    return message


def loader(g: Graph, kind: str = "FreeSegCLIPLoader", model_name: str = CLIP, download: bool = False,
           repo_id: str = ""):
    node = g.node(kind, model_name=model_name, download=download, repo_id=repo_id)
    g.probe(node[0])
    return node


def chain(g: Graph, image, n_clusters: int = 2, class_names: str = "dog, cat", method: str = "none",
          resolution: int = 128, **label_inputs):
    """Checkpoint -> features (zero conditioning) -> clusters -> CLIP label -> refine on `image`.
    No background words (unless given): with random weights every mask then takes its best name."""
    ckpt = g.node("CheckpointLoaderSimple", ckpt_name=CKPT)
    clip_model = g.node("FreeSegCLIPLoader", model_name=CLIP, download=False, repo_id="")
    feats = g.node("FreeSegDiffusionFeatures", model=ckpt[0], vae=ckpt[2], image=image, timestep=0,
                   resolution=resolution, source="cross_attn_queries", seed=random.randrange(2**31))
    clusters = g.node("FreeSegClusterMasks", features=feats[0], n_clusters=n_clusters, method="kmeans", seed=0)
    inputs = {"crop_mode": "masked", "prompt": "bare", "threshold": 0.0, "background": "", **label_inputs}
    labelled = g.node("FreeSegCLIPLabel", segments=clusters[0], image=image, clip_model=clip_model[0],
                      class_names=class_names, **inputs)
    refined = g.node("FreeSegRefineMasks", segments=labelled[0], image=image, method=method)
    return feats, clusters, labelled, refined


def probe_outputs(g: Graph, refined) -> dict:
    return {"masks": g.probe(refined[1]), "labels": g.probe(refined[2]), "union": g.probe(refined[3]),
            "segs": g.probe(refined[4]), "json": g.probe(refined[6])}


def read_outputs(result: dict, probes: dict) -> dict:
    out = {k: probed(result, p) for k, p in probes.items()}
    out["names"] = [l for l in out["labels"]["value"].splitlines() if l]
    out["records"] = json.loads(out["json"]["value"])
    return out


# -- model names: only what the folders list ------------------------------------------------------

@pytest.mark.parametrize("name", ["/etc/passwd", "../checkpoints/" + CKPT, "../../models/open_clip/" + CLIP,
                                  CLIP + "/open_clip_config.json", "", ".", "..", "no-such-model"])
def test_clip_loader_refuses_names_the_folder_does_not_list(client, name):
    g = Graph()
    node = loader(g, model_name=name)
    text = refused(client, g.prompt, node.id, "model_name", "open_clip", "open_clip_config.json")
    assert CLIP in text  # the error lists what the folders do hold


def test_blip2_loader_refuses_a_model_of_another_kind_by_traversal(client):
    g = Graph()
    node = loader(g, "FreeSegBLIP2Loader", model_name="../open_clip/" + CLIP)
    refused(client, g.prompt, node.id, "model_name", "blip2", "config.json")


def test_uploaded_file_is_never_opened_as_model(client, upload):
    name = upload(16, 16, seed=40)
    for candidate in (name, "../input/" + name, os.path.join("..", "..", "input", name)):
        g = Graph()
        node = loader(g, model_name=candidate)
        refused(client, g.prompt, node.id, "model_name")


def test_model_name_of_the_wrong_json_type_is_refused(client):
    g = Graph()
    loader(g, model_name=["no", "link"])  # a 2-list is read as a link to a missing node
    with pytest.raises(ComfyError):
        client.queue(g.prompt)
    g = Graph()
    node = loader(g, model_name=12)
    refused(client, g.prompt, node.id, "model_name")


@pytest.mark.parametrize("kind,name,file", [
    ("FreeSegCLIPLoader", "truncated-clip", "open_clip_model.safetensors"),
    ("FreeSegCLIPLoader", "ViT-B-32.safetensors", "ViT-B-32.safetensors"),
    ("FreeSegBLIP2Loader", "truncated-blip2", "model.safetensors"),
])
def test_truncated_weights_are_refused_naming_the_file(client, kind, name, file):
    g = Graph()
    node = loader(g, kind, model_name=name)
    refused(client, g.prompt, node.id, "model_name", file, "truncated", "Replace it with a complete copy")


# -- downloads ------------------------------------------------------------------------------------

@pytest.mark.parametrize("repo_id", ["../../etc", "/abs/path", "owner/name/extra", "owner/..", "a--b/c", "",
                                     "owner/name?x=1"])
def test_download_refuses_what_is_not_a_repository_id(client, repo_id):
    g = Graph()
    node = loader(g, model_name=CLIP, download=True, repo_id=repo_id)
    refused(client, g.prompt, node.id, "repo_id", "owner/name")


@pytest.mark.parametrize("kind", ["FreeSegBLIP2Loader", "FreeSegCLIPLoader"])
def test_download_is_refused_unless_the_operator_turned_downloads_on(client, kind):
    g = Graph()
    node = loader(g, kind, model_name=BLIP if kind == "FreeSegBLIP2Loader" else CLIP, download=True,
                  repo_id="Salesforce/blip2-opt-2.7b")
    refused(client, g.prompt, node.id, "download", "downloads are off on this server", "FREESEG_ENABLE_DOWNLOADS=1")


@pytest.mark.parametrize("value", ["false", "true", "False", "", 0, 1, None, {"__value__": False}])
@pytest.mark.parametrize("kind", ["FreeSegBLIP2Loader", "FreeSegCLIPLoader"])
def test_download_must_be_a_json_boolean(client, kind, value):
    """ComfyUI turns any value of a BOOLEAN input into a bool (the string "false" into True);
    the pack refuses what is not a JSON boolean before that."""
    g = Graph()
    node = loader(g, kind, model_name=BLIP if kind == "FreeSegBLIP2Loader" else CLIP, repo_id="owner/name")
    g.prompt[node.id]["inputs"]["download"] = value
    refused(client, g.prompt, node.id, "download", "must be true or false (a JSON boolean)",
            json.dumps(json.dumps(value))[1:-1])


@pytest.fixture(scope="module")
def downloads_on(model_files, tmp_path_factory):
    """A server whose operator turned downloads on (FREESEG_ENABLE_DOWNLOADS=1); the harness
    starts every server with HF_HUB_OFFLINE=1, so each download fails there."""
    base = str(tmp_path_factory.mktemp("comfy-downloads-on"))
    for key, (folder, name) in MODEL_LINKS.items():
        link(model_files[key], os.path.join(base, "models", folder, name))
    link(os.path.join(REPO, "tests", "helpers", "probe_pack"), os.path.join(base, "custom_nodes", "freeseg_test_probe"))
    with mock.patch.dict(os.environ, {"FREESEG_ENABLE_DOWNLOADS": "1"}):
        srv = ComfyServer(base).start()
    yield srv
    srv.stop()


def test_a_failed_download_names_its_cause_and_leaves_nothing(downloads_on):
    g = Graph()
    loader(g, download=True, repo_id="owner/some-clip")
    failed(downloads_on.client, g.prompt, "repo_id: owner/some-clip was not downloaded",
           "the hub is switched off on this server (HF_HUB_OFFLINE", "nothing was kept")
    assert os.listdir(os.path.join(downloads_on.base_dir, "models", "open_clip")) == [CLIP]


@pytest.mark.parametrize("class_type,name,fixture,attacks,repo_id,words", EVIL_MODELS,
                         ids=[m[1] for m in EVIL_MODELS])
def test_model_folders_asking_for_remote_code_are_refused(client, class_type, name, fixture, attacks, repo_id, words):
    g = Graph()
    node = loader(g, class_type, model_name=name)
    refused(client, g.prompt, node.id, "model_name", name, "never runs code from a model folder", *words)


# -- fixed choices and numbers, checked at queue time ---------------------------------------------

def test_unknown_choices_are_refused_at_queue_time(client, upload):
    image = None
    cases = [("FreeSegClusterMasks", "method", "spectral"), ("FreeSegDiffusionFeatures", "source", "attention"),
             ("FreeSegCLIPLabel", "crop_mode", "circle"), ("FreeSegCLIPLabel", "prompt", "poem"),
             ("FreeSegRefineMasks", "method", "sharpen")]
    name = upload(32, 32, seed=41)
    for class_type, input_name, value in cases:
        g = Graph()
        image = g.node("LoadImage", image=name)
        feats, clusters, labelled, refined = chain(g, image[0])
        node = {"FreeSegClusterMasks": clusters, "FreeSegDiffusionFeatures": feats, "FreeSegCLIPLabel": labelled,
                "FreeSegRefineMasks": refined}[class_type]
        g.prompt[node.id]["inputs"][input_name] = value
        g.probe(refined[2])
        refused(client, g.prompt, node.id, input_name, repr(value))


@pytest.mark.parametrize("threshold", [float("nan"), float("inf"), float("-inf"), 1.5, -0.1])
def test_threshold_must_be_a_finite_number_in_range(client, upload, threshold):
    g = Graph()
    image = g.node("LoadImage", image=upload(32, 32, seed=42))
    _, _, labelled, refined = chain(g, image[0], threshold=threshold)
    g.probe(refined[2])
    refused(client, g.prompt, labelled.id, "threshold")


@pytest.mark.parametrize("input_name,value", [("n_clusters", -1), ("n_clusters", 65), ("resolution", 100),
                                              ("timestep", 1000), ("seed", -1)])
def test_integers_out_of_range_are_refused(client, upload, input_name, value):
    g = Graph()
    image = g.node("LoadImage", image=upload(32, 32, seed=43))
    feats, clusters, _, refined = chain(g, image[0])
    node = clusters if input_name == "n_clusters" else feats
    g.prompt[node.id]["inputs"][input_name] = value
    g.probe(refined[2])
    refused(client, g.prompt, node.id, input_name)


def test_nan_integer_is_refused(client, upload):
    g = Graph()
    image = g.node("LoadImage", image=upload(32, 32, seed=44))
    _, clusters, _, refined = chain(g, image[0])
    g.prompt[clusters.id]["inputs"]["n_clusters"] = float("nan")
    g.probe(refined[2])
    refused(client, g.prompt, clusters.id, "n_clusters")


# -- graph shape ----------------------------------------------------------------------------------

def test_wrong_link_type_is_refused(client, upload):
    g = Graph()
    image = g.node("LoadImage", image=upload(32, 32, seed=45))
    select = g.node("FreeSegSelectMask", segments=image[0], labels="dog")
    g.probe(select[0])
    refused(client, g.prompt, select.id, "segments", "IMAGE", "FREESEG_SEGMENTS")


def test_missing_required_input_is_refused(client, upload):
    g = Graph()
    image = g.node("LoadImage", image=upload(32, 32, seed=46))
    _, _, labelled, refined = chain(g, image[0])
    del g.prompt[labelled.id]["inputs"]["clip_model"]
    g.probe(refined[2])
    refused(client, g.prompt, labelled.id, "clip_model", "required_input_missing")


def test_link_to_a_missing_output_slot_is_refused(client, upload):
    g = Graph()
    image = g.node("LoadImage", image=upload(32, 32, seed=47))
    _, _, labelled, refined = chain(g, image[0])
    g.prompt[labelled.id]["inputs"]["segments"] = [g.prompt[labelled.id]["inputs"]["segments"][0], 9]
    g.probe(refined[2])
    with pytest.raises(ComfyError):
        client.queue(g.prompt)


# -- images ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("width,height", [(1, 1), (3, 2)])
def test_tiny_image_gives_masks_of_its_size_and_no_empty_records(client, upload, width, height):
    g = Graph()
    image = g.node("LoadImage", image=upload(width, height, seed=48))
    _, _, _, refined = chain(g, image[0], n_clusters=4, method="crf")
    probes = probe_outputs(g, refined)
    out = read_outputs(client.run(g.prompt), probes)
    assert out["masks"]["shape"] == [max(len(out["names"]), 1), height, width]
    assert out["union"]["shape"] == [1, height, width]
    assert all(r["area"] >= 1 and r["bbox"] is not None for r in out["records"]), out["records"]
    assert len(out["names"]) <= width * height
    assert len(out["segs"]["segs"]) == len(out["records"])


def test_huge_image_keeps_its_size(client, tmp_path):
    path = write_test_image(str(tmp_path / "huge.png"), 2400, 1600, seed=49)
    name = client.upload_image(path)
    g = Graph()
    image = g.node("LoadImage", image=name)
    _, clusters, _, refined = chain(g, image[0], n_clusters=3, method="none")
    union, cmap = g.probe(refined[3]), g.probe(clusters[1])
    result = client.run(g.prompt)
    assert probed(result, union)["shape"] == [1, 1600, 2400]
    assert probed(result, cmap)["shape"] == [1, 1600, 2400]


def test_sixteen_bit_grey_png_runs(client, tmp_path):
    yy, xx = np.mgrid[0:40, 0:56]
    Image.fromarray(((xx * 1000 + yy * 300) % 65535).astype(np.uint16)).save(tmp_path / "grey16.png")
    name = client.upload_image(str(tmp_path / "grey16.png"))
    g = Graph()
    image = g.node("LoadImage", image=name)
    _, _, _, refined = chain(g, image[0])
    probes = probe_outputs(g, refined)
    out = read_outputs(client.run(g.prompt), probes)
    assert out["union"]["shape"] == [1, 40, 56]


def test_rgba_image_with_transparent_pixels_runs(client, upload):
    g = Graph()
    image = g.node("LoadImage", image=upload(48, 40, seed=50, mode="RGBA"))
    _, _, _, refined = chain(g, image[0])
    probes = probe_outputs(g, refined)
    out = read_outputs(client.run(g.prompt), probes)
    assert out["union"]["shape"] == [1, 40, 48]


@pytest.mark.parametrize("fill", ["nan", "inf"])
def test_nan_or_infinite_image_is_refused_naming_the_input(client, fill):
    g = Graph()
    image = g.node("FreeSegTestBadImage", fill=fill, width=40, height=32)
    feats, _, _, refined = chain(g, image[0])
    g.probe(refined[2])
    failed(client, g.prompt, "image", "NaN or infinite")


# -- class names ----------------------------------------------------------------------------------

def test_empty_name_list_names_nothing(client, upload):
    g = Graph()
    image = g.node("LoadImage", image=upload(40, 30, seed=51))
    _, _, _, refined = chain(g, image[0], class_names=" , ,  ,")
    probes = probe_outputs(g, refined)
    out = read_outputs(client.run(g.prompt), probes)
    assert out["names"] == [] and out["records"] == [] and out["segs"]["segs"] == []
    assert out["masks"]["shape"] == [1, 30, 40] and out["masks"]["max"] == 0.0


def test_huge_name_list(client, upload):
    names = [f"thing{i}" for i in range(1000)]
    g = Graph()
    image = g.node("LoadImage", image=upload(40, 30, seed=52))
    _, _, _, refined = chain(g, image[0], n_clusters=3, class_names=", ".join(names))
    probes = probe_outputs(g, refined)
    out = read_outputs(client.run(g.prompt), probes)
    assert 1 <= len(out["names"]) <= 3 and set(out["names"]) <= set(names)


def test_non_ascii_names_round_trip(client, upload):
    names = ["chien", "\u732b", "caf\u00e9", "\u0434\u0435\u0440\u0435\u0432\u043e"]
    g = Graph()
    image = g.node("LoadImage", image=upload(40, 30, seed=53))
    _, _, _, refined = chain(g, image[0], n_clusters=4, class_names=", ".join(names))
    select = g.probe(g.node("FreeSegSelectMask", segments=refined[0], labels="\u732b")[0])
    probes = probe_outputs(g, refined)
    result = client.run(g.prompt)
    out = read_outputs(result, probes)
    assert out["names"] and set(out["names"]) <= set(names)
    assert [r["label"] for r in out["records"]] == out["names"]
    assert probed(result, select)["shape"] == [1, 30, 40]


# -- clusters -------------------------------------------------------------------------------------

def test_k_at_its_maximum_on_the_smallest_grid(client, upload):
    g = Graph()
    image = g.node("LoadImage", image=upload(24, 20, seed=54))
    _, clusters, _, refined = chain(g, image[0], n_clusters=64, class_names="dog")
    cmap = g.probe(clusters[1])
    result = client.run(g.prompt)
    assert probed(result, cmap)["shape"] == [1, 20, 24]


# -- Select Mask ----------------------------------------------------------------------------------

def test_select_mask_edge_cases(client, upload):
    g = Graph()
    image = g.node("LoadImage", image=upload(36, 28, seed=56))
    _, clusters, _, refined = chain(g, image[0], n_clusters=2, class_names="dog")
    picks = {labels: g.probe(g.node("FreeSegSelectMask", segments=refined[0], labels=labels)[0])
             for labels in ("", " , ", "99", "-1", "giraffe", "DOG", "0")}
    unnamed = g.probe(g.node("FreeSegSelectMask", segments=clusters[0], labels="1")[0])
    result = client.run(g.prompt)
    got = {labels: probed(result, p) for labels, p in picks.items()}
    for m in (*got.values(), probed(result, unnamed)):
        assert m["shape"] == [1, 28, 36] and m["dtype"] == "float32"
    for labels in ("", " , ", "99", "-1", "giraffe"):
        assert got[labels]["max"] == 0.0, labels
    assert got["DOG"]["max"] == 1.0  # names match case-insensitively; no background words: "dog" names a mask
    assert got["0"]["max"] > 0.0 and probed(result, unnamed)["max"] > 0.0  # indices work before naming


# -- soak -----------------------------------------------------------------------------------------

def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc")
def test_soak_memory_stays_flat(hostile, client, upload):
    """50 small prompts (a new seed each, so every one runs the UNet pass and k-means again);
    the server's RSS from prompt 10 to prompt 50 may drift by at most 2%."""
    names = [upload(64, 48, seed=60 + i) for i in range(4)]
    rss = []
    for i in range(50):
        g = Graph()
        image = g.node("LoadImage", image=names[i % len(names)])
        ckpt = g.node("CheckpointLoaderSimple", ckpt_name=CKPT)
        feats = g.node("FreeSegDiffusionFeatures", model=ckpt[0], vae=ckpt[2], image=image[0],
                       timestep=i % 3 * 100, resolution=128, source="cross_attn_queries", seed=i)
        clusters = g.node("FreeSegClusterMasks", features=feats[0], n_clusters=2 + i % 3, method="kmeans", seed=i)
        g.probe(clusters[1])
        client.run(g.prompt)
        rss.append(rss_kib(hostile.proc.pid))
    drift = (rss[-1] - rss[9]) / rss[9]
    print(f"soak RSS: prompt 10 {rss[9] / 1024:.1f} MiB, prompt 50 {rss[-1] / 1024:.1f} MiB, "
          f"max {max(rss[9:]) / 1024:.1f} MiB, drift {100 * drift:+.2f}%")
    assert drift <= 0.02, rss
