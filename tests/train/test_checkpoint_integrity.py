"""Checkpoint integrity: digests written after each save, verified at restore with all-finite floats;
training resumes from the newest intact checkpoint, evaluation refuses a damaged one."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lqseg_jax.eval.evaluate import restore_workdir
from lqseg_jax.train.checkpoint import Checkpointer, DamagedCheckpointError, verify_digest, write_digest
from lqseg_jax.train.loop import train
from lqseg_jax.train.trainer import Trainer
from tests.train.test_trainer import tiny

pytestmark = pytest.mark.usefixtures("fast_compile")


def test_digest_names_the_changed_missing_or_truncated_file(tmp_path):
    step = tmp_path / "7"
    (step / "state" / "d").mkdir(parents=True)
    (step / "state" / "d" / "a").write_bytes(bytes(range(256)) * 8)
    (step / "config").mkdir()
    (step / "config" / "c.json").write_text("{}")
    assert verify_digest(step) is False  # no digest yet: nothing to verify
    write_digest(step)
    assert verify_digest(step) is True
    data = bytearray((step / "state" / "d" / "a").read_bytes())
    data[100:104] = b"\xff\xff\xff\xff"
    (step / "state" / "d" / "a").write_bytes(bytes(data))
    with pytest.raises(
        DamagedCheckpointError, match=rf"{step} is damaged: the content of {step}/state/d/a changed"
    ):
        verify_digest(step)
    (step / "state" / "d" / "a").write_bytes(bytes(data[:1000]))
    with pytest.raises(DamagedCheckpointError, match=r"state/d/a has 1000 bytes, 2048 were saved"):
        verify_digest(step)
    (step / "state" / "d" / "a").unlink()
    with pytest.raises(DamagedCheckpointError, match=r"file .*state/d/a is missing"):
        verify_digest(step)


def flip_bytes_in_largest_param_file(step_dir):
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file()]
    target = max(files, key=lambda p: p.stat().st_size)
    data = bytearray(target.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 4096] = bytes(b ^ 0xFF for b in data[mid : mid + 4096])
    target.write_bytes(bytes(data))
    return target


def test_flipped_bytes_are_detected_at_eval_and_resume_falls_back(tmp_path, synthetic_root, capsys):
    cfg = tiny(synthetic_root, total_steps=4, log_every=1, batch_size=8, **{"checkpoint.every": 2})
    trainer = Trainer(cfg)
    state = trainer.init_state()
    ckpt = Checkpointer(tmp_path, async_save=False)
    for step in (2, 4):  # as a run saving every 2 steps would (iterator position re-derived on resume)
        ckpt.save(step, state.replace(step=jnp.asarray(step, jnp.int32)), None, cfg)
    ckpt.wait()
    ckpt.close()
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in (1, 2, 3, 4)))
    ckpts = tmp_path / "checkpoints"
    assert all((ckpts / s / "digest.json").is_file() for s in ("2", "4"))
    flip_bytes_in_largest_param_file(ckpts / "4")

    # evaluation refuses the damaged latest checkpoint, names it and the other step; --step 2 works
    with pytest.raises(
        DamagedCheckpointError, match=rf"checkpoint {ckpts}/4 is damaged(?s:.*)--step N \(saved: 2\)"
    ):
        restore_workdir(cfg, tmp_path)
    _, state_2 = restore_workdir(cfg, tmp_path, step=2)
    assert int(state_2.step) == 2

    # resuming falls back to step 2, sets 4 aside, trains 3 and 4 again
    capsys.readouterr()
    train(cfg, tmp_path)
    out = capsys.readouterr().out
    assert "4 is damaged" in out and "Resuming from step 2, the newest intact checkpoint" in out
    assert (tmp_path / "damaged_checkpoints" / "4").is_dir()
    assert int(restore_workdir(cfg, tmp_path)[1].step) == 4  # the new step 4 is intact
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # each step once after the resume

    # a checkpoint whose digest is intact but whose floats are not finite is damaged too
    poisoned = state_2.replace(params=jax.tree.map(lambda x: x * np.float32(np.nan), state_2.params))
    other = Checkpointer(tmp_path / "poisoned", async_save=False)
    other.save(2, poisoned, None, cfg)
    other.wait()
    with pytest.raises(
        DamagedCheckpointError, match=r"poisoned/checkpoints/2 is damaged: \d+ restored array"
    ):
        other.restore(2, trainer.abstract_state)
    other.close()
