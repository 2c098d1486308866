"""Loaders for the two models FreeSeg-Diff adds to a checkpoint: a BLIP or BLIP-2 captioner
(`models/blip/<folder>` or `models/blip2/<folder>`) and an open_clip CLIP
(`models/open_clip/<folder or file>`).

The captioner folders are one model kind, "blip2" (both default folders are registered under
it, and the loader reads the model type from each folder's config.json); with "open_clip" they
are registered with `folder_paths.add_model_folder_path`, so entries in
`extra_model_paths.yaml` (keys `blip2:` and `open_clip:`) are searched too. Nothing is
downloaded unless the `download` input is switched on."""

from __future__ import annotations

import os

import folder_paths
from comfy_api.latest import io

import comfy.model_management as mm

from ..freeseg.caption import load_captioner
from ..freeseg.clip_label import load_open_clip
from ..freeseg.model_files import is_model_entry, model_entries
from .common import CATEGORY, Captioner, ClipModel, make_patcher, model_dtype

NONE_FOUND = "(none found)"
WHAT_GOES_THERE = {
    "blip2": "a BLIP or BLIP-2 model folder as saved by transformers: config.json, the weights "
             "(model.safetensors or shards), and the processor/tokenizer files, e.g. the contents of "
             "Salesforce/blip-image-captioning-base (the paper's captioner) in "
             "models/blip/blip-image-captioning-base/, or of Salesforce/blip2-opt-2.7b in "
             "models/blip2/blip2-opt-2.7b/",
    "open_clip": "an open_clip model: a folder with open_clip_config.json and open_clip_model.safetensors "
                 "(e.g. timm/vit_base_patch32_clip_224.openai in models/open_clip/vit_base_patch32_clip_224.openai/), "
                 "or a weights file named after a built-in open_clip architecture (e.g. ViT-B-32.safetensors)",
}
DEFAULT_REPOS = {"blip2": "Salesforce/blip-image-captioning-base",
                 "open_clip": "timm/vit_base_patch32_clip_224.openai"}
# Default folders of each kind under models/ (the first one receives downloads).
DEFAULT_FOLDERS = {"blip2": ("blip", "blip2"), "open_clip": ("open_clip",)}


def register_folders() -> None:
    """Adds `models/blip` and `models/blip2` (captioners) and `models/open_clip` to ComfyUI's
    model folders."""
    for kind, folders in DEFAULT_FOLDERS.items():
        for folder in folders:
            folder_paths.add_model_folder_path(kind, os.path.join(folder_paths.models_dir, folder))


def search_paths(kind: str) -> list[str]:
    try:
        return list(folder_paths.get_folder_paths(kind))
    except KeyError:
        return [os.path.join(folder_paths.models_dir, kind)]


def list_models(kind: str) -> list[str]:
    """Names of the model folders (and, for open_clip, weight files) in every search path."""
    names = {n for root in search_paths(kind) for n in model_entries(kind, root)}
    return sorted(names) or [NONE_FOUND]


def resolve(kind: str, name: str) -> str:
    """The full path of entry `name`, or FileNotFoundError naming the folders searched."""
    for root in search_paths(kind):
        path = os.path.join(root, name)
        if name != NONE_FOUND and is_model_entry(kind, path):
            return path
    raise FileNotFoundError(f"model_name: no {kind} model {name!r} in {search_paths(kind)}. Put "
                            f"{WHAT_GOES_THERE[kind]}.")


def download(kind: str, repo_id: str) -> str:
    """Downloads `repo_id` from the Hugging Face hub into the first `kind` folder (opt-in)."""
    from huggingface_hub import snapshot_download

    target = os.path.join(search_paths(kind)[0], repo_id.split("/")[-1])
    if not is_model_entry(kind, target):
        snapshot_download(repo_id, local_dir=target)
    return target


def download_inputs(kind: str) -> list:
    return [
        io.Boolean.Input("download", default=False, tooltip="Off: load from your models folder only. On: "
                         "download `repo_id` from the Hugging Face hub first (if not already there)."),
        io.String.Input("repo_id", default=DEFAULT_REPOS[kind], tooltip="Hub repository used when download is on."),
    ]


def pick_path(kind: str, model_name: str, allow_download: bool, repo_id: str) -> str:
    return download(kind, repo_id.strip()) if allow_download and repo_id.strip() else resolve(kind, model_name)


class FreeSegBLIP2Loader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FreeSegBLIP2Loader",
            display_name="FreeSeg-Diff BLIP Loader",
            category=CATEGORY,
            description="Loads a captioner from models/blip or models/blip2: BLIP (the paper's, "
                        "Salesforce/blip-image-captioning-base) or BLIP-2, told apart by its config.json.",
            inputs=[io.Combo.Input("model_name", options=list_models("blip2"), tooltip="A model folder in "
                                   "models/blip or models/blip2 (holding config.json)."),
                    *download_inputs("blip2")],
            outputs=[Captioner.Output(display_name="blip2")],
        )

    @classmethod
    def execute(cls, model_name, download, repo_id) -> io.NodeOutput:
        path = pick_path("blip2", model_name, download, repo_id)
        dtype = model_dtype(mm.get_torch_device())
        model, processor = load_captioner(path, device=mm.unet_offload_device(), dtype=dtype)
        return io.NodeOutput({"patcher": make_patcher(model), "processor": processor, "path": path})


class FreeSegCLIPLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FreeSegCLIPLoader",
            display_name="FreeSeg-Diff CLIP Loader",
            category=CATEGORY,
            description="Loads an open_clip image-text model from models/open_clip (the paper uses "
                        "CLIP ViT-B/32).",
            inputs=[io.Combo.Input("model_name", options=list_models("open_clip"), tooltip="A folder with "
                                   "open_clip_config.json, or a weights file named after its architecture."),
                    *download_inputs("open_clip")],
            outputs=[ClipModel.Output(display_name="clip_model")],
        )

    @classmethod
    def execute(cls, model_name, download, repo_id) -> io.NodeOutput:
        path = pick_path("open_clip", model_name, download, repo_id)
        model, preprocess, tokenizer = load_open_clip(path, device=mm.unet_offload_device())
        return io.NodeOutput({"patcher": make_patcher(model), "preprocess": preprocess,
                              "tokenizer": tokenizer, "path": path})
