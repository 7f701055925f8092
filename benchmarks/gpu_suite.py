"""Every benchmark at its full-size GPU setting in one command, within 10 minutes; one JSON and one Markdown.

The GPU machine (benchmarks/RESULTS.md, "How to run the GPU suite") reaches no package index. Its image
holds jax with the CUDA plugin, torch with CUDA, flax, optax, orbax, transformers, but not grain,
array-record, ml-collections, portpicker or diffusers. So the suite runs in two places:

    # here, with the network: the lock's wheels for Python 3.12 (+ optionally the original MSDA CUDA op source)
    python benchmarks/gpu_suite.py --prepare [--msda-src DIR]
    # there, carrying benchmarks/gpu_suite_carry (~13 MB):
    python3 benchmarks/gpu_suite.py --out "$OUT"
    # here, the same script end to end on CPU with the smallest shapes:
    python benchmarks/gpu_suite.py --cpu-smoke

Run: (1) install: the carried wheels into a private folder put first on PYTHONPATH (the lock's versions of
flax, optax, orbax-checkpoint, grain, array-record, ml-collections, portpicker, diffusers; if flax/optax/orbax
of the lock fail the probe there, the image's own are used and the JSON says so), then this repository
(`pip install --no-deps --no-build-isolation --target`); jax, jaxlib and torch are the machine's own (none can
be installed there), and a probe records every version and fails the suite in one line if jax has no GPU;
(2) the original MultiScaleDeformableAttention CUDA op, built from carried source only if that takes under a
minute (else the MSDA benchmark compares with PyTorch's grid_sample path and says so); (3) the device's
ceilings, measured (copy bandwidth, bf16 matrix product); (4) each benchmark as a subprocess with its own
time limit and the suite's deadline; one that fails, times out or is absent is reported and the rest run.
Each benchmark's last JSON line is its result; a `"roofline"` list in it, of
`{"name", "ms", "flops"?, "bytes"?, "dtype"?}`, gets achieved FLOP/s and bandwidth against the ceilings.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import glob
import importlib.metadata
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CARRY = REPO / "benchmarks" / "gpu_suite_carry"
DEVICE_PYTHON = "3.12"  # the GPU image's python3 (/work/.library/device/KINDS.md)
# The image lacks these: their lock versions always travel as wheels.
ABSENT_ON_IMAGE = ("grain", "array-record", "ml-collections", "portpicker", "diffusers")
# The image has its own versions of these; the lock's travel too and are preferred if the probe passes.
LOCK_OVER_IMAGE = ("flax", "optax", "orbax-checkpoint")
WHEEL_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64")
WHEEL_PLATFORMS += ("manylinux2014_x86_64", "manylinux1_x86_64")
VERSIONS_OF = ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "flax", "optax", "orbax-checkpoint")
VERSIONS_OF += ("torch", "diffusers", "transformers", "grain", "numpy", "ml-collections")
# Nominal ceilings, used next to the measured ones: copy bandwidth and dense bf16 matrix rate as measured on
# such machines (KINDS.md, the issue), fp32 vector rate from the datasheet.
NOMINAL_PEAKS = {
    "H200": {"tb_per_s": 4.3, "bf16_tflops": 790.0, "fp32_tflops": 67.0},
    "H100": {"tb_per_s": 3.0, "bf16_tflops": 790.0, "fp32_tflops": 67.0},
}
PACKAGE_FILES = ("setup.py", "pyproject.toml", "requirements.txt", "README.md", "lqseg_jax", "kernels")
PACKAGE_FILES += ("data_pipelines",)
MSDA_BUILD_S = 60  # the issue: the original CUDA op only if it builds within a minute


SMALL = "<small>"  # in smoke_args: the script's own smallest-shapes flag, the first of SMALL_FLAGS it defines
SMALL_FLAGS = ("--small", "--tiny", "--smoke")


@dataclass(frozen=True)
class Bench:
    name: str
    script: str  # relative to the repository root
    gpu_args: tuple[str, ...]
    smoke_args: tuple[str, ...]
    limit_s: int  # on the GPU, compilation included; estimates until a GPU run replaces them


# In order of what the speed goals need first; rass_step is last because it compiles the most.
BENCHMARKS = (
    Bench("ms_deform_attn", "benchmarks/ms_deform_attn.py", (), ("--cases", "small", "--iters", "1"), 120),
    Bench(
        "degradation",
        "benchmarks/degradation.py",
        ("--batch", "16", "--size", "512", "--repeats", "5"),
        ("--batch", "2", "--size", "80", "--repeats", "1", "--devices", "1", "--threads", "1"),
        90,
    ),
    Bench(
        "sd_unet",
        "benchmarks/sd_unet.py",
        ("--steps", "5", "--warmup", "2"),
        ("--tiny", "--batch", "1", "--latent", "16", "--steps", "1", "--warmup", "0"),
        150,
    ),
    Bench("correlation", "benchmarks/correlation.py", (), (SMALL,), 60),
    Bench(
        "rass_step",
        "benchmarks/rass_step.py",
        ("--steps", "5"),
        ("--smoke", "--steps", "1", "--dtype", "float32"),
        240,
    ),
)


# ----------------------------------------------------------------------------------------------- prepare
def lock_versions() -> dict[str, str]:
    """requirements.lock's exact `name==version` pins ({} without the file)."""
    lock = REPO / "requirements.lock"
    if lock.exists():
        pins = re.findall(r"^([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?==([^\s;\\]+)", lock.read_text(), re.M)
        return {_norm(n): v for n, v in pins}
    return {}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def prepare(msda_src: str | None) -> None:
    """Download the overlay wheels for the device's Python into CARRY/wheels; copy the MSDA op source."""
    pins = lock_versions()
    wheels = CARRY / "wheels"
    shutil.rmtree(wheels, ignore_errors=True)
    wheels.mkdir(parents=True)
    specs = []
    for name in ABSENT_ON_IMAGE + LOCK_OVER_IMAGE:
        version = pins.get(_norm(name)) or importlib.metadata.version(name)
        specs.append(f"{name}=={version}")
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "-q",
        "--no-deps",
        "--only-binary=:all:",
        "-d",
        str(wheels),
    ]
    cmd += ["--python-version", DEVICE_PYTHON, "--implementation", "cp"]
    cmd += [arg for p in WHEEL_PLATFORMS for arg in ("--platform", p)]
    print("gpu_suite: downloading", " ".join(specs), "(from", "requirements.lock)" if pins else "this venv)")
    subprocess.run(cmd + specs, check=True)
    if msda_src:
        dest = CARRY / "msda_ops"
        shutil.rmtree(dest, ignore_errors=True)
        src = Path(msda_src)
        if (src / "HEAD").exists() and (src / "objects").is_dir():  # a bare git dir: its models/ops
            dest.mkdir(parents=True)
            archive = subprocess.run(
                ["git", "--git-dir", str(src), "archive", "HEAD", "models/ops"],
                check=True,
                capture_output=True,
            ).stdout
            subprocess.run(["tar", "-x", "--strip-components=2", "-C", str(dest)], input=archive, check=True)
        else:
            shutil.copytree(src, dest)
        if not (dest / "setup.py").exists():
            raise SystemExit(
                f"gpu_suite: --msda-src {msda_src}: no setup.py (expected the original ops/ folder)"
            )
    size = sum(f.stat().st_size for f in CARRY.rglob("*") if f.is_file())
    print(f"gpu_suite: {CARRY.relative_to(REPO)} ready ({size / 2**20:.1f} MiB): carry it to the GPU machine")


