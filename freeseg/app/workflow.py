"""Workflow editing: load an API-format workflow, fill its inputs by node class type (never by
id), check and pick its model names against a server's /object_info, add the output nodes whose
results are collected, and read a finished run's text outputs; plus the command-line options
that fill a workflow (``--workflow``, ``--set``, model names, ...).

Nothing here talks to a server: ``client.py`` does (``remote.py`` runs a filled workflow)."""

from __future__ import annotations

import argparse
import copy
import json
from typing import Any, Optional

from .client import ComfyError, check_prompt, node_id_key
from .paths import DEFAULT_WORKFLOW

NONE_FOUND = "(none found)"  # the pack's loaders list this when their folder is empty

# Output slots of the nodes whose results we collect: FreeSegRefineMasks / FreeSegPipeline
# (masks, labels, preview, json; the pipeline also captions) and FreeSegCaption.
SEGMENTER_SLOTS = {
    "FreeSegRefineMasks": {"masks": 1, "labels": 2, "preview": 5, "json": 6},
    "FreeSegPipeline": {"masks": 1, "labels": 2, "preview": 5, "json": 6, "captions": 7},
}
CAPTION_SLOTS = {"FreeSegCaption": {"captions": 0, "class_names": 1}}
IMAGE_OUTPUT_NODES = ("SaveImage", "PreviewImage")

# --checkpoint / --blip2 / --clip: (option, class type, input, what it is, models/ subfolder, what goes there)
MODEL_CHOICES = {
    "checkpoint": ("--checkpoint", "CheckpointLoaderSimple", "ckpt_name", "checkpoint", "checkpoints",
                   "an SD1.5/SD2.x/SDXL checkpoint (.safetensors)"),
    "blip2": ("--blip2", "FreeSegBLIP2Loader", "model_name", "BLIP / BLIP-2 captioner", "blip",
              "a BLIP folder <name>/ (config.json, model.safetensors, processor and tokenizer files; the "
              "paper's: Salesforce/blip-image-captioning-base; a BLIP-2 folder goes in models/blip2/)"),
    "clip": ("--clip", "FreeSegCLIPLoader", "model_name", "open_clip model", "open_clip",
             "an open_clip folder <name>/ (open_clip_config.json, open_clip_model.safetensors, e.g. "
             "timm/vit_base_patch32_clip_224.openai)"),
}


def load_workflow(path: str) -> dict:
    """An API-format workflow from a JSON file (checked by `check_prompt`); ComfyError for a
    missing file, bad JSON, a UI-format workflow (which ComfyUI's /prompt does not take) or a
    malformed node."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as e:
        raise ComfyError(f"cannot read the workflow {path}: {e.strerror}") from None
    except ValueError as e:
        raise ComfyError(f"the workflow {path} is not valid JSON: {e}") from None
    if isinstance(data, dict) and "nodes" in data and "links" in data:
        raise ComfyError(f"{path} is a UI workflow: export it in API format (Workflow > Export (API)) "
                         "or use the file under workflows/api/")
    check_prompt(data, f"the workflow {path}")
    return data


def nodes_of(prompt: dict, *class_types: str) -> list[str]:
    """Ids of the nodes of the given class types, in id order."""
    return sorted((k for k, n in prompt.items() if n["class_type"] in class_types), key=node_id_key)


def is_link(value: Any) -> bool:
    """Whether an input value is a link ``[node id, output slot]`` (not a typed-in value)."""
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


def missing_node_types(prompt: dict, object_info: dict) -> list[str]:
    """The class types `prompt` uses that the server's /object_info does not declare (sorted)."""
    return sorted({n["class_type"] for n in prompt.values()} - set(object_info))


def missing_nodes_message(missing: list[str], url: str) -> str:
    """One line naming the node types a server lacks and what to install."""
    what = ", ".join(missing)
    if any(m.startswith("FreeSeg") for m in missing):
        fix = ("install the freeseg-diff node pack there (clone it into ComfyUI/custom_nodes/, pip install "
               "-r freeseg-diff/requirements.txt) and restart ComfyUI")
    else:
        fix = "install the node pack(s) that provide them and restart ComfyUI"
    return f"the ComfyUI server at {url} has no node type(s) {what}: {fix}"


