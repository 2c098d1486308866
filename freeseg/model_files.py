"""What counts as a model in the `blip2/` and `open_clip/` model folders, and the rules for
picking, checking and downloading one (no ComfyUI imports): shared by the ComfyUI loaders and
the command line.

* A model is a direct entry of a model folder: a folder holding the kind's marker file, or
  (open_clip only) a weights file named after its architecture (`is_model_entry`).
* A name picks a model only when it is one of the names the folders list (`find_entry`):
  no absolute paths, no `..`, no sub-paths, nothing outside the folders.
* Weights are checked before loading (`check_weights`): every `.safetensors` file must be
  complete, and pickle-based files (`.bin`, `.pt`, `.pth`) need torch >= 2.6, whose
  weights-only loader is the first without a known way around it (CVE-2025-32434).
* Downloads (`download_entry`) go into `<folder>/<repo name>` with a marker file naming the
  repository, and never reuse a folder that holds anything else.
"""

from __future__ import annotations

import json
import os
import re
import struct
from typing import Callable, Optional, Sequence

OPEN_CLIP_EXTENSIONS = (".safetensors", ".pt", ".pth", ".bin")
PICKLE_EXTENSIONS = (".bin", ".pt", ".pth", ".ckpt")
# The file that marks a model folder, per kind.
FOLDER_MARKERS = {"blip2": "config.json", "open_clip": "open_clip_config.json"}
# What a user puts into each folder (quoted in every error about a missing or broken model).
WHAT_GOES_THERE = {
    "blip2": "a BLIP or BLIP-2 model folder as saved by transformers: config.json, the weights "
             "(model.safetensors or shards), and the processor/tokenizer files, e.g. the contents of "
             "Salesforce/blip-image-captioning-base (the paper's captioner) in "
             "models/blip/blip-image-captioning-base/, or of Salesforce/blip2-opt-2.7b in "
             "models/blip2/blip2-opt-2.7b/",
    "open_clip": "an open_clip model: a folder with open_clip_config.json and open_clip_model.safetensors "
                 "(e.g. timm/vit_base_patch32_clip_224.openai in models/open_clip/vit_base_patch32_clip_224.openai/), "
                 "or a weights file named after a built-in open_clip architecture (e.g. ViT-B-32-openai.safetensors)",
}
# The file a download writes into the folder it fills.
DOWNLOAD_MARKER = ".freeseg-download.json"
# Hugging Face hub repository ids: owner/name, letters, digits, "-", "_", ".", at most 96 each.
REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
# torch.load(weights_only=True) can be escaped before torch 2.6 (CVE-2025-32434).
SAFE_TORCH_LOAD = (2, 6)


def is_model_entry(kind: str, path: str) -> bool:
    """True when `path` is a `kind` ("blip2" or "open_clip") model: a folder holding the kind's
    marker file, or (open_clip only) a weights file named after its architecture."""
    if os.path.isdir(path):
        return os.path.isfile(os.path.join(path, FOLDER_MARKERS[kind]))
    return kind == "open_clip" and os.path.isfile(path) and path.lower().endswith(OPEN_CLIP_EXTENSIONS)


def model_entries(kind: str, root: str) -> list[str]:
    """Sorted names of the `kind` models directly inside folder `root` ([] if it is missing)."""
    if not os.path.isdir(root):
        return []
    return sorted(n for n in os.listdir(root) if not n.startswith(".") and is_model_entry(kind, os.path.join(root, n)))


def not_found_message(kind: str, name: str, roots: Sequence[str]) -> str:
    listed = sorted({n for root in roots for n in model_entries(kind, root)})
    have = f"they hold {', '.join(listed)}" if listed else "they hold no such model yet"
    return (f"model_name: {name!r} is not one of the {kind} models in the model folders {list(roots)} ({have}). "
            f"Put {WHAT_GOES_THERE[kind]}.")


def find_entry(kind: str, roots: Sequence[str], name: str) -> str:
    """The path of the `kind` model called `name` in the first of `roots` that lists it.

    `name` must be exactly one of the names `model_entries` lists (a direct entry of a root),
    so absolute paths, `..` and sub-paths never resolve. Models the operator linked into a
    folder are followed. Raises FileNotFoundError naming the folders and what belongs there."""
    plain = (isinstance(name, str) and name not in ("", ".", "..") and not name.startswith(".")
             and os.path.basename(name) == name and "/" not in name and "\\" not in name
             and not os.path.isabs(name))
    if plain:
        for root in roots:
            path = os.path.join(root, name)
            if os.path.normpath(os.path.dirname(path)) == os.path.normpath(root) and is_model_entry(kind, path):
                return path
    raise FileNotFoundError(not_found_message(kind, name if isinstance(name, str) else repr(name), roots))


def weight_files(path: str) -> list[str]:
    """The weight files of a model entry: the file itself, or the weights in the folder."""
    if os.path.isfile(path):
        return [path]
    return sorted(os.path.join(path, n) for n in os.listdir(path)
                  if n.lower().endswith((".safetensors", *PICKLE_EXTENSIONS)) and os.path.isfile(os.path.join(path, n)))


