"""Refign inside the UDA step (lqseg_jax/systems/uda.py with config.uda.refign; configs/refign.py:tiny, i.e.
ablation row 6, at 32x32 crops with the stand-in segmentation networks of test_uda_step and the config's
tiny random UAWarpC): the target step's two branches (adapt to the reference: the teacher's softmax on the
reference alone, which replaces the target in the mix; else the teacher once on target + reference, its BN
seeing both, the reference logits aligned by the frozen UAWarpC in eval mode, refined); the system trains
through the Trainer with the alignment network and its BN statistics untouched and resumes bit for bit; an
empty alignment path is refused unless allowed."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lqseg_jax import systems
from lqseg_jax.data_pipelines import synthetic_adverse
from lqseg_jax.data_pipelines.streams import train_stream
from lqseg_jax.models.uawarpc import align
from lqseg_jax.systems.base import normalize
from lqseg_jax.systems.refign import refine
from lqseg_jax.systems.uda import ADAPT_TO_REF_STREAM, AlignmentNet, UDASystem
from lqseg_jax.train.config import load_config
from lqseg_jax.train.trainer import Trainer
from tests.helpers import save_and_restore
from tests.systems.test_uda_train import StandInRandomDraws, _leaves

SIZE = (32, 32)


@pytest.fixture
def config(tmp_path_factory, monkeypatch):
    monkeypatch.setitem(
        systems.SYSTEMS, "refign_standin", f"{StandInRandomDraws.__module__}:StandInRandomDraws"
    )
    root = synthetic_adverse.write_dataset(
        tmp_path_factory.mktemp("synthetic_adverse"), num_source=(8, 2), num_target=(4, 2),
        conditions=("night",), height=40, width=48, progress=False,
    )  # fmt: skip
    c = load_config("configs/refign.py:tiny")
    c.system = "refign_standin"
    c.data.root, c.data.target_root = str(root / "cityscapes"), str(root / "acdc")
    c.data.crop = SIZE
    c.data.num_threads = 1
    c.uda.pseudo_threshold = 0.15  # a random-init teacher is never 0.968-confident
    c.optimizer.schedule.warmup_steps = 0
    c.checkpoint.async_save = False
    return c


def _flat(tree) -> dict[str, np.ndarray]:
    """The arrays of a state by dotted path (RNG keys left out)."""
    out = {}
    for path, v in nnx.to_flat_state(tree):
        x = v.get_value()
        if not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            out[".".join(map(str, path))] = np.asarray(x)
    return out


def _part(state, prefix: str) -> dict[str, np.ndarray]:
    return {k: v for k, v in _flat(state).items() if k.startswith(prefix)}


def _coin_key(value: bool) -> jax.Array:
    """A loss rng whose adapt-to-reference draw (p 0.5) comes out `value`."""
    for seed in range(100):
        key = jax.random.key(seed)
        if bool(jax.random.uniform(jax.random.fold_in(key, ADAPT_TO_REF_STREAM)) < 0.5) == value:
            return key
    raise AssertionError("no key found")


def test_target_branches_adapt_to_ref_and_align_refine(config):
    trainer = Trainer(config)
    system = trainer.system
    r = config.uda.refign
    assert r.use_refign and r.use_align and r.adapt_to_ref and r.gamma == 0.25 and not r.alignment.path
    model = nnx.merge(trainer.graphdef, *jax.device_get((lambda s: (s.params, s.rest))(trainer.init_state())))
    # a random UAWarpC maps every pixel near the image centre (all matches valid): shift its coarsest mapping
    # so that some matches fall outside the reference and the warp mask has both values
    bias = model.alignment_head.decoder4.predict_mapping.bias
    bias.set_value(bias.get_value() + 1.0)
    rng = np.random.default_rng(0)
    batch = {
        "image_trg": jnp.asarray(rng.integers(0, 256, (8, *SIZE, 3)).astype(np.uint8)),
        "image_ref": jnp.asarray(np.roll(rng.integers(0, 256, (8, *SIZE, 3)), 3, axis=2).astype(np.uint8)),
    }

    @nnx.jit
    def run(model, batch, key_ref, key_trg):
        m_ref, m_trg, m_plain, m_cat = (nnx.clone(model) for _ in range(4))
        x1, p1, met1 = system.target_probs(m_ref, batch, key_ref, SIZE)
        x0, p0, met0 = system.target_probs(m_trg, batch, key_trg, SIZE)
        x_t, x_r = (
            normalize(batch[k], config.data.mean, config.data.std) for k in ("image_trg", "image_ref")
        )
        want1 = jax.nn.softmax(system._teacher(m_plain, x_r, SIZE), -1)  # teacher on the 8 references alone
        logits = system._teacher(m_cat, jnp.concatenate([x_t, x_r]), SIZE)  # one forward on 16 images
        net = AlignmentNet(m_cat.alignment_backbone, m_cat.alignment_head)
        net.eval()
        warped, valid, conf = align(net, x_t, x_r, logits[8:])
        want0 = refine(
            logits[:8], warped, valid, conf, gamma=r.gamma, static_classes=r.static_classes
        )  # row 6: M and P on
        bn = lambda m: m.m_head.fuse.bn.mean.get_value()  # noqa: E731
        return dict(
            x1=x1, p1=p1, x0=x0, p0=p0, want1=want1, want0=want0, x_t=x_t, x_r=x_r, valid=valid,
            coin1=met1["adapted_to_ref"], coin0=met0["adapted_to_ref"],
            bn_ref=bn(m_ref), bn_plain=bn(m_plain), bn_trg=bn(m_trg), bn_cat=bn(m_cat), bn0=bn(model),
            align_trg=nnx.state(m_trg.alignment_head, nnx.BatchStat),
        )  # fmt: skip

    out = jax.device_get(run(model, batch, _coin_key(True), _coin_key(False)))
    assert out["coin1"] == 1.0 and out["coin0"] == 0.0
    # adapt to the reference: the mix's target images are the references, the teacher saw them alone
    np.testing.assert_array_equal(out["x1"], out["x_r"])
    np.testing.assert_allclose(out["p1"], out["want1"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(out["bn_ref"], out["bn_plain"], rtol=0, atol=1e-7)
    # else: target images, refined probabilities from one teacher forward on cat[target, reference]
    np.testing.assert_array_equal(out["x0"], out["x_t"])
    np.testing.assert_allclose(out["p0"], out["want0"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(out["bn_trg"], out["bn_cat"], rtol=0, atol=1e-7)
    assert not np.allclose(out["bn_trg"], out["bn0"]) and not np.allclose(out["bn_trg"], out["bn_ref"])
    assert 0.0 < out["valid"].mean() < 1.0  # the random alignment leaves pixels both sides of the mask
    assert not np.allclose(out["p0"], out["want1"], atol=1e-3)  # the branches differ
    # the alignment's BN statistics stay as they were (eval mode)
    before = _flat(nnx.state(model.alignment_head, nnx.BatchStat))
    for k, v in _flat(out["align_trg"]).items():
        np.testing.assert_array_equal(v, before[k], err_msg=k)


def _run(trainer, state, it, start, n):
    coins, metrics = [], None
    for t in range(start, start + n):
        state, metrics = trainer.train_step(state, trainer.device_batch(next(it)), trainer.step_rng(t))
        metrics = jax.device_get(metrics)
        assert all(np.isfinite(v) for v in metrics.values()), metrics
        coins.append(float(metrics["adapted_to_ref"]))
    return state, metrics, coins


def test_refign_step_trains_keeps_the_alignment_frozen_and_resumes(config, tmp_path):
    trainer = Trainer(config)
    init = trainer.init_state()
    params0, rest0 = _flat(init.params), _flat(init.rest)
    assert not any(k.startswith("alignment") for k in params0)  # frozen: not trained
    align0 = {k: v for k, v in rest0.items() if k.startswith("alignment")}
    assert any(k.startswith("alignment_head") and k.endswith(".mean") for k in align0)  # BN stats carried

    straight, metrics, coins = _run(trainer, trainer.init_state(), iter(train_stream(config).dataset), 0, 4)
    assert metrics["loss_mix"] > 0 and metrics["loss_fd"] >= 0
    assert set(coins) == {0.0, 1.0}, coins  # both branches taken in these 4 steps (seed 0)
    params, rest = _flat(straight.params), _flat(straight.rest)
    assert not np.array_equal(params["head.conv_seg.kernel"], params0["head.conv_seg.kernel"])  # trained
    assert not np.array_equal(rest["m_head.fuse.bn.mean"], rest0["m_head.fuse.bn.mean"])  # teacher BN moved
    for k, v in align0.items():  # the alignment's parameters and BN statistics untouched
        np.testing.assert_array_equal(rest[k], v, err_msg=k)

    it = iter(train_stream(config).dataset)
    half, _, first = _run(trainer, trainer.init_state(), it, 0, 2)
    trainer2, restored, it2 = save_and_restore(config, half, it, 2, tmp_path)
    resumed, _, second = _run(trainer2, restored, it2, 2, 2)
    assert first + second == coins  # the coin replays
    for a, b in zip(_leaves(straight), _leaves(resumed), strict=True):
        np.testing.assert_array_equal(a, b)


def test_empty_alignment_path_is_refused_unless_allowed(config):
    config.uda.refign.alignment.allow_random = False
    with pytest.raises(ValueError, match=r"^config.uda.refign.alignment.path is empty"):
        Trainer(config).init_state()


def test_refign_hrda_step_trains(tmp_path_factory, monkeypatch):
    """Refign-HRDA* (configs/hrda.py:tiny with the stand-in networks of test_hrda_step): the teacher's sliding
    forward runs on target + reference together; two steps train with finite losses."""
    monkeypatch.setitem(systems.SYSTEMS, "hrda_standin", "tests.systems.test_hrda_step:HRDAStandIn")
    root = synthetic_adverse.write_dataset(
        tmp_path_factory.mktemp("synthetic_adverse"), num_source=(8, 2), num_target=(4, 2),
        conditions=("night",), height=72, width=80, progress=False,
    )  # fmt: skip
    c = load_config("configs/hrda.py:tiny")
    assert c.uda.refign.use_refign and c.uda.refign.use_align and c.model.hrda.enabled
    c.system = "hrda_standin"
    c.data.root, c.data.target_root = str(root / "cityscapes"), str(root / "acdc")
    c.data.crop = (64, 64)  # context and detail 32: the stand-in encoder's last stage is 1x1
    c.data.num_threads = 1
    c.uda.pseudo_threshold = 0.15
    c.uda.fdist.classes = tuple(range(10))
    c.uda.fdist.min_ratio = 0.0
    c.optimizer.schedule.warmup_steps = 0
    trainer = Trainer(c)
    _, metrics, coins = _run(trainer, trainer.init_state(), iter(train_stream(c).dataset), 0, 2)
    assert metrics["loss_mix"] > 0 and len(coins) == 2


def test_pretrained_whole_refign_folder_and_alignment_folder(tmp_path):
    """model.pretrained.path = a whole converted Refign checkpoint (format refign-uda) fills every group as
    saved, the alignment included, with no alignment path; else uda.refign.alignment.path = a converted
    UAWarpC folder fills alignment_backbone / alignment_head (configs/refign.py:tiny, MiT-B0, no step)."""
    from lqseg_jax.convert.common import save_converted
    from lqseg_jax.convert.refign import FORMAT, GROUPS, model_layout
    from lqseg_jax.models.uawarpc import UAWarpC

    c = load_config("configs/refign.py:tiny")
    c.uda.refign.alignment.allow_random = False
    source = UDASystem(c).build_model(nnx.Rngs(params=7, dropout=8))  # other weights than seed 0's
    kernel = source.m_head.conv_seg.kernel
    kernel.set_value(kernel.get_value() + 1.0)  # a teacher that is no copy of the student
    groups = [g for g in GROUPS if getattr(source, g) is not None]
    whole = save_converted(
        tmp_path / "whole", source, dict(format=FORMAT, source="test", groups=groups, **model_layout(source))
    )
    c.model.pretrained.path = str(whole)
    init = Trainer(c).init_state()
    got, want = _flat(init.params) | _flat(init.rest), _flat(nnx.state(source, (nnx.Param, nnx.BatchStat)))
    keys = ("backbone.patch_embed1.proj.kernel", "m_head.conv_seg.kernel",
            "imnet_backbone.block1.0.attn.q.kernel", "alignment_head.decoder4.predict_mapping.bias")  # fmt: skip
    for k in keys:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)

    a = c.uda.refign.alignment
    net = UAWarpC(
        False,
        vgg_widths=tuple(a.vgg_widths),
        coarse_size=a.coarse_size,
        head_width=a.head_width,
        rngs=nnx.Rngs(3),
    )
    c.model.pretrained.path = ""
    c.uda.refign.alignment.path = str(save_converted(tmp_path / "uawarpc", net, dict(source="test")))
    rest = _flat(Trainer(c).init_state().rest)
    want = _flat(nnx.state(net, (nnx.Param, nnx.BatchStat)))
    assert want.keys() == {k for k in rest if k.startswith("alignment")}
    for k, v in want.items():
        np.testing.assert_array_equal(rest[k], v, err_msg=k)
