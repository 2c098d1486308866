"""The diffusers backend (`freeseg.backends.diffusers`) against the ComfyUI node, on the random fixtures (CPU).

* Parity: the random SD1.5 fixture checkpoint is loaded both ways: ComfyUI in a subprocess
  (`tests/helpers/comfy_unet_features.py` runs the node's own `extract` on a given latent)
  and diffusers in-process (`UNet2DConditionModel.from_single_file` with a config matching
  the reduced fixture UNet). Both get the SAME latent (the VAE is skipped: the fixture's TAESD
  is ComfyUI-specific) and the same seed; the empty-prompt embeddings, the raw per-layer query
  (and decoder) outputs and the aggregated float16 features must agree (cosine >= 0.999).
  Runs at 256 px (latent 32, feature layers at 8x8) to stay fast; the selection rule is the
  same as at 512 px.
* End to end: `FreeSegPipeline.segment` / `segment_to_folder` / the evaluate `Segmenter`
  interface with the fixture checkpoint, a small random diffusers AutoencoderKL (`vae=`), the
  tiny BLIP-2 and the tiny open_clip.
* Loading a diffusers model folder (model_index.json) with a tokenizer gives the same
  empty-prompt ids and the same features as the single file.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from synthetic import cache
from synthetic import models as fx
from freeseg.features import SOURCE_DECODER, SOURCE_QUERIES, DiffusionFeatures
from freeseg.nouns import extract_nouns
from freeseg.app.output import segment_to_folder
from freeseg.app.paths import REPO
from freeseg.backends.diffusers import DEFAULT_SD_CONFIG, FreeSegPipeline, FreeSegResult, load_sd
from freeseg.capture import captured_to_features, select_blocks
from freeseg.settings import PAPER
from freeseg.stages import paper_candidates

pytestmark = pytest.mark.skipif(
    not (fx.comfy_dir() / "comfy" / "sd.py").is_file(), reason="ComfyUI source tree not available"
)

HELPER = Path(REPO) / "tests" / "helpers" / "comfy_unet_features.py"
RESOLUTION = 256
SEED = 3
COS_MIN = 0.999



@pytest.fixture(scope="module")
def fixture_paths() -> dict[str, str]:
    """All fixtures, built once into the shared cache (in a subprocess: no ComfyUI import here)."""
    return cache.build_all_subprocess()


@pytest.fixture(scope="module")
def sd_config(fixture_paths: dict[str, str]) -> Path:
    """A config folder with only unet/config.json (the rest falls back to the shipped SD1.5)."""
    return Path(fixture_paths["sd15_diffusers_config"])


@pytest.fixture(scope="module")
def vae_dir(fixture_paths: dict[str, str]) -> Path:
    """A small random diffusers AutoencoderKL (downscale 8, 4 latent channels) folder."""
    return Path(fixture_paths["sd15_diffusers_vae"])


@pytest.fixture(scope="module")
def pipe(fixture_paths: dict[str, str], sd_config: Path, vae_dir: Path) -> FreeSegPipeline:
    return FreeSegPipeline.from_pretrained(
        sd=fixture_paths["sd15_ckpt"], clip=fixture_paths["open_clip_dir"], blip2=fixture_paths["blip2_dir"],
        sd_config=sd_config, vae=vae_dir, device="cpu", dtype=torch.float32, resolution=RESOLUTION)


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0))


# --------------------------------------------------------------------------- parity


def test_diffusers_features_match_comfyui(fixture_paths: dict[str, str], sd_config: Path,
                                          tmp_path: Path) -> None:
    latent = torch.randn(1, 4, RESOLUTION // 8, RESOLUTION // 8, generator=torch.Generator().manual_seed(7))
    job, out = tmp_path / "job.pt", tmp_path / "comfy.pt"
    torch.save({"ckpt": fixture_paths["sd15_ckpt"], "latent": latent, "image_size": (48, 40),
                "resolution": RESOLUTION, "timestep": 0, "seed": SEED,
                "sources": [SOURCE_QUERIES, SOURCE_DECODER]}, job)
    # ComfyUI runs in its own interpreter while diffusers loads here.
    proc = subprocess.Popen([sys.executable, str(HELPER), str(job), str(out)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        sd = load_sd(fixture_paths["sd15_ckpt"], sd_config=sd_config, vae=False)
        diff = FreeSegPipeline(sd)
        x0 = latent * 0.18215  # SD1 latent_format.process_in
        captured = {src: diff.unet_pass(x0, seed=SEED, timestep=0, source=src)
                    for src in (SOURCE_QUERIES, SOURCE_DECODER)}
        cond = diff.empty_prompt_embedding()
        log, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, log[-3000:]
    comfy = torch.load(out, weights_only=True)

    assert comfy["family"] == "SD15" and sd.family == "SD15"
    assert comfy["unet_dtype"] == "torch.float32"
    assert torch.equal(comfy["x0"], x0)
    assert cond.shape == comfy["cond"].shape == (1, 77, 768)
    cond_cos = _cos(cond, comfy["cond"])
    report = [f"empty-prompt embedding: cos {cond_cos:.7f} max|diff| {(cond - comfy['cond']).abs().max():.2e}"]
    assert cond_cos >= COS_MIN

    grid = (RESOLUTION // 16, RESOLUTION // 16)
    latent_hw = (RESOLUTION // 8, RESOLUTION // 8)
    for src in (SOURCE_QUERIES, SOURCE_DECODER):
        names = select_blocks(captured[src], latent_hw, src)
        theirs = comfy[src]
        assert len(names) == len(theirs["blocks"]) == 3, (names, theirs["blocks"])
        for ours, their in zip(names, theirs["blocks"]):
            a, b = captured[src][ours], theirs["raw"][their]
            assert a.shape == b.shape, (ours, their)
            cos = _cos(a, b)
            report.append(f"{src}: {ours} vs {their}: cos {cos:.7f} max|diff| {(a.float() - b).abs().max():.2e}")
            assert cos >= COS_MIN, report[-1]
        feats, used = captured_to_features(captured[src], latent_hw, grid, src)
        assert used == names
        feats = feats.to(torch.float16)
        assert feats.shape == theirs["features"].shape == (1, 960, *grid)
        cos = _cos(feats, theirs["features"])
        report.append(f"{src}: aggregated float16 features: cos {cos:.7f}")
        assert cos >= COS_MIN
    print("\n".join(report))


def test_query_layers_are_the_first_transformer_blocks_of_down_and_up(pipe: FreeSegPipeline) -> None:
    layers = pipe._layers(SOURCE_QUERIES)
    assert [n for n, _, _ in layers] == \
        [f"down_blocks.{i}.attentions.0.transformer_blocks.0.attn2.to_q" for i in range(3)] + \
        [f"up_blocks.{i}.attentions.{j}.transformer_blocks.0.attn2.to_q" for i in range(3) for j in range(2)]
    assert [f for _, _, f in layers] == [1, 2, 4, 4, 4, 2, 2, 1, 1]


@pytest.mark.parametrize("source", [SOURCE_QUERIES, SOURCE_DECODER])
def test_unet_pass_stops_after_the_last_used_layer(pipe: FreeSegPipeline, source: str) -> None:
    """The early stop skips the finer decoder layers and changes none of the used ones."""
    x0 = torch.randn(1, 4, RESOLUTION // 8, RESOLUTION // 8, generator=torch.Generator().manual_seed(5))
    calls = []
    handle = pipe.sd.unet.conv_out.register_forward_hook(lambda *_: calls.append(1))
    try:
        stopped = pipe.unet_pass(x0, seed=SEED, source=source)
        full = pipe.unet_pass(x0, seed=SEED, source=source, stop_early=False)
    finally:
        handle.remove()
    assert len(calls) == 1  # only the whole pass reached the output convolution
    assert list(stopped) == list(full)[:len(stopped)] and len(stopped) < len(full)
    latent_hw = (RESOLUTION // 8, RESOLUTION // 8)
    used = select_blocks(full, latent_hw, source)
    assert select_blocks(stopped, latent_hw, source) == used and used[-1] == list(stopped)[-1]
    for name in stopped:
        assert torch.equal(stopped[name], full[name]), name


# --------------------------------------------------------------------------- end to end


def _image(h: int = 40, w: int = 56) -> np.ndarray:
    """[H,W,3] uint8: two colour halves plus noise."""
    rng = np.random.default_rng(0)
    img = np.zeros((h, w, 3), dtype=np.float32)
    img[:, : w // 2] = (0.9, 0.2, 0.1)
    img[:, w // 2:] = (0.1, 0.3, 0.9)
    img += rng.normal(0, 0.05, img.shape)
    return (img.clip(0, 1) * 255).round().astype(np.uint8)


def test_segment_end_to_end(pipe: FreeSegPipeline) -> None:
    names = ["cat", "dog", "tree"]
    result = pipe.segment(_image(), class_names=names)
    assert isinstance(result, FreeSegResult)
    k = PAPER.n_clusters
    assert result.masks.shape == (k, 40, 56) and result.masks.dtype == torch.float32
    assert result.image_size == (40, 56)
    assert len(result.labels) == len(result.scores) == k
    # caption nouns first, then the given names
    assert result.class_names == extract_nouns(result.caption) + \
        [n for n in names if n not in extract_nouns(result.caption)]
    # the open rule (default): a name, or background where a background word wins
    assert result.settings.rule == "open"
    assert all(label is None or label in result.class_names for label in result.labels)
    assert all(0.0 < result.scores[i] <= 1.0 for i in result.named())
    # CRF output: one-hot per pixel, or void
    assert set(torch.unique(result.masks).tolist()) <= {0.0, 1.0}
    assert float(result.masks.sum(0).max()) <= 1.0
    assert len(result.blocks) == 3 and all(b.endswith("attn2.to_q") for b in result.blocks)
    assert result.settings.resolution == RESOLUTION and result.settings.refine == "crf_guard"
    assert set(result.timings) == {"caption", "features", "cluster", "label", "refine", "total"}
    # the same call again gives the same masks (seeded noise and k-means)
    again = pipe.segment(_image(), class_names=names)
    assert torch.equal(again.masks, result.masks) and again.labels == result.labels


def test_segment_paper_preset(pipe: FreeSegPipeline) -> None:
    """The paper protocol: the full class list, candidates from the caption's words through the
    checkpoint's text encoder, CLIP over all classes; only candidates can name a mask."""
    classes = ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
               "train", "tvmonitor"]
    result = pipe.segment(_image(), class_names=classes, rule="paper")
    assert result.settings.rule == "paper" and result.class_names == classes
    emb = pipe.text_embeddings(["dog", "A photo of cat"])
    assert emb.shape == (2, 77, 768) and emb.dtype == torch.float32
    (candidates,) = paper_candidates([result.caption], classes, pipe.text_embeddings)
    assert all(label is None or label in candidates for label in result.labels)
    bare = FreeSegPipeline(pipe.sd, pipe.clip, None, PAPER.replace(resolution=RESOLUTION))
    # no captioner: no candidates, every mask background
    assert bare.segment(_image(), classes).labels == [None] * PAPER.n_clusters
    with pytest.raises(ValueError, match="class list"):
        pipe.segment(_image(), None, rule="paper")
    with pytest.raises(ValueError, match="paper protocol"):
        bare(_image().astype(np.float32) / 255.0, classes)


