"""Issue 17: does a C++ exception thrown inside onerec_fast._C reach Python, or kill the process?

Driver (one build of the extension):
    python benchmarks/diagnostics/cxx_exceptions/s17_throw.py --so PATH/_C*.so --label A [--json out.json] [--preload s17_segv.so]
runs every case below in child interpreters (a crash ends one child; the next child resumes after the
crashed case) and prints one line per case:
    [A] disp_beam_cpu     RAISED   RuntimeError: beam_step: logits must be a CUDA tensor, got cpu
    [A] pb_check          CRASH    SIGSEGV (rc -11) | S17SEGV pc ... libgcc_s.so.1+0x... [...]
Table of several JSON results:  python benchmarks/diagnostics/cxx_exceptions/s17_throw.py --table a.json b.json ...

The .so is loaded straight from its path (importlib), not through the onerec_fast package, so the
build under test is exactly the file named. Cases:
  info            what the process loaded (libstdc++/libgcc_s from /proc/self/maps), torch/pybind11 ABI
  aten_*          control: errors from torch's own C++ (TORCH_CHECK in libtorch_cpu / libtorch_cuda)
  in_* / bt_*     probes (only in s17's probe builds): throw/catch and backtraces inside _C
  pb_*            probes: C++ errors left to pybind11
  disp_*          the real private ops (torch.ops.onerec_fast_C.*) with bad arguments: dispatcher path
  import_pkg      import triton and the onerec_fast package (what the test sessions had loaded)
  cuda_init       CUDA context + a cuBLAS matmul
  after_pkg_X / after_cuda_X   case X again in that state (set up again in a fresh child after a crash)
Without CUDA or without a .so the cases that need them print SKIP.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time

CASES = [
    # plain process: torch + the extension only
    "info",
    "aten_cpu",
    "aten_index",
    "in_std",
    "in_c10_nobt",
    "bt_glibc",
    "bt_c10",
    "in_check",
    "pb_std",
    "pb_c10_nobt",
    "pb_check",
    "pb_value",
    "disp_cand_nolse",
    "disp_beam_cpu",
    "disp_moe_cpu",
    # as in the test sessions: triton and the onerec_fast package imported (libtriton.so loaded)
    "import_pkg",
    "after_pkg_in_std",
    "after_pkg_pb_check",
    "after_pkg_disp_beam_cpu",
    "after_pkg_disp_moe_cpu",
    # CUDA initialised (context, cuBLAS), then errors on CUDA tensors and the CPU ones again
    "cuda_init",
    "aten_cuda",
    "disp_beam_cuda_dtype",
    "disp_beam_cuda_beam0",
    "disp_moe_cuda_k0",
    "after_cuda_in_std",
    "after_cuda_pb_check",
    "after_cuda_disp_beam_cpu",
]

# What each raising case should raise (type name, message fragment).
EXPECT = {
    "aten_cpu": ("RuntimeError", "cannot be multiplied"),
    "aten_index": ("IndexError", "out of bounds"),
    "aten_cuda": ("RuntimeError", "must match"),
    "pb_std": ("RuntimeError", "s17 probe std::runtime_error"),
    "pb_c10_nobt": ("RuntimeError", "s17 probe c10::Error"),
    "pb_check": ("RuntimeError", "s17 probe TORCH_CHECK"),
    "pb_value": ("ValueError", "s17 probe TORCH_CHECK_VALUE"),
    "disp_cand_nolse": ("RuntimeError", "needs row_lse"),
    "disp_beam_cpu": ("RuntimeError", "logits must be a CUDA tensor"),
    "disp_moe_cpu": ("ValueError", "logits must be a CUDA tensor"),
    "disp_beam_cuda_dtype": ("RuntimeError", "must be float32, float16 or bfloat16"),
    "disp_beam_cuda_beam0": ("RuntimeError", "beam must be in"),
    "disp_moe_cuda_k0": ("ValueError", "top_k must be in"),
}


# ---------------------------------------------------------------------------------------------- child


def _say(*parts):
    print(*parts, flush=True)


def _loaded_libs():
    """Unique paths in /proc/self/maps that look like C++ runtime / unwinder / torch / the extension."""
    keys = ("libstdc++", "libgcc_s", "libunwind", "libc10.so", "libtorch_python", "libc.so", "_C.")
    seen = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 6:
                    p = parts[5]
                    if any(k in p for k in keys) and p not in seen:
                        seen.append(p)
    except OSError as e:
        seen.append(f"(no /proc/self/maps: {e})")
    return seen


def _load(so):
    """Load the extension module from its file; returns the module or None."""
    if not so or so == "none" or not os.path.exists(so):
        return None
    import importlib.machinery
    import importlib.util

    loader = importlib.machinery.ExtensionFileLoader("onerec_fast._C", so)
    spec = importlib.util.spec_from_file_location("onerec_fast._C", so, loader=loader)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["onerec_fast._C"] = mod
    loader.exec_module(mod)
    return mod


class Skip(Exception):
    pass


def _import_pkg():
    """What the test sessions had loaded: triton (libtriton.so) and the onerec_fast package."""
    import triton

    try:
        import onerec_fast

        pkg = f"onerec_fast from {os.path.dirname(onerec_fast.__file__)}"
    except Exception as e:  # still a useful state: triton is loaded
        pkg = f"onerec_fast not importable ({type(e).__name__}: {e})"
    return f"triton {triton.__version__}; {pkg}"


def _cuda_init(torch):
    if not torch.cuda.is_available():
        raise Skip("no CUDA device")
    a = torch.randn(64, 64, device="cuda")
    (a @ a).sum().item()  # context, kernels, cuBLAS
    return f"CUDA up on {torch.cuda.get_device_name(0)}"


def base_case(name):
    for prefix in ("after_pkg_", "after_cuda_"):
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def _run_case(name, C, torch):
    """Returns a string for RETURNED cases; raises for the raising ones; Skip when not applicable."""
    cuda = torch.cuda.is_available()
    if name == "import_pkg":
        return _import_pkg()
    if name == "cuda_init":
        return _cuda_init(torch)
    if name.startswith("after_pkg_"):
        _import_pkg()
    elif name.startswith("after_cuda_"):
        _cuda_init(torch)
    name = base_case(name)
    ops = getattr(torch.ops, "onerec_fast_C", None) if C is not None else None

    def need_ext():
        if C is None:
            raise Skip("no extension .so")

    def need_probe():
        need_ext()
        if not getattr(C, "S17_PROBES", False):
            raise Skip("not a probe build")

    def need_op(op):
        need_ext()
        if not hasattr(ops, op):
            raise Skip(f"extension has no op {op}")

    def need_cuda():
        if not cuda:
            raise Skip("no CUDA device")

    if name == "info":
        out = [f"python {sys.version.split()[0]} torch {torch.__version__} cuda {torch.version.cuda} "
               f"device {torch.cuda.get_device_name(0) if cuda else 'none'}",
               f"cxx11abi {torch.compiled_with_cxx11_abi()} "
               + " ".join(f"{a}={getattr(torch._C, a)}" for a in dir(torch._C) if a.startswith("_PYBIND11_"))]
        if C is not None:
            out.append(f"so {C.__file__} ARCH_LIST={getattr(C, 'ARCH_LIST', '?')} "
                       f"probes={getattr(C, 'S17_PROBES', False)} compiler={getattr(C, 'S17_COMPILER', '?')} "
                       f"gxx_abi={getattr(C, 'S17_GXX_ABI', '?')}")
            out.append("ops " + " ".join(sorted(n for n in ("beam_step", "beam_step_candidates", "moe_route_fwd")
                                                if hasattr(ops, n))))
        out.append("loaded " + " | ".join(_loaded_libs()))
        return " || ".join(out)
    if name == "aten_cpu":
        torch.ones(2, 3) @ torch.ones(2, 3)
    elif name == "aten_index":
        torch.zeros(2)[torch.tensor([5])]
    elif name == "aten_cuda":
        need_cuda()
        torch.ones(2, device="cuda") + torch.ones(3, device="cuda")
    elif name.startswith(("in_", "bt_", "pb_")):
        need_probe()
        return getattr(C, "_s17_" + name)()
    elif name == "disp_cand_nolse":
        need_op("beam_step_candidates")
        i32 = dict(dtype=torch.int32)
        ops.beam_step_candidates(torch.zeros(4, 3), None, torch.zeros(4, **i32), torch.zeros(4),
                                 torch.zeros(2, **i32), torch.zeros(1, **i32), 4, False)
    elif name in ("disp_beam_cpu", "disp_beam_cuda_dtype", "disp_beam_cuda_beam0"):
        need_op("beam_step")
        dev = "cpu" if name == "disp_beam_cpu" else "cuda"
        if dev == "cuda":
            need_cuda()
        i32 = dict(dtype=torch.int32, device=dev)
        logits = torch.zeros(8, 16, device=dev)
        beam = 4
        if name == "disp_beam_cuda_dtype":
            logits = logits.int()
        if name == "disp_beam_cuda_beam0":
            beam = 0
        ops.beam_step(logits, torch.zeros(8, **i32), torch.zeros(8, device=dev), torch.tensor([0, 16], **i32),
                      torch.arange(16, **i32), None, beam, False)
    elif name in ("disp_moe_cpu", "disp_moe_cuda_k0"):
        need_op("moe_route_fwd")
        dev = "cpu" if name == "disp_moe_cpu" else "cuda"
        if dev == "cuda":
            need_cuda()
        T, E, k = 16, 8, 2
        if name == "disp_moe_cuda_k0":
            k = 0
        i32, f32 = dict(dtype=torch.int32, device=dev), dict(dtype=torch.float32, device=dev)
        ops.moe_route_fwd(torch.randn(T, E, device=dev), torch.zeros(E, **f32), k, True, True,
                          torch.empty(T, max(k, 1), **i32), torch.empty(T, max(k, 1), **f32), torch.empty(E, **i32),
                          torch.empty(E + 1, **i32), torch.empty(T * max(k, 1), **i32), torch.empty(E, **f32),
                          torch.empty(1, **f32))
    else:
        raise Skip(f"unknown case {name}")
    return None  # reached only when nothing was raised


def child(so, names):
    import torch

    try:
        C = _load(so)
    except Exception as e:  # an import failure is a result too
        _say(f"@@LOADERROR {type(e).__name__}: {str(e).splitlines()[0][:300]}")
        C = None
    fake = os.environ.get("S17_FAKE_CRASH")  # self-test of the driver: crash on this case ("@load": before any)
    if fake == "@load":
        os.kill(os.getpid(), signal.SIGSEGV)
    for name in names:
        _say(f"@@START {name}")
        if name == fake:
            os.kill(os.getpid(), signal.SIGSEGV)
        try:
            value = _run_case(name, C, torch)
        except Skip as e:
            _say(f"@@RESULT {name} SKIP {e}")
        except Exception as e:  # the point: which type, which message
            msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
            _say(f"@@RESULT {name} RAISED {type(e).__name__}: {msg[:300]}")
        else:
            if base_case(name) in EXPECT:
                _say(f"@@RESULT {name} NOEXC returned {value!r}")
            else:
                _say(f"@@RESULT {name} RETURNED {value}")
    _say("@@END")


# --------------------------------------------------------------------------------------------- driver


def _signame(rc):
    if rc is None:
        return "TIMEOUT"
    if rc < 0:
        try:
            return signal.Signals(-rc).name
        except ValueError:
            return f"signal {-rc}"
    if rc > 128:  # a shell in between
        try:
            return signal.Signals(rc - 128).name + "?"
        except ValueError:
            pass
    return f"exit {rc}"


def drive(so, label, preload=None, timeout=90.0, cases=None):
    names = list(cases or CASES)
    env = dict(os.environ)
    if preload and os.path.exists(preload):
        env["LD_PRELOAD"] = (preload + " " + env.get("LD_PRELOAD", "")).strip()
    env.pop("PYTHONFAULTHANDLER", None)  # the preloaded reporter owns SIGSEGV
    results = {}
    children = 0
    while names:
        children += 1
        cmd = [sys.executable, os.path.abspath(__file__), "--child", "--so", so or "none", "--cases", ",".join(names)]
        t0 = time.time()
        try:
            p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
            rc, out, err = p.returncode, p.stdout, p.stderr
        except subprocess.TimeoutExpired as e:
            rc = None
            out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            err = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
        started = None
        ended = False
        for line in out.splitlines():
            if line.startswith("@@START "):
                started = line.split()[1]
            elif line.startswith("@@RESULT "):
                _, name, status, *rest = line.split(" ", 3)
                results[name] = {"status": status, "detail": " ".join(rest)}
                started = None
            elif line.startswith("@@LOADERROR"):
                results.setdefault("_load", {"status": "LOADERROR", "detail": line[12:]})
            elif line == "@@END":
                ended = True
        done = [n for n in names if n in results]
        if ended or rc == 0:
            names = [n for n in names if n not in results]
            if names:  # a child that ended cleanly but skipped some: should not happen
                for n in names:
                    results[n] = {"status": "MISSING", "detail": ""}
                names = []
            continue
        segv = [line for line in err.splitlines() if line.startswith("S17SEGV")]
        tail = [line for line in err.splitlines() if line.strip() and not line.startswith("S17SEGV")][-6:]
        if "@@START" not in out:  # died before the first case: loading torch or the .so itself
            for n in names:
                results[n] = {"status": "CRASH", "detail": f"{_signame(rc)} (rc {rc}) while loading, before any case",
                              "segv": segv[:45], "stderr_tail": tail}
            break
        crashed = started if started else (names[len(done)] if len(done) < len(names) else None)
        if crashed is None:
            break
        results[crashed] = {"status": "CRASH", "detail": f"{_signame(rc)} (rc {rc}) after {time.time() - t0:.1f}s",
                            "segv": segv[:45], "stderr_tail": tail}
        names = [n for n in names if n not in results]
    for n in CASES:
        if n in results:
            r = results[n]
            ok = ""
            if r["status"] == "RAISED" and base_case(n) in EXPECT:
                typ, frag = EXPECT[base_case(n)]
                ok = "" if (r["detail"].startswith(typ + ":") and frag in r["detail"]) else "  (UNEXPECTED)"
            parts = r["detail"].split(" || ")
            print(f"[{label}] {n:<26} {r['status']:<8} {parts[0][:240]}{ok}", flush=True)
            for extra in parts[1:]:
                print(f"[{label}]     {extra.strip()[:600]}", flush=True)
            for s in r.get("segv", [])[:45]:
                print(f"[{label}]     {s[:300]}", flush=True)
            for s in r.get("stderr_tail", []):
                print(f"[{label}]     stderr: {s[:300]}", flush=True)
    if "_load" in results:
        print(f"[{label}] load error: {results['_load']['detail']}", flush=True)
    print(f"[{label}] children used: {children}", flush=True)
    return {"label": label, "so": so, "results": results}


def table(paths):
    runs = []
    for p in paths:
        try:
            with open(p) as f:
                runs.append(json.load(f))
        except (OSError, ValueError) as e:
            print(f"(cannot read {p}: {e})")
    if not runs:
        return
    labels = [r["label"] for r in runs]
    short = {"RAISED": "ok", "RETURNED": "ok", "SKIP": "-", "CRASH": "CRASH", "NOEXC": "noexc", "MISSING": "?"}
    print("case".ljust(26) + "".join(lab[:9].ljust(10) for lab in labels))
    for n in CASES:
        if n == "info":
            continue
        cells = []
        for r in runs:
            res = r["results"].get(n)
            if res is None:
                cells.append("?")
                continue
            cell = short.get(res["status"], res["status"])
            if res["status"] == "CRASH":
                cell = res["detail"].split()[0][:9]  # SIGSEGV / SIGABRT / TIMEOUT
            elif res["status"] == "RAISED" and base_case(n) in EXPECT:
                typ, frag = EXPECT[base_case(n)]
                if not (res["detail"].startswith(typ + ":") and frag in res["detail"]):
                    cell = "odd:" + res["detail"].split(":")[0][:5]
            cells.append(cell)
        print(n.ljust(26) + "".join(c.ljust(10) for c in cells))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--so", default=None, help="path of the _C*.so to test ('none': no extension)")
    ap.add_argument("--label", default="?")
    ap.add_argument("--json", default=None)
    ap.add_argument("--preload", default=None, help="LD_PRELOAD for the children (the s17_segv.so reporter)")
    ap.add_argument("--timeout", type=float, default=90.0, help="seconds per child")
    ap.add_argument("--cases", default=None, help="comma-separated subset (default: all)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--table", nargs="*", default=None, help="print a case x build table of JSON results")
    a = ap.parse_args(argv)
    if a.table is not None:
        table(a.table)
        return 0
    names = a.cases.split(",") if a.cases else None
    if a.child:
        child(a.so, names or CASES)
        return 0
    res = drive(a.so, a.label, a.preload, a.timeout, names)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
