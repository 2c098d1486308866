#!/usr/bin/env python3
"""Writes the pack's example workflows from one description per graph.

Each graph below is described once, in Python. From that description this script writes
  * `workflows/<name>.json`: the UI format the ComfyUI frontend's "Save" writes (schema 0.4:
    nodes with their input/output slots, links, `widgets_values`, positions laid out left to
    right). ComfyUI lists `custom_nodes/<pack>/workflows/*.json` under Workflow -> Browse
    Templates -> Extensions, with `<name>.jpg` beside it as the thumbnail;
  * `workflows/api/<name>.json`: the API ("prompt") format that `POST /prompt` takes, which is
    what the frontend's "Export (API)" writes for the same graph.

Slot names and types, widget order and defaults come from the `/object_info` of a ComfyUI
server with this pack (this script starts nothing): `--server http://127.0.0.1:8188` reads it
from a running server, `--object-info FILE` from a saved copy. Which workflows it writes
depends on that server:
  * a server without core SAM 3 (`SAM3_Detect`), i.e. ComfyUI 0.3.75, the pinned core: every
    workflow but those in SAM3_WORKFLOWS;
  * a server with it (the 0.33.0 tree, `.cache/ComfyUI-0.33.0`): the SAM3_WORKFLOWS
    (`freeseg_sam3`) only.
`tests/server/test_workflows.py` checks that the files in workflows/ are exactly what this
script generates from the test server (on 0.3.75 the first set, on 0.33.0 the second); when
they are not, it saves that server's `/object_info` into the run's pytest temporary folder and
names the file in its failure.

Usage:
    .venv/bin/python scripts/make_workflows.py --object-info FILE          # (re)write workflows/
    .venv/bin/python scripts/make_workflows.py --object-info FILE --check  # exit 1 if a file would change

The thumbnails (`workflows/<name>.jpg`) and `docs/freeseg_full.png` are screenshots of the
real frontend, taken by `FREESEG_UPDATE_SCREENSHOTS=1 .venv/bin/python -m pytest
tests/server/test_workflows_browser.py`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.request
import uuid
from dataclasses import dataclass, field

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKFLOWS = os.path.join(REPO, "workflows")

# User-facing default model names (the tests swap in their random-weight fixtures).
CHECKPOINT = "v1-5-pruned-emaonly.safetensors"
BLIP = "blip-image-captioning-base"  # the paper's captioner
OPEN_CLIP = "ViT-B-32-openai.safetensors"  # one file: the frontend can report it missing and fetch it
SAM3_CHECKPOINT = "sam3.1_multiplex_fp16.safetensors"  # the name core ComfyUI's SAM 3 blueprints use
IMAGE = "example.png"  # ComfyUI's own input/example.png
# `properties.models` of the loader nodes: the frontend's missing-model dialog lists a model when
# a node's widget holds its name and `/experiment/models/<directory>` lists no file of that name,
# and offers the download. It compares file names only, so a folder model (BLIP-2) can never be
# found there and is left out rather than reported missing when it is present.
MODEL_FILES = {
    ("FreeSegCLIPLoader", OPEN_CLIP): {
        "name": OPEN_CLIP, "directory": "open_clip",
        "url": "https://huggingface.co/timm/vit_base_patch32_clip_224.openai/resolve/main/open_clip_model.safetensors"},
}
VIDEO = "example.mp4"  # any clip in ComfyUI's input folder
# DiT checkpoints (issue 22), the files and folders of ComfyUI's own Flux and SD3.5 templates.
FLUX_UNET, FLUX_VAE = "flux1-dev.safetensors", "ae.safetensors"
CLIP_L, T5XXL = "clip_l.safetensors", "t5xxl_fp16.safetensors"
SD35_CHECKPOINT = "sd3.5_large_fp8_scaled.safetensors"  # MMDiT + VAE + CLIP-L, CLIP-G and T5-XXL in one file
_FLUX_TE = "https://huggingface.co/comfyanonymous/flux_text_encoders/resolve/main/"
MODEL_FILES.update({
    ("UNETLoader", FLUX_UNET): {"name": FLUX_UNET, "directory": "diffusion_models",
                                "url": "https://huggingface.co/Comfy-Org/flux1-dev/resolve/main/flux1-dev.safetensors"},
    ("VAELoader", FLUX_VAE): {"name": FLUX_VAE, "directory": "vae",
                              "url": "https://huggingface.co/Comfy-Org/Lumina_Image_2.0_Repackaged/resolve/main/"
                                     "split_files/vae/ae.safetensors"},
    ("DualCLIPLoader", CLIP_L): {"name": CLIP_L, "directory": "text_encoders", "url": _FLUX_TE + CLIP_L},
    ("DualCLIPLoader", T5XXL): {"name": T5XXL, "directory": "text_encoders", "url": _FLUX_TE + T5XXL},
    ("CheckpointLoaderSimple", SD35_CHECKPOINT): {
        "name": SD35_CHECKPOINT, "directory": "checkpoints",
        "url": "https://huggingface.co/Comfy-Org/stable-diffusion-3.5-fp8/resolve/main/" + SD35_CHECKPOINT},
})

# Inputs the frontend shows as widgets (anything else is a socket).
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
# Frontend-only nodes: drawn and saved in the UI file, never sent to the server.
VIRTUAL_NODES = {"MarkdownNote", "Note"}

# -- the frontend's rules for turning a node definition into slots and widgets ------------------


def input_specs(node_def: dict) -> list[tuple[str, str, dict, bool]]:
    """(name, type, options, optional) of every input, in the order the frontend creates them."""
    out = []
    for section in ("required", "optional"):
        spec = node_def["input"].get(section, {})
        for name in node_def.get("input_order", {}).get(section, list(spec)):
            kind, opts = spec[name][0], (spec[name][1] if len(spec[name]) > 1 else {})
            out.append((name, "COMBO" if isinstance(kind, list) else kind, opts or {}, section == "optional"))
    return out


def is_widget(kind: str, opts: dict) -> bool:
    return kind in WIDGET_TYPES and not opts.get("forceInput")


def has_control(name: str, kind: str, opts: dict) -> bool:
    """The frontend adds a `control_after_generate` widget after INT seeds (and any input that
    asks for one); its value ("fixed", "randomize", ...) is saved in `widgets_values`."""
    control = opts.get("control_after_generate")
    if kind == "COMBO" and control:
        raise NotImplementedError("combo widgets with control_after_generate")
    return kind == "INT" and (bool(control) if control is not None else name in ("seed", "noise_seed"))


UPLOAD_OPTIONS = ("image_upload", "animated_image_upload", "video_upload", "audio_upload")


def has_upload(kind: str, opts: dict) -> bool:
    """A combo the frontend gives an upload button (it saves the value "image" for it)."""
    return kind == "COMBO" and any(opts.get(o) for o in UPLOAD_OPTIONS)


def widget_layout(node_def: dict) -> list[tuple[str, str]]:
    """`widgets_values` layout: (input name, "value" | "control" | "upload") per entry."""
    layout = []
    for name, kind, opts, _ in input_specs(node_def):
        if not is_widget(kind, opts):
            continue
        layout.append((name, "value"))
        if has_control(name, kind, opts):
            layout.append((name, "control"))
        if has_upload(kind, opts):
            layout.append((name, "upload"))
    return layout


def slot_list(node_def: dict) -> list[dict]:
    """The node's input slots as the frontend serializes them: sockets first, then one slot
    per widget (so a widget can take a link)."""
    specs = input_specs(node_def)
    slots = [{"localized_name": n, "name": n, "type": k, **({"shape": 7} if opt else {})}
             for n, k, o, opt in specs if not is_widget(k, o)]
    for n, k, o, _ in specs:
        if is_widget(k, o):
            slots.append({"localized_name": n, "name": n, "type": k, "widget": {"name": n}})
        if has_upload(k, o):
            slots.append({"localized_name": "choose file to upload", "name": "upload", "type": "IMAGEUPLOAD",
                          "widget": {"name": "upload"}})
    return slots


def default_value(name: str, kind: str, opts: dict, spec) -> object:
    if "default" in opts:
        return opts["default"]
    if kind == "COMBO":
        options = spec[0] if isinstance(spec[0], list) else opts.get("options", [])
        if options:
            return options[0]
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}.get(kind)


# -- graph description ----------------------------------------------------------------------------


@dataclass
class Out:
    node: "Node"
    slot: int


@dataclass
class Node:
    id: int
    type: str
    title: str | None
    values: dict
    size: tuple[int, int] | None
    controls: dict
    text: str | None = None  # MarkdownNote body
    band: int = 0
    col: int = 0
    pos: tuple[float, float] = (0, 0)
    size_wh: tuple[int, int] = (0, 0)
    graph: "Graph" = field(default=None, repr=False)

    def __getitem__(self, key) -> Out:
        names = self.graph.defs[self.type]["output_name"]
        return Out(self, names.index(key) if isinstance(key, str) else key)


class Graph:
    """`g.add("ClassName", input=value_or_output, ...)`: a node; `node["output name"]` (or index)
    is one of its outputs. Widgets not given take their declared default."""

    def __init__(self, defs: dict, name: str):
        self.defs = defs
        self.name = name
        self.nodes: list[Node] = []
        self.current_band = 0

    def add(self, class_type: str, title: str | None = None, size: tuple[int, int] | None = None,
            controls: dict | None = None, **values) -> Node:
        if class_type not in self.defs:
            raise KeyError(f"{self.name}: the server declares no node {class_type!r}")
        known = {n for n, *_ in input_specs(self.defs[class_type])}
        unknown = set(values) - known
        if unknown:
            raise KeyError(f"{self.name}: {class_type} has no inputs {sorted(unknown)} (it has {sorted(known)})")
        node = Node(len(self.nodes) + 1, class_type, title, values, size, controls or {}, band=self.current_band,
                    graph=self)
        self.nodes.append(node)
        return node

    def note(self, text: str, size=(420, 300), title: str = "Read me") -> Node:
        node = Node(len(self.nodes) + 1, "MarkdownNote", title, {}, size, {}, text=text, band=self.current_band,
                    graph=self)
        self.nodes.append(node)
        return node

    # -- checks, order, layout -----------------------------------------------------------------
    def links(self) -> list[tuple[Out, Node, str]]:
        return [(v, n, k) for n in self.nodes for k, v in n.values.items() if isinstance(v, Out)]

    def check(self) -> None:
        for node in self.nodes:
            if node.type in VIRTUAL_NODES:
                continue
            for name, kind, opts, optional in input_specs(self.defs[node.type]):
                value = node.values.get(name)
                if isinstance(value, Out):
                    out_type = self.defs[value.node.type]["output"][value.slot]
                    if kind != "*" and out_type != kind and not (kind == "COMBO" and out_type == "COMBO"):
                        raise TypeError(f"{self.name}: {value.node.type}[{value.slot}] is {out_type}, "
                                        f"{node.type}.{name} takes {kind}")
                elif not is_widget(kind, opts) and not optional:
                    raise ValueError(f"{self.name}: {node.type} (#{node.id}) needs an input {name!r}")
                elif value is not None and not is_widget(kind, opts):
                    raise TypeError(f"{self.name}: {node.type}.{name} is a socket; give it an output")

    def topo_order(self) -> list[Node]:
        deps = {n.id: {v.node.id for v in n.values.values() if isinstance(v, Out)} for n in self.nodes}
        done, order = set(), []
        while len(order) < len(self.nodes):
            ready = [n for n in self.nodes if n.id not in done and deps[n.id] <= done]
            if not ready:
                raise ValueError(f"{self.name}: the graph has a cycle")
            order.append(ready[0])
            done.add(ready[0].id)
        return order

    def band(self) -> None:
        """Nodes added from now on are laid out in a new band below the previous ones (keeps a
        long chain from growing too wide)."""
        self.current_band += 1

    def layout(self, gap_x: int = 70, gap_y: int = 60, gap_band: int = 140) -> None:
        """Left to right within each band: a node's column is one past its latest input's in the
        band; nodes that feed others then move right up to just before their first consumer
        (loaders sit next to what uses them). Within a column, nodes are stacked in the order of
        their inputs' heights."""
        order = self.topo_order()
        for node in order:
            node.size_wh = node.size or estimate_size(self.defs.get(node.type), node)
            parents = [v.node.col + 1 for v in node.values.values() if isinstance(v, Out) and v.node.band == node.band]
            node.col = max(parents, default=0)
        consumers = {n.id: [] for n in self.nodes}
        for out, target, _ in self.links():
            if out.node.band == target.band:
                consumers[out.node.id].append(target)
        for node in reversed(order):
            if consumers[node.id]:
                node.col = min(c.col for c in consumers[node.id]) - 1
        top = 0
        for band in sorted({n.band for n in self.nodes}):
            x, bottom = 0, top
            in_band = [n for n in self.nodes if n.band == band]
            for col in range(max(n.col for n in in_band) + 1):
                members = [n for n in in_band if n.col == col]

                def key(n: Node):
                    ys = [v.node.pos[1] + v.node.size_wh[1] / 2 for v in n.values.values() if isinstance(v, Out)
                          and (v.node.band < band or (v.node.band == band and v.node.col < col))]
                    return (n.type not in VIRTUAL_NODES, sum(ys) / len(ys) if ys else -1, n.id)

                y = top
                for node in sorted(members, key=key):
                    node.pos = (x, y)
                    y += node.size_wh[1] + gap_y
                bottom = max(bottom, y - gap_y)
                if members:
                    x += max(n.size_wh[0] for n in members) + gap_x
            top = bottom + gap_band

    # -- output ------------------------------------------------------------------------------------
    def widgets_values(self, node: Node) -> list:
        if node.type in VIRTUAL_NODES:
            return [node.text]
        node_def = self.defs[node.type]
        specs = {n: (k, o, node_def["input"].get("required", {}).get(n) or node_def["input"]["optional"][n])
                 for n, k, o, _ in input_specs(node_def)}
        values = []
        for name, part in widget_layout(node_def):
            kind, opts, spec = specs[name]
            if part == "control":
                values.append(node.controls.get(name, "fixed"))
            elif part == "upload":
                values.append("image")
            else:
                given = node.values.get(name)
                # A widget fed by a link keeps (and saves) its own value too.
                values.append(default_value(name, kind, opts, spec) if given is None or isinstance(given, Out)
                              else given)
        return values

    def ui(self) -> dict:
        self.check()
        self.layout()
        order = {n.id: i for i, n in enumerate(self.topo_order())}
        links, link_ids = [], {}
        for out, target, name in sorted(self.links(), key=lambda l: (l[1].id, self._slot_index(l[1], l[2]))):
            link_id = len(links) + 1
            out_type = self.defs[out.node.type]["output"][out.slot]
            links.append([link_id, out.node.id, out.slot, target.id, self._slot_index(target, name), out_type])
            link_ids[(target.id, name)] = link_id
        nodes = []
        for node in self.nodes:
            entry = {"id": node.id, "type": node.type, "pos": list(node.pos), "size": list(node.size_wh),
                     "flags": {}, "order": order[node.id], "mode": 0}
            if node.type in VIRTUAL_NODES:
                entry.update(inputs=[], outputs=[], title=node.title, properties={},
                             widgets_values=self.widgets_values(node), color="#432", bgcolor="#653")
                nodes.append(entry)
                continue
            node_def = self.defs[node.type]
            inputs = []
            for slot in slot_list(node_def):
                inputs.append({**slot, "link": link_ids.get((node.id, slot["name"]))})
            outputs = []
            for i, (name, kind) in enumerate(zip(node_def["output_name"], node_def["output"])):
                ids = [l[0] for l in links if l[1] == node.id and l[2] == i]
                outputs.append({"localized_name": name, "name": name, "type": kind, "links": ids,
                                **({"slot_index": i} if ids else {})})
            entry.update(inputs=inputs, outputs=outputs)
            if node.title:
                entry["title"] = node.title
            entry["properties"] = {"Node name for S&R": node.type}
            entry["widgets_values"] = self.widgets_values(node)
            models = [m for (kind, name), m in MODEL_FILES.items() if kind == node.type and name in entry["widgets_values"]]
            if models:
                entry["properties"]["models"] = models
            nodes.append(entry)
        return {
            "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"freeseg-diff/workflows/{self.name}")),
            "revision": 0,
            "last_node_id": max(n.id for n in self.nodes),
            "last_link_id": len(links),
            "nodes": nodes,
            "links": links,
            "groups": [],
            "config": {},
            "extra": {"ds": fit_view(self.nodes)},
            "version": 0.4,
        }

    def _slot_index(self, node: Node, name: str) -> int:
        return [s["name"] for s in slot_list(self.defs[node.type])].index(name)

    def api(self) -> dict:
        self.check()
        prompt = {}
        for node in self.topo_order():
            if node.type in VIRTUAL_NODES:
                continue
            node_def = self.defs[node.type]
            values = self.widgets_values(node)
            inputs = {name: value for (name, part), value in zip(widget_layout(node_def), values) if part == "value"}
            for name, value in node.values.items():
                if isinstance(value, Out):
                    inputs[name] = [str(value.node.id), value.slot]
            prompt[str(node.id)] = {"inputs": inputs, "class_type": node.type,
                                    "_meta": {"title": node.title or node_def["display_name"]}}
        titles = [n["_meta"]["title"] for n in prompt.values()]
        shared = sorted({t for t in titles if titles.count(t) > 1})
        if shared:  # clients find nodes by title: give every node of a graph its own
            raise ValueError(f"{self.name}: several nodes have the title(s) {shared}; give them titles")
        return prompt


