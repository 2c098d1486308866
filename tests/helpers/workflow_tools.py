"""Checks UI-format workflows against a server's `/object_info`, converts them to the API
format (as the frontend's graphToPrompt does), and adapts the example workflows to the
random-weight test fixtures.

Written from the formats themselves, independently of scripts/make_workflows.py, so that the
tests compare two implementations (and the browser test compares both with the frontend)."""

from __future__ import annotations

import copy
import os

from comfy_harness import EXTRA_MODEL_LINKS, MODEL_LINKS
from freeseg.app.paths import REPO

WORKFLOW_DIR = os.path.join(REPO, "workflows")
API_DIR = os.path.join(WORKFLOW_DIR, "api")
# The ComfyUI the workflow files are generated from (scripts/make_workflows.py reads its
# /object_info); newer cores are checked for structure only, tolerating what they changed (see
# validate_ui and prompt_differences: `pinned=False`).
PINNED_COMFYUI = "0.3.75"
NAMES = ("freeseg_full", "freeseg_inpaint", "freeseg_cutout", "freeseg_vocabulary", "freeseg_batch",
         "freeseg_video", "freeseg_generate", "freeseg_flux", "freeseg_sd3")
# Workflows of DiT checkpoints: they run on the second test server (`models_server`), which has
# the DiT fixtures (comfy_harness.EXTRA_MODEL_LINKS; the session server keeps one checkpoint).
DIT_NAMES = ("freeseg_flux", "freeseg_sd3")
# Workflows that need core SAM 3 (SAM3_Detect): generated from the 0.33.0 tree, checked on a
# server that has it, skipped on the others (scripts/make_workflows.py SAM3_WORKFLOWS).
SAM3_NAMES = ("freeseg_sam3",)
ALL_NAMES = NAMES + SAM3_NAMES

# A combo whose chosen option brings inputs of its own (newer cores: Save Video's `format`, whose
# option brings `codec`): the frontend draws it as a combo and the chosen option's inputs as
# widgets named "<combo>.<input>" right after it.
DYNAMIC_COMBO = "COMFY_DYNAMICCOMBO_V3"
SOCKETLESS = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO", DYNAMIC_COMBO}  # types the frontend draws as widgets
UPLOAD_OPTIONS = ("image_upload", "animated_image_upload", "video_upload", "audio_upload")  # combos with an upload button
FRONTEND_ONLY = {"MarkdownNote", "Note"}  # virtual nodes: saved in the UI file, never queued
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}
MUTED_MODES = {2, 4}  # "never" and "bypass": graphToPrompt leaves these nodes out

# Inputs whose choices are the server's files: the fixtures and uploads replace them in tests.
TEST_MODELS = {
    ("CheckpointLoaderSimple", "ckpt_name"): MODEL_LINKS["sd15_ckpt"][1],
    ("FreeSegBLIP2Loader", "model_name"): MODEL_LINKS["blip2_dir"][1],
    ("FreeSegCLIPLoader", "model_name"): MODEL_LINKS["open_clip_dir"][1],
}
# The DiT workflows' files, by the name they publish (scripts/make_workflows.py): replaced by the
# DiT fixtures (synthetic/dit.py) wherever a loader names them. T5-XXL (4.7B parameters) cannot be
# built here: the CLIP-L fixture stands in for it, and the Flux DualCLIPLoader's type becomes
# `sd3` (TEST_DIT_TYPES), whose encoder gives CLIP-L's tokens zero-padded to T5's 4096 wide and a
# 2048-wide pooled vector: the text widths the Flux fixture is built for.
TEST_DIT_FILES = {
    "flux1-dev.safetensors": EXTRA_MODEL_LINKS["flux_unet"][1],
    "ae.safetensors": EXTRA_MODEL_LINKS["flux_vae"][1],
    "clip_l.safetensors": EXTRA_MODEL_LINKS["clip_l"][1],
    "t5xxl_fp16.safetensors": EXTRA_MODEL_LINKS["clip_l"][1],
    "sd3.5_large_fp8_scaled.safetensors": EXTRA_MODEL_LINKS["sd3_ckpt"][1],
}
TEST_DIT_TYPES = {("DualCLIPLoader", "type", "flux"): "sd3"}
DIT_FILE_INPUTS = {("UNETLoader", "unet_name"), ("VAELoader", "vae_name"), ("DualCLIPLoader", "clip_name1"),
                   ("DualCLIPLoader", "clip_name2")}
