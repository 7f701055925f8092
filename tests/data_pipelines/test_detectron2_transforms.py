"""detectron2 / Mask2Former (RASS) transforms against closed forms, torch, colorsys and test-side re-implementations."""

import colorsys

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats

from lqseg_jax.data_pipelines import detectron2_transforms as d2
from lqseg_jax.data_pipelines import pipeline, synthetic
from lqseg_jax.data_pipelines.sources import ade20k_source


def test_min_sizes_are_the_mask2former_ade20k_list():
    # Base-ADE20K-SemanticSegmentation.yaml: [int(x * 0.1 * 512) for x in range(5, 21)]
    assert d2.MASK2FORMER_ADE20K_MIN_SIZES == (
        256, 307, 358, 409, 460, 512, 563, 614, 665, 716, 768, 819, 870, 921, 972, 1024,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("hw", "short", "max_size", "expected"),
    [
        ((480, 640), 512, 2048, (512, 683)),  # 640 * 512 / 480 = 682.67
        ((640, 480), 512, 2048, (683, 512)),
        ((300, 300), 1024, 2048, (1024, 1024)),
        ((100, 1000), 512, 2048, (205, 2048)),  # 512 x 5120 clamped by 2048 / 5120: 204.8 x 2048
        ((2000, 50), 256, 2048, (2048, 51)),  # 256 x 10240 clamped: 2048 x 51.2
        ((512, 683), 512, 2048, (512, 683)),
        ((100, 133), 50, 2048, (50, 67)),  # 66.5 rounds half up (int(x + 0.5)), not to even
    ],
)
def test_shortest_edge_size_formula(hw, short, max_size, expected):
    assert d2.shortest_edge_size(*hw, short, max_size) == expected


@pytest.mark.parametrize(("src", "dst"), [((37, 53), (74, 106)), ((37, 53), (20, 90)), ((64, 48), (113, 17))])
def test_label_resize_is_torch_nearest(src, dst):
    label = np.random.default_rng(0).integers(0, 151, src).astype(np.uint8)
    # the Mask2Former mapper resizes the label as float64 through F.interpolate(mode="nearest")
    ref = torch.nn.functional.interpolate(torch.from_numpy(label.astype(np.float64))[None, None], dst)[0, 0]
    np.testing.assert_array_equal(d2.resize_label(label, dst), ref.numpy().astype(np.uint8))


