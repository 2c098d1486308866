"""FreeSeg-Diff without ComfyUI: Stable Diffusion through ``diffusers``, BLIP / BLIP-2 through
``freeseg.caption``, CLIP through ``freeseg.clip_label``, every other step shared with the
ComfyUI nodes through ``freeseg.stages``.

Quick start::

    from freeseg.backends.diffusers import FreeSegPipeline
    from freeseg.app.output import segment_to_folder

    pipe = FreeSegPipeline.from_pretrained(
        sd="models/checkpoints/v1-5-pruned-emaonly.safetensors",  # LDM single file
        blip2="models/blip/blip-image-captioning-base",            # optional captioner (paper: BLIP)
        clip="models/open_clip/vit_base_patch32_clip_224.openai")
    result = pipe.segment("photo.jpg", class_names=["dog", "frisbee"])
    result.masks, result.labels, result.scores, result.caption
    segment_to_folder(pipe, "photo.jpg", "out/")

Stable Diffusion sources (``sd=``), all offline (nothing is ever downloaded):

* a single checkpoint file in the original LDM layout (``.safetensors``, ``.ckpt``, ``.pt``,
  ``.pth``, ``.bin``; the kind ComfyUI's CheckpointLoaderSimple reads). Component configs
  come from ``sd_config`` (a folder in the diffusers layout: ``unet/config.json``,
  ``vae/config.json``, ``text_encoder/config.json``, ``scheduler/scheduler_config.json``,
  optionally ``tokenizer/``); a component whose config is missing there, and every
  component when ``sd_config`` is None, uses the standard SD1.5 config shipped in
  ``freeseg/data/sd15/``. So an SD1.x checkpoint needs nothing else; SD2.x or a reduced /
  odd UNet needs ``sd_config`` with at least its ``unet/config.json`` (and SD2's
  ``text_encoder/config.json``).
* a diffusers model folder (``model_index.json`` with ``unet/``, ``vae/``, ``text_encoder/``
  subfolders holding weights), loaded with ``from_pretrained(local_files_only=True)``.

SDXL (two text encoders, added time conditioning) is not supported here; use the ComfyUI
nodes for it. Only UNet2DConditionModel checkpoints with one CLIP text encoder work.

``vae=`` overrides the VAE: a diffusers VAE folder (``config.json`` with ``_class_name``
``AutoencoderKL`` or ``AutoencoderTiny`` + weights), a diffusers pipeline folder (its
``vae/`` is used), a single VAE file in the LDM layout (``AutoencoderKL`` config from
``sd_config`` / the shipped SD1.5 one), or ``False`` to load no VAE (then only
``features_from_latents`` works). An AutoencoderKL latent is the posterior MODE, as
ComfyUI's VAE encode gives (the paper's code sampled it); it is then shifted/scaled with the
VAE config's ``shift_factor`` / ``scaling_factor``.

Text encoder prompts (the empty prompt of the UNet pass; the caption words and class prompts
of the paper's candidate inference): token ids come from ``tokenizer/`` when the config (or
diffusers) folder has one, else from open_clip's copy of the CLIP BPE (the SD1.x tokenizer)
padded with EOS to ``max_position_embeddings`` (``""`` -> ``[BOS, EOS, EOS, ...]``, ids
49406 / 49407), which is what SD1.x tokenizers (and ComfyUI's SD1 tokenizer) give. SD2
tokenizers pad with 0: give their ``tokenizer/`` folder. The text encoder output used is
``last_hidden_state``.

Naming: ``settings.rule`` "open" (``DEFAULTS``, as the nodes) names masks from the given names
and the caption's nouns against background words; "paper" (``PAPER``) takes ``class_names`` as
the full class list and the paper's candidate classes from the caption
(``stages.paper_candidates`` with ``text_embeddings``).

The diffusion-features pass reproduces ComfyUI's ``FreeSegDiffusionFeatures`` node: image
resized to ``resolution`` x ``resolution`` (bicubic), VAE encode, ``x_t =
scheduler.add_noise(x0, noise, t)`` with ``noise = randn(x0.shape)`` from
``torch.Generator().manual_seed(seed + i)`` (CPU, float32) and a DDPM schedule built from the
scheduler config's betas, one UNet pass at timestep t with the empty-prompt conditioning,
forward hooks on ``attn2.to_q`` of ``transformer_blocks[0]`` of every attention of
``down_blocks`` and ``up_blocks`` (the mid block is left out), the latent/4 ones kept,
tokens -> maps -> bilinear resize to resolution/16 -> channel concat -> float16.

Contract: ``segment`` takes ONE image and returns a ``FreeSegResult``; loop for more (each
image uses noise seed ``settings.seed``, as image 0 of a node batch).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image, ImageOps

from ..features import SOURCE_QUERIES, DiffusionFeatures, StopPass, last_used_layer, output_factor
from ..segments import Segments, draw_overlay
from ..vocab import cached_embed
from ..stages import (DEFAULTS, PAPER, FreeSegSettings, caption_images, captured_to_features,
                      cluster_segments, label_segments, paper_candidates, parse_names, refine_segments,
                      resize_square, seeded_noise, to_rgb)

__all__ = ["FreeSegPipeline", "FreeSegResult", "FreeSegSettings", "DEFAULTS", "PAPER", "SDModels",
           "DEFAULT_SD_CONFIG", "load_sd", "load_image"]

log = logging.getLogger("freeseg-diff")

DEFAULT_SD_CONFIG = Path(__file__).resolve().parent.parent / "data" / "sd15"
"""Standard SD1.5 component configs (diffusers layout, no weights)."""

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
VAE_CLASSES = ("AutoencoderKL", "AutoencoderTiny")
CLIP_BOS, CLIP_EOS = 49406, 49407
PIPELINE_VERSION = 2  # bump when a change alters the outputs (goes into cache_key)

PathLike = Union[str, os.PathLike]


# ------------------------------------------------------------------------------------------
# Loading Stable Diffusion
# ------------------------------------------------------------------------------------------

@dataclass
class SDModels:
    """The Stable Diffusion parts FreeSeg-Diff uses, loaded with diffusers.

    Attributes:
        unet: ``diffusers.UNet2DConditionModel`` (eval, on ``device`` in ``dtype``).
        text_encoder: ``transformers.CLIPTextModel`` (eval, same device / dtype).
        vae: ``AutoencoderKL`` / ``AutoencoderTiny`` or None (no VAE loaded).
        scheduler: ``diffusers.DDPMScheduler`` whose ``add_noise`` noises latents.
        prompt_ids: ``[1,L]`` int64 token ids of the empty prompt.
        tokenize: ``list[str] -> [N,L]`` int64 token ids of the text encoder's tokenizer.
        family: "SD15" (cross-attention dim 768), "SD20" (1024) or "UNet".
        description: JSON-able description of the sources (paths, sizes), for cache keys.
    """

    unet: Any
    text_encoder: Any
    vae: Any
    scheduler: Any
    prompt_ids: torch.Tensor
    family: str
    description: dict[str, Any] = field(default_factory=dict)
    tokenize: Optional[Any] = None

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype


def _file_signature(path: PathLike) -> dict[str, Any]:
    """``{"path", "size", "mtime"}`` of a file, or of a folder's files (summed / latest)."""
    p = Path(path).resolve()
    if p.is_file():
        st = p.stat()
        return {"path": str(p), "size": st.st_size, "mtime": int(st.st_mtime)}
    files = [f for f in p.rglob("*") if f.is_file()] if p.is_dir() else []
    return {"path": str(p), "size": sum(f.stat().st_size for f in files),
            "mtime": max((int(f.stat().st_mtime) for f in files), default=0)}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{str(path)!r}: cannot read this JSON config ({exc})") from exc