# ----------------------------------------------------------------------------------------------- install
def _wheel_fits(path: str) -> bool:
    """A wheel this interpreter can install: pure Python, or built for this CPython (the smoke run's 3.11)."""
    python_tag = Path(path).name.split("-")[-3]
    here = f"cp{sys.version_info.major}{sys.version_info.minor}"
    return any(t in ("py3", "py2.py3", here) or t.startswith("py3") for t in python_tag.split("."))


def _pip(args: list[str], log) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile"]
    cmd += ["--no-cache-dir", "--disable-pip-version-check", *args]
    done = subprocess.run(cmd, capture_output=True, text=True)
    log(f"$ {' '.join(cmd)}\n{done.stdout}{done.stderr}")
    return done


def install(work: Path, log) -> dict:
    """Wheels into work/site_{absent,lock}, this repository into work/site_repo; returns what was done."""
    info = {"wheels": [], "wheels_skipped": []}
    groups = {"absent": [], "lock": []}
    for whl in sorted(glob.glob(str(CARRY / "wheels" / "*.whl"))):
        name = _norm(Path(whl).name.split("-")[0])
        if not _wheel_fits(whl):
            info["wheels_skipped"].append(Path(whl).name)
            continue
        groups["lock" if name in map(_norm, LOCK_OVER_IMAGE) else "absent"].append(whl)
        info["wheels"].append(Path(whl).name)
    for group, files in groups.items():
        if files:
            done = _pip(["--target", str(work / f"site_{group}"), *files], log)
            if done.returncode:
                raise SystemExit(f"gpu_suite: FAILED: installing the carried {group} wheels: {_last(done)}")
    # what setup.py packages, copied so that the build leaves the checkout as it is
    build = work / "build_repo"
    build.mkdir()
    for name in PACKAGE_FILES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, build / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO / name, build / name)
    done = _pip(["--no-build-isolation", "--target", str(work / "site_repo"), str(build)], log)
    if done.returncode:
        raise SystemExit(f"gpu_suite: FAILED: installing this repository (pip --target): {_last(done)}")
    shutil.rmtree(build, ignore_errors=True)
    return info