def estimate_size(node_def: dict | None, node: Node) -> tuple[int, int]:
    """About the size the frontend gives a fresh node (a little larger is harmless)."""
    width = 320
    if node_def is None:
        return (width, 200)
    specs = input_specs(node_def)
    sockets = sum(1 for _, k, o, _ in specs if not is_widget(k, o))
    rows = max(sockets, len(node_def["output"]))
    height = 10 + 22 * rows + 26 * len(widget_layout(node_def))
    height += sum(70 for _, k, o, _ in specs if k == "STRING" and o.get("multiline"))
    extra = {"LoadImage": 260, "SaveImage": 260, "PreviewImage": 260, "PreviewAny": 120}
    return (width, height + extra.get(node.type, 0))


def fit_view(nodes: list[Node], view=(1500, 800), title_h: int = 30) -> dict:
    """The canvas offset/scale that shows every node in a window of about `view` pixels."""
    x0 = min(n.pos[0] for n in nodes)
    y0 = min(n.pos[1] for n in nodes) - title_h
    x1 = max(n.pos[0] + n.size_wh[0] for n in nodes)
    y1 = max(n.pos[1] + n.size_wh[1] for n in nodes)
    scale = round(min(1.0, view[0] / (x1 - x0 + 100), view[1] / (y1 - y0 + 100)), 3)
    return {"scale": scale, "offset": [round(50 / scale - x0 + 20, 1), round(50 / scale - y0 + 20, 1)]}


