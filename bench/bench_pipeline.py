"""The freeseg_full graph at real model sizes through a real ComfyUI server, against its
irreducible passes measured side by side on the same server.

Usage::

    nice -n 5 .venv/bin/python bench/bench_pipeline.py             # 512 px, batch 4 (long)
    nice -n 5 .venv/bin/python bench/bench_pipeline.py --batch 2   # 512 px, batch 2
    nice -n 5 .venv/bin/python bench/bench_pipeline.py --quick     # 256 px, batch 2, 10-token captions
    nice -n 5 .venv/bin/python bench/bench_pipeline.py --fixtures --quick  # the script itself, minutes

What it does:

1. Builds once (cached in ``$FREESEG_BENCH_CACHE`` or ``~/.cache/freeseg-bench``, outside git)
   random-weight models at the real architectures and on-disk formats
   (``bench/realsize_models.py``, in a subprocess): an SD1.5 single-file LDM checkpoint (real
   UNet, KL VAE, CLIP-L), open_clip ViT-B-32, BLIP base.
2. Starts ComfyUI (``freeseg.app.server.ComfyServer``, ``--cpu``) with the models linked into
   its ``models/`` folder, this pack, and the benchmark probes of ``bench/probe_pack``.
3. Runs ``workflows/api/freeseg_full.json`` (the graph users run) at ``--resolution`` with
   class names "dog, cat, tree": once cold (on a warm-up image; it also saves the features for
   the parity check), then once per image of a batch of ``--batch`` images, each followed by
   the BASELINE prompt on the same image: the irreducible passes, on the same server and
   models:

   * VAE encode: core ``VAEEncode`` (after a core ``ImageScale`` to the same square);
   * one UNet forward: core ``KSampler`` with 1 step, cfg 1.0 (ComfyUI skips the unconditional
     pass at cfg 1), euler: exactly one model call on the latent, empty-prompt conditioning;
   * caption: probe ``FreeSegBenchBareCaption``: the captioner's bare ``generate`` with the
     caption node's settings (30 new tokens, 3 beams);
   * CLIP: probe ``FreeSegBenchBareCLIP``: one ``encode_image`` batch of K views at the model's
     input size and one ``encode_text`` batch of the class names.

   Then the same graph again with only K changed (K+1: ComfyUI's cache keeps the caption and
   the features) and then only the refinement changed (crf -> guided), and finally one prompt
   with the whole batch of images (core ``ImageBatch``).
4. Times every node from the server's websocket ``executing`` messages (a node runs from its
   message to the next one), samples the server's RSS and CPU time every 20 ms
   (``/proc/<pid>/status``, ``/proc/<pid>/stat``). Every figure is given in wall seconds and in
   the server's CPU seconds: on a shared machine the CPU seconds move less with the load of
   other processes (``--threads 1`` makes them exact, without idle spinning of worker threads).
5. Stops the server and, at 512 px, checks the features of the warm-up image against the
   diffusers backend (``freeseg.backends.diffusers.FreeSegPipeline`` loading the same
   checkpoint): 6400 channels from input 7, 8 and output 3, 4, 5 at 32x32, cosine >= 0.999
   per block.

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

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

CLASS_NAMES = "dog, cat, tree"
CKPT_NAME = "freeseg-bench-sd15.safetensors"
BLIP_NAME = "freeseg-bench-blip-base"
CLIP_NAME = "freeseg-bench-vit-b-32"
REAL_BLOCKS = ["input_7.attn2.to_q", "input_8.attn2.to_q", "output_3.attn2.to_q", "output_4.attn2.to_q",
               "output_5.attn2.to_q"]
COS_MIN = 0.999
GOALS = {"pipeline_over_irreducible": 1.10, "features_over_vae_unet": 1.05, "rerun_k_over_full": 0.05,
         "rerun_refine_over_full": 0.05, "batch_over_singles": 1.0}
OUTPUT_TYPES = ("SaveImage", "MaskToImage", "PreviewAny")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """Command-line options; ``--quick`` sets resolution 256 and batch 2 unless given."""
    p = argparse.ArgumentParser(description="freeseg_full at real model sizes vs its irreducible passes")
    p.add_argument("--quick", action="store_true", help="development run: resolution 256, batch 2")
    p.add_argument("--resolution", type=int, default=None, help="features resolution (default 512; quick 256)")
    p.add_argument("--batch", type=int, default=None, help="images of the batch run = single runs (default 4; "
                   "quick 2)")
    p.add_argument("--baselines", type=int, default=None, help="images (the first ones) that also get the "
                   "irreducible-passes prompt (default 2)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="caption length of the graph and the bare "
                   "caption (default 30, the node default; quick 10)")
    p.add_argument("--n-clusters", type=int, default=4, help="K of the graph (the K-change run uses K+1)")
    p.add_argument("--cache", default=None, help="model cache (default $FREESEG_BENCH_CACHE or "
                   "~/.cache/freeseg-bench)")
    p.add_argument("--no-parity", action="store_true", help="skip the diffusers parity check")
    p.add_argument("--fixtures", action="store_true", help="use the reduced test fixtures instead of the real-size "
                   "models (checks the script in a few minutes; figures meaningless; no parity)")
    p.add_argument("--threads", type=int, default=None, help="torch threads of the server (OMP_NUM_THREADS; "
                   "default: torch's choice). On a loaded machine 1 makes CPU seconds reliable")
    p.add_argument("--keep", action="store_true", help="keep the server's base folder (log, outputs)")
    args = p.parse_args(argv)
    if args.resolution is None:
        args.resolution = 256 if args.quick else 512
    if args.batch is None:
        args.batch = 2 if args.quick else 4
    if args.max_new_tokens is None:
        args.max_new_tokens = 10 if args.quick else 30
    args.baselines = min(args.batch, 2 if args.baselines is None else args.baselines)
    if args.resolution < 128 or args.resolution % 64:
        p.error("--resolution must be a multiple of 64, at least 128")
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be >= 1")
    if args.batch < 1 or args.n_clusters < 2 or args.baselines < 1 or args.max_new_tokens < 1:
        p.error("--batch, --baselines and --max-new-tokens must be >= 1, --n-clusters >= 2")
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
                max_new_tokens: int = 30) -> dict:
    """workflows/api/freeseg_full.json with the bench models, ``image``, K and refinement;
    with ``save_features`` a probe also writes the features there."""
    from freeseg.app.client import fill_workflow, load_workflow

    prompt = fill_workflow(load_workflow(str(REPO / "workflows" / "api" / "freeseg_full.json")), image=image,
                           class_names=CLASS_NAMES, n_clusters=k, checkpoint=CKPT_NAME, blip2=BLIP_NAME,
                           clip=CLIP_NAME,
                           overrides=[("FreeSegDiffusionFeatures", "resolution", resolution),
                                      ("FreeSegRefineMasks", "method", refine),
                                      ("FreeSegCaption", "max_new_tokens", max_new_tokens)])
    if save_features:
        prompt["900"] = {"class_type": "FreeSegBenchSaveFeatures",
                         "inputs": {"features": [node_id(prompt, "FreeSegDiffusionFeatures"), 0],
                                    "path": save_features}}
    return prompt


def batch_prompt(images: list[str], resolution: int, k: int, max_new_tokens: int = 30) -> dict:
    """The full graph on a batch of ``images`` (equal sizes) joined with core ImageBatch nodes."""
    prompt = full_prompt(images[0], resolution, k, max_new_tokens=max_new_tokens)
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


def baseline_prompt(image: str, resolution: int, k: int, seed: int, max_new_tokens: int = 30) -> dict:
    """The irreducible passes on ``image`` with the same loaders (cache hits): ImageScale ->
    VAEEncode -> KSampler (1 step, cfg 1: one UNet forward), bare caption, bare CLIP batches."""
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": image}},
        "2": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT_NAME}},
        "3": {"class_type": "ImageScale", "inputs": {"image": ["1", 0], "upscale_method": "bicubic",
                                                      "width": resolution, "height": resolution, "crop": "disabled"}},
        "4": {"class_type": "VAEEncode", "inputs": {"pixels": ["3", 0], "vae": ["2", 2]}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["2", 1]}},
        "6": {"class_type": "KSampler", "inputs": {"model": ["2", 0], "seed": seed, "steps": 1, "cfg": 1.0,
                                                    "sampler_name": "euler", "scheduler": "normal",
                                                    "positive": ["5", 0], "negative": ["5", 0],
                                                    "latent_image": ["4", 0], "denoise": 1.0}},
        "7": {"class_type": "FreeSegBenchSink", "inputs": {"value": ["6", 0]}},
        "8": {"class_type": "FreeSegBLIP2Loader", "inputs": {"model_name": BLIP_NAME, "download": False,
                                                              "repo_id": "Salesforce/blip2-opt-2.7b"}},
        "9": {"class_type": "FreeSegBenchBareCaption", "inputs": {"blip2": ["8", 0], "image": ["1", 0],
                                                                   "max_new_tokens": max_new_tokens,
                                                                   "num_beams": 3}},
        "10": {"class_type": "FreeSegCLIPLoader", "inputs": {"model_name": CLIP_NAME, "download": False,
                                                              "repo_id": "timm/vit_base_patch32_clip_224.openai"}},
        "11": {"class_type": "FreeSegBenchBareCLIP", "inputs": {"clip_model": ["10", 0], "class_names": CLASS_NAMES,
                                                                 "n_views": k, "seed": seed}},
    }


# ------------------------------------------------------------------------------------------
# Models, server, parity
# ------------------------------------------------------------------------------------------

def build_models(cache: Optional[str]) -> dict[str, str]:
    """Build (or find cached) the real-size models in a subprocess; ``{key: path}``."""
    cmd = [sys.executable, str(REPO / "bench" / "realsize_models.py")] + ([cache] if cache else [])
    out = subprocess.run(cmd, cwd=str(REPO), stdout=subprocess.PIPE, text=True)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("MODELS=")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"building the real-size models failed ({out.returncode}):\n{out.stdout[-3000:]}")
    for ln in out.stdout.splitlines():
        if ln.startswith("built "):
            print(ln, flush=True)
    return json.loads(lines[-1][len("MODELS="):])


def fixture_models() -> dict[str, str]:
    """The reduced test fixtures (tests/helpers/model_fixtures.py) under the bench's keys."""
    sys.path.insert(0, str(REPO / "tests" / "helpers"))
    from model_fixtures import build_all_subprocess, default_cache_dir

    paths = build_all_subprocess(default_cache_dir())
    return {"sd15": paths["sd15_ckpt"], "blip": paths["blip2_dir"], "open_clip": paths["open_clip_dir"]}


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
        ours = pipe.extract_features(load_image(image_path)).features.float()
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