# Smaller settings so that a workflow runs in seconds on a CPU.
TEST_SPEED = {
    ("FreeSegDiffusionFeatures", "resolution"): 128,
    ("FreeSegCaption", "max_new_tokens"): 8,
    ("KSampler", "steps"): 2,
}
# The random-weight BLIP-2 writes no real nouns, so a caption alone names nothing; these names
# are added where a workflow leaves the captioner's extra names empty.
TEST_CLASS_NAMES = "dog, cat, tree, sky"


def declared_inputs(node_def: dict) -> list[tuple[str, str, dict, bool]]:
    """(name, type, options, optional) per input, required ones first, in declared order. A
    combo declared as `[[choices], {...}]` gets its choices as options["options"]."""
    return _inputs(node_def["input"], node_def.get("input_order", {}))


def _inputs(sections: dict, order: dict) -> list[tuple[str, str, dict, bool]]:
    result = []
    for section in ("required", "optional"):
        specs = sections.get(section, {})
        for name in order.get(section, list(specs)):
            spec = specs[name]
            opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            if isinstance(spec[0], list):
                result.append((name, "COMBO", {**opts, "options": spec[0]}, section == "optional"))
            else:
                result.append((name, spec[0], opts, section == "optional"))
    return result


def options_of(kind: str, opts: dict) -> list:
    """The choices of a combo, or the option keys of a dynamic combo."""
    if kind == DYNAMIC_COMBO:
        return [o["key"] for o in opts.get("options", [])]
    return opts.get("options", [])


def default_value(kind: str, opts: dict):
    """The value the frontend gives a new widget: its default, else a combo's first choice."""
    if "default" in opts:
        return opts["default"]
    choices = options_of(kind, opts)
    return choices[0] if choices else None


def widget_inputs(node_def: dict, values: list | None = None) -> list[tuple[str, str, str, dict, bool]]:
    """What each `widgets_values` entry holds, in order: (input name, "value" | "control" |
    "upload", type, options, optional).

    The frontend makes a widget of every INT/FLOAT/STRING/BOOLEAN/COMBO input (unless
    forceInput), follows INT inputs named seed/noise_seed (or flagged control_after_generate)
    with a "control after generate" combo, and upload combos (image, video, audio) with an
    upload button whose saved value is "image". A dynamic combo is followed by the widgets of
    the option `values` chooses there (named "<combo>.<input>"; none when `values` ends
    before it)."""
    entries = []

    def add(inputs, prefix):
        for name, kind, opts, optional in inputs:
            if kind not in SOCKETLESS or opts.get("forceInput"):
                continue
            full = prefix + name
            entries.append((full, "value", kind, opts, optional))
            control = opts.get("control_after_generate")
            if kind == "INT" and (control if control is not None else name in ("seed", "noise_seed")):
                entries.append((full, "control", kind, opts, optional))
            if kind == "COMBO" and any(opts.get(o) for o in UPLOAD_OPTIONS):
                entries.append((full, "upload", kind, opts, optional))
            if kind == DYNAMIC_COMBO and values is not None and len(entries) <= len(values):
                chosen = [o for o in opts.get("options", []) if o["key"] == values[len(entries) - 1]]
                if chosen:
                    add(_inputs(chosen[0]["inputs"], {}), full + ".")

    add(declared_inputs(node_def), "")
    return entries


def widget_entries(node_def: dict, values: list | None = None) -> list[tuple[str, str]]:
    """(input name, "value" | "control" | "upload") per `widgets_values` entry (widget_inputs)."""
    return [(name, part) for name, part, _, _, _ in widget_inputs(node_def, values)]


def widget_values_by_name(node: dict, node_def: dict) -> dict:
    values = node.get("widgets_values") or []
    return {name: value for (name, part), value in zip(widget_entries(node_def, values), values)
            if part == "value"}


