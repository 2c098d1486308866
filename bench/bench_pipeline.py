"""The freeseg_full graph at real model sizes through a real ComfyUI server, against its
irreducible passes measured side by side on the same server.

Usage::

    nice -n 5 .venv/bin/python bench/bench_pipeline.py             # 512 px, batch 4 (long)
    nice -n 5 .venv/bin/python bench/bench_pipeline.py --batch 2   # 512 px, batch 2
    nice -n 5 .venv/bin/python bench/bench_pipeline.py --quick     # 256 px, batch 2, 10-token captions
    nice -n 5 .venv/bin/python bench/bench_pipeline.py --fixtures --quick  # the script itself, minutes
    nice -n 5 .venv/bin/python bench/bench_pipeline.py --sdxl   # 1024 px, batch 1
    nice -n 5 .venv/bin/python bench/bench_pipeline.py --blip2  # BLIP-2 captioner
    nice -n 5 .venv/bin/python bench/bench_pipeline.py --sdxl --fixtures --quick   # their code paths, minutes
    nice -n 5 .venv/bin/python bench/bench_pipeline.py --blip2 --fixtures --quick [--caption-only]
    nice -n 5 .venv/bin/python bench/bench_pipeline.py --capture   # capture while sampling, 512 px, 20 steps
    nice -n 5 .venv/bin/python bench/bench_pipeline.py --capture --fixtures --quick   # its code path

``--capture`` runs something else than the rest: a text-to-image generation (SD1.5, 20 steps,
cfg 7) with and without Capture Features, each followed by its segmentation (the old way:
Diffusion Features on the decoded image; with capture: Captured Features), in pairs A B A B
with medians (``main_capture``); asserted: the generated latents and images equal bit for
bit, and cosine >= 0.99 per block between the captured features and Diffusion Features on the
same final latent at the same sigma.
    nice -n 5 .venv/bin/python bench/bench_pipeline.py --flux   # Flux blocks at real width (bench/bench_dit.py)
    nice -n 5 .venv/bin/python bench/bench_pipeline.py --sd3    # SD3 medium (bench/bench_dit.py)

What it does:

1. Builds once (cached in ``$FREESEG_BENCH_CACHE`` or ``~/.cache/freeseg-bench``, outside git)
   random-weight models at the real architectures and on-disk formats
   (``bench/realsize_models.py``, in a subprocess): an SD1.5 single-file LDM checkpoint (real
   UNet, KL VAE, CLIP-L), open_clip ViT-B-32, BLIP base; with ``--sdxl`` an SDXL base
   single-file checkpoint (real UNet, KL VAE, CLIP-L + OpenCLIP bigG) instead of SD1.5, with
   ``--blip2`` a BLIP-2 of the OPT-2.7B shape instead of BLIP base. ``--fixtures``: the test
   fixtures (``--sdxl``: their reduced SDXL-family UNet with the full-size text encoders).

   Memory first: before building and again before starting the server it estimates what the
   CPU server will hold (parameters x the bytes of the dtype ComfyUI and the pack use on the
   CPU: fp32 UNet, VAE and captioner, fp16 text encoders; plus activations, the process and a
   margin) against MemAvailable. When the full graph does not fit it prints both figures and
   skips (exit 0; the JSON line says ``"skipped": true`` and why), except ``--blip2``, which
   then runs the caption stage alone (``--caption-only`` forces that layout): the BLIP-2
   loader and FreeSegCaption against the captioner's bare ``generate``.
2. Starts ComfyUI (``freeseg.app.server.ComfyServer``, ``--cpu``) with the models linked into
   its ``models/`` folder, this pack, and the benchmark probes of ``bench/probe_pack``.
3. Runs ``workflows/api/freeseg_full.json`` (the graph users run) at ``--resolution`` with
   class names "dog, cat, tree": once cold (on a warm-up image; it also saves the features for
   the parity check), then once per image of a batch of ``--batch`` images, each followed by
   the BASELINE prompt on the first ``--baselines`` images: the irreducible passes, on the
   same server and models (loader inputs copied from the workflow, so no model reloads):

   * VAE encode: core ``VAEEncode`` (after a core ``ImageScale`` to the same square);
   * one UNet forward: core ``KSampler`` with 1 step, cfg 1.0 (ComfyUI skips the unconditional
     pass at cfg 1), euler: exactly one model call on the latent, empty-prompt conditioning;
   * caption: probe ``FreeSegBenchBareCaption``: the captioner's bare ``generate`` with the
     caption node's settings (30 new tokens, 3 beams);
   * CLIP: probe ``FreeSegBenchBareCLIP``: one ``encode_image`` batch of K views at the model's
     input size and one ``encode_text`` batch of the class names.

   Then the same graph again with only K changed (K+1: ComfyUI's cache keeps the caption and
   the features) and then only the refinement changed (crf -> guided), and finally (with 2
   images or more) one prompt with the whole batch of images (core ``ImageBatch``).
4. Times every node from the server's websocket ``executing`` messages (a node runs from its
   message to the next one), samples the server's RSS and CPU time every 20 ms
   (``/proc/<pid>/status``, ``/proc/<pid>/stat``). Every figure is given in wall seconds and in
   the server's CPU seconds: on a shared machine the CPU seconds move less with the load of
   other processes (``--threads 1`` makes them exact, without idle spinning of worker threads).
5. Stops the server and, at 512 px, checks the features of the warm-up image against the
   diffusers backend (``freeseg.backends.diffusers.FreeSegPipeline`` loading the same
   checkpoint): 6400 channels from input 7, 8 and output 3, 4, 5 at 32x32, cosine >= 0.999
   per block. With ``--sdxl``: the SDXL family, 6400 channels from input 7, 8 and output 0, 1,
   2 at resolution/16, and the diffusers backend refusing the checkpoint (it supports SD1.x /
   SD2.x only, so there is no SDXL parity check).

Ratios (medians over the images; each from passes of the same image in the same run; the
baseline runs on the first ``--baselines`` images, default 2):
pipeline / irreducible sum, features node / (VAEEncode + KSampler), re-run after changing only
K or only the refinement / full run, batch / sum of the single runs. The last line printed is
one JSON object with every figure. No figure is asserted except the real-size correctness
checks (channels, blocks, grid, parity); goals are printed next to the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script: the repository root importable
from freeseg.app.paths import REPO  # noqa: E402

CLASS_NAMES = "dog, cat, tree"
CKPT_NAME = "freeseg-bench-sd15.safetensors"
SDXL_CKPT_NAME = "freeseg-bench-sdxl.safetensors"
BLIP_NAME = "freeseg-bench-blip-base"
BLIP2_NAME = "freeseg-bench-blip2"
CLIP_NAME = "freeseg-bench-vit-b-32"
REAL_BLOCKS = ["input_7.attn2.to_q", "input_8.attn2.to_q", "output_3.attn2.to_q", "output_4.attn2.to_q",
               "output_5.attn2.to_q"]
# SDXL base: its latent/4 transformers (1280 channels, 10 blocks deep) are input 7, 8 and output 0, 1, 2.
SDXL_REAL_BLOCKS = ["input_7.attn2.to_q", "input_8.attn2.to_q", "output_0.attn2.to_q", "output_1.attn2.to_q",
                    "output_2.attn2.to_q"]
COS_MIN = 0.999
GOALS = {"pipeline_over_irreducible": 1.10, "features_over_vae_unet": 1.05, "rerun_k_over_full": 0.05,
         "rerun_refine_over_full": 0.05, "batch_over_singles": 1.0}
OUTPUT_TYPES = ("SaveImage", "MaskToImage", "PreviewAny")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """Command-line options; ``--quick`` halves the resolution and sets batch 2 unless given;
    ``--sdxl`` / ``--blip2`` default to batch 1 and 1 baseline (their passes take minutes)."""
    p = argparse.ArgumentParser(description="freeseg_full at real model sizes vs its irreducible passes")
    big = p.add_mutually_exclusive_group()
    big.add_argument("--sdxl", action="store_true", help="the SDXL base checkpoint instead of SD1.5 (default "
                     "resolution 1024, batch 1, 1 baseline); skipped when the memory it needs is not available")
    big.add_argument("--blip2", action="store_true", help="a BLIP-2 OPT-2.7B captioner instead of BLIP base "
                     "(batch 1, 1 baseline): the full graph with SD1.5 when the memory allows, else the caption "
                     "stage alone, else skipped")
    big.add_argument("--flux", action="store_true", help="Diffusion Features on Flux.1-dev's real-width blocks "
                     "(4 of them) vs VAE encode + one forward (bench/bench_dit.py; default resolution 512, batch 1)")
    big.add_argument("--sd3", action="store_true", help="the same on SD3 medium (bench/bench_dit.py)")
    p.add_argument("--quick", action="store_true", help="development run: half the resolution, batch 2 "
                   "(SD1.5 only)")
    p.add_argument("--resolution", type=int, default=None, help="features resolution (default 512, SDXL 1024; "
                   "quick: half)")
    p.add_argument("--batch", type=int, default=None, help="images of the batch run = single runs (default 4; "
                   "quick 2; --sdxl / --blip2 1: no batch run)")
    p.add_argument("--baselines", type=int, default=None, help="images (the first ones) that also get the "
                   "irreducible-passes prompt (default 2; --sdxl / --blip2 1)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="caption length of the graph and the bare "
                   "caption (default 30, the node default; quick 10)")
    p.add_argument("--n-clusters", type=int, default=4, help="K of the graph (the K-change run uses K+1)")
    p.add_argument("--cache", default=None, help="model cache (default $FREESEG_BENCH_CACHE or "
                   "~/.cache/freeseg-bench)")
    p.add_argument("--caption-only", action="store_true", help="run the caption stage alone against the bare "
                   "generate (what --blip2 does when the full graph does not fit in memory)")
    p.add_argument("--no-parity", action="store_true", help="skip the diffusers parity check")
    p.add_argument("--fixtures", action="store_true", help="use the reduced test fixtures instead of the real-size "
                   "models (checks the script in a few minutes; figures meaningless; no parity)")
    p.add_argument("--threads", type=int, default=None, help="torch threads of the server (OMP_NUM_THREADS; "
                   "default: torch's choice). On a loaded machine 1 makes CPU seconds reliable")
    p.add_argument("--keep", action="store_true", help="keep the server's base folder (log, outputs)")
    add_capture_args(p)
    args = p.parse_args(argv)
    big = args.sdxl or args.blip2 or args.flux or args.sd3
    if args.resolution is None:
        args.resolution = (1024 if args.sdxl else 512) // (2 if args.quick else 1)
    if args.batch is None:
        args.batch = 1 if big else 2 if args.quick else 4
    if args.max_new_tokens is None:
        args.max_new_tokens = 10 if args.quick else 30
    args.baselines = min(args.batch, (1 if big else 2) if args.baselines is None else args.baselines)
    if args.resolution < 128 or args.resolution % 64:
        p.error("--resolution must be a multiple of 64, at least 128")
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be >= 1")
    if args.batch < 1 or args.n_clusters < 2 or args.baselines < 1 or args.max_new_tokens < 1:
        p.error("--batch, --baselines and --max-new-tokens must be >= 1, --n-clusters >= 2")
    check_capture_args(p, args)
    return args


# ------------------------------------------------------------------------------------------
# Timing and memory
# ------------------------------------------------------------------------------------------

@dataclass
class Run:
    """One prompt: per-node (id, class, start) in execution order, the end, cached node ids."""
    name: str
    prompt: dict
    starts: list[tuple[str, float]] = field(default_factory=list)
    t_begin: float = 0.0
    t_end: float = 0.0
    cached: list[str] = field(default_factory=list)
    entry: dict = field(default_factory=dict)

    def on_event(self, kind: str, data: dict) -> None:
        now = time.monotonic()
        if kind == "execution_start":
            self.t_begin = now
        elif kind == "execution_cached":
            self.cached = list(data.get("nodes") or [])
        elif kind == "executing":
            if data.get("node") is None:
                self.t_end = now
            else:
                self.starts.append((str(data["node"]), now))

    @property
    def total(self) -> float:
        return self.t_end - self.t_begin

    def windows(self) -> list[tuple[str, str, float, float]]:
        """(node id, class type, start, end) of every executed node, in order."""
        return node_windows(self.starts, self.t_end, self.prompt)

    def seconds(self, class_type: str, sampler: Optional["ProcSampler"] = None) -> float:
        """Total wall seconds (CPU seconds of the server with ``sampler``) of the executed nodes
        of ``class_type`` (0.0 when none ran)."""
        return sum(span(start, end, sampler) for _, ct, start, end in self.windows() if ct == class_type)

    def total_seconds(self, sampler: Optional["ProcSampler"] = None) -> float:
        """Wall (or the server's CPU) seconds from ``execution_start`` to the end."""
        return span(self.t_begin, self.t_end, sampler)


def span(t0: float, t1: float, sampler: Optional["ProcSampler"] = None) -> float:
    """Wall seconds from t0 to t1, or the CPU seconds the sampled process used in between."""
    return t1 - t0 if sampler is None else sampler.cpu_at(t1) - sampler.cpu_at(t0)


def node_windows(starts: list[tuple[str, float]], t_end: float, prompt: dict) -> list[tuple[str, str, float, float]]:
    """Executing messages -> (node id, class type, start, end): a node runs until the next
    node's message (ComfyUI executes one node at a time) or the end of the prompt."""
    out = []
    for i, (node, start) in enumerate(starts):
        end = starts[i + 1][1] if i + 1 < len(starts) else t_end
        out.append((node, prompt.get(node, {}).get("class_type", "?"), start, end))
    return out


class ProcSampler:
    """Samples a process every ``interval`` s in a thread: RSS (bytes) and CPU time (user +
    system seconds, all threads). On a shared machine CPU seconds are steadier than wall
    seconds, so every ratio is reported in both."""

    def __init__(self, pid: int, interval: float = 0.02):
        self.pid, self.interval = pid, interval
        self.samples: list[tuple[float, int, float]] = []
        self._tick = os.sysconf("SC_CLK_TCK")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def read(self, key: str = "VmRSS") -> int:
        """A ``/proc/<pid>/status`` memory field in bytes (VmRSS now, VmHWM peak)."""
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        return 0

    def cpu(self) -> float:
        """User + system CPU seconds of the process so far."""
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / self._tick

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append((time.monotonic(), self.read(), self.cpu()))
            except OSError:
                return
            self._stop.wait(self.interval)

    def start(self) -> "ProcSampler":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)

    def at(self, t: float) -> int:
        """RSS of the last sample at or before ``t`` (the first sample when none is)."""
        before = [r for s, r, _ in self.samples if s <= t]
        return before[-1] if before else (self.samples[0][1] if self.samples else 0)

    def peak(self, t0: float, t1: float) -> int:
        inside = [r for s, r, _ in self.samples if t0 <= s <= t1]
        return max(inside + [self.at(t0), self.at(t1)])

    def cpu_at(self, t: float) -> float:
        """CPU seconds at ``t``, interpolated between the samples around it."""
        if not self.samples:
            return 0.0
        prev = next((x for x in reversed(self.samples) if x[0] <= t), self.samples[0])
        nxt = next((x for x in self.samples if x[0] >= t), self.samples[-1])
        if nxt[0] <= prev[0]:
            return prev[2]
        return prev[2] + (nxt[2] - prev[2]) * (t - prev[0]) / (nxt[0] - prev[0])