# -- the workflows -------------------------------------------------------------------------------

MODELS_NOTE = (
    "**Models** (nothing is downloaded unless you switch `download` on in a loader):\n"
    f"* `models/checkpoints/{CHECKPOINT}`: any SD1.x, SD2.x or SDXL checkpoint works;\n"
    f"* `models/blip/{BLIP}/`: the paper's BLIP captioner saved by transformers "
    "(Salesforce/blip-image-captioning-base; a BLIP-2 folder in `models/blip2/` works too);\n"
    f"* `models/open_clip/{OPEN_CLIP}`: the `open_clip_model.safetensors` of timm/vit_base_patch32_clip_224.openai "
    "under this name (the frontend offers the download when it is missing), or an open_clip folder.\n")


def segment(g: Graph, image: Out, ckpt: Node, class_names: str = "", captioner: bool = True
            ) -> tuple[Node | None, Node]:
    """Caption (optional) -> diffusion features -> k-means masks -> CLIP names -> refinement
    (the node's default method)."""
    return segment_with(g, image, ckpt["MODEL"], ckpt["VAE"], ckpt["CLIP"], class_names, captioner)


def segment_with(g: Graph, image: Out, model: Out, vae: Out, clip: Out, class_names: str = "",
                 captioner: bool = True, timestep: int = 0, resolution: int = 512) -> tuple[Node | None, Node]:
    """`segment` from separate MODEL, VAE and CLIP outputs, at `timestep` and `resolution`."""
    clip_model = g.add("FreeSegCLIPLoader", model_name=OPEN_CLIP)
    caption = None
    if captioner:
        blip2 = g.add("FreeSegBLIP2Loader", model_name=BLIP)
        caption = g.add("FreeSegCaption", image=image, blip2=blip2["blip2"], class_names=class_names)
    feats = g.add("FreeSegDiffusionFeatures", model=model, vae=vae, image=image, clip=clip,
                  timestep=timestep, resolution=resolution, source="cross_attn_queries", seed=0)
    clusters = g.add("FreeSegClusterMasks", features=feats["features"], n_clusters=4, method="kmeans", seed=0)
    names = caption["class_names"] if caption is not None else class_names
    labelled = g.add("FreeSegCLIPLabel", segments=clusters["segments"], image=image, clip_model=clip_model["clip_model"],
                     class_names=names, crop_mode="masked", prompt="bare", threshold=0.0)
    refined = g.add("FreeSegRefineMasks", segments=labelled["segments"], image=image)
    return caption, refined


