"""scripts/train.py stopped by SIGTERM keeps a checkpoint and resumes; scripts/eval.py writes its results."""

import json
import signal
import subprocess
import sys
import time

import pytest

from tests.train.test_multiprocess import common_args, env, run


@pytest.mark.slow
def test_sigterm_saves_then_resume_then_eval(tmp_path, synthetic_root, repo):
    workdir = tmp_path / "run"
    args = common_args(synthetic_root, workdir, total_steps=500, **{"checkpoint.every": 1000})
    proc = subprocess.Popen(
        args, cwd=repo, env=env(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    metrics = workdir / "metrics.jsonl"
    deadline = time.time() + 600
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        assert proc.poll() is None, proc.communicate()[1][-5000:]
        assert time.time() < deadline, "training produced no metrics in time"
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-5000:]
    assert "Stopped at step" in out
    stopped = int(out.split("Stopped at step ")[1].split(";")[0])
    assert (workdir / "checkpoints" / str(stopped)).is_dir()  # the checkpoint survived the signal

    p = subprocess.run(
        common_args(synthetic_root, workdir, total_steps=500, stop_at_step=stopped + 1),
        cwd=repo, env=env(1), capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-5000:]
    assert f"Resumed from step {stopped}" in p.stdout
    # the console: lqseg-jax's INFO lines (here the config file of the run), no third-party INFO (orbax
    # logs each save and restore at INFO through absl)
    info = [line.split(" INFO ", 1)[1] for line in p.stderr.splitlines() if " INFO " in line]
    assert f"lqseg_jax.train.loop: config: {workdir / f'config.{stopped}.json'}" in info, p.stderr[-3000:]
    assert all(line.startswith("lqseg_jax.") for line in info), info
    first, resumed = (
        json.loads((workdir / n).read_text()) for n in ("config.json", f"config.{stopped}.json")
    )
    assert (first["stop_at_step"], resumed["stop_at_step"]) == (0, stopped + 1)  # the resume changed it

    eval_args = [sys.executable, "scripts/eval.py", *args[2:]]
    out = run(eval_args, env(1))
    result = json.loads((workdir / "eval" / "metrics.json").read_text())
    assert {"mIoU", "per_class_iou", "num_images"} <= set(result)
    assert result["num_images"] == 6 and result["step"] == stopped + 1
    assert len(result["per_class_iou"]) == 10
    assert "mIoU" in out and "pictures" in out
    pictures = sorted((workdir / "eval" / "pictures").glob("*.png"))
    assert len(pictures) == 6