def node_memory(run: Run, sampler: ProcSampler, class_type: str) -> tuple[int, int]:
    """(RSS when the first ``class_type`` node of ``run`` started, peak RSS added during it)."""
    for _, ct, start, end in run.windows():
        if ct == class_type:
            base = sampler.at(start)
            return base, sampler.peak(start, end) - base
    return 0, 0


# ------------------------------------------------------------------------------------------
# Prompts
# ------------------------------------------------------------------------------------------

def write_image(path: Path, seed: int, width: int = 640, height: int = 480) -> Path:
    """A synthetic picture (gradient + a few flat discs), saved as PNG."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    img = np.stack([xx / (width - 1), yy / (height - 1), np.full(xx.shape, 0.3)], -1)
    for _ in range(3):
        cx, cy, r = rng.uniform(0.2, 0.8) * width, rng.uniform(0.2, 0.8) * height, rng.uniform(0.1, 0.25) * height
        img[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = rng.uniform(0, 1, 3)
    Image.fromarray((img * 255).astype(np.uint8)).save(path)
    return path


def node_id(prompt: dict, class_type: str) -> str:
    """The id of the only node of ``class_type``; KeyError otherwise."""
    ids = [k for k, v in prompt.items() if v["class_type"] == class_type]
    if len(ids) != 1:
        raise KeyError(f"expected one {class_type} node in the workflow, found {len(ids)}")
    return ids[0]


def full_prompt(image: str, resolution: int, k: int, refine: str = "crf", save_features: str = "",
                max_new_tokens: int = 30, ckpt: str = CKPT_NAME, captioner: str = BLIP_NAME) -> dict:
    """workflows/api/freeseg_full.json with the bench models (checkpoint ``ckpt``, captioner
    folder ``captioner``), ``image``, K and refinement; with ``save_features`` a probe also
    writes the features there."""
    from freeseg.app.paths import DEFAULT_WORKFLOW
    from freeseg.app.workflow import fill_workflow, load_workflow

    prompt = fill_workflow(load_workflow(DEFAULT_WORKFLOW), image=image,
                           class_names=CLASS_NAMES, n_clusters=k, checkpoint=ckpt, blip2=captioner,
                           clip=CLIP_NAME,
                           overrides=[("FreeSegDiffusionFeatures", "resolution", resolution),
                                      ("FreeSegRefineMasks", "method", refine),
                                      ("FreeSegCaption", "max_new_tokens", max_new_tokens)])
    if save_features:
        prompt["900"] = {"class_type": "FreeSegBenchSaveFeatures",
                         "inputs": {"features": [node_id(prompt, "FreeSegDiffusionFeatures"), 0],
                                    "path": save_features}}
    return prompt


def batch_prompt(images: list[str], resolution: int, k: int, max_new_tokens: int = 30, ckpt: str = CKPT_NAME,
                 captioner: str = BLIP_NAME) -> dict:
    """The full graph on a batch of ``images`` (equal sizes) joined with core ImageBatch nodes."""
    prompt = full_prompt(images[0], resolution, k, max_new_tokens=max_new_tokens, ckpt=ckpt, captioner=captioner)
    load = node_id(prompt, "LoadImage")
    current = [load, 0]
    for i, name in enumerate(images[1:], start=1):
        prompt[str(800 + i)] = {"class_type": "LoadImage", "inputs": {"image": name}}
        prompt[str(850 + i)] = {"class_type": "ImageBatch", "inputs": {"image1": current, "image2": [str(800 + i), 0]}}
        current = [str(850 + i), 0]
    batch_ids = {str(850 + i) for i in range(1, len(images))}
    for nid, node in prompt.items():
        if nid in batch_ids:
            continue
        for key, value in node["inputs"].items():
            if isinstance(value, list) and len(value) == 2 and value[0] == load:
                node["inputs"][key] = list(current)
    return prompt


def baseline_prompt(image: str, resolution: int, k: int, seed: int, max_new_tokens: int = 30,
                    ckpt: str = CKPT_NAME, captioner: str = BLIP_NAME) -> dict:
    """The irreducible passes on ``image`` with the same loaders (cache hits: their inputs are
    copied from ``full_prompt``, so neither graph reloads a model): ImageScale -> VAEEncode ->
    KSampler (1 step, cfg 1: one UNet forward), bare caption, bare CLIP batches."""
    full = full_prompt(image, resolution, k, max_new_tokens=max_new_tokens, ckpt=ckpt, captioner=captioner)
    loader = {ct: dict(full[node_id(full, ct)]["inputs"]) for ct in ("FreeSegBLIP2Loader", "FreeSegCLIPLoader")}
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": image}},
        "2": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "3": {"class_type": "ImageScale", "inputs": {"image": ["1", 0], "upscale_method": "bicubic",
                                                      "width": resolution, "height": resolution, "crop": "disabled"}},
        "4": {"class_type": "VAEEncode", "inputs": {"pixels": ["3", 0], "vae": ["2", 2]}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["2", 1]}},
        "6": {"class_type": "KSampler", "inputs": {"model": ["2", 0], "seed": seed, "steps": 1, "cfg": 1.0,
                                                    "sampler_name": "euler", "scheduler": "normal",
                                                    "positive": ["5", 0], "negative": ["5", 0],
                                                    "latent_image": ["4", 0], "denoise": 1.0}},
        "7": {"class_type": "FreeSegBenchSink", "inputs": {"value": ["6", 0]}},
        "8": {"class_type": "FreeSegBLIP2Loader", "inputs": loader["FreeSegBLIP2Loader"]},
        "9": {"class_type": "FreeSegBenchBareCaption", "inputs": {"blip2": ["8", 0], "image": ["1", 0],
                                                                   "max_new_tokens": max_new_tokens,
                                                                   "num_beams": 3}},
        "10": {"class_type": "FreeSegCLIPLoader", "inputs": loader["FreeSegCLIPLoader"]},
        "11": {"class_type": "FreeSegBenchBareCLIP", "inputs": {"clip_model": ["10", 0], "class_names": CLASS_NAMES,
                                                                 "n_views": k, "seed": seed}},
    }


CAPTION_TYPES = ("LoadImage", "FreeSegBLIP2Loader", "FreeSegCaption")


def caption_prompt(image: str, max_new_tokens: int = 30, captioner: str = BLIP_NAME) -> dict:
    """The caption stage of workflows/api/freeseg_full.json alone (its LoadImage, captioner
    loader and FreeSegCaption, settings as in the full graph, the class names shown)."""
    full = full_prompt(image, 512, 4, max_new_tokens=max_new_tokens, captioner=captioner)
    prompt = {nid: node for nid, node in full.items() if node["class_type"] in CAPTION_TYPES}
    caption = node_id(prompt, "FreeSegCaption")
    prompt["950"] = {"class_type": "PreviewAny", "inputs": {"source": [caption, 1]}}
    return prompt


def bare_caption_prompt(image: str, max_new_tokens: int = 30, captioner: str = BLIP_NAME) -> dict:
    """The captioner's bare ``generate`` on ``image`` (the irreducible caption pass), with the
    loader of ``caption_prompt`` (a cache hit)."""
    base = baseline_prompt(image, 512, 4, seed=0, max_new_tokens=max_new_tokens, captioner=captioner)
    return {nid: base[nid] for nid in ("1", "8", "9")}


# ------------------------------------------------------------------------------------------
# Models, server, parity
# ------------------------------------------------------------------------------------------

def build_models(cache: Optional[str], keys: list[str]) -> dict[str, str]:
    """Build (or find cached) the real-size models ``keys`` (of bench/realsize_models.py) in a
    subprocess; ``{key: path}``."""
    cmd = [sys.executable, os.path.join(REPO, "bench", "realsize_models.py")] + ([cache] if cache else []) + \
        ["--only", ",".join(keys)]
    out = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, text=True)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("MODELS=")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"building the real-size models failed ({out.returncode}):\n{out.stdout[-3000:]}")
    for ln in out.stdout.splitlines():
        if ln.startswith("built "):
            print(ln, flush=True)
    return json.loads(lines[-1][len("MODELS="):])


def fixture_models() -> dict[str, str]:
    """The reduced test fixtures (synthetic/cache.py) under the bench's keys (the fixture
    captioner is a tiny BLIP-2: both captioner keys)."""
    from synthetic.cache import build_all_subprocess

    paths = build_all_subprocess()
    return {"sd15": paths["sd15_ckpt"], "blip": paths["blip2_dir"], "blip2": paths["blip2_dir"],
            "open_clip": paths["open_clip_dir"]}


@dataclass
class Setup:
    """Which bench models a run uses: cache keys (of realsize_models.MODELS, or the fixtures')
    and the names the server lists them under."""
    ckpt_key: str
    captioner_key: str
    ckpt_name: str
    captioner_name: str

    @classmethod
    def of(cls, args: argparse.Namespace) -> "Setup":
        ckpt_key = ("sdxl_reduced" if args.fixtures else "sdxl") if args.sdxl else "sd15"
        return cls(ckpt_key, "blip2" if args.blip2 else "blip", SDXL_CKPT_NAME if args.sdxl else CKPT_NAME,
                   BLIP2_NAME if args.blip2 else BLIP_NAME)


def get_models(args: argparse.Namespace, setup: Setup) -> dict[str, str]:
    """``{"ckpt", "captioner", "open_clip": path}``: real-size models built once into the
    cache, or with ``--fixtures`` the test fixtures (and for ``--sdxl`` the reduced SDXL-family
    checkpoint of realsize_models, as no fixture is an SDXL single-file checkpoint)."""
    if args.fixtures:
        paths = fixture_models()
        if setup.ckpt_key not in paths:
            paths.update(build_models(args.cache, [setup.ckpt_key]))
    else:
        paths = build_models(args.cache, [setup.ckpt_key, "open_clip", setup.captioner_key])
    return {"ckpt": paths[setup.ckpt_key], "captioner": paths[setup.captioner_key], "open_clip": paths["open_clip"]}


# ------------------------------------------------------------------------------------------
# Memory check
# ------------------------------------------------------------------------------------------

# Parameters of the real-size recipes (bench/realsize_models.py), by what the server holds
# them in, for the check before a model is built; once built, the files' headers are counted.
NOMINAL_PARAMS: dict[str, dict[str, float]] = {
    "sd15": {"unet": 859.5e6, "vae": 83.7e6, "text": 123.1e6},
    "sdxl": {"unet": 2567.5e6, "vae": 83.7e6, "text": 817.7e6},
    "sdxl_reduced": {"unet": 76.3e6, "vae": 2.4e6, "text": 817.7e6},
    "blip": {"captioner": 224.0e6},
    "blip2": {"captioner": 3744.7e6},
    "open_clip": {"clip": 151.3e6},
}
# Bytes per parameter in the CPU server: ComfyUI upcasts the UNet and the VAE to float32 on the
# CPU (model_management.unet_dtype / vae_dtype) and keeps text encoders in float16
# (text_encoder_dtype); the pack's loaders use float32 on the CPU (nodes/common.model_dtype),
# open_clip loads in float32.
CPU_BYTES = {"unet": 4, "vae": 4, "text": 2, "captioner": 4, "clip": 4}
GIB = 2**30
# A CPU ComfyUI server with torch, transformers and open_clip imported, before models, plus
# allocator slack (the SD1.5 run settles at 6.2-6.5 GiB with 5.0 GiB of weights).
PROCESS_BASE = 1.3 * GIB
# Activations of the features node over the loaded models at 512 px (measured on SD1.5:
# +0.9..1.1 GiB; VAE encode and UNet pass), scaled with the pixel count; the caption pass.
FEATURES_ACTIVATIONS_512 = 1.0 * GIB
CAPTION_ACTIVATIONS = 0.5 * GIB
# Left free for the other processes of a shared machine.
MEMORY_MARGIN = 2.0 * GIB


def safetensors_params(path: str) -> dict[str, int]:
    """Parameter counts of a checkpoint file by part (unet: ``model.diffusion_model.*``, vae:
    ``first_stage_model.*``, text: the rest), or of every ``*.safetensors`` of a folder
    (``{"all": n}``), from the headers (nothing is loaded)."""
    from safetensors import safe_open

    files = [Path(path)] if Path(path).is_file() else sorted(Path(path).glob("*.safetensors"))
    counts: dict[str, int] = {}
    for file in files:
        with safe_open(str(file), "pt") as f:
            for key in f.keys():
                n = 1
                for d in f.get_slice(key).get_shape():
                    n *= d
                part = "all" if Path(path).is_dir() else "unet" if key.startswith("model.diffusion_model.") \
                    else "vae" if key.startswith("first_stage_model.") else "text"
                counts[part] = counts.get(part, 0) + n
    return counts


def model_params(key: str, path: Optional[str]) -> dict[str, float]:
    """Parameters of bench model ``key`` by part: counted in ``path`` when it exists, else the
    recipe's nominal counts."""
    nominal = NOMINAL_PARAMS[key]
    if not path or not Path(path).exists():
        return dict(nominal)
    counts = safetensors_params(path)
    if "all" in counts:
        return {next(iter(nominal)): float(counts["all"])}
    return {part: float(n) for part, n in counts.items()}


def memory_need(parts: dict[str, dict[str, float]], resolution: Optional[int]) -> dict[str, Any]:
    """Bytes the CPU server needs to hold the models ``parts`` (key -> part -> parameters) and
    run the graph: weights in the server's dtypes (``CPU_BYTES``) + the process base + the
    activations (features at ``resolution``, None: no features pass; the caption pass) + the
    margin. Returns the total and its terms (bytes)."""
    weights = {key: sum(n * CPU_BYTES[part] for part, n in p.items()) for key, p in parts.items()}
    act = CAPTION_ACTIVATIONS + (FEATURES_ACTIVATIONS_512 * (resolution / 512) ** 2 if resolution else 0.0)
    total = PROCESS_BASE + sum(weights.values()) + act + MEMORY_MARGIN
    return {"total": total, "weights": weights, "activations": act, "base": PROCESS_BASE, "margin": MEMORY_MARGIN}


def mem_available() -> int:
    """MemAvailable of /proc/meminfo in bytes."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/meminfo has no MemAvailable")


def describe_need(need: dict[str, Any]) -> str:
    terms = " + ".join(f"{k} {gib(v)}" for k, v in need["weights"].items())
    return (f"{gib(need['total'])} GiB (weights {terms} + activations {gib(need['activations'])} + process "
            f"{gib(need['base'])} + margin {gib(need['margin'])})")


def unet_bytes_fp32(ckpt: str) -> int:
    """Bytes of the checkpoint's UNet weights in float32 (what the CPU server holds)."""
    from safetensors import safe_open

    n = 0
    with safe_open(ckpt, "pt") as f:
        for key in f.keys():
            if key.startswith("model.diffusion_model."):
                shape = f.get_slice(key).get_shape()
                count = 1
                for s in shape:
                    count *= s
                n += count
    return 4 * n


def parity(ckpt: str, image_path: str, saved: str, resolution: int) -> dict[str, Any]:
    """Features of ``image_path`` from the diffusers backend vs those the node saved:
    cosine per block (channel slices of the saved block names), on the CPU in float32."""
    import torch
    import torch.nn.functional as F
    from safetensors import safe_open

    from freeseg.backends.diffusers import FreeSegPipeline, load_image

    with safe_open(saved, "pt") as f:
        node = f.get_tensor("features").float()
        info = json.loads(f.metadata()["info"])
    t0 = time.perf_counter()
    pipe = FreeSegPipeline.from_pretrained(sd=ckpt, device="cpu", dtype=torch.float32, resolution=resolution)
    t_load = time.perf_counter() - t0
    with torch.inference_mode():
        t0 = time.perf_counter()
        ours = pipe.extract(load_image(image_path)).features.float()
        t_feat = time.perf_counter() - t0
    if ours.shape != node.shape:
        raise AssertionError(f"diffusers features {tuple(ours.shape)} != node features {tuple(node.shape)}")
    per = node.shape[1] // len(info["blocks"])
    cos = {name: float(F.cosine_similarity(node[:, i * per:(i + 1) * per].double().flatten(),
                                           ours[:, i * per:(i + 1) * per].double().flatten(), dim=0))
           for i, name in enumerate(info["blocks"])}
    return {"cosine": cos, "min_cosine": min(cos.values()), "diffusers_load_s": round(t_load, 1),
            "diffusers_features_s": round(t_feat, 2), "node_info": info}


def run_prompt(client, name: str, prompt: dict, timeout: float = 3600.0) -> Run:
    run = Run(name, prompt)
    run.entry = client.run(prompt, timeout=timeout, on_event=run.on_event, strict=True)
    print(f"  {name}: {run.total:.2f} s ({', '.join(f'{ct} {e - s:.2f}' for _, ct, s, e in run.windows() if e - s >= 0.05)})",
          flush=True)
    return run


# ------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------

def med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def gib(n: int) -> float:
    return round(n / 2**30, 2)


def stage_table(cold: Run, singles: list[Run], batch: Optional[Run], baselines: list[Run],
                sampler: Optional[ProcSampler] = None) -> list[tuple[str, str, float, float, float]]:
    """(stage, prompt kind, cold s, median s of the single runs, s in the batch run: nan when
    there is none) per node class type, pipeline nodes first, then the baseline's."""
    rows = []
    for kind, runs in (("pipeline", singles), ("baseline", baselines)):
        order: list[str] = []
        for run in ([cold] if kind == "pipeline" else []) + runs + ([batch] if kind == "pipeline" and batch else []):
            for _, ct, _, _ in run.windows():
                if ct not in order:
                    order.append(ct)
        for ct in order:
            rows.append((ct, kind, cold.seconds(ct, sampler) if kind == "pipeline" else float("nan"),
                         med([r.seconds(ct, sampler) for r in runs]),
                         batch.seconds(ct, sampler) if kind == "pipeline" and batch else float("nan")))
    return rows


def ratios(runs: dict[str, Any], sampler: Optional[ProcSampler] = None) -> dict[str, Optional[float]]:
    """Every timing figure in wall seconds, or in the server's CPU seconds with ``sampler``.

    ``runs``: cold, singles (one per image), baselines (the first images), rerun_k,
    rerun_refine, batch (None with one image: the batch figures are None). Per-image ratios
    pair a single run with the baseline of its image."""
    singles, baselines = runs["singles"], runs["baselines"]
    feat = [r.seconds("FreeSegDiffusionFeatures", sampler) for r in singles]
    vae = [b.seconds("VAEEncode", sampler) for b in baselines]
    unet = [b.seconds("KSampler", sampler) for b in baselines]
    cap = [b.seconds("FreeSegBenchBareCaption", sampler) for b in baselines]
    clip = [b.seconds("FreeSegBenchBareCLIP", sampler) for b in baselines]
    irreducible = [v + u + c + t for v, u, c, t in zip(vae, unet, cap, clip)]
    full = [r.total_seconds(sampler) for r in singles]
    rerun_k, rerun_refine = runs["rerun_k"].total_seconds(sampler), runs["rerun_refine"].total_seconds(sampler)
    batch = runs["batch"].total_seconds(sampler) if runs["batch"] else float("nan")
    out = {
        "cold_full_s": runs["cold"].total_seconds(sampler), "full_s": med(full),
        "irreducible_s": med(irreducible), "vae_encode_s": med(vae), "unet_forward_s": med(unet),
        "caption_bare_s": med(cap), "clip_bare_s": med(clip), "features_node_s": med(feat),
        "caption_node_s": med([r.seconds("FreeSegCaption", sampler) for r in singles]),
        "cluster_node_s": med([r.seconds("FreeSegClusterMasks", sampler) for r in singles]),
        "label_node_s": med([r.seconds("FreeSegCLIPLabel", sampler) for r in singles]),
        "refine_node_s": med([r.seconds("FreeSegRefineMasks", sampler) for r in singles]),
        "pipeline_over_irreducible": med([f / i for f, i in zip(full, irreducible)]),
        "features_over_vae_unet": med([f / (v + u) for f, v, u in zip(feat, vae, unet)]),
        "rerun_k_s": rerun_k, "rerun_refine_s": rerun_refine, "first_full_s": full[0],
        "rerun_k_over_full": rerun_k / full[0], "rerun_refine_over_full": rerun_refine / full[0],
        "batch_s": batch, "singles_sum_s": sum(full), "batch_over_singles": batch / sum(full),
    }
    return {k: None if v != v else round(v, 3) for k, v in out.items()}


def ratio_rows(f: dict[str, Any], batch: int) -> list[tuple[str, str, str]]:
    """(key, label, detail) of the five goal ratios, details from the figures ``f``."""
    return [
        ("pipeline_over_irreducible", "pipeline / irreducible passes",
         f"{f['full_s']:.2f} s vs VAE {f['vae_encode_s']:.2f} + UNet {f['unet_forward_s']:.2f} + caption "
         f"{f['caption_bare_s']:.2f} + CLIP {f['clip_bare_s']:.2f} = {f['irreducible_s']:.2f} s"),
        ("features_over_vae_unet", "features node / (VAE encode + UNet forward)",
         f"{f['features_node_s']:.2f} s vs {f['vae_encode_s']:.2f} + {f['unet_forward_s']:.2f} s"),
        ("rerun_k_over_full", "re-run, only K changed / full", f"{f['rerun_k_s']:.2f} s vs {f['first_full_s']:.2f} s"),
        ("rerun_refine_over_full", "re-run, only the refinement changed / full",
         f"{f['rerun_refine_s']:.2f} s vs {f['first_full_s']:.2f} s"),
        ("batch_over_singles", f"batch of {batch} / {batch} single runs",
         f"{f['batch_s']:.2f} s vs {f['singles_sum_s']:.2f} s" if f["batch_s"] is not None
         else "no batch run with one image (--batch 2 or more)"),
    ]


def fmt(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.3f}"


def plan(args: argparse.Namespace, setup: Setup, models: Optional[dict[str, str]]) -> tuple[Optional[str], dict]:
    """The layout that fits in MemAvailable: "full" (the freeseg_full graph with every model),
    "caption" (``--blip2``, or ``--caption-only``: the caption stage alone) or None (skip),
    with the figures it was decided on (GiB). ``models``: the built paths (None before the
    build: the recipes' nominal counts are used). Prints one line per layout that does not fit."""
    avail = mem_available()
    path = (models or {}).get
    captioner = {setup.captioner_key: model_params(setup.captioner_key, path("captioner"))}
    full = memory_need({setup.ckpt_key: model_params(setup.ckpt_key, path("ckpt")),
                        "open_clip": model_params("open_clip", path("open_clip")), **captioner}, args.resolution)
    caption = memory_need(captioner, None)
    info = {"mem_available_gib": gib(avail), "full_need_gib": gib(full["total"]),
            "full_weights_gib": {k: gib(v) for k, v in full["weights"].items()}}
    if not args.caption_only:
        if full["total"] <= avail:
            print(f"memory: the full graph needs {describe_need(full)}; MemAvailable {gib(avail)} GiB: it fits",
                  flush=True)
            return "full", info
        print(f"memory: the full graph with {setup.ckpt_key} + {setup.captioner_key} at {args.resolution} px needs "
              f"{describe_need(full)}; MemAvailable is {gib(avail)} GiB: it does not fit", flush=True)
        if not args.blip2:
            return None, info
    info["caption_need_gib"] = gib(caption["total"])
    if caption["total"] <= avail:
        print(f"memory: the caption stage alone needs {describe_need(caption)}; MemAvailable {gib(avail)} GiB: "
              "running it alone", flush=True)
        return "caption", info
    print(f"memory: the caption stage alone needs {describe_need(caption)}; MemAvailable is {gib(avail)} GiB: "
          "it does not fit either", flush=True)
    return None, info


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args.capture:
        return main_capture(args)
    if args.flux or args.sd3:
        from bench_dit import run_dit  # the DiT bench (issue 22)

        return run_dit(args)
    from freeseg.app.server import ComfyServer, link

    setup = Setup.of(args)
    print(f"bench_pipeline: {setup.ckpt_key} + {setup.captioner_key}, resolution {args.resolution}, "
          f"K={args.n_clusters}, batch {args.batch}, class names {CLASS_NAMES!r}", flush=True)
    fixture_paths = fixture_models() if args.fixtures else None
    layout, memory = plan(args, setup, None if fixture_paths is None else
                          {"ckpt": fixture_paths.get(setup.ckpt_key), "captioner": fixture_paths[setup.captioner_key],
                           "open_clip": fixture_paths["open_clip"]})
    if layout is not None:
        t0 = time.perf_counter()
        models = get_models(args, setup)
        print(f"models ready in {time.perf_counter() - t0:.1f} s: {models}", flush=True)
        layout, memory = plan(args, setup, models)
    if layout is None:
        reason = (f"not enough memory: needs {memory.get('caption_need_gib', memory['full_need_gib'])} GiB, "
                  f"MemAvailable {memory['mem_available_gib']} GiB")
        print(f"skipped: {reason}", flush=True)
        print(json.dumps({"skipped": True, "reason": reason, "models": [setup.ckpt_key, setup.captioner_key],
                          "resolution": args.resolution, "memory": memory, "fixtures": args.fixtures},
                         sort_keys=True))
        return 0
    if args.threads is not None:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = str(args.threads)  # inherited by the server

    base = Path(tempfile.mkdtemp(prefix="freeseg-bench-"))
    if layout == "full":
        link(models["ckpt"], str(base / "models" / "checkpoints" / setup.ckpt_name))
        link(models["open_clip"], str(base / "models" / "open_clip" / CLIP_NAME))
    link(models["captioner"], str(base / "models" / "blip2" / setup.captioner_name))
    link(os.path.join(REPO, "bench", "probe_pack"), str(base / "custom_nodes" / "freeseg_bench_probe"))
    images_dir = base / "bench_images"
    images_dir.mkdir()
    warm_path = write_image(images_dir / "warmup.png", 100)
    paths = [write_image(images_dir / f"img{i}.png", i) for i in range(args.batch)]

    server = ComfyServer(str(base))
    t0 = time.perf_counter()
    server.start(timeout=300)
    print(f"server up in {time.perf_counter() - t0:.1f} s (pid {server.proc.pid}, log {server.log_path})", flush=True)
    sampler = ProcSampler(server.proc.pid).start()
    try:
        if layout == "full":
            figures = run_full(args, setup, models, server, sampler, base, warm_path, paths)
        else:
            figures = run_caption(args, setup, server, sampler, warm_path, paths)
    except BaseException:
        print(server.log()[-6000:], file=sys.stderr)
        raise
    finally:
        sampler.stop()
        server.stop()
    figures.update({"layout": layout, "memory": memory, "models": [setup.ckpt_key, setup.captioner_key]})
    if layout == "full":
        figures["checks"] = full_checks(args, setup, models, figures, str(warm_path),
                                        str(base / "features_warmup.safetensors"))
        if figures["checks"]:
            print(f"checks: {json.dumps(figures['checks'])}")
    return finish(args, base, figures)


def finish(args: argparse.Namespace, base: Path, figures: dict) -> int:
    """End of a run: keep (--keep) or remove the server's base folder, print the figures as JSON."""
    if args.keep:
        print(f"kept {base}")
    else:
        import shutil

        shutil.rmtree(base, ignore_errors=True)
    print(json.dumps(figures, sort_keys=True))
    return 0


def run_full(args: argparse.Namespace, setup: Setup, models: dict[str, str], server, sampler: ProcSampler,
             base: Path, warm_path: Path, paths: list[Path]) -> dict[str, Any]:
    """The freeseg_full graph (cold, per image, K and refinement re-runs, batch) and the
    irreducible passes; prints the stage and ratio tables; returns the figures."""
    k, tokens = args.n_clusters, args.max_new_tokens
    names_kw = {"ckpt": setup.ckpt_name, "captioner": setup.captioner_name}
    saved = str(base / "features_warmup.safetensors")
    client = server.client
    warm = client.upload_image(str(warm_path))
    names = [client.upload_image(str(p)) for p in paths]
    cold = run_prompt(client, "cold full graph (warm-up image)",
                      full_prompt(warm, args.resolution, k, save_features=saved, max_new_tokens=tokens, **names_kw))
    rss_loaded = sampler.at(time.monotonic())
    singles, baselines = [], []
    rerun_k = rerun_refine = None
    for i, name in enumerate(names):
        singles.append(run_prompt(client, f"full graph, image {i}",
                                  full_prompt(name, args.resolution, k, max_new_tokens=tokens, **names_kw)))
        if i == 0:
            rerun_k = run_prompt(client, f"only K changed ({k} -> {k + 1})",
                                 full_prompt(name, args.resolution, k + 1, max_new_tokens=tokens, **names_kw))
            rerun_refine = run_prompt(client, "only the refinement changed (crf -> guided)",
                                      full_prompt(name, args.resolution, k + 1, refine="guided",
                                                  max_new_tokens=tokens, **names_kw))
        if i < args.baselines:
            baselines.append(run_prompt(client, f"irreducible passes, image {i}",
                                        baseline_prompt(name, args.resolution, k, seed=i, max_new_tokens=tokens,
                                                        **names_kw)))
    batch = None
    if len(names) > 1:
        batch = run_prompt(client, f"batch of {len(names)}",
                           batch_prompt(names, args.resolution, k, max_new_tokens=tokens, **names_kw))
    vm_hwm = sampler.read("VmHWM")
    features_info = json.loads(cold.entry["outputs"]["900"]["probe"][0])

    runs = {"cold": cold, "singles": singles, "baselines": baselines, "rerun_k": rerun_k,
            "rerun_refine": rerun_refine, "batch": batch}
    wall, cpu = ratios(runs), ratios(runs, sampler)
    feat_base, feat_added = node_memory(cold, sampler, "FreeSegDiffusionFeatures")
    steady_added = max(node_memory(r, sampler, "FreeSegDiffusionFeatures")[1] for r in singles)
    ks_added = max(node_memory(b, sampler, "KSampler")[1] for b in baselines)
    unet_size = unet_bytes_fp32(models["ckpt"])
    figures: dict[str, Any] = {
        "resolution": args.resolution, "n_clusters": k, "batch": len(names), "max_new_tokens": tokens,
        "baseline_images": len(baselines), "cpus": os.cpu_count(), "threads": args.threads,
        "load_average": [round(x, 1) for x in os.getloadavg()], "fixtures": args.fixtures,
        "wall": wall, "cpu": cpu, "goals": GOALS,
        "rss_loaded_gib": gib(rss_loaded), "rss_before_features_cold_gib": gib(feat_base),
        "features_added_rss_gib_cold": gib(feat_added), "features_added_rss_gib_steady_max": gib(steady_added),
        "ksampler_added_rss_gib_max": gib(ks_added), "unet_fp32_gib": gib(unet_size),
        "no_second_unet_copy": feat_added < unet_size / 2,
        "server_peak_rss_gib": gib(max(vm_hwm, max((r for _, r, _ in sampler.samples), default=0))),
        "features": features_info,
    }

    print()
    print(f"| prompt | node | cold s | single image, median s (CPU s) | batch of {len(names)}, s (CPU s) |")
    print("|---|---|---|---|---|")
    cpu_rows = {r[:2]: r for r in stage_table(cold, singles, batch, baselines, sampler)}
    for ct, kind, in_cold, single, in_batch in stage_table(cold, singles, batch, baselines):
        _, _, _, single_cpu, batch_cpu = cpu_rows[(ct, kind)]
        print(f"| {kind} | {ct} | {in_cold:.2f} | {single:.2f} ({single_cpu:.2f}) | {in_batch:.2f} ({batch_cpu:.2f}) |"
              .replace("nan (nan)", "-").replace("nan", "-"))
    print()
    print("| ratio | wall | CPU | goal | wall figures |")
    print("|---|---|---|---|---|")
    for key, label, detail in ratio_rows(wall, len(names)):
        print(f"| {label} | {fmt(wall[key])} | {fmt(cpu[key])} | <= {GOALS[key]} | {detail} |")
    print()
    print(f"memory: server RSS {gib(rss_loaded)} GiB after the cold run, {gib(feat_base)} GiB when the features "
          f"node first started; it added {gib(feat_added)} GiB (cold), at most {gib(steady_added)} GiB later "
          f"(KSampler adds up to {gib(ks_added)} GiB); UNet weights fp32 {gib(unet_size)} GiB: "
          f"{'no second copy of the UNet' if figures['no_second_unet_copy'] else 'POSSIBLE SECOND COPY'}; "
          f"server peak {figures['server_peak_rss_gib']} GiB")
    print(f"features {features_info['shape']} ({features_info['family']}) from {features_info['blocks']}; "
          f"load average {os.getloadavg()}")
    return figures


def full_checks(args: argparse.Namespace, setup: Setup, models: dict[str, str], figures: dict[str, Any],
                warm_path: str, saved: str) -> dict[str, Any]:
    """Real-size correctness of the features the node gave the warm-up image. SD1.5 at 512 px:
    6400 channels from input 7, 8 and output 3, 4, 5 at 32x32, and the diffusers backend's
    features (cosine >= COS_MIN per block). SDXL: the SDXL family, 6400 channels from input 7,
    8 and output 0, 1, 2 at resolution/16, and the diffusers backend refusing the checkpoint
    (it supports SD1.x / SD2.x only). Raises AssertionError when a check fails."""
    info, res = figures["features"], args.resolution
    checks: dict[str, Any] = {}
    if args.sdxl:
        if not args.fixtures:
            assert info["family"] == "SDXL", info
            assert info["shape"] == [1, 6400, res // 16, res // 16], info
            assert info["blocks"] == SDXL_REAL_BLOCKS, info["blocks"]
            checks[f"sdxl_features_6400x{res // 16}x{res // 16}"] = True
        if not args.no_parity:
            checks["diffusers_backend"] = diffusers_refuses(models["ckpt"])
        return checks
    if res == 512 and not args.fixtures:
        assert info["shape"] == [1, 6400, 32, 32], info
        assert info["blocks"] == REAL_BLOCKS, info["blocks"]
        checks["features_6400x32x32"] = True
    if not args.no_parity and not args.fixtures:
        par = parity(models["ckpt"], warm_path, saved, res)
        checks["diffusers_cosine"] = {n: round(c, 5) for n, c in par["cosine"].items()}
        checks["diffusers_min_cosine"] = round(par["min_cosine"], 5)
        checks["diffusers_load_s"], checks["diffusers_features_s"] = par["diffusers_load_s"], par["diffusers_features_s"]
        if res == 512:
            assert par["min_cosine"] >= COS_MIN, f"diffusers features differ: {par['cosine']}"
    return checks


def diffusers_refuses(ckpt: str) -> str:
    """The diffusers backend's refusal of an SDXL checkpoint (its message); AssertionError
    when it loads it instead."""
    import torch

    from freeseg.backends.diffusers import FreeSegPipeline

    try:
        FreeSegPipeline.from_pretrained(sd=ckpt, device="cpu", dtype=torch.float32)
    except NotImplementedError as exc:
        return f"refused (SD1.x / SD2.x only): {exc}"
    raise AssertionError(f"the diffusers backend loaded the SDXL checkpoint {ckpt!r}; compare its features")


def run_caption(args: argparse.Namespace, setup: Setup, server, sampler: ProcSampler, warm_path: Path,
                paths: list[Path]) -> dict[str, Any]:
    """The caption stage of freeseg_full alone (loader + FreeSegCaption, the graph's
    settings) against the captioner's bare ``generate`` on the same server: cold (with the
    load), then per image the stage and the bare pass. Prints a table; returns the figures."""
    tokens, cap = args.max_new_tokens, setup.captioner_name
    client = server.client
    warm = client.upload_image(str(warm_path))
    names = [client.upload_image(str(p)) for p in paths]
    cold = run_prompt(client, "cold caption stage (warm-up image)", caption_prompt(warm, tokens, cap))
    rss_loaded = sampler.at(time.monotonic())
    stages, bares = [], []
    for i, name in enumerate(names):
        stages.append(run_prompt(client, f"caption stage, image {i}", caption_prompt(name, tokens, cap)))
        bares.append(run_prompt(client, f"bare caption, image {i}", bare_caption_prompt(name, tokens, cap)))
    vm_hwm = sampler.read("VmHWM")

    def figures_of(sm: Optional[ProcSampler]) -> dict[str, Optional[float]]:
        node = [r.seconds("FreeSegCaption", sm) for r in stages]
        bare = [r.seconds("FreeSegBenchBareCaption", sm) for r in bares]
        out = {"cold_s": cold.total_seconds(sm), "loader_cold_s": cold.seconds("FreeSegBLIP2Loader", sm),
               "caption_cold_s": cold.seconds("FreeSegCaption", sm), "caption_node_s": med(node),
               "caption_bare_s": med(bare), "stage_s": med([r.total_seconds(sm) for r in stages]),
               "caption_over_bare": med([n / b for n, b in zip(node, bare)])}
        return {k: round(v, 3) for k, v in out.items()}

    wall, cpu = figures_of(None), figures_of(sampler)
    load_base = sampler.at(cold.t_begin)
    figures: dict[str, Any] = {
        "max_new_tokens": tokens, "images": len(names), "cpus": os.cpu_count(), "threads": args.threads,
        "load_average": [round(x, 1) for x in os.getloadavg()], "fixtures": args.fixtures, "wall": wall, "cpu": cpu,
        "rss_before_load_gib": gib(load_base), "rss_loaded_gib": gib(rss_loaded),
        "server_peak_rss_gib": gib(max(vm_hwm, max((r for _, r, _ in sampler.samples), default=0))),
        "class_names_cold": cold.entry["outputs"].get("950"),
    }
    print()
    print("| caption stage | cold s | per image, median s (CPU s) |")
    print("|---|---|---|")
    print(f"| FreeSegBLIP2Loader | {wall['loader_cold_s']:.2f} | cached |")
    print(f"| FreeSegCaption | {wall['caption_cold_s']:.2f} | {wall['caption_node_s']:.2f} "
          f"({cpu['caption_node_s']:.2f}) |")
    print(f"| bare generate (irreducible) | - | {wall['caption_bare_s']:.2f} ({cpu['caption_bare_s']:.2f}) |")
    print(f"| caption node / bare generate | - | {wall['caption_over_bare']:.3f} ({cpu['caption_over_bare']:.3f}) |")
    print()
    print(f"memory: server RSS {gib(load_base)} GiB before the load, {gib(rss_loaded)} GiB with the captioner "
          f"loaded; peak {figures['server_peak_rss_gib']} GiB")
    return figures


# ------------------------------------------------------------------------------------------
# Capture while sampling (--capture)
# ------------------------------------------------------------------------------------------

CAPTURE_GOALS = {"generation_capture_over_plain": 1.03, "segmentation_capture_over_old": 0.15}
CAPTURE_COS_MIN = 0.99
CAPTURE_NEGATIVE = "blurry, low quality"
# The segmentation after the generation: the old way (the decoded image encoded again and one
# UNet pass) and with capture (the sampler's own pass); clustering and refinement are the same.
SEGMENT_OLD = ("FreeSegDiffusionFeatures", "FreeSegClusterMasks", "FreeSegRefineMasks")
SEGMENT_CAPTURE = ("FreeSegCapturedFeatures", "FreeSegClusterMasks", "FreeSegRefineMasks")
CHECK_TYPES = ("FreeSegDiffusionFeatures", "FreeSegBenchSaveFeatures")  # the cosine check's nodes (capture prompt)


def add_capture_args(p: argparse.ArgumentParser) -> None:
    """``--capture`` and its options (see ``main_capture``)."""
    p.add_argument("--capture", action="store_true", help="capture while sampling instead of freeseg_full: a "
                   "text-to-image generation with and without Capture Features, then segmented the old way "
                   "vs from the capture (SD1.5; --quick: 256 px)")
    p.add_argument("--capture-steps", type=int, default=20, help="--capture: sampler steps (default 20)")
    p.add_argument("--capture-cfg", type=float, default=7.0, help="--capture: cfg (default 7: cond and uncond "
                   "batched in each model call)")
    p.add_argument("--capture-pairs", type=int, default=2, help="--capture: pairs of runs, plain then captured "
                   "(A B A B ...; default 2)")


def check_capture_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.capture and (args.sdxl or args.blip2):
        p.error("--capture runs SD1.5 only (not with --sdxl / --blip2)")
    if args.capture_steps < 1 or args.capture_pairs < 1 or not args.capture_cfg > 0:
        p.error("--capture-steps and --capture-pairs must be >= 1, --capture-cfg > 0")


def capture_prompt(capture: bool, seed: int, resolution: int, steps: int, cfg: float, tag: str,
                   ckpt: str = CKPT_NAME, n_clusters: int = 4, save_features: str = "",
                   direct_features: str = "") -> dict:
    """Generate, then segment. The generation: empty positive prompt (the conditioning the
    features node uses, as the paper), negative ``CAPTURE_NEGATIVE``, ``EmptyLatentImage`` of
    ``resolution``, KSampler euler / normal with ``steps`` and ``cfg``, decoded (VAEDecode) and
    saved (SaveImage and SaveLatent, prefix ``tag``). The segmentation, with ``capture`` False
    the old way: Diffusion Features on the decoded image (image + vae: a VAE encode and one UNet
    pass) -> Cluster Masks -> Refine Masks (crf_joint: the segments are not named); with
    ``capture`` the sampler's MODEL is Capture Features' clone and Captured Features (the
    capture + the sampler's LATENT) replaces Diffusion Features. ``save_features``: a probe
    writes the segmentation's features there. ``direct_features`` (capture only): Diffusion
    Features also runs on the sampler's final latent at timestep 0 (the sigma of the last call)
    and a probe writes its features there: the cosine check."""
    model = ["10", 0] if capture else ["1", 0]
    prompt: dict[str, Any] = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": CAPTURE_NEGATIVE, "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": resolution, "height": resolution,
                                                           "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {"model": model, "seed": seed, "steps": steps, "cfg": cfg,
                                                   "sampler_name": "euler", "scheduler": "normal",
                                                   "positive": ["2", 0], "negative": ["3", 0],
                                                   "latent_image": ["4", 0], "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": tag}},
        "8": {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": f"latents/{tag}"}},
        "21": {"class_type": "FreeSegClusterMasks", "inputs": {"features": ["20", 0], "n_clusters": n_clusters,
                                                               "method": "kmeans", "seed": 0}},
        "22": {"class_type": "FreeSegRefineMasks", "inputs": {"segments": ["21", 0], "image": ["6", 0],
                                                              "method": "crf_joint"}},
        "23": {"class_type": "FreeSegBenchSink", "inputs": {"value": ["22", 0]}},
    }
    features = {"model": ["1", 0], "timestep": 0, "resolution": resolution, "source": "cross_attn_queries",
                "seed": 0, "detail": "paper", "clip": ["1", 1]}
    if capture:
        prompt["10"] = {"class_type": "FreeSegCaptureFeatures",
                        "inputs": {"model": ["1", 0], "keep": "last_call", "sigma": 0.0292,
                                   "source": "cross_attn_queries", "detail": "paper"}}
        prompt["20"] = {"class_type": "FreeSegCapturedFeatures", "inputs": {"capture": ["10", 1],
                                                                            "latent": ["5", 0]}}
        if direct_features:
            prompt["30"] = {"class_type": "FreeSegDiffusionFeatures", "inputs": {**features, "latent": ["5", 0]}}
            prompt["31"] = {"class_type": "FreeSegBenchSaveFeatures",
                            "inputs": {"features": ["30", 0], "path": direct_features}}
    else:
        prompt["20"] = {"class_type": "FreeSegDiffusionFeatures",
                        "inputs": {**features, "vae": ["1", 2], "image": ["6", 0]}}
    if save_features:
        prompt["32"] = {"class_type": "FreeSegBenchSaveFeatures", "inputs": {"features": ["20", 0],
                                                                             "path": save_features}}
    return prompt


