"""The tuned launch configs (``kernels/configs/*.json``, written by ``benchmarks/tune_*.py``) are data the
launchers look up by shape: every file reads as a launch-config table, every key must be one a launcher can
produce, every config must carry the fields of that kernel's default, and the lookup must pick it for that
shape only."""

import re

import pytest
import torch

from onerec_fast.kernels import launch_config, lm_head, moe_gemm, rms_norm, varlen_attention


def _entries(op):
    path = launch_config.shipped_path(op)
    if not path.exists():
        pytest.skip(f"no tuned configs for {op}")
    table = launch_config.read_table(path)  # raises on anything that is not a launch-config table
    assert table, f"{path} is empty"
    for gpu, entry in table.items():
        assert gpu == launch_config.gpu_key(entry.name), f"{path}: {gpu!r} is not the key of {entry.name!r}"
    return [(gpu, key, cfg) for gpu, entry in table.items() for key, cfg in entry.configs.items()]


def _fields(cfg):
    return set(cfg.to_json())


def test_moe_gemm_keys_and_fields():
    for gpu, key, cfg in _entries("moe_gemm"):
        m = re.fullmatch(r"(\w+) (\w+) d(\d+) f(\d+) E(\d+) k(\d+) T(\d+)", key)
        assert m, f"{gpu}: malformed key {key!r}"
        kernel, dtype, D, F, E, k, T = m.groups()
        assert kernel in moe_gemm.KERNELS, key
        D, F, E, k, T = map(int, (D, F, E, k, T))
        assert moe_gemm.config_key(kernel, T, D, F, E, k, getattr(torch, dtype)) == key
        want = moe_gemm.default_config(kernel, T, D, F, E, k, False)
        assert _fields(cfg) == _fields(want), f"{key}: fields {sorted(_fields(cfg))} != {sorted(_fields(want))}"


def test_varlen_attention_keys_and_fields():
    for gpu, key, cfg in _entries("varlen_attention"):
        m = re.fullmatch(r"(\w+) (\w+) d(\d+) lq(\d+) lk(\d+)", key)
        assert m, f"{gpu}: malformed key {key!r}"
        kernel, dtype, head_dim, lq, lk = m.groups()
        assert kernel in varlen_attention.KERNELS, key
        assert varlen_attention.config_key(kernel, int(head_dim), int(lq), int(lk), getattr(torch, dtype)) == key
        want = varlen_attention.default_config(kernel, int(head_dim), int(lq), "cuda")
        assert _fields(cfg) == _fields(want), f"{key}: fields {sorted(_fields(cfg))} != {sorted(_fields(want))}"


def test_rms_norm_keys_and_fields():
    for gpu, key, cfg in _entries("rms_norm"):
        m = re.fullmatch(r"(fwd|bwd) (\w+) d(\d+) M(\d+)", key)
        assert m, f"{gpu}: malformed key {key!r}"
        kernel, dtype, block, rows = m.groups()
        assert rms_norm.config_key(kernel, getattr(torch, dtype), int(rows), int(block)) == key
        assert _fields(cfg) == _fields(rms_norm.default_config(int(block))), key


def test_lm_head_keys_and_fields():
    for gpu, key, cfg in _entries("lm_head"):
        m = re.fullmatch(r"(\w+) (\w+) R(\d+) V(\d+) d(\d+)", key)
        assert m, f"{gpu}: malformed key {key!r}"
        method, dtype, rows, vocab, dim = m.groups()
        assert lm_head.config_key(method, getattr(torch, dtype), int(rows), int(vocab), int(dim)) == key
        want = lm_head.default_config(method, getattr(torch, dtype), False)
        assert _fields(cfg) == _fields(want), f"{key}: fields {sorted(_fields(cfg))} != {sorted(_fields(want))}"


def test_varlen_attention_lookup_is_by_key_length(monkeypatch):
    """A config tuned on long rows is not used for short ones (the 405-key beam decode ran 1.5x slower
    with the 512-2048-key forward config on the H200)."""
    gpu, key, cfg = next(e for e in _entries("varlen_attention") if e[1].startswith("fwd "))
    kernel, dtype, head_dim, lq, lk = re.fullmatch(r"(\w+) (\w+) d(\d+) lq(\d+) lk(\d+)", key).groups()
    head_dim, lq, lk, dtype = int(head_dim), int(lq), int(lk), getattr(torch, dtype)
    entry = launch_config.shipped_table("varlen_attention")[gpu]
    monkeypatch.setattr(launch_config, "device_gpu", lambda device: launch_config.Gpu(gpu, entry.name, None))
    monkeypatch.setattr(launch_config, "_resolved", {})
    cuda = torch.device("cuda")
    assert varlen_attention.get_config(kernel, head_dim, lq, lk * 3 // 4 + 1, dtype, cuda) == cfg
    other = lk // 4 if lk >= 512 else lk * 4
    assert varlen_attention.get_config(kernel, head_dim, lq, other, dtype, cuda) == \
        varlen_attention.default_config(kernel, head_dim, lq, "cuda", dtype.itemsize)
    # fp16 and bf16 share tiles: a config stored for either serves the other
    half = torch.float16 if dtype == torch.bfloat16 else torch.bfloat16
    assert varlen_attention.get_config(kernel, head_dim, lq, lk, half, cuda) == cfg
