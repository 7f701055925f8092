"""RAM tagging path against independent PyTorch references (ram.md section 3), random weights, fp32:
- Swin: transformers `SwinModel` (cat[pooler_output, last_hidden_state]) at a tiny config and at the real
  384 / window-12 geometry with few channels (stage-3 clamp: no shift, 11 masked blocks in the real model);
- tagging head: the transformers BLIP text chain BlipTextAttention(cross) + BlipTextIntermediate +
  BlipTextOutput per layer;
- end to end: HF Swin + image_proj + relu(wordvec_proj(label_embed)) + BLIP chain + fc -> logits, the RAM
  state dict named as RASS's (ram_ckpt_keys.txt) and loaded by the converter; tag strings with thresholds
  placed away from the logits, and the fp16 sigmoid rounding;
- preprocessing: F.interpolate(bilinear, align_corners=False, antialias=False) + ImageNet normalisation;
- full-size parameter counts from shapes.
"""

import ast
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx
from transformers import SwinConfig, SwinModel
from transformers.models.blip.modeling_blip_text import (
    BlipTextAttention,
    BlipTextConfig,
    BlipTextIntermediate,
    BlipTextOutput,
)

from lqseg_jax.convert.common import load_torch_state
from lqseg_jax.convert.ram import convert_ram
from lqseg_jax.models.ram import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    RAM,
    RAMConfig,
    TaggingHead,
    empty_ram,
    preprocess,
    tag_strings,
    threshold_mask,
)
from lqseg_jax.models.tracing import abstract_model, param_count

pytestmark = pytest.mark.usefixtures("fast_compile")
# The spec's key list (names, shapes and USE/BUF/LORA/TIED/SKIP of one RASS tagger), in ../shared beside the
# checkout as on CI; not copied into the repository.
KEYS_FILE = Path(__file__).resolve().parents[3] / "shared" / "reference" / "ram_ckpt_keys.txt"

# Swin-L per ram.md 2.1 / 3.1, and tiny variants of the same code.
TINY = RAMConfig(
    image_size=96, embed_dim=8, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), window_size=3,
    num_classes=37, embed_width=12, hidden_size=16, head_heads=4, intermediate_size=32,
)  # fmt: skip
REAL_GEOMETRY = RAMConfig(
    embed_dim=8, depths=(2, 2, 2, 2), num_heads=(1, 1, 2, 2),
    num_classes=37, embed_width=12, hidden_size=16, head_heads=4, intermediate_size=32,
)  # fmt: skip


def hf_swin(cfg: RAMConfig) -> SwinModel:
    torch.manual_seed(0)
    config = SwinConfig(
        image_size=cfg.image_size, patch_size=cfg.patch_size, embed_dim=cfg.embed_dim, depths=list(cfg.depths),
        num_heads=list(cfg.num_heads), window_size=cfg.window_size, mlp_ratio=cfg.mlp_ratio, qkv_bias=True,
        hidden_act="gelu", use_absolute_embeddings=False, layer_norm_eps=cfg.swin_eps,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, drop_path_rate=0.0,
    )  # fmt: skip
    model = SwinModel(config).eval()
    with torch.no_grad():  # non-zero bias tables and norms, so every term is exercised
        for name, p in model.named_parameters():
            if "relative_position_bias_table" in name or "norm" in name:
                p.add_(torch.randn_like(p) * 0.5)
    return model