def _config_root(sd_config: Optional[PathLike], component: str, filename: str = "config.json") -> Path:
    """The folder whose ``<component>/<filename>`` configures ``component``: ``sd_config`` when
    it has that file, else the shipped SD1.5 configs."""
    if sd_config is not None:
        root = Path(sd_config)
        if not root.is_dir():
            raise FileNotFoundError(f"sd_config: config folder not found: {str(root)!r}")
        if (root / component / filename).is_file():
            return root
    return DEFAULT_SD_CONFIG


def _load_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """State dict of a single-file checkpoint (``state_dict`` wrappers removed), on the CPU."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd: Any = load_file(str(path), device="cpu")
    else:
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    while isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise ValueError(f"{str(path)!r}: not a checkpoint state dict")
    return sd


def _check_supported_unet(config: dict[str, Any], where: str) -> None:
    """NotImplementedError for UNets this backend does not condition (SDXL-style added
    conditioning, class embeddings)."""
    if config.get("addition_embed_type") is not None or config.get("class_embed_type") is not None:
        raise NotImplementedError(f"{where}: this UNet needs added conditioning (SDXL-style "
                                  f"addition_embed_type={config.get('addition_embed_type')!r}, "
                                  f"class_embed_type={config.get('class_embed_type')!r}); "
                                  "the diffusers backend supports SD1.x / SD2.x only. Use the ComfyUI "
                                  "nodes for SDXL.")


def _family(unet: Any) -> str:
    dim = getattr(unet.config, "cross_attention_dim", None)
    return {768: "SD15", 1024: "SD20"}.get(dim, "UNet")


def _transformers_dtype(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """``from_pretrained`` dtype keyword for transformers (``dtype`` since 4.56)."""
    import transformers
    from packaging.version import Version

    name = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    return {name: dtype}


def _prompt_tokenizer(tokenizer_root: Optional[Path], text_config: Any) -> Any:
    """``texts -> [N,L]`` int64 token ids for the text encoder (see the module docstring)."""
    length = int(getattr(text_config, "max_position_embeddings", 77))
    if tokenizer_root is not None and (tokenizer_root / "tokenizer").is_dir():
        from transformers import CLIPTokenizer

        tok = CLIPTokenizer.from_pretrained(str(tokenizer_root), subfolder="tokenizer", local_files_only=True,
                                            trust_remote_code=False)

        def tokenize(texts: list[str]) -> torch.Tensor:
            # the text encoder's context length, not the tokenizer's model_max_length (some
            # tokenizer configs, e.g. ComfyUI's copy, say 8192)
            return tok(list(texts), padding="max_length", max_length=length, truncation=True,
                       return_tensors="pt").input_ids.long()
        return tokenize
    from open_clip.tokenizer import SimpleTokenizer

    bos = getattr(text_config, "bos_token_id", None)
    eos = getattr(text_config, "eos_token_id", None)
    vocab = int(getattr(text_config, "vocab_size", 49408))
    # Old CLIP configs carry placeholder ids (bos 0, eos 2); the real BPE ids are the last two.
    bos = bos if isinstance(bos, int) and bos >= vocab - 2 else CLIP_BOS
    eos = eos if isinstance(eos, int) and eos >= vocab - 2 else CLIP_EOS
    bpe = SimpleTokenizer(context_length=length)

    def tokenize(texts: list[str]) -> torch.Tensor:
        ids = bpe(list(texts)).long()  # [BOS, ..., EOS, 0, 0, ...]
        ids[:, 0] = bos
        ends = (ids == bpe.eot_token_id).int().argmax(dim=1)
        for i, end in enumerate(ends.tolist()):
            ids[i, end:] = eos  # pad with EOS, as the SD1 tokenizer
        return ids
    return tokenize


def _scheduler(config: dict[str, Any]) -> Any:
    """A DDPMScheduler with the betas of any SD scheduler config (only ``add_noise`` is used)."""
    from diffusers import DDPMScheduler

    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
            "rescale_betas_zero_snr", "prediction_type")
    return DDPMScheduler(**{k: config[k] for k in keys if k in config and config[k] is not None})


def _load_vae_folder(folder: Path, dtype: torch.dtype) -> Any:
    """A diffusers VAE folder (config.json + weights), or a pipeline folder's ``vae/``."""
    import diffusers

    subfolder = None
    if not (folder / "config.json").is_file() and (folder / "vae" / "config.json").is_file():
        subfolder = "vae"
    config_path = folder / (subfolder or "") / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"vae: {str(folder)!r} is not a diffusers VAE folder (no config.json, no "
                                "vae/config.json)")
    cls_name = _read_json(config_path).get("_class_name", "AutoencoderKL")
    if cls_name not in VAE_CLASSES:
        raise ValueError(f"vae: {str(config_path)!r} is a {cls_name!r}; supported: {', '.join(VAE_CLASSES)}")
    kwargs: dict[str, Any] = {"torch_dtype": dtype, "local_files_only": True}
    if subfolder:
        kwargs["subfolder"] = subfolder
    return getattr(diffusers, cls_name).from_pretrained(str(folder), **kwargs)


