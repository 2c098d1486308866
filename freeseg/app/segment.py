"""`python -m freeseg segment IMAGE --out DIR`: segment a picture and name every part.

Writes into DIR, whichever backend ran:

* ``mask_<i>_<label>.png``: one per named mask, mode L, 0/255, at the image's size;
* ``overlay.png``: the image with the coloured, labelled masks;
* ``labels.json``: the layout of ``freeseg.labels_file`` (``"format": "freeseg-diff/segments-v2"``,
  the one Save Segments writes too): size, backend, settings and timings, the image (``source``,
  ``overlay``, ``caption``, ``class_names``) and per mask its label, score, area, bbox and file.

Backends:

* ``comfyui`` (default) runs the ``freeseg_full`` API workflow, either on a running server
  (``--url``) or on an embedded ComfyUI that this command starts from the project's
  environment (``.venv/ComfyUI``, or ``--comfyui DIR``), with ``--models DIR`` as its models
  folder (checkpoints/, blip/ or blip2/, open_clip/; a ComfyUI ``models/`` folder works as is).
* ``diffusers`` calls ``freeseg.backends.diffusers`` (no ComfyUI).

``--setting NAME=VALUE`` (repeatable; ``--clusters``, ``--seed``, ``--resolution`` are its
shorthands) sets any ``freeseg.settings.FreeSegSettings`` field on either backend: diffusers
takes it as a setting, comfyui writes it into the workflow's nodes
(``freeseg.app.settings_options``), refusing a setting that no node of the workflow holds.

``--random-weights`` runs the embedded path on tiny random-weight models (built by
``synthetic/``, in a subprocess): a smoke test of the install, the masks mean nothing.

A folder or a quoted glob instead of IMAGE segments every image into ``DIR/<name>/`` (the
layout above plus a ``done.json`` resume marker) and writes ``DIR/index.csv`` and
``DIR/index.json`` (``freeseg.app.batch``), ``--per-server`` images in flight at once.

Past one server is Ray (``freeseg.app.cluster``, an optional extra): ``--ray [ADDRESS]`` runs the
images on Ray actors that each own a worker (``--workers N`` embedded ComfyUI servers, or
diffusers pipelines, one GPU each where the cluster has GPUs; or the ``--url`` servers), on a
local Ray without ADDRESS or on the cluster at ADDRESS (``auto``, ``ray://host:10001``). Several
``--url`` without ``--ray`` run on a local Ray too. One server (``--url URL`` or the embedded
one) without ``--ray`` runs in this process, without Ray.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Any, Iterator, Optional

from PIL import Image

from ..model_files import model_entries
from .batch import (EXIT_SOME_FAILED, BatchError, Item, index_entries, is_batch_input, list_images, plan,
                    run_batch, write_index)
from .client import ComfyClient, ComfyError, one_line
from .cluster import RayWorkers, WorkerSpec, read_bytes, write_files
from .console import out_folder_error, report_error, shown
from .output import SegmentError, segment_to_folder
from .paths import DEFAULT_WORKFLOW, REPO, fixture_cache
from .remote import WorkflowJob, check_servers
from .server import ComfyServer, default_comfy_dir, link
from .settings_options import add_setting_arguments, apply_settings, setting_values
from .workflow import add_workflow_arguments, load_workflow, missing_node_types, workflow_settings

CHECKPOINT_EXTENSIONS = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".sft")
SYNTHETIC_DIR = os.path.join(REPO, "synthetic")  # the random-weight model builders (they import ComfyUI)
# Where each random-weight fixture goes in the embedded server's models/ folder.
RANDOM_MODEL_LINKS = {
    "sd15_ckpt": ("checkpoints", "freeseg-tiny-sd15.safetensors"),
    "blip2_dir": ("blip2", "tiny-blip2"),
    "open_clip_dir": ("open_clip", "tiny-open-clip"),
}
# Every fixture the random-weights smoke test uses (both backends).
RANDOM_FIXTURES = (*RANDOM_MODEL_LINKS, "sd15_diffusers_config", "sd15_diffusers_vae")
# The random BLIP-2 writes no real nouns: without these names nothing would be named.
RANDOM_CLASS_NAMES = "dog, cat, tree, sky"
RANDOM_NOTICE = (
    "--random-weights: the checkpoint, BLIP-2 and CLIP are RANDOM test fixtures.",
    "The masks, labels and caption are MEANINGLESS: this run is a smoke test of",
    "the install, nothing more.",
)
# Captioner folders of a models folder, searched in this order (BLIP, then BLIP-2).
CAPTIONER_DIRS = ("blip", "blip2")
# What goes where in a models folder, per model kind (the missing-weights message).
WHAT_GOES_WHERE = {
    "checkpoint": ("checkpoints", "put an SD1.5/SD2.x/SDXL checkpoint (.safetensors) in {dir}/checkpoints/"),
    "blip2": ("blip", "put a BLIP folder in {dir}/blip/<name>/ (config.json, model.safetensors, processor and "
                      "tokenizer files; the paper's: Salesforce/blip-image-captioning-base) or a BLIP-2 folder "
                      "in {dir}/blip2/<name>/ (e.g. Salesforce/blip2-opt-2.7b), or give class names with "
                      "--class-names to segment without captions"),
    "clip": ("open_clip", "put an open_clip folder in {dir}/open_clip/<name>/ (open_clip_config.json, "
                          "open_clip_model.safetensors, e.g. timm/vit_base_patch32_clip_224.openai)"),
}

def scan_models(models_dir: str) -> dict[str, list[str]]:
    """The model names a models folder offers, as ComfyUI lists them: checkpoint files (with
    sub-folders), BLIP / BLIP-2 folders (holding config.json, in blip/ or blip2/), open_clip
    folders or weight files."""
    found: dict[str, list[str]] = {"checkpoint": [], "blip2": [], "clip": []}
    root = os.path.join(models_dir, "checkpoints")
    for folder, _, files in os.walk(root, followlinks=True):
        for name in files:
            if name.lower().endswith(CHECKPOINT_EXTENSIONS):
                found["checkpoint"].append(os.path.relpath(os.path.join(folder, name), root).replace(os.sep, "/"))
    found["blip2"] = list({n for sub in CAPTIONER_DIRS for n in model_entries("blip2", os.path.join(models_dir, sub))})
    found["clip"] = model_entries("open_clip", os.path.join(models_dir, "open_clip"))
    return {role: sorted(names) for role, names in found.items()}


def pick_models(models_dir: str, wanted: dict, class_names: Optional[str]) -> dict[str, str]:
    """Model names to use from `models_dir`: the ones asked for (checked), else the only one
    there. BLIP-2 may be missing when class names are given. SegmentError says what to put where."""
    found = scan_models(models_dir)
    chosen: dict[str, str] = {}
    missing: list[str] = []
    flags = {"checkpoint": "--checkpoint", "blip2": "--blip2", "clip": "--clip"}
    for role, names in found.items():
        sub, put = WHAT_GOES_WHERE[role]
        if role in wanted:
            if wanted[role] not in names:
                raise SegmentError(f"{flags[role]} {wanted[role]!r}: not in {os.path.join(models_dir, sub)} "
                                   f"(found: {', '.join(names) or 'nothing'})")
            chosen[role] = wanted[role]
        elif len(names) == 1:
            chosen[role] = names[0]
        elif len(names) > 1:
            raise SegmentError(f"several models in {os.path.join(models_dir, sub)}: pick one with {flags[role]} "
                               f"({', '.join(names)})")
        elif not (role == "blip2" and class_names):
            missing.append(put.format(dir=models_dir))
    if missing:
        raise SegmentError("model weights missing in " + models_dir + ":\n  " + "\n  ".join(missing)
                           + "\n(--models DIR picks another models folder; --random-weights smoke-tests the "
                             "install without real weights)")
    return chosen


def model_paths(models_dir: str, names: dict[str, str]) -> dict[str, str]:
    """Full paths of the chosen model names in `models_dir`."""
    subs = {"checkpoint": ("checkpoints",), "blip2": CAPTIONER_DIRS, "clip": ("open_clip",)}
    paths = {}
    for role, name in names.items():
        candidates = [os.path.join(models_dir, sub, name) for sub in subs[role]]
        paths[role] = next((c for c in candidates if os.path.exists(c)), candidates[0])
    return paths


def build_random_models(python: str, comfy_dir: str) -> dict[str, str]:
    """Build (or reuse from the cache) the random-weight fixtures in a subprocess; {key: path}."""
    if not os.path.isfile(os.path.join(SYNTHETIC_DIR, "cache.py")):
        raise SegmentError(f"--random-weights needs the project's checkout ({SYNTHETIC_DIR}/cache.py is missing)")
    cache = fixture_cache()
    # Only what the smoke test uses (not e.g. the large SD2 checkpoint the server tests add).
    code = ("import json, sys; sys.path.insert(0, sys.argv[2]); from synthetic.cache import build_all; "
            "print('FIXTURES=' + json.dumps(build_all(sys.argv[1], keys=sys.argv[3].split(','))))")
    print(f"building / reusing the random-weight models in {cache} ...", file=sys.stderr, flush=True)
    env = dict(os.environ, FREESEG_COMFYUI_DIR=comfy_dir)
    proc = subprocess.run([python, "-c", code, cache, REPO, ",".join(RANDOM_FIXTURES)],
                          cwd=REPO, capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("FIXTURES=")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise SegmentError("building the random-weight models failed:\n  " + "\n  ".join(tail))
    return json.loads(lines[-1][len("FIXTURES="):])


def print_notice(lines: tuple[str, ...]) -> None:
    """A framed, impossible-to-miss notice on stderr."""
    width = max(len(ln) for ln in lines) + 4
    frame = "#" * (width + 2)
    print("\n".join([frame] + [f"#  {ln.ljust(width - 4)}  #" for ln in lines] + [frame]), file=sys.stderr,
          flush=True)


# -- the ComfyUI backend --------------------------------------------------------------------------

def wants_gpu(python: str) -> bool:
    """Whether `python`'s torch sees a GPU (CUDA, ROCm, XPU or MPS); False when it cannot tell."""
    code = ("import sys, torch; b = getattr(torch, 'backends', None); "
            "ok = torch.cuda.is_available() or (hasattr(torch, 'xpu') and torch.xpu.is_available()) "
            "or (b is not None and hasattr(b, 'mps') and b.mps.is_available()); sys.exit(0 if ok else 3)")
    try:
        return subprocess.run([python, "-c", code], capture_output=True, timeout=120).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def workflow_job(args: argparse.Namespace, models: dict, overrides: list, class_names: Optional[str]) -> WorkflowJob:
    """The WorkflowJob the command-line options describe (``--setting`` written into the
    workflow by ``settings_options.apply_settings``; its shorthands fill it as before)."""
    workflow = apply_settings(load_workflow(args.workflow), setting_values(args, shorthands=False))
    return WorkflowJob(workflow, class_names=class_names, n_clusters=args.clusters,
                       seed=args.seed, models=models, overrides=overrides, timeout=args.timeout)


