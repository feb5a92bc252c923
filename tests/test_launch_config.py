"""Launch configs (kernels/launch_config.py): the typed config, the table format, the lookup order and
tune-on-first-use.

Tuning runs here under the Triton interpreter on CPU tensors: CPU tensors have no GPU name, so the ``tuning``
fixture gives them a fake one, and the ops' interpreter candidates (the default and one other) are the search
space. Its timer still runs every candidate but ranks later candidates faster, so the tuned config is never the
default and the kernels' results below come from a config the lookup picked, not from the default.
"""

import os
import re
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from onerec_fast.kernels import launch_config as lc
from onerec_fast.kernels.launch_config import Gpu, LaunchConfig
from tests.helpers import rel_err, skip_unless_runs, tol

FAKE = Gpu("fake_gpu", "Fake GPU", None)
CPU = torch.device("cpu")
DEFAULT = LaunchConfig(BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=1)
OTHER = LaunchConfig(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1)
KEY = "fwd float32 d32 n8"  # of the made-up op "demo_op" (no shipped table)


class Tuning:
    """What the ``tuning`` fixture saw: ``timed``, one entry per candidate timed; ``searches``, one
    ``(op, shape key, default, chosen)`` per tune-on-first-use."""

    def __init__(self):
        self.timed = []
        self.searches = []


@pytest.fixture
def tuning(monkeypatch, tmp_path):
    """Tuning on for a fake GPU with an empty memory and cache (``tmp_path/cache``)."""
    monkeypatch.setenv(lc.ENV_CACHE_DIR, str(tmp_path / "cache"))
    monkeypatch.setenv(lc.ENV_AUTOTUNE, "1")
    monkeypatch.setattr(lc, "_resolved", {})
    monkeypatch.setattr(lc, "device_gpu", lambda device: FAKE)
    seen = Tuning()

    def later_is_faster(fn, device, warmup, reps):
        for _ in range(warmup + reps):  # run as the real timer does: a candidate that fails raises here
            fn()
        seen.timed.append(fn)
        return 1.0 / len(seen.timed)

    def recorded(op, key, gpu, device, space, run):
        chosen = tune(op, key, gpu, device, space, run)
        seen.searches.append((op, key, space[0], chosen))
        return chosen

    tune = lc._tune
    monkeypatch.setattr(lc, "_median_ms", later_is_faster)
    monkeypatch.setattr(lc, "_tune", recorded)
    return seen


def _lookup(run=lambda cfg: None):
    return lc.lookup("demo_op", KEY, CPU, lambda: [DEFAULT, OTHER], run)


def _cached(op):
    """``{shape key: config}`` of the fake GPU in ``op``'s cache."""
    return lc.read_table(lc.cache_path(op))[FAKE.key].configs


# ------------------------------------------------------------------------------------------------
# the config, the keys, the tables


def test_config_fields_are_checked_and_round_trip():
    cfg = LaunchConfig(BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, BLOCK_C=0, num_warps=8, num_stages=3)
    assert LaunchConfig.from_json(cfg.to_json(), "here") == cfg
    assert LaunchConfig(BLOCK_C=16, BLOCK_K=256, num_warps=4).launch_options() == {"num_warps": 4}
    assert cfg.launch_options() == {"num_warps": 8, "num_stages": 3}
    with pytest.raises(ValueError, match="LaunchConfig.BLOCK_M must be a positive int"):
        LaunchConfig(BLOCK_M=0, num_warps=4)
    with pytest.raises(ValueError, match="LaunchConfig.num_warps must be a positive int"):
        LaunchConfig(num_warps=True)
    with pytest.raises(ValueError, match=r"somewhere: expected an object with fields among .*'BM'"):
        LaunchConfig.from_json({"BM": 64, "num_warps": 4}, "somewhere")
    with pytest.raises(ValueError, match="somewhere: .*num_warps"):
        LaunchConfig.from_json({"BLOCK_M": 64}, "somewhere")


def test_keys():
    assert lc.gpu_key("NVIDIA H200") == "h200"
    assert lc.gpu_key("NVIDIA H100 80GB HBM3") == "h100_80gb_hbm3"
    assert lc.gpu_key("AMD Instinct MI300X") == "amd_instinct_mi300x"
    assert lc.shape_key("fwd", torch.bfloat16, d=64, lq=128, lk=2048) == "fwd bfloat16 d64 lq128 lk2048"
    assert [lc.pow2_bucket(n) for n in (0, 1, 3, 4, 5)] == [1, 1, 4, 4, 8]
    assert [lc.pow2_bucket(n, 16, 128) for n in (1, 17, 128, 1000)] == [16, 32, 128, 128]


