"""Paired pipelines: one crop + flip shared by image, reference and label; the UDA source + target batch
(determinism, resume, process blocks); rare-class sampling probabilities; the evaluation resizes."""

import json

import numpy as np
import pytest
import torch

from lqseg_jax.data_pipelines import paired, pipeline, refign_sources, synthetic_adverse


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic_adverse")
    return synthetic_adverse.write_dataset(
        root, num_source=(6, 2), num_target=(3, 2), conditions=("night", "fog"), height=48, width=64,
        progress=False,
    )  # fmt: skip


def sources(root):
    return synthetic_adverse.sources(root, "train")


def test_one_crop_and_flip_for_image_reference_and_label():
    h, w = 30, 40
    yy, xx = np.mgrid[0:h, 0:w]
    example = {
        "image": np.stack([yy, xx, np.zeros_like(yy)], -1).astype(np.uint8),
        "reference": np.stack([yy + 100, xx + 100, np.ones_like(yy)], -1).astype(np.uint8),
        "label": ((3 * yy + xx) % 7).astype(np.uint8),
        "name": "x",
    }
    aug = paired.PairedAugment(crop=(16, 24), cat_max_ratio=0.75)
    flips = set()
    for seed in range(12):
        out = aug(example, np.random.default_rng(seed))
        y, x = out["image"][..., 0].astype(int), out["image"][..., 1].astype(int)
        np.testing.assert_array_equal(out["reference"][..., 0], y + 100)
        np.testing.assert_array_equal(out["reference"][..., 1], x + 100)
        np.testing.assert_array_equal(out["label"], (3 * y + x) % 7)
        assert (np.diff(y, axis=0) == 1).all() and y[0, 0] <= h - 16  # a contiguous window
        flips.add(bool(x[0, 0] > x[0, -1]))
        assert (np.abs(np.diff(x, axis=1)) == 1).all()
    assert flips == {True, False}
    small = aug(
        {k: v[:10] for k, v in example.items() if k != "name"} | {"name": "s"}, np.random.default_rng(0)
    )
    assert small["image"].shape == (16, 24, 3) and (small["label"][10:] == 255).all()
    assert (small["reference"][10:] == 0).all()


def test_uda_batch_keys_resume_and_process_blocks(tiny_root):
    src, trg = sources(tiny_root)
    aug = paired.PairedAugment(crop=(32, 32))
    kw = {"source_augment": aug, "target_augment": aug, "seed": 3, "num_threads": 2}
    ds = paired.uda_dataset(src, trg, **kw)
    it = iter(ds)
    first = next(it)
    assert first["image_src"].shape == (2, 32, 32, 3) and first["label_src"].shape == (2, 32, 32)
    assert first["image_trg"].shape == first["image_ref"].shape == (2, 32, 32, 3)
    state = it.get_state()
    expected = [next(it) for _ in range(2)]
    it2 = iter(paired.uda_dataset(src, trg, **kw))
    it2.set_state(state)
    for x in expected:
        y = next(it2)
        for key, value in x.items():
            np.testing.assert_array_equal(y[key], value)
    whole = next(iter(paired.uda_dataset(src, trg, source_batch=4, target_batch=4, **kw)))
    parts = [
        next(iter(paired.uda_dataset(src, trg, process_index=p, process_count=2, **kw))) for p in range(2)
    ]
    for key in whole:
        np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[key])


