"""One image through a FreeSeg-Diff workflow on a ComfyUI server.

`WorkflowJob` holds what every image of a run shares (the API workflow, class names, cluster
count, seed, model names, ``--set`` overrides); `WorkflowJob.run` uploads one image, runs the
filled workflow and collects its results as a `Segmentation`, which `Segmentation.write` turns
into the output folder of ``freeseg.app.output.write_segmentation``.

The filled prompt depends only on the job and the image (never on the server), so two servers
with the same models give the same prompt; `WorkflowJob.key` names it (resume markers, caches).
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
from PIL import Image

from ..names import parse_names
from .client import ComfyClient, ComfyError
from .console import ProgressBar
from .output import SegmentError, write_segmentation
from .settings_options import settings_in_workflow
from .workflow import (MODEL_CHOICES, choose_models, ensure_outputs, fill_workflow, missing_node_types,
                       missing_nodes_message, output_text)

LOADER_TYPES = {spec[1] for spec in MODEL_CHOICES.values()}

def upload_name(path: str) -> str:
    """A content-addressed upload name (`freeseg-<sha1>.<ext>`), so re-running the same image
    does not add files and never overwrites a different picture on the server."""
    with open(path, "rb") as f:
        digest = hashlib.sha1(f.read()).hexdigest()[:16]
    return f"freeseg-{digest}{os.path.splitext(path)[1].lower() or '.png'}"


def execute(client: ComfyClient, prompt: dict, timeout: float = 3600.0, quiet: bool = False) -> dict:
    """Run the prompt with a progress bar on stderr (unless `quiet`); returns the history entry."""
    bar = None if quiet else ProgressBar(prompt)
    try:
        return client.run(prompt, timeout=timeout, on_event=bar, strict=True)
    except ComfyError as e:
        e.prompt = prompt
        raise
    finally:
        if bar is not None:
            bar.close()


def binary_mask(image: Image.Image) -> np.ndarray:
    """A saved mask image (any mode) -> HxW bool (above half intensity)."""
    return np.asarray(image.convert("L")) >= 128


@dataclass
class Segmentation:
    """What one run of the workflow produced for one image.

    masks: one HxW bool array per named mask (the image's size); records: one dict per mask
    (``label``, ``score``, ...; the FreeSegRefineMasks json output); overlay: the labelled preview;
    caption / class_names: the caption and the names the masks were named from."""

    masks: list[np.ndarray]
    records: list[dict]
    overlay: Image.Image
    caption: str
    class_names: list[str]
    settings: dict
    seconds: float

    @property
    def labels(self) -> list[str]:
        """One label per mask."""
        return [str(r["label"]) for r in self.records]

    def write(self, out_dir: str, image_path: str) -> dict:
        """Write the output folder (masks, overlay.png, labels.json); returns the labels document."""
        return write_segmentation(out_dir, image_path, self.masks, self.records, self.overlay, self.caption,
                                  self.class_names, backend="comfyui", settings=self.settings,
                                  timings={"total": round(self.seconds, 4)})


def collect(client: ComfyClient, entry: dict, roles: dict, prompt: dict, seconds: float) -> Segmentation:
    """The Segmentation of a finished run (history `entry`; `roles` from ``ensure_outputs``)."""
    text = output_text(entry, roles["json"])
    if text is None:
        raise SegmentError("the run produced no labels JSON (FreeSegRefineMasks json output)")
    records = json.loads(text)
    outputs = entry.get("outputs", {})
    mask_files = (outputs.get(roles["masks"]) or {}).get("images", [])
    masks = [binary_mask(Image.open(io.BytesIO(client.view(f)))) for f in mask_files]
    previews = (outputs.get(roles["preview"]) or {}).get("images", [])
    if not previews:
        raise SegmentError("the run produced no overlay image (FreeSegRefineMasks preview output)")
    overlay = Image.open(io.BytesIO(client.view(previews[0]))).convert("RGB")
    caption = (output_text(entry, roles.get("captions")) or "").strip().splitlines()
    names_text = (output_text(entry, roles.get("class_names")) or "").strip().splitlines()
    names = parse_names(names_text[0]) if names_text else []
    if not names:
        names = sorted({r["label"] for r in records})
    return Segmentation(masks, records, overlay, caption[0] if caption else "", names, settings_in_workflow(prompt),
                        seconds)


@dataclass
class WorkflowJob:
    """The settings every image of a run shares.

    Args:
        workflow: an API-format workflow (``workflow.load_workflow``).
        class_names: names added to the caption's nouns (comma-separated), or None.
        n_clusters / seed: FreeSegClusterMasks (and the features' noise seed), or None = the workflow's.
        models: ``{"checkpoint"|"blip2"|"clip": name}`` that must be on the server.
        overrides: ``(class, input, value)`` triples (``--set``).
        timeout: seconds one image may take on a server.
    """

    workflow: dict
    class_names: Optional[str] = None
    n_clusters: Optional[int] = None
    seed: Optional[int] = None
    models: dict = field(default_factory=dict)
    overrides: list = field(default_factory=list)
    timeout: float = 3600.0

    def prompt(self, object_info: dict, url: str, image: Optional[str] = None,
               class_names: Optional[str] = None) -> tuple[dict, dict]:
        """(prompt, roles) for the server whose /object_info is `object_info`: the workflow
        filled (image name `image`, `class_names` instead of the job's when given), its models
        checked / picked, output nodes added. ComfyError when the server cannot run it."""
        missing = missing_node_types(self.workflow, object_info)
        if missing:
            raise ComfyError(missing_nodes_message(missing, url))
        names = class_names if class_names is not None else self.class_names
        prompt = fill_workflow(self.workflow, image=image, class_names=names, n_clusters=self.n_clusters,
                               seed=self.seed, overrides=self.overrides)
        return ensure_outputs(choose_models(prompt, object_info, url, self.models))

    def key(self, object_info: dict, url: str, class_names: Optional[str] = None) -> str:
        """A digest of the filled prompt without its image: equal on servers that run the same
        thing, changed by any setting or model name (``"comfyui-<16 hex>"``)."""
        prompt, _ = self.prompt(object_info, url, class_names=class_names)
        clean = copy.deepcopy(prompt)
        for node in clean.values():
            node.pop("_meta", None)
            if node["class_type"] == "LoadImage":
                node["inputs"].pop("image", None)
        digest = hashlib.sha256(json.dumps(clean, sort_keys=True).encode()).hexdigest()[:16]
        return f"comfyui-{digest}"

    def run(self, client: ComfyClient, object_info: dict, image_path: str, class_names: Optional[str] = None,
            quiet: bool = True) -> Segmentation:
        """Upload `image_path`, run the filled workflow on `client`'s server (a progress bar on
        stderr unless `quiet`) and collect the results. Raises ComfyError / SegmentError."""
        prompt, roles = self.prompt(object_info, client.url, class_names=class_names)
        image = client.upload_image(image_path, name=upload_name(image_path))
        prompt = fill_workflow(prompt, image=image)
        start = time.perf_counter()
        entry = execute(client, prompt, timeout=self.timeout, quiet=quiet)
        return collect(client, entry, roles, prompt, time.perf_counter() - start)


def check_servers(servers: dict[str, dict], job: WorkflowJob, class_names: Optional[str] = None) -> str:
    """The job's key, after checking every server (``{url: its /object_info}``) can run it and
    would run the same prompt (same model names): outputs must not depend on the server.
    ComfyError otherwise."""
    keys = {url: job.key(info, url, class_names) for url, info in servers.items()}
    if len(set(keys.values())) > 1:
        models = {url: {n["class_type"]: n["inputs"] for n in job.prompt(info, url)[0].values()
                        if n["class_type"] in LOADER_TYPES} for url, info in servers.items()}
        raise ComfyError("the servers would run different prompts (different models?): "
                         + "; ".join(f"{url}: {json.dumps(m, sort_keys=True)}" for url, m in models.items())
                         + " - give the models by name (--checkpoint, --blip2, --clip) or use servers with the "
                           "same models")
    return next(iter(keys.values()))