def test_save_merges_and_read_checks(tmp_path):
    path = tmp_path / "op.json"
    gpu = Gpu("g1", "G One", "9.0")
    lc.save_configs(path, gpu, {"a": DEFAULT, "b": OTHER})
    lc.save_configs(path, Gpu("g2", "G Two", None), {"a": OTHER})
    lc.save_configs(path, gpu, {"b": None, "c": DEFAULT})  # None removes a key
    table = lc.read_table(path)
    assert table["g1"].configs == {"a": DEFAULT, "c": DEFAULT} and table["g1"].capability == "9.0"
    assert table["g2"].configs == {"a": OTHER} and table["g2"].name == "G Two"
    assert [p.name for p in tmp_path.iterdir()] == ["op.json"]  # no temporary file left behind
    assert lc.read_table(tmp_path / "missing.json") == {}


@pytest.mark.parametrize("content,why", [
    ("{not json", "not JSON"),
    ('["h200"]', "expected an object of GPU entries"),
    ('{"NVIDIA H200": {"fwd bfloat16 d64": {"BLOCK_M": 64, "num_warps": 4}}}', "must be an object with exactly"),
    ('{"h200": {"name": "NVIDIA H200", "capability": "9.0", "configs": {"fwd": {"BM": 64, "num_warps": 4}}}}',
     "h200 'fwd': expected an object with fields among"),
], ids=["json", "list", "old-format", "old-spelling"])
def test_a_bad_table_is_an_error_naming_the_file(tmp_path, content, why):
    path = tmp_path / "op.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=f"{re.escape(str(path))}: .*{why}"):
        lc.read_table(path)


def test_the_cache_folder_is_overridable(monkeypatch, tmp_path):
    monkeypatch.setenv(lc.ENV_CACHE_DIR, str(tmp_path / "mine"))
    assert lc.cache_path("moe_gemm") == tmp_path / "mine" / "launch_configs" / "moe_gemm.json"
    monkeypatch.delenv(lc.ENV_CACHE_DIR)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    home_cache = tmp_path / "home" / ".cache" / "onerec_fast"
    assert lc.cache_path("moe_gemm") == home_cache / "launch_configs" / "moe_gemm.json"


# ------------------------------------------------------------------------------------------------
# the lookup


def test_cpu_tensors_get_the_default():
    assert lc.lookup("demo_op", KEY, CPU, lambda: [DEFAULT, OTHER], lambda cfg: None) is DEFAULT


def test_another_gpu_of_the_same_capability_serves_its_entries(monkeypatch, tmp_path):
    """An H100 takes the H200's tuned entry as is (same SM and shared memory); another capability does not."""
    monkeypatch.setenv(lc.ENV_CACHE_DIR, str(tmp_path))
    monkeypatch.setattr(lc, "_resolved", {})
    shipped = lc.shipped_table("moe_gemm")
    entry = next(e for e in shipped.values() if e.capability is not None)
    key, cfg = next(iter(entry.configs.items()))

    def never(cfg):
        raise AssertionError("tuned although a GPU of the same capability has an entry")

    cuda = torch.device("cuda")
    monkeypatch.setattr(lc, "device_gpu", lambda device: Gpu("sibling", "Sibling", entry.capability))
    assert lc.lookup("moe_gemm", key, cuda, lambda: [DEFAULT, OTHER], never) == cfg
    monkeypatch.setattr(lc, "device_gpu", lambda device: Gpu("stranger", "Stranger", "1.0"))
    assert lc.lookup("moe_gemm", key, cuda, lambda: [DEFAULT, OTHER]) == DEFAULT


def test_fastest_times_each_candidate_and_skips_the_ones_that_fail():
    def run(cfg):
        if cfg.num_warps == 1:
            raise RuntimeError("out of resources: shared memory")
        time.sleep(cfg.num_warps * 2e-3)

    lines = []
    best, ms = lc.fastest([LaunchConfig(num_warps=w) for w in (8, 2, 1, 4, 2)], run, CPU, warmup=1, reps=2,
                          log_line=lines.append)
    assert best == LaunchConfig(num_warps=2) and ms >= 4
    assert len(lines) == 4 and "skipped (RuntimeError)" in lines[2]  # the duplicate is timed once
    assert lc.fastest([LaunchConfig(num_warps=1)], run, CPU, warmup=1, reps=1) == (None, float("inf"))


