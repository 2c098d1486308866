"""The ``freeseg eval`` command line (``python -m freeseg eval``): ``build_parser`` and ``main``.

Scores segmentations on Pascal VOC 2012 / COCO-Object with ``freeseg.eval.evaluate.evaluate``
(metrics, boundary handling, protocols and the ``--out`` resume cache are described there;
the report files in ``freeseg.eval.reports``). Predictions come from ``--predictions DIR`` (a
folder of label maps) or FreeSeg-Diff run here on every image (``--backend``)::

    python -m freeseg eval --dataset voc --root VOCdevkit/VOC2012 --predictions PRED_DIR
    python -m freeseg eval --dataset coco-object --root COCO_OBJECT --predictions PRED_DIR \\
        --json --limit 500 --out results/coco --official-boundary
    python -m freeseg eval --dataset voc --root VOCdevkit/VOC2012 --backend comfyui \\
        --url http://gpu0:8188 --url http://gpu1:8188 --mode closed --out results/voc
    python -m freeseg eval --dataset voc --root VOCdevkit/VOC2012 --protocol paper \\
        --backend diffusers --sd sd-v1-4.safetensors --blip2 models/blip --clip models/clip

``--setting NAME=VALUE`` (repeatable; ``--clusters``, ``--seed``, ``--resolution`` its shorthands)
sets any ``freeseg.settings.FreeSegSettings`` field for either backend
(``freeseg.app.settings_options``).
``--backend diffusers`` runs ``freeseg.backends.diffusers.FreeSegPipeline`` in this process;
``--backend comfyui`` runs an API workflow (default ``workflows/api/freeseg_full.json``; any
checkpoint family the nodes support) on ComfyUI servers through
``freeseg.app.comfy_segmenter.ComfySegmenter``, several images at once (``workers``): one
``--url`` server from this process, several (or ``--ray [ADDRESS]``) as Ray actors bound to the
servers, on a local Ray or the cluster at ADDRESS (``freeseg.app.cluster``; Ray is the optional
cluster extra, requirements-cluster.txt).
Exit status: 0 ok, 2 error (the message names the file or option at fault).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

from ..app.settings_options import add_setting_arguments, setting_values
from .datasets import DATASETS, DatasetError, load_dataset, read_class_names
from .evaluate import PROTOCOLS, evaluate
from .reports import format_table
from .sources import PredictionFolder

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m freeseg eval",
        description="Score segmentations on Pascal VOC 2012 or COCO-Object: standard "
                    "dataset-level mIoU and the official per-image-averaged mIoU.")
    parser.add_argument("--dataset", choices=DATASETS, default="voc",
                        help="dataset layout (default: voc)")
    parser.add_argument("--root", required=True, type=Path,
                        help="dataset folder (VOC: VOC2012 with JPEGImages/, SegmentationClass/, "
                             "ImageSets/Segmentation/; COCO-Object: images/<split>/, annotations/<split>/)")
    parser.add_argument("--split", default=None,
                        help="split name (default: val for VOC, val2017 for COCO-Object)")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--predictions", type=Path, metavar="DIR",
                     help="folder of <stem>.png label maps (class indices or VOC palette colours)")
    src.add_argument("--backend", choices=("diffusers", "comfyui"),
                     help="run FreeSeg-Diff itself on every image: diffusers (freeseg.backends.diffusers) or "
                          "comfyui (an API workflow on ComfyUI servers, freeseg.app.comfy_segmenter)")
    model = parser.add_argument_group("model (with --backend diffusers)")
    model.add_argument("--sd", type=Path, metavar="FILE_OR_DIR",
                       help="Stable Diffusion checkpoint (.safetensors, LDM layout) or diffusers folder")
    model.add_argument("--sd-config", type=Path, default=None, metavar="DIR",
                       help="diffusers-layout config folder for a non-standard checkpoint")
    model.add_argument("--vae", type=Path, default=None, metavar="PATH", help="VAE to use instead of the checkpoint's")
    model.add_argument("--blip2", type=Path, default=None, metavar="DIR",
                       help="captioner folder: BLIP (the paper's, Salesforce/blip-image-captioning-base) or BLIP-2")
    model.add_argument("--clip", type=Path, metavar="PATH", help="open_clip model folder or weights file")
    comfy = parser.add_argument_group("model (with --backend comfyui; --blip2 / --clip then name the models on "
                                      "the server, default: its only one)")
    comfy.add_argument("--url", action="append", default=None, metavar="URL",
                       help="a ComfyUI server with this node pack (default http://127.0.0.1:8188); repeat it to "
                            "spread the images over several servers (on Ray)")
    comfy.add_argument("--per-server", type=int, default=2, metavar="N", help="prompts in flight per server (default 2)")
    comfy.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                       help="the --url servers as Ray actors (requirements-cluster.txt): a local Ray without "
                            "ADDRESS, else the cluster at ADDRESS (auto, ray://host:10001)")
    comfy.add_argument("--workflow", default=None, metavar="FILE",
                       help="API-format workflow (default workflows/api/freeseg_full.json)")
    comfy.add_argument("--checkpoint", default=None, metavar="NAME", help="checkpoint name on the server")
    comfy.add_argument("--set", dest="overrides", action="append", default=[], metavar="CLASS.INPUT=VALUE",
                       help="set any input of the workflow's nodes of a class")
    comfy.add_argument("--timeout", type=float, default=3600.0, help="seconds one image may take (default 3600)")
    settings = parser.add_argument_group("settings (either backend)")
    settings.add_argument("--clusters", type=int, default=None, metavar="K",
                          help="masks per image (default 4; 0: automatic); --setting n_clusters=K")
    settings.add_argument("--seed", type=int, default=None, help="seed of the noise and the k-means start; "
                          "--setting seed=N")
    settings.add_argument("--resolution", type=int, default=None, metavar="PX",
                          help="resolution of the diffusion features pass (default 512); --setting resolution=PX")
    add_setting_arguments(settings)
    model.add_argument("--mode", choices=("closed", "open"), default="closed",
                       help="closed: the model names masks from its caption, names mapped to dataset classes; "
                            "open: the dataset's class names are the vocabulary")
    parser.add_argument("--protocol", choices=PROTOCOLS, default="standard",
                        help="standard: today's metrics and modes; paper: the paper's closed-vocabulary "
                             "pipeline (with --backend diffusers: the PAPER preset, the dataset's full class "
                             "list, candidates from the caption; --mode is not used) and the official "
                             "per-image mIoU with label 255 as background beside the dataset-level mIoU")
    parser.add_argument("--official-boundary", action="store_true",
                        help="score label 255 as background, as the official FreeSeg-Diff code "
                             "did for VOC boundaries (default: ignore 255)")
    parser.add_argument("--limit", type=int, default=None, metavar="N",
                        help="score only the first N images of the split")
    parser.add_argument("--out", type=Path, default=None, metavar="DIR",
                        help="write results.md/.csv/.json, per_class_iou.png, examples.png and a "
                             "resume cache here")
    parser.add_argument("--examples", type=int, default=4, metavar="N",
                        help="images in examples.png (default 4; 0: none)")
    parser.add_argument("--class-names", type=Path, default=None, metavar="FILE",
                        help="class names, one per line (line i = label i); overrides the built-in list")
    parser.add_argument("--json", action="store_true",
                        help='print only {"miou", "miou_per_image", "per_class_iou"} as JSON')
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--no-cache", action="store_true",
                        help="rescore every image even if cached under --out")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI entry (``python -m freeseg eval ...``). Returns the exit status (0 ok, 2 error)."""
    parser = build_parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.backend == "diffusers" and (args.sd is None or args.clip is None):
        parser.error("--backend diffusers needs --sd and --clip (and --blip2 for --mode closed)")
    if args.backend == "comfyui" and (args.sd is not None or args.sd_config is not None or args.vae is not None):
        parser.error("--sd, --sd-config and --vae are for --backend diffusers; with comfyui use --checkpoint "
                     "(a name on the server) or --workflow")
    if args.backend != "comfyui" and (args.url or args.ray is not None):
        parser.error("--url and --ray are for --backend comfyui")
    if args.protocol == "paper" and args.backend == "diffusers" and args.blip2 is None:
        parser.error("--protocol paper with --backend diffusers needs --blip2 (the captioner): the candidate "
                     "classes come from the caption")
    if args.protocol == "paper" and args.official_boundary:
        parser.error("--protocol paper already scores label 255 as background in the per-image mIoU; "
                     "drop --official-boundary")
    if args.protocol == "paper" and args.backend == "comfyui":
        parser.error("--protocol paper runs the paper pipeline through --backend diffusers (or scores --predictions)")
    if args.limit is not None and args.limit < 1:
        parser.error("--limit must be >= 1")
    try:
        given = setting_values(args, shorthands=args.backend != "comfyui")  # comfyui: the server checks them
    except ValueError as exc:
        parser.error(str(exc))
    if given and args.backend is None:
        parser.error("--setting, --clusters, --seed and --resolution are for --backend (the predictions are made)")
    errors: tuple = (FileNotFoundError, DatasetError, ValueError)
    workers = 1
    source = None
    if args.backend == "comfyui":
        from ..app.comfy_segmenter import EVAL_ERRORS
        errors += EVAL_ERRORS
    try:
        names = read_class_names(args.class_names) if args.class_names is not None else None
        dataset = load_dataset(args.dataset, args.root, args.split, names)
        mode = args.mode
        if args.backend == "comfyui":
            from ..app.comfy_segmenter import segmenter_from_args

            source = segmenter_from_args(args)
            workers = source.workers
        elif args.backend == "diffusers":
            from ..backends.diffusers import FreeSegPipeline
            from ..settings import DEFAULTS, PAPER

            paper = args.protocol == "paper"
            settings = (PAPER if paper else DEFAULTS).replace(**setting_values(args))
            source = FreeSegPipeline.from_pretrained(str(args.sd), clip=str(args.clip),
                                                     blip2=str(args.blip2) if args.blip2 else None,
                                                     sd_config=args.sd_config, vae=args.vae, settings=settings)
            mode = "paper" if paper else mode
        else:
            source = PredictionFolder(args.predictions)
        result = evaluate(dataset, source, mode=mode, protocol=args.protocol,
                          official_boundary=args.official_boundary, limit=args.limit,
                          out_dir=args.out, examples=max(0, args.examples),
                          progress=False if args.no_progress else None,
                          use_cache=not args.no_cache, workers=workers)
    except errors as exc:
        print(f"freeseg eval: error: {exc}", file=sys.stderr)
        return 2
    finally:
        if args.backend == "comfyui" and source is not None:
            source.close()  # the Ray actors, when the servers ran on Ray
    if args.json:
        print(json.dumps(result.to_json()))
    else:
        print(format_table(result))
    if args.out is not None:
        print(f"freeseg eval: {result.n_scored} image(s) scored, {result.n_cached} from cache; "
              f"reports in {args.out}", file=sys.stderr)
    return 0
