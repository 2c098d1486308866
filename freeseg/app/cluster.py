"""Past one server: the images of a run on Ray (``freeseg segment ... --ray [ADDRESS]``,
``freeseg eval ... --ray``, or several ``--url``).

Ray core actors, not Ray Data: each actor (`Worker`) owns one worker for the whole run:

* ``url``: one of the ``--url`` servers (the actor talks to it over HTTP);
* ``embedded``: a ComfyUI server the actor starts on its own node (``freeseg.app.segment.embedded_server``,
  with the node's GPU: ``num_gpus=1`` per actor when the cluster has GPUs, CPU otherwise);
* ``diffusers``: ``freeseg.backends.diffusers`` loaded in the actor (``num_gpus=1`` likewise).

The driver (`RayWorkers`) sends each image's bytes to a free actor and gets the result back (the
output folder's files, or the masks): only the driver reads inputs and writes outputs, so the
actors may run on other machines, and an image's files are written once, when its result is back.
Ray core actors were chosen over Ray Data's ``map_batches``: the batch, its resume markers and
its index (``freeseg.app.batch``) stay as they are, an image is one actor call, and no extra
(``ray[data]``, pyarrow) is needed.

Failures: Ray does the retries. Actors are created with ``max_restarts`` and ``max_task_retries``:

* an actor process that dies (killed, out of memory, its node lost) is restarted by Ray and the
  calls it held are run again on the restarted actor;
* a worker whose ComfyUI server is lost (``ComfyConnectionError``) exits, so Ray restarts it: an
  embedded server is started afresh, a ``--url`` server is connected again;
* an actor that cannot be (re)started (its server does not start or answer) is dead: the driver
  drops it with a warning and sends its images to the other actors; with none left the run stops
  (`NoWorkerLeft`, naming each worker's reason);
* an error of the image itself (a node fails on it) is not retried: that image fails alone.

Without ADDRESS a local Ray is started (light: no dashboard); ``auto`` or ``ray://host:10001``
joins a running cluster, whose nodes need this project (same path, or installed) and, for
embedded workers, the models at the paths given.
"""

from __future__ import annotations

import os
import queue
import re
import socket
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, TextIO

from .client import ComfyClient, ComfyConnectionError, ComfyError, one_line
from .output import SegmentError
from .paths import REPO

RAY_INSTALL = "pip install -r requirements-cluster.txt (ray==2.60.0; or pip install 'freeseg-diff[cluster]')"
RESTARTS = 2  # Ray restarts of a dead actor (and retries of the calls it held)


class NoWorkerLeft(ComfyError):
    """No live worker is left to run an image on (the message gives each worker's reason)."""


def import_ray() -> Any:
    """The ``ray`` module; SegmentError saying what to install when it is missing."""
    try:
        import ray
    except ImportError:
        raise SegmentError(f"--ray (and several --url) run on Ray, an optional extra that is not installed: "
                           f"{RAY_INSTALL}") from None
    return ray


@dataclass
class WorkerSpec:
    """What one actor owns: ``kind`` ``"url"`` (the server at `url`), ``"embedded"`` (a ComfyUI
    started by the actor from the command's `args`) or ``"diffusers"`` (the pipeline loaded from
    `args`); `models` / `class_names` as the command picked them; `copies`: actors of this spec
    (0: one per GPU of the cluster, at least one)."""

    kind: str
    url: str = ""
    args: Any = None
    models: dict = field(default_factory=dict)
    class_names: Optional[str] = None
    copies: int = 1


