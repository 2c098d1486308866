"""freeseg.caption and freeseg.clip_label on the tiny random-weight fixtures (CPU)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from freeseg.caption import (PAPER_MAX_NEW_TOKENS, PAPER_MIN_NEW_TOKENS, PAPER_PREFIX_TOKENS, PAPER_PROMPT,
                             captioner_type, check_caption_options, decoder_prefix, generate_captions,
                             load_captioner)
from freeseg.settings import PAPER
from freeseg.stages import caption_images
from freeseg.clip_label import (ENSEMBLE_TEMPLATES, encode_names, load_open_clip, mask_views, preprocess_views,
                                score_masks, split_arch_tag)
from synthetic import cache
from synthetic import models as fx


@pytest.fixture(scope="session")
def fixture_paths() -> dict[str, str]:
    """All fixtures, built once into the shared cache (in a subprocess: no ComfyUI import here)."""
    return cache.build_all_subprocess()


@pytest.fixture(scope="module")
def blip2(fixture_paths: dict[str, str]) -> tuple:
    return load_captioner(fixture_paths["blip2_dir"])


@pytest.fixture(scope="module")
def blip(fixture_paths: dict[str, str]) -> tuple:
    return load_captioner(fixture_paths["blip_dir"])


@pytest.fixture
def blip_ends_early(fixture_paths: dict[str, str]) -> tuple:
    """The BLIP fixture with its end token ([SEP]) made far likelier than any other token, so a
    caption ends right away unless a minimum length holds the end back; generate() records its
    output sequences in ``model.outputs``."""
    model, processor = load_captioner(fixture_paths["blip_dir"])
    with torch.no_grad():
        model.text_decoder.cls.predictions.bias[model.config.text_config.sep_token_id] += 1000.0
    model.outputs = []
    generate = model.generate

    def recording_generate(**kwargs):
        out = generate(**kwargs)
        model.outputs.append(out)
        return out

    model.generate = recording_generate
    return model, processor


@pytest.fixture(scope="module")
def clip(fixture_paths: dict[str, str]) -> tuple:
    return load_open_clip(fixture_paths["open_clip_dir"])


def _images(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """[B,H,W,3] float 0..1 random images."""
    return torch.rand(b, h, w, 3, generator=torch.Generator().manual_seed(seed))


def _two_masks() -> tuple[torch.Tensor, torch.Tensor]:
    """A 4x5 image with pixel values 1..60 and two masks: a 2x2 block and an L shape."""
    image = torch.arange(1, 61, dtype=torch.float32).view(4, 5, 3) / 60.0
    masks = torch.zeros(2, 4, 5, dtype=torch.bool)
    masks[0, 1:3, 1:3] = True
    masks[1, 0, 4] = True
    masks[1, 3, 2:5] = True
    return image, masks


# --------------------------------------------------------------------------- captioning


def test_blip2_captions_odd_sized_batch(blip2: tuple) -> None:
    model, processor = blip2
    assert type(model).__name__ == "Blip2ForConditionalGeneration"
    captions = generate_captions(model, processor, _images(2, 37, 53), max_new_tokens=8)
    assert isinstance(captions, list) and len(captions) == 2
    assert all(isinstance(c, str) and c == c.strip() for c in captions)


def test_blip2_caption_with_prompt_drops_prompt(blip2: tuple) -> None:
    model, processor = blip2
    captions = generate_captions(model, processor, _images(1, 40, 30), prompt="a photo of", max_new_tokens=6)
    assert len(captions) == 1 and not captions[0].startswith("a photo of")


def test_load_captioner_dtype(fixture_paths: dict[str, str]) -> None:
    model, _ = load_captioner(fixture_paths["blip2_dir"], dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16 and not model.training


def test_blip1_captioner_has_the_real_layout(blip: tuple, fixture_paths: dict[str, str]) -> None:
    model, processor = blip
    assert captioner_type(fixture_paths["blip_dir"]) == "blip"
    assert type(model).__name__ == "BlipForConditionalGeneration"
    vision = model.config.vision_config
    assert (vision.image_size, vision.patch_size) == (384, 16)  # ViT-B/16 at 384 px, as BLIP base COCO
    ip = processor.image_processor
    assert ip.size == {"height": 384, "width": 384} and ip.image_mean == pytest.approx(fx.OPENAI_MEAN)
    tokens = processor.tokenizer.convert_ids_to_tokens(processor.tokenizer(PAPER_PROMPT).input_ids)
    assert tokens == ["[CLS]", "a", "picture", "of", "[SEP]"]
    assert model.config.text_config.bos_token_id == processor.tokenizer.convert_tokens_to_ids("[DEC]")
    captions = generate_captions(model, processor, _images(2, 21, 33), max_new_tokens=5, num_beams=1)
    assert len(captions) == 2 and all(isinstance(c, str) for c in captions)


def test_paper_caption_settings() -> None:
    """The paper preset: LAVIS base_coco's "a picture of ", 3 beams, max_length 30, min_length 10,
    the lengths counting [DEC] and the prompt's 3 word pieces."""
    assert PAPER.caption_prompt == PAPER_PROMPT == "a picture of "
    assert PAPER.num_beams == 3
    assert PAPER_PREFIX_TOKENS == 1 + 3
    assert (PAPER.max_new_tokens, PAPER.min_new_tokens) == (PAPER_MAX_NEW_TOKENS, PAPER_MIN_NEW_TOKENS) == (26, 6)