def _check_checkpoint_vae(checkpoint: dict[str, torch.Tensor]) -> None:
    """ValueError unless the checkpoint holds an LDM AutoencoderKL (``first_stage_model.*``)."""
    if not any(k.startswith("first_stage_model.") for k in checkpoint):
        raise ValueError("sd: the checkpoint holds no VAE (no first_stage_model.* keys); pass vae=<diffusers VAE "
                         "folder or VAE file>")
    if any(k.startswith("first_stage_model.taesd_") or k.startswith("first_stage_model.encoder.layers")
           for k in checkpoint):
        raise ValueError("sd: the checkpoint's VAE is a TAESD (ComfyUI layout), which diffusers cannot read from "
                         "a single file; pass vae=<diffusers AutoencoderKL / AutoencoderTiny folder>")


def _load_vae(vae: Union[PathLike, bool, None], checkpoint: Optional[dict[str, torch.Tensor]],
              diffusers_dir: Optional[Path], sd_config: Optional[PathLike], dtype: torch.dtype) -> Any:
    """The VAE per the ``vae`` argument of ``load_sd`` (None: from the SD source)."""
    from diffusers import AutoencoderKL

    if vae is False:
        return None
    if vae is not None and vae is not True:
        p = Path(vae)
        if p.is_dir():
            return _load_vae_folder(p, dtype)
        if not p.is_file():
            raise FileNotFoundError(f"vae: not found: {str(p)!r}")
        root = _config_root(sd_config, "vae")
        return AutoencoderKL.from_single_file(str(p), config=str(root), subfolder="vae", local_files_only=True,
                                              torch_dtype=dtype)
    if diffusers_dir is not None:
        return _load_vae_folder(diffusers_dir, dtype)
    assert checkpoint is not None
    _check_checkpoint_vae(checkpoint)
    root = _config_root(sd_config, "vae")
    try:
        return AutoencoderKL.from_single_file(checkpoint, config=str(root), subfolder="vae", local_files_only=True,
                                              torch_dtype=dtype)
    except (RuntimeError, KeyError, ValueError) as exc:
        raise ValueError(f"sd: cannot load the VAE with the config in {str(root / 'vae')!r} ({exc}); pass "
                         "sd_config=<folder with vae/config.json> or vae=<VAE folder>") from exc


