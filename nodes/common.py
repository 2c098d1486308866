"""Shared pieces of the FreeSeg-Diff nodes: the pinned node API, custom socket types, image
conversion, queue-time input checks, model management of third-party (transformers /
open_clip) models, progress and interruption."""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Iterable, Iterator, Optional

import torch

# The pinned V3 node API (shipped by every ComfyUI this pack supports: 0.3.75 and newer, checked
# up to 0.33.0). Every node module (and the extension in __init__.py) imports `io` /
# `ComfyExtension` from here.
from comfy_api.v0_0_2 import ComfyExtension, io

import comfy.model_management as mm
import comfy.model_patcher
import comfy.utils

from ..freeseg.settings import FLOAT_RANGES, INT_RANGES
from ..freeseg.stages import to_rgb  # noqa: F401 (re-exported)
from ..freeseg.threads import cpu_threads, torch_threads

CATEGORY = "FreeSeg-Diff"
log = logging.getLogger("freeseg-diff")

Features = io.Custom("FREESEG_FEATURES")
Segments = io.Custom("FREESEG_SEGMENTS")
Captioner = io.Custom("FREESEG_BLIP2")
ClipModel = io.Custom("FREESEG_CLIP")


def check_choice(name: str, value, options: Iterable[str]) -> Optional[str]:
    """Queue-time check of a combo input (ComfyUI 0.3.75 does not check V3 combos itself):
    None when `value` is one of `options` or not known yet (None: linked), else the message."""
    options = list(options)
    if value is None or value in options:
        return None
    return f"{name}: {value!r} is not one of {', '.join(map(str, options))}"


def check_number(name: str, value) -> Optional[str]:
    """Queue-time check of a FLOAT input that validate_inputs declares (ComfyUI then skips its
    own min/max check): finite and within the range of the setting ``name``
    (``input_range``); None when fine or linked."""
    if value is None:
        return None
    low, high = input_range(name).values()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return f"{name}: {value!r} is not a finite number"
    if not low <= value <= high:
        return f"{name}: {value} is outside {low}..{high}"
    return None


def input_range(name: str) -> dict:
    """``{"min", "max"}`` of a node input from the range the library validates the setting
    ``name`` against (``freeseg.settings.INT_RANGES`` / ``FLOAT_RANGES``): one range everywhere."""
    low, high = INT_RANGES[name] if name in INT_RANGES else FLOAT_RANGES[name]
    return {"min": low, "max": high}


def first_problem(*problems: Optional[str]) -> bool | str:
    """What a V3 `validate_inputs` returns: True, or the first problem found."""
    return next((p for p in problems if p), True)


class ModuleHolder(torch.nn.Module):
    """An nn.Module that holds a transformers / open_clip model so a ModelPatcher can manage it
    (ModelPatcher assigns `.device`, which transformers models do not allow)."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.inner = module


def make_patcher(module: torch.nn.Module) -> comfy.model_patcher.ModelPatcher:
    """Put `module` (on the offload device) under ComfyUI model management."""
    holder = ModuleHolder(module)
    return comfy.model_patcher.ModelPatcher(holder, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device(),
                                            size=mm.module_size(holder))


def load_to_device(patcher: comfy.model_patcher.ModelPatcher) -> torch.nn.Module:
    """Load a third-party model fully onto its device right before use; returns the model.
    Call it before every use: ComfyUI may have offloaded it to make room for other models."""
    mm.load_models_gpu([patcher], force_full_load=True)
    return patcher.model.inner


def model_dtype(device: torch.device) -> torch.dtype:
    """fp16 where ComfyUI would use it, else bf16 where supported, else fp32."""
    if mm.should_use_fp16(device):
        return torch.float16
    if mm.should_use_bf16(device):
        return torch.bfloat16
    return torch.float32


def compute_device() -> torch.device:
    """Where the pack's own tensor work (k-means, CRF) runs: ComfyUI's torch device when it is
    a GPU (any device but the CPU), else the CPU."""
    device = mm.get_torch_device()
    return device if device.type != "cpu" else torch.device("cpu")


@contextlib.contextmanager
def on_compute_device() -> Iterator[torch.device]:
    """Yields ``compute_device()``; on the CPU the body runs with torch threads set to the CPUs
    other processes leave free (``freeseg.threads.cpu_threads``), restored after."""
    device = compute_device()
    if device.type != "cpu":
        yield device
        return
    with torch_threads(cpu_threads()):
        yield device


class Progress:
    """A progress bar over `total` steps that also honours ComfyUI's interrupt button."""

    def __init__(self, total: int):
        self.bar = comfy.utils.ProgressBar(max(total, 1))

    def check(self) -> None:
        mm.throw_exception_if_processing_interrupted()

    def step(self) -> None:
        self.bar.update(1)
        self.check()
