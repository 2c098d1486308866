"""FreeSeg-Diff through ComfyUI as the evaluator's Segmenter: ``python -m freeseg eval --backend comfyui``.

`ComfySegmenter` is a ``freeseg.eval.sources.Segmenter`` that runs an API workflow (default
``workflows/api/freeseg_full.json``) on one or several ComfyUI servers, so any checkpoint family
the nodes support (SD1.x, SD2.x, SDXL; a workflow with UNETLoader + VAELoader for a bare SDXL
UNet) is scored the same way as the diffusers backend:

    segmenter = ComfySegmenter.connect(["http://gpu0:8188", "http://gpu1:8188"], per_server=2)
    result = evaluate(dataset, segmenter, mode="open", workers=segmenter.workers)
    segmenter.close()

It is thread-safe: the evaluator calls it from `workers` threads. One server without `ray` is
used from this process; several servers, or `ray` (an address, "" for a local Ray), run as Ray
actors bound to the servers (``freeseg.app.cluster.RayWorkers``: a worker whose server is lost
is restarted or dropped by Ray, its images go to the others).
Closed mode needs a captioner in the workflow (FreeSegBLIP2Loader); open mode passes the
dataset's class names as the workflow's class names (added to the caption's nouns, as the
diffusers backend does).
"""

from __future__ import annotations

import os
import tempfile
from typing import Any, Callable, Optional, Sequence

import numpy as np
from PIL import Image

from .client import DEFAULT_URL, ComfyClient, ComfyError
from .cluster import RayWorkers, WorkerSpec, read_bytes
from .output import SegmentError
from .paths import DEFAULT_WORKFLOW
from .remote import Segmentation, WorkflowJob, check_servers
from .settings_options import apply_settings, setting_values
from .workflow import load_workflow, parse_override

# What a comfyui evaluation may raise that is the user's to fix (printed without a traceback).
EVAL_ERRORS = (ComfyError, SegmentError)


class ComfySegmenter:
    """``segmenter(image [H,W,3] float 0..1, vocabulary) -> (masks [K,H,W] bool, K labels)``
    through `job`: ``run(image_path, class_names)`` runs it on a server (`connect`); `servers`
    (``{url: /object_info}`` of the servers used) must all run the same prompt. ``cache_key``
    names the filled workflow (models and settings), ``workers`` how many calls may run at once,
    ``close()`` ends what `connect` started (the Ray actors)."""

    def __init__(self, job: WorkflowJob, servers: dict, run: Callable[[str, Optional[str]], Segmentation],
                 workers: int, close: Callable[[], Any] = lambda: None):
        self.job = job
        self.run = run
        self.workers = max(1, workers)
        self.close = close
        self.cache_key = check_servers(servers, job)
        self.captions = any(n["class_type"] == "FreeSegBLIP2Loader" for n in job.workflow.values())

    @classmethod
    def connect(cls, urls: Sequence[str], per_server: int = 2, workflow: str = DEFAULT_WORKFLOW,
                settings: Optional[dict] = None, ray: Optional[str] = None, **job) -> "ComfySegmenter":
        """Connect to the servers and check they can run the workflow; `settings` are
        ``FreeSegSettings`` fields written into the workflow (``settings_options.apply_settings``,
        SegmentError naming one the workflow cannot hold), `job` are `WorkflowJob` fields
        (n_clusters, seed, models, overrides, timeout). `ray`: see the module docstring."""
        filled = WorkflowJob(apply_settings(load_workflow(workflow), settings or {}), **job)
        unique = list(dict.fromkeys(u.rstrip("/") for u in urls))
        if ray is None and len(unique) == 1:
            url = unique[0]
            info = ComfyClient(url).object_info()
            return cls(filled, {url: info},
                       lambda path, names: filled.run(ComfyClient(url), info, path, class_names=names), per_server)
        workers = RayWorkers([WorkerSpec("url", url=u) for u in unique], per_worker=per_server, address=ray or None)
        try:
            servers = {d["url"]: d["info"] for d in workers.describe.values()}
            return cls(filled, servers, lambda path, names: workers.run("segment", filled, *read_bytes(path), names),
                       workers.capacity, close=workers.close)
        except BaseException:
            workers.close()
            raise

    def __call__(self, image: np.ndarray, vocabulary: Optional[Sequence[str]] = None) -> tuple[np.ndarray, list[str]]:
        if vocabulary is None and not self.captions:
            raise ValueError("closed-vocabulary mode needs a captioner: the workflow has no FreeSegBLIP2Loader "
                             "(use --mode open, or a workflow that captions)")
        pixels = np.clip(np.asarray(image, dtype=np.float32) * 255.0 + 0.5, 0, 255).astype(np.uint8)
        fd, path = tempfile.mkstemp(prefix="freeseg-eval-", suffix=".png")
        os.close(fd)
        names = ", ".join(vocabulary) if vocabulary is not None else None
        try:
            Image.fromarray(pixels[..., :3]).save(path)
            result = self.run(path, names)
        finally:
            os.remove(path)
        h, w = pixels.shape[:2]
        masks = np.stack(result.masks) if result.masks else np.zeros((0, h, w), dtype=bool)
        if masks.shape[1:] != (h, w):
            raise SegmentError(f"the server returned {masks.shape[2]}x{masks.shape[1]} masks for a {w}x{h} image")
        return masks, result.labels

def segmenter_from_args(args) -> ComfySegmenter:
    """The ComfySegmenter of ``python -m freeseg eval --backend comfyui`` options (argparse
    namespace: url, per_server, ray, workflow, checkpoint, blip2, clip, clusters, seed, resolution,
    settings (``--setting``), overrides, timeout)."""
    if args.per_server < 1:
        raise ValueError("--per-server must be >= 1")
    models = {role: str(getattr(args, role)) for role in ("checkpoint", "blip2", "clip")
              if getattr(args, role) is not None}
    overrides = [parse_override(o) for o in args.overrides]
    if args.resolution is not None:
        overrides.insert(0, ("FreeSegDiffusionFeatures", "resolution", args.resolution))
    return ComfySegmenter.connect(args.url or [DEFAULT_URL], per_server=args.per_server, ray=args.ray,
                                  workflow=args.workflow or DEFAULT_WORKFLOW,
                                  settings=setting_values(args, shorthands=False), n_clusters=args.clusters,
                                  seed=args.seed, models=models, overrides=overrides, timeout=args.timeout)
