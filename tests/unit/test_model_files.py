"""freeseg.model_files: which names pick a model, weight checks, downloads; and that no loading
path of ours runs the full pickle unpickler (CPU, random-weight fixtures)."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import model_fixtures as fx
from freeseg import model_files as mf
from freeseg.caption import load_captioner
from freeseg.clip_label import load_open_clip


@pytest.fixture(scope="session")
def fixture_paths() -> dict[str, str]:
    return fx.build_all_subprocess(fx.default_cache_dir())


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


def test_download_writes_its_marker_and_never_reuses_another_folder(tmp_path: Path, fixture_paths) -> None:
    calls = []

    def fetch(repo_id: str, local_dir: str) -> None:
        calls.append(repo_id)
        for name in os.listdir(fixture_paths["open_clip_dir"]):
            shutil.copy(os.path.join(fixture_paths["open_clip_dir"], name), local_dir)

    root = str(tmp_path)
    target = mf.download_entry("open_clip", root, " owner/clip-model ", fetch)
    assert target == os.path.join(root, "clip-model") and calls == ["owner/clip-model"]
    assert json.loads(Path(target, mf.DOWNLOAD_MARKER).read_text()) == {"repo_id": "owner/clip-model",
                                                                        "complete": True}
    assert mf.download_entry("open_clip", root, "owner/clip-model", fetch) == target and len(calls) == 1
    with pytest.raises(ValueError, match="already holds a download of 'owner/clip-model'"):
        mf.download_entry("open_clip", root, "other/clip-model", fetch)
    shutil.copytree(fixture_paths["open_clip_dir"], tmp_path / "handmade")
    with pytest.raises(ValueError, match="not downloaded here"):
        mf.download_entry("open_clip", root, "owner/handmade", fetch)
    assert len(calls) == 1
    assert mf.model_entries("open_clip", root) == ["clip-model", "handmade"]


def test_download_that_is_not_a_model_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="is not one of the blip2 models"):
        mf.download_entry("blip2", str(tmp_path), "owner/empty", lambda repo_id, local_dir: None)
    assert json.loads(Path(tmp_path, "empty", mf.DOWNLOAD_MARKER).read_text())["complete"] is False


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
