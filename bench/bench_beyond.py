"""Measure the beyond-the-paper options on synthetic scenes with known ground truth.

No diffusion model runs here: the feature grids are built directly (synthetic/scenes.py:
one random vector per object class and UNet block, average-pooled to the block's token grid, plus
Gaussian noise, resized and concatenated as FreeSeg-Diff does), so what is measured is the
clustering-level behaviour of each option, not segmentation quality on real photographs.

Usage: python bench/bench_beyond.py [--part autok|instances|shared|fine|cost|all] [--seeds 5] [--n-init 3]
       [--heldout 100] [--threads 2]

Prints, side by side:
  autok     how often n_clusters=0 finds the true count (the regions covering >= 2% of the 32x32
            grid, background included), the matched mIoU with nearest upsampling and the seconds
            per image, for the method used (over-segment, then merge) and the one it replaced (K
            in 2..8 by the per-cluster silhouette), on the scenes it was tuned on (objects_scene:
            1..7 rectangles) and on held-out scenes (synthetic/heldout.py), at two noise levels;
  instances how often splitting the named mask gives the true number of instances (1..6);
  shared    label consistency across 8 frames of 3 moving objects: per-frame vs batch-shared;
  fine      mIoU on thin structures: paper grid 32x32 vs fine 64x64, nearest upsampling vs CRF;
  cost      clustering time at the real feature sizes (SD1.5, 512 px): fixed K, automatic K (used and
            replaced), fine grid.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script: the repository root importable
from freeseg.cluster import (auto_cluster_features, cluster_features, cluster_features_shared,  # noqa: E402
                             labels_to_masks)
from freeseg.instances import split_instances  # noqa: E402
from freeseg.refine import refine_masks  # noqa: E402
from freeseg.segments import Segments  # noqa: E402
from synthetic.scenes import (block_features, instances_scene, matched_miou, moving_scene,  # noqa: E402
                              objects_scene, scene_features, scene_image, thin_scene)
from freeseg.features import aggregate_maps  # noqa: E402
from synthetic.heldout import HELDOUT_SEED0, counted_regions, heldout_scene, region_count  # noqa: E402

PAPER_BLOCKS = ((16, 64),) * 5  # the five 16x16 query blocks (64 channels each instead of 1280)
FINE_BLOCKS = PAPER_BLOCKS + ((32, 32),) * 5  # plus five 32x32-token blocks (half the channels, as 640 vs 1280)


def silhouette_k(features: torch.Tensor, n_init: int, max_clusters: int = 8) -> tuple[torch.Tensor, int]:
    """The automatic K this pack used before (for comparison only; the rule and silhouette code
    that freeseg/cluster.py had, with the distance matrix computed once instead of once per K):
    every K in 2..max_clusters clustered, the K whose labelling has the best silhouette
    averaged per cluster wins (the smaller K on a tie). One image [1,C,h,w] with h*w <= 2048
    (all pixels scored, as before) -> (labels [1,h,w], K)."""
    x = features[0].reshape(features.shape[1], -1).T.float()
    x = x - x.mean(dim=0, keepdim=True)
    d = torch.cdist(x, x)  # [N,N]
    best, best_score = None, -2.0
    for k in range(2, max_clusters + 1):
        labels = cluster_features(features, k, n_init=n_init)
        onehot = torch.nn.functional.one_hot(labels.reshape(-1), k).float()  # [N,K]
        counts = onehot.sum(dim=0)
        if int((counts > 0).sum()) < 2:
            continue
        lab = labels.reshape(-1)
        sums = d @ onehot
        own = counts[lab]
        a = sums.gather(1, lab[:, None])[:, 0] / (own - 1).clamp_min(1)
        other = (sums / counts.clamp_min(1)).masked_fill(onehot.bool() | (counts == 0)[None, :], float("inf"))
        b = other.min(dim=1).values
        sil = torch.where(own > 1, (b - a) / torch.maximum(a, b).clamp_min(1e-12), torch.zeros_like(a))
        score = float(((onehot.T @ sil) / counts.clamp_min(1))[counts > 0].mean())
        if score > best_score + 1e-9:
            best, best_score = labels, score
    return best, int(best.max()) + 1


def part_autok(seeds: int, n_init: int, heldout: int = 100) -> None:
    print("== automatic K (n_clusters=0, max_clusters 8), 256 px, grid 32; right = the regions covering >= 2% "
          "of the 32x32 grid")
    print(f"   tuned: objects_scene, 1..7 rectangles + background, seeds 0..{seeds - 1} ({7 * seeds} scenes); "
          f"held-out: heldout_scene seeds {HELDOUT_SEED0}..{HELDOUT_SEED0 + heldout - 1} ({heldout} scenes)")
    print("   mIoU: matched, nearest upsampling, over all ground-truth regions / over the counted regions")
    methods = (("merge (used)", lambda f: auto_cluster_features(f, 8, n_init=n_init)),
               ("silhouette (before)", lambda f: silhouette_k(f, n_init)))
    print(f"{'set':>9} {'noise':>6} {'method':>20} {'right K':>13} {'mIoU all':>9} {'counted':>8} {'s/image':>8}")
    for name, scenes in (("tuned", [(objects_scene(n, 256, seed), seed) for n in range(1, 8) for seed in range(seeds)]),
                         ("held-out", [(heldout_scene(HELDOUT_SEED0 + i), HELDOUT_SEED0 + i) for i in range(heldout)])):
        for noise in (0.5, 1.0):
            feats = [scene_features(gt, 32, PAPER_BLOCKS, seed=seed, noise=noise) for gt, seed in scenes]
            for label, fn in methods:
                right, mious, counted, seconds = 0, [], [], []
                for (gt, _), f in zip(scenes, feats):
                    t = time.perf_counter()
                    labels, k = fn(f)
                    seconds.append(time.perf_counter() - t)
                    k = k[0] if isinstance(k, list) else k
                    right += k == region_count(gt)
                    pred = labels_to_masks(labels, tuple(gt.shape)).argmax(dim=1)[0]
                    mious.append(matched_miou(pred, gt))
                    counted.append(matched_miou(pred, gt, counted_regions(gt)))
                n = len(scenes)
                print(f"{name:>9} {noise:>6} {label:>20} {right:>4}/{n:<3} {100 * right / n:3.0f}% "
                      f"{statistics.mean(mious):>9.3f} {statistics.mean(counted):>8.3f} "
                      f"{statistics.median(seconds):>8.2f}", flush=True)
    print(f"(n_init={n_init}, CPU)")


def part_instances(seeds: int, n_init: int) -> None:
    print("== instances: 1..6 objects of ONE class (one named mask), 256 px, grid 32, K=2, min_area 0.002")
    print(f"{'instances':>9} {'exact count':>12} {'counts found':>20} {'paper (no split)':>17}")
    exact, total = 0, 0
    for m in range(1, 7):
        found = []
        for seed in range(seeds):
            cls, inst = instances_scene(m, 256, seed)
            feats = scene_features(cls, 32, PAPER_BLOCKS, seed=seed, noise=0.5)
            labels = cluster_features(feats, 2, n_init=n_init)
            masks = labels_to_masks(labels, (256, 256), 2)
            # name the cluster that covers most object pixels "object"; the other is background
            obj = int(torch.stack([(masks[0, k] * (cls > 0)).sum() for k in range(2)]).argmax())
            names = [["object" if k == obj else None for k in range(2)]]
            seg = split_instances(Segments(masks, names, [[1.0, 1.0]], [["object"]]), 0.002)
            found.append(sum(1 for r in seg.records() if r["area"] > 0))
        hits = sum(f == m for f in found)
        exact, total = exact + hits, total + seeds
        print(f"{m:>9} {hits:>7}/{seeds:<4} {str(found):>20} {'1 mask':>17}")
    print(f"{'all':>9} {exact:>7}/{total:<4}")


def consistency(labels: torch.Tensor, gt: torch.Tensor) -> float:
    """Mean over objects of the fraction of frames where the object's majority label is the
    one it has in frame 0 (labels, gt: [T,H,W])."""
    scores = []
    for obj in range(int(gt.max()) + 1):
        majority = []
        for t in range(gt.shape[0]):
            sel = labels[t][gt[t] == obj]
            majority.append(int(sel.mode().values) if sel.numel() else -1)
        scores.append(sum(m == majority[0] for m in majority) / len(majority))
    return sum(scores) / len(scores)


def part_shared(seeds: int, n_init: int) -> None:
    print("== one labelling across a batch: 8 frames, 3 moving objects + background, 256 px, grid 32, K=4")
    print(f"{'seed':>5} {'per-frame consistency':>22} {'shared consistency':>19} {'per-frame mIoU':>15} "
          f"{'shared mIoU':>12}")
    own_all, shared_all = [], []
    for seed in range(seeds):
        gt = moving_scene(8, 3, 256, seed)
        vectors = [torch.randn(4, c, generator=torch.Generator().manual_seed(seed * 100 + j)) for j, (_, c) in
                   enumerate(PAPER_BLOCKS)]
        maps = [block_features(gt, tokens, c, seed * 100 + j + 50, noise=0.5, class_vectors=vectors[j])
                for j, (tokens, c) in enumerate(PAPER_BLOCKS)]
        feats = aggregate_maps(maps, (32, 32))
        up = lambda lab: labels_to_masks(lab, (256, 256), 4).argmax(dim=1)  # noqa: E731
        own = up(cluster_features(feats, 4, n_init=n_init))
        shared = up(cluster_features_shared(feats, 4, n_init=n_init))
        c_own, c_shared = consistency(own, gt), consistency(shared, gt)
        m_own = statistics.mean(matched_miou(own[t], gt[t]) for t in range(8))
        m_shared = statistics.mean(matched_miou(shared[t], gt[t]) for t in range(8))
        own_all.append(c_own)
        shared_all.append(c_shared)
        print(f"{seed:>5} {c_own:>22.3f} {c_shared:>19.3f} {m_own:>15.3f} {m_shared:>12.3f}")
    print(f"{'mean':>5} {statistics.mean(own_all):>22.3f} {statistics.mean(shared_all):>19.3f}")


def part_fine(seeds: int, n_init: int) -> None:
    print("== finer masks: thin bars and a thin frame (2..8 px) + a large object, 512 px, K=4")
    print(f"{'seed':>5} {'paper':>7} {'paper+CRF':>10} {'fine':>7} {'fine+CRF':>9}   (matched mIoU)")
    rows, times = [], {"paper": [], "fine": [], "crf": []}
    for seed in range(seeds):
        gt = thin_scene(512, seed)
        image = scene_image(gt, seed)
        row = []
        for name, grid, blocks in (("paper", 32, PAPER_BLOCKS), ("fine", 64, FINE_BLOCKS)):
            feats = scene_features(gt, grid, blocks, seed=seed, noise=0.5)
            t = time.perf_counter()
            masks = labels_to_masks(cluster_features(feats, 4, n_init=n_init), (512, 512), 4)
            times[name].append(time.perf_counter() - t)
            t = time.perf_counter()
            refined = refine_masks(image, masks, method="crf")
            times["crf"].append(time.perf_counter() - t)
            row += [matched_miou(masks.argmax(dim=1)[0], gt), matched_miou(refined.argmax(dim=1)[0], gt)]
        rows.append(row)
        print(f"{seed:>5} {row[0]:>7.3f} {row[1]:>10.3f} {row[2]:>7.3f} {row[3]:>9.3f}")
    mean = [statistics.mean(r[i] for r in rows) for i in range(4)]
    print(f"{'mean':>5} {mean[0]:>7.3f} {mean[1]:>10.3f} {mean[2]:>7.3f} {mean[3]:>9.3f}")
    print(f"median k-means: paper {statistics.median(times['paper']):.2f} s, fine "
          f"{statistics.median(times['fine']):.2f} s; median CRF {statistics.median(times['crf']):.2f} s "
          f"(n_init={n_init}, CPU)")


def part_cost(seeds: int, n_init: int) -> None:
    print("== cost at the real sizes (CPU, n_init=10 as the library default)")
    g = torch.Generator().manual_seed(0)
    paper = torch.randn(1, 6400, 32, 32, generator=g)  # SD1.5 at 512 px: 5 x 1280 channels, 32x32 grid
    fine = torch.randn(1, 6400 + 3200, 64, 64, generator=g)  # plus 5 x 640 channels, 64x64 grid
    # a held-out scene with 5 objects at the real channel count (structured, unlike random features)
    scene = scene_features(heldout_scene(HELDOUT_SEED0 + 5), 32, ((16, 1280),) * 5, seed=HELDOUT_SEED0 + 5, noise=0.5)
    rows = []
    for what, feats in (("held-out scene", scene), ("random features", paper)):
        rows += [(f"{what}, paper grid, K=4", lambda f=feats: cluster_features(f, 4)),
                 (f"{what}, paper grid, n_clusters=0 (merge, used)", lambda f=feats: cluster_features(f, 0)),
                 (f"{what}, paper grid, silhouette K 2..8 (before)", lambda f=feats: silhouette_k(f, 10))]
    rows.append(("random features, fine grid, K=4", lambda: cluster_features(fine, 4)))
    for name, fn in rows:
        t = time.perf_counter()
        fn()
        print(f"{name:>56}: {time.perf_counter() - t:6.2f} s", flush=True)


PARTS = {"autok": part_autok, "instances": part_instances, "shared": part_shared, "fine": part_fine,
         "cost": part_cost}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=[*PARTS, "all"], default="all")
    ap.add_argument("--seeds", type=int, default=5, help="scenes per setting")
    ap.add_argument("--n-init", type=int, default=3, help="k-means restarts (library default 10)")
    ap.add_argument("--heldout", type=int, default=100, help="held-out scenes for --part autok")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (1 on a busy machine)")
    args = ap.parse_args()
    torch.set_num_threads(max(1, min(torch.get_num_threads(), args.threads)))
    for name, fn in PARTS.items():
        if args.part in (name, "all"):
            fn(args.seeds, args.n_init, **({"heldout": args.heldout} if name == "autok" else {}))
            print(flush=True)


if __name__ == "__main__":
    main()
