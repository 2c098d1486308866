"""Folder segmentation bookkeeping (freeseg.app.batch) and the driver side of a Ray run
(freeseg.app.cluster: output files, worker errors, Ray missing), without servers or Ray. The
real servers on Ray are in tests/server/test_multi_server.py and test_ray_workers.py."""

from __future__ import annotations

import csv
import io
import json
import os
import sys

import pytest
from PIL import Image

from freeseg.app import batch
from freeseg.app import cluster
from freeseg.app.client import ComfyError
from freeseg.app.output import SegmentError


def touch_image(path, size=(8, 6)) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, (10, 20, 30)).save(path)
    return str(path)


# -- inputs and names ----------------------------------------------------------------------------


def test_folder_and_glob_listing_and_unique_names(tmp_path):
    src = tmp_path / "src"
    for rel in ("b.png", "a.jpg", "a.png", "sub/c.png", "notes.txt"):
        if rel.endswith(".txt"):
            (src / rel).write_text("x")
        else:
            touch_image(src / rel)
    out = src / "out"
    touch_image(out / "a" / "overlay.png")  # an earlier run's output inside the input folder
    paths, root = batch.list_images(str(src), exclude=str(out))
    assert [os.path.relpath(p, src) for p in paths] == ["a.jpg", "a.png", "b.png"]  # no sub-folders, no out/
    names = [it.name for it in batch.plan(paths, root, str(out))]
    assert names == ["a_jpg", "a_png", "b"]

    paths, root = batch.list_images(str(src / "**" / "*.png"), exclude=str(out))
    assert root == str(src)
    items = batch.plan(paths, root, str(out))
    assert [it.name for it in items] == ["a", "b", "sub__c"]
    assert all(it.folder == os.path.join(str(out), it.name) for it in items)
    assert batch.is_batch_input(str(src)) and batch.is_batch_input(str(src / "*.png"))
    assert not batch.is_batch_input(str(src / "b.png"))
    with pytest.raises(batch.BatchError, match="no images match"):
        batch.list_images(str(src / "*.gif"))
    with pytest.raises(batch.BatchError, match="no image files in the folder"):
        batch.list_images(str(out))  # its only image is in a sub-folder


def test_globs_never_follow_folder_links(tmp_path):
    """A `**` glob over a folder that links back to itself lists each file once (glob.glob
    followed the loop and listed one picture 28 times); a link to a file is listed."""
    src = tmp_path / "src"
    touch_image(src / "one.png")
    touch_image(src / "sub" / "two.jpg")
    touch_image(src / ".hidden" / "three.png")  # as glob: ** does not enter hidden folders
    os.symlink(str(src), str(src / "sub" / "loop"))
    os.symlink(str(src / "one.png"), str(src / "sub" / "alias.png"))
    paths, root = batch.list_images(str(src / "**" / "*.*"))
    assert root == str(src)
    assert [os.path.relpath(p, src) for p in paths] == ["one.png", "sub/alias.png", "sub/two.jpg"]
    assert [os.path.relpath(p, src) for p in batch.list_images(str(src / "*" / "*.jpg"))[0]] == ["sub/two.jpg"]
    assert [os.path.relpath(p, src) for p in batch.list_images(str(src / ".*" / "*.png"))[0]] == [
        ".hidden/three.png"]