def ui_to_api(ui: dict, object_info: dict) -> dict:
    """The API prompt of a UI workflow: widget values by name, then linked inputs, for every node
    that is not frontend-only or muted. (The frontend also sends the display-only `preview`
    value of PreviewAny, which the server ignores; it is left out here.)"""
    links = {link[0]: link for link in ui["links"]}
    prompt = {}
    for node in ui["nodes"]:
        if node["type"] in FRONTEND_ONLY or node.get("mode", 0) in MUTED_MODES:
            continue
        node_def = object_info[node["type"]]
        inputs = widget_values_by_name(node, node_def)
        for slot in node.get("inputs", []):
            if slot.get("link") is not None:
                link = links[slot["link"]]
                inputs[slot["name"]] = [str(link[1]), link[2]]
        prompt[str(node["id"])] = {"inputs": inputs, "class_type": node["type"],
                                   "_meta": {"title": node.get("title") or node_def["display_name"]}}
    return prompt


def prompt_differences(got: dict, want: dict, pinned: bool) -> list[str]:
    """How the API prompt `got` differs from `want` (empty when it does not).

    On the pinned core: any difference. On a newer core (`pinned=False`) the nodes, their class
    types and every input both name must agree, and an input only one side names is tolerated:
    the newer core's frontend sends the widgets that core added (Create Video's `bit_depth`,
    Save Video's `format.codec`) with their values, and a saved widget value can land on the
    widget that now stands at its place."""
    if pinned:
        return [] if got == want else [f"{got} != {want}"]
    problems = []
    if sorted(got) != sorted(want):
        return [f"node ids {sorted(got)} != {sorted(want)}"]
    for node_id in sorted(got, key=int):
        a, b = got[node_id], want[node_id]
        where = f"node {node_id} ({b['class_type']})"
        if a["class_type"] != b["class_type"] or a.get("_meta") != b.get("_meta"):
            problems.append(f"{where}: {a['class_type']} {a.get('_meta')} != {b['class_type']} {b.get('_meta')}")
        for name in sorted(set(a["inputs"]) & set(b["inputs"])):
            if a["inputs"][name] != b["inputs"][name]:
                problems.append(f"{where}: {name} = {a['inputs'][name]!r}, not {b['inputs'][name]!r}")
    return problems


def without_default_titles(prompt: dict, ui: dict) -> dict:
    """`prompt` without the `_meta.title` of the nodes the UI workflow gives no title (those carry
    the node's display name, which cores rename: "GrowMask" became "Grow Mask")."""
    titled = {str(n["id"]) for n in ui["nodes"] if n.get("title")}
    out = copy.deepcopy(prompt)
    for node_id, node in out.items():
        if node_id not in titled:
            node.get("_meta", {}).pop("title", None)
    return out


def check_value(kind: str, opts: dict, value, options: list | None) -> str | None:
    """Why `value` does not suit a widget of this kind, or None."""
    if kind == "INT":
        if not isinstance(value, int) or isinstance(value, bool):
            return f"{value!r} is not an integer"
    elif kind == "FLOAT":
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return f"{value!r} is not a number"
    elif kind == "BOOLEAN":
        return None if isinstance(value, bool) else f"{value!r} is not a boolean"
    elif kind == "STRING":
        return None if isinstance(value, str) else f"{value!r} is not a string"
    elif kind == "COMBO":
        return None if options is None or value in options else f"{value!r} is not one of {options[:8]}"
    if "min" in opts and value < opts["min"]:
        return f"{value} < min {opts['min']}"
    if "max" in opts and value > opts["max"]:
        return f"{value} > max {opts['max']}"
    return None


