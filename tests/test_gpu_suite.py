"""benchmarks/gpu_suite.py's bookkeeping on fake benchmarks: results, failures, time limits, the suite's
deadline, an absent script, the roofline arithmetic and the JSON/Markdown report. No jax, no torch."""

import json
import sys
import time

from benchmarks import gpu_suite as suite

OK_RESULT = {
    "ratio": 2.5,
    "ours_ms": 2.0,
    "roofline": [{"name": "k fwd", "ms": 2.0, "bytes": 4e9, "flops": 2e12, "dtype": "bfloat16"}],
}
OK = f"print('warming up'); print({json.dumps(OK_RESULT)!r})"
FAILS = 'print("about to fail"); raise SystemExit("boom: bad shape")'
# prints a partial result, then outlives its limit; its child must be killed with it
SLOW = """
import json, subprocess, sys, time
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
print(json.dumps({"train_step_ms": 5.0}), flush=True)
time.sleep(60)
"""
SMALL_FLAG = 'import argparse; p = argparse.ArgumentParser(); p.add_argument("--tiny"); print("{}")'


def _bench(tmp_path, name, source, limit_s=30):
    path = tmp_path / f"{name}.py"
    if source is not None:
        path.write_text(source)
    return suite.Bench(name, str(path), ("--x",) if name == "flag" else (), (), limit_s)


def test_run_benchmarks_reports_each_outcome_and_the_rest_still_run(tmp_path):
    benches = [
        _bench(tmp_path, "slow", SLOW, limit_s=1),
        _bench(tmp_path, "fails", FAILS),
        _bench(tmp_path, "absent", None),
        _bench(tmp_path, "ok", OK),
    ]
    logged, said = [], []
    t0 = time.perf_counter()
    results = suite.run_benchmarks(
        benches, False, None, time.perf_counter() + 300, logged.append, said.append
    )
    assert time.perf_counter() - t0 < 8  # the slow one and its child were killed at 1 s

    assert results["slow"]["status"] == "timed out after 1 s"
    assert results["slow"]["result"] == {"train_step_ms": 5.0}
    assert results["slow"]["result_complete"] is False
    assert results["fails"]["status"] == "failed (exit status 1)"
    assert results["fails"]["last_line"] == "boom: bad shape"
    assert "result" not in results["fails"]
    assert results["absent"]["status"] == "absent"
    assert results["ok"]["status"] == "ok"
    assert results["ok"]["result"]["ratio"] == 2.5
    assert results["ok"]["result_complete"] is True
    assert len(said) == 4 and any("about to fail" in text for text in logged)


def test_deadline_stops_starting_benchmarks(tmp_path):
    results = suite.run_benchmarks(
        [_bench(tmp_path, "ok", OK)], False, None, time.perf_counter() + 30, lambda _: None, lambda _: None
    )
    assert results["ok"]["status"].startswith("not run")


def test_small_flag_follows_the_script(tmp_path):
    script = tmp_path / "b.py"
    script.write_text(SMALL_FLAG)
    assert suite.small_flag(script, (suite.SMALL, "--iters", "1")) == ("--tiny", "--iters", "1")
    script.write_text("print('{}')")
    assert suite.small_flag(script, (suite.SMALL, "--iters", "1")) == ("--iters", "1")


def test_last_json_takes_the_last_object_line():
    text = 'noise\n{"a": 1}\n{"b": 2}\n{not json}\ntrailing log line\n'
    assert suite.last_json(text) == {"b": 2}
    assert suite.last_json("no json here") is None


def test_roofline_and_report(tmp_path):
    results = {"ok": {"status": "ok", "result": OK_RESULT}}
    peaks = {"nominal": {"tb_per_s": 4.0, "bf16_tflops": 1000.0, "fp32_tflops": 50.0}}
    (row,) = suite.roofline(results, peaks)
    assert abs(row["tb_per_s"] - 2.0) < 1e-12  # 4 GB in 2 ms
    assert abs(row["tflops"] - 1000.0) < 1e-9  # 2 TFLOP in 2 ms
    assert abs(row["bandwidth_fraction_nominal"] - 0.5) < 1e-12
    assert abs(row["flops_fraction_nominal"] - 1.0) < 1e-12

    report = {
        "cpu_smoke": False,
        "date": "2026-12-03T00:00:00+00:00",
        "command": "python benchmarks/gpu_suite.py",
        "deadline_s": 570,
        "wall_s": 12.0,
        "environment": {"device_kind": "NVIDIA H200", "versions": {"jax": "0.11.2"}},
        "install": {"mode": "test"},
        "msda_op": "not built: test",
        "peaks": peaks,
        "benchmarks": dict(
            results, slow={"status": "timed out after 1 s", "result": {"x_ms": 1.0}, "result_complete": False}
        ),
        "roofline": [row],
        "lock_mismatch": "jax 0.11.2 (lock 0.10.2)",
    }
    md = suite.markdown(report)
    assert "## GPU suite: NVIDIA H200" in md
    assert "| ok | ok |" in md and "ratio 2.5" in md
    assert "| slow | timed out after 1 s, partial result |" in md
    assert "| ok: k fwd | 2.000 | 2 | 1e+03 | 50.0% / 100.0% |" in md
    assert "jax 0.11.2 (lock 0.10.2)" in md


def test_main_writes_json_and_markdown_when_the_install_fails(tmp_path, monkeypatch):
    def broken_install(work, log):
        raise SystemExit("gpu_suite: FAILED: installing this repository (pip --target): no setuptools")

    monkeypatch.setattr(suite, "install", broken_install)
    monkeypatch.setattr(sys, "argv", ["gpu_suite.py", "--cpu-smoke", "--out", str(tmp_path)])
    assert suite.main(["--cpu-smoke", "--out", str(tmp_path)]) == 2
    report = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert report["failed"].startswith("gpu_suite: FAILED: installing this repository")
    assert (tmp_path / "gpu_suite.md").read_text().startswith("## CPU smoke run of the GPU suite")


def test_two_at_a_time_keeps_every_result(tmp_path):
    nap = "import time; time.sleep(2); print('{\"done\": 1}')"
    benches = [_bench(tmp_path, f"nap{i}", nap) for i in range(2)] + [_bench(tmp_path, "fails", FAILS)]
    t0 = time.perf_counter()
    results = suite.run_benchmarks(
        benches, True, None, time.perf_counter() + 300, lambda _: None, lambda _: None, jobs=2
    )
    assert time.perf_counter() - t0 < 3.9  # the two 2 s naps overlapped
    assert list(results) == ["nap0", "nap1", "fails"]
    assert [r["status"] for r in results.values()] == ["ok", "ok", "failed (exit status 1)"]
    assert results["nap0"]["result"] == {"done": 1} and "cpu_s" not in results["nap0"]