def load_sd(sd: PathLike, sd_config: Optional[PathLike] = None, vae: Union[PathLike, bool, None] = None,
            device: Union[str, torch.device] = "cpu", dtype: torch.dtype = torch.float32) -> SDModels:
    """Load the UNet, text encoder, VAE and noise schedule of a Stable Diffusion model, offline.

    Args:
        sd: a single LDM-layout checkpoint file or a diffusers model folder (module docstring).
        sd_config: folder of component configs for a single file (None: shipped SD1.5 ones;
            per-component fallback to them). Ignored for a diffusers folder, except that its
            ``tokenizer/`` is used when the folder has none.
        vae: None (the SD source's VAE), a VAE folder / file, or False (no VAE).
        device, dtype: where and in which float type the models run.

    Raises:
        FileNotFoundError (missing path), ValueError (unreadable / mismatching weights or
        configs, naming the config to fix), NotImplementedError (SDXL-style UNets).
    """
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    src = Path(sd)
    description: dict[str, Any] = {"sd": _file_signature(src), "dtype": str(dtype).replace("torch.", "")}
    if sd_config is not None:
        description["sd_config"] = _file_signature(sd_config)
    if vae is not None:
        description["vae"] = _file_signature(vae) if not isinstance(vae, bool) else bool(vae)

    if src.is_dir():
        if not (src / "unet" / "config.json").is_file():
            raise FileNotFoundError(f"sd: {str(src)!r} is not a diffusers model folder (no unet/config.json); "
                                    "give a folder with model_index.json, unet/, vae/, text_encoder/ or a "
                                    "single checkpoint file")
        unet_config = UNet2DConditionModel.load_config(str(src), subfolder="unet", local_files_only=True)
        _check_supported_unet(dict(unet_config), str(src / "unet"))
        unet = UNet2DConditionModel.from_pretrained(str(src), subfolder="unet", torch_dtype=dtype,
                                                    local_files_only=True)
        text_encoder = CLIPTextModel.from_pretrained(str(src), subfolder="text_encoder", local_files_only=True,
                                                     trust_remote_code=False, **_transformers_dtype(dtype))
        vae_model = _load_vae(vae, None, src, sd_config, dtype)
        sched_root = src if (src / "scheduler" / "scheduler_config.json").is_file() else \
            _config_root(sd_config, "scheduler", "scheduler_config.json")
        tok_root: Optional[Path] = src if (src / "tokenizer").is_dir() else \
            (Path(sd_config) if sd_config is not None else None)
    elif src.is_file():
        if src.suffix.lower() not in CHECKPOINT_SUFFIXES:
            raise ValueError(f"sd: {str(src)!r} is not a checkpoint file (expected {', '.join(CHECKPOINT_SUFFIXES)})")
        unet_root = _config_root(sd_config, "unet")
        unet_config = UNet2DConditionModel.load_config(str(unet_root), subfolder="unet", local_files_only=True)
        _check_supported_unet(dict(unet_config), str(unet_root / "unet"))
        checkpoint = _load_checkpoint(src)
        if any(k.startswith("conditioner.embedders.") for k in checkpoint):
            raise NotImplementedError(f"sd: {str(src)!r} is an SDXL checkpoint; the diffusers backend supports "
                                      "SD1.x / SD2.x only. Use the ComfyUI nodes for SDXL.")
        if not any(k.startswith("model.diffusion_model.") for k in checkpoint):
            raise ValueError(f"sd: {str(src)!r} holds no LDM UNet (no model.diffusion_model.* keys)")
        if vae is None:
            _check_checkpoint_vae(checkpoint)
        try:
            unet = UNet2DConditionModel.from_single_file(checkpoint, config=str(unet_root), subfolder="unet",
                                                         local_files_only=True, torch_dtype=dtype)
        except (RuntimeError, KeyError, ValueError, IndexError) as exc:
            raise ValueError(f"sd: the UNet of {str(src)!r} does not fit the config "
                             f"{str(unet_root / 'unet' / 'config.json')!r} ({str(exc)[:300]}); pass "
                             "sd_config=<folder with unet/config.json matching the checkpoint>") from exc
        text_encoder = _text_encoder_from_checkpoint(checkpoint, sd_config, dtype, src)
        vae_model = _load_vae(vae, checkpoint, None, sd_config, dtype)
        del checkpoint
        sched_root = _config_root(sd_config, "scheduler", "scheduler_config.json")
        tok_root = Path(sd_config) if sd_config is not None else None
    else:
        raise FileNotFoundError(f"sd: not found: {str(src)!r}")

    scheduler = _scheduler(_read_json(sched_root / "scheduler" / "scheduler_config.json"))
    tokenize = _prompt_tokenizer(tok_root, text_encoder.config)
    prompt_ids = tokenize([""])
    unet = unet.to(device=device, dtype=dtype).eval()
    text_encoder = text_encoder.to(device=device, dtype=dtype).eval()
    if vae_model is not None:
        vae_model = vae_model.to(device=device, dtype=dtype).eval()
    return SDModels(unet, text_encoder, vae_model, scheduler, prompt_ids, _family(unet), description, tokenize)


def _text_encoder_from_checkpoint(checkpoint: dict[str, torch.Tensor], sd_config: Optional[PathLike],
                                  dtype: torch.dtype, src: Path) -> Any:
    """CLIPTextModel from the checkpoint's ``cond_stage_model.*`` keys (diffusers' converter)."""
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from transformers import CLIPTextModel

    root = _config_root(sd_config, "text_encoder")
    try:
        return create_diffusers_clip_model_from_ldm(CLIPTextModel, checkpoint, subfolder="text_encoder",
                                                    config=str(root), torch_dtype=dtype, local_files_only=True)
    except (RuntimeError, KeyError, ValueError, IndexError) as exc:
        raise ValueError(f"sd: cannot load the text encoder of {str(src)!r} with "
                         f"{str(root / 'text_encoder' / 'config.json')!r} ({str(exc)[:300]}); pass "
                         "sd_config=<folder with text_encoder/config.json>") from exc


# ------------------------------------------------------------------------------------------
# Images
# ------------------------------------------------------------------------------------------

ImageLike = Union[PathLike, Image.Image, np.ndarray, torch.Tensor]


