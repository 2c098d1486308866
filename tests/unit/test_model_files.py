"""freeseg.model_files: which names pick a model, weight checks, downloads (with a fake fetch,
and with huggingface_hub itself against a stand-in hub on loopback for its errors); and that no
loading path of ours runs the full pickle unpickler (CPU, random-weight fixtures). The checks
for code in model folders are in test_remote_code.py."""

from __future__ import annotations

import http.server
import json
import os
import pickle
import shutil
import socket
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from synthetic import cache
from freeseg import model_files as mf
from freeseg.caption import load_captioner
from freeseg.clip_label import load_open_clip


@pytest.fixture(scope="session")
def fixture_paths() -> dict[str, str]:
    return cache.build_all_subprocess()


@pytest.fixture()
def roots(tmp_path: Path, fixture_paths: dict[str, str]) -> list[str]:
    """Two open_clip folders: the first holds the fixture (linked, as operators do) and a file."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    os.symlink(fixture_paths["open_clip_dir"], a / "tiny")
    (a / "ViT-B-32.safetensors").write_bytes(Path(fixture_paths["open_clip_dir"], "open_clip_model.safetensors").read_bytes())
    (tmp_path / "outside.safetensors").write_bytes(b"x")
    return [str(a), str(b)]


def test_find_entry_accepts_only_listed_names(roots: list[str], tmp_path: Path) -> None:
    assert mf.model_entries("open_clip", roots[0]) == ["ViT-B-32.safetensors", "tiny"]
    assert mf.find_entry("open_clip", roots, "tiny") == os.path.join(roots[0], "tiny")
    for bad in ("../outside.safetensors", str(tmp_path / "outside.safetensors"), "tiny/open_clip_config.json",
                "tiny/../tiny", "", ".", "..", "missing", "..\\outside.safetensors"):
        with pytest.raises(FileNotFoundError) as err:
            mf.find_entry("open_clip", roots, bad)
        message = str(err.value)
        assert "model_name" in message and roots[0] in message and roots[1] in message
        assert "open_clip_config.json" in message and "tiny" in message  # what belongs there, what is there


def test_find_entry_does_not_cross_kinds(roots: list[str]) -> None:
    with pytest.raises(FileNotFoundError, match="blip2"):
        mf.find_entry("blip2", roots, "tiny")  # an open_clip folder has no config.json


def test_check_weights_names_a_truncated_file(tmp_path: Path, fixture_paths: dict[str, str]) -> None:
    folder = tmp_path / "clip"
    shutil.copytree(fixture_paths["open_clip_dir"], folder)
    mf.check_weights("open_clip", str(folder))  # complete: no error
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "open_clip_config.json").write_text("{}")
    with pytest.raises(ValueError, match="holds no weights file"):
        mf.check_weights("open_clip", str(empty))
    weights = folder / "open_clip_model.safetensors"
    for size in (weights.stat().st_size - 1, 100, 3):
        with open(weights, "r+b") as f:
            f.truncate(size)
        with pytest.raises(ValueError) as err:
            mf.check_weights("open_clip", str(folder))
        assert str(weights) in str(err.value) and "open_clip_config.json" in str(err.value)


def test_check_weights_pickle_files_need_safe_torch(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "ViT-B-32.bin").write_bytes(b"not read")
    mf.check_weights("open_clip", str(tmp_path / "ViT-B-32.bin"))  # this torch is >= 2.6
    monkeypatch.setattr(mf, "torch_version", lambda: (2, 5))
    with pytest.raises(ValueError, match="ViT-B-32.bin.*torch >= 2.6"):
        mf.check_weights("open_clip", str(tmp_path / "ViT-B-32.bin"))


@pytest.mark.parametrize("repo_id", ["../x", "a/b/c", "a", "/a/b", "a/..", "a--b/c", "a/b.git", "a/b c", "", "a/b?c"])
def test_bad_repo_ids_are_refused(repo_id: str) -> None:
    with pytest.raises(ValueError, match="repo_id"):
        mf.check_repo_id(repo_id)


GB = 10**9


def copy_fixture(src: str, *extra: str):
    """A fake fetch that copies fixture folder `src` (and files `extra`) into the download folder,
    checking that the folder being filled is hidden from the model listing meanwhile."""
    calls = []

    def fetch(repo_id: str, local_dir: str, max_bytes: int) -> None:
        calls.append((repo_id, max_bytes))
        root = os.path.dirname(local_dir)
        assert os.path.basename(local_dir).startswith(".") and ".partial-" in local_dir
        for name in os.listdir(src):
            shutil.copy(os.path.join(src, name), local_dir)
        for name in extra:
            Path(local_dir, name).write_text("print('never imported')\n")
        assert mf.is_model_entry("open_clip", local_dir)  # a model already, and still never listed
        assert os.path.basename(local_dir) not in mf.model_entries("open_clip", root)

    fetch.calls = calls
    return fetch


def leftovers(root: Path) -> list[str]:
    return sorted(os.listdir(root)) if root.exists() else []


def test_download_checks_then_renames_into_place_and_reuses(tmp_path: Path, fixture_paths) -> None:
    fetch = copy_fixture(fixture_paths["open_clip_dir"])
    root = str(tmp_path)
    target = mf.download_entry("open_clip", root, " owner/clip-model ", 20 * GB, fetch)
    assert target == os.path.join(root, "clip-model") and fetch.calls == [("owner/clip-model", 20 * GB)]
    assert json.loads(Path(target, mf.DOWNLOAD_MARKER).read_text()) == {"repo_id": "owner/clip-model",
                                                                        "complete": True}
    assert leftovers(tmp_path) == ["clip-model"]  # no temporary folder left
    assert mf.download_entry("open_clip", root, "owner/clip-model", 20 * GB, fetch) == target
    assert len(fetch.calls) == 1  # reused
    load_open_clip(target)
    with pytest.raises(ValueError, match="already holds a download of 'owner/clip-model'"):
        mf.download_entry("open_clip", root, "other/clip-model", 20 * GB, fetch)
    shutil.copytree(fixture_paths["open_clip_dir"], tmp_path / "handmade")
    with pytest.raises(ValueError, match="not downloaded here"):
        mf.download_entry("open_clip", root, "owner/handmade", 20 * GB, fetch)
    assert len(fetch.calls) == 1
    assert mf.model_entries("open_clip", root) == ["clip-model", "handmade"]


def test_an_unfinished_download_of_an_older_version_is_not_reused(tmp_path: Path, fixture_paths) -> None:
    shutil.copytree(fixture_paths["open_clip_dir"], tmp_path / "clip")
    (tmp_path / "clip" / mf.DOWNLOAD_MARKER).write_text(json.dumps({"repo_id": "owner/clip", "complete": False}))
    with pytest.raises(ValueError, match="unfinished download"):
        mf.download_entry("open_clip", str(tmp_path), "owner/clip", 20 * GB,
                          copy_fixture(fixture_paths["open_clip_dir"]))


def test_a_download_failing_midway_leaves_nothing(tmp_path: Path, fixture_paths) -> None:
    def fetch(repo_id: str, local_dir: str, max_bytes: int) -> None:
        shutil.copy(Path(fixture_paths["open_clip_dir"], "open_clip_config.json"), local_dir)
        raise ConnectionRefusedError(111, "Connection refused")

    with pytest.raises(ValueError) as err:
        mf.download_entry("open_clip", str(tmp_path), "owner/clip", 20 * GB, fetch)
    assert "repo_id: owner/clip was not downloaded: cannot reach the hub" in str(err.value)
    assert "Connection refused" in str(err.value) and "nothing was kept" in str(err.value)
    assert leftovers(tmp_path) == []

    def interrupted(repo_id: str, local_dir: str, max_bytes: int) -> None:
        shutil.copy(Path(fixture_paths["open_clip_dir"], "open_clip_config.json"), local_dir)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        mf.download_entry("open_clip", str(tmp_path), "owner/clip", 20 * GB, interrupted)
    assert leftovers(tmp_path) == []


def test_what_arrives_is_checked_before_it_is_kept(tmp_path: Path, fixture_paths) -> None:
    clip = fixture_paths["open_clip_dir"]
    size = sum(os.path.getsize(os.path.join(clip, n)) for n in os.listdir(clip))
    with pytest.raises(ValueError, match=r"owner/clip is too big to download: what arrived .*FREESEG_DOWNLOAD_MAX_GB"):
        mf.download_entry("open_clip", str(tmp_path), "owner/clip", size - 1, copy_fixture(clip))
    with pytest.raises(ValueError, match=r"owner/notes is not one of the blip2 models \(it holds README.md\)"):
        mf.download_entry("blip2", str(tmp_path), "owner/notes", 20 * GB,
                          lambda repo_id, local_dir, max_bytes: Path(local_dir, "README.md").write_text("hi"))
    with pytest.raises(ValueError, match=r"owner/clip was downloaded but not kept: .*tokenizer.py is a code file"):
        mf.download_entry("open_clip", str(tmp_path), "owner/clip", 20 * GB, copy_fixture(clip, "tokenizer.py"))
    assert leftovers(tmp_path) == []


def test_download_size_cap_setting() -> None:
    assert mf.download_max_bytes("20") == 20 * GB and mf.download_max_bytes(0.5) == GB // 2
    for bad in ("0", "-1", "nan", "inf", "lots", None):
        with pytest.raises(ValueError, match="positive number of GB"):
            mf.download_max_bytes(bad)


# -- the hub's own errors, from huggingface_hub against a stand-in hub on loopback ------------

class StandinHub(http.server.BaseHTTPRequestHandler):
    """Answers the hub's model-info call: 404 (RepoNotFound), 401 (GatedRepo), or a 30 GB listing."""

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        if "/missing" in self.path:
            self.reply(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
        elif "/gated" in self.path:
            self.reply(401, {"error": "Access to this repository is restricted"}, {"X-Error-Code": "GatedRepo"})
        else:
            self.reply(200, {"id": "owner/big", "sha": "a" * 40,
                             "siblings": [{"rfilename": "open_clip_model.safetensors", "size": 30 * GB},
                                          {"rfilename": "open_clip_config.json", "size": 900}]})

    def reply(self, status: int, body: dict, headers: dict = {}) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        for key, value in {"Content-Type": "application/json", "Content-Length": str(len(data)), **headers}.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture()
def hub(monkeypatch):
    """huggingface_hub pointed at a stand-in hub; yields a function that repoints it."""
    import huggingface_hub.constants as constants

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), StandinHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    yield lambda url: monkeypatch.setattr(constants, "ENDPOINT", url)
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("repo_id,words", [
    ("owner/missing", "the hub has no such repository (404"),
    ("owner/gated", "the repository is gated"),
    ("owner/big", "too big to download: its files on the hub add up to 30.00 GB, over this server's cap of 20.00 GB"),
])
def test_hub_errors_are_named(tmp_path: Path, hub, repo_id: str, words: str) -> None:
    with pytest.raises(ValueError) as err:
        mf.download_entry("open_clip", str(tmp_path), repo_id, 20 * GB)  # the real fetch: huggingface_hub
    assert words in str(err.value) and f"repo_id: {repo_id}" in str(err.value)
    assert leftovers(tmp_path) == []


