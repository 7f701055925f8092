"""Local correlation: every implementation against an independent PyTorch formula and the reference.

The PyTorch formula restates spatial-correlation-sampler (kernel 1, stride 1; refign.md section 5) in
its own layout: NCHW inputs, x2 zero-padded, one shifted product per displacement summed over
channels, output (b, p, p, h, w); it runs in float64 and its gradients come from torch autograd.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lqseg_jax.kernels.correlation import local_correlation, local_correlation_reference

IMPLS = ("reference",)
FP32_RTOL = 1e-5  # max |ours - torch| / max |torch|, per output and per gradient
BF16_RTOL = 1e-2  # bf16 inputs and outputs, float32 accumulation, vs float64 on the same rounded inputs

CASES = {
    # UAWarpC's patch on a map smaller than the displacement range, odd non-square size, odd c
    "p9_nonsquare": dict(batch=1, height=5, width=7, channels=5, patch=9, dilation=1),
    # batch 3, patch 3 with dilation 2, c not a multiple of 8
    "p3_dil2_batch3": dict(batch=3, height=6, width=4, channels=11, patch=3, dilation=2),
    # patch 1: a per-pixel dot product
    "p1": dict(batch=2, height=3, width=5, channels=3, patch=1, dilation=1),
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
    out, grads = jax.jit(run)(*arrays)
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
    x1 = np.zeros((1, 9, 9, 2), np.float32)
    x2 = np.zeros((1, 9, 9, 2), np.float32)
    x1[0, 4, 4] = (1.0, 2.0)
    x2[0, 6, 3] = (3.0, 5.0)
    out = np.asarray(local_correlation(jnp.asarray(x1), jnp.asarray(x2), impl=impl, interpret=True))
    expected = np.zeros((1, 9, 9, 81), np.float32)
    expected[0, 4, 4, 57] = 13.0
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("impl", IMPLS)
def test_bf16_tolerance(impl):
    case = CASES["p3_dil2_batch3"]
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

    out, grads = jax.jit(run)(*bf16)
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