def save_masks(g: Graph, mask: Out, prefix: str, what: str = "masks") -> Node:
    """MASK -> image -> Save Image, titled "Save <what>"."""
    image = g.add("MaskToImage", title=f"{what[0].upper()}{what[1:]} as image", mask=mask)["IMAGE"]
    return g.add("SaveImage", title=f"Save {what}", images=image, filename_prefix=prefix)


def save_segments(g: Graph, refined: Node, image: Out, prefix: str) -> Node:
    """Every named mask, the overlay and labels.json as files in the output folder (for API clients
    that download through /view)."""
    return g.add("FreeSegSaveSegments", title="Save segments (PNG + JSON)",
                 segments=refined["segments"], image=image, filename_prefix=prefix)


def full_outputs(g: Graph, refined: Node, caption: Node, image: Out, prefix: str) -> None:
    """What the full workflow shows: the caption's class names, the preview, the masks, labels, JSON."""
    g.add("PreviewAny", title="Class names (from the caption)", source=caption["class_names"])
    g.add("SaveImage", title="Save preview", images=refined["preview"], filename_prefix=f"{prefix}_preview")
    save_masks(g, refined["masks"], f"{prefix}_mask")
    g.add("PreviewAny", title="Labels (one per mask)", source=refined["labels"])
    g.add("PreviewAny", title="Segments (JSON)", source=refined["json"])
    save_segments(g, refined, image, f"{prefix}_segments")


