"""Folder segmentation on one ComfyUI server vs two: wall time and speed-up, side by side.

    .venv/bin/python bench/bench_servers.py [--images 8] [--resolution 128] [--per-server 2]

Starts two real ComfyUI servers on loopback (CPU, the random-weight fixtures), warms each up
with an image of its own (model loading is not timed), then segments `--images` new pictures
with ``python -m freeseg segment DIR --url A`` and another `--images` new pictures with
``--url A --url B`` (in-process ``freeseg.app.segment.main``; different pictures, so no run
is served from ComfyUI's cache). On a machine with one GPU per server the speed-up approaches
the number of servers; on a CPU-only machine the servers share the cores ("server CPU
s/image": CPU time the server processes spent per image, all threads).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import time


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script: the repository root importable

from freeseg.app import segment  # noqa: E402
from freeseg.app.server import ComfyServer, link  # noqa: E402
from synthetic.cache import build_all_subprocess  # noqa: E402
from synthetic.scenes import write_test_image  # noqa: E402

CLASS_NAMES = "dog, cat, tree, sky"


def pictures(folder: str, seeds: range) -> str:
    os.makedirs(folder, exist_ok=True)
    for s in seeds:
        write_test_image(os.path.join(folder, f"img{s:03d}.png"), 96, 64, s)
    return folder


def cpu_seconds(servers: list[ComfyServer]) -> float:
    """CPU time (user + system) the server processes used so far (Linux /proc; NaN elsewhere)."""
    total = 0.0
    for srv in servers:
        try:
            with open(f"/proc/{srv.proc.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            return float("nan")
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def run(folder: str, out: str, urls: list[str], args: argparse.Namespace) -> float:
    """Seconds `python -m freeseg segment folder --out out --url ...` took (in-process)."""
    argv = [folder, "--out", out, "--quiet", "--class-names", CLASS_NAMES, "--resolution", str(args.resolution),
            "--set", "FreeSegCaption.max_new_tokens=8", "--per-server", str(args.per_server), "--seed", "0"]
    for url in urls:
        argv += ["--url", url]
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()) as captured:
        code = segment.main(argv)
    seconds = time.perf_counter() - start
    summary = json.loads(captured.getvalue())
    if code != 0 or summary["done"] != summary["images"]:
        raise SystemExit(f"the run failed (exit {code}): {summary}")
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8, help="pictures per timed run (default 8)")
    parser.add_argument("--resolution", type=int, default=128, help="features pass resolution (default 128)")
    parser.add_argument("--per-server", type=int, default=2, help="prompts in flight per server (default 2)")
    args = parser.parse_args()
    files = build_all_subprocess()
    work = tempfile.mkdtemp(prefix="freeseg-bench-servers-")
    servers = []
    try:
        for name in "ab":
            base = os.path.join(work, f"comfy-{name}")
            for key, (folder, fname) in segment.RANDOM_MODEL_LINKS.items():
                link(files[key], os.path.join(base, "models", folder, fname))
            servers.append(ComfyServer(base).start())
        a, b = servers
        for i, srv in enumerate(servers):  # warm-up: models loaded, not timed
            run(pictures(os.path.join(work, f"warm{i}"), range(1000 + i, 1001 + i)), os.path.join(work, f"w{i}"),
                [srv.url], args)
        n = args.images
        cpu0 = cpu_seconds(servers)
        one = run(pictures(os.path.join(work, "set1"), range(n)), os.path.join(work, "out1"), [a.url], args)
        cpu1 = cpu_seconds(servers)
        two = run(pictures(os.path.join(work, "set2"), range(n, 2 * n)), os.path.join(work, "out2"),
                  [a.url, b.url], args)
        cpu2 = cpu_seconds(servers)
    finally:
        for srv in servers:
            srv.stop()
    print(f"{n} images {96}x{64}, resolution {args.resolution}, {args.per_server} prompts in flight per server, "
          f"{os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f}")
    print(f"{'servers':>8} {'seconds':>9} {'s/image':>9} {'speed-up':>9} {'server CPU s/image':>19}")
    print(f"{1:>8} {one:>9.1f} {one / n:>9.2f} {1.0:>9.2f} {(cpu1 - cpu0) / n:>19.2f}")
    print(f"{2:>8} {two:>9.1f} {two / n:>9.2f} {one / two:>9.2f} {(cpu2 - cpu1) / n:>19.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
