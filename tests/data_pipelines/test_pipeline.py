"""Sources, transforms and grain pipelines: determinism, iterator state, process sharding, clear errors."""

import numpy as np
import pytest
from PIL import Image

from lqseg_jax.data_pipelines import pipeline, sources, synthetic, transforms
from lqseg_jax.data_pipelines.sources import DataError

AUG = transforms.TrainAugment(crop=(64, 64), scale=(160, 120), ratio_range=(0.75, 1.5), cat_max_ratio=0.75)


def batches(src, n, **kw):
    it = iter(pipeline.train_dataset(src, AUG, global_batch=4, **{"seed": 0, **kw}))
    return [next(it) for _ in range(n)]


def test_synthetic_generator_is_deterministic_and_learnable_shaped(tmp_path):
    a = synthetic.make_scene(7)
    b = synthetic.make_scene(7)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    labels = np.concatenate([synthetic.make_scene(s)[1].ravel() for s in range(30)])
    present = set(np.unique(labels).tolist()) - {255}
    assert present == set(range(len(synthetic.CLASSES)))  # every class occurs
    root = synthetic.write_dataset(tmp_path, num_train=3, num_val=2, progress=False)
    assert sorted(p.name for p in (root / "images" / "training").iterdir()) == [
        "synth_00000.jpg",
        "synth_00001.jpg",
        "synth_00002.jpg",
    ]
    raw = np.asarray(Image.open(root / "annotations" / "validation" / "synth_00001.png"))
    assert raw.max() <= len(synthetic.CLASSES) and (raw == 0).any()  # ADE convention: 0 = unlabeled


def test_ade20k_label_map_and_batches(synthetic_root):
    src = sources.ade20k_source(synthetic_root, "training", num_classes=10)
    assert len(src) == 24
    (b,) = batches(src, 1)
    assert b["image"].shape == (4, 64, 64, 3) and b["image"].dtype == np.uint8
    assert b["label"].shape == (4, 64, 64)
    assert set(np.unique(b["label"]).tolist()) <= set(range(10)) | {255}


def test_pipeline_is_deterministic_and_resumable(synthetic_root):
    src = sources.ade20k_source(synthetic_root, "training", num_classes=10)
    a, b = batches(src, 3), batches(src, 3)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])
    other = batches(src, 1, seed=1)[0]
    assert not np.array_equal(other["image"], a[0]["image"])

    ds = pipeline.train_dataset(src, AUG, seed=0, global_batch=4)
    it = iter(ds)
    next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(2)]
    it2 = iter(ds)
    it2.set_state(state)
    for x in expected:
        np.testing.assert_array_equal(next(it2)["image"], x["image"])


def test_each_process_reads_its_block_of_the_global_batch(synthetic_root):
    src = sources.ade20k_source(synthetic_root, "training", num_classes=10)
    (whole,) = batches(src, 1)
    parts = [batches(src, 1, process_index=i, process_count=2)[0] for i in range(2)]
    np.testing.assert_array_equal(np.concatenate([p["image"] for p in parts]), whole["image"])
    with pytest.raises(ValueError, match="not divisible by the 3 processes"):
        pipeline.train_dataset(src, AUG, seed=0, global_batch=4, process_count=3)


def test_eval_batches_pad_to_equal_counts(synthetic_root):
    src = sources.ade20k_source(synthetic_root, "validation", num_classes=10)
    steps, it = pipeline.eval_batches(src, transforms.EvalResize(), global_batch=4)
    got = list(it)
    assert steps == len(got) == 2
    valid = np.concatenate([g["valid"] for g in got])
    assert valid.sum() == 6 and not valid[6:].any()
    assert (got[1]["label"][~got[1]["valid"]] == 255).all()


def test_cityscapes_layout(tmp_path):
    root = synthetic.write_dataset(tmp_path, num_train=2, num_val=1, layout="cityscapes", progress=False)
    src = sources.cityscapes_source(root, "train")
    ex = transforms.Decode(src.label_map, 19)(src[0])
    assert ex["image"].shape == (120, 160, 3) and ex["label"].dtype == np.uint8
    (root / "gtFine" / "train" / "synth" / "synth_00001_gtFine_labelTrainIds.png").unlink()
    with pytest.raises(DataError, match=r"synth_00001_leftImg8bit\.png has no label .*labelTrainIds"):
        sources.cityscapes_source(root, "train")


def test_missing_dataset_folder_names_it(tmp_path):
    with pytest.raises(DataError, match=rf"folder {tmp_path}/nope/images/training does not exist \(expected"):
        sources.ade20k_source(tmp_path / "nope", "training")
    with pytest.raises(DataError, match="leftImg8bit/val does not exist"):
        sources.cityscapes_source(tmp_path, "val")


def test_label_values_out_of_range_are_rejected(tmp_path):
    root = synthetic.write_dataset(tmp_path, num_train=1, num_val=1, progress=False)
    bad = root / "annotations" / "training" / "synth_00000.png"
    raw = np.asarray(Image.open(bad)).copy()
    raw[0, 0] = 200  # ADE raw 200 -> class 199, outside 0..9
    Image.fromarray(raw).save(bad)
    src = sources.ade20k_source(root, "training", num_classes=10)
    with pytest.raises(
        DataError,
        match=rf"label {bad} has raw values \[200\] \(class ids \[199\] after the 'ade20k' "
        r"label map\) outside 0\.\.9 and 255",
    ):
        transforms.Decode(src.label_map, src.num_classes)(src[0])


def test_corrupt_image_is_named(tmp_path):
    root = synthetic.write_dataset(tmp_path, num_train=2, num_val=1, progress=False)
    path = root / "images" / "training" / "synth_00001.jpg"
    path.write_bytes(path.read_bytes()[:300])  # truncated JPEG
    src = sources.ade20k_source(root, "training", num_classes=10)
    with pytest.raises(DataError, match=rf"corrupt or unreadable image {path}"):
        transforms.Decode(src.label_map, src.num_classes)(src[1])
    with pytest.raises(DataError, match="corrupt or unreadable image"):
        batches(src, 1)  # the error surfaces through grain too


def test_rescale_and_crop_semantics():
    assert transforms.rescale_size(1024, 2048, (1024, 512)) == (512, 1024)
    assert transforms.rescale_size(120, 160, (160, 120)) == (120, 160)
    aug = transforms.TrainAugment(crop=(32, 40), flip_prob=0.0, pad_value=7)
    img = np.arange(20 * 30 * 3, dtype=np.uint8).reshape(20, 30, 3)
    out = aug({"image": img, "label": np.zeros((20, 30), np.uint8), "name": "x"}, np.random.default_rng(0))
    assert out["image"].shape == (32, 40, 3)
    assert (out["label"][20:] == 255).all() and (out["image"][20:] == 7).all()  # padded
    np.testing.assert_array_equal(out["image"][:20, :30], img)


def test_eval_canvas_buckets_and_records_sizes(synthetic_root):
    src = sources.ade20k_source(synthetic_root, "validation", num_classes=10)
    canvas = transforms.EvalCanvas(label_bucket=64, image_bucket=0)
    _, it = pipeline.eval_batches(src, transforms.EvalResize(), canvas=canvas, global_batch=2)
    b = next(it)
    assert b["label"].shape == (2, 128, 192) and b["image"].shape == (2, 120, 160, 3)
    np.testing.assert_array_equal(b["label_hw"], [[120, 160]] * 2)
    np.testing.assert_array_equal(b["valid_hw"], [[120, 160]] * 2)
    assert (b["label"][:, 120:] == 255).all() and (b["label"][:, :, 160:] == 255).all()
