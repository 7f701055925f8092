"""scripts/refign_pseudo_labels.py: the scores of a pseudo-label against the target label, and the refusal of
a target without true flows."""

import numpy as np
import pytest

from lqseg_jax.data_pipelines.sources import DataError
from lqseg_jax.train.config import load_config
from tests.helpers import load_script


def test_scores_by_hand():
    # 1 image of 2x3: label [[0, 0, 1], [1, 255, 2]]; the pseudo-label predicts [[0, 1, 1], [1, 0, 0]]
    label = np.array([[[0, 0, 1], [1, 255, 2]]], np.uint8)
    pred = np.array([[[0, 1, 1], [1, 0, 0]]])
    conf = np.array([[[0.95, 0.5, 0.99], [0.2, 0.99, 0.95]]])
    probs = np.zeros((1, 2, 3, 4))
    np.put_along_axis(probs, pred[..., None], conf[..., None], axis=-1)
    r = load_script("refign_pseudo_labels").scores(probs, label, num_classes=4, threshold=0.9)
    # IoU: class 0: 1 / 3 (pixels (0,0) both; (0,1) label only; (1,2) prediction only), class 1: 2 / 3,
    # class 2: 0 / 1; class 3 absent from the label is left out; the 255 pixel is ignored
    np.testing.assert_allclose(r["mIoU"], 100 * (1 / 3 + 2 / 3 + 0) / 3)
    np.testing.assert_allclose(r["accuracy"], 100 * 3 / 5)
    # confident (> 0.9): 4 of the 6 pixels (the DACS weight counts every pixel); of the labelled ones, (0,0)
    # and (0,2) are right, (1,2) wrong
    np.testing.assert_allclose(r["confident_share"], 100 * 4 / 6)
    np.testing.assert_allclose(r["confident_accuracy"], 100 * 2 / 3)


def test_a_target_without_true_flows_is_refused(tmp_path):
    config = load_config("configs/refign.py:tiny", **{"data.target_root": str(tmp_path / "acdc")})
    with pytest.raises(DataError, match=r"needs the synthetic paired data's true flows: no .*acdc/flow"):
        load_script("refign_pseudo_labels").val_pairs(config)
