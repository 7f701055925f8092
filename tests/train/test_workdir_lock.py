"""One run per workdir: a second run stops at once naming the workdir and the holder; the lock goes with
its holder's process (stale locks cannot happen); metrics.jsonl is cut back to the resumed step."""

import json
import os
import subprocess
import sys

import pytest

from lqseg_jax.train.loop import train, truncate_metrics
from lqseg_jax.train.workdir_lock import WorkdirBusyError, WorkdirLock
from tests.train.test_trainer import tiny

HOLD = """
import fcntl, json, os, socket, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
os.write(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": "now"}).encode())
print("held", flush=True)
time.sleep(600)
"""


def test_second_run_fails_fast_and_leaves_checkpoints_alone(tmp_path):
    step = tmp_path / "checkpoints" / "4" / "state"
    step.mkdir(parents=True)
    (step / "data").write_bytes(b"first run's parameters")
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path / ".lock")], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(
            WorkdirBusyError, match=rf"workdir {tmp_path} is in use by pid {holder.pid} on host"
        ):
            train(tiny(), tmp_path)
        assert (step / "data").read_bytes() == b"first run's parameters"
        assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["4"]
    finally:
        holder.kill()
        holder.wait()
    with WorkdirLock(tmp_path):  # the holder is gone (killed): its lock went with it
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
        with pytest.raises(WorkdirBusyError, match=rf"in use by pid {os.getpid()}"):
            WorkdirLock(tmp_path).__enter__()
    with WorkdirLock(tmp_path):  # released on exit
        pass


def test_metrics_are_cut_back_to_the_resumed_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": 1.0}) for s in (1, 2, 3, 4, 4)] + ['{"step": 5, "lo']
    path.write_text("\n".join(lines))
    truncate_metrics(path, 3)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]
    truncate_metrics(path, 0)
    assert path.read_text() == ""


def test_leftover_orbax_temporaries_are_removed(tmp_path):
    from lqseg_jax.train.checkpoint import Checkpointer

    leftover = tmp_path / "checkpoints" / "4.orbax-checkpoint-tmp-1733259"
    (leftover / "state").mkdir(parents=True)
    (tmp_path / "checkpoints" / "2").mkdir()
    ckpt = Checkpointer(tmp_path, async_save=False)
    assert ckpt.leftover_temporaries() == [leftover]
    ckpt.remove_leftover_temporaries()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["2"]
    ckpt.close()