def _last(done: subprocess.CompletedProcess) -> str:
    lines = (done.stderr or done.stdout or "").strip().splitlines()
    return lines[-1] if lines else f"exit status {done.returncode}"


PROBE = r"""
import importlib.metadata, json, sys
out = {"python": sys.version.split()[0], "executable": sys.executable, "versions": {}}
for name in sys.argv[1].split(","):
    try:
        out["versions"][name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        pass
import jax, jax.numpy as jnp
out["versions"]["jax (imported)"] = jax.__version__
out["backend"] = jax.default_backend()
out["device_kind"] = jax.devices()[0].device_kind
out["device_count"] = jax.device_count()
from flax import nnx
import optax, torch
layer = nnx.Linear(4, 4, rngs=nnx.Rngs(0))
jax.block_until_ready(nnx.jit(lambda m, x: m(x))(layer, jnp.ones((2, 4))))
import lqseg_jax, lqseg_jax.kernels.ms_deform_attn, lqseg_jax.data_pipelines.degradation
import lqseg_jax.train.trainer, lqseg_jax.eval.evaluate, lqseg_jax.models.sd_unet, diffusers, transformers
out["lqseg_jax_from"] = lqseg_jax.__file__
out["torch_cuda"] = torch.cuda.is_available()
out["torch_device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
out["torch_cuda_version"] = torch.version.cuda
print(json.dumps(out))
"""


def probe(env: dict) -> tuple[dict | None, str]:
    """Versions, devices and the imports every benchmark needs, in a subprocess; (info, why it failed)."""
    try:
        done = run_limited([sys.executable, "-c", PROBE, ",".join(VERSIONS_OF)], env, 300)
    except subprocess.TimeoutExpired:
        return None, "the probe ran past 300 s"
    result = last_json(done.stdout)
    return (result, "") if done.returncode == 0 and result else (None, _last(done))


def nvidia_smi() -> dict:
    if not shutil.which("nvidia-smi"):
        return {}
    done = subprocess.run(
        ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm", "--format=csv,noheader"],
        capture_output=True,
        text=True,
    )
    fields = [f.strip() for f in done.stdout.splitlines()[0].split(",")] if done.stdout.strip() else []
    return dict(zip(("name", "driver", "memory_total", "max_sm_clock"), fields))


def build_msda(work: Path, env: dict, log) -> tuple[str, Path | None]:
    """The original CUDA op from CARRY/msda_ops, if it builds within MSDA_BUILD_S; (status, folder)."""
    src = CARRY / "msda_ops"
    if not (src / "setup.py").exists():
        return "not built: its source was not carried (gpu_suite.py --prepare --msda-src DIR)", None
    build = work / "msda_build"
    shutil.copytree(src, build / "src")
    cmd = [sys.executable, "setup.py", "build_ext", "--build-lib", str(build / "lib")]
    env = dict(env, TORCH_CUDA_ARCH_LIST="9.0", MAX_JOBS=str(os.cpu_count() or 1))
    t0 = time.perf_counter()
    try:
        done = run_limited(cmd, env, MSDA_BUILD_S, cwd=build / "src")
    except subprocess.TimeoutExpired:
        return f"not built: the build ran past {MSDA_BUILD_S} s", None
    log(f"$ {' '.join(cmd)}\n{done.stdout}")
    if done.returncode:
        return f"not built: {_last(done)}", None
    return f"built in {time.perf_counter() - t0:.0f} s", build / "lib"