def test_target_and_reference_stay_aligned_through_the_pipeline(tiny_root):
    """The stored flow, cropped and flipped like the target, still warps the reference onto the target."""
    _, trg = sources(tiny_root)
    n = len(trg)
    batches = paired.paired_train_dataset(trg, paired.PairedAugment(crop=(48, 64), flip_prob=1.0), seed=0,
                                          global_batch=n, num_threads=1)  # fmt: skip
    batch = next(iter(batches))
    for name, image, ref, label in zip(
        batch["name"], batch["image"], batch["reference"], batch["label"], strict=True
    ):
        flow = np.load(synthetic_adverse.flow_path(tiny_root / "acdc", name)).astype(np.float32)
        flow = flow[:, ::-1] * np.array([-1, 1], np.float32)  # the flip, applied to the flow field
        h, w = flow.shape[:2]
        gx, gy = np.meshgrid(np.arange(w), np.arange(h))
        grid = np.stack([2 * (gx + flow[..., 0]) / (w - 1) - 1, 2 * (gy + flow[..., 1]) / (h - 1) - 1], -1)
        warped = torch.nn.functional.grid_sample(
            torch.tensor(ref, dtype=torch.float32).permute(2, 0, 1)[None],
            torch.tensor(grid[None], dtype=torch.float32),
            align_corners=True,
        )[0].permute(1, 2, 0)
        valid = (np.abs(grid) <= 1).all(-1)
        cond, file = name.split("/")[1], name.split("/")[4]
        frame = int(file.split("_frame_")[1][:6])  # the pair's generator seed, as write_dataset draws it
        seed = synthetic_adverse.example_seed(0, 1 + synthetic_adverse.CONDITIONS.index(cond), 0, frame)
        pair = synthetic_adverse.make_pair(seed, cond, 48, 64)
        np.testing.assert_array_equal(label, pair["label"][:, ::-1])  # the same target, flipped
        np.testing.assert_array_equal(image, pair["image"][:, ::-1])
        clean = pair["clean"][:, ::-1][valid].astype(np.float32)

        def error(x, clean=clean):  # after the reference's exposure change (a gain) is fitted out
            return np.abs(x * (x * clean).sum() / (x * x).sum() - clean).mean()

        err, err0 = error(warped.numpy()[valid]), error(ref[valid].astype(np.float32))
        assert err < 0.5 * err0, (name, err, err0)


def test_rare_class_probabilities_and_sampling(tiny_root, tmp_path):
    refign_sources.prepare(
        "cityscapes", tiny_root / "cityscapes", tmp_path, ["train"], num_classes=10, check_counts=False,
        progress=False, workers=1,
    )  # fmt: skip
    stats = json.loads((tmp_path / "train" / "sample_class_stats.json").read_text())
    classes, probs = paired.rcs_class_probs(stats, 0.01)
    # refign get_rcs_class_probs restated: totals sorted ascending, softmax((1 - freq) / T) with torch.
    totals = {}
    for s in stats:
        for c, n in s.items():
            if c != "file":
                totals[int(c)] = totals.get(int(c), 0) + n
    order = sorted(totals.items(), key=lambda kv: kv[1])
    freq = torch.tensor([n for _, n in order], dtype=torch.float64)
    ref = torch.softmax((1 - freq / freq.sum()) / 0.01, -1).numpy()
    assert classes == [c for c, _ in order]
    np.testing.assert_allclose(probs, ref, rtol=1e-12)

    records = refign_sources.paired_source("cityscapes", tmp_path, "train", num_classes=10)
    rcs = paired.rare_class_sampling(
        records, tmp_path / "train", paired.PairedDecode(10), paired.PairedAugment(crop=(32, 32)), seed=0,
        min_pixels=100, min_crop_ratio=0.5,
    )  # fmt: skip
    a, b = rcs[5], rcs[5]
    np.testing.assert_array_equal(a["image"], b["image"])
    assert a["label"].shape == (32, 32)
    with pytest.raises(Exception, match="no image has more than"):
        paired.rare_class_sampling(
            records, tmp_path / "train", paired.PairedDecode(10), paired.PairedAugment(crop=(32, 32)), seed=0,
            min_pixels=10**6,
        )  # fmt: skip


def test_eval_protocols(tiny_root):
    val = refign_sources.paired_source(
        "acdc", tiny_root / "acdc", "val", num_classes=10, conditions=("night",), check_counts=False
    )
    small = {
        "val": paired.ResizeTo((24, 32), True),
        "test": paired.ResizeTo((24, 32)),
        "native": paired.ResizeTo(None),
    }
    shapes = {}
    for name, resize in small.items():
        _, it = pipeline.eval_batches(val, resize, global_batch=2)
        b = next(it)
        shapes[name] = (b["image"].shape[1:3], b["label"].shape[1:3])
    assert shapes == {
        "val": ((24, 32), (24, 32)),
        "test": ((24, 32), (48, 64)),
        "native": ((48, 64), (48, 64)),
    }
    assert paired.EVAL_PROTOCOLS["test"].size == (540, 960) and not paired.EVAL_PROTOCOLS["test"].resize_label
