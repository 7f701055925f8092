"""Shared test steps: a checkpoint save + restore as a resumed run does it, restoring a run's saved state,
and the scripts' main() run in-process with --config overrides."""

import importlib.util
import sys
from pathlib import Path

from absl import flags

from lqseg_jax.data_pipelines.streams import train_stream
from lqseg_jax.train.checkpoint import Checkpointer
from lqseg_jax.train.trainer import Trainer


def save_and_restore(config, state, data_iter, step: int, workdir: Path):
    """Saves `state` and `data_iter` as checkpoint `step` in `workdir`, then restores the newest intact
    checkpoint as a resumed run does: a new Trainer and a new training stream, nothing carried over.
    Returns (trainer, restored state, restored iterator)."""
    ckpt = Checkpointer(workdir, keep=2, async_save=False)
    ckpt.save(step, state, data_iter, config)
    ckpt.wait()
    ckpt.close()
    trainer = Trainer(config)
    restored_iter = iter(train_stream(config).dataset)
    reader = Checkpointer(workdir, keep=2, async_save=False)
    got, restored, iter_restored = reader.restore_latest_intact(trainer.abstract_state, config, restored_iter)
    reader.close()
    assert got == step and iter_restored
    return trainer, restored, restored_iter


def restore_state(workdir: Path, step: int, abstract_state):
    """The train state that a run in `workdir` saved at `step`."""
    ckpt = Checkpointer(workdir, async_save=False)
    state, _ = ckpt.restore(step, abstract_state)
    ckpt.close()
    return state


REPO = Path(__file__).resolve().parents[1]


def load_script(name: str):
    """scripts/NAME.py as a module (not run: its `if __name__ == "__main__"` block stays idle)."""
    spec = importlib.util.spec_from_file_location(f"{name}_script", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(repo: Path, name: str, argv: list[str]) -> None:
    """scripts/NAME.py's main() with `argv` (also in sys.argv, where the config flag reads its overrides);
    its absl flags are removed afterwards, so the next script can define its own."""
    before, saved_argv = set(flags.FLAGS), sys.argv
    sys.argv = [f"{name}.py", *argv]
    spec = importlib.util.spec_from_file_location(f"{name}_script", repo / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        flags.FLAGS(sys.argv)
        module.main([])
    finally:
        sys.argv = saved_argv
        flags.FLAGS.unparse_flags()
        for flag in set(flags.FLAGS) - before:
            delattr(flags.FLAGS, flag)


def script_args(config: str, workdir: Path, fields: dict) -> list[str]:
    """--config=CONFIG --workdir=WORKDIR and one --config.KEY=VALUE per field."""
    return [f"--config={config}", f"--workdir={workdir}", *(f"--config.{k}={v}" for k, v in fields.items())]
