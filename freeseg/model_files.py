"""What counts as a model in the `blip2/` and `open_clip/` model folders (no ComfyUI imports):
shared by the ComfyUI loaders and the command line."""

from __future__ import annotations

import os

OPEN_CLIP_EXTENSIONS = (".safetensors", ".pt", ".pth", ".bin")
# The file that marks a model folder, per kind.
FOLDER_MARKERS = {"blip2": "config.json", "open_clip": "open_clip_config.json"}


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
    return sorted(n for n in os.listdir(root) if is_model_entry(kind, os.path.join(root, n)))