def test_an_unreachable_or_switched_off_hub_is_named(tmp_path: Path, hub, monkeypatch) -> None:
    import huggingface_hub.constants as constants

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    hub(f"http://127.0.0.1:{closed}")
    with pytest.raises(ValueError, match=r"cannot reach the hub \(offline, connection refused"):
        mf.download_entry("open_clip", str(tmp_path), "owner/clip", 20 * GB)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE"):
        mf.download_entry("open_clip", str(tmp_path), "owner/clip", 20 * GB)
    assert leftovers(tmp_path) == []


# -- no loading path of ours runs the full unpickler ------------------------------------------

@pytest.fixture()
def no_unpickling(monkeypatch) -> list[dict]:
    """pickle's own unpickler raises; torch.load is recorded (and must be weights-only)."""
    def refuse(*args, **kwargs):
        raise AssertionError("a loading path unpickled with pickle's full unpickler")

    class RefusingUnpickler(pickle.Unpickler):  # a class, so modules may still subclass it
        load = refuse

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", RefusingUnpickler)
    calls: list[dict] = []
    real_load = torch.load

    def recorded_load(*args, **kwargs):
        calls.append(kwargs)
        assert kwargs.get("weights_only") is True, kwargs
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recorded_load)
    return calls


def test_fixture_models_load_without_unpickling(fixture_paths: dict[str, str], no_unpickling: list[dict]) -> None:
    load_open_clip(fixture_paths["open_clip_dir"])
    load_captioner(fixture_paths["blip2_dir"])
    assert no_unpickling == []  # safetensors all the way


