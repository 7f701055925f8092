"""Refign's datasets: each source on a tiny dataset in its real layout, the pairing manifest, label mappings,
count checks naming the missing file, rare-class statistics against a hand count, and prepare_data."""

import importlib.util
import io
import json
import re
import zipfile

import numpy as np
import pytest
from PIL import Image

from lqseg_jax.data_pipelines import refign_sources as rs
from lqseg_jax.data_pipelines.records import RecordSource
from lqseg_jax.data_pipelines.sources import DataError

H, W = 6, 8


def put(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def rgb(seed):
    return np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)


def const(v):
    return np.full((H, W), v, np.uint8)


@pytest.fixture
def small_counts(monkeypatch):
    """The real counts are thousands; the tiny datasets below have these."""
    monkeypatch.setitem(rs.EXPECTED, "cityscapes", {"train": 3, "val": 1})
    monkeypatch.setitem(rs.EXPECTED, "darkzurich", {"train": 2, "val": 2, "test": 2})
    monkeypatch.setitem(rs.EXPECTED, "nighttimedriving", {"test": 2})
    monkeypatch.setitem(rs.EXPECTED, "bdd100k-night", {"test": 2})
    monkeypatch.setattr(rs, "ACDC_PER_CONDITION", {"fog": (1, 1, 1), "night": (2, 1, 1)})


# The Cityscapes label-id -> train-id table restated from cityscapesscripts' labels.py (name, id, trainId).
CS_LABELS = [
    ("unlabeled", 0, 255), ("ego vehicle", 1, 255), ("rectification border", 2, 255), ("out of roi", 3, 255),
    ("static", 4, 255), ("dynamic", 5, 255), ("ground", 6, 255), ("road", 7, 0), ("sidewalk", 8, 1),
    ("parking", 9, 255), ("rail track", 10, 255), ("building", 11, 2), ("wall", 12, 3), ("fence", 13, 4),
    ("guard rail", 14, 255), ("bridge", 15, 255), ("tunnel", 16, 255), ("pole", 17, 5), ("polegroup", 18, 255),
    ("traffic light", 19, 6), ("traffic sign", 20, 7), ("vegetation", 21, 8), ("terrain", 22, 9), ("sky", 23, 10),
    ("person", 24, 11), ("rider", 25, 12), ("car", 26, 13), ("truck", 27, 14), ("bus", 28, 15),
    ("caravan", 29, 255), ("trailer", 30, 255), ("train", 31, 16), ("motorcycle", 32, 17), ("bicycle", 33, 18),
    ("license plate", 255, 255),  # id -1, written as 255 in the 8-bit labelIds PNG
]  # fmt: skip


def test_label_id_tables():
    ids = np.array([i for _, i, _ in CS_LABELS], np.uint8)
    np.testing.assert_array_equal(rs.ids_to_train_ids(ids), [t for _, _, t in CS_LABELS])
    assert [n for n, _, t in CS_LABELS if t != 255] == list(rs.CITYSCAPES_CLASSES)
    assert (rs.ids_to_train_ids(np.arange(34, 255, dtype=np.uint8)) == 255).all()


