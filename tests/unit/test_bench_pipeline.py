"""bench/bench_pipeline.py's argument parsing and prompt/timing helpers (no models, no server,
nothing timed: the benchmark itself is run by hand, see its docstring)."""

import importlib.util
import os
import sys

import pytest

from freeseg.app.paths import REPO

BENCH = os.path.join(REPO, "bench", "bench_pipeline.py")


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_pipeline_under_test", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_defaults_and_quick(bench):
    args = bench.parse_args([])
    assert (args.resolution, args.batch, args.n_clusters, args.quick) == (512, 4, 4, False)
    quick = bench.parse_args(["--quick"])
    assert (quick.resolution, quick.batch) == (256, 2)
    assert (quick.max_new_tokens, quick.baselines, quick.fixtures, quick.threads) == (10, 2, False, None)
    assert bench.parse_args(["--quick", "--resolution", "384", "--batch", "3"]).resolution == 384
    assert bench.parse_args(["--batch", "1"]).baselines == 1  # never more baselines than images
    assert bench.parse_args([]).max_new_tokens == 30


@pytest.mark.parametrize("argv", [["--resolution", "500"], ["--resolution", "64"], ["--batch", "0"],
                                  ["--n-clusters", "1"], ["--threads", "0"], ["--baselines", "0"],
                                  ["--max-new-tokens", "0"]])
def test_bad_arguments_are_refused(bench, argv):
    with pytest.raises(SystemExit):
        bench.parse_args(argv)


def test_node_windows_run_until_the_next_node(bench):
    prompt = {"1": {"class_type": "LoadImage"}, "7": {"class_type": "FreeSegDiffusionFeatures"}}
    windows = bench.node_windows([("1", 10.0), ("7", 10.5)], 14.0, prompt)
    assert windows == [("1", "LoadImage", 10.0, 10.5), ("7", "FreeSegDiffusionFeatures", 10.5, 14.0)]


def test_cpu_seconds_interpolate_between_samples(bench):
    sampler = bench.ProcSampler(pid=0)
    sampler.samples = [(0.0, 100, 1.0), (1.0, 300, 2.0), (2.0, 200, 4.0)]
    assert sampler.cpu_at(0.5) == pytest.approx(1.5) and sampler.cpu_at(5.0) == 4.0
    assert bench.span(0.5, 1.5, sampler) == pytest.approx(1.5) and bench.span(0.5, 1.5) == 1.0
    assert sampler.peak(0.5, 2.0) == 300 and sampler.at(1.5) == 300


def test_run_collects_websocket_events(bench):
    run = bench.Run("x", {"3": {"class_type": "KSampler"}})
    for kind, data, in [("execution_start", {}), ("execution_cached", {"nodes": ["1", "2"]}),
                        ("executing", {"node": "3"}), ("executing", {"node": None})]:
        run.on_event(kind, data)
    assert run.cached == ["1", "2"] and [n for n, _ in run.starts] == ["3"]
    assert run.total >= 0 and run.seconds("KSampler") >= 0 and run.seconds("VAEEncode") == 0


def test_full_and_batch_prompts_use_the_bench_models(bench):
    full = bench.full_prompt("a.png", 256, 5, refine="guided", save_features="/tmp/f.safetensors")
    by_type = {n["class_type"]: n["inputs"] for n in full.values()}
    assert by_type["CheckpointLoaderSimple"]["ckpt_name"] == bench.CKPT_NAME
    assert by_type["FreeSegDiffusionFeatures"]["resolution"] == 256
    assert by_type["FreeSegClusterMasks"]["n_clusters"] == 5
    assert by_type["FreeSegRefineMasks"]["method"] == "guided"
    assert by_type["FreeSegBenchSaveFeatures"]["path"] == "/tmp/f.safetensors"

    batch = bench.batch_prompt(["a.png", "b.png", "c.png"], 512, 4)
    features = bench.node_id(batch, "FreeSegDiffusionFeatures")
    image_link = batch[features]["inputs"]["image"]
    assert batch[image_link[0]]["class_type"] == "ImageBatch"
    loads = sorted(n["inputs"]["image"] for n in batch.values() if n["class_type"] == "LoadImage")
    assert loads == ["a.png", "b.png", "c.png"]
    for node in batch.values():  # every image consumer reads the batch, none the first image alone
        if node["class_type"] != "ImageBatch":
            assert all(v != [bench.node_id(bench.full_prompt("a.png", 512, 4), "LoadImage"), 0]
                       for v in node["inputs"].values())