def freeseg_full(g: Graph) -> None:
    g.note("## FreeSeg-Diff: segment everything and name it\n"
           "BLIP captions the image; the nouns of the caption (plus any names you add in *Caption*) "
           "are the class names. One pass of the checkpoint's UNet gives features that k-means splits "
           "into masks; CLIP names each mask; *Refine Masks* sharpens the edges (the paper's CRF, checked "
           "by a guided filter: `crf_guard`; `crf` is the paper's alone).\n\n"
           "Outputs: the coloured preview, one mask per named segment (same order as *Labels*), "
           "the segments as JSON, and *Save segments* writes all of it as files (a PNG per mask, the "
           "overlay, labels.json) into the output folder for API clients.\n\n" + MODELS_NOTE)
    image = g.add("LoadImage", image=IMAGE)["IMAGE"]
    ckpt = g.add("CheckpointLoaderSimple", ckpt_name=CHECKPOINT)
    caption, refined = segment(g, image, ckpt)
    full_outputs(g, refined, caption, image, "freeseg/full")


def freeseg_inpaint(g: Graph) -> None:
    g.note("## Segment, pick a part by name, inpaint it\n"
           "*Select Mask* takes the segments named `dog` (change it to any name in the class list); "
           "the mask is grown and feathered, then the SAME checkpoint repaints that region from the "
           "inpaint prompt and the result is pasted back over the original.\n\n" + MODELS_NOTE)
    image = g.add("LoadImage", image=IMAGE)["IMAGE"]
    ckpt = g.add("CheckpointLoaderSimple", ckpt_name=CHECKPOINT)
    _, refined = segment(g, image, ckpt, class_names="dog")
    g.add("PreviewAny", title="Labels", source=refined["labels"])
    save_segments(g, refined, image, "freeseg/inpaint_segments")
    g.band()
    inpaint_named(g, ckpt, image, refined, None, steps=25, prefix="freeseg/inpaint")


def inpaint_named(g: Graph, ckpt, image, refined, negative, steps: int, prefix: str, titled: bool = False) -> None:
    """The segments named `dog` grown, feathered and repainted by the same checkpoint from an
    inpaint prompt, pasted back over `image` and saved under `prefix`. `negative`: a
    CLIPTextEncode node to reuse (None: one is added). `titled`: the KSampler and VAE Decode are
    titled "(inpaint)", for a graph that has another of each."""
    picked = g.add("FreeSegSelectMask", segments=refined["segments"], labels="dog")
    grown = g.add("GrowMask", mask=picked["mask"], expand=8, tapered_corners=True)
    feathered = g.add("FeatherMask", mask=grown["MASK"], left=8, top=8, right=8, bottom=8)
    positive = g.add("CLIPTextEncode", title="Inpaint prompt", text="a photo of a cat", clip=ckpt["CLIP"])
    if negative is None:
        negative = g.add("CLIPTextEncode", title="Negative prompt", text="blurry, low quality", clip=ckpt["CLIP"])
    cond = g.add("InpaintModelConditioning", positive=positive["CONDITIONING"], negative=negative["CONDITIONING"],
                 vae=ckpt["VAE"], pixels=image, mask=feathered["MASK"], noise_mask=True)
    sampler_title, decode_title = ("KSampler (inpaint)", "VAE Decode (inpaint)") if titled else (None, None)
    sampled = g.add("KSampler", title=sampler_title, model=ckpt["MODEL"], positive=cond["positive"],
                    negative=cond["negative"], latent_image=cond["latent"], seed=0, steps=steps, cfg=7.0,
                    sampler_name="euler", scheduler="normal", denoise=1.0, controls={"seed": "randomize"})
    decoded = g.add("VAEDecode", title=decode_title, samples=sampled["LATENT"], vae=ckpt["VAE"])
    pasted = g.add("ImageCompositeMasked", destination=image, source=decoded["IMAGE"], x=0, y=0,
                   resize_source=False, mask=feathered["MASK"])
    g.add("PreviewImage", title="Inpaint mask", images=g.add("MaskToImage", mask=feathered["MASK"])["IMAGE"])
    g.add("SaveImage", title="Save inpainted image", images=pasted["IMAGE"], filename_prefix=prefix)


def freeseg_cutout(g: Graph) -> None:
    g.note("## Cut a named part out as a transparent PNG\n"
           "*Select Mask* picks the segments named `dog` (names or mask indices, comma-separated). "
           "ComfyUI masks mean \"transparent where 1\" in *Join Image with Alpha*, hence the "
           "*Invert Mask*: the selected part stays opaque, everything else becomes transparent.\n\n"
           + MODELS_NOTE)
    image = g.add("LoadImage", image=IMAGE)["IMAGE"]
    ckpt = g.add("CheckpointLoaderSimple", ckpt_name=CHECKPOINT)
    _, refined = segment(g, image, ckpt, class_names="dog")
    g.add("PreviewAny", title="Labels", source=refined["labels"])
    save_segments(g, refined, image, "freeseg/cutout_segments")
    g.band()
    picked = g.add("FreeSegSelectMask", segments=refined["segments"], labels="dog")
    alpha = g.add("InvertMask", mask=picked["mask"])
    rgba = g.add("JoinImageWithAlpha", image=image, alpha=alpha["MASK"])
    save_masks(g, picked["mask"], "freeseg/cutout_mask", what="selected mask")
    g.add("SaveImage", title="Save cut-out (RGBA PNG)", images=rgba["IMAGE"], filename_prefix="freeseg/cutout")


