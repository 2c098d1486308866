"""Image captioning with BLIP-2 (the paper's captioner) or BLIP v1, from a local folder.

A model folder is what ``save_pretrained`` writes (and what a hub download of
e.g. ``Salesforce/blip2-opt-2.7b`` holds): ``config.json``, the weights
(``model.safetensors`` / ``pytorch_model.bin``, possibly sharded with an
``*.index.json``) and the processor files (``preprocessor_config.json`` or
``processor_config.json``, ``tokenizer.json`` / ``tokenizer_config.json``...).
Nothing is ever downloaded.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import torch

# config.json "model_type" -> (model class name, processor class name) in transformers.
CAPTIONER_TYPES: dict[str, tuple[str, str]] = {
    "blip-2": ("Blip2ForConditionalGeneration", "Blip2Processor"),
    "blip": ("BlipForConditionalGeneration", "BlipProcessor"),
}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
MODEL_FOLDER_HINT = ("a captioner model folder holds config.json (model_type 'blip-2' or 'blip'), the weights "
                     "(model.safetensors or pytorch_model.bin, or shards with an .index.json) and the "
                     "processor files (preprocessor_config.json or processor_config.json, tokenizer files)")


def _listing(folder: str) -> str:
    """Short, sorted listing of a folder's entries for error messages."""
    names = sorted(os.listdir(folder))
    shown = ", ".join(names[:12]) + (f", ... ({len(names)} entries)" if len(names) > 12 else "")
    return shown or "nothing"


def captioner_type(folder: str) -> str:
    """The ``model_type`` of a captioner folder ("blip-2" or "blip").

    Raises FileNotFoundError (no such folder / not a model folder) or ValueError
    (unreadable config, unsupported model type, missing weights), naming the folder.
    """
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"captioner folder not found: {folder!r}")
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{folder!r} is not a model folder (no config.json; it holds: "
                                f"{_listing(folder)}); {MODEL_FOLDER_HINT}")
    try:
        with open(config_path, encoding="utf-8") as fh:
            model_type = json.load(fh).get("model_type")
    except (OSError, ValueError) as exc:
        raise ValueError(f"{config_path!r}: cannot read the model config ({exc})") from exc
    if model_type not in CAPTIONER_TYPES:
        raise ValueError(f"{folder!r}: model_type {model_type!r} is not a supported captioner "
                         f"(supported: {', '.join(CAPTIONER_TYPES)})")
    if not any(os.path.isfile(os.path.join(folder, name)) for name in WEIGHT_FILES):
        raise ValueError(f"{folder!r} has a config.json but no weights (expected one of "
                         f"{', '.join(WEIGHT_FILES)}; it holds: {_listing(folder)})")
    return model_type


def _dtype_kwarg(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """``from_pretrained`` dtype keyword: ``dtype`` (transformers >= 4.56) else ``torch_dtype``.

    transformers 5 silently ignores ``torch_dtype``, so the name matters.
    """
    import transformers
    from packaging.version import Version

    name = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    return {name: dtype}


def load_captioner(folder: str, device: str | torch.device = "cpu",
                   dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """Load a BLIP-2 or BLIP captioner from a local folder, offline.

    The class (``Blip2ForConditionalGeneration`` or ``BlipForConditionalGeneration``)
    is chosen by ``config.json``'s ``model_type``.  Returns ``(model, processor)``;
    the model is in eval mode, on ``device``, with floating weights in ``dtype``.
    Raises FileNotFoundError / ValueError naming ``folder`` when it is not a
    captioner model folder.
    """
    import transformers

    folder = os.fspath(folder)
    model_cls_name, processor_cls_name = CAPTIONER_TYPES[captioner_type(folder)]
    processor = getattr(transformers, processor_cls_name).from_pretrained(folder, local_files_only=True)
    model = getattr(transformers, model_cls_name).from_pretrained(folder, local_files_only=True,
                                                                 **_dtype_kwarg(dtype))
    return model.to(device=device, dtype=dtype).eval(), processor


def _model_device_dtype(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and floating dtype of the model's first floating parameter."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.device, p.dtype
    return torch.device("cpu"), torch.float32


def images_to_uint8(images: torch.Tensor) -> list[np.ndarray]:
    """[B,H,W,C] float 0..1 (C >= 3; extra channels dropped) -> B uint8 arrays [H,W,3]."""
    if images.ndim != 4 or images.shape[-1] < 3:
        raise ValueError(f"images: expected [B,H,W,3] floats in 0..1, got shape {tuple(images.shape)}")
    rgb = images[..., :3].detach().float().clamp(0.0, 1.0).mul(255.0).round().to(torch.uint8).cpu()
    return [img.numpy() for img in rgb]


def _strip_prompt(sequences: torch.Tensor, input_ids: torch.Tensor | None) -> torch.Tensor:
    """Drop the prompt tokens when ``generate`` echoed them at the start of every sequence."""
    if input_ids is None:
        return sequences
    n = input_ids.shape[1]
    if sequences.shape[1] >= n and torch.equal(sequences[:, :n], input_ids.to(sequences.device)):
        return sequences[:, n:]
    return sequences


def _remove_prefix(text: str, prompt: str | None) -> str:
    """``text`` without a leading copy of ``prompt`` (case-insensitive), stripped."""
    text = text.strip()
    if prompt and text.lower().startswith(prompt.strip().lower()):
        text = text[len(prompt.strip()):]
    return text.strip()


@torch.no_grad()
def generate_captions(model: Any, processor: Any, images: torch.Tensor, prompt: str | None = None,
                      max_new_tokens: int = 30, num_beams: int = 3) -> list[str]:
    """Caption a batch of images with one ``generate`` call.

    images: [B,H,W,3] float in 0..1 (any device; ComfyUI IMAGE layout), converted to
    uint8 arrays for the processor.  ``prompt`` (e.g. "a photo of") conditions the
    caption; the returned text is the continuation only (prompt removed).  Runs on
    the model's device and dtype.  Returns B whitespace-stripped strings.
    """
    arrays = images_to_uint8(images)
    text = [prompt] * len(arrays) if prompt else None
    batch = processor(images=arrays, text=text, return_tensors="pt")
    device, dtype = _model_device_dtype(model)
    inputs = {k: (v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device))
              for k, v in batch.items() if isinstance(v, torch.Tensor)}
    sequences = model.generate(**inputs, max_new_tokens=max_new_tokens, num_beams=num_beams)
    sequences = _strip_prompt(sequences, inputs.get("input_ids"))
    decoded = processor.batch_decode(sequences, skip_special_tokens=True)
    return [_remove_prefix(t, prompt) for t in decoded]
