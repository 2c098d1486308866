"""Time freeseg.refine at 512x512 with K=4 masks on the CPU (or the GPU with --device cuda).

Usage: python bench/bench_refine.py [--size 512] [--masks 4] [--repeats 3] [--device cpu]
Prints the median wall time per image of each refine method after one warm-up call.
"""

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from freeseg.refine import refine_masks  # noqa: E402


def make_inputs(size: int, k: int, device: str):
    """A noisy image ``[1,S,S,3]`` of k-1 rectangles on a background, and blocky one-hot masks ``[1,k,S,S]``."""
    gen = torch.Generator().manual_seed(0)
    labels = torch.zeros(size, size, dtype=torch.long)
    for i in range(1, k):
        y0, x0 = (torch.randint(0, size * 3 // 4, (2,), generator=gen)).tolist()
        labels[y0:y0 + size // 4 + 7 * i, x0:x0 + size // 4 + 5 * i] = i
    palette = torch.rand(k, 3, generator=gen)
    image = (palette[labels] + 0.05 * torch.randn(size, size, 3, generator=gen)).clamp(0, 1)
    step = size // 32
    coarse = labels[step // 2::step, step // 2::step]
    blocky = coarse.repeat_interleave(step, 0).repeat_interleave(step, 1)[:size, :size]
    masks = F.one_hot(blocky, k).permute(2, 0, 1).float()
    return image.unsqueeze(0).to(device), masks.unsqueeze(0).to(device)


def time_method(image, masks, method: str, repeats: int) -> float:
    """Median seconds of ``refine_masks(image, masks, method)`` over ``repeats`` runs after a warm-up."""
    sync = torch.cuda.synchronize if masks.is_cuda else (lambda: None)
    refine_masks(image, masks, method)
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        refine_masks(image, masks, method)
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    """Parse arguments, run the benchmark, print one line per method."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--masks", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    image, masks = make_inputs(args.size, args.masks, args.device)
    print(f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}, "
          f"{args.size}x{args.size}, K={args.masks}, median of {args.repeats}")
    for method in ("crf", "guided"):
        print(f"{method:7s} {time_method(image, masks, method, args.repeats):.3f} s/image")


if __name__ == "__main__":
    main()
