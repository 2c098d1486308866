"""FreeSegDiffusionFeatures: one pass of the user's loaded checkpoint per image (up to the last
block used; a batch shares passes as memory allows), capturing the features FreeSeg-Diff
clusters. The images come as IMAGE + VAE (encoded here) or as a LATENT.

Stable Diffusion UNets (SD1.x, SD2.x, SDXL): the cross-attention queries or decoder blocks of
the paper. DiTs (Flux.1 dev / schnell, Chroma, Flux.2, SD3.x): the image tokens of the blocks of
``freeseg.dit.FAMILIES``, read by forward hooks on the blocks themselves, the same seam as the
UNet layers (``freeseg.capture.LayerCapture``). Hooks rather than a
``patches_replace["dit"]`` entry: that dict holds one patch per block, so setting ours would
replace one another node put there, while a hook fires inside any such patch (it calls the
block) and reaches every family whether or not it offers the dit patch. The features are the
block's own output: a replace patch on the very block read changes what the next blocks see,
not the features (one on an earlier block reaches them). A patch that skips a block read
(a block cache) is an error naming the block."""

from __future__ import annotations

import uuid
import weakref
from typing import Callable

import torch
import torch.nn.functional as F

import comfy.model_management as mm
import comfy.model_sampling
import comfy.patcher_extension
from comfy.ldm.modules.attention import SpatialTransformer
from comfy.ldm.modules.diffusionmodules.openaimodel import Downsample, UNetModel, Upsample

from ..freeseg import dit
from ..freeseg.capture import Layer, LayerCapture, Pick, feature_grid
from ..freeseg.features import DiffusionFeatures
from ..freeseg.settings import CHOICES, DEFAULTS, RESOLUTION_STEP, FreeSegSettings

QUERIES = DEFAULTS.source  # the paper's source, cross-attention queries
from ..freeseg.stages import resize_square, seeded_noise
from .common import CATEGORY, Features, Progress, check_choice, first_problem, input_range, io, log, to_rgb

SUPPORTED = "SD1.x, SD2.x and SDXL (UNet) and Flux.1 dev / schnell, Chroma, Flux.2 and SD3.x (DiT) checkpoints"


def dit_family(model) -> "dit.DiTFamily | None":
    """The ``freeseg.dit`` family of a supported DiT MODEL; None for any other model."""
    base = model.model
    family = dit.family_of(type(getattr(base, "model_config", base)).__name__)
    dm = getattr(base, "diffusion_model", None)
    if family is None or not isinstance(getattr(dm, family.blocks, None), torch.nn.ModuleList):
        return None
    return family


def check_family(model) -> str:
    """The model family name (the ComfyUI model config's), or ValueError when the MODEL is not a
    Stable Diffusion UNet nor a supported DiT (the message names its family)."""
    base = model.model
    dm = getattr(base, "diffusion_model", None)
    family = type(getattr(base, "model_config", base)).__name__
    if dit_family(model) is not None:
        return family
    latent = model.get_model_object("latent_format")
    if (not isinstance(dm, UNetModel) or getattr(dm, "use_temporal_resblocks", False)
            or getattr(latent, "latent_channels", 4) != 4):
        raise ValueError(f"model: FreeSeg-Diff works with {SUPPORTED}; the MODEL given is {family}, which is not "
                         "supported (its blocks or latent are not ones the features are read from: Flux Fill, "
                         "Chroma Radiance, Qwen-Image, Z-Image / Lumina 2, HiDream, PixArt, AuraFlow, HunyuanDiT "
                         "and video models are not).")
    return family


def latent_downscale(model) -> int:
    """Image pixels per latent cell of the MODEL's latent: 8, or the DiT family's (Flux.2: 16)."""
    family = dit_family(model)
    return 8 if family is None else family.downscale