@pytest.mark.skipif(os.name != "posix", reason="file names are bytes on POSIX only")
def test_file_names_that_are_not_utf8(tmp_path):
    """caf\\xe9.png (Latin-1 bytes) in a folder: its folder name, index rows and messages write
    the byte as \\xNN, and the index (CSV and JSON) is written."""
    src = tmp_path / "in"
    src.mkdir()
    good = os.fsencode(str(src)) + b"/caf\xe9.png"
    bad = os.fsencode(str(src)) + b"/b\xe4d.png"
    try:
        with open(good, "wb") as f:
            Image.new("RGB", (8, 6)).save(f, format="PNG")
    except OSError:
        pytest.skip("this file system refuses file names that are not UTF-8")
    with open(bad, "wb") as f:
        f.write(b"not an image")
    paths, root = batch.list_images(str(src))
    items = batch.plan(paths, root, str(tmp_path / "out"))
    assert [it.name for it in items] == ["b\\xe4d", "caf\\xe9"]
    assert [os.fsencode(it.image) for it in items] == [bad, good]  # read under its real name

    def segment(item):
        try:
            with Image.open(item.image) as im:  # the real file
                im.load()
        except OSError:
            raise ValueError(f"cannot read the image {item.image}") from None  # the name as Python holds it
        os.makedirs(item.folder, exist_ok=True)
        doc = {"images": [{"caption": ""}], "masks": [{"index": 0, "file": "mask_0_dog.png", "label": "dog",
                                                       "score": 1.0, "area": 1, "bbox": None}]}
        with open(os.path.join(item.folder, "labels.json"), "w") as f:
            json.dump(doc, f)
        return doc

    stream = io.StringIO()
    failures = batch.run_batch(items, segment, "key", stream=stream)
    assert list(failures) == [items[0].image] and os.path.isdir(os.path.join(str(tmp_path / "out"), "caf\\xe9"))
    assert f"error: {src}/b\\xe4d.png: " in stream.getvalue()
    entries = batch.index_entries(items, "key", failures, str(tmp_path / "out"))
    summary = batch.write_index(str(tmp_path / "out"), entries)
    assert (summary["done"], summary["failed"]) == (1, 1)
    rows = list(csv.DictReader(open(tmp_path / "out" / "index.csv", encoding="utf-8")))
    assert [(r["image"], r["folder"], r["status"], r["mask_file"]) for r in rows] == [
        (f"{src}/b\\xe4d.png", "b\\xe4d", "failed", ""),
        (f"{src}/caf\\xe9.png", "caf\\xe9", "done", "caf\\xe9/mask_0_dog.png")]
    assert rows[0]["error"] == f"cannot read the image {src}/b\\xe4d.png"
    index = json.loads((tmp_path / "out" / "index.json").read_text(encoding="utf-8"))
    assert [e["image"] for e in index["images"]] == [r["image"] for r in rows]


def test_done_marker_resume_and_invalidation(tmp_path):
    image = touch_image(tmp_path / "in" / "x.png")
    (item,) = batch.plan([image], str(tmp_path / "in"), str(tmp_path / "out"))
    assert not batch.is_done(item, "k1")
    os.makedirs(item.folder)
    (tmp_path / "out" / "x" / "labels.json").write_text("{}")
    batch.mark_done(item, "k1")
    assert batch.is_done(item, "k1") and not batch.is_done(item, "k2")  # other settings: redo
    os.utime(image, ns=(1, 1))  # the image changed
    assert not batch.is_done(item, "k1")


