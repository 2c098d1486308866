"""The random-weight model fixtures load through ComfyUI's own loaders (in-process, CPU).

Checks that the SD1.5 checkpoint is detected as SD15, the UNet-only file as an
SDXL-family model, the TAESD VAE file loads, and every forward output is finite.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch

from synthetic import cache
from synthetic import models as fx

pytestmark = pytest.mark.skipif(
    not (fx.comfy_dir() / "comfy" / "sd.py").is_file(), reason="ComfyUI source tree not available"
)


@pytest.fixture(scope="session")
def fixture_paths() -> dict[str, str]:
    """All fixtures, built once into the shared cache (imports ComfyUI in-process)."""
    fx.import_comfy()
    return cache.build_all(cache.default_cache_dir())


@pytest.fixture(scope="module")
def sd15(fixture_paths: dict[str, str]) -> tuple:
    """(model_patcher, clip, vae) from comfy.sd.load_checkpoint_guess_config."""
    import comfy.sd

    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(fixture_paths["sd15_ckpt"])
    return model, clip, vae


@pytest.fixture(scope="module")
def sd15_state(fixture_paths: dict[str, str]) -> dict[str, torch.Tensor]:
    """The SD1.5 checkpoint's raw state dict."""
    import comfy.utils

    return comfy.utils.load_torch_file(fixture_paths["sd15_ckpt"])


