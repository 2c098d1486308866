"""Loaders for the two models FreeSeg-Diff adds to a checkpoint: a BLIP or BLIP-2 captioner
(`models/blip/<folder>` or `models/blip2/<folder>`) and an open_clip CLIP
(`models/open_clip/<folder or file>`).

The captioner folders are one model kind, "blip2" (both default folders are registered under
it, and the loader reads the model type from each folder's config.json); with "open_clip" they
are registered with `folder_paths.add_model_folder_path`, so entries in
`extra_model_paths.yaml` (keys `blip2:` and `open_clip:`) are searched too. A model name is
accepted only when the folders list it (`freeseg.model_files.find_entry`), and when the prompt
is queued its folder is checked for code (`check_no_code`: a folder asking for remote code is
refused, nothing from it ever runs) and its weights for completeness.

Downloads are off unless the server's operator started ComfyUI with
`FREESEG_ENABLE_DOWNLOADS=1` in its environment: without it a prompt with `download` on is
refused when it is queued. With it, `download` on fetches `repo_id` from the Hugging Face hub
(at most `FREESEG_DOWNLOAD_MAX_GB` gigabytes, default 20) into a hidden temporary folder, checks
it like any model folder and only then moves it into place (`freeseg.model_files.download_entry`).
`download` must be a JSON boolean: ComfyUI turns any other value (the string "false" too) into
a boolean, so `register_download_check` refuses such prompts before it does."""

from __future__ import annotations

import json
import os

import folder_paths

import comfy.model_management as mm

from ..freeseg.caption import load_captioner
from ..freeseg.clip_label import load_open_clip
from ..freeseg.model_files import (DEFAULT_DOWNLOAD_MAX_GB, check_download_target, check_no_code, check_repo_id,
                                   check_weights, download_entry, download_max_bytes, find_entry, load_error,
                                   model_entries)
from .common import CATEGORY, Captioner, ClipModel, io, make_patcher, model_dtype

NONE_FOUND = "(none found)"
DEFAULT_REPOS = {"blip2": "Salesforce/blip-image-captioning-base",
                 "open_clip": "timm/vit_base_patch32_clip_224.openai"}
# Default folders of each kind under models/ (the first one receives downloads).
DEFAULT_FOLDERS = {"blip2": ("blip", "blip2"), "open_clip": ("open_clip",)}
# Operator settings (the server's environment): downloads on (1, true, yes, on), and their size cap.
ENABLE_DOWNLOADS = "FREESEG_ENABLE_DOWNLOADS"
DOWNLOAD_MAX_GB = "FREESEG_DOWNLOAD_MAX_GB"
HOW_TO_ENABLE = (f"the server's operator turns them on by starting ComfyUI with {ENABLE_DOWNLOADS}=1 in its "
                 f"environment (and {DOWNLOAD_MAX_GB} to change the {DEFAULT_DOWNLOAD_MAX_GB:g} GB size cap)")
LOADER_IDS = ("FreeSegBLIP2Loader", "FreeSegCLIPLoader")


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


def downloads_enabled() -> bool:
    return os.environ.get(ENABLE_DOWNLOADS, "").strip().lower() in ("1", "true", "yes", "on")


def download_cap() -> int:
    """The operator's download size cap in bytes (`FREESEG_DOWNLOAD_MAX_GB`, default 20 GB)."""
    value = os.environ.get(DOWNLOAD_MAX_GB, "").strip() or DEFAULT_DOWNLOAD_MAX_GB
    try:
        return download_max_bytes(value)
    except ValueError as exc:
        raise ValueError(f"download: {DOWNLOAD_MAX_GB} in the server's environment is wrong: {exc}") from exc


def check_download(kind: str, repo_id: str) -> str:
    """The folder `repo_id` would download into; ValueError when the id is not a repository
    id, downloads are off (saying how the operator turns them on), the size cap setting is
    wrong, or the folder holds something else."""
    check_repo_id(repo_id)
    if not downloads_enabled():
        raise ValueError(f"download: downloads are off on this server; {HOW_TO_ENABLE}. Or switch download off "
                         f"and pick a model the {kind} folders hold")
    download_cap()
    return check_download_target(kind, search_paths(kind)[0], repo_id)


def download(kind: str, repo_id: str) -> str:
    """Downloads `repo_id` from the Hugging Face hub into the first `kind` folder (opt-in)."""
    check_download(kind, repo_id)
    return download_entry(kind, search_paths(kind)[0], repo_id, download_cap())


class NotABoolean(str):
    """A value that is not a JSON boolean, sent for a loader's `download`. ComfyUI converts
    BOOLEAN inputs with bool() when the prompt is queued; this one raises there, so ComfyUI
    refuses the prompt with a node error naming the input and saying why."""

    def __bool__(self) -> bool:
        raise ValueError(f"download must be true or false (a JSON boolean), not {self}")


def refuse_non_boolean_downloads(json_data):
    """ComfyUI's on_prompt hook: marks every loader `download` value that is neither a JSON
    boolean nor a link (a [node, output] list) as `NotABoolean`, before ComfyUI would turn it
    into a boolean (the string "false" into True)."""
    prompt = json_data.get("prompt") if isinstance(json_data, dict) else None
    for node in (prompt.values() if isinstance(prompt, dict) else ()):
        inputs = node.get("inputs") if isinstance(node, dict) and node.get("class_type") in LOADER_IDS else None
        if isinstance(inputs, dict) and "download" in inputs and not isinstance(inputs["download"], (bool, list)):
            inputs["download"] = NotABoolean(json.dumps(inputs["download"]))
    return json_data


def register_download_check() -> None:
    """Installs `refuse_non_boolean_downloads` on the running ComfyUI server."""
    from server import PromptServer

    PromptServer.instance.add_on_prompt_handler(refuse_non_boolean_downloads)


def download_inputs(kind: str) -> list:
    return [
        io.Boolean.Input("download", default=False, tooltip="Off: load from your models folder only. On: "
                         "download `repo_id` from the Hugging Face hub first (if not already there), into "
                         f"models/{DEFAULT_FOLDERS[kind][0]}/<repo name>. Downloads are off unless the server was started with "
                         f"{ENABLE_DOWNLOADS}=1 (size cap {DOWNLOAD_MAX_GB}, default {DEFAULT_DOWNLOAD_MAX_GB:g} GB); "
                         "a repository asking for remote code is refused."),
        io.String.Input("repo_id", default=DEFAULT_REPOS[kind], tooltip="Hub repository (owner/name) used "
                        "when download is on."),
    ]


def pick_path(kind: str, model_name: str, allow_download: bool, repo_id: str) -> str:
    if not isinstance(allow_download, bool):  # a linked value from some other node
        raise ValueError(f"download must be true or false, not {allow_download!r}")
    return download(kind, repo_id) if allow_download else resolve(kind, model_name)


def validate(kind: str, model_name, download, repo_id) -> bool | str:
    """Queue-time check of a loader's inputs (None: linked, known only at run time)."""
    if isinstance(download, NotABoolean):  # ComfyUI's own conversion of the value reports it
        return True
    try:
        if download:
            if repo_id is not None:
                check_download(kind, repo_id)
        elif model_name is not None and download is not None:
            path = resolve(kind, model_name)
            check_no_code(kind, path)
            check_weights(kind, path)
    except (OSError, ValueError) as exc:
        return str(exc)
    return True


def load(kind: str, path: str, loader, *args, **kwargs):
    """`loader(path, ...)` after checking the folder for code and the weights; any failure
    names the model."""
    check_no_code(kind, path)
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
