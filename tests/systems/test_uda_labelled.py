"""RobotCar's labelled target half (refign.md O8; refign combined_data_module.py on_before_batch_transfer,
transforms.py RandomRotation / ColorJitter / Normalize): torchvision ColorJitter on uint8 against a torch
re-statement of torchvision's tensor functions; the rotation's fill and rotated-in mask; the labelled
stream resumes exactly; and the step: with probability 0.5 per step the labelled images are dropped (the
step equals one on the source batch alone), otherwise it equals a step whose source batch is the source
followed by the labelled images with the rotated-in pixels zero after normalisation."""

import jax
import numpy as np
import pytest
import torch

from lqseg_jax import systems
from lqseg_jax.data_pipelines import paired, synthetic_adverse
from lqseg_jax.data_pipelines.streams import train_stream
from lqseg_jax.train.config import load_config
from lqseg_jax.train.mesh import make_mesh
from lqseg_jax.train.trainer import Trainer
from tests.systems.test_uda_step import FD_CLASSES, THRESHOLD, B, K, S, _batch


# ------------------------------------------------------ torchvision 0.11 functional_tensor, restated in torch
def tv_blend(a, b, ratio):
    return (ratio * a + (1.0 - ratio) * b).clamp(0, 255.0).to(a.dtype)


def tv_grey(img):  # (3, h, w) uint8 -> (1, h, w) uint8
    r, g, b = img.unbind(-3)
    return (0.2989 * r + 0.587 * g + 0.114 * b).to(img.dtype).unsqueeze(-3)


def tv_rgb2hsv(img):
    r, g, b = img.unbind(-3)
    maxc, minc = torch.max(img, -3).values, torch.min(img, -3).values
    eqc = maxc == minc
    cr = maxc - minc
    ones = torch.ones_like(maxc)
    s = cr / torch.where(eqc, ones, maxc)
    div = torch.where(eqc, ones, cr)
    rc, gc, bc = (maxc - r) / div, (maxc - g) / div, (maxc - b) / div
    hr = (maxc == r) * (bc - gc)
    hg = ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
    hb = ((maxc != g) & (maxc != r)) * (4.0 + gc - rc)
    h = torch.fmod((hr + hg + hb) / 6.0 + 1.0, 1.0)
    return torch.stack((h, s, maxc), -3)


def tv_hsv2rgb(img):
    h, s, v = img.unbind(-3)
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.to(torch.int32)
    p = torch.clamp(v * (1.0 - s), 0.0, 1.0)
    q = torch.clamp(v * (1.0 - s * f), 0.0, 1.0)
    t = torch.clamp(v * (1.0 - s * (1.0 - f)), 0.0, 1.0)
    i = i % 6
    mask = i.unsqueeze(-3) == torch.arange(6).view(-1, 1, 1)
    a1, a2, a3 = (
        torch.stack((v, q, p, p, t, v), -3),
        torch.stack((t, v, v, q, p, p), -3),
        torch.stack((p, p, t, v, v, q), -3),
    )
    return torch.einsum("...ijk, ...xijk -> ...xjk", mask.to(img.dtype), torch.stack((a1, a2, a3), -4))  # fmt: skip


def tv_color_jitter(img, order, factors):
    b, c, s, h = factors
    for op in order:
        if op == 0:
            img = tv_blend(img, torch.zeros_like(img), b)
        elif op == 1:
            img = tv_blend(img, torch.mean(tv_grey(img).to(torch.float32), dim=(-3, -2, -1), keepdim=True), c)
        elif op == 2:
            img = tv_blend(img, tv_grey(img), s)
        else:
            x = tv_rgb2hsv(img.to(torch.float32) / 255.0)
            hh, ss, vv = x.unbind(-3)
            img = (tv_hsv2rgb(torch.stack(((hh + h) % 1.0, ss, vv), -3)) * 255.0).to(torch.uint8)
    return img


def test_color_jitter_matches_torchvision_on_uint8():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (48, 40, 3)).astype(np.uint8)
    image[:8] = 77  # grey pixels (the hue's equal-max branch)
    mismatched, total = 0, 0
    for _ in range(12):
        order = rng.permutation(4)
        factors = (
            rng.uniform(0.75, 1.25),
            rng.uniform(0.75, 1.25),
            rng.uniform(0.75, 1.25),
            rng.uniform(-0.1, 0.1),
        )
        ours = paired.torchvision_color_jitter(image, order, factors).astype(np.int32)
        ref = tv_color_jitter(torch.from_numpy(image).permute(2, 0, 1), order.tolist(), factors)
        ref = ref.permute(1, 2, 0).numpy().astype(np.int32)
        assert np.abs(ours - ref).max() <= 1
        mismatched, total = mismatched + int((ours != ref).sum()), total + ours.size
        assert not np.array_equal(ours, image)
    # the contrast mean is summed in another order than torch's: a truncation may land 1 apart, rarely
    assert mismatched <= total * 1e-3, (mismatched, total)


