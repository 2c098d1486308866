"""Measure the beyond-the-paper options on synthetic scenes with known ground truth.

No diffusion model runs here: the feature grids are built directly (synthetic/scenes.py:
one random vector per object class and UNet block, average-pooled to the block's token grid, plus
Gaussian noise, resized and concatenated as FreeSeg-Diff does), so what is measured is the
clustering-level behaviour of each option, not segmentation quality on real photographs.

Usage: python bench/bench_beyond.py [--part autok|instances|shared|fine|cost|all] [--seeds 5] [--n-init 3]

Prints, side by side:
  autok     how often n_clusters=0 finds the true count (1..7 objects + background), with the
            per-cluster silhouette (used) and the usual per-pixel silhouette, at two noise levels;
  instances how often splitting the named mask gives the true number of instances (1..6);
  shared    label consistency across 8 frames of 3 moving objects: per-frame vs batch-shared;
  fine      mIoU on thin structures: paper grid 32x32 vs fine 64x64, nearest upsampling vs CRF;
  cost      clustering time at the real feature sizes (SD1.5, 512 px): fixed K, automatic K, fine grid.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script: the repository root importable
from freeseg.cluster import (cluster_features, cluster_features_shared, labels_to_masks,  # noqa: E402
                             silhouette_score)
from freeseg.instances import split_instances  # noqa: E402
from freeseg.refine import refine_masks  # noqa: E402
from freeseg.segments import Segments  # noqa: E402
from synthetic.scenes import (block_features, instances_scene, matched_miou, moving_scene,  # noqa: E402
                              objects_scene, scene_features, scene_image, thin_scene)
from freeseg.features import aggregate_maps  # noqa: E402

PAPER_BLOCKS = ((16, 64),) * 5  # the five 16x16 query blocks (64 channels each instead of 1280)
FINE_BLOCKS = PAPER_BLOCKS + ((32, 32),) * 5  # plus five 32x32-token blocks (half the channels, as 640 vs 1280)


def auto_k(features: torch.Tensor, n_init: int, max_clusters: int = 8) -> tuple[int, int]:
    """(K by per-cluster silhouette, K by per-pixel silhouette) for one image [1,C,h,w]."""
    points = features[0].reshape(features.shape[1], -1).T
    best = {True: (-2.0, 0), False: (-2.0, 0)}
    for k in range(2, max_clusters + 1):
        labels = cluster_features(features, k, n_init=n_init).reshape(-1)
        for per_cluster in (True, False):
            s = silhouette_score(points, labels, per_cluster=per_cluster)
            if s > best[per_cluster][0] + 1e-9:
                best[per_cluster] = (s, int(labels.max()) + 1)
    return best[True][1], best[False][1]


def part_autok(seeds: int, n_init: int) -> None:
    print("== automatic K (n_clusters=0, K in 2..8): scenes of 1..7 objects + background, 256 px, grid 32")
    print(f"{'noise':>6} {'objects':>8} {'per-cluster sil.':>17} {'per-pixel sil.':>15}")
    for noise in (0.5, 1.0):
        hits, hits_px, total, seconds = 0, 0, 0, []
        for n in range(1, 8):
            row, row_px = 0, 0
            for seed in range(seeds):
                gt = objects_scene(n, 256, seed)
                feats = scene_features(gt, 32, PAPER_BLOCKS, seed=seed, noise=noise)
                t = time.perf_counter()
                k, k_px = auto_k(feats, n_init)
                seconds.append(time.perf_counter() - t)
                row += k == n + 1
                row_px += k_px == n + 1
            hits, hits_px, total = hits + row, hits_px + row_px, total + seeds
            print(f"{noise:>6} {n:>8} {row:>11}/{seeds:<5} {row_px:>9}/{seeds:<5}")
        print(f"{noise:>6} {'all':>8} {hits:>11}/{total:<5} {hits_px:>9}/{total:<5} "
              f"(median {statistics.median(seconds):.2f} s per image for both, n_init={n_init})")


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
    print("== cost at the real sizes (random features, CPU, n_init=10 as the library default)")
    g = torch.Generator().manual_seed(0)
    paper = torch.randn(1, 6400, 32, 32, generator=g)  # SD1.5 at 512 px: 5 x 1280 channels, 32x32 grid
    fine = torch.randn(1, 6400 + 3200, 64, 64, generator=g)  # plus 5 x 640 channels, 64x64 grid
    rows = [("paper grid, K=4", lambda: cluster_features(paper, 4)),
            ("paper grid, n_clusters=0 (K 2..8)", lambda: cluster_features(paper, 0)),
            ("fine grid, K=4", lambda: cluster_features(fine, 4))]
    for name, fn in rows:
        t = time.perf_counter()
        fn()
        print(f"{name:>36}: {time.perf_counter() - t:6.2f} s")


PARTS = {"autok": part_autok, "instances": part_instances, "shared": part_shared, "fine": part_fine,
         "cost": part_cost}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=[*PARTS, "all"], default="all")
    ap.add_argument("--seeds", type=int, default=5, help="scenes per setting")
    ap.add_argument("--n-init", type=int, default=3, help="k-means restarts (library default 10)")
    args = ap.parse_args()
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 2)))
    for name, fn in PARTS.items():
        if args.part in (name, "all"):
            fn(args.seeds, args.n_init)
            print(flush=True)


if __name__ == "__main__":
    main()
