"""Pseudo-label quality of a trained UDA / Refign run's EMA teacher on the synthetic paired adverse data.

    python scripts/refign_pseudo_labels.py --config configs/refign.py:tiny,no_refign --workdir runs/demo/uda \
        --alignment runs/demo/uawarpc/export

The synthetic val pairs (data/synthetic_adverse: adverse target, normal-condition reference, target label and
the true target -> reference flow) go through the teacher as the training step runs it (once on target +
reference, train mode: BatchNorm statistics of both, as refign), and each way of forming the pseudo-label is
scored against the target's label: the target alone (UDA), Refign row 1 (unaligned reference, eps 0.5),
row 6 with the alignment network of --alignment (a `scripts/convert.py uawarpc` or demo export folder), and
row 6 with the true flow and P = 1 (the best an alignment can do). Per way: mIoU over the classes present,
pixel accuracy, the share of pixels whose confidence exceeds config.uda.pseudo_threshold (the DACS weight of
the pseudo-label loss) and the accuracy on those pixels. Prints the table and writes WORKDIR/pseudo_labels.json.
Only the synthetic data has true flows; other targets are refused.
"""

import argparse
import io
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from lqseg_jax.cli import add_debug_flag, report_errors
from lqseg_jax.data_pipelines.sources import DataError
from lqseg_jax.data_pipelines.synthetic_adverse import flow_path, sources
from lqseg_jax.eval.evaluate import restore_workdir
from lqseg_jax.models.uawarpc import align, warp
from lqseg_jax.systems import refign
from lqseg_jax.systems.base import normalize
from lqseg_jax.systems.uda import AlignmentNet
from lqseg_jax.train.config import load_config
from lqseg_jax.train.trainer import Trainer

BATCH = 10
WAYS = (
    "target only (UDA)",
    "row 1: unaligned reference, eps 0.5",
    "row 6: aligned by the UAWarpC",
    "row 6: aligned by the true flow, P = 1",
)


def val_pairs(config) -> dict[str, np.ndarray]:
    """image, reference (n, h, w, 3) uint8, label (n, h, w) uint8, flow (n, h, w, 2) of the val split."""
    acdc = Path(config.data.target_root)
    if not (acdc / "flow").is_dir():
        raise DataError(
            f"pseudo-label quality needs the synthetic paired data's true flows: no {acdc / 'flow'}"
        )
    _, target = sources(acdc.parent, "val")
    out = {"image": [], "reference": [], "label": [], "flow": []}
    for i in range(len(target)):
        ex = target[i]
        out["image"].append(np.array(Image.open(io.BytesIO(ex["image"])).convert("RGB")))  # (h, w, 3)
        out["reference"].append(np.array(Image.open(io.BytesIO(ex["reference"])).convert("RGB")))
        out["label"].append(np.array(Image.open(io.BytesIO(ex["label"]))))  # (h, w)
        stored = flow_path(acdc.resolve(), Path(ex["image_path"]).resolve())
        out["flow"].append(np.load(stored).astype(np.float32))  # (h, w, 2)
    return {k: np.stack(v) for k, v in out.items()}


def alignment_net(path: str) -> AlignmentNet:
    """The eval-mode UAWarpC of a converted folder, built as configs/refign.py:tiny builds it."""
    config = load_config("configs/refign.py:tiny")
    config.uda.refign.alignment.path = path
    trainer = Trainer(config)
    model = trainer.model_from_state(trainer.init_state(), eval_mode=False)
    model.alignment_backbone.eval()
    model.alignment_head.eval()
    return AlignmentNet(model.alignment_backbone, model.alignment_head)