def image_error(e: ComfyError, image: str) -> ComfyError:
    """`e` naming the image file (not the server's copy of it); a refused workflow (node_errors)
    is the workflow's fault and stays as it is."""
    if "node_errors" in e.details:
        return e
    error = type(e)(f"{shown(image)}: {e}", e.details)
    error.prompt = e.prompt
    return error


def segment_on_server(url: str, args: argparse.Namespace, models: dict, overrides: list,
                      class_names: Optional[str]) -> dict:
    """Run the workflow for the one image on the server at `url` (in this process) and write the
    output folder; the labels document."""
    info = ComfyClient(url).object_info()
    job = workflow_job(args, models, overrides, class_names)
    check_servers({url: info}, job)
    try:
        result = job.run(ComfyClient(url), info, args.image, quiet=args.quiet)
    except ComfyError as e:
        raise image_error(e, args.image) from None
    return result.write(args.out, args.image)


def ray_workers(args: argparse.Namespace, models: dict, class_names: Optional[str], per_worker: int) -> RayWorkers:
    """The Ray actors of the options: one per ``--url`` server, else ``--workers`` embedded
    ComfyUI servers or diffusers pipelines (default: one per GPU of the cluster, at least one)."""
    if args.backend == "diffusers":
        specs = [WorkerSpec("diffusers", args=args, models=models, class_names=class_names, copies=args.workers)]
    elif args.url:
        specs = [WorkerSpec("url", url=u.rstrip("/")) for u in dict.fromkeys(args.url)]
    else:
        specs = [WorkerSpec("embedded", args=args, models=models, class_names=class_names, copies=args.workers)]
    return RayWorkers(specs, per_worker=per_worker, address=args.ray or None, gpus=False if args.cpu else None)