def combo_options(object_info: dict, class_type: str, input_name: str) -> Optional[list]:
    """The choices the server lists for a combo input (None when it is not a combo)."""
    node = object_info.get(class_type) or {}
    for section in ("required", "optional"):
        spec = (node.get("input") or {}).get(section, {}).get(input_name)
        if spec is None:
            continue
        if isinstance(spec[0], list):
            return list(spec[0])
        if len(spec) > 1 and isinstance(spec[1], dict) and "options" in spec[1]:
            return list(spec[1]["options"])
    return None


def parse_override(text: str) -> tuple[str, str, Any]:
    """``Class.input=value`` -> (class, input, value); the value is JSON when it parses as JSON
    (numbers, true/false, quoted strings), else the text itself."""
    key, sep, raw = text.partition("=")
    class_type, dot, input_name = key.strip().partition(".")
    if not sep or not dot or not class_type or not input_name:
        raise ComfyError(f"--set {text!r}: expected CLASS.INPUT=VALUE, e.g. FreeSegDiffusionFeatures.resolution=256")
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw
    return class_type, input_name.strip(), value


def set_input(prompt: dict, class_type: str, input_name: str, value: Any, required: bool = True,
              literal_only: bool = False) -> int:
    """Set `input_name` on every `class_type` node (that has it as a value, not a link, when
    `literal_only`); returns how many were set. ComfyError when `required` and none was."""
    count = 0
    for node_id in nodes_of(prompt, class_type):
        inputs = prompt[node_id]["inputs"]
        if literal_only and (input_name not in inputs or is_link(inputs[input_name])):
            continue
        inputs[input_name] = value
        count += 1
    if required and not count:
        raise ComfyError(f"the workflow has no {class_type} node with an input {input_name!r} to set")
    return count


def fill_workflow(prompt: dict, image: Optional[str] = None, class_names: Optional[str] = None,
                  n_clusters: Optional[int] = None, seed: Optional[int] = None,
                  checkpoint: Optional[str] = None, blip2: Optional[str] = None, clip: Optional[str] = None,
                  overrides: Optional[list] = None) -> dict:
    """A copy of the API workflow with its inputs filled by node class type (never by id).

    image: LoadImage.image. class_names: FreeSegCaption / FreeSegPipeline.class_names (and
    FreeSegCLIPLabel's when it is typed in, not linked). n_clusters: FreeSegClusterMasks /
    FreeSegPipeline. seed: the same nodes plus FreeSegDiffusionFeatures (its noise).
    checkpoint / blip2 / clip: the loaders' file names. overrides: (class, input, value) triples.
    """
    out = copy.deepcopy(prompt)
    if image is not None:
        set_input(out, "LoadImage", "image", image)
    if class_names is not None:
        n = set_input(out, "FreeSegCaption", "class_names", class_names, required=False)
        n += set_input(out, "FreeSegPipeline", "class_names", class_names, required=False)
        n += set_input(out, "FreeSegCLIPLabel", "class_names", class_names, required=False, literal_only=True)
        if not n:
            raise ComfyError("the workflow has no FreeSegCaption, FreeSegPipeline or FreeSegCLIPLabel node "
                             "taking class names")
    if n_clusters is not None:
        if not (set_input(out, "FreeSegClusterMasks", "n_clusters", n_clusters, required=False)
                + set_input(out, "FreeSegPipeline", "n_clusters", n_clusters, required=False)):
            raise ComfyError("the workflow has no FreeSegClusterMasks or FreeSegPipeline node for the cluster count")
    if seed is not None:
        if not (set_input(out, "FreeSegClusterMasks", "seed", seed, required=False)
                + set_input(out, "FreeSegPipeline", "seed", seed, required=False)):
            raise ComfyError("the workflow has no FreeSegClusterMasks or FreeSegPipeline node for the seed")
        set_input(out, "FreeSegDiffusionFeatures", "seed", seed, required=False)
    for role, value in (("checkpoint", checkpoint), ("blip2", blip2), ("clip", clip)):
        if value is not None:
            _, class_type, input_name = MODEL_CHOICES[role][:3]
            set_input(out, class_type, input_name, value)
    for class_type, input_name, value in overrides or []:
        set_input(out, class_type, input_name, value)
    return out


