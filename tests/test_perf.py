import json
import math

import pytest
import torch

from onerec_fast.perf import attention_flops, mfu, moe_flops, peak_flops, swiglu_flops, time_fn
from onerec_fast.perf.harness import Case, Unavailable, format_table, run_case, write_results
from onerec_fast.perf.mfu import Peak
from tests.helpers import load_script


def test_flop_formulas_match_hand_counts():
    # 3 GEMMs of [T, d] x [d, f]: 3 * 2 * T * d * f
    assert swiglu_flops(10, 4, 8) == 3 * 2 * 10 * 4 * 8
    assert swiglu_flops(10, 4, 8, backward=True) == 3 * swiglu_flops(10, 4, 8)
    t, d, f, e, k = 16, 8, 12, 5, 2
    assert moe_flops(t, d, f, e, k) == 2 * t * d * e + 6 * t * k * d * f
    # two rows, Lq=3, Lk=(4, 0), 2 heads, D=8: only real keys count
    assert attention_flops(3, [4, 0], 2, 8) == 4 * (3 * 4) * 2 * 8
    with pytest.raises(ValueError, match="same number of rows"):
        attention_flops([1, 2], [1, 2, 3], 1, 8)


def test_mfu_against_a_given_peak():
    p = Peak(100e12, "test")
    assert mfu(50e12, 1.0, peak=p) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="seconds"):
        mfu(1.0, 0.0, peak=p)


def test_cpu_peak_is_measured_and_says_so():
    p = peak_flops("cpu")
    assert p.flops > 1e8 and "measured" in p.source and "CPU" in p.source


def test_time_fn_counts_repetitions():
    calls = []
    t = time_fn(lambda: calls.append(1), "cpu", warmup=2, rep=5)
    assert len(calls) == 7 and len(t.times_ms) == 5 and t.median_ms >= 0


def _toy_case():
    def setup():
        g = torch.Generator().manual_seed(0)
        return {"a": torch.randn(64, 64, generator=g), "b": torch.randn(64, 64, generator=g)}

    def missing(inputs):
        raise Unavailable("backend not built here")

    return Case(
        suite="toy", name="matmul 64", flops=2 * 64**3, setup=setup, dtype=torch.float32,
        impls={
            "reference": lambda x: (lambda: x["a"] @ x["b"]),
            "twice": lambda x: (lambda: (x["a"] @ x["b"], x["a"] @ x["b"])),
            "missing": missing,
        },
    )


def test_harness_rows_table_and_files(tmp_path):
    peak = Peak(1e12, "test peak")
    rows = run_case(_toy_case(), torch.device("cpu"), peak, warmup=1, rep=3)
    by = {r.impl: r for r in rows}
    assert by["reference"].status == "ok" and by["reference"].speedup == pytest.approx(1.0)
    assert by["twice"].status == "ok" and by["twice"].median_ms > 0
    assert by["missing"].status.startswith("n/a") and math.isnan(by["missing"].median_ms)
    assert by["reference"].mfu == pytest.approx(by["reference"].tflops * 1e12 / peak.flops)
    table = format_table(rows, peak)
    assert "test peak" in table and "matmul 64" in table and "backend not built here" in table
    j, c = write_results(rows, {"device": "cpu"}, str(tmp_path))
    data = json.load(open(j))
    assert data["environment"]["device"] == "cpu" and len(data["rows"]) == 3
    assert open(c).read().count("\n") == 4


def test_bench_cli_saves_each_case_before_the_run_ends(tmp_path, monkeypatch, capsys):
    """`onerec-fast bench` writes bench.json/csv after every case: a run stopped in its second case (here by an
    error in its set-up; on a device machine by the time limit) keeps the first case's rows."""
    import argparse
    import types

    from onerec_fast.perf import cli_bench, harness

    def broken_setup():
        raise RuntimeError("stopped in the second case")

    second = Case("toy", "second", 1.0, broken_setup, {"reference": lambda x: (lambda: None)})
    monkeypatch.setattr(harness, "load_suite", lambda name: types.SimpleNamespace(
        cases=lambda device, quick: [_toy_case(), second]))
    monkeypatch.setattr(harness, "peak_flops", lambda device, dtype, measured=None: Peak(1e12, "test peak"))
    args = argparse.Namespace(device="cpu", suite=["moe"], full=False, peak=None, out=str(tmp_path))
    with pytest.raises(RuntimeError, match="second case"):
        cli_bench.run(args)
    data = json.load(open(tmp_path / "bench.json"))
    assert {r["case"] for r in data["rows"]} == {_toy_case().name} and len(data["rows"]) == 3
    assert "matmul 64" in capsys.readouterr().out  # the finished case's rows were printed as it ended


def test_serving_benchmark_smoke_on_cpu(tmp_path):
    """benchmarks/bench_serving.py end to end on a tiny model: a row per implementation and request size, every
    returned item real, latency quantiles ordered, users/s consistent with the mean latency."""
    mod = load_script("benchmarks/bench_serving.py")
    rc = mod.main(["--device", "cpu", "--preset", "tiny", "--num-items", "3000", "--codebook-size", "32",
                   "--lifelong", "32", "--batches", "1,3", "--requests", "3", "--warmup", "1", "--beam", "16",
                   "--impls", "fused-head,reference", "--out", str(tmp_path)])
    assert rc == 0
    rows = json.loads((tmp_path / "bench_serving.json").read_text())["rows"]
    assert [(r["impl"], r["users"]) for r in rows] == [("fused-head", 1), ("fused-head", 3), ("reference", 1),
                                                      ("reference", 3)]
    for r in rows:
        assert r["legal"] == 1.0
        assert 0 < r["p50_ms"] <= r["p99_ms"]
        assert r["users_per_s"] == pytest.approx(r["users"] / (r["mean_ms"] / 1e3), rel=1e-6)
