"""Held-out matching pairs with large synthetic flows (data_pipelines/matching_stream.warped_eval_examples).

The images are colour ramps, R = x and G = y scaled to 0..255, so the colour of a pixel of the warped image
names the position it was sampled from; the built correspondences are checked against that, not against the
warp code. Against the reference, the stored flow is a known affine field and the target is the reference's
ramp read at p + flow(p), written in closed form."""

import numpy as np
import pytest

from lqseg_jax.data_pipelines.flow_warps import WarpSpec
from lqseg_jax.data_pipelines.matching_stream import warped_eval_examples
from lqseg_jax.eval.matching import evaluate_matching

H, W = 40, 56
SPEC = WarpSpec.stage(1)
COUNT = 6


def ramp(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(h, w, 3) uint8 with R = 255 x / (W - 1), G = 255 y / (H - 1), B = 128."""
    r = np.round(255.0 * x / (W - 1))
    g = np.round(255.0 * y / (H - 1))
    return np.stack([r, g, np.full_like(r, 128.0)], -1).clip(0, 255).astype(np.uint8)


def decode(image: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """The (x, y) positions (n, 2) that the ramp colours of `image` at the integer points (xs, ys) name."""
    c = image[ys.astype(int), xs.astype(int)].astype(np.float64)
    return np.stack([c[:, 0] * (W - 1) / 255.0, c[:, 1] * (H - 1) / 255.0], -1)


def stored_flow(x, y):
    """A target -> reference flow that contracts toward the centre and shifts: inside the image everywhere."""
    cx, cy = (W - 1) / 2, (H - 1) / 2
    return np.stack([-0.1 * (x - cx) + 1.0, -0.08 * (y - cy) - 0.5], -1)


def source(n: int = COUNT, *, target_ramp: bool = True) -> list[dict]:
    """n copies of one pair with the stored flow f; target_ramp: the target is the ramp (for pairs against
    the target, which do not read the reference), else the reference is the ramp and target(p) =
    reference(p + f(p))."""
    y, x = np.mgrid[0:H, 0:W].astype(np.float64)
    f = stored_flow(x, y)  # (H, W, 2)
    moved = ramp(x + f[..., 0], y + f[..., 1])
    image, reference = (ramp(x, y), moved) if target_ramp else (moved, ramp(x, y))
    return [{"name": "ramp", "image": image, "reference": reference, "flow": f.astype(np.float32)}] * n


@pytest.fixture(scope="module")
def against_target():
    return warped_eval_examples(source(), SPEC, seed=0, against="target")


def check_correspondences(examples, max_error: float):
    for ex in examples:
        m = ex["matches"]
        assert len(m) > 20, f"{ex['name']}: only {len(m)} correspondences"
        x_ref, y_ref, x, y = m.T
        flow = ex["flow"][y.astype(int), x.astype(int)]  # (n, 2)
        np.testing.assert_allclose(flow, np.stack([x_ref - x, y_ref - y], -1), atol=1e-4)
        # the warped image's colour at (x, y) names the reference point it shows
        sampled = decode(ex["image"], x, y)  # (n, 2)
        error = np.abs(sampled - np.stack([x_ref, y_ref], -1)).max()
        assert error < max_error, f"{ex['name']}: warped image and flow disagree by {error:.3f} px"


def test_warped_image_shows_the_target_where_the_flow_points(against_target):
    # one uint8 level is 0.22 px in x; the ramp's rounding before and after the bilinear sample: <= 1 level
    check_correspondences(against_target, 0.3)
    for ex in against_target:
        np.testing.assert_array_equal(ex["reference"], source(1)[0]["image"])


def test_warped_image_against_the_reference_composes_the_stored_flow():
    pairs = source(target_ramp=False)
    examples = warped_eval_examples(pairs, SPEC, seed=0, against="reference")
    # bilinear sampling of the affine stored flow and of the target's affine ramp is exact: rounding only
    check_correspondences(examples, 0.3)
    for ex in examples:
        np.testing.assert_array_equal(ex["reference"], pairs[0]["reference"])


def test_zero_flow_is_far_off_and_the_true_flow_is_exact(against_target):
    kw = dict(short_side=0, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), progress=False)
    zero = evaluate_matching(
        lambda t, r: (np.zeros((*t.shape[:3], 2), np.float32), np.zeros(t.shape[:3], np.float32)),
        against_target,
        **kw,
    )
    truth = iter([ex["flow"] for ex in against_target])
    oracle = evaluate_matching(
        lambda t, r: (next(truth)[None], np.zeros(t.shape[:3], np.float32)), against_target, **kw
    )
    assert oracle["AEPE"] < 1e-5 and oracle["PCK_1"] == 1.0  # float32 round-off of x + u - x
    # stage-1 warps at 40x56: corners move up to 0.333 x 27.5 px
    assert zero["AEPE"] > 2.5, zero
    assert zero["PCK_1"] < 0.25, zero


def test_a_seed_gives_the_same_pairs(against_target):
    again = warped_eval_examples(source(2), SPEC, seed=0, against="target")
    other = warped_eval_examples(source(2), SPEC, seed=1, against="target")
    for a, b in zip(again, against_target[:2]):
        for key in ("image", "flow", "matches"):
            np.testing.assert_array_equal(a[key], b[key])
    assert not any(np.array_equal(a["flow"], b["flow"]) for a, b in zip(again, other))
    # pair i has its own warp
    assert not np.array_equal(again[0]["flow"], again[1]["flow"])