def test_run_batch_skips_done_reports_failures_and_writes_the_index(tmp_path):
    paths = [touch_image(tmp_path / "in" / f"{n}.png") for n in ("ok", "bad", "empty")]
    items = batch.plan(paths, str(tmp_path / "in"), str(tmp_path / "out"))
    calls = []

    def segment(item):
        calls.append(item.name)
        if item.name == "bad":
            raise ComfyError("node 7 failed:\nboom")
        os.makedirs(item.folder, exist_ok=True)
        masks = [] if item.name == "empty" else [{"index": 0, "file": "mask_0_dog.png", "label": "dog",
                                                  "score": 0.5, "area": 3, "bbox": [0, 0, 2, 2]}]
        doc = {"images": [{"caption": "a dog"}], "masks": masks}
        with open(os.path.join(item.folder, "labels.json"), "w") as f:
            json.dump(doc, f)
        return doc

    stream = io.StringIO()
    failures = batch.run_batch(items, segment, "key", threads=2, stream=stream)
    assert sorted(calls) == ["bad", "empty", "ok"] and list(failures) == [paths[1]]
    lines = stream.getvalue().splitlines()
    assert f"error: {paths[1]}: node 7 failed: boom" in lines
    finished = [ln for ln in lines if ln.startswith("[")]
    assert len(finished) == 3 and finished[-1].startswith("[" + "#" * 30 + "] 3/3 images, 1 failed")
    assert "ETA 0:00:00" in finished[-1] and sum("FAILED bad" in ln for ln in finished) == 1

    entries = batch.index_entries(items, "key", failures, str(tmp_path / "out"))
    summary = batch.write_index(str(tmp_path / "out"), entries)
    assert (summary["images"], summary["done"], summary["failed"]) == (3, 2, 1)
    doc = json.loads((tmp_path / "out" / "index.json").read_text())
    assert [e["status"] for e in doc["images"]] == ["done", "failed", "done"]
    assert doc["images"][0]["masks"][0]["file"] == "ok/mask_0_dog.png"
    assert doc["images"][1]["error"] == "node 7 failed: boom"
    rows = list(csv.DictReader(open(tmp_path / "out" / "index.csv")))
    assert [r["folder"] for r in rows] == ["ok", "bad", "empty"]
    assert rows[0]["label"] == "dog" and rows[0]["bbox"] == "[0, 0, 2, 2]" and rows[0]["mask_file"] == "ok/mask_0_dog.png"
    assert rows[1]["status"] == "failed" and rows[2]["label"] == "" and rows[2]["status"] == "done"

    # Rerun: the done images are skipped, the failed one is tried again.
    calls.clear()
    stream = io.StringIO()
    failures = batch.run_batch(items, segment, "key", stream=stream)
    assert calls == ["bad"] and list(failures) == [paths[1]]
    assert "3/3 images, 2 already done, 1 failed" in stream.getvalue()


def test_progress_line_eta():
    bar = batch.BatchProgress(10, skipped=2, stream=io.StringIO(), width=10)
    bar.start = 100.0
    assert bar.line(now=101.0) == "[##--------] 2/10 images, 2 already done, 0 failed, 0:00:01 elapsed, ETA ?"
    bar.finished = 2  # 2 images in 20 s: 10 s each, 6 left
    assert bar.line(now=120.0) == "[####------] 4/10 images, 2 already done, 0 failed, 0:00:20 elapsed, ETA 0:01:00"


# -- a Ray run, driver side -------------------------------------------------------------------------


def test_worker_files_are_written_with_labels_json_last_and_stale_masks_removed(tmp_path):
    folder = tmp_path / "img"
    folder.mkdir()
    (folder / "mask_3_old.png").write_bytes(b"stale")
    (folder / "notes.txt").write_text("the user's")
    cluster.write_files(str(folder), {"labels.json": b"{}", "mask_0_dog.png": b"png", "overlay.png": b"png"})
    assert sorted(os.listdir(folder)) == ["labels.json", "mask_0_dog.png", "notes.txt", "overlay.png"]
    assert (folder / "mask_0_dog.png").read_bytes() == b"png"


def test_a_workers_failure_is_named_by_its_own_exception():
    """An actor whose creation failed: Ray's error carries the worker's traceback; the reason
    shown is the worker's own exception line."""
    text = ("The actor died because of an error raised in its creation task, ray::Worker.__init__()\n"
            "  File \"cluster.py\", line 1, in __init__\n"
            "freeseg.app.client.ComfyConnectionError: cannot reach the ComfyUI server at http://x: refused\n")
    assert cluster.reason(RuntimeError(text)) == "cannot reach the ComfyUI server at http://x: refused"
    assert cluster.reason(RuntimeError("plain")) == "plain"


def test_without_ray_the_cluster_extra_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(SegmentError, match="requirements-cluster.txt"):
        cluster.import_ray()


def test_a_fatal_error_stops_the_batch(tmp_path):
    paths = [touch_image(tmp_path / "in" / f"{i}.png") for i in range(5)]
    items = batch.plan(paths, str(tmp_path / "in"), str(tmp_path / "out"))
    calls = []
    rejected = ComfyError("POST /prompt: Prompt outputs failed validation", {"node_errors": {"8": {}}})

    def segment(item):
        calls.append(item.name)
        raise rejected

    with pytest.raises(ComfyError) as err:
        batch.run_batch(items, segment, "key", threads=1, stream=io.StringIO(),
                        fatal=lambda e: "node_errors" in getattr(e, "details", {}))
    assert err.value is rejected and calls == ["0"]  # nothing more was queued


