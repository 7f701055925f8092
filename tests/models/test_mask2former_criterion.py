"""Mask2Former criterion vs transformers' Mask2FormerLoss on the same random points, and semantic
inference vs a torch transcription of MaskFormer.semantic_inference + sem_seg_postprocess."""

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F
from transformers import Mask2FormerConfig as HFConfig
from transformers.models.mask2former import modeling_mask2former as hf

from lqseg_jax.models.mask2former import (
    Mask2FormerCriterion,
    hungarian_match,
    semantic_inference,
    targets_from_semantic,
    tiny_config,
)

B, Q, K, H, W = 2, 8, 5, 12, 10


def _outputs(rng, num_layers):
    preds = [
        {
            "pred_logits": jnp.asarray(2 * rng.normal(size=(B, Q, K + 1)).astype(np.float32)),
            "pred_masks": jnp.asarray(3 * rng.normal(size=(B, H, W, Q)).astype(np.float32)),
        }
        for _ in range(num_layers)
    ]
    return {**preds[-1], "aux_outputs": preds[:-1]}


def _labels(rng):
    labels = rng.choice([0, 1, 2, 3, 4, 255], size=(B, 4 * H, 4 * W)).astype(np.int32)
    labels[0][labels[0] == 4] = 255  # image 0 without class 4
    labels[1][labels[1] == 1] = 2  # image 1 without class 1
    return labels


def test_loss_matches_transformers_on_same_points_and_matching(monkeypatch):
    rng = np.random.default_rng(0)
    num_layers, num_points = 3, 60
    cfg = tiny_config(num_classes=K, num_queries=Q, train_num_points=num_points, max_targets=5)
    crit = Mask2FormerCriterion(cfg)
    outputs, labels = _outputs(rng, num_layers), _labels(rng)
    targets = targets_from_semantic(jnp.asarray(labels), K, cfg.max_targets)
    points = crit.draw_points(jax.random.key(0), num_layers, B)
    ours = jax.jit(crit.losses_from_points)(outputs, targets, points)
    ours = jax.tree.map(np.asarray, ours)
    pts = jax.tree.map(np.asarray, points)
    valid = np.asarray(targets.valid)

    # transformers draws with torch.rand: per layer (final first, then aux 0..), the matcher's points per
    # image, then the oversampled and random points of the matched masks in (image, query) order
    queue = []
    for layer in [num_layers - 1, *range(num_layers - 1)]:
        queue += [pts["match"][layer, i][None] for i in range(B)]
        order = [
            (i, t)
            for i in range(B)
            for t in sorted(np.flatnonzero(valid[i]), key=lambda t: ours["indices"][layer, i, t])
        ]
        queue.append(np.stack([pts["oversampled"][layer, i, t] for i, t in order]))
        queue.append(np.stack([pts["random"][layer, i, t] for i, t in order]))
    queue = [torch.from_numpy(np.array(x)) for x in queue]

    def fake_rand(*size, **kw):
        x = queue.pop(0)
        assert tuple(x.shape) == tuple(size), (x.shape, size)
        return x

    monkeypatch.setattr(torch, "rand", fake_rand)
    hf_cfg = HFConfig(num_labels=K, train_num_points=num_points)
    ref = hf.Mask2FormerLoss(hf_cfg, weight_dict={})
    matched = []
    match = ref.matcher.forward
    ref.matcher.forward = lambda *a: matched.append(match(*a)) or matched[-1]

    def nchw(p):
        return torch.from_numpy(np.array(p["pred_masks"]).transpose(0, 3, 1, 2))

    classes = [np.array([c for c in np.unique(lab) if c != 255], np.int64) for lab in labels]
    losses = ref(
        nchw(outputs),
        torch.from_numpy(np.array(outputs["pred_logits"])),
        [torch.from_numpy((lab[None] == c[:, None, None]).astype(np.float32)) for lab, c in zip(labels, classes)],
        [torch.from_numpy(c) for c in classes],
        [{"masks_queries_logits": nchw(p), "class_queries_logits": torch.from_numpy(np.array(p["pred_logits"]))}
         for p in outputs["aux_outputs"]],
    )  # fmt: skip
    assert not queue

    for j, layer in enumerate([num_layers - 1, *range(num_layers - 1)]):
        for i, (rows, cols) in enumerate(matched[j]):  # same assignment as scipy's
            expected = {(int(r), int(c)) for r, c in zip(rows, cols)}
            assert {(int(ours["indices"][layer, i, t]), t) for t in np.flatnonzero(valid[i])} == expected
        suffix = "" if layer == num_layers - 1 else f"_{layer}"
        for ours_name, ref_name in (
            ("ce", "loss_cross_entropy"),
            ("mask", "loss_mask"),
            ("dice", "loss_dice"),
        ):
            print(
                f"{ref_name + suffix}: ours {ours[ours_name][layer]:.6f} transformers {losses[ref_name + suffix].item():.6f}"
            )
            np.testing.assert_allclose(
                ours[ours_name][layer], losses[ref_name + suffix].item(), rtol=1e-5, err_msg=ref_name + suffix
            )


