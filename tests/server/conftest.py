"""Session fixtures: the random-weight models and one real ComfyUI server for all tests."""

import os

import numpy as np
import pytest
from PIL import Image

from model_fixtures import build_all_subprocess
from comfy_harness import EXTRA_MODEL_LINKS, FIXTURE_CACHE, MODEL_LINKS, REPO, ComfyServer, link


@pytest.fixture(scope="session")
def model_files() -> dict:
    """The random-weight models (built once, cached under .cache/fixtures), in a subprocess so
    the test process never imports ComfyUI itself."""
    return build_all_subprocess(FIXTURE_CACHE)


def start_server(model_files: dict, base: str, links: dict) -> ComfyServer:
    """A real ComfyUI server with our pack, the probe pack and the fixtures `links` installed."""
    for key, (folder, name) in links.items():
        link(model_files[key], os.path.join(base, "models", folder, name))
    link(os.path.join(REPO, "tests", "helpers", "probe_pack"), os.path.join(base, "custom_nodes", "freeseg_test_probe"))
    return ComfyServer(base).start()


@pytest.fixture(scope="session")
def server(model_files, tmp_path_factory):
    """One real ComfyUI server with our pack and the fixtures installed."""
    srv = start_server(model_files, str(tmp_path_factory.mktemp("comfy-base")), MODEL_LINKS)
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def models_server(model_files, tmp_path_factory):
    """A second server that also offers the SD2 checkpoint and the BLIP (v1) captioner, so it has
    two checkpoints and two captioners (started only by the tests that use it)."""
    srv = start_server(model_files, str(tmp_path_factory.mktemp("comfy-base-models")),
                       {**MODEL_LINKS, **EXTRA_MODEL_LINKS})
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def models_client(models_server):
    return models_server.client


@pytest.fixture(scope="session")
def client(server):
    return server.client


def write_test_image(path: str, width: int, height: int, seed: int = 0, mode: str = "RGB") -> str:
    """A synthetic picture: a few flat-coloured shapes on a gradient, saved as PNG."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    img = np.stack([xx / max(width - 1, 1), yy / max(height - 1, 1), np.full_like(xx, 0.3, float)], -1)
    for _ in range(3):
        cx, cy = rng.uniform(0.2, 0.8) * width, rng.uniform(0.2, 0.8) * height
        r = rng.uniform(0.1, 0.25) * min(width, height)
        img[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = rng.uniform(0, 1, 3)
    pil = Image.fromarray((img * 255).astype(np.uint8))
    if mode != "RGB":
        pil = pil.convert(mode)
    pil.save(path)
    return path


def uploader(client, folder):
    """upload(width, height, seed=0, mode="RGB") -> the name LoadImage takes on `client`'s server."""
    def _upload(width: int, height: int, seed: int = 0, mode: str = "RGB") -> str:
        path = write_test_image(str(folder / f"img_{width}x{height}_{seed}_{mode}.png"), width, height, seed, mode)
        return client.upload_image(path)

    return _upload


@pytest.fixture(scope="session")
def upload(client, tmp_path_factory):
    """upload(width, height, seed=0, mode="RGB") -> the name LoadImage takes."""
    return uploader(client, tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="session")
def models_upload(models_client, tmp_path_factory):
    """`upload` for the second server (`models_server`)."""
    return uploader(models_client, tmp_path_factory.mktemp("images-models"))
