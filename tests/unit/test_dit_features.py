"""Diffusion Features on DiTs (Flux.1, Chroma, Flux.2, SD3), in-process ComfyUI on reduced
random-weight models.

The models are ComfyUI's own classes (``comfy.supported_models.Flux`` / ``Chroma`` / ``Flux2`` /
``SD3`` -> ``get_model``), built in memory at a reduced width and depth with seeded random weights
(the on-disk fixtures of ``synthetic/dit.py`` keep Flux's real 3072 width, too slow for
these checks on a CPU). The conditioning is a CONDITIONING the test makes (Flux and SD3 read
T5-XXL tokens, which cannot be built here), through the node's ``conditioning`` input.

Checked: the documented shape and blocks; the pass stops after the last block used with the
features of the whole pass; a batch equals single images; a replace patch another node put on
the MODEL still runs; the MODEL is not changed; a known-answer token-to-grid check (one-hot
latents whose patch k is hot at channel k, through identity blocks) with no transposition or
patch-order mistake; refusals naming the family.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from synthetic import models as fx
from comfy_unet_features import import_pack_module

from freeseg import dit
from freeseg.features import SOURCE_DECODER

RES = 128  # a 16x16 latent: 8x8 image tokens


@pytest.fixture(scope="module")
def df():
    fx.import_comfy()
    return import_pack_module("nodes.diffusion_features")


def build(name: str, config: dict, seed: int = 0):
    """A ModelPatcher of ComfyUI's ``comfy.supported_models.<name>`` with seeded random weights."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models as sm

    model_config = getattr(sm, name)(config)
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({})
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def flux_config(image_model: str = "flux", in_channels: int = 16) -> dict:
    """Flux.1 (``comfy/model_detection.py``'s fixed fields at a reduced width and depth), its
    Fill variant with ``in_channels`` 96, or Flux.2 (``image_model`` "flux2": patch 1 on a
    128-channel latent, shared modulation, 4 rope axes)."""
    import comfy.ldm.flux.model as flux_model

    config = dict(image_model=image_model, in_channels=in_channels, patch_size=2, out_channels=16, vec_in_dim=24,
                  context_in_dim=32, hidden_size=64, mlp_ratio=2.0, num_heads=2, depth=4, depth_single_blocks=2,
                  axes_dim=[8, 12, 12], theta=10000, qkv_bias=True, guidance_embed=True)
    flux2 = image_model == "flux2"
    if flux2:
        config.update(in_channels=128, out_channels=128, patch_size=1, vec_in_dim=None, axes_dim=[8, 8, 8, 8],
                      theta=2000, mlp_ratio=3.0, global_modulation=True, mlp_silu_act=True, qkv_bias=False,
                      ops_bias=False, default_ref_method="index", ref_index_scale=10.0)
    if "txt_ids_dims" in {f.name for f in dataclasses.fields(flux_model.FluxParams)}:
        config["txt_ids_dims"] = [3] if flux2 else []  # as ComfyUI 0.33's detection sets it
    return config


def chroma_config() -> dict:
    """Chroma: Flux's double / single blocks without their own modulation (an approximator gives it)."""
    import comfy.ldm.chroma.model as chroma_model

    config = dict(image_model="chroma", in_channels=64, out_channels=64, context_in_dim=32, hidden_size=64,
                  mlp_ratio=2.0, num_heads=2, depth=4, depth_single_blocks=2, axes_dim=[8, 12, 12], theta=10000,
                  patch_size=2, qkv_bias=True, in_dim=64, out_dim=64, hidden_dim=32, n_layers=2)
    if "txt_ids_dims" in {f.name for f in dataclasses.fields(chroma_model.ChromaParams)}:
        config.update(txt_ids_dims=[], vec_in_dim=None)  # as ComfyUI 0.33's detection sets them
    return config

SD3_CONFIG = dict(in_channels=16, pos_embed_scaling_factor=None, patch_size=2, out_channels=16, depth=4,
                  adm_in_channels=24, num_patches=64 * 64, pos_embed_max_size=64,
                  context_embedder_config={"target": "torch.nn.Linear",
                                           "params": {"in_features": 32, "out_features": 256}})