def capture_figures(plain: list[Run], captured: list[Run],
                    sampler: Optional[ProcSampler] = None) -> dict[str, Optional[float]]:
    """Medians over the pairs (plain[i], captured[i]: same seed, run one after the other), in
    wall seconds or the server's CPU seconds with ``sampler``: the generation (the KSampler
    node), the features node, the segmentation (``SEGMENT_OLD`` / ``SEGMENT_CAPTURE``), the
    whole prompt (less the cosine check's nodes), and their ratios per pair."""
    def secs(run: Run, types: tuple[str, ...]) -> float:
        return sum(run.seconds(ct, sampler) for ct in types)

    gen_a, gen_b = [r.seconds("KSampler", sampler) for r in plain], [r.seconds("KSampler", sampler) for r in captured]
    feat_a = [r.seconds("FreeSegDiffusionFeatures", sampler) for r in plain]
    feat_b = [r.seconds("FreeSegCapturedFeatures", sampler) for r in captured]
    seg_a, seg_b = [secs(r, SEGMENT_OLD) for r in plain], [secs(r, SEGMENT_CAPTURE) for r in captured]
    tot_a = [r.total_seconds(sampler) for r in plain]
    tot_b = [r.total_seconds(sampler) - secs(r, CHECK_TYPES) for r in captured]
    out = {
        "generation_plain_s": med(gen_a), "generation_capture_s": med(gen_b),
        "generation_capture_over_plain": med([b / a for a, b in zip(gen_a, gen_b)]),
        "features_node_s": med(feat_a), "captured_features_node_s": med(feat_b),
        "captured_over_features_node": med([b / a for a, b in zip(feat_a, feat_b)]),
        "cluster_s": med([r.seconds("FreeSegClusterMasks", sampler) for r in plain + captured]),
        "refine_s": med([r.seconds("FreeSegRefineMasks", sampler) for r in plain + captured]),
        "decode_s": med([r.seconds("VAEDecode", sampler) for r in plain + captured]),
        "segmentation_old_s": med(seg_a), "segmentation_capture_s": med(seg_b),
        "segmentation_capture_over_old": med([b / a for a, b in zip(seg_a, seg_b)]),
        "prompt_old_s": med(tot_a), "prompt_capture_s": med(tot_b),
        "prompt_capture_over_old": med([b / a for a, b in zip(tot_a, tot_b)]),
    }
    return {k: None if v != v else round(v, 4) for k, v in out.items()}


