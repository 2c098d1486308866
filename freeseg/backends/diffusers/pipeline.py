"""FreeSeg-Diff without ComfyUI: Stable Diffusion through ``diffusers``, BLIP / BLIP-2 through
``freeseg.caption``, CLIP through ``freeseg.clip_label``, every other step shared with the
ComfyUI nodes: ``segment`` runs the orchestrator ``freeseg.pipeline.segment_batch`` with this
object as its feature source (``extract``, through ``freeseg.capture.LayerCapture``). Loading:
``freeseg.backends.diffusers.loading``.

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
``down_blocks`` and ``up_blocks`` (the mid block is left out), the latent/4 ones kept (with
``detail`` "fine" the latent/2 ones too), tokens -> maps -> bilinear resize to resolution/16
(/8 fine) -> channel concat -> float16. Every ``FreeSegSettings`` field applies, as in the nodes
(automatic K with ``n_clusters=0``, ``k_from``, ``shared_batch``, ``instances`` / ``min_area``...).

Contract: ``segment`` takes ONE image and returns a ``FreeSegResult``; loop for more (each
image uses noise seed ``settings.seed``, as image 0 of a node batch). ``segment_batch`` of
``freeseg.pipeline`` with ``pipe.models()`` takes a batch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image, ImageOps

from ...capture import LayerCapture, captured_to_features, feature_grid
from ...features import SOURCE_QUERIES, DiffusionFeatures
from ...pipeline import Captioner, Models, segment_batch
from ...segments import Segments, draw_overlay
from ...settings import DEFAULTS, FreeSegSettings
from ...stages import ClipParts, caption_images, resize_square, seeded_noise, to_rgb
from ...vocab import cached_embed
from .loading import PathLike, SDModels, file_signature, load_sd

__all__ = ["FreeSegPipeline", "FreeSegResult", "load_image"]

log = logging.getLogger("freeseg-diff")

PIPELINE_VERSION = 2  # bump when a change alters the outputs (goes into cache_key)


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
        instances: with ``settings.instances``: K instance indices (0 = the largest part of
            its name, None for an unnamed mask); else empty.
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
    instances: list[Optional[int]] = field(default_factory=list)

    def named(self) -> list[int]:
        """Indices of the named masks."""
        return [k for _, k in self.to_segments().named()]

    def named_masks(self) -> torch.Tensor:
        """``[N,H,W]`` float32, the named masks in mask order (N may be 0)."""
        return self.to_segments().named_masks()

    def records(self) -> list[dict[str, Any]]:
        """Per named mask: ``mask`` (index), ``label``, ``score``, ``area`` (pixels > 0.5),
        ``bbox`` ``[x0, y0, x1, y1]`` (exclusive ends; None when empty) and, with instances,
        ``instance``."""
        return [{k: v for k, v in rec.items() if k != "image"} for rec in self.to_segments().records()]

    def to_segments(self) -> Segments:
        """As a one-image ``Segments`` (masks ``[1,K,H,W]``)."""
        return Segments(self.masks[None].float(), [list(self.labels)], [list(self.scores)], [list(self.class_names)],
                        [list(self.instances)] if self.instances else [])

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
    masks -> CLIP names -> CRF (``freeseg.pipeline.segment_batch``, this object its feature
    source). Build it with ``from_pretrained``.

    Usable as a ``freeseg.eval.sources.Segmenter``: ``pipe(image, vocabulary) -> (masks, labels)``,
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
        from ...caption import load_captioner
        from ...clip_label import load_open_clip
        from ...model_files import check_no_code

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
            description["clip"] = file_signature(clip)
        captioner = None
        if blip2 is not None:
            captioner = load_captioner(os.fspath(blip2), device=dev, dtype=dt)
            description["blip2"] = file_signature(blip2)
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
    def unet_pass(self, x0: torch.Tensor, seed: int = 0, timestep: int = 0, source: str = SOURCE_QUERIES,
                  stop_early: bool = True, fine: bool = False,
                  capture: Optional[LayerCapture] = None) -> dict[str, torch.Tensor]:
        """One UNet pass on ONE scaled latent; returns every candidate layer's output up to
        the last one FreeSeg-Diff uses, where the pass stops (``stop_early``; False: the
        whole UNet, every candidate layer). The hooks, the stop and the level check with its
        fallback to a whole pass are ``freeseg.capture.LayerCapture``'s.

        Args:
            x0: ``[1,4,h,w]`` scaled latent (VAE latent x scaling_factor), any float dtype.
            seed: noise seed (``seeded_noise(x0.shape, seed)``).
            timestep: 0..999; ``x_t = scheduler.add_noise(x0, noise, t)`` in float32.
            source: which layers to capture (``freeseg.features.SOURCES``).
            fine: the layers of the "fine" detail too (the latent/2 queries).
            capture: a ``LayerCapture`` of ``_layers(source)`` to reuse across passes (None:
                a new one from ``source``, ``fine``, ``stop_early``).
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
        if capture is None:
            capture = LayerCapture(self._layers(source), source, fine, stop_early, warn=self._warn)
        latent_hw = (int(x0.shape[-2]), int(x0.shape[-1]))
        return capture.run(lambda: unet(x, t.to(dev), encoder_hidden_states=cond, return_dict=False), latent_hw)

    @staticmethod
    def _warn(message: str) -> None:
        log.warning("FreeSeg-Diff diffusers features: %s", message)

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
        ``settings.seed + i``), the grid at ``freeseg.capture.feature_grid(settings)``
        (resolution/16; /8 with ``detail`` "fine").

        Returns ``DiffusionFeatures`` with features ``[B,C,g,g]`` float16 on the CPU (as the
        node's), ``image_size`` as given."""
        s = settings or self.settings
        fine = s.detail == "fine"
        grid = feature_grid(s)
        latent_hw = (int(x0.shape[-2]), int(x0.shape[-1]))
        capture = LayerCapture(self._layers(s.source), s.source, fine, warn=self._warn)
        out, names = [], []
        for i in range(x0.shape[0]):
            captured = self.unet_pass(x0[i:i + 1], seed=s.seed + i, timestep=s.timestep, capture=capture)
            feats, names = captured_to_features(captured, latent_hw, grid, s.source, fine)
            out.append(feats.to("cpu", torch.float16))
        return DiffusionFeatures(torch.cat(out), (int(image_size[0]), int(image_size[1])), self.sd.family,
                                 s.source, int(s.timestep), int(s.resolution), list(names))

    def extract(self, images: torch.Tensor, settings: Optional[FreeSegSettings] = None) -> DiffusionFeatures:
        """``[B,H,W,C]`` float 0..1 -> ``DiffusionFeatures`` (the ``freeseg.capture.FeatureSource``
        of ``segment``; the node's ``extract``)."""
        s = settings or self.settings
        pixels = to_rgb(images)
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

    def models(self) -> Models:
        """The runtime parts for ``freeseg.pipeline.segment_batch``: this object as the feature
        source, its CLIP, captioner and text encoder, clustering and refinement on its device."""
        return Models(features=self,
                      clip=ClipParts(*self.clip) if self.clip is not None else None,
                      captioner=Captioner(*self.captioner) if self.captioner is not None else None,
                      text_embed=self._embed, device=self.device, warn=log.warning)

    def segment(self, image: ImageLike, class_names: Union[str, Sequence[str], None] = None,
                settings: Optional[FreeSegSettings] = None, **overrides: Any) -> FreeSegResult:
        """Segment ONE image and name its masks (``freeseg.pipeline.segment_batch``).

        Args:
            image: see ``load_image`` (path, PIL, numpy, torch ``[H,W,C]``).
            class_names: rule "open": names to label against, added after the caption's nouns
                (a list, or a comma-separated string); without a captioner these are the only
                names. Rule "paper": the full class list (e.g. the 20 VOC classes); the
                candidates come from the caption (none without a captioner: all background).
            settings: the settings of this call (None: ``self.settings``).
            **overrides: settings changed for this call only (``FreeSegSettings`` fields).
        Returns:
            ``FreeSegResult`` (masks ``[K,H,W]`` at the image's size).
        """
        s = settings if settings is not None else self.settings
        if not isinstance(s, FreeSegSettings):
            raise TypeError(f"settings: expected FreeSegSettings, got {type(s).__name__}")
        s = s.replace(**overrides) if overrides else s
        pixels = load_image(image)
        out = segment_batch(pixels, s, self.models(), class_names)
        seg = out.segments
        return FreeSegResult(masks=seg.masks[0], labels=list(seg.labels[0]), scores=list(seg.scores[0]),
                             caption=out.captions[0], class_names=list(out.class_lists[0]),
                             image_size=tuple(pixels.shape[1:3]), blocks=list(out.features.blocks), settings=s,
                             timings=out.timings, instances=list(seg.instances[0]) if seg.instances else [])

    def __call__(self, image: np.ndarray, vocabulary: Optional[Sequence[str]] = None,
                 settings: Optional[FreeSegSettings] = None) -> tuple[torch.Tensor, list[Optional[str]]]:
        """``freeseg.eval.sources.Segmenter``: ``image`` ``[H,W,3]`` float32 0..1, ``vocabulary``
        None (closed mode: names from the caption, needs a captioner) or the dataset's class
        names (rule "open": added after the caption nouns, as ``segment``; rule "paper": the
        full class list of the paper protocol, needs a captioner). ``settings``: as ``segment``.
        Returns (masks ``[K,H,W]`` float32, K labels)."""
        s = settings if settings is not None else self.settings
        no_caption = self.captioner is None or not s.use_caption
        if vocabulary is None and no_caption:
            raise ValueError("closed-vocabulary mode needs a captioner (blip2=...) with use_caption=True: "
                             "without one the masks have no names to choose from")
        if s.rule == "paper" and (vocabulary is None or no_caption):
            raise ValueError("the paper protocol needs the dataset's class list as vocabulary and a captioner "
                             "(blip2=...) with use_caption=True")
        result = self.segment(image, list(vocabulary) if vocabulary is not None else None, s)
        return result.masks, result.labels
