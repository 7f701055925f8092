"""scripts/app.py's web demo through its HTTP API (gradio's Python client) on a random-weight tiny model:
an uploaded image comes back as the input, its degraded copy, the overlay and the legend. gradio is in
requirements-test.lock (the `app` extra for users), so this runs in `make test` rather than skipping."""

import importlib.util
import socket

import numpy as np
from absl import flags
from gradio_client import Client, handle_file
from PIL import Image

from lqseg_jax.predict import LEGEND_PAD, LEGEND_SWATCH, Predictor


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_app_segments_an_uploaded_image(tmp_path, repo, monkeypatch):
    from lqseg_jax.train.config import load_config
    from lqseg_jax.train.trainer import Trainer

    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    before = set(flags.FLAGS)
    spec = importlib.util.spec_from_file_location("app_script", repo / "scripts" / "app.py")
    app = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(app)
    finally:  # its absl flags go, so that another script's module can define its own
        for flag in set(flags.FLAGS) - before:
            delattr(flags.FLAGS, flag)

    config = load_config("configs/daformer.py:tiny")
    config.data.synthetic.enabled = False
    config.eval.batch_size = 8  # one image per CPU device of the test session
    trainer = Trainer(config)
    predictor = Predictor(trainer, trainer.init_state())

    image = np.random.default_rng(0).integers(0, 256, (48, 56, 4), np.uint8)  # RGBA: alpha dropped
    path = tmp_path / "upload.png"
    Image.fromarray(image).save(path)
    page = app.build_app(predictor, [path])
    url = app.serve(page, "127.0.0.1", _free_port(), block=False)
    try:
        shown, degraded, overlay, legend = Client(url, verbose=False).predict(
            handle_file(str(path)), "light", api_name="/segment"
        )
    finally:
        page.close()
    read = [np.asarray(Image.open(p).convert("RGB")) for p in (shown, degraded, overlay, legend)]
    np.testing.assert_array_equal(read[0], image[..., :3])  # the input, as the data sources read it
    assert read[1].shape == read[2].shape == (48, 56, 3)
    assert not np.array_equal(read[1], read[0])  # degraded
    swatch = read[3][LEGEND_PAD + 2 + LEGEND_SWATCH // 2, LEGEND_PAD + LEGEND_SWATCH // 2]
    assert swatch.tolist() in predictor.palette[:10].tolist()  # the first legend row is a class colour
