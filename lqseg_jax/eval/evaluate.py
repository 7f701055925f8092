"""Evaluation of a train state on a labelled split: confusion matrix on device, table, JSON, pictures."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image
from tqdm.auto import tqdm

from ..data_pipelines.detectron2_transforms import Detectron2EvalResize
from ..data_pipelines.pipeline import eval_batches
from ..data_pipelines.streams import ensure_data, eval_source
from ..data_pipelines.transforms import EvalCanvas, EvalResize
from .inference import predict_at_label_size
from .metrics import IGNORE, confusion_matrix, iou_from_confusion, summarize
from .report import class_names_or_ids, save_triptych, write_results

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class LabelsAtInputSize:
    """`resize` (an EvalResize), then the label, when there is one, resized with PIL nearest to the resized
    image's size: refign's val stage, whose dataset `dims` resize image and label alike (refign.md 9)."""

    resize: EvalResize

    def __call__(self, example: dict) -> dict:
        out = self.resize(example)
        h, w = out["image"].shape[:2]
        if "label" in out and out["label"].shape != (h, w):
            label = np.asarray(Image.fromarray(out["label"]).resize((w, h), Image.NEAREST))  # (h, w)
            out = {**out, "label": label}
        return out


def eval_resize(e, resize_labels: bool | None = None):
    """The evaluation resize the config asks for (config.eval); with resize_labels (default
    eval.resize_labels) the labels follow the image (LabelsAtInputSize)."""
    if resize_labels is None:
        resize_labels = e.get("resize_labels", False)
    if e.resize == "detectron2":
        if resize_labels:
            raise ValueError("eval.resize_labels needs eval.resize 'keep_ratio' (detectron2's resize pads)")
        return Detectron2EvalResize(
            short_edge=e.short_edge, max_size=e.max_size, size_divisibility=e.size_divisibility
        )
    if e.resize != "keep_ratio":
        raise ValueError(f"eval.resize must be 'keep_ratio' or 'detectron2', got {e.resize!r}")
    resize = EvalResize(tuple(e.scale) if e.scale else None)
    return LabelsAtInputSize(resize) if resize_labels else resize


def summarize_classes(cm: np.ndarray, class_names, present_classes_only: bool = True) -> dict:
    """metrics.summarize (mIoU over the classes with ground-truth pixels: refign's `over_present_classes`,
    mmseg's convention); with present_classes_only False, refign's default IoU instead: the mean over all
    classes, a class absent from labels and predictions (union 0) scoring 0, every class reported."""
    summary = summarize(cm, class_names)
    if present_classes_only:
        return summary
    iou = np.nan_to_num(iou_from_confusion(cm), nan=0.0)  # (K,) union 0 -> 0
    return {
        **summary,
        "mIoU": 100.0 * float(iou.mean()),
        "per_class_iou": {name: 100.0 * float(iou[i]) for i, name in enumerate(class_names)},
    }


def degrade_uint8(key: jax.Array, images: jax.Array, indices: jax.Array, cfg) -> jax.Array:
    """uint8 images (b, h, w, 3) degraded by the Real-ESRGAN model `cfg` (a degradation preset config), image
    i with key fold_in(key, indices[i]): the same image gets the same degradation in any batch layout."""
    from ..data_pipelines.degradation import degrade

    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(indices)  # (b,) keys
    x = degrade(keys, images.astype(jnp.float32) / 255.0, cfg)  # (b, h, w, 3), multiples of 1/255
    return jnp.round(x * 255.0).astype(jnp.uint8)


def make_eval_step(trainer):
    """Jitted (params, rest, device batch) -> (confusion (K, K), predictions (b, H, W)); one per trainer, so
    repeated evaluations (training-time, robustness curves) reuse its compilations."""
    cached = getattr(trainer, "_eval_step", None)
    if cached is not None:
        return cached
    cfg = trainer.config
    num_classes = cfg.model.num_classes

    def step(params: Any, rest: Any, batch: dict):
        model = nnx.merge(trainer.eval_graphdef, params, rest)
        labels, valid = batch["label"], batch["valid"]  # (b, H, W) label canvas, (b,)
        preds = predict_at_label_size(
            lambda x: trainer.system.predict_batch(model, {**batch, "image": x}),
            batch["image"],
            labels.shape[1:3],
            batch["valid_hw"],
            batch["label_hw"],
            mode=cfg.eval.mode,
            crop=tuple(cfg.eval.crop),
            stride=tuple(cfg.eval.stride),
        )  # (b, H, W)
        labels = jnp.where(valid[:, None, None], labels, IGNORE)
        return confusion_matrix(preds, labels, num_classes), preds

    trainer._eval_step = jax.jit(step)
    return trainer._eval_step


def evaluate(
    trainer,
    state,
    out_dir: str | Path | None = None,
    *,
    progress: bool = True,
    degradation=None,
    degradation_seed: int = 0,
    source=None,
    split: str | None = None,
    resize_labels: bool | None = None,
) -> dict:
    """Evaluates `state` on config.eval.split of eval.source at eval.root (default data.source / data.root,
    data_pipelines/streams.py eval_source), or on `source` (a labelled source; `split` names it in the
    record); writes metrics.json, the table and pictures to `out_dir`. Labels stay at their resolution
    unless resize_labels (default eval.resize_labels); mIoU as eval.present_classes_only (summarize_classes).
    With `degradation` (a data_pipelines.degradation preset config) every input image is degraded on the
    device first, seeded by (degradation_seed, image index)."""
    cfg = trainer.config
    num_classes = cfg.model.num_classes
    split = split or cfg.eval.split
    source = eval_source(cfg) if source is None else source
    steps, batches = eval_batches(
        source,
        eval_resize(cfg.eval, resize_labels),
        canvas=EvalCanvas(cfg.eval.label_bucket, cfg.eval.image_bucket),
        global_batch=cfg.eval.batch_size,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    eval_step = make_eval_step(trainer)
    if degradation is not None:
        key = jax.random.key(degradation_seed)
        degrade_fn = jax.jit(lambda x, index: degrade_uint8(key, x, index, degradation))
    local = cfg.eval.batch_size // jax.process_count()
    params, rest = trainer.eval_params(state), state.rest
    cm = np.zeros((num_classes, num_classes), np.int64)
    pictures_left = cfg.eval.num_pictures if out_dir is not None else 0
    out_dir = Path(out_dir) if out_dir is not None else None
    show = progress and jax.process_index() == 0
    for t, batch in enumerate(
        tqdm(batches, total=steps, desc=f"eval {split}", disable=not show, leave=False)
    ):
        first = t * cfg.eval.batch_size + jax.process_index() * local  # global index of the first local image
        batch = {**batch, "index": np.arange(first, first + local, dtype=np.int32)}
        arrays = trainer.device_batch(batch)
        with jax.set_mesh(trainer.mesh):
            if degradation is not None:
                arrays["image"] = degrade_fn(arrays["image"], arrays["index"])  # (b, h, w, 3) uint8
            batch_cm, preds = eval_step(params, rest, arrays)
        cm += np.asarray(batch_cm, np.int64)
        if pictures_left > 0 and jax.process_index() == 0:
            local_preds = trainer.local_rows(preds)  # (b_local, H, W)
            # the network's input: the degraded image when evaluating under a degradation
            shown = trainer.local_rows(arrays["image"]) if degradation is not None else batch["image"]
            for i in np.flatnonzero(batch["valid"])[:pictures_left]:
                stem = Path(batch["name"][i]).stem
                save_triptych(
                    out_dir / "pictures" / f"{stem}.png",
                    shown[i],
                    local_preds[i],
                    batch["label"][i],
                    num_classes,
                )
                pictures_left -= 1
    summary = summarize_classes(
        cm,
        class_names_or_ids(cfg.data.get("class_names"), num_classes),
        cfg.eval.get("present_classes_only", True),
    )
    summary["num_images"] = len(source)
    if out_dir is not None and jax.process_index() == 0:
        summary["table"] = write_results(
            out_dir,
            {k: v for k, v in summary.items() if k != "num_images"},
            len(source),
            extra={"step": int(state.step), "split": split, "source": source.description},
        )
    return summary


def restore_workdir(config, workdir: str | Path, step: int | None = None):
    """(trainer, state) of WORKDIR's checkpoint `step` (default: the latest), after checking that it fits
    `config` and is intact; a damaged one is an error naming it and the other saved steps."""
    from ..train.checkpoint import Checkpointer, DamagedCheckpointError
    from ..train.trainer import Trainer

    if not Path(workdir).is_dir():
        raise FileNotFoundError(f"workdir {Path(workdir).absolute()} does not exist")
    ckpt = Checkpointer(workdir, async_save=False, read_only=True)
    steps = ckpt.all_steps()
    if not steps:
        raise FileNotFoundError(f"no checkpoint in {ckpt.directory} (train first with scripts/train.py)")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise FileNotFoundError(
            f"--step {step}: no checkpoint {ckpt.step_dir(step)} (saved steps: {', '.join(map(str, steps))})"
        )
    try:
        ckpt.check_config(step, config)
        ensure_data(config)
        trainer = Trainer(config)
        state, _ = ckpt.restore(step, trainer.abstract_state)
    except DamagedCheckpointError as e:
        others = [s for s in steps if s != step]
        hint = f"; evaluate another with --step N (saved: {', '.join(map(str, others))})" if others else ""
        raise DamagedCheckpointError(f"{e}{hint}") from e
    finally:
        ckpt.close()
    return trainer, state


def load_converted_state(config, path: str | Path):
    """(trainer, state) whose weights come from a `scripts/convert.py` output folder: a fresh state with
    config.model.pretrained.path = path, loaded by the system's `load_pretrained`."""
    from ..train.trainer import Trainer

    if not Path(path).is_dir():
        raise FileNotFoundError(f"converted checkpoint folder {path} does not exist")
    config = config.copy_and_resolve_references()
    config.model.pretrained.path = str(path)
    ensure_data(config)
    trainer = Trainer(config)
    return trainer, trainer.init_state()


def evaluate_workdir(config, workdir: str | Path, *, progress: bool = True, step: int | None = None) -> dict:
    """Restores WORKDIR's checkpoint `step` (default: the latest; checking it fits `config` and is intact)
    and evaluates it into WORKDIR/eval."""
    trainer, state = restore_workdir(config, workdir, step)
    return evaluate(trainer, state, Path(workdir) / "eval", progress=progress)