def test_pickle_weights_load_weights_only(tmp_path: Path, fixture_paths: dict[str, str], no_unpickling) -> None:
    clip_dir = tmp_path / "clip"
    shutil.copytree(fixture_paths["open_clip_dir"], clip_dir)
    weights = clip_dir / "open_clip_model.safetensors"
    torch.save(load_file(str(weights)), clip_dir / "open_clip_pytorch_model.bin")
    weights.unlink()
    mf.check_weights("open_clip", str(clip_dir))
    load_open_clip(str(clip_dir))
    assert len(no_unpickling) == 1
    blip_dir = tmp_path / "blip"
    shutil.copytree(fixture_paths["blip2_dir"], blip_dir)
    torch.save(load_file(str(blip_dir / "model.safetensors")), blip_dir / "pytorch_model.bin")
    (blip_dir / "model.safetensors").unlink()
    load_captioner(str(blip_dir))
    assert len(no_unpickling) >= 2


def test_safetensors_problem_accepts_a_complete_file(tmp_path: Path) -> None:
    save_file({"a": torch.zeros(3), "b": torch.ones(2, 2)}, str(tmp_path / "w.safetensors"))
    assert mf.safetensors_problem(str(tmp_path / "w.safetensors")) is None
    with open(tmp_path / "w.safetensors", "ab") as f:
        f.write(b"\0")
    assert "bytes" in mf.safetensors_problem(str(tmp_path / "w.safetensors"))