def scores(probs: np.ndarray, label: np.ndarray, num_classes: int, threshold: float) -> dict[str, float]:
    pred, conf = probs.argmax(-1), probs.max(-1)  # (n, h, w) each
    ok = label != 255
    ious = [
        ((label == c) & (pred == c) & ok).sum() / (((label == c) | (pred == c)) & ok).sum()
        for c in range(num_classes)
        if ((label == c) & ok).any()
    ]
    confident = (conf > threshold) & ok
    return {
        "mIoU": 100 * float(np.mean(ious)),
        "accuracy": 100 * float((pred == label)[ok].mean()),
        "confident_share": 100 * float((conf > threshold).mean()),  # the DACS weight: every pixel counts
        "confident_accuracy": 100 * float((pred == label)[confident].mean()) if confident.any() else 0.0,
    }


@report_errors
def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config", required=True, help="the run's config, e.g. configs/refign.py:tiny,no_refign"
    )
    parser.add_argument("--workdir", required=True, help="the run's workdir (its latest checkpoint)")
    parser.add_argument("--alignment", required=True, help="a converted UAWarpC folder for row 6")
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    config = load_config(args.config)
    if config.system != "uda":
        raise ValueError(
            f"--config must be a UDA / Refign config (system 'uda'), got system {config.system!r}"
        )
    data = val_pairs(config)
    trainer, state = restore_workdir(config, args.workdir)
    model = trainer.model_from_state(state, eval_mode=False)  # the teacher as the step runs it
    system, net = trainer.system, alignment_net(args.alignment)
    static = tuple(config.uda.refign.static_classes)
    size = data["image"].shape[1:3]

    @nnx.jit
    def pseudo_labels(model, net, image, reference, flow):
        n = image.shape[0]
        logits = system.teacher_logits(model, jnp.concatenate([image, reference]), size)  # (2n, h, w, K)
        lt, lr = logits[:n], logits[n:]  # (n, h, w, K) each
        d = config.data
        x_t, x_r = normalize(image, d.mean, d.std), normalize(reference, d.mean, d.std)  # (n, h, w, 3) each
        warped, valid, conf = align(net, x_t, x_r, lr)  # (n, h, w, K), (n, h, w), (n, h, w, 1)
        true_warped, true_valid = warp(lr, flow)  # (n, h, w, K), (n, h, w)
        ways = (
            jax.nn.softmax(lt, axis=-1),
            refign.refine(lt, lr, gamma=0.0, static_classes=static, disable_M=True),
            refign.refine(lt, warped, valid, conf, gamma=0.25, static_classes=static),
            refign.refine(
                lt, true_warped, true_valid, jnp.ones_like(conf), gamma=0.25, static_classes=static
            ),
        )
        return dict(zip(WAYS, ways, strict=True))  # each (n, h, w, K)

    parts = []
    for s in range(0, len(data["image"]), BATCH):
        batch = [jnp.asarray(data[k][s : s + BATCH]) for k in ("image", "reference", "flow")]
        parts.append(jax.tree.map(np.asarray, pseudo_labels(model, net, *batch)))
    threshold = float(config.uda.pseudo_threshold)
    results = {
        name: scores(
            np.concatenate([p[name] for p in parts]), data["label"], config.model.num_classes, threshold
        )
        for name in WAYS  # the order pseudo_labels builds them (jit returns the dict sorted by key)
    }
    print(
        f"{args.workdir}: the teacher's pseudo-labels on {len(data['image'])} val pairs, threshold {threshold}"
    )
    print(f"{'pseudo-label':<40} {'mIoU':>6} {'acc':>6} {'>thr %':>7} {'acc>thr':>7}")
    for name, r in results.items():
        print(
            f"{name:<40} {r['mIoU']:6.2f} {r['accuracy']:6.2f} {r['confident_share']:7.2f} "
            f"{r['confident_accuracy']:7.2f}"
        )
    out = Path(args.workdir) / "pseudo_labels.json"
    out.write_text(
        json.dumps({"threshold": threshold, "alignment": args.alignment, "results": results}, indent=1)
    )
    print(f"written {out}")


if __name__ == "__main__":
    main()