class Worker:
    """The Ray actor (`RayWorkers` wraps it with ``ray.remote``): one worker of `WorkerSpec`."""

    def __init__(self, spec: WorkerSpec):
        self.spec = spec
        self.url = spec.url
        self.models = dict(spec.models)
        self.info: dict = {}
        self.pipeline = None
        self._server = None
        if spec.kind == "embedded":
            from .segment import embedded_server

            self._server = embedded_server(spec.args, spec.models, spec.class_names, die_with_parent=True)
            self.url, self.models = self._server.__enter__()
        if spec.kind == "diffusers":
            from .segment import load_diffusers

            self.pipeline = load_diffusers(spec.args, spec.models, spec.class_names)
        else:
            self.info = ComfyClient(self.url).object_info()

    def describe(self) -> dict:
        """Where this worker runs and what it offers (the driver checks every worker would run
        the same thing)."""
        return {"kind": self.spec.kind, "url": self.url, "models": self.models, "info": self.info,
                "host": socket.gethostname(), "pid": os.getpid(),
                "cache_key": getattr(self.pipeline, "cache_key", None)}

    def _lost(self, error: ComfyConnectionError) -> None:
        """The server is gone: exit, so that Ray restarts this actor (and reruns its calls)."""
        print(f"freeseg worker {os.getpid()}: {one_line(str(error))}; exiting so that Ray restarts it",
              file=sys.stderr, flush=True)
        os._exit(1)

    def segment_files(self, job: Any, data: bytes, ext: str, source: str,
                      class_names: Optional[str]) -> dict[str, bytes]:
        """One image (its bytes, its extension) through the worker; the files of its output
        folder (``{name: bytes}``; labels.json names `source` as the image)."""
        with tempfile.TemporaryDirectory(prefix="freeseg-worker-") as tmp:
            path = os.path.join(tmp, "image" + ext)
            with open(path, "wb") as f:
                f.write(data)
            out = os.path.join(tmp, "out")
            if self.pipeline is not None:
                from .output import segment_to_folder

                segment_to_folder(self.pipeline, path, out, class_names, source=source)
            else:
                self.run_job(job, path, class_names).write(out, source)
            files = {}
            for name in sorted(os.listdir(out)):
                with open(os.path.join(out, name), "rb") as f:
                    files[name] = f.read()
            return files

    def segment(self, job: Any, data: bytes, ext: str, class_names: Optional[str]) -> Any:
        """One image through the ComfyUI worker; its ``freeseg.app.remote.Segmentation``."""
        with tempfile.TemporaryDirectory(prefix="freeseg-worker-") as tmp:
            path = os.path.join(tmp, "image" + ext)
            with open(path, "wb") as f:
                f.write(data)
            return self.run_job(job, path, class_names)

    def run_job(self, job: Any, path: str, class_names: Optional[str]) -> Any:
        try:
            return job.run(ComfyClient(self.url), self.info, path, class_names=class_names)
        except ComfyConnectionError as e:
            self._lost(e)
            raise


def read_bytes(path: str) -> tuple[bytes, str]:
    """(the file's bytes, its extension in lower case)."""
    with open(path, "rb") as f:
        return f.read(), os.path.splitext(path)[1].lower() or ".png"


