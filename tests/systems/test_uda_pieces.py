"""The pieces of the UDA step (lqseg_jax/systems/uda_augment.py, refign.md 7) against PyTorch re-statements
of refign's helpers/dacs_transforms.py, models/segmentation_model.py and kornia 0.5.8 (ColorJitter,
rgb_to_hsv / hsv_to_rgb, GaussianBlur2d) written here from their source."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import torch
import torch.nn.functional as F

from lqseg_jax.systems import uda_augment as aug
from lqseg_jax.systems.base import cross_entropy
from lqseg_jax.train.optim import build_optimizer, default_config, warmup_linear_schedule


def nchw(x):
    return torch.from_numpy(np.asarray(x, np.float32)).permute(0, 3, 1, 2)


def nhwc(t):
    return t.permute(0, 2, 3, 1).numpy()


# ------------------------------------------------------------------------------- kornia 0.5.8, in torch
def k_rgb_to_hsv(image, eps=1e-6):
    maxc, _ = image.max(-3)
    maxc_mask = image == maxc.unsqueeze(-3)
    _, max_indices = ((maxc_mask.cumsum(-3) == 1) & maxc_mask).max(-3)
    minc = image.min(-3)[0]
    v = maxc
    deltac = maxc - minc
    s = deltac / (v + eps)
    deltac = torch.where(deltac == 0, torch.ones_like(deltac), deltac)
    maxc_tmp = maxc.unsqueeze(-3) - image
    rc, gc, bc = maxc_tmp[..., 0, :, :], maxc_tmp[..., 1, :, :], maxc_tmp[..., 2, :, :]
    h = torch.stack([bc - gc, 2.0 * deltac + rc - bc, 4.0 * deltac + gc - rc], dim=-3)
    h = torch.gather(h, dim=-3, index=max_indices[..., None, :, :]).squeeze(-3) / deltac
    h = 2 * math.pi * ((h / 6.0) % 1.0)
    return torch.stack([h, s, v], dim=-3)


def k_hsv_to_rgb(image):
    h, s, v = image[..., 0, :, :] / (2 * math.pi), image[..., 1, :, :], image[..., 2, :, :]
    hi = torch.floor(h * 6) % 6
    f = ((h * 6) % 6) - hi
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    hi = hi.long()
    indices = torch.stack([hi, hi + 6, hi + 12], dim=-3)
    out = torch.stack((v, q, p, p, t, v, t, v, v, q, p, p, p, p, t, v, v, q), dim=-3)
    return torch.gather(out, -3, indices)


def k_color_jitter(img, b, c, s, h, order):
    """kornia 0.5.8 ColorJitter.apply_transform on one image (1, 3, H, W)."""
    ops = [
        lambda x: torch.clamp(x + (b - 1), 0.0, 1.0),
        lambda x: torch.clamp(x * c, 0.0, 1.0),
        lambda x: k_hsv_to_rgb(torch.cat([k_rgb_to_hsv(x)[:, :1], torch.clamp(k_rgb_to_hsv(x)[:, 1:2] * s, 0, 1),
                                          k_rgb_to_hsv(x)[:, 2:]], 1)),
        lambda x: k_hsv_to_rgb(torch.cat([torch.fmod(k_rgb_to_hsv(x)[:, :1] + h * 2 * math.pi, 2 * math.pi),
                                          k_rgb_to_hsv(x)[:, 1:]], 1)),
    ]  # fmt: skip
    for idx in order:
        img = ops[idx](img)
    return img


def k_gaussian_blur(img, sigma):
    """refign gaussian_blur with a given sigma: kornia GaussianBlur2d((ky, kx), (sigma, sigma), 'reflect')."""

    def kernel1d(n):
        x = torch.arange(n, dtype=torch.float32) - n // 2
        g = torch.exp(-(x**2) / (2 * sigma**2))
        return g / g.sum()

    ky = int(np.floor(np.ceil(0.1 * img.shape[2]) - 0.5 + np.ceil(0.1 * img.shape[2]) % 2))
    kx = int(np.floor(np.ceil(0.1 * img.shape[3]) - 0.5 + np.ceil(0.1 * img.shape[3]) % 2))
    k2 = torch.matmul(kernel1d(ky).unsqueeze(-1), kernel1d(kx).unsqueeze(-1).t())  # (ky, kx)
    padded = F.pad(img, [kx // 2, kx // 2, ky // 2, ky // 2], mode="reflect")
    c = img.shape[1]
    return F.conv2d(padded, k2[None, None].expand(c, 1, ky, kx), groups=c)


# -------------------------------------------------------------------------------------------- tests
def test_ema_momentum_and_update_over_steps():
    m = [float(aug.ema_momentum(t)) for t in (0, 1, 2, 9, 998, 999, 5000)]
    np.testing.assert_allclose(m, [0.0, 0.5, 2 / 3, 0.9, 1 - 1 / 999, 0.999, 0.999], rtol=1e-6)
    rng = np.random.default_rng(0)
    student = [rng.normal(size=(5,)).astype(np.float32) for _ in range(6)]
    teacher_t = torch.from_numpy(rng.normal(size=(5,)).astype(np.float32))
    teacher_j = {"w": jnp.asarray(teacher_t.numpy())}
    for t, s in enumerate(student):  # refign update_momentum_encoder, one call per step
        mt = min(1.0 - 1 / (float(t) + 1.0), 0.999)
        teacher_t = teacher_t * mt + torch.from_numpy(s) * (1.0 - mt)
        teacher_j = aug.ema_update(teacher_j, {"w": jnp.asarray(s)}, aug.ema_momentum(t))
        if t == 0:  # m = 0: teacher := student
            np.testing.assert_array_equal(np.asarray(teacher_j["w"]), s)
    np.testing.assert_allclose(np.asarray(teacher_j["w"]), teacher_t.numpy(), rtol=1e-6, atol=1e-7)


def test_classmix_candidates_from_whole_batch_with_255():
    k = 5
    labels = np.zeros((2, 8, 8), np.uint8)
    labels[0, :, :4] = 1
    labels[0, :2] = 255  # ignore pixels only in image 0
    labels[1, :, 4:] = 3  # image 1: classes 0, 3
    present = [0, 1, 3, 255]  # torch.unique(whole batch): n = 4, choose 2 per image
    choose = jax.jit(jax.vmap(lambda s, per_image: aug.classmix_choice(jax.random.key(s), jnp.asarray(labels), k,
                                                                       per_image), (0, None)), static_argnums=1)  # fmt: skip
    all_chosen = np.asarray(choose(jnp.arange(300), False))  # (300, 2, k + 1)
    assert (all_chosen.sum(2) == 2).all()
    assert not all_chosen[:, :, [2, 4]].any()
    counts = all_chosen.sum(0)
    masks = np.asarray(
        jax.jit(jax.vmap(lambda c: aug.class_masks(jnp.asarray(labels), c, k)))(all_chosen[:8])
    )
    for chosen, mask in zip(all_chosen[:8], masks):
        for i in range(2):  # generate_class_mask: label == any chosen class (255 <-> slot k)
            classes = [c if c < k else 255 for c in np.flatnonzero(chosen[i])]
            t_lab = torch.from_numpy(labels[i].astype(np.int64))
            np.testing.assert_array_equal(
                mask[i], t_lab.eq(torch.tensor(classes)[:, None, None]).sum(0).numpy()
            )
    freq = counts / 300  # every candidate (255 and classes absent from the image included) with p = 1/2
    for c in (0, 1, 3, 5):
        assert np.all(np.abs(freq[:, c] - 0.5) < 0.1), freq
    # per-image choice: image 1 has 2 candidates (0, 3) -> 1 chosen among them
    per_image = np.asarray(choose(jnp.arange(20), True))
    assert (per_image.sum(2) == [2, 1]).all()  # image 0: {0, 1, 255} -> 2
    assert not per_image[:, 1, [1, 2, 4, 5]].any()
    assert len(present) == 4


def test_color_jitter_matches_kornia_058_formulas():
    rng = np.random.default_rng(1)
    b = 6
    x = rng.random((b, 7, 9, 3)).astype(np.float32)
    x[0, 0, 0] = 0.5  # grey: delta 0
    x[0, 0, 1] = [0.7, 0.7, 0.2]  # tied maximum
    x[1] = np.clip(x[1] * 1.5, 0, 1)  # saturated values
    params = dict(
        brightness=rng.uniform(0.8, 1.2, b).astype(np.float32),
        contrast=rng.uniform(0.8, 1.2, b).astype(np.float32),
        saturation=rng.uniform(0.8, 1.2, b).astype(np.float32),
        hue=rng.uniform(-0.2, 0.2, b).astype(np.float32),
        order=np.stack([rng.permutation(4) for _ in range(b)]).astype(np.int32),
    )
    ours = np.asarray(
        jax.jit(aug.color_jitter)(jnp.asarray(x), {k: jnp.asarray(v) for k, v in params.items()})
    )
    xt = nchw(x)
    for i in range(b):
        ref = k_color_jitter(
            xt[i : i + 1], *(float(params[n][i]) for n in ("brightness", "contrast", "saturation", "hue")),
            params["order"][i].tolist(),
        )  # fmt: skip
        np.testing.assert_allclose(ours[i], nhwc(ref)[0], atol=2e-6)
    hsv = np.asarray(jax.jit(aug.rgb_to_hsv)(jnp.asarray(x)))
    np.testing.assert_allclose(hsv, nhwc(k_rgb_to_hsv(xt)), atol=2e-6)
    # the drawn factors lie in kornia's ranges, the orders are permutations
    p = jax.jit(aug.jitter_params, static_argnums=(1, 2))(jax.random.key(0), 64, 0.2)
    for n, (lo, hi) in dict(
        brightness=(0.8, 1.2), contrast=(0.8, 1.2), saturation=(0.8, 1.2), hue=(-0.2, 0.2)
    ).items():
        assert float(p[n].min()) >= lo and float(p[n].max()) <= hi and float(p[n].std()) > 0.05
    assert (np.sort(np.asarray(p["order"]), 1) == np.arange(4)).all()


def test_gaussian_blur_kernel_rule_and_values():
    assert [aug.blur_kernel_size(s) for s in (512, 1024, 540, 64, 32, 96)] == [51, 103, 53, 7, 3, 9]
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, 32, 64, 3)).astype(np.float32)
    sigma = np.array([0.15, 1.1], np.float32)
    ours = np.asarray(jax.jit(aug.gaussian_blur)(jnp.asarray(x), jnp.asarray(sigma)))
    for i in range(2):
        ref = k_gaussian_blur(nchw(x[i : i + 1]), float(sigma[i]))
        np.testing.assert_allclose(ours[i], nhwc(ref)[0], atol=1e-5)


def test_strong_augment_gates_and_normalisation():
    mean, std = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)
    rng = np.random.default_rng(3)
    x = ((rng.random((2, 32, 32, 3)) * 255 - np.array(mean)) / np.array(std)).astype(np.float32)
    params = dict(brightness=np.array([1.1, 0.9]), contrast=np.array([0.85, 1.15]),
                  saturation=np.array([1.2, 0.8]), hue=np.array([0.1, -0.15]),
                  order=np.array([[0, 1, 2, 3], [3, 2, 1, 0]]))  # fmt: skip
    jp = {k: jnp.asarray(v, jnp.int32 if k == "order" else jnp.float32) for k, v in params.items()}
    sigma = jnp.asarray([0.5, 1.0], jnp.float32)
    off = aug.strong_augment(jnp.asarray(x), mean, std, jp, sigma, jnp.bool_(False), jnp.bool_(False))
    np.testing.assert_array_equal(np.asarray(off), x)
    on = np.asarray(
        aug.strong_augment(jnp.asarray(x), mean, std, jp, sigma, jnp.bool_(True), jnp.bool_(True))
    )
    m_t, s_t = torch.tensor(mean).view(1, 3, 1, 1) / 255, torch.tensor(std).view(1, 3, 1, 1) / 255
    for i in range(2):  # refign: denorm (mean/std in [0, 1] units) -> jitter -> renorm -> blur
        d = nchw(x[i : i + 1]) * s_t.float() + m_t.float()
        j = k_color_jitter(d, *(float(params[n][i]) for n in ("brightness", "contrast", "saturation", "hue")),
                           params["order"][i].tolist())  # fmt: skip
        ref = k_gaussian_blur((j - m_t.float()) / s_t.float(), float(sigma[i]))
        np.testing.assert_allclose(on[i], nhwc(ref)[0], atol=2e-5)


def test_pseudo_weight_is_one_scalar_for_the_batch():
    rng = np.random.default_rng(4)
    logits = (rng.normal(size=(2, 5, 6, 4)) * 4).astype(np.float32)
    probs = torch.softmax(torch.from_numpy(logits).permute(0, 3, 1, 2), 1)
    pp, _ = torch.max(probs, dim=1)
    expected = torch.sum(pp.ge(0.968).long() == 1) / torch.numel(pp)
    ours = aug.pseudo_weight(jax.nn.softmax(jnp.asarray(logits), -1), 0.968)
    assert 0 < float(expected) < 1
    np.testing.assert_allclose(float(ours), float(expected), rtol=1e-6)


def _t_downscale_label_ratio(gt, scale_factor, min_ratio, n_classes, ignore_index=255):
    out = gt.clone()
    out[out == ignore_index] = n_classes
    out = F.one_hot(out.squeeze(1), num_classes=n_classes + 1).permute(0, 3, 1, 2)
    out = F.avg_pool2d(out.float(), kernel_size=scale_factor)
    gt_ratio, out = torch.max(out, dim=1, keepdim=True)
    out[out == n_classes] = ignore_index
    out[gt_ratio < min_ratio] = ignore_index
    return out


def test_feature_distance_and_its_gradient_at_zero():
    rng = np.random.default_rng(5)
    k, s = 6, 8
    labels = rng.integers(0, k, (2, 4, 6)).repeat(s, 1).repeat(s, 2).astype(np.uint8)  # (2, 32, 48)
    labels[:, :5] = 255
    labels[0, 8:16, 8:11] = 2  # share 3/8 of a block -> below 0.75 -> 255
    low = np.asarray(aug.downscale_label_ratio(jnp.asarray(labels), s, 0.75, k))
    ref = _t_downscale_label_ratio(torch.from_numpy(labels.astype(np.int64))[:, None], s, 0.75, k)[
        :, 0
    ].numpy()
    np.testing.assert_array_equal(low, ref)
    assert (low == 255).any() and (low != 255).any()

    f_i = rng.normal(size=(2, 4, 6, 16)).astype(np.float32)
    f_s = f_i + rng.normal(size=f_i.shape).astype(np.float32) * 0.1
    f_s[0, 1, 2] = f_i[0, 1, 2]  # an exact zero distance inside the mask
    mask = np.isin(low, [1, 2, 3])
    mask[0, 1, 2] = True
    fs_t = torch.from_numpy(f_s).permute(0, 3, 1, 2).requires_grad_()
    d = torch.norm(fs_t - torch.from_numpy(f_i).permute(0, 3, 1, 2), dim=1, p=2)
    loss_t = 0.005 * torch.mean(d[torch.from_numpy(mask)])
    loss_t.backward()

    def loss(fs):
        return 0.005 * aug.feature_distance(fs, jnp.asarray(f_i), jnp.asarray(mask))

    val, grad = jax.jit(jax.value_and_grad(loss))(jnp.asarray(f_s))
    np.testing.assert_allclose(float(val), loss_t.item(), rtol=1e-6)
    grad = np.asarray(grad)
    assert np.isfinite(grad).all() and np.all(grad[0, 1, 2] == 0)
    np.testing.assert_allclose(grad, fs_t.grad.permute(0, 2, 3, 1).numpy(), atol=1e-9)
    # all distances zero (the student at step 0 is the ImageNet encoder): finite, zero gradient
    g0 = jax.grad(loss)(jnp.asarray(f_i))
    assert np.all(np.asarray(g0) == 0)
    assert float(aug.feature_distance(jnp.asarray(f_s), jnp.asarray(f_i), jnp.zeros(mask.shape, bool))) == 0.0


def test_cross_entropy_mean_over_all_pixels_with_weights():
    rng = np.random.default_rng(6)
    logits = rng.normal(size=(2, 5, 7, 4)).astype(np.float32)
    labels = rng.integers(0, 4, (2, 5, 7)).astype(np.uint8)
    labels[0, :2] = 255
    weight = rng.random((2, 5, 7)).astype(np.float32)
    lt = torch.from_numpy(logits).permute(0, 3, 1, 2)
    yt = torch.from_numpy(labels.astype(np.int64))
    # refign losses.py: per-pixel CE (ignore -> 0) times the weight, mean over ALL pixels
    expected = torch.mean(
        F.cross_entropy(lt, yt, reduction="none", ignore_index=255) * torch.from_numpy(weight)
    )
    ours = cross_entropy(jnp.asarray(logits), jnp.asarray(labels), weight=jnp.asarray(weight))
    np.testing.assert_allclose(float(ours), float(expected), rtol=1e-6)


def test_warmup_linear_schedule_matches_refign_formula():
    for total in (40_000, 20_000):
        sched = warmup_linear_schedule(6e-4, total, warmup_steps=1500, warmup_ratio=1e-6)
        for t in (0, 1, 700, 1499, 1500, 1501, 20_000, total - 1, total):
            if t < 1500:
                expected = 6e-4 * (1 - (1 - t / 1500) * (1 - 1e-6))
            else:
                expected = 6e-4 * (1 - (t - 1500) / (total - 1500))
            np.testing.assert_allclose(float(sched(t)), expected, rtol=2e-5, atol=1e-14)


def test_adamw_groups_and_schedule_match_torch():
    """refign's optimiser: head 6e-4 / backbone 6e-5, wd 0.01 on weights, 0 on 1-D; the LR per step."""
    rng = np.random.default_rng(7)
    init = {
        "backbone": {"kernel": rng.normal(size=(3, 4)), "bias": rng.normal(size=4)},
        "head": {"kernel": rng.normal(size=(4, 2)), "bias": rng.normal(size=2)},
    }
    init = jax.tree.map(lambda a: a.astype(np.float32), init)
    cfg = default_config()
    cfg.lr, cfg.weight_decay = 6e-4, 0.01
    cfg.lr_mults = ((r"^backbone\.", 0.1),)
    cfg.schedule = ml_collections.ConfigDict(dict(kind="warmup_linear", warmup_steps=3, warmup_ratio=1e-6,
                                                  power=1.0, end_lr=0.0))  # fmt: skip
    total = 8
    tx, sched = build_optimizer(cfg, init, total)
    tp = {
        f"{g}.{n}": torch.nn.Parameter(torch.from_numpy(v.copy()))
        for g, d in init.items()
        for n, v in d.items()
    }
    groups = [
        dict(params=[tp["head.kernel"]], lr=6e-4, weight_decay=0.01),
        dict(params=[tp["head.bias"]], lr=6e-4, weight_decay=0.0),
        dict(params=[tp["backbone.kernel"]], lr=6e-5, weight_decay=0.01),
        dict(params=[tp["backbone.bias"]], lr=6e-5, weight_decay=0.0),
    ]
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8)
    base = [g["lr"] for g in opt.param_groups]

    def factor(t):  # refign lr_scheduler.py: warmup scales the base LR, then linear over t - W of T - W
        return 1 - (1 - t / 3) * (1 - 1e-6) if t < 3 else 1 - (t - 3) / (total - 3)

    params, state = init, tx.init(init)
    for t in range(6):
        grads = jax.tree.map(lambda a: rng.normal(size=a.shape).astype(np.float32), params)
        for g, b0 in zip(opt.param_groups, base):
            g["lr"] = b0 * factor(t)
        for key, p in tp.items():
            grp, name = key.split(".")
            p.grad = torch.from_numpy(np.asarray(grads[grp][name]))
        opt.step()
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        np.testing.assert_allclose(float(sched(t)), 6e-4 * factor(t), rtol=1e-5)
    for key, p in tp.items():
        grp, name = key.split(".")
        np.testing.assert_allclose(np.asarray(params[grp][name]), p.detach().numpy(), rtol=1e-6, atol=1e-7)


def test_teacher_dropout_switch_leaves_the_student_alone():
    """teacher_dropout=False (DAFormer/HRDA) turns off the teacher's dropout and drop-path only."""
    from flax import nnx

    from lqseg_jax.models.layers import DropPath
    from lqseg_jax.models.segmentor import EncoderDecoder
    from lqseg_jax.systems.uda import UDAModel, _no_dropout

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.lin = nnx.Linear(2, 2, rngs=rngs)
            self.dropout = nnx.Dropout(0.5, rngs=rngs)
            self.drop_path = DropPath(0.5, rngs=rngs)

    rngs = nnx.Rngs(0)
    model = UDAModel(EncoderDecoder(Net(rngs), Net(rngs)), EncoderDecoder(Net(rngs), Net(rngs)), None)
    model.train()
    _no_dropout(model.m_backbone, model.m_head)
    for name in ("m_backbone", "m_head"):
        net = getattr(model, name)
        assert net.dropout.deterministic and net.drop_path.deterministic
    for name in ("backbone", "head"):
        net = getattr(model, name)
        assert not net.dropout.deterministic and not net.drop_path.deterministic
