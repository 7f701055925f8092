"""mIoU against a hand-computed confusion matrix; sliding-window inference against whole-image."""

import jax.numpy as jnp
import numpy as np

from lqseg_jax.eval.inference import slide_inference, window_starts
from lqseg_jax.eval.metrics import confusion_matrix, format_table, summarize


def test_confusion_matrix_and_miou_by_hand():
    label = np.array([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = np.array([[0, 1, 1, 1], [2, 0, 2, 0]])
    cm = np.asarray(confusion_matrix(jnp.asarray(pred), jnp.asarray(label), 4))
    # rows = truth: class 0: {0, 1}; class 1: {1, 1, 0}; class 2: {2, 0}; 255 skipped; class 3 absent
    expected = np.array([[1, 1, 0, 0], [1, 2, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(cm, expected)
    s = summarize(cm, ["a", "b", "c", "d"])
    # IoU: a = 1 / (2 + 3 - 1) = 0.25; b = 2 / (3 + 3 - 2) = 0.5; c = 1 / (2 + 1 - 1) = 0.5; d absent
    np.testing.assert_allclose(s["mIoU"], 100 * (0.25 + 0.5 + 0.5) / 3)
    assert s["per_class_iou"]["d"] is None
    np.testing.assert_allclose(s["pixel_accuracy"], 100 * 4 / 7)
    assert "mIoU" in format_table(s) and "n/a" in format_table(s)


def test_slide_windows_cover_and_average():
    assert window_starts(10, 4, 3) == [0, 3, 6]
    assert window_starts(11, 4, 3) == [0, 3, 6, 7]
    assert window_starts(3, 4, 3) == [0]
    images = jnp.asarray(np.random.default_rng(0).normal(size=(2, 11, 13, 3)), jnp.float32)

    def per_pixel(x):  # position-independent, so sliding must equal whole-image prediction
        return jnp.concatenate([x, x**2], axis=-1)

    np.testing.assert_allclose(
        slide_inference(per_pixel, images, (4, 5), (3, 3)), per_pixel(images), rtol=1e-6
    )


def test_resize_valid_region_matches_torch_on_the_crop():
    import torch
    import torch.nn.functional as F

    from lqseg_jax.eval.inference import resize_valid_region

    rng = np.random.default_rng(1)
    scores = rng.normal(size=(2, 24, 40, 3)).astype(np.float32)  # padded canvases
    valid_hw = np.array([[24, 40], [17, 29]], np.int32)  # image regions before padding
    label_hw = np.array([[50, 33], [9, 61]], np.int32)  # original label sizes (down and up scaling)
    out = np.asarray(
        resize_valid_region(jnp.asarray(scores), jnp.asarray(valid_hw), (56, 64), jnp.asarray(label_hw))
    )
    for b in range(2):
        (vh, vw), (lh, lw) = valid_hw[b], label_hw[b]
        crop = torch.from_numpy(scores[b, :vh, :vw]).permute(2, 0, 1)[None]
        ref = F.interpolate(crop, size=(int(lh), int(lw)), mode="bilinear", align_corners=False)[0].permute(
            1, 2, 0
        )
        np.testing.assert_allclose(out[b, :lh, :lw], ref.numpy(), atol=1e-5)