def freeseg_vocabulary(g: Graph) -> None:
    g.note("## Your own class names, no captioner\n"
           "Type the names to look for in *CLIP Label* (comma-separated; one line per image for a "
           "batch, or one line for all). A mask takes the name CLIP finds most like it only where that "
           "name beats every *background* word of CLIP Label (sky, wall, floor, ...; editable); other "
           "masks stay unnamed. No captioner is needed.\n\n" + MODELS_NOTE)
    image = g.add("LoadImage", image=IMAGE)["IMAGE"]
    ckpt = g.add("CheckpointLoaderSimple", ckpt_name=CHECKPOINT)
    _, refined = segment(g, image, ckpt, class_names="dog, cat, grass, sky, tree", captioner=False)
    g.add("SaveImage", title="Save preview", images=refined["preview"], filename_prefix="freeseg/vocabulary_preview")
    save_masks(g, refined["masks"], "freeseg/vocabulary_mask")
    g.add("PreviewAny", title="Labels (one per mask)", source=refined["labels"])
    g.add("PreviewAny", title="Segments (JSON)", source=refined["json"])
    save_segments(g, refined, image, "freeseg/vocabulary_segments")


def freeseg_batch(g: Graph) -> None:
    g.note("## Several images in one run\n"
           "The images are batched (*Batch Images* resizes the later ones to the first one's size) "
           "and every node handles the batch image by image: one caption and class list per image, "
           "masks named from that image's list. *union* has one mask per image (all its named "
           "segments); *masks* has one per named segment, and the JSON's `image` field tells which "
           "image each belongs to.\n\n" + MODELS_NOTE)
    images = [g.add("LoadImage", title=f"Load image {i}", image=IMAGE)["IMAGE"] for i in (1, 2, 3)]
    pair = g.add("ImageBatch", title="Batch images 1 and 2", image1=images[0], image2=images[1])
    batch = g.add("ImageBatch", title="Batch images 1, 2 and 3", image1=pair["IMAGE"], image2=images[2])["IMAGE"]
    ckpt = g.add("CheckpointLoaderSimple", ckpt_name=CHECKPOINT)
    caption, refined = segment(g, batch, ckpt)
    g.add("PreviewAny", title="Captions (one per image)", source=caption["captions"])
    g.add("SaveImage", title="Save previews", images=refined["preview"], filename_prefix="freeseg/batch_preview")
    save_masks(g, refined["union"], "freeseg/batch_union", what="one mask per image")
    save_masks(g, refined["masks"], "freeseg/batch_mask", what="every named mask")
    g.add("PreviewAny", title="Labels (one per mask)", source=refined["labels"])
    g.add("PreviewAny", title="Segments (JSON, with image index)", source=refined["json"])
    save_segments(g, refined, batch, "freeseg/batch_segments")


WORKFLOWS_DEFS = {f.__name__: f for f in (freeseg_full, freeseg_inpaint, freeseg_cutout, freeseg_vocabulary,
                                          freeseg_batch)}


def freeseg_video(g: Graph) -> None:
    g.note("## A video, one labelling for the whole clip\n"
           "*Get Video Components* turns the clip into a batch of frames. *Cluster Masks* has "
           "`shared_batch` on: all frames are clustered together, so a segment keeps its index, colour "
           "and name in every frame (off, each frame is clustered on its own and indices jump around). "
           "*CLIP Label* then names each segment once for the clip. `n_clusters` 0 picks the number of "
           "segments from the features (up to `max_clusters`).\n\n"
           "Outputs: the coloured preview as a video, and one mask per frame from *Select Mask* (here "
           "segment 0, the one at the top-left pixel of the first frame: type names, indices or points), "
           "and the JSON (`image` = frame index). Long clips: trim them first (every frame is one UNet "
           "pass and one CLIP pass).\n\n" + MODELS_NOTE)
    video = g.add("LoadVideo", file=VIDEO)
    parts = g.add("GetVideoComponents", video=video["VIDEO"])
    frames = parts["images"]
    ckpt = g.add("CheckpointLoaderSimple", ckpt_name=CHECKPOINT)
    clip_model = g.add("FreeSegCLIPLoader", model_name=OPEN_CLIP)
    blip2 = g.add("FreeSegBLIP2Loader", model_name=BLIP)
    caption = g.add("FreeSegCaption", image=frames, blip2=blip2["blip2"], class_names="")
    feats = g.add("FreeSegDiffusionFeatures", model=ckpt["MODEL"], vae=ckpt["VAE"], image=frames, clip=ckpt["CLIP"],
                  timestep=0, resolution=512, source="cross_attn_queries", seed=0, detail="paper")
    clusters = g.add("FreeSegClusterMasks", features=feats["features"], n_clusters=0, method="kmeans", seed=0,
                     max_clusters=8, k_from="n_clusters", class_offset=1, shared_batch=True)
    labelled = g.add("FreeSegCLIPLabel", segments=clusters["segments"], image=frames,
                     clip_model=clip_model["clip_model"], class_names=caption["class_names"], crop_mode="masked",
                     prompt="bare", threshold=0.0)
    refined = g.add("FreeSegRefineMasks", segments=labelled["segments"], image=frames)
    g.add("PreviewAny", title="Labels (one per mask)", source=refined["labels"])
    g.add("PreviewAny", title="Segments (JSON, image = frame)", source=refined["json"])
    g.band()
    clip_out = g.add("CreateVideo", images=refined["preview"], fps=parts["fps"])
    g.add("SaveVideo", title="Save preview video", video=clip_out["VIDEO"], filename_prefix="freeseg/video_preview",
          format="auto", codec="auto")
    save_segments(g, refined, frames, "freeseg/video")
    picked = g.add("FreeSegSelectMask", segments=refined["segments"], labels="0")
    save_masks(g, picked["mask"], "freeseg/video_mask", what="the selected segment, frame by frame")


