"""scripts/prepare_data.py ade20k -> ArrayRecord splits -> RecordSource, against the folder layout it came from."""

import importlib.util
import io
import json
import shutil
import struct
import zipfile

import numpy as np
import pytest
from PIL import Image

from lqseg_jax.data_pipelines import detectron2_transforms as d2
from lqseg_jax.data_pipelines import pipeline, records, sources, synthetic, transforms
from lqseg_jax.data_pipelines.ade20k import ADE20K_CLASSES, prepare_ade20k
from lqseg_jax.data_pipelines.sources import DataError


def prepare(src, out, splits=("training", "validation"), **kw):
    return prepare_ade20k(src, out, splits, **{"workers": 2, "progress": False, **kw})


@pytest.fixture(scope="module")
def ade_root(tmp_path_factory):
    return synthetic.write_dataset(tmp_path_factory.mktemp("ade"), num_train=7, num_val=3, progress=False)


@pytest.fixture(scope="module")
def prepared(ade_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("records")
    prepare(ade_root, out)
    return out


def make_zip(root, path, prefix="ADEChallengeData2016/"):
    with zipfile.ZipFile(path, "w") as z:
        for f in sorted(root.rglob("*")):
            if f.is_file() and f.parts[len(root.parts)] in ("images", "annotations"):
                z.write(f, prefix + f.relative_to(root).as_posix())
    return path


def copy_dataset(root, dst):
    shutil.copytree(root, dst)
    return dst


def test_record_layout_is_the_documented_one():
    data = records.encode_record("a.jpg", b"IMG", b"LABEL")
    assert data[:4] == b"LQR1"
    (n,) = struct.unpack("<I", data[4:8])
    assert json.loads(data[8 : 8 + n]) == {"name": "a.jpg", "image": 3, "label": 5}
    assert data[8 + n :] == b"IMGLABEL"
    assert records.decode_record(data) == {"image": b"IMG", "label": b"LABEL", "name": "a.jpg"}
    with pytest.raises(DataError, match=r"shard 3: starts with b'JUNK' \(expected the record magic"):
        records.decode_record(b"JUNK" + data[4:], "shard 3")
    with pytest.raises(DataError, match="holds 7 payload bytes, the header announces 3 \\+ 5"):
        records.decode_record(data[:-1])


def test_round_trip_equals_the_folder_source(ade_root, prepared):
    for split, count in (("training", 7), ("validation", 3)):
        folder = sources.ade20k_source(ade_root, split, num_classes=150)
        rec = sources.build_source("ade20k", prepared, split, num_classes=150)
        assert isinstance(rec, records.RecordSource) and len(rec) == len(folder) == count
        assert rec.label_map == "identity" and rec.num_classes == 150
        dec_f = transforms.Decode(folder.label_map, 150)
        dec_r = transforms.Decode(rec.label_map, 150)
        for i in range(count):
            a, b = folder[i], rec[i]
            assert a["name"] == b["name"] and a["image"] == b["image"]  # image bytes kept as they were
            np.testing.assert_array_equal(dec_f(a)["label"], dec_r(b)["label"])
            np.testing.assert_array_equal(dec_f(a)["image"], dec_r(b)["image"])
            # Mask2Former's prepare_ade20k_sem_seg.py: uint8 label - 1 (0 wraps to 255)
            raw = np.asarray(Image.open(ade_root / "annotations" / split / (a["name"][:-4] + ".png")))
            stored = np.asarray(Image.open(io.BytesIO(b["label"])))
            assert Image.open(io.BytesIO(b["label"])).mode == "L"
            np.testing.assert_array_equal(stored, (raw - np.uint8(1)).astype(np.uint8))
    meta = json.loads((prepared / "validation" / "records.json").read_text())
    assert meta["count"] == 3 and meta["label_map"] == "identity" and meta["num_classes"] == 150
    assert len(meta["classes"]) == 150 and meta["classes"][0] == "wall" and meta["classes"][-1] == "flag"
    assert meta["source"] == str(ade_root.resolve()) and meta["shards"][0]["count"] == 3
    assert len(ADE20K_CLASSES) == 150 and len(set(ADE20K_CLASSES)) == 150
    # without records the folder layout is used
    assert isinstance(
        sources.build_source("ade20k", ade_root, "validation", num_classes=150), sources.FolderSource
    )
    with pytest.raises(DataError, match=r"prepared from a ade20k dataset, but data\.source is 'cityscapes'"):
        sources.build_source("cityscapes", prepared, "validation", num_classes=19)


def test_pipeline_trains_and_evaluates_from_records(ade_root, prepared):
    aug = d2.Detectron2TrainAugment(crop=(64, 64), min_sizes=(64, 80, 96), max_size=200)
    got = []
    for root in (prepared, ade_root):
        src = sources.build_source("ade20k", root, "training", num_classes=10)
        it = iter(pipeline.train_dataset(src, aug, seed=3, global_batch=4, num_threads=2))
        got.append([next(it) for _ in range(2)])
    for from_records, from_folder in zip(*got):
        assert from_records["image"].shape == (4, 64, 64, 3)
        np.testing.assert_array_equal(from_records["image"], from_folder["image"])
        np.testing.assert_array_equal(from_records["label"], from_folder["label"])
    src = sources.build_source("ade20k", prepared, "validation", num_classes=10)
    steps, it = pipeline.eval_batches(src, d2.Detectron2EvalResize(short_edge=64), global_batch=1)
    first = next(it)
    assert steps == 3 and first["valid_hw"].tolist() == [[64, 85]] and first["label"].shape == (1, 120, 160)


def test_zip_input_gives_the_same_records(ade_root, prepared, tmp_path):
    archive = make_zip(ade_root, tmp_path / "ADEChallengeData2016.zip")
    prepare(archive, tmp_path / "out", ["validation"])
    a = records.RecordSource(prepared / "validation")
    b = records.RecordSource(tmp_path / "out" / "validation")
    assert [a[i] for i in range(len(a))] == [b[i] for i in range(len(b))]


def test_rerun_is_idempotent_and_replaces_shards(ade_root, tmp_path):
    out = tmp_path / "out"
    prepare(ade_root, out, ["training"], shard_size_mb=0.02)  # ~0.1 MB of files -> several shards
    many = json.loads((out / "training" / "records.json").read_text())
    assert len(many["shards"]) > 1 and sum(s["count"] for s in many["shards"]) == 7
    src = records.RecordSource(out / "training")
    multi = [src[i] for i in range(len(src))]
    prepare(ade_root, out, ["training"])
    files = sorted(p.name for p in (out / "training").iterdir())
    assert files == ["records.json", "training-00000-of-00001.array_record"]  # old shards gone
    first = {p.name: p.read_bytes() for p in (out / "training").iterdir()}
    prepare(ade_root, out, ["training"])
    assert {p.name: p.read_bytes() for p in (out / "training").iterdir()} == first  # same bytes again
    assert sorted(p.name for p in out.iterdir()) == ["training"]  # no temporary folders left
    src = records.RecordSource(out / "training")
    assert [src[i] for i in range(len(src))] == multi


def test_source_errors_name_what_was_expected(ade_root, tmp_path):
    with pytest.raises(
        DataError, match=r"ADE20K source .*/nope does not exist \(expected ADEChallengeData2016"
    ):
        prepare(tmp_path / "nope", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(
        DataError, match=r"empty has no images/ folder \(expected .*/empty/images/<split>/\*\.jpg"
    ):
        prepare(tmp_path / "empty", tmp_path / "out")
    bare = make_zip(ade_root, tmp_path / "bare.zip", prefix="")
    with pytest.raises(
        DataError, match=r"the zip has no ADEChallengeData2016/images/ folder \(found top-level"
    ):
        prepare(bare, tmp_path / "out")
    (tmp_path / "junk.zip").write_bytes(b"not a zip")
    with pytest.raises(DataError, match=r"junk\.zip: not a readable zip file"):
        prepare(tmp_path / "junk.zip", tmp_path / "out")
    val_only = copy_dataset(ade_root, tmp_path / "reallq")
    shutil.rmtree(val_only / "images" / "training")
    with pytest.raises(DataError, match=r"no .*reallq/images/training/? folder .*--splits validation"):
        prepare(val_only, tmp_path / "out")
    assert prepare(val_only, tmp_path / "out", ["validation"])["validation"]["count"] == 3


@pytest.mark.parametrize(
    "problem", ["no_annotation", "corrupt_image", "label_151", "rgb_label", "label_size"]
)
def test_bad_examples_are_named_and_keep_the_old_output(ade_root, tmp_path, problem):
    root = copy_dataset(ade_root, tmp_path / "ade")
    out = tmp_path / "out"
    prepare(root, out, ["validation"])
    before = (out / "validation" / "records.json").read_bytes()
    image = root / "images" / "validation" / "synth_00001.jpg"
    ann = root / "annotations" / "validation" / "synth_00001.png"
    raw = np.asarray(Image.open(ann)).copy()
    if problem == "no_annotation":
        ann.unlink()
        match = r"image .*images/validation/synth_00001\.jpg has no annotation .*synth_00001\.png"
    elif problem == "corrupt_image":
        image.write_bytes(image.read_bytes()[:200])
        match = r"corrupt or unreadable image .*images/validation/synth_00001\.jpg"
    elif problem == "label_151":
        raw[3, 4] = 151
        Image.fromarray(raw).save(ann)
        match = r"annotation .*synth_00001\.png has values \[151\] \(expected raw ADE20K labels 0\.\.150"
    elif problem == "rgb_label":
        Image.fromarray(np.stack([raw] * 3, -1)).save(ann)
        match = r"annotation .*synth_00001\.png has mode RGB \(expected a single-channel 8-bit PNG\)"
    else:
        Image.fromarray(raw[:-1]).save(ann)
        match = r"annotation .*synth_00001\.png is 119x160 but image .*synth_00001\.jpg is 120x160"
    with pytest.raises(DataError, match=match):
        prepare(root, out, ["validation"])
    assert (out / "validation" / "records.json").read_bytes() == before  # previous output intact
    assert sorted(p.name for p in out.iterdir()) == ["validation"]  # the partial write was removed


def test_script_shows_progress(ade_root, tmp_path, repo, capsys):
    spec = importlib.util.spec_from_file_location("prepare_data", repo / "scripts" / "prepare_data.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.main(["ade20k", "--src", str(ade_root), "--out", str(tmp_path / "out"), "--splits", "validation"])
    captured = capsys.readouterr()
    assert "ade20k validation: 100%" in captured.err and "3/3" in captured.err
    assert "validation: 3 examples in 1 shard(s)" in captured.out
