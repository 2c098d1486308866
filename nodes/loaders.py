"""Loaders for the two models FreeSeg-Diff adds to a checkpoint: a BLIP or BLIP-2 captioner
(`models/blip/<folder>` or `models/blip2/<folder>`) and an open_clip CLIP
(`models/open_clip/<folder or file>`).

The captioner folders are one model kind, "blip2" (both default folders are registered under
it, and the loader reads the model type from each folder's config.json); with "open_clip" they
are registered with `folder_paths.add_model_folder_path`, so entries in
`extra_model_paths.yaml` (keys `blip2:` and `open_clip:`) are searched too. A model name is
accepted only when the folders list it (`freeseg.model_files.find_entry`), and its weights
are checked at queue time. Nothing is downloaded unless the `download` input is switched on,
and never when the operator set `FREESEG_DISABLE_DOWNLOADS=1`."""

from __future__ import annotations

import os

import folder_paths

import comfy.model_management as mm

from ..freeseg.caption import load_captioner
from ..freeseg.clip_label import load_open_clip
from ..freeseg.model_files import (check_download_target, check_repo_id, check_weights, download_entry,
                                   find_entry, load_error, model_entries)
from .common import CATEGORY, Captioner, ClipModel, io, make_patcher, model_dtype

NONE_FOUND = "(none found)"
DEFAULT_REPOS = {"blip2": "Salesforce/blip-image-captioning-base",
                 "open_clip": "timm/vit_base_patch32_clip_224.openai"}
# Default folders of each kind under models/ (the first one receives downloads).
DEFAULT_FOLDERS = {"blip2": ("blip", "blip2"), "open_clip": ("open_clip",)}
# Operator switch: any of these values turns the `download` input off for every client.
DISABLE_DOWNLOADS = "FREESEG_DISABLE_DOWNLOADS"


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
    """The full path of listed entry `name`, or FileNotFoundError naming the folders searched."""
    return find_entry(kind, search_paths(kind), name)


def downloads_disabled() -> bool:
    return os.environ.get(DISABLE_DOWNLOADS, "").strip().lower() not in ("", "0", "false", "no", "off")


def check_download(kind: str, repo_id: str) -> str:
    """The folder `repo_id` would download into; ValueError when downloads are off, the id is
    not a repository id, or the folder holds something else."""
    check_repo_id(repo_id)
    if downloads_disabled():
        raise ValueError(f"download: downloads are turned off on this server ({DISABLE_DOWNLOADS} is set); "
                         f"switch download off and pick a model the {kind} folders hold")
    return check_download_target(kind, search_paths(kind)[0], repo_id)


def download(kind: str, repo_id: str) -> str:
    """Downloads `repo_id` from the Hugging Face hub into the first `kind` folder (opt-in)."""
    from huggingface_hub import snapshot_download

    check_download(kind, repo_id)
    return download_entry(kind, search_paths(kind)[0], repo_id, snapshot_download)


def download_inputs(kind: str) -> list:
    return [
        io.Boolean.Input("download", default=False, tooltip="Off: load from your models folder only. On: "
                         "download `repo_id` from the Hugging Face hub first (if not already there), into "
                         f"models/{kind}/<repo name>. The server's operator can turn downloads off."),
        io.String.Input("repo_id", default=DEFAULT_REPOS[kind], tooltip="Hub repository (owner/name) used "
                        "when download is on."),
    ]


def pick_path(kind: str, model_name: str, allow_download: bool, repo_id: str) -> str:
    return download(kind, repo_id) if allow_download else resolve(kind, model_name)


def validate(kind: str, model_name, download, repo_id) -> bool | str:
    """Queue-time check of a loader's inputs (None: linked, known only at run time)."""
    try:
        if download:
            if repo_id is not None:
                check_download(kind, repo_id)
        elif model_name is not None and download is not None:
            check_weights(kind, resolve(kind, model_name))
    except (OSError, ValueError) as exc:
        return str(exc)
    return True


def load(kind: str, path: str, loader, *args, **kwargs):
    """`loader(path, ...)` after checking the weights; any failure names the model."""
    check_weights(kind, path)
    try:
        return loader(path, *args, **kwargs)
    except mm.InterruptProcessingException:
        raise
    except Exception as exc:
        raise load_error(kind, path, exc) from exc


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
    def validate_inputs(cls, model_name=None, download=None, repo_id=None) -> bool | str:
        return validate("blip2", model_name, download, repo_id)

    @classmethod
    def execute(cls, model_name, download, repo_id) -> io.NodeOutput:
        path = pick_path("blip2", model_name, download, repo_id)
        dtype = model_dtype(mm.get_torch_device())
        model, processor = load("blip2", path, load_captioner, device=mm.unet_offload_device(), dtype=dtype)
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
    def validate_inputs(cls, model_name=None, download=None, repo_id=None) -> bool | str:
        return validate("open_clip", model_name, download, repo_id)

    @classmethod
    def execute(cls, model_name, download, repo_id) -> io.NodeOutput:
        path = pick_path("open_clip", model_name, download, repo_id)
        model, preprocess, tokenizer = load("open_clip", path, load_open_clip, device=mm.unet_offload_device())
        return io.NodeOutput({"patcher": make_patcher(model), "preprocess": preprocess,
                              "tokenizer": tokenizer, "path": path})
