"""The one training loop: data -> jitted sharded step -> metrics, checkpoints, resume, evaluation.

`train(config, workdir)` holds the workdir (one run at a time), resumes from its newest intact checkpoint
when there is one (after checking that it was written with the same model, optimizer, EMA and schedule
config), saves every `checkpoint.every` steps, at the end, at `stop_at_step` and on SIGTERM / Ctrl-C, and
logs metrics to a progress bar, WORKDIR/metrics.jsonl (cut back to the resumed step, so each step appears
once) and TensorBoard summaries in WORKDIR/tb (a resumed run writes TensorBoard's purge marker, which hides the
events of the steps after the resumed one that the interrupted run had logged).

The resolved config goes to WORKDIR/config.json when a run starts from step 0; a resumed run whose config
differs from the one in effect at its step writes WORKDIR/config.<step>.json (the config from that step on).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from ..data_pipelines.streams import ensure_data, train_stream
from ..eval.evaluate import evaluate
from .checkpoint import Checkpointer
from .config import config_json
from .trainer import Trainer
from .workdir_lock import WorkdirLock

log = logging.getLogger(__name__)


class StopRequest:
    """Turns SIGTERM and the first Ctrl-C into a request to save and stop; a second Ctrl-C interrupts."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("received %s: saving a checkpoint and stopping", signal.Signals(signum).name)

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def any_process(self) -> bool:
        """True when any process got the signal, so every process stops at the same step."""
        if jax.process_count() == 1:
            return self.requested
        return bool(np.any(multihost_utils.process_allgather(np.array(self.requested))))


def truncate_metrics(path: Path, step: int) -> None:
    """Drops the lines of `path` (metrics.jsonl) logged after `step`, the step a run resumes from, so
    that each step appears once; rewrites the file atomically."""
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by a killed run
    if kept != lines:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, path)


def write_run_config(workdir: Path, config: ml_collections.ConfigDict, step: int) -> Path:
    """Writes the resolved config of a run starting at `step`: WORKDIR/config.json at step 0; on resume,
    WORKDIR/config.<step>.json when it differs from the config in effect at `step` (the newest of config.json
    and config.<k>.json with k <= step). Returns the file that holds it."""
    text = config_json(config) + "\n"
    path = workdir / "config.json"
    if step:
        written = {
            int(p.name.split(".")[1]): p
            for p in workdir.glob("config.*.json")
            if p.name.split(".")[1].isdigit()
        }
        if path.exists():
            written[0] = path
        earlier = [k for k in written if k <= step]
        if earlier:
            in_effect = written[max(earlier)]
            if in_effect.read_text() == text:
                return in_effect
            path = workdir / f"config.{step}.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


