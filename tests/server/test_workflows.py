"""The example workflows in workflows/ (UI format) and workflows/api/ (API format).

* On the pinned ComfyUI (workflow_tools.PINNED_COMFYUI) they are exactly what
  scripts/make_workflows.py generates from the live server's /object_info (which this module
  saves into the run's pytest temporary folder, never into a file the script reads by default;
  a failure names that file for `--object-info`); the SAM 3 workflows (workflow_tools.SAM3_NAMES)
  likewise on a server with core SAM3_Detect (the 0.33.0 tree), and they are skipped on one
  without it.
* On any ComfyUI, every UI workflow agrees with /object_info: node types exist, slot names and
  types, link types, widget count, order and values (with the frontend's control_after_generate
  entries), and it converts to its API twin. What newer cores change is tolerated: outputs after
  the saved ones (never linked), new display names of untitled nodes (API titles), optional
  widgets added after the saved values, combos turned into dynamic combos (0.33's Create Video
  and Save Video; workflow_tools.validate_ui and prompt_differences with `pinned=False`).
* Every node of every API twin has its own title (clients find nodes by title).
* ComfyUI serves them as templates (/workflow_templates) with their .jpg thumbnails.
* Every API twin runs to completion on the random-weight fixtures (model names swapped for
  the fixtures, small uploaded images, 128 px features, 2 sampler steps), and its outputs are
  checked through /history and /view.
"""

import importlib.util
import io
import json
import os
import sys
import urllib.request

import numpy as np
import pytest
from PIL import Image

import workflow_tools as wt
from comfy_harness import PACK_NAME
from freeseg.app.paths import REPO

WIDTH, HEIGHT = 96, 64


def load(name: str) -> tuple[dict, dict]:
    with open(os.path.join(wt.WORKFLOW_DIR, f"{name}.json")) as f:
        ui = json.load(f)
    with open(os.path.join(wt.API_DIR, f"{name}.json")) as f:
        api = json.load(f)
    return ui, api


def get_bytes(client, path: str) -> bytes:
    with urllib.request.urlopen(client.url + path, timeout=30) as resp:
        return resp.read()