def drop_nodes(prompt: dict, class_type: str) -> dict:
    """A copy without the `class_type` nodes and without the inputs linked to them (use it for
    optional inputs only, e.g. FreeSegCaption's `blip2`)."""
    out = {k: copy.deepcopy(n) for k, n in prompt.items() if n["class_type"] != class_type}
    gone = set(prompt) - set(out)
    for node in out.values():
        node["inputs"] = {k: v for k, v in node["inputs"].items() if not (is_link(v) and v[0] in gone)}
    return out


def drop_captioner(prompt: dict) -> dict:
    """A copy without the FreeSegBLIP2Loader nodes: each FreeSegCaption node left with no
    captioner takes an empty `captions` text (a core PrimitiveString), so its class names are
    the typed ones alone (the Caption node refuses a prompt that connects neither)."""
    out = drop_nodes(prompt, "FreeSegBLIP2Loader")
    next_id = max([int(k) for k in out if k.isdigit()] + [0]) + 1
    for node_id in nodes_of(out, "FreeSegCaption"):
        if "captions" not in out[node_id]["inputs"]:
            out[str(next_id)] = {"class_type": "PrimitiveString", "inputs": {"value": ""},
                                 "_meta": {"title": "No caption (class names alone)"}}
            out[node_id]["inputs"]["captions"] = [str(next_id), 0]
            next_id += 1
    return out


def typed_class_names(prompt: dict) -> str:
    """The class names typed into the workflow's caption / pipeline / label nodes (joined)."""
    names = []
    for node_id in nodes_of(prompt, "FreeSegCaption", "FreeSegPipeline", "FreeSegCLIPLabel"):
        value = prompt[node_id]["inputs"].get("class_names")
        if isinstance(value, str) and value.strip():
            names.append(value.strip())
    return ", ".join(names)


def choose_models(prompt: dict, object_info: dict, url: str, explicit: Optional[dict] = None) -> dict:
    """Check (and where needed pick) the model file of each loader against what the server lists.

    A name given in `explicit` (``{"checkpoint"|"blip2"|"clip": name}``) must be on the server.
    Otherwise the workflow's name is kept when the server has it, else the server's only one is
    taken. Without any BLIP-2 model the captioner is left out when class names are typed in.
    Returns the (copied) prompt; ComfyError says what to pass or to put where.
    """
    out = copy.deepcopy(prompt)
    explicit = explicit or {}
    for role, (flag, class_type, input_name, what, folder, goes) in MODEL_CHOICES.items():
        ids = nodes_of(out, class_type)
        wanted = explicit.get(role)
        if not ids:
            if wanted is not None:
                raise ComfyError(f"{flag} {wanted}: the workflow has no {class_type} node")
            continue
        options = combo_options(object_info, class_type, input_name)
        if options is None:
            continue
        options = [o for o in options if o != NONE_FOUND]
        if wanted is not None:
            if wanted not in options:
                raise ComfyError(f"{flag} {wanted!r}: the server at {url} has no such {what}; it has: "
                                 f"{', '.join(options) or 'none'}")
            set_input(out, class_type, input_name, wanted)
            continue
        for node_id in ids:
            current = out[node_id]["inputs"].get(input_name)
            if current in options or is_link(current) or out[node_id]["inputs"].get("download") is True:
                continue
            if len(options) == 1:
                out[node_id]["inputs"][input_name] = options[0]
            elif not options:
                if role == "blip2" and typed_class_names(out):
                    out = drop_captioner(out)
                    break
                extra = " (or type class names: --class-names)" if role == "blip2" else ""
                raise ComfyError(f"the server at {url} has no {what}: put {goes} in its models/{folder}/{extra}")
            else:
                raise ComfyError(f"the workflow's {what} {current!r} is not on the server at {url}; pick one "
                                 f"with {flag}: {', '.join(options)}")
    return out


