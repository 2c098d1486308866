"""CPU threads of Cluster Masks / Refine Masks on a shared machine: torch's default count vs
one thread vs the rule the nodes apply (``freeseg.threads.cpu_threads``).

Usage::

    .venv/bin/python bench/bench_threads.py                 # as the machine is now
    .venv/bin/python bench/bench_threads.py --load 2        # plus 2 busy `yes > /dev/null` processes

Workloads (one 512 px image, what the nodes run per image): the CRF of Refine Masks
(``refine_masks(..., "crf")``, 4 named masks; ``bench_refine.make_inputs``) and the k-means of
Cluster Masks (``cluster_features``: a 32x32 grid of 6400 channels, K=4, n_init 10). Each
repeat runs every setting once, interleaved (default, 1 thread, the rule), so a drift of the
machine's load hits all of them alike; medians are printed, with the load averages and the
thread count the rule chose at each repeat. ``--load N`` starts N ``yes`` processes (stopped at
the end). The last line is one JSON object with the figures. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench_refine
from bench_refine import make_inputs  # noqa: E402

from freeseg.cluster import cluster_features  # noqa: E402
from freeseg.refine import refine_masks  # noqa: E402
from freeseg.threads import cpu_threads, torch_threads  # noqa: E402


def workloads(size: int):
    """{name: callable} of the two per-image workloads."""
    image, masks = make_inputs(size, 4, "cpu")
    named = [[True] * masks.shape[1]]
    feats = torch.randn(1, 6400, size // 16, size // 16, generator=torch.Generator().manual_seed(0)).half()
    return {"crf": lambda: refine_masks(image, masks, "crf", named=named),
            "kmeans": lambda: cluster_features(feats, 4, seed=0, n_init=10)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--load", type=int, default=0, help="busy `yes` processes to start for the run")
    args = p.parse_args(argv)
    default = torch.get_num_threads()
    loaders = [subprocess.Popen(["yes"], stdout=subprocess.DEVNULL) for _ in range(args.load)]
    try:
        time.sleep(2.0 if loaders else 0.0)
        work = workloads(args.size)
        for fn in work.values():  # warm-up
            fn()
        times: dict[str, dict[str, list[float]]] = {w: {"default": [], "one": [], "rule": []} for w in work}
        chosen, loads = [], []
        for _ in range(args.repeats):
            loads.append(round(os.getloadavg()[0], 2))
            for name, fn in work.items():
                for setting in ("default", "one", "rule"):
                    n = {"default": default, "one": 1}.get(setting) or cpu_threads()
                    if setting == "rule":
                        chosen.append(n)
                    with torch_threads(n):
                        t0 = time.perf_counter()
                        fn()
                        times[name][setting].append(time.perf_counter() - t0)
    finally:
        for proc in loaders:
            proc.terminate()
            proc.wait()
    med = {w: {s: round(statistics.median(v), 3) for s, v in d.items()} for w, d in times.items()}
    print(f"bench_threads: {args.size} px, {args.repeats} repeats, torch default {default} threads, "
          f"{len(os.sched_getaffinity(0))} usable CPUs, {args.load} extra busy processes; 1-min load average "
          f"{min(loads)}..{max(loads)}; the rule chose {sorted(set(chosen))} threads")
    print("| workload | torch default, s | 1 thread, s | rule, s | default / rule |")
    print("|---|---|---|---|---|")
    for w, m in med.items():
        print(f"| {w} | {m['default']:.3f} | {m['one']:.3f} | {m['rule']:.3f} | {m['default'] / m['rule']:.2f} |")
    print(json.dumps({"size": args.size, "repeats": args.repeats, "default_threads": default, "load": args.load,
                      "load_average": loads, "rule_threads": chosen, "median_s": med}, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
