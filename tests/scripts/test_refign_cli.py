"""configs/refign.py:tiny through the scripts (their main() in-process, shrunk by --config overrides): the
synthetic paired data is written on first use, scripts/train.py trains UDA, stops at stop_at_step and
resumes (bit-identical resume through the Trainer: tests/systems/test_uda_train.py), and scripts/eval.py evaluates the adverse (ACDC-layout)
val split. Also: each training stream's `index_per_step` re-derives the iterator position of a resumed run."""

import json
from pathlib import Path

import numpy as np
import pytest

from lqseg_jax.data_pipelines import synthetic_adverse
from lqseg_jax.data_pipelines.streams import train_stream
from lqseg_jax.train.config import load_config
from tests.helpers import run_script, script_args

pytestmark = pytest.mark.usefixtures("fast_compile")

CONFIG = "configs/refign.py:tiny"


def overrides(data: Path) -> dict:
    return {
        "data.root": str(data / "cityscapes"),
        "data.target_root": str(data / "acdc"),
        "eval.root": str(data / "acdc"),
        "data.synthetic.num_train": 8,
        "data.synthetic.num_val": 2,
        "data.synthetic.num_target_train": 4,
        "data.synthetic.num_target_val": 2,  # 2 per condition: 6 adverse val images
        "data.synthetic.height": 40,
        "data.synthetic.width": 48,
        "data.crop": (32, 32),
        "data.num_threads": 1,
        "model.head.embed_dims": 16,
        "model.head.channels": 16,
        "batch_size": 8,
        "eval.batch_size": 8,
        "eval.num_pictures": 6,
        "total_steps": 4,
        "log_every": 1,
        "checkpoint.every": 100,
        "checkpoint.async_save": False,
        "uda.pseudo_threshold": 0.15,  # a random-init teacher is never 0.968-confident
    }


def args(repo: Path, data: Path, workdir: Path, **extra) -> list[str]:
    return script_args(f"{repo / 'configs' / 'refign.py'}:tiny", workdir, {**overrides(data), **extra})


@pytest.mark.slow  # ~4 min on the loaded 2-core machine: the UDA step (3 MiT-B0) compiles once
def test_refign_tiny_trains_resumes_and_evaluates_the_adverse_split(repo, tmp_path, capsys):
    data = tmp_path / "synthetic_adverse"
    stopped = tmp_path / "stopped"
    run_script(repo, "train", args(repo, data, stopped, stop_at_step=2))
    assert (data / "acdc" / "rgb_anon" / "fog" / "val").is_dir()  # ensure_data wrote the val splits too
    assert not (stopped / "checkpoints" / "4").exists()
    capsys.readouterr()
    run_script(repo, "train", args(repo, data, stopped))
    assert "Resumed from step 2" in capsys.readouterr().out
    lines = [json.loads(s) for s in (stopped / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3, 4]
    assert all(np.isfinite(m["loss_mix"]) and m["loss_src"] > 0 for m in lines)

    run_script(repo, "eval", args(repo, data, stopped))
    printed = capsys.readouterr().out
    result = json.loads((stopped / "eval" / "metrics.json").read_text())
    val = sorted(p.name for p in (data / "acdc" / "rgb_anon").glob("*/val/*/*_rgb_anon.png"))
    assert len(val) == 6 and result["num_images"] == 6 and result["step"] == 4
    assert result["source"].startswith(f"acdc {data / 'acdc'}")
    assert 0.0 <= result["mIoU"] <= 100.0 and len(result["per_class_iou"]) == 10
    assert f"mIoU {result['mIoU']:.2f} on 6 images" in printed
    pictures = sorted(p.name for p in (stopped / "eval" / "pictures").glob("*.png"))
    assert pictures == val  # the adverse frames, not the source's


@pytest.mark.parametrize("pipeline", ["supervised", "uda"])
def test_index_per_step_rederives_the_stream_position(pipeline, repo, tmp_path, synthetic_root):
    if pipeline == "uda":
        data = synthetic_adverse.write_dataset(
            tmp_path, num_source=(8, 0), num_target=(4, 0), conditions=("night",), height=40, width=48,
            progress=False,
        )  # fmt: skip
        config = load_config(str(repo / CONFIG), **{**overrides(data), "batch_size": 4})
    else:
        config = load_config(
            str(repo / "configs" / "daformer.py:tiny"),
            **{"data.root": str(synthetic_root), "data.num_threads": 1, "batch_size": 4},
        )
    stream = train_stream(config, process_index=1, process_count=2)
    it = iter(stream.dataset)
    straight = [next(it) for _ in range(3)][2]
    moved = iter(train_stream(config, process_index=1, process_count=2).dataset)
    moved.set_state({"next_index": 2 * stream.index_per_step})
    for key, value in next(moved).items():
        np.testing.assert_array_equal(value, straight[key], err_msg=key)