WORKFLOWS_DEFS["freeseg_video"] = freeseg_video  # beyond the paper: batch-shared clustering


def freeseg_generate(g: Graph) -> None:
    g.note("## Generate, then segment what you generated, for free\n"
           "*Capture Features* hands the KSampler a patched copy of the model that records the "
           "FreeSeg-Diff features of the sampler's last UNet call: no extra UNet pass, no VAE encode, "
           "and the image is the same as with the plain model. *Captured Features* turns that record "
           "and the sampler's latent into the features *Cluster Masks* takes. CLIP names the masks "
           "from *CLIP Label*'s class names; *Select Mask* picks the `dog` and the same checkpoint "
           "repaints it from the inpaint prompt.\n\n"
           "If *Captured Features* asks you to run the sampler again (its result came from ComfyUI's "
           "cache), change the seed or queue again after a change upstream.\n\n" + MODELS_NOTE)
    ckpt = g.add("CheckpointLoaderSimple", ckpt_name=CHECKPOINT)
    capture = g.add("FreeSegCaptureFeatures", model=ckpt["MODEL"], keep="last_call", sigma=0.0292,
                    source="cross_attn_queries", detail="paper")
    prompt = g.add("CLIPTextEncode", title="Prompt", text="a photo of a dog on the grass under a tree",
                   clip=ckpt["CLIP"])
    negative = g.add("CLIPTextEncode", title="Negative prompt", text="blurry, low quality", clip=ckpt["CLIP"])
    empty = g.add("EmptyLatentImage", width=512, height=512, batch_size=1)
    sampled = g.add("KSampler", model=capture["model"], positive=prompt["CONDITIONING"],
                    negative=negative["CONDITIONING"], latent_image=empty["LATENT"], seed=0, steps=20, cfg=7.0,
                    sampler_name="euler", scheduler="normal", denoise=1.0, controls={"seed": "randomize"})
    image = g.add("VAEDecode", samples=sampled["LATENT"], vae=ckpt["VAE"])["IMAGE"]
    g.add("SaveImage", title="Save generated image", images=image, filename_prefix="freeseg/generated")
    feats = g.add("FreeSegCapturedFeatures", capture=capture["capture"], latent=sampled["LATENT"])
    clusters = g.add("FreeSegClusterMasks", features=feats["features"], n_clusters=4, method="kmeans", seed=0)
    clip_model = g.add("FreeSegCLIPLoader", model_name=OPEN_CLIP)
    labelled = g.add("FreeSegCLIPLabel", segments=clusters["segments"], image=image,
                     clip_model=clip_model["clip_model"], class_names="dog, grass, tree, sky", crop_mode="masked",
                     prompt="bare", threshold=0.0)
    refined = g.add("FreeSegRefineMasks", segments=labelled["segments"], image=image)
    g.add("PreviewAny", title="Labels", source=refined["labels"])
    g.add("SaveImage", title="Save preview", images=refined["preview"], filename_prefix="freeseg/generate_preview")
    save_segments(g, refined, image, "freeseg/generate_segments")
    g.band()
    inpaint_named(g, ckpt, image, refined, negative, steps=20, prefix="freeseg/generate_inpaint", titled=True)


WORKFLOWS_DEFS["freeseg_generate"] = freeseg_generate  # issue 20: features captured while sampling


DIT_NOTE = (
    "Timestep and resolution are the family's defaults (`freeseg.dit.FAMILIES`, README \"DiT checkpoints\"): "
    "the features are the image tokens of {blocks}, {source}. The text encoder only encodes the empty "
    "prompt the pass is conditioned on.\n\n"
    "**Models** (nothing is downloaded unless you switch `download` on in a loader; the frontend offers "
    "the downloads of the missing files):\n{files}"
    f"* `models/blip/{BLIP}/` and `models/open_clip/{OPEN_CLIP}`: the captioner and CLIP of the other "
    "FreeSeg workflows.\n")


def freeseg_flux(g: Graph) -> None:
    g.note("## FreeSeg on a Flux.1 checkpoint (dev or schnell; Chroma)\n"
           "The diffusion model, its two text encoders and its VAE are loaded as in ComfyUI's own Flux "
           "templates. " + DIT_NOTE.format(
               blocks="Flux's double-stream blocks 15-18 (of 19), averaged by concatenation",
               source="as in ConceptAttention (ICML 2025), on the image noised to t = 0.5; the pass stops "
                      "after block 18 (the 38 single-stream blocks never run)",
               files=f"* `models/diffusion_models/{FLUX_UNET}` (or flux1-schnell, any Flux.1 fine-tune);\n"
                     f"* `models/text_encoders/{CLIP_L}` and `{T5XXL}` (the fp8 T5 works too);\n"
                     f"* `models/vae/{FLUX_VAE}`;\n"), size=(460, 420))
    image = g.add("LoadImage", image=IMAGE)["IMAGE"]
    unet = g.add("UNETLoader", unet_name=FLUX_UNET, weight_dtype="default")
    clip = g.add("DualCLIPLoader", clip_name1=CLIP_L, clip_name2=T5XXL, type="flux")
    vae = g.add("VAELoader", vae_name=FLUX_VAE)
    caption, refined = segment_with(g, image, unet["MODEL"], vae["VAE"], clip["CLIP"], timestep=500,
                                    resolution=1024)
    full_outputs(g, refined, caption, image, "freeseg/flux")


