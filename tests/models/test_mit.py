"""MiT encoder against transformers' SegformerModel (PyTorch, random weights, non-square input)."""

import argparse
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.torch import save_file
from transformers import SegformerConfig, SegformerModel

from lqseg_jax.convert.common import CheckpointError, load_converted
from lqseg_jax.convert.mit import blank_model, load_mit, register_cli
from lqseg_jax.models.layers import DropPath
from lqseg_jax.models.mit import MIT_PRESETS, Block, MixVisionTransformer, OverlapPatchEmbed

TINY = dict(embed_dims=(16, 32, 48, 64), num_heads=(1, 2, 3, 4), depths=(2, 1, 2, 1), sr_ratios=(8, 4, 2, 1))
IMAGE = (2, 3, 75, 97)  # NCHW: non-square, not divisible by 32


def hf_config(embed_dims, num_heads, depths, sr_ratios, drop_path_rate=0.1):
    return SegformerConfig(
        hidden_sizes=list(embed_dims),
        num_attention_heads=list(num_heads),
        depths=list(depths),
        sr_ratios=list(sr_ratios),
        mlp_ratios=[4, 4, 4, 4],
        drop_path_rate=drop_path_rate,
    )


def torch_reference():
    """A tiny transformers SegformerModel with random O(1)-scale weights, eval mode."""
    torch.manual_seed(0)
    model = SegformerModel(hf_config(**TINY)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim > 1:
                p.normal_(0.0, 1.0 / math.sqrt(p[0].numel()))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.2)
    return model


def torch_stages(model, image):
    with torch.no_grad():
        out = model(torch.from_numpy(image), output_hidden_states=True)
    return [h.numpy().transpose(0, 2, 3, 1) for h in out.hidden_states]  # NHWC


def hub_names(sd):
    """transformers 5 module names -> the names of the Segformer checkpoints on the Hub."""
    rules = [
        (r"^stages\.(\d)\.patch_embeddings\.", r"encoder.patch_embeddings.\1."),
        (r"^stages\.(\d)\.blocks\.", r"encoder.block.\1."),
        (r"^stages\.(\d)\.layer_norm\.", r"encoder.layer_norm.\1."),
        (r"attention\.q_proj", "attention.self.query"),
        (r"attention\.k_proj", "attention.self.key"),
        (r"attention\.v_proj", "attention.self.value"),
        (r"attention\.sequence_reduction\.sequence_reduction", "attention.self.sr"),
        (r"attention\.sequence_reduction\.layer_norm", "attention.self.layer_norm"),
        (r"attention\.o_proj", "attention.output.dense"),
        (r"mlp\.fc1", "mlp.dense1"),
        (r"mlp\.fc2", "mlp.dense2"),
        (r"layernorm_before", "layer_norm_1"),
        (r"layernorm_after", "layer_norm_2"),
    ]
    out = {}
    for key, value in sd.items():
        for pattern, repl in rules:
            key = re.sub(pattern, repl, key)
        out["segformer." + key] = value
    return out


def mmseg_names(sd, prefix="backbone."):
    """transformers 5 names -> the original mmseg/refign MiT names (k and v fused into kv), under prefix."""
    inner = {
        "layernorm_before": "norm1",
        "layernorm_after": "norm2",
        "attention.q_proj": "attn.q",
        "attention.o_proj": "attn.proj",
        "attention.sequence_reduction.sequence_reduction": "attn.sr",
        "attention.sequence_reduction.layer_norm": "attn.norm",
        "mlp.fc1": "mlp.fc1",
        "mlp.dwconv.dwconv": "mlp.dwconv.dwconv",
        "mlp.fc2": "mlp.fc2",
    }
    out = {}
    for key, value in sd.items():
        stage, rest = re.fullmatch(r"stages\.(\d)\.(.+)", key).groups()
        s = int(stage) + 1
        module, leaf = rest.rsplit(".", 1)
        if module.startswith("patch_embeddings."):
            name = f"patch_embed{s}." + {"proj": "proj", "layer_norm": "norm"}[module.split(".", 1)[1]]
        elif module == "layer_norm":
            name = f"norm{s}"
        else:
            j, sub = re.fullmatch(r"blocks\.(\d+)\.(.+)", module).groups()
            if sub == "attention.v_proj":
                continue
            if sub == "attention.k_proj":
                v = sd[key.replace("k_proj", "v_proj")]
                out[f"{prefix}block{s}.{j}.attn.kv.{leaf}"] = torch.cat([value, v], dim=0)
                continue
            name = f"block{s}.{j}.{inner[sub]}"
        out[f"{prefix}{name}.{leaf}"] = value
    out["head.conv_seg.weight"] = torch.zeros(3, 8, 1, 1)  # another module's key: must be left alone
    return out


