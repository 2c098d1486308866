"""One settings object, and every option reaches every entry point (issue 17 items 1-3).

For every ``FreeSegSettings`` field (parametrised over the dataclass fields):

* the command lines: ``freeseg segment`` and ``freeseg eval`` parse ``--setting NAME=VALUE``
  into the typed value (``--clusters`` / ``--seed`` / ``--resolution`` are its shorthands);
* the comfyui backend: ``apply_settings`` writes it into the right node input of the shipped
  ``freeseg_full`` workflow (or refuses, naming the field, where no node holds it), and the
  settings read back from the filled workflow are the ones given;
* the ComfyUI nodes: their inputs' min / max / default are the settings' own (one range per
  input: ``min_area`` 0..0.5 in the node, the settings and ``freeseg.instances``);
* the diffusers backend: ``FreeSegPipeline.segment(settings=...)`` runs with it (random-weight
  fixtures, CPU), the new knobs with a visible effect (automatic K, K from the class names,
  the fine grid, instances).
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from synthetic import cache
from synthetic import models as fx
from freeseg.app import segment as app_segment
from freeseg.app.output import SegmentError
from freeseg.app.paths import DEFAULT_WORKFLOW
from freeseg.app.settings_options import SETTING_INPUTS, apply_settings, setting_values, settings_in_workflow
from freeseg.app.workflow import load_workflow
from freeseg.eval import cli as eval_cli
from freeseg.instances import components
from freeseg.names import lines_per_image, names_per_image, parse_names
from freeseg.settings import DEFAULTS, FLOAT_RANGES, INT_RANGES, PAPER, FreeSegSettings, parse_setting
from freeseg.vocab import parse_background

FIELDS = [f.name for f in dataclasses.fields(FreeSegSettings)]

# A value other than the default for every field: (as typed on a command line, as Python holds it).
OTHER = {
    "use_caption": ("false", False),
    "max_new_tokens": ("40", 40),
    "min_new_tokens": ("2", 2),
    "num_beams": ("2", 2),
    "caption_prompt": ("a photo of ", "a photo of "),
    "resolution": ("256", 256),
    "timestep": ("100", 100),
    "source": ("decoder_blocks", "decoder_blocks"),
    "detail": ("fine", "fine"),
    "seed": ("7", 7),
    "n_clusters": ("0", 0),
    "max_clusters": ("3", 3),
    "k_from": ("class_names", "class_names"),
    "class_offset": ("2", 2),
    "shared_batch": ("true", True),
    "cluster_method": ("agglomerative", "agglomerative"),
    "n_init": ("3", 3),
    "crop_mode": ("bbox", "bbox"),
    "prompt": ("ensemble", "ensemble"),
    "threshold": ("0.25", 0.25),
    "rule": ("paper", "paper"),
    "background": ("Sky, wall", ("sky", "wall")),
    "refine": ("guided", "guided"),
    "instances": ("yes", True),
    "min_area": ("0.01", 0.01),
}


def test_every_field_has_another_value() -> None:
    assert set(OTHER) == set(FIELDS) == set(SETTING_INPUTS)
    assert all(getattr(DEFAULTS, name) != value for name, (_, value) in OTHER.items())
    assert PAPER == DEFAULTS.replace(rule="paper", refine="crf")


@pytest.mark.parametrize("name", FIELDS)
def test_parse_setting_types_every_field(name: str) -> None:
    text, value = OTHER[name]
    assert parse_setting(f"{name}={text}") == (name, value)
    assert getattr(DEFAULTS.replace(**{name: value}), name) == value


@pytest.mark.parametrize("text, words", [("bogus=1", "unknown setting 'bogus'"), ("n_clusters", "NAME=VALUE"),
                                         ("n_clusters=four", "n_clusters"), ("instances=maybe", "instances"),
                                         ("threshold=high", "threshold")])
def test_parse_setting_refuses_naming_the_setting(text: str, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        parse_setting(text)


@pytest.mark.parametrize("name, value", [("min_area", 0.6), ("min_area", float("nan")), ("n_clusters", 65),
                                         ("resolution", 500), ("seed", -1), ("detail", "coarse"),
                                         ("instances", 1), ("class_offset", 17), ("max_clusters", 1)])
def test_validation_names_the_setting(name: str, value) -> None:
    with pytest.raises(ValueError, match=name):
        DEFAULTS.replace(**{name: value})


def test_min_area_has_one_range() -> None:
    low, high = FLOAT_RANGES["min_area"]
    assert (low, high) == (0.0, 0.5)
    components(torch.ones(4, 4), high)
    DEFAULTS.replace(min_area=high)
    for bad in (high + 0.01, low - 0.01):
        with pytest.raises(ValueError, match="min_area"):
            components(torch.ones(4, 4), bad)
        with pytest.raises(ValueError, match="min_area"):
            DEFAULTS.replace(min_area=bad)


def test_one_names_parser() -> None:
    assert parse_names(" dog,cat\n Dog ,  potted   plant,,") == ["dog", "cat", "potted plant"]
    assert parse_names(["a, b", "B", "c"]) == ["a", "b", "c"] and parse_names(None) == []
    assert names_per_image("dog, cat", 2) == [["dog", "cat"], ["dog", "cat"]]
    assert names_per_image("dog\n\ncat, sky\n", 2) == [["dog"], ["cat", "sky"]]
    assert lines_per_image(["a", "b"], 2, "captions") == ["a", "b"]
    with pytest.raises(ValueError, match="class_names has 3 lines but the batch has 2"):
        names_per_image("a\nb\nc", 2)
    with pytest.raises(ValueError, match="captions"):
        lines_per_image(["a"], 2, "captions")
    assert parse_background("Sky, wall\nsky") == ("sky", "wall") and parse_background("") == ()


# ------------------------------------------------------------------------------ command lines

@pytest.mark.parametrize("name", FIELDS)
def test_segment_cli_setting_reaches_the_settings(name: str) -> None:
    text, value = OTHER[name]
    args = app_segment.build_parser().parse_args(["x.png", "--out", "o", "--setting", f"{name}={text}"])
    assert setting_values(args) == {name: value}


@pytest.mark.parametrize("name", FIELDS)
def test_eval_cli_setting_reaches_the_settings(name: str) -> None:
    text, value = OTHER[name]
    for backend in ("diffusers", "comfyui"):
        args = eval_cli.build_parser().parse_args(["--root", "r", "--backend", backend, "--setting", f"{name}={text}"])
        assert setting_values(args) == {name: value}


def test_shorthand_flags_are_settings() -> None:
    args = app_segment.build_parser().parse_args(["x.png", "--out", "o", "--clusters", "0", "--seed", "3",
                                                  "--resolution", "256", "--setting", "instances=true"])
    assert setting_values(args) == {"n_clusters": 0, "seed": 3, "resolution": 256, "instances": True}
    assert setting_values(args, shorthands=False) == {"instances": True}
    twice = app_segment.build_parser().parse_args(["x.png", "--out", "o", "--seed", "3", "--setting", "seed=4"])
    with pytest.raises(ValueError, match="seed: given twice"):
        setting_values(twice)
    bad = eval_cli.build_parser().parse_args(["--root", "r", "--backend", "diffusers", "--setting", "min_area=0.9"])
    with pytest.raises(ValueError, match="min_area"):
        setting_values(bad)


def test_cli_refuses_a_bad_setting_before_running(tmp_path, capsys) -> None:
    assert app_segment.main([str(tmp_path / "x.png"), "--out", str(tmp_path / "o"), "--setting", "n_clusters=99"]) == 2
    assert "n_clusters" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        eval_cli.main(["--root", str(tmp_path), "--predictions", str(tmp_path), "--setting", "seed=1"])
    assert "--setting" in capsys.readouterr().err


@pytest.mark.parametrize("name", FIELDS)
def test_segment_cli_setting_reaches_the_diffusers_backend(name: str, tmp_path, monkeypatch) -> None:
    """``freeseg segment --backend diffusers --setting NAME=VALUE`` hands the setting to
    ``FreeSegPipeline.from_pretrained`` (a stand-in records it: loading has its own tests)."""
    import freeseg.backends.diffusers as backend

    for sub, file in (("checkpoints", "sd.safetensors"), ("open_clip", "oc/open_clip_config.json"),
                      ("blip2", "b2/config.json")):
        (tmp_path / sub / file).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / sub / file).write_text("{}")
    loaded: dict = {}

    class Recorder:
        @classmethod
        def from_pretrained(cls, sd, clip=None, blip2=None, **kwargs):
            loaded.update(kwargs)
            return cls()

    monkeypatch.setattr(backend, "FreeSegPipeline", Recorder)
    text, value = OTHER[name]
    args = app_segment.build_parser().parse_args(["x.png", "--out", str(tmp_path / "o"), "--backend", "diffusers",
                                                  "--models", str(tmp_path), "--setting", f"{name}={text}"])
    app_segment.load_diffusers(args, {}, "dog")
    assert loaded[name] == value


# ------------------------------------------------------------------------------ comfyui workflows

def _expected_input(name: str, value):
    return ", ".join(value) if name == "background" else value


@pytest.mark.parametrize("name", FIELDS)
def test_comfyui_workflow_filling_sets_the_node_input(name: str) -> None:
    workflow = load_workflow(DEFAULT_WORKFLOW)
    _, value = OTHER[name]
    if name == "use_caption":
        filled = apply_settings(workflow, {name: value})
        assert not any(n["class_type"] == "FreeSegBLIP2Loader" for n in filled.values())
        assert any(n["class_type"] == "FreeSegBLIP2Loader" for n in workflow.values())  # the original is kept
        assert settings_in_workflow(filled)[name] is False
        return
    if not SETTING_INPUTS[name]:  # no node input holds it (the nodes use the paper's value)
        with pytest.raises(SegmentError, match=f"setting {name}"):
            apply_settings(workflow, {name: value})
        return
    filled = apply_settings(workflow, {name: value})
    set_on = [(n["class_type"], i) for n in filled.values() for c, i in SETTING_INPUTS[name]
              if n["class_type"] == c]
    assert set_on
    for node_id, node in filled.items():
        for class_type, input_name in SETTING_INPUTS[name]:
            if node["class_type"] == class_type:
                assert node["inputs"][input_name] == _expected_input(name, value)
                assert workflow[node_id]["inputs"][input_name] != _expected_input(name, value)
    assert settings_in_workflow(filled)[name] == _expected_input(name, value)
    assert json.dumps(filled)  # still a JSON prompt


def test_comfyui_refuses_a_setting_the_workflow_cannot_hold() -> None:
    pipeline_only = {"1": {"class_type": "FreeSegPipeline", "inputs": {"n_clusters": 4, "seed": 0, "rule": "open",
                                                                          "class_names": ""}}}
    assert apply_settings(pipeline_only, {"n_clusters": 0, "rule": "paper"})["1"]["inputs"]["rule"] == "paper"
    with pytest.raises(SegmentError, match="setting detail: .*FreeSegDiffusionFeatures.detail"):
        apply_settings(pipeline_only, {"detail": "fine"})
    with pytest.raises(SegmentError, match="setting use_caption"):
        apply_settings(pipeline_only, {"use_caption": True})


# ------------------------------------------------------------------------------ ComfyUI nodes

@pytest.fixture(scope="module")
def node_inputs() -> dict:
    """{(node class, input name): the V3 input} of every pack node."""
    fx.import_comfy()
    from comfy_unet_features import import_pack_module

    nodes = import_pack_module("nodes")
    return {(cls.define_schema().node_id, inp.id): inp for cls in nodes.NODES for inp in cls.define_schema().inputs}


@pytest.mark.parametrize("name", FIELDS)
def test_node_inputs_take_the_settings_ranges_and_defaults(node_inputs: dict, name: str) -> None:
    for class_type, input_name in SETTING_INPUTS[name]:
        inp = node_inputs[(class_type, input_name)]
        default = getattr(DEFAULTS, name)
        assert inp.default == _expected_input(name, default), (class_type, input_name)
        if name in INT_RANGES or name in FLOAT_RANGES:
            low, high = INT_RANGES.get(name) or FLOAT_RANGES[name]
            if (class_type, name) == ("FreeSegPipeline", "n_clusters"):
                low = 1  # Segment Everything has no automatic K
            assert (inp.min, inp.max) == (low, high), (class_type, input_name)


# ------------------------------------------------------------------------------ diffusers backend

@pytest.fixture(scope="module")
def pipe():
    from freeseg.backends.diffusers import FreeSegPipeline

    paths = cache.build_all_subprocess()
    return FreeSegPipeline.from_pretrained(
        sd=paths["sd15_ckpt"], clip=paths["open_clip_dir"], blip2=paths["blip2_dir"],
        sd_config=paths["sd15_diffusers_config"], vae=paths["sd15_diffusers_vae"], device="cpu",
        dtype=torch.float32, resolution=128, refine="none", max_new_tokens=8, min_new_tokens=2)


def _picture() -> np.ndarray:
    rng = np.random.default_rng(5)
    img = np.full((40, 48, 3), 60, np.uint8)
    img[8:30, 10:26] = (200, 40, 40)
    img[20:36, 30:44] = (30, 180, 60)
    return np.clip(img + rng.integers(0, 20, img.shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("name", FIELDS)
def test_diffusers_backend_takes_every_setting(pipe, name: str) -> None:
    _, value = OTHER[name]
    extra = {"n_clusters": 0} if name == "max_clusters" else {"k_from": "class_names"} if name == "class_offset" \
        else {"instances": True} if name == "min_area" else {}
    settings = pipe.settings.replace(**{name: value}, **extra)
    result = pipe.segment(_picture(), "dog, grass", settings=settings)
    assert getattr(result.settings, name) == value
    k = result.masks.shape[0]
    if name == "n_clusters":  # automatic K
        assert 2 <= k <= settings.max_clusters
    elif name == "max_clusters":
        assert 2 <= k <= 3
    elif name == "k_from":
        assert k == len(result.class_names) + settings.class_offset
    elif name == "class_offset":
        assert k == len(result.class_names) + 2
    elif name == "detail":
        coarse = pipe.extract(torch.from_numpy(_picture()).float()[None] / 255, pipe.settings)
        assert len(result.blocks) > len(coarse.blocks)
    elif name in ("instances", "min_area"):
        assert len(result.instances) == k and all(r["instance"] >= 0 for r in result.records())
    elif name == "use_caption":
        assert result.caption == "" and result.class_names == ["dog", "grass"]
    else:
        assert k == settings.n_clusters or settings.instances
