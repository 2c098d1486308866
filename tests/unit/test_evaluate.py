"""End-to-end tests of `python -m freeseg eval` (freeseg.eval: cli / evaluate / sources / labels /
reports / datasets / metrics).

A tiny synthetic Pascal VOC split (three 32x48 images) is generated: rectangles of known
classes, palette-PNG ground truth with 1-pixel rings of 255 (boundary) around two of them.
Expected scores are worked out by hand below, not with the code under test.

Ground truth (H=32, W=48, 1536 pixels per image):
    img1 "2007_000001": person (15) rows 8..23 x cols 8..23 = 256 px; 255 ring rows 7..24 x
                        cols 7..24 minus the rectangle = 18*18-256 = 68 px; background 1212.
    img2 "2007_000002": dog (12) rows 0..15 x cols 0..23 = 384 px; background 1152; no 255.
    img3 "2007_000003": cat (8) rows 4..11 x cols 30..41 = 96 px; 255 ring rows 3..12 x cols
                        29..42 minus the rectangle = 140-96 = 44 px; background 1396.
"Known confusion" prediction: img1: person cols 8..15 (128 px), dog cols 16..23 (128 px),
the 68 ring pixels predicted person, rest background; img2 and img3 exact (rings -> 0).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import freeseg.eval.evaluate as ev
from freeseg.eval.datasets import (
    COCO_OBJECT_CLASSES, VOC_CLASSES, load_coco_object, load_voc, read_label_png,
)
from freeseg.eval.cli import main
from freeseg.eval.evaluate import evaluate
from freeseg.eval.labels import labels_to_prediction, map_label
from freeseg.eval.metrics import PerImageScores, confusion_matrix, dataset_miou, per_image_miou
from freeseg.eval.reports import format_table
from freeseg.eval.sources import PredictionFolder, SegmenterSource

H, W = 32, 48
STEMS = ["2007_000001", "2007_000002", "2007_000003"]
BG, CAT, DOG, PERSON = 0, 8, 12, 15
# VOC colours written out by hand (independent of freeseg.eval.datasets.color_palette).
VOC_RGB = {0: (0, 0, 0), 8: (64, 0, 0), 12: (64, 0, 128), 15: (192, 128, 128), 255: (224, 224, 192)}


def _ring(label: np.ndarray, r0: int, r1: int, c0: int, c1: int) -> None:
    """Set the 1-px ring just outside rows r0..r1 x cols c0..c1 (inclusive) to 255."""
    label[r0 - 1:r1 + 2, c0 - 1:c1 + 2] = 255
    label[r0:r1 + 1, c0:c1 + 1] = 0


def gt_maps() -> dict[str, np.ndarray]:
    """The three ground-truth maps described in the module docstring."""
    g1 = np.zeros((H, W), np.uint8)
    _ring(g1, 8, 23, 8, 23)
    g1[8:24, 8:24] = PERSON
    g2 = np.zeros((H, W), np.uint8)
    g2[0:16, 0:24] = DOG
    g3 = np.zeros((H, W), np.uint8)
    _ring(g3, 4, 11, 30, 41)
    g3[4:12, 30:42] = CAT
    return dict(zip(STEMS, (g1, g2, g3)))


def known_confusion() -> dict[str, np.ndarray]:
    gts = gt_maps()
    p1 = np.where(gts[STEMS[0]] == 255, PERSON, gts[STEMS[0]]).astype(np.uint8)
    p1[8:24, 16:24] = DOG
    return {STEMS[0]: p1,
            STEMS[1]: gts[STEMS[1]].copy(),
            STEMS[2]: np.where(gts[STEMS[2]] == 255, 0, gts[STEMS[2]]).astype(np.uint8)}


def _palette_bytes() -> list[int]:
    pal = [0] * 768
    for idx, rgb in VOC_RGB.items():
        pal[3 * idx:3 * idx + 3] = list(rgb)
    return pal


def save_p(path: Path, label: np.ndarray) -> None:
    img = Image.fromarray(label.astype(np.uint8), mode="L").convert("P")
    img.putpalette(_palette_bytes())
    img.save(path)


def save_l(path: Path, label: np.ndarray) -> None:
    Image.fromarray(label.astype(np.uint8), mode="L").save(path)


def save_rgb(path: Path, label: np.ndarray) -> None:
    rgb = np.zeros(label.shape + (3,), np.uint8)
    for idx, colour in VOC_RGB.items():
        rgb[label == idx] = colour
    Image.fromarray(rgb, mode="RGB").save(path)


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("voc") / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for stem, gt in gt_maps().items():
        Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(
            root / "JPEGImages" / f"{stem}.jpg")
        save_p(root / "SegmentationClass" / f"{stem}.png", gt)
    (root / "ImageSets/Segmentation/val.txt").write_text("\n".join(STEMS) + "\n")
    (root / "ImageSets/Segmentation/train.txt").write_text(STEMS[0] + "\n")
    return root


def write_preds(folder: Path, maps: dict[str, np.ndarray], saver=save_l) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for stem, label in maps.items():
        saver(folder / f"{stem}.png", label)
    return folder


# Hand-computed expectations for the known confusion (see module docstring).
STD_MIOU = (1.0 + 128 / 256 + 384 / 512 + 1.0) / 4                    # bg, person, dog, cat
STD_MIOU_IMG = ((1.0 + 0.5) / 2 + 1.0 + 1.0) / 3
OFF_BG = (3872 - 68) / 3872                                           # 68 bg px predicted person
OFF_PERSON = 128 / (256 + 68)                                         # TP / (GT 256 + FP 68)
OFF_MIOU = (OFF_BG + OFF_PERSON + 0.75 + 1.0) / 4
OFF_MIOU_IMG = (((1280 - 68) / 1280 + OFF_PERSON) / 2 + 1.0 + 1.0) / 3


# ------------------------------------------------------------------------------------
# Scores
# ------------------------------------------------------------------------------------

def test_dataset_loads(voc_root: Path) -> None:
    ds = load_voc(voc_root, "val")
    assert [s.stem for s in ds.samples] == STEMS
    assert ds.class_names == VOC_CLASSES and len(VOC_CLASSES) == 21
    gt = ds.load_label(ds.samples[0])
    assert gt.shape == (H, W) and (gt == 255).sum() == 68 and (gt == PERSON).sum() == 256
    assert [s.stem for s in load_voc(voc_root.parent, "train").samples] == [STEMS[0]]  # parent root ok


@pytest.mark.parametrize("official", [False, True])
def test_perfect_predictions(voc_root: Path, tmp_path: Path, official: bool) -> None:
    ds = load_voc(voc_root)
    gt_copy = tmp_path / "copy"
    shutil.copytree(voc_root / "SegmentationClass", gt_copy)  # palette PNGs with 255 rings
    no_ring = write_preds(tmp_path / "idx", {s: np.where(g == 255, 0, g) for s, g in gt_maps().items()})
    for folder in (gt_copy, no_ring):
        res = evaluate(ds, PredictionFolder(folder), official_boundary=official, progress=False)
        assert res.miou == pytest.approx(1.0) and res.miou_per_image == pytest.approx(1.0)
        js = res.to_json()
        assert js["per_class_iou"]["person"] == pytest.approx(1.0)
        assert js["per_class_iou"]["aeroplane"] is None


def test_known_confusion_both_variants(voc_root: Path, tmp_path: Path) -> None:
    ds = load_voc(voc_root)
    preds = write_preds(tmp_path / "p", known_confusion())
    std = evaluate(ds, PredictionFolder(preds), progress=False)
    assert std.miou == pytest.approx(STD_MIOU)            # 0.8125
    assert std.miou_per_image == pytest.approx(STD_MIOU_IMG)
    assert std.to_json()["per_class_iou"]["person"] == pytest.approx(0.5)
    assert std.to_json()["per_class_iou"]["dog"] == pytest.approx(0.75)
    assert std.to_json()["per_class_iou"]["background"] == pytest.approx(1.0)
    off = evaluate(ds, PredictionFolder(preds), official_boundary=True, progress=False)
    assert off.miou == pytest.approx(OFF_MIOU)
    assert off.miou_per_image == pytest.approx(OFF_MIOU_IMG)
    assert off.to_json()["per_class_iou"]["person"] == pytest.approx(OFF_PERSON)
    assert off.to_json()["per_class_iou"]["background"] == pytest.approx(OFF_BG)


def test_palette_and_index_predictions_score_the_same(voc_root: Path, tmp_path: Path) -> None:
    ds = load_voc(voc_root)
    maps = known_confusion()
    scores = []
    for name, saver in (("L", save_l), ("P", save_p), ("RGB", save_rgb)):
        folder = write_preds(tmp_path / name, maps, saver)
        assert Image.open(folder / f"{STEMS[0]}.png").mode == name
        assert (read_label_png(folder / f"{STEMS[0]}.png") == maps[STEMS[0]]).all()
        scores.append(evaluate(ds, PredictionFolder(folder), progress=False).to_json())
    assert scores[0] == scores[1] == scores[2]
    assert scores[0]["miou"] == pytest.approx(STD_MIOU)


def test_rgb_prediction_with_unknown_colour_is_an_error(voc_root: Path, tmp_path: Path) -> None:
    folder = write_preds(tmp_path / "bad", known_confusion(), save_rgb)
    rgb = np.zeros((H, W, 3), np.uint8)
    rgb[0, 0] = (1, 2, 3)
    Image.fromarray(rgb).save(folder / f"{STEMS[1]}.png")
    with pytest.raises(ValueError, match=r"1,2,3"):
        evaluate(load_voc(voc_root), PredictionFolder(folder), progress=False)


def test_void_prediction_is_a_miss() -> None:
    gt = np.array([[0, 1, 1, 255]])
    pred = np.array([[0, 1, 255, 1]])
    cm = confusion_matrix(gt, pred, 2)
    assert cm.tolist() == [[1, 0, 0], [0, 1, 1]]           # last column: void
    miou, iou = dataset_miou(cm)
    assert iou.tolist() == [1.0, 0.5] and miou == 0.75
    assert per_image_miou([cm])[0] == 0.75


def test_per_class_columns_and_pixel_accuracy(voc_root: Path, tmp_path: Path) -> None:
    """IoU per image (per class), images per class and pixel accuracy of the known confusion."""
    ds = load_voc(voc_root)
    preds = write_preds(tmp_path / "p", known_confusion())
    std = evaluate(ds, PredictionFolder(preds), progress=False)
    # Per image: img1 bg 1.0, person 0.5 (dog predicted there is not in its GT); img2 bg, dog
    # 1.0; img3 bg, cat 1.0.
    expected = {BG: 1.0, PERSON: 0.5, DOG: 1.0, CAT: 1.0}
    for c, name in enumerate(VOC_CLASSES):
        if c in expected:
            assert std.iou_per_image[c] == pytest.approx(expected[c])
        else:
            assert np.isnan(std.iou_per_image[c]) and np.isnan(std.iou[c])
    assert std.images_with_class.tolist() == [3 if c == BG else int(c in expected) for c in range(21)]
    scored = 3 * H * W - 68 - 44                                   # rings ignored
    assert std.pixel_accuracy == pytest.approx((scored - 128) / scored)
    off = evaluate(ds, PredictionFolder(preds), official_boundary=True, progress=False)
    assert off.iou_per_image[BG] == pytest.approx(((1280 - 68) / 1280 + 1.0 + 1.0) / 3)
    assert off.iou_per_image[PERSON] == pytest.approx(OFF_PERSON)
    assert off.pixel_accuracy == pytest.approx((3 * H * W - 128 - 68) / (3 * H * W))


def test_per_image_scores_accumulate_like_the_whole_list() -> None:
    """PerImageScores (what evaluate uses) agrees with per_image_miou and skips empty images."""
    rng = np.random.default_rng(3)
    cms = [confusion_matrix(rng.integers(0, 4, (8, 8)), rng.choice([0, 1, 2, 3, 255], (8, 8)), 4)
           for _ in range(5)]
    cms.append(confusion_matrix(np.full((8, 8), 255), np.zeros((8, 8), np.int64), 4))  # nothing scored
    scores = PerImageScores(4)
    values = [scores.add(cm) for cm in cms]
    miou, expected = per_image_miou(cms)
    assert np.isnan(values[-1]) and np.allclose(values[:-1], expected[:-1])
    assert scores.miou == pytest.approx(miou) and scores.values == values
    assert scores.images_with_class.tolist() == [5, 5, 5, 5]
    manual = np.nanmean([[np.nan if cm[c].sum() == 0 else cm[c, c] / (cm[c].sum() + cm[:4, c].sum() - cm[c, c])
                          for c in range(4)] for cm in cms[:-1]], axis=0)
    assert np.allclose(scores.iou_per_class, manual)
    with pytest.raises(ValueError, match="3 classes, expected 4"):
        scores.add(np.zeros((3, 4), np.int64))


# ------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------

def test_json_output_exact(voc_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    preds = write_preds(tmp_path / "p", known_confusion())
    rc = main(["--dataset", "voc", "--root", str(voc_root), "--predictions", str(preds),
               "--json", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0
    assert out.count("\n") == 1                            # exactly one JSON line on stdout
    data = json.loads(out)
    assert list(data) == ["miou", "miou_per_image", "per_class_iou"]
    assert list(data["per_class_iou"]) == list(VOC_CLASSES)
    assert data["miou"] == pytest.approx(STD_MIOU)
    assert data["miou_per_image"] == pytest.approx(STD_MIOU_IMG)
    assert data["per_class_iou"]["cat"] == pytest.approx(1.0)
    absent = [n for n in VOC_CLASSES if n not in ("background", "cat", "dog", "person")]
    assert all(data["per_class_iou"][n] is None for n in absent)


def test_human_table(voc_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    preds = write_preds(tmp_path / "p", known_confusion())
    assert main(["--root", str(voc_root), "--predictions", str(preds), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "81.25" in out and f"{100 * STD_MIOU_IMG:.2f}" in out and "tvmonitor" in out


def test_limit(voc_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    preds = write_preds(tmp_path / "p", known_confusion())
    assert main(["--root", str(voc_root), "--predictions", str(preds), "--json", "--limit", "1",
                 "--no-progress"]) == 0
    data = json.loads(capsys.readouterr().out)
    # Only img1: bg 1212/1212, person 128/256, dog predicted but absent from GT -> 0/128.
    assert data["miou"] == pytest.approx((1.0 + 0.5 + 0.0) / 3)
    assert data["miou_per_image"] == pytest.approx((1.0 + 0.5) / 2)  # dog not in img1's GT
    assert data["per_class_iou"]["dog"] == 0.0 and data["per_class_iou"]["cat"] is None


def test_reports_written(voc_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    preds = write_preds(tmp_path / "p", known_confusion(), save_p)
    out = tmp_path / "out"
    assert main(["--root", str(voc_root), "--predictions", str(preds), "--out", str(out),
                 "--examples", "2", "--no-progress"]) == 0
    for name in ("results.md", "results.csv", "results.json", "examples.png"):
        assert (out / name).is_file(), name
    pytest.importorskip("matplotlib")
    assert Image.open(out / "per_class_iou.png").size[0] > 100
    with Image.open(out / "examples.png") as grid:
        assert grid.width >= 3 * W and grid.height >= 2 * H
    rows = list(csv.DictReader(open(out / "results.csv", newline="")))
    assert [r["class"] for r in rows] == list(VOC_CLASSES) + ["mIoU"]
    by = {r["class"]: r for r in rows}
    assert float(by["person"]["iou"]) == pytest.approx(0.5)
    assert float(by["dog"]["iou"]) == pytest.approx(0.75)
    assert by["aeroplane"]["iou"] == ""
    assert float(by["mIoU"]["iou"]) == pytest.approx(STD_MIOU, abs=1e-6)
    assert float(by["mIoU"]["iou_per_image"]) == pytest.approx(STD_MIOU_IMG, abs=1e-6)
    assert int(by["person"]["gt_pixels"]) == 256 and int(by["person"]["pred_pixels"]) == 128  # ring ignored
    md = (out / "results.md").read_text()
    assert "| person | 50.00 |" in md and "81.25" in md


def test_resumable(voc_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ds = load_voc(voc_root)
    preds = write_preds(tmp_path / "p", known_confusion())
    out = tmp_path / "out"
    calls: list[str] = []
    real = ev._score_sample

    def counting(dataset, source, sample, *args):  # type: ignore[no-untyped-def]
        calls.append(sample.stem)
        return real(dataset, source, sample, *args)

    monkeypatch.setattr(ev, "_score_sample", counting)
    first = evaluate(ds, PredictionFolder(preds), out_dir=out, limit=2, examples=0, progress=False)
    assert calls == STEMS[:2] and first.n_scored == 2
    cache = [p for p in (out / "cache").rglob("*.npz")]
    assert sorted(p.stem for p in cache) == STEMS[:2]
    calls.clear()
    full = evaluate(ds, PredictionFolder(preds), out_dir=out, examples=0, progress=False)
    assert calls == [STEMS[2]] and (full.n_cached, full.n_scored) == (2, 1)
    assert full.miou == pytest.approx(STD_MIOU)
    calls.clear()
    again = evaluate(ds, PredictionFolder(preds), out_dir=out, examples=0, progress=False)
    assert calls == [] and again.to_json() == full.to_json()
    # The cache holds both boundary variants: the official boundary (or the paper protocol)
    # comes from it, with the numbers of a fresh run.
    official = evaluate(ds, PredictionFolder(preds), out_dir=out, official_boundary=True, examples=0,
                        progress=False)
    paper = evaluate(ds, PredictionFolder(preds), out_dir=out, protocol="paper", examples=0, progress=False)
    assert calls == [] and len(list((out / "cache").iterdir())) == 1
    fresh = evaluate(ds, PredictionFolder(preds), official_boundary=True, progress=False)
    assert official.to_json() == fresh.to_json()
    assert paper.miou == pytest.approx(full.miou) and paper.miou_per_image == pytest.approx(fresh.miou_per_image)
    calls.clear()
    # A changed prediction file is rescored.
    target = preds / f"{STEMS[1]}.png"
    st = target.stat()
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    evaluate(ds, PredictionFolder(preds), out_dir=out, examples=0, progress=False)
    assert calls == [STEMS[1]]


def test_missing_folders_are_named(voc_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    preds = write_preds(tmp_path / "p", known_confusion())
    missing = tmp_path / "no_such_root"
    assert main(["--root", str(missing), "--predictions", str(preds)]) == 2
    assert str(missing) in capsys.readouterr().err
    broken = tmp_path / "broken"
    (broken / "JPEGImages").mkdir(parents=True)
    assert main(["--root", str(broken), "--predictions", str(preds)]) == 2
    assert str(broken / "SegmentationClass") in capsys.readouterr().err
    no_preds = tmp_path / "no_preds"
    assert main(["--root", str(voc_root), "--predictions", str(no_preds)]) == 2
    assert str(no_preds) in capsys.readouterr().err
    (preds / f"{STEMS[2]}.png").unlink()
    assert main(["--root", str(voc_root), "--predictions", str(preds), "--no-progress"]) == 2
    assert str(preds / f"{STEMS[2]}.png") in capsys.readouterr().err
    assert main(["--root", str(voc_root), "--split", "nosplit", "--predictions", str(preds)]) == 2
    assert "nosplit.txt" in capsys.readouterr().err


def test_backend_needs_its_models(voc_root: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--root", str(voc_root), "--backend", "diffusers"])
    assert exit_.value.code == 2
    assert "needs --sd and --clip" in capsys.readouterr().err


def test_dispatch_through_package_main(voc_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from freeseg.__main__ import main as package_main
    preds = write_preds(tmp_path / "p", known_confusion())
    assert package_main(["eval", "--root", str(voc_root), "--predictions", str(preds), "--json",
                         "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["miou"] == pytest.approx(STD_MIOU)


# ------------------------------------------------------------------------------------
# COCO-Object layout
# ------------------------------------------------------------------------------------

def test_coco_object_layout(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "coco"
    (root / "images/val2017").mkdir(parents=True)
    (root / "annotations/val2017").mkdir(parents=True)
    person, dog, cat, zebra = 1, 17, 16, 23
    a = np.zeros((H, W), np.uint8)
    a[0:10, 0:10] = person
    a[20:30, 20:30] = zebra
    b = np.zeros((H, W), np.uint8)
    b[0:10, 0:10] = dog
    b[31, 0:20] = 255
    for stem in ("000000000001", "000000000002"):
        Image.new("RGB", (W, H), (90, 120, 150)).save(root / "images/val2017" / f"{stem}.jpg")
    save_l(root / "annotations/val2017/000000000001.png", a)
    save_l(root / "annotations/val2017/000000000002_instanceTrainIds.png", b)
    ds = load_coco_object(root)
    assert len(ds.class_names) == 81 and ds.class_names[0] == "background"
    assert (ds.class_names[person], ds.class_names[cat], ds.class_names[dog],
            ds.class_names[zebra], ds.class_names[80]) == ("person", "cat", "dog", "zebra", "toothbrush")
    assert [s.stem for s in ds.samples] == ["000000000001", "000000000002"]
    assert ds.samples[1].label_path.name == "000000000002_instanceTrainIds.png"
    pb = np.where(b == dog, cat, 0).astype(np.uint8)        # dog predicted as cat; 255 row -> 0
    preds = write_preds(tmp_path / "p", {"000000000001": a, "000000000002": pb})
    assert main(["--dataset", "coco-object", "--root", str(root), "--predictions", str(preds),
                 "--json", "--no-progress"]) == 0
    data = json.loads(capsys.readouterr().out)
    # bg, person, zebra = 1; dog: 0 TP / 100 FN; cat: 0 TP / 100 FP -> (1+1+1+0+0)/5.
    assert data["miou"] == pytest.approx(0.6)
    assert data["miou_per_image"] == pytest.approx((1.0 + (1.0 + 0.0) / 2) / 2)
    assert len(data["per_class_iou"]) == 81 and data["per_class_iou"]["toothbrush"] is None
    assert data["per_class_iou"]["cat"] == 0.0 and data["per_class_iou"]["zebra"] == 1.0
    shutil.rmtree(root / "annotations")
    assert main(["--dataset", "coco-object", "--root", str(root), "--predictions", str(preds)]) == 2
    assert str(root / "annotations" / "val2017") in capsys.readouterr().err
    assert len(COCO_OBJECT_CLASSES) == 81


# ------------------------------------------------------------------------------------
# Names -> classes, Segmenter
# ------------------------------------------------------------------------------------

@pytest.mark.parametrize("label, voc, coco", [
    ("man", "person", "person"), ("People", "person", "person"), ("women", "person", "person"),
    ("plane", "aeroplane", "airplane"), ("motorbike", "motorbike", "motorcycle"),
    ("tv", "tvmonitor", "tv"), ("monitor", "tvmonitor", "tv"), ("couch", "sofa", "couch"),
    ("sofa", "sofa", "couch"), ("plant", "pottedplant", "potted plant"),
    ("table", "diningtable", "dining table"), ("dining table", "diningtable", "dining table"),
    ("bike", "bicycle", "bicycle"), ("puppy", "dog", "dog"), ("horses", "horse", "horse"),
    ("a small black dog", "dog", "dog"), ("Potted_Plant", "pottedplant", "potted plant"),
    ("hot dog", None, "hot dog"), ("sky", None, None), (None, None, None),
])
def test_map_label(label: str | None, voc: str | None, coco: str | None) -> None:
    got_voc = map_label(label, VOC_CLASSES)
    got_coco = map_label(label, COCO_OBJECT_CLASSES)
    assert (None if got_voc is None else VOC_CLASSES[got_voc]) == voc
    assert (None if got_coco is None else COCO_OBJECT_CLASSES[got_coco]) == coco


def test_map_label_custom_synonyms() -> None:
    assert map_label("man", VOC_CLASSES, synonyms={}) is None
    assert map_label("kitty", ["background", "feline"], synonyms={"kitty": "feline"}) == 1


def test_labels_to_prediction() -> None:
    masks = np.zeros((4, 4, 6), np.float32)
    masks[0, :, 0:3] = 1.0          # "man" -> person
    masks[1, :, 2:5] = 0.8          # "puppy" -> dog; loses column 2 to mask 0 (1.0 > 0.8)
    masks[2, 0, :] = 0.9            # unnamed -> background where it wins (row 0, cols 3..5)
    masks[3, 3, 5] = 0.4            # "cat" below threshold -> not painted
    labels = ["man", "puppy", None, "cat"]
    pred = labels_to_prediction(masks, labels, VOC_CLASSES)
    expected = np.zeros((4, 6), np.int64)
    expected[:, 0:3] = PERSON
    expected[1:, 3:5] = DOG
    assert pred.dtype == np.int64 and (pred == expected).all()
    lower = labels_to_prediction(masks, labels, VOC_CLASSES, threshold=0.3)
    assert lower[3, 5] == CAT
    assert (labels_to_prediction(np.zeros((0, 4, 6)), [], VOC_CLASSES) == 0).all()
    torch = pytest.importorskip("torch")
    assert (labels_to_prediction(torch.from_numpy(masks), labels, VOC_CLASSES) == expected).all()
    assert (labels_to_prediction(torch.from_numpy(masks[:1] > 0.5), labels[:1], VOC_CLASSES)
            == np.where(masks[0] > 0.5, PERSON, 0)).all()
    with pytest.raises(ValueError, match="labels"):
        labels_to_prediction(masks, labels[:2], VOC_CLASSES)


class FakeSegmenter:
    """Returns the ground-truth regions as masks, named with caption-like words."""

    cache_key = "fake-v1"

    def __init__(self, names: dict[int, str]) -> None:
        self.names = names
        self.vocabularies: list[object] = []
        self.gts = list(gt_maps().values())
        self.calls = 0

    def __call__(self, image: np.ndarray, vocabulary=None):  # type: ignore[no-untyped-def]
        assert image.dtype == np.float32 and image.shape == (H, W, 3) and image.max() <= 1.0
        self.vocabularies.append(vocabulary)
        gt = self.gts[self.calls]
        self.calls += 1
        classes = [c for c in np.unique(gt) if c not in (0, 255)]
        return np.stack([gt == c for c in classes]), [self.names[int(c)] for c in classes]


def test_segmenter_closed_and_open(voc_root: Path, tmp_path: Path) -> None:
    ds = load_voc(voc_root)
    closed = FakeSegmenter({PERSON: "man", DOG: "puppies", CAT: "kitten"})
    res = evaluate(ds, closed, mode="closed", out_dir=tmp_path / "out", examples=3, progress=False)
    assert res.miou == pytest.approx(1.0) and res.miou_per_image == pytest.approx(1.0)
    assert closed.vocabularies == [None, None, None]
    saved = list((tmp_path / "out" / "predictions").rglob("*.png"))
    assert sorted(p.stem for p in saved) == STEMS and (tmp_path / "out" / "examples.png").is_file()
    opened = FakeSegmenter({PERSON: "person", DOG: "dog", CAT: "cat"})
    res = evaluate(ds, SegmenterSource(opened, mode="open"), progress=False)
    assert res.miou == pytest.approx(1.0)
    vocab = opened.vocabularies[0]
    assert isinstance(vocab, list) and len(vocab) == 20 and "background" not in vocab
    assert "dining table" in vocab and "tv monitor" in vocab and "person" in vocab
    paper = FakeSegmenter({PERSON: "person", DOG: "dog", CAT: "cat"})
    res = evaluate(ds, SegmenterSource(paper, mode="paper"), protocol="paper", progress=False)
    assert res.miou == pytest.approx(1.0) and res.protocol == "paper"
    vocab = paper.vocabularies[0]
    assert len(vocab) == 20 and "diningtable" in vocab and "tvmonitor" in vocab and "background" not in vocab
    assert "paper protocol" in format_table(res)
    with pytest.raises(ValueError, match="protocol"):
        evaluate(ds, paper, protocol="official", progress=False)