def test_blip_decoder_prefix_is_dec_plus_prompt(blip: tuple) -> None:
    model, processor = blip
    ids = processor(images=[_images(1, 8, 8)[0].mul(255).byte().numpy()], text=[PAPER_PROMPT],
                    return_tensors="pt")["input_ids"]
    prefix = decoder_prefix(model, ids)
    assert prefix.shape[1] == PAPER_PREFIX_TOKENS
    assert processor.tokenizer.convert_ids_to_tokens(prefix[0]) == ["[DEC]", "a", "picture", "of"]
    assert decoder_prefix(model, None) is None


def test_blip_min_new_tokens_honoured_and_prompt_stripped(blip_ends_early: tuple) -> None:
    model, processor = blip_ends_early
    images = _images(2, 30, 40)
    # Without a minimum the end token comes first: nothing but the prompt, which is removed.
    assert generate_captions(model, processor, images, prompt=PAPER_PROMPT, max_new_tokens=26,
                             min_new_tokens=0) == ["", ""]
    assert model.outputs[-1].shape[1] == PAPER_PREFIX_TOKENS + 1
    captions = generate_captions(model, processor, images, prompt=PAPER_PROMPT, max_new_tokens=26,
                                 min_new_tokens=6)
    out = model.outputs[-1]
    # 6 tokens held the end token back, then it came: [DEC] a picture of + 6 + [SEP].
    assert out.shape[1] == PAPER_PREFIX_TOKENS + 6 + 1
    sep = model.config.text_config.sep_token_id
    assert (out[:, PAPER_PREFIX_TOKENS:-1] != sep).all() and (out[:, -1] == sep).all()
    expected = [t.strip() for t in processor.batch_decode(out[:, PAPER_PREFIX_TOKENS:], skip_special_tokens=True)]
    assert captions == expected
    # The same through the stage the nodes call (the paper's defaults: min 6 new tokens).
    stage_captions, _ = caption_images(images, model, processor)
    assert model.outputs[-1].shape[1] == PAPER_PREFIX_TOKENS + PAPER.min_new_tokens + 1
    assert stage_captions == expected


