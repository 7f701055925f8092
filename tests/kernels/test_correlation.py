"""Local correlation: every implementation against an independent PyTorch formula and the reference.

The PyTorch formula restates spatial-correlation-sampler (kernel 1, stride 1; refign.md section 5) in
its own layout: NCHW inputs, x2 zero-padded, one shifted product per displacement summed over
channels, output (b, p, p, h, w); it runs in float64 and its gradients come from torch autograd. The
Pallas kernels run in interpret mode (GPU kernel: the HLO interpreter; TPU kernel: `pltpu.InterpretParams`).
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

from lqseg_jax.kernels.correlation import (
    local_correlation,
    local_correlation_reference,
    pallas_gpu,
    pallas_tpu,
)
from lqseg_jax.kernels.correlation import op as corr_op

IMPLS = ("reference", "pallas_gpu", "pallas_tpu")
FP32_RTOL = 1e-5  # max |ours - torch| / max |torch|, per output and per gradient
BF16_RTOL = 1e-2  # bf16 inputs and outputs, float32 accumulation, vs float64 on the same rounded inputs
# Interpret-mode kernels are large unrolled programs; compiling them without LLVM's expensive passes
# keeps this file fast and does not change the arithmetic being checked.
_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}

CASES = {
    # UAWarpC's patch on a map smaller than the displacement range, odd non-square size, odd c
    "p9_nonsquare": dict(batch=1, height=5, width=7, channels=5, patch=9, dilation=1),
    # batch 3, patch 3 with dilation 2, c not a multiple of 8
    "p3_dil2_batch3": dict(batch=3, height=6, width=4, channels=11, patch=3, dilation=2),
    # patch 1: a per-pixel dot product
    "p1": dict(batch=2, height=3, width=5, channels=3, patch=1, dilation=1),
    # the pool3 map of a 540x960 image: several row blocks (TPU) and pixel blocks (GPU), a ragged last one
    "67x120_p3": dict(batch=1, height=67, width=120, channels=3, patch=3, dilation=1),
}


def _inputs(case: dict, seed: int = 0):
    rng = np.random.default_rng(seed)
    shape = (case["batch"], case["height"], case["width"], case["channels"])
    p = case["patch"]
    x1 = rng.normal(size=shape).astype(np.float32)
    x2 = rng.normal(size=shape).astype(np.float32)
    grad_out = rng.normal(size=(*shape[:3], p * p)).astype(np.float32)
    return x1, x2, grad_out


def torch_correlation(in1, in2, patch: int, dilation: int):
    """(b, c, h, w) x2 -> (b, p, p, h, w): out[n, i, j, y, x] = sum_c in1[y, x] in2[y + (i-r)d, x + (j-r)d]."""
    _, _, h, w = in1.shape
    r = (patch - 1) // 2
    lo, hi = r * dilation, (patch - 1 - r) * dilation
    padded = F.pad(in2, (lo, hi, lo, hi))  # (b, c, h + lo + hi, w + lo + hi), zeros outside
    rows = []
    for i in range(patch):
        cols = []
        for j in range(patch):
            shifted = padded[:, :, i * dilation : i * dilation + h, j * dilation : j * dilation + w]
            cols.append((in1 * shifted).sum(1))  # (b, h, w)
        rows.append(torch.stack(cols, 1))  # (b, p, h, w)
    return torch.stack(rows, 1)  # (b, p, p, h, w)


def _torch_forward_and_grads(x1, x2, grad_out, patch: int, dilation: int):
    """NHWC numpy in and out; torch runs NCHW in float64."""
    t1, t2 = (
        torch.tensor(x.transpose(0, 3, 1, 2), dtype=torch.float64, requires_grad=True) for x in (x1, x2)
    )
    out = torch_correlation(t1, t2, patch, dilation)  # (b, p, p, h, w)
    b, h, w, _ = x1.shape
    g = torch.tensor(grad_out, dtype=torch.float64).reshape(b, h, w, patch, patch).permute(0, 3, 4, 1, 2)
    out.backward(g)
    out_nhwc = out.detach().permute(0, 3, 4, 1, 2).reshape(b, h, w, patch * patch).numpy()
    return out_nhwc, [t.grad.permute(0, 2, 3, 1).numpy() for t in (t1, t2)]


def _jax_forward_and_grads(impl: str, x1, x2, grad_out, patch: int, dilation: int):
    def run(a, b, g):
        out, vjp = jax.vjp(
            lambda u, v: local_correlation(
                u, v, patch_size=patch, dilation_patch=dilation, impl=impl, interpret=True
            ),
            a,
            b,
        )
        return out, vjp(g)

    arrays = [jnp.asarray(x) for x in (x1, x2, grad_out)]
    out, grads = jax.jit(run).lower(*arrays).compile(compiler_options=_FAST_COMPILE)(*arrays)
    return np.asarray(out.astype(jnp.float32)), [np.asarray(g.astype(jnp.float32)) for g in grads]


def _rel_err(x, ref) -> float:
    return float(np.max(np.abs(np.asarray(x, np.float64) - ref)) / max(np.max(np.abs(ref)), 1e-30))


_NAMES = ("output", "grad_x1", "grad_x2")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case_name", list(CASES))
def test_forward_and_grads_match_torch_and_reference(case_name, impl):
    case = CASES[case_name]
    p, d = case["patch"], case["dilation"]
    x1, x2, grad_out = _inputs(case)
    t_out, t_grads = _torch_forward_and_grads(x1, x2, grad_out, p, d)
    out, grads = _jax_forward_and_grads(impl, x1, x2, grad_out, p, d)
    for name, got, want in zip(_NAMES, [out, *grads], [t_out, *t_grads]):
        assert got.shape == want.shape, name
        assert _rel_err(got, want) <= FP32_RTOL, f"{impl} {name} vs torch: {_rel_err(got, want):.2e}"
    if impl != "reference":
        r_out, r_grads = _jax_forward_and_grads("reference", x1, x2, grad_out, p, d)
        for name, got, want in zip(_NAMES, [out, *grads], [r_out, *r_grads]):
            err = _rel_err(got, np.asarray(want, np.float64))
            assert err <= FP32_RTOL, f"{impl} {name} vs reference: {err:.2e}"


@pytest.mark.parametrize("impl", IMPLS)
def test_channel_order(impl):
    """Patch 9: displacement dy = +2, dx = -1 is channel (2 + 4) * 9 + (-1 + 4) = 57."""
    x1 = np.zeros((1, 7, 7, 2), np.float32)
    x2 = np.zeros((1, 7, 7, 2), np.float32)
    x1[0, 3, 3] = (1.0, 2.0)
    x2[0, 5, 2] = (3.0, 5.0)
    fn = jax.jit(lambda a, b: local_correlation(a, b, impl=impl, interpret=True))
    out = np.asarray(fn.lower(x1, x2).compile(compiler_options=_FAST_COMPILE)(x1, x2))
    expected = np.zeros((1, 7, 7, 81), np.float32)
    expected[0, 3, 3, 57] = 13.0
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("impl", IMPLS)
def test_bf16_tolerance(impl):
    case = dict(CASES["p3_dil2_batch3"], batch=1)
    p, d = case["patch"], case["dilation"]
    arrays = [np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32)) for x in _inputs(case, seed=1)]
    t_out, t_grads = _torch_forward_and_grads(*arrays, p, d)
    bf16 = [jnp.asarray(x, jnp.bfloat16) for x in arrays]

    def run(a, b, g):
        out, vjp = jax.vjp(
            lambda u, v: local_correlation(u, v, patch_size=p, dilation_patch=d, impl=impl, interpret=True),
            a,
            b,
        )
        return out, vjp(g)

    out, grads = jax.jit(run).lower(*bf16).compile(compiler_options=_FAST_COMPILE)(*bf16)
    assert out.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in grads)
    for name, got, want in zip(_NAMES, [out, *grads], [t_out, *t_grads]):
        err = _rel_err(np.asarray(got.astype(jnp.float32)), want)
        assert err <= BF16_RTOL, f"{impl} bf16 {name}: {err:.2e}"


def test_check_grads_reference():
    rng = np.random.default_rng(3)
    with jax.enable_x64(True):
        x1 = jnp.asarray(rng.normal(size=(2, 4, 5, 3)))
        x2 = jnp.asarray(rng.normal(size=(2, 4, 5, 3)))
        assert x1.dtype == jnp.float64
        jax.test_util.check_grads(
            jax.jit(lambda a, b: local_correlation_reference(a, b, patch_size=3, dilation_patch=2)),
            (x1, x2),
            order=1,
            modes=("fwd", "rev"),
            eps=1e-3,
        )


def test_input_errors():
    x = jnp.zeros((1, 4, 5, 3), jnp.float32)
    with pytest.raises(
        ValueError, match=r"x1 must be \(batch, height, width, channels\), got shape \(4, 5, 3\)"
    ):
        local_correlation(x[0], x)
    with pytest.raises(ValueError, match="x2 must be floating point, got int32"):
        local_correlation(x, x.astype(jnp.int32))
    with pytest.raises(ValueError, match=r"x1 \(1, 4, 5, 3\) and x2 \(1, 4, 6, 3\) must have the same shape"):
        local_correlation(x, jnp.zeros((1, 4, 6, 3), jnp.float32))
    with pytest.raises(ValueError, match="must have the same dtype"):
        local_correlation(x, x.astype(jnp.bfloat16))
    with pytest.raises(ValueError, match="patch_size must be a positive static int, got 0"):
        local_correlation(x, x, patch_size=0)
    with pytest.raises(ValueError, match=r"dilation_patch must be a positive static int, got 1\.5"):
        local_correlation(x, x, dilation_patch=1.5)
    with pytest.raises(ValueError, match="impl must be one of"):
        local_correlation(x, x, impl="cuda")


def test_dispatch_on_cpu():
    x = jnp.zeros((1, 4, 5, 3), jnp.float32)
    assert corr_op.resolve_impl("auto", x, 9, 1) == "reference"
    with pytest.raises(ValueError, match="needs a gpu backend"):
        local_correlation(x, x, impl="pallas_gpu")
    with pytest.raises(ValueError, match="needs a tpu backend"):
        local_correlation(x, x, impl="pallas_tpu")


def test_fallback_logs_reason_once(caplog):
    """float16 is not a TPU kernel dtype: the reference runs, and the reason is logged once."""
    case = CASES["p1"]
    x1, x2, _ = _inputs(case)
    t_out, _ = _torch_forward_and_grads(x1, x2, np.zeros((2, 3, 5, 1), np.float32), 1, 1)
    with caplog.at_level(logging.WARNING, logger=corr_op.__name__):
        for _ in range(2):
            out = local_correlation(
                jnp.asarray(x1, jnp.float16),
                jnp.asarray(x2, jnp.float16),
                patch_size=1,
                impl="pallas_tpu",
                interpret=True,
            )
    messages = [r.getMessage() for r in caplog.records if "pallas_tpu cannot take" in r.getMessage()]
    assert messages == [messages[0]] and "float16" in messages[0], messages
    assert out.dtype == jnp.float16
    assert _rel_err(np.asarray(out, np.float32), t_out) <= 2e-3


@pytest.mark.parametrize(
    "module, platform, custom_call",
    [(pallas_gpu, "cuda", "__gpu$xla.gpu.triton"), (pallas_tpu, "tpu", "tpu_custom_call")],
    ids=["pallas_gpu-triton", "pallas_tpu-mosaic"],
)
def test_kernels_pass_the_real_lowering(module, platform, custom_call):
    """Interpret mode skips the Triton / Mosaic lowering; lower forward and backward for the real platform.

    bf16 inputs, UAWarpC's patch, the 67x120 map and a channel count that is not a multiple of 8.
    """
    x = jax.ShapeDtypeStruct((2, 67, 120, 57), jnp.bfloat16)
    g = jax.ShapeDtypeStruct((2, 67, 120, 81), jnp.bfloat16)

    def fwd_bwd(a, b, gg):
        kw = dict(patch_size=9, dilation_patch=1)
        return module.forward(a, b, **kw), module.backward(a, b, gg, **kw)

    text = jax.jit(fwd_bwd).trace(x, x, g).lower(lowering_platforms=(platform,)).as_text()
    assert text.count(f"custom_call @{custom_call}") == 3  # forward + 2 backward kernels


def test_kernel_runs_per_batch_shard_under_a_mesh():
    """Under jax.set_mesh the kernel is wrapped in shard_map over the batch; results are unchanged."""
    case = dict(CASES["p1"], batch=4, patch=3)
    x1, x2, grad_out = _inputs(case)
    t_out, t_grads = _torch_forward_and_grads(x1, x2, grad_out, 3, 1)
    mesh = jax.make_mesh(
        (2, 2), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2, devices=jax.devices()[:4]
    )
    with jax.set_mesh(mesh):
        jaxpr = jax.make_jaxpr(
            lambda a, b: local_correlation(a, b, patch_size=3, impl="pallas_gpu", interpret=True)
        )(x1, x2)
        out, grads = _jax_forward_and_grads("pallas_gpu", x1, x2, grad_out, 3, 1)
    assert "shard_map" in str(jaxpr)
    for name, got, want in zip(_NAMES, [out, *grads], [t_out, *t_grads]):
        assert _rel_err(got, want) <= FP32_RTOL, f"{name} under a mesh: {_rel_err(got, want):.2e}"