def swin_to_ram_keys(hf: SwinModel) -> dict[str, torch.Tensor]:
    """HF SwinModel state dict -> RAM's `visual_encoder.*` names (ram.md 3.1 table, inverted)."""
    out, sd = {}, hf.state_dict()
    for key, value in sd.items():
        if "relative_position_index" in key or re.search(r"attention\.[kv]_proj", key):
            continue
        new = key.replace("embeddings.patch_embeddings.projection", "patch_embed.proj")
        new = new.replace("embeddings.norm", "patch_embed.norm").replace("encoder.layers", "layers")
        new = new.replace("layernorm_before", "norm1").replace("layernorm_after", "norm2")
        new = new.replace("attention.relative_position_bias.", "attn.").replace(
            "attention.o_proj", "attn.proj"
        )
        new = re.sub(r"^layernorm\.", "norm.", new)
        if "attention.q_proj" in key:
            leaf = key.rsplit(".", 1)[1]
            parts = [sd[key.replace("q_proj", p)] for p in ("q_proj", "k_proj", "v_proj")]
            new, value = new.replace("attention.q_proj." + leaf, "attn.qkv." + leaf), torch.cat(parts, 0)
        out["visual_encoder." + new] = value
    return out


def hf_swin_tokens(hf: SwinModel, x_nhwc: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out = hf(pixel_values=torch.from_numpy(np.array(x_nhwc)).permute(0, 3, 1, 2))
    return torch.cat([out.pooler_output[:, None], out.last_hidden_state], 1).numpy()


def blip_chain(cfg: RAMConfig) -> list[tuple]:
    torch.manual_seed(1)
    config = BlipTextConfig(
        hidden_size=cfg.hidden_size, num_attention_heads=cfg.head_heads, intermediate_size=cfg.intermediate_size,
        encoder_hidden_size=cfg.embed_width, layer_norm_eps=cfg.head_eps, hidden_act="gelu",
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    layers = []
    for _ in range(cfg.head_layers):
        mods = (
            BlipTextAttention(config, is_cross_attention=True),
            BlipTextIntermediate(config),
            BlipTextOutput(config),
        )
        with torch.no_grad():
            for m in mods:
                for name, p in m.named_parameters():
                    if "LayerNorm" in name:
                        p.add_(torch.randn_like(p) * 0.3)
        layers.append(tuple(m.eval() for m in mods))
    return layers


def blip_forward(layers, h: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        for attn, inter, out in layers:
            a = attn(h, encoder_hidden_states=img)[0]
            h = out(inter(a), a)
    return h


def blip_to_ram_keys(layers) -> dict[str, torch.Tensor]:
    out = {}
    for i, (attn, inter, o) in enumerate(layers):
        base = f"tagging_head.encoder.layer.{i}."
        out.update({base + "crossattention." + k: v for k, v in attn.state_dict().items()})
        out.update({base + "intermediate." + k: v for k, v in inter.state_dict().items()})
        out.update({base + "output." + k: v for k, v in o.state_dict().items()})
    return out


def test_swin_matches_transformers_at_384_window12():
    """The real geometry with 8 channels: 96/48/24/12 grids, window 12, stage 3 unshifted (the tiny config
    is checked in test_end_to_end_logits_and_tags)."""
    cfg = REAL_GEOMETRY
    hf = hf_swin(cfg)
    encoder = empty_ram(cfg).visual_encoder
    sd = {k[len("visual_encoder.") :]: v.numpy() for k, v in swin_to_ram_keys(hf).items()}
    load_torch_state(encoder, sd, source="hf swin")
    x = np.random.default_rng(0).normal(size=(1, cfg.image_size, cfg.image_size, 3)).astype(np.float32)
    ours = np.asarray(jax.jit(lambda m, x: m(x))(encoder, jnp.asarray(x)))
    ref = hf_swin_tokens(hf, x)
    assert ours.shape == ref.shape == (1, 145, cfg.num_features)
    assert hf.num_parameters() == param_count(encoder)
    np.testing.assert_allclose(ours, ref, atol=2e-5, rtol=0)


def test_swin_geometry_real_config():
    """Swin-L/384 with window 12: 96/48/24/12 token grids, stage 3 clamped (no shift): 11 shifted blocks."""
    cfg = RAMConfig()
    assert cfg.resolutions == (96, 48, 24, 12) and cfg.windows == (12, 12, 12, 12)
    model = abstract_model(lambda: RAM(cfg, rngs=nnx.Rngs(0)))
    shifts = [b.shift for layer in model.visual_encoder.layers for b in layer.blocks]
    assert (
        shifts.count(6) == 11
        and shifts.count(0) == 13
        and all(b.shift == 0 for b in model.visual_encoder.layers[3].blocks)
    )


def test_tagging_head_matches_blip_chain():
    cfg = TINY
    layers = blip_chain(cfg)
    head = TaggingHead(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0))
    sd = {k[len("tagging_head.") :]: v.numpy() for k, v in blip_to_ram_keys(layers).items()}
    load_torch_state(head, sd, source="blip chain")
    rng = np.random.default_rng(1)
    h = rng.normal(size=(2, cfg.num_classes, cfg.hidden_size)).astype(np.float32)
    img = rng.normal(size=(2, 10, cfg.embed_width)).astype(np.float32)
    ours = np.asarray(head(jnp.asarray(h), jnp.asarray(img)))
    ref = blip_forward(layers, torch.from_numpy(h), torch.from_numpy(img)).numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)


def reference_ram(cfg: RAMConfig):
    """(RAM-named torch state dict, (swin tokens, logits) function of a preprocessed NHWC image) from HF
    SwinModel, the BLIP chain and torch Linear/ReLU."""
    hf, layers = hf_swin(cfg), blip_chain(cfg)
    torch.manual_seed(2)
    image_proj = torch.nn.Linear(cfg.num_features, cfg.embed_width)
    wordvec_proj = torch.nn.Linear(cfg.embed_width, cfg.hidden_size)
    fc = torch.nn.Linear(cfg.hidden_size, 1)
    label_embed = torch.randn(cfg.num_classes, cfg.embed_width)
    sd = {"label_embed": label_embed, **swin_to_ram_keys(hf), **blip_to_ram_keys(layers)}
    for name, m in (("image_proj", image_proj), ("wordvec_proj", wordvec_proj), ("fc", fc)):
        sd.update({f"{name}.{k}": v for k, v in m.state_dict().items()})

    def forward(x_nhwc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with torch.no_grad():
            tokens = hf_swin_tokens(hf, x_nhwc)
            img = image_proj(torch.from_numpy(tokens))
            q = torch.relu(wordvec_proj(label_embed))[None].expand(x_nhwc.shape[0], -1, -1)
            return tokens, fc(blip_forward(layers, q, img))[..., 0].numpy()

    return sd, forward


def test_end_to_end_logits_and_tags():
    cfg = TINY
    sd, reference = reference_ram(cfg)
    model, _ = convert_ram(sd, cfg, source="reference")
    rng = np.random.default_rng(3)
    x = rng.uniform(-1, 1, size=(2, 50, 70, 3)).astype(np.float32)  # squashed to 96 x 96
    pre = np.asarray(preprocess(jnp.asarray(x), cfg.image_size))
    ref_tokens, ref = reference(pre)

    @jax.jit
    def run(m, x, thr):
        p = preprocess(x, cfg.image_size)
        return m.visual_encoder(p), m(p), m.tag_mask(x, thr, fp16_sigmoid=False)

    probs = 1.0 / (1.0 + np.exp(-ref.astype(np.float64)))
    s = np.sort(
        probs.ravel()
    )  # thresholds halfway between neighbouring sorted sigmoids: far from every logit
    mids = (s[:-1] + s[1:]) / 2
    thr = rng.choice(mids[np.diff(s) > 1e-3], size=cfg.num_classes).astype(np.float32)
    tokens, ours, mask = (np.asarray(a) for a in run(model, jnp.asarray(x), jnp.asarray(thr)))
    assert tokens.shape == ref_tokens.shape == (2, 1 + 3 * 3, cfg.num_features)  # Swin at the tiny config
    np.testing.assert_allclose(tokens, ref_tokens, atol=2e-5, rtol=0)
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)

    # bf16 compute (fp32 parameters, norms and softmax): the same logits to bf16 precision
    bf16 = empty_ram(cfg, dtype=jnp.bfloat16)
    nnx.update(bf16, nnx.state(model, nnx.Param))
    low = np.asarray(jax.jit(lambda m, p: m(p))(bf16, jnp.asarray(pre)))
    assert low.dtype == np.float32 and 0 < np.abs(low - ref).max() < 0.05 * np.abs(ref).max()
    tags = [f"tag {i}" if i % 5 else f"o'tag{i}" for i in range(cfg.num_classes)]
    ref_tags = [", ".join(tags[i] for i in range(cfg.num_classes) if probs[b, i] > thr[i]) for b in range(2)]
    assert tag_strings(mask, tags) == ref_tags
    assert any(ref_tags) and ref_tags[0] != ref_tags[1]


def test_fp16_sigmoid_threshold():
    """RASS compares the fp16-rounded sigmoid with fp32 thresholds: sigmoid 0.65002 -> 0.649902, not > 0.65."""
    logit = np.log(0.65002 / (1 - 0.65002)).astype(np.float32)
    logits = jnp.asarray([[logit, 3.0, -3.0]])
    thr = jnp.asarray([0.65, 0.9, 0.05])
    assert np.asarray(threshold_mask(logits, thr)).tolist() == [[False, True, False]]
    assert np.asarray(threshold_mask(logits, thr, fp16_sigmoid=False)).tolist() == [[True, True, False]]
    ref = torch.sigmoid(torch.from_numpy(np.asarray(logits)).half()) > torch.from_numpy(np.asarray(thr))
    assert ref.numpy().tolist() == [[False, True, False]]


@pytest.mark.parametrize("hw", [(512, 512), (520, 688), (300, 350), (384, 384)])
def test_preprocess_matches_torch(hw):
    x = np.random.default_rng(4).uniform(-1, 1, size=(1, *hw, 3)).astype(np.float32)
    t = torch.from_numpy(x).permute(0, 3, 1, 2) * 0.5 + 0.5
    t = F.interpolate(t, (384, 384), mode="bilinear", align_corners=False, antialias=False)
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    ref = ((t - mean) / std).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(np.asarray(preprocess(jnp.asarray(x))), ref, atol=2e-6, rtol=0)


def read_keys_file() -> list[tuple[str, tuple[int, ...], str]]:
    """(key, shape, tag) rows of the keys file."""
    rows = []
    for line in KEYS_FILE.read_text().splitlines():
        if line and not line.startswith("#"):
            key, shape, tag = line.split("\t")
            rows.append((key, tuple(ast.literal_eval(shape)), tag))
    return rows


def test_full_size_counts():
    """Ours from shapes vs ram.md section 4: 212,117,045 (tagging path); the whole tagger 470,926,449 is the
    keys file's elements less the buffers and the tied copies (tag_encoder layers 0-1, the LM decoder)."""
    model = abstract_model(lambda: RAM(RAMConfig(), rngs=nnx.Rngs(0)))
    ours = param_count(model)
    rows = read_keys_file()
    sizes = {k: int(np.prod(shape)) for k, shape, _ in rows}
    tag = {k: t for k, _, t in rows}
    use = sum(n for k, n in sizes.items() if tag[k] == "USE")
    tied_lm = sum(sizes[k] for k in sizes if k.startswith("text_decoder.cls.predictions.decoder."))
    whole = sum(sizes.values()) - sum(n for k, n in sizes.items() if tag[k] in ("BUF", "TIED")) - tied_lm
    print(
        f"\nRAM tagging path: ours {ours:,} (ram.md 212,117,045); whole RAMLora tagger {whole:,} (470,926,449)"
    )
    assert ours == use == 212_117_045
    assert param_count(model.visual_encoder) == 195_198_516
    assert whole == 470_926_449
