"""Session fixtures: the random-weight models and one real ComfyUI server for all tests."""

import os
import signal

import pytest

from comfy_harness import EXTRA_MODEL_LINKS, MODEL_LINKS, ComfyServer, link
from freeseg.app.paths import REPO
from synthetic.cache import build_all_subprocess
from synthetic.scenes import write_test_image
from workflow_tools import PINNED_COMFYUI

# Tests stop commands with SIGINT (Ctrl-C) and expect them to stop. A test run started where
# SIGINT is ignored (a background job `cmd &` of a shell without job control, as in some CI
# runners) would hand that on to every command it starts, which then never see the signal:
# SIGINT is made to raise KeyboardInterrupt here again, so the commands start with it at default.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def model_files() -> dict:
    """The random-weight models (built once, cached under .cache/fixtures), in a subprocess so
    the test process never imports ComfyUI itself."""
    return build_all_subprocess()


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


@pytest.fixture(scope="session")
def comfyui_version(client) -> str:
    return client.get_json("/system_stats")["system"]["comfyui_version"]


@pytest.fixture(scope="session")
def pinned(comfyui_version) -> bool:
    """Whether the server is the ComfyUI the workflow files are generated from
    (workflow_tools.PINNED_COMFYUI); on another one the workflow tests tolerate what it changed."""
    return comfyui_version == PINNED_COMFYUI


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
