"""ComfyUI side of the ComfyUI-vs-diffusers feature parity test (run in a SUBPROCESS).

Loads an SD checkpoint with ``comfy.sd.load_checkpoint_guess_config`` (CPU mode) and runs the
pack's own ``nodes/diffusion_features.py:extract`` on a given latent: the VAE is replaced by a
stand-in whose ``encode`` returns that latent, so everything after the VAE (latent scaling,
seeded noise at the timestep's sigma, empty-prompt conditioning from the checkpoint's CLIP,
the UNet pass, the hooks, block selection, resize and concat) is the node's code. Extra
forward hooks on the same layers also record the raw per-layer outputs.

Usage::

    python tests/helpers/comfy_unet_features.py IN.pt OUT.pt

``IN.pt`` (``torch.save`` of a dict): ``ckpt`` (path), ``latent`` (``[1,4,h,w]`` float32, the
UNSCALED latent a VAE would return), ``image_size`` ((H, W) of the would-be image),
``resolution``, ``timestep``, ``seed``, ``sources`` (list of feature sources).

``OUT.pt``: ``x0`` (the scaled latent the node used), ``cond`` (``[1,77,C]`` empty-prompt
conditioning), ``unet_dtype``, ``family``, and per source ``features`` (``[1,C,r/16,r/16]``
float16, the node's output), ``blocks`` (layer names used) and ``raw`` (layer name ->
captured output, float32, for the layers used).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script: the repository root importable
from freeseg.app.paths import REPO  # noqa: E402

PACK = "freeseg_pack_under_test"


def import_pack_module(name: str):
    """Import ``<repo>/<name>`` as part of the pack package (the nodes use relative imports)."""
    if PACK not in sys.modules:
        spec = importlib.util.spec_from_file_location(PACK, Path(REPO) / "__init__.py",
                                                      submodule_search_locations=[REPO])
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACK] = module
        spec.loader.exec_module(module)
    return importlib.import_module(f"{PACK}.{name}")


class LatentVAE:
    """Stands in for a ComfyUI VAE: ``encode(pixels)`` returns the given unscaled latent."""

    def __init__(self, latent: torch.Tensor):
        self.latent = latent

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.latent.clone()


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    job = torch.load(argv[0], weights_only=True)
    from synthetic.models import import_comfy

    import_comfy()
    import comfy.sd

    df = import_pack_module("nodes.diffusion_features")
    model, clip, _vae, _ = comfy.sd.load_checkpoint_guess_config(
        job["ckpt"], output_vae=False, output_clip=True, embedding_directory=None)
    family = df.check_family(model)
    base = model.model
    latent = job["latent"].float()
    x0 = model.get_model_object("latent_format").process_in(latent)
    context_dim = base.model_config.unet_config.get("context_dim") or 768
    cond, _pooled = df.empty_prompt(clip, context_dim, 768)
    h, w = job["image_size"]
    images = torch.zeros((1, h, w, 3))
    out: dict = {"x0": x0, "cond": cond.float(), "unet_dtype": str(base.get_dtype()), "family": family}
    for source in job["sources"]:
        raw: dict[str, torch.Tensor] = {}
        layers = df.unet_layers(base.diffusion_model, source)

        def hook(name):
            def fn(_module, _inputs, output):
                raw[name] = output.detach().float().clone()
            return fn

        handles = [module.register_forward_hook(hook(name)) for name, module, _ in layers]
        try:
            feats = df.extract(model, LatentVAE(latent), images, clip, timestep=int(job["timestep"]),
                               resolution=int(job["resolution"]), source=source, seed=int(job["seed"]))
        finally:
            for handle in handles:
                handle.remove()
        out[source] = {"features": feats.features, "blocks": list(feats.blocks),
                       "raw": {n: raw[n] for n in feats.blocks}}
    torch.save(out, argv[1])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