# ------------------------------------------------------------------------------------------------
# tune on first use


def test_tuned_once_per_bucket_then_read_from_the_cache(tuning, monkeypatch):
    assert _lookup() == OTHER
    assert len(tuning.timed) == 2  # the default and the one other candidate, once each
    assert _cached("demo_op") == {KEY: OTHER}
    with monkeypatch.context() as m:  # remembered: a dict lookup, no file read, no timing
        m.setattr(lc, "_read_cache", lambda op: pytest.fail("read the cache of a remembered config"))
        assert _lookup() == OTHER and len(tuning.timed) == 2
    monkeypatch.setattr(lc, "_resolved", {})  # as a new process: the cache file answers

    def never(cfg):
        raise AssertionError("ran a kernel although the config is cached")

    assert _lookup(never) == OTHER and len(tuning.timed) == 2


def test_a_later_process_reads_the_cache_without_timing(tuning):
    assert _lookup() == OTHER
    script = textwrap.dedent(f"""
        import torch
        from onerec_fast.kernels import launch_config as lc
        lc.device_gpu = lambda device: lc.Gpu({FAKE.key!r}, {FAKE.name!r}, None)
        def no_timing(*args):
            raise AssertionError("timed although the config is cached")
        lc._median_ms = no_timing
        print(lc.lookup("demo_op", {KEY!r}, torch.device("cpu"), lambda: [lc.LaunchConfig(**{DEFAULT.to_json()!r})],
                        lambda cfg: None).to_json())
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=dict(os.environ))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(OTHER.to_json())


def test_autotune_off_takes_the_default(tuning, monkeypatch):
    monkeypatch.setenv(lc.ENV_AUTOTUNE, "0")
    assert _lookup() == DEFAULT
    assert tuning.timed == [] and not lc.cache_path("demo_op").exists()


@pytest.mark.parametrize("trace", ["torch.compile", "CUDA graph capture"])
def test_no_tuning_inside_a_trace(tuning, monkeypatch, trace):
    """Inside a trace the default is used and not remembered: the next call outside it tunes."""
    with monkeypatch.context() as m:
        if trace == "torch.compile":
            m.setattr(torch.compiler, "is_compiling", lambda: True)
        else:
            m.setattr(torch.cuda, "is_initialized", lambda: True)
            m.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
        assert _lookup() == DEFAULT
        assert tuning.timed == [] and not lc.cache_path("demo_op").exists()
    assert _lookup() == OTHER and len(tuning.timed) == 2


def test_a_caller_that_only_asks_gets_the_default_untuned(tuning):
    assert lc.lookup("demo_op", KEY, CPU, lambda: [DEFAULT, OTHER]) == DEFAULT
    assert tuning.timed == []
    assert _lookup() == OTHER  # not remembered: the first call that can run the kernel tunes


def test_candidates_that_fail_are_skipped(tuning):
    def run(cfg):
        if cfg == OTHER:
            raise RuntimeError("does not compile")

    assert _lookup(run) == DEFAULT and len(tuning.timed) == 1 and _cached("demo_op") == {KEY: DEFAULT}


def test_when_nothing_runs_the_default_is_used_and_nothing_cached(tuning):
    def run(cfg):
        raise RuntimeError("does not compile")

    assert _lookup(run) == DEFAULT and not lc.cache_path("demo_op").exists()


@pytest.mark.parametrize("content", ['{"fake_gpu": [', '{"fake_gpu": {"configs": {}}}'], ids=["truncated", "format"])
def test_a_corrupt_cache_is_ignored_with_a_warning_and_replaced(tuning, content):
    path = lc.cache_path("demo_op")
    path.parent.mkdir(parents=True)
    path.write_text(content)
    with pytest.warns(UserWarning, match=f"ignoring the launch-config cache {re.escape(str(path))}: "):
        assert _lookup() == OTHER
    assert _cached("demo_op") == {KEY: OTHER}  # the next tuning replaced the file with a valid table


# ------------------------------------------------------------------------------------------------
# the kernels on tuned configs: every kernel of each op tuned once, results equal to the reference


def _assert_tuned(tuning, op, kernels):
    """Each of ``kernels`` of ``op`` was tuned once, away from its default (the fixture's timer prefers the
    other candidate), and cached: the results were computed with configs the lookup picked."""
    assert sorted(key.split()[0] for o, key, _, _ in tuning.searches if o == op) == sorted(kernels)
    assert all(chosen != default for _, _, default, chosen in tuning.searches)
    assert _cached(op) == {key: chosen for o, key, _, chosen in tuning.searches if o == op}
    assert len(tuning.timed) == 2 * len(kernels)  # 2 candidates each under the interpreter


@pytest.mark.parametrize("kv_heads", [2, 1], ids=["one-pass", "two-kernel"])
def test_varlen_attention_on_tuned_configs(tuning, kv_heads):
    skip_unless_runs("triton", "cpu")
    from onerec_fast.kernels import varlen_attention as kern
    from onerec_fast.ops.varlen_attention import varlen_cross_attention, varlen_cross_attention_ref

    g = torch.Generator().manual_seed(0)
    lengths, heads, seqlen_q, head_dim = [5, 0, 40], 2, 7, 32
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(len(lengths), heads, seqlen_q, head_dim, generator=g, requires_grad=True)
    k, v = (torch.randn(sum(lengths), kv_heads, head_dim, generator=g, requires_grad=True) for _ in range(2))
    for _ in range(2):  # the second pass reads what the first tuned
        out = varlen_cross_attention(q, k, v, cu, backend="triton")
        grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = varlen_cross_attention_ref(*ref_in, cu)[0]
    ref_grads = torch.autograd.grad(ref.square().sum(), ref_in)
    for name, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref, *ref_grads)):
        assert rel_err(got, want) <= tol(torch.float32, "cpu"), name
    _assert_tuned(tuning, kern.OP, ["fwd", "bwd_fused"] if kv_heads == heads else ["fwd", "bwd_dq", "bwd_dkdv"])


def test_moe_on_tuned_configs(tuning):
    skip_unless_runs("triton", "cpu")
    from onerec_fast.kernels import moe_gemm
    from onerec_fast.ops.moe import moe_ffn, moe_ffn_ref

    g = torch.Generator().manual_seed(0)
    T, d, f, E, top_k = 9, 32, 64, 4, 2
    x = (torch.randint(-4, 5, (T, d), generator=g) / 4).requires_grad_()
    rw = (torch.randint(-8, 9, (E, d), generator=g) / 64).requires_grad_()
    w1, w3 = ((torch.randn(E, d, f, generator=g) / d**0.5).requires_grad_() for _ in range(2))
    w2 = (torch.randn(E, f, d, generator=g) / f**0.5).requires_grad_()
    inputs = (x, rw, w1, w3, w2)
    for _ in range(2):
        out = moe_ffn(*inputs, top_k, backend="triton").out
        grads = torch.autograd.grad(out.square().sum(), inputs)
    ref_in = [t.detach().double().requires_grad_() for t in inputs]
    ref = moe_ffn_ref(*ref_in, top_k).out
    ref_grads = torch.autograd.grad(ref.square().sum(), ref_in)
    for name, got, want in zip(("out", "dx", "drouter", "dw1", "dw3", "dw2"), (out, *grads), (ref, *ref_grads)):
        assert rel_err(got, want) <= 2 * tol(torch.float32, "cpu"), name
    _assert_tuned(tuning, moe_gemm.OP, moe_gemm.KERNELS)


def test_lm_head_on_tuned_configs(tuning):
    skip_unless_runs("triton", "cpu")
    from onerec_fast.kernels import lm_head
    from onerec_fast.ops.lm_head import constrained_lm_head, constrained_lm_head_ref
    from onerec_fast.trie import SemanticIDTrie

    g = torch.Generator().manual_seed(0)
    rows, vocab, dim, level = 12, 64, 32, 1
    trie = SemanticIDTrie(torch.randint(0, vocab, (200, 3), generator=g), vocab)
    hidden = torch.randn(rows, dim, generator=g)
    weight = torch.randn(vocab, dim, generator=g) / dim**0.5
    nodes = torch.randint(0, trie.num_nodes[level], (rows,), generator=g, dtype=torch.int32)
    for normalize, method in (("full", "gemm"), ("valid", "gather")):
        for _ in range(2):
            got = constrained_lm_head(hidden, weight, nodes, trie, level, normalize, method=method, backend="triton")
        want = constrained_lm_head_ref(hidden.double(), weight.double(), nodes, trie, level, normalize)
        live = want.child_logits > float("-inf")
        assert rel_err(got.child_logits[live], want.child_logits[live]) <= tol(torch.float32, "cpu"), method
        assert rel_err(got.lse, want.lse) <= tol(torch.float32, "cpu"), method
    _assert_tuned(tuning, lm_head.OP, ["gemm", "gather"])
