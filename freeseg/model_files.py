"""What counts as a model in the `blip2/` and `open_clip/` model folders, and the rules for
picking, checking and downloading one (no ComfyUI imports): shared by the ComfyUI loaders and
the command line.

* A model is a direct entry of a model folder: a folder holding the kind's marker file, or
  (open_clip only) a weights file named after its architecture (`is_model_entry`).
* A name picks a model only when it is one of the names the folders list (`find_entry`):
  no absolute paths, no `..`, no sub-paths, nothing outside the folders.
* No code ever comes from a model folder (`check_no_code`, run before every load): a folder is
  refused when any file in it, at any depth, is a code file (`.py`, `.pyc`, `.so`, ...), when
  any of its JSON files asks for code anywhere in its nesting (a `trust_remote_code` that is
  not `false`/`null`, a non-empty `auto_map`), or when its `open_clip_config.json` names a
  tokenizer or text model outside the folder: `hf_tokenizer_name` is allowed only when the
  folder itself holds that tokenizer's files (`tokenizer.json` or `tokenizer_config.json`),
  which are then loaded from the folder; `hf_model_name` (a hub text model open_clip would
  fetch) and `timm_model_pretrained` (hub weights timm would fetch) are never allowed.
* Weights are checked before loading (`check_weights`): every `.safetensors` file must be
  complete, and pickle-based files (`.bin`, `.pt`, `.pth`) need torch >= 2.6, whose
  weights-only loader is the first without a known way around it (CVE-2025-32434).
* Downloads (`download_entry`) fetch a hub repository into a hidden temporary folder next to
  `<folder>/<repo name>` (`.<repo name>.partial-<random>`, never listed), check it (size cap,
  a model of the kind, no code, complete weights), write a marker file naming the repository
  and only then rename it into place; on any failure the temporary folder is removed, so a
  half-done download never appears. A folder that holds anything but a finished download of
  the same repository is never reused.
"""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import shutil
import struct
from typing import Callable, Iterator, Optional, Sequence

OPEN_CLIP_EXTENSIONS = (".safetensors", ".pt", ".pth", ".bin")
PICKLE_EXTENSIONS = (".bin", ".pt", ".pth", ".ckpt")
# The file that marks a model folder, per kind.
FOLDER_MARKERS = {"blip2": "config.json", "open_clip": "open_clip_config.json"}
# What a user puts into each folder (quoted in every error about a missing or broken model).
WHAT_GOES_THERE = {
    "blip2": "a BLIP or BLIP-2 model folder as saved by transformers: config.json, the weights "
             "(model.safetensors or shards), and the processor/tokenizer files, e.g. the contents of "
             "Salesforce/blip-image-captioning-base (the paper's captioner) in "
             "models/blip/blip-image-captioning-base/, or of Salesforce/blip2-opt-2.7b in "
             "models/blip2/blip2-opt-2.7b/",
    "open_clip": "an open_clip model: a folder with open_clip_config.json and open_clip_model.safetensors "
                 "(e.g. timm/vit_base_patch32_clip_224.openai in models/open_clip/vit_base_patch32_clip_224.openai/), "
                 "or a weights file named after a built-in open_clip architecture (e.g. ViT-B-32-openai.safetensors)",
}
# The file a download writes into the folder it fills.
DOWNLOAD_MARKER = ".freeseg-download.json"
# Hugging Face hub repository ids: owner/name, letters, digits, "-", "_", ".", at most 96 each.
REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
# torch.load(weights_only=True) can be escaped before torch 2.6 (CVE-2025-32434).
SAFE_TORCH_LOAD = (2, 6)
# Files that are code, never model data: a model folder holding one is refused (check_no_code).
CODE_SUFFIXES = (".py", ".pyw", ".pyc", ".pyo", ".pyd", ".pyx", ".so", ".dylib", ".dll")
# The tokenizer files an open_clip folder must hold when its config names an HF tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
# Download size cap when the caller gives none (the ComfyUI loaders read FREESEG_DOWNLOAD_MAX_GB).
DEFAULT_DOWNLOAD_MAX_GB = 20.0


def is_model_entry(kind: str, path: str) -> bool:
    """True when `path` is a `kind` ("blip2" or "open_clip") model: a folder holding the kind's
    marker file, or (open_clip only) a weights file named after its architecture."""
    if os.path.isdir(path):
        return os.path.isfile(os.path.join(path, FOLDER_MARKERS[kind]))
    return kind == "open_clip" and os.path.isfile(path) and path.lower().endswith(OPEN_CLIP_EXTENSIONS)


