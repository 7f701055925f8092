"""Two full UDA steps through the Trainer (lqseg_jax/systems/uda.py, refign.md 7) against a PyTorch
re-statement of refign's training_step (segmentation_model.py:146-253, get_dacs_mix, calc_feat_dist,
update_momentum_encoder, AdamW groups + warmup/linear LR), with small stand-in networks of the same
structure on both sides (a 2-stage conv encoder; a head with ConvModule BN; tanh, so that no parameter
has a zero gradient that Adam would turn into rounding noise) and the same draws fed to both
(ClassMix classes, jitter factors and orders, blur sigmas, gates on). Then: the same step on a 2x4 mesh
equals the single-device step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

from lqseg_jax import systems
from lqseg_jax.models.layers import ConvModule, resize_bilinear
from lqseg_jax.models.segmentor import EncoderDecoder
from lqseg_jax.systems.uda import UDASystem
from lqseg_jax.train.config import load_config
from lqseg_jax.train.mesh import make_mesh
from lqseg_jax.train.trainer import Trainer
from tests.systems.test_uda_pieces import k_color_jitter, k_gaussian_blur

K, B, S = 5, 8, 32
FD_CLASSES = (3, 4)
THRESHOLD = 0.35
MEAN, STD = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)


def _draws():
    rng = np.random.default_rng(11)
    labels = _batch()["label_src"]
    present = np.unique(labels)  # the whole source batch, 255 included
    chosen = np.zeros((B, K + 1), bool)
    for i in range(B):
        pick = rng.choice(len(present), (len(present) + 1) // 2, replace=False)
        for c in present[pick]:
            chosen[i, K if c == 255 else c] = True
    jitter = dict(
        brightness=rng.uniform(0.8, 1.2, B).astype(np.float32),
        contrast=rng.uniform(0.8, 1.2, B).astype(np.float32),
        saturation=rng.uniform(0.8, 1.2, B).astype(np.float32),
        hue=rng.uniform(-0.2, 0.2, B).astype(np.float32),
        order=np.stack([rng.permutation(4) for _ in range(B)]).astype(np.int32),
    )
    return dict(chosen=chosen, jitter=jitter, sigma=rng.uniform(0.15, 1.15, B).astype(np.float32))


def _batch():
    rng = np.random.default_rng(10)
    labels = rng.integers(0, K, (B, S // 8, S // 8)).repeat(8, 1).repeat(8, 2).astype(np.uint8)
    labels[:, :8, :8] = 255
    labels[0, 8:12] = 1  # a block below the 0.75 ratio
    return dict(
        image_src=rng.integers(0, 256, (B, S, S, 3)).astype(np.uint8),
        label_src=labels,
        image_trg=rng.integers(0, 256, (B, S, S, 3)).astype(np.uint8),
        image_ref=rng.integers(0, 256, (B, S, S, 3)).astype(np.uint8),
    )


# --------------------------------------------------------------------------------- stand-in networks
class TinyBackbone(nnx.Module):
    def __init__(self, rngs):
        self.conv1 = nnx.Conv(3, 8, (4, 4), strides=4, padding="VALID", rngs=rngs)
        self.conv2 = nnx.Conv(8, 12, (2, 2), strides=2, padding="VALID", rngs=rngs)

    def __call__(self, x):
        f1 = jnp.tanh(self.conv1(x))  # (b, h/4, w/4, 8)
        return [f1, self.conv2(f1)]  # + (b, h/8, w/8, 12)


class TinyHead(nnx.Module):
    def __init__(self, rngs, num_classes=K):
        self.fuse = ConvModule(20, 16, 1, rngs=rngs)
        self.conv_seg = nnx.Conv(16, num_classes, (1, 1), rngs=rngs)

    def __call__(self, feats):
        f1, f2 = feats
        x = jnp.concatenate([f1, resize_bilinear(jnp.tanh(f2), f1.shape[1:3])], -1)  # (b, h/4, w/4, 20)
        return self.conv_seg(self.fuse(x))


class StandInSystem(UDASystem):
    def build_network(self, rngs):
        return EncoderDecoder(TinyBackbone(rngs), TinyHead(rngs, self.config.model.num_classes))

    def build_encoder(self, rngs):
        return TinyBackbone(rngs)

    def draw(self, rng, labels):
        d = _draws()
        return dict(
            chosen=jnp.asarray(d["chosen"]),
            jitter={k: jnp.asarray(v) for k, v in d["jitter"].items()},
            sigma=jnp.asarray(d["sigma"]),
            do_jitter=jnp.bool_(True),
            do_blur=jnp.bool_(True),
        )


class TBackbone(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = torch.nn.Conv2d(3, 8, 4, 4), torch.nn.Conv2d(8, 12, 2, 2)

    def forward(self, x):
        f1 = torch.tanh(self.conv1(x))
        return [f1, self.conv2(f1)]


class THead(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(20, 16, 1, bias=False)
        self.bn = torch.nn.BatchNorm2d(16, eps=1e-5, momentum=0.1)
        self.conv_seg = torch.nn.Conv2d(16, K, 1)

    def forward(self, feats):
        f1, f2 = feats
        x = torch.cat(
            [f1, F.interpolate(torch.tanh(f2), f1.shape[-2:], mode="bilinear", align_corners=False)], 1
        )
        return self.conv_seg(F.relu(self.bn(self.conv(x))))


def _conv(t_conv, j_conv):
    t_conv.weight.data = torch.from_numpy(np.asarray(j_conv.kernel[...]).transpose(3, 2, 0, 1).copy())
    if t_conv.bias is not None:
        t_conv.bias.data = torch.from_numpy(np.asarray(j_conv.bias[...]).copy())


def _to_torch(backbone, head=None):
    tb = TBackbone()
    _conv(tb.conv1, backbone.conv1)
    _conv(tb.conv2, backbone.conv2)
    if head is None:
        return tb
    th = THead()
    _conv(th.conv, head.fuse.conv)
    _conv(th.conv_seg, head.conv_seg)
    th.bn.weight.data = torch.from_numpy(np.asarray(head.fuse.bn.scale[...]).copy())
    th.bn.bias.data = torch.from_numpy(np.asarray(head.fuse.bn.bias[...]).copy())
    return tb, th


def _jax_weights(backbone, head):
    out = {
        f"backbone.{n}.{p}": getattr(getattr(backbone, n), p)[...]
        for n in ("conv1", "conv2")
        for p in ("kernel", "bias")
    }
    out.update({"head.fuse.conv.kernel": head.fuse.conv.kernel[...], "head.fuse.bn.scale": head.fuse.bn.scale[...],
                "head.fuse.bn.bias": head.fuse.bn.bias[...], "head.conv_seg.kernel": head.conv_seg.kernel[...],
                "head.conv_seg.bias": head.conv_seg.bias[...]})  # fmt: skip
    return {k: np.asarray(v) for k, v in out.items()}


def _torch_weights(tb, th):
    out = {
        f"backbone.{n}.{p}": getattr(getattr(tb, n), p)
        for n in ("conv1", "conv2")
        for p in ("weight", "bias")
    }
    out.update({"head.fuse.conv.kernel": th.conv.weight, "head.fuse.bn.scale": th.bn.weight,
                "head.fuse.bn.bias": th.bn.bias, "head.conv_seg.kernel": th.conv_seg.weight,
                "head.conv_seg.bias": th.conv_seg.bias})  # fmt: skip
    res = {}
    for k, v in out.items():
        a = v.detach().numpy()
        res[k.replace("weight", "kernel")] = a.transpose(2, 3, 1, 0) if a.ndim == 4 else a
    return res


# --------------------------------------------------------------------------------------- torch step
def torch_steps(tb, th, mb, mh, imnet, batch, draws, steps, base_lr, warmup, total):
    m_t = torch.tensor(MEAN).view(1, 3, 1, 1) / 255
    s_t = torch.tensor(STD).view(1, 3, 1, 1) / 255

    def norm(x):  # ToTensor + Normalize
        return (torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255 - m_t) / s_t

    head_p = list(th.parameters())
    bb_p = list(tb.parameters())
    groups = [
        dict(params=[p for p in head_p if p.ndim > 1], lr=base_lr, weight_decay=0.01),
        dict(params=[p for p in head_p if p.ndim <= 1], lr=base_lr, weight_decay=0.0),
        dict(params=[p for p in bb_p if p.ndim > 1], lr=base_lr * 0.1, weight_decay=0.01),
        dict(params=[p for p in bb_p if p.ndim <= 1], lr=base_lr * 0.1, weight_decay=0.0),
    ]
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8)
    bases = [g["lr"] for g in opt.param_groups]
    for mod in (tb, th, mb, mh):
        mod.train()
    imnet.eval()
    x_s, gt = norm(batch["image_src"]), torch.from_numpy(batch["label_src"].astype(np.int64))
    x_t = norm(batch["image_trg"])
    log = []
    for t in range(steps):
        f = 1 - (1 - t / warmup) * (1 - 1e-6) if t < warmup else 1 - (t - warmup) / (total - warmup)
        for g, b0 in zip(opt.param_groups, bases):
            g["lr"] = b0 * f
        opt.zero_grad()
        with torch.no_grad():  # update_momentum_encoder
            m = min(1.0 - 1 / (float(t) + 1.0), 0.999)
            for p, pm in zip(
                list(tb.parameters()) + list(th.parameters()), list(mb.parameters()) + list(mh.parameters())
            ):
                pm.data[:] = pm.data[:] * m + p.data[:] * (1.0 - m)
        feats = tb(x_s)
        logits = F.interpolate(th(feats), x_s.shape[-2:], mode="bilinear", align_corners=False)
        loss_src = torch.mean(F.cross_entropy(logits, gt, reduction="none", ignore_index=255))
        with torch.no_grad():
            f_i = imnet(x_s)[-1]
            scale = gt.shape[-1] // feats[-1].shape[-1]
            lab = gt.clone()
            lab[lab == 255] = K
            oh = F.avg_pool2d(F.one_hot(lab, K + 1).permute(0, 3, 1, 2).float(), scale)
            ratio, low = torch.max(oh, 1)
            low[low == K] = 255
            low[ratio < 0.75] = 255
            mask = torch.any(low[..., None] == torch.tensor(FD_CLASSES), -1)
        d = torch.norm(feats[-1] - f_i, dim=1, p=2)
        loss_fd = 0.005 * torch.mean(d[mask])
        with torch.no_grad():
            probs = torch.softmax(
                F.interpolate(mh(mb(x_t)), x_t.shape[-2:], mode="bilinear", align_corners=False), 1
            )
            pprob, plabel = torch.max(probs, 1)
            w = torch.sum(pprob.ge(THRESHOLD).long() == 1) / torch.numel(plabel)
            mixed_img, mixed_lbl, mixed_w = [], [], []
            for i in range(B):
                classes = torch.tensor([c if c < K else 255 for c in np.flatnonzero(draws["chosen"][i])])
                cm = gt[i].eq(classes[:, None, None]).sum(0, keepdims=True).float()  # (1, h, w)
                img = cm * x_s[i] + (1 - cm) * x_t[i]
                lbl = cm[0] * gt[i] + (1 - cm[0]) * plabel[i]
                jit = draws["jitter"]
                img = k_color_jitter(img[None] * s_t + m_t, float(jit["brightness"][i]), float(jit["contrast"][i]),
                                     float(jit["saturation"][i]), float(jit["hue"][i]), jit["order"][i].tolist())  # fmt: skip
                img = k_gaussian_blur((img - m_t) / s_t, float(draws["sigma"][i]))
                mixed_img.append(img)
                mixed_lbl.append(lbl.long())
                mixed_w.append(cm[0] * 1 + (1 - cm[0]) * w)
            mixed_img, mixed_lbl, mixed_w = torch.cat(mixed_img), torch.stack(mixed_lbl), torch.stack(mixed_w)
        pred = F.interpolate(th(tb(mixed_img)), mixed_img.shape[-2:], mode="bilinear", align_corners=False)
        loss_mix = torch.mean(F.cross_entropy(pred, mixed_lbl, reduction="none", ignore_index=255) * mixed_w)
        (loss_src + loss_fd + loss_mix).backward()
        grad_norm = torch.sqrt(sum((p.grad**2).sum() for p in bb_p + head_p))
        opt.step()
        log.append(dict(loss_src=loss_src.item(), loss_fd=loss_fd.item(), loss_mix=loss_mix.item(),
                        pseudo_weight=w.item(), grad_norm=grad_norm.item()))  # fmt: skip
    return log


# -------------------------------------------------------------------------------------------- tests
@pytest.fixture
def standin(monkeypatch):
    monkeypatch.setitem(systems.SYSTEMS, "uda_standin", f"{__name__}:StandInSystem")
    c = load_config("configs/refign.py:tiny,no_refign")
    c.system = "uda_standin"
    c.model.num_classes = K
    c.batch_size = B
    c.uda.fdist.classes = FD_CLASSES
    c.uda.pseudo_threshold = THRESHOLD
    c.optimizer.lr = 1e-3  # Adam amplifies rounding where gradients nearly cancel: keep updates ~1e-3
    c.optimizer.lr_mults = ((r"^backbone\.", 0.1),)
    # no warmup: at warmup's 1e-6 LR the student stays within float rounding of the ImageNet encoder and
    # the feature distance's direction (its gradient) is rounding noise on both sides (refign.md E6)
    c.optimizer.schedule.warmup_steps = 0
    c.total_steps = 10
    return c


def _run(trainer, steps):
    state = trainer.init_state()
    batch = trainer.device_batch(_batch())
    metrics = []
    for t in range(steps):
        state, m = trainer.train_step(state, batch, trainer.step_rng(t))
        metrics.append(jax.device_get(m))
    return state, metrics


def test_two_uda_steps_match_torch(standin):
    trainer = Trainer(standin, mesh=make_mesh(1, 1, jax.devices()[:1]))
    init = trainer.init_state()
    model0 = nnx.merge(trainer.graphdef, init.params, init.rest)
    tb, th = _to_torch(model0.backbone, model0.head)
    mb, mh = _to_torch(model0.m_backbone, model0.m_head)
    imnet = _to_torch(model0.imnet_backbone)
    state, metrics = _run(trainer, 2)
    log = torch_steps(tb, th, mb, mh, imnet, _batch(), _draws(), 2, 1e-3, 0, 10)
    for ours, ref in zip(metrics, log):
        for k, v in ref.items():
            np.testing.assert_allclose(float(ours[k]), v, rtol=1e-5, atol=1e-6, err_msg=k)
    assert 0.05 < log[0]["pseudo_weight"] < 0.95 and log[0]["loss_fd"] == 0 and log[1]["loss_fd"] > 1e-6
    model = nnx.merge(trainer.graphdef, state.params, state.rest)
    assert int(model.global_step.get_value()) == 2
    ours, ref = _jax_weights(model.backbone, model.head), _torch_weights(tb, th)
    for k in ref:
        np.testing.assert_allclose(ours[k], ref[k], atol=1e-5, err_msg=f"student {k}")
    ours, ref = _jax_weights(model.m_backbone, model.m_head), _torch_weights(mb, mh)
    for k in ref:
        np.testing.assert_allclose(ours[k], ref[k], atol=1e-5, err_msg=f"teacher {k}")
    # the teacher's BN statistics are its own (one train-mode teacher forward per step)
    np.testing.assert_allclose(
        np.asarray(model.m_head.fuse.bn.mean[...]), mh.bn.running_mean.numpy(), atol=1e-5
    )
    np.testing.assert_allclose(
        np.asarray(model.m_head.fuse.bn.var[...]), mh.bn.running_var.numpy(), atol=1e-5
    )
    np.testing.assert_allclose(np.asarray(model.head.fuse.bn.var[...]), th.bn.running_var.numpy(), atol=1e-5)
    # the ImageNet encoder stays frozen
    ours, ref = (
        _jax_weights(model.imnet_backbone, model.m_head),
        _jax_weights(model0.imnet_backbone, model0.m_head),
    )
    for k in ref:
        if k.startswith("backbone"):
            np.testing.assert_array_equal(ours[k], ref[k])


def test_mesh_2x4_step_equals_single_device(standin):
    single, _ = _run(Trainer(standin, mesh=make_mesh(1, 1, jax.devices()[:1])), 2)
    standin.mesh.data, standin.mesh.fsdp = 2, 4
    standin.sharding.min_shard_size = 1  # shard the small stand-in parameters too
    sharded, _ = _run(Trainer(standin), 2)
    for a, b in zip(
        jax.tree.leaves((single.params, single.rest)), jax.tree.leaves((sharded.params, sharded.rest))
    ):
        if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