# ------------------------------------------------------------------------------------------------- peaks
def measure_peaks(small: bool) -> None:
    """Copy bandwidth (bytes read + written) and bf16 matrix rate on random data, median of 10 after 3."""
    import jax
    import jax.numpy as jnp

    n, m = (1 << 20, 256) if small else (1 << 30, 8192)  # 4 GiB of float32; 8192^3
    x = jax.random.normal(jax.random.key(0), (n,), jnp.float32)
    a, b = (jax.random.normal(k, (m, m), jnp.bfloat16) for k in jax.random.split(jax.random.key(1)))
    scale = jax.jit(lambda v: v * 1.5)
    matmul = jax.jit(lambda p, q: p @ q)

    def median_s(fn, *args) -> float:
        for _ in range(3):
            jax.block_until_ready(fn(*args))
        times = []
        for _ in range(10):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times.append(time.perf_counter() - t0)
        return sorted(times)[len(times) // 2]

    copy_s, mm_s = median_s(scale, x), median_s(matmul, a, b)
    result = {
        "device_kind": jax.devices()[0].device_kind,
        "copy_bytes": 2 * 4 * n,
        "copy_ms": 1e3 * copy_s,
        "tb_per_s": 2 * 4 * n / copy_s / 1e12,
        "matmul_n": m,
        "matmul_ms": 1e3 * mm_s,
        "bf16_tflops": 2 * m**3 / mm_s / 1e12,
    }
    print(json.dumps(result))


# ----------------------------------------------------------------------------------------------- running
def run_limited(cmd: list[str], env: dict, limit_s: float, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """Run in its own process group; at the limit kill the whole group and raise TimeoutExpired with output."""
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=limit_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise subprocess.TimeoutExpired(cmd, limit_s, output=out) from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "")


def last_json(text: str) -> dict | None:
    """The last line of the output that is a JSON object."""
    for line in reversed((text or "").splitlines()):
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return None


def small_flag(script: Path, wanted: tuple[str, ...]) -> tuple[str, ...]:
    """`wanted` with SMALL replaced by the first of SMALL_FLAGS that the script's source defines (or dropped)."""
    if SMALL not in wanted:
        return wanted
    text = script.read_text()
    have = next((f for f in SMALL_FLAGS if f'"{f}"' in text), None)
    return tuple(have if f == SMALL else f for f in wanted if f != SMALL or have)


def run_bench(bench: Bench, args: tuple[str, ...], env: dict, limit_s: float, log) -> dict:
    script = REPO / bench.script
    if not script.exists():
        return {"status": "absent", "note": f"{bench.script} does not exist yet"}
    cmd = [sys.executable, bench.script, *small_flag(script, args)]
    entry = {"command": " ".join(["python", *cmd[1:]]), "limit_s": round(limit_s)}
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    try:
        done = run_limited(cmd, env, limit_s)
        out, status = done.stdout, "ok" if done.returncode == 0 else f"failed (exit status {done.returncode})"
    except subprocess.TimeoutExpired as err:
        out, status = err.output or "", f"timed out after {limit_s:.0f} s"
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    entry["wall_s"] = round(time.perf_counter() - t0, 1)
    entry["cpu_s"] = round(cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime, 1)
    entry["status"] = status
    log(f"===== {bench.name}: {entry['command']} ({status}, {entry['wall_s']} s)\n{out}")
    result = last_json(out)
    if result is not None:
        entry["result"] = result
        entry["result_complete"] = status == "ok"  # a timed-out run keeps the partial line it printed last
    if status != "ok":
        tail = [line for line in out.strip().splitlines() if line.strip()][-1:] or ["(no output)"]
        entry["last_line"] = tail[0][-300:]
    return entry


def run_benchmarks(benches, smoke: bool, env: dict, deadline: float, log, say, jobs: int = 1) -> dict:
    """Each benchmark limited by its own limit (not in smoke runs) and by the suite's deadline; `jobs` at
    a time (1 for timings; more only for smoke runs, whose times mean nothing, and then without cpu_s)."""

    def one(bench: Bench) -> dict:
        left = deadline - time.perf_counter() - 15  # keep time to write the report
        if left < 20:
            entry = {"status": "not run: the suite's deadline was reached"}
        else:
            limit = left if smoke else min(bench.limit_s, left)
            entry = run_bench(bench, bench.smoke_args if smoke else bench.gpu_args, env, limit, log)
            if jobs > 1:
                entry.pop("cpu_s")  # the children's CPU time of concurrent runs cannot be told apart
        say(f"{bench.name}: {entry['status']} ({entry.get('wall_s', 0)} s)")
        return entry

    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        entries = list(pool.map(one, benches))
    return {bench.name: entry for bench, entry in zip(benches, entries)}


def roofline(results: dict, peaks: dict) -> list[dict]:
    """Achieved TFLOP/s and TB/s of every benchmark's "roofline" entries, and their fractions of the peaks."""
    rows = []
    for name, entry in results.items():
        for item in (entry.get("result") or {}).get("roofline", []):
            seconds = item["ms"] / 1e3
            row = {"benchmark": name, **item}
            if item.get("bytes"):
                row["tb_per_s"] = item["bytes"] / seconds / 1e12
            if item.get("flops"):
                row["tflops"] = item["flops"] / seconds / 1e12
            flops_key = "fp32_tflops" if item.get("dtype") == "float32" else "bf16_tflops"
            for label, ceil in peaks.items():
                if "tb_per_s" in row and ceil.get("tb_per_s"):
                    row[f"bandwidth_fraction_{label}"] = row["tb_per_s"] / ceil["tb_per_s"]
                if "tflops" in row and ceil.get(flops_key):
                    row[f"flops_fraction_{label}"] = row["tflops"] / ceil[flops_key]
            rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------------ report
def _numbers(d: dict, prefix: str = "") -> list[tuple[str, float]]:
    out = []
    for k, v in d.items():
        if isinstance(v, dict):
            out += _numbers(v, f"{prefix}{k}.")
        elif isinstance(v, int | float) and not isinstance(v, bool):
            out.append((f"{prefix}{k}", v))
    return out


RATIO = re.compile(r"ratio|speedup|_over_")
TIME = re.compile(r"_ms$|_s$|fps|images_per_s|bytes$")


def markdown(report: dict) -> str:
    env, peaks = report["environment"], report["peaks"]
    title = "CPU smoke run of the GPU suite" if report["cpu_smoke"] else "GPU suite"
    lines = [
        f"## {title}: {env.get('device_kind', '?')} ({report['date']})",
        "",
        f"- Command: `{report['command']}` ({report['wall_s']:.0f} s in all, {report.get('cpu_s_children')} "
        f"CPU s in subprocesses, {report.get('jobs', 1)} at a time, deadline {report['deadline_s']:.0f} s; "
        + ", ".join(f"{k} {v} s" for k, v in report.get("phases_s", {}).items())
        + ").",
        f"- Device: {env.get('device_kind', '?')}; nvidia-smi: {env.get('nvidia_smi') or 'n/a'}; "
        f"torch sees {env.get('torch_device', '?')} (CUDA {env.get('torch_cuda_version')}).",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in env.get("versions", {}).items()) + ".",
        f"- Install: {report['install'].get('mode', '?')}; MSDA CUDA op: {report['msda_op']}.",
    ]
    if report.get("lock_mismatch"):
        lines.append(f"- Not the lock's versions: {report['lock_mismatch']}.")
    if "measured" in peaks:
        m = peaks["measured"]
        lines.append(
            f"- Measured ceilings: copy {m['tb_per_s']:.3g} TB/s, bf16 matrix product "
            f"{m['bf16_tflops']:.3g} TFLOP/s (n = {m['matmul_n']})."
        )
    if "nominal" in peaks:
        lines.append(f"- Nominal ceilings: {peaks['nominal']}.")
    lines += [
        "",
        "| benchmark | status | wall s (cpu s) | ratios | times and rates |",
        "|---|---|---|---|---|",
    ]
    for name, e in report["benchmarks"].items():
        nums = _numbers(e.get("result") or {})
        ratios = "<br>".join(f"{k} {v:.3g}" for k, v in nums if RATIO.search(k))
        times = "<br>".join(f"{k} {v:.4g}" for k, v in nums if TIME.search(k) and not RATIO.search(k))
        status = e["status"] + ("" if e.get("result_complete", True) else ", partial result")
        if e.get("last_line"):
            status += f": `{e['last_line'][:120]}`"
        wall = f"{e['wall_s']} ({e.get('cpu_s', '-')})" if "wall_s" in e else ""
        lines.append(f"| {name} | {status} | {wall} | {ratios} | {times} |")
    if report["roofline"]:
        labels = list(peaks)
        head = " | ".join(f"of {lb} peak (bw / flops)" for lb in labels)
        lines += [
            "",
            f"| kernel | ms | TB/s | TFLOP/s | {head} |",
            "|---|---|---|---|" + "---|" * len(labels),
        ]
        for r in report["roofline"]:
            fr = " | ".join(
                f"{_pct(r.get(f'bandwidth_fraction_{lb}'))} / {_pct(r.get(f'flops_fraction_{lb}'))}"
                for lb in labels
            )
            lines.append(
                f"| {r['benchmark']}: {r['name']} | {r['ms']:.3f} | {_fmt(r.get('tb_per_s'))} | "
                f"{_fmt(r.get('tflops'))} | {fr} |"
            )
    return "\n".join(lines) + "\n"


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.3g}"


