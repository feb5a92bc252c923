"""The tuned launch configs (``kernels/configs/*.json``, written by ``benchmarks/tune_*.py``) are data the
launchers look up by shape: every key must be one a launcher can produce, every config must carry the
fields of that kernel's default, and the lookup must pick it for that shape only."""

import json
import os
import re

import pytest
import torch

from onerec_fast.kernels import load_configs
from onerec_fast.kernels import moe_gemm, varlen_attention

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(moe_gemm.__file__)), "configs")


def _entries(op):
    path = os.path.join(CONFIG_DIR, f"{op}.json")
    if not os.path.exists(path):
        pytest.skip(f"no tuned configs for {op}")
    with open(path) as f:
        data = json.load(f)
    assert data, f"{path} is empty"
    return [(gpu, key, cfg) for gpu, table in data.items() for key, cfg in table.items()]


def test_moe_gemm_keys_and_fields():
    for gpu, key, cfg in _entries("moe_gemm"):
        m = re.fullmatch(r"(\w+) (\w+) d(\d+) f(\d+) E(\d+) k(\d+) T(\d+)", key)
        assert m, f"{gpu}: malformed key {key!r}"
        kernel, dtype, D, F, E, k, T = m.groups()
        assert kernel in moe_gemm.KERNELS, key
        D, F, E, k, T = map(int, (D, F, E, k, T))
        assert moe_gemm.config_key(kernel, T, D, F, E, k, getattr(torch, dtype)) == key
        want = moe_gemm.default_config(kernel, T, D, F, E, k, False)
        assert set(cfg) == set(want), f"{key}: fields {sorted(cfg)} != {sorted(want)}"


def test_varlen_attention_keys_and_fields():
    for gpu, key, cfg in _entries("varlen_attention"):
        m = re.fullmatch(r"(\w+) d(\d+) lq(\d+) lk(\d+) (\w+)", key)
        assert m, f"{gpu}: malformed key {key!r}"
        kernel, head_dim, lq, lk, dtype = m.groups()
        assert kernel in varlen_attention.KERNELS, key
        assert varlen_attention.config_key(kernel, int(head_dim), int(lq), int(lk), getattr(torch, dtype)) == key
        want = varlen_attention.default_config(kernel, int(head_dim), int(lq), "cuda")
        assert set(cfg) == set(want), f"{key}: fields {sorted(cfg)} != {sorted(want)}"


def test_varlen_attention_lookup_is_by_key_length(monkeypatch):
    """A config tuned on long rows is not used for short ones (the 405-key beam decode ran 1.5x slower
    with the 512-2048-key forward config on the H200)."""
    gpu, key, cfg = next(e for e in _entries("varlen_attention") if e[1].startswith("fwd "))
    kernel, head_dim, lq, lk, dtype = re.fullmatch(r"(\w+) d(\d+) lq(\d+) lk(\d+) (\w+)", key).groups()
    head_dim, lq, lk, dtype = int(head_dim), int(lq), int(lk), getattr(torch, dtype)
    monkeypatch.setattr(varlen_attention, "_device_name", lambda device: gpu)
    cuda = torch.device("cuda")
    assert varlen_attention.get_config(kernel, head_dim, lq, lk * 3 // 4 + 1, dtype, cuda) == cfg
    other = lk // 4 if lk >= 512 else lk * 4
    assert varlen_attention.get_config(kernel, head_dim, lq, other, dtype, cuda) == \
        varlen_attention.default_config(kernel, head_dim, lq, "cuda", dtype.itemsize)
    assert load_configs("varlen_attention")[gpu][key] == cfg