def safetensors_problem(path: str) -> Optional[str]:
    """Why `path` is not a complete safetensors file (None when it is): the header must parse
    and the file must be exactly as long as the header says."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"only {size} bytes"
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, 100 * 2**20):
                return f"header length {n} does not fit in {size} bytes"
            header = json.loads(f.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        return f"unreadable header ({exc})"
    if not isinstance(header, dict):
        return "the header is not a table of tensors"
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)
            and isinstance(v.get("data_offsets"), list) and len(v["data_offsets"]) == 2]
    expected = 8 + n + max(ends, default=0)
    if size != expected:
        return f"{size} bytes where the header describes {expected} (truncated or damaged)"
    return None


def torch_version() -> tuple[int, int]:
    import torch

    m = re.match(r"(\d+)\.(\d+)", torch.__version__)
    return (int(m[1]), int(m[2])) if m else (0, 0)


def check_weights(kind: str, path: str) -> None:
    """ValueError naming the file and what belongs there when model entry `path` has no weights,
    incomplete safetensors, or pickle-based files this torch cannot load weights-only safely."""
    files = weight_files(path)
    if not files:
        raise ValueError(f"model_name: {path} holds no weights file (.safetensors); put {WHAT_GOES_THERE[kind]}.")
    safe = [f for f in files if f.lower().endswith(".safetensors")]
    for file in safe:  # the loaders prefer safetensors, so pickle files beside them are never read
        problem = safetensors_problem(file)
        if problem:
            raise ValueError(f"model_name: cannot read {file}: {problem}. Replace it with a complete copy: "
                             f"{WHAT_GOES_THERE[kind]}.")
    for file in ([] if safe else files):
        if torch_version() < SAFE_TORCH_LOAD:
            raise ValueError(f"model_name: {file} is a pickle-based weights file, which torch "
                             f"{'.'.join(map(str, torch_version()))} cannot load safely (torch >= 2.6 needed); "
                             f"use its .safetensors version instead: {WHAT_GOES_THERE[kind]}.")


def load_error(kind: str, path: str, exc: BaseException) -> ValueError:
    """The error for a model that passed `check_weights` but still failed to load."""
    return ValueError(f"model_name: cannot load the {kind} model {path}: {type(exc).__name__}: {exc}. "
                      f"It should be {WHAT_GOES_THERE[kind]}.")


# -- downloads --------------------------------------------------------------------------------

def check_repo_id(repo_id: str) -> str:
    """`repo_id` stripped, or ValueError when it is not a hub repository id (owner/name)."""
    rid = repo_id.strip() if isinstance(repo_id, str) else ""
    if not REPO_ID.fullmatch(rid) or ".." in rid or "--" in rid or rid.endswith(".git"):
        raise ValueError(f"repo_id: {repo_id!r} is not a Hugging Face repository id (owner/name: letters, "
                         "digits, '-', '_', '.'), e.g. Salesforce/blip2-opt-2.7b")
    return rid


def download_target(root: str, repo_id: str) -> str:
    """The folder a download of `repo_id` fills: `<root>/<repo name>`."""
    return os.path.join(root, check_repo_id(repo_id).split("/")[1])


def read_marker(folder: str) -> Optional[dict]:
    try:
        with open(os.path.join(folder, DOWNLOAD_MARKER), encoding="utf-8") as f:
            marker = json.load(f)
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def check_download_target(kind: str, root: str, repo_id: str) -> str:
    """The folder `repo_id` downloads into, or ValueError when that folder exists and holds
    anything but an earlier download of the same repository."""
    target = download_target(root, repo_id)
    if os.path.lexists(target):
        marker = read_marker(target) if os.path.isdir(target) else None
        if marker is None or marker.get("repo_id") != check_repo_id(repo_id):
            held = f"a download of {marker.get('repo_id')!r}" if marker else "files that were not downloaded here"
            raise ValueError(f"repo_id: {target} already holds {held}, so {repo_id.strip()!r} is not downloaded "
                             "into it; pick that model under model_name with download off, or move it away")
    return target


def download_entry(kind: str, root: str, repo_id: str, fetch: Callable[..., object]) -> str:
    """Download `repo_id` into `<root>/<repo name>` with `fetch(repo_id, local_dir=...)` (e.g.
    huggingface_hub.snapshot_download), writing the marker first; a finished download of the
    same repository is reused without fetching. Returns the folder."""
    target = check_download_target(kind, root, repo_id)
    rid = check_repo_id(repo_id)
    marker = read_marker(target) if os.path.isdir(target) else None
    if marker and marker.get("complete") and is_model_entry(kind, target):
        return target
    os.makedirs(target, exist_ok=True)
    write_marker(target, rid, complete=False)
    fetch(rid, local_dir=target)
    if not is_model_entry(kind, target):
        raise ValueError(f"repo_id: {rid} downloaded into {target} is not one of the {kind} models: it should be "
                         f"{WHAT_GOES_THERE[kind]}")
    write_marker(target, rid, complete=True)
    return target


def write_marker(folder: str, repo_id: str, complete: bool) -> None:
    with open(os.path.join(folder, DOWNLOAD_MARKER), "w", encoding="utf-8") as f:
        json.dump({"repo_id": repo_id, "complete": complete}, f)