class MetricWriter:
    """Scalars to WORKDIR/metrics.jsonl and TensorBoard (process 0 only). Resuming at `start_step` drops the
    jsonl lines after it (left by the run being resumed) and starts the TensorBoard file with a purge marker
    at `start_step + 1`, so TensorBoard hides the interrupted run's events from there on."""

    def __init__(self, workdir: Path, start_step: int = 0):
        self.enabled = jax.process_index() == 0
        if self.enabled:
            from tensorboardX import SummaryWriter

            path = workdir / "metrics.jsonl"
            truncate_metrics(path, start_step)
            self.jsonl = path.open("a")
            self.tb = SummaryWriter(str(workdir / "tb"), purge_step=start_step + 1 if start_step else None)

    def write(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
        self.jsonl.flush()
        for k, v in scalars.items():
            self.tb.add_scalar(k, v, step)
        self.tb.flush()

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            self.tb.close()


def check_finite(metrics: dict, step: int, ckpt: Checkpointer) -> None:
    """Stops training when a step's loss or gradient norm is not finite (its update has spoiled the
    parameters), before that state can be saved over a good checkpoint."""
    bad = {
        k: float(metrics[k]) for k in ("loss", "grad_norm") if k in metrics and not np.isfinite(metrics[k])
    }
    if bad:
        latest = ckpt.latest_step()
        where = f"the latest checkpoint is step {latest}" if latest is not None else "no checkpoint was saved"
        raise FloatingPointError(
            f"training {', '.join(f'{k} is {v}' for k, v in bad.items())} at step {step}; this state is not "
            f"saved and {where}. Lower config.optimizer.lr, set config.optimizer.clip_norm, or check this "
            "step's data."
        )


def evaluate_during_training(trainer: Trainer, state) -> dict[str, float]:
    """The scalars logged every config.eval_every steps: the system's own `training_evaluation(trainer,
    state)` when it defines one (named scalars, e.g. UAWarpC's matching metrics), else the segmentation
    mIoU of eval/evaluate.py as "eval/mIoU"."""
    own = getattr(trainer.system, "training_evaluation", None)
    if own is not None:
        return {k: float(v) for k, v in own(trainer, state).items()}
    return {"eval/mIoU": evaluate(trainer, state, progress=False)["mIoU"]}


def train(config: ml_collections.ConfigDict, workdir: str | Path) -> dict:
    """Trains (or resumes) the experiment in `config`; returns the last logged metrics. Holds the workdir
    for the run (a second run on it stops at once with WorkdirBusyError)."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    with WorkdirLock(workdir):
        return _train(config, workdir)


def _train(config: ml_collections.ConfigDict, workdir: Path) -> dict:
    total = config.total_steps
    end = min(total, config.stop_at_step) if config.stop_at_step else total
    ckpt = Checkpointer(workdir, keep=config.checkpoint.keep, async_save=config.checkpoint.async_save)
    ckpt.remove_leftover_temporaries()
    ensure_data(config)
    trainer = Trainer(config)
    stream = train_stream(config, process_index=jax.process_index(), process_count=jax.process_count())
    data_iter = iter(stream.dataset)
    resumed = ckpt.restore_latest_intact(trainer.abstract_state, config, data_iter)
    if resumed is not None:
        step, state, iter_restored = resumed
        if not iter_restored:
            if config.data.num_workers:
                raise RuntimeError(
                    f"checkpoint {step} holds no data iterator state for process {jax.process_index()} of "
                    f"{jax.process_count()}; resume once with --config.data.num_workers=0 to re-derive it"
                )
            data_iter.set_state({"next_index": step * stream.index_per_step})
            log.info("data iterator position re-derived from step %d (process layout changed)", step)
        print(f"Resumed from step {step} ({ckpt.step_dir(step)})", flush=True)
    else:
        state = trainer.init_state()
        step = 0
    if jax.process_index() == 0:
        log.info("config: %s", write_run_config(workdir, config, step))
    writer = MetricWriter(workdir, step)
    last: dict = {}
    pbar = tqdm(total=end, initial=step, desc="train", disable=jax.process_index() != 0, dynamic_ncols=True)
    t0, t0_step = time.perf_counter(), step
    try:
        with StopRequest() as stop:
            while step < end:
                batch = trainer.device_batch(next(data_iter))
                state, metrics = trainer.train_step(state, batch, trainer.step_rng(step))
                step += 1
                pbar.update(1)
                saving = step % config.checkpoint.every == 0 or step == end
                if step % config.log_every == 0 or step == end:
                    last = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    last["images_per_s"] = (step - t0_step) * config.batch_size / (time.perf_counter() - t0)
                    t0, t0_step = time.perf_counter(), step
                    writer.write(step, last)
                    pbar.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{last['lr']:.2e}")
                    check_finite(last, step, ckpt)
                stopping = stop.any_process()
                if saving or stopping:
                    check_finite(jax.device_get({k: metrics[k] for k in ("loss", "grad_norm")}), step, ckpt)
                    ckpt.save(step, state, data_iter, config)
                if config.eval_every and step % config.eval_every == 0 and step != end:
                    scalars = evaluate_during_training(trainer, state)
                    writer.write(step, scalars)
                    log.info("step %d: %s", step, ", ".join(f"{k} {v:.4g}" for k, v in scalars.items()))
                if stopping:
                    print(
                        f"Stopped at step {step}; checkpoint saved. Re-run the same command to resume.",
                        flush=True,
                    )
                    break
    finally:  # a pending asynchronous save completes (and gets its digest) even when the loop raises
        pbar.close()
        ckpt.wait()
        ckpt.close()
        writer.close()
    return {"step": step, **last}
