"""The UDA system without Refign (configs/refign.py:tiny,no_refign with the stand-in networks of test_uda_step,
so the test stays small, and the system's own random draws) trains on the synthetic paired data through the
Trainer and the UDA pipeline, and a stop + checkpoint + resume replays the same steps bit for bit, the EMA
teacher, its BN statistics and the step count included."""

import jax
import numpy as np
import pytest
from flax import nnx

from lqseg_jax import systems
from lqseg_jax.data_pipelines import synthetic_adverse
from lqseg_jax.data_pipelines.streams import train_stream
from lqseg_jax.systems.uda import UDASystem
from lqseg_jax.train.config import load_config
from lqseg_jax.train.trainer import Trainer
from tests.helpers import save_and_restore
from tests.systems.test_uda_step import StandInSystem


class StandInRandomDraws(StandInSystem):
    draw = UDASystem.draw


@pytest.fixture
def config(tmp_path_factory, monkeypatch):
    monkeypatch.setitem(systems.SYSTEMS, "uda_standin_random", f"{__name__}:StandInRandomDraws")
    root = synthetic_adverse.write_dataset(
        tmp_path_factory.mktemp("synthetic_adverse"), num_source=(8, 2), num_target=(4, 2),
        conditions=("night",), height=40, width=48, progress=False,
    )  # fmt: skip
    c = load_config("configs/refign.py:tiny,no_refign")
    c.system = "uda_standin_random"
    c.data.root, c.data.target_root = str(root / "cityscapes"), str(root / "acdc")
    c.data.crop = (32, 32)
    c.data.num_threads = 1
    c.uda.pseudo_threshold = 0.15  # a random-init teacher is never 0.968-confident
    c.optimizer.schedule.warmup_steps = 0
    c.checkpoint.async_save = False
    return c


def _steps(trainer, state, it, start, n):
    metrics = None
    for t in range(start, start + n):
        state, metrics = trainer.train_step(state, trainer.device_batch(next(it)), trainer.step_rng(t))
    return state, jax.device_get(metrics)


def _leaves(state):
    out = []
    for x in jax.tree.leaves((state.params, state.rest, state.opt_state)):
        out.append(
            np.asarray(jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x)
        )
    return out


def test_uda_trains_and_resumes_bit_identically(config, tmp_path):
    trainer = Trainer(config)
    init = trainer.init_state()
    model0 = nnx.merge(trainer.graphdef, init.params, init.rest)
    teacher0 = np.asarray(model0.m_head.conv_seg.kernel[...]).copy()
    straight, metrics = _steps(trainer, trainer.init_state(), iter(train_stream(config).dataset), 0, 4)
    assert all(np.isfinite(v) for v in metrics.values()), metrics
    assert metrics["loss_fd"] > 0 and metrics["loss_mix"] > 0

    it = iter(train_stream(config).dataset)
    half, _ = _steps(trainer, trainer.init_state(), it, 0, 2)
    trainer2, restored, it2 = save_and_restore(config, half, it, 2, tmp_path)
    resumed, _ = _steps(trainer2, restored, it2, 2, 2)
    for a, b in zip(_leaves(straight), _leaves(resumed), strict=True):
        np.testing.assert_array_equal(a, b)
    model = nnx.merge(trainer.graphdef, straight.params, straight.rest)
    assert int(model.global_step.get_value()) == 4
    assert not np.array_equal(np.asarray(model.m_head.conv_seg.kernel[...]), teacher0)  # the teacher moved
