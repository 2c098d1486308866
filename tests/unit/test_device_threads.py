"""Where Cluster Masks and Refine Masks run: the device plumbing of the stages they call
(``cluster_batch`` / ``refine_segments`` with a device: results equal, masks back on the CPU)
and the CPU thread rule (``freeseg.threads``) with its context manager."""

import pytest
import torch

from freeseg.features import DiffusionFeatures
from freeseg.segments import Segments
from freeseg.settings import DEFAULTS
from freeseg.stages import cluster_batch, refine_segments
from freeseg.threads import cpu_threads, others_running, torch_threads, usable_cpus


@pytest.mark.parametrize("cpus, load1, running, want", [
    (2, 0.1, 0, 2),    # idle: every CPU
    (2, 2.3, 0, 2),    # the load average still counts our own previous work; nothing else runs now
    (2, 0.2, 3, 2),    # a blip of runnable tasks the load average does not confirm
    (2, 1.1, 1, 1),    # one other busy process (e.g. `yes > /dev/null`): one thread
    (2, 9.5, 7, 1),    # a loaded box: never fewer than 1
    (16, 4.2, 5, 12),  # 4 busy of 16
])
def test_cpu_threads_rule(cpus, load1, running, want):
    assert cpu_threads(cpus, load1, running) == want


def test_cpu_threads_without_a_running_count(monkeypatch):
    """No /proc/loadavg (others_running gives None): the load average alone counts."""
    import freeseg.threads

    monkeypatch.setattr(freeseg.threads, "others_running", lambda *a, **k: None)
    assert cpu_threads(4, 3.0) == 1


def test_live_readings_are_sane():
    assert usable_cpus() >= 1
    running = others_running(samples=3)
    assert running is None or running >= 0
    assert 1 <= cpu_threads() <= usable_cpus()


def test_torch_threads_restores_the_count():
    before = torch.get_num_threads()
    other = 1 if before != 1 else 2
    with torch_threads(other) as n:
        assert n == other and torch.get_num_threads() == other
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError):
        with torch_threads(other):
            raise RuntimeError("boom")
    assert torch.get_num_threads() == before
    with torch_threads(before):
        assert torch.get_num_threads() == before


def _features(seed: int = 0) -> DiffusionFeatures:
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(2, 16, 8, 8, generator=g)
    feats[:, :4, :4, :] += 3.0  # two clear regions per image
    return DiffusionFeatures(feats.half(), (64, 64), "SD15", "cross_attn_queries", 0, 128, ["a", "b"])


def _scene() -> tuple[Segments, torch.Tensor]:
    img = torch.zeros(1, 64, 64, 3)
    img[:, 16:48, 16:48] = torch.tensor([0.9, 0.2, 0.1])
    masks = torch.zeros(1, 2, 64, 64)
    masks[:, 1, 12:44, 12:44] = 1.0  # a blocky, shifted mask of the square
    masks[:, 0] = 1.0 - masks[:, 1]
    seg = Segments(masks, labels=[[None, "square"]], scores=[[0.0, 0.9]], class_names=[["square"]])
    return seg, img


def test_cluster_on_a_device_equals_the_default():
    settings = DEFAULTS.replace(n_clusters=2)
    default = cluster_batch(_features(), settings)
    on_cpu = cluster_batch(_features(), settings, device=torch.device("cpu"))
    with torch_threads(1):
        one_thread = cluster_batch(_features(), settings, device="cpu")
    assert on_cpu.masks.device.type == "cpu"
    assert torch.equal(default.masks, on_cpu.masks) and torch.equal(default.masks, one_thread.masks)


@pytest.mark.parametrize("method", ["crf", "guided"])
def test_refine_on_a_device_equals_the_default(method):
    seg, img = _scene()
    default = refine_segments(seg, img, method)
    on_cpu = refine_segments(seg, img, method, device=torch.device("cpu"))
    with torch_threads(1):
        one_thread = refine_segments(seg, img, method, device="cpu")
    assert on_cpu.masks.device.type == "cpu" and on_cpu.labels == seg.labels
    assert torch.equal(default.masks, on_cpu.masks)
    assert torch.allclose(default.masks, one_thread.masks, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_cluster_and_refine_match_the_cpu_and_come_back_on_it():
    settings = DEFAULTS.replace(n_clusters=2)
    cpu = cluster_batch(_features(), settings)
    gpu = cluster_batch(_features(), settings, device="cuda")
    assert gpu.masks.device.type == "cpu" and torch.equal(gpu.masks, cpu.masks)
    seg, img = _scene()
    for method in ("crf", "guided"):
        on_cpu = refine_segments(seg, img, method)
        on_gpu = refine_segments(seg, img, method, device="cuda")
        assert on_gpu.masks.device.type == "cpu"
        assert (on_gpu.masks != on_cpu.masks).float().mean() < 1e-3 if method == "crf" else \
            torch.allclose(on_gpu.masks, on_cpu.masks, atol=1e-3)