def stage_table(cold: Run, singles: list[Run], batch: Run, baselines: list[Run],
                sampler: Optional[ProcSampler] = None) -> list[tuple[str, str, float, float, float]]:
    """(stage, prompt kind, cold s, median s of the single runs, s in the batch run) per node
    class type, pipeline nodes first, then the baseline's."""
    rows = []
    for kind, runs in (("pipeline", singles), ("baseline", baselines)):
        order: list[str] = []
        for run in ([cold] if kind == "pipeline" else []) + runs + ([batch] if kind == "pipeline" else []):
            for _, ct, _, _ in run.windows():
                if ct not in order:
                    order.append(ct)
        for ct in order:
            rows.append((ct, kind, cold.seconds(ct, sampler) if kind == "pipeline" else float("nan"),
                         med([r.seconds(ct, sampler) for r in runs]),
                         batch.seconds(ct, sampler) if kind == "pipeline" else float("nan")))
    return rows


def ratios(runs: dict[str, Any], sampler: Optional[ProcSampler] = None) -> dict[str, float]:
    """Every timing figure in wall seconds, or in the server's CPU seconds with ``sampler``.

    ``runs``: cold, singles (one per image), baselines (the first images), rerun_k,
    rerun_refine, batch. Per-image ratios pair a single run with the baseline of its image."""
    singles, baselines = runs["singles"], runs["baselines"]
    feat = [r.seconds("FreeSegDiffusionFeatures", sampler) for r in singles]
    vae = [b.seconds("VAEEncode", sampler) for b in baselines]
    unet = [b.seconds("KSampler", sampler) for b in baselines]
    cap = [b.seconds("FreeSegBenchBareCaption", sampler) for b in baselines]
    clip = [b.seconds("FreeSegBenchBareCLIP", sampler) for b in baselines]
    irreducible = [v + u + c + t for v, u, c, t in zip(vae, unet, cap, clip)]
    full = [r.total_seconds(sampler) for r in singles]
    rerun_k, rerun_refine = runs["rerun_k"].total_seconds(sampler), runs["rerun_refine"].total_seconds(sampler)
    batch = runs["batch"].total_seconds(sampler)
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
    return {k: round(v, 3) for k, v in out.items()}


