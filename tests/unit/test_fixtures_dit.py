"""The random-weight DiT fixtures (synthetic/dit.py) load through ComfyUI's own loaders
(in-process, CPU): detected as the intended family with the documented config, every weight
of the model coming from the file, and a forward on a real CLIP-L encode finite."""
from __future__ import annotations

import pytest
import torch

from synthetic import cache, dit
from synthetic import models as fx

pytestmark = pytest.mark.skipif(
    not (fx.comfy_dir() / "comfy" / "sd.py").is_file(), reason="ComfyUI source tree not available"
)
KEYS = ["flux_unet", "flux_vae", "sd3_ckpt", "clip_l", "pixart_unet"]


@pytest.fixture(scope="module")
def paths() -> dict[str, str]:
    fx.import_comfy()
    return cache.build_all(cache.default_cache_dir(), keys=KEYS)


def test_flux_fixture_runs_on_a_clip_l_encode(paths: dict[str, str]) -> None:
    import comfy.sd
    import comfy.utils

    model = comfy.sd.load_diffusion_model(paths["flux_unet"])
    base = model.model
    assert type(base.model_config).__name__ == dit.FLUX_EXPECTED_CLASS
    config = base.model_config.unet_config
    assert {k: config[k] for k in dit.FLUX_DIT_CONFIG} == dit.FLUX_DIT_CONFIG
    file_keys = set(comfy.utils.load_torch_file(paths["flux_unet"]))
    assert set(base.diffusion_model.state_dict()) == file_keys
    # DualCLIPLoader with the CLIP-L file twice, type sd3: the widths the fixture reads
    clip = comfy.sd.load_clip(ckpt_paths=[paths["clip_l"]] * 2, clip_type=comfy.sd.CLIPType.SD3)
    assert "text_projection.weight" in comfy.utils.load_torch_file(paths["clip_l"])
    cond, pooled = clip.encode_from_tokens(clip.tokenize(""), return_pooled=True)
    assert cond.shape == (1, 77, 4096) and pooled.shape == (1, 2048)
    vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(paths["flux_vae"]))
    with torch.no_grad():
        latent = vae.encode(torch.rand(1, 64, 64, 3))
        assert latent.shape == (1, 16, 8, 8) and torch.isfinite(latent).all()
        x = base.latent_format.process_in(latent)
        out = base.apply_model(x, torch.tensor([0.5]), c_crossattn=cond, y=pooled, guidance=torch.tensor([3.5]))
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_sd3_checkpoint_fixture_loads_whole_and_runs(paths: dict[str, str]) -> None:
    import comfy.sd
    import comfy.utils

    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(paths["sd3_ckpt"])
    base = model.model
    assert type(base.model_config).__name__ == dit.SD3_EXPECTED_CLASS
    config = base.model_config.unet_config
    assert {k: config[k] for k in dit.SD3_DIT_CONFIG} == dit.SD3_DIT_CONFIG
    file_keys = set(comfy.utils.load_torch_file(paths["sd3_ckpt"]))
    assert {"model.diffusion_model." + k for k in base.diffusion_model.state_dict()} <= file_keys
    cond, pooled = clip.encode_from_tokens(clip.tokenize(""), return_pooled=True)
    assert cond.shape == (1, 77, 4096) and pooled.shape == (1, 2048)  # CLIP-L only, padded as for SD3
    with torch.no_grad():
        latent = vae.encode(torch.rand(1, 64, 64, 3))
        assert latent.shape == (1, 16, 8, 8)
        x = base.latent_format.process_in(latent)
        out = base.apply_model(x, torch.tensor([0.5]), c_crossattn=cond, y=pooled)
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_pixart_fixture_is_detected_as_pixart_sigma(paths: dict[str, str]) -> None:
    import comfy.sd

    model = comfy.sd.load_diffusion_model(paths["pixart_unet"])
    assert type(model.model.model_config).__name__ == "PixArtSigma"