def validate_ui(ui: dict, object_info: dict, check_files: bool = True, pinned: bool = True) -> list[str]:
    """Every way the UI workflow disagrees with what the server declares (empty when none).

    `check_files=False` skips the choice check of inputs listing the server's files (model
    names, input images), which the published workflows name by their usual user-side names.
    `pinned=False` (a newer core than the one the files come from) tolerates what such a core
    changed in a core node, as its frontend does when it loads the file: optional widgets added
    after the saved values (they take their defaults) and a combo input turned into a dynamic
    combo (the saved value still one of its options)."""
    problems = []
    nodes = {n["id"]: n for n in ui["nodes"]}
    if len(nodes) != len(ui["nodes"]):
        problems.append("duplicate node ids")
    if ui.get("version") != 0.4:
        problems.append(f"version is {ui.get('version')!r}, not 0.4")
    if max(nodes) > ui["last_node_id"]:
        problems.append("last_node_id is below a node id")
    if ui["links"] and max(l[0] for l in ui["links"]) > ui["last_link_id"]:
        problems.append("last_link_id is below a link id")
    file_inputs = set(TEST_MODELS) | DIT_FILE_INPUTS | {("LoadImage", "image"), ("LoadVideo", "file")}

    for node in ui["nodes"]:
        where = f"node {node['id']} ({node['type']})"
        if node["type"] in FRONTEND_ONLY:
            continue
        node_def = object_info.get(node["type"])
        if node_def is None:
            problems.append(f"{where}: the server has no such node")
            continue
        declared = {n: (k, o, opt) for n, k, o, opt in declared_inputs(node_def)}
        # widgets
        values = node.get("widgets_values") or []
        widgets = widget_inputs(node_def, values)
        entries = [(name, part) for name, part, _, _, _ in widgets]
        added = widgets[len(values):]  # widgets without a saved value
        if len(values) > len(entries) or (added and (pinned or not all(w[4] for w in added))):
            problems.append(f"{where}: {len(values)} widgets_values for {len(entries)} widgets {entries}")
        for (name, part, kind, opts, _), value in zip(widgets, values):
            if part == "control":
                if value not in CONTROL_VALUES:
                    problems.append(f"{where}: control_after_generate of {name} is {value!r}")
                continue
            if part == "upload":
                if value != "image":
                    problems.append(f"{where}: upload widget value {value!r}")
                continue
            skip_options = not check_files and (node["type"], name) in file_inputs
            options = options_of(kind, opts) if kind in ("COMBO", DYNAMIC_COMBO) and not skip_options else None
            why = check_value("COMBO" if kind == DYNAMIC_COMBO else kind, opts, value, options)
            if why:
                problems.append(f"{where}: widget {name}: {why}")
        # input slots: names and types
        for slot in node.get("inputs", []):
            if slot["name"] == "upload" and slot.get("type") == "IMAGEUPLOAD":
                continue
            if slot["name"] not in declared:
                problems.append(f"{where}: input slot {slot['name']!r} is not declared")
            elif slot["type"] != declared[slot["name"]][0] and (
                    pinned or (slot["type"], declared[slot["name"]][0]) != ("COMBO", DYNAMIC_COMBO)):
                problems.append(f"{where}: input {slot['name']} has type {slot['type']}, declared "
                                f"{declared[slot['name']][0]}")
        linked = {s["name"] for s in node.get("inputs", []) if s.get("link") is not None}
        for name, (kind, opts, optional) in declared.items():
            if not optional and (kind not in SOCKETLESS or opts.get("forceInput")) and name not in linked:
                problems.append(f"{where}: required input {name} is not connected")
        # output slots: the saved ones as declared; outputs a newer core added after them (Save
        # Image's IMAGE, Preview Any's STRING) are absent from the file, so nothing links to them
        saved = [(o["name"], o["type"]) for o in node.get("outputs", [])]
        declared_out = list(zip(node_def["output_name"], node_def["output"]))
        if saved != declared_out[:len(saved)]:
            problems.append(f"{where}: outputs {saved} != declared {declared_out}")

    for link_id, origin, origin_slot, target, target_slot, kind in ui["links"]:
        where = f"link {link_id} ({origin}:{origin_slot} -> {target}:{target_slot})"
        if origin not in nodes or target not in nodes:
            problems.append(f"{where}: unknown node")
            continue
        src, dst = nodes[origin], nodes[target]
        if src["type"] not in object_info or dst["type"] not in object_info:
            continue
        out_types = object_info[src["type"]]["output"]
        if origin_slot >= len(out_types):
            problems.append(f"{where}: {src['type']} has no output {origin_slot}")
            continue
        if kind != out_types[origin_slot]:
            problems.append(f"{where}: link type {kind} but {src['type']} output {origin_slot} is "
                            f"{out_types[origin_slot]}")
        if origin_slot >= len(src.get("outputs", [])):
            problems.append(f"{where}: the origin node saves no output {origin_slot}")
        elif link_id not in (src["outputs"][origin_slot].get("links") or []):
            problems.append(f"{where}: missing from the origin's output links")
        if target_slot >= len(dst.get("inputs", [])):
            problems.append(f"{where}: {dst['type']} has no input slot {target_slot}")
            continue
        slot = dst["inputs"][target_slot]
        if slot.get("link") != link_id:
            problems.append(f"{where}: the target slot {slot['name']} names link {slot.get('link')}")
        want = object_info[dst["type"]]
        declared = {n: k for n, k, _, _ in declared_inputs(want)}
        want_type = declared.get(slot["name"])
        if want_type not in ("*", out_types[origin_slot]):
            problems.append(f"{where}: {src['type']} gives {out_types[origin_slot]}, {dst['type']}."
                            f"{slot['name']} takes {want_type}")
    return problems


