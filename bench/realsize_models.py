"""Random-weight models at the REAL architectures and on-disk formats, for bench_pipeline.py.

Same recipe as the test fixtures (``synthetic/models.py``: ComfyUI's own model
classes, seeded ``reset_parameters``, atomic safetensors writes with mode 0644), at full size:

* ``sd15``: one SD1.5 single-file checkpoint in the LDM key layout (fp16): the real SD1.5
  UNet config (859.5M), ComfyUI's KL ``AutoencoderKL`` (83.7M) under ``first_stage_model.*``,
  the CLIP-L text encoder (123.1M) under ``cond_stage_model.transformer.*``. ComfyUI detects it
  as ``SD15``; diffusers' ``from_single_file`` reads it with the standard SD1.5 configs.
* ``open_clip``: ``ViT-B-32`` (quick GELU, as OpenAI's) as a hub folder
  (``open_clip_config.json`` + ``open_clip_model.safetensors``, fp16), 151.3M.
* ``blip``: BLIP base captioner (``BlipForConditionalGeneration(BlipConfig())``: ViT-B/16 at
  384 px, BERT-base text decoder, vocabulary 30524) saved with ``save_pretrained`` (fp16),
  with a WordPiece tokenizer of exactly 30524 ids; 224.0M.

Built only on request (``--sdxl`` / ``--blip2`` of bench_pipeline.py; several GB each):

* ``sdxl``: one SDXL base single-file checkpoint in the SGM key layout (fp16): the real SDXL
  UNet config (2567.5M) under ``model.diffusion_model.*``, the KL VAE (same architecture as
  SD1.5's; SDXL's latent scale comes from the detected model) under ``first_stage_model.*``,
  CLIP-L (``conditioner.embedders.0.transformer.*``) and OpenCLIP bigG
  (``conditioner.embedders.1.model.*``, open_clip names, as the official file) built with
  ComfyUI's ``SDXLClipModel`` and converted with ``SDXL.process_clip_state_dict_for_saving``.
  ComfyUI's ``CheckpointLoaderSimple`` detects it as ``SDXL``.
* ``sdxl_reduced``: the same layout with the test fixtures' reduced SDXL-family UNet
  (``synthetic.models.SDXL_UNET_CONFIG``, detected as ``KOALA_700M``) and a TAESD VAE with SDXL
  latent scale, and the full-size text encoders (ComfyUI builds them from fixed configs, so
  they cannot be reduced): what ``--sdxl --fixtures`` runs.
* ``blip2``: a BLIP-2 captioner of the ``Salesforce/blip2-opt-2.7b`` shape
  (``Blip2ForConditionalGeneration`` with that config written out in ``BLIP2_OPT_2_7B``:
  EVA ViT-g/14 at 224 px, 32-query Q-Former, OPT-2.7B; 3744.7M) saved with
  ``save_pretrained`` in fp16, with a byte-level BPE tokenizer of OPT's 50265 ids plus
  ``<image>`` (50265) and a ``Blip2Processor`` with 32 query tokens.

DiTs (``--flux`` / ``--sd3`` of bench_pipeline.py; ``synthetic/dit.py``'s builders, in bf16):

* ``flux``: a Flux.1-dev diffusion model (``models/diffusion_models`` layout) at the real width
  (3072, 24 heads, real text widths 4096 / 768, guidance) with ``FLUX_BENCH_DOUBLE`` (4)
  double-stream blocks and no single-stream block; 1.42B (real: 19 + 38 blocks, 11.9B).
* ``sd3``: the SD3 medium MMDiT exactly (24 joint blocks, 1536 wide; ComfyUI reads the depth
  from the width, so it cannot be cut); 2.03B.
* ``kl16_vae``: the 16-channel KL VAE of both, real size (83.7M).

Measured on 2 CPU cores: sdxl 52 s, 6.94 GB; blip2 29 s, 7.49 GB; sdxl_reduced 8 s, 1.79 GB;
the sdxl + blip2 build peaks at 8.0 GiB RSS (both are built directly in fp16).

Everything is cached under ``$FREESEG_BENCH_CACHE`` (default ``~/.cache/freeseg-bench``) with a
version stamp; nothing of it goes into git. Build time on 2 CPU cores: about 45 s, 2.7 GiB
(the default three).

Usage: ``python bench/realsize_models.py [CACHE_DIR] [--only KEY,KEY]`` (default keys: sd15,
open_clip, blip; prints ``MODELS={json}``). The builder imports ComfyUI, so bench_pipeline.py
runs it in a subprocess.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script: the repository root importable
from synthetic import cache as fixture_cache  # noqa: E402
from synthetic import dit  # noqa: E402  (the DiT builders of the test fixtures)
from synthetic import models as fx  # noqa: E402  (shared build helpers of the test fixtures)

# Bump when a recipe below changes: cached models are rebuilt.
REALSIZE_VERSION = 1
SEED = 9000

# The SD1.5 UNet exactly as detect_unet_config reads it from v1-5-pruned-emaonly.safetensors.
SD15_REAL_UNET_CONFIG: dict[str, Any] = {
    **fx.UNET_BASE_CONFIG,
    "num_res_blocks": [2, 2, 2, 2],
    "channel_mult": [1, 2, 4, 4],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "transformer_depth_middle": 1,
    "use_linear_in_transformer": False,
    "context_dim": 768,
    "adm_in_channels": None,
}
# ComfyUI's default SD1.x/SD2.x KL VAE (comfy/sd.py), as in the official checkpoints.
KL_VAE_DDCONFIG: dict[str, Any] = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3,
                                   "out_ch": 3, "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2,
                                   "attn_resolutions": [], "dropout": 0.0}
BLIP_VOCAB = 30524  # BlipConfig().text_config.vocab_size: BERT's 30522 + [DEC] + [ENC]

# The SDXL base UNet exactly as detect_unet_config reads it from sd_xl_base_1.0.safetensors
# (ComfyUI's model_detection table, without its dtype entry).
SDXL_REAL_UNET_CONFIG: dict[str, Any] = {
    **fx.UNET_BASE_CONFIG,
    "num_classes": "sequential",
    "adm_in_channels": 2816,
    "num_res_blocks": [2, 2, 2],
    "channel_mult": [1, 2, 4],
    "transformer_depth": [0, 0, 2, 2, 10, 10],
    "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
    "transformer_depth_middle": 10,
    "use_linear_in_transformer": True,
    "context_dim": 2048,
    "num_head_channels": 64,
}

# Salesforce/blip2-opt-2.7b's config.json, written out (sizes, activations, token ids).
BLIP2_OPT_2_7B: dict[str, Any] = {
    "vision_config": {"hidden_size": 1408, "intermediate_size": 6144, "num_hidden_layers": 39,
                      "num_attention_heads": 16, "image_size": 224, "patch_size": 14, "qkv_bias": True,
                      "layer_norm_eps": 1e-5, "hidden_act": "gelu", "initializer_range": 1e-10},
    "qformer_config": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                       "num_attention_heads": 12, "encoder_hidden_size": 1408, "cross_attention_frequency": 2,
                       "vocab_size": 30522, "max_position_embeddings": 512, "hidden_act": "gelu",
                       "layer_norm_eps": 1e-12, "pad_token_id": 0},
    "text_config": {"model_type": "opt", "hidden_size": 2560, "ffn_dim": 10240, "num_hidden_layers": 32,
                    "num_attention_heads": 32, "vocab_size": 50272, "word_embed_proj_dim": 2560,
                    "max_position_embeddings": 2048, "activation_function": "relu", "do_layer_norm_before": True,
                    "bos_token_id": 2, "eos_token_id": 50118, "pad_token_id": 1, "prefix": "</s>"},
    "num_query_tokens": 32,
    "image_token_index": 50265,
}
OPT_VOCAB = 50265  # OPT's GPT-2 BPE ids; BLIP-2's processor adds <image> as id 50265


def default_cache_dir() -> Path:
    """``$FREESEG_BENCH_CACHE`` or ``~/.cache/freeseg-bench``."""
    env = os.environ.get("FREESEG_BENCH_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "freeseg-bench"


def _kl_vae(seed: int) -> dict[str, torch.Tensor]:
    """Random ComfyUI ``AutoencoderKL`` (the SD1.x KL VAE) state dict, fp32, LDM keys."""
    fx.import_comfy()
    from comfy.ldm.models.autoencoder import AutoencoderKL

    vae = AutoencoderKL(ddconfig=copy.deepcopy(KL_VAE_DDCONFIG), embed_dim=4)
    fx.reset_all_parameters(vae, seed)
    return vae.state_dict()


def build_sd15(path: Path, seed: int = SEED) -> None:
    """The SD1.5 single-file checkpoint (fp16, LDM layout) at ``path``."""
    sd: dict[str, torch.Tensor] = {}
    unet = fx._build_unet("SD15", SD15_REAL_UNET_CONFIG, seed)
    sd.update({"model.diffusion_model." + k: v.half() for k, v in unet.items()})
    del unet
    sd.update({"first_stage_model." + k: v.half() for k, v in _kl_vae(seed + 1).items()})
    sd.update({"cond_stage_model.transformer." + k: v for k, v in fx._build_clip_l(seed + 2).items()})
    info = {"kind": "sd15_realsize", "version": REALSIZE_VERSION, "seed": seed}
    fx._save_safetensors(fx._to_saveable(sd, torch.float16), path, {"freeseg_bench": json.dumps(info)})


def _build_unet_fp16(family: str, unet_config: dict[str, Any], seed: int) -> dict[str, torch.Tensor]:
    """Like ``synthetic.models._build_unet`` but built directly in float16 (an SDXL UNet in fp32
    would need 10.3 GB just to be initialised): the random state dict, fp16."""
    fx.import_comfy()
    import comfy.supported_models

    cfg = getattr(comfy.supported_models, family)(copy.deepcopy(unet_config))
    cfg.set_inference_dtype(torch.float16, None)
    unet = cfg.get_model({}).diffusion_model
    fx.reset_all_parameters(unet, seed)
    return unet.state_dict()


def _sdxl_text_encoders(seed: int) -> dict[str, torch.Tensor]:
    """Random full-size SDXL text encoders (ComfyUI's ``SDXLClipModel``: CLIP-L 123.1M +
    OpenCLIP bigG 694.7M) converted to the checkpoint layout by ComfyUI's own save conversion
    (``conditioner.embedders.0.transformer.*``, ``conditioner.embedders.1.model.*``), fp16."""
    fx.import_comfy()
    import comfy.sdxl_clip
    import comfy.supported_models

    clip = comfy.sdxl_clip.SDXLClipModel(device="cpu", dtype=torch.float16)
    scales = {n: 4.6052 for n, _ in clip.named_parameters() if n.endswith("logit_scale")}
    fx.reset_all_parameters(clip, seed, extra=scales)
    sd = dict(clip.state_dict())
    del clip
    cfg = comfy.supported_models.SDXL(copy.deepcopy(SDXL_REAL_UNET_CONFIG))
    return cfg.process_clip_state_dict_for_saving(sd)


def _save_sdxl(path: Path, unet: dict[str, torch.Tensor], vae: dict[str, torch.Tensor], seed: int,
               kind: str) -> None:
    sd = {"model.diffusion_model." + k: v for k, v in unet.items()}
    sd.update({"first_stage_model." + k: v.half() for k, v in vae.items()})
    sd.update(_sdxl_text_encoders(seed + 2))
    info = {"kind": kind, "version": REALSIZE_VERSION, "seed": seed}
    fx._save_safetensors(fx._to_saveable(sd, torch.float16), path, {"freeseg_bench": json.dumps(info)})


def build_sdxl(path: Path, seed: int = SEED + 30) -> None:
    """The SDXL base single-file checkpoint (fp16, SGM layout) at ``path``: real UNet, KL VAE,
    CLIP-L + OpenCLIP bigG. Peak memory of the build about 9 GB."""
    unet = _build_unet_fp16("SDXL", SDXL_REAL_UNET_CONFIG, seed)
    _save_sdxl(path, unet, _kl_vae(seed + 1), seed, "sdxl_realsize")


def build_sdxl_reduced(path: Path, seed: int = SEED + 40) -> None:
    """An SDXL-family checkpoint in the same layout with the test fixtures' reduced UNet
    (KOALA_700M-detected) and TAESD VAE (SDXL latent scale), full-size text encoders."""
    unet = _build_unet_fp16(fx.SDXL_EXPECTED_CLASS, fx.SDXL_UNET_CONFIG, seed)
    _save_sdxl(path, unet, fx._build_taesd(seed + 1, fx.SDXL_LATENT_SCALE), seed, "sdxl_reduced")


def _opt_tokenizer() -> Any:
    """Byte-level BPE tokenizer with OPT's id layout (``<s>`` 0, ``<pad>`` 1, ``</s>`` 2,
    ``<unk>`` 3, the 256 byte symbols, made-up lowercase words up to id 50264) plus BLIP-2's
    ``<image>`` = 50265, as ``GPT2TokenizerFast`` (OPT's tokenizer class; OPT's BOS is ``</s>``).
    No merges: text encodes byte by byte, every id decodes."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import GPT2TokenizerFast

    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for ch in sorted(ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    letters = "abcdefghijklmnopqrstuvwxyz"
    n = 0
    while len(vocab) < OPT_VOCAB:
        word, m = "", n
        while True:
            word, m = letters[m % 26] + word, m // 26
            if m == 0:
                break
        n += 1
        if "\u0120" + word not in vocab:
            vocab["\u0120" + word] = len(vocab)  # "\u0120": the byte-level symbol of a space
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="</s> $A", special_tokens=[("</s>", 2)])
    tok.add_special_tokens([AddedToken("<image>", normalized=False, special=True)])
    tokenizer = GPT2TokenizerFast(tokenizer_object=tok, bos_token="</s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>")
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    assert image_id == BLIP2_OPT_2_7B["image_token_index"] and len(tokenizer) == OPT_VOCAB + 1, (image_id,
                                                                                                 len(tokenizer))
    return tokenizer


