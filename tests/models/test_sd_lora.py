"""LoRA: layer forward against plain torch (base + scale * B(A(x))), merging, peft init, RASS target
selection against the parameter names of the diffusers UNet, and a peft-keyed UNet checkpoint against
the torch UNet with the LoRA deltas merged by hand."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel as TorchUNet
from flax import nnx

from lqseg_jax.convert.common import load_torch_state, to_numpy
from lqseg_jax.convert.diffusers_sd import abstract_module, convert_unet
from lqseg_jax.models.lora import (
    RASS_UNET_TRAINABLE,
    LoRAConv,
    LoRALinear,
    LoRAParam,
    add_lora,
    apply_lora,
    lora_layers,
    merge_lora,
)
from lqseg_jax.models.sd_unet import UNet2DConditionModel

TINY = dict(
    block_out_channels=[32, 64, 64],
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    layers_per_block=1,
    attention_head_dim=[2, 4, 4],
    cross_attention_dim=24,
    norm_num_groups=8,
    use_linear_projection=True,
)
RANK, ALPHA = 4, 8.0


pytestmark = pytest.mark.usefixtures("fast_compile")


class Holder(nnx.Module):
    def __init__(self, layer):
        self.layer = layer


def rass_reference_groups(torch_unet):
    """Ka1Guan/RASS restoration_adaptation/ras.py `unet_lora`, re-run on the torch parameter names."""
    patterns = ["to_k", "to_q", "to_v", "to_out.0", "conv", "conv1", "conv2", "conv_in", "conv_shortcut"]
    patterns += ["proj_out", "proj_in", "ff.net.2", "ff.net.0.proj"]
    enc, dec, oth = [], [], []
    for n, _ in torch_unet.named_parameters():
        if "bias" in n or "norm" in n:
            continue
        for p in patterns:
            if p in n and ("down_blocks" in n or "conv_in" in n):
                enc.append(n.replace(".weight", ""))
                break
            elif p in n and ("up_blocks" in n or "conv_out" in n):
                dec.append(n.replace(".weight", ""))
                break
            elif p in n:
                oth.append(n.replace(".weight", ""))
                break
    for group in (oth, dec):
        if "conv_out" in group:
            group.remove("conv_out")
    groups = {n: "default_encoder_s2" for n in enc}
    groups.update({n: "default_decoder_s2" for n in dec})
    groups.update({n: "default_others_s2" for n in oth})
    return groups


@pytest.mark.parametrize("kind", ["linear", "conv_stride2"])
def test_lora_layer_matches_torch_and_merges(kind):
    rng = np.random.default_rng(0)
    if kind == "linear":
        base_t = torch.nn.Linear(6, 5)
        a_t = torch.nn.Linear(6, RANK, bias=False)
        b_t = torch.nn.Linear(RANK, 5, bias=False)
        base = nnx.Linear(6, 5, rngs=nnx.Rngs(0))
        x = rng.normal(size=(3, 6)).astype(np.float32)
        to_t, from_t = (lambda a: torch.from_numpy(a)), (lambda t: t.numpy())
    else:
        base_t = torch.nn.Conv2d(6, 5, 3, stride=2, padding=1)
        a_t = torch.nn.Conv2d(6, RANK, 3, stride=2, padding=1, bias=False)  # peft: the base's geometry
        b_t = torch.nn.Conv2d(RANK, 5, 1, bias=False)
        base = nnx.Conv(6, 5, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), rngs=nnx.Rngs(0))
        x = rng.normal(size=(2, 9, 7, 6)).astype(np.float32)  # NHWC
        to_t = lambda a: torch.from_numpy(a.transpose(0, 3, 1, 2).copy())  # noqa: E731
        from_t = lambda t: t.numpy().transpose(0, 2, 3, 1)  # noqa: E731
    torch.manual_seed(0)
    for p in (*base_t.parameters(), a_t.weight, b_t.weight):
        torch.nn.init.normal_(p)  # B non-zero so the adapter path is exercised
    with torch.no_grad():
        expected = from_t(base_t(to_t(x)) + (ALPHA / RANK) * b_t(a_t(to_t(x))))

    holder = Holder(base)
    layer = add_lora(holder, "layer", "adapter", RANK, ALPHA, rngs=nnx.Rngs(1))
    assert isinstance(layer, LoRALinear if kind == "linear" else LoRAConv) and holder.layer is layer
    sd = {f"layer.base_layer.{k}": v for k, v in base_t.state_dict().items()}
    sd["layer.lora_A.adapter.weight"] = a_t.weight
    sd["layer.lora_B.adapter.weight"] = b_t.weight
    load_torch_state(holder, to_numpy(sd), source="peft-style")  # peft key names, loaded mechanically
    np.testing.assert_allclose(np.asarray(holder.layer(jnp.asarray(x))), expected, atol=1e-4, rtol=1e-5)

    assert merge_lora(holder) == 1
    assert type(holder.layer) is type(base) and not lora_layers(holder)
    np.testing.assert_allclose(np.asarray(holder.layer(jnp.asarray(x))), expected, atol=1e-4, rtol=1e-5)


def test_peft_gaussian_init():
    layer = add_lora(
        Holder(nnx.Linear(512, 256, rngs=nnx.Rngs(0))), "layer", "a", RANK, ALPHA, rngs=nnx.Rngs(2)
    )
    a, b = np.asarray(layer.lora_A["a"].kernel[...]), np.asarray(layer.lora_B["a"].kernel[...])
    assert a.shape == (512, RANK) and b.shape == (RANK, 256)
    assert abs(a.std() - 1.0 / RANK) < 0.02 / RANK and abs(a.mean()) < 0.01
    assert not b.any()
    assert layer.scaling == {"a": ALPHA / RANK}


def test_rass_selection_groups_and_filter():
    torch_unet = TorchUNet(**TINY)
    expected = rass_reference_groups(torch_unet)
    n_plain = sum(
        x.size
        for x in jax.tree.leaves(nnx.state(abstract_module(lambda r: UNet2DConditionModel(TINY, rngs=r))))
    )
    chosen = {}

    def make(rngs):
        model = UNet2DConditionModel(TINY, rngs=rngs)
        chosen.update(apply_lora(model, RANK, ALPHA, rngs=rngs))
        return model

    model = abstract_module(make)
    assert chosen == expected
    assert set(lora_layers(model)) == set(expected)
    assert "conv_out" not in chosen and not any("time_emb" in n for n in chosen)
    # LoRAParam selects exactly the factors: r*(in+out) per linear, r*(in*kh*kw + out) per conv
    n_lora = 0
    torch_modules = dict(torch_unet.named_modules())
    for name in lora_layers(model):
        mod = torch_modules[name]
        if isinstance(mod, torch.nn.Linear):
            n_lora += RANK * (mod.in_features + mod.out_features)
        else:
            n_lora += RANK * (mod.in_channels * mod.kernel_size[0] * mod.kernel_size[1] + mod.out_channels)
    assert sum(x.size for x in jax.tree.leaves(nnx.state(model, LoRAParam))) == n_lora
    assert sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))) == n_plain + n_lora
    conv_in = sum(p.numel() for p in torch_unet.conv_in.parameters())  # RASS also trains conv_in fully
    trainable = sum(x.size for x in jax.tree.leaves(nnx.state(model, RASS_UNET_TRAINABLE)))
    assert trainable == n_lora + conv_in


def peft_lora_state(torch_unet, groups: dict[str, str], *, std: float, seed: int = 1):
    """(peft state dict, merged state dict) of `torch_unet`: random rank-RANK adapters named by `groups`
    (layer -> adapter) in peft's key layout (base_layer.*, lora_A/B.<adapter>.weight), and the same adapters
    merged into the base weights, W + ALPHA / RANK * B A; written here from peft's layout, not from our code."""
    modules = dict(torch_unet.named_modules())
    base = {k: v.clone() for k, v in torch_unet.state_dict().items()}  # load_state_dict writes in place
    peft, merged = dict(base), dict(base)
    g = torch.Generator().manual_seed(seed)
    for name, adapter in groups.items():
        mod = modules[name]
        w = peft.pop(f"{name}.weight")
        peft[f"{name}.base_layer.weight"] = w
        if f"{name}.bias" in peft:
            peft[f"{name}.base_layer.bias"] = peft.pop(f"{name}.bias")
        if isinstance(mod, torch.nn.Linear):
            a = torch.randn(RANK, mod.in_features, generator=g) * std
            b = torch.randn(mod.out_features, RANK, generator=g) * std
            merged[f"{name}.weight"] = w + (ALPHA / RANK) * b @ a
        else:
            a = torch.randn(RANK, mod.in_channels, *mod.kernel_size, generator=g) * std
            b = torch.randn(mod.out_channels, RANK, 1, 1, generator=g) * std
            merged[f"{name}.weight"] = w + (ALPHA / RANK) * torch.einsum("or,rikl->oikl", b[:, :, 0, 0], a)
        peft[f"{name}.lora_A.{adapter}.weight"] = a
        peft[f"{name}.lora_B.{adapter}.weight"] = b
    return peft, merged