def test_loss_total_metrics_and_gradients():
    rng = np.random.default_rng(1)
    cfg = tiny_config(num_classes=K, num_queries=Q, train_num_points=60, max_targets=5)
    crit = Mask2FormerCriterion(cfg)
    outputs, labels = _outputs(rng, 2), jnp.asarray(_labels(rng))
    key = jax.random.key(3)
    # batch sharded over 2 devices, as in data-parallel training (num_masks is a global count)
    mesh = jax.make_mesh((2,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    on_batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    sharded = jax.device_put((outputs, labels), on_batch)
    (loss, metrics), grads = jax.jit(jax.value_and_grad(crit.loss, has_aux=True))(*sharded, key)
    weighted = [metrics[f"{n}{s}"] for n in ("loss_ce", "loss_mask", "loss_dice") for s in ("", "_0")]
    np.testing.assert_allclose(float(loss), float(sum(weighted)), rtol=1e-6)
    assert int(metrics["num_masks"]) == 8 and int(metrics["num_targets_dropped"]) == 0

    # class logits of every query get gradient; masks only those of the queries matched to a target
    targets = targets_from_semantic(labels, K, cfg.max_targets)
    match_points = crit.draw_points(key, 2, B)["match"][-1]  # what loss() drew for the final layer
    indices = np.asarray(
        jax.jit(hungarian_match)(outputs["pred_logits"], outputs["pred_masks"], targets, match_points)
    )  # (b, T)
    g_masks = np.abs(np.asarray(grads["pred_masks"])).sum(axis=(1, 2))  # (b, q)
    for i in range(B):
        matched = set(indices[i][indices[i] >= 0].tolist())
        assert len(matched) == 4 and all((g_masks[i, qq] > 0) == (qq in matched) for qq in range(Q))
    assert np.all(np.abs(np.asarray(grads["pred_logits"])).sum(-1) > 0)
    assert np.all(np.abs(np.asarray(grads["aux_outputs"][0]["pred_logits"])).sum(-1) > 0)


def test_semantic_inference_matches_torch():
    rng = np.random.default_rng(2)
    outputs = _outputs(rng, 1)
    padded, image, original = (4 * H, 4 * W), (45, 37), (60, 50)
    scores = jax.jit(semantic_inference, static_argnums=1, static_argnames=("padded_hw", "resize_hw"))(
        outputs, image, padded_hw=padded, resize_hw=original
    )
    with torch.no_grad():
        masks = torch.from_numpy(np.array(outputs["pred_masks"]).transpose(0, 3, 1, 2))
        masks = F.interpolate(masks, size=padded, mode="bilinear", align_corners=False)
        for i in range(B):
            mask_cls = F.softmax(torch.from_numpy(np.array(outputs["pred_logits"][i])), dim=-1)[..., :-1]
            r = torch.einsum("qc,qhw->chw", mask_cls, masks[i].sigmoid())[:, : image[0], : image[1]]
            r = F.interpolate(r[None], size=original, mode="bilinear", align_corners=False)[0]
            np.testing.assert_allclose(np.asarray(scores[i]), r.numpy().transpose(1, 2, 0), atol=1e-5)