# -------------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--prepare", action="store_true", help="download the carried wheels (needs a network)"
    )
    parser.add_argument(
        "--msda-src", help="with --prepare: the original ops/ folder, or Deformable-DETR's git dir"
    )
    parser.add_argument("--cpu-smoke", action="store_true", help="on CPU, the smallest shapes, no GPU needed")
    parser.add_argument(
        "--out", help="folder for gpu_suite.json/.md/.log (default $OUT, else gpu_suite_out/)"
    )
    parser.add_argument(
        "--deadline-s",
        type=float,
        help="the whole suite's wall-clock budget (570 s; 1200 s with --cpu-smoke)",
    )
    parser.add_argument("--jobs", type=int, help="benchmarks at a time (1; 2 with --cpu-smoke)")
    parser.add_argument("--only", help="comma-separated benchmark names (default: all)")
    parser.add_argument(
        "--measure-peaks", action="store_true", help=argparse.SUPPRESS
    )  # the peaks subprocess
    parser.add_argument("--small", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure_peaks:
        measure_peaks(args.small)
        return 0
    if args.prepare:
        prepare(args.msda_src)
        return 0
    args.deadline_s = args.deadline_s or (1200 if args.cpu_smoke else 570)
    args.jobs = args.jobs or (2 if args.cpu_smoke else 1)

    start = time.perf_counter()
    out_dir = Path(args.out or os.environ.get("OUT") or REPO / "benchmarks" / "gpu_suite_out")
    out_dir.mkdir(parents=True, exist_ok=True)
    log_path = out_dir / "gpu_suite.log"
    log_path.write_text("")

    def log(text: str) -> None:
        with log_path.open("a") as f:
            f.write(text.rstrip() + "\n")

    def say(text: str) -> None:
        print(f"gpu_suite: {text}", flush=True)
        log(f"gpu_suite: {text}")

    report = {
        "suite": "benchmarks/gpu_suite.py",
        "cpu_smoke": args.cpu_smoke,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python", *sys.argv]),
        "deadline_s": args.deadline_s,
        "lock": {n: v for n, v in lock_versions().items() if n in VERSIONS_OF},
    }
    work = Path(tempfile.mkdtemp(prefix="gpu_suite_"))
    try:
        phase = time.perf_counter()
        report["install"] = install(work, log)
        report["phases_s"] = {"install": round(time.perf_counter() - phase, 1)}
        say(f"installed {len(report['install']['wheels'])} carried wheels and this repository in {work}")
        env = dict(os.environ, PYTHONUNBUFFERED="1", XLA_PYTHON_CLIENT_PREALLOCATE="false")
        if args.cpu_smoke:
            env["JAX_PLATFORMS"] = "cpu"
            env["CUDA_VISIBLE_DEVICES"] = ""
        base_path = [str(work / "site_absent"), str(work / "site_repo"), env.get("PYTHONPATH", "")]
        env["PYTHONPATH"] = os.pathsep.join([str(work / "site_lock"), *base_path])
        phase = time.perf_counter()
        info, why = probe(env)
        report["install"]["mode"] = "the lock's flax/optax/orbax (carried)"
        if info is None and (work / "site_lock").exists():
            say(f"the probe failed with the lock's flax/optax/orbax ({why}); trying the image's own")
            lock_why = why
            env["PYTHONPATH"] = os.pathsep.join(base_path)
            info, why = probe(env)
            report["install"]["mode"] = f"the image's flax/optax/orbax (with the lock's: {lock_why})"
        if info is None:
            hint = (
                ""
                if report["install"]["wheels"]
                else " (no carried wheels: run --prepare, carry gpu_suite_carry)"
            )
            raise SystemExit(
                f"gpu_suite: FAILED: the environment probe (jax, flax, torch, lqseg_jax): {why}{hint}"
            )
        report["phases_s"]["probe"] = round(time.perf_counter() - phase, 1)
        info["nvidia_smi"] = nvidia_smi()
        report["environment"] = info
        report["lock_mismatch"] = ", ".join(
            f"{n} {info['versions'].get(n, 'absent')} (lock {v})"
            for n, v in report["lock"].items()
            if info["versions"].get(n, v) != v
        )
        say(
            f"jax {info['versions'].get('jax')} on {info['backend']} ({info['device_kind']}), torch on "
            f"{info['torch_device']}"
        )
        if not args.cpu_smoke and info["backend"] != "gpu":
            raise SystemExit(
                f"gpu_suite: FAILED: jax {info['versions'].get('jax')} has no GPU here (backend "
                f"{info['backend']}); this machine reaches no index to install jax[cuda13]: use an image whose "
                "jax has its CUDA plugin, or --cpu-smoke"
            )
        phase = time.perf_counter()
        report["msda_op"], msda_lib = build_msda(work, env, log)
        report["phases_s"]["msda_build"] = round(time.perf_counter() - phase, 1)
        if msda_lib is not None:
            env["PYTHONPATH"] = os.pathsep.join([env["PYTHONPATH"], str(msda_lib)])
        say(f"MSDA CUDA op: {report['msda_op']}")

        peaks, phase = {}, time.perf_counter()
        cmd = [sys.executable, __file__, "--measure-peaks", *(["--small"] if args.cpu_smoke else [])]
        try:
            measured = last_json(run_limited(cmd, env, 60).stdout)
        except subprocess.TimeoutExpired:
            measured = None
        if measured:
            peaks["measured"] = measured
        nominal = next((v for k, v in NOMINAL_PEAKS.items() if k in info["device_kind"]), None)
        if nominal:
            peaks["nominal"] = nominal
        report["peaks"] = peaks
        report["phases_s"]["ceilings"] = round(time.perf_counter() - phase, 1)
        say(f"ceilings: {json.dumps(peaks)}")

        wanted = args.only.split(",") if args.only else [b.name for b in BENCHMARKS]
        benches = [b for b in BENCHMARKS if b.name in wanted]
        report["benchmarks"] = run_benchmarks(
            benches, args.cpu_smoke, env, start + args.deadline_s, log, say, args.jobs
        )
        report["jobs"] = args.jobs
        report["roofline"] = roofline(report["benchmarks"], peaks)
        return_code = 0
    except SystemExit as err:
        print(err, flush=True)
        log(str(err))
        report["failed"] = str(err)
        report.setdefault("environment", {})
        report.setdefault("peaks", {})
        report.setdefault("benchmarks", {})
        report.setdefault("roofline", [])
        report.setdefault("msda_op", "not tried")
        report.setdefault("install", {})
        return_code = 2
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report["wall_s"] = time.perf_counter() - start
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    report["cpu_s_children"] = round(children.ru_utime + children.ru_stime, 1)
    (out_dir / "gpu_suite.json").write_text(json.dumps(report, indent=1) + "\n")
    (out_dir / "gpu_suite.md").write_text(markdown(report))
    print((out_dir / "gpu_suite.md").read_text())
    print(
        f"gpu_suite: wrote {out_dir}/gpu_suite.json, gpu_suite.md, gpu_suite.log in {report['wall_s']:.0f} s"
    )
    return return_code


if __name__ == "__main__":
    sys.exit(main())
