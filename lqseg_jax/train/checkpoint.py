"""orbax checkpoints of {train state, grain iterator state, config JSON}; atomic, resumable, multi-process.

Layout: WORKDIR/checkpoints/<step>/{state, data_iter, config}. orbax writes each step into a temporary
folder and renames it when complete, so a crash mid-save leaves the previous checkpoint intact. Every
process takes part in save and restore; the grain iterator state is one JSON file per process.
Restoring onto another process count (a 2-process checkpoint in 1 process, say) re-derives each
process's iterator position from the step: the pipeline's order depends only on (seed, global index).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp

from ..convert.common import CheckpointError

log = logging.getLogger(__name__)

# Config sections that must agree for a checkpoint to fit the model built from the current config.
MODEL_KEYS = ("system", "model")


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def config_mismatch(saved: dict, current: dict) -> list[str]:
    """Human-readable differences between the model sections of two config dicts."""
    a = _flatten({k: saved.get(k) for k in MODEL_KEYS})
    b = _flatten({k: current.get(k) for k in MODEL_KEYS})
    diffs = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key, "<absent>"), b.get(key, "<absent>")
        if json.dumps(va, default=str) != json.dumps(vb, default=str):
            diffs.append(f"{key}: checkpoint has {va!r}, config has {vb!r}")
    return diffs


def config_to_dict(config: ml_collections.ConfigDict) -> dict:
    return json.loads(config.to_json_best_effort())


class Checkpointer:
    def __init__(self, workdir: str | Path, *, keep: int = 3, async_save: bool = True):
        self.directory = Path(workdir).absolute() / "checkpoints"
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save
        )
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "data_iter": grain.checkpoint.CheckpointHandler(),
                "config": ocp.JsonCheckpointHandler(),
            },
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_iter: Any, config: ml_collections.ConfigDict) -> None:
        args = {"state": ocp.args.StandardSave(state), "config": ocp.args.JsonSave(config_to_dict(config))}
        if data_iter is not None:
            args["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
        self.manager.save(step, args=ocp.args.Composite(**args), force=True)

    def saved_config(self, step: int) -> dict:
        restored = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        return restored["config"]

    def check_config(self, step: int, config: ml_collections.ConfigDict) -> None:
        diffs = config_mismatch(self.saved_config(step), config_to_dict(config))
        if diffs:
            raise CheckpointError(
                f"checkpoint {self.directory / str(step)} was written for a different model config:\n  "
                + "\n  ".join(diffs)
                + "\n(use a new --workdir, or the config the checkpoint was trained with)"
            )

    def restore(self, step: int, abstract_state: Any, data_iter: Any | None = None) -> tuple[Any, bool]:
        """Restores the state onto `abstract_state` (ShapeDtypeStructs with shardings) and, when this
        process layout saved one, the iterator state in place. Returns (state, iterator_restored)."""
        args = {"state": ocp.args.StandardRestore(abstract_state)}
        index, count = jax.process_index(), jax.process_count()
        iter_file = self.directory / str(step) / "data_iter" / f"process_{index}-of-{count}.json"
        restore_iter = data_iter is not None and iter_file.exists()
        if restore_iter:
            args["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**args))
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(
                f"checkpoint {self.directory / str(step)} does not fit the current train state: {e}"
            ) from e
        return restored["state"], restore_iter

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