def load_image(image: ImageLike) -> torch.Tensor:
    """One image -> ``[1,H,W,3]`` float32 0..1 on the CPU.

    Accepts a file path (EXIF orientation applied), a PIL image, a numpy array ``[H,W]`` /
    ``[H,W,C]`` (uint8 0..255 or float 0..1) or a torch tensor ``[H,W,C]`` / ``[1,H,W,C]``
    float 0..1 (C = 1, 3 or 4). A batch of more than one image is a ValueError."""
    if isinstance(image, (str, os.PathLike)):
        with Image.open(image) as pil:
            image = ImageOps.exif_transpose(pil).convert("RGB")
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        arr = image
        if arr.dtype == np.uint8:
            arr = arr.astype(np.float32) / 255.0
        image = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"image: expected a path, PIL image, numpy array or torch tensor, got {type(image).__name__}")
    t = image.detach().cpu()
    if t.ndim == 2:
        t = t[..., None]
    if t.ndim == 3:
        t = t[None]
    if t.ndim != 4 or t.shape[0] != 1:
        raise ValueError(f"image: expected ONE image [H,W,C] (or [1,H,W,C]), got shape {tuple(image.shape)}; "
                         "call segment() once per image")
    return to_rgb(t)


# ------------------------------------------------------------------------------------------
# Results
# ------------------------------------------------------------------------------------------

@dataclass
class FreeSegResult:
    """Segmentation of one image.

    Attributes:
        masks: ``[K,H,W]`` float32 0..1 (CPU) at the image's size, K = ``n_clusters`` (after
            CRF: one-hot per pixel, so they partition the image except CRF "void" pixels).
        labels: K names, None for an unnamed (background) mask.
        scores: K CLIP probabilities of the chosen names (0.0 when unnamed).
        caption: the caption ("" without a captioner).
        class_names: the names the masks were labelled against (caption nouns, then the
            given names).
        image_size: ``(H, W)``.
        blocks: UNet layers the features came from.
        settings: the settings used.
        timings: seconds per stage (caption, features, cluster, label, refine, total).
    """

    masks: torch.Tensor
    labels: list[Optional[str]]
    scores: list[float]
    caption: str
    class_names: list[str]
    image_size: tuple[int, int]
    blocks: list[str]
    settings: FreeSegSettings
    timings: dict[str, float] = field(default_factory=dict)

    def named(self) -> list[int]:
        """Indices of the named masks."""
        return [k for _, k in self.to_segments().named()]

    def named_masks(self) -> torch.Tensor:
        """``[N,H,W]`` float32, the named masks in mask order (N may be 0)."""
        return self.to_segments().named_masks()

    def records(self) -> list[dict[str, Any]]:
        """Per named mask: ``mask`` (index), ``label``, ``score``, ``area`` (pixels > 0.5) and
        ``bbox`` ``[x0, y0, x1, y1]`` (exclusive ends; None when empty)."""
        return [{k: v for k, v in rec.items() if k != "image"} for rec in self.to_segments().records()]

    def to_segments(self) -> Segments:
        """As a one-image ``Segments`` (masks ``[1,K,H,W]``)."""
        return Segments(self.masks[None].float(), [list(self.labels)], [list(self.scores)], [list(self.class_names)])

    def overlay(self, image: ImageLike) -> torch.Tensor:
        """``[H,W,3]`` float32 0..1: coloured masks with their names on ``image``."""
        return draw_overlay(load_image(image)[0], self.masks, self.labels)


# ------------------------------------------------------------------------------------------
# Pipeline
# ------------------------------------------------------------------------------------------

def _default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _default_dtype(device: torch.device) -> torch.dtype:
    return torch.float16 if device.type == "cuda" else torch.float32


