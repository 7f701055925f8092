"""A tiny UAWarpC training run (configs/uawarpc.py:tiny) on the synthetic paired adverse data: the held-out
AEPE (synthetic val pairs, true flows) falls well below the untrained network's, the loop's periodic
evaluation logs the matching metrics, and a run stopped at step k and resumed ends bit-identical to an
uninterrupted one. Two compiles: the train step (the resumed run gets it from the session's persistent
cache) and the eval-mode forward. Compiled with XLA's full optimisation (not the fast_compile fixture): 16
steps and 27 evaluated pairs run ~10x faster for ~25 % more compile time."""

import json

import jax
import numpy as np
import pytest

from lqseg_jax.eval.matching import evaluate_state
from lqseg_jax.train.config import load_config
from lqseg_jax.train.loop import train
from lqseg_jax.train.trainer import Trainer
from tests.helpers import restore_state

STEPS, STOP = 8, 4


def tiny(root, **overrides):
    cfg = load_config(
        "configs/uawarpc.py:tiny",
        **{
            "total_steps": STEPS,
            "log_every": 1,
            "eval_every": STOP,
            "checkpoint.every": 100,
            "data.root": str(root),
            "eval.root": str(root),
            "data.synthetic.num_target_train": 8,
            "data.synthetic.num_target_val": 3,
            **overrides,
        },
    )
    return cfg


@pytest.mark.slow
def test_tiny_training_lowers_held_out_aepe_and_resumes_bit_identically(tmp_path, capsys):
    root = tmp_path / "syn"
    straight = train(tiny(root), tmp_path / "straight")
    first = train(tiny(root, stop_at_step=STOP), tmp_path / "resumed")
    assert first["step"] == STOP
    resumed = train(tiny(root), tmp_path / "resumed")
    assert f"Resumed from step {STOP}" in capsys.readouterr().out
    assert resumed["step"] == straight["step"] == STEPS
    assert resumed["loss"] == straight["loss"]

    trainer = Trainer(tiny(root))
    state = restore_state(tmp_path / "straight", STEPS, trainer.abstract_state)
    other = restore_state(tmp_path / "resumed", STEPS, trainer.abstract_state)
    for a, b in zip(jax.tree.leaves(jax.device_get(state)), jax.tree.leaves(jax.device_get(other))):
        np.testing.assert_array_equal(a, b)

    # the loop's evaluation every eval_every steps: matching metrics on the val pairs at step STOP
    logged = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    at_stop = [m for m in logged if "eval/AEPE" in m]
    assert [m["step"] for m in at_stop] == [STOP]
    assert {"eval/PCK_1", "eval/PCK_5", "eval/AUSE"} <= set(at_stop[0])

    before = evaluate_state(trainer, trainer.init_state())  # the untrained network (seed 0), step 0
    after = evaluate_state(trainer, state)
    assert before["num_images"] == after["num_images"] == 9
    # measured (seed 0, 8 steps): AEPE 27.66 -> 18.37 px, PCK-5 1.4 % -> 4.3 %
    assert np.isfinite(after["AEPE"]) and after["AEPE"] < 0.75 * before["AEPE"], (before, after)
    assert after["PCK_5"] > 2 * before["PCK_5"], (before, after)