def test_new_token_lengths_equal_lavis_lengths(blip_ends_early: tuple, blip: tuple) -> None:
    """transformers' BLIP counts [DEC] and the prompt in max_length / min_length, as LAVIS does:
    max_length 30 / min_length 10 decode exactly as max_new_tokens 26 / min_new_tokens 6."""
    for model, processor in (blip_ends_early, blip):
        batch = processor(images=[_images(1, 30, 40)[0].mul(255).byte().numpy()], text=[PAPER_PROMPT],
                          return_tensors="pt")
        lavis = model.generate(**batch, max_length=30, min_length=10, num_beams=3)
        ours = model.generate(**batch, max_new_tokens=PAPER_MAX_NEW_TOKENS, min_new_tokens=PAPER_MIN_NEW_TOKENS,
                              num_beams=3)
        assert torch.equal(lavis, ours)
        assert lavis.shape[1] <= 30


def test_caption_options_are_checked() -> None:
    check_caption_options("a picture of ", 26, 6, 3)
    check_caption_options(None, 1, 0, 1)
    for args, match in (((None, 0, 0, 1), "max_new_tokens"), (("", 10, 11, 1), "min_new_tokens"),
                        (("", 10, -1, 1), "min_new_tokens"), (("two\nlines", 10, 0, 1), "prompt"),
                        (("x" * 201, 10, 0, 1), "prompt"), ((3, 10, 0, 1), "prompt"),
                        (("", 10, 0, 0), "num_beams"), (("", True, 0, 1), "max_new_tokens")):
        with pytest.raises(ValueError, match=match):
            check_caption_options(*args)
    with pytest.raises(ValueError, match="min_new_tokens"):
        PAPER.replace(min_new_tokens=30)


def test_captioner_errors_name_the_folder(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        load_captioner(str(missing))
    not_model = tmp_path / "pictures"
    not_model.mkdir()
    (not_model / "cat.png").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"pictures.*config\.json"):
        load_captioner(str(not_model))
    other = tmp_path / "bert"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match=r"bert.*'bert'"):
        load_captioner(str(other))
    no_weights = tmp_path / "empty_blip"
    no_weights.mkdir()
    (no_weights / "config.json").write_text(json.dumps({"model_type": "blip-2"}))
    with pytest.raises(ValueError, match="empty_blip.*no weights"):
        load_captioner(str(no_weights))


def test_generate_captions_rejects_bad_shape(blip2: tuple) -> None:
    with pytest.raises(ValueError, match=r"\[B,H,W,3\]"):
        generate_captions(*blip2, torch.rand(3, 8, 8))


# --------------------------------------------------------------------------- open_clip loading


def test_load_open_clip_folder(clip: tuple) -> None:
    model, cfg, tokenizer = clip
    assert not model.training
    assert cfg["size"] == (64, 64)
    assert cfg["mean"] == pytest.approx(fx.OPENAI_MEAN) and cfg["std"] == pytest.approx(fx.OPENAI_STD)
    assert cfg["resize_mode"] == "shortest" and cfg["interpolation"] == "bicubic"
    assert tokenizer(["a cat", "dog"]).shape == (2, 77)


def test_load_open_clip_weights_match_file(fixture_paths: dict[str, str], clip: tuple) -> None:
    from safetensors.torch import load_file

    saved = load_file(str(Path(fixture_paths["open_clip_dir"]) / "open_clip_model.safetensors"))
    state = clip[0].state_dict()
    assert all(torch.equal(state[k], v) for k, v in saved.items())


