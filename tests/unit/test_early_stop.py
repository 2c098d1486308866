"""The Diffusion Features pass stops after the last UNet layer it uses, with the same features.

In-process ComfyUI on the random-weight SD1.5 and SDXL fixtures: for every source and detail,
``extract`` with the early stop gives exactly the features of the whole pass, the UNet's output
layer never runs, and the levels ``unet_layers`` reads off the structure are the ones the
captured shapes give.
"""

from __future__ import annotations

import pytest
import torch

from synthetic import cache
from synthetic import models as fx
from comfy_unet_features import import_pack_module

from freeseg.features import SOURCE_DECODER, SOURCE_QUERIES, last_used_layer, output_factor, wanted_factors

CASES = [(SOURCE_QUERIES, "paper"), (SOURCE_QUERIES, "fine"), (SOURCE_DECODER, "paper")]


@pytest.fixture(scope="module")
def df():
    fx.import_comfy()
    return import_pack_module("nodes.diffusion_features")


@pytest.fixture(scope="module")
def models(df) -> dict[str, tuple]:
    """family -> (MODEL, VAE, CLIP or None, resolution)."""
    import comfy.sd
    import comfy.utils

    paths = cache.build_all(cache.default_cache_dir())
    sd15, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(paths["sd15_ckpt"])
    sdxl = comfy.sd.load_diffusion_model(paths["sdxl_unet"])
    sdxl_vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(paths["sdxl_vae"]))
    return {"SD15": (sd15, vae, clip, 128), "SDXL": (sdxl, sdxl_vae, None, 256)}


class CallCount:
    """Counts the forward calls of a module while registered."""

    def __init__(self, module: torch.nn.Module):
        self.calls = 0
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, *_args) -> None:
        self.calls += 1


@pytest.mark.parametrize("family", ["SD15", "SDXL"])
@pytest.mark.parametrize("source,detail", CASES)
def test_early_stop_gives_the_whole_pass_features(df, models, family: str, source: str, detail: str) -> None:
    model, vae, clip, res = models[family]
    images = torch.rand(2, 40, 56, 3, generator=torch.Generator().manual_seed(3))
    dm = model.model.diffusion_model
    outs = {}
    for stop in (True, False):
        counter = CallCount(dm.out)
        try:
            outs[stop] = df.extract(model, vae, images, clip, resolution=res, source=source,
                                    detail=detail, stop_early=stop)
        finally:
            counter.handle.remove()
        # Both images fit one pass here; the stopped pass never reaches the output layer.
        assert counter.calls == (0 if stop else 1), (stop, counter.calls)
    assert outs[True].blocks == outs[False].blocks and outs[True].blocks
    assert torch.equal(outs[True].features, outs[False].features)
    assert not any(h for m in dm.modules() for h in m._forward_hooks.values()
                   if getattr(h, "__qualname__", "").startswith("LayerCapture.")), "a hook was left on the UNet"