def block_cosines(a, b, blocks: list[str]) -> dict[str, float]:
    """Cosine similarity per block of two ``[B,C,h,w]`` feature tensors whose channels are the
    blocks' equal slices in order (one level's query blocks: equal widths)."""
    import torch.nn.functional as F

    if tuple(a.shape) != tuple(b.shape) or a.shape[1] % len(blocks):
        raise AssertionError(f"features {tuple(a.shape)} vs {tuple(b.shape)} cannot be split into {len(blocks)} "
                             "equal blocks")
    per = a.shape[1] // len(blocks)
    return {name: float(F.cosine_similarity(a[:, i * per:(i + 1) * per].double().flatten(),
                                            b[:, i * per:(i + 1) * per].double().flatten(), dim=0))
            for i, name in enumerate(blocks)}


def output_file(base: Path, entry: dict, node: str, kind: str) -> Path:
    """The file a SaveImage (``kind`` "images") / SaveLatent ("latents") node of a run wrote."""
    item = entry["outputs"][node][kind][0]
    return base / "output" / item.get("subfolder", "") / item["filename"]


def capture_checks(base: Path, plain: list[Run], captured: list[Run], direct: str, saved: str) -> dict[str, Any]:
    """The generated latents (SaveLatent) and images (SaveImage PNG) of every pair equal bit for
    bit, and the captured features vs Diffusion Features on the same final latent at the same
    sigma: cosine >= CAPTURE_COS_MIN per block. AssertionError when a check fails."""
    import numpy as np
    import torch
    from PIL import Image
    from safetensors import safe_open
    from safetensors.torch import load_file

    for i, (a, b) in enumerate(zip(plain, captured)):
        la, lb = (load_file(str(output_file(base, r.entry, "8", "latents")))["latent_tensor"] for r in (a, b))
        assert la.shape == lb.shape and torch.equal(la, lb), f"pair {i}: the generated latents differ"
        ia, ib = (np.asarray(Image.open(output_file(base, r.entry, "7", "images"))) for r in (a, b))
        assert np.array_equal(ia, ib), f"pair {i}: the generated images differ"
    feats, infos = [], []
    for path in (saved, direct):
        with safe_open(path, "pt") as f:
            feats.append(f.get_tensor("features").float())
            infos.append(json.loads(f.metadata()["info"]))
    assert infos[0]["blocks"] == infos[1]["blocks"], infos
    cos = block_cosines(feats[0], feats[1], infos[0]["blocks"])
    assert min(cos.values()) >= CAPTURE_COS_MIN, f"captured vs Diffusion Features cosine below {CAPTURE_COS_MIN}: {cos}"
    return {"pairs_bit_identical": len(plain), "features": infos[0], "cosine": {k: round(v, 5) for k, v in cos.items()},
            "min_cosine": round(min(cos.values()), 5)}


