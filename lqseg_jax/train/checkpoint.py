"""orbax checkpoints of {train state, grain iterator state, config JSON}; atomic, verified, resumable.

Layout: WORKDIR/checkpoints/<step>/{state, data_iter, config, digest.json}. orbax writes each step into a
temporary folder and renames it when complete, so a crash mid-save leaves the previous checkpoint intact.
Once a save has completed, process 0 writes digest.json (the sha256 of every file of the step, written
atomically). Restoring verifies those digests and that every restored float is finite; a checkpoint that
fails either is damaged (`DamagedCheckpointError`, naming the step folder and the file or array).
Training resumes from the newest intact checkpoint and moves damaged newer ones to
WORKDIR/damaged_checkpoints/; evaluation refuses a damaged one (pick another with --step).

Every process takes part in save and restore; the grain iterator state is one JSON file per process.
Restoring onto another process count (a 2-process checkpoint in 1 process, say) re-derives each
process's iterator position from the step: the pipeline's order depends only on (seed, global index).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from ..convert.common import CheckpointError

log = logging.getLogger(__name__)

# Config sections that shape the train state: a checkpoint only fits a state built from equal ones.
STATE_KEYS = ("system", "model", "optimizer", "ema")
# Resuming also continues the learning-rate schedule, whose length is total_steps, and a UDA system's
# self-training (teacher momentum, pseudo-label threshold); a section absent from both configs is equal.
RESUME_KEYS = (*STATE_KEYS, "uda", "total_steps")
DIGEST_FILE = "digest.json"


class DamagedCheckpointError(CheckpointError):
    """A saved checkpoint whose files changed since the save, are missing, or hold non-finite floats."""


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def config_mismatch(saved: dict, current: dict, keys: tuple[str, ...] = STATE_KEYS) -> list[str]:
    """Human-readable differences between the `keys` sections (or fields) of two config dicts. A field the
    saved config lacks is no difference while the current config holds it at base_config's default: the
    checkpoint predates the option, and its run had the default behaviour."""
    from .config import base_config

    defaults = _flatten(config_to_dict(base_config()))
    a = _flatten({k: saved.get(k, "<absent>") for k in keys})
    b = _flatten({k: current.get(k, "<absent>") for k in keys})
    diffs = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key, "<absent>"), b.get(key, "<absent>")
        if not _same(va, vb) and not (key not in a and key in defaults and _same(vb, defaults[key])):
            diffs.append(f"{key}: checkpoint has {va!r}, config has {vb!r}")
    return diffs


def _same(x, y) -> bool:
    return json.dumps(x, default=str) == json.dumps(y, default=str)


def config_to_dict(config: ml_collections.ConfigDict) -> dict:
    return json.loads(config.to_json_best_effort())


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _files(step_dir: Path) -> list[Path]:
    return sorted(p for p in step_dir.rglob("*") if p.is_file() and p.name != DIGEST_FILE)


def write_digest(step_dir: Path) -> None:
    """Writes step_dir/digest.json: {relative path: [size, sha256]} of every file, atomically."""
    digest = {str(p.relative_to(step_dir)): [p.stat().st_size, _sha256(p)] for p in _files(step_dir)}
    tmp = step_dir / f".{DIGEST_FILE}.tmp"
    tmp.write_text(json.dumps(digest, indent=0, sort_keys=True))
    os.replace(tmp, step_dir / DIGEST_FILE)


def verify_digest(step_dir: Path) -> bool:
    """Checks every file of step_dir against its digest.json; returns False when there is none (a save
    interrupted after orbax completed it), raises DamagedCheckpointError naming the first bad file."""
    digest_path = step_dir / DIGEST_FILE
    if not digest_path.exists():
        return False
    try:
        digest = json.loads(digest_path.read_text())
    except (OSError, ValueError) as e:
        raise DamagedCheckpointError(
            f"checkpoint {step_dir} is damaged: {digest_path} is unreadable ({e})"
        ) from e
    for rel, (size, sha) in sorted(digest.items()):
        path = step_dir / rel
        if not path.is_file():
            raise DamagedCheckpointError(f"checkpoint {step_dir} is damaged: file {path} is missing")
        found = path.stat().st_size
        if found != size:
            raise DamagedCheckpointError(
                f"checkpoint {step_dir} is damaged: file {path} has {found} bytes, {size} were saved"
            )
        if _sha256(path) != sha:
            raise DamagedCheckpointError(
                f"checkpoint {step_dir} is damaged: the content of {path} changed since it was saved "
                "(sha256 differs)"
            )
    return True


def non_finite_leaves(tree: Any) -> list[str]:
    """Paths of the floating-point leaves of `tree` (global arrays) holding a NaN or an infinity."""
    flat = [
        (jax.tree_util.keystr(path), x)
        for path, x in jax.tree_util.tree_leaves_with_path(tree)
        if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)
    ]
    if not flat:
        return []
    sharding = getattr(flat[0][1], "sharding", None)
    # replicated on every device, so each process of a multi-process run can read the verdict
    out = jax.sharding.NamedSharding(sharding.mesh, jax.P()) if hasattr(sharding, "mesh") else None
    check = jax.jit(lambda xs: jnp.stack([jnp.all(jnp.isfinite(x)) for x in xs]), out_shardings=out)
    finite = check([x for _, x in flat])
    return [name for (name, _), ok in zip(flat, np.asarray(jax.device_get(finite))) if not ok]


class Checkpointer:
    """The checkpoints of one workdir. `read_only=True` (evaluation) never creates or changes anything."""

    def __init__(
        self, workdir: str | Path, *, keep: int = 3, async_save: bool = True, read_only: bool = False
    ):
        self.workdir = Path(workdir).absolute()
        self.directory = self.workdir / "checkpoints"
        if read_only and not self.directory.is_dir():
            raise FileNotFoundError(
                f"no checkpoints folder {self.directory} (expected a workdir written by scripts/train.py)"
            )
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=not read_only, enable_async_checkpointing=async_save
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
        self._undigested: int | None = None

    def step_dir(self, step: int) -> Path:
        return self.directory / str(step)

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def leftover_temporaries(self) -> list[Path]:
        """Folders of saves that never completed (a run killed mid-save)."""
        return sorted(p for p in self.directory.glob("*.orbax-checkpoint-tmp*") if p.is_dir())

    def remove_leftover_temporaries(self) -> None:
        """Deletes the temporary folders of interrupted saves (call only while holding the workdir lock)."""
        if jax.process_index() != 0:
            return
        for path in self.leftover_temporaries():
            log.warning("removing %s, left by a save that never completed", path)
            shutil.rmtree(path, ignore_errors=True)

    def save(self, step: int, state: Any, data_iter: Any, config: ml_collections.ConfigDict) -> None:
        self._finish_pending()
        args = {"state": ocp.args.StandardSave(state), "config": ocp.args.JsonSave(config_to_dict(config))}
        if data_iter is not None:
            args["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
        self.manager.save(step, args=ocp.args.Composite(**args), force=True)
        self._undigested = step

    def _finish_pending(self) -> None:
        """Waits for the pending save and writes its digest (process 0; the filesystem is shared)."""
        self.manager.wait_until_finished()
        step, self._undigested = self._undigested, None
        if step is not None and jax.process_index() == 0 and self.step_dir(step).is_dir():
            write_digest(self.step_dir(step))

    def saved_config(self, step: int) -> dict:
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        except Exception as e:  # orbax raises many types for unreadable files
            raise DamagedCheckpointError(
                f"checkpoint {self.step_dir(step)} is damaged: its config cannot be read ({type(e).__name__}: {e})"
            ) from e
        return restored["config"]

    def check_config(self, step: int, config: ml_collections.ConfigDict, keys: tuple[str, ...] = STATE_KEYS):
        diffs = config_mismatch(self.saved_config(step), config_to_dict(config), keys)
        if diffs:
            raise CheckpointError(
                f"checkpoint {self.step_dir(step)} was written with a different config ("
                + "; ".join(diffs)
                + "): use a new --workdir, or the config the checkpoint was trained with"
            )

    def restore(self, step: int, abstract_state: Any, data_iter: Any | None = None) -> tuple[Any, bool]:
        """Verifies step's files against their digest, restores the state onto `abstract_state`
        (ShapeDtypeStructs with shardings) and, when this process layout saved one, the iterator state in
        place, and checks that every restored float is finite. Returns (state, iterator_restored); raises
        DamagedCheckpointError for a damaged checkpoint, CheckpointError for one that does not fit."""
        step_dir = self.step_dir(step)
        verified = verify_digest(step_dir)
        args = {"state": ocp.args.StandardRestore(abstract_state)}
        index, count = jax.process_index(), jax.process_count()
        iter_file = step_dir / "data_iter" / f"process_{index}-of-{count}.json"
        restore_iter = data_iter is not None and iter_file.exists()
        if restore_iter:
            args["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**args))
        except Exception as e:  # orbax/tensorstore raise many types for missing or truncated files
            message = str(e).splitlines()[0] if str(e) else type(e).__name__
            if not verified:
                raise DamagedCheckpointError(
                    f"checkpoint {step_dir} cannot be restored (it has no {DIGEST_FILE} to tell damage from a "
                    f"mismatch): {type(e).__name__}: {message}"
                ) from e
            raise CheckpointError(
                f"checkpoint {step_dir} does not fit the current train state: {type(e).__name__}: {message}"
            ) from e
        bad = non_finite_leaves(restored["state"])
        if bad:
            raise DamagedCheckpointError(
                f"checkpoint {step_dir} is damaged: {len(bad)} restored array(s) hold NaN or infinity "
                f"(first: {', '.join(bad[:3])})"
            )
        if not verified:
            log.warning("checkpoint %s has no %s (saved by an interrupted run); checked finiteness only",
                        step_dir, DIGEST_FILE)  # fmt: skip
        return restored["state"], restore_iter

    def restore_latest_intact(
        self, abstract_state: Any, config: ml_collections.ConfigDict, data_iter: Any | None = None
    ) -> tuple[int, Any, bool] | None:
        """For resuming: (step, state, iterator_restored) of the newest intact checkpoint, or None when
        there is none at all. Damaged newer checkpoints are reported and moved to
        WORKDIR/damaged_checkpoints/ (so training can save those steps again); a config that differs
        from the checkpoint's in a field of RESUME_KEYS is an error."""
        damaged = []
        for step in reversed(self.all_steps()):
            try:
                self.check_config(step, config, RESUME_KEYS)
                state, iter_restored = self.restore(step, abstract_state, data_iter)
            except DamagedCheckpointError as e:
                print(f"warning: {e}; trying the previous checkpoint", flush=True)
                damaged.append(step)
                continue
            self._set_aside(damaged)
            if damaged:
                print(f"Resuming from step {step}, the newest intact checkpoint", flush=True)
            return step, state, iter_restored
        if damaged:
            raise DamagedCheckpointError(
                f"every checkpoint in {self.directory} is damaged (steps {', '.join(map(str, sorted(damaged)))}); "
                "move the folder away to start afresh"
            )
        return None

    def _set_aside(self, steps: list[int]) -> None:
        if not steps:
            return
        if jax.process_index() == 0:
            target = self.workdir / "damaged_checkpoints"
            target.mkdir(exist_ok=True)
            for step in steps:
                dest = target / str(step)
                n = 1
                while dest.exists():
                    dest, n = target / f"{step}.{n}", n + 1
                shutil.move(self.step_dir(step), dest)
                print(f"moved the damaged checkpoint {self.step_dir(step)} to {dest}", flush=True)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("lqseg_set_aside_damaged")
        self.manager.reload()

    def wait(self) -> None:
        self._finish_pending()

    def close(self) -> None:
        self.manager.close()