@nnx.jit
def encode(model, x):
    return model(x)


def loaded_mit(state_dict, *, naming, prefix="", drop_path_rate=0.5, **kwargs):
    """Our MiT holding converted torch weights, eval mode (initialisers skipped: all weights are loaded).
    A high drop-path rate, which eval mode must ignore, also serves the train-mode test (one compile)."""
    model = blank_model(
        lambda: MixVisionTransformer(**TINY, drop_path_rate=drop_path_rate, **kwargs, rngs=nnx.Rngs(0))
    )
    load_mit(model, state_dict, naming=naming, prefix=prefix)
    model.eval()
    return model


@pytest.fixture(scope="module")
def image():
    return np.random.default_rng(0).normal(size=IMAGE).astype(np.float32)


@pytest.fixture(scope="module")
def hf_model():
    return torch_reference()


def max_diffs(outs, ref):
    return [float(np.max(np.abs(np.asarray(o, np.float32) - r))) for o, r in zip(outs, ref)]


@pytest.mark.parametrize("naming", ["transformers-5", "hub"])
def test_parity_with_transformers_every_stage(image, hf_model, naming):
    ref = torch_stages(hf_model, image)
    sd = hf_model.state_dict() if naming == "transformers-5" else hub_names(hf_model.state_dict())
    model = loaded_mit(sd, naming="transformers", layer_norm_eps=1e-5)
    outs = encode(model, jnp.asarray(image.transpose(0, 2, 3, 1)))
    shapes = [(2, 19, 25, 16), (2, 10, 13, 32), (2, 5, 7, 48), (2, 3, 4, 64)]
    assert [o.shape for o in outs] == [r.shape for r in ref] == shapes
    diffs = max_diffs(outs, ref)
    print(f"[{naming}] max |diff| per stage: {[f'{d:.1e}' for d in diffs]}")
    assert max(diffs) <= 1e-4, diffs


def test_parity_mmseg_naming(image, hf_model):
    ref = torch_stages(hf_model, image)
    sd = mmseg_names(hf_model.state_dict())
    model = loaded_mit(sd, naming="mmseg", prefix="backbone.", layer_norm_eps=1e-5)
    diffs = max_diffs(encode(model, jnp.asarray(image.transpose(0, 2, 3, 1))), ref)
    print(f"[mmseg] max |diff| per stage: {[f'{d:.1e}' for d in diffs]}")
    assert max(diffs) <= 1e-4, diffs


def test_layer_norm_eps_as_original():
    """refign/mmseg: eps 1e-6 in block and stage norms, torch's default 1e-5 in patch-embed and sr norms."""
    model = nnx.eval_shape(lambda: MixVisionTransformer(**TINY, rngs=nnx.Rngs(0)))
    eps = {
        ".".join(map(str, path)): m.epsilon
        for path, m in nnx.iter_modules(model)
        if isinstance(m, nnx.LayerNorm)
    }
    for name, value in eps.items():
        expected = 1e-5 if re.search(r"(patch_embed\d\.norm|attn\.norm)$", name) else 1e-6
        assert value == expected, (name, value)
    assert {"norm4", "block4.0.norm2", "patch_embed1.norm", "block1.1.attn.norm"} <= set(eps)


def test_bf16_compute_keeps_fp32_params(image, hf_model):
    ref = torch_stages(hf_model, image)
    model = loaded_mit(hf_model.state_dict(), naming="transformers", layer_norm_eps=1e-5, dtype=jnp.bfloat16)
    assert {p.dtype for p in jax.tree.leaves(nnx.state(model, nnx.Param))} == {jnp.dtype(jnp.float32)}
    outs = encode(model, jnp.asarray(image.transpose(0, 2, 3, 1)))
    assert {o.dtype for o in outs} == {jnp.dtype(jnp.bfloat16)}
    rel = [
        float(np.linalg.norm(np.asarray(o, np.float32) - r) / np.linalg.norm(r)) for o, r in zip(outs, ref)
    ]
    print(f"[bf16] relative L2 error per stage: {[f'{e:.1e}' for e in rel]}")
    assert max(rel) < 3e-2, rel


