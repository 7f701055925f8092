"""Multi-scale deformable attention: every implementation against PyTorch grid_sample and the reference.

The independent reference is a PyTorch formula built like the original's pure-PyTorch path
(`ms_deform_attn_core_pytorch`: `torch.nn.functional.grid_sample` per level), run in float64. The Pallas kernels run in interpret mode
(GPU kernel: the HLO interpreter; TPU kernel: `pltpu.InterpretParams`).
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lqseg_jax.kernels.ms_deform_attn import ms_deform_attn, ms_deform_attn_reference, pallas_gpu, pallas_tpu
from lqseg_jax.kernels.ms_deform_attn import op as msda_op

IMPLS = ("reference", "pallas_gpu", "pallas_tpu")
FP32_RTOL = 1e-5  # max |ours - torch| / max |torch|, per output and per gradient
BF16_RTOL = 1e-2  # bf16 inputs and outputs, float32 accumulation, vs float32 on the same rounded inputs
# Interpret-mode kernels are large unrolled programs; compiling them without LLVM's expensive passes
# keeps this file fast and does not change the arithmetic being checked.
_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _random_case(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    levels = int(rng.integers(1, 4))
    return dict(
        batch=int(rng.integers(1, 3)),
        heads=int(rng.integers(1, 4)),
        head_dim=int(rng.integers(1, 13)),
        queries=int(rng.integers(1, 11)),
        points=int(rng.integers(1, 4)),
        shapes=tuple((int(rng.integers(1, 7)), int(rng.integers(1, 7))) for _ in range(levels)),
        loc_range=(-0.25, 1.25),
    )


CASES = {
    # two non-square levels, locations outside [0, 1] on every side
    "two_levels_nonsquare": dict(
        batch=2, heads=2, head_dim=8, queries=7, points=2, shapes=((3, 5), (2, 3)), loc_range=(-0.3, 1.3)
    ),
    # one level, one point, odd head dim; samples exactly on pixel centres (the bilinear kinks, where
    # the gradient is one-sided), including centres of the pixels just outside the level
    "single_level_p1_odd_d_kinks": dict(
        batch=1, heads=3, head_dim=5, queries=5, points=1, shapes=((4, 2),), pixel_centres=True
    ),
    "random_seed7": _random_case(7),
}


def _inputs(case: dict, seed: int = 0):
    rng = np.random.default_rng(seed)
    b, heads, d, q, p = (case[k] for k in ("batch", "heads", "head_dim", "queries", "points"))
    shapes = case["shapes"]
    s = sum(h * w for h, w in shapes)
    value = rng.normal(size=(b, s, heads, d)).astype(np.float32)
    loc_shape = (b, q, heads, len(shapes), p, 2)
    if case.get("pixel_centres"):  # (k + 0.5) / size is exact in binary for power-of-two sizes
        sizes = np.array([[w, h] for h, w in shapes])[:, None, :]  # (l, 1, 2) as (x, y)
        loc = ((rng.integers(-1, sizes + 1, size=loc_shape) + 0.5) / sizes).astype(np.float32)
    else:
        loc = rng.uniform(*case["loc_range"], size=loc_shape).astype(np.float32)
    attn = rng.uniform(size=(b, q, heads, len(shapes), p)).astype(np.float32)
    grad_out = rng.normal(size=(b, q, heads * d)).astype(np.float32)
    return value, loc, attn, grad_out


def torch_msda(value, shapes, loc, attn):
    """Pure-PyTorch multi-scale deformable attention, one grid_sample per level (float64)."""
    b, _, heads, d = value.shape
    _, q, _, levels, points, _ = loc.shape
    grids = 2.0 * loc - 1.0  # grid_sample coordinates in [-1, 1]
    sampled, start = [], 0
    for lvl, (h, w) in enumerate(shapes):
        v_l = value[:, start : start + h * w].permute(0, 2, 3, 1).reshape(b * heads, d, h, w)
        grid_l = grids[:, :, :, lvl].permute(0, 2, 1, 3, 4).reshape(b * heads, q, points, 2)
        sampled.append(
            F.grid_sample(v_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=False)
        )  # (b*h, d, q, p)
        start += h * w
    stacked = torch.stack(sampled, dim=-2).flatten(-2)  # (b*h, d, q, l*p)
    weights = attn.permute(0, 2, 1, 3, 4).reshape(b * heads, 1, q, levels * points)
    out = (stacked * weights).sum(-1)  # (b*h, d, q)
    return out.reshape(b, heads * d, q).transpose(1, 2)  # (b, q, h*d)


def _torch_forward_and_grads(value, shapes, loc, attn, grad_out):
    tensors = [torch.tensor(x, dtype=torch.float64, requires_grad=True) for x in (value, loc, attn)]
    out = torch_msda(tensors[0], shapes, tensors[1], tensors[2])
    out.backward(torch.tensor(grad_out, dtype=torch.float64))
    return out.detach().numpy(), [t.grad.numpy() for t in tensors]


def _jax_forward_and_grads(impl: str, shapes, arrays):
    def run(value, loc, attn, grad_out):
        out, vjp = jax.vjp(
            lambda v, lc, a: ms_deform_attn(v, shapes, lc, a, impl=impl, interpret=True), value, loc, attn
        )
        return out, vjp(grad_out)

    arrays = [jnp.asarray(x) for x in arrays]
    compiled = jax.jit(run).lower(*arrays).compile(compiler_options=_FAST_COMPILE)
    out, grads = compiled(*arrays)
    return np.asarray(out.astype(jnp.float32)), [np.asarray(g.astype(jnp.float32)) for g in grads]


def _rel_err(x, ref) -> float:
    return float(np.max(np.abs(np.asarray(x, np.float64) - ref)) / max(np.max(np.abs(ref)), 1e-30))


_NAMES = ("output", "grad_value", "grad_sampling_locations", "grad_attention_weights")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case_name", list(CASES))
def test_forward_and_grads_match_torch_and_reference(case_name, impl):
    case = CASES[case_name]
    shapes = case["shapes"]
    value, loc, attn, grad_out = _inputs(case)
    t_out, t_grads = _torch_forward_and_grads(value, shapes, loc, attn, grad_out)
    out, grads = _jax_forward_and_grads(impl, shapes, (value, loc, attn, grad_out))
    for name, got, want in zip(_NAMES, [out, *grads], [t_out, *t_grads]):
        assert got.shape == want.shape, name
        assert _rel_err(got, want) <= FP32_RTOL, f"{impl} {name} vs torch: {_rel_err(got, want):.2e}"
    if impl != "reference":
        r_out, r_grads = _jax_forward_and_grads("reference", shapes, (value, loc, attn, grad_out))
        for name, got, want in zip(_NAMES, [out, *grads], [r_out, *r_grads]):
            err = _rel_err(got, np.asarray(want, np.float64))
            assert err <= FP32_RTOL, f"{impl} {name} vs reference: {err:.2e}"


@pytest.mark.parametrize("impl", IMPLS)
def test_bf16_tolerance(impl):
    case = CASES["two_levels_nonsquare"]
    shapes = case["shapes"]
    arrays = [np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32)) for x in _inputs(case, seed=1)]
    value, loc, attn, grad_out = arrays
    t_out, t_grads = _torch_forward_and_grads(value, shapes, loc, attn, grad_out)
    bf16 = [jnp.asarray(x, jnp.bfloat16) for x in arrays]

    def run(value, loc, attn, grad_out):
        out, vjp = jax.vjp(
            lambda v, lc, a: ms_deform_attn(v, shapes, lc, a, impl=impl, interpret=True), value, loc, attn
        )
        return out, vjp(grad_out)

    out, grads = jax.jit(run).lower(*bf16).compile(compiler_options=_FAST_COMPILE)(*bf16)
    assert out.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in grads)
    for name, got, want in zip(_NAMES, [out, *grads], [t_out, *t_grads]):
        err = _rel_err(np.asarray(got.astype(jnp.float32)), want)
        assert err <= BF16_RTOL, f"{impl} bf16 {name}: {err:.2e}"


def test_check_grads_reference():
    """Finite differences in float64, with samples kept 0.2 px away from the bilinear kinks."""
    rng = np.random.default_rng(3)
    shapes = ((3, 4), (2, 2))
    b, q, heads, points, d = 1, 3, 2, 2, 3
    s = sum(h * w for h, w in shapes)
    sizes = np.array([[w, h] for h, w in shapes], np.float64)[:, None, :]  # (l, 1, 2) as (x, y)
    pixel = rng.integers(-1, 4, size=(b, q, heads, len(shapes), points, 2)) + rng.uniform(
        0.2, 0.8, size=(b, q, heads, len(shapes), points, 2)
    )
    with jax.enable_x64(True):
        value = jnp.asarray(rng.normal(size=(b, s, heads, d)))
        loc = jnp.asarray((pixel + 0.5) / sizes)
        attn = jnp.asarray(rng.uniform(size=(b, q, heads, len(shapes), points)))
        assert value.dtype == jnp.float64
        jax.test_util.check_grads(
            jax.jit(lambda v, lc, a: ms_deform_attn_reference(v, shapes, lc, a)),
            (value, loc, attn),
            order=1,
            modes=("fwd", "rev"),
            eps=1e-4,
        )


def test_fallback_logs_reason_once(caplog):
    case = dict(CASES["single_level_p1_odd_d_kinks"], head_dim=300)
    shapes = case["shapes"]
    value, loc, attn, _ = _inputs(case)
    t_out, _ = _torch_forward_and_grads(value, shapes, loc, attn, np.zeros((1, 5, 3 * 300), np.float32))
    with caplog.at_level(logging.WARNING, logger=msda_op.__name__):
        for _ in range(2):
            out = ms_deform_attn(
                jnp.asarray(value),
                shapes,
                jnp.asarray(loc),
                jnp.asarray(attn),
                impl="pallas_gpu",
                interpret=True,
            )
    messages = [r.getMessage() for r in caplog.records if "pallas_gpu cannot take" in r.getMessage()]
    assert messages == [messages[0]] and "D=300" in messages[0], messages
    assert _rel_err(np.asarray(out), t_out) <= FP32_RTOL

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=msda_op.__name__):
        out16 = ms_deform_attn(
            jnp.asarray(value, jnp.float16),
            shapes,
            jnp.asarray(loc),
            jnp.asarray(attn),
            impl="pallas_tpu",
            interpret=True,
        )
    assert out16.dtype == jnp.float16
    assert any(
        "pallas_tpu cannot take" in r.getMessage() and "float16" in r.getMessage() for r in caplog.records
    )


def test_dispatch_on_cpu():
    value, loc, attn, _ = _inputs(CASES["two_levels_nonsquare"])
    shapes = CASES["two_levels_nonsquare"]["shapes"]
    value, loc, attn = jnp.asarray(value), jnp.asarray(loc), jnp.asarray(attn)
    assert msda_op.resolve_impl("auto", value, loc) == "reference"
    with pytest.raises(ValueError, match="needs a gpu backend"):
        ms_deform_attn(value, shapes, loc, attn, impl="pallas_gpu")
    with pytest.raises(ValueError, match="needs a tpu backend"):
        ms_deform_attn(value, shapes, loc, attn, impl="pallas_tpu")
    with pytest.raises(ValueError, match="impl must be one of"):
        ms_deform_attn(value, shapes, loc, attn, impl="cuda")
    with pytest.raises(ValueError, match="positions but value has S=21"):
        ms_deform_attn(value, ((3, 5), (2, 2)), loc, attn)
    with pytest.raises(ValueError, match="attention_weights must have shape"):
        ms_deform_attn(value, shapes, loc, attn[..., :1])
    with pytest.raises(ValueError, match="levels=1"):
        ms_deform_attn(value[:, :15], shapes[:1], loc, attn)


@pytest.mark.parametrize(
    "module, platform, custom_call",
    [(pallas_gpu, "cuda", "__gpu$xla.gpu.triton"), (pallas_tpu, "tpu", "tpu_custom_call")],
    ids=["pallas_gpu-triton", "pallas_tpu-mosaic"],
)
def test_kernels_pass_the_real_lowering(module, platform, custom_call):
    """Interpret mode skips the Triton / Mosaic lowering; lower forward and backward for the real platform.

    bf16 value with float32 sampling inputs, a query count that is not a block multiple.
    """
    shapes = ((16, 16), (8, 4))
    b, q, heads, d, points = 1, 300, 2, 32, 2
    s = sum(h * w for h, w in shapes)
    value = jax.ShapeDtypeStruct((b, s, heads, d), jnp.bfloat16)
    loc = jax.ShapeDtypeStruct((b, q, heads, len(shapes), points, 2), jnp.float32)
    attn = jax.ShapeDtypeStruct((b, q, heads, len(shapes), points), jnp.float32)
    grad = jax.ShapeDtypeStruct((b, q, heads * d), jnp.bfloat16)

    def fwd_bwd(v, lc, a, g):
        return module.forward(v, shapes, lc, a), module.backward(v, shapes, lc, a, g)

    text = jax.jit(fwd_bwd).trace(value, loc, attn, grad).lower(lowering_platforms=(platform,)).as_text()
    assert text.count(f"custom_call @{custom_call}") == 3  # forward + 2 backward kernels


def test_kernel_runs_per_batch_shard_under_a_mesh():
    """Under jax.set_mesh the kernel is wrapped in shard_map over the batch; results are unchanged."""
    case = dict(CASES["single_level_p1_odd_d_kinks"], batch=4)
    shapes = case["shapes"]
    value, loc, attn, grad_out = _inputs(case)
    t_out, t_grads = _torch_forward_and_grads(value, shapes, loc, attn, grad_out)
    mesh = jax.make_mesh(
        (2, 2), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2, devices=jax.devices()[:4]
    )
    with jax.set_mesh(mesh):
        jaxpr = jax.make_jaxpr(
            lambda v, lc, a: ms_deform_attn(v, shapes, lc, a, impl="pallas_gpu", interpret=True)
        )(value, loc, attn)
        out, grads = _jax_forward_and_grads("pallas_gpu", shapes, (value, loc, attn, grad_out))
    assert "shard_map" in str(jaxpr)
    for name, got, want in zip(_NAMES, [out, *grads], [t_out, *t_grads]):
        assert _rel_err(got, want) <= FP32_RTOL, f"{name} under a mesh: {_rel_err(got, want):.2e}"
