"""Benchmark multi-scale deformable attention: forward, and forward+backward, against the reference.

    python benchmarks/ms_deform_attn.py [--cases mask2former_ade20k,deformable_detr] [--iters N]
        [--dtype float32|bfloat16]

Times, in the same run: the pure-JAX reference; the Pallas kernel of the backend (pallas_gpu on GPU,
pallas_tpu on TPU; on CPU the kernels only run in interpret mode, which says nothing about their
speed, so they are not timed); and PyTorch: the original CUDA op (`MultiScaleDeformableAttention`)
when it is importable on a CUDA machine, else the pure-PyTorch grid_sample path
(`ms_deform_attn_core_pytorch`) on the same device kind. Each time is the median of --iters runs after
one warm-up (which includes compilation). The last line printed is a JSON object with every time (ms)
and the ratios; nothing is hard-coded. Its "roofline" list gives, per timing, the fewest bytes the op must
move (each input read once, each output written once) and its arithmetic (bilinear sampling and the
attention weight: 5 FMAs per sample and channel forward, 17 more backward); benchmarks/gpu_suite.py turns
them into achieved bandwidth and FLOP/s against the device's peaks. `--cases small` is the CPU smoke shape.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

# JAX would otherwise preallocate most of the GPU memory and leave none to the PyTorch baselines.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F

from lqseg_jax.kernels.ms_deform_attn import ms_deform_attn

CASES = {
    # Mask2Former ADE20K pixel decoder: res3..res5 of a 512x512 crop, Q = S = 5376.
    "mask2former_ade20k": dict(
        batch=2, heads=8, head_dim=32, points=4, shapes=((64, 64), (32, 32), (16, 16))
    ),
    # Deformable-DETR: a 800x1066 image at strides 8, 16, 32, 64 (4 levels), Q = S = 17821.
    "deformable_detr": dict(
        batch=2, heads=8, head_dim=32, points=4, shapes=((100, 134), (50, 67), (25, 34), (13, 17))
    ),
    # The smallest shape, for benchmarks/gpu_suite.py --cpu-smoke (not in the default list).
    "small": dict(batch=1, heads=2, head_dim=8, points=2, shapes=((8, 8), (4, 4))),
}
FULL_CASES = ("mask2former_ade20k", "deformable_detr")
FLOPS_PER_SAMPLE_CHANNEL = {"fwd": 2 * 5, "fwd_bwd": 2 * (5 + 17)}
KERNEL_BY_BACKEND = {"gpu": "pallas_gpu", "tpu": "pallas_tpu"}


def _inputs(case: dict, seed: int = 0):
    rng = np.random.default_rng(seed)
    shapes = case["shapes"]
    s = sum(h * w for h, w in shapes)
    b, heads, d, p, levels = case["batch"], case["heads"], case["head_dim"], case["points"], len(shapes)
    value = rng.normal(size=(b, s, heads, d)).astype(np.float32)
    loc = rng.uniform(-0.05, 1.05, size=(b, s, heads, levels, p, 2)).astype(np.float32)
    logits = rng.normal(size=(b, s, heads, levels * p)).astype(np.float32)
    attn = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    attn = attn.reshape(b, s, heads, levels, p).astype(np.float32)
    grad = rng.normal(size=(b, s, heads * d)).astype(np.float32)
    return value, loc, attn, grad


def cost(case: dict, itemsize: int) -> dict:
    """Fewest bytes moved and arithmetic per phase (module docstring)."""
    b, heads, d, p, levels = (
        case["batch"],
        case["heads"],
        case["head_dim"],
        case["points"],
        len(case["shapes"]),
    )
    s = sum(h * w for h, w in case["shapes"])  # queries = values here
    value = out = b * s * heads * d
    samples = b * s * heads * levels * p
    fwd = value + 3 * samples + out  # value, locations (2 per sample), weights; the output
    return {
        "fwd": {"bytes": itemsize * fwd, "flops": samples * d * FLOPS_PER_SAMPLE_CHANNEL["fwd"]},
        # + the output gradient read (out's size), the three input gradients written (the inputs' sizes)
        "fwd_bwd": {
            "bytes": itemsize * 2 * fwd,
            "flops": samples * d * FLOPS_PER_SAMPLE_CHANNEL["fwd_bwd"],
        },
    }


def _median_ms(run, sync, iters: int) -> float:
    sync(run())  # warm-up, includes compilation
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        sync(run())
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def time_jax(impl: str, case: dict, arrays, dtype, iters: int) -> dict:
    shapes = case["shapes"]
    value, loc, attn, grad = (jnp.asarray(x, dtype) for x in arrays)

    fwd = jax.jit(lambda v, lc, a: ms_deform_attn(v, shapes, lc, a, impl=impl))

    @jax.jit
    def fwd_bwd(v, lc, a, g):
        out, vjp = jax.vjp(lambda v_, l_, a_: ms_deform_attn(v_, shapes, l_, a_, impl=impl), v, lc, a)
        return out, vjp(g)

    return {
        "fwd_ms": _median_ms(lambda: fwd(value, loc, attn), jax.block_until_ready, iters),
        "fwd_bwd_ms": _median_ms(lambda: fwd_bwd(value, loc, attn, grad), jax.block_until_ready, iters),
    }


def torch_grid_sample_msda(value, shapes, loc, attn):
    """Pure-PyTorch path of the original (one grid_sample per level)."""
    b, _, heads, d = value.shape
    _, q, _, levels, points, _ = loc.shape
    grids = 2.0 * loc - 1.0
    sampled, start = [], 0
    for lvl, (h, w) in enumerate(shapes):
        v_l = value[:, start : start + h * w].permute(0, 2, 3, 1).reshape(b * heads, d, h, w)
        grid_l = grids[:, :, :, lvl].permute(0, 2, 1, 3, 4).reshape(b * heads, q, points, 2)
        sampled.append(F.grid_sample(v_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=False))
        start += h * w
    stacked = torch.stack(sampled, dim=-2).flatten(-2)  # (b*h, d, q, l*p)
    out = (stacked * attn.permute(0, 2, 1, 3, 4).reshape(b * heads, 1, q, levels * points)).sum(-1)
    return out.reshape(b, heads * d, q).transpose(1, 2)


def _torch_cuda_op():
    """The original compiled op, or None with the reason it cannot be used."""
    if not torch.cuda.is_available():
        return None, "torch has no CUDA device here"
    try:
        import MultiScaleDeformableAttention as msda  # built from Deformable-DETR / Mask2Former ops/
    except ImportError as err:
        return None, f"MultiScaleDeformableAttention not importable ({err})"
    return msda, None


def time_torch(case: dict, arrays, iters: int) -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shapes = case["shapes"]
    value, loc, attn, grad = (torch.tensor(x, device=device) for x in arrays)
    sync = (lambda _: torch.cuda.synchronize()) if device == "cuda" else (lambda _: None)
    op, why_not = _torch_cuda_op()
    if op is not None:
        shapes_t = torch.tensor(shapes, dtype=torch.long, device=device)
        starts = torch.cat([shapes_t.new_zeros(1), (shapes_t[:, 0] * shapes_t[:, 1]).cumsum(0)[:-1]])
        step = 64

        def fwd():
            return op.ms_deform_attn_forward(value, shapes_t, starts, loc, attn, step)

        def fwd_bwd():
            out = fwd()
            grads = op.ms_deform_attn_backward(value, shapes_t, starts, loc, attn, grad.contiguous(), step)
            return out, grads

        path = "cuda_op"
    else:
        leaves = [t.clone().requires_grad_(True) for t in (value, loc, attn)]

        def fwd():
            with torch.no_grad():
                return torch_grid_sample_msda(value, shapes, loc, attn)

        def fwd_bwd():
            for t in leaves:
                t.grad = None
            out = torch_grid_sample_msda(leaves[0], shapes, leaves[1], leaves[2])
            out.backward(grad)
            return out

        path = f"grid_sample_{device}"
    result = {
        "path": path,
        "fwd_ms": _median_ms(fwd, sync, iters),
        "fwd_bwd_ms": _median_ms(fwd_bwd, sync, iters),
    }
    if why_not is not None:
        result["cuda_op_unavailable"] = why_not
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--cases", default=",".join(FULL_CASES), help="comma-separated subset of " + ", ".join(CASES)
    )
    parser.add_argument(
        "--iters", type=int, default=None, help="timed runs per measurement (10 on accelerators, 3 on CPU)"
    )
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    args = parser.parse_args()
    backend = jax.default_backend()
    iters = args.iters or (3 if backend == "cpu" else 10)
    dtype = jnp.dtype(args.dtype)
    kernel = KERNEL_BY_BACKEND.get(backend)
    report = {
        "benchmark": "ms_deform_attn",
        "date": datetime.date.today().isoformat(),
        "command": " ".join([sys.executable.split("/")[-1], *sys.argv]),
        "jax": jax.__version__,
        "torch": torch.__version__,
        "backend": backend,
        "device": str(jax.devices()[0].device_kind),
        "host": platform.processor() or platform.machine(),
        "dtype": args.dtype,
        "iters": iters,
        "cpu_count": os.cpu_count(),
        "loadavg_1m_start": os.getloadavg()[0],
        "cases": {},
        "roofline": [],
    }
    if kernel is None:
        report["note"] = (
            f"no GPU/TPU: Pallas kernels run only in interpret mode on {backend}, which is not timed; "
            "compared: pure-JAX reference vs PyTorch grid_sample path"
        )
        print(report["note"])
    for name in args.cases.split(","):
        case = CASES[name]
        arrays = _inputs(case)
        entry = {
            "queries": arrays[1].shape[1],
            "reference": time_jax("reference", case, arrays, dtype, iters),
        }
        print(f"{name}: reference {entry['reference']}", flush=True)
        if kernel is not None:
            entry[kernel] = time_jax(kernel, case, arrays, dtype, iters)
            print(f"{name}: {kernel} {entry[kernel]}", flush=True)
        if dtype == jnp.float32:  # the torch paths are float32 only
            entry["torch"] = time_torch(case, arrays, iters)
            print(f"{name}: torch {entry['torch']}", flush=True)
        ratios = {}
        for phase in ("fwd", "fwd_bwd"):
            ref_ms = entry["reference"][f"{phase}_ms"]
            if kernel is not None:
                ratios[f"{kernel}_speedup_vs_reference_{phase}"] = ref_ms / entry[kernel][f"{phase}_ms"]
            if "torch" in entry:
                key = f"reference_speedup_vs_torch_{entry['torch']['path']}_{phase}"
                ratios[key] = entry["torch"][f"{phase}_ms"] / ref_ms
                if kernel is not None:
                    ratios[f"{kernel}_speedup_vs_torch_{entry['torch']['path']}_{phase}"] = (
                        entry["torch"][f"{phase}_ms"] / entry[kernel][f"{phase}_ms"]
                    )
        entry["ratios"] = ratios
        report["cases"][name] = entry
        costs = cost(case, dtype.itemsize)
        for impl in ("reference", kernel, "torch"):
            for phase in ("fwd", "fwd_bwd") if impl in entry else ():
                label = entry["torch"]["path"] if impl == "torch" else impl
                report["roofline"].append(
                    {"name": f"{name} {label} {phase}", "ms": entry[impl][f"{phase}_ms"], "dtype": args.dtype}
                    | costs[phase]
                )
    report["loadavg_1m_end"] = os.getloadavg()[0]
    print(json.dumps(report))


if __name__ == "__main__":
    main()
