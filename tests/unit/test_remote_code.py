"""No code from model folders, ever: `freeseg.model_files.check_no_code` and the loaders that
call it (`load_open_clip`, `load_captioner`, so the diffusers pipeline too), on hand-copied and
downloaded-style folders built from the random-weight fixtures (tests/helpers/remote_code_models.py).
Every refusal names the file (and the key), and the sentinel the malicious module would write
never appears. CPU only."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from synthetic import cache
import remote_code_models as evil
from freeseg import model_files as mf
from freeseg.caption import load_captioner
from freeseg.clip_label import load_open_clip


@pytest.fixture(scope="session")
def fixture_paths() -> dict[str, str]:
    return cache.build_all_subprocess()


@pytest.fixture()
def sentinel(tmp_path: Path):
    """Where the malicious module would write; asserted absent after the test."""
    path = tmp_path / "SENTINEL"
    yield str(path)
    assert not path.exists(), "code from a model folder ran"


def write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data), encoding="utf-8")


def test_the_malicious_folder_really_runs_code_in_open_clip_itself(tmp_path: Path, fixture_paths) -> None:
    """Control: open_clip alone (in a child process) imports the module of the hand-copied
    attack folder, so the refusals below are what keeps it from running."""
    folder = evil.build(fixture_paths["open_clip_dir"], str(tmp_path / "clip"), str(tmp_path / "ran"))
    code = ("import open_clip, sys\ntry:\n    open_clip.get_tokenizer('local-dir:' + sys.argv[1])\n"
            "except Exception:\n    pass\n")
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    subprocess.run([sys.executable, "-c", code, folder], env=env, timeout=300, check=True, capture_output=True)
    assert (tmp_path / "ran").exists()


@pytest.mark.parametrize("downloaded", [False, True], ids=["hand-copied", "downloaded"])
@pytest.mark.parametrize("attacks,words", [
    (evil.ATTACKS, [evil.MODULE, "code file"]),
    (("auto_map", "kwargs"), ["open_clip_config.json", "model_cfg.text_cfg.tokenizer_kwargs.trust_remote_code"]),
    (("auto_map",), ["tokenizer_config.json", "auto_map"]),
])
def test_open_clip_folders_asking_for_code_are_refused(tmp_path, fixture_paths, sentinel, downloaded, attacks, words):
    folder = evil.build(fixture_paths["open_clip_dir"], str(tmp_path / "clip"), sentinel, attacks,
                        downloaded_from="owner/clip" if downloaded else None)
    for call in (lambda: mf.check_no_code("open_clip", folder), lambda: load_open_clip(folder)):
        with pytest.raises(ValueError) as err:
            call()
        assert all(w in str(err.value) for w in words), str(err.value)
        assert folder in str(err.value) and "never runs code from a model folder" in str(err.value)


@pytest.mark.parametrize("downloaded", [False, True], ids=["hand-copied", "downloaded"])
@pytest.mark.parametrize("kind,attacks,words", [
    ("blip_dir", ("code", "auto_map"), [evil.MODULE, "code file"]),
    ("blip_dir", ("auto_map",), ["tokenizer_config.json", "auto_map"]),
    ("blip2_dir", ("auto_map",), ["tokenizer_config.json", "auto_map"]),
])
def test_captioner_folders_asking_for_code_are_refused(tmp_path, fixture_paths, sentinel, downloaded, kind, attacks,
                                                       words):
    folder = evil.build(fixture_paths[kind], str(tmp_path / "blip"), sentinel, attacks,
                        downloaded_from="owner/blip" if downloaded else None)
    for call in (lambda: mf.check_no_code("blip2", folder), lambda: load_captioner(folder)):
        with pytest.raises(ValueError) as err:
            call()
        assert all(w in str(err.value) for w in words), str(err.value)


def test_the_diffusers_pipeline_refuses_them_too(tmp_path, fixture_paths, sentinel):
    from freeseg.backends.diffusers import FreeSegPipeline

    clip = evil.build(fixture_paths["open_clip_dir"], str(tmp_path / "clip"), sentinel)
    blip = evil.build(fixture_paths["blip_dir"], str(tmp_path / "blip"), sentinel, ("auto_map",))
    for models, words in (({"clip": clip}, "evil_tokenizer.py is a code file"),
                          ({"blip2": blip}, "tokenizer_config.json asks for remote code")):
        with pytest.raises(ValueError, match=words):
            FreeSegPipeline.from_pretrained(fixture_paths["sd15_ckpt"], vae=False, device="cpu",
                                            sd_config=fixture_paths["sd15_diffusers_config"], **models)


@pytest.mark.parametrize("file,data,key", [
    ("preprocessor_config.json", {"a": [1, {"b": {"trust_remote_code": "yes"}}]}, "a[1].b.trust_remote_code"),
    ("config.json", {"model_type": "blip", "text_config": {"auto_map": {"AutoModel": "x.Y"}}}, "text_config.auto_map"),
    ("processor_config.json", {"processor_class": "BlipProcessor", "trust_remote_code": 1}, "trust_remote_code"),
])
def test_remote_code_keys_at_any_depth(tmp_path, fixture_paths, file, data, key):
    folder = tmp_path / "blip"
    shutil.copytree(fixture_paths["blip_dir"], folder)
    old = json.loads((folder / file).read_text()) if (folder / file).is_file() else {}
    write_json(folder / file, {**old, **data})
    with pytest.raises(ValueError) as err:
        mf.check_no_code("blip2", str(folder))
    assert f"{folder / file} asks for remote code (key {key})" in str(err.value)


def test_harmless_values_are_not_refused(tmp_path, fixture_paths):
    folder = tmp_path / "blip"
    shutil.copytree(fixture_paths["blip_dir"], folder)
    config = json.loads((folder / "config.json").read_text())
    write_json(folder / "config.json", {**config, "trust_remote_code": False, "auto_map": {},
                                        "x": {"trust_remote_code": None}})
    mf.check_no_code("blip2", str(folder))
    load_captioner(str(folder))


@pytest.mark.parametrize("name", ["helper.pyc", "sub/dir/native.so", "lib/native.so.1", "module.PY", "ext.pyd",
                                  "__pycache__/m.cpython-312.pyc"])
def test_code_files_anywhere_are_refused(tmp_path, fixture_paths, name):
    folder = tmp_path / "clip"
    shutil.copytree(fixture_paths["open_clip_dir"], folder)
    (folder / name).parent.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(b"\0")
    with pytest.raises(ValueError, match="is a code file"):
        mf.check_no_code("open_clip", str(folder))


def test_a_config_that_cannot_be_read_is_refused(tmp_path, fixture_paths):
    folder = tmp_path / "clip"
    shutil.copytree(fixture_paths["open_clip_dir"], folder)
    (folder / "extra.json").write_text("{" * 100000)
    with pytest.raises(ValueError, match=r"cannot read .*extra.json as JSON"):
        mf.check_no_code("open_clip", str(folder))


def test_a_link_loop_in_a_folder_ends(tmp_path, fixture_paths):
    folder = tmp_path / "clip"
    shutil.copytree(fixture_paths["open_clip_dir"], folder)
    os.symlink(folder, folder / "loop")
    mf.check_no_code("open_clip", str(folder))
    (folder / "x.py").write_text("")
    with pytest.raises(ValueError, match="x.py is a code file"):
        mf.check_no_code("open_clip", str(folder))


def test_hf_tokenizer_only_from_the_folder_itself(tmp_path, fixture_paths, sentinel):
    """`hf_tokenizer_name` is allowed when the folder holds the tokenizer's files, which are then
    loaded from the folder (offline, whatever the name says); otherwise it is refused, and so are
    `hf_model_name` and `timm_model_pretrained`."""
    folder = tmp_path / "clip"
    shutil.copytree(fixture_paths["open_clip_dir"], folder)
    config = json.loads((folder / "open_clip_config.json").read_text())
    config["model_cfg"]["text_cfg"]["hf_tokenizer_name"] = "someone/elsewhere"
    write_json(folder / "open_clip_config.json", config)
    with pytest.raises(ValueError) as err:
        load_open_clip(str(folder))
    assert "open_clip_config.json names the tokenizer 'someone/elsewhere'" in str(err.value)
    assert "model_cfg.text_cfg.hf_tokenizer_name" in str(err.value)
    for name in ("tokenizer.json", "tokenizer_config.json"):  # a BERT tokenizer, data files only
        shutil.copy(Path(fixture_paths["blip_dir"], name), folder / name)
    _, _, tokenizer = load_open_clip(str(folder))
    ids = tokenizer(["a picture of a dog"])
    assert ids.shape == (1, 77) and 0 < int(ids[0, 1]) < 200  # the fixture's 200-word vocabulary
    for cfg, key, value in (("text_cfg", "hf_model_name", "someone/text-model"),
                            ("vision_cfg", "timm_model_pretrained", True)):
        changed = json.loads(json.dumps(config))
        changed["model_cfg"][cfg][key] = value
        write_json(folder / "open_clip_config.json", changed)
        with pytest.raises(ValueError, match=f"model_cfg.{cfg}.{key}"):
            load_open_clip(str(folder))


def test_fixture_models_pass(fixture_paths):
    for key, kind in (("open_clip_dir", "open_clip"), ("blip_dir", "blip2"), ("blip2_dir", "blip2")):
        mf.check_no_code(kind, fixture_paths[key])
    mf.check_no_code("open_clip", fixture_paths["sd15_ckpt"])  # a single file: nothing to check