@pytest.mark.parametrize("family", ["SD15", "SDXL"])
def test_images_share_a_pass_as_memory_allows(df, models, family: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Three images in one pass, or one per pass when the free memory only fits one: the same
    features as three single-image runs with the seeds they get in the batch."""
    import comfy.model_management as mm

    model, vae, clip, res = models[family]
    images = torch.rand(3, 48, 40, 3, generator=torch.Generator().manual_seed(4))
    singles = torch.cat([df.extract(model, vae, images[i:i + 1], clip, timestep=300, resolution=res,
                                    seed=7 + i).features for i in range(3)])
    dm = model.model.diffusion_model
    one = model.model.memory_required([1, 4, res // 8, res // 8])
    for free, passes in ((None, 1), (one * 1.6, 3)):
        if free is not None:
            real = mm.get_free_memory
            # What the node sees; attention's own query (torch_free_too) is left alone.
            monkeypatch.setattr(mm, "get_free_memory",
                                lambda dev=None, torch_free_too=False: real(dev, True) if torch_free_too else free)
        counter = CallCount(dm.input_blocks[0][0])  # the first convolution
        try:
            batch = df.extract(model, vae, images, clip, timestep=300, resolution=res, seed=7)
        finally:
            counter.handle.remove()
        assert counter.calls == passes
        assert batch.features.shape == singles.shape
        assert torch.allclose(batch.features.float(), singles.float(), atol=2e-3, rtol=2e-3), \
            (batch.features.float() - singles.float()).abs().max()


@pytest.mark.parametrize("family", ["SD15", "SDXL"])
@pytest.mark.parametrize("source", [SOURCE_QUERIES, SOURCE_DECODER])
def test_structural_levels_match_the_captured_shapes(df, models, family: str, source: str) -> None:
    model, _vae, _clip, res = models[family]
    base = model.model
    layers = df.unet_layers(base.diffusion_model, source)
    captured: dict[str, torch.Tensor] = {}
    handles = [m.register_forward_hook(lambda _m, _i, out, n=n: captured.__setitem__(n, out))
               for n, m, _ in layers]
    latent_hw = (res // 8, res // 8)
    x = torch.randn(1, 4, *latent_hw)
    conds = base.extra_conds(cross_attn=torch.zeros(1, 77, base.model_config.unet_config["context_dim"]),
                             pooled_output=torch.zeros(1, 1280), width=res, height=res,
                             device=torch.device("cpu"), noise=x, latent_image=x)
    try:
        with torch.no_grad():
            base.apply_model(x, torch.tensor([1.0]), **{k: v.cond for k, v in conds.items()})
    finally:
        for h in handles:
            h.remove()
    assert [n for n, _, _ in layers] == list(captured)
    assert {n: f for n, _, f in layers} == {n: output_factor(t, latent_hw) for n, t in captured.items()}
    # The fixtures' reduced UNets (3 levels): latent/4 is their coarsest attention level, which
    # output_0 and output_1 decode first.
    if source == SOURCE_QUERIES:
        assert last_used_layer([(n, f) for n, _, f in layers], source) == "output_1.attn2.to_q"


# The real SD1.5 and SDXL base UNet configs (as ComfyUI detects them from the official files).
REAL_CONFIGS = {
    "SD15": dict(model_channels=320, num_res_blocks=[2, 2, 2, 2], channel_mult=[1, 2, 4, 4], num_heads=8,
                 transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_output=[1] * 9 + [0] * 3,
                 transformer_depth_middle=1, context_dim=768, use_linear_in_transformer=False),
    "SDXL": dict(model_channels=320, num_res_blocks=[2, 2, 2], channel_mult=[1, 2, 4], num_head_channels=64,
                 transformer_depth=[0, 0, 2, 2, 10, 10], transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10],
                 transformer_depth_middle=10, context_dim=2048, use_linear_in_transformer=True,
                 num_classes="sequential", adm_in_channels=2816),
}
# (source, fine) -> the layer each real UNet stops after, and the paper preset's layers.
REAL_STOPS = {
    "SD15": {(SOURCE_QUERIES, False): "output_5.attn2.to_q", (SOURCE_QUERIES, True): "output_8.attn2.to_q",
             (SOURCE_DECODER, False): "output_7"},
    "SDXL": {(SOURCE_QUERIES, False): "output_2.attn2.to_q", (SOURCE_QUERIES, True): "output_5.attn2.to_q",
             (SOURCE_DECODER, False): "output_4"},
}
PAPER_LAYERS = {"SD15": ["input_7", "input_8", "output_3", "output_4", "output_5"],
                "SDXL": ["input_7", "input_8", "output_0", "output_1", "output_2"]}


@pytest.mark.parametrize("family", ["SD15", "SDXL"])
def test_real_architectures_stop_after_their_last_latent4_layer(df, family: str) -> None:
    """The real UNets, built on the meta device (no weights): at 512 px SD1.5 skips its 32x32
    and 64x64 decoder levels, SDXL everything after its first decoder level."""
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    dm = UNetModel(image_size=32, in_channels=4, out_channels=4, use_spatial_transformer=True, legacy=False,
                   device="meta", operations=comfy.ops.disable_weight_init, **REAL_CONFIGS[family])
    for (source, fine), stop in REAL_STOPS[family].items():
        layers = [(n, f) for n, _, f in df.unet_layers(dm, source)]
        assert last_used_layer(layers, source, fine) == stop, (source, fine)
    queries = [(n, f) for n, _, f in df.unet_layers(dm, SOURCE_QUERIES)]
    wanted = wanted_factors([f for _, f in queries])
    assert [n.split(".")[0] for n, f in queries if f in wanted] == PAPER_LAYERS[family]