def test_load_open_clip_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_open_clip(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=r"just_a_dir.*open_clip_config\.json"):
        (tmp_path / "just_a_dir").mkdir()
        load_open_clip(str(tmp_path / "just_a_dir"))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="notes.txt"):
        load_open_clip(str(tmp_path / "notes.txt"))
    (tmp_path / "mystery-net.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="mystery-net"):
        load_open_clip(str(tmp_path / "mystery-net.safetensors"))


def test_split_arch_tag() -> None:
    assert split_arch_tag("ViT-B-32") == ("ViT-B-32", None)
    assert split_arch_tag("ViT-B-32-openai") == ("ViT-B-32", "openai")
    assert split_arch_tag("ViT-B-32-quickgelu") == ("ViT-B-32-quickgelu", None)
    assert split_arch_tag("ViT-B-16_laion2b_s34b_b88k") == ("ViT-B-16", "laion2b_s34b_b88k")
    assert split_arch_tag("ViT-B-32-mine") == ("ViT-B-32", None)


# --------------------------------------------------------------------------- mask views


def test_mask_views_masked_exact() -> None:
    image, masks = _two_masks()
    views = mask_views(image, masks, "masked")
    assert len(views) == 2
    for view, mask in zip(views, masks):
        assert view.shape == image.shape
        assert torch.equal(view[mask], image[mask])
        assert torch.equal(view[~mask], torch.zeros_like(image[~mask]))


def test_mask_views_bbox_exact() -> None:
    image, masks = _two_masks()
    first, second = mask_views(image, masks, "bbox")
    assert torch.equal(first, image[1:3, 1:3])
    assert second.shape == (4, 3, 3)  # rows 0..3, cols 2..4
    expected = torch.zeros(4, 3, 3)
    expected[0, 2] = image[0, 4]
    expected[3, :] = image[3, 2:5]
    assert torch.equal(second, expected)


def test_mask_views_empty_and_float_masks() -> None:
    image, masks = _two_masks()
    soft = masks.float() * 0.9
    soft[0, 0, 0] = 0.3  # below 0.5: outside
    empty = torch.zeros(1, 4, 5)
    for mode in ("masked", "bbox"):
        assert torch.equal(mask_views(image, empty, mode)[0], torch.zeros_like(image))
        assert torch.equal(mask_views(image, soft, mode)[0], mask_views(image, masks, mode)[0])
    with pytest.raises(ValueError):
        mask_views(image, masks, "crop")
    with pytest.raises(ValueError):
        mask_views(image, masks[:, :3], "masked")


# --------------------------------------------------------------------------- text and scores


def test_encode_names(clip: tuple) -> None:
    model, _, tokenizer = clip
    names = ["cat", "dog", "sofa"]
    bare = encode_names(model, tokenizer, names)
    assert bare.shape == (3, 32) and bare.dtype == torch.float32
    assert torch.allclose(bare.norm(dim=-1), torch.ones(3), atol=1e-5)
    ens = encode_names(model, tokenizer, names, prompt="ensemble")
    assert ens.shape == (3, 32)
    assert torch.allclose(ens.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert not torch.allclose(ens, bare)
    with torch.no_grad():
        one = torch.nn.functional.normalize(model.encode_text(tokenizer([ENSEMBLE_TEMPLATES[0].format("cat")])), dim=-1)
    assert (one[0] @ ens[0]).item() > 0.5
    with pytest.raises(ValueError):
        encode_names(model, tokenizer, names, prompt="fancy")
    with pytest.raises(ValueError):
        encode_names(model, tokenizer, [])


def test_encode_names_encodes_each_text_once_per_model(clip: tuple, monkeypatch: pytest.MonkeyPatch) -> None:
    """The second image's names reuse the first's embeddings: only new texts reach the encoder,
    and the cached rows equal a fresh encode."""
    model, _, tokenizer = clip
    batches = []
    real = model.encode_text
    monkeypatch.setattr(model, "encode_text", lambda tokens, *a, **k: batches.append(len(tokens)) or real(tokens))
    first = encode_names(model, tokenizer, ["zebra one", "zebra two"])
    both = encode_names(model, tokenizer, ["zebra two", "zebra three", "zebra one", "zebra three"])
    assert batches == [2, 1]  # only "zebra three" was new, once although asked twice
    assert torch.equal(both[2], first[0]) and torch.equal(both[0], first[1]) and torch.equal(both[1], both[3])
    with torch.no_grad():
        fresh = torch.nn.functional.normalize(real(tokenizer(["zebra three"])).float(), dim=-1)
    assert torch.allclose(both[1], fresh[0], atol=1e-6)
    encode_names(model, tokenizer, ["zebra one"], prompt="ensemble")  # template texts are new texts
    assert batches[-1] == len(ENSEMBLE_TEMPLATES)


def test_score_masks_one_batch(clip: tuple, monkeypatch: pytest.MonkeyPatch) -> None:
    model, cfg, tokenizer = clip
    calls: list[tuple[int, ...]] = []
    original = model.encode_image

    def counting(pixels: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        calls.append(tuple(pixels.shape))
        return original(pixels, *args, **kwargs)

    monkeypatch.setattr(model, "encode_image", counting)
    image = _images(1, 45, 70)[0]
    masks = torch.zeros(3, 45, 70, dtype=torch.bool)
    masks[0, :20] = True
    masks[1, 20:, :30] = True
    masks[2, 30:, 40:] = True
    text = encode_names(model, tokenizer, ["cat", "dog", "sofa", "tree"])
    for mode in ("masked", "bbox"):
        calls.clear()
        scores = score_masks(model, cfg, image, masks, text, crop_mode=mode)
        assert scores.shape == (3, 4) and scores.dtype == torch.float32
        assert torch.allclose(scores.sum(dim=-1), torch.ones(3), atol=1e-5)
        assert calls == [(3, 3, 64, 64)]
    assert score_masks(model, cfg, image, masks[:0], text).shape == (0, 4)


def test_score_masks_matches_manual_computation(clip: tuple) -> None:
    model, cfg, tokenizer = clip
    image, masks = _images(1, 32, 48)[0], torch.zeros(2, 32, 48, dtype=torch.bool)
    masks[0, :, :24] = True
    masks[1, :, 24:] = True
    text = encode_names(model, tokenizer, ["cat", "dog"])
    scores = score_masks(model, cfg, image, masks, text)
    with torch.no_grad():
        pixels = preprocess_views(mask_views(image, masks), cfg)
        feats = torch.nn.functional.normalize(model.encode_image(pixels), dim=-1)
        expected = (model.logit_scale.exp() * feats @ text.T).softmax(dim=-1)
    assert torch.allclose(scores, expected, atol=1e-5)


def test_preprocess_close_to_open_clip_transform(clip: tuple) -> None:
    """Torch preprocessing ~ open_clip's PIL eval transform (resize short side, centre crop, normalise)."""
    import numpy as np
    import open_clip
    from PIL import Image

    model, cfg, _ = clip
    transform = open_clip.image_transform(cfg["size"], is_train=False, mean=cfg["mean"], std=cfg["std"])
    for h, w in ((90, 150), (151, 77), (30, 20)):
        image = (_images(1, h, w, seed=h)[0] * 255).round() / 255  # exactly representable as uint8
        ours = preprocess_views([image], cfg)[0]
        theirs = transform(Image.fromarray((image.numpy() * 255).round().astype(np.uint8)))
        assert ours.shape == theirs.shape == (3, 64, 64)
        assert (ours - theirs).abs().mean().item() < 0.01, (h, w)


def test_load_open_clip_wrong_weights_names_path(tmp_path: Path, fixture_paths: dict[str, str]) -> None:
    """A file named after a builtin architecture but holding other weights -> ValueError naming it."""
    import shutil

    wrong = tmp_path / "ViT-S-32-alt.safetensors"
    shutil.copy(Path(fixture_paths["open_clip_dir"]) / "open_clip_model.safetensors", wrong)
    with pytest.raises(ValueError, match=r"ViT-S-32-alt\.safetensors"):
        load_open_clip(str(wrong))


def test_load_open_clip_single_file(tmp_path: Path) -> None:
    """A plain state dict named after a builtin architecture loads with that architecture."""
    import open_clip
    from safetensors.torch import save_file

    with torch.random.fork_rng():
        torch.manual_seed(0)
        reference = open_clip.create_model("ViT-S-32-alt")
    path = tmp_path / "ViT-S-32-alt.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    model, cfg, tokenizer = load_open_clip(str(path))
    assert cfg["size"] == (224, 224)
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in reference.state_dict().items())
    assert tokenizer(["a cat"]).shape[0] == 1