def model_entries(kind: str, root: str) -> list[str]:
    """Sorted names of the `kind` models directly inside folder `root` ([] if it is missing)."""
    if not os.path.isdir(root):
        return []
    return sorted(n for n in os.listdir(root) if not n.startswith(".") and is_model_entry(kind, os.path.join(root, n)))


def not_found_message(kind: str, name: str, roots: Sequence[str]) -> str:
    listed = sorted({n for root in roots for n in model_entries(kind, root)})
    have = f"they hold {', '.join(listed)}" if listed else "they hold no such model yet"
    return (f"model_name: {name!r} is not one of the {kind} models in the model folders {list(roots)} ({have}). "
            f"Put {WHAT_GOES_THERE[kind]}.")


def find_entry(kind: str, roots: Sequence[str], name: str) -> str:
    """The path of the `kind` model called `name` in the first of `roots` that lists it.

    `name` must be exactly one of the names `model_entries` lists (a direct entry of a root),
    so absolute paths, `..` and sub-paths never resolve. Models the operator linked into a
    folder are followed. Raises FileNotFoundError naming the folders and what belongs there."""
    plain = (isinstance(name, str) and name not in ("", ".", "..") and not name.startswith(".")
             and os.path.basename(name) == name and "/" not in name and "\\" not in name
             and not os.path.isabs(name))
    if plain:
        for root in roots:
            path = os.path.join(root, name)
            if os.path.normpath(os.path.dirname(path)) == os.path.normpath(root) and is_model_entry(kind, path):
                return path
    raise FileNotFoundError(not_found_message(kind, name if isinstance(name, str) else repr(name), roots))


def weight_files(path: str) -> list[str]:
    """The weight files of a model entry: the file itself, or the weights in the folder."""
    if os.path.isfile(path):
        return [path]
    return sorted(os.path.join(path, n) for n in os.listdir(path)
                  if n.lower().endswith((".safetensors", *PICKLE_EXTENSIONS)) and os.path.isfile(os.path.join(path, n)))