def test_hsv_conversions_against_colorsys():
    bgr = np.random.default_rng(1).integers(0, 256, (40, 50, 3)).astype(np.uint8)
    hsv = d2.bgr_to_hsv(bgr).astype(int)
    ref = np.array([colorsys.rgb_to_hsv(*(px[::-1] / 255.0)) for px in bgr.reshape(-1, 3)])  # (n, 3)
    h_ref, s_ref, v_ref = ref[:, 0] * 180, ref[:, 1] * 255, ref[:, 2] * 255
    dh = np.abs(hsv[..., 0].ravel() - h_ref)
    assert np.minimum(dh, 180 - dh).max() <= 1.0  # H in 0..179 (2 degrees per step)
    # rounding, plus the 12-bit fixed-point table of 255 / v: at most 255 * 0.5 / 4096 more
    assert np.abs(hsv[..., 1].ravel() - s_ref).max() <= 0.5 + 255 * 0.5 / 4096 + 1e-9
    np.testing.assert_array_equal(hsv[..., 2].ravel(), v_ref.round())
    assert d2.bgr_to_hsv(
        np.array([[[0, 0, 255], [0, 255, 0], [255, 0, 0], [90, 90, 90]]], np.uint8)
    ).tolist() == [[[0, 255, 255], [60, 255, 255], [120, 255, 255], [0, 0, 90]]]

    hsv_in = np.stack(np.meshgrid(np.arange(0, 180, 7), np.arange(0, 256, 15), np.arange(0, 256, 15)), -1)
    hsv_in = hsv_in.reshape(-1, 81, 3).astype(np.uint8)  # 8424 colours in rows of 81 pixels
    for simd in (32, 64):
        back = d2.hsv_to_bgr(hsv_in, simd).astype(float).reshape(-1, 3)
        rgb = np.array([colorsys.hsv_to_rgb(h / 180, s / 255, v / 255) for h, s, v in hsv_in.reshape(-1, 3)])
        err = back[:, ::-1] - rgb * 255
        # SIMD blocks truncate (error in (-1, 0]); the row's last width % simd pixels round
        assert err.min() > -1 - 1e-3 and err.max() <= 0.5 + 1e-3
        cols = np.tile(np.arange(81), len(err) // 81)
        assert err[cols < 81 - 81 % simd].max() <= 1e-3 and err[cols >= 81 - 81 % simd].min() >= -0.5 - 1e-3


class _PyRandom:
    """Python's `random` calls of the original, drawn from a numpy Generator."""

    def __init__(self, rng):
        self.rng = rng

    def randrange(self, n):
        return int(self.rng.integers(n))

    def uniform(self, a, b):
        return self.rng.uniform(a, b)

    def randint(self, a, b):
        return int(self.rng.integers(a, b + 1))


def _color_aug_reference(img_rgb, rng):
    """detectron2 PointRend ColorAugSSDTransform.apply_image, written out again (cv2 replaced by the
    module's HSV conversions, checked above)."""
    random = _PyRandom(rng)

    def convert(img, alpha=1, beta=0):
        return np.clip(img.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)

    def brightness(img):
        return convert(img, beta=random.uniform(-32, 32)) if random.randrange(2) else img

    def contrast(img):
        return convert(img, alpha=random.uniform(0.5, 1.5)) if random.randrange(2) else img

    def saturation(img):
        if random.randrange(2):
            hsv = d2.bgr_to_hsv(img)
            hsv[:, :, 1] = convert(hsv[:, :, 1], alpha=random.uniform(0.5, 1.5))
            return d2.hsv_to_bgr(hsv)
        return img

    def hue(img):
        if random.randrange(2):
            hsv = d2.bgr_to_hsv(img)
            hsv[:, :, 0] = (hsv[:, :, 0].astype(int) + random.randint(-18, 18)) % 180
            return d2.hsv_to_bgr(hsv)
        return img

    img = img_rgb[:, :, [2, 1, 0]]
    img = brightness(img)
    if random.randrange(2):
        img = hue(saturation(contrast(img)))
    else:
        img = contrast(hue(saturation(img)))
    return img[:, :, [2, 1, 0]]


def test_color_aug_matches_the_original_procedure():
    aug = d2.ColorAugSSD()
    img_rng = np.random.default_rng(2)
    for seed in range(40):
        img = img_rng.integers(0, 256, (9, 37, 3)).astype(np.uint8)
        np.testing.assert_array_equal(
            aug(img, np.random.default_rng(seed)), _color_aug_reference(img, np.random.default_rng(seed))
        )


def test_color_aug_statistics():
    n = 2000
    # brightness alone on gray 100 (contrast x1; the HSV steps keep gray): out - 100 = floor(U(-32, 32))
    aug = d2.ColorAugSSD(contrast_range=(1.0, 1.0))
    gray = np.full((1, 1, 3), 100, np.uint8)
    outs = np.array([aug(gray, np.random.default_rng(s))[0, 0] for s in range(n)]).astype(int)
    assert (outs == outs[:, :1]).all()  # stays gray
    delta = outs[:, 0] - 100
    fired = delta != 0  # misses only floor(U) == 0, probability 1/64 of the fired half
    assert abs(fired.mean() - 0.5 * 63 / 64) < 4 * np.sqrt(0.25 / n)
    counts = np.bincount(delta[fired] + 32, minlength=64)
    assert delta.min() >= -32 and delta.max() <= 31 and counts[32] == 0
    assert stats.chisquare(np.delete(counts, 32)).pvalue > 1e-3  # uniform over the 63 non-zero values

    # contrast alone on gray 200: half unchanged; x U(0.5, 1.5) saturates at 255 for alpha >= 1.275
    aug = d2.ColorAugSSD(brightness_delta=0.0)
    outs = np.array(
        [aug(np.full((1, 1, 3), 200, np.uint8), np.random.default_rng(s))[0, 0, 0] for s in range(n)]
    )
    assert abs((outs == 255).mean() - 0.5 * 0.225) < 4 * np.sqrt(0.1 / n)
    assert abs((outs == 200).mean() - 0.5) < 4 * np.sqrt(0.25 / n) + 0.01
    assert outs.min() >= 100

    # hue alone on pure red: half unchanged, else H = shift mod 180 with shift uniform in -18..18
    aug = d2.ColorAugSSD(brightness_delta=0.0, contrast_range=(1.0, 1.0), saturation_range=(1.0, 1.0))
    red = np.zeros((1, 1, 3), np.uint8)
    red[..., 0] = 255
    hues = np.array(
        [d2.bgr_to_hsv(aug(red, np.random.default_rng(s))[..., ::-1].copy())[0, 0, 0] for s in range(n)]
    )
    shift = np.where(hues > 90, hues.astype(int) - 180, hues)
    assert np.abs(shift).max() <= 18 and abs((shift == 0).mean() - (0.5 + 0.5 / 37)) < 4 * np.sqrt(0.25 / n)
    counts = np.bincount(shift[shift != 0] + 18, minlength=37)
    assert stats.chisquare(np.delete(counts, 18)).pvalue > 1e-3


def _crop_reference(label, crop, cat_max, rng, ignore=255):
    """detectron2 RandomCrop_CategoryAreaConstraint.get_transform, written out again."""
    h, w = label.shape
    ch, cw = min(crop[0], h), min(crop[1], w)
    if cat_max >= 1.0:
        return int(rng.integers(h - ch + 1)), int(rng.integers(w - cw + 1)), ch, cw
    for _ in range(10):
        y0, x0 = int(rng.integers(h - ch + 1)), int(rng.integers(w - cw + 1))
        labels, cnt = np.unique(label[y0 : y0 + ch, x0 : x0 + cw], return_counts=True)
        cnt = cnt[labels != ignore]
        if len(cnt) > 1 and np.max(cnt) < np.sum(cnt) * cat_max:
            break
    return y0, x0, ch, cw


def _constraint_ok(window, cat_max, ignore=255):
    counts = np.unique(window[window != ignore], return_counts=True)[1]
    return len(counts) > 1 and counts.max() < cat_max * counts.sum()


def test_category_area_crop_constraint():
    label = np.zeros((100, 120), np.uint8)
    label[70:, 90:] = 1  # a small second class in one corner
    label[:20] = 255  # ignored band: never counted
    outcomes = set()
    for seed in range(30):
        got = d2.category_area_crop(label, (40, 40), 0.75, np.random.default_rng(seed))
        assert got == _crop_reference(label, (40, 40), 0.75, np.random.default_rng(seed))
        rng = np.random.default_rng(seed)
        draws = [(int(rng.integers(61)), int(rng.integers(81))) for _ in range(10)]
        ok = [_constraint_ok(label[y : y + 40, x : x + 40], 0.75) for y, x in draws]
        expected = draws[ok.index(True)] if any(ok) else draws[-1]  # first valid draw, else the 10th
        assert got == (*expected, 40, 40)
        outcomes.add(any(ok))
    assert outcomes == {True, False}  # both branches were exercised

    # one class only: never satisfiable -> 10 draws, the last one kept
    rng, ref = np.random.default_rng(3), np.random.default_rng(3)
    got = d2.category_area_crop(np.zeros((50, 50), np.uint8), (20, 20), 0.5, rng)
    draws = [(int(ref.integers(31)), int(ref.integers(31))) for _ in range(10)]
    assert got == (*draws[-1], 20, 20)
    assert rng.integers(1 << 30) == ref.integers(1 << 30)  # exactly 20 draws consumed

    # a window that is all ignore counts no class: rejected, not an error
    label = np.full((60, 60), 255, np.uint8)
    label[:, 50:] = np.arange(10) % 2  # two classes in the last 10 columns
    rng, ref = np.random.default_rng(5), np.random.default_rng(5)
    draws = [(int(ref.integers(51)), int(ref.integers(51))) for _ in range(10)]
    ok = [_constraint_ok(label[y : y + 10, x : x + 10], 0.9) for y, x in draws]
    assert not all(ok) and any(ok)
    assert d2.category_area_crop(label, (10, 10), 0.9, rng) == (*draws[ok.index(True)], 10, 10)

    # 1.0 (RASS): one plain RandomCrop draw; a crop larger than the image takes the whole side
    rng, ref = np.random.default_rng(4), np.random.default_rng(4)
    got = d2.category_area_crop(np.zeros((30, 200), np.uint8), (64, 64), 1.0, rng)
    assert got == (int(ref.integers(1)), int(ref.integers(137)), 30, 64)
    assert rng.integers(1 << 30) == ref.integers(1 << 30)


def test_flip_and_padding_values():
    rng_img = np.random.default_rng(5)
    image = rng_img.integers(0, 256, (48, 64, 3)).astype(np.uint8)
    label = rng_img.integers(0, 151, (48, 64)).astype(np.uint8)
    ex = {"image": image, "label": label, "name": "a.jpg"}
    keep = d2.Detectron2TrainAugment(crop=(48, 64), min_sizes=(48,), color_aug=None, flip_prob=0.0)
    flip = d2.Detectron2TrainAugment(crop=(48, 64), min_sizes=(48,), color_aug=None, flip_prob=1.0)
    out = keep(ex, np.random.default_rng(0))
    assert out["name"] == "a.jpg"
    np.testing.assert_array_equal(out["image"], image)
    np.testing.assert_array_equal(out["label"], label)
    out = flip(ex, np.random.default_rng(0))
    np.testing.assert_array_equal(out["image"], image[:, ::-1])
    np.testing.assert_array_equal(out["label"], label[:, ::-1])
    half = d2.Detectron2TrainAugment(crop=(48, 64), min_sizes=(48,), color_aug=None)  # default p 0.5
    flipped = [
        np.array_equal(half(ex, np.random.default_rng(s))["label"], label[:, ::-1]) for s in range(400)
    ]
    assert abs(np.mean(flipped) - 0.5) < 4 * np.sqrt(0.25 / 400)

    # short side 24 -> 24 x 32 content in a 40 x 40 crop: image padded with 128, label with 255
    pad = d2.Detectron2TrainAugment(crop=(40, 40), min_sizes=(24,), color_aug=None, flip_prob=0.0)
    out = pad(ex, np.random.default_rng(0))
    assert out["image"].shape == (40, 40, 3) and out["label"].shape == (40, 40)
    np.testing.assert_array_equal(out["image"][:24, :32], d2.resize_image(image, (24, 32)))
    np.testing.assert_array_equal(out["label"][:24, :32], d2.resize_label(label, (24, 32)))
    assert (out["image"][24:] == 128).all() and (out["image"][:, 32:] == 128).all()
    assert (out["label"][24:] == 255).all() and (out["label"][:, 32:] == 255).all()


def test_train_augment_composition_matches_a_reference():
    """Resize (PIL bilinear / torch nearest) -> crop -> ColorAugSSD -> flip -> pad, with the rng draws in
    that order, re-implemented here."""
    src = np.random.default_rng(6)
    image = src.integers(0, 256, (60, 90, 3)).astype(np.uint8)
    label = src.integers(0, 5, (60, 90)).astype(np.uint8)
    sizes = (30, 45, 80)
    aug = d2.Detectron2TrainAugment(
        crop=(64, 64), min_sizes=sizes, max_size=100, single_category_max_area=0.6
    )
    for seed in range(12):
        rng = np.random.default_rng(seed)
        short = sizes[rng.integers(3)]
        h, w = short, 90 * short / 60  # short side (h) -> short
        if w > 100:  # long side capped at max_size
            h, w = h * 100 / w, 100
        h, w = int(h + 0.5), int(w + 0.5)
        img = np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))
        lbl = torch.nn.functional.interpolate(torch.from_numpy(label.astype(np.float64))[None, None], (h, w))
        lbl = lbl[0, 0].numpy().astype(np.uint8)
        y0, x0, ch, cw = _crop_reference(lbl, (64, 64), 0.6, rng)
        img, lbl = img[y0 : y0 + ch, x0 : x0 + cw], lbl[y0 : y0 + ch, x0 : x0 + cw]
        img = _color_aug_reference(img, rng)
        if rng.uniform() < 0.5:
            img, lbl = img[:, ::-1], lbl[:, ::-1]
        ref_img = np.full((64, 64, 3), 128, np.uint8)
        ref_lbl = np.full((64, 64), 255, np.uint8)
        ref_img[:ch, :cw], ref_lbl[:ch, :cw] = img, lbl
        out = aug({"image": image, "label": label, "name": "b.jpg"}, np.random.default_rng(seed))
        np.testing.assert_array_equal(out["image"], ref_img)
        np.testing.assert_array_equal(out["label"], ref_lbl)


