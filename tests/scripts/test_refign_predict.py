"""scripts/eval.py with a random tiny Refign UDA network (configs/refign.py:tiny, 19 Cityscapes classes) on a
tiny Dark Zurich (val + test) and Nighttime Driving in their real layouts: --protocol test reports the val
split and the extra set with full-resolution labels and writes summary.json; --predict writes refign's
preds/DarkZurich and color_preds/DarkZurich files for the test split, train ids at the image size, colours
of the Cityscapes palette. The numbers of both paths are checked against numpy in
tests/eval/test_refign_protocols.py; here the real network, checkpoint and script run end to end."""

import json

import numpy as np
import pytest
from PIL import Image

from lqseg_jax.data_pipelines import refign_sources as rs
from lqseg_jax.eval.report import CITYSCAPES_PALETTE
from lqseg_jax.train.checkpoint import Checkpointer
from lqseg_jax.train.config import load_config
from lqseg_jax.train.trainer import Trainer
from tests.helpers import run_script

pytestmark = pytest.mark.usefixtures("fast_compile")

FULL = (64, 128)  # "1080x1920"; the network sees 32x64 ("540x960")
TEST_NAMES = [f"GOPR0356_frame_{f:06d}_rgb_anon.png" for f in (321, 322, 323)]

CONFIG = """
from pathlib import Path

import ml_collections

from lqseg_jax.train.config import load_config


def get_config(arg=None):
    c = load_config("{repo}/configs/refign.py:tiny")
    c.model.num_classes = 19
    c.model.head.embed_dims = 16
    c.model.head.channels = 16
    c.data.class_names = {classes!r}
    c.data.synthetic.enabled = False
    c.data.target, c.data.target_root = "darkzurich", "{dz}"
    c.eval.source, c.eval.root = "darkzurich", "{dz}"
    c.eval.scale = (64, 32)
    c.eval.label_bucket = 128
    c.eval.batch_size = 8
    c.eval.num_pictures = 1
    c.eval.resize_labels = True
    c.eval.present_classes_only = False
    c.eval.extra_sets = ml_collections.ConfigDict(
        dict(nighttimedriving=dict(source="nighttimedriving", root="{nd}", split="test"))
    )
    return c
"""


def put(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def rgb(seed):
    return np.random.default_rng(seed).integers(0, 256, (*FULL, 3), dtype=np.uint8)


def train_ids(seed):
    return np.random.default_rng(seed).choice(np.array([0, 1, 2, 8, 10, 13, 255], np.uint8), size=FULL)


@pytest.mark.slow  # the random-init train state, one eval step and one prediction program compile
def test_eval_test_protocol_and_predict_through_the_script(repo, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(rs.EXPECTED, "darkzurich", {"val": 2, "test": 3})
    monkeypatch.setitem(rs.EXPECTED, "nighttimedriving", {"test": 1})
    dz, nd = tmp_path / "DarkZurich", tmp_path / "NighttimeDrivingTest"
    for i, stem in enumerate(["GOPR0356_frame_000100", "GOPR0356_frame_000200"]):
        put(dz / f"rgb_anon/val/night/GOPR0356/{stem}_rgb_anon.png", rgb(i))
        put(dz / f"rgb_anon/val_ref/day/GOPR0356_ref/{stem}_ref_rgb_anon.png", rgb(10 + i))
        put(dz / f"gt/val/night/GOPR0356/{stem}_gt_labelTrainIds.png", train_ids(i))
    for i, name in enumerate(TEST_NAMES):
        stem = name.removesuffix("_rgb_anon.png")
        put(dz / f"rgb_anon/test/night/GOPR0356/{name}", rgb(20 + i))
        put(dz / f"rgb_anon/test_ref/day/GOPR0356_ref/{stem}_ref_rgb_anon.png", rgb(30 + i))
    put(nd / "leftImg8bit/test/night/0_frame_0110_leftImg8bit.png", rgb(40))
    put(
        nd / "gtCoarse_daytime_trainvaltest/test/night/0_frame_0110_gtCoarse_labelTrainIds.png", train_ids(40)
    )
    config_file = tmp_path / "tiny_dz.py"
    config_file.write_text(CONFIG.format(repo=repo, classes=tuple(rs.CITYSCAPES_CLASSES), dz=dz, nd=nd))

    config = load_config(str(config_file))
    trainer = Trainer(config)
    ckpt = Checkpointer(tmp_path / "run", async_save=False)
    ckpt.save(0, trainer.init_state(), None, config)
    ckpt.wait()
    ckpt.close()

    common = [f"--config={config_file}", f"--workdir={tmp_path / 'run'}"]
    run_script(repo, "eval", [*common, "--protocol=test", f"--out={tmp_path / 'eval'}"])
    printed = capsys.readouterr().out
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["protocol"] == "test" and set(summary["sets"]) == {"val", "nighttimedriving"}
    assert (
        summary["sets"]["val"]["num_images"] == 2 and summary["sets"]["nighttimedriving"]["num_images"] == 1
    )
    for name, where in (
        ("val", tmp_path / "eval"),
        ("nighttimedriving", tmp_path / "eval" / "nighttimedriving"),
    ):
        metrics = json.loads((where / "metrics.json").read_text())
        assert metrics["mIoU"] == pytest.approx(summary["sets"][name]["mIoU"])
        assert len(metrics["per_class_iou"]) == 19 and None not in metrics["per_class_iou"].values()
        assert f"mIoU {metrics['mIoU']:.2f} on {metrics['num_images']} images" in printed

    with pytest.raises(SystemExit) as exit_info:  # the dataset folder is never written to
        run_script(repo, "eval", [*common, "--predict", f"--out={dz / 'predictions'}"])
    assert exit_info.value.code == 2 and "inside the dataset folder" in capsys.readouterr().err

    run_script(repo, "eval", [*common, "--predict", f"--out={tmp_path / 'pred'}"])
    printed = capsys.readouterr().out
    assert "wrote 3 DarkZurich test predictions" in printed
    assert (
        f"the zip for the benchmark server: {tmp_path / 'pred' / 'DarkZurich_test_submission.zip'}" in printed
    )
    written = sorted(str(p.relative_to(tmp_path / "pred")) for p in (tmp_path / "pred").rglob("*.png"))
    assert written == sorted(
        f"{kind}/DarkZurich/{n}" for kind in ("preds", "color_preds") for n in TEST_NAMES
    )
    palette = np.array(CITYSCAPES_PALETTE, np.uint8)
    for name in TEST_NAMES:
        ids = Image.open(tmp_path / "pred/preds/DarkZurich" / name)
        assert ids.mode == "L" and ids.size == FULL[::-1]
        ids = np.asarray(ids)
        assert ids.max() < 19
        colour = Image.open(tmp_path / "pred/color_preds/DarkZurich" / name)
        np.testing.assert_array_equal(np.asarray(colour.convert("RGB")), palette[ids])
