"""Refign's evaluation and prediction protocols (refign.md section 9) on tiny datasets in the real layouts
(ACDC val, Dark Zurich test, Nighttime Driving, BDD100k-night), with a per-pixel linear "network" so every
number can be restated in numpy: PIL's antialiased bilinear image resize, the logits resized bilinearly
(torch align_corners=False, no antialias) to the label, the argmax, and refign's IoU (mean over all classes,
union 0 -> 0, or over the classes with ground truth). The real UDA network: tests/scripts/test_refign_predict.py."""

import io
import json
import zipfile
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from lqseg_jax.data_pipelines import refign_sources as rs
from lqseg_jax.data_pipelines.sources import DataError
from lqseg_jax.eval.evaluate import summarize_classes
from lqseg_jax.eval.refign_protocols import evaluate_protocol, predict_split
from lqseg_jax.train.config import base_config

K = 19
FULL = (64, 128)  # "1080x1920": ACDC, Dark Zurich, Nighttime Driving
BDD = (48, 96)  # "720x1280"
INPUT = (32, 64)  # "540x960": eval.scale (64, 32) keep-ratio
# Cityscapes colours by train id, restated from cityscapesScripts labels.py
CITYSCAPES_COLOURS = [
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
    (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
]  # fmt: skip


# ------------------------------------------------------------------------------------------ the "network"
class PixelLinear(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.proj = nnx.Linear(3, K, rngs=rngs)


class LinearSystem:
    def predict_batch(self, model, batch):
        return model.proj(batch["image"].astype(jnp.float32) / 255.0)  # (b, h, w, K)


class StubTrainer:
    """What evaluate() and Predictor use of a Trainer, around PixelLinear."""

    def __init__(self, config):
        self.config, self.system = config, LinearSystem()
        model = PixelLinear(nnx.Rngs(3))
        self.weights = tuple(
            np.asarray(v, np.float64) for v in (model.proj.kernel[...], model.proj.bias[...])
        )
        self.eval_graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        self.state = SimpleNamespace(params=params, rest=rest, step=7)
        self.mesh = jax.make_mesh((jax.device_count(),), ("data",))

    def eval_params(self, state):
        return state.params

    def device_batch(self, batch):
        return {
            k: jnp.asarray(v)
            for k, v in batch.items()
            if isinstance(v, np.ndarray) and v.dtype.kind in "biuf"
        }

    def local_rows(self, x):
        return np.asarray(x)


# ------------------------------------------------------------------------------ numpy re-statement
def np_logits(trainer, image: np.ndarray) -> np.ndarray:
    kernel, bias = trainer.weights
    return (image.astype(np.float64) / 255.0) @ kernel + bias  # (h, w, K)


def np_bilinear(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """torch F.interpolate(mode='bilinear', align_corners=False) of (h, w, K) to size, written out."""

    def taps(n_in, n_out):
        src = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0.0)
        lo = np.minimum(np.floor(src).astype(int), n_in - 1)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, src - lo

    y0, y1, fy = taps(x.shape[0], size[0])
    x0, x1, fx = taps(x.shape[1], size[1])
    rows = x[y0] * (1 - fy)[:, None, None] + x[y1] * fy[:, None, None]
    return rows[:, x0] * (1 - fx)[None, :, None] + rows[:, x1] * fx[None, :, None]


def np_predict(trainer, image: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """Refign's forward(x, out_size) on the image resized to INPUT with PIL bilinear: logits at INPUT,
    bilinear to out_hw, argmax; asserts no near-tie, so float32 vs float64 cannot flip a pixel."""
    small = np.asarray(Image.fromarray(image).resize(INPUT[::-1], Image.BILINEAR))
    scores = np_bilinear(np_logits(trainer, small), out_hw)  # (H, W, K)
    top2 = np.sort(scores, axis=-1)[..., -2:]
    assert (top2[..., 1] - top2[..., 0]).min() > 1e-5  # float32 rounding: ~1e-7 here
    return scores.argmax(-1)


def np_miou(preds, labels, all_classes: bool) -> tuple[float, np.ndarray]:
    cm = np.zeros((K, K), np.int64)
    for p, g in zip(preds, labels):
        keep = g != 255
        np.add.at(cm, (g[keep].astype(int), p[keep].astype(int)), 1)
    tp, gt, pred = np.diag(cm), cm.sum(1), cm.sum(0)
    union = gt + pred - tp
    iou = np.where(union > 0, tp / np.maximum(union, 1), 0.0)
    return 100 * (iou.mean() if all_classes else iou[gt > 0].mean()), 100 * iou


# ------------------------------------------------------------------------------------- tiny datasets
def put(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def image(seed, hw=FULL):
    # smooth random images: bilinear resizes then change predictions without ties everywhere
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (hw[0] // 8, hw[1] // 8, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse).resize(hw[::-1], Image.BICUBIC))


def label(seed, hw=FULL):
    rng = np.random.default_rng(100 + seed)
    lab = rng.choice(np.array([0, 2, 8, 10, 13, 255], np.uint8), size=hw)  # 5 classes and ignore
    return lab


@pytest.fixture
def datasets(tmp_path, monkeypatch):
    """ACDC fog val (2) + test (2), Dark Zurich test (2), Nighttime Driving (1), BDD100k-night (1)."""
    monkeypatch.setattr(rs, "ACDC_PER_CONDITION", {"fog": (0, 2, 2)})
    monkeypatch.setitem(rs.EXPECTED, "darkzurich", {"test": 2})
    monkeypatch.setitem(rs.EXPECTED, "nighttimedriving", {"test": 1})
    monkeypatch.setitem(rs.EXPECTED, "bdd100k-night", {"test": 1})
    acdc, dz, nd, bdd = (tmp_path / n for n in ("ACDC", "DarkZurich", "NighttimeDrivingTest", "bdd100k"))
    labelled = {}  # set name -> [(image, label)]
    for split in ("val", "test"):
        for i, frame in enumerate((41, 76)):
            stem = f"GOPR0475_frame_{frame:06d}"
            img = image(i + (10 if split == "test" else 0))
            put(acdc / f"rgb_anon/fog/{split}/GOPR0475/{stem}_rgb_anon.png", img)
            put(acdc / f"rgb_anon/fog/{split}_ref/GOPR0475/{stem}_rgb_ref_anon.png", image(50 + i))
            if split == "val":
                put(acdc / f"gt/fog/val/GOPR0475/{stem}_gt_labelTrainIds.png", label(i))
                labelled.setdefault("val", []).append((img, label(i)))
    for i, frame in enumerate((321, 322)):
        put(dz / f"rgb_anon/test/night/GOPR0356/GOPR0356_frame_{frame:06d}_rgb_anon.png", image(20 + i))
        put(dz / f"rgb_anon/test_ref/day/GOPR0356_ref/GOPR0356_frame_{frame:06d}_ref_rgb_anon.png", image(60))
    put(nd / "leftImg8bit/test/night/0_frame_0110_leftImg8bit.png", image(30))
    put(nd / "gtCoarse_daytime_trainvaltest/test/night/0_frame_0110_gtCoarse_labelTrainIds.png", label(30))
    labelled["nighttime"] = [(image(30), label(30))]
    bdd_img = image(40, BDD)
    (bdd / "images/10k/val").mkdir(parents=True)
    Image.fromarray(bdd_img).save(bdd / "images/10k/val/b1c66a42-6f7d68ca.jpg", quality=95)
    put(bdd / "labels/sem_seg/masks/val/b1c66a42-6f7d68ca.png", label(40, BDD))
    night_list = tmp_path / "night.txt"
    night_list.write_text("seg/images/val/b1c66a42-6f7d68ca.jpg\n")
    decoded = np.asarray(Image.open(bdd / "images/10k/val/b1c66a42-6f7d68ca.jpg").convert("RGB"))
    labelled["bdd"] = [(decoded, label(40, BDD))]
    return SimpleNamespace(acdc=acdc, dz=dz, nd=nd, bdd=bdd, night_list=night_list, labelled=labelled)


def config_for(ds, *, all_classes=True):
    c = base_config()
    c.model.num_classes = K
    c.data.class_names = tuple(rs.CITYSCAPES_CLASSES)
    c.eval.source, c.eval.root = "acdc", str(ds.acdc)
    c.eval.scale = (64, 32)  # keep-ratio (long, short): 64x128 and 48x96 images -> 32x64
    c.eval.label_bucket = 128  # one label canvas for every set: one compilation
    c.eval.batch_size = 2
    c.eval.num_pictures = 1
    c.eval.resize_labels = True  # refign's val stage for DAFormer
    c.eval.present_classes_only = not all_classes
    c.eval.extra_sets = ml_collections.ConfigDict(
        dict(
            nighttime=dict(source="nighttimedriving", root=str(ds.nd), split="test"),
            bdd=dict(
                source="bdd100k-night",
                root=str(ds.bdd),
                split="test",
                options=dict(night_list=str(ds.night_list)),
            ),
        )
    )
    return c


# ------------------------------------------------------------------------------------------------ tests
def test_over_present_classes_on_a_hand_example():
    # rows = ground truth, columns = prediction; class 2 only predicted, class 3 never seen at all
    cm = np.array([[3, 1, 1, 0], [0, 2, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    names = ["a", "b", "c", "d"]
    # IoU: a 3 / (5 + 3 - 3) = 0.6, b 2 / (2 + 3 - 2) = 2/3, c 0 / 1 = 0 (no ground truth), d union 0
    present = summarize_classes(cm, names, present_classes_only=True)
    assert present["mIoU"] == pytest.approx(100 * (0.6 + 2 / 3) / 2)
    assert present["per_class_iou"]["c"] is None and present["per_class_iou"]["d"] is None
    everything = summarize_classes(cm, names, present_classes_only=False)
    assert everything["mIoU"] == pytest.approx(100 * (0.6 + 2 / 3 + 0 + 0) / 4)
    assert everything["per_class_iou"] == pytest.approx({"a": 60.0, "b": 200 / 3, "c": 0.0, "d": 0.0})


@pytest.mark.parametrize("protocol", ["test", "val"])
def test_protocols_against_numpy(datasets, tmp_path, protocol):
    """test: labels at full resolution, logits x2 (and x1.5 for BDD) bilinear; val: labels nearest-resized
    to 32x64 with the image (PIL nearest halving = the odd rows and columns), logits at 32x64. The extra sets
    keep full-resolution labels under both."""
    trainer = StubTrainer(config_for(datasets))
    out = tmp_path / "out"
    results = evaluate_protocol(trainer, trainer.state, out, protocol, progress=False)
    assert list(results) == ["val", "bdd", "nighttime"]  # the main split, then the extra sets by name
    for name, pairs in datasets.labelled.items():
        if name == "val" and protocol == "val":
            preds = [np_predict(trainer, img, INPUT) for img, _ in pairs]
            labels = [lab[1::2, 1::2] for _, lab in pairs]
        else:
            preds = [np_predict(trainer, img, lab.shape) for img, lab in pairs]
            labels = [lab for _, lab in pairs]
        miou, iou = np_miou(preds, labels, all_classes=True)
        assert results[name]["mIoU"] == pytest.approx(miou, abs=1e-9), name
        assert list(results[name]["per_class_iou"].values()) == pytest.approx(list(iou), abs=1e-9)
        where = out if name == "val" else out / name
        assert json.loads((where / "metrics.json").read_text())["num_images"] == len(pairs)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["protocol"] == protocol and set(summary["sets"]) == {"val", "nighttime", "bdd"}
    assert summary["sets"]["bdd"]["mIoU"] == pytest.approx(results["bdd"]["mIoU"])


def test_present_classes_only_and_test_split(datasets, tmp_path):
    """present_classes_only averages over the 5 labelled classes only; eval.test_split picks the split of
    the test protocol (here val again, named explicitly) with full-resolution labels."""
    config = config_for(datasets, all_classes=False)
    config.eval.extra_sets = ml_collections.ConfigDict()
    config.eval.split, config.eval.test_split = "test", "val"  # val protocol would need labels on test
    trainer = StubTrainer(config)
    results = evaluate_protocol(trainer, trainer.state, tmp_path / "o", "test", progress=False)
    pairs = datasets.labelled["val"]
    preds = [np_predict(trainer, img, lab.shape) for img, lab in pairs]
    miou, _ = np_miou(preds, [lab for _, lab in pairs], all_classes=False)
    assert list(results) == ["val"] and results["val"]["mIoU"] == pytest.approx(miou, abs=1e-9)
    assert sum(v is not None for v in results["val"]["per_class_iou"].values()) == 5
    assert not (tmp_path / "o" / "summary.json").exists()


def test_predict_writes_refign_files(datasets, tmp_path):
    """Dark Zurich test: preds/DarkZurich/<image name> with train ids = argmax of the x2 upsampled logits at
    the image's 64x128, color_preds/DarkZurich/<image name> a palette PNG with the Cityscapes colours."""
    config = config_for(datasets)
    config.eval.source, config.eval.root = "darkzurich", str(datasets.dz)
    trainer = StubTrainer(config)
    record = predict_split(trainer, trainer.state, tmp_path / "pred", progress=False)
    assert record["num_images"] == 2 and record["dataset"] == "DarkZurich"
    names = [f"GOPR0356_frame_{f:06d}_rgb_anon.png" for f in (321, 322)]
    assert sorted(p.name for p in (tmp_path / "pred").rglob("*.png")) == sorted(names * 2)
    for i, name in enumerate(names):
        ids = Image.open(tmp_path / "pred/preds/DarkZurich" / name)
        assert ids.mode == "L" and ids.size == (128, 64)
        expected = np_predict(trainer, image(20 + i), FULL)
        np.testing.assert_array_equal(np.asarray(ids), expected)
        colour = Image.open(tmp_path / "pred/color_preds/DarkZurich" / name)
        assert colour.mode == "P"
        np.testing.assert_array_equal(np.asarray(colour), expected)
        np.testing.assert_array_equal(
            np.asarray(colour.convert("RGB")), np.array(CITYSCAPES_COLOURS, np.uint8)[expected]
        )
    # Dark Zurich's server zip: three top-level folders, flat, train ids twice and a uint16 confidence
    with zipfile.ZipFile(tmp_path / "pred" / "DarkZurich_test_submission.zip") as z:
        folders = ("labelTrainIds", "labelTrainIds_invalid", "confidence")
        assert sorted(z.namelist()) == sorted(f"{d}/{n}" for d in folders for n in names)
        for i, name in enumerate(names):
            for d in folders[:2]:
                ids = np.asarray(Image.open(io.BytesIO(z.read(f"{d}/{name}"))))
                np.testing.assert_array_equal(ids, np_predict(trainer, image(20 + i), FULL))
            confidence = Image.open(io.BytesIO(z.read(f"confidence/{name}")))
            assert confidence.size == (128, 64) and (np.asarray(confidence) == 65535).all()


def test_predict_refuses_the_dataset_folder_and_clashing_names(datasets, tmp_path):
    config = config_for(datasets)
    trainer = StubTrainer(config)
    with pytest.raises(ValueError, match="inside the dataset folder"):
        predict_split(trainer, trainer.state, datasets.acdc / "preds", progress=False)
    # ACDC test of two conditions with the same recording and frame: refign would overwrite one file
    for cond in ("fog", "rain"):
        put(datasets.acdc / f"rgb_anon/{cond}/test/GOPR0475/GOPR0475_frame_000001_rgb_anon.png", image(1))
        put(
            datasets.acdc / f"rgb_anon/{cond}/test_ref/GOPR0475/GOPR0475_frame_000001_rgb_ref_anon.png",
            image(2),
        )
    rs.ACDC_PER_CONDITION["fog"] = (0, 2, 3)
    rs.ACDC_PER_CONDITION["rain"] = (0, 0, 1)
    with pytest.raises(DataError, match=r"would both be written as GOPR0475_frame_000001_rgb_anon\.png"):
        predict_split(trainer, trainer.state, tmp_path / "p", progress=False)
