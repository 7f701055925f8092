"""The training loop as 2 processes (gloo CPU collectives, 2 devices each) against 1 process on 4 devices,
and a 2-process checkpoint resumed in 1 process."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

TRAIN = "scripts/train.py"


def common_args(root, workdir, **overrides):
    args = [
        sys.executable,
        TRAIN,
        "--config",
        "configs/daformer.py:tiny",
        "--workdir",
        str(workdir),
        f"--config.data.root={root}",
        "--config.data.synthetic.enabled=False",
        "--config.data.crop=(64,64)",
        "--config.batch_size=4",
        "--config.total_steps=4",
        "--config.log_every=1",
        "--config.eval.batch_size=2",
    ]
    return args + [f"--config.{k}={v}" for k, v in overrides.items()]


def env(devices, **extra):
    """The environment of a script run on `devices` CPU devices. It shares the test session's persistent
    compilation cache (tests/conftest.py), so runs that compile the same programs (a run and its resume,
    the same config in another test) compile them once."""
    e = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        JAX_NUM_CPU_DEVICES=str(devices),
        PYTHONUNBUFFERED="1",
        JAX_COMPILATION_CACHE_DIR=os.environ["LQSEG_TEST_JAX_CACHE"],
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5",
        **extra,
    )
    e.pop("XLA_FLAGS", None)
    return e


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def losses(workdir):
    return {
        r["step"]: r["loss"] for r in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())
    }


def run(cmd, e, timeout=900):
    p = subprocess.run(cmd, env=e, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    return p.stdout


@pytest.mark.slow
def test_two_processes_match_one(tmp_path, synthetic_root, repo):
    two, one = tmp_path / "two", tmp_path / "one"
    port = free_port()
    procs = [
        subprocess.Popen(
            common_args(synthetic_root, two, stop_at_step=3),
            cwd=repo,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env(
                2, LQSEG_COORDINATOR=f"127.0.0.1:{port}", LQSEG_NUM_PROCESSES="2", LQSEG_PROCESS_ID=str(i)
            ),
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, out[-3000:] + err[-5000:]
    # Both processes wrote their own iterator state into the one checkpoint.
    files = sorted(f.name for f in (two / "checkpoints" / "3" / "data_iter").glob("process_*"))
    assert files == ["process_0-of-2.json", "process_1-of-2.json"], files

    run(common_args(synthetic_root, one), env(4))
    ref = losses(one)
    got = losses(two)
    assert sorted(got) == [1, 2, 3]
    np.testing.assert_allclose([got[s] for s in (1, 2, 3)], [ref[s] for s in (1, 2, 3)], rtol=1e-5)

    # The 2-process checkpoint restores in 1 process and continues the same trajectory.
    out = run(common_args(synthetic_root, two), env(4))
    assert "Resumed from step 3" in out
    np.testing.assert_allclose(losses(two)[4], ref[4], rtol=1e-5)
