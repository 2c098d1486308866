"""Segmenting a whole folder (or glob) of images: `python -m freeseg segment DIR_OR_GLOB --out OUT`.

Layout of OUT:

* ``OUT/<name>/``: one folder per image, as the single-image command writes it (mask PNGs,
  ``overlay.png``, ``labels.json``) plus ``done.json``, written last: the image's size and
  mtime and the run's settings key. An image whose ``done.json`` matches is skipped by a rerun
  (resume); a changed image or changed settings are done again.
* ``OUT/index.csv`` and ``OUT/index.json``: every image of the input, in input order, with its
  status (``done``, or ``failed`` and the error), and per mask: label, score, area, bbox
  (``[x0, y0, x1, y1]``, exclusive ends) and the mask file (relative to OUT). An image with no
  named mask has one CSV row with an empty label; a failed image one row with the error.

``<name>`` is the image's path relative to the folder (or to the glob's fixed part) without its
extension, with ``/`` written ``__``; two images that would share a name (``a.jpg`` and
``a.png``) keep their extension (``a_jpg``, ``a_png``).

A glob never follows a symbolic link to a folder (a link loop cannot list a file twice); links
to files are listed. Bytes of a file name that are not UTF-8 (``caf\\xe9.png`` on Linux) are
written ``\\xNN`` in ``<name>``, in the index and in messages (`console.shown`); the image itself is
read under its real name.
"""

from __future__ import annotations

import csv
import fnmatch
import glob
import json
import os
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Callable, Optional, TextIO

from .client import one_line
from .console import shown

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
DONE_FILE = "done.json"
INDEX_CSV = "index.csv"
INDEX_JSON = "index.json"
INDEX_COLUMNS = ("image", "folder", "status", "index", "label", "score", "area", "bbox", "mask_file", "error")
EXIT_SOME_FAILED = 3  # the run finished, but some images failed (they are listed in the index)


class BatchError(ValueError):
    """The input names no image (an empty folder, a glob that matches nothing)."""


@dataclass(frozen=True)
class Item:
    """One image of a batch: its path, its output folder's name and path."""

    image: str
    name: str
    folder: str


def is_batch_input(spec: str) -> bool:
    """True for a folder or a glob pattern (``*``, ``?``, ``[``); False for a file path."""
    return os.path.isdir(spec) or (glob.has_magic(spec) and not os.path.isfile(spec))


def _matches(parts: list[str], pattern: list[str]) -> bool:
    """Whether a relative path (its components) matches a glob pattern (its components) as
    ``glob.glob(recursive=True)`` would: ``**`` is any number of folders, names starting with
    ``.`` match only a pattern part starting with ``.``."""
    if not pattern:
        return not parts
    head, rest = pattern[0], pattern[1:]
    if head == "**":
        return _matches(parts, rest) or (bool(parts) and not parts[0].startswith(".")
                                         and _matches(parts[1:], pattern))
    return (bool(parts) and (head.startswith(".") or not parts[0].startswith("."))
            and fnmatch.fnmatchcase(parts[0], head) and _matches(parts[1:], rest))


def glob_files(spec: str) -> tuple[list[str], str]:
    """(files matching the glob `spec`, the folder its fixed part names). Like
    ``glob.glob(spec, recursive=True)``, but symbolic links to folders are never followed, so a
    link loop cannot list a file many times."""
    parts = os.path.normpath(spec).split(os.sep)
    fixed = []
    for part in parts:
        if glob.has_magic(part):
            break
        fixed.append(part)
    pattern = parts[len(fixed):]
    root = os.sep.join(fixed) or (os.sep if spec.startswith(os.sep) else ".")
    found = []
    for folder, dirs, files in os.walk(root):  # followlinks=False: linked folders are not entered
        rel = [] if folder == root else os.path.relpath(folder, root).split(os.sep)
        if "**" not in pattern and len(rel) >= len(pattern) - 1:
            dirs.clear()  # deep enough for a pattern without **
        for name in files:
            if _matches(rel + [name], pattern):
                found.append(os.path.join(folder, name) if fixed else os.path.join(*rel, name))
    return found, root


