"""Tiny random-weight models in the real on-disk formats, for tests, benchmarks and
``freeseg segment --random-weights``.

Every builder is deterministic for its seed, writes its artefact(s) atomically
(temporary name, then rename) with mode 0644 and returns the path it wrote.

* ``build_sd15_checkpoint(path)``: one ``.safetensors`` in the original LDM key
  layout (``model.diffusion_model.*``, ``first_stage_model.*`` as TAESD keys,
  ``cond_stage_model.transformer.text_model.*``) that ComfyUI's
  ``CheckpointLoaderSimple`` detects as ``SD15``.  UNet: model_channels 320,
  channel_mult [1, 1, 1], one res block and one SpatialTransformer (depth 1) per
  level in both the encoder and the decoder, middle block = one ResBlock (no
  transformer).  For a 512 px image (latent 64) the transformer blocks run at
  64, 32 and 16 (= latent/1, /2, /4).  CLIP-L text encoder: full size, fp16.
* ``build_sd2_checkpoint(path)``: the same for SD2.x (``SD2_UNET_CONFIG``): linear
  transformers, context_dim 1024, detected by ComfyUI as ``SD20`` with v-prediction;
  full-size OpenCLIP-H text encoder in the SD2 layout (``cond_stage_model.model.*``).
* ``build_sdxl_unet(path)``: UNet-only file (keys without prefix, the
  ``models/diffusion_models`` layout) detected by ComfyUI as ``KOALA_700M``, an
  SDXL-family entry (``isinstance(model.model, comfy.model_base.SDXL)``).
* ``build_sdxl_vae(path)``: TAESD-format VAE with SDXL latent scaling, which
  ``comfy.sd.VAE(sd=...)`` (the ``VAELoader`` node) accepts.
* ``build_blip2(folder)``: tiny ``Blip2ForConditionalGeneration`` +
  ``Blip2Processor`` saved with ``save_pretrained``; ``build_blip1(folder)``: the
  same for BLIP v1 (the paper's captioner), ``BlipForConditionalGeneration`` in the
  layout of ``Salesforce/blip-image-captioning-base``.
* ``build_open_clip(folder)``: tiny open_clip model as a hub-style folder
  (``open_clip_config.json`` + ``open_clip_model.safetensors``).

* ``build_sd15_diffusers_config(folder)`` / ``build_sd15_diffusers_vae(folder)``: what the
  diffusers backend needs besides the SD15 checkpoint.

ComfyUI is imported in-process only to build/verify the ComfyUI-format files (inside the
functions: importing this module does not import ComfyUI); its location is
``$FREESEG_COMFYUI_DIR`` or ``<repo>/.venv/ComfyUI``. ``synthetic.cache`` builds them all once
into the fixture cache.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from freeseg.app.server import default_comfy_dir

# Bump whenever a recipe below changes: cached fixtures are rebuilt (synthetic.cache).
FIXTURE_VERSION = 2

SD15_SEED = 1234
SDXL_UNET_SEED = 2345
SDXL_VAE_SEED = 3456
BLIP2_SEED = 4567
BLIP_SEED = 4568
OPEN_CLIP_SEED = 5678

# Latent scale factors ComfyUI's VAELoader gives the official TAESD files.
SD15_LATENT_SCALE = 0.18215
SDXL_LATENT_SCALE = 0.13025

UNET_BASE_CONFIG: dict[str, Any] = {
    # Keys detect_unet_config always emits for UNet (openaimodel) checkpoints.
    "use_checkpoint": False,
    "image_size": 32,
    "use_spatial_transformer": True,
    "legacy": False,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 320,
    "use_temporal_resblock": False,
    "use_temporal_attention": False,
}

SD15_UNET_CONFIG: dict[str, Any] = {
    **UNET_BASE_CONFIG,
    "num_res_blocks": [1, 1, 1],
    "channel_mult": [1, 1, 1],
    "transformer_depth": [1, 1, 1],
    "transformer_depth_output": [1, 1, 1, 1, 1, 1],
    "transformer_depth_middle": -1,
    "use_linear_in_transformer": False,
    "context_dim": 768,
    "adm_in_channels": None,
}

# KOALA_700M's unet_config fixes transformer_depth [0, 2, 5] (one res block per
# level, three levels); channel_mult and the decoder/middle depths are free, so
# they are reduced here.  Decoder transformers (depth 1) at levels 1 and 2.
# SD2.x (ComfyUI's SD20 entry: context_dim 1024, linear proj_in/proj_out, 64-channel heads). SD2's
# real topology (4 levels, 2 res blocks each, 12 output blocks) with channel_mult reduced to 1 and
# transformers (depth 1) only where needed: the latent/4 level in the encoder and the decoder (the
# paper's query blocks, as input 7, 8 and output 3, 4, 5 of real SD2) and output block 11, whose
# first norm1 bias ComfyUI's SD20.model_type reads to tell v-prediction (std > 0.09) from eps.
SD2_UNET_CONFIG: dict[str, Any] = {
    **UNET_BASE_CONFIG,
    "num_res_blocks": [2, 2, 2, 2],
    "channel_mult": [1, 1, 1, 1],
    "transformer_depth": [0, 0, 0, 0, 1, 1, 0, 0],
    # ComfyUI's UNetModel pops this list from the end: its last entry is output block 0.
    "transformer_depth_output": [1, 0, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0],
    "transformer_depth_middle": -1,
    "use_linear_in_transformer": True,
    "context_dim": 1024,
    "adm_in_channels": None,
}
SD2_V_PRED_KEY = "output_blocks.11.1.transformer_blocks.0.norm1.bias"
SD2_SEED = 6789
# Feature channels of the SD2 fixture's cross-attention queries: 5 blocks at latent/4, 320 each.
SD2_QUERY_CHANNELS = 5 * 320

SDXL_UNET_CONFIG: dict[str, Any] = {
    **UNET_BASE_CONFIG,
    "num_classes": "sequential",
    "num_res_blocks": [1, 1, 1],
    "channel_mult": [1, 1, 1],
    "transformer_depth": [0, 2, 5],
    "transformer_depth_output": [0, 0, 1, 1, 1, 1],
    "transformer_depth_middle": -1,
    "use_linear_in_transformer": True,
    "context_dim": 2048,
    "adm_in_channels": 2816,
}
SDXL_EXPECTED_CLASS = "KOALA_700M"

BLIP2_SENTENCES = [
    "a photo of a cat sitting on a sofa",
    "a dog running on the grass in a park",
    "a red car parked in the street near a tree",
    "two people walking on a beach under a blue sky",
    "a bird on a branch and a horse in a field",
    "a bowl of fruit on a wooden table",
]

# BLIP v1's tokenizer also learns the paper's caption prompt "a picture of ".
BLIP_SENTENCES = BLIP2_SENTENCES + ["a picture of a dog and a cat", "a picture of people in a kitchen"]

OPEN_CLIP_MODEL_CFG: dict[str, Any] = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 1, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
}
OPENAI_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_STD = [0.26862954, 0.26130258, 0.27577711]


# --------------------------------------------------------------------------- helpers


def comfy_dir() -> Path:
    """ComfyUI source tree: ``$FREESEG_COMFYUI_DIR`` or ``<repo>/.venv/ComfyUI``."""
    return Path(default_comfy_dir())


def import_comfy() -> None:
    """Make ``comfy.*`` importable in CPU mode (must run before comfy.model_management).

    Raises RuntimeError if comfy.model_management was already imported without --cpu.
    """
    root = comfy_dir()
    if not (root / "comfy" / "sd.py").is_file():
        raise FileNotFoundError(f"ComfyUI source tree not found at {root} (set FREESEG_COMFYUI_DIR)")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    import comfy.options  # noqa: F401
    from comfy.cli_args import args

    args.cpu = True
    mm = sys.modules.get("comfy.model_management")
    if mm is not None and mm.cpu_state != mm.CPUState.CPU:
        raise RuntimeError("comfy.model_management was imported before CPU mode was set")
    import comfy.model_management  # noqa: F401


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch's global CPU RNG inside the block without disturbing the caller's RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _torch_reset(module: torch.nn.Module) -> bool:
    """Call torch.nn's own ``reset_parameters`` for ``module`` (ComfyUI ops stub it out).

    Returns True when a torch.nn implementation was found and called.
    """
    for cls in type(module).__mro__:
        if cls.__module__.startswith("torch.nn.") and "reset_parameters" in cls.__dict__:
            cls.__dict__["reset_parameters"](module)
            return True
    return False


def reset_all_parameters(model: torch.nn.Module, seed: int, extra: dict[str, float] | None = None) -> None:
    """Initialise every parameter of ``model`` deterministically (in place, fp32).

    Parameters are first filled with NaN; every layer then gets torch.nn's own
    ``reset_parameters`` (kaiming-uniform Linear/Conv, ones/zeros norms, N(0,1)
    embeddings); ``extra`` maps remaining parameter names to constants.  Raises
    RuntimeError naming any parameter still NaN (a would-be uninitialised key).
    """
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
        with _seeded(seed):
            for _, module in model.named_modules():
                _torch_reset(module)
        params = dict(model.named_parameters())
        for name, value in (extra or {}).items():
            params[name].fill_(value)
        missing = [n for n, p in params.items() if torch.isnan(p).any()]
    if missing:
        raise RuntimeError(f"parameters left uninitialised: {missing[:10]} (+{max(0, len(missing) - 10)})")


def _to_saveable(sd: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Detach, make contiguous and cast floating tensors to ``dtype`` (None = keep)."""
    out = {}
    for k, v in sd.items():
        v = v.detach().contiguous()
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        out[k] = v
    return out


