"""Folder segmentation on one ComfyUI server vs two (Ray): images/s, speed-up, and the
per-image overhead of Ray.

    .venv/bin/python bench/bench_servers.py [--images 8] [--resolution 128] [--per-server 2]

Starts two real ComfyUI servers on loopback (CPU, the random-weight fixtures), warms each up
with an image of its own (model loading is not timed), starts a local Ray (timed apart), then
segments `--images` new pictures per run (in-process ``freeseg.app.segment.main``; different
pictures each run, so no run is served from ComfyUI's cache):

* ``--url A``: one server, in this process, without Ray;
* ``--url A --ray``: one Ray worker bound to A;
* ``--url A --url B``: two Ray workers (several servers run on Ray).

Ray's overhead per image, two ways: (one Ray worker's seconds - its actors' start - one
server's seconds without Ray) / images (noisy: the difference of two timed runs), and Ray's
transport alone: the round trip of an image through an actor that does what `Worker.segment_files`
does around the segmentation (the job and the image's bytes in, a temporary image and output
folder, the files of a real result back, written by the driver), averaged over 50 calls. Both
are also given as a share of one image's time without Ray. The old
scheduler's figures (``freeseg.app.pool``, removed by issue 19) are printed beside, as measured
with this script before its removal. On a machine with one GPU per server the speed-up approaches
the number of servers; on a CPU-only machine the servers share the cores ("server CPU s/image":
CPU time the server processes spent per image, all threads).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import sys
import tempfile
import time


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script: the repository root importable

import ray  # noqa: E402  (the cluster extra, requirements-cluster.txt)

from freeseg.app import segment  # noqa: E402
from freeseg.app.cluster import RayWorkers, WorkerSpec, read_bytes, write_files  # noqa: E402
from freeseg.app.paths import REPO  # noqa: E402
from freeseg.app.server import ComfyServer, link  # noqa: E402
from synthetic.cache import build_all_subprocess  # noqa: E402
from synthetic.scenes import write_test_image  # noqa: E402

CLASS_NAMES = "dog, cat, tree, sky"
# The old scheduler (freeseg.app.pool, threads and slots per server), this script's command before
# issue 19 removed it: 2026-12-07 on the 2-core development machine (8 images, resolution 128,
# 2 per server), two runs, load average 0.9 and 8.8: (servers, seconds) pairs.
OLD_SCHEDULER = (((1, 1.4), (2, 8.8)), ((1, 53.7), (2, 43.5)))


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


def run(folder: str, out: str, urls: list[str], args: argparse.Namespace, ray: bool = False) -> float:
    """Seconds `python -m freeseg segment folder --out out --url ... [--ray]` took (in-process)."""
    argv = [folder, "--out", out, "--quiet", "--class-names", CLASS_NAMES, "--resolution", str(args.resolution),
            "--set", "FreeSegCaption.max_new_tokens=8", "--per-server", str(args.per_server), "--seed", "0"]
    for url in urls:
        argv += ["--url", url]
    if ray:
        argv.append("--ray")
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()) as captured:
        code = segment.main(argv)
    seconds = time.perf_counter() - start
    summary = json.loads(captured.getvalue())
    if code != 0 or summary["done"] != summary["images"]:
        raise SystemExit(f"the run failed (exit {code}): {summary}")
    return seconds


class Transport:
    """Ray's part of an image, without the segmentation: what ``cluster.Worker.segment_files``
    does around it (the image to a temporary file, the output files read back)."""

    def __init__(self, files: dict):
        self.files = files

    def segment_files(self, job, data: bytes, ext: str, source: str, class_names) -> dict:
        with tempfile.TemporaryDirectory() as tmp:
            with open(os.path.join(tmp, "image" + ext), "wb") as f:
                f.write(data)
            out = os.path.join(tmp, "out")
            os.makedirs(out)
            for name, payload in self.files.items():
                with open(os.path.join(out, name), "wb") as f:
                    f.write(payload)
            back = {}
            for name in sorted(os.listdir(out)):
                with open(os.path.join(out, name), "rb") as f:
                    back[name] = f.read()
            return back


def transport_seconds(result_dir: str, image: str, args: argparse.Namespace, calls: int = 50) -> float:
    """Mean seconds of one image's round trip through a Ray actor (`Transport`), with the job
    of a real run and the files of a real result (`result_dir`), written by the driver."""
    files = {}
    for name in [n for n in os.listdir(result_dir) if n != "done.json"]:
        with open(os.path.join(result_dir, name), "rb") as f:
            files[name] = f.read()
    parsed = segment.build_parser().parse_args([image, "--out", "x", "--resolution", str(args.resolution)])
    job = segment.workflow_job(parsed, {}, [], CLASS_NAMES)
    actor = ray.remote(Transport).options(num_cpus=0).remote(files)
    data, ext = read_bytes(image)
    ray.get(actor.segment_files.remote(job, data, ext, image, CLASS_NAMES))  # started
    out = tempfile.mkdtemp(prefix="freeseg-transport-")
    start = time.perf_counter()
    for _ in range(calls):
        data, ext = read_bytes(image)
        write_files(out, ray.get(actor.segment_files.remote(job, data, ext, image, CLASS_NAMES)))
    seconds = (time.perf_counter() - start) / calls
    ray.kill(actor)
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
        start = time.perf_counter()
        ray.init(num_cpus=max(2, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": REPO}}, logging_level=logging.WARNING)
        ray_start = time.perf_counter() - start
        start = time.perf_counter()
        RayWorkers([WorkerSpec("url", url=a.url)], stream=io.StringIO()).close()  # what each Ray run starts
        actors_start = time.perf_counter() - start
        n = args.images
        rows = []
        for label, urls, on_ray in (("1 server, no Ray", [a.url], False), ("1 Ray worker", [a.url], True),
                                    ("2 Ray workers", [a.url, b.url], False)):
            cpu0 = cpu_seconds(servers)
            k = len(rows)
            seconds = run(pictures(os.path.join(work, f"set{k}"), range(k * n, (k + 1) * n)),
                          os.path.join(work, f"out{k}"), urls, args, ray=on_ray)
            rows.append((label, seconds, (cpu_seconds(servers) - cpu0) / n))
        transport = transport_seconds(os.path.join(work, "out0", "img000"), os.path.join(work, "set0", "img000.png"),
                                      args)
    finally:
        for srv in servers:
            srv.stop()
        if ray.is_initialized():
            ray.shutdown()
    print(f"{n} images {96}x{64}, resolution {args.resolution}, {args.per_server} prompts in flight per server, "
          f"{os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f}")
    print(f"local Ray start {ray_start:.1f} s (not in the rows), a run's actors start {actors_start:.1f} s (in each "
          "Ray row)")
    print(f"{'run':>17} {'seconds':>9} {'images/s':>9} {'s/image':>9} {'speed-up':>9} {'server CPU s/image':>19}")
    base = rows[0][1]
    for label, seconds, cpu in rows:
        print(f"{label:>17} {seconds:>9.1f} {n / seconds:>9.3f} {seconds / n:>9.2f} {base / seconds:>9.2f} {cpu:>19.2f}")
    overhead = (rows[1][1] - actors_start - base) / n
    print(f"Ray's overhead per image, from the runs: {overhead:+.3f} s = {100 * overhead / (base / n):+.1f}% of an "
          f"image's {base / n:.2f} s without Ray (goal <= 5%)")
    print(f"Ray's transport per image (50 round trips): {transport * 1000:.1f} ms = "
          f"{100 * transport / (base / n):.2f}% of an image's {base / n:.2f} s without Ray (goal <= 5%)")
    for i, pairs in enumerate(OLD_SCHEDULER, 1):
        print(f"old scheduler, run {i} (before issue 19): " + ", ".join(
            f"{servers_} server(s) {seconds:.1f} s = {n / seconds:.3f} images/s" for servers_, seconds in pairs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
