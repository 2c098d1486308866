"""Image captioning with BLIP (v1, the paper's captioner) or BLIP-2, from a local folder.

A model folder is what ``save_pretrained`` writes (and what a hub download of
``Salesforce/blip-image-captioning-base`` or ``Salesforce/blip2-opt-2.7b`` holds):
``config.json``, the weights (``model.safetensors`` / ``pytorch_model.bin``, possibly
sharded with an ``*.index.json``) and the processor files (``preprocessor_config.json`` or
``processor_config.json``, ``tokenizer.json`` / ``tokenizer_config.json``...).
Nothing is ever downloaded, and no code from the folder ever runs: a folder that asks for it is
refused before loading (``freeseg.model_files.check_no_code``) and transformers is called with
``trust_remote_code=False``.

The paper's captioner (the official code calls LAVIS ``blip_caption`` / ``base_coco``) is
BLIP base fine-tuned on COCO, whose transformers twin is
``Salesforce/blip-image-captioning-base``, decoded with the text prompt ``"a picture of "``
(removed from the caption), beam search with 3 beams, ``max_length=30`` and
``min_length=10``. LAVIS counts the decoder's start token ``[DEC]`` and the prompt's word
pieces (``a``, ``picture``, ``of``) in both lengths, exactly as transformers'
``max_length`` / ``min_length`` do when the prompt is passed as ``input_ids``. This module
takes the prompt-independent ``max_new_tokens`` / ``min_new_tokens`` instead (generated
tokens only, the end token included in the maximum), so the paper's values are
30 - 4 = 26 and 10 - 4 = 6 (``PAPER_MAX_NEW_TOKENS``, ``PAPER_MIN_NEW_TOKENS``).
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import torch

from .model_files import check_no_code

# config.json "model_type" -> (model class name, processor class name) in transformers.
CAPTIONER_TYPES: dict[str, tuple[str, str]] = {
    "blip-2": ("Blip2ForConditionalGeneration", "Blip2Processor"),
    "blip": ("BlipForConditionalGeneration", "BlipProcessor"),
}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
# The paper's caption decoding (see the module docstring for the length conversion).
PAPER_PROMPT = "a picture of "
PAPER_PREFIX_TOKENS = 4  # [DEC] a picture of (BLIP's BERT tokenizer)
PAPER_MAX_NEW_TOKENS = 30 - PAPER_PREFIX_TOKENS
PAPER_MIN_NEW_TOKENS = 10 - PAPER_PREFIX_TOKENS
PAPER_NUM_BEAMS = 3
MAX_PROMPT_CHARS = 200
MAX_NEW_TOKENS_LIMIT = 200

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
    captioner model folder, and ValueError naming the file and key when it asks for code
    (``check_no_code``); nothing in the folder runs.
    """
    import transformers

    folder = os.fspath(folder)
    model_cls_name, processor_cls_name = CAPTIONER_TYPES[captioner_type(folder)]
    check_no_code("blip2", folder)
    processor = getattr(transformers, processor_cls_name).from_pretrained(folder, local_files_only=True,
                                                                         trust_remote_code=False)
    model = getattr(transformers, model_cls_name).from_pretrained(folder, local_files_only=True,
                                                                 trust_remote_code=False, **_dtype_kwarg(dtype))
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