def comfy_key(workers: RayWorkers, args: argparse.Namespace, overrides: list,
              class_names: Optional[str]) -> tuple[Optional[WorkflowJob], str]:
    """(the job the workers run, the run's key): every worker must run the same thing."""
    described = list(workers.describe.values())
    if described[0]["kind"] == "diffusers":
        keys = {d["cache_key"] for d in described}
        if len(keys) > 1:
            raise SegmentError(f"the diffusers workers loaded different models: {', '.join(sorted(keys))}")
        return None, f"{keys.pop()}-{hashlib.sha256(str(class_names).encode()).hexdigest()[:8]}"
    job = workflow_job(args, described[0]["models"], overrides, class_names)
    return job, check_servers({d["url"]: d["info"] for d in described}, job)


def segment_on_ray(args: argparse.Namespace, models: dict, overrides: list, class_names: Optional[str]) -> dict:
    """The one image on Ray (``--ray``, or several ``--url``): the first worker free runs it; the
    labels document."""
    workers = ray_workers(args, models, class_names, per_worker=1)
    try:
        job, _ = comfy_key(workers, args, overrides, class_names)
        try:
            files = workers.run("segment_files", job, *read_bytes(args.image), args.image, class_names)
        except ComfyError as e:
            raise image_error(e, args.image) from None
        write_files(args.out, files)
        return json.loads(files["labels.json"])
    finally:
        workers.close()