def test_peft_keyed_unet_matches_merged_torch_unet():
    torch.manual_seed(0)
    torch_unet = TorchUNet(**TINY).eval()
    groups = rass_reference_groups(torch_unet)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1, 4, 16, 16)).astype(np.float32)
    ctx = rng.normal(size=(1, 5, 24)).astype(np.float32)
    sd, merged = peft_lora_state(torch_unet, groups, std=0.05)
    with torch.no_grad():
        ref_base = torch_unet(torch.from_numpy(x), 1, torch.from_numpy(ctx)).sample.numpy()
    torch_unet.load_state_dict(merged)

    feats = []
    hooks = [
        blk.register_forward_hook(lambda m, i, o: feats.append(o.numpy())) for blk in torch_unet.up_blocks
    ]
    with torch.no_grad():
        ref = torch_unet(torch.from_numpy(x), 1, torch.from_numpy(ctx)).sample.numpy()
    for h in hooks:
        h.remove()
    assert np.abs(ref - ref_base).max() > 1e-2  # the adapters change the output well beyond the tolerance

    model = convert_unet(sd, TINY)  # peft layout detected from the keys, alpha = peft default 8
    assert {n: next(iter(layer.lora_A)) for n, layer in lora_layers(model).items()} == groups
    forward = nnx.jit(lambda m, a, c: m(a, 1, c))
    xj, cj = jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(ctx)
    out, ours = forward(model, xj, cj)
    np.testing.assert_allclose(np.asarray(out), ref.transpose(0, 2, 3, 1), atol=1e-4, rtol=0)
    for f, r in zip(ours, feats):
        np.testing.assert_allclose(np.asarray(f), r.transpose(0, 2, 3, 1), atol=1e-4, rtol=0)

    assert merge_lora(model) == len(groups)
    out_merged, _ = forward(model, xj, cj)
    np.testing.assert_allclose(np.asarray(out_merged), np.asarray(out), atol=1e-5, rtol=0)
