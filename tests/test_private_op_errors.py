"""The extension's own argument checks (``TORCH_CHECK`` in csrc/*/binding.cpp) reach Python as exceptions.

Issue 17: on the GPU image a C++ exception thrown inside ``onerec_fast._C`` killed the process with SIGSEGV,
through pybind11 and through the dispatcher alike. The public ops validate in Python first; these calls go
straight to ``torch.ops.onerec_fast_C`` with bad arguments, so each binding's checks are exercised as the
second line they are meant to be. Every call runs in a fresh interpreter: a crash fails its own test
instead of ending the session. GPU only (the private ops need the built extension); the runner itself is
checked on the CPU.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from onerec_fast.backends import cuda_extension
from tests.helpers import HAS_CUDA

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_EXT = cuda_extension() if HAS_CUDA else None

# Inputs every case starts from: a valid dense beam step (8 rows = 2 x beam 4, a root with 16 children) and a
# valid routing call (T=16, E=8, k=2, sigmoid); each case breaks one thing.
_SETUP = """
import torch
from onerec_fast.backends import cuda_extension
C = cuda_extension()
i32 = dict(dtype=torch.int32, device="cuda")
f32 = dict(dtype=torch.float32, device="cuda")
logits, nodes, scores = torch.randn(8, 16, device="cuda"), torch.zeros(8, **i32), torch.zeros(8, **f32)
cs, ct = torch.tensor([0, 16], **i32), torch.arange(16, **i32)
T, E, k = 16, 8, 2
def outs(k=2):
    return [torch.empty(T, k, **i32), torch.empty(T, k, **f32), torch.empty(E, **i32), torch.empty(E + 1, **i32),
            torch.empty(T * k, **i32), torch.empty(E, **f32), torch.empty(1, **f32)]
rl, bias = torch.randn(T, E, device="cuda"), torch.zeros(E, **f32)
"""

# case -> (call, exception type, message fragment)
CASES = {
    "beam_rows_not_multiple": ("C.beam_step(logits, nodes, scores, cs, ct, None, 3, False)",
                               RuntimeError, "multiple of beam"),
    "beam_zero": ("C.beam_step(logits, nodes, scores, cs, ct, None, 0, False)", RuntimeError, "beam must be in"),
    "beam_nodes_int64": ("C.beam_step(logits, nodes.long(), scores, cs, ct, None, 4, False)",
                         RuntimeError, "nodes must be"),
    "beam_logits_int": ("C.beam_step(logits.int(), nodes, scores, cs, ct, None, 4, False)",
                        RuntimeError, "logits must be float32"),
    "beam_logits_cpu": ("C.beam_step(logits.cpu(), nodes, scores, cs, ct, None, 4, False)",
                        RuntimeError, "logits must be a CUDA tensor"),
    "beam_logits_3d": ("C.beam_step(logits[None], nodes, scores, cs, ct, None, 4, False)",
                       RuntimeError, "logits must be 2-D"),
    "beam_scores_short": ("C.beam_step(logits, nodes, scores[:4], cs, ct, None, 4, False)",
                          RuntimeError, "nodes and scores must have"),
    "candidates_full_without_lse": ("C.beam_step_candidates(logits, None, nodes, scores, cs, ct, 4, False)",
                                    RuntimeError, "needs row_lse"),
    "candidates_lse_float64": ("C.beam_step_candidates(logits, torch.zeros(8, dtype=torch.float64, device='cuda'), "
                               "nodes, scores, cs, ct, 4, False)", RuntimeError, "row_lse must be"),
    "route_k0": ("C.moe_route_fwd(rl, bias, 0, True, True, *outs())", ValueError, "top_k must be in"),
    "route_k_above_experts": ("C.moe_route_fwd(rl, bias, 9, True, True, *outs(9))", ValueError, "top_k must be in"),
    "route_logits_int": ("C.moe_route_fwd(rl.int(), bias, 2, True, True, *outs())", TypeError,
                         "logits must have dtype"),
    "route_logits_cpu": ("C.moe_route_fwd(rl.cpu(), bias, 2, True, True, *outs())", ValueError,
                         "logits must be a CUDA tensor"),
    "route_logits_strided": ("C.moe_route_fwd(torch.randn(E, T, device='cuda').t(), bias, 2, True, True, *outs())",
                             ValueError, "logits must be contiguous"),
    "route_bias_shape": ("C.moe_route_fwd(rl, bias[:-1], 2, True, True, *outs())", ValueError,
                         "expert_bias must have shape"),
    "route_ids_int64": ("C.moe_route_fwd(rl, bias, 2, True, True, torch.empty(T, 2, dtype=torch.int64, "
                        "device='cuda'), *outs()[1:])", TypeError, "topk_ids must have dtype"),
    "route_offsets_cpu": ("C.moe_route_fwd(rl, bias, 2, True, True, *outs()[:3], torch.empty(E + 1, "
                          "dtype=torch.int32), *outs()[4:])", ValueError, "expert_offsets must be a CUDA tensor"),
}

_CHILD = """
import json, sys
sys.path.insert(0, {root!r})
{setup}
for name, call in json.loads(sys.argv[1]):
    print(json.dumps({{"start": name}}), flush=True)
    try:
        eval(call)
    except Exception as e:
        print(json.dumps({{"case": name, "type": type(e).__name__, "msg": str(e).strip().splitlines()[0]}}), flush=True)
    else:
        print(json.dumps({{"case": name, "type": None, "msg": ""}}), flush=True)