@contextlib.contextmanager
def embedded_server(args: argparse.Namespace, models: dict, class_names: Optional[str],
                    die_with_parent: bool = False) -> Iterator[tuple[str, dict]]:
    """Start a ComfyUI of our own (temporary base folder, our pack, the models linked in);
    yields (its URL, the model names picked in its models folder) and stops it again.
    `die_with_parent`: see ``ComfyServer`` (a Ray actor's server)."""
    comfy_dir = os.path.abspath(args.comfyui or default_comfy_dir())
    if not os.path.isfile(os.path.join(comfy_dir, "main.py")):
        if args.comfyui:
            raise SegmentError(f"no ComfyUI main.py in {comfy_dir}: --comfyui takes the folder that holds "
                               "ComfyUI's main.py")
        raise SegmentError(f"no ComfyUI main.py in {comfy_dir} (the project's environment): run "
                           "scripts/setup_env.sh, pass --comfyui DIR, or use a running server with --url")
    python = args.python or sys.executable
    base = tempfile.mkdtemp(prefix="freeseg-comfyui-")
    try:
        if args.random_weights:
            fixtures = build_random_models(python, comfy_dir)
            models_dir = os.path.join(base, "models")
            for key, (folder, name) in RANDOM_MODEL_LINKS.items():
                link(fixtures[key], os.path.join(models_dir, folder, name))
        else:
            models_dir = os.path.abspath(args.models or os.path.join(comfy_dir, "models"))
        chosen = pick_models(models_dir, models, class_names)
        if not args.random_weights:
            link(models_dir, os.path.join(base, "models"))
        cpu = args.cpu or not wants_gpu(python)
        print(f"starting ComfyUI from {comfy_dir} ({'CPU' if cpu else 'GPU'}; models: {models_dir}) ...",
              file=sys.stderr, flush=True)
        server = ComfyServer(base, comfy_dir=comfy_dir, python=python, cpu=cpu, die_with_parent=die_with_parent)
        try:  # stopped whatever happens, Ctrl-C while it starts included
            try:
                server.start(timeout=args.startup_timeout)
            except RuntimeError as e:
                raise SegmentError(f"the embedded ComfyUI did not start: {e}") from None
            missing = missing_node_types(load_workflow(args.workflow), server.client.object_info())
            if missing:
                errors = [ln for ln in server.log().splitlines() if "error" in ln.lower() or "freeseg" in ln.lower()]
                raise SegmentError("the freeseg-diff pack did not load into the embedded ComfyUI (no "
                                   f"{', '.join(missing)}):\n  " + "\n  ".join(errors[-15:]))
            yield server.url, chosen
        finally:
            server.stop()
    finally:
        shutil.rmtree(base, ignore_errors=True)


