"""Mask2Former head vs transformers' PyTorch Mask2Former (random weights, tiny config), converters,
building blocks vs torch, and the full-size parameter count."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx
from transformers import Mask2FormerConfig as HFConfig
from transformers import Mask2FormerForUniversalSegmentation, SwinConfig
from transformers.models.mask2former import modeling_mask2former as hf

from lqseg_jax.convert.common import CheckpointError, to_numpy
from lqseg_jax.convert.mask2former import convert_detectron2, convert_transformers
from lqseg_jax.models.mask2former import Mask2FormerHead, rass_config, tiny_config
from lqseg_jax.models.mask2former.common import MultiheadAttention, sine_position_embedding

SWIN_CHANNELS = (16, 32, 64, 128)
# non-square maps; res2 -> res3 is an exact 2x, the attention masks resize by non-integer factors
SIZES = {"res2": (30, 22), "res3": (15, 11), "res4": (8, 6), "res5": (4, 3)}


def tiny_cfg(**kw):
    return tiny_config(in_channels=SWIN_CHANNELS, **kw)


@pytest.fixture(scope="module")
def hf_model():
    """transformers Mask2Former with a tiny Swin (never run) whose head matches tiny_cfg()."""
    cfg = tiny_cfg()
    swin = SwinConfig(
        embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], window_size=2, image_size=64,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )  # fmt: skip
    hf_cfg = HFConfig(
        backbone_config=swin,
        feature_size=cfg.conv_dim,
        mask_feature_size=cfg.mask_dim,
        hidden_dim=cfg.hidden_dim,
        encoder_feedforward_dim=cfg.enc_ffn_dim,
        encoder_layers=cfg.enc_layers,
        decoder_layers=cfg.dec_layers + 1,
        num_attention_heads=cfg.dec_heads,
        dim_feedforward=cfg.dec_ffn_dim,
        num_queries=cfg.num_queries,
        num_labels=cfg.num_classes,
    )
    torch.manual_seed(0)
    model = Mask2FormerForUniversalSegmentation(hf_cfg).eval()
    assert tuple(model.model.pixel_level_module.encoder.channels) == SWIN_CHANNELS
    with torch.no_grad():  # perturb every parameter: zero-initialised offsets/attention would hide bugs
        for name, p in model.named_parameters():
            if not name.startswith("model.pixel_level_module.encoder."):
                p.add_(0.1 * torch.randn_like(p))
        # a common offset in the mask features shifts whole mask-logit maps per query, so that some
        # attention rows are fully masked (the "attend everywhere" rule), others partly
        bias = model.model.pixel_level_module.decoder.mask_projection.bias
        bias.add_(2.0 * torch.randn_like(bias))
    return model


@pytest.fixture(scope="module")
def features():
    rng = np.random.default_rng(0)
    return {
        k: rng.normal(size=(2, *hw, c)).astype(np.float32) for (k, hw), c in zip(SIZES.items(), SWIN_CHANNELS)
    }


def hf_forward(model, feats):
    """Pixel decoder + transformer module + class predictor, bypassing the backbone (NCHW)."""
    with torch.no_grad():
        nchw = [torch.from_numpy(feats[k].transpose(0, 3, 1, 2)) for k in SIZES]
        pd = model.model.pixel_level_module.decoder(nchw)
        tm = model.model.transformer_module(
            multi_scale_features=pd.multi_scale_features,
            mask_features=pd.mask_features,
            output_hidden_states=True,
        )
        logits = [model.class_predictor(h.transpose(0, 1)).numpy() for h in tm.intermediate_hidden_states]
        masks = [m.numpy() for m in tm.masks_queries_logits]
    return pd, logits, masks


@pytest.fixture(scope="module")
def converted(hf_model):
    head = Mask2FormerHead(tiny_cfg(), nnx.Rngs(1))
    skipped = convert_transformers(head, hf_model.state_dict(), source="hf-tiny")
    assert "criterion.empty_weight" in skipped
    assert all(
        k.startswith("model.pixel_level_module.encoder.") for k in skipped if k != "criterion.empty_weight"
    )
    return head


@pytest.fixture(scope="module")
def ours(converted, features):
    """(pixel decoder outputs, head outputs) of the converted head, one jit."""

    @nnx.jit
    def run(head, feats):
        mask_features, multi_scale = head.pixel_decoder(feats)
        return (mask_features, multi_scale), head.predictor(multi_scale, mask_features)

    return run(converted, features)


def test_pixel_decoder_matches_transformers(hf_model, ours, features):
    pd, _, _ = hf_forward(hf_model, features)
    mask_features, multi_scale = ours[0]
    ref = pd.mask_features.numpy().transpose(0, 2, 3, 1)
    print(f"pixel decoder: max |diff| mask features {np.abs(np.asarray(mask_features) - ref).max():.2e}")
    np.testing.assert_allclose(np.asarray(mask_features), ref, atol=1e-4)
    assert len(multi_scale) == 3
    for x, ref in zip(multi_scale, pd.multi_scale_features):
        np.testing.assert_allclose(np.asarray(x), ref.numpy().transpose(0, 2, 3, 1), atol=1e-4)


def test_decoder_predictions_match_transformers_at_every_layer(hf_model, ours, features):
    _, ref_logits, ref_masks = hf_forward(hf_model, features)
    out = ours[1]
    preds = [*out["aux_outputs"], out]
    assert len(preds) == len(ref_logits) == tiny_cfg().dec_layers + 1
    for i, (p, rl, rm) in enumerate(zip(preds, ref_logits, ref_masks)):
        assert p["pred_logits"].shape == rl.shape and p["pred_masks"].shape == rm.transpose(0, 2, 3, 1).shape
        err_c = np.abs(np.asarray(p["pred_logits"]) - rl).max()
        err_m = np.abs(np.asarray(p["pred_masks"]) - rm.transpose(0, 2, 3, 1)).max()
        print(f"prediction {i}: max |diff| class logits {err_c:.2e}, mask logits {err_m:.2e}")
        assert err_c <= 1e-4 and err_m <= 1e-4, (
            f"prediction {i}: class diff {err_c:.2e}, mask diff {err_m:.2e}"
        )

    # the comparison exercised masked attention: partly masked rows and fully masked rows (attend everywhere)
    levels = [f.shape[1:3] for f in (features["res5"], features["res4"], features["res3"])]
    full = partial = 0
    for i, m in enumerate(ref_masks[:-1]):
        small = F.interpolate(
            torch.from_numpy(m), size=tuple(levels[i % 3]), mode="bilinear", align_corners=False
        )
        blocked = (small.sigmoid().flatten(2) < 0.5).numpy()  # (b, q, s)
        full += int(blocked.all(-1).sum())
        partial += int((blocked.any(-1) & ~blocked.all(-1)).sum())
    assert full > 0 and partial > 0, (full, partial)


def test_bf16_compute_tracks_fp32(converted, ours, features):
    bf16 = Mask2FormerHead(tiny_cfg(dtype="bfloat16"), nnx.Rngs(2))
    nnx.update(bf16, nnx.state(converted))
    out = nnx.jit(lambda m, f: m(f))(bf16, features)
    ref = ours[1]
    assert out["pred_logits"].dtype == jnp.float32 and out["pred_masks"].dtype == jnp.float32
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(bf16, nnx.Param)))
    first, first_ref = out["aux_outputs"][0]["pred_masks"], ref["aux_outputs"][0]["pred_masks"]
    assert float(jnp.abs(first - first_ref).max()) < 0.05 * float(jnp.abs(first_ref).max())
    assert bool(jnp.all(jnp.isfinite(out["pred_masks"])))


def test_head_input_errors_name_the_feature(converted, features):
    with pytest.raises(ValueError, match=r"missing \['res4'\]"):
        converted({k: v for k, v in features.items() if k != "res4"})
    bad = dict(features, res3=features["res3"][..., :5])
    with pytest.raises(ValueError, match=r"'res3' has shape \(2, 15, 11, 5\).*\(b=2, h, w, 32\)"):
        converted(bad)


# ---------------------------------------------------------------------------------------------------
# detectron2 / RASS names: a torch skeleton transcribed from mask2former/modeling (msdeformattn.py,
# mask2former_transformer_decoder.py, detectron2 Conv2d = nn.Conv2d with a `norm` child), no forward.


def detectron2_sem_seg_head(cfg) -> torch.nn.Module:
    nn = torch.nn
    d, hd, n_lvl = cfg.conv_dim, cfg.hidden_dim, len(cfg.transformer_in_features)

    def msda():
        m = nn.Module()
        m.sampling_offsets = nn.Linear(d, cfg.enc_heads * n_lvl * cfg.enc_points * 2)
        m.attention_weights = nn.Linear(d, cfg.enc_heads * n_lvl * cfg.enc_points)
        m.value_proj = nn.Linear(d, d)
        m.output_proj = nn.Linear(d, d)
        return m

    def enc_layer():
        m = nn.Module()
        m.self_attn, m.norm1, m.norm2 = msda(), nn.LayerNorm(d), nn.LayerNorm(d)
        m.linear1, m.linear2 = nn.Linear(d, cfg.enc_ffn_dim), nn.Linear(cfg.enc_ffn_dim, d)
        return m

    def conv_gn(cin, k):
        conv = nn.Conv2d(cin, d, k, padding=k // 2, bias=False)
        conv.norm = nn.GroupNorm(cfg.norm_groups, d)
        return conv

    pd = nn.Module()
    pd.input_proj = nn.ModuleList(
        [
            nn.Sequential(nn.Conv2d(c, d, 1), nn.GroupNorm(cfg.norm_groups, d))
            for c in cfg.in_channels[1:][::-1]
        ]
    )
    pd.transformer = nn.Module()
    pd.transformer.level_embed = nn.Parameter(torch.empty(n_lvl, d))
    pd.transformer.encoder = nn.Module()
    pd.transformer.encoder.layers = nn.ModuleList([enc_layer() for _ in range(cfg.enc_layers)])
    pd.mask_features = nn.Conv2d(d, cfg.mask_dim, 1)
    pd.adapter_1, pd.layer_1 = conv_gn(cfg.in_channels[0], 1), conv_gn(d, 3)

    def attn_layer(attr):
        m = nn.Module()
        setattr(m, attr, nn.MultiheadAttention(hd, cfg.dec_heads))
        m.norm = nn.LayerNorm(hd)
        return m

    def ffn_layer():
        m = nn.Module()
        m.linear1, m.linear2, m.norm = (
            nn.Linear(hd, cfg.dec_ffn_dim),
            nn.Linear(cfg.dec_ffn_dim, hd),
            nn.LayerNorm(hd),
        )
        return m

    pr = nn.Module()
    n = cfg.dec_layers
    pr.transformer_self_attention_layers = nn.ModuleList([attn_layer("self_attn") for _ in range(n)])
    pr.transformer_cross_attention_layers = nn.ModuleList([attn_layer("multihead_attn") for _ in range(n)])
    pr.transformer_ffn_layers = nn.ModuleList([ffn_layer() for _ in range(n)])
    pr.decoder_norm = nn.LayerNorm(hd)
    pr.query_feat, pr.query_embed = nn.Embedding(cfg.num_queries, hd), nn.Embedding(cfg.num_queries, hd)
    pr.level_embed = nn.Embedding(3, hd)
    pr.input_proj = nn.ModuleList([nn.Sequential() for _ in range(3)])
    pr.class_embed = nn.Linear(hd, cfg.num_classes + 1)
    pr.mask_embed = nn.Module()
    pr.mask_embed.layers = nn.ModuleList([nn.Linear(hd, hd), nn.Linear(hd, hd), nn.Linear(hd, cfg.mask_dim)])
    head = nn.Module()
    head.pixel_decoder, head.predictor = pd, pr
    return head


def _torch_to_ours(module: torch.nn.Module, leaf: str, value: np.ndarray) -> np.ndarray:
    """Layouts written independently of the converter: Linear (out, in) -> (in, out), Conv2d
    (O, I, kh, kw) -> (kh, kw, I, O), MultiheadAttention in_proj_weight (3E, E) -> (E, 3E)."""
    if isinstance(module, torch.nn.Linear) and leaf == "weight":
        return value.T
    if isinstance(module, torch.nn.Conv2d) and leaf == "weight":
        return value.transpose(2, 3, 1, 0)
    if isinstance(module, torch.nn.MultiheadAttention) and leaf == "in_proj_weight":
        return value.T
    return value


def _our_leaf(head, key: str):
    *path, leaf = key.split(".")
    node = head
    for part in path:
        node = node[int(part)] if part.isdigit() else getattr(node, part)
    name = {
        "in_proj_weight": "in_proj_kernel",
        "weight": "embedding" if isinstance(node, nnx.Embed) else "kernel",
    }.get(leaf, leaf)
    if isinstance(node, nnx.LayerNorm | nnx.GroupNorm) and leaf == "weight":
        name = "scale"
    return np.asarray(getattr(node, name)[...])


def test_detectron2_rass_keys_load_with_values_in_place():
    cfg = tiny_config()
    torch.manual_seed(0)
    ref = detectron2_sem_seg_head(cfg)
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_()
    sd = {f"sem_seg_head.{k}": v for k, v in ref.state_dict().items()}
    empty = torch.ones(cfg.num_classes + 1)
    empty[-1] = 0.1
    sd.update({"criterion.empty_weight": empty, "backbone.feature_extractor.x.weight": torch.zeros(3)})
    head = Mask2FormerHead(cfg, nnx.Rngs(0))
    ignored = convert_detectron2(head, sd, source="rass-like")
    assert ignored == ["backbone.feature_extractor.x.weight", "criterion.empty_weight"]
    for key, value in to_numpy(ref.state_dict()).items():
        path, leaf = key.rsplit(".", 1)
        expected = _torch_to_ours(ref.get_submodule(path), leaf, value)
        np.testing.assert_array_equal(_our_leaf(head, key), expected, err_msg=key)

    wrong = dict(sd, **{"criterion.empty_weight": torch.ones(cfg.num_classes + 1)})
    with pytest.raises(CheckpointError, match="empty_weight"):
        convert_detectron2(head, wrong)
    key = "sem_seg_head.predictor.transformer_ffn_layers.1.linear2.bias"
    with pytest.raises(CheckpointError, match=r"missing.*transformer_ffn_layers\.1\.linear2\.bias"):
        convert_detectron2(head, {k: v for k, v in sd.items() if k != key})


def _count(params) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


def test_full_size_parameter_count_matches_originals():
    cfg = rass_config()
    abstract = nnx.eval_shape(lambda: Mask2FormerHead(cfg, nnx.Rngs(0)))
    ours = _count(nnx.state(abstract, nnx.Param))
    with torch.device("meta"):
        d2 = sum(p.numel() for p in detectron2_sem_seg_head(cfg).parameters())
        hf_cfg = HFConfig(num_labels=cfg.num_classes)  # defaults = the Mask2Former ADE semantic head
        hf_pd = hf.Mask2FormerPixelDecoder(hf_cfg, feature_channels=list(cfg.in_channels))
        hf_tm = hf.Mask2FormerTransformerModule(in_features=hf_cfg.feature_size, config=hf_cfg)
        hf_cls = torch.nn.Linear(hf_cfg.hidden_dim, cfg.num_classes + 1)
        hf_n = sum(p.numel() for m in (hf_pd, hf_tm, hf_cls) for p in m.parameters())
    print(
        f"\nMask2Former RASS head (512-ch res2..res5, 150 classes): ours {ours:,}, detectron2 {d2:,}, transformers {hf_n:,}"
    )
    assert ours == d2 == hf_n


# ---------------------------------------------------------------------------------------------------
# building blocks


def test_multihead_attention_matches_torch_with_bool_mask():
    torch.manual_seed(0)
    ref = torch.nn.MultiheadAttention(16, 4, batch_first=True).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.3)
    ours = MultiheadAttention(16, 4, dtype=jnp.float32, rngs=nnx.Rngs(0))
    ours.in_proj_kernel[...] = jnp.asarray(ref.in_proj_weight.detach().numpy().T)
    ours.in_proj_bias[...] = jnp.asarray(ref.in_proj_bias.detach().numpy())
    ours.out_proj.kernel[...] = jnp.asarray(ref.out_proj.weight.detach().numpy().T)
    ours.out_proj.bias[...] = jnp.asarray(ref.out_proj.bias.detach().numpy())
    rng = np.random.default_rng(0)
    q, kv = rng.normal(size=(2, 5, 16)).astype(np.float32), rng.normal(size=(2, 7, 16)).astype(np.float32)
    blocked = rng.random((2, 5, 7)) < 0.5
    blocked[:, :, 0] = False  # torch gives NaN on fully blocked rows; the decoder never passes them
    with torch.no_grad():
        expected = ref(
            torch.from_numpy(q), torch.from_numpy(kv), torch.from_numpy(kv),
            attn_mask=torch.from_numpy(np.repeat(blocked, 4, axis=0)), need_weights=False,
        )[0].numpy()  # fmt: skip
    np.testing.assert_allclose(
        np.asarray(nnx.jit(lambda m, *a: m(*a))(ours, q, kv, kv, ~blocked)), expected, atol=1e-5
    )


def test_sine_position_embedding_matches_transformers():
    ref = hf.Mask2FormerSinePositionEmbedding(num_position_features=16, normalize=True)
    expected = ref(torch.Size((1, 3, 5, 7)), "cpu", torch.float32)[0].numpy().transpose(1, 2, 0)
    np.testing.assert_allclose(sine_position_embedding(5, 7, 16), expected, atol=1e-6)


def test_msdeformattn_init_matches_original(hf_model):
    from lqseg_jax.models.mask2former import MSDeformAttn

    torch_attn = hf.Mask2FormerPixelDecoderEncoderMultiscaleDeformableAttention(32, 2, 3, 4)
    hf_model._init_weights(torch_attn)
    ours = MSDeformAttn(32, 3, 2, 4, impl="auto", dtype=jnp.float32, rngs=nnx.Rngs(0))
    np.testing.assert_allclose(
        np.asarray(ours.sampling_offsets.bias[...]),
        torch_attn.sampling_offsets.bias.detach().numpy(),
        atol=1e-6,
    )
    assert not np.any(np.asarray(ours.sampling_offsets.kernel[...]))
    assert not np.any(np.asarray(ours.attention_weights.kernel[...]))


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="msda_impl"):
        tiny_config(msda_impl="cuda")
    with pytest.raises(ValueError, match="max_targets"):
        tiny_config(max_targets=9)
    with pytest.raises(ValueError, match="in_channels"):
        dataclasses.replace(tiny_config(), in_channels=(1, 2, 3))