def test_folder_with_the_diffusers_backend(tmp_path, monkeypatch, capsys):
    """`segment DIR --backend diffusers`: the pipeline is loaded once, every image goes through
    segment_to_folder into its own folder, the index lists them (stand-ins for the pipeline
    and segment_to_folder: the real ones have their own tests)."""
    import freeseg.app.segment as app_segment
    import freeseg.backends.diffusers as backend

    for sub, name in (("checkpoints", "sd.safetensors"), ("blip2", "b2/config.json"),
                      ("open_clip", "oc/open_clip_config.json")):
        (tmp_path / "models" / sub / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "models" / sub / name).write_text("{}")
    for n in ("x", "y"):
        touch_image(tmp_path / "in" / f"{n}.png")
    loads, runs = [], []

    class FakePipeline:
        cache_key = "freeseg-diffusers-0123456789abcdef"

        @classmethod
        def from_pretrained(cls, sd, clip=None, blip2=None, **kwargs):
            loads.append(sd)
            return cls()

    def segment_to_folder(pipeline, image_path, out_dir, class_names=None):
        runs.append((os.path.basename(image_path), os.path.basename(out_dir), class_names))
        os.makedirs(out_dir, exist_ok=True)
        doc = {"images": [{"caption": ""}], "masks": [{"index": 0, "file": "mask_0_dog.png", "label": "dog",
                                                       "score": 1.0, "area": 1, "bbox": [0, 0, 1, 1]}]}
        (tmp_path / "out" / os.path.basename(out_dir) / "labels.json").write_text(json.dumps(doc))
        return doc

    monkeypatch.setattr(backend, "FreeSegPipeline", FakePipeline)
    monkeypatch.setattr(app_segment, "segment_to_folder", segment_to_folder)
    argv = [str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--backend", "diffusers", "--models",
            str(tmp_path / "models"), "--class-names", "dog", "--quiet"]
    assert app_segment.main(argv) == 0
    assert len(loads) == 1 and runs == [("x.png", "x", "dog"), ("y.png", "y", "dog")]
    assert json.loads(capsys.readouterr().out)["done"] == 2
    rows = list(csv.DictReader(open(tmp_path / "out" / "index.csv")))
    assert [(r["folder"], r["label"], r["mask_file"]) for r in rows] == [("x", "dog", "x/mask_0_dog.png"),
                                                                          ("y", "dog", "y/mask_0_dog.png")]
    runs.clear()
    assert app_segment.main(argv) == 0 and runs == []  # resumed: both done
    argv[-2] = "cat"  # other class names: other settings, done again
    assert app_segment.main(argv) == 0 and len(runs) == 2


def test_servers_with_different_models_are_refused():
    """Outputs must not depend on the server: servers that would fill the workflow with other
    model names are refused before anything runs; the same names give one key."""
    from freeseg.app.paths import DEFAULT_WORKFLOW
    from freeseg.app.workflow import load_workflow
    from freeseg.app.remote import WorkflowJob, check_servers

    workflow = load_workflow(DEFAULT_WORKFLOW)

    def info(checkpoint: str) -> dict:
        out = {n["class_type"]: {"input": {"required": {}}} for n in workflow.values()}
        out["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"] = [[checkpoint]]
        return out

    job = WorkflowJob(workflow, class_names="dog", seed=1)
    servers = {"http://a": info("sd15.safetensors"), "http://b": info("sd15.safetensors")}
    key = check_servers(servers, job)
    assert key.startswith("comfyui-") and key == job.key(info("sd15.safetensors"), "http://x")
    assert key != WorkflowJob(workflow, class_names="dog", seed=2).key(info("sd15.safetensors"), "http://x")
    servers["http://b"] = info("other.safetensors")
    with pytest.raises(ComfyError, match="the servers would run different prompts") as err:
        check_servers(servers, job)
    assert "other.safetensors" in str(err.value) and "--checkpoint" in str(err.value)