def list_images(spec: str, exclude: Optional[str] = None) -> tuple[list[str], str]:
    """(image paths sorted, the root their names are relative to) for a folder (its image
    files, not its sub-folders) or a glob (``**`` matches sub-folders; `glob_files`). Files
    under `exclude` (the output folder) are left out. BatchError when nothing matches."""
    skip = os.path.abspath(exclude) + os.sep if exclude else None
    if os.path.isdir(spec):
        root = spec
        paths = [os.path.join(spec, n) for n in os.listdir(spec)]
    else:
        paths, root = glob_files(spec)
    found = sorted(p for p in paths if os.path.isfile(p) and p.lower().endswith(IMAGE_EXTENSIONS)
                   and not (skip and os.path.abspath(p).startswith(skip)))
    if not found:
        what = "image files in the folder" if os.path.isdir(spec) else "images match the pattern"
        raise BatchError(f"no {what} {shown(spec)} (extensions: {', '.join(IMAGE_EXTENSIONS)})")
    return found, root


def plan(paths: list[str], root: str, out_dir: str) -> list[Item]:
    """One Item per image: folder names as the module docstring says (unique, stable; the
    image keeps its real path)."""
    stems = []
    for p in paths:
        rel = os.path.relpath(p, root)
        stems.append(shown(os.path.splitext(rel)[0]).replace(os.sep, "__").replace("/", "__"))
    clash = {s for s in stems if stems.count(s) > 1}
    items = []
    for p, stem in zip(paths, stems):
        name = f"{stem}_{os.path.splitext(p)[1].lstrip('.').lower()}" if stem in clash else stem
        items.append(Item(p, name, os.path.join(out_dir, name)))
    return items


# -- resume markers ---------------------------------------------------------------------------

def image_signature(path: str) -> dict:
    """Size and modification time of an image file (what a resume compares)."""
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def is_done(item: Item, key: str) -> bool:
    """Whether `item` was finished by a run with settings `key` and the image is unchanged."""
    try:
        with open(os.path.join(item.folder, DONE_FILE), encoding="utf-8") as f:
            marker = json.load(f)
        return (marker.get("key") == key and marker.get("image_file") == image_signature(item.image)
                and os.path.isfile(os.path.join(item.folder, "labels.json")))
    except (OSError, ValueError):
        return False


def mark_done(item: Item, key: str) -> None:
    """Write ``done.json`` (last, atomically) once the image's folder is complete."""
    marker = {"image": shown(item.image), "image_file": image_signature(item.image), "key": key}
    tmp = os.path.join(item.folder, DONE_FILE + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps(marker, indent=2) + "\n")
    os.replace(tmp, os.path.join(item.folder, DONE_FILE))


def clear_done(item: Item) -> None:
    """Remove a stale ``done.json`` before an image is done again."""
    try:
        os.remove(os.path.join(item.folder, DONE_FILE))
    except FileNotFoundError:
        pass


# -- progress ---------------------------------------------------------------------------------

def clock(seconds: float) -> str:
    """``H:MM:SS``."""
    s = int(round(max(seconds, 0.0)))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class BatchProgress:
    """Images finished out of the total, failures, elapsed time and an ETA, on stderr.

    On a terminal one line is redrawn (failures print above it); otherwise one line per image
    finished. The ETA is the average time per image finished by this run times those left
    (images skipped as already done count as finished, not in the average)."""

    def __init__(self, total: int, skipped: int = 0, stream: Optional[TextIO] = None, width: int = 30,
                 enabled: bool = True):
        self.total = total
        self.skipped = skipped
        self.finished = 0
        self.failed = 0
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self.enabled = enabled
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.start = time.monotonic()
        self._lock = threading.Lock()

    def line(self, now: Optional[float] = None) -> str:
        """The bar's text."""
        now = time.monotonic() if now is None else now
        count = self.skipped + self.finished
        frac = count / self.total if self.total else 1.0
        filled = int(round(frac * self.width))
        elapsed = now - self.start
        left = self.total - count
        eta = clock(elapsed / self.finished * left) if self.finished else "?"
        extra = f", {self.skipped} already done" if self.skipped else ""
        return (f"[{'#' * filled}{'-' * (self.width - filled)}] {count}/{self.total} images"
                f"{extra}, {self.failed} failed, {clock(elapsed)} elapsed, ETA {eta if left else clock(0)}")

    def update(self, item: Item, error: Optional[str] = None) -> None:
        """One image finished (`error`: it failed, and why)."""
        with self._lock:
            self.finished += 1
            self.failed += error is not None
            if error is not None:
                prefix = "\r" + " " * 110 + "\r" if self.tty and self.enabled else ""
                print(f"{prefix}error: {shown(item.image)}: {one_line(shown(error))}", file=self.stream, flush=True)
            if not self.enabled:
                return
            line = self.line()
            if self.tty:
                self.stream.write("\r" + line.ljust(110)[:110])
            else:
                self.stream.write(f"{line}  {'FAILED' if error else 'done'} {item.name}\n")
            self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()


# -- the run ------------------------------------------------------------------------------------

