"""The fine feature grid (Diffusion Features' detail="fine"): block selection and its effect on
thin structures, on synthetic feature pyramids (synthetic/scenes.py)."""
from __future__ import annotations

import torch

from freeseg.cluster import cluster_features, labels_to_masks
from freeseg.capture import captured_to_features, select_blocks
from synthetic.scenes import matched_miou, scene_features, thin_scene


def _captured() -> dict[str, torch.Tensor]:
    """Query tokens of an SD1.5-like UNet at a 64x64 latent: factors 1, 2 and 4."""
    return {"input_1": torch.randn(1, 4096, 8), "input_4": torch.randn(1, 1024, 6),
            "input_7": torch.randn(1, 256, 4), "output_3": torch.randn(1, 256, 4),
            "output_6": torch.randn(1, 1024, 6), "output_9": torch.randn(1, 4096, 8)}


def test_fine_adds_the_half_latent_blocks() -> None:
    cap = _captured()
    assert select_blocks(cap, (64, 64)) == ["input_7", "output_3"]
    assert select_blocks(cap, (64, 64), fine=True) == ["input_4", "input_7", "output_3", "output_6"]
    feats, names = captured_to_features(cap, (64, 64), (64, 64), fine=True)
    assert feats.shape == (1, 6 + 4 + 4 + 6, 64, 64) and names == ["input_4", "input_7", "output_3", "output_6"]
    paper, _ = captured_to_features(cap, (64, 64), (32, 32))
    assert paper.shape == (1, 8, 32, 32)


def test_fine_grid_recovers_thin_structures_better() -> None:
    """The bench's setting (bench/bench_beyond.py --part fine), one scene: five 16x16 blocks on a
    32x32 grid (paper) vs the same plus five 32x32-token blocks on a 64x64 grid (fine)."""
    gt = thin_scene(512, seed=0)
    paper = scene_features(gt, 32, ((16, 64),) * 5, seed=0, noise=0.5)
    fine = scene_features(gt, 64, ((16, 64),) * 5 + ((32, 32),) * 5, seed=0, noise=0.5)
    ious = []
    for feats in (paper, fine):
        labels = cluster_features(feats, 4, n_init=3)
        ious.append(matched_miou(labels_to_masks(labels, (512, 512), 4).argmax(dim=1)[0], gt))
    assert ious[1] > ious[0] + 0.02, ious
