"""Random-weight models at the REAL architectures and on-disk formats, for bench_pipeline.py.

Same recipe as the test fixtures (``tests/helpers/model_fixtures.py``: ComfyUI's own model
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

Everything is cached under ``$FREESEG_BENCH_CACHE`` (default ``~/.cache/freeseg-bench``) with a
version stamp; nothing of it goes into git. Build time on 2 CPU cores: about 45 s, 2.7 GiB.

Usage: ``python bench/realsize_models.py [CACHE_DIR]`` (prints ``MODELS={json}``). The builder
imports ComfyUI, so bench_pipeline.py runs it in a subprocess.
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "helpers"))
import model_fixtures as fx  # noqa: E402  (shared build helpers of the test fixtures)

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


MODELS: dict[str, tuple[str, Callable[[Path], None]]] = {
    "sd15": ("checkpoints/freeseg-bench-sd15.safetensors", build_sd15),
    "open_clip": ("open_clip/freeseg-bench-vit-b-32", build_open_clip),
    "blip": ("blip2/freeseg-bench-blip-base", build_blip),
}


def build(cache: Path, verbose: bool = True) -> dict[str, str]:
    """Build every missing or outdated model into ``cache``; return ``{key: absolute path}``."""
    cache = cache.resolve()
    out: dict[str, str] = {}
    with fx._cache_lock(cache):
        for key, (rel, builder) in MODELS.items():
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


if __name__ == "__main__":
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else default_cache_dir()
    print("MODELS=" + json.dumps(build(root)), flush=True)