def test_rotation_fills_and_marks_the_rotated_in_area():
    rng = np.random.default_rng(1)
    example = {"name": "x", "image": rng.integers(1, 256, (40, 48, 3)).astype(np.uint8),
               "label": rng.integers(0, K, (40, 48)).astype(np.uint8)}  # fmt: skip
    no_jitter = paired.LabelledTargetAugment(
        (40, 48), rotation=10.0, jitter=(0.0, 0.0, 0.0, 0.0), flip_prob=0.0
    )
    blanks = []
    for seed in range(6):
        out = no_jitter(example, np.random.default_rng(seed))
        blank = out["blank"]
        assert blank.dtype == bool and blank.shape == (40, 48)
        np.testing.assert_array_equal(out["label"] == 255, blank)  # labels had no 255
        np.testing.assert_array_equal(out["image"].max(-1) == 0, blank)  # images had no 0
        again = no_jitter(example, np.random.default_rng(seed))
        np.testing.assert_array_equal(again["image"], out["image"])
        blanks.append(blank.sum())
    assert max(blanks) > 20  # up to 10 degrees turns the corners in
    with pytest.raises(Exception, match="no label"):
        no_jitter({"name": "y", "image": example["image"]}, np.random.default_rng(0))


def test_labelled_stream_keys_and_exact_resume(tmp_path):
    root = synthetic_adverse.write_dataset(
        tmp_path,
        num_source=(4, 1),
        num_target=(4, 1),
        conditions=("night",),
        height=40,
        width=48,
        progress=False,
    )
    c = load_config("configs/refign.py:tiny,no_refign")
    c.data.root, c.data.target_root = str(root / "cityscapes"), str(root / "acdc")
    c.data.crop, c.data.num_threads, c.batch_size = (32, 32), 1, 2
    c.data.labelled_target.enabled = True
    it = iter(train_stream(c).dataset)
    first = [next(it) for _ in range(2)]
    state = it.get_state()
    rest = [next(it) for _ in range(2)]
    assert {"image_lab", "label_lab", "blank_lab"} <= set(first[0])
    assert first[0]["image_lab"].shape == (2, 32, 32, 3) and first[0]["blank_lab"].dtype == bool
    assert first[0]["label_lab"].shape == (2, 32, 32)
    it2 = iter(train_stream(c).dataset)
    it2.set_state(state)
    for a, b in zip(rest, [next(it2) for _ in range(2)]):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


# --------------------------------------------------------------------------------------------- the step
@pytest.fixture
def standin(monkeypatch):
    monkeypatch.setitem(systems.SYSTEMS, "uda_standin", "tests.systems.test_uda_step:StandInSystem")
    c = load_config("configs/refign.py:tiny,no_refign")
    c.system = "uda_standin"
    c.model.num_classes = K
    c.batch_size = B
    c.data.mean = (128.0, 128.0, 128.0)  # uint8 128 normalises to exactly 0: the zeroed pixels' stand-in
    c.uda.fdist.classes = FD_CLASSES
    c.uda.pseudo_threshold = THRESHOLD
    c.optimizer.schedule.warmup_steps = 0
    c.optimizer.lr = 1e-3
    return c


def _leaves(state):
    return [np.asarray(x) for x in jax.tree.leaves((state.params, state.rest, state.opt_state))
            if not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)]  # fmt: skip


def test_step_drops_the_labelled_half_with_p_half_or_appends_it(standin):
    trainer = Trainer(standin, mesh=make_mesh(1, 1, jax.devices()[:1]))
    base = _batch()
    rng = np.random.default_rng(5)
    lab = dict(
        image_lab=rng.integers(0, 256, (B, S, S, 3)).astype(np.uint8),
        label_lab=rng.integers(0, K, (B, S, S)).astype(np.uint8),
        blank_lab=np.zeros((B, S, S), bool),
    )
    lab["blank_lab"][:, :5, :7] = True
    lab["label_lab"][lab["blank_lab"]] = 255
    appended = dict(base)
    appended["image_src"] = np.concatenate(
        [base["image_src"], np.where(lab["blank_lab"][..., None], 128, lab["image_lab"])]
    )
    appended["label_src"] = np.concatenate([base["label_src"], lab["label_lab"]])  # fmt: skip

    def step(batch, t):
        state, metrics = trainer.train_step(
            trainer.init_state(), trainer.device_batch(batch), trainer.step_rng(t)
        )
        return _leaves(state), jax.device_get(metrics)

    seen = set()
    for t in range(8):
        ours, m = step({**base, **lab}, t)
        dropped = bool(m["labelled_dropped"])
        ref, rm = step(base if dropped else appended, t)
        for k in ("loss_src", "loss_fd", "loss_mix", "pixel_acc"):
            np.testing.assert_allclose(m[k], rm[k], rtol=1e-6, atol=1e-7, err_msg=f"t={t} {k}")
        for a, b in zip(ours, ref):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=f"t={t}")
        seen.add(dropped)
        if seen == {True, False}:
            break
    assert seen == {True, False}
