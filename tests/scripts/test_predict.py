"""scripts/predict.py on a folder of mixed images (one corrupt) with a random-weight converted model, and the
overlay/legend pictures of lqseg_jax/predict.py for a hand-made prediction."""

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lqseg_jax.predict import (
    LEGEND_PAD,
    LEGEND_ROW,
    LEGEND_SWATCH,
    check_out,
    dataset_palette,
    find_images,
    output_names,
    overlay,
)
from tests.train.test_multiprocess import env


def test_overlay_blends_and_legend_lists_classes_by_area():
    pal = dataset_palette(150)  # ADE20K: wall (120, 120, 120), building (180, 120, 120), sky (6, 230, 230)
    names = [f"c{i}" for i in range(150)]
    image = np.full((20, 30, 3), 100, np.uint8)
    labels = np.full((20, 30), 2, np.uint8)  # sky: 20 x 18 pixels
    labels[:, :10] = 1  # building: 20 x 10
    labels[:2, 10:12] = 255  # unlabelled: 4 pixels keep the image
    out = overlay(image, labels, pal, names, alpha=0.25)
    assert out.shape[0] == max(20, 2 * LEGEND_PAD + 2 * LEGEND_ROW) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[5, 3], [120, 105, 105])  # 0.75 * 100 + 0.25 * (180, 120, 120)
    np.testing.assert_array_equal(out[5, 20], [76, 132, 132])  # 0.75 * 100 + 0.25 * (6, 230, 230), rounded
    np.testing.assert_array_equal(out[0, 10], [100, 100, 100])
    legend = out[:, 30:]
    centre = LEGEND_PAD + 2 + LEGEND_SWATCH // 2
    np.testing.assert_array_equal(legend[centre, centre], [6, 230, 230])  # row 0: sky, the larger class
    np.testing.assert_array_equal(legend[centre + LEGEND_ROW, centre], [180, 120, 120])  # row 1: building
    below = legend[LEGEND_PAD + 2 * LEGEND_ROW + 1 :]
    assert (below == 255).all()  # two classes, two rows: white below (the legend is as tall as the image)
    assert (legend[:, LEGEND_PAD + LEGEND_SWATCH + 2 :] < 128).any()  # the names are drawn


def test_output_names_are_distinct():
    files = [Path("a/x.jpg"), Path("a/x.png"), Path("b/x.png"), Path("b/y.png")]
    assert output_names(files) == ["x", "x_png", "x_png_2", "y"]


def test_inputs_and_the_output_folder(tmp_path):
    (tmp_path / "in" / "sub").mkdir(parents=True)
    for name in ("in/b.JPG", "in/a.png", "in/sub/c.webp", "in/notes.txt"):
        (tmp_path / name).write_bytes(b"")
    files, folder, ignored = find_images(tmp_path / "in")
    assert [f.name for f in files] == ["a.png", "b.JPG"] and folder == tmp_path / "in" and ignored == 1
    files, folder, _ = find_images(f"{tmp_path}/in/**/*.*")
    assert [f.name for f in files] == ["a.png", "b.JPG", "c.webp"] and folder == tmp_path / "in"
    assert find_images(tmp_path / "in" / "notes.txt") == ([tmp_path / "in" / "notes.txt"], None, 0)
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        find_images(tmp_path / "missing")
    for out in (tmp_path / "in", tmp_path / "in" / "sub" / "out"):
        with pytest.raises(ValueError, match="lies inside the input folder"):
            check_out(out, tmp_path / "in", files)
    check_out(tmp_path / "out", tmp_path / "in", files)
    with pytest.raises(ValueError, match="is the folder of --input"):
        check_out(tmp_path / "in", None, [tmp_path / "in" / "a.png"])
    check_out(tmp_path / "in" / "out", None, [tmp_path / "in" / "a.png"])


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A random-weight configs/daformer.py:tiny model saved as a scripts/convert.py output folder."""
    from flax import nnx

    from lqseg_jax.convert.common import save_converted
    from lqseg_jax.systems import get_system
    from lqseg_jax.train.config import load_config

    model = get_system(load_config("configs/daformer.py:tiny")).build_model(nnx.Rngs(params=0, dropout=0))
    return save_converted(tmp_path_factory.mktemp("model") / "converted", model, {"source": "random init"})


def _snapshot(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _predict(repo, converted, *args):
    cmd = [
        sys.executable, "scripts/predict.py", "--config", "configs/daformer.py:tiny", "--converted",
        str(converted), "--config.model.pretrained.prefix=", "--config.data.synthetic.enabled=False",
        "--config.eval.batch_size=2", "--noprogress", *args,
    ]  # fmt: skip
    return subprocess.run(cmd, cwd=repo, env=env(1), capture_output=True, text=True, timeout=600)


def test_predict_folder_of_mixed_images(tmp_path, repo, converted):
    rng = np.random.default_rng(0)
    src = tmp_path / "photos"
    src.mkdir()
    sizes = {"wide.png": (40, 52, 3), "tall.jpg": (64, 30, 3), "gray.png": (33, 47), "rgba.png": (50, 40, 4)}
    for name, shape in sizes.items():
        Image.fromarray(rng.integers(0, 256, shape, np.uint8)).save(src / name)
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not an image")
    (src / "notes.txt").write_text("not an image either")
    before = _snapshot(src)

    refused = _predict(repo, converted, "--input", str(src), "--out", str(src / "out"))
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert refused.stderr.startswith("error: --out") and "inside the input folder" in refused.stderr

    out = tmp_path / "out"
    result = _predict(repo, converted, "--input", str(src), "--out", str(out))
    assert result.returncode == 1, result.stderr[-3000:]  # 1: some files were skipped
    assert "wrote 4 of 5 images" in result.stdout and "skipped 1 files" in result.stdout
    assert f"{src / 'broken.png'}: corrupt or unreadable image" in result.stderr
    assert _snapshot(src) == before  # the input folder is untouched
    written = {p.name for p in out.iterdir()}
    stems = [name.split(".")[0] for name in sizes]
    assert written == {f"{s}_{kind}.png" for s in stems for kind in ("labels", "color", "overlay")}
    pal = dataset_palette(10)
    for name, shape in sizes.items():
        stem = name.split(".")[0]
        labels = np.asarray(Image.open(out / f"{stem}_labels.png"))
        assert labels.shape == shape[:2] and labels.max() < 10  # at the image's own size, 10 classes
        np.testing.assert_array_equal(np.asarray(Image.open(out / f"{stem}_color.png")), pal[labels])
        over = np.asarray(Image.open(out / f"{stem}_overlay.png"))
        assert over.shape[0] >= shape[0] and over.shape[1] > shape[1]  # the legend at the right
