"""decode_image: 16-bit grey is scaled (not clipped) to 8 bits; unreadable bytes name the file."""

import io

import numpy as np
import pytest
from PIL import Image

from lqseg_jax.data_pipelines.sources import DataError
from lqseg_jax.data_pipelines.transforms import decode_image


def _png(array: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode).save(buf, format="PNG")
    return buf.getvalue()


def test_16_bit_grey_is_scaled_to_8_bits():
    raw = np.array([[0, 257, 32896], [65535, 1000, 128]], np.uint16)  # (2, 3)
    out = decode_image(_png(raw), "/data/x.png")  # (2, 3, 3)
    expected = np.round(raw / 257.0).astype(np.uint8)
    assert out.shape == (2, 3, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, np.repeat(expected[..., None], 3, -1))


def test_8_bit_grey_and_rgba_are_unchanged_by_the_16_bit_path():
    grey = np.array([[0, 100, 255]], np.uint8)
    np.testing.assert_array_equal(decode_image(_png(grey), "g.png")[..., 0], grey)
    rgba = np.zeros((1, 2, 4), np.uint8)
    rgba[..., :3] = [[10, 20, 30], [200, 100, 0]]
    rgba[..., 3] = 255
    np.testing.assert_array_equal(decode_image(_png(rgba), "a.png"), rgba[..., :3])


def test_unreadable_bytes_name_the_file_without_pillow_internals():
    with pytest.raises(DataError) as e:
        decode_image(b"not an image at all", "/data/images/a.jpg")
    msg = str(e.value)
    assert (
        msg
        == "corrupt or unreadable image /data/images/a.jpg: not a file Pillow can read (expected an RGB JPEG or PNG)"
    )