@pytest.mark.slow  # tracing the 52-block B5 takes ~15-60 s on 2 CPU cores
@pytest.mark.parametrize("preset", ["b0", "b5"])
def test_parameter_count_equals_transformers(preset):
    p = MIT_PRESETS[preset]
    with torch.device("meta"):
        ref = SegformerModel(hf_config(p["embed_dims"], p["num_heads"], p["depths"], p["sr_ratios"]))
    ref_count = sum(t.numel() for t in ref.parameters())
    abstract = nnx.eval_shape(lambda: MixVisionTransformer.from_preset(preset, rngs=nnx.Rngs(0)))
    count = sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    print(f"MiT-{preset.upper()} parameters: ours {count:,}, transformers {ref_count:,}")
    assert count == ref_count
    if preset == "b5":
        assert count == 81_443_008


def test_init_as_original():
    """Linear N(0, .02) (trunc at +-2 absolute) with zero bias; conv N(0, sqrt(2 / (k*k*out/groups))) with
    zero bias; LayerNorm 1 / 0. On a patch embedding and a block with spatial reduction (every layer kind
    of the MiT; the full model only repeats them, and eager init compiles once per distinct shape)."""
    rngs = nnx.Rngs(0)
    parts = [
        OverlapPatchEmbed(3, 16, 7, 4, dtype=jnp.float32, rngs=rngs),
        Block(16, 2, 2, 4, True, 0.0, 1e-6, dtype=jnp.float32, rngs=rngs),
    ]
    linears, convs, norms = [], [], 0
    for part in parts:
        for _, module in nnx.iter_modules(part):
            if isinstance(module, nnx.Linear):
                linears.append(np.asarray(module.kernel[...]).ravel())
                np.testing.assert_array_equal(np.asarray(module.bias[...]), 0.0)
            elif isinstance(module, nnx.Conv):
                kh, kw, _, out = module.kernel.shape
                std = math.sqrt(2.0 / (kh * kw * out // module.feature_group_count))
                convs.append(np.asarray(module.kernel[...]).ravel() / std)
                np.testing.assert_array_equal(np.asarray(module.bias[...]), 0.0)
            elif isinstance(module, nnx.LayerNorm):
                np.testing.assert_array_equal(np.asarray(module.scale[...]), 1.0)
                np.testing.assert_array_equal(np.asarray(module.bias[...]), 0.0)
                norms += 1
    assert len(linears) == 5 and len(convs) == 3 and norms == 4
    linears, convs = np.concatenate(linears), np.concatenate(convs)
    assert abs(linears.std() / 0.02 - 1) < 0.06 and abs(linears.mean()) < 0.002
    assert abs(convs.std() - 1) < 0.06 and abs(convs.mean()) < 0.06


def test_drop_path_schedule_is_linear():
    abstract = nnx.eval_shape(lambda: MixVisionTransformer(**TINY, drop_path_rate=0.3, rngs=nnx.Rngs(0)))
    rates = [blk.drop_path.rate for s in range(1, 5) for blk in getattr(abstract, f"block{s}")]
    np.testing.assert_allclose(rates, torch.linspace(0, 0.3, sum(TINY["depths"])).numpy(), rtol=1e-6)


def test_drop_path_per_sample_from_dropout_stream():
    x = jnp.ones((64, 2, 3, 4))
    masks = {}
    for params_seed, dropout_seed in [(0, 3), (1, 3), (0, 4)]:
        layer = DropPath(0.5, rngs=nnx.Rngs(params=params_seed, dropout=dropout_seed))
        y = np.asarray(layer(x)).reshape(64, -1)  # train mode by default
        assert np.all(y == y[:, :1])  # one draw per sample
        assert set(np.unique(y)) == {0.0, 2.0}  # dropped, or kept and scaled by 1 / (1 - rate)
        masks[params_seed, dropout_seed] = y[:, 0]
        layer.eval()
        np.testing.assert_array_equal(np.asarray(layer(x)), np.asarray(x))
    np.testing.assert_array_equal(masks[0, 3], masks[1, 3])  # the "params" stream plays no part
    assert not np.array_equal(masks[0, 3], masks[0, 4])


def test_drop_path_active_in_train_mode_only(image, hf_model):
    model = loaded_mit(hf_model.state_dict(), naming="transformers", layer_norm_eps=1e-5)  # drop path 0.5
    x = jnp.asarray(image.transpose(0, 2, 3, 1))
    evals = [np.asarray(encode(model, x)[-1]) for _ in range(2)]
    model.train()
    trains = [np.asarray(encode(model, x)[-1]) for _ in range(2)]
    np.testing.assert_array_equal(evals[0], evals[1])
    np.testing.assert_allclose(evals[0], torch_stages(hf_model, image)[-1], atol=1e-4)  # eval: no drop path
    assert not np.allclose(trains[0], evals[0], atol=1e-3)
    assert not np.allclose(trains[0], trains[1], atol=1e-3)  # the dropout streams advance


def test_input_errors():
    abstract = nnx.eval_shape(lambda: MixVisionTransformer(**TINY, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"3 channels.*\(1, 64, 64, 4\)"):
        abstract(jnp.zeros((1, 64, 64, 4)))
    with pytest.raises(ValueError, match=r"28x64 is too small.*>= 29"):
        abstract(jnp.zeros((1, 28, 64, 3)))
    with pytest.raises(ValueError, match="unknown MiT preset 'b6'"):
        MixVisionTransformer.from_preset("b6", rngs=nnx.Rngs(0))


def test_converter_errors_name_the_key(hf_model):
    sd = hf_model.state_dict()
    bad = dict(sd, **{"stages.2.blocks.1.mlp.fc1.weight": torch.zeros(192, 47)})
    with pytest.raises(
        CheckpointError, match=r"'block3\.1\.mlp\.fc1\.weight'.*\(192, 47\).*expects \(48, 192\)"
    ):
        loaded_mit(bad, naming="transformers")
    missing = {k: v for k, v in sd.items() if k != "stages.3.layer_norm.bias"}
    with pytest.raises(CheckpointError, match=r"(?s)1 missing.*'norm4\.bias'"):
        loaded_mit(missing, naming="transformers")
    no_v = {k: v for k, v in sd.items() if k != "stages.0.blocks.1.attention.v_proj.weight"}
    with pytest.raises(
        CheckpointError, match=r"'block1\.1\.attn\.k\.weight' has no partner 'block1\.1\.attn\.v\.weight'"
    ):
        loaded_mit(no_v, naming="transformers")
    extra = dict(mmseg_names(sd, prefix=""), **{"block1.0.attn.extra.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match=r"(?s)1 unexpected.*'block1\.0\.attn\.extra\.weight'"):
        loaded_mit(extra, naming="mmseg")


def test_mit_cli_official_and_transformers_files(tmp_path):
    b0 = MIT_PRESETS["b0"]
    torch.manual_seed(0)
    sd = SegformerModel(
        hf_config(b0["embed_dims"], b0["num_heads"], b0["depths"], b0["sr_ratios"])
    ).state_dict()
    official = tmp_path / "mit_b0.pth"  # the SegFormer release: mmseg names plus an ImageNet classifier
    torch.save(dict(mmseg_names(sd, prefix=""), **{"head.weight": torch.zeros(1000, 256)}), official)
    hub = tmp_path / "model.safetensors"  # a Hub SegformerForImageClassification
    save_file(
        {k: v.contiguous() for k, v in hub_names(sd).items()} | {"classifier.weight": torch.zeros(3, 256)},
        hub,
    )
    parser = argparse.ArgumentParser()
    register_cli(parser.add_subparsers(dest="format", required=True))
    model = blank_model(lambda: MixVisionTransformer.from_preset("b0", rngs=nnx.Rngs(0)))
    kv = torch.cat(
        [sd["stages.2.blocks.1.attention.k_proj.weight"], sd["stages.2.blocks.1.attention.v_proj.weight"]]
    )
    for src, naming, eps, skipped in [(official, "mmseg", 1e-6, 2), (hub, "transformers", 1e-5, 1)]:
        args = parser.parse_args(["mit", "--src", str(src), "--out", str(tmp_path / naming)])
        args.run(args)
        meta = load_converted(tmp_path / naming, model)
        assert (meta["backbone"], meta["naming"], meta["layer_norm_eps"]) == ("mit_b0", naming, eps)
        assert meta["num_skipped"] == skipped  # classifier (+ the decoy head.conv_seg of mmseg_names)
        np.testing.assert_array_equal(np.asarray(model.block3[1].attn.kv.kernel[...]), kv.numpy().T)
        np.testing.assert_array_equal(
            np.asarray(model.patch_embed1.proj.kernel[...]),
            sd["stages.0.patch_embeddings.proj.weight"].numpy().transpose(2, 3, 1, 0),
        )