# -- adapting the example workflows to the test server -------------------------------------------


def fixture_values(class_type: str, node_id, images: dict, current: dict) -> dict:
    """{input name: value} the tests put into a node: fixture model names, uploaded images
    (`images` maps LoadImage / LoadVideo node ids to uploaded names), faster settings, and class
    names for a captioner left without any. `current`: the node's widget values by name."""
    values = {name: v for (ct, name), v in {**TEST_MODELS, **TEST_SPEED}.items() if ct == class_type}
    if class_type == "LoadImage":
        values["image"] = images[str(node_id)]
    if class_type == "LoadVideo" and str(node_id) in images:
        values["file"] = images[str(node_id)]
    if class_type == "FreeSegCaption" and not current.get("class_names"):
        values["class_names"] = TEST_CLASS_NAMES
    for name, value in current.items():
        if not isinstance(value, str):
            continue  # a link
        if value in TEST_DIT_FILES:
            values[name] = TEST_DIT_FILES[value]
        if (class_type, name, value) in TEST_DIT_TYPES:
            values[name] = TEST_DIT_TYPES[(class_type, name, value)]
    return values


def adapt_api(api: dict, images: dict) -> dict:
    out = copy.deepcopy(api)
    for node_id, node in out.items():
        for name, value in fixture_values(node["class_type"], node_id, images, node["inputs"]).items():
            assert name in node["inputs"] and not isinstance(node["inputs"][name], list), (node_id, name)
            node["inputs"][name] = value
    return out


def adapt_ui(ui: dict, object_info: dict, images: dict) -> dict:
    out = copy.deepcopy(ui)
    for node in out["nodes"]:
        if node["type"] in FRONTEND_ONLY:
            continue
        node_def = object_info[node["type"]]
        entries = widget_entries(node_def, node.get("widgets_values"))
        current = widget_values_by_name(node, node_def)
        for name, value in fixture_values(node["type"], node["id"], images, current).items():
            node["widgets_values"][entries.index((name, "value"))] = value
    return out


def write_clip(path: str, frames: int = 4, width: int = 96, height: int = 64) -> str:
    """A tiny H.264 clip: a square moving right over a gradient."""
    import av
    import numpy as np

    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        yy, xx = np.mgrid[0:height, 0:width]
        for t in range(frames):
            img = np.stack([xx * 255 // width, yy * 255 // height, np.full_like(xx, 80)], -1).astype(np.uint8)
            img[20:44, 10 + 12 * t:34 + 12 * t] = (230, 40, 40)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def load_video_ids(api: dict) -> list[str]:
    return sorted((k for k, n in api.items() if n["class_type"] == "LoadVideo"), key=int)


def load_image_ids(api: dict) -> list[str]:
    return sorted((k for k, n in api.items() if n["class_type"] == "LoadImage"), key=int)
