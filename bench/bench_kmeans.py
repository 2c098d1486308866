"""Time freeseg's k-means against scikit-learn's on the paper's problem size, at equal inertia.

The paper clusters a 32x32 map of 6400 UNet channels (1024 points x 6400 dims)
into K=4 clusters; the official code calls scikit-learn's ``KMeans(4,
n_init=10)`` on float64 points. For each data set and seed this runs both on
the same points, side by side, and prints each one's median seconds, the
speed-up (sklearn / ours, wall and CPU seconds) and both inertias in float64 (ours recomputed from
its labels on the float64 points), with their ratio (goal: <= 1.001).

Data (synthetic, deterministic per seed; no model weights needed):
* ``regions``: a map of 6 smooth-edged regions, a mean per region, a smooth
  low-rank variation over the map and noise: features with object-like
  clusters;
* ``lowrank``: 12 smooth random fields times random loadings plus noise
  (no true clusters: k-means has many local optima here, the hard case).

Usage: python bench/bench_kmeans.py [--seeds 3] [--repeats 3] [--k 4] [--device cpu] [--threads N]
Both libraries get the same number of CPU threads (torch's, or --threads).
The last line is one JSON object with the worst speed-up and worst inertia ratio.
"""

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script: the repository root importable
from freeseg.cluster import cluster_features  # noqa: E402

SIZE, CHANNELS = 32, 6400


def smooth_fields(n: int, gen: torch.Generator, sigma: float = 3.0) -> torch.Tensor:
    """n smooth random fields ``[n,32,32]`` float32 with unit standard deviation (periodic Gaussian blur)."""
    x = torch.randn(1, n, SIZE, SIZE, generator=gen)
    rad = int(3 * sigma)
    t = torch.arange(-rad, rad + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    x = F.conv2d(F.pad(x, (rad, rad, 0, 0), mode="circular"), k.view(1, 1, 1, -1).expand(n, 1, 1, -1), groups=n)
    x = F.conv2d(F.pad(x, (0, 0, rad, rad), mode="circular"), k.view(1, 1, -1, 1).expand(n, 1, -1, 1), groups=n)
    return x[0] / x[0].std()


def regions(seed: int) -> torch.Tensor:
    """Object-like features ``[1,6400,32,32]`` float32: 6 warped Voronoi regions, means, smooth variation, noise."""
    gen = torch.Generator().manual_seed(seed)
    n_regions = 6
    centres = torch.rand(n_regions, 2, generator=gen) * SIZE
    yy, xx = torch.meshgrid(torch.arange(SIZE).float(), torch.arange(SIZE).float(), indexing="ij")
    d = (yy[..., None] - centres[:, 0]) ** 2 + (xx[..., None] - centres[:, 1]) ** 2
    lab = (d + 20.0 * smooth_fields(n_regions, gen, 4.0).permute(1, 2, 0)).argmin(-1)
    means = torch.randn(n_regions, CHANNELS, generator=gen)
    vary = torch.einsum("rhw,rc->chw", smooth_fields(4, gen), 0.5 * torch.randn(4, CHANNELS, generator=gen))
    x = means[lab].permute(2, 0, 1) + vary + torch.randn(CHANNELS, SIZE, SIZE, generator=gen)
    return x.unsqueeze(0)


def lowrank(seed: int) -> torch.Tensor:
    """Cluster-free features ``[1,6400,32,32]`` float32: 12 smooth fields x random loadings + noise."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.einsum("rhw,rc->chw", smooth_fields(12, gen), torch.randn(12, CHANNELS, generator=gen))
    return (x + 0.5 * torch.randn(CHANNELS, SIZE, SIZE, generator=gen)).unsqueeze(0)


def inertia(points: np.ndarray, labels: np.ndarray) -> float:
    """Sum of squared distances of float64 points ``[N,C]`` to their cluster means."""
    total = 0.0
    for k in np.unique(labels):
        members = points[labels == k]
        total += float(((members - members.mean(axis=0)) ** 2).sum())
    return total


def timed(fn, sync) -> tuple[float, float, object]:
    """Wall seconds, CPU seconds of this process (all threads) and the result of ``fn()``."""
    start, start_cpu = time.perf_counter(), time.process_time()
    out = fn()
    sync()
    return time.perf_counter() - start, time.process_time() - start_cpu, out


def main() -> None:
    """Run both k-means on every data set and seed, print one row each and a JSON summary."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for both torch and scikit-learn (default: torch's default)")
    args = parser.parse_args()
    from sklearn import __version__ as sk_version
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    threadpool_limits(torch.get_num_threads())

    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    print(f"torch {torch.__version__} on {args.device} ({torch.get_num_threads()} threads), "
          f"scikit-learn {sk_version}; {SIZE * SIZE} points x {CHANNELS} dims, K={args.k}, n_init=10, "
          f"median of {args.repeats}")
    print("speed-up: wall seconds; cpu: CPU seconds of this process (with --threads 1 the figure a "
          "busy shared machine does not distort)")
    print(f"{'data':8s} {'seed':>4s} {'sklearn s':>10s} {'ours s':>8s} {'speed-up':>9s} {'cpu':>9s} "
          f"{'sklearn inertia':>16s} {'ours inertia':>16s} {'ratio':>9s}")
    speedups, cpu_speedups, ratios = [], [], []
    for name, make in (("regions", regions), ("lowrank", lowrank)):
        for seed in range(args.seeds):
            feats = make(seed)
            points = feats[0].reshape(CHANNELS, -1).T.double().numpy()
            feats_dev = feats.to(args.device)
            cluster_features(feats_dev, args.k, seed=seed)  # warm-up
            sync()
            runs = {"sklearn": [], "ours": []}
            for _ in range(args.repeats):  # interleaved, so load changes hit both alike
                runs["sklearn"].append(timed(lambda: KMeans(args.k, n_init=10, random_state=seed).fit(points),
                                             lambda: None))
                runs["ours"].append(timed(lambda: cluster_features(feats_dev, args.k, seed=seed), sync))
            t_sk, c_sk = (statistics.median(r[i] for r in runs["sklearn"]) for i in (0, 1))
            t_ours, c_ours = (statistics.median(r[i] for r in runs["ours"]) for i in (0, 1))
            ours = inertia(points, runs["ours"][-1][2].cpu().numpy().reshape(-1))
            theirs = inertia(points, runs["sklearn"][-1][2].labels_)
            speedups.append(t_sk / t_ours)
            cpu_speedups.append(c_sk / c_ours)
            ratios.append(ours / theirs)
            print(f"{name:8s} {seed:4d} {t_sk:10.3f} {t_ours:8.3f} {t_sk / t_ours:8.1f}x "
                  f"{c_sk / c_ours:8.1f}x {theirs:16.6e} {ours:16.6e} {ours / theirs:9.6f}")
    summary = {"device": args.device, "k": args.k, "min_speedup": round(min(speedups), 2),
               "median_speedup": round(statistics.median(speedups), 2),
               "min_cpu_speedup": round(min(cpu_speedups), 2),
               "median_cpu_speedup": round(statistics.median(cpu_speedups), 2),
               "max_inertia_ratio": round(max(ratios), 6)}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