def patch_size(dm) -> int:
    """Side of a DiT's latent patches (Flux: ``patch_size``; SD3: its patch embedder's)."""
    size = getattr(dm, "patch_size", None)
    if size is None:
        size = dm.x_embedder.patch_size
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def feature_layers(model, source: str) -> tuple[list[Layer], "Pick | None"]:
    """The candidate layers of ``source`` in forward order, and how to read their outputs
    (None: as they come). UNets: ``unet_layers``. DiTs: the family's blocks
    (``freeseg.dit.block_indices`` of the model's depth), each at the patch size's factor,
    read as normalised image tokens (``freeseg.dit.image_tokens`` / ``normalise_tokens``);
    only the ``cross_attn_queries`` source (the default) applies to a DiT."""
    dm = model.model.diffusion_model
    family = dit_family(model)
    if family is None:
        return unet_layers(dm, source), None
    if source != QUERIES:
        raise ValueError(f"source: {source!r} reads UNet decoder blocks; a {family.name} DiT has none: use "
                         f"{QUERIES!r}, which on a DiT takes the image tokens of the blocks {family.source}")
    blocks = getattr(dm, family.blocks)
    patch = patch_size(dm)
    layers = [(f"{family.block_name}_{i}", blocks[i], patch) for i in dit.block_indices(family, len(blocks))]

    def pick(output, latent_hw: tuple[int, int]) -> torch.Tensor:
        return dit.normalise_tokens(dit.image_tokens(output, family, latent_hw, patch))
    return layers, pick


def _resamples(layer: torch.nn.Module, kind: type) -> bool:
    """Whether `layer` is a `kind` (Downsample / Upsample) or a ResBlock resampling with one."""
    return isinstance(layer, kind) or (getattr(layer, "updown", False) and isinstance(layer.h_upd, kind))


