"""configs/hrda.py:tiny through the scripts (their main() in-process, shrunk by --config overrides): the
synthetic paired data is written on first use, scripts/train.py trains HRDA UDA for 2 steps and evaluates
the adverse (ACDC-layout) val split after step 1 with sliding windows smaller than the images, and
scripts/eval.py on the step-1 checkpoint gives the same mIoU.

The same command at full tiny size (README):
    python scripts/train.py --config configs/hrda.py:tiny --workdir runs/hrda_tiny
    python scripts/eval.py --config configs/hrda.py:tiny --workdir runs/hrda_tiny
"""

import json

import numpy as np
import pytest

from lqseg_jax.eval import inference
from tests.helpers import run_script, script_args

pytestmark = pytest.mark.usefixtures("fast_compile")

HEIGHT, WIDTH = 64, 96  # synthetic images; training crops and evaluation windows are 64 x 64
WINDOW, STRIDE = 64, 32  # windows at x = 0 and 32 of each 64 x 96 image


def overrides(data) -> dict:
    return {
        "data.root": str(data / "cityscapes"),
        "data.target_root": str(data / "acdc"),
        "eval.root": str(data / "acdc"),
        "data.synthetic.num_train": 8,
        "data.synthetic.num_val": 1,
        "data.synthetic.num_target_train": 3,
        "data.synthetic.num_target_val": 1,  # 1 per condition: 3 adverse val images
        "data.synthetic.height": HEIGHT,
        "data.synthetic.width": WIDTH,
        "data.crop": (WINDOW, WINDOW),  # HRDA: 32 x 32 context and detail crops (MiT-B0 needs >= 29)
        "data.num_threads": 1,
        "model.head.embed_dims": 16,
        "model.head.channels": 16,
        "model.hrda.scale_attention.channels": 16,
        "eval.crop": (WINDOW, WINDOW),
        "eval.stride": (STRIDE, STRIDE),
        "eval.batch_size": 8,
        "eval.num_pictures": 0,
        "batch_size": 8,
        "total_steps": 2,
        "eval_every": 1,  # the loop evaluates after step 1 (not after the last step)
        "log_every": 1,
        "checkpoint.every": 1,
        "checkpoint.async_save": False,
    }


def args(repo, data, workdir, **extra) -> list[str]:
    return script_args(f"{repo / 'configs' / 'hrda.py'}:tiny", workdir, {**overrides(data), **extra})


@pytest.mark.slow  # the HRDA UDA step (3 MiT-B0, teacher with 9 detail crops) and two evaluations compile
def test_hrda_tiny_trains_evaluates_with_sliding_windows_and_eval_script_agrees(
    repo, tmp_path, capsys, monkeypatch
):
    windows = []  # (image shape, window shape) of every window the evaluations predicted
    slide = inference.slide_inference

    def spy(predict_fn, images, crop, stride):
        def predict(window):
            windows.append((tuple(images.shape[1:3]), tuple(window.shape[1:3])))
            return predict_fn(window)

        return slide(predict, images, crop, stride)

    monkeypatch.setattr(inference, "slide_inference", spy)
    data, workdir = tmp_path / "synthetic_adverse", tmp_path / "run"

    run_script(repo, "train", args(repo, data, workdir))
    lines = [json.loads(s) for s in (workdir / "metrics.jsonl").read_text().splitlines()]
    train_lines = [m for m in lines if "loss" in m]
    assert [m["step"] for m in train_lines] == [1, 2]
    assert all(np.isfinite(m["loss_mix"]) and m["loss_src"] > 0 for m in train_lines)
    (logged,) = [m for m in lines if "eval/mIoU" in m]
    assert logged["step"] == 1 and 0.0 <= logged["eval/mIoU"] <= 100.0
    # the training-time evaluation slid 2 windows of 64 x 64 over each 64 x 96 image (traced once)
    assert windows == [((HEIGHT, WIDTH), (WINDOW, WINDOW))] * 2

    capsys.readouterr()
    run_script(repo, "eval", [*args(repo, data, workdir), "--step=1"])
    printed = capsys.readouterr().out
    assert windows[2:] == [((HEIGHT, WIDTH), (WINDOW, WINDOW))] * 2  # the script's evaluation slid too
    result = json.loads((workdir / "eval" / "metrics.json").read_text())
    assert result["num_images"] == 3 and result["step"] == 1
    assert result["mIoU"] == pytest.approx(logged["eval/mIoU"], abs=1e-9)
    assert f"mIoU {result['mIoU']:.2f} on 3 images" in printed
