"""Random-weight DiT models (Flux, SD3.5) in the real on-disk formats ComfyUI's loaders detect.

Every builder is deterministic for its seed, writes one ``.safetensors`` atomically with mode
0644, checks that ComfyUI's own detection reads the intended config back from the written keys
(``comfy.model_detection.detect_unet_config``), and returns the path. ``synthetic.cache`` builds
them once into the fixture cache (keys ``flux_unet``, ``flux_vae``, ``sd3_ckpt``, ``clip_l``).

* ``build_flux_unet(path)``: a Flux.1-dev diffusion model (``models/diffusion_models``, loaded by
  ``UNETLoader``; BFL key layout ``double_blocks.N.img_attn.qkv.weight``...). What detection reads
  (comfy/model_detection.py, the ``double_blocks.0.img_attn.norm.key_norm.scale`` branch):
  ``hidden_size`` and ``in_channels`` from ``img_in.weight`` (``[hidden, 16 * 2 * 2]``),
  ``context_in_dim`` from ``txt_in.weight``, ``vec_in_dim`` from ``vector_in.in_layer.weight``,
  ``depth`` / ``depth_single_blocks`` by counting ``double_blocks.N.`` / ``single_blocks.N.``,
  ``guidance_embed`` from the presence of ``guidance_in.in_layer.weight`` (dev: yes, schnell:
  no). ``num_heads`` (24), ``axes_dim`` ([16, 56, 56]: 128 per head) and ``mlp_ratio`` are fixed
  there, so the width cannot shrink: the fixture has the real width 3072 and the real block
  structure, with the depth reduced to ``FLUX_DEPTH`` double and ``FLUX_SINGLE_DEPTH`` single
  blocks (real Flux.1: 19 and 38).
  Text widths: real Flux reads T5-XXL tokens (``context_in_dim`` 4096) and CLIP-L's pooled
  vector (``vec_in_dim`` 768). T5-XXL (4.7B parameters, built by ComfyUI from a fixed config)
  cannot be built here, so the fixture takes what ComfyUI's SD3 text-encoder wrapper gives from
  a CLIP-L alone (``DualCLIPLoader`` / ``CLIPLoader`` with type ``sd3``): tokens ``[B, 77, 4096]``
  (CLIP-L's 768 zero-padded, the real ``context_in_dim``) and a pooled ``[B, 2048]`` (CLIP-L's 768
  + 1280 zeros for the absent CLIP-G): ``vec_in_dim`` is 2048 instead of 768. A real CLIP encode
  of the user's prompt machinery therefore feeds the fixture; the features node takes any CLIP.
* ``build_flux_vae(path)``: the 16-channel KL autoencoder in the layout of Flux's ``ae.safetensors``
  (``encoder.*`` / ``decoder.*``, no quant convs), at the real size (``VAELoader`` fixes ``ch`` 128
  and ``ch_mult`` [1, 2, 4, 4]; ``z_channels`` is read from ``decoder.conv_in.weight``).
* ``build_sd3_checkpoint(path)``: an SD3.5-large-style single-file checkpoint for
  ``CheckpointLoaderSimple``: ``model.diffusion_model.*`` (MMDiT, RMS q/k norm as in 3.5),
  ``first_stage_model.*`` (the same 16-channel KL VAE) and ``text_encoders.clip_l.transformer.*``
  (a full-size random CLIP-L; no CLIP-G or T5, which ComfyUI's SD3 encoder then fills with zeros,
  as for the official checkpoints shipped without T5). What detection reads (the
  ``joint_blocks.0.context_block.attn.qkv.weight`` branch): ``depth`` = ``x_embedder.proj.weight``
  rows / 64 (so the width is 64 * depth and the head count equals the depth), ``in_channels`` and
  ``patch_size`` from the same weight, ``out_channels`` from ``final_layer.linear.weight``,
  ``adm_in_channels`` from ``y_embedder.mlp.0.weight``, the context width from
  ``context_embedder.weight``, ``num_patches`` / ``pos_embed_max_size`` from ``pos_embed``,
  ``qk_norm`` from ``joint_blocks.0.context_block.attn.ln_q.weight``, MMDiT-X self-attention layers
  from ``joint_blocks.N.x_block.attn2.qkv.weight``. Reduced: ``SD3_DEPTH`` blocks of width
  64 * ``SD3_DEPTH`` (real 3.5 large: 38 blocks, 2432 wide; 3 medium: 24, 1536), positional table
  64 x 64 patches (1024 px; real 192 x 192). Context (4096) and pooled (2048) widths are real.
* ``build_pixart_unet(path)``: a PixArt-Sigma diffusion model (one block; detection reads the
  depth by counting ``blocks.N.``, fixes the width at 1152) for the refusal of a DiT family the
  features node does not reach.
* ``build_clip_l(path)``: a full-size random CLIP-L text encoder in the layout of the
  ``clip_l.safetensors`` users put in ``models/text_encoders`` (``text_model.*``).

ComfyUI is imported in-process only inside the functions (``synthetic.models.import_comfy``).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch

from .models import (_build_clip_l, _metadata, _save_safetensors, _seeded, _to_saveable,
                     import_comfy, reset_all_parameters)

FLUX_SEED = 7001
FLUX_VAE_SEED = 7002
SD3_CKPT_SEED = 7003
CLIP_L_SEED = 7004

FLUX_DEPTH = 1
FLUX_SINGLE_DEPTH = 1
SD3_DEPTH = 10
PIXART_SEED = 7005

# What comfy.model_detection.detect_unet_config returns for the Flux fixture (the config the
# builder instantiates, checked against detection after writing).
FLUX_DIT_CONFIG: dict[str, Any] = {
    "image_model": "flux",
    "axes_dim": [16, 56, 56],
    "num_heads": 24,
    "mlp_ratio": 4.0,
    "theta": 10000,
    "out_channels": 16,
    "qkv_bias": True,
    "in_channels": 16,
    "hidden_size": 3072,
    "context_in_dim": 4096,
    "patch_size": 2,
    "vec_in_dim": 2048,
    "depth": FLUX_DEPTH,
    "depth_single_blocks": FLUX_SINGLE_DEPTH,
    "guidance_embed": True,
}

SD3_DIT_CONFIG: dict[str, Any] = {
    "in_channels": 16,
    "patch_size": 2,
    "out_channels": 16,
    "depth": SD3_DEPTH,
    "input_size": None,
    "adm_in_channels": 2048,
    "context_embedder_config": {"target": "torch.nn.Linear",
                                "params": {"in_features": 4096, "out_features": 64 * SD3_DEPTH}},
    "num_patches": 64 * 64,
    "pos_embed_max_size": 64,
    "qk_norm": "rms",
    "pos_embed_scaling_factor": None,
    "x_block_self_attn_layers": [],
}

# ComfyUI's VAELoader builds a 16-channel KL VAE with this ddconfig (comfy/sd.py, VAE.__init__).
KL16_DDCONFIG: dict[str, Any] = {"double_z": True, "z_channels": 16, "resolution": 256, "in_channels": 3,
                                 "out_ch": 3, "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2,
                                 "attn_resolutions": [], "dropout": 0.0}

PIXART_DIT_CONFIG: dict[str, Any] = {"num_heads": 16, "patch_size": 2, "hidden_size": 1152, "in_channels": 4,
                                     "depth": 1, "model_max_length": 300, "image_model": "pixart_sigma",
                                     "micro_condition": False}

# Classes ComfyUI's detection must pick for the files (comfy.supported_models).
FLUX_EXPECTED_CLASS = "Flux"
SD3_EXPECTED_CLASS = "SD3"


def random_dit(model_config_cls_name: str, config: dict[str, Any], seed: int,
               dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Instantiate ComfyUI's diffusion model for ``config`` via its model config class (in
    ``dtype``: the real-size bench models are built directly in bf16) and initialise it
    deterministically: torch.nn layers by their own reset, norm scales 1, the positional table
    (SD3) N(0, 0.02); return the state dict."""
    import_comfy()
    import comfy.supported_models

    cfg = getattr(comfy.supported_models, model_config_cls_name)(copy.deepcopy(config))
    cfg.set_inference_dtype(dtype, None)
    model = cfg.get_model({}).diffusion_model
    names = [n for n, _ in model.named_parameters()]
    ones = {n: 1.0 for n in names if n.endswith(".scale") or n.endswith("ln_q.weight") or n.endswith("ln_k.weight")}
    zeros = {n: 0.0 for n in names if n == "pos_embed" or n.endswith("scale_shift_table")}  # PixArt's tables
    reset_all_parameters(model, seed, extra={**ones, **zeros})
    sd = model.state_dict()
    if "pos_embed" in sd:
        with _seeded(seed + 1):
            sd["pos_embed"] = (torch.randn(sd["pos_embed"].shape) * 0.02).to(dtype)
    return sd


