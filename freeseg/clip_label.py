"""Naming masks with an open_clip image-text model (FreeSeg-Diff's CLIP step).

Loading (``load_open_clip``) never downloads and never runs code from the model
folder: a folder that asks for it is refused first (``freeseg.model_files.check_no_code``),
and an HF tokenizer named by the config (``hf_tokenizer_name``) is loaded from the folder
itself with ``trust_remote_code=False``.  Two local layouts are accepted:

* a folder in the hub layout of open_clip models: ``open_clip_config.json``
  (``{"model_cfg": {...}, "preprocess_cfg": {...}}``) next to the weights
  (``open_clip_model.safetensors``, ``open_clip_pytorch_model.bin``, ...);
* a single weights file (``.safetensors``, ``.bin``, ``.pt``, ``.pth``, a plain
  state dict) whose file stem names a builtin open_clip architecture, optionally
  followed by ``-`` or ``_`` and a builtin pretrained tag of that architecture:
  ``ViT-B-32.safetensors`` (architecture only) or ``ViT-B-32-openai.safetensors``
  (tag ``openai``: its QuickGELU flag and mean/std are applied).  The longest
  matching architecture name wins (``ViT-B-32-quickgelu`` before ``ViT-B-32``).

Scoring (``score_masks``) follows the paper's official code: every mask becomes
a view of the image (outside the mask zeroed), all views go through the image
encoder in one batch, and a softmax over ``logit_scale * cos`` gives [K,N]
probabilities.  Preprocessing runs in torch on the model's device.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import weakref
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from .model_files import check_no_code

CONFIG_NAME = "open_clip_config.json"
# Preferred weight file names in a model folder, best first (open_clip's own order).
FOLDER_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors",
                  "open_clip_pytorch_model.bin", "open_clip_pytorch_model.pth",
                  "model.safetensors", "pytorch_model.bin", "pytorch_model.pth", "model.pth")
FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
CROP_MODES = ("masked", "bbox")
PROMPTS = ("bare", "ensemble")
# A handful of open_clip's ImageNet zero-shot templates.
ENSEMBLE_TEMPLATES = (
    "a photo of a {}.",
    "a bad photo of a {}.",
    "a photo of the large {}.",
    "a photo of the small {}.",
    "a cropped photo of a {}.",
    "a close-up photo of a {}.",
    "a bright photo of a {}.",
    "a rendering of a {}.",
)
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


# --------------------------------------------------------------------------- loading


def _folder_weights(folder: Path) -> Path | None:
    """The weights file of an open_clip model folder, preferred names first."""
    for name in FOLDER_WEIGHTS:
        if (folder / name).is_file():
            return folder / name
    others = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in FILE_SUFFIXES)
    return others[0] if others else None


def split_arch_tag(stem: str) -> tuple[str, str | None]:
    """``"ViT-B-32-openai"`` -> ``("ViT-B-32", "openai")`` using open_clip's builtin names.

    Returns the longest builtin architecture equal to ``stem`` or followed by
    ``-``/``_`` in it, and the remainder as the tag when it is a builtin
    pretrained tag of that architecture (else None).  Raises ValueError when no
    builtin architecture matches.
    """
    import open_clip

    archs = sorted(open_clip.list_models(), key=len, reverse=True)
    for arch in archs:
        if stem == arch:
            return arch, None
        if stem.startswith(arch) and stem[len(arch)] in "-_":
            tag = stem[len(arch) + 1:]
            known = {t.lower() for t in open_clip.list_pretrained_tags_by_model(arch)}
            return arch, (tag if tag.lower() in known else None)
    raise ValueError(f"{stem!r} does not name a builtin open_clip architecture (e.g. ViT-B-32, ViT-B-16, "
                     f"ViT-L-14); rename the file to '<architecture>[-<pretrained tag>]<suffix>' or use a "
                     f"folder with {CONFIG_NAME}")


def _create_from_folder(folder: Path, device: str | torch.device) -> tuple[torch.nn.Module, Any]:
    """open_clip model + tokenizer from a hub-layout folder (``local-dir:`` in open_clip >= 2.32).

    When the config names an HF tokenizer (``text_cfg.hf_tokenizer_name``), it is loaded from
    the folder itself (``check_no_code`` made sure the folder holds its files), with
    ``trust_remote_code=False`` and ``local_files_only=True`` overriding the config's
    ``tokenizer_kwargs``."""
    import open_clip
    import open_clip.factory as factory

    config = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
    text_cfg = config["model_cfg"].get("text_cfg")
    hf_tokenizer = isinstance(text_cfg, dict) and bool(text_cfg.get("hf_tokenizer_name"))
    safe = {"trust_remote_code": False, "local_files_only": True} if hf_tokenizer else {}
    if hasattr(factory, "LOCAL_DIR_PREFIX"):
        # open_clip loads a local-dir model's HF tokenizer from that folder, whatever the name says
        name = f"local-dir:{folder}"
        return open_clip.create_model(name, device=device), open_clip.get_tokenizer(name, **safe)
    # Older open_clip (2.27 - 2.31, no local-dir schema; not exercised by the tests, which
    # run open_clip 3.x): register the folder's model_cfg under a private name, its HF
    # tokenizer pointing at the folder.
    model_cfg = copy.deepcopy(config["model_cfg"])
    if hf_tokenizer:
        model_cfg["text_cfg"]["hf_tokenizer_name"] = str(folder)
    name = "freeseg-local-" + hashlib.sha1(str(folder).encode()).hexdigest()[:12]
    factory._MODEL_CONFIGS[name] = model_cfg  # no public API registers a dict
    pre = {k: v for k, v in config.get("preprocess_cfg", {}).items()
           if k in ("mean", "std", "interpolation", "resize_mode")}
    model = open_clip.create_model(name, pretrained=str(_folder_weights(folder)), device=device,
                                   force_preprocess_cfg=pre)
    return model, open_clip.get_tokenizer(name, **safe)


def _create_from_file(path: Path, device: str | torch.device) -> tuple[torch.nn.Module, Any]:
    """open_clip model + tokenizer from one weights file named after its architecture."""
    import open_clip

    arch, tag = split_arch_tag(path.name[: -len(path.suffix)])
    kwargs: dict[str, Any] = {}
    if tag is not None:
        tag_cfg = open_clip.get_pretrained_cfg(arch, tag)
        kwargs["force_quick_gelu"] = bool(tag_cfg.get("quick_gelu", False))
        kwargs["force_preprocess_cfg"] = {k: tag_cfg[k] for k in ("mean", "std", "interpolation", "resize_mode")
                                          if k in tag_cfg}
    model = open_clip.create_model(arch, pretrained=str(path), device=device, **kwargs)
    return model, open_clip.get_tokenizer(arch)


def _preprocess_cfg(model: torch.nn.Module) -> dict[str, Any]:
    """Normalised preprocessing settings of an open_clip model.

    Returns ``{"size": (h, w), "mean": (3 floats), "std": (3 floats),
    "interpolation": str, "resize_mode": str}``.
    """
    import open_clip

    raw = dict(open_clip.get_model_preprocess_cfg(model)) if hasattr(open_clip, "get_model_preprocess_cfg") else {}
    size = raw.get("size", getattr(model.visual, "image_size", 224))
    size = (size, size) if isinstance(size, int) else tuple(int(s) for s in size)
    return {
        "size": size,
        "mean": tuple(float(v) for v in raw.get("mean", getattr(model.visual, "image_mean", None) or OPENAI_MEAN)),
        "std": tuple(float(v) for v in raw.get("std", getattr(model.visual, "image_std", None) or OPENAI_STD)),
        "interpolation": str(raw.get("interpolation", "bicubic")),
        "resize_mode": str(raw.get("resize_mode", "shortest")),
    }


def load_open_clip(path: str, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict[str, Any], Any]:
    """Load an open_clip model from a local folder or weights file (see module docstring).

    Returns ``(model, preprocess_cfg, tokenizer)``: the model in eval mode on
    ``device``; preprocess_cfg as described in ``_preprocess_cfg``; the tokenizer
    maps ``list[str]`` to a LongTensor [N, context_length].  Never downloads.
    Raises FileNotFoundError / ValueError naming ``path``, and ValueError naming the file
    and key when the folder asks for code (``check_no_code``); nothing in it runs.
    """
    p = Path(os.fspath(path))
    check_no_code("open_clip", str(p))
    try:
        model, tokenizer = _create(p, device)
    except FileNotFoundError:
        raise
    except (RuntimeError, KeyError, ValueError, OSError, AssertionError) as exc:
        raise ValueError(f"{str(p)!r}: cannot load this open_clip model: {exc}") from exc
    return model.eval(), _preprocess_cfg(model), tokenizer


def _create(p: Path, device: str | torch.device) -> tuple[torch.nn.Module, Any]:
    """Dispatch on folder / file / missing path; see ``load_open_clip``."""
    if p.is_dir():
        if not (p / CONFIG_NAME).is_file():
            raise FileNotFoundError(f"{str(p)!r} is not an open_clip model folder: no {CONFIG_NAME} (a folder "
                                    f"holds {CONFIG_NAME} and weights such as {FOLDER_WEIGHTS[0]} or "
                                    f"{FOLDER_WEIGHTS[2]})")
        if _folder_weights(p) is None:
            raise FileNotFoundError(f"{str(p)!r}: {CONFIG_NAME} found but no weights file "
                                    f"({', '.join(FOLDER_WEIGHTS[:3])}, ...)")
        return _create_from_folder(p, device)
    if p.is_file():
        if p.suffix not in FILE_SUFFIXES:
            raise ValueError(f"not an open_clip weights file (expected {', '.join(FILE_SUFFIXES)})")
        return _create_from_file(p, device)
    raise FileNotFoundError(f"open_clip model not found: {str(p)!r}")


# --------------------------------------------------------------------------- mask views


def _binary(masks: torch.Tensor) -> torch.Tensor:
    """Bool masks: floats are thresholded at 0.5, other dtypes at != 0."""
    return masks > 0.5 if masks.is_floating_point() else masks != 0


def mask_views(image: torch.Tensor, masks: torch.Tensor, mode: str = "masked") -> list[torch.Tensor]:
    """One image view per mask.

    image: [H,W,3] float in 0..1.  masks: [K,H,W] bool, or float/int (binarised:
    > 0.5 for floats, != 0 otherwise).  Returns K tensors on image's device and
    dtype: "masked" -> [H,W,3], the image with every pixel outside the mask set
    to 0 (the paper's official code); "bbox" -> [h,w,3], the masked image
    cropped to the mask's bounding box.  An empty mask gives the all-zero
    [H,W,3] image in both modes.
    """
    if mode not in CROP_MODES:
        raise ValueError(f"mode: expected one of {CROP_MODES}, got {mode!r}")
    if image.ndim != 3 or masks.ndim != 3 or masks.shape[1:] != image.shape[:2]:
        raise ValueError(f"expected image [H,W,3] and masks [K,H,W] of the same H,W; got "
                         f"{tuple(image.shape)} and {tuple(masks.shape)}")
    binary = _binary(masks).to(image.device)
    views = []
    for m in binary:
        view = image * m[..., None].to(image.dtype)
        if mode == "bbox" and bool(m.any()):
            rows = torch.nonzero(m.any(dim=1)).flatten()
            cols = torch.nonzero(m.any(dim=0)).flatten()
            view = view[int(rows[0]):int(rows[-1]) + 1, int(cols[0]):int(cols[-1]) + 1]
        views.append(view)
    return views


# --------------------------------------------------------------------------- text


def _model_device(model: torch.nn.Module) -> torch.device:
    """Device of the model's first parameter (CPU for a parameterless module)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


# model -> {(tokenizer id, device, dtype, text): [D] float32 CPU embedding}, the most recent
# TEXT_CACHE_ITEMS texts per model. A loaded model keeps its weights, so a text it has encoded
# (the background words, a dataset's class list) is not encoded again for the next image or
# prompt. Weak keys: the entries go with the model.
TEXT_CACHE_ITEMS = 4096
_TEXT_CACHE: "weakref.WeakKeyDictionary[torch.nn.Module, OrderedDict]" = weakref.WeakKeyDictionary()


def _encode_text_normalised(model: torch.nn.Module, tokenizer: Callable, texts: list[str],
                            device: torch.device) -> torch.Tensor:
    """[len(texts), D] float32 L2-normalised text embeddings on ``device``: the texts not
    in the model's cache go through the encoder in one batch."""
    memo = _TEXT_CACHE.setdefault(model, OrderedDict())
    state = (id(tokenizer), str(_model_device(model)), str(next((p.dtype for p in model.parameters()), None)))
    missing = list(dict.fromkeys(t for t in texts if (*state, t) not in memo))
    if missing:
        tokens = tokenizer(missing).to(device)
        rows = F.normalize(model.encode_text(tokens).float(), dim=-1).cpu()
        for text, row in zip(missing, rows):
            memo[(*state, text)] = row
    out = []
    for text in texts:
        memo.move_to_end((*state, text))
        out.append(memo[(*state, text)])
    while len(memo) > TEXT_CACHE_ITEMS:
        memo.popitem(last=False)
    return torch.stack(out).to(device)


@torch.no_grad()
def encode_names(model: torch.nn.Module, tokenizer: Callable, names: list[str], prompt: str = "bare",
                 device: str | torch.device | None = None) -> torch.Tensor:
    """Text embeddings of class names.

    Returns [N,D] float32, L2-normalised rows, on ``device`` (default: the model's).
    prompt "bare": the names alone (as in the paper); "ensemble": for each name
    the mean of the normalised embeddings of ``ENSEMBLE_TEMPLATES``, renormalised
    (like open_clip's zero-shot classifier).  The texts the model has not encoded
    yet (of the last ``TEXT_CACHE_ITEMS``) go through one batch.
    """
    if not names:
        raise ValueError("names: expected at least one class name")
    if prompt not in PROMPTS:
        raise ValueError(f"prompt: expected one of {PROMPTS}, got {prompt!r}")
    device = torch.device(device) if device is not None else _model_device(model)
    if prompt == "bare":
        return _encode_text_normalised(model, tokenizer, list(names), device)
    texts = [t.format(n) for n in names for t in ENSEMBLE_TEMPLATES]
    emb = _encode_text_normalised(model, tokenizer, texts, device)
    emb = emb.view(len(names), len(ENSEMBLE_TEMPLATES), -1).mean(dim=1)
    return F.normalize(emb, dim=-1)


# --------------------------------------------------------------------------- images


def _resized_size(h: int, w: int, th: int, tw: int, cover: bool) -> tuple[int, int]:
    """Size after an aspect-keeping resize that covers (``cover``) or fits ``(th, tw)``.

    The limiting side gets the target exactly; the other is truncated as
    torchvision's ``Resize(int)`` does (``int(target * long / short)``).
    """
    height_limits = (th / h >= tw / w) if cover else (th / h <= tw / w)
    if height_limits:
        nw = int(w * th / h)
        return th, (max(tw, nw) if cover else max(1, min(tw, nw)))
    nh = int(h * tw / w)
    return (max(th, nh) if cover else max(1, min(th, nh))), tw


def _resize_and_crop(view: torch.Tensor, size: tuple[int, int], resize_mode: str, interpolation: str) -> torch.Tensor:
    """[h,w,3] float -> [3,H,W] resized as open_clip's eval transform would (values clamped to 0..1).

    "shortest": resize so the image covers ``size`` (short side = target),
    centre crop; "longest": resize so it fits, centre pad with 0; "squash":
    resize to ``size`` directly.
    """
    th, tw = size
    x = view.permute(2, 0, 1)[None].float()
    h, w = x.shape[-2:]
    mode = interpolation if interpolation in ("bicubic", "bilinear", "nearest") else "bicubic"
    aa = {"antialias": True} if mode != "nearest" else {}
    if resize_mode == "squash":
        return F.interpolate(x, size=(th, tw), mode=mode, **aa)[0].clamp(0, 1)
    nh, nw = _resized_size(h, w, th, tw, cover=resize_mode != "longest")
    x = F.interpolate(x, size=(nh, nw), mode=mode, **aa)[0].clamp(0, 1)
    if resize_mode == "longest":
        top, left = (th - nh) // 2, (tw - nw) // 2
        return F.pad(x, (left, tw - nw - left, top, th - nh - top))
    top, left = int(round((nh - th) / 2.0)), int(round((nw - tw) / 2.0))
    return x[:, top:top + th, left:left + tw]


def preprocess_views(views: list[torch.Tensor], preprocess_cfg: dict[str, Any]) -> torch.Tensor:
    """K views [h,w,3] float 0..1 -> [K,3,H,W] float32 normalised with the model's mean/std."""
    size = preprocess_cfg["size"]
    size = (size, size) if isinstance(size, int) else tuple(size)
    batch = torch.stack([_resize_and_crop(v, size, preprocess_cfg.get("resize_mode", "shortest"),
                                          preprocess_cfg.get("interpolation", "bicubic")) for v in views])
    mean = torch.tensor(preprocess_cfg["mean"], device=batch.device).view(1, 3, 1, 1)
    std = torch.tensor(preprocess_cfg["std"], device=batch.device).view(1, 3, 1, 1)
    return (batch - mean) / std


@torch.no_grad()
def score_masks(model: torch.nn.Module, preprocess_cfg: dict[str, Any], image: torch.Tensor,
                masks: torch.Tensor, text_features: torch.Tensor, crop_mode: str = "masked") -> torch.Tensor:
    """CLIP probabilities of each name for each mask.

    image: [H,W,3] float 0..1; masks: [K,H,W] (see ``mask_views``);
    text_features: [N,D] L2-normalised (``encode_names``).  All K views are
    preprocessed on the model's device and encoded in ONE ``encode_image`` call.
    Returns [K,N] float32 on the model's device: softmax over names of
    ``exp(logit_scale) * cos(image_k, name_n)``; rows sum to 1.
    """
    device = _model_device(model)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    text = F.normalize(text_features.to(device=device, dtype=torch.float32), dim=-1)
    if masks.shape[0] == 0:
        return torch.zeros(0, text.shape[0], device=device)
    views = mask_views(image.to(device), masks.to(device), crop_mode)
    pixels = preprocess_views(views, preprocess_cfg).to(dtype)
    feats = F.normalize(model.encode_image(pixels).float(), dim=-1)
    scale = model.logit_scale.exp().float() if hasattr(model, "logit_scale") else torch.tensor(100.0)
    return (scale * feats @ text.T).softmax(dim=-1)
