"""Benchmark local correlation (patch 9): forward, and forward+backward, against the reference.

    python benchmarks/correlation.py [--cases uawarpc_l3,uawarpc_l2,uawarpc_l1,hrda_l1] [--small]
        [--iters N] [--dtype float32|bfloat16]

--cases: comma-separated subset of the shapes below (default: all four UAWarpC / HRDA shapes).
--small: the CPU smoke shape only (same as --cases small). --iters: timed runs per measurement (10 on
accelerators, 3 on CPU). --dtype: input dtype of the JAX implementations (the PyTorch paths are
float32 only and are skipped for bfloat16).

Times, in the same run: the pure-JAX reference; the Pallas kernel of the backend (pallas_gpu on GPU,
pallas_tpu on TPU; on CPU the kernels only run in interpret mode, which says nothing about their
speed, so they are not timed); and PyTorch: the original CUDA op (`spatial_correlation_sampler`) when it
imports on a CUDA machine, else the pad + shifted-products formula on the same device kind (CUDA, or
the CPU). Each time is the median of --iters runs after one warm-up (which includes compilation). On
an accelerator the kernel is also checked against the reference on the benchmark inputs (max error
relative to the reference's largest magnitude) and its backward run twice for bitwise equality.

The last line printed is one JSON object: per case the times in ms ("fwd_ms", "fwd_bwd_ms") of each
path, and "ratios": "<kernel>_speedup_vs_reference_<phase>", "<kernel>_bwd_over_fwd" ((fwd_bwd - fwd)
/ fwd), "reference_speedup_vs_torch_<path>_<phase>" and "<kernel>_speedup_vs_torch_<path>_<phase>"
(phase fwd or fwd_bwd; a ratio > 1 means the first is faster). Its "roofline" list gives, per timing,
the fewest bytes the op must move (each input read once, each output written once) and its arithmetic
(2*c FLOPs per output value forward, twice that backward), for benchmarks/gpu_suite.py.
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

from lqseg_jax.kernels.correlation import local_correlation

PATCH = 9
CASES = {
    # UAWarpC levels 3, 2, 1 of a 512x512 Refign crop (VGG-16 features after pool3/pool3/pool2).
    "uawarpc_l3": dict(batch=2, height=32, width=32, channels=256),
    "uawarpc_l2": dict(batch=2, height=64, width=64, channels=256),
    "uawarpc_l1": dict(batch=2, height=128, width=128, channels=128),
    # Level 1 of HRDA's 1024x1024 crops.
    "hrda_l1": dict(batch=2, height=256, width=256, channels=128),
    # The CPU smoke shape (--small; not in the default list).
    "small": dict(batch=1, height=16, width=16, channels=32),
}
FULL_CASES = ("uawarpc_l3", "uawarpc_l2", "uawarpc_l1", "hrda_l1")
KERNEL_BY_BACKEND = {"gpu": "pallas_gpu", "tpu": "pallas_tpu"}


def _inputs(case: dict, seed: int = 0):
    rng = np.random.default_rng(seed)
    shape = (case["batch"], case["height"], case["width"], case["channels"])
    x1 = rng.normal(size=shape).astype(np.float32)
    x2 = rng.normal(size=shape).astype(np.float32)
    grad = rng.normal(size=(*shape[:3], PATCH * PATCH)).astype(np.float32)
    return x1, x2, grad


def cost(case: dict, itemsize: int) -> dict:
    """Fewest bytes moved and arithmetic per phase (module docstring)."""
    pixels = case["batch"] * case["height"] * case["width"]
    c, k = case["channels"], PATCH * PATCH
    fwd_bytes = itemsize * pixels * (2 * c + k)  # x1, x2 read; the output written
    fwd_flops = 2 * pixels * c * k
    return {
        "fwd": {"bytes": fwd_bytes, "flops": fwd_flops},
        # + the output gradient read and both input gradients written; backward is two correlations
        "fwd_bwd": {"bytes": 2 * fwd_bytes, "flops": 3 * fwd_flops},
    }


def _median_ms(run, sync, iters: int) -> float:
    sync(run())  # warm-up, includes compilation
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        sync(run())
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def _jax_fns(impl: str):
    fwd = jax.jit(lambda a, b: local_correlation(a, b, patch_size=PATCH, impl=impl))

    @jax.jit
    def fwd_bwd(a, b, g):
        out, vjp = jax.vjp(lambda a_, b_: local_correlation(a_, b_, patch_size=PATCH, impl=impl), a, b)
        return out, vjp(g)

    return fwd, fwd_bwd


def time_jax(impl: str, arrays, dtype, iters: int) -> dict:
    x1, x2, grad = (jnp.asarray(x, dtype) for x in arrays)
    fwd, fwd_bwd = _jax_fns(impl)
    return {
        "fwd_ms": _median_ms(lambda: fwd(x1, x2), jax.block_until_ready, iters),
        "fwd_bwd_ms": _median_ms(lambda: fwd_bwd(x1, x2, grad), jax.block_until_ready, iters),
    }


def check_kernel(kernel: str, arrays, dtype) -> dict:
    """Kernel vs reference on the benchmark inputs, and two backward runs compared bitwise."""
    x1, x2, grad = (jnp.asarray(x, dtype) for x in arrays)
    _, fwd_bwd = _jax_fns(kernel)
    _, ref_fwd_bwd = _jax_fns("reference")
    out, grads = fwd_bwd(x1, x2, grad)
    r_out, r_grads = ref_fwd_bwd(x1, x2, grad)
    errs = {}
    for name, got, want in zip(("output", "grad_x1", "grad_x2"), (out, *grads), (r_out, *r_grads)):
        got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
        errs[name] = float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))
    _, again = fwd_bwd(x1, x2, grad)
    same = all(np.array_equal(np.asarray(u), np.asarray(v)) for u, v in zip(grads, again))
    return {"max_rel_err_vs_reference": errs, "backward_bitwise_repeatable": same}


def torch_correlation(in1, in2, patch: int):
    """(b, c, h, w) x2 -> (b, p*p, h, w): pad + one shifted product per displacement (dilation 1)."""
    _, _, h, w = in1.shape
    r = (patch - 1) // 2
    padded = F.pad(in2, (r, r, r, r))  # (b, c, h + 2r, w + 2r)
    outs = [
        (in1 * padded[:, :, i : i + h, j : j + w]).sum(1)  # (b, h, w)
        for i in range(patch)
        for j in range(patch)
    ]
    return torch.stack(outs, 1)  # (b, p*p, h, w)


def _torch_cuda_op():
    """The original compiled op, or None with the reason it cannot be used."""
    if not torch.cuda.is_available():
        return None, "torch has no CUDA device here"
    try:
        from spatial_correlation_sampler import spatial_correlation_sample
    except ImportError as err:
        return None, f"spatial_correlation_sampler not importable ({err})"
    return spatial_correlation_sample, None


def time_torch(arrays, iters: int) -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x1, x2, grad = (torch.tensor(x, device=device).permute(0, 3, 1, 2).contiguous() for x in arrays)  # NCHW
    sync = (lambda _: torch.cuda.synchronize()) if device == "cuda" else (lambda _: None)
    op, why_not = _torch_cuda_op()
    if op is not None:
        b, _, h, w = x1.shape

        def corr(a, c):
            return op(a, c, kernel_size=1, patch_size=PATCH, stride=1, padding=0, dilation_patch=1).view(
                b, PATCH * PATCH, h, w
            )

        path = "cuda_op"
    else:

        def corr(a, c):
            return torch_correlation(a, c, PATCH)

        path = f"shifted_products_{device}"
    leaves = [t.clone().requires_grad_(True) for t in (x1, x2)]

    def fwd():
        with torch.no_grad():
            return corr(x1, x2)

    def fwd_bwd():
        for t in leaves:
            t.grad = None
        out = corr(*leaves)
        out.backward(grad)
        return out

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
    parser.add_argument("--small", action="store_true", help="the CPU smoke shape only (--cases small)")
    parser.add_argument(
        "--iters", type=int, default=None, help="timed runs per measurement (10 on accelerators, 3 on CPU)"
    )
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    args = parser.parse_args()
    names = ["small"] if args.small else args.cases.split(",")
    unknown = [n for n in names if n not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {unknown}; choose from {', '.join(CASES)}")
    backend = jax.default_backend()
    iters = args.iters or (3 if backend == "cpu" else 10)
    dtype = jnp.dtype(args.dtype)
    kernel = KERNEL_BY_BACKEND.get(backend)
    report = {
        "benchmark": "correlation",
        "date": datetime.date.today().isoformat(),
        "command": " ".join([sys.executable.split("/")[-1], *sys.argv]),
        "jax": jax.__version__,
        "torch": torch.__version__,
        "backend": backend,
        "device": str(jax.devices()[0].device_kind),
        "host": platform.processor() or platform.machine(),
        "dtype": args.dtype,
        "patch_size": PATCH,
        "iters": iters,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "loadavg_1m_start": os.getloadavg()[0],
        "cases": {},
        "roofline": [],
    }
    if kernel is None:
        report["note"] = (
            f"no GPU/TPU: Pallas kernels run only in interpret mode on {backend}, which is not timed; "
            "compared: pure-JAX reference vs the PyTorch shifted-products formula"
        )
        print(report["note"])
    for name in names:
        case = CASES[name]
        arrays = _inputs(case)
        entry = {"shape": list(arrays[0].shape), "reference": time_jax("reference", arrays, dtype, iters)}
        print(f"{name}: reference {entry['reference']}", flush=True)
        if kernel is not None:
            entry[kernel] = time_jax(kernel, arrays, dtype, iters) | check_kernel(kernel, arrays, dtype)
            print(f"{name}: {kernel} {entry[kernel]}", flush=True)
        if dtype == jnp.float32:  # the torch paths are float32 only
            entry["torch"] = time_torch(arrays, iters)
            print(f"{name}: torch {entry['torch']}", flush=True)
        ratios = {}
        if kernel is not None:
            k_ms = entry[kernel]
            ratios[f"{kernel}_bwd_over_fwd"] = (k_ms["fwd_bwd_ms"] - k_ms["fwd_ms"]) / k_ms["fwd_ms"]
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