def segment_embedded(args: argparse.Namespace, models: dict, overrides: list, class_names: Optional[str]) -> dict:
    """The one image on an embedded ComfyUI (`embedded_server`)."""
    with embedded_server(args, models, class_names) as (url, chosen):
        return segment_on_server(url, args, chosen, overrides, class_names)


# -- the diffusers backend ------------------------------------------------------------------------

def load_diffusers(args: argparse.Namespace, models: dict, class_names: Optional[str]) -> Any:
    """``freeseg.backends.diffusers.FreeSegPipeline.from_pretrained`` on the models of ``--models``
    (or the random fixtures), with the options' settings."""
    if args.url:
        raise SegmentError("--url runs the ComfyUI backend; leave it out with --backend diffusers")
    if args.workflow != DEFAULT_WORKFLOW or args.overrides:
        raise SegmentError("--workflow and --set apply to the ComfyUI backend only")
    from ..backends.diffusers import FreeSegPipeline

    if args.random_weights:
        fixtures = build_random_models(args.python or sys.executable,
                                       os.path.abspath(args.comfyui or default_comfy_dir()))
        paths = {"checkpoint": fixtures["sd15_ckpt"], "blip2": fixtures["blip2_dir"], "clip": fixtures["open_clip_dir"]}
        # Component configs / a diffusers VAE for the tiny checkpoint, when the fixtures offer them.
        for key, role in (("sd15_diffusers_config", "sd_config"), ("sd15_diffusers_vae", "vae")):
            if fixtures.get(key):
                paths[role] = fixtures[key]
    else:
        models_dir = os.path.abspath(args.models or os.path.join(default_comfy_dir(), "models"))
        paths = model_paths(models_dir, pick_models(models_dir, models, class_names))
    kwargs: dict[str, Any] = {"sd": paths["checkpoint"], "clip": paths.get("clip"), "blip2": paths.get("blip2")}
    kwargs.update({role: paths[role] for role in ("sd_config", "vae") if paths.get(role)})
    kwargs.update(setting_values(args))  # --setting and its shorthands: FreeSegSettings fields
    if args.cpu:
        kwargs["device"] = "cpu"
    print("loading the models (diffusers backend) ...", file=sys.stderr, flush=True)
    try:
        return FreeSegPipeline.from_pretrained(**kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise SegmentError(f"the diffusers backend failed: {one_line(str(e))}") from None


def segment_diffusers(args: argparse.Namespace, models: dict, class_names: Optional[str]) -> dict:
    """Run ``freeseg.backends.diffusers`` (diffusers, no ComfyUI) on the one image: `load_diffusers`,
    then ``segment_to_folder``."""
    pipeline = load_diffusers(args, models, class_names)
    try:
        return segment_to_folder(pipeline, args.image, args.out, class_names=class_names)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise SegmentError(f"the diffusers backend failed: {one_line(str(e))}") from None


# -- a folder of images -----------------------------------------------------------------------------

def segment_batch(items: list[Item], args: argparse.Namespace, models: dict, overrides: list,
                  class_names: Optional[str]) -> tuple[list[dict], dict]:
    """Segment every item (resuming); (index entries, {image: error})."""
    if uses_ray(args):
        return segment_batch_on_ray(items, args, models, overrides, class_names)
    if args.backend == "diffusers":
        pipeline = load_diffusers(args, models, class_names)
        key = f"{pipeline.cache_key}-{hashlib.sha256(str(class_names).encode()).hexdigest()[:8]}"

        def segment_one(item: Item) -> dict:
            check_image(item.image)
            return segment_to_folder(pipeline, item.image, item.folder, class_names)

        failures = run_batch(items, segment_one, key, threads=1, progress=not args.quiet)
        return index_entries(items, key, failures, args.out), failures
    if args.url:
        return segment_batch_on_server(items, args.url[0], args, models, overrides, class_names)
    with embedded_server(args, models, class_names) as (url, chosen):
        return segment_batch_on_server(items, url, args, chosen, overrides, class_names)


def is_refused(error: BaseException) -> bool:
    """A workflow the server refuses (``node_errors``): every image would fail alike."""
    return isinstance(error, ComfyError) and "node_errors" in error.details


def segment_batch_on_server(items: list[Item], url: str, args: argparse.Namespace, models: dict,
                            overrides: list, class_names: Optional[str]) -> tuple[list[dict], dict]:
    """The batch on the one server at `url`, in this process (``--per-server`` prompts in flight)."""
    info = ComfyClient(url).object_info()
    job = workflow_job(args, models, overrides, class_names)
    key = check_servers({url: info}, job)
    print(f"segmenting {len(items)} image(s) on {url}, {args.per_server} in flight", file=sys.stderr, flush=True)

    def segment_one(item: Item) -> dict:
        check_image(item.image)
        return job.run(ComfyClient(url), info, item.image).write(item.folder, item.image)

    failures = run_batch(items, segment_one, key, threads=args.per_server, progress=not args.quiet, fatal=is_refused)
    return index_entries(items, key, failures, args.out), failures


def segment_batch_on_ray(items: list[Item], args: argparse.Namespace, models: dict, overrides: list,
                         class_names: Optional[str]) -> tuple[list[dict], dict]:
    """The batch on Ray actors (`ray_workers`, ``--per-server`` images in flight on each): each
    image's bytes go to a free worker, its files come back and are written here."""
    workers = ray_workers(args, models, class_names, per_worker=args.per_server)
    try:
        job, key = comfy_key(workers, args, overrides, class_names)
        print(f"segmenting {len(items)} image(s) on {len(workers.live)} Ray worker(s), {args.per_server} in flight "
              "on each", file=sys.stderr, flush=True)

        def segment_one(item: Item) -> dict:
            check_image(item.image)
            files = workers.run("segment_files", job, *read_bytes(item.image), item.image, class_names)
            write_files(item.folder, files)
            return json.loads(files["labels.json"])

        failures = run_batch(items, segment_one, key, threads=workers.capacity, progress=not args.quiet,
                             fatal=is_refused)
    finally:
        workers.close()
    return index_entries(items, key, failures, args.out), failures


def uses_ray(args: argparse.Namespace) -> bool:
    """``--ray``, or several ``--url`` (past one server is Ray)."""
    return args.ray is not None or len(set(args.url or ())) > 1


def check_image(path: str) -> None:
    """SegmentError when `path` is not a readable image, a truncated one included (before any
    server sees it); the one check of single-image and folder runs."""
    try:
        with Image.open(path) as im:
            im.load()
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise SegmentError(f"cannot read the image {shown(path)}: {one_line(str(e))}") from None


# -- command line ---------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m freeseg segment",
        description="Segment IMAGE and name every part: writes mask_<i>_<label>.png (one per named mask), "
                    "overlay.png and labels.json into --out. Given a folder or a quoted glob instead, segments "
                    "every image into --out/<name>/ and writes --out/index.csv and --out/index.json (a rerun "
                    f"skips the images done; exit code {EXIT_SOME_FAILED} when some failed).")
    parser.add_argument("image", metavar="IMAGE|DIR|GLOB",
                        help="the picture to segment, or a folder of pictures, or a quoted glob ('photos/**/*.jpg')")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (created if needed)")
    parser.add_argument("--backend", choices=("comfyui", "diffusers"), default="comfyui",
                        help="comfyui (default): the freeseg_full workflow; diffusers: freeseg.backends.diffusers")
    parser.add_argument("--url", action="append", default=None, metavar="URL",
                        help="a running ComfyUI server (default: start an embedded one); repeat it to spread the "
                             "images over several servers (one per GPU or machine; runs on Ray)")
    parser.add_argument("--per-server", type=int, default=2, metavar="N",
                        help="images in flight on each server / worker for a folder (default 2: one runs, one waits)")
    parser.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                        help="run on Ray actors, one worker each (needs the cluster extra: "
                             "requirements-cluster.txt): a local Ray without ADDRESS, else the cluster at ADDRESS "
                             "(auto, ray://host:10001); put it after IMAGE|DIR, or write --ray=ADDRESS")
    parser.add_argument("--workers", type=int, default=0, metavar="N",
                        help="with --ray and no --url: embedded ComfyUI servers (or diffusers pipelines) to run, "
                             "one per actor (default: one per GPU of the cluster, at least one)")
    parser.add_argument("--comfyui", default=None, metavar="DIR",
                        help="the ComfyUI install (folder of main.py) the embedded server runs "
                             "(default: the project's .venv/ComfyUI)")
    parser.add_argument("--python", default=None, metavar="EXE",
                        help="the Python that runs the embedded ComfyUI (default: this one)")
    parser.add_argument("--models", default=None, metavar="DIR",
                        help="models folder with checkpoints/, blip/ or blip2/, open_clip/ (default: the ComfyUI's "
                             "models/)")
    parser.add_argument("--random-weights", action="store_true",
                        help="tiny random models: a smoke test of the install (the masks mean nothing)")
    parser.add_argument("--cpu", action="store_true", help="run the embedded ComfyUI on the CPU")
    parser.add_argument("--startup-timeout", type=float, default=300.0, help="seconds for the embedded server to start")
    add_workflow_arguments(parser)
    add_setting_arguments(parser)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of `python -m freeseg segment`; returns the exit code (0 done, 1 error, 2 bad
    options, 3 a folder run finished with failed images, 130 interrupted)."""
    args = build_parser().parse_args(argv)
    if args.url and (args.random_weights or args.models or args.comfyui):
        print("error: --random-weights, --models and --comfyui start an embedded ComfyUI; leave out --url (the "
              "server at --url uses its own models)", file=sys.stderr)
        return 2
    if args.random_weights and args.models:
        print("error: --random-weights and --models exclude each other", file=sys.stderr)
        return 2
    if args.per_server < 1:
        print("error: --per-server must be >= 1", file=sys.stderr)
        return 2
    if args.workers < 0 or (args.workers and args.url):
        print("error: --workers N (>= 1) sets the embedded servers or diffusers pipelines of --ray; with --url "
              "each server is one worker", file=sys.stderr)
        return 2
    try:  # a bad --setting is refused before anything runs (and with diffusers a bad shorthand)
        setting_values(args, shorthands=args.backend == "diffusers")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    problem = out_folder_error(args.out)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    batch = not os.path.isfile(args.image) and is_batch_input(args.image)
    if not batch and not os.path.isfile(args.image):
        print(f"error: no image file {shown(args.image)}", file=sys.stderr)
        return 1
    if not batch:
        try:
            check_image(args.image)
        except SegmentError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    items: list[Item] = []
    if batch:
        try:
            paths, root = list_images(args.image, exclude=args.out)
        except BatchError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        items = plan(paths, root, args.out)
    class_names = args.class_names
    if args.random_weights:
        if not class_names:
            class_names = RANDOM_CLASS_NAMES
        print_notice(RANDOM_NOTICE + (f"Class names: {class_names}",))
    try:
        models, overrides = workflow_settings(args)
        if args.backend == "comfyui":
            load_workflow(args.workflow)  # a malformed workflow is refused before any server is used
        if batch:
            entries, failures = segment_batch(items, args, models, overrides, class_names)
        elif uses_ray(args):
            doc = segment_on_ray(args, models, overrides, class_names)
        elif args.backend == "diffusers":
            doc = segment_diffusers(args, models, class_names)
        elif args.url:
            doc = segment_on_server(args.url[0], args, models, overrides, class_names)
        else:
            doc = segment_embedded(args, models, overrides, class_names)
    except ComfyError as e:
        report_error(e)
        return 1
    except SegmentError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted" + (" (rerun the same command to resume)" if batch else ""), file=sys.stderr)
        return 130
    if args.random_weights:
        print_notice(RANDOM_NOTICE)
    if batch:
        summary = write_index(args.out, entries)
        print(f"{summary['done']} of {summary['images']} image(s) done, {summary['failed']} failed; index: "
              f"{summary['index_csv']}, {summary['index_json']}", file=sys.stderr)
        print(json.dumps(summary))
        return EXIT_SOME_FAILED if failures or summary["done"] < summary["images"] else 0
    print(f"wrote {len(doc.get('masks', []))} mask(s), overlay.png and labels.json to {args.out}",
          file=sys.stderr)
    print(json.dumps(doc, indent=2))
    return 0
