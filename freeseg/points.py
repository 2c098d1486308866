"""Pick segments by pointing: the segment(s) under given pixel positions.

Public API:
    parse_points(text) -> [(x, y), ...] from "x,y" pairs or a JSON list of {"x":..,"y":..}
    select_at_points(segments, points) -> ([B,H,W] mask, B lists of picked mask indices)

Coordinates are pixels of the image the segments belong to: x to the right, y down, (0, 0)
the top-left pixel (what ComfyUI point-editor nodes such as KJNodes' Points Editor emit in
their JSON "coordinates" output). Fractional positions fall in the pixel floor(x), floor(y).
"""

from __future__ import annotations

import json
import math
import re

import torch

from .segments import Segments

_PAIR = re.compile(r"(-?\d+(?:\.\d*)?)\s*,\s*(-?\d+(?:\.\d*)?)")
_SEPARATORS = re.compile(r"[\s;()\[\]]*")


def _number(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise ValueError(f"points: {where} must be a finite number, got {value!r}")
    return float(value)


def _from_json(data: object) -> list[tuple[float, float]]:
    """A dict {"x","y"}, a [x, y] pair, or a (nested) list of those -> points."""
    if isinstance(data, dict):
        if "x" not in data or "y" not in data:
            raise ValueError(f"points: a JSON point needs 'x' and 'y', got {data!r}")
        return [(_number(data["x"], "x"), _number(data["y"], "y"))]
    if isinstance(data, list):
        if len(data) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in data):
            return [(_number(data[0], "x"), _number(data[1], "y"))]
        return [p for item in data for p in _from_json(item)]
    raise ValueError(f"points: expected {{'x':..,'y':..}} objects or [x, y] pairs in the JSON, got {data!r}")


def parse_points(text: str) -> list[tuple[float, float]]:
    """Points from text: JSON (``[{"x": 10, "y": 20}, ...]``, ``[[10, 20], ...]`` or one object)
    or plain pairs ``"10,20; 30,40"`` (pairs separated by ``;``, newlines, spaces or brackets).

    Returns a list of (x, y) floats (empty for blank text). Raises ValueError quoting the
    part that is neither.
    """
    if not isinstance(text, str):
        raise ValueError(f"points must be a string, got {type(text).__name__}")
    stripped = text.strip()
    if not stripped:
        return []
    if stripped[0] in "[{":
        try:
            data = json.loads(stripped)
        except json.JSONDecodeError:
            data = None  # maybe plain pairs in brackets: "(10,20) [30,40]"
        if data is not None:
            return _from_json(data)
    points, pos = [], 0
    for match in _PAIR.finditer(stripped):
        gap = stripped[pos:match.start()]
        if _SEPARATORS.fullmatch(gap) is None:
            raise ValueError(f"points: cannot read {gap.strip()!r} in {text!r}; give 'x,y' pairs such as "
                             "'120,80; 300,200' or a JSON list of {\"x\": .., \"y\": ..}")
        points.append((float(match.group(1)), float(match.group(2))))
        pos = match.end()
    rest = stripped[pos:]
    if _SEPARATORS.fullmatch(rest) is None or not points:
        raise ValueError(f"points: cannot read {rest.strip() or text!r}; give 'x,y' pairs such as "
                         "'120,80; 300,200' or a JSON list of {\"x\": .., \"y\": ..}")
    return points


def check_points(points: list[tuple[float, float]], size: tuple[int, int]) -> list[tuple[int, int]]:
    """(x, y) floats -> integer pixels (floor); ValueError naming a point outside the (H, W) image."""
    h, w = size
    out = []
    for x, y in points:
        px, py = math.floor(x), math.floor(y)
        if not (0 <= px < w and 0 <= py < h):
            raise ValueError(f"points: ({x:g}, {y:g}) is outside the {w}x{h} image (x in 0..{w - 1}, "
                             f"y in 0..{h - 1})")
        out.append((px, py))
    return out


def select_at_points(segments: Segments, points: list[tuple[float, float]]) -> tuple[torch.Tensor, list[list[int]]]:
    """The segments under the points, in every image of the batch.

    For each image and point, every mask whose value there is above 0.5 is picked (the
    mask with the highest value when none is, e.g. soft masks); named and unnamed masks alike.

    Returns:
        (``[B,H,W]`` float32 union of the picked masks, B sorted lists of picked mask indices).
    """
    pixels = check_points(points, segments.image_size)
    b = segments.batch_size
    out = torch.zeros((b, *segments.image_size), dtype=torch.float32)
    picked: list[list[int]] = []
    for i in range(b):
        chosen: set[int] = set()
        for px, py in pixels:
            values = segments.masks[i, :, py, px]
            if values.numel() == 0:
                continue
            hits = torch.nonzero(values > 0.5).flatten().tolist()
            if not hits and float(values.max()) > 0:
                hits = [int(values.argmax())]
            chosen.update(hits)
        for k in sorted(chosen):
            out[i] = torch.maximum(out[i], segments.masks[i, k])
        picked.append(sorted(chosen))
    return out, picked


__all__ = ["parse_points", "check_points", "select_at_points"]