"""


def run_isolated(calls: dict[str, str], setup: str, timeout: float = 120.0) -> dict[str, dict]:
    """Runs each call in a child interpreter (all in one child until one kills it, then the rest in the next).

    Returns {name: {"type": exception type name or None, "msg": first line, "crash": None or how it died}}.
    """
    todo = list(calls.items())
    results: dict[str, dict] = {}
    while todo:
        code = _CHILD.format(root=ROOT, setup=setup)
        try:
            p = subprocess.run([sys.executable, "-c", code, json.dumps(todo)], capture_output=True, text=True,
                               timeout=timeout, cwd=ROOT)
            out, rc = p.stdout, p.returncode
            err = p.stderr
        except subprocess.TimeoutExpired as e:
            out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            rc, err = None, ""
        started = None
        for line in out.splitlines():
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if "start" in msg:
                started = msg["start"]
            else:
                results[msg["case"]] = {"type": msg["type"], "msg": msg["msg"], "crash": None}
                started = None
        if rc == 0:
            for name, _ in todo:  # a child that exits cleanly ran every case
                results.setdefault(name, {"type": None, "msg": "", "crash": "no result"})
            break
        if rc is None:
            how = f"timed out after {timeout:.0f} s"
        elif rc < 0:
            how = f"killed by {signal.Signals(-rc).name}"
        else:
            how = f"exit status {rc}: {err.strip().splitlines()[-1] if err.strip() else ''}"
        victim = started or next((n for n, _ in todo if n not in results), None)
        if victim is None:
            break
        results[victim] = {"type": None, "msg": "", "crash": how}
        todo = [(n, c) for n, c in todo if n not in results]
    return results


def test_runner_survives_a_crash():
    """The isolation itself (CPU): a call that kills its interpreter is reported, the calls after it still run."""
    calls = {"ok": "int('x')", "dies": "os.kill(os.getpid(), signal.SIGSEGV)", "after": "[][1]"}
    res = run_isolated(calls, "import os, signal", timeout=60)
    assert res["ok"]["type"] == "ValueError" and res["ok"]["crash"] is None
    assert res["dies"]["crash"] == "killed by SIGSEGV"
    assert res["after"]["type"] == "IndexError" and res["after"]["crash"] is None


@pytest.fixture(scope="module")
def outcomes():
    if _EXT is None or not all(hasattr(_EXT, op) for op in ("beam_step", "beam_step_candidates", "moe_route_fwd")):
        pytest.skip("needs CUDA and onerec_fast._C built with csrc/beam_step and csrc/moe_routing")
    return run_isolated({name: call for name, (call, _, _) in CASES.items()}, _SETUP)


@pytest.mark.parametrize("case", list(CASES))
def test_private_op_rejects_bad_argument(case, outcomes):
    _, error, fragment = CASES[case]
    got = outcomes[case]
    assert got["crash"] is None, f"the interpreter died ({got['crash']}) instead of raising {error.__name__}"
    assert got["type"] == error.__name__, f"raised {got['type']}: {got['msg']}"
    assert fragment in got["msg"], got["msg"]
