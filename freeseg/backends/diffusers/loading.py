"""Loading Stable Diffusion with ``diffusers``, offline: ``load_sd`` -> ``SDModels`` (UNet, text
encoder, VAE, noise schedule, tokenizer), used by ``freeseg.backends.diffusers.pipeline``.

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
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch

__all__ = ["SDModels", "DEFAULT_SD_CONFIG", "PathLike", "load_sd", "file_signature"]

DEFAULT_SD_CONFIG = Path(__file__).resolve().parents[2] / "data" / "sd15"
"""Standard SD1.5 component configs (diffusers layout, no weights)."""

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
VAE_CLASSES = ("AutoencoderKL", "AutoencoderTiny")
CLIP_BOS, CLIP_EOS = 49406, 49407

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


def file_signature(path: PathLike) -> dict[str, Any]:
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
    description: dict[str, Any] = {"sd": file_signature(src), "dtype": str(dtype).replace("torch.", "")}
    if sd_config is not None:
        description["sd_config"] = file_signature(sd_config)
    if vae is not None:
        description["vae"] = file_signature(vae) if not isinstance(vae, bool) else bool(vae)

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
