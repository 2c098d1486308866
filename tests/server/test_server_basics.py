"""The pack loads into a real ComfyUI server, and core SD1.5 graphs run on the random checkpoint."""

import io
import os
import random
import re

from PIL import Image

from comfy_harness import MODEL_LINKS, PACK_NAME

PACK_NODES = {
    "FreeSegBLIP2Loader", "FreeSegCLIPLoader", "FreeSegCaption", "FreeSegDiffusionFeatures",
    "FreeSegClusterMasks", "FreeSegCLIPLabel", "FreeSegRefineMasks", "FreeSegSelectMask",
    "FreeSegPipeline", "FreeSegSaveSegments", "FreeSegCaptureFeatures", "FreeSegCapturedFeatures", "FreeSegNameMasks",
}


def test_pack_imports_without_error(server):
    """ComfyUI's own start-up lines about our pack, found by the pack's full path in
    custom_nodes (never by a word that can be part of any path, such as the checkout's name):
    its import-time line without "(IMPORT FAILED)", and no other line naming it (ComfyUI names
    a pack only to report a failure: "Cannot import", "Skip", "Error while calling
    comfy_entrypoint", or a traceback frame inside it). Newer cores print each line with a
    coloured level tag ("\\x1b[32m[INFO]\\x1b[0m "): colour codes and the tag are dropped first."""
    log = server.log().split("got prompt")[0]  # start-up only: later tests provoke errors on purpose
    log = re.sub(r"\x1b\[[0-9;]*m", "", log)
    log = re.sub(r"^\[[A-Z]+\] ", "", log, flags=re.M)
    pack = os.path.join(server.base_dir, "custom_nodes", PACK_NAME)
    imported = re.compile(r"\s*[\d.]+ seconds: " + re.escape(pack))
    lines = [l for l in log.splitlines() if pack in l]
    failures = [l for l in lines if not imported.fullmatch(l)]
    assert not failures, "\n".join(failures)
    assert any(imported.fullmatch(l) for l in lines), f"no import-time line for {pack}:\n{log[-3000:]}"


def test_every_pack_node_is_listed(client):
    info = client.object_info()
    missing = PACK_NODES - set(info)
    assert not missing, f"not in /object_info: {sorted(missing)}"
    for name in PACK_NODES:
        node = info[name]
        assert node["category"].startswith("FreeSeg-Diff"), (name, node["category"])
        assert node["python_module"].startswith("custom_nodes.freeseg-diff"), node["python_module"]
        for section in ("required", "optional"):
            for inp, spec in node["input"].get(section, {}).items():
                opts = spec[1] if len(spec) > 1 else {}
                assert opts.get("tooltip"), f"{name}.{inp} has no tooltip"


def test_model_folders_are_registered(client):
    kinds = client.get_json("/models")
    assert "blip2" in kinds and "open_clip" in kinds
    assert MODEL_LINKS["sd15_ckpt"][1] in client.get_json("/models/checkpoints")


def sd15_img2img(image_name: str, seed: int) -> dict:
    ckpt = MODEL_LINKS["sd15_ckpt"][1]
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of a dog", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "LoadImage", "inputs": {"image": image_name}},
        "5": {"class_type": "VAEEncode", "inputs": {"pixels": ["4", 0], "vae": ["1", 2]}},
        "6": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["5", 0],
            "seed": seed, "steps": 1, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal",
            "denoise": 0.6}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "sd15_smoke"}},
    }


def test_sd15_img2img_runs_on_random_checkpoint(client, upload):
    name = upload(96, 64)
    progress = []
    result = client.run(sd15_img2img(name, random.randrange(2**31)),
                        on_event=lambda kind, data: progress.append(data["value"]) if kind == "progress" else None)
    assert result["status"]["status_str"] == "success"
    (saved,) = result["outputs"]["8"]["images"]
    img = Image.open(io.BytesIO(client.view(saved)))
    assert img.size == (96, 64)
    assert progress and progress[-1] == 1
