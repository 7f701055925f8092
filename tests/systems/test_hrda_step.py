"""HRDA options of the UDA system (lqseg_jax/systems/uda.py with config.model.hrda;
configs/hrda.py:tiny,no_refign with the stand-in four-level encoder and BatchNorm head of
tests/models/test_hrda.py, so the test stays small): the HRDA cross-entropy is 0.9 CE(fused) + 0.1
CE(detail, labels and pixel weights cropped to the box) against torch's cross-entropy, the feature distance
compares the context features with the ImageNet encoder on the x0.5 image, and the system trains on the
synthetic paired data through the Trainer, a stop + checkpoint + resume replaying the same steps bit for bit
(scale attention and its EMA copy included)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

from lqseg_jax import systems
from lqseg_jax.data_pipelines import synthetic_adverse
from lqseg_jax.data_pipelines.streams import train_stream
from lqseg_jax.eval.inference import predict_at_label_size
from lqseg_jax.models import hrda
from lqseg_jax.models.segmentor import EncoderDecoder
from lqseg_jax.systems.uda import UDASystem
from lqseg_jax.train.config import load_config
from lqseg_jax.train.trainer import Trainer
from tests.helpers import save_and_restore
from tests.models.test_hrda import CH, Encoder, Head
from tests.systems.test_uda_train import _leaves, _steps


class HRDAStandIn(UDASystem):
    def build_network(self, rngs):
        return EncoderDecoder(Encoder(rngs), Head(rngs, self.config.model.num_classes))

    def build_encoder(self, rngs):
        return Encoder(rngs)

    def build_scale_attention(self, rngs):
        return hrda.SegFormerHead(CH, self.config.model.num_classes, channels=16, rngs=rngs)


@pytest.fixture
def config(tmp_path_factory, monkeypatch):
    monkeypatch.setitem(systems.SYSTEMS, "hrda_standin", f"{__name__}:HRDAStandIn")
    root = synthetic_adverse.write_dataset(
        tmp_path_factory.mktemp("synthetic_adverse"), num_source=(8, 2), num_target=(4, 2),
        conditions=("night",), height=72, width=80, progress=False,
    )  # fmt: skip
    c = load_config("configs/hrda.py:tiny,no_refign")
    c.system = "hrda_standin"
    c.data.root, c.data.target_root = str(root / "cityscapes"), str(root / "acdc")
    c.data.crop = (64, 64)  # context and detail 32: the stand-in encoder's last stage is 1x1
    c.data.num_threads = 1
    c.uda.pseudo_threshold = 0.15  # a random-init teacher is never 0.968-confident
    c.uda.fdist.classes = tuple(range(10))  # the stand-in's 1x1 last stage: any class may own the crop
    c.uda.fdist.min_ratio = 0.0
    c.optimizer.schedule.warmup_steps = 0
    c.checkpoint.async_save = False
    return c


def _torch_ce(logits, labels, weight=None):
    """refign PixelWeightedCrossEntropyLoss: per-pixel CE, ignore 255 -> 0, times weight, mean over all."""
    t = torch.from_numpy(np.asarray(logits).transpose(0, 3, 1, 2).copy())
    loss = F.cross_entropy(t, torch.from_numpy(np.asarray(labels).astype(np.int64)), ignore_index=255,
                           reduction="none")  # fmt: skip
    if weight is not None:
        loss = loss * torch.from_numpy(np.asarray(weight))
    return float(loss.mean())


def test_hrda_loss_weights_and_feature_distance(config):
    system = HRDAStandIn(config)
    model = system.build_model(nnx.Rngs(params=0, dropout=1))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 64, 64, 3)).astype(np.float32))
    y = rng.integers(0, 10, (2, 64, 64)).astype(np.uint8)
    y[:, :16] = 255
    w = rng.uniform(0, 1, (2, 64, 64)).astype(np.float32)
    key = jax.random.key(5)

    logits, detail, _ = system._student(nnx.clone(model), x, (64, 64), key)
    hr_logits, offset = detail
    oy, ox = (int(v) for v in offset)
    assert (oy, ox) != (0, 0)
    want = 0.9 * _torch_ce(logits, y, w) + 0.1 * _torch_ce(
        hr_logits, y[:, oy : oy + 32, ox : ox + 32], w[:, oy : oy + 32, ox : ox + 32]
    )
    got = float(system._cross_entropy(logits, detail, jnp.asarray(y), weight=jnp.asarray(w)))
    np.testing.assert_allclose(got, want, rtol=1e-5)

    # feature distance: student context features (stride 32 of the 32x32 context: 1x1) vs the ImageNet
    # encoder on the x0.5 image; the label pooled 64x64 -> 1x1: image 0 a feature-distance class, image 1
    # ignored
    y_fd = np.full((2, 64, 64), 6, np.uint8)
    y_fd[1] = 255
    for conv in model.imnet_backbone.convs:  # the ImageNet side starts as a copy of the student: move it
        conv.kernel.set_value(conv.kernel.get_value() * 1.1)
    terms = system._source_terms(nnx.clone(model), x, jnp.asarray(y_fd), key)
    _, _, _, lr_feats = hrda.student_forward(
        nnx.clone(model).backbone, nnx.clone(model).head, nnx.clone(model).hrda_scale_attention, x, key
    )
    x_half = F.interpolate(torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy()), scale_factor=0.5,
                           mode="bilinear", align_corners=False).numpy().transpose(0, 2, 3, 1)  # fmt: skip
    f_i = np.asarray(model.imnet_backbone(jnp.asarray(x_half))[-1])  # (2, 1, 1, 20)
    f_s = np.asarray(lr_feats[-1])
    assert f_s.shape == f_i.shape == (2, 1, 1, CH[-1])
    want_fd = config.uda.fdist.weight * np.linalg.norm(f_s[0, 0, 0] - f_i[0, 0, 0])  # image 0 only
    np.testing.assert_allclose(float(terms["loss_fd"]), want_fd, rtol=1e-5)


def test_hrda_trains_resumes_and_predicts(config, tmp_path):
    trainer = Trainer(config)
    init = trainer.init_state()
    model0 = nnx.merge(trainer.graphdef, init.params, init.rest)
    sa_teacher0 = np.asarray(model0.m_hrda_scale_attention.linear_pred.kernel[...]).copy()
    assert any("hrda_scale_attention" in str(p) for p, _ in nnx.to_flat_state(init.params))
    straight, metrics = _steps(trainer, trainer.init_state(), iter(train_stream(config).dataset), 0, 4)
    assert all(np.isfinite(v) for v in metrics.values()), metrics
    assert metrics["loss_fd"] > 0 and metrics["loss_mix"] > 0

    it = iter(train_stream(config).dataset)
    half, _ = _steps(trainer, trainer.init_state(), it, 0, 2)
    trainer2, restored, it2 = save_and_restore(config, half, it, 2, tmp_path)
    resumed, _ = _steps(trainer2, restored, it2, 2, 2)
    for a, b in zip(_leaves(straight), _leaves(resumed), strict=True):
        np.testing.assert_array_equal(a, b)
    model = nnx.merge(trainer.graphdef, straight.params, straight.rest)
    teacher = np.asarray(model.m_hrda_scale_attention.linear_pred.kernel[...])
    assert not np.array_equal(teacher, sa_teacher0)  # the scale attention's EMA copy moved

    # evaluation: the student's HRDA window forward under sliding windows (eval.mode "slide")
    eval_model = trainer.model_from_state(straight)
    images = jnp.asarray(np.random.default_rng(1).integers(0, 256, (1, 72, 80, 3)).astype(np.uint8))
    hw = jnp.asarray([[72, 80]])
    preds = predict_at_label_size(
        lambda im: trainer.system.predict(eval_model, im), images, (72, 80), hw, hw,
        mode=config.eval.mode, crop=(64, 64), stride=(32, 32),
    )  # fmt: skip
    assert config.eval.mode == "slide" and preds.shape == (1, 72, 80)