def freeseg_sd3(g: Graph) -> None:
    g.note("## FreeSeg on an SD3.5 / SD3 checkpoint\n"
           "One checkpoint file with the MMDiT, its VAE and its text encoders, as in ComfyUI's own SD3.5 "
           "templates (a checkpoint without text encoders: add a *TripleCLIPLoader* and connect its CLIP). "
           + DIT_NOTE.format(
               blocks="the MM-DiT joint block Seg4Diff calls the semantic grounding layer (block 9 of "
                      "SD3 medium's 24, at the same relative depth in SD3.5's 38)",
               source="at noise step 8 of a 28-step schedule as in Seg4Diff (NeurIPS 2025); the pass stops "
                      "after that block",
               files=f"* `models/checkpoints/{SD35_CHECKPOINT}` (or sd3.5_medium / sd3_medium_incl_clips);\n"),
           size=(460, 400))
    image = g.add("LoadImage", image=IMAGE)["IMAGE"]
    ckpt = g.add("CheckpointLoaderSimple", ckpt_name=SD35_CHECKPOINT)
    caption, refined = segment_with(g, image, ckpt["MODEL"], ckpt["VAE"], ckpt["CLIP"], timestep=714,
                                    resolution=1024)
    full_outputs(g, refined, caption, image, "freeseg/sd3")


WORKFLOWS_DEFS["freeseg_flux"] = freeseg_flux  # issue 22: DiT checkpoints
WORKFLOWS_DEFS["freeseg_sd3"] = freeseg_sd3


def freeseg_sam3(g: Graph) -> None:
    g.note("## FreeSeg names the parts, SAM 3 draws them\n"
           "FreeSeg-Diff finds and names the parts as in *freeseg_full*; its `bboxes` output (one box per "
           "named segment: x, y, width, height in pixels, label, score) prompts core *SAM3 Detect*, which "
           "draws a sharp mask inside each box (`individual_masks` on, no text conditioning: one mask per "
           "box, in box order). SAM 3 returns no names for box prompts; *Name Masks* gives each mask the "
           "label and score of its box, with the same outputs as *Refine Masks*. *Draw BBoxes* shows "
           "FreeSeg's boxes.\n\n"
           "Needs a ComfyUI with core SAM 3 (SAM3 Detect, 2026 and later) and a SAM 3 or SAM 3.1 "
           f"checkpoint in `models/checkpoints/` (here `{SAM3_CHECKPOINT}`, the name of core ComfyUI's "
           "SAM 3 templates).\n\n" + MODELS_NOTE)
    image = g.add("LoadImage", image=IMAGE)["IMAGE"]
    ckpt = g.add("CheckpointLoaderSimple", ckpt_name=CHECKPOINT)
    _, refined = segment(g, image, ckpt)
    g.add("PreviewAny", title="FreeSeg labels", source=refined["labels"])
    g.add("PreviewImage", title="FreeSeg boxes",
          images=g.add("DrawBBoxes", image=image, bboxes=refined["bboxes"])["out_image"])
    g.band()
    sam = g.add("CheckpointLoaderSimple", title="Load SAM 3", ckpt_name=SAM3_CHECKPOINT)
    drawn = g.add("SAM3_Detect", model=sam["MODEL"], image=image, bboxes=refined["bboxes"], threshold=0.5,
                  refine_iterations=2, individual_masks=True)
    named = g.add("FreeSegNameMasks", masks=drawn["masks"], bboxes=refined["bboxes"], image=image)
    g.add("SaveImage", title="Save preview", images=named["preview"], filename_prefix="freeseg/sam3_preview")
    save_masks(g, named["masks"], "freeseg/sam3_mask")
    g.add("PreviewAny", title="Labels (one per mask)", source=named["labels"])
    g.add("PreviewAny", title="Segments (JSON)", source=named["json"])
    save_segments(g, named, image, "freeseg/sam3_segments")


# Workflows that need core SAM 3: written from a server that has SAM3_Detect (0.33.0 tree).
SAM3_WORKFLOWS = {"freeseg_sam3": freeseg_sam3}


def build_all(object_info: dict) -> dict[str, tuple[dict, dict]]:
    """{name: (UI workflow, API prompt)} of the workflows this server's `/object_info` writes:
    SAM3_WORKFLOWS when it has SAM3_Detect, else all the others."""
    out = {}
    wanted = SAM3_WORKFLOWS if "SAM3_Detect" in object_info else WORKFLOWS_DEFS
    for name, describe in wanted.items():
        g = Graph(object_info, name)
        describe(g)
        out[name] = (g.ui(), g.api())
    return out


def dumps(data: dict) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


def files(object_info: dict) -> dict[str, str]:
    """{path relative to the repository: text} of every file this script writes."""
    out = {}
    for name, (ui, api) in build_all(object_info).items():
        out[f"workflows/{name}.json"] = dumps(ui)
        out[f"workflows/api/{name}.json"] = dumps(api)
    return out


def load_object_info(path: str | None, server: str | None) -> dict:
    if server:
        with urllib.request.urlopen(server.rstrip("/") + "/object_info", timeout=60) as resp:
            return json.loads(resp.read())
    if not os.path.isfile(path):
        sys.exit(f"--object-info {path}: no such file")
    with open(path) as f:
        return json.load(f)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--object-info", help="a saved /object_info of ComfyUI (0.3.75, or the 0.33.0 tree for "
                        "the SAM 3 workflows) with this pack")
    source.add_argument("--server", help="read /object_info from this running ComfyUI with this pack")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a file differs")
    args = parser.parse_args(argv)
    wanted = files(load_object_info(args.object_info, args.server))
    stale = []
    for rel, text in wanted.items():
        path = os.path.join(REPO, rel)
        current = open(path).read() if os.path.isfile(path) else None
        if current == text:
            continue
        stale.append(rel)
        if not args.check:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                f.write(text)
    verb = "differ" if args.check else "written"
    print(f"{len(stale)} of {len(wanted)} files {verb}" + "".join(f"\n  {p}" for p in stale))
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