def ensure_outputs(prompt: dict) -> tuple[dict, dict]:
    """A copy of the prompt with an output node on every result we collect, and their ids.

    Roles: ``json``, ``labels``, ``captions``, ``class_names`` (PreviewAny text), ``preview``
    and ``masks`` (SaveImage / PreviewImage; masks through MaskToImage). Existing output nodes
    are used; missing ones are added (PreviewAny, PreviewImage: temporary files only).
    ComfyError when the workflow has no FreeSegRefineMasks / FreeSegPipeline node.
    """
    out = copy.deepcopy(prompt)
    segs = nodes_of(out, *SEGMENTER_SLOTS)
    if len(segs) != 1:
        raise ComfyError("the workflow must have exactly one FreeSegRefineMasks or FreeSegPipeline node "
                         f"(it has {len(segs)})")
    seg = segs[0]
    slots = SEGMENTER_SLOTS[out[seg]["class_type"]]
    sources: dict[str, list] = {role: [seg, slot] for role, slot in slots.items() if role != "masks"}
    for cap in nodes_of(out, *CAPTION_SLOTS)[:1]:
        for role, slot in CAPTION_SLOTS[out[cap]["class_type"]].items():
            sources.setdefault(role, [cap, slot])
    next_id = max([int(k) for k in out if k.isdigit()] + [0]) + 1

    def add(class_type: str, inputs: dict, title: str) -> str:
        nonlocal next_id
        node_id = str(next_id)
        next_id += 1
        out[node_id] = {"class_type": class_type, "inputs": inputs, "_meta": {"title": title}}
        return node_id

    def consumer(class_types: tuple, input_name: str, source: list) -> Optional[str]:
        for node_id in nodes_of(out, *class_types):
            if out[node_id]["inputs"].get(input_name) == source:
                return node_id
        return None

    roles: dict[str, str] = {}
    for role, source in sources.items():
        if role == "preview":
            roles[role] = (consumer(IMAGE_OUTPUT_NODES, "images", source)
                           or add("PreviewImage", {"images": source}, "freeseg client: preview"))
        else:
            roles[role] = (consumer(("PreviewAny",), "source", source)
                           or add("PreviewAny", {"source": source}, f"freeseg client: {role}"))
    to_image = consumer(("MaskToImage",), "mask", [seg, slots["masks"]])
    to_image = to_image or add("MaskToImage", {"mask": [seg, slots["masks"]]}, "freeseg client: masks to image")
    roles["masks"] = (consumer(IMAGE_OUTPUT_NODES, "images", [to_image, 0])
                      or add("PreviewImage", {"images": [to_image, 0]}, "freeseg client: masks"))
    return out, roles


def output_text(entry: dict, node_id: Optional[str]) -> Optional[str]:
    """The text a PreviewAny node showed, from a history entry (None when absent)."""
    texts = (entry.get("outputs", {}).get(node_id) or {}).get("text") if node_id else None
    return "\n".join(str(t) for t in texts) if texts else None


def add_workflow_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `python -m freeseg segment` that fill the workflow (and pick its models)."""
    parser.add_argument("--workflow", default=DEFAULT_WORKFLOW,
                        help="API-format workflow JSON (default: workflows/api/freeseg_full.json)")
    parser.add_argument("--class-names", default=None, metavar="NAMES",
                        help="extra class names, comma-separated (added to the caption's nouns)")
    parser.add_argument("--clusters", type=int, default=None, metavar="K", help="masks per image (paper: 4)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the noise and the k-means start")
    parser.add_argument("--checkpoint", default=None, metavar="NAME", help="checkpoint file name (models/checkpoints)")
    parser.add_argument("--blip2", default=None, metavar="NAME",
                        help="BLIP / BLIP-2 folder name (models/blip or models/blip2)")
    parser.add_argument("--clip", default=None, metavar="NAME", help="open_clip folder or file name (models/open_clip)")
    parser.add_argument("--resolution", type=int, default=None, metavar="PX",
                        help="resolution of the diffusion features pass (workflow default: 512)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="CLASS.INPUT=VALUE",
                        help="set any input of the workflow's nodes of a class, e.g. FreeSegRefineMasks.method=guided")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for the run (default 3600)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def workflow_settings(args: argparse.Namespace) -> tuple[dict, list]:
    """(models, overrides) from the shared options (ComfyError for a malformed --set)."""
    models = {role: getattr(args, role) for role in MODEL_CHOICES if getattr(args, role) is not None}
    overrides = [parse_override(o) for o in args.overrides]
    if args.resolution is not None:
        overrides.insert(0, ("FreeSegDiffusionFeatures", "resolution", args.resolution))
    return models, overrides
