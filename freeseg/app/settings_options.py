"""Settings on the command lines (``freeseg segment``, ``freeseg eval``), for both backends.

* ``--setting NAME=VALUE`` (repeatable) sets any ``freeseg.settings.FreeSegSettings`` field,
  typed from the field (``freeseg.settings.parse_setting``); ``--clusters``, ``--seed`` and
  ``--resolution`` are its shorthands for ``n_clusters``, ``seed`` and ``resolution``.
  ``setting_values(args)`` gives ``{field: value}``, checked against the settings' ranges.
* The diffusers backend takes them as ``FreeSegSettings`` fields.
* The comfyui backend writes them into the API workflow: ``SETTING_INPUTS`` maps every field to
  the (node class, input) pairs that hold it, and ``apply_settings`` sets each field on every
  such node of the workflow, refusing (naming the field) where the workflow has none.
  ``use_caption`` is the workflow's captioner: false drops its FreeSegBLIP2Loader.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
from typing import Any

from ..settings import DEFAULTS, FreeSegSettings, parse_setting
from .output import SegmentError

__all__ = ["SHORTHANDS", "SETTING_INPUTS", "add_setting_arguments", "setting_values", "apply_settings",
           "settings_in_workflow"]

SHORTHANDS = {"clusters": "n_clusters", "seed": "seed", "resolution": "resolution"}
"""argparse dest of a shorthand flag -> the setting it sets."""

CAPTIONER_LOADER = "FreeSegBLIP2Loader"

SETTING_INPUTS: dict[str, tuple[tuple[str, str], ...]] = {
    "use_caption": (),  # the workflow's FreeSegBLIP2Loader (see apply_settings)
    "max_new_tokens": (("FreeSegCaption", "max_new_tokens"),),
    "min_new_tokens": (("FreeSegCaption", "min_new_tokens"),),
    "num_beams": (),  # the nodes decode with the paper's 3 beams
    "caption_prompt": (("FreeSegCaption", "prompt"),),
    "resolution": (("FreeSegDiffusionFeatures", "resolution"),),
    "timestep": (("FreeSegDiffusionFeatures", "timestep"),),
    "source": (("FreeSegDiffusionFeatures", "source"),),
    "detail": (("FreeSegDiffusionFeatures", "detail"),),
    "seed": (("FreeSegDiffusionFeatures", "seed"), ("FreeSegClusterMasks", "seed"), ("FreeSegPipeline", "seed")),
    "n_clusters": (("FreeSegClusterMasks", "n_clusters"), ("FreeSegPipeline", "n_clusters")),
    "max_clusters": (("FreeSegClusterMasks", "max_clusters"),),
    "k_from": (("FreeSegClusterMasks", "k_from"),),
    "class_offset": (("FreeSegClusterMasks", "class_offset"),),
    "shared_batch": (("FreeSegClusterMasks", "shared_batch"),),
    "cluster_method": (("FreeSegClusterMasks", "method"),),
    "n_init": (),  # the nodes run k-means with the paper's 10 restarts
    "crop_mode": (("FreeSegCLIPLabel", "crop_mode"),),
    "prompt": (("FreeSegCLIPLabel", "prompt"),),
    "threshold": (("FreeSegCLIPLabel", "threshold"),),
    "rule": (("FreeSegCLIPLabel", "rule"), ("FreeSegPipeline", "rule")),
    "background": (("FreeSegCLIPLabel", "background"),),
    "refine": (("FreeSegRefineMasks", "method"),),
    "instances": (("FreeSegRefineMasks", "instances"),),
    "min_area": (("FreeSegRefineMasks", "min_area"),),
}
"""Every ``FreeSegSettings`` field -> the (node class, input name) pairs of a workflow that hold it."""


def add_setting_arguments(parser: Any) -> None:
    """``--setting NAME=VALUE`` (repeatable) on a parser or argument group."""
    names = ", ".join(f.name for f in dataclasses.fields(FreeSegSettings))
    parser.add_argument("--setting", dest="settings", action="append", default=[], metavar="NAME=VALUE",
                        help=f"set one FreeSeg-Diff setting (repeatable), for either backend: {names}")


def setting_values(args: argparse.Namespace, shorthands: bool = True) -> dict[str, Any]:
    """``{field: value}`` of ``--setting`` and (``shorthands``) of its shorthand flags
    (``SHORTHANDS``), typed and range-checked (ValueError naming the setting or the flag; a
    setting given twice too). Without ``shorthands`` (the comfyui backend, which fills the
    shorthands into the workflow itself) they are neither returned nor checked: the server
    checks them as node inputs."""
    values: dict[str, Any] = {}
    for dest, name in SHORTHANDS.items():
        if getattr(args, dest, None) is not None:
            values[name] = getattr(args, dest)
    short = set(values)
    for text in getattr(args, "settings", None) or []:
        name, value = parse_setting(text)
        if name in values:
            raise ValueError(f"--setting {name}: given twice (or with its shorthand flag)")
        values[name] = value
    if not shorthands:
        values = {k: v for k, v in values.items() if k not in short}
    try:
        DEFAULTS.replace(**values)
    except ValueError as exc:
        raise ValueError(f"--setting {exc}") from None
    return values


def _input_value(name: str, value: Any) -> Any:
    """A setting as its node input holds it (background: comma-separated text; no caption
    prompt: "")."""
    if name == "background":
        return ", ".join(value)
    if name == "caption_prompt" and value is None:
        return ""
    return value


def apply_settings(workflow: dict, values: dict[str, Any]) -> dict:
    """A copy of the API ``workflow`` with every setting of ``values`` written into the inputs
    of ``SETTING_INPUTS`` (on every node of those classes). SegmentError naming the setting
    where the workflow has no node input for it."""
    out = copy.deepcopy(workflow)
    classes = {node["class_type"] for node in out.values()}
    for name, value in values.items():
        if name == "use_caption":
            if value and CAPTIONER_LOADER not in classes:
                raise SegmentError(f"setting use_caption: the workflow has no {CAPTIONER_LOADER} to caption with")
            if not value:
                from .workflow import drop_captioner

                out = drop_captioner(out)
            continue
        pairs = [(c, i) for c, i in SETTING_INPUTS[name] if c in classes]
        if not pairs:
            where = " or ".join(f"{c}.{i}" for c, i in SETTING_INPUTS[name]) or "no node input"
            raise SegmentError(f"setting {name}: the workflow has no node that holds it (it is set in {where})")
        for class_type, input_name in pairs:
            for node in out.values():
                if node["class_type"] == class_type:
                    node["inputs"][input_name] = _input_value(name, value)
    return out


def settings_in_workflow(workflow: dict) -> dict[str, Any]:
    """The settings a filled workflow runs with, read back through ``SETTING_INPUTS`` (typed-in
    values only, the first node of a class that holds one; ``use_caption``: whether it has a
    captioner loader)."""
    found: dict[str, Any] = {}
    for name, pairs in SETTING_INPUTS.items():
        for class_type, input_name in pairs:
            for node in workflow.values():
                value = node["inputs"].get(input_name) if node["class_type"] == class_type else None
                if value is not None and not isinstance(value, list):
                    found.setdefault(name, value)
    found["use_caption"] = any(n["class_type"] == CAPTIONER_LOADER for n in workflow.values())
    return found