def test_baseline_prompt_is_one_unet_forward(bench):
    base = bench.baseline_prompt("a.png", 512, 4, seed=2)
    ks = next(n["inputs"] for n in base.values() if n["class_type"] == "KSampler")
    assert (ks["steps"], ks["cfg"], ks["denoise"], ks["seed"]) == (1, 1.0, 1.0, 2)
    scale = next(n["inputs"] for n in base.values() if n["class_type"] == "ImageScale")
    assert (scale["width"], scale["height"]) == (512, 512)


def test_sdxl_and_blip2_defaults(bench):
    sdxl = bench.parse_args(["--sdxl"])
    assert (sdxl.resolution, sdxl.batch, sdxl.baselines) == (1024, 1, 1)
    assert bench.parse_args(["--sdxl", "--quick"]).resolution == 512
    blip2 = bench.parse_args(["--blip2"])
    assert (blip2.resolution, blip2.batch, blip2.baselines) == (512, 1, 1)
    with pytest.raises(SystemExit):
        bench.parse_args(["--sdxl", "--blip2"])
    setup = bench.Setup.of(bench.parse_args(["--sdxl", "--fixtures"]))
    assert (setup.ckpt_key, setup.captioner_key, setup.ckpt_name) == ("sdxl_reduced", "blip", bench.SDXL_CKPT_NAME)
    assert bench.Setup.of(blip2).captioner_name == bench.BLIP2_NAME


def test_baseline_loaders_are_the_workflows(bench):
    """Same loader inputs in both graphs: ComfyUI's cache keeps one loaded captioner and CLIP."""
    full = bench.full_prompt("a.png", 512, 4, ckpt="x.safetensors", captioner="cap")
    base = bench.baseline_prompt("a.png", 512, 4, seed=0, ckpt="x.safetensors", captioner="cap")
    for ct in ("FreeSegBLIP2Loader", "FreeSegCLIPLoader", "CheckpointLoaderSimple"):
        assert base[bench.node_id(base, ct)]["inputs"] == full[bench.node_id(full, ct)]["inputs"], ct
    cap = bench.caption_prompt("a.png", 12, captioner="cap")
    bare = bench.bare_caption_prompt("a.png", 12, captioner="cap")
    assert sorted(n["class_type"] for n in cap.values()) == ["FreeSegBLIP2Loader", "FreeSegCaption", "LoadImage",
                                                            "PreviewAny"]
    assert cap[bench.node_id(cap, "FreeSegCaption")]["inputs"]["max_new_tokens"] == 12
    assert (bare[bench.node_id(bare, "FreeSegBLIP2Loader")]["inputs"]
            == cap[bench.node_id(cap, "FreeSegBLIP2Loader")]["inputs"])


def test_memory_need_counts_the_cpu_dtypes(bench):
    gib = 2**30
    need = bench.memory_need({"sdxl": {"unet": gib / 4, "vae": gib / 4, "text": gib / 2}}, 1024)
    assert need["weights"] == {"sdxl": pytest.approx(3 * gib)}  # fp32 UNet and VAE, fp16 text encoders
    assert need["activations"] == pytest.approx(bench.CAPTION_ACTIVATIONS + 4 * bench.FEATURES_ACTIVATIONS_512)
    assert need["total"] == pytest.approx(3 * gib + need["activations"] + bench.PROCESS_BASE + bench.MEMORY_MARGIN)


@pytest.mark.parametrize("avail_gib, argv, layout", [(64, ["--blip2"], "full"), (18, ["--blip2"], "caption"),
                                                     (8, ["--blip2"], None), (64, ["--sdxl"], "full"),
                                                     (12, ["--sdxl"], None), (64, ["--blip2", "--caption-only"],
                                                                              "caption")])