def check_caption_options(prompt: str | None, max_new_tokens: int, min_new_tokens: int = 0,
                          num_beams: int = 1) -> None:
    """Raise ValueError naming the first invalid caption decoding option.

    ``prompt``: None or a one-line string of at most ``MAX_PROMPT_CHARS`` characters ("" =
    no prompt); ``max_new_tokens``: 1..``MAX_NEW_TOKENS_LIMIT``; ``min_new_tokens``:
    0..``max_new_tokens``; ``num_beams`` >= 1.
    """
    def integer(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    if prompt is not None and not isinstance(prompt, str):
        raise ValueError(f"prompt must be a string (\"\" for none), got {type(prompt).__name__}")
    if prompt and ("\n" in prompt or "\r" in prompt or len(prompt) > MAX_PROMPT_CHARS):
        raise ValueError(f"prompt must be one line of at most {MAX_PROMPT_CHARS} characters, got {prompt[:40]!r}"
                         f"{'...' if len(prompt) > 40 else ''} ({len(prompt)} characters)")
    if not integer(max_new_tokens) or not 1 <= max_new_tokens <= MAX_NEW_TOKENS_LIMIT:
        raise ValueError(f"max_new_tokens must be an int in 1..{MAX_NEW_TOKENS_LIMIT}, got {max_new_tokens!r}")
    if not integer(min_new_tokens) or not 0 <= min_new_tokens <= max_new_tokens:
        raise ValueError(f"min_new_tokens must be an int in 0..max_new_tokens ({max_new_tokens}), "
                         f"got {min_new_tokens!r}")
    if not integer(num_beams) or num_beams < 1:
        raise ValueError(f"num_beams must be an int >= 1, got {num_beams!r}")


def decoder_prefix(model: Any, input_ids: torch.Tensor | None) -> torch.Tensor | None:
    """The tokens ``model.generate`` starts decoding from, which it echoes at the start of
    every output sequence; None when there is no prompt.

    BLIP (v1) replaces the processor's ``[CLS]`` with its start token ``[DEC]`` and drops the
    trailing ``[SEP]`` (as LAVIS does); BLIP-2 decodes on from ``input_ids`` as given.
    input_ids: ``[B,T]`` int64 from the processor. Returns ``[B,T']`` int64.
    """
    if input_ids is None:
        return None
    if getattr(model.config, "model_type", None) == "blip":
        prefix = input_ids[:, :-1].clone()
        prefix[:, 0] = model.config.text_config.bos_token_id
        return prefix
    return input_ids


def _strip_prefix(sequences: torch.Tensor, prefix: torch.Tensor | None) -> tuple[torch.Tensor, bool]:
    """``sequences`` without ``prefix`` when every sequence starts with it; (tokens, stripped)."""
    if prefix is None:
        return sequences, False
    n = prefix.shape[1]
    if sequences.shape[1] >= n and torch.equal(sequences[:, :n], prefix.to(sequences.device)):
        return sequences[:, n:], True
    return sequences, False


def _remove_prompt_text(text: str, prompt: str) -> str:
    """``text`` without a leading copy of ``prompt`` (case-insensitive), stripped: the
    fallback when the output did not start with the prompt's tokens."""
    text = text.strip()
    if text.lower().startswith(prompt.strip().lower()):
        text = text[len(prompt.strip()):]
    return text.strip()


def decoding_options(max_new_tokens: int, min_new_tokens: int, num_beams: int) -> dict[str, Any]:
    """``generate`` keywords: the given lengths and beams, and LAVIS's other decoding settings
    pinned (no sampling, no repetition or length penalty, no early stop), whatever a model
    folder's ``generation_config.json`` says."""
    options: dict[str, Any] = {"max_new_tokens": max_new_tokens, "num_beams": num_beams, "do_sample": False,
                               "repetition_penalty": 1.0}
    if min_new_tokens > 0:
        options["min_new_tokens"] = min_new_tokens
    if num_beams > 1:
        options.update(length_penalty=1.0, early_stopping=False)
    return options


@torch.no_grad()
def generate_captions(model: Any, processor: Any, images: torch.Tensor, prompt: str | None = None,
                      max_new_tokens: int = PAPER_MAX_NEW_TOKENS, num_beams: int = PAPER_NUM_BEAMS,
                      min_new_tokens: int = 0) -> list[str]:
    """Caption a batch of images with one ``generate`` call (beam search, no sampling).

    images: [B,H,W,3] float in 0..1 (any device; ComfyUI IMAGE layout), converted to
    uint8 arrays for the processor.  ``prompt`` (e.g. ``PAPER_PROMPT``; None or "" = none)
    conditions the caption; the returned text is the continuation only (the prompt's tokens
    removed, as LAVIS removes the prompt).  Trailing spaces of the prompt are dropped: BLIP's
    WordPiece tokenizer ignores them anyway, and a byte-level BPE (BLIP-2's OPT) would turn
    them into a token of its own.  ``max_new_tokens`` / ``min_new_tokens`` count
    generated tokens only, not the prompt (see the module docstring for the paper's
    ``max_length`` / ``min_length``); the end token cannot come before ``min_new_tokens``
    tokens.  Runs on the model's device and dtype.  Returns B whitespace-stripped strings.
    Raises ValueError for invalid options (``check_caption_options``) or images.
    """
    check_caption_options(prompt, max_new_tokens, min_new_tokens, num_beams)
    prompt = (prompt or "").rstrip()
    arrays = images_to_uint8(images)
    text = [prompt] * len(arrays) if prompt else None
    batch = processor(images=arrays, text=text, return_tensors="pt")
    device, dtype = _model_device_dtype(model)
    inputs = {k: (v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device))
              for k, v in batch.items() if isinstance(v, torch.Tensor)}
    prefix = decoder_prefix(model, inputs.get("input_ids"))  # before generate: BLIP's edits input_ids in place
    sequences = model.generate(**inputs, **decoding_options(max_new_tokens, min_new_tokens, num_beams))
    sequences, stripped = _strip_prefix(sequences, prefix)
    decoded = [t.strip() for t in processor.batch_decode(sequences, skip_special_tokens=True)]
    if prompt and not stripped:
        decoded = [_remove_prompt_text(t, prompt) for t in decoded]
    return decoded