def ratio_rows(f: dict[str, float], batch: int) -> list[tuple[str, str, str]]:
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
         f"{f['batch_s']:.2f} s vs {f['singles_sum_s']:.2f} s"),
    ]


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    from freeseg.app.server import ComfyServer, link

    real = args.resolution == 512 and not args.fixtures
    print(f"bench_pipeline: resolution {args.resolution}, K={args.n_clusters}, batch {args.batch}, "
          f"class names {CLASS_NAMES!r}", flush=True)
    t0 = time.perf_counter()
    models = fixture_models() if args.fixtures else build_models(args.cache)
    if args.threads is not None:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = str(args.threads)  # inherited by the server
    print(f"models ready in {time.perf_counter() - t0:.1f} s: {models}", flush=True)

    base = Path(tempfile.mkdtemp(prefix="freeseg-bench-"))
    link(models["sd15"], str(base / "models" / "checkpoints" / CKPT_NAME))
    link(models["blip"], str(base / "models" / "blip2" / BLIP_NAME))
    link(models["open_clip"], str(base / "models" / "open_clip" / CLIP_NAME))
    link(str(REPO / "bench" / "probe_pack"), str(base / "custom_nodes" / "freeseg_bench_probe"))
    images_dir = base / "bench_images"
    images_dir.mkdir()
    warm_path = write_image(images_dir / "warmup.png", 100)
    paths = [write_image(images_dir / f"img{i}.png", i) for i in range(args.batch)]
    saved = str(base / "features_warmup.safetensors")

    server = ComfyServer(str(base))
    t0 = time.perf_counter()
    server.start(timeout=300)
    print(f"server up in {time.perf_counter() - t0:.1f} s (pid {server.proc.pid}, log {server.log_path})", flush=True)
    sampler = ProcSampler(server.proc.pid).start()
    k, tokens = args.n_clusters, args.max_new_tokens
    try:
        client = server.client
        warm = client.upload_image(str(warm_path))
        names = [client.upload_image(str(p)) for p in paths]
        cold = run_prompt(client, "cold full graph (warm-up image)",
                          full_prompt(warm, args.resolution, k, save_features=saved, max_new_tokens=tokens))
        rss_loaded = sampler.at(time.monotonic())
        singles, baselines = [], []
        rerun_k = rerun_refine = None
        for i, name in enumerate(names):
            singles.append(run_prompt(client, f"full graph, image {i}",
                                      full_prompt(name, args.resolution, k, max_new_tokens=tokens)))
            if i == 0:
                rerun_k = run_prompt(client, f"only K changed ({k} -> {k + 1})",
                                     full_prompt(name, args.resolution, k + 1, max_new_tokens=tokens))
                rerun_refine = run_prompt(client, "only the refinement changed (crf -> guided)",
                                          full_prompt(name, args.resolution, k + 1, refine="guided",
                                                      max_new_tokens=tokens))
            if i < args.baselines:
                baselines.append(run_prompt(client, f"irreducible passes, image {i}",
                                            baseline_prompt(name, args.resolution, k, seed=i, max_new_tokens=tokens)))
        batch = run_prompt(client, f"batch of {len(names)}",
                           batch_prompt(names, args.resolution, k, max_new_tokens=tokens))
        vm_hwm = sampler.read("VmHWM")
    except BaseException:
        print(server.log()[-6000:], file=sys.stderr)
        raise
    finally:
        sampler.stop()
        server.stop()
    features_info = json.loads(cold.entry["outputs"]["900"]["probe"][0])

    runs = {"cold": cold, "singles": singles, "baselines": baselines, "rerun_k": rerun_k,
            "rerun_refine": rerun_refine, "batch": batch}
    wall, cpu = ratios(runs), ratios(runs, sampler)
    feat_base, feat_added = node_memory(cold, sampler, "FreeSegDiffusionFeatures")
    steady_added = max(node_memory(r, sampler, "FreeSegDiffusionFeatures")[1] for r in singles)
    ks_added = max(node_memory(b, sampler, "KSampler")[1] for b in baselines)
    unet_size = unet_bytes_fp32(models["sd15"])
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

    # ---- correctness at real size
    checks: dict[str, Any] = {}
    if real:
        assert features_info["shape"] == [1, 6400, 32, 32], features_info
        assert features_info["blocks"] == REAL_BLOCKS, features_info["blocks"]
        checks["features_6400x32x32"] = True
    if not args.no_parity and not args.fixtures:
        par = parity(models["sd15"], str(warm_path), saved, args.resolution)
        checks["diffusers_cosine"] = {n: round(c, 5) for n, c in par["cosine"].items()}
        checks["diffusers_min_cosine"] = round(par["min_cosine"], 5)
        checks["diffusers_load_s"], checks["diffusers_features_s"] = par["diffusers_load_s"], par["diffusers_features_s"]
        if real:
            assert par["min_cosine"] >= COS_MIN, f"diffusers features differ: {par['cosine']}"
    figures["checks"] = checks

    # ---- report
    print()
    print(f"| prompt | node | cold s | single image, median s (CPU s) | batch of {len(names)}, s (CPU s) |")
    print("|---|---|---|---|---|")
    for ct, kind, in_cold, single, in_batch in stage_table(cold, singles, batch, baselines):
        _, _, _, single_cpu, batch_cpu = next(r for r in stage_table(cold, singles, batch, baselines, sampler)
                                              if r[:2] == (ct, kind))
        print(f"| {kind} | {ct} | {in_cold:.2f} | {single:.2f} ({single_cpu:.2f}) | {in_batch:.2f} ({batch_cpu:.2f}) |"
              .replace("nan", "-"))
    print()
    print("| ratio | wall | CPU | goal | wall figures |")
    print("|---|---|---|---|---|")
    for key, label, detail in ratio_rows(wall, len(names)):
        print(f"| {label} | {wall[key]:.3f} | {cpu[key]:.3f} | <= {GOALS[key]} | {detail} |")
    print()
    print(f"memory: server RSS {gib(rss_loaded)} GiB after the cold run, {gib(feat_base)} GiB when the features "
          f"node first started; it added {gib(feat_added)} GiB (cold), at most {gib(steady_added)} GiB later "
          f"(KSampler adds up to {gib(ks_added)} GiB); UNet weights fp32 {gib(unet_size)} GiB: "
          f"{'no second copy of the UNet' if figures['no_second_unet_copy'] else 'POSSIBLE SECOND COPY'}; "
          f"server peak {figures['server_peak_rss_gib']} GiB")
    print(f"features {features_info['shape']} from {features_info['blocks']}; load average {os.getloadavg()}")
    if checks:
        print(f"checks: {json.dumps(checks)}")
    if args.keep:
        print(f"kept {base}")
    else:
        import shutil

        shutil.rmtree(base, ignore_errors=True)
    print(json.dumps(figures, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