FAMILIES = ["Flux", "Chroma", "Flux2", "SD3"]
CHANNELS = {"Flux": 16, "Chroma": 16, "Flux2": 128, "SD3": 16}  # latent channels
DOWNSCALE = {"Flux": 8, "Chroma": 8, "Flux2": 16, "SD3": 8}  # image pixels per latent cell


@pytest.fixture(scope="module")
def models(df) -> dict:
    """family -> (MODEL, hidden width, blocks attribute, expected block names)."""
    return {"Flux": (build("Flux", flux_config()), 64, "double_blocks", ["double_block_3"]),
            "Chroma": (build("Chroma", chroma_config()), 64, "double_blocks", ["double_block_3"]),
            "Flux2": (build("Flux2", flux_config("flux2")), 64, "double_blocks", ["double_block_3"]),
            "SD3": (build("SD3", SD3_CONFIG), 256, "joint_blocks", ["joint_block_1"])}


def conditioning(seed: int = 1) -> list:
    """A CONDITIONING as a text encode gives it: tokens ``[1,7,32]``, pooled ``[1,24]``."""
    generator = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, 7, 32, generator=generator),
             {"pooled_output": torch.randn(1, 24, generator=generator), "guidance": 3.5}]]


class PoolVAE:
    """A VAE stand-in: ``channels`` latents from ``scale`` x ``scale`` average pools (the pass
    after it is the node's)."""

    def __init__(self, family: str = "Flux"):
        self.channels, self.scale = CHANNELS[family], DOWNSCALE[family]

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        pooled = torch.nn.functional.avg_pool2d(pixels.movedim(-1, 1), self.scale)
        return torch.cat([pooled * (k + 1) / 3 for k in range(-(-self.channels // 3))], dim=1)[:, :self.channels]


class CallCount:
    def __init__(self, module: torch.nn.Module):
        self.calls = 0
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, *_args) -> None:
        self.calls += 1


def images(n: int, seed: int = 3) -> torch.Tensor:
    return torch.rand(n, 40, 56, 3, generator=torch.Generator().manual_seed(seed))


def test_family_table_scales_with_depth() -> None:
    assert dit.block_indices(dit.FAMILIES["Flux"], 19) == [15, 16, 17, 18]
    assert dit.block_indices(dit.FAMILIES["SD3"], 24) == [9]
    assert dit.block_indices(dit.FAMILIES["SD3"], 38) == [14]  # SD3.5 large
    assert dit.block_indices(dit.FAMILIES["Flux"], 4) == [3]
    assert dit.block_indices(dit.FAMILIES["Flux2"], 8) == [6, 7]  # Flux.2 dev


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("detail", ["paper", "fine"])
def test_documented_shape(df, models, family: str, detail: str) -> None:
    model, width, _, blocks = models[family]
    out = df.extract(model, PoolVAE(family), images(2), timestep=500, resolution=RES, detail=detail,
                     conditioning=conditioning())
    side = RES // (16 if detail == "paper" else 8)
    assert out.features.shape == (2, width * len(blocks), side, side)
    assert out.features.dtype == torch.float16 and torch.isfinite(out.features).all()
    assert out.blocks == blocks and out.family == family and out.image_size == (40, 56)


@pytest.mark.parametrize("family", FAMILIES)
def test_early_stop_gives_the_whole_pass_features(df, models, family: str) -> None:
    model, _, _, _ = models[family]
    dm = model.model.diffusion_model
    outs = {}
    for stop in (True, False):
        counter = CallCount(dm.final_layer)
        try:
            outs[stop] = df.extract(model, PoolVAE(family), images(2), timestep=500, resolution=RES,
                                    conditioning=conditioning(), stop_early=stop)
        finally:
            counter.handle.remove()
        assert counter.calls == (0 if stop else 1), (stop, counter.calls)
    assert torch.equal(outs[True].features, outs[False].features)
    assert not any(m._forward_hooks for m in dm.modules()), "a hook was left on the model"


@pytest.mark.parametrize("family", FAMILIES)
def test_images_share_a_pass_as_memory_allows(df, models, family: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import comfy.model_management as mm

    model, _, attr, _ = models[family]
    batch_images = images(3, seed=4)
    singles = torch.cat([df.extract(model, PoolVAE(family), batch_images[i:i + 1], timestep=300, resolution=RES,
                                    seed=7 + i, conditioning=conditioning()).features for i in range(3)])
    side = RES // DOWNSCALE[family]
    one = model.model.memory_required([1, CHANNELS[family], side, side])
    for free, passes in ((None, 1), (one * 1.6, 3)):
        if free is not None:
            real = mm.get_free_memory
            monkeypatch.setattr(mm, "get_free_memory",
                                lambda dev=None, torch_free_too=False: real(dev, True) if torch_free_too else free)
        counter = CallCount(getattr(model.model.diffusion_model, attr)[0])
        try:
            batch = df.extract(model, PoolVAE(family), batch_images, timestep=300, resolution=RES, seed=7,
                               conditioning=conditioning())
        finally:
            counter.handle.remove()
        assert counter.calls == passes
        assert torch.allclose(batch.features.float(), singles.float(), atol=2e-3, rtol=2e-3), \
            (batch.features.float() - singles.float()).abs().max()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("before", [1, 0])
def test_a_patch_another_node_added_still_runs_and_the_model_is_not_changed(df, models, family: str,
                                                                           before: int) -> None:
    """A replace patch on the block before the one read (its change reaches the features) or on
    the block read itself (the features are that block's own output: the hook sits on it)."""
    model, _, attr, blocks = models[family]
    index = int(blocks[-1].rsplit("_", 1)[1]) - before
    plain = df.extract(model, PoolVAE(family), images(1), timestep=500, resolution=RES, conditioning=conditioning())
    user = model.clone()
    calls = []
    def other_node(args, extra):  # a replace patch as other packs add them: calls the block, changes its output
        calls.append(args["img"].shape)
        out = extra["original_block"](args)
        offset = torch.randn(out["img"].shape[1:], generator=torch.Generator().manual_seed(5))
        out["img"] = out["img"] + offset.to(out["img"])
        return out

    user.set_model_patch_replace(other_node, "dit", "double_block", index)
    options_before = repr(user.model_options)
    patched = df.extract(user, PoolVAE(family), images(1), timestep=500, resolution=RES, conditioning=conditioning())
    assert calls, "the other node's patch did not run"
    assert torch.equal(patched.features, plain.features) == (before == 0)
    assert repr(user.model_options) == options_before
    assert not any(m._forward_hooks for m in user.model.diffusion_model.modules())
    assert ("double_block", index) in user.model_options["transformer_options"]["patches_replace"]["dit"]


def one_hot_latent(grid: int, channels: int, patch: int) -> torch.Tensor:
    """``[1,channels,pg,pg]``: patch (r, c) (token k = r * g + c, row-major) is one-hot at the
    element k of its ``(c ph pw)`` flattening: channel k // p^2, row pr + (k % p^2) // p,
    column pc + k % p."""
    latent = torch.zeros(1, channels, patch * grid, patch * grid)
    for r in range(grid):
        for c in range(grid):
            k = r * grid + c
            latent[0, k // patch ** 2, patch * r + (k % patch ** 2) // patch, patch * c + k % patch] = 1.0
    return latent


@pytest.mark.parametrize("family", FAMILIES)
def test_token_to_grid_known_answer(df, family: str) -> None:
    """The patch embedding copies each token's 64 patch values to its first 64 channels, every
    block returns its input: the feature at grid cell (r, c) must be hot at channel r * 8 + c."""
    grid = RES // 16
    patch = 1 if family == "Flux2" else 2
    if family != "SD3":
        model = build(family, chroma_config() if family == "Chroma" else flux_config(family.lower()))
        dm = model.model.diffusion_model
        with torch.no_grad():
            dm.img_in.weight.copy_(torch.eye(64, dm.img_in.weight.shape[1]))
            if dm.img_in.bias is not None:
                dm.img_in.bias.zero_()
        for block in dm.double_blocks:
            block.forward = lambda img, txt, **_kwargs: (img, txt)
    else:
        model = build("SD3", SD3_CONFIG)
        dm = model.model.diffusion_model
        with torch.no_grad():
            weight = torch.zeros_like(dm.x_embedder.proj.weight)  # [256, 16, 2, 2]
            for k in range(64):
                weight[k, k // 4, (k % 4) // 2, k % 2] = 1.0
            dm.x_embedder.proj.weight.copy_(weight)
            dm.x_embedder.proj.bias.zero_()
            dm.pos_embed.zero_()
        for block in dm.joint_blocks:
            block.forward = lambda context, x, **_kwargs: (context, x)
    settings = df.DEFAULTS.replace(timestep=0, resolution=RES)  # sigma 0: the latent itself
    out = df.ComfyFeatures(model, None, conditioning=conditioning()).extract_latent(
        one_hot_latent(grid, CHANNELS[family], patch), settings)
    hot = out.features[0].float().argmax(dim=0)
    expected = torch.arange(grid * grid).reshape(grid, grid)
    assert torch.equal(hot, expected), hot


def test_massive_channels_are_zeroed_and_tokens_normalised() -> None:
    tokens = torch.randn(2, 64, 32, generator=torch.Generator().manual_seed(0))
    tokens[0, :, 5] += 500.0  # a massive channel in image 0 only
    out = dit.normalise_tokens(tokens)
    assert dit.massive_channels(tokens)[0].nonzero().flatten().tolist() == [5]
    assert not dit.massive_channels(tokens)[1].any()
    assert (out[0, :, 5] == 0).all() and (out[1, :, 5] != 0).all()
    kept = torch.cat([out[0, :, :5], out[0, :, 6:]], dim=-1)
    assert torch.allclose(kept.mean(-1), torch.zeros(64), atol=1e-5)
    assert torch.allclose(kept.var(-1, unbiased=False), torch.ones(64), atol=1e-3)
    # per image: image 1 alone gives what it gives in the batch
    assert torch.equal(dit.normalise_tokens(tokens[1:]), out[1:])


def test_refusals_name_the_family(df, models) -> None:
    family = "Flux"
    fill = build("FluxInpaint", flux_config(in_channels=96))  # Flux Fill: image + mask channels concatenated
    with pytest.raises(ValueError, match="FluxInpaint, which is not supported"):
        df.check_family(fill)
    aura = build("AuraFlow", dict(in_channels=4, out_channels=4, patch_size=2, dim=64, n_layers=2, n_double_layers=1,
                                  n_heads=2, global_conddim=64, cond_seq_dim=32, max_seq=64))
    with pytest.raises(ValueError, match="AuraFlow, which is not supported"):
        df.extract(aura, PoolVAE(family), images(1), resolution=RES, conditioning=conditioning())
    model = models["Flux"][0]
    with pytest.raises(ValueError, match="a Flux model is conditioned on its text encoder's empty prompt"):
        df.extract(model, PoolVAE(family), images(1), resolution=RES)
    with pytest.raises(ValueError, match="Flux DiT has none"):
        df.extract(model, PoolVAE(family), images(1), resolution=RES, source=SOURCE_DECODER,
                   conditioning=conditioning())


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("cfg", [1.0, 2.0])
def test_capture_while_sampling(df, models, family: str, cfg: float) -> None:
    """Capture Features on a DiT: the generated latents are bit-identical to the plain MODEL's,
    and the record is of the last model call (the schedule's last sigma), with the features'
    documented shape and blocks."""
    import comfy.sample
    import comfy.samplers

    cf = import_pack_module("nodes.capture_features")
    model, width, _, blocks = models[family]
    layers, pick = df.feature_layers(model, df.QUERIES)
    recorder = cf.SamplingCapture(layers, df.QUERIES, False, pick=pick)
    patched = cf.patch(model, recorder)
    side = RES // DOWNSCALE[family]
    latent = torch.zeros(2, CHANNELS[family], side, side)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(11))
    positive, negative = conditioning(1), conditioning(2)
    runs = [comfy.sample.sample(m, noise, 3, cfg, "euler", "simple", positive, negative, latent, seed=11)
            for m in (model, patched)]
    assert torch.equal(runs[0], runs[1])
    feats, names, sigma = recorder.features(runs[1], (RES // 16, RES // 16))
    assert names == blocks and feats.shape == (2, width * len(blocks), RES // 16, RES // 16)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", 3)
    assert sigma == pytest.approx(float(sigmas[-2]))
    assert torch.isfinite(feats).all()