def _metadata(kind: str, seed: int) -> dict[str, str]:
    """safetensors metadata with ONE key: safetensors writes several keys in random order,
    which would make the file bytes differ between identical builds."""
    info = {"kind": kind, "fixture_version": FIXTURE_VERSION, "seed": seed}
    return {"freeseg_fixture": json.dumps(info, sort_keys=True)}


def _save_safetensors(sd: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> Path:
    """Atomically write ``sd`` to ``path`` with mode 0644."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_file(sd, str(tmp), metadata=metadata)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return path


def _chmod_tree(folder: Path) -> None:
    """Give a built folder normal permissions (dirs 0755, files 0644)."""
    os.chmod(folder, 0o755)
    for dirpath, dirnames, filenames in os.walk(folder):
        for d in dirnames:
            os.chmod(os.path.join(dirpath, d), 0o755)
        for f in filenames:
            os.chmod(os.path.join(dirpath, f), 0o644)


def _build_folder_atomically(folder: Path, fill: Callable[[Path], None]) -> Path:
    """Run ``fill(tmp_folder)`` then move the finished folder to ``folder``."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    fill(tmp)
    _chmod_tree(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return folder


# --------------------------------------------------------------------------- ComfyUI formats


def _build_unet(model_config_cls_name: str, unet_config: dict[str, Any], seed: int) -> dict[str, torch.Tensor]:
    """Instantiate ComfyUI's UNetModel via its model config class; return the random state dict (fp32)."""
    import_comfy()
    import comfy.supported_models

    cfg = getattr(comfy.supported_models, model_config_cls_name)(copy.deepcopy(unet_config))
    cfg.set_inference_dtype(torch.float32, None)
    unet = cfg.get_model({}).diffusion_model
    reset_all_parameters(unet, seed)
    return unet.state_dict()


def _build_taesd(seed: int, latent_scale: float) -> dict[str, torch.Tensor]:
    """Random TAESD (ComfyUI's class) state dict with ``vae_scale`` = the family's latent scale."""
    import_comfy()
    import comfy.taesd.taesd

    taesd = comfy.taesd.taesd.TAESD(latent_channels=4)
    reset_all_parameters(taesd, seed, extra={"vae_scale": latent_scale, "vae_shift": 0.0})
    return taesd.state_dict()


def _build_clip_l(seed: int, projection: bool = False) -> dict[str, torch.Tensor]:
    """Random full-size CLIP-L text encoder (ComfyUI's SDClipModel), keys ``text_model.*``;
    ``projection``: also ``text_projection.weight``, as in the ``clip_l.safetensors`` users
    download (the pooled output goes through it; ComfyUI warns and leaves it unset without)."""
    import_comfy()
    import comfy.sd1_clip

    clip = comfy.sd1_clip.SDClipModel(device="cpu", dtype=torch.float32)
    reset_all_parameters(clip, seed, extra={"logit_scale": 4.6052})
    keep = "transformer." if projection else "transformer.text_model."
    sd = {k[len("transformer."):]: v for k, v in clip.state_dict().items() if k.startswith(keep)}
    n_pos = sd["text_model.embeddings.position_embedding.weight"].shape[0]
    sd["text_model.embeddings.position_ids"] = torch.arange(n_pos, dtype=torch.int64)[None]
    return sd


def build_sd15_checkpoint(path: str | os.PathLike, seed: int = SD15_SEED) -> str:
    """Write a random SD1.5-format checkpoint (fp16, LDM keys, TAESD VAE) to ``path``; return it."""
    unet = _build_unet("SD15", SD15_UNET_CONFIG, seed)
    vae = _build_taesd(seed + 1, SD15_LATENT_SCALE)
    clip = _build_clip_l(seed + 2)
    sd: dict[str, torch.Tensor] = {}
    sd.update({"model.diffusion_model." + k: v for k, v in unet.items()})
    sd.update({"first_stage_model." + k: v for k, v in vae.items()})
    sd.update({"cond_stage_model.transformer." + k: v for k, v in clip.items()})
    meta = _metadata("sd15", seed)
    return str(_save_safetensors(_to_saveable(sd, torch.float16), Path(path), meta))


def _build_clip_h(seed: int) -> dict[str, torch.Tensor]:
    """Random OpenCLIP-H text encoder in the SD2 checkpoint layout (``cond_stage_model.model.*``:
    ``transformer.resblocks.N.attn.in_proj_weight``, ``ln_final``, ``text_projection``...), fp16.

    Full size (24 layers, 1024 wide, ~354M parameters): ComfyUI builds SD2's text encoder from its
    own fixed config (comfy/text_encoders/sd2_clip_config.json) and loads the checkpoint's weights
    non-strictly, so a smaller encoder would leave layers uninitialised. Built with ComfyUI's
    SD2ClipModel and converted with SD20's own save conversion (what CheckpointSave writes)."""
    import_comfy()
    import comfy.supported_models
    import comfy.text_encoders.sd2_clip

    clip = comfy.text_encoders.sd2_clip.SD2ClipModel(device="cpu", dtype=torch.float32)
    reset_all_parameters(clip, seed, extra={"clip_h.logit_scale": 4.6052})
    sd = {k: v.half() for k, v in clip.state_dict().items()}
    del clip
    cfg = comfy.supported_models.SD20(copy.deepcopy(SD2_UNET_CONFIG))
    return cfg.process_clip_state_dict_for_saving(sd)


def build_sd2_checkpoint(path: str | os.PathLike, seed: int = SD2_SEED) -> str:
    """Write a random SD2.x-format v-prediction checkpoint (fp16, LDM keys, TAESD VAE, OpenCLIP-H
    text encoder) to ``path``, which ComfyUI's CheckpointLoaderSimple detects as ``SD20`` with
    ``ModelType.V_PREDICTION``; return it."""
    unet = _build_unet("SD20", SD2_UNET_CONFIG, seed)
    with _seeded(seed + 3):
        unet[SD2_V_PRED_KEY] = torch.randn(unet[SD2_V_PRED_KEY].shape) * 0.2
    vae = _build_taesd(seed + 1, SD15_LATENT_SCALE)
    sd: dict[str, torch.Tensor] = {}
    sd.update({"model.diffusion_model." + k: v for k, v in unet.items()})
    sd.update({"first_stage_model." + k: v for k, v in vae.items()})
    sd.update(_build_clip_h(seed + 2))
    meta = _metadata("sd2", seed)
    return str(_save_safetensors(_to_saveable(sd, torch.float16), Path(path), meta))


def build_sdxl_unet(path: str | os.PathLike, seed: int = SDXL_UNET_SEED) -> str:
    """Write a random SDXL-family (KOALA_700M-detected) UNet-only file (fp16, no key prefix); return it."""
    unet = _build_unet(SDXL_EXPECTED_CLASS, SDXL_UNET_CONFIG, seed)
    meta = _metadata("sdxl_unet", seed)
    return str(_save_safetensors(_to_saveable(unet, torch.float16), Path(path), meta))


def build_sdxl_vae(path: str | os.PathLike, seed: int = SDXL_VAE_SEED) -> str:
    """Write a random TAESD-format VAE with SDXL latent scale (fp16) for ``VAELoader``; return it."""
    vae = _build_taesd(seed, SDXL_LATENT_SCALE)
    meta = _metadata("sdxl_vae", seed)
    return str(_save_safetensors(_to_saveable(vae, torch.float16), Path(path), meta))


# --------------------------------------------------------------------------- BLIP-2


def _train_tokenizer() -> Any:
    """Byte-level BPE trained on a few sentences, wrapped as ``GPT2TokenizerFast``.

    The alphabet is limited to the characters of the training sentences, so any
    generated token sequence decodes to lowercase ASCII words and spaces.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2TokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["</s>", "<pad>", "<image>"], show_progress=False)
    tok.train_from_iterator(BLIP2_SENTENCES, trainer)
    return GPT2TokenizerFast(
        tokenizer_object=tok, bos_token="</s>", eos_token="</s>", pad_token="<pad>", unk_token="</s>"
    )


def _fill_blip2(folder: Path, seed: int) -> None:
    """Build the tiny BLIP-2 model + processor and ``save_pretrained`` both into ``folder``."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, BlipImageProcessor

    tokenizer = _train_tokenizer()
    vocab = len(tokenizer)
    num_query = 4
    config = Blip2Config(
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "image_size": 64, "patch_size": 16},
        qformer_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                        "num_attention_heads": 2, "encoder_hidden_size": 32, "vocab_size": vocab},
        text_config={"model_type": "opt", "hidden_size": 32, "ffn_dim": 64, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "vocab_size": vocab, "word_embed_proj_dim": 32,
                     "max_position_embeddings": 128, "bos_token_id": tokenizer.bos_token_id,
                     "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id},
        num_query_tokens=num_query,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )
    with _seeded(seed):
        model = Blip2ForConditionalGeneration(config).eval()
    processor = Blip2Processor(
        image_processor=BlipImageProcessor(size={"height": 64, "width": 64}),
        tokenizer=tokenizer,
        num_query_tokens=num_query,
    )
    model.save_pretrained(str(folder))
    processor.save_pretrained(str(folder))


def build_blip2(folder: str | os.PathLike, seed: int = BLIP2_SEED) -> str:
    """Write a tiny random BLIP-2 model folder (loadable offline with from_pretrained); return it."""
    return str(_build_folder_atomically(Path(folder), lambda tmp: _fill_blip2(tmp, seed)))


def _fill_blip1(folder: Path, seed: int) -> None:
    """Build a tiny BLIP v1 captioner and ``save_pretrained`` it into ``folder``.

    The layout of ``Salesforce/blip-image-captioning-base`` (``BlipForConditionalGeneration``
    + ``BlipProcessor``) with every width and depth reduced: a ViT-B-shaped vision tower (384 px
    input, 16 px patches, class token; 1 layer, 32 wide), a BERT-shaped text decoder (1 layer,
    32 wide) and a WordPiece tokenizer with BERT's special tokens plus BLIP's ``[DEC]`` (the
    decoder's start token) and ``[ENC]``. The image processor is transformers' BLIP default,
    which is the real one (384 px bicubic, OpenAI CLIP mean/std). The paper's prompt
    ``"a picture of "`` tokenizes to the same three word pieces as in BERT's vocabulary.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import (BertTokenizerFast, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor,
                              BlipProcessor)

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "[ENC]"]
    tok.train_from_iterator(BLIP_SENTENCES, trainers.WordPieceTrainer(vocab_size=200, special_tokens=specials,
                                                                      show_progress=False))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[(t, tok.token_to_id(t)) for t in ("[CLS]", "[SEP]")])
    tokenizer = BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                  sep_token="[SEP]", mask_token="[MASK]", bos_token="[DEC]",
                                  additional_special_tokens=["[ENC]"])
    config = BlipConfig(
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "image_size": 384, "patch_size": 16},
        text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "vocab_size": len(tokenizer), "encoder_hidden_size": 32,
                     "max_position_embeddings": 512, "bos_token_id": tokenizer.bos_token_id,
                     "pad_token_id": tokenizer.pad_token_id, "sep_token_id": tokenizer.sep_token_id,
                     "eos_token_id": tokenizer.sep_token_id},
    )
    with _seeded(seed):
        model = BlipForConditionalGeneration(config).eval()
    processor = BlipProcessor(image_processor=BlipImageProcessor(), tokenizer=tokenizer)
    model.save_pretrained(str(folder))
    processor.save_pretrained(str(folder))


def build_blip1(folder: str | os.PathLike, seed: int = BLIP_SEED) -> str:
    """Write a tiny random BLIP v1 captioner folder (loadable offline with from_pretrained); return it."""
    return str(_build_folder_atomically(Path(folder), lambda tmp: _fill_blip1(tmp, seed)))


# --------------------------------------------------------------------------- open_clip


def _fill_open_clip(folder: Path, seed: int) -> None:
    """Write ``open_clip_config.json`` + ``open_clip_model.safetensors`` (fp32) into ``folder``."""
    from open_clip.model import CLIP
    from safetensors.torch import save_file

    with _seeded(seed):
        model = CLIP(**copy.deepcopy(OPEN_CLIP_MODEL_CFG))
    save_file(_to_saveable(model.state_dict(), None), str(folder / "open_clip_model.safetensors"))
    config = {
        "model_cfg": OPEN_CLIP_MODEL_CFG,
        "preprocess_cfg": {"mean": OPENAI_MEAN, "std": OPENAI_STD,
                           "interpolation": "bicubic", "resize_mode": "shortest"},
    }
    (folder / "open_clip_config.json").write_text(json.dumps(config, indent=2) + "\n")


def build_open_clip(folder: str | os.PathLike, seed: int = OPEN_CLIP_SEED) -> str:
    """Write a tiny random open_clip model folder (hub layout); return it."""
    return str(_build_folder_atomically(Path(folder), lambda tmp: _fill_open_clip(tmp, seed)))


# --------------------------------------------------------------------------- diffusers side

# diffusers config of the reduced SD15 fixture UNet (SD15_UNET_CONFIG): 320 channels at 3
# levels, 1 res block + 1 transformer (depth 1, 8 heads) per level, ResBlock-only middle.
SD15_DIFFUSERS_UNET_CONFIG: dict[str, Any] = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 320, 320],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3,
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 1,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2D",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["CrossAttnUpBlock2D"] * 3,
}
DIFFUSERS_VAE_SEED = 11


def build_sd15_diffusers_config(folder: str | os.PathLike) -> str:
    """Write the diffusers-layout config folder (``unet/config.json`` only; the other parts fall
    back to the SD1.5 configs freeseg ships) that loads the reduced SD15 fixture UNet."""
    def fill(tmp: Path) -> None:
        (tmp / "unet").mkdir()
        (tmp / "unet" / "config.json").write_text(json.dumps(SD15_DIFFUSERS_UNET_CONFIG, indent=2))
    return str(_build_folder_atomically(Path(folder), fill))


def build_sd15_diffusers_vae(folder: str | os.PathLike, seed: int = DIFFUSERS_VAE_SEED) -> str:
    """Write a small random diffusers AutoencoderKL folder (downscale 8, 4 latent channels): the
    SD15 fixture's VAE is in ComfyUI's TAESD layout, which diffusers cannot read."""
    from diffusers import AutoencoderKL

    def fill(tmp: Path) -> None:
        with _seeded(seed):
            vae = AutoencoderKL(block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
                                up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, norm_num_groups=4,
                                latent_channels=4, sample_size=64)
        vae.save_pretrained(str(tmp))
    return str(_build_folder_atomically(Path(folder), fill))