def write_files(folder: str, files: dict[str, bytes]) -> None:
    """Write a worker's output files into `folder` (labels.json last); stale ``mask_*.png``
    files of an earlier run are removed first."""
    os.makedirs(folder, exist_ok=True)
    for name in os.listdir(folder):
        if name.startswith("mask_") and name.endswith(".png") and name not in files:
            os.remove(os.path.join(folder, name))
    for name in sorted(files, key=lambda n: n == "labels.json"):
        tmp = os.path.join(folder, name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(files[name])
        os.replace(tmp, os.path.join(folder, name))


class RayWorkers:
    """Actors of `specs` on Ray, `per_worker` calls in flight on each (see the module docstring).

    ``run(method, *args)`` is thread-safe and blocks until a slot is free: call it from up to
    ``capacity`` threads. ``describe`` holds each live worker's `Worker.describe`. `close`
    ends the actors (and the local Ray this object started).

    Args:
        address: None for a local Ray, ``auto`` / ``ray://host:port`` for a cluster.
        gpus: actors ask for one GPU each (None: when the cluster has GPUs; url workers never).
        stream: where warnings go (default stderr).
    """

    def __init__(self, specs: Sequence[WorkerSpec], per_worker: int = 2, address: Optional[str] = None,
                 gpus: Optional[bool] = None, stream: Optional[TextIO] = None):
        if not specs:
            raise ValueError("RayWorkers needs at least one worker")
        self.ray = ray = import_ray()
        self.stream = stream if stream is not None else sys.stderr
        self.per_worker = max(1, per_worker)
        self.started = not ray.is_initialized()
        # Ray's driver prints its raylet's notes (a task retried, a worker died) on sys.stdout,
        # which carries the commands' JSON: they go to stderr until `close`.
        self._stdout, sys.stdout = sys.stdout, sys.stderr
        self.actors: list[Any] = []
        try:  # whatever stops the start (an error, Ctrl-C) ends what was started
            self._start(specs, address, gpus)
        except BaseException:
            self.close()
            raise

    def _start(self, specs: Sequence[WorkerSpec], address: Optional[str], gpus: Optional[bool]) -> None:
        ray = self.ray
        if self.started:
            init_ray(address, sum(max(1, spec.copies) for spec in specs))
        cluster_gpus = int(ray.cluster_resources().get("GPU", 0))
        if gpus is None:
            gpus = cluster_gpus >= 1
        specs = [spec for spec in specs for _ in range(spec.copies or max(1, cluster_gpus if gpus else 1))]
        for spec in specs:
            heavy = spec.kind != "url"
            options = dict(num_cpus=1 if heavy and not gpus else 0, num_gpus=1 if heavy and gpus else 0,
                           max_restarts=RESTARTS, max_task_retries=RESTARTS, max_concurrency=self.per_worker)
            self.actors.append(ray.remote(Worker).options(**options).remote(spec))
        self.names = [spec.url or f"{spec.kind} worker {i + 1}" for i, spec in enumerate(specs)]
        self.describe: dict[int, dict] = {}
        self.errors: dict[int, str] = {}
        self._slots: "queue.Queue[int]" = queue.Queue()
        self._lock = threading.Lock()
        refs = {i: actor.describe.remote() for i, actor in enumerate(self.actors)}
        for i, ref in refs.items():
            try:
                self.describe[i] = ray.get(ref)
            except Exception as e:  # the actor did not start: its own reason
                self.errors[i] = reason(e)
        if not self.describe:
            if len(specs) == 1:
                raise SegmentError(f"{self.names[0]}: {self.errors[0]}")
            raise NoWorkerLeft("no worker started: " + "; ".join(f"{self.names[i]}: {e}" for i, e in self.errors.items()))
        for i, error in self.errors.items():
            self.warn(f"dropping {self.names[i]}: {error}")
        for _ in range(self.per_worker):
            for i in self.describe:
                self._slots.put(i)
        for i, d in self.describe.items():
            print(f"worker {i + 1}: {d['kind']} {d['url'] or ''} on {d['host']} (pid {d['pid']})".replace("  ", " "),
                  file=self.stream, flush=True)

    @property
    def live(self) -> list[int]:
        with self._lock:
            return sorted(self.describe)

    @property
    def capacity(self) -> int:
        """Calls that can be in flight at once."""
        return len(self.live) * self.per_worker

    def warn(self, text: str) -> None:
        print(f"warning: {one_line(text)}", file=self.stream, flush=True)

    def _drop(self, i: int, error: str) -> None:
        with self._lock:
            if self.describe.pop(i, None) is None:
                return
            self.errors[i] = error
            left = len(self.describe)
        self.warn(f"{self.names[i]} failed: {error} ({left} worker(s) left)")
        if not left:
            self._slots.put(-1)  # wake a waiting caller: nothing left

    def _take(self) -> int:
        while True:
            with self._lock:
                if not self.describe:
                    raise NoWorkerLeft("no worker left: " + "; ".join(f"{self.names[i]}: {e}"
                                                                      for i, e in self.errors.items()))
            try:
                i = self._slots.get(timeout=1.0)
            except queue.Empty:
                continue
            with self._lock:
                if i in self.describe:
                    return i
            if i == -1:
                self._slots.put(-1)

    def run(self, method: str, *args: Any) -> Any:
        """``Worker.<method>(*args)`` on a free slot; an actor found dead is dropped and the call
        goes to another. An exception the worker raised is raised here as it is."""
        ray = self.ray
        while True:
            i = self._take()
            try:
                return ray.get(getattr(self.actors[i], method).remote(*args))
            except ray.exceptions.RayTaskError as e:
                cause = getattr(e, "cause", None)
                if isinstance(cause, BaseException):
                    raise cause from None
                raise
            except ray.exceptions.RayActorError as e:
                self._drop(i, reason(e))
            finally:
                self._slots.put(i)

    def close(self) -> None:
        """End the actors (their embedded servers stop with them) and the local Ray started here."""
        ray = self.ray
        for actor in self.actors:
            try:
                ray.kill(actor)
            except Exception:
                pass
        self.actors = []
        if self.started and ray.is_initialized():
            ray.shutdown()
        if self._stdout is not None:
            sys.stdout, self._stdout = self._stdout, None


def reason(error: BaseException) -> str:
    """One line: why an actor failed (the worker's own exception when Ray carries it)."""
    cause = getattr(error, "cause", None)
    if isinstance(cause, BaseException):
        return one_line(str(cause))
    # A creation-task error carries the worker's traceback, ending with "module.SomeError: text".
    found = [m.group(1) for m in re.finditer(r"^[A-Za-z_][\w.]*(?:Error|Exception|Left): (.*)$", str(error), re.M)]
    return one_line(found[-1] if found else str(error))[:500]


def init_ray(address: Optional[str], workers: int) -> None:
    """Start a local Ray (no dashboard, room for `workers` actors) or join the cluster at `address`."""
    import logging

    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    runtime_env = {"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)}}
    # log_to_driver=False: the actors' output (and Ray's notes on retries) would go to this
    # process's stdout, which carries the command's JSON; a worker's failure comes back as its exception.
    if address:
        try:
            ray.init(address=address, runtime_env=runtime_env, logging_level=logging.WARNING, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise SegmentError(f"--ray {address}: cannot join the Ray cluster: {one_line(str(e))}") from None
    else:
        ray.init(num_cpus=max(os.cpu_count() or 1, workers), include_dashboard=False, runtime_env=runtime_env,
                 logging_level=logging.WARNING, log_to_driver=False)