def _fill_blip2(folder: Path, seed: int) -> None:
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, BlipImageProcessor

    tokenizer = _opt_tokenizer()
    config = Blip2Config(**copy.deepcopy(BLIP2_OPT_2_7B))
    with fx._seeded(seed):  # built directly in fp16: 7.5 GB instead of 15 GB
        model = Blip2ForConditionalGeneration._from_config(config, dtype=torch.float16).eval()
    processor = Blip2Processor(image_processor=BlipImageProcessor(size={"height": 224, "width": 224}),
                               tokenizer=tokenizer, num_query_tokens=BLIP2_OPT_2_7B["num_query_tokens"])
    model.save_pretrained(str(folder))
    processor.save_pretrained(str(folder))


def build_blip2(folder: Path, seed: int = SEED + 50) -> None:
    """The BLIP-2 OPT-2.7B-shaped captioner folder at ``folder`` (fp16)."""
    fx._build_folder_atomically(folder, lambda tmp: _fill_blip2(tmp, seed))


def _fill_open_clip(folder: Path, seed: int) -> None:
    import open_clip
    from safetensors.torch import save_file

    cfg = dict(open_clip.get_model_config("ViT-B-32"))
    cfg["quick_gelu"] = True
    with fx._seeded(seed):
        model = open_clip.create_model("ViT-B-32", force_quick_gelu=True)
    save_file(fx._to_saveable(model.state_dict(), torch.float16), str(folder / "open_clip_model.safetensors"))
    config = {"model_cfg": cfg, "preprocess_cfg": {"mean": fx.OPENAI_MEAN, "std": fx.OPENAI_STD,
                                                   "interpolation": "bicubic", "resize_mode": "shortest"}}
    (folder / "open_clip_config.json").write_text(json.dumps(config, indent=2) + "\n")