def make_cityscapes(root):
    """3 train (2 cities) + 1 val images, labels in label ids; returns the hand-made train labels."""
    labels = {}
    for split, city, idx, ids in [
        ("train", "aachen", 19, [(7, 30), (26, 18)]),  # road 30 px, car 18 px
        ("train", "aachen", 20, [(7, 40), (0, 8)]),  # road 40 px, 8 px unlabeled
        ("train", "bochum", 5, [(33, 12), (24, 36)]),  # bicycle 12 px, person 36 px
        ("val", "frankfurt", 1, [(8, 48)]),
    ]:
        stem = f"{city}_000000_{idx:06d}"
        lab = np.concatenate([np.full(n, i, np.uint8) for i, n in ids]).reshape(H, W)
        put(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", rgb(idx))
        put(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png", lab)
        labels[f"leftImg8bit/{split}/{city}/{stem}_leftImg8bit.png"] = lab
    return labels


def test_cityscapes_records_manifest_and_rare_class_stats(tmp_path, small_counts):
    src, out = tmp_path / "Cityscapes", tmp_path / "out"
    labels = make_cityscapes(src)
    rs.prepare("cityscapes", src, out, progress=False, workers=1)
    records = RecordSource(out / "train")
    assert len(records) == 3 and records.metadata["paired"] is False
    manifest = json.loads((out / "train" / "manifest.json").read_text())["examples"]
    for i, row in enumerate(manifest):
        rec = records[i]
        assert rec["name"] == row["name"] and "reference" not in rec
        assert row["label"] == row["image"].replace("leftImg8bit/", "gtFine/", 1).replace(
            "_leftImg8bit.png", "_gtFine_labelIds.png"
        )
        got = np.asarray(Image.open(io.BytesIO(rec["label"])))
        np.testing.assert_array_equal(got, rs.ids_to_train_ids(labels[row["name"]]))
    # Hand counts: road 30 + 40, car 18, bicycle 12, person 36; the 8 unlabeled pixels are not counted.
    a, b, c = (
        "leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png",
        "leftImg8bit/train/aachen/aachen_000000_000020_leftImg8bit.png",
        "leftImg8bit/train/bochum/bochum_000000_000005_leftImg8bit.png",
    )
    stats = json.loads((out / "train" / "sample_class_stats.json").read_text())
    assert stats == [{"file": a, "0": 30, "13": 18}, {"file": b, "0": 40}, {"file": c, "11": 36, "18": 12}]
    with_class = json.loads((out / "train" / "samples_with_class.json").read_text())
    assert with_class == {"0": [[a, 30], [b, 40]], "11": [[c, 36]], "13": [[a, 18]], "18": [[c, 12]]}
    assert not (out / "val" / "samples_with_class.json").exists()


def test_cityscapes_missing_files_are_named_with_the_count(tmp_path, small_counts):
    make_cityscapes(tmp_path)
    gt = tmp_path / "gtFine/train/bochum/bochum_000000_000005_gtFine_labelIds.png"
    gt.unlink()
    with pytest.raises(DataError, match=r"bochum_000000_000005_gtFine_labelIds.png is missing.*expected 3"):
        rs.cityscapes(tmp_path, "train")
    put(gt, const(7))
    img = tmp_path / "leftImg8bit/train/aachen/aachen_000000_000020_leftImg8bit.png"
    img.unlink()
    with pytest.raises(DataError, match=r"aachen_000000_000020_leftImg8bit.png is missing.*expected 3"):
        rs.cityscapes(tmp_path, "train")
    (tmp_path / "gtFine/train/aachen/aachen_000000_000020_gtFine_labelIds.png").unlink()
    with pytest.raises(DataError, match=r"found 2 examples .* expected 3"):
        rs.cityscapes(tmp_path, "train")


def make_acdc(root):
    for cond, split, recs in [
        ("fog", "train", ["GOPR0475"]),
        ("night", "train", ["GOPR0351", "GP010594"]),
        ("fog", "val", ["GOPR0476"]),
        ("night", "val", ["GOPR0355"]),
        ("fog", "test", ["GOPR0477"]),
        ("night", "test", ["GOPR0356"]),
    ]:
        for k, rec in enumerate(recs):
            stem = f"{rec}_frame_{100 + k:06d}"
            put(root / "rgb_anon" / cond / split / rec / f"{stem}_rgb_anon.png", rgb(k))
            put(root / "rgb_anon" / cond / f"{split}_ref" / rec / f"{stem}_rgb_ref_anon.png", rgb(k + 50))
            if split != "test":
                put(root / "gt" / cond / split / rec / f"{stem}_gt_labelTrainIds.png", const(k))


def test_acdc_pairs_and_missing_reference(tmp_path, small_counts):
    make_acdc(tmp_path)
    kw = {"conditions": ("fog", "night")}
    train = rs.acdc(tmp_path, "train", **kw)
    assert [e.name for e in train] == [
        "rgb_anon/fog/train/GOPR0475/GOPR0475_frame_000100_rgb_anon.png",
        "rgb_anon/night/train/GOPR0351/GOPR0351_frame_000100_rgb_anon.png",
        "rgb_anon/night/train/GP010594/GP010594_frame_000101_rgb_anon.png",
    ]
    e = train[2]
    assert (
        e.reference == tmp_path / "rgb_anon/night/train_ref/GP010594/GP010594_frame_000101_rgb_ref_anon.png"
    )
    assert e.label == tmp_path / "gt/night/train/GP010594/GP010594_frame_000101_gt_labelTrainIds.png"
    test = rs.acdc(tmp_path, "test", **kw)
    assert all(e.label is None and e.reference.is_file() for e in test)
    src = rs.PairedSource(train, num_classes=19, description="acdc")
    assert src[2]["reference"] == e.reference.read_bytes() and src[2]["label"] == e.label.read_bytes()
    # full paths for decoding errors (paired.PairedDecode names them)
    assert (src[2]["image_path"], src[2]["label_path"]) == (str(e.image), str(e.label))
    assert src[2]["reference_path"] == str(e.reference)
    e.reference.unlink()
    with pytest.raises(DataError, match=r"GP010594_frame_000101_rgb_ref_anon.png is missing.*expected 3"):
        rs.acdc(tmp_path, "train", **kw)


def make_darkzurich(root):
    pairs = []
    for k, (night, day) in enumerate([("GOPR0351", "GOPR0345"), ("GOPR0351", "GOPR0346")]):
        n, d = f"train/night/{night}/{night}_frame_{k:06d}", f"train/day/{day}/{day}_frame_{k + 80:06d}"
        put(root / "rgb_anon" / f"{n}_rgb_anon.png", rgb(k))
        put(root / "rgb_anon" / f"{d}_rgb_anon.png", rgb(k + 9))
        pairs.append(f"{n},{d}")
    pair_list = root.parent / "zurich_dn_pair_train.csv"
    pair_list.write_text("\n".join(pairs) + "\n")
    for k in range(2):
        stem = f"GOPR0356_frame_{k:06d}"
        put(root / f"rgb_anon/val/night/GOPR0356/{stem}_rgb_anon.png", rgb(k))
        put(root / f"rgb_anon/val_ref/day/GOPR0356_ref/{stem}_ref_rgb_anon.png", rgb(k + 1))
        put(root / f"gt/val/night/GOPR0356/{stem}_gt_labelTrainIds.png", const(k))
        put(root / f"rgb_anon/test/night/GOPR0364/GOPR0364_frame_{k:06d}_rgb_anon.png", rgb(k))
        put(root / f"rgb_anon/test_ref/day/GOPR0364_ref/GOPR0364_frame_{k:06d}_ref_rgb_anon.png", rgb(k + 3))
    return pair_list


def test_darkzurich_pair_list_val_and_test_references(tmp_path, small_counts):
    root = tmp_path / "DarkZurich"
    pair_list = make_darkzurich(root)
    train = rs.darkzurich(root, "train", pair_list=pair_list)
    assert train[1].image == root / "rgb_anon/train/night/GOPR0351/GOPR0351_frame_000001_rgb_anon.png"
    assert train[1].reference == root / "rgb_anon/train/day/GOPR0346/GOPR0346_frame_000081_rgb_anon.png"
    val = rs.darkzurich(root, "val")
    assert (
        val[0].reference == root / "rgb_anon/val_ref/day/GOPR0356_ref/GOPR0356_frame_000000_ref_rgb_anon.png"
    )
    assert val[0].label == root / "gt/val/night/GOPR0356/GOPR0356_frame_000000_gt_labelTrainIds.png"
    test = rs.darkzurich(root, "test")
    assert test[1].reference.name == "GOPR0364_frame_000001_ref_rgb_anon.png" and test[1].label is None
    (root / "rgb_anon/train/day/GOPR0346/GOPR0346_frame_000081_rgb_anon.png").unlink()
    with pytest.raises(DataError, match=r"GOPR0346_frame_000081_rgb_anon.png is missing.*expected 2"):
        rs.darkzurich(root, "train", pair_list=pair_list)


def test_nighttime_driving_bdd_and_robotcar(tmp_path, small_counts):
    ntd = tmp_path / "NighttimeDrivingTest"
    for k in range(2):
        stem = f"{k:04d}_night"
        put(ntd / f"leftImg8bit/test/night/{stem}_leftImg8bit.png", rgb(k))
        put(ntd / f"gtCoarse_daytime_trainvaltest/test/night/{stem}_gtCoarse_labelTrainIds.png", const(k))
    assert len(rs.nighttimedriving(ntd)) == 2

    bdd = tmp_path / "bdd100k"
    night_list = tmp_path / "images_trainval_night_correct_filenames.txt"
    night_list.write_text("seg/images/train/00aad4a0-ee8135fe.jpg\nseg/images/val/b1c9c847-3bda4659.jpg\n")
    for part, name in [("train", "00aad4a0-ee8135fe"), ("val", "b1c9c847-3bda4659")]:
        put(bdd / f"images/10k/{part}/{name}.jpg", rgb(1))
        put(bdd / f"labels/sem_seg/masks/{part}/{name}.png", const(3))
    got = rs.bdd100k_night(bdd, night_list=night_list)
    assert got[1].label == bdd / "labels/sem_seg/masks/val/b1c9c847-3bda4659.png"

    rc = tmp_path / "RobotCar"
    anno = np.array(
        [[7, 8, 11, 12, 13, 17, 19, 20], [21, 22, 23, 24, 25, 26, 27, 28], [31, 32, 33, 0, 1, 6, 9, 34]]
    )
    put(rc / "segmented_images/training/imgs/1418132504537582.png", rgb(0)[:3])
    put(rc / "segmented_images/training/annos/1418132504537582.png", anno.astype(np.uint8))
    src = rs.PairedSource(rs.robotcar(rc, "train"), num_classes=19, description="robotcar")
    label = np.asarray(Image.open(io.BytesIO(src[0]["label"])))
    np.testing.assert_array_equal(label.ravel()[:19], np.arange(19))  # refign robotcar.py id_to_trainid
    assert (label.ravel()[19:] == 255).all()


def main_error(main, argv, capsys) -> str:
    """prepare_data's error: the DataError itself, or its line on stderr under the scripts' error wrapper
    (exit code 2)."""
    try:
        main(argv)
    except DataError as e:
        return str(e)
    except SystemExit as e:
        assert e.code == 2
        return capsys.readouterr().err
    raise AssertionError(f"prepare_data {argv} did not fail")


def load_prepare_data(repo):
    spec = importlib.util.spec_from_file_location("prepare_data", repo / "scripts" / "prepare_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("dataset", ["cityscapes", "acdc", "darkzurich", "nighttimedriving", "bdd100k-night"])
def test_prepare_data_names_the_missing_file(tmp_path, small_counts, dataset, repo, capsys):
    main = load_prepare_data(repo).main
    src = tmp_path / "src"
    if dataset == "cityscapes":
        make_cityscapes(src)
        missing, extra = src / "gtFine/val/frankfurt/frankfurt_000000_000001_gtFine_labelIds.png", []
        count = 1
    elif dataset == "acdc":
        make_acdc(src)
        missing, extra, count = src / "gt/fog/val/GOPR0476/GOPR0476_frame_000100_gt_labelTrainIds.png", [], 2
    elif dataset == "darkzurich":
        extra = ["--pair-list", str(make_darkzurich(src))]
        missing, count = src / "rgb_anon/val_ref/day/GOPR0356_ref/GOPR0356_frame_000001_ref_rgb_anon.png", 2
    elif dataset == "nighttimedriving":
        for k in range(2):
            put(src / f"leftImg8bit/test/night/{k}_leftImg8bit.png", rgb(k))
            put(src / f"gtCoarse_daytime_trainvaltest/test/night/{k}_gtCoarse_labelTrainIds.png", const(k))
        missing, extra, count = src / "leftImg8bit/test/night/1_leftImg8bit.png", [], 2
    else:
        lst = tmp_path / "night.txt"
        lst.write_text("seg/images/train/a.jpg\nseg/images/val/b.jpg\n")
        for part, name in [("train", "a"), ("val", "b")]:
            put(src / f"images/10k/{part}/{name}.jpg", rgb(1))
            put(src / f"labels/sem_seg/masks/{part}/{name}.png", const(3))
        missing, extra, count = src / "labels/sem_seg/masks/val/b.png", ["--night-list", str(lst)], 2
    if dataset == "acdc":
        extra = []  # all conditions of the (patched) count table are present
    out = tmp_path / "out"
    main([dataset, "--src", str(src), "--out", str(out), "--no-progress", "--workers", "1", *extra])
    for split_dir in out.iterdir():  # records in manifest order, the pair kept together in each record
        rows = json.loads((split_dir / "manifest.json").read_text())["examples"]
        records = RecordSource(split_dir)
        assert len(rows) == len(records) > 0
        for row, rec in zip(rows, (records[i] for i in range(len(records))), strict=True):
            assert rec["name"] == row["name"] and rec["image"] == (src / row["image"]).read_bytes()
            if row["reference"] is not None:
                assert rec["reference"] == (src / row["reference"]).read_bytes()
    missing.unlink()
    error = main_error(
        main, [dataset, "--src", str(src), "--out", str(tmp_path / "out2"), "--no-progress", *extra], capsys
    )
    assert re.search(rf"{re.escape(missing.name)} is missing.*expected {count}", error), error
    assert not (tmp_path / "out2").exists()  # every split is checked before anything is written


def test_prepare_from_the_downloaded_archives(tmp_path, small_counts, repo):
    """Cityscapes as downloaded: leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip in one folder."""
    extracted, downloads = tmp_path / "extracted", tmp_path / "downloads"
    make_cityscapes(extracted)
    downloads.mkdir()
    for top in ("leftImg8bit", "gtFine"):
        with zipfile.ZipFile(downloads / f"{top}_trainvaltest.zip", "w") as z:
            z.writestr("license.txt", "cityscapes license")
            for f in sorted((extracted / top).rglob("*.png")):
                z.write(f, f.relative_to(extracted).as_posix())
    out = tmp_path / "out"
    load_prepare_data(repo).main(["cityscapes", "--src", str(downloads), "--out", str(out), "--no-progress"])
    assert sorted(p.name for p in out.iterdir()) == ["train", "val"]  # the staging folder is gone
    rows = json.loads((out / "train" / "manifest.json").read_text())["examples"]
    assert [r["name"] for r in rows] == [e.name for e in rs.cityscapes(extracted, "train")]
    val_image = extracted / "leftImg8bit/val/frankfurt/frankfurt_000000_000001_leftImg8bit.png"
    assert RecordSource(out / "val")[0]["image"] == val_image.read_bytes()


def test_prepare_acdc_conditions_and_count_check_switch(tmp_path, repo, capsys):
    make_acdc(tmp_path / "ACDC")  # fog and night only: the full-dataset counts do not hold
    main = load_prepare_data(repo).main
    argv = ["acdc", "--src", str(tmp_path / "ACDC"), "--out", str(tmp_path / "out"), "--no-progress"]
    assert "rgb_anon/rain/train does not exist" in main_error(main, argv, capsys)
    error = main_error(main, [*argv, "--conditions", "fog,night"], capsys)
    assert "found 3 examples" in error and "expected 800" in error  # 400 + 400 train images
    main([*argv, "--conditions", "fog", "--no-count-check", "--splits", "val"])
    assert RecordSource(tmp_path / "out" / "val").metadata["count"] == 1