def make_workflows_module():
    spec = importlib.util.spec_from_file_location("make_workflows", os.path.join(REPO, "scripts", "make_workflows.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def assert_converts(ui: dict, object_info: dict, api: dict, pinned: bool) -> None:
    """The UI workflow converts to `api`; on another core, titles it does not set are not
    compared, nor inputs only one side has (workflow_tools.prompt_differences)."""
    converted = wt.ui_to_api(ui, object_info)
    if not pinned:
        converted, api = wt.without_default_titles(converted, ui), wt.without_default_titles(api, ui)
    assert wt.prompt_differences(converted, api, pinned) == []


@pytest.fixture(scope="module")
def object_info(client) -> dict:
    """The live server's /object_info."""
    return client.object_info()


def skip_without_sam3(name: str, object_info: dict, comfyui_version: str) -> None:
    """The SAM 3 workflows need core SAM3_Detect (ComfyUI 2026; the 0.33.0 tree has it)."""
    if name in wt.SAM3_NAMES and "SAM3_Detect" not in object_info:
        pytest.skip(f"{name} needs core SAM3_Detect, which ComfyUI {comfyui_version} does not have "
                    "(it is checked on the 0.33.0 tree)")


@pytest.mark.parametrize("names", ["pinned", "sam3"])
def test_files_are_what_make_workflows_generates(names, object_info, pinned, comfyui_version, tmp_path_factory):
    if names == "pinned" and not pinned:
        pytest.skip(f"the server is ComfyUI {comfyui_version}; the files are generated from "
                    f"{wt.PINNED_COMFYUI} (the other tests check their structure against this server)")
    if names == "sam3":
        skip_without_sam3(wt.SAM3_NAMES[0], object_info, comfyui_version)
    expected = wt.NAMES if names == "pinned" else wt.SAM3_NAMES
    wanted = make_workflows_module().files(object_info)
    assert sorted(wanted) == sorted([f"workflows/{n}.json" for n in expected] +
                                    [f"workflows/api/{n}.json" for n in expected])
    stale = []
    for rel, text in wanted.items():
        path = os.path.join(REPO, rel)
        if not os.path.isfile(path) or open(path).read() != text:
            stale.append(rel)
    if stale:
        saved = tmp_path_factory.mktemp("object-info") / f"object_info-{comfyui_version}.json"
        saved.write_text(json.dumps(object_info))
        pytest.fail(f"{stale} differ from what scripts/make_workflows.py generates from this server's "
                    f"/object_info: run `.venv/bin/python scripts/make_workflows.py --object-info {saved}`")


def test_templates_are_listed_and_served_with_thumbnails(client):
    listed = client.get_json("/workflow_templates")
    assert sorted(listed.get(PACK_NAME, [])) == sorted(wt.ALL_NAMES), listed
    for name in wt.ALL_NAMES:
        ui, _ = load(name)
        served = json.loads(get_bytes(client, f"/api/workflow_templates/{PACK_NAME}/{name}.json"))
        assert served == ui
        # The template browser shows <name>.jpg for custom node templates.
        thumb = Image.open(io.BytesIO(get_bytes(client, f"/api/workflow_templates/{PACK_NAME}/{name}.jpg")))
        assert thumb.format == "JPEG" and min(thumb.size) >= 128


@pytest.mark.parametrize("name", wt.ALL_NAMES)
def test_ui_workflow_agrees_with_object_info_and_converts_to_api_twin(name, object_info, pinned, comfyui_version):
    skip_without_sam3(name, object_info, comfyui_version)
    ui, api = load(name)
    assert wt.validate_ui(ui, object_info, check_files=False, pinned=pinned) == []
    assert_converts(ui, object_info, api, pinned)
    titles = [n["_meta"]["title"] for n in api.values()]
    assert len(titles) == len(set(titles)), sorted(t for t in titles if titles.count(t) > 1)
    # The published workflows name the user's usual model files, not the test fixtures.
    names = {n["inputs"].get(i) for n in api.values() for (ct, i) in wt.TEST_MODELS if n["class_type"] == ct}
    assert not names & set(wt.TEST_MODELS.values())


# -- running the API twins ------------------------------------------------------------------------


def uploaded_images(client, upload, api: dict) -> dict:
    """{LoadImage node id: name of a freshly uploaded WIDTHxHEIGHT test picture}."""
    return {node_id: upload(WIDTH, HEIGHT, seed=10 + i) for i, node_id in enumerate(wt.load_image_ids(api))}


def preparer(client, upload, pinned):
    def _prepare(name: str) -> tuple[dict, dict]:
        """The API twin adapted to the fixtures; also checks the adapted UI file converts to it."""
        ui, api = load(name)
        images = uploaded_images(client, upload, api)
        prompt = wt.adapt_api(api, images)
        info = client.object_info()  # again: it now lists the uploads and the fixtures as choices
        adapted_ui = wt.adapt_ui(ui, info, images)
        assert wt.validate_ui(adapted_ui, info, pinned=pinned) == []
        assert_converts(adapted_ui, info, prompt, pinned)
        return prompt, images

    return _prepare


@pytest.fixture
def prepare(client, upload, pinned):
    return preparer(client, upload, pinned)


@pytest.fixture
def prepare_models(models_client, models_upload, pinned):
    """`prepare` on the second server, which has the DiT fixtures."""
    return preparer(models_client, models_upload, pinned)


def node_id(prompt: dict, class_type: str, title: str | None = None) -> str:
    (found,) = [k for k, n in prompt.items() if n["class_type"] == class_type
                and (title is None or n["_meta"]["title"] == title)]
    return found


def text(result: dict, prompt: dict, title: str) -> str:
    (value,) = result["outputs"][node_id(prompt, "PreviewAny", title)]["text"]
    return value


def images(client, result: dict, prompt: dict, title: str, class_type: str = "SaveImage") -> list[Image.Image]:
    files = result["outputs"][node_id(prompt, class_type, title)]["images"]
    assert all(f["type"] == ("output" if class_type == "SaveImage" else "temp") for f in files)
    return [Image.open(io.BytesIO(client.view(f))) for f in files]


def input_pixels(client, images_by_node: dict, node: str) -> np.ndarray:
    data = client.view({"filename": images_by_node[node], "subfolder": "", "type": "input"})
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)


def saved_segments(client, result: dict, prompt: dict, batch: int = 1) -> dict:
    """labels.json of the workflow's Save Segments node, checked against the PNGs it lists (all
    fetched through /view): an overlay per image, a mask per entry, all at the image size."""
    out = result["outputs"][node_id(prompt, "FreeSegSaveSegments")]
    (labels_file,) = out["files"]
    doc = json.loads(client.view(labels_file))
    assert len(doc["images"]) == batch
    listed = [f["filename"] for f in out["images"]]
    assert listed == [i["overlay"] for i in doc["images"]] + [m["file"] for m in doc["masks"]]
    for f in out["images"]:
        assert Image.open(io.BytesIO(client.view(f))).size == (WIDTH, HEIGHT)
    return doc


def check_named_masks(client, result, prompt, labels_title, masks_title, allowed, batch=1):
    """One saved mask per label line, each at the image size; labels from the class list; the
    JSON records and Save Segments' labels.json list the same labels, each with its image index."""
    labels = [l for l in text(result, prompt, labels_title).splitlines() if l]
    masks = images(client, result, prompt, masks_title)
    assert labels and len(masks) == len(labels)
    assert all(m.size == (WIDTH, HEIGHT) for m in masks)
    records = json.loads(text(result, prompt, next(n["_meta"]["title"] for n in prompt.values()
                                                   if n["_meta"]["title"].startswith("Segments (JSON"))))
    assert [r["label"] for r in records] == labels
    saved = saved_segments(client, result, prompt, batch)
    assert [{k: m[k] for k in r} for m, r in zip(saved["masks"], records)] == records
    assert len(saved["masks"]) == len(records)
    for r in records:
        assert 0 <= r["image"] < batch
        assert r["label"].lower() in allowed[r["image"]], (r, allowed)
    return labels, records


def names(line: str) -> set[str]:
    return {n.strip().lower() for n in line.split(",") if n.strip()}


def test_freeseg_full_runs(client, prepare):
    prompt, _ = prepare("freeseg_full")
    result = client.run(prompt)
    assert result["status"]["status_str"] == "success"
    class_names = names(text(result, prompt, "Class names (from the caption)"))
    assert names(wt.TEST_CLASS_NAMES) <= class_names
    (preview,) = images(client, result, prompt, "Save preview")
    assert preview.size == (WIDTH, HEIGHT) and preview.mode == "RGB"
    check_named_masks(client, result, prompt, "Labels (one per mask)", "Save masks", [class_names])


def test_freeseg_vocabulary_runs(client, prepare):
    prompt, _ = prepare("freeseg_vocabulary")
    assert "FreeSegCaption" not in {n["class_type"] for n in prompt.values()}
    typed = names(prompt[node_id(prompt, "FreeSegCLIPLabel")]["inputs"]["class_names"])
    result = client.run(prompt)
    (preview,) = images(client, result, prompt, "Save preview")
    assert preview.size == (WIDTH, HEIGHT)
    labels, records = check_named_masks(client, result, prompt, "Labels (one per mask)", "Save masks", [typed])
    # open rule: a typed name may name several masks (where it beats the background words)
    assert all(0.0 < r["score"] <= 1.0 for r in records)


def test_freeseg_batch_runs(client, prepare):
    prompt, _ = prepare("freeseg_batch")
    assert len(wt.load_image_ids(prompt)) == 3
    result = client.run(prompt)
    assert len(text(result, prompt, "Captions (one per image)").splitlines()) == 3
    previews = images(client, result, prompt, "Save previews")
    unions = images(client, result, prompt, "Save one mask per image")
    assert len(previews) == 3 and len(unions) == 3
    assert all(i.size == (WIDTH, HEIGHT) for i in previews + unions)
    allowed = [names(wt.TEST_CLASS_NAMES)] * 3  # the captions add no nouns with random weights
    _, records = check_named_masks(client, result, prompt, "Labels (one per mask)", "Save every named mask",
                                   allowed, batch=3)
    # open rule: each record names a mask of one of the three images, by a name that beat the
    # background words there (random weights: some images may have none)
    assert {r["image"] for r in records} <= {0, 1, 2} and all(0.0 < r["score"] <= 1.0 for r in records)


def test_freeseg_inpaint_runs_and_changes_only_the_masked_region(client, prepare):
    prompt, uploaded = prepare("freeseg_inpaint")
    # random weights: "dog" need not beat the background words; without them mask 0 is named
    prompt[node_id(prompt, "FreeSegCLIPLabel")]["inputs"]["background"] = ""
    prompt[node_id(prompt, "FreeSegSelectMask")]["inputs"]["labels"] = "0"
    ckpt = node_id(prompt, "CheckpointLoaderSimple")
    for class_type in ("KSampler", "InpaintModelConditioning", "VAEDecode", "FreeSegDiffusionFeatures"):
        node = prompt[node_id(prompt, class_type)]["inputs"]
        assert all(v[0] == ckpt for k, v in node.items() if k in ("model", "vae", "clip")), class_type
    result = client.run(prompt)
    labels = text(result, prompt, "Labels").splitlines()
    assert [m["label"] for m in saved_segments(client, result, prompt)["masks"]] == labels
    (out,) = images(client, result, prompt, "Save inpainted image")
    assert out.size == (WIDTH, HEIGHT)
    (mask,) = images(client, result, prompt, "Inpaint mask", "PreviewImage")
    assert mask.size == (WIDTH, HEIGHT)
    original = input_pixels(client, uploaded, node_id(prompt, "LoadImage"))
    outside = np.asarray(mask.convert("L")) == 0
    assert outside.any()
    diff = np.abs(np.asarray(out.convert("RGB")).astype(int) - original)
    assert diff[outside].max() <= 1  # untouched outside the (grown, feathered) mask


def test_freeseg_cutout_is_rgba_and_opaque_only_where_selected(client, prepare):
    prompt, uploaded = prepare("freeseg_cutout")
    # random weights: "dog" need not beat the background words; without them mask 0 is named
    prompt[node_id(prompt, "FreeSegCLIPLabel")]["inputs"]["background"] = ""
    prompt[node_id(prompt, "FreeSegSelectMask")]["inputs"]["labels"] = "0"
    result = client.run(prompt)
    labels = text(result, prompt, "Labels").splitlines()
    assert [m["label"] for m in saved_segments(client, result, prompt)["masks"]] == labels
    (cut,) = images(client, result, prompt, "Save cut-out (RGBA PNG)")
    (mask,) = images(client, result, prompt, "Save selected mask")
    assert cut.mode == "RGBA" and cut.size == (WIDTH, HEIGHT)
    alpha = np.asarray(cut)[..., 3].astype(int)
    selected = np.asarray(mask.convert("L")).astype(int)
    assert (selected > 0).any() and (selected == 0).any()
    assert np.abs(alpha - selected).max() <= 1
    original = input_pixels(client, uploaded, node_id(prompt, "LoadImage"))
    rgb = np.asarray(cut)[..., :3].astype(int)
    assert np.abs(rgb - original)[selected > 0].max() <= 1


def test_freeseg_generate_segments_what_it_generated_and_inpaints(client, prepare):
    prompt, _ = prepare("freeseg_generate")
    prompt[node_id(prompt, "EmptyLatentImage")]["inputs"].update(width=WIDTH, height=HEIGHT)
    for sampler in ("KSampler", "KSampler (inpaint)"):
        prompt[node_id(prompt, "KSampler", sampler)]["inputs"]["steps"] = 4
    # random weights: "dog" need not beat the background words; without them mask 0 is named
    prompt[node_id(prompt, "FreeSegCLIPLabel")]["inputs"]["background"] = ""
    prompt[node_id(prompt, "FreeSegSelectMask")]["inputs"]["labels"] = "0"
    result = client.run(prompt)
    labels = text(result, prompt, "Labels").splitlines()
    assert labels and [m["label"] for m in saved_segments(client, result, prompt)["masks"]] == labels
    (generated,) = images(client, result, prompt, "Save generated image")
    (out,) = images(client, result, prompt, "Save inpainted image")
    (mask,) = images(client, result, prompt, "Inpaint mask", "PreviewImage")
    assert generated.size == out.size == mask.size == (WIDTH, HEIGHT)
    outside = np.asarray(mask.convert("L")) == 0
    assert outside.any()
    diff = np.abs(np.asarray(out.convert("RGB")).astype(int) - np.asarray(generated.convert("RGB")).astype(int))
    assert diff[outside].max() <= 1  # untouched outside the (grown, feathered) mask


@pytest.mark.parametrize("name", wt.DIT_NAMES)
def test_dit_workflow_runs(name, models_client, prepare_models):
    """Flux (UNETLoader + DualCLIPLoader + VAELoader) and SD3.5 (one checkpoint) on the DiT
    fixtures; T5-XXL is stood in for by CLIP-L (workflow_tools.TEST_DIT_FILES)."""
    prompt, _ = prepare_models(name)
    result = models_client.run(prompt)
    assert result["status"]["status_str"] == "success"
    class_names = names(text(result, prompt, "Class names (from the caption)"))
    assert names(wt.TEST_CLASS_NAMES) <= class_names
    (preview,) = images(models_client, result, prompt, "Save preview")
    assert preview.size == (WIDTH, HEIGHT) and preview.mode == "RGB"
    check_named_masks(models_client, result, prompt, "Labels (one per mask)", "Save masks", [class_names])


def test_full_workflow_holds_the_library_defaults():
    """`freeseg segment`'s comfyui backend runs workflows/api/freeseg_full.json: every setting
    it holds is the library's default (what the diffusers backend runs), the refinement included
    (the node default crf_guard, not the paper's crf)."""
    from freeseg.app.settings_options import settings_in_workflow
    from freeseg.settings import DEFAULTS

    _, api = load("freeseg_full")
    held = settings_in_workflow(api)
    assert held["refine"] == DEFAULTS.refine == "crf_guard"
    differ = {name: value for name, value in held.items() if hasattr(DEFAULTS, name) and value not in
              (getattr(DEFAULTS, name), ", ".join(map(str, getattr(DEFAULTS, name) or ())) if name == "background"
               else getattr(DEFAULTS, name))}
    assert differ == {}
