"""Mask refinement: a dense CRF and a guided filter written in plain torch.

FreeSeg-Diff clusters Stable Diffusion features at 1/8..1/32 of the image
resolution, so its masks have blocky edges. The paper snaps them to image
edges with a fully connected CRF (pydensecrf). This package re-implements that
CRF in torch (CPU or GPU, no C++ build) and adds a cheaper guided filter.

Public API
----------
``refine_masks(image, masks, method="crf", named=None, **params)``
    image ``[B,H,W,3]`` float 0..1 (ComfyUI IMAGE layout), masks ``[B,K,H,W]``
    float 0..1, named ``[B,K]`` bools (which masks carry a name; None: all)
    -> ``[B,K,H,W]`` float32 on the masks' device.
``dense_crf(image_hw3, labels_hw, n_labels, **params)``
    mean-field inference of the (joint, n-label) dense CRF -> Q ``[n_labels,H,W]`` float32.
``guided_filter(guide, src, radius, eps)``
    He et al. guided filter with a colour guide.
``REFINE_METHODS``, ``CRF_DEFAULTS``, ``GUIDED_DEFAULTS``
    the method names and the parameter defaults of the CRF and guided methods.

Modules, one concern each
-------------------------
``masks``: ``refine_masks`` and its procedures on K masks (the paper's per-mask
CRFs, the joint CRF, the guided filter with its image-scaled radius, and
"crf_guard", the default: the CRF checked by the guided filter);
``crf``: the dense CRF model (unary, Potts kernels, mean field, the spatial
Gaussian); ``lattice``: the permutohedral lattice behind the CRF's bilateral
kernel; ``guided``: the guided filter.
"""

from .crf import CRF_DEFAULTS, dense_crf
from .guided import guided_filter
from .masks import GUIDED_DEFAULTS, REFINE_METHODS, refine_masks

__all__ = ["refine_masks", "dense_crf", "guided_filter", "REFINE_METHODS",
           "CRF_DEFAULTS", "GUIDED_DEFAULTS"]