def test_invalid_settings_are_rejected():
    with pytest.raises(ValueError, match="sample_style must be 'choice' or 'range', got 'uniform'"):
        d2.Detectron2TrainAugment(sample_style="uniform")
    with pytest.raises(ValueError, match="image_format must be 'RGB' or 'BGR'"):
        d2.ColorAugSSD(image_format="YUV")


@pytest.mark.parametrize(
    ("hw", "resized", "padded"),
    [
        ((120, 160), (512, 683), (512, 688)),
        ((100, 1000), (205, 2048), (208, 2048)),
        ((512, 512), (512, 512), (512, 512)),
    ],
)
def test_eval_resize_sizes_and_padding(hw, resized, padded):
    rng = np.random.default_rng(7)
    image = rng.integers(1, 256, (*hw, 3)).astype(np.uint8)
    label = rng.integers(0, 150, hw).astype(np.uint8)
    out = d2.Detectron2EvalResize()({"image": image, "label": label, "name": "x.jpg"})
    assert out["image"].shape == (*padded, 3) and out["valid_hw"].tolist() == list(resized)
    np.testing.assert_array_equal(out["label"], label)  # metrics at the original resolution
    rh, rw = resized
    np.testing.assert_array_equal(
        out["image"][:rh, :rw], np.asarray(Image.fromarray(image).resize((rw, rh), Image.BILINEAR))
    )
    assert (out["image"][rh:] == 0).all() and (out["image"][:, rw:] == 0).all()


def test_eval_batches_carry_valid_hw(tmp_path):
    root = synthetic.write_dataset(tmp_path, num_train=1, num_val=3, progress=False)
    src = ade20k_source(root, "validation", num_classes=10)
    steps, it = pipeline.eval_batches(src, d2.Detectron2EvalResize(short_edge=64), global_batch=1)
    batches = list(it)
    assert steps == len(batches) == 3
    for b in batches:  # 120 x 160 -> 64 x 85.33 -> 64 x 85, padded to 64 x 88; label 120 x 160
        assert b["image"].shape == (1, 64, 88, 3) and b["label"].shape == (1, 120, 160)
        assert b["valid_hw"].tolist() == [[64, 85]]
