"""Shared pieces of the FreeSeg-Diff nodes: custom socket types, image conversion, model
management of third-party (transformers / open_clip) models, progress and interruption."""

from __future__ import annotations

import logging

import torch
from comfy_api.latest import io

import comfy.model_management as mm
import comfy.model_patcher
import comfy.utils

from ..freeseg.stages import class_lists_for_batch, parse_names, to_rgb  # noqa: F401 (re-exported)

CATEGORY = "FreeSeg-Diff"
log = logging.getLogger("freeseg-diff")

Features = io.Custom("FREESEG_FEATURES")
Segments = io.Custom("FREESEG_SEGMENTS")
Captioner = io.Custom("FREESEG_BLIP2")
ClipModel = io.Custom("FREESEG_CLIP")


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


class Progress:
    """A progress bar over `total` steps that also honours ComfyUI's interrupt button."""

    def __init__(self, total: int):
        self.bar = comfy.utils.ProgressBar(max(total, 1))

    def check(self) -> None:
        mm.throw_exception_if_processing_interrupted()

    def step(self) -> None:
        self.bar.update(1)
        self.check()