def _sha256(path: str) -> str:
    """Hex digest of a file."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_files_have_normal_permissions(fixture_paths: dict[str, str]) -> None:
    for key, path in fixture_paths.items():
        files = [Path(path)] if Path(path).is_file() else [p for p in Path(path).rglob("*") if p.is_file()]
        assert files, key
        for f in files:
            assert os.stat(f).st_mode & 0o777 == 0o644, f


def test_sdxl_vae_builder_is_deterministic(tmp_path: Path, fixture_paths: dict[str, str]) -> None:
    again = fx.build_sdxl_vae(tmp_path / "vae.safetensors")
    assert _sha256(again) == _sha256(fixture_paths["sdxl_vae"])
    other = fx.build_sdxl_vae(tmp_path / "vae2.safetensors", seed=fx.SDXL_VAE_SEED + 1)
    assert _sha256(other) != _sha256(again)


def test_sd15_detected(sd15: tuple, sd15_state: dict[str, torch.Tensor]) -> None:
    import comfy.model_detection

    model, clip, vae = sd15
    assert type(model.model.model_config).__name__ == "SD15"
    assert clip is not None and vae is not None
    detected = comfy.model_detection.detect_unet_config(sd15_state, "model.diffusion_model.")
    for key, value in fx.SD15_UNET_CONFIG.items():
        assert detected[key] == value, key


def test_sd15_no_missing_keys(sd15: tuple, sd15_state: dict[str, torch.Tensor]) -> None:
    """Every parameter the loaded UNet, CLIP and VAE hold comes from the file, in the stored dtypes."""
    model, clip, vae = sd15
    keys = set(sd15_state)
    unet_keys = {"model.diffusion_model." + k for k in model.model.diffusion_model.state_dict()}
    assert unet_keys <= keys
    vae_keys = {"first_stage_model." + k for k in vae.first_stage_model.state_dict()}
    assert vae_keys <= keys
    clip_keys = {k.replace("clip_l.", "cond_stage_model.", 1) for k in clip.cond_stage_model.state_dict()}
    optional = {"cond_stage_model.transformer.text_projection.weight", "cond_stage_model.logit_scale"}
    assert clip_keys - optional <= keys
    assert keys - unet_keys - vae_keys - clip_keys == {
        "cond_stage_model.transformer.text_model.embeddings.position_ids"}
    clip_dtypes = {v.dtype for k, v in sd15_state.items() if k.startswith("cond_stage_model.") and
                   v.is_floating_point()}
    assert clip_dtypes == {torch.float16}


def test_sd15_outputs_finite(sd15: tuple) -> None:
    model, clip, vae = sd15
    with torch.no_grad():
        cond, pooled = clip.encode_from_tokens(clip.tokenize("a cat on a sofa"), return_pooled=True)
        assert cond.shape == (1, 77, 768) and torch.isfinite(cond).all() and torch.isfinite(pooled).all()
        image = torch.rand(1, 64, 96, 3, generator=torch.Generator().manual_seed(0))
        latent = vae.encode(image)
        assert latent.shape == (1, 4, 8, 12) and torch.isfinite(latent).all()
        decoded = vae.decode(latent)
        assert decoded.shape[-3:] == (64, 96, 3) and torch.isfinite(decoded).all()
        x = model.model.latent_format.process_in(latent)
        sigma = torch.tensor([1.0])
        out = model.model.apply_model(x + sigma * torch.randn_like(x), sigma, c_crossattn=cond)
        assert out.shape == x.shape and torch.isfinite(out).all()


def test_sd15_transformers_at_three_resolutions(sd15: tuple) -> None:
    """Transformer blocks at latent/1, /2 and /4: one per input block, one per output block (2 per level)."""
    from comfy.ldm.modules.attention import SpatialTransformer

    dm = sd15[0].model.diffusion_model
    shapes: list[tuple[str, int]] = []
    hooks = []
    for name, module in dm.named_modules():
        if isinstance(module, SpatialTransformer):
            hooks.append(module.register_forward_hook(
                lambda m, i, o, name=name: shapes.append((name.split(".")[0], o.shape[-1]))))
    try:
        with torch.no_grad():
            x = torch.randn(1, 4, 16, 16)
            sd15[0].model.apply_model(x, torch.tensor([1.0]), c_crossattn=torch.randn(1, 77, 768))
    finally:
        for h in hooks:
            h.remove()
    assert sorted(set(shapes)) == [("input_blocks", 4), ("input_blocks", 8), ("input_blocks", 16),
                                   ("output_blocks", 4), ("output_blocks", 8), ("output_blocks", 16)]
    assert len(shapes) == 9
    assert sorted(shapes).count(("output_blocks", 4)) == 2


def test_sd2_detected_as_v_prediction_with_every_weight_from_the_file(fixture_paths: dict[str, str],
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    """The SD2 checkpoint is ComfyUI's SD20, v-prediction, with the detected UNet config of the
    recipe, an OpenCLIP-H text encoder that loads with no missing key, and finite outputs."""
    import logging

    import comfy.model_base
    import comfy.model_detection
    import comfy.sd
    import comfy.utils

    state = comfy.utils.load_torch_file(fixture_paths["sd2_ckpt"])
    detected = comfy.model_detection.detect_unet_config(state, "model.diffusion_model.")
    for key, value in fx.SD2_UNET_CONFIG.items():
        assert detected[key] == value, key
    assert "cond_stage_model.model.transformer.resblocks.23.attn.in_proj_weight" in state
    del state
    with caplog.at_level(logging.WARNING):
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(fixture_paths["sd2_ckpt"])
    assert not [r.getMessage() for r in caplog.records if "missing" in r.getMessage()]
    base = model.model
    assert type(base.model_config).__name__ == "SD20"
    assert base.model_type == comfy.model_base.ModelType.V_PREDICTION
    with torch.no_grad():
        cond, pooled = clip.encode_from_tokens(clip.tokenize(""), return_pooled=True)
        assert cond.shape == (1, 77, 1024) and torch.isfinite(cond).all() and torch.isfinite(pooled).all()
        latent = vae.encode(torch.rand(1, 64, 64, 3))
        x = base.latent_format.process_in(latent)
        out = base.apply_model(x, torch.tensor([1.0]), c_crossattn=cond)
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_sdxl_unet_detected_and_finite(fixture_paths: dict[str, str]) -> None:
    import comfy.model_base
    import comfy.sd

    model = comfy.sd.load_diffusion_model(fixture_paths["sdxl_unet"])
    base = model.model
    assert isinstance(base, comfy.model_base.SDXL)
    assert type(base.model_config).__name__ == fx.SDXL_EXPECTED_CLASS
    assert base.model_config.unet_config["context_dim"] == 2048 and base.adm_channels == 2816
    with torch.no_grad():
        x = torch.randn(1, 4, 16, 16)
        conds = base.extra_conds(cross_attn=torch.randn(1, 77, 2048), pooled_output=torch.randn(1, 1280),
                                 width=128, height=128, device=torch.device("cpu"), noise=x, latent_image=x)
        kwargs = {k: v.cond for k, v in conds.items()}
        out = base.apply_model(x, torch.tensor([1.0]), **kwargs)
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_sdxl_vae_loads_and_finite(fixture_paths: dict[str, str]) -> None:
    import comfy.sd
    import comfy.utils

    vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(fixture_paths["sdxl_vae"]))
    with torch.no_grad():
        latent = vae.encode(torch.rand(1, 64, 64, 3))
        assert latent.shape == (1, 4, 8, 8) and torch.isfinite(latent).all()
        assert torch.isfinite(vae.decode(latent)).all()


def test_build_all_stamps_skip_and_rebuild(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An artefact is built once, skipped while its stamp matches, rebuilt when the version changes."""
    calls: list[str] = []

    def builder(path: str) -> str:
        calls.append(path)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text("x")
        return path

    monkeypatch.setattr(cache, "ARTIFACTS", {"thing": ("sub/thing.txt", builder)})
    first = cache.build_all(tmp_path)
    assert first == {"thing": str(tmp_path.resolve() / "sub" / "thing.txt")} and len(calls) == 1
    assert cache.build_all(tmp_path) == first and len(calls) == 1
    monkeypatch.setattr(cache, "FIXTURE_VERSION", cache.FIXTURE_VERSION + 1)
    cache.build_all(tmp_path)
    assert len(calls) == 2


def test_build_all_only_the_keys_asked_for(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    built: list[str] = []

    def builder(path: str) -> str:
        built.append(Path(path).name)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text("x")
        return path

    monkeypatch.setattr(cache, "ARTIFACTS", {"a": ("a.txt", builder), "b": ("b.txt", builder)})
    assert list(cache.build_all(tmp_path, keys=["b"])) == ["b"] and built == ["b.txt"]
    with pytest.raises(KeyError, match="'c'"):
        cache.build_all(tmp_path, keys=["c"])