def test_plan_picks_the_layout_that_fits(bench, monkeypatch, avail_gib, argv, layout):
    monkeypatch.setattr(bench, "mem_available", lambda: avail_gib * 2**30)
    args = bench.parse_args(argv)
    got, info = bench.plan(args, bench.Setup.of(args), None)  # nominal counts: nothing built
    assert got == layout and info["mem_available_gib"] == avail_gib


@pytest.fixture(scope="module")
def realsize():
    path = os.path.join(REPO, "bench", "realsize_models.py")
    spec = importlib.util.spec_from_file_location("realsize_models_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_blip2_tokenizer_has_opt_ids(realsize, tmp_path):
    """The BLIP-2 recipe's tokenizer: OPT's special ids, <image> at the config's image_token_index,
    every id of the vocabulary decodable; unknown model keys are refused before anything is built."""
    tok = realsize._opt_tokenizer()
    cfg = realsize.BLIP2_OPT_2_7B
    assert len(tok) == realsize.OPT_VOCAB + 1 <= cfg["text_config"]["vocab_size"]
    assert tok.convert_tokens_to_ids("<image>") == cfg["image_token_index"]
    text = cfg["text_config"]
    assert (tok.pad_token_id, tok.bos_token_id) == (text["pad_token_id"], text["bos_token_id"])
    ids = tok("a picture of").input_ids
    assert ids[0] == 2 and tok.decode(ids, skip_special_tokens=True) == "a picture of"
    assert isinstance(tok.decode([50264, cfg["text_config"]["eos_token_id"]]), str)
    with pytest.raises(KeyError):
        realsize.build(tmp_path, keys=("sdxl", "nope"))
    assert not any(tmp_path.iterdir())


def test_capture_arguments(bench):
    args = bench.parse_args(["--capture"])
    assert (args.capture, args.capture_steps, args.capture_cfg, args.capture_pairs, args.resolution) == \
        (True, 20, 7.0, 2, 512)
    assert bench.parse_args(["--capture", "--quick"]).resolution == 256
    for argv in (["--capture", "--sdxl"], ["--capture", "--blip2"], ["--capture-steps", "0"],
                 ["--capture-pairs", "0"], ["--capture-cfg", "0"]):
        with pytest.raises(SystemExit):
            bench.parse_args(argv)


def test_capture_prompts_differ_only_in_the_model_and_the_features(bench):
    plain = bench.capture_prompt(False, 3, 512, 20, 7.0, "plain3")
    captured = bench.capture_prompt(True, 3, 512, 20, 7.0, "capture3", save_features="/tmp/c.st",
                                    direct_features="/tmp/d.st")
    for nid in ("1", "2", "3", "4", "6", "21", "22"):  # loader, prompts, latent, decode, cluster, refine
        assert plain[nid] == captured[nid], nid
    ks_plain, ks_capture = plain["5"]["inputs"], captured["5"]["inputs"]
    assert {k: v for k, v in ks_plain.items() if k != "model"} == {k: v for k, v in ks_capture.items() if k != "model"}
    assert (ks_plain["steps"], ks_plain["cfg"], ks_plain["seed"]) == (20, 7.0, 3)
    assert ks_plain["model"] == ["1", 0] and ks_capture["model"] == ["10", 0]
    assert captured["10"]["class_type"] == "FreeSegCaptureFeatures" and captured["10"]["inputs"]["model"] == ["1", 0]
    assert plain["20"]["class_type"] == "FreeSegDiffusionFeatures" and plain["20"]["inputs"]["image"] == ["6", 0]
    assert captured["20"]["inputs"] == {"capture": ["10", 1], "latent": ["5", 0]}
    direct = captured["30"]["inputs"]  # the cosine check: the same final latent at timestep 0
    assert direct["latent"] == ["5", 0] and direct["timestep"] == 0 and "image" not in direct
    assert captured["31"]["inputs"]["path"] == "/tmp/d.st" and captured["32"]["inputs"]["features"] == ["20", 0]
    assert "30" not in bench.capture_prompt(True, 3, 512, 20, 7.0, "c") and "32" not in plain
    assert plain["7"]["inputs"]["filename_prefix"] == "plain3" and plain["8"]["inputs"]["filename_prefix"] == "latents/plain3"


def _run(bench, prompt, spans):
    """A Run whose nodes (class type -> seconds, in order) ran back to back from t=0."""
    run = bench.Run("x", prompt)
    run.on_event("execution_start", {})
    run.t_begin, t = 0.0, 0.0
    for nid, seconds in spans:
        run.starts.append((nid, t))
        t += seconds
    run.t_end = t
    return run


def test_capture_figures_pair_neighbouring_runs(bench):
    plain = bench.capture_prompt(False, 0, 512, 20, 7.0, "p")
    captured = bench.capture_prompt(True, 0, 512, 20, 7.0, "c", save_features="/x", direct_features="/y")
    a = [_run(bench, plain, [("5", 100.0), ("6", 10.0), ("20", 15.0), ("21", 4.0), ("22", 1.0)]),
         _run(bench, plain, [("5", 200.0), ("6", 10.0), ("20", 30.0), ("21", 4.0), ("22", 1.0)])]
    b = [_run(bench, captured, [("10", 0.0), ("5", 102.0), ("6", 10.0), ("20", 0.1), ("30", 12.0), ("31", 0.1),
                                ("32", 0.1), ("21", 4.0), ("22", 1.0)]),
         _run(bench, captured, [("10", 0.0), ("5", 202.0), ("6", 10.0), ("20", 0.2), ("21", 4.0), ("22", 1.0)])]
    f = bench.capture_figures(a, b)
    assert f["generation_plain_s"] == 150.0 and f["generation_capture_s"] == 152.0
    assert f["generation_capture_over_plain"] == pytest.approx((1.02 + 1.01) / 2, abs=1e-4)
    assert f["segmentation_old_s"] == pytest.approx(27.5) and f["segmentation_capture_s"] == pytest.approx(5.15)
    assert f["segmentation_capture_over_old"] == pytest.approx((5.1 / 20 + 5.2 / 35) / 2, abs=1e-4)
    assert f["captured_over_features_node"] == pytest.approx((0.1 / 15 + 0.2 / 30) / 2, abs=1e-4)
    # the cosine check's nodes and the probes (30, 31, 32) are not part of the captured prompt's time
    assert f["prompt_capture_s"] == pytest.approx((117.1 + 217.2) / 2)


def test_capture_checks_compare_files_bit_for_bit(bench, tmp_path):
    torch = pytest.importorskip("torch")
    import numpy as np
    from PIL import Image
    from safetensors.torch import save_file

    (tmp_path / "output" / "latents").mkdir(parents=True)
    latent = torch.randn(1, 4, 8, 8)
    for tag, lat in (("a", latent), ("b", latent.clone()), ("c", latent + 1e-6)):
        save_file({"latent_tensor": lat}, str(tmp_path / "output" / "latents" / f"{tag}.latent"))
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "output" / f"{tag}.png")

    def run(tag):
        r = bench.Run(tag, {})
        r.entry = {"outputs": {"7": {"images": [{"filename": f"{tag}.png", "subfolder": ""}]},
                               "8": {"latents": [{"filename": f"{tag}.latent", "subfolder": "latents"}]}}}
        return r
    feats = torch.randn(1, 6, 4, 4)
    info = '{"blocks": ["x", "y"]}'
    save_file({"features": feats}, str(tmp_path / "cap.st"), metadata={"info": info})
    save_file({"features": feats * 2 + 0.01 * torch.randn_like(feats)}, str(tmp_path / "dir.st"),
              metadata={"info": info})
    checks = bench.capture_checks(tmp_path, [run("a")], [run("b")], str(tmp_path / "dir.st"), str(tmp_path / "cap.st"))
    assert checks["pairs_bit_identical"] == 1 and set(checks["cosine"]) == {"x", "y"}
    assert checks["min_cosine"] >= 0.99
    with pytest.raises(AssertionError, match="latents differ"):
        bench.capture_checks(tmp_path, [run("a")], [run("c")], str(tmp_path / "dir.st"), str(tmp_path / "cap.st"))
    save_file({"features": torch.randn(1, 6, 4, 4)}, str(tmp_path / "far.st"), metadata={"info": info})
    with pytest.raises(AssertionError, match="cosine"):
        bench.capture_checks(tmp_path, [run("a")], [run("b")], str(tmp_path / "far.st"), str(tmp_path / "cap.st"))