def unet_layers(dm: UNetModel, source: str) -> list[Layer]:
    """(name, module to hook, downscale factor of its output) for every candidate layer of
    `source`, in forward order.

    queries: the `attn2.to_q` of the first transformer block of each SpatialTransformer
    (input and output blocks; the middle block is left out, as in the paper).
    decoder: the last layer of every output block.
    The factor is the block's level: it doubles after an input block with a Downsample and
    halves after an output block with an Upsample (a decoder block ending in its Upsample
    outputs the finer level)."""
    layers = []
    factor = 1
    for i, block in enumerate(dm.input_blocks):
        if source == QUERIES:
            layers += [(f"input_{i}.attn2.to_q", layer.transformer_blocks[0].attn2.to_q, factor)
                       for layer in block if isinstance(layer, SpatialTransformer)]
        if any(_resamples(layer, Downsample) for layer in block):
            factor *= 2
    for i, block in enumerate(dm.output_blocks):
        upsamples = any(_resamples(layer, Upsample) for layer in block)
        if source == QUERIES:
            layers += [(f"output_{i}.attn2.to_q", layer.transformer_blocks[0].attn2.to_q, factor)
                       for layer in block if isinstance(layer, SpatialTransformer)]
        else:
            last = block[-1]
            layers.append((f"output_{i}", last, factor // 2 if _resamples(last, Upsample) else factor))
        if upsamples:
            factor //= 2
    return layers


_warned_zero_cond = False


def encode_empty(clip) -> tuple[torch.Tensor, dict]:
    """The empty prompt through ``clip`` (whatever family: ComfyUI's generic encode), as
    (cond ``[1,T,D]``, the other entries of its conditioning: ``pooled_output`` and what the
    family adds)."""
    out = clip.encode_from_tokens(clip.tokenize(""), return_dict=True)
    return out.pop("cond"), out


def empty_prompt(clip, context_dim: int, pooled_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The empty-prompt conditioning `[1,77,context_dim]` and pooled `[1,pooled_dim]`: from the
    CLIP text encoder when given (as the paper). A MODEL does not carry its text encoder, so
    without `clip` it is zeros, and the log says so once per session (the features then differ
    from the paper's)."""
    global _warned_zero_cond
    if clip is not None:
        cond, extras = encode_empty(clip)
        pooled = extras.get("pooled_output")
        return cond, torch.zeros((1, pooled_dim)) if pooled is None else pooled
    if not _warned_zero_cond:
        _warned_zero_cond = True
        log.warning("FreeSeg-Diff Diffusion Features: no clip connected, so the UNet is conditioned on zeros "
                    "instead of the empty-prompt embedding the paper uses; the features (and masks) differ "
                    "from the paper's. Connect the checkpoint loader's CLIP output to the clip input.")
    return torch.zeros((1, 77, context_dim)), torch.zeros((1, pooled_dim))


# CLIP object -> (what the conditioning depends on, cond, pooled): the checkpoint loader's CLIP is
# the same object in every prompt, so its empty-prompt encode (0.1-0.2 s, a full CLIP-L pass)
# runs once, not once per prompt. Weak keys: the entry goes with the CLIP.
_EMPTY_PROMPT_CACHE: "weakref.WeakKeyDictionary[object, tuple]" = weakref.WeakKeyDictionary()


def cached_empty_prompt(clip) -> tuple[torch.Tensor, dict]:
    """`encode_empty`, remembered per CLIP object while its patches (`patches_uuid`, e.g. a LoRA
    added in place) and clip layer stay the same."""
    state = (getattr(getattr(clip, "patcher", None), "patches_uuid", None), getattr(clip, "layer_idx", None))
    hit = _EMPTY_PROMPT_CACHE.get(clip)
    if hit is not None and hit[0] == state:
        return hit[1], dict(hit[2])
    cond, extras = encode_empty(clip)
    try:
        _EMPTY_PROMPT_CACHE[clip] = (state, cond, extras)
    except TypeError:  # not weak-referenceable: no caching
        pass
    return cond, dict(extras)


def pass_conditioning(model, clip=None, conditioning=None) -> tuple[torch.Tensor, dict]:
    """(cond ``[1,T,D]``, the other entries of the conditioning) of the pass: the first entry
    of ``conditioning`` (a CONDITIONING, e.g. CLIPTextEncode's, used as given) when connected,
    else the empty prompt through ``clip``; without either, a UNet gets zeros (``empty_prompt``)
    and a DiT is refused (its text tokens have no zero stand-in of a known length)."""
    if conditioning is not None:
        if len(conditioning) == 0 or conditioning[0][0] is None:
            raise ValueError("conditioning: the CONDITIONING given is empty; connect a text encode's output")
        if len(conditioning) > 1:
            log.info("FreeSeg-Diff Diffusion Features: the conditioning has %d entries; the first is used",
                     len(conditioning))
        return conditioning[0][0][:1], dict(conditioning[0][1])
    if clip is not None:
        return cached_empty_prompt(clip)
    family = dit_family(model)
    if family is not None:
        raise ValueError(f"clip / conditioning: a {family.name} model is conditioned on its text encoder's "
                         "empty prompt: connect clip (the CLIP your loader gives, e.g. DualCLIPLoader's) or "
                         "conditioning (e.g. a CLIPTextEncode of an empty prompt)")
    base = model.model
    cond, pooled = empty_prompt(None, base.model_config.unet_config.get("context_dim") or 768,
                                1280 if base.adm_channels else 768)
    return cond, {"pooled_output": pooled}


def model_kwargs(base, cond: torch.Tensor, extras: dict, n: int, resolution: int, x: torch.Tensor,
                 x0: torch.Tensor) -> dict:
    """The keyword inputs of ``apply_model`` for ``n`` images, made as the sampler makes them
    (comfy/samplers.py encode_model_conds, then each model cond's ``process_cond`` to the
    batch): the family's ``extra_conds`` of the conditioning, the size defaulting to the
    resolution (SDXL's size conditioning)."""
    device = x.device
    params = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in extras.items()}
    params["cross_attn"] = cond
    for key, value in (("width", resolution), ("height", resolution), ("crop_w", 0), ("crop_h", 0),
                       ("target_width", resolution), ("target_height", resolution)):
        params.setdefault(key, value)
    params.update(device=device, noise=x, latent_image=x0)
    out = {}
    for key, value in base.extra_conds(**params).items():
        c = value.process_cond(batch_size=n, device=device, area=None).cond
        out[key] = c.to(device) if isinstance(c, torch.Tensor) else \
            [t.to(device) for t in c] if isinstance(c, list) else c
    return out


def timestep_sigma(model_sampling, timestep: int, device: torch.device) -> torch.Tensor:
    """Sigma `[1]` of an integer DDPM timestep (0..999). Discrete schedules index their table
    (t=0 keeps the small noise of the first step, as diffusers' add_noise does); continuous
    ones map the timestep through percent_to_sigma."""
    if isinstance(model_sampling, comfy.model_sampling.ModelSamplingDiscrete):
        t = torch.tensor([float(timestep)], device=model_sampling.sigmas.device)
        return model_sampling.sigma(t).float().to(device)
    return torch.tensor([float(model_sampling.percent_to_sigma(1.0 - timestep / 999.0))], device=device)


def pass_options(unet, sigma: torch.Tensor, cond_uuid: uuid.UUID) -> dict:
    """The `transformer_options` of one UNet pass at `sigma` `[n]` (one per image of the pass,
    all equal), built as ComfyUI's sampler
    builds them (comfy/samplers.py: CFGGuider.inner_sample and _calc_cond_batch): the MODEL's
    own options copied with core's nested-dict copy (the dicts and lists are new, the patches
    and objects in them are shared: `copy.deepcopy` would duplicate modules and GPU tensors a
    patch holds, or fail on objects that cannot be copied), then what the sampler sets for the
    patches that read it: the schedule (`sample_sigmas`: this one step, then 0), the current
    `sigmas`, and per conditioning chunk (one here: every image is the cond) whether it is the
    cond (0) and its uuid."""
    options = comfy.patcher_extension.copy_nested_dicts(unet.model_options.get("transformer_options", {}))
    options["sample_sigmas"] = torch.cat([sigma[:1], sigma.new_zeros(1)])
    options["sigmas"] = sigma
    options["cond_or_uncond"] = [0]
    options["uuids"] = [cond_uuid]
    return options


def images_per_pass(unet, batch: int, latent_shape: tuple[int, int, int]) -> int:
    """How many of `batch` images one UNet pass takes: the most whose estimated memory fits the
    free memory of the UNet's device with the margin ComfyUI's sampler keeps (x1.5 the
    model's `memory_required` estimate, comfy/samplers.py), at least 1. Call it with the
    UNet loaded."""
    free = mm.get_free_memory(unet.load_device)
    n = max(int(batch), 1)
    while n > 1 and unet.memory_required([n, *latent_shape]) * 1.5 >= free:
        n -= 1
    return n


def extract(model, vae, images: torch.Tensor, clip=None, timestep: int = 0, resolution: int = 512,
            source: str = QUERIES, seed: int = 0, detail: str = "paper",
            stop_early: bool = True, conditioning=None) -> DiffusionFeatures:
    """Features of each image of `images` `[B,H,W,C]` from one UNet forward pass per image;
    one pass takes as many images as fit in memory (`images_per_pass`), each with its own
    noise (`seed` + its index). The settings are checked as ``FreeSegSettings`` fields.

    detail "paper": a grid of resolution/16 (32x32 at 512 px). "fine": resolution/8, and for
    the queries source the latent/2 blocks too (``freeseg.capture.select_blocks``).

    The pass stops after the last layer used (`stop_early`; False runs the whole UNet, for
    checks): the decoder levels finer than the features are never computed. Hooks, stop,
    level check and fallback: ``freeseg.capture.LayerCapture``.

    The conditioning: ``conditioning`` when given, else the empty prompt (``pass_conditioning``).

    The user's MODEL is cloned, never patched; forward hooks on the shared UNet are removed
    before returning. Returns features `[B,C,g,g]` float16 on ComfyUI's intermediate device."""
    settings = DEFAULTS.replace(timestep=timestep, resolution=resolution, source=source, seed=seed, detail=detail)
    return ComfyFeatures(model, vae, clip, stop_early, conditioning).extract(images, settings)


class ComfyFeatures:
    """The ``freeseg.capture.FeatureSource`` of a ComfyUI MODEL / VAE (/ CLIP for the
    empty-prompt conditioning, or a CONDITIONING): ``extract(images, settings)`` as the node's
    ``extract``."""

    def __init__(self, model, vae, clip=None, stop_early: bool = True, conditioning=None):
        self.model, self.vae, self.clip, self.stop_early = model, vae, clip, stop_early
        self.conditioning = conditioning

    def extract(self, images: torch.Tensor, settings: FreeSegSettings) -> DiffusionFeatures:
        pixels = to_rgb(images)
        b, h, w, _ = pixels.shape
        resolution = settings.resolution
        return self._features(b, (h, w), settings, lambda start, n: self.vae.encode(
            resize_square(pixels[start:start + n], resolution).movedim(1, -1)))

    def extract_latent(self, samples: torch.Tensor, settings: FreeSegSettings) -> DiffusionFeatures:
        """``extract`` from ComfyUI LATENT samples ``[B,c,h,w]`` (the VAE's latent space, before
        the model's ``process_in``, as VAE Encode gives them; c: the model's latent channels, 4
        16 or 128): no VAE encode. A latent not of side resolution/d (d: ``latent_downscale``,
        8; Flux.2 16) is resized to it (bilinear), as the image path resizes images to
        resolution; the features map back to images of ``dh x dw`` pixels."""
        channels = self.model.get_model_object("latent_format").latent_channels
        if samples.ndim != 4 or samples.shape[1] != channels:
            raise ValueError(f"latent: this {check_family(self.model)} model takes [B,{channels},h,w] latents; got "
                             f"shape {tuple(samples.shape)}")
        scale = latent_downscale(self.model)
        side = settings.resolution // scale
        b, _, h, w = samples.shape

        def latent(start: int, n: int) -> torch.Tensor:
            x = samples[start:start + n].float()
            return x if (h, w) == (side, side) else F.interpolate(x, size=(side, side), mode="bilinear",
                                                                  align_corners=False)
        return self._features(b, (scale * h, scale * w), settings, latent)

    def _features(self, b: int, image_size: tuple[int, int], settings: FreeSegSettings,
                  encoded: Callable[[int, int], torch.Tensor]) -> DiffusionFeatures:
        """The passes over ``b`` images; ``encoded(start, n)``: the latents (before
        ``process_in``) of images start..start+n at side resolution/``latent_downscale``."""
        family = check_family(self.model)
        resolution, timestep, seed, source = settings.resolution, settings.timestep, settings.seed, settings.source
        layers, pick = feature_layers(self.model, source)
        unet = self.model.clone()
        base = unet.model
        cond, extras = pass_conditioning(self.model, self.clip, self.conditioning)
        model_sampling = unet.get_model_object("model_sampling")
        latent_format = unet.get_model_object("latent_format")
        grid = feature_grid(settings)
        cond_uuid = uuid.uuid4()  # the sampler gives each conditioning one uuid for the whole run
        # The pass ends after the last layer used. That layer comes from the levels unet_layers
        # reads off the UNet's structure; the captured shapes are checked against them.
        capture = LayerCapture(layers, source, settings.detail == "fine", self.stop_early, pick=pick,
                               warn=lambda message: log.warning("FreeSeg-Diff Diffusion Features: %s: %s", family,
                                                                message))

        progress = Progress(b)
        out, names = [], []
        side = resolution // latent_downscale(self.model)
        latent_shape = (latent_format.latent_channels, side, side)
        mm.load_models_gpu([unet], memory_required=unet.memory_required([1, *latent_shape]))
        per_pass = images_per_pass(unet, b, latent_shape)
        for start in range(0, b, per_pass):
            progress.check()
            n = min(per_pass, b - start)
            latent = encoded(start, n)
            mm.load_models_gpu([unet], memory_required=unet.memory_required([n, *latent.shape[1:]]))
            device = unet.load_device
            x0 = latent_format.process_in(latent.to(device))
            noise = torch.cat([seeded_noise((1, *x0.shape[1:]), seed + start + k) for k in range(n)]).to(device)
            s = timestep_sigma(model_sampling, timestep, device).expand(n)  # per image, as the sampler's
            x = model_sampling.noise_scaling(s, noise, x0)
            kwargs = model_kwargs(base, cond.to(device), extras, n, resolution, x, x0)
            options = pass_options(unet, s, cond_uuid)
            feats, names = capture.features(lambda: base.apply_model(x, s, transformer_options=options, **kwargs),
                                            tuple(x0.shape[-2:]), grid, progress.check)
            out.append(feats.to(mm.intermediate_device(), torch.float16))
            for _ in range(n):
                progress.step()
        feats = torch.cat(out)
        log.info("FreeSeg-Diff features: %s %s from %d blocks %s -> %s", family, source, len(names), names,
                 tuple(feats.shape))
        return DiffusionFeatures(feats, image_size, family, source, int(timestep), int(resolution), names)


class FreeSegDiffusionFeatures(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FreeSegDiffusionFeatures",
            display_name="FreeSeg-Diff Diffusion Features",
            category=CATEGORY,
            description="One pass of the loaded checkpoint's diffusion model per image, up to the last block "
                        "used (a batch shares passes as memory allows); captures the features "
                        "FreeSeg-Diff clusters into masks. Works with SD1.x, SD2.x and SDXL UNets and with "
                        "Flux.1 dev / schnell, Chroma, Flux.2 and SD3.x DiTs (their image tokens at the blocks the "
                        "published work found semantic; recommended for Flux: timestep 500, resolution 1024; "
                        "SD3: timestep 714, resolution 1024). Takes image + "
                        "vae, or latent (then image and vae are not used and no VAE encode runs).",
            inputs=[
                io.Model.Input("model", tooltip="The MODEL from your checkpoint loader (SD1.x, SD2.x, "
                               "SDXL, Flux.1, Chroma, Flux.2 or SD3.x). It is cloned, never changed."),
                io.Vae.Input("vae", optional=True, tooltip="The VAE that belongs to the model (with image; "
                             "not needed with latent)."),
                io.Image.Input("image", optional=True, tooltip="Images to segment (any size; RGBA and grey are "
                               "accepted). Give image and vae, or latent."),
                io.Int.Input("timestep", default=DEFAULTS.timestep, **input_range("timestep"), tooltip="Diffusion timestep of the "
                             "pass (0 = almost clean image, the paper's setting)."),
                io.Int.Input("resolution", default=DEFAULTS.resolution, **input_range("resolution"),
                             step=RESOLUTION_STEP, tooltip="Images are "
                             "resized to this square before encoding (paper: 512; SDXL likes 1024)."),
                io.Combo.Input("source", options=list(CHOICES["source"]), default=DEFAULTS.source, tooltip="cross_attn_"
                               "queries: the cross-attention queries of the 1/4-latent blocks (paper); on a DiT, "
                               "the image tokens of its semantic blocks. decoder_blocks (UNets only): outputs of "
                               "the decoder blocks at 1/4 and 1/2 latent size."),
                io.Int.Input("seed", default=DEFAULTS.seed, **input_range("seed"), tooltip="Seed of the small noise "
                             "added at the timestep."),
                io.Combo.Input("detail", optional=True, options=list(CHOICES["detail"]), default=DEFAULTS.detail, tooltip="paper: a 32x32 "
                               "feature grid at 512 px (the 1/4-latent blocks upsampled). fine: a 64x64 grid "
                               "that also uses the 1/2-latent (32x32-token) blocks: finer edges and thin parts, "
                               "4x the points to cluster. On a DiT (all tokens at 1/16 of the image) fine only "
                               "doubles the grid."),
                io.Clip.Input("clip", optional=True, tooltip="Text encoder of the checkpoint, for the empty-prompt "
                              "conditioning (paper). Without it (and without conditioning) a UNet gets a zero "
                              "conditioning (a warning is logged); a DiT needs one of the two."),
                io.Latent.Input("latent", optional=True, tooltip="Latents instead of image + vae (e.g. a sampler's "
                                "output): the VAE encode is skipped. Resized to resolution/8 (Flux.2: /16) if not "
                                "that size; the masks come out at 8x (16x) the latent's size."),
                io.Conditioning.Input("conditioning", optional=True, tooltip="The conditioning of the pass, used "
                                      "instead of encoding the empty prompt with clip (its first entry; e.g. a "
                                      "CLIPTextEncode of an empty prompt, or of a caption). A DiT (Flux, SD3) needs "
                                      "clip or conditioning."),
            ],
            outputs=[Features.Output(display_name="features")],
        )

    @classmethod
    def validate_inputs(cls, source=None, detail=None) -> bool | str:
        return first_problem(check_choice("source", source, CHOICES["source"]),
                             check_choice("detail", detail, CHOICES["detail"]))

    @classmethod
    def execute(cls, model, timestep, resolution, source, seed, detail="paper", vae=None, image=None, clip=None,
                latent=None, conditioning=None) -> io.NodeOutput:
        if latent is not None:
            settings = DEFAULTS.replace(timestep=timestep, resolution=resolution, source=source, seed=seed,
                                        detail=detail)
            return io.NodeOutput(ComfyFeatures(model, vae, clip, conditioning=conditioning).extract_latent(
                latent["samples"], settings))
        if image is None or vae is None:
            missing = " and ".join(name for name, value in (("image", image), ("vae", vae)) if value is None)
            raise ValueError(f"{missing}: connect image and vae (the images to segment and the model's VAE), "
                             "or latent (latents to segment)")
        return io.NodeOutput(extract(model, vae, image, clip, timestep, resolution, source, seed, detail,
                                     conditioning=conditioning))