class FreeSegPipeline:
    """FreeSeg-Diff with diffusers Stable Diffusion: caption -> diffusion features -> k-means
    masks -> CLIP names -> CRF. Build it with ``from_pretrained``.

    Usable as a ``freeseg.eval.evaluate.Segmenter``: ``pipe(image, vocabulary) -> (masks, labels)``,
    with ``pipe.cache_key`` naming the models and settings.
    """

    def __init__(self, sd: SDModels, clip: Optional[tuple[Any, dict[str, Any], Any]] = None,
                 captioner: Optional[tuple[Any, Any]] = None, settings: FreeSegSettings = DEFAULTS,
                 description: Optional[dict[str, Any]] = None):
        """
        Args:
            sd: from ``load_sd``.
            clip: ``(model, preprocess_cfg, tokenizer)`` from ``freeseg.clip_label.load_open_clip``,
                or None (masks stay unnamed).
            captioner: ``(model, processor)`` from ``freeseg.caption.load_captioner``, or None.
            settings: default settings of ``segment`` (``DEFAULTS``, as the nodes; ``PAPER`` for
                the paper's closed-vocabulary protocol).
            description: JSON-able description of clip / captioner sources (for ``cache_key``).
        """
        if not isinstance(settings, FreeSegSettings):
            raise TypeError(f"settings: expected FreeSegSettings, got {type(settings).__name__}")
        self.sd = sd
        self.clip = clip
        self.captioner = captioner
        self.settings = settings
        self.description = dict(description or {})
        self._cond: Optional[torch.Tensor] = None
        self._embed = cached_embed(self.text_embeddings)  # class prompts encoded once, not per image

    # -- construction ------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, sd: PathLike, clip: Optional[PathLike] = None, blip2: Optional[PathLike] = None, *,
                        sd_config: Optional[PathLike] = None, vae: Union[PathLike, bool, None] = None,
                        device: Union[str, torch.device, None] = None, dtype: Optional[torch.dtype] = None,
                        settings: Optional[FreeSegSettings] = None, **overrides: Any) -> "FreeSegPipeline":
        """Load every model from local paths (never downloads, never runs code from a model folder:
        ``load_open_clip`` and ``load_captioner`` refuse a folder that asks for code, see
        ``freeseg.model_files.check_no_code``; transformers loads with ``trust_remote_code=False``).

        Args:
            sd: Stable Diffusion checkpoint file (LDM layout) or diffusers folder.
            clip: open_clip model folder or weights file (``load_open_clip``); None: no names.
            blip2: BLIP (the paper's: ``Salesforce/blip-image-captioning-base``) or BLIP-2
                captioner folder (``load_captioner``, the type read from its config.json); None:
                no caption, the class names given to ``segment`` are the only names.
            sd_config: component config folder for a single-file ``sd`` (see ``load_sd``).
            vae: VAE override (see ``load_sd``).
            device: default CUDA when available, else CPU.
            dtype: of SD and BLIP-2; default float16 on CUDA, float32 on the CPU (CLIP stays
                float32).
            settings: default settings (``DEFAULTS``); ``**overrides`` change some of them.
        """
        from ..caption import load_captioner
        from ..clip_label import load_open_clip
        from ..model_files import check_no_code

        for kind, folder in (("open_clip", clip), ("blip2", blip2)):
            if folder is not None:  # refused before Stable Diffusion is loaded (the loaders check again)
                check_no_code(kind, os.fspath(folder))
        dev = torch.device(device) if device is not None else _default_device()
        dt = dtype if dtype is not None else _default_dtype(dev)
        base = settings if settings is not None else DEFAULTS
        base = base.replace(**overrides) if overrides else base
        sd_models = load_sd(sd, sd_config=sd_config, vae=vae, device=dev, dtype=dt)
        description: dict[str, Any] = {}
        clip_parts = None
        if clip is not None:
            clip_parts = load_open_clip(os.fspath(clip), device=dev)
            description["clip"] = _file_signature(clip)
        captioner = None
        if blip2 is not None:
            captioner = load_captioner(os.fspath(blip2), device=dev, dtype=dt)
            description["blip2"] = _file_signature(blip2)
        return cls(sd_models, clip_parts, captioner, base, description)

    # -- identity ----------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.sd.device

    @property
    def cache_key(self) -> str:
        """Identifies models (paths, sizes, mtimes), dtype, device type and settings:
        ``"freeseg-diffusers-<16 hex>"``, for ``freeseg.eval.evaluate``'s resume cache."""
        payload = {"version": PIPELINE_VERSION, "sd": self.sd.description, "models": self.description,
                   "device": self.device.type, "settings": self.settings.to_dict()}
        digest = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]
        return f"freeseg-diffusers-{digest}"

    # -- stages ------------------------------------------------------------------------

    @torch.no_grad()
    def empty_prompt_embedding(self) -> torch.Tensor:
        """``[1,L,C]`` text-encoder ``last_hidden_state`` of the empty prompt (cached), on
        the pipeline's device in its dtype."""
        if self._cond is None:
            te = self.sd.text_encoder
            ids = self.sd.prompt_ids.to(next(te.parameters()).device)
            self._cond = te(input_ids=ids)[0].to(self.sd.dtype)
        return self._cond

    @torch.no_grad()
    def text_embeddings(self, texts: list[str]) -> torch.Tensor:
        """``[N,L,D]`` float32 CPU text-encoder ``last_hidden_state`` of ``texts`` (the
        ``embed`` of ``freeseg.vocab.infer_candidates``, as the official ``_encode_prompt``)."""
        if self.sd.tokenize is None:
            raise ValueError("this SDModels has no tokenizer (tokenize=None); load it with load_sd")
        te = self.sd.text_encoder
        ids = self.sd.tokenize(list(texts)).to(next(te.parameters()).device)
        return te(input_ids=ids)[0].float().cpu()

    def _layers(self, source: str) -> list[tuple[str, torch.nn.Module, int]]:
        """(name, module, downscale factor of its output) of every candidate layer of
        ``source`` in forward order.

        queries: ``attn2.to_q`` of ``transformer_blocks[0]`` of every attention of the down
        and up blocks (ComfyUI: of every SpatialTransformer of the input / output blocks).
        decoder: the last layer of every ComfyUI output block, i.e. per up-block layer j the
        upsampler (last j of a block that has one), else the attention, else the resnet.
        The factor doubles after a down block with a downsampler and halves after an up
        block with an upsampler (whose own output is at the finer level)."""
        unet = self.sd.unet
        out: list[tuple[str, torch.nn.Module, int]] = []
        factor = 1
        for part in ("down_blocks", "up_blocks"):
            for i, block in enumerate(getattr(unet, part)):
                if source == SOURCE_QUERIES:
                    for j, attn in enumerate(getattr(block, "attentions", None) or []):
                        blocks = getattr(attn, "transformer_blocks", None)
                        if blocks and getattr(blocks[0], "attn2", None) is not None:
                            out.append((f"{part}.{i}.attentions.{j}.transformer_blocks.0.attn2.to_q",
                                        blocks[0].attn2.to_q, factor))
                elif part == "up_blocks":
                    out += self._decoder_layers(i, block, factor)
                if part == "down_blocks" and getattr(block, "downsamplers", None):
                    factor *= 2
                if part == "up_blocks" and getattr(block, "upsamplers", None):
                    factor //= 2
        return out

    @staticmethod
    def _decoder_layers(i: int, block: torch.nn.Module, factor: int) -> list[tuple[str, torch.nn.Module, int]]:
        """The decoder-source layers of up block ``i`` at ``factor`` (see ``_layers``)."""
        n = len(block.resnets)
        attentions = getattr(block, "attentions", None)
        upsamplers = getattr(block, "upsamplers", None)
        out = []
        for j in range(n):
            if j == n - 1 and upsamplers:
                out.append((f"up_blocks.{i}.upsamplers.0", upsamplers[0], factor // 2))
            elif attentions is not None and j < len(attentions) and attentions[j] is not None:
                out.append((f"up_blocks.{i}.attentions.{j}", attentions[j], factor))
            else:
                out.append((f"up_blocks.{i}.resnets.{j}", block.resnets[j], factor))
        return out

    @torch.no_grad()
    def unet_pass(self, x0: torch.Tensor, seed: int = 0, timestep: int = 0,
                  source: str = SOURCE_QUERIES, stop_early: bool = True) -> dict[str, torch.Tensor]:
        """One UNet pass on ONE scaled latent; returns every candidate layer's output up to
        the last one FreeSeg-Diff uses, where the pass stops (``stop_early``; False: the
        whole UNet, every candidate layer).

        Args:
            x0: ``[1,4,h,w]`` scaled latent (VAE latent x scaling_factor), any float dtype.
            seed: noise seed (``seeded_noise(x0.shape, seed)``).
            timestep: 0..999; ``x_t = scheduler.add_noise(x0, noise, t)`` in float32.
            source: which layers to capture (``freeseg.features.SOURCES``).
        Returns:
            ``{layer name: output}`` in forward order: ``[1,N,C]`` tokens for queries,
            ``[1,C,h,w]`` maps for decoder layers; the UNet's dtype, on its device.
        """
        if x0.ndim != 4 or x0.shape[0] != 1:
            raise ValueError(f"x0 must be ONE latent [1,C,h,w], got {tuple(x0.shape)}")
        unet = self.sd.unet
        dev, dt = self.sd.device, self.sd.dtype
        x0 = x0.to(dev, torch.float32)
        noise = seeded_noise(x0.shape, seed).to(dev)
        t = torch.tensor([int(timestep)], dtype=torch.long)
        x = self.sd.scheduler.add_noise(x0, noise, t).to(dt)
        cond = self.empty_prompt_embedding()
        captured: dict[str, torch.Tensor] = {}
        layers = self._layers(source)
        stop = last_used_layer([(name, f) for name, _, f in layers], source) if stop_early else None

        def hook(name: str):
            def fn(_module: torch.nn.Module, _inputs: Any, output: Any) -> None:
                value = output[0] if isinstance(output, tuple) else getattr(output, "sample", output)
                captured[name] = value.detach()
                if name == stop:
                    raise StopPass
            return fn

        handles = [module.register_forward_hook(hook(name)) for name, module, _ in layers]
        try:
            unet(x, t.to(dev), encoder_hidden_states=cond, return_dict=False)
        except StopPass:
            pass
        finally:
            for handle in handles:
                handle.remove()
        latent_hw = (int(x0.shape[-2]), int(x0.shape[-1]))
        if stop is not None and any(output_factor(captured[n], latent_hw) != f for n, _, f in layers if n in captured):
            # The UNet's levels are not where its structure says: capture everything instead.
            return self.unet_pass(x0, seed, timestep, source, stop_early=False)
        return captured

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor, resolution: int = 512) -> torch.Tensor:
        """``[B,H,W,3]`` float 0..1 -> ``[B,4,r/8,r/8]`` float32 scaled latents (resize as the
        node, VAE posterior mode, ``(z - shift_factor) * scaling_factor``)."""
        vae = self.sd.vae
        if vae is None:
            raise ValueError("no VAE loaded (vae=False); pass a VAE to from_pretrained / load_sd")
        dev = next(vae.parameters()).device
        dt = next(vae.parameters()).dtype
        px = resize_square(to_rgb(pixels).cpu(), resolution).to(dev, dt) * 2.0 - 1.0
        enc = vae.encode(px)
        z = enc.latent_dist.mode() if hasattr(enc, "latent_dist") else enc.latents
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        scale = getattr(vae.config, "scaling_factor", None) or 1.0
        return ((z.float() - shift) * scale)

    def features_from_latents(self, x0: torch.Tensor, image_size: tuple[int, int],
                              settings: Optional[FreeSegSettings] = None) -> DiffusionFeatures:
        """Diffusion features of ``[B,4,h,w]`` scaled latents (image i uses noise seed
        ``settings.seed + i``), the grid at ``settings.resolution / 16``.

        Returns ``DiffusionFeatures`` with features ``[B,C,r/16,r/16]`` float16 on the CPU
        (as the node's), ``image_size`` as given."""
        s = settings or self.settings
        grid = (s.resolution // 16, s.resolution // 16)
        latent_hw = (int(x0.shape[-2]), int(x0.shape[-1]))
        out, names = [], []
        for i in range(x0.shape[0]):
            captured = self.unet_pass(x0[i:i + 1], seed=s.seed + i, timestep=s.timestep, source=s.source)
            feats, names = captured_to_features(captured, latent_hw, grid, s.source)
            out.append(feats.to("cpu", torch.float16))
        return DiffusionFeatures(torch.cat(out), (int(image_size[0]), int(image_size[1])), self.sd.family,
                                 s.source, int(s.timestep), int(s.resolution), list(names))

    def extract_features(self, pixels: torch.Tensor, settings: Optional[FreeSegSettings] = None) -> DiffusionFeatures:
        """``[B,H,W,3]`` float 0..1 -> ``DiffusionFeatures`` (the node's ``extract``)."""
        s = settings or self.settings
        pixels = to_rgb(pixels)
        x0 = self.encode_images(pixels, s.resolution)
        return self.features_from_latents(x0, tuple(pixels.shape[1:3]), s)

    def caption(self, pixels: torch.Tensor, class_names: Sequence[str] = (),
                settings: Optional[FreeSegSettings] = None) -> tuple[list[str], list[list[str]]]:
        """Captions and class-name lists of ``[B,H,W,3]`` images (see ``stages.caption_images``);
        without a captioner (or with ``use_caption=False``), "" and ``class_names``."""
        s = settings or self.settings
        model, processor = self.captioner if (self.captioner is not None and s.use_caption) else (None, None)
        return caption_images(to_rgb(pixels), model, processor, list(class_names), s.max_new_tokens, s.num_beams,
                              s.caption_prompt, min_new_tokens=s.min_new_tokens)

    # -- whole pipeline ----------------------------------------------------------------

    def segment(self, image: ImageLike, class_names: Union[str, Sequence[str], None] = None,
                **overrides: Any) -> FreeSegResult:
        """Segment ONE image and name its masks.

        Args:
            image: see ``load_image`` (path, PIL, numpy, torch ``[H,W,C]``).
            class_names: rule "open": names to label against, added after the caption's nouns
                (a list, or a comma-separated string); without a captioner these are the only
                names. Rule "paper": the full class list (e.g. the 20 VOC classes); the
                candidates come from the caption (none without a captioner: all background).
            **overrides: settings for this call only (``FreeSegSettings`` fields).
        Returns:
            ``FreeSegResult`` (masks ``[K,H,W]`` at the image's size).
        """
        s = self.settings.replace(**overrides) if overrides else self.settings
        t_start = time.perf_counter()
        timings: dict[str, float] = {}
        pixels = load_image(image)

        t0 = time.perf_counter()
        candidates = None
        if s.rule == "paper":
            classes = parse_names(class_names)
            if not classes:
                raise ValueError("class_names: the paper rule needs the full class list")
            captions, _ = self.caption(pixels, (), s)
            lists = [classes]
            candidates = paper_candidates(captions, classes, self._embed)
        else:
            captions, lists = self.caption(pixels, parse_names(class_names), s)
        timings["caption"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        features = self.extract_features(pixels, s)
        timings["features"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        segments = cluster_segments(features, s.n_clusters, s.cluster_method, s.seed, s.n_init, device=self.device)
        timings["cluster"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        if self.clip is not None:
            model, preprocess_cfg, tokenizer = self.clip
            segments = label_segments(segments, pixels, model, preprocess_cfg, tokenizer, lists, s.crop_mode,
                                      s.prompt, s.threshold, warn=log.warning, rule=s.rule,
                                      background=s.background, candidates=candidates)
        else:
            log.warning("FreeSegPipeline: no CLIP model loaded; the masks stay unnamed")
            segments = Segments(segments.masks, segments.labels, segments.scores, lists)
        timings["label"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        segments = refine_segments(segments, pixels, s.refine, device=self.device)
        timings["refine"] = time.perf_counter() - t0
        timings["total"] = time.perf_counter() - t_start

        return FreeSegResult(masks=segments.masks[0], labels=list(segments.labels[0]),
                             scores=list(segments.scores[0]), caption=captions[0], class_names=list(lists[0]),
                             image_size=tuple(pixels.shape[1:3]), blocks=list(features.blocks), settings=s,
                             timings=timings)

    def __call__(self, image: np.ndarray,
                 vocabulary: Optional[Sequence[str]] = None) -> tuple[torch.Tensor, list[Optional[str]]]:
        """``freeseg.eval.evaluate.Segmenter``: ``image`` ``[H,W,3]`` float32 0..1, ``vocabulary``
        None (closed mode: names from the caption, needs a captioner) or the dataset's class
        names (rule "open": added after the caption nouns, as ``segment``; rule "paper": the
        full class list of the paper protocol, needs a captioner). Returns (masks ``[K,H,W]``
        float32, K labels)."""
        no_caption = self.captioner is None or not self.settings.use_caption
        if vocabulary is None and no_caption:
            raise ValueError("closed-vocabulary mode needs a captioner (blip2=...) with use_caption=True: "
                             "without one the masks have no names to choose from")
        if self.settings.rule == "paper" and (vocabulary is None or no_caption):
            raise ValueError("the paper protocol needs the dataset's class list as vocabulary and a captioner "
                             "(blip2=...) with use_caption=True")
        result = self.segment(image, list(vocabulary) if vocabulary is not None else None)
        return result.masks, result.labels