def check_detection(sd: dict[str, torch.Tensor], prefix: str, config: dict[str, Any], expected: str) -> None:
    """Raise unless ComfyUI's detection reads ``config`` back from the keys and picks ``expected``."""
    import comfy.model_detection

    found = comfy.model_detection.detect_unet_config(sd, prefix)
    if {k: found.get(k) for k in config} != config:
        raise RuntimeError(f"ComfyUI detects {found} from the written keys, not {config}")
    model_config = comfy.model_detection.model_config_from_unet(sd, prefix)
    name = type(model_config).__name__ if model_config is not None else None
    if name != expected:
        raise RuntimeError(f"ComfyUI detects the written model as {name}, not {expected}")


def random_kl16_vae(seed: int) -> dict[str, torch.Tensor]:
    """A random 16-channel KL autoencoder as ComfyUI's VAELoader builds it from ``ae.safetensors``
    (AutoencodingEngine, no quant convs); state dict with ``encoder.*`` / ``decoder.*`` keys."""
    import_comfy()
    from comfy.ldm.models.autoencoder import AutoencodingEngine

    vae = AutoencodingEngine(
        regularizer_config={"target": "comfy.ldm.models.autoencoder.DiagonalGaussianRegularizer"},
        encoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Encoder", "params": KL16_DDCONFIG},
        decoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Decoder", "params": KL16_DDCONFIG})
    reset_all_parameters(vae, seed)
    return vae.state_dict()


def build_flux_unet(path: str | os.PathLike, seed: int = FLUX_SEED) -> str:
    """Write the random Flux.1-dev diffusion model (bf16, BFL keys, no prefix) to ``path``."""
    sd = _to_saveable(random_dit(FLUX_EXPECTED_CLASS, FLUX_DIT_CONFIG, seed), torch.bfloat16)
    check_detection(sd, "", FLUX_DIT_CONFIG, FLUX_EXPECTED_CLASS)
    return str(_save_safetensors(sd, Path(path), _metadata("flux_unet", seed)))


def build_flux_vae(path: str | os.PathLike, seed: int = FLUX_VAE_SEED) -> str:
    """Write the random 16-channel KL VAE (bf16, ``ae.safetensors`` layout) to ``path``."""
    sd = _to_saveable(random_kl16_vae(seed), torch.bfloat16)
    return str(_save_safetensors(sd, Path(path), _metadata("flux_vae", seed)))


def build_sd3_checkpoint(path: str | os.PathLike, seed: int = SD3_CKPT_SEED) -> str:
    """Write the random SD3.5-style checkpoint (fp16: MMDiT + 16-channel KL VAE + CLIP-L) to ``path``."""
    dit = random_dit(SD3_EXPECTED_CLASS, SD3_DIT_CONFIG, seed)
    sd: dict[str, torch.Tensor] = {"model.diffusion_model." + k: v for k, v in dit.items()}
    sd.update({"first_stage_model." + k: v for k, v in random_kl16_vae(seed + 1).items()})
    sd.update({"text_encoders.clip_l.transformer." + k: v for k, v in _build_clip_l(seed + 2, projection=True).items()})
    sd = _to_saveable(sd, torch.float16)
    check_detection(sd, "model.diffusion_model.", SD3_DIT_CONFIG, SD3_EXPECTED_CLASS)
    return str(_save_safetensors(sd, Path(path), _metadata("sd3_ckpt", seed)))


def build_clip_l(path: str | os.PathLike, seed: int = CLIP_L_SEED) -> str:
    """Write a random full-size CLIP-L text encoder (fp16, ``text_model.*``) to ``path``."""
    sd = _to_saveable(_build_clip_l(seed, projection=True), torch.float16)
    return str(_save_safetensors(sd, Path(path), _metadata("clip_l", seed)))


def build_pixart_unet(path: str | os.PathLike, seed: int = PIXART_SEED) -> str:
    """Write a random one-block PixArt-Sigma diffusion model (fp16, no prefix) to ``path``."""
    sd = _to_saveable(random_dit("PixArtSigma", PIXART_DIT_CONFIG, seed), torch.float16)
    check_detection(sd, "", PIXART_DIT_CONFIG, "PixArtSigma")
    return str(_save_safetensors(sd, Path(path), _metadata("pixart_unet", seed)))