def main_capture(args: argparse.Namespace) -> int:
    """``--capture``: capture while sampling against today's "generate, then segment".

    On one server, ``--capture-pairs`` pairs of ``capture_prompt`` runs, the plain one then the
    captured one with the same seed (A B A B: on a shared machine the load drifts, so each ratio
    pairs neighbouring runs and the medians are reported), after one warm-up pair of 1 step (model
    loads). Asserted: every pair's latents and images equal bit for bit, and the features of the
    first captured run's last model call vs Diffusion Features on its final latent at timestep 0
    (sigma_min, the sigma of that call on the "normal" schedule): cosine >= 0.99 per block."""
    from freeseg.app.server import ComfyServer, link

    res, steps, cfg = args.resolution, args.capture_steps, args.capture_cfg
    print(f"bench_pipeline --capture: SD1.5, {res} px, {steps} steps euler/normal, cfg {cfg}, "
          f"{args.capture_pairs} pairs (plain, captured)", flush=True)
    ckpt = fixture_models()["sd15"] if args.fixtures else build_models(args.cache, ["sd15"])["sd15"]
    need, avail = memory_need({"sd15": model_params("sd15", ckpt)}, res), mem_available()
    need["total"] -= CAPTION_ACTIVATIONS
    if need["total"] > avail:
        reason = f"not enough memory: needs {gib(need['total'])} GiB, MemAvailable {gib(avail)} GiB"
        print(f"skipped: {reason}", flush=True)
        print(json.dumps({"skipped": True, "reason": reason, "capture": True}, sort_keys=True))
        return 0
    if args.threads is not None:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = str(args.threads)
    base = Path(tempfile.mkdtemp(prefix="freeseg-bench-capture-"))
    link(ckpt, str(base / "models" / "checkpoints" / CKPT_NAME))
    link(os.path.join(REPO, "bench", "probe_pack"), str(base / "custom_nodes" / "freeseg_bench_probe"))
    saved, direct = str(base / "captured.safetensors"), str(base / "direct.safetensors")
    server = ComfyServer(str(base))
    server.start(timeout=300)
    sampler = ProcSampler(server.proc.pid).start()
    plain: list[Run] = []
    captured: list[Run] = []
    try:
        client = server.client
        for capture in (False, True):
            run_prompt(client, f"warm-up, {'captured' if capture else 'plain'} (1 step)",
                       capture_prompt(capture, 10**6, res, 1, cfg, f"warmup{int(capture)}"))
        for i in range(args.capture_pairs):
            plain.append(run_prompt(client, f"pair {i}: plain generation, then Diffusion Features",
                                    capture_prompt(False, i, res, steps, cfg, f"plain{i}")))
            captured.append(run_prompt(client, f"pair {i}: captured generation, then Captured Features",
                                       capture_prompt(True, i, res, steps, cfg, f"capture{i}",
                                                      save_features=saved if i == 0 else "",
                                                      direct_features=direct if i == 0 else "")))
    except BaseException:
        print(server.log()[-6000:], file=sys.stderr)
        raise
    finally:
        sampler.stop()
        server.stop()
    wall, cpu = capture_figures(plain, captured), capture_figures(plain, captured, sampler)
    checks = capture_checks(base, plain, captured, direct, saved)
    figures = {"capture": True, "resolution": res, "steps": steps, "cfg": cfg, "pairs": len(plain),
               "fixtures": args.fixtures, "cpus": os.cpu_count(), "threads": args.threads,
               "load_average": [round(x, 1) for x in os.getloadavg()], "wall": wall, "cpu": cpu,
               "goals": CAPTURE_GOALS, "checks": checks}
    print()
    print("| median over the pairs | plain / old way, s (CPU s) | with capture, s (CPU s) | ratio (CPU) | goal |")
    print("|---|---|---|---|---|")
    rows = [("generation (KSampler)", "generation_plain_s", "generation_capture_s", "generation_capture_over_plain"),
            ("features node", "features_node_s", "captured_features_node_s", "captured_over_features_node"),
            ("segmentation: features + cluster + refine", "segmentation_old_s", "segmentation_capture_s",
             "segmentation_capture_over_old"),
            ("whole prompt (generate, decode, save, segment)", "prompt_old_s", "prompt_capture_s",
             "prompt_capture_over_old")]
    for label, a, b, r in rows:
        goal = f"<= {CAPTURE_GOALS[r]}" if r in CAPTURE_GOALS else "-"
        print(f"| {label} | {wall[a]:.2f} ({cpu[a]:.2f}) | {wall[b]:.2f} ({cpu[b]:.2f}) | {fmt(wall[r])} "
              f"({fmt(cpu[r])}) | {goal} |")
    print(f"\ndecode {wall['decode_s']:.2f} s, cluster {wall['cluster_s']:.2f} s, refine {wall['refine_s']:.2f} s "
          f"(medians of all runs); load average {os.getloadavg()}")
    print(f"checks: {len(plain)} pairs bit-identical (latents and images); captured vs Diffusion Features on "
          f"the final latent, cosine per block {checks['cosine']}")
    return finish(args, base, figures)


if __name__ == "__main__":
    sys.exit(main())
