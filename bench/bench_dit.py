"""``bench_pipeline.py --flux`` / ``--sd3``: the Diffusion Features node on a DiT at its real
width, against its irreducible passes on the same server (issue 22 item 4).

Models (``bench/realsize_models.py``, random weights, bf16 on disk, cached outside git):
``flux``: Flux.1-dev's real double-stream blocks (3072 wide) but 4 of them instead of 19 and no
single-stream block (11.9B parameters do not fit this 24 GiB machine); ``sd3``: SD3 medium
exactly (24 joint blocks, 2.03B); ``kl16_vae``: their 16-channel KL VAE at real size. The
server runs with ``--bf16-unet`` (the CPU otherwise upcasts the diffusion model to fp32).

Conditioning: zeros at the real text widths and token counts (the bench probe
``FreeSegBenchZeroConditioning``; what ConditioningZeroOut makes of a text encode): Flux
T5-XXL 256 x 4096 tokens + CLIP-L pooled 768; SD3 (77 CLIP-L/G + 77 T5) 154 x 4096 + pooled
2048. T5-XXL cannot be built here; the content of the tokens does not change the cost.

Prompts (timed per node from the websocket ``executing`` messages, as bench_pipeline does):

* features: LoadImage -> Diffusion Features (the family's timestep, ``--resolution``) ->
  Cluster Masks (K) -> CLIP Label (the real-size open_clip ViT-B-32, class names typed in: the
  captioner is the same as for SD1.5, measured by bench_pipeline's default run) -> Refine Masks
  (crf);
* baseline: ImageScale to the same square -> VAEEncode -> KSampler 1 step, cfg 1 (one model
  call), the same loaders, so nothing reloads.

Ratio: features node / (VAEEncode + one model forward to the last block used). For the Flux
bench model the features pass reads its last double block (``freeseg.dit.block_indices`` of 4
blocks), so KSampler's forward is exactly that (plus the final layer). For SD3 medium the pass
stops after joint block 9 of 24, while KSampler runs all 24: the forward to block 9 is given
as KSampler x 10/24 (the blocks are identical, so the time splits by block; an estimate, said
so in the output), next to the ratio against the whole forward.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_pipeline import (CLASS_NAMES, CLIP_NAME, ProcSampler, build_models, gib, med, mem_available,
                            run_prompt, safetensors_params, write_image)
from freeseg import dit
from freeseg.app.paths import REPO

# family -> what the bench runs: model key, the server's file name, conditioning shape,
# the family's timestep (freeseg.dit), the blocks of the bench model.
DIT_BENCH: dict[str, dict[str, Any]] = {
    "flux": {"key": "flux", "name": "freeseg-bench-flux1-dev-4-double.safetensors", "family": dit.FAMILIES["Flux"],
             "tokens": 256, "width": 4096, "pooled": 768, "depth": 4},
    "sd3": {"key": "sd3", "name": "freeseg-bench-sd3-medium.safetensors", "family": dit.FAMILIES["SD3"],
            "tokens": 154, "width": 4096, "pooled": 2048, "depth": 24},
}
VAE_NAME = "freeseg-bench-kl16-vae.safetensors"


def dit_prompts(spec: dict[str, Any], image: str, resolution: int, k: int, seed: int) -> tuple[dict, dict]:
    """(features graph, baseline) prompts of ``spec`` on the uploaded ``image``."""
    loaders = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": spec["name"], "weight_dtype": "default"}},
        "2": {"class_type": "VAELoader", "inputs": {"vae_name": VAE_NAME}},
        "3": {"class_type": "FreeSegBenchZeroConditioning",
              "inputs": {"tokens": spec["tokens"], "width": spec["width"], "pooled": spec["pooled"]}},
        "4": {"class_type": "LoadImage", "inputs": {"image": image}},
    }
    features = {
        **loaders,
        "10": {"class_type": "FreeSegDiffusionFeatures",
               "inputs": {"model": ["1", 0], "vae": ["2", 0], "image": ["4", 0], "conditioning": ["3", 0],
                          "timestep": spec["family"].timestep, "resolution": resolution,
                          "source": "cross_attn_queries", "seed": seed}},
        "11": {"class_type": "FreeSegClusterMasks",
               "inputs": {"features": ["10", 0], "n_clusters": k, "method": "kmeans", "seed": seed}},
        "12": {"class_type": "FreeSegCLIPLoader", "inputs": {"model_name": CLIP_NAME, "download": False,
                                                             "repo_id": ""}},
        "13": {"class_type": "FreeSegCLIPLabel",
               "inputs": {"segments": ["11", 0], "image": ["4", 0], "clip_model": ["12", 0],
                          "class_names": CLASS_NAMES, "crop_mode": "masked", "prompt": "bare", "threshold": 0.0}},
        "14": {"class_type": "FreeSegRefineMasks", "inputs": {"segments": ["13", 0], "image": ["4", 0],
                                                              "method": "crf"}},
        "15": {"class_type": "FreeSegBenchSaveFeatures", "inputs": {"features": ["10", 0], "path": ""}},
        "16": {"class_type": "FreeSegBenchSink", "inputs": {"value": ["14", 1]}},
    }
    baseline = {
        **loaders,
        "20": {"class_type": "ImageScale", "inputs": {"image": ["4", 0], "upscale_method": "bilinear",
                                                      "width": resolution, "height": resolution, "crop": "disabled"}},
        "21": {"class_type": "VAEEncode", "inputs": {"pixels": ["20", 0], "vae": ["2", 0]}},
        "22": {"class_type": "KSampler",
               "inputs": {"model": ["1", 0], "positive": ["3", 0], "negative": ["3", 0], "latent_image": ["21", 0],
                          "seed": seed, "steps": 1, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple",
                          "denoise": 1.0}},
        "23": {"class_type": "FreeSegBenchSink", "inputs": {"value": ["22", 0]}},
    }
    return features, baseline


def run_dit(args: argparse.Namespace) -> int:
    """The DiT bench of ``args.flux`` / ``args.sd3``; prints the stage table, the ratios and one
    JSON line; returns the exit status."""
    from freeseg.app.server import ComfyServer, link

    which = "flux" if args.flux else "sd3"
    spec = DIT_BENCH[which]
    family = spec["family"]
    used = dit.block_indices(family, spec["depth"])
    resolution, k = args.resolution, args.n_clusters
    print(f"bench_pipeline --{which}: {family.name}, bench model {spec['depth']} {family.blocks} at real width, "
          f"blocks used {used} (freeseg.dit.block_indices), timestep {family.timestep}, resolution {resolution}, "
          f"K={k}, {args.batch} image(s)", flush=True)
    t0 = time.perf_counter()
    models = build_models(args.cache, [spec["key"], "kl16_vae", "open_clip"])
    print(f"models ready in {time.perf_counter() - t0:.1f} s: {models}", flush=True)
    params = sum(safetensors_params(models[spec["key"]]).values())
    need = params * 2 + 84e6 * 4 + 151e6 * 4 + 3 * 2**30  # bf16 DiT, fp32 VAE and CLIP, activations + process
    if need > mem_available():
        reason = f"not enough memory: needs {gib(need)} GiB, MemAvailable {gib(mem_available())} GiB"
        print(f"skipped: {reason}", flush=True)
        print(json.dumps({"skipped": True, "reason": reason, "models": [which]}, sort_keys=True))
        return 0
    if args.threads is not None:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = str(args.threads)

    base = Path(tempfile.mkdtemp(prefix="freeseg-bench-dit-"))
    link(models[spec["key"]], str(base / "models" / "diffusion_models" / spec["name"]))
    link(models["kl16_vae"], str(base / "models" / "vae" / VAE_NAME))
    link(models["open_clip"], str(base / "models" / "open_clip" / CLIP_NAME))
    link(os.path.join(REPO, "bench", "probe_pack"), str(base / "custom_nodes" / "freeseg_bench_probe"))
    images = [write_image(base / f"img{i}.png", i) for i in range(args.batch + 1)]
    server = ComfyServer(str(base), extra_args=["--bf16-unet"]).start(timeout=300)
    sampler = ProcSampler(server.proc.pid).start()
    try:
        client = server.client
        names = [client.upload_image(str(p)) for p in images]
        feats, _ = dit_prompts(spec, names[0], resolution, k, seed=0)
        cold = run_prompt(client, "cold features graph (warm-up image; loads the models)", feats)
        info = json.loads(cold.entry["outputs"]["15"]["probe"][0])
        print(f"  features {info['shape']} from {info['blocks']}", flush=True)
        singles, baselines = [], []
        for i, name in enumerate(names[1:], 1):
            feats, base_prompt = dit_prompts(spec, name, resolution, k, seed=i)
            singles.append(run_prompt(client, f"features graph, image {i}", feats))
            baselines.append(run_prompt(client, f"baseline VAEEncode + KSampler 1 step, image {i}", base_prompt))
    except BaseException:
        print(server.log()[-6000:], file=sys.stderr)
        raise
    finally:
        sampler.stop()
        server.stop()
        shutil.rmtree(base, ignore_errors=True)

    share = (used[-1] + 1) / spec["depth"]
    figures = {
        "family": family.name, "bench_model": f"{spec['depth']} {family.blocks} at real width", "which": which,
        "params": params, "blocks_used": used, "timestep": family.timestep, "resolution": resolution,
        "features_shape": info["shape"], "cold_features_node_s": round(cold.seconds("FreeSegDiffusionFeatures"), 2),
        "forward_share_used": round(share, 4), "images": args.batch,
        "server_peak_rss_gib": gib(max((r for _, r, _ in sampler.samples), default=0)),
    }
    exact = "" if share == 1 else f" (estimate: one forward x {used[-1] + 1}/{spec['depth']} blocks)"
    # wall seconds, and the server's CPU seconds (steadier on a shared machine)
    for unit, clock in (("s", None), ("cpu_s", sampler)):
        stages = {ct: med([r.seconds(ct, clock) for r in singles]) for ct in
                  ("FreeSegDiffusionFeatures", "FreeSegClusterMasks", "FreeSegCLIPLabel", "FreeSegRefineMasks")}
        stages["features graph total"] = med([r.total_seconds(clock) for r in singles])
        vae = med([r.seconds("VAEEncode", clock) for r in baselines])
        forward = med([r.seconds("KSampler", clock) for r in baselines])
        to_last, feat = forward * share, stages["FreeSegDiffusionFeatures"]
        figures.update({
            f"stages_{unit}": {k: round(v, 2) for k, v in stages.items()}, f"vae_encode_{unit}": round(vae, 2),
            f"one_forward_{unit}": round(forward, 2), f"forward_to_last_block_{unit}": round(to_last, 2),
            f"features_over_vae_forward_to_last_block_{unit}": round(feat / (vae + to_last), 3),
            f"features_over_vae_full_forward_{unit}": round(feat / (vae + forward), 3),
        })
        what = "wall seconds" if clock is None else "server CPU seconds"
        print(f"\nstage (median of the single runs)           {what}")
        for name, value in stages.items():
            print(f"  {name:42s} {value:8.2f}")
        print(f"  {'baseline VAEEncode':42s} {vae:8.2f}")
        print(f"  {'baseline KSampler 1 step (one forward)':42s} {forward:8.2f}")
        print(f"  {'one forward to the last block used':42s} {to_last:8.2f}{exact}")
        print(f"ratio features node / (VAEEncode + forward to the last block used): "
              f"{figures[f'features_over_vae_forward_to_last_block_{unit}']}")
        print(f"ratio features node / (VAEEncode + whole forward): {figures[f'features_over_vae_full_forward_{unit}']}")
    print(json.dumps(figures, sort_keys=True))
    return 0