def build_open_clip(folder: Path, seed: int = SEED + 10) -> None:
    """The open_clip ViT-B-32 folder at ``folder``."""
    fx._build_folder_atomically(folder, lambda tmp: _fill_open_clip(tmp, seed))


def _blip_tokenizer() -> Any:
    """BERT-style WordPiece tokenizer with exactly BLIP_VOCAB ids (ids 104.. are made-up
    lowercase word pieces; ``BertTokenizerFast(vocab_file=)`` ignores the file in transformers
    5, so the tokenizer is built from the vocabulary dict)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import BertTokenizerFast

    vocab = {f"[unused{i}]": i for i in range(1, 100)}
    vocab.update({"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103})
    letters = "abcdefghijklmnopqrstuvwxyz"
    for i in range(104, 30522):
        n, word = i - 104, ""
        while True:
            word, n = letters[n % 26] + word, n // 26
            if n == 0:
                break
        vocab["w" + word] = i
    vocab["[DEC]"], vocab["[ENC]"] = 30522, 30523
    assert len(vocab) == BLIP_VOCAB and sorted(vocab.values()) == list(range(BLIP_VOCAB))
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                       special_tokens=[("[CLS]", 101), ("[SEP]", 102)])
    tokenizer = BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                  sep_token="[SEP]", mask_token="[MASK]", bos_token="[DEC]")
    assert len(tokenizer) == BLIP_VOCAB, len(tokenizer)
    return tokenizer


def _fill_blip(folder: Path, seed: int) -> None:
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    tokenizer = _blip_tokenizer()
    with fx._seeded(seed):
        model = BlipForConditionalGeneration(BlipConfig()).eval()
    processor = BlipProcessor(image_processor=BlipImageProcessor(), tokenizer=tokenizer)
    model.half().save_pretrained(str(folder))
    processor.save_pretrained(str(folder))


def build_blip(folder: Path, seed: int = SEED + 20) -> None:
    """The BLIP base captioner folder at ``folder``."""
    fx._build_folder_atomically(folder, lambda tmp: _fill_blip(tmp, seed))


# DiTs (issue 22) at their real widths, built directly in bf16 with synthetic/dit.py's builders.
# Flux.1-dev: the real double-stream block (3072 wide, 24 heads), the real text widths (T5-XXL
# tokens 4096, CLIP-L pooled 768), guidance embedding; FLUX_BENCH_DOUBLE double blocks instead
# of 19 and no single-stream block (the features pass stops after the double blocks it reads,
# so a single block never runs in it): 12B parameters do not fit this machine.
FLUX_BENCH_DOUBLE = 4
FLUX_BENCH_CONFIG: dict[str, Any] = {**dit.FLUX_DIT_CONFIG, "vec_in_dim": 768, "depth": FLUX_BENCH_DOUBLE,
                                     "depth_single_blocks": 0}
# SD3 medium exactly (ComfyUI reads the depth from the width, 64 per block, so the width fixes
# all 24 blocks): 1536 wide, 192 x 192 positional table, no q/k norm; 2.03B parameters.
SD3_MEDIUM_CONFIG: dict[str, Any] = {
    **dit.SD3_DIT_CONFIG, "depth": 24, "num_patches": 192 * 192, "pos_embed_max_size": 192,
    "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": 1536}},
}
del SD3_MEDIUM_CONFIG["qk_norm"]


def build_flux_bench(path: Path, seed: int = SEED + 50) -> None:
    """The Flux.1-dev diffusion model at real width, FLUX_BENCH_DOUBLE double blocks (bf16)."""
    sd = dit.random_dit(dit.FLUX_EXPECTED_CLASS, FLUX_BENCH_CONFIG, seed, dtype=torch.bfloat16)
    dit.check_detection(sd, "", FLUX_BENCH_CONFIG, dit.FLUX_EXPECTED_CLASS)
    fx._save_safetensors(sd, path, fx._metadata("flux_bench", seed))


def build_sd3_medium(path: Path, seed: int = SEED + 60) -> None:
    """The SD3 medium MMDiT as a diffusion-model file (bf16, no key prefix)."""
    sd = dit.random_dit(dit.SD3_EXPECTED_CLASS, SD3_MEDIUM_CONFIG, seed, dtype=torch.bfloat16)
    dit.check_detection(sd, "", SD3_MEDIUM_CONFIG, dit.SD3_EXPECTED_CLASS)
    fx._save_safetensors(sd, path, fx._metadata("sd3_medium", seed))


def build_kl16_vae(path: Path, seed: int = SEED + 70) -> None:
    """The 16-channel KL VAE of Flux and SD3 (ae.safetensors layout, fp32 -> bf16 on disk)."""
    fx._save_safetensors(fx._to_saveable(dit.random_kl16_vae(seed), torch.bfloat16), path,
                         fx._metadata("kl16_vae", seed))


MODELS: dict[str, tuple[str, Callable[[Path], None]]] = {
    "sd15": ("checkpoints/freeseg-bench-sd15.safetensors", build_sd15),
    "open_clip": ("open_clip/freeseg-bench-vit-b-32", build_open_clip),
    "blip": ("blip2/freeseg-bench-blip-base", build_blip),
    "sdxl": ("checkpoints/freeseg-bench-sdxl.safetensors", build_sdxl),
    "sdxl_reduced": ("checkpoints/freeseg-bench-sdxl-reduced.safetensors", build_sdxl_reduced),
    "blip2": ("blip2/freeseg-bench-blip2-opt-2.7b", build_blip2),
    "flux": ("diffusion_models/freeseg-bench-flux1-dev-4-double.safetensors", build_flux_bench),
    "sd3": ("diffusion_models/freeseg-bench-sd3-medium.safetensors", build_sd3_medium),
    "kl16_vae": ("vae/freeseg-bench-kl16-vae.safetensors", build_kl16_vae),
}
DEFAULT_KEYS = ("sd15", "open_clip", "blip")


def build(cache: Path, verbose: bool = True, keys: tuple[str, ...] = DEFAULT_KEYS) -> dict[str, str]:
    """Build every missing or outdated model of ``keys`` into ``cache``; return ``{key: absolute
    path}``. KeyError for an unknown key."""
    unknown = sorted(set(keys) - set(MODELS))
    if unknown:
        raise KeyError(f"unknown model(s) {unknown}; known: {sorted(MODELS)}")
    cache = cache.resolve()
    out: dict[str, str] = {}
    with fixture_cache._cache_lock(cache):
        for key in keys:
            rel, builder = MODELS[key]
            target, stamp = cache / rel, cache / "stamps" / f"{key}.json"
            want = {"key": key, "version": REALSIZE_VERSION, "path": rel}
            fresh = target.exists() and stamp.is_file() and json.loads(stamp.read_text() or "{}") == want
            if not fresh:
                t0 = time.perf_counter()
                builder(target)
                stamp.parent.mkdir(parents=True, exist_ok=True)
                stamp.write_text(json.dumps(want) + "\n")
                if verbose:
                    print(f"built {key} in {time.perf_counter() - t0:.1f} s -> {target}", flush=True)
            out[key] = str(target)
    return out


def main(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser(description="build the real-size bench models")
    p.add_argument("cache", nargs="?", default=None, help="cache folder (default $FREESEG_BENCH_CACHE or "
                   "~/.cache/freeseg-bench)")
    p.add_argument("--only", default=",".join(DEFAULT_KEYS), help=f"comma-separated keys of {sorted(MODELS)}")
    args = p.parse_args(argv)
    keys = tuple(k.strip() for k in args.only.split(",") if k.strip())
    root = Path(args.cache) if args.cache else default_cache_dir()
    print("MODELS=" + json.dumps(build(root, keys=keys)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
