"""bench/bench_pipeline.py's argument parsing and prompt/timing helpers (no models, no server,
nothing timed: the benchmark itself is run by hand, see its docstring)."""

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "bench_pipeline.py"


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
