"""A random-weight SAM 3 checkpoint in the layout core ComfyUI's SAM 3 loader detects (ComfyUI
2026, e.g. the 0.33.0 tree): ``detector.*`` and ``tracker.*`` keys at the top level, with
``detector.backbone.vision_backbone.trunk.blocks.0.attn.qkv.weight`` and
``detector.transformer.decoder.query_embed.weight`` (``comfy/model_detection.py``), so
*Load Checkpoint* gives a SAM3 ``MODEL`` that core *SAM3 Detect* runs.

Real size only: ComfyUI builds SAM 3 from one fixed architecture (nothing is read from the
state dict), so the checkpoint has all of its 506,593,208 parameters (1.0 GB in fp16). No text
encoder weights (text prompts are not what the pack feeds SAM 3: it sends boxes). Not part of
the fixture cache: building needs a ComfyUI that has SAM 3 (``$FREESEG_COMFYUI_DIR``), and one
box prompt takes minutes on a CPU (see README, "Boxes for SAM 3").
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .models import _metadata, _save_safetensors, _seeded, import_comfy

SAM3_SEED = 4242


def sam3_shapes() -> dict[str, torch.Size]:
    """{key: shape} of the SAM 3 model as the ComfyUI tree at $FREESEG_COMFYUI_DIR builds it
    (on the meta device: nothing is allocated)."""
    import_comfy()
    try:
        import comfy.ops
        from comfy.ldm.sam3.detector import SAM3Model
    except ImportError as exc:
        raise RuntimeError(f"this ComfyUI has no SAM 3 ({exc}); set FREESEG_COMFYUI_DIR to a 2026 tree "
                           "(.cache/ComfyUI-0.33.0)") from exc
    with torch.device("meta"):
        model = SAM3Model(dtype=torch.float16, device="meta", operations=comfy.ops.manual_cast)
    return {k: v.shape for k, v in model.state_dict().items()}


def build_sam3_checkpoint(path: str | os.PathLike, seed: int = SAM3_SEED) -> str:
    """Write the random SAM 3 checkpoint (fp16) to ``path``; return it. Weights N(0, 0.02),
    biases 0, norm scales (1-D weights) 1, so activations stay finite through the network."""
    sd = {}
    with _seeded(seed):
        for key, shape in sam3_shapes().items():
            if key.endswith(".bias"):
                sd[key] = torch.zeros(shape, dtype=torch.float16)
            elif key.endswith(".weight") and len(shape) == 1:
                sd[key] = torch.ones(shape, dtype=torch.float16)
            else:
                sd[key] = (torch.randn(shape) * 0.02).to(torch.float16)
    return str(_save_safetensors(sd, Path(path), _metadata("sam3", seed)))