def run_batch(items: list[Item], segment: Callable[[Item], dict], key: str, threads: int = 1,
              progress: bool = True, stream: Optional[TextIO] = None,
              fatal: Callable[[BaseException], bool] = lambda e: False) -> dict[str, str]:
    """Segment every item not yet done with `key`, `threads` at a time; {image: error} of the
    ones that failed. `segment(item)` writes ``item.folder`` and returns its labels document (an
    exception = that image failed). An exception for which `fatal` is true (e.g. a workflow
    every server refuses) and KeyboardInterrupt stop queueing: raised again once the running
    images are over. ``done.json`` is written after `segment` returns."""
    todo = [it for it in items if not is_done(it, key)]
    bar = BatchProgress(len(items), len(items) - len(todo), stream=stream, enabled=progress)
    failures: dict[str, str] = {}

    def one(item: Item) -> None:
        clear_done(item)
        segment(item)
        mark_done(item, key)

    pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="freeseg-batch")
    pending: dict[Future, Item] = {}
    queue = list(reversed(todo))
    try:
        while queue or pending:
            while queue and len(pending) < max(1, threads):
                item = queue.pop()
                pending[pool.submit(one, item)] = item
            finished, _ = wait(list(pending), return_when=FIRST_COMPLETED)
            for future in finished:
                item = pending.pop(future)
                err = future.exception()
                if err is not None and fatal(err):
                    queue.clear()
                    raise err
                if err is not None:
                    failures[item.image] = f"{type(err).__name__}: {err}" if not str(err) else str(err)
                bar.update(item, failures.get(item.image))
    except BaseException:
        queue.clear()
        for future in pending:
            future.cancel()
        raise
    finally:
        pool.shutdown(wait=True)
        bar.close()
    return failures


# -- the index ----------------------------------------------------------------------------------

def index_entries(items: list[Item], key: str, failures: dict[str, str], out_dir: str) -> list[dict]:
    """One entry per item, in input order: ``{"image", "folder", "status", "error", "caption",
    "masks": [{"index", "label", "score", "area", "bbox", "file"}]}`` (file relative to OUT).
    An item neither done nor failed (interrupted run) has status ``"not done"``. Image paths and
    errors are `shown` (printable UTF-8)."""
    entries = []
    for item in items:
        entry = {"image": shown(item.image), "folder": item.name, "status": "not done", "error": "",
                 "caption": "", "masks": []}
        if item.image in failures:
            entry.update(status="failed", error=one_line(shown(failures[item.image])))
        elif is_done(item, key):
            with open(os.path.join(item.folder, "labels.json"), encoding="utf-8") as f:
                doc = json.load(f)
            entry.update(status="done", caption=(doc.get("images") or [{}])[0].get("caption", ""))
            entry["masks"] = [{"index": m["index"], "label": m["label"], "score": m["score"], "area": m["area"],
                               "bbox": m["bbox"], "file": os.path.relpath(os.path.join(item.folder, m["file"]),
                                                                          out_dir).replace(os.sep, "/")}
                              for m in doc.get("masks", [])]
        entries.append(entry)
    return entries


def write_index(out_dir: str, entries: list[dict]) -> dict:
    """Write index.json and index.csv into `out_dir`; returns the counts
    ``{"images", "done", "failed", "not_done", "index_csv", "index_json"}``."""
    counts = {"images": len(entries), "done": sum(e["status"] == "done" for e in entries),
              "failed": sum(e["status"] == "failed" for e in entries),
              "not_done": sum(e["status"] == "not done" for e in entries)}
    os.makedirs(out_dir, exist_ok=True)
    json_path, csv_path = os.path.join(out_dir, INDEX_JSON), os.path.join(out_dir, INDEX_CSV)
    with open(json_path + ".tmp", "w", encoding="utf-8") as f:
        f.write(json.dumps({"counts": counts, "images": entries}, indent=2) + "\n")
    os.replace(json_path + ".tmp", json_path)
    with open(csv_path + ".tmp", "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=INDEX_COLUMNS)
        writer.writeheader()
        for e in entries:
            base = {"image": e["image"], "folder": e["folder"], "status": e["status"], "error": e["error"]}
            if not e["masks"]:
                writer.writerow(base)
            for m in e["masks"]:
                writer.writerow(dict(base, index=m["index"], label=m["label"], score=m["score"], area=m["area"],
                                     bbox="" if m["bbox"] is None else json.dumps(m["bbox"]), mask_file=m["file"]))
    os.replace(csv_path + ".tmp", csv_path)
    return dict(counts, index_csv=csv_path, index_json=json_path)
