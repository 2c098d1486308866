"""Reports of an evaluation run: ``format_table`` (console) and ``write_reports`` (files).

``write_reports`` fills the ``--out`` folder with ``results.md``, ``results.csv``,
``results.json``, ``per_class_iou.png`` (bar chart; needs matplotlib, skipped with a warning
without it) and ``examples.png`` (image | ground truth | prediction for the first N images).

numpy, PIL and (optionally) matplotlib; no torch or ComfyUI import.
"""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .datasets import Sample, SegDataset, colorize, read_label_png
from .result import EvalResult, json_number
from .sources import PredictionSource

__all__ = ["DATASET_TITLES", "format_table", "write_reports"]

DATASET_TITLES = {"voc": "Pascal VOC 2012", "coco-object": "COCO-Object"}


def _pct(value: float) -> str:
    return "-" if math.isnan(float(value)) else f"{100.0 * float(value):.2f}"


def _boundary_text(result: EvalResult) -> str:
    if result.protocol == "paper":
        return ("paper protocol: label 255 ignored in the dataset-level mIoU, scored as background in "
                "the per-image one (official code)")
    return ("label 255 scored as background (--official-boundary)" if result.official_boundary
            else "label 255 ignored")


def format_table(result: EvalResult) -> str:
    """Human-readable summary + per-class table (IoU in percent)."""
    title = DATASET_TITLES.get(result.dataset, result.dataset)
    gt_px = result.confusion.sum(axis=1)
    pred_px = result.confusion[:, :len(result.class_names)].sum(axis=0)
    width = max(12, max(len(n) for n in result.class_names))
    lines = [
        f"{title} ({result.split}): {result.n_images} images, {_boundary_text(result)}",
        f"predictions: {result.source}",
        f"  mIoU, dataset-level (standard)     : {_pct(result.miou)}",
        f"  mIoU, per-image mean (official)    : {_pct(result.miou_per_image)}",
        f"  pixel accuracy                     : {_pct(result.pixel_accuracy)}",
        "",
        f"{'class':<{width}}  {'IoU':>7}  {'IoU/img':>7}  {'images':>6}  {'GT px':>10}  {'pred px':>10}",
    ]
    for i, name in enumerate(result.class_names):
        lines.append(f"{name:<{width}}  {_pct(result.iou[i]):>7}  {_pct(result.iou_per_image[i]):>7}"
                     f"  {int(result.images_with_class[i]):>6}  {int(gt_px[i]):>10}  {int(pred_px[i]):>10}")
    return "\n".join(lines)


def _csv_value(value: float) -> str:
    return "" if math.isnan(float(value)) else f"{float(value):.6f}"


