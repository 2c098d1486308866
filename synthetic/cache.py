"""The fixture cache: every random-weight model of ``synthetic.models`` built once into a folder
(``$FREESEG_FIXTURE_CACHE`` or ``<repo>/.cache/fixtures``), with a version stamp per model so
a changed recipe (``FIXTURE_VERSION``) rebuilds it; a lock lets parallel runs build once.

    paths = build_all(default_cache_dir())          # {key: path}, e.g. paths["sd15_ckpt"]
    paths = build_all_subprocess()                  # the same from a fresh interpreter

Usage: ``python -m synthetic.cache CACHE_DIR`` (builds everything, prints sizes and time).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from freeseg.app.paths import REPO, fixture_cache

from .dit import build_clip_l, build_flux_unet, build_flux_vae, build_pixart_unet, build_sd3_checkpoint
from .models import (FIXTURE_VERSION, build_blip1, build_blip2, build_open_clip, build_sd2_checkpoint,
                     build_sd15_checkpoint, build_sd15_diffusers_config, build_sd15_diffusers_vae,
                     build_sdxl_unet, build_sdxl_vae)

ARTIFACTS: dict[str, tuple[str, Callable[[str], str]]] = {
    "sd15_ckpt": ("checkpoints/freeseg_tiny_sd15.safetensors", build_sd15_checkpoint),
    "sd2_ckpt": ("checkpoints/freeseg_tiny_sd2_v.safetensors", build_sd2_checkpoint),
    "sdxl_unet": ("diffusion_models/freeseg_tiny_sdxl_unet.safetensors", build_sdxl_unet),
    "sdxl_vae": ("vae/freeseg_tiny_sdxl_taesd.safetensors", build_sdxl_vae),
    "pixart_unet": ("diffusion_models/freeseg_tiny_pixart_sigma.safetensors", build_pixart_unet),
    "sd15_diffusers_config": ("diffusers/freeseg_tiny_sd15_config", build_sd15_diffusers_config),
    "sd15_diffusers_vae": ("diffusers/freeseg_tiny_vae", build_sd15_diffusers_vae),
    "blip2_dir": ("blip2/freeseg_tiny_blip2", build_blip2),
    "blip_dir": ("blip/freeseg_tiny_blip", build_blip1),
    "open_clip_dir": ("open_clip/freeseg_tiny_open_clip", build_open_clip),
    # DiTs (synthetic/dit.py): real formats and widths, reduced depth.
    "flux_unet": ("diffusion_models/freeseg_tiny_flux_dev.safetensors", build_flux_unet),
    "flux_vae": ("vae/freeseg_tiny_flux_ae.safetensors", build_flux_vae),
    "sd3_ckpt": ("checkpoints/freeseg_tiny_sd35.safetensors", build_sd3_checkpoint),
    "clip_l": ("text_encoders/freeseg_tiny_clip_l.safetensors", build_clip_l),
}


def _stamp_path(cache: Path, key: str) -> Path:
    return cache / "stamps" / f"{key}.json"


def _stamp_content(key: str) -> dict[str, Any]:
    return {"key": key, "fixture_version": FIXTURE_VERSION, "path": ARTIFACTS[key][0]}


def _is_fresh(cache: Path, key: str) -> bool:
    """True when the artefact exists and its stamp matches the current recipe version."""
    stamp = _stamp_path(cache, key)
    if not stamp.is_file() or not (cache / ARTIFACTS[key][0]).exists():
        return False
    try:
        return json.loads(stamp.read_text()) == _stamp_content(key)
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def _cache_lock(cache: Path) -> Iterator[None]:
    """Exclusive inter-process lock on ``cache/.lock`` (parallel test runs build once)."""
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def build_all(cache_dir: str | os.PathLike, verbose: bool = False,
              keys: list[str] | None = None) -> dict[str, str]:
    """Build every fixture (or only those of ``keys``) into ``cache_dir`` once; return
    ``{key: absolute path}``.

    Keys: those of ``ARTIFACTS`` (``sd15_ckpt``, ``sd2_ckpt``, ``sdxl_unet``, ``sdxl_vae``,
    ``pixart_unet``, ``blip2_dir``, ``blip_dir``, ``open_clip_dir``, the diffusers-side folders, the
    DiTs ``flux_unet``, ``flux_vae``, ``sd3_ckpt`` and ``clip_l``).
    An artefact is rebuilt when missing or when its stamp's FIXTURE_VERSION differs.
    """
    cache = Path(cache_dir).resolve()
    unknown = sorted(set(keys or ()) - set(ARTIFACTS))
    if unknown:
        raise KeyError(f"unknown fixture(s) {unknown}; known: {sorted(ARTIFACTS)}")
    paths: dict[str, str] = {}
    with _cache_lock(cache):
        for key, (rel, builder) in ARTIFACTS.items():
            if keys is not None and key not in keys:
                continue
            target = cache / rel
            if not _is_fresh(cache, key):
                t0 = time.perf_counter()
                builder(str(target))
                stamp = _stamp_path(cache, key)
                stamp.parent.mkdir(parents=True, exist_ok=True)
                stamp.write_text(json.dumps(_stamp_content(key)) + "\n")
                os.chmod(stamp, 0o644)
                if verbose:
                    print(f"built {key} in {time.perf_counter() - t0:.1f} s", flush=True)
            paths[key] = str(target)
    return paths


def default_cache_dir() -> Path:
    """Shared fixture cache: ``$FREESEG_FIXTURE_CACHE`` or ``<repo>/.cache/fixtures``."""
    return Path(fixture_cache())


def build_all_subprocess(cache_dir: str | os.PathLike | None = None, timeout: float = 600) -> dict[str, str]:
    """Like ``build_all`` but builds in a fresh interpreter, so the caller never imports ComfyUI.

    When every artefact is already fresh no subprocess is started.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache = cache.resolve()
    if all(_is_fresh(cache, key) for key in ARTIFACTS):
        return {key: str(cache / rel) for key, (rel, _) in ARTIFACTS.items()}
    code = ("import json, sys; sys.path.insert(0, sys.argv[2]); from synthetic.cache import build_all; "
            "print('FIXTURES=' + json.dumps(build_all(sys.argv[1])))")
    out = subprocess.run([sys.executable, "-c", code, str(cache), REPO], cwd=REPO,
                         capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"building the model fixtures failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("FIXTURES=")][-1]
    return json.loads(line[len("FIXTURES="):])


def _size_bytes(path: Path) -> int:
    """Size of a file, or the total size of the files in a folder."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(argv: list[str]) -> int:
    """CLI: build all fixtures into ``argv[0]`` and print paths, sizes and time."""
    if len(argv) != 1:
        print("usage: python -m synthetic.cache CACHE_DIR", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    paths = build_all(argv[0], verbose=True)
    for key, p in paths.items():
        print(f"{key:14s} {_size_bytes(Path(p)) / 2**20:8.1f} MiB  {p}")
    print(f"total time {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
