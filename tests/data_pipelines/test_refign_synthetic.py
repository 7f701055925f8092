"""Synthetic paired adverse-condition dataset: determinism, layout, true flow, and harder targets."""

import numpy as np
import torch
from PIL import Image

from lqseg_jax.data_pipelines import synthetic_adverse as sa


def warp_with_flow(x: np.ndarray, flow: np.ndarray, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """Refign's warp restated with torch: out(p) = x(p + flow(p)), align_corners=True pixel grid."""
    h, w = flow.shape[:2]
    gx, gy = np.meshgrid(np.arange(w), np.arange(h))
    x_s, y_s = gx + flow[..., 0], gy + flow[..., 1]
    grid = torch.tensor(
        np.stack([2 * x_s / (w - 1) - 1, 2 * y_s / (h - 1) - 1], -1)[None], dtype=torch.float32
    )
    t = torch.tensor(x, dtype=torch.float32)
    t = t.permute(2, 0, 1)[None] if t.ndim == 3 else t[None, None]
    out = torch.nn.functional.grid_sample(t, grid, mode=mode, align_corners=True)[0]
    out = out.permute(1, 2, 0).numpy() if x.ndim == 3 else out[0].numpy()
    valid = (x_s >= 0) & (x_s <= w - 1) & (y_s >= 0) & (y_s <= h - 1)
    return out, valid


def test_pairs_are_deterministic_and_differ_by_seed():
    a, b, c = sa.make_pair(11, "rain"), sa.make_pair(11, "rain"), sa.make_pair(12, "rain")
    for key in ("image", "label", "reference", "flow"):
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a["reference"], c["reference"])


def test_stored_flow_warps_the_reference_onto_the_target_geometry():
    for seed, condition in [(1, "night"), (2, "fog"), (3, "rain"), (4, "night")]:
        pair = sa.make_pair(seed, condition)
        assert np.abs(pair["flow"]).max() > 2.0  # the reference really moved
        lab, valid = warp_with_flow(pair["reference_label"], pair["flow"], "nearest")
        assert valid.mean() > 0.8
        agree = (lab == pair["label"])[valid].mean()
        unaligned = (pair["reference_label"] == pair["label"]).mean()
        assert agree > 0.985 and unaligned < agree - 0.05, (seed, agree, unaligned)
        img, _ = warp_with_flow(pair["reference"], pair["flow"], "bilinear")
        err = np.abs(img - pair["clean"].astype(np.float32))[valid].mean()
        err0 = np.abs(pair["reference"].astype(np.float32) - pair["clean"])[valid].mean()
        assert err < 0.6 * err0, (err, err0)


def _colour_classifier(images, labels, k):
    """Nearest class-mean colour, fitted on normal-condition scenes: a source-only segmenter in miniature."""
    x = np.concatenate([i.reshape(-1, 3) for i in images]).astype(np.float32)
    y = np.concatenate([lab.ravel() for lab in labels])
    means = np.stack([x[y == c].mean(0) for c in range(k)])  # (k, 3)

    def accuracy(image, label):
        d = ((image.reshape(-1, 1, 3).astype(np.float32) - means) ** 2).sum(-1)
        keep = label.ravel() != 255
        return (d.argmin(1) == label.ravel())[keep].mean()

    return accuracy


def test_written_layout_and_adverse_targets_are_harder(tmp_path):
    root = sa.write_dataset(tmp_path, num_source=(3, 1), num_target=(2, 1), progress=False)
    acdc = root / "acdc"
    rec = sa.recording("night", "val")
    image = acdc / "rgb_anon" / "night" / "val" / rec / f"{rec}_frame_000000_rgb_anon.png"
    ref = acdc / "rgb_anon" / "night" / "val_ref" / rec / f"{rec}_frame_000000_rgb_ref_anon.png"
    gt = acdc / "gt" / "night" / "val" / rec / f"{rec}_frame_000000_gt_labelTrainIds.png"
    assert image.is_file() and ref.is_file() and gt.is_file()
    assert len(list((root / "cityscapes" / "leftImg8bit" / "train" / "synth").glob("*_leftImg8bit.png"))) == 3
    assert len(list((acdc / "rgb_anon").glob("*/train/*/*_rgb_anon.png"))) == 6
    flow = np.load(sa.flow_path(acdc, image))
    assert flow.shape == (120, 160, 2)
    pair = sa.make_pair(
        sa.example_seed(0, 1, 1, 0), "night"
    )  # seed (seed, condition 1 = night, split 1 = val, i)
    np.testing.assert_array_equal(np.asarray(Image.open(image)), pair["image"])
    np.testing.assert_array_equal(np.asarray(Image.open(ref)), pair["reference"])
    np.testing.assert_array_equal(np.asarray(Image.open(gt)), pair["label"])
    np.testing.assert_allclose(flow, pair["flow"], atol=0.01)

    scenes = [sa.make_scene(s) for s in range(12)]
    accuracy = _colour_classifier([s[0] for s in scenes], [s[1] for s in scenes], sa.NUM_CLASSES)
    held_out = [sa.make_pair(100 + s, "fog") for s in range(3)]
    source_acc = np.mean([accuracy(p["clean"], p["label"]) for p in held_out])
    for condition in sa.CONDITIONS:
        pairs = [sa.make_pair(100 + s, condition) for s in range(3)]
        target_acc = np.mean([accuracy(p["image"], p["label"]) for p in pairs])
        ref_acc = np.mean([accuracy(p["reference"], p["reference_label"]) for p in pairs])
        assert target_acc < source_acc - 0.15, (condition, target_acc, source_acc)
        assert ref_acc > source_acc - 0.05, (condition, ref_acc, source_acc)