def write_reports(result: EvalResult, dataset: SegDataset, source: PredictionSource,
                  samples: Sequence[Sample], out_dir: Path, examples: int = 4,
                  pred_dir: Optional[Path] = None) -> dict[str, Path]:
    """Write results.{md,csv,json}, per_class_iou.png and examples.png; return their paths.

    ``results.csv`` columns: class, index, iou, iou_per_image, images_with_class, gt_pixels,
    pred_pixels (counts over scored pixels, i.e. GT not ignored); one row per class (values
    0..1, empty = undefined), then a row ``mIoU`` holding the two mIoUs in the iou /
    iou_per_image columns.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    c = len(result.class_names)
    gt_px = result.confusion.sum(axis=1)
    pred_px = result.confusion[:, :c].sum(axis=0)

    csv_path = out_dir / "results.csv"
    with open(csv_path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["class", "index", "iou", "iou_per_image", "images_with_class",
                         "gt_pixels", "pred_pixels"])
        for i, name in enumerate(result.class_names):
            writer.writerow([name, i, _csv_value(result.iou[i]), _csv_value(result.iou_per_image[i]),
                             int(result.images_with_class[i]), int(gt_px[i]), int(pred_px[i])])
        writer.writerow(["mIoU", "", _csv_value(result.miou), _csv_value(result.miou_per_image),
                         result.n_images, int(gt_px.sum()), int(pred_px.sum())])
    files["csv"] = csv_path

    title = DATASET_TITLES.get(result.dataset, result.dataset)
    md = [
        f"# {title} ({result.split}): segmentation scores", "",
        "| setting | value |", "| --- | --- |",
        f"| dataset root | `{dataset.root}` |",
        f"| images scored | {result.n_images} |",
        f"| predictions | {result.source} |",
        f"| boundary | {_boundary_text(result)} |",
        f"| settings hash | `{result.settings_hash}` |", "",
        "| metric | value (%) |", "| --- | ---: |",
        f"| mIoU, dataset-level (standard) | {_pct(result.miou)} |",
        f"| mIoU, per-image mean (official FreeSeg-Diff code) | {_pct(result.miou_per_image)} |",
        f"| pixel accuracy | {_pct(result.pixel_accuracy)} |", "",
        "Dataset-level: one confusion matrix over the split, IoU = TP/(TP+FP+FN) per class, "
        "mean over classes present in the ground truth or the predictions. Per-image: each "
        "image's mean IoU over the classes in its ground truth, averaged over images. "
        "IoU per image (column): mean of a class's IoU over the images containing it.", "",
        "| class | IoU | IoU per image | images | GT pixels | predicted pixels |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for i, name in enumerate(result.class_names):
        md.append(f"| {name} | {_pct(result.iou[i])} | {_pct(result.iou_per_image[i])} | "
                  f"{int(result.images_with_class[i])} | {int(gt_px[i])} | {int(pred_px[i])} |")
    md_path = out_dir / "results.md"
    md_path.write_text("\n".join(md) + "\n", encoding="utf-8")
    files["markdown"] = md_path

    json_path = out_dir / "results.json"
    payload = dict(result.to_json())
    payload["details"] = {
        "dataset": result.dataset, "split": result.split, "n_images": result.n_images,
        "official_boundary": result.official_boundary, "protocol": result.protocol, "source": result.source,
        "settings_hash": result.settings_hash, "pixel_accuracy": json_number(result.pixel_accuracy),
        "per_class_iou_per_image": {n: json_number(v) for n, v in zip(result.class_names, result.iou_per_image)},
        "image_miou": {k: json_number(v) for k, v in result.image_miou.items()},
    }
    json_path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    files["json"] = json_path

    chart = _bar_chart(result, out_dir / "per_class_iou.png")
    if chart is not None:
        files["chart"] = chart
    if examples > 0 and samples:
        files["examples"] = _examples_grid(result, dataset, source, samples[:examples],
                                           out_dir / "examples.png", pred_dir)
    return files


def _bar_chart(result: EvalResult, path: Path) -> Optional[Path]:
    """Horizontal grouped bars of per-class IoU (dataset-level and per-image), PNG via the
    Agg canvas (no global backend change). None, with a warning, without matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        print("freeseg eval: matplotlib is not installed; per-class chart skipped", file=sys.stderr)
        return None
    names = list(result.class_names)
    n = len(names)
    y = np.arange(n)
    fig = Figure(figsize=(7.0, 1.2 + 0.28 * n), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.barh(y - 0.2, np.nan_to_num(result.iou) * 100, height=0.4, label="dataset-level IoU")
    ax.barh(y + 0.2, np.nan_to_num(result.iou_per_image) * 100, height=0.4, label="per-image IoU")
    for i in np.flatnonzero(np.isnan(result.iou)):
        ax.text(1, y[i], "n/a", va="center", fontsize=7, color="0.5")
    ax.set_yticks(y)
    ax.set_yticklabels(names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel("IoU (%)")
    ax.set_title(f"{DATASET_TITLES.get(result.dataset, result.dataset)} {result.split}: "
                 f"mIoU {_pct(result.miou)} / per-image {_pct(result.miou_per_image)}", fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return path


def _examples_grid(result: EvalResult, dataset: SegDataset, source: PredictionSource,
                   samples: Sequence[Sample], path: Path, pred_dir: Optional[Path],
                   panel_h: int = 160) -> Path:
    """PNG grid, one row per sample: image | ground truth | prediction (VOC colours)."""
    font = ImageFont.load_default()
    rows: list[Image.Image] = []
    text_h, pad = 14, 4

    def prediction(sample: Sample) -> np.ndarray:
        saved = pred_dir / f"{sample.safe_stem}.png" if pred_dir is not None else None
        if saved is not None and saved.is_file():
            return read_label_png(saved)
        return source.predict(dataset, sample)

    for sample in samples:
        image = dataset.load_image(sample)
        h, w = image.shape[:2]
        pw = max(1, round(w * panel_h / h))
        panels = [Image.fromarray(image).resize((pw, panel_h), Image.BILINEAR),
                  Image.fromarray(colorize(dataset.load_label(sample))).resize((pw, panel_h), Image.NEAREST),
                  Image.fromarray(colorize(prediction(sample))).resize((pw, panel_h), Image.NEAREST)]
        row = Image.new("RGB", (3 * pw + 4 * pad, panel_h + text_h + pad), "white")
        draw = ImageDraw.Draw(row)
        score = result.image_miou.get(sample.stem, float("nan"))
        draw.text((pad, 1), f"{sample.stem}  mIoU {_pct(score)}", fill="black", font=font)
        for j, panel in enumerate(panels):
            row.paste(panel, (pad + j * (pw + pad), text_h))
        rows.append(row)
    width = max(r.width for r in rows)
    header = 16
    grid = Image.new("RGB", (width, header + sum(r.height for r in rows)), "white")
    draw = ImageDraw.Draw(grid)
    first_pw = (rows[0].width - 4 * pad) // 3
    for j, title in enumerate(("image", "ground truth", "prediction")):
        draw.text((pad + j * (first_pw + pad), 2), title, fill="black", font=font)
    y = header
    for row in rows:
        grid.paste(row, (0, y))
        y += row.height
    grid.save(path)
    return path