def safetensors_problem(path: str) -> Optional[str]:
    """Why `path` is not a complete safetensors file (None when it is): the header must parse
    and the file must be exactly as long as the header says."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"only {size} bytes"
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, 100 * 2**20):
                return f"header length {n} does not fit in {size} bytes"
            header = json.loads(f.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        return f"unreadable header ({exc})"
    if not isinstance(header, dict):
        return "the header is not a table of tensors"
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)
            and isinstance(v.get("data_offsets"), list) and len(v["data_offsets"]) == 2]
    expected = 8 + n + max(ends, default=0)
    if size != expected:
        return f"{size} bytes where the header describes {expected} (truncated or damaged)"
    return None


def torch_version() -> tuple[int, int]:
    import torch

    m = re.match(r"(\d+)\.(\d+)", torch.__version__)
    return (int(m[1]), int(m[2])) if m else (0, 0)


def check_weights(kind: str, path: str) -> None:
    """ValueError naming the file and what belongs there when model entry `path` has no weights,
    incomplete safetensors, or pickle-based files this torch cannot load weights-only safely."""
    files = weight_files(path)
    if not files:
        raise ValueError(f"model_name: {path} holds no weights file (.safetensors); put {WHAT_GOES_THERE[kind]}.")
    safe = [f for f in files if f.lower().endswith(".safetensors")]
    for file in safe:  # the loaders prefer safetensors, so pickle files beside them are never read
        problem = safetensors_problem(file)
        if problem:
            raise ValueError(f"model_name: cannot read {file}: {problem}. Replace it with a complete copy: "
                             f"{WHAT_GOES_THERE[kind]}.")
    for file in ([] if safe else files):
        if torch_version() < SAFE_TORCH_LOAD:
            raise ValueError(f"model_name: {file} is a pickle-based weights file, which torch "
                             f"{'.'.join(map(str, torch_version()))} cannot load safely (torch >= 2.6 needed); "
                             f"use its .safetensors version instead: {WHAT_GOES_THERE[kind]}.")


def load_error(kind: str, path: str, exc: BaseException) -> ValueError:
    """The error for a model that passed `check_weights` but still failed to load."""
    return ValueError(f"model_name: cannot load the {kind} model {path}: {type(exc).__name__}: {exc}. "
                      f"It should be {WHAT_GOES_THERE[kind]}.")




# -- no code from model folders ---------------------------------------------------------------

def folder_files(path: str) -> list[str]:
    """Every file under folder `path`, at any depth, sorted; linked folders are followed once
    (a link loop ends where it starts again)."""
    files, seen = [], set()
    for top, dirs, names in os.walk(path, followlinks=True):
        real = os.path.realpath(top)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs.sort()
        files.extend(os.path.join(top, n) for n in names)
    return sorted(files)


def is_code_file(name: str) -> bool:
    """True for a Python source or compiled module, or a native library (`x.so.1` too)."""
    low = name.lower()
    return low.endswith(CODE_SUFFIXES) or ".so." in low


def remote_code_keys(value: object) -> Iterator[str]:
    """The dotted paths (`a.b[2].c`) of the keys of parsed JSON `value`, at any depth, that ask
    for code: `trust_remote_code` with any value but false/null, and non-empty `auto_map`."""
    stack: list[tuple[object, str]] = [(value, "")]
    while stack:
        item, at = stack.pop()
        if isinstance(item, dict):
            for key, sub in reversed(list(item.items())):
                where = f"{at}.{key}" if at else str(key)
                if key == "trust_remote_code" and sub is not False and sub is not None:
                    yield where
                elif key == "auto_map" and sub:
                    yield where
                stack.append((sub, where))
        elif isinstance(item, list):
            stack.extend((sub, f"{at}[{i}]") for i, sub in reversed(list(enumerate(item))))


def read_json_config(file: str) -> object:
    """The parsed JSON of `file`, or ValueError naming it when it cannot be read (a config that
    cannot be read cannot be checked, so its folder is refused)."""
    try:
        with open(file, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError, RecursionError) as exc:
        raise ValueError(f"model_name: cannot read {file} as JSON ({type(exc).__name__}: {exc}); a model folder "
                         "whose configs cannot be checked for code is refused") from exc


def check_no_code(kind: str, path: str) -> None:
    """ValueError naming the file (and the key) when model entry `path` could make a loader run
    code or fetch something from elsewhere: a code file anywhere in the folder, a JSON file
    asking for remote code (`remote_code_keys`), or an `open_clip_config.json` whose
    `hf_tokenizer_name` names a tokenizer the folder does not hold, or that names an
    `hf_model_name` or sets `timm_model_pretrained`. A single weights file (open_clip) carries
    no configs: nothing to check."""
    if not os.path.isdir(path):
        return
    refuse = ("FreeSeg-Diff never runs code from a model folder nor loads anything from outside it, so this "
              "model is refused; use one whose files are data only (weights, JSON configs without remote code, "
              "tokenizer files)")
    files = folder_files(path)
    for file in files:
        if is_code_file(os.path.basename(file)):
            raise ValueError(f"model_name: {file} is a code file. {refuse}.")
    for file in files:
        if not file.lower().endswith(".json"):
            continue
        for key in remote_code_keys(read_json_config(file)):
            raise ValueError(f"model_name: {file} asks for remote code (key {key}). {refuse}.")
    config_file = os.path.join(path, FOLDER_MARKERS["open_clip"])
    if os.path.isfile(config_file):
        config = read_json_config(config_file)
        model_cfg = config.get("model_cfg") if isinstance(config, dict) else None
        text_cfg = model_cfg.get("text_cfg") if isinstance(model_cfg, dict) else None
        text_cfg = text_cfg if isinstance(text_cfg, dict) else {}
        tokenizer = text_cfg.get("hf_tokenizer_name")
        if tokenizer and not (isinstance(tokenizer, str)
                              and any(os.path.isfile(os.path.join(path, n)) for n in TOKENIZER_FILES)):
            raise ValueError(f"model_name: {config_file} names the tokenizer {tokenizer!r} (key "
                             "model_cfg.text_cfg.hf_tokenizer_name) but the folder holds no "
                             f"{' or '.join(TOKENIZER_FILES)}: a tokenizer is only ever loaded from the model "
                             f"folder itself. {refuse}.")
        if text_cfg.get("hf_model_name"):
            raise ValueError(f"model_name: {config_file} names the text model {text_cfg['hf_model_name']!r} (key "
                             f"model_cfg.text_cfg.hf_model_name), which open_clip would fetch from the hub. {refuse}.")
        vision_cfg = model_cfg.get("vision_cfg") if isinstance(model_cfg, dict) else None
        if isinstance(vision_cfg, dict) and vision_cfg.get("timm_model_pretrained"):
            raise ValueError(f"model_name: {config_file} asks timm for pretrained weights from the hub (key "
                             f"model_cfg.vision_cfg.timm_model_pretrained). {refuse}.")


# -- downloads --------------------------------------------------------------------------------

def check_repo_id(repo_id: str) -> str:
    """`repo_id` stripped, or ValueError when it is not a hub repository id (owner/name)."""
    rid = repo_id.strip() if isinstance(repo_id, str) else ""
    if not REPO_ID.fullmatch(rid) or ".." in rid or "--" in rid or rid.endswith(".git"):
        raise ValueError(f"repo_id: {repo_id!r} is not a Hugging Face repository id (owner/name: letters, "
                         "digits, '-', '_', '.'), e.g. Salesforce/blip2-opt-2.7b")
    return rid


def download_target(root: str, repo_id: str) -> str:
    """The folder a download of `repo_id` fills: `<root>/<repo name>`."""
    return os.path.join(root, check_repo_id(repo_id).split("/")[1])


def read_marker(folder: str) -> Optional[dict]:
    try:
        with open(os.path.join(folder, DOWNLOAD_MARKER), encoding="utf-8") as f:
            marker = json.load(f)
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def is_finished_download(folder: str, repo_id: str) -> bool:
    """True when `folder` holds a finished download of `repo_id` (its marker says so)."""
    marker = read_marker(folder) if os.path.isdir(folder) else None
    return bool(marker and marker.get("repo_id") == repo_id and marker.get("complete") is True)


def check_download_target(kind: str, root: str, repo_id: str) -> str:
    """The folder `repo_id` downloads into, or ValueError when that folder exists and holds
    anything but a finished download of the same repository."""
    target = download_target(root, repo_id)
    rid = check_repo_id(repo_id)
    if os.path.lexists(target) and not is_finished_download(target, rid):
        marker = read_marker(target) if os.path.isdir(target) else None
        if marker and marker.get("repo_id") == rid:
            held = "an unfinished download of it (from an older version of this pack); delete that folder"
        else:
            held = (f"a download of {marker.get('repo_id')!r}" if marker else "files that were not downloaded here")
            held += f", so {rid!r} is not downloaded into it; pick that model under model_name with download off, " \
                    "or move it away"
        raise ValueError(f"repo_id: {target} already holds {held}")
    return target


def download_max_bytes(max_gb: object) -> int:
    """The download size cap in bytes for `max_gb` gigabytes (10**9 bytes); ValueError unless it
    is a positive finite number."""
    try:
        gb = float(max_gb)
    except (TypeError, ValueError):
        gb = float("nan")
    if not 0 < gb < float("inf"):
        raise ValueError(f"the download size cap must be a positive number of GB, got {max_gb!r}")
    return int(gb * 1e9)


def size_text(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e7 else f"{n} bytes"


class DownloadRefused(ValueError):
    """A download refused for a reason of ours (too big), not a failure of the fetch itself."""


def too_big(repo_id: str, size: int, max_bytes: int, what: str) -> DownloadRefused:
    return DownloadRefused(f"repo_id: {repo_id} is too big to download: {what} {size_text(size)}, over this server's "
                      f"cap of {size_text(max_bytes)} (the operator sets the cap with FREESEG_DOWNLOAD_MAX_GB); "
                      "nothing was kept")


def hub_fetch(repo_id: str, local_dir: str, max_bytes: int) -> None:
    """Fetch hub repository `repo_id` into `local_dir` with huggingface_hub: its file listing
    first (DownloadRefused when its files add up to more than `max_bytes`), then that revision."""
    from huggingface_hub import HfApi, snapshot_download

    info = HfApi().model_info(repo_id, files_metadata=True)
    size = sum(int(getattr(s, "size", None) or 0) for s in (info.siblings or ()))
    if size > max_bytes:
        raise too_big(repo_id, size, max_bytes, "its files on the hub add up to")
    snapshot_download(repo_id, local_dir=local_dir, revision=info.sha)


def _causes(exc: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    while exc is not None and not any(exc is c for c in chain):
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    return chain


def fetch_problem(exc: BaseException) -> str:
    """What made a hub fetch fail, in words, from the exception types of huggingface_hub and
    of the network libraries under it (looked up by name along the exception's causes)."""
    chain = _causes(exc)

    def find(*names: str) -> Optional[BaseException]:
        return next((e for e in chain if any(c.__name__ in names for c in type(e).__mro__)), None)

    statuses = [getattr(getattr(e, "response", None), "status_code", None) for e in chain]
    if find("GatedRepoError"):
        return ("the repository is gated (401/403): accept its terms on huggingface.co and give this server a "
                "token that has access (HF_TOKEN in its environment)")
    if find("RepositoryNotFoundError") or 404 in statuses:
        return ("the hub has no such repository (404 not found; a private repository needs a token, HF_TOKEN in "
                "the server's environment)")
    if 401 in statuses or 403 in statuses:
        return ("the hub refused access (401/403: a private or gated repository; give this server a token that has "
                "access, HF_TOKEN in its environment)")
    if find("OfflineModeIsEnabled"):
        return "the hub is switched off on this server (HF_HUB_OFFLINE is set in its environment)"
    connect = find("ConnectError", "ConnectionError", "ConnectTimeout", "TimeoutException", "Timeout",
                   "TimeoutError", "gaierror", "LocalEntryNotFoundError")
    if connect is not None:
        return (f"cannot reach the hub (offline, connection refused or timed out: {type(connect).__name__}: "
                f"{connect})")
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return f"the disk is full ({exc})"
    return f"{type(exc).__name__}: {exc}"


def _folder_bytes(path: str) -> int:
    return sum(os.lstat(f).st_size for f in folder_files(path))


def _listing(folder: str) -> str:
    names = sorted(n for n in os.listdir(folder) if n != DOWNLOAD_MARKER)
    return ", ".join(names[:12]) + (f", ... ({len(names)} entries)" if len(names) > 12 else "") or "nothing"


def check_download(kind: str, repo_id: str, folder: str, max_bytes: int) -> None:
    """ValueError naming the cause when fetched `folder` may not become a `kind` model: over
    `max_bytes`, not a model of the kind, asking for code, or with incomplete weights."""
    size = _folder_bytes(folder)
    if size > max_bytes:
        raise too_big(repo_id, size, max_bytes, "what arrived adds up to")
    if not is_model_entry(kind, folder):
        raise ValueError(f"repo_id: {repo_id} is not one of the {kind} models (it holds {_listing(folder)}); it "
                         f"should be {WHAT_GOES_THERE[kind]}; nothing was kept")
    for check in (check_no_code, check_weights):
        try:
            check(kind, folder)
        except ValueError as exc:
            raise ValueError(f"repo_id: {repo_id} was downloaded but not kept: "
                             f"{str(exc).removeprefix('model_name: ')}") from exc


def download_entry(kind: str, root: str, repo_id: str, max_bytes: int,
                   fetch: Callable[[str, str, int], object] = hub_fetch) -> str:
    """Download `repo_id` into `<root>/<repo name>` and return that folder; a finished download
    of the same repository is reused without fetching.

    `fetch(repo_id, local_dir, max_bytes)` (default `hub_fetch`) fills a hidden temporary folder
    next to the target; the folder is then checked (`check_download`), given its marker file and
    renamed into place. On any failure (a fetch error, named by `fetch_problem`, a failed check,
    an interruption) the temporary folder is removed and nothing appears in `root`."""
    rid = check_repo_id(repo_id)
    target = check_download_target(kind, root, rid)
    if os.path.isdir(target):
        return target
    os.makedirs(root, exist_ok=True)
    partial = os.path.join(root, f".{os.path.basename(target)}.partial-{secrets.token_hex(6)}")
    os.mkdir(partial)
    try:
        try:
            fetch(rid, partial, max_bytes)
        except DownloadRefused:
            raise
        except Exception as exc:
            raise ValueError(f"repo_id: {rid} was not downloaded: {fetch_problem(exc)}; nothing was kept") from exc
        check_download(kind, rid, partial, max_bytes)
        write_marker(partial, rid)
        try:
            os.rename(partial, target)
        except OSError:
            if not is_finished_download(target, rid):  # else: another prompt finished the same download
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return target


def write_marker(folder: str, repo_id: str) -> None:
    with open(os.path.join(folder, DOWNLOAD_MARKER), "w", encoding="utf-8") as f:
        json.dump({"repo_id": repo_id, "complete": True}, f)