def test_segment_without_captioner_uses_only_given_names(pipe: FreeSegPipeline) -> None:
    bare = FreeSegPipeline(pipe.sd, pipe.clip, None, pipe.settings)
    result = bare.segment(torch.from_numpy(_image(32, 48)).float() / 255, "dog, grass", n_clusters=3,
                          refine="none")
    assert result.caption == "" and result.class_names == ["dog", "grass"]
    assert result.masks.shape == (3, 32, 48)
    assert {label for label in result.labels if label is not None} <= {"dog", "grass"}
    # the masks partition the image (no refinement)
    assert torch.equal(result.masks.sum(0), torch.ones(32, 48))


def test_paper_preset_captions_with_blip_and_its_prompt(pipe: FreeSegPipeline, fixture_paths: dict[str, str],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The diffusers backend's paper preset decodes the BLIP captioner as the paper: prompt
    "a picture of ", 3 beams, 6..26 new tokens (LAVIS min_length 10 / max_length 30)."""
    from freeseg.caption import load_captioner

    model, processor = load_captioner(fixture_paths["blip_dir"])
    calls = []
    generate = model.generate
    # (a copy of the inputs: BLIP's generate writes its start token into input_ids in place)
    monkeypatch.setattr(model, "generate", lambda **kw: calls.append(
        {k: v.clone() if torch.is_tensor(v) else v for k, v in kw.items()}) or generate(**kw))
    blip = FreeSegPipeline(pipe.sd, pipe.clip, (model, processor), PAPER)
    captions, _ = blip.caption(torch.from_numpy(_image(32, 48)).float()[None] / 255)
    (kw,) = calls
    assert (kw["num_beams"], kw["max_new_tokens"], kw["min_new_tokens"]) == (3, 26, 6)
    assert processor.tokenizer.convert_ids_to_tokens(kw["input_ids"][0]) == ["[CLS]", "a", "picture", "of", "[SEP]"]
    assert len(captions) == 1 and captions[0] and not captions[0].startswith("a picture of")


def test_segmenter_interface_and_cache_key(pipe: FreeSegPipeline) -> None:
    from freeseg.eval.sources import Segmenter

    assert isinstance(pipe, Segmenter)
    image = _image().astype(np.float32) / 255.0
    masks, labels = pipe(image, ["person", "car"])
    assert tuple(masks.shape) == (PAPER.n_clusters, 40, 56) and len(labels) == PAPER.n_clusters
    key = pipe.cache_key
    assert key.startswith("freeseg-diffusers-") and key == pipe.cache_key
    other = FreeSegPipeline(pipe.sd, pipe.clip, pipe.captioner, pipe.settings.replace(n_clusters=3),
                            pipe.description)
    assert other.cache_key != key
    bare = FreeSegPipeline(pipe.sd, pipe.clip, None, pipe.settings)
    with pytest.raises(ValueError, match="captioner"):
        bare(image, None)


def test_segment_to_folder(pipe: FreeSegPipeline, tmp_path: Path) -> None:
    image_path = tmp_path / "in.png"
    Image.fromarray(_image()).save(image_path)
    out = tmp_path / "out"
    # no background words: the names win every mask (random weights need not beat them)
    named = FreeSegPipeline(pipe.sd, pipe.clip, pipe.captioner, pipe.settings.replace(background=()))
    info = segment_to_folder(named, image_path, out, class_names=["potted plant", "dog"])
    saved = json.loads((out / "labels.json").read_text())
    assert saved == info
    assert info["backend"] == "diffusers" and (info["width"], info["height"]) == (56, 40)
    (image_info,) = info["images"]
    assert isinstance(image_info["caption"], str) and "potted plant" in image_info["class_names"]
    assert (out / "overlay.png").is_file()
    assert Image.open(out / "overlay.png").size == (56, 40)
    assert info["masks"], "at least one named mask"
    for i, rec in enumerate(info["masks"]):
        assert rec["index"] == i and rec["label"] in image_info["class_names"]
        safe = re.sub(r"[^A-Za-z0-9]+", "_", rec["label"]).strip("_")
        assert rec["file"] == f"mask_{i}_{safe}.png"
        mask = np.asarray(Image.open(out / rec["file"]))
        assert mask.shape == (40, 56) and set(np.unique(mask)) <= {0, 255}
        assert int((mask > 0).sum()) == rec["area"]
        if rec["area"]:
            x0, y0, x1, y1 = rec["bbox"]
            ys, xs = np.nonzero(mask)
            assert (x0, y0, x1, y1) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    pngs = sorted(p.name for p in out.glob("mask_*.png"))
    assert pngs == sorted(rec["file"] for rec in info["masks"])


def test_settings_validation(pipe: FreeSegPipeline) -> None:
    with pytest.raises(TypeError, match="unknown setting"):
        pipe.segment(_image(), ["dog"], n_cluster=3)
    with pytest.raises(ValueError, match="resolution"):
        PAPER.replace(resolution=500)
    with pytest.raises(ValueError, match="ONE image"):
        pipe.segment(torch.zeros(2, 8, 8, 3), ["dog"])


# --------------------------------------------------------------------------- loading


def test_diffusers_folder_with_tokenizer_matches_single_file(pipe: FreeSegPipeline, vae_dir: Path,
                                                             tmp_path: Path) -> None:
    """save the loaded parts as a diffusers folder (float16, as the checkpoint) + ComfyUI's copy
    of the CLIP tokenizer; loading it gives the same prompt ids, embedding and features."""
    from safetensors.torch import save_file

    folder = tmp_path / "sd"
    (folder / "unet").mkdir(parents=True)
    pipe.sd.unet.save_config(str(folder / "unet"))
    save_file({k: v.to(torch.float16).contiguous() for k, v in pipe.sd.unet.state_dict().items()},
              str(folder / "unet" / "diffusion_pytorch_model.safetensors"))
    (folder / "text_encoder").mkdir()
    pipe.sd.text_encoder.config.save_pretrained(str(folder / "text_encoder"))
    save_file({k: v.to(torch.float16).contiguous() for k, v in pipe.sd.text_encoder.state_dict().items()},
              str(folder / "text_encoder" / "model.safetensors"))
    shutil.copytree(vae_dir, folder / "vae")
    shutil.copytree(DEFAULT_SD_CONFIG / "scheduler", folder / "scheduler")
    shutil.copytree(fx.comfy_dir() / "comfy" / "sd1_tokenizer", folder / "tokenizer")
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}))

    loaded = load_sd(folder)
    assert torch.equal(loaded.prompt_ids, pipe.sd.prompt_ids)  # real tokenizer == built-in ids
    texts = ["dog", "A photo of diningtable", "a large brown dog on the grass, " * 12]
    assert torch.equal(loaded.tokenize(texts), pipe.sd.tokenize(texts))  # also for words and truncation
    assert type(loaded.vae).__name__ == "AutoencoderKL"
    other = FreeSegPipeline(loaded, settings=pipe.settings)
    assert torch.equal(other.empty_prompt_embedding(), pipe.empty_prompt_embedding())
    pixels = torch.from_numpy(_image()).float()[None] / 255
    a, b = other.extract(pixels), pipe.extract(pixels)
    assert isinstance(a, DiffusionFeatures) and a.blocks == b.blocks
    assert torch.equal(a.features, b.features)


def test_load_errors_are_clear(fixture_paths: dict[str, str], sd_config: Path, tmp_path: Path) -> None:
    # the shipped full-size SD1.5 UNet config does not fit the reduced fixture
    with pytest.raises(ValueError, match="sd_config"):
        load_sd(fixture_paths["sd15_ckpt"], vae=False)
    # the fixture's VAE is ComfyUI's TAESD layout: a VAE must be given
    with pytest.raises(ValueError, match="TAESD"):
        load_sd(fixture_paths["sd15_ckpt"], sd_config=sd_config)
    with pytest.raises(FileNotFoundError):
        load_sd(tmp_path / "missing.safetensors")
    with pytest.raises(FileNotFoundError, match="diffusers model folder"):
        load_sd(tmp_path)
    with pytest.raises(NotImplementedError, match="SDXL"):
        sdxl = tmp_path / "sdxl"
        (sdxl / "unet").mkdir(parents=True)
        (sdxl / "unet" / "config.json").write_text(json.dumps({**fx.SD15_DIFFUSERS_UNET_CONFIG,
                                                                "addition_embed_type": "text_time"}))
        load_sd(fixture_paths["sd15_ckpt"], sd_config=sdxl)


def test_eval_cli_runs_the_pipeline_on_a_voc_layout_dataset(fixture_paths: dict[str, str], sd_config: Path,
                                                            vae_dir: Path, tmp_path: Path) -> None:
    """`python -m freeseg eval --backend diffusers` segments every image and scores it."""
    root = tmp_path / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True)
    for i, stem in enumerate(("a", "b")):
        Image.fromarray(_image(40, 56)).save(root / "JPEGImages" / f"{stem}.jpg")
        gt = np.zeros((40, 56), np.uint8)
        gt[5:30, 10 + i:40] = 12  # dog
        gt[30, :] = 255
        Image.fromarray(gt, mode="L").save(root / "SegmentationClass" / f"{stem}.png")
    (root / "ImageSets/Segmentation/val.txt").write_text("a\nb\n")
    common = [sys.executable, "-m", "freeseg", "eval", "--dataset", "voc", "--root", str(root),
              "--backend", "diffusers", "--sd", fixture_paths["sd15_ckpt"], "--sd-config", str(sd_config),
              "--vae", str(vae_dir), "--clip", fixture_paths["open_clip_dir"], "--no-progress"]
    out = subprocess.run(common + ["--mode", "open", "--out", str(tmp_path / "results"), "--json"],
                         capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout)
    assert set(result) == {"miou", "miou_per_image", "per_class_iou"}
    assert 0.0 <= result["miou"] <= 1.0 and 0.0 <= result["miou_per_image"] <= 1.0
    assert result["per_class_iou"]["dog"] is not None
    saved = list((tmp_path / "results" / "predictions").rglob("*.png"))
    assert sorted(p.stem for p in saved) == ["a", "b"]
    # the paper protocol: the whole closed-vocabulary pipeline, both metrics printed
    paper = subprocess.run(common + ["--protocol", "paper", "--blip2", fixture_paths["blip2_dir"], "--limit", "1"],
                           capture_output=True, text=True, timeout=300, cwd=REPO)
    assert paper.returncode == 0, paper.stderr[-2000:]
    assert "mIoU, dataset-level (standard)" in paper.stdout and "mIoU, per-image mean (official)" in paper.stdout
    assert "paper protocol" in paper.stdout and "paper-vocabulary mode" in paper.stdout
    refused = subprocess.run(common + ["--protocol", "paper"], capture_output=True, text=True, timeout=120,
                             cwd=REPO)
    assert refused.returncode == 2 and "--blip2" in refused.stderr
