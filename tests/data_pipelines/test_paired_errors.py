"""PairedDecode's errors name the full path of the broken file when the record carries it (prepared
records: the record; sources with image_path / label_path / reference_path), never only a base name."""

import io

import numpy as np
import pytest
from PIL import Image

from lqseg_jax.data_pipelines.paired import PairedDecode
from lqseg_jax.data_pipelines.sources import DataError


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def test_decode_errors_name_the_full_paths():
    good = _png(np.zeros((4, 6, 3), np.uint8))
    decode = PairedDecode(5)
    paths = {"image_path": "/data/acdc/x_rgb.png", "label_path": "/data/acdc/gt/x_gt.png",
             "reference_path": "/data/acdc/x_ref.png"}  # fmt: skip
    with pytest.raises(DataError, match=r"corrupt or unreadable image /data/acdc/x_rgb\.png"):
        decode({"name": "x", "image": b"junk", **paths})
    with pytest.raises(DataError, match=r"label /data/acdc/gt/x_gt\.png has raw values \[9\]"):
        decode({"name": "x", "image": good, "label": _png(np.full((4, 6), 9, np.uint8)), **paths})
    with pytest.raises(
        DataError, match=r"label /data/acdc/gt/x_gt\.png is \(2, 2\) but the image /data/acdc/x_rgb\.png"
    ):
        decode({"name": "x", "image": good, "label": _png(np.zeros((2, 2), np.uint8)), **paths})
    with pytest.raises(DataError, match=r"corrupt or unreadable image /data/acdc/x_ref\.png"):
        decode({"name": "x", "image": good, "reference": b"junk", **paths})
    with pytest.raises(DataError, match="corrupt or unreadable image reference of x:"):
        decode({"name": "x", "image": good, "reference": b"junk"})
