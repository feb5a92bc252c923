#!/usr/bin/env bash
# Issue 17 on the GPU machine (one H100/H200, 16 cores), about 250 s wall in all. From the repo root:
#     bash benchmarks/diagnostics/cxx_exceptions/s17.sh   (files go to $OUT, default /tmp/s17out;
#                                                           S17_DEADLINE=seconds, default 262)
# Needs beside it: s17_throw.py, s17_segv.c, s17_probe_bindings.cpp. Results of the run that
# found the cause (the repo's setup.py before _cxx_driver): benchmarks/RESULTS.md, 2026-12-06 session 6. Since
# then build A (and E, whose $CXX has no shared libstdc++) go through setup.py's _cxx_driver: A checks the fix.
#  1. toolchain facts: compilers, what torch's cpp_extension and setuptools pick, libstdc++/libgcc_s
#  2. builds of onerec_fast._C, concurrently: R = this repo (pip install -e ., needed by 4) and copies of the
#     repo under /tmp/s17w with csrc/bindings.cpp replaced by the probe build (s17_probe_bindings.cpp):
#        A the repo's setup.py            B system compiler: CC=/usr/bin/gcc CXX=/usr/bin/g++
#        C LDFLAGS=-shared-libgcc           D LDFLAGS="-static-libgcc -static-libstdc++" (breaks on purpose?)
#        E CC/CXX=/opt/gcc/bin/gcc,g++      F LDFLAGS=-Wl,--eh-frame-hdr
#  3. per build: s17_throw.py (child processes, crash = exit code, LD_PRELOADed reporter s17_segv.so),
#     ELF facts of the .so; cuda-gdb backtrace of the first crash
#  4. after R: compute-sanitizer racecheck of the beam-step kernel (3 subsets) and memcheck of the Triton
#     kernels' GPU tests (moe_gemm, varlen_attention, lm_head, moe_routing), all concurrently
#  5. summary on stdout and in $OUT/s17_summary.txt
set -u
shopt -s nullglob
T0=$(date +%s)
DEADLINE=${S17_DEADLINE:-262}          # everything is over this many seconds after the start
SAN_END=$((DEADLINE - 22))             # sanitizer runs end by then
S=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$S/../../.." && pwd)
OUT=${OUT:-/tmp/s17out}
mkdir -p "$OUT"
W=/tmp/s17w
rm -rf "$W"
mkdir -p "$W/logs"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
PY=python3
"$PY" -c "import torch" 2>/dev/null || PY=python
el() { echo $(($(date +%s) - T0)); }
left() { echo $((T0 + DEADLINE - $(date +%s))); }
say() { echo "[$(el)s] $*"; }
trim() { # file [head] [tail]: a long log's head and tail, lines cut at 400 characters
  local f=$1 h=${2:-200} t=${3:-120} n
  [ -f "$f" ] || { echo "(no $f)"; return; }
  n=$(wc -l <"$f")
  if [ "$n" -le $((h + t)) ]; then cut -c1-400 "$f"; else
    head -n "$h" "$f" | cut -c1-400; echo "... [$((n - h - t)) lines cut] ..."; tail -n "$t" "$f" | cut -c1-400; fi
}
wait_pids() { # pids...: until all ended or the deadline is 12 s away
  local p alive
  while :; do
    alive=0
    for p in "$@"; do kill -0 "$p" 2>/dev/null && alive=1; done
    [ $alive = 0 ] && return 0
    [ "$(left)" -le 12 ] && return 1
    sleep 1
  done
}
NCPU=$(nproc)
say "repo $REPO, python $(command -v $PY), $NCPU cores, deadline ${DEADLINE}s, OUT=$OUT"
for f in s17_throw.py s17_segv.c s17_probe_bindings.cpp; do
  [ -f "$S/$f" ] || say "MISSING $S/$f"
done

# ------------------------------------------------------------------------------------------------ 2./3. builds
cc -shared -fPIC -O1 -o "$W/s17_segv.so" "$S/s17_segv.c" -ldl >"$W/logs/segv_build.log" 2>&1 ||
  gcc -shared -fPIC -O1 -o "$W/s17_segv.so" "$S/s17_segv.c" -ldl >>"$W/logs/segv_build.log" 2>&1 ||
  say "crash reporter did not build: $(tail -2 "$W/logs/segv_build.log")"

elf_facts() { # .so
  local so=$1
  echo "file $so"
  echo "  NEEDED/RUNPATH: $(readelf -d "$so" 2>/dev/null | grep -E 'NEEDED|RUNPATH|RPATH' | grep -oE '\[.*\]' | tr '\n' ' ')"
  echo "  ldd C++ runtime: $(ldd "$so" 2>/dev/null | grep -E 'stdc|gcc_s|unwind' | tr -s ' \t' ' ' | tr '\n' ';')"
  echo "  PT_GNU_EH_FRAME: $(readelf -lW "$so" 2>/dev/null | grep -c GNU_EH_FRAME); sections: $(readelf -SW "$so" 2>/dev/null | grep -oE '\.eh_frame_hdr|\.eh_frame |\.gcc_except_table' | sort -u | tr '\n' ' ')"
  echo "  _Unwind_* defined: $(nm "$so" 2>/dev/null | grep -cE ' [TtWw] _Unwind_') (dynamic $(nm -D --defined-only "$so" 2>/dev/null | grep -c ' _Unwind_')); frame registration refs: $(nm "$so" 2>/dev/null | grep -E 'register_frame' | tr -s ' ' | tr '\n' ';')"
  echo "  __cxa_throw/__gxx_personality_v0: $(nm -D "$so" 2>/dev/null | grep -E ' (__cxa_throw|__gxx_personality_v0)(@|$)' | tr -s ' ' | tr '\n' ';') static libstdc++ parts: $(nm "$so" 2>/dev/null | grep -cE ' [Tt] __cxa_throw$')"
  echo "  needs: $(objdump -T "$so" 2>/dev/null | grep -oE 'GLIBCXX_[0-9.]+|CXXABI_[0-9.]+|GCC_[0-9.]+' | sort -Vu | tr '\n' ' ')"
  echo "  .comment: $(readelf -p .comment "$so" 2>/dev/null | grep -oE 'GCC: .*|clang version.*' | sort | uniq -c | tr -s ' ' | tr '\n' ';')"
}
link_line() { # build log: the extension's link command (the one with -shared ... _C)
  grep -E ' -shared( |$)' "$1" 2>/dev/null | grep -E '_C[.a-z0-9_-]*\.so' | tail -1 | cut -c1-900
}

throw_test() { # label so: throw cases + ELF facts
  local n=$1 so=$2
  elf_facts "$so" >"$W/logs/elf_$n.txt" 2>&1
  local tl=$(($(left) - 15))
  [ $tl -lt 10 ] && tl=10
  timeout $tl "$PY" "$S/s17_throw.py" --so "$so" --label "$n" --json "$W/throw_$n.json" \
    --preload "$W/s17_segv.so" --timeout 60 >"$W/logs/throw_$n.txt" 2>&1
  echo "rc $?" >>"$W/logs/throw_$n.txt"
}

# the copies
SRC_TAR=$W/src.tar
(cd "$REPO" && tar --exclude=./.git --exclude=./build --exclude=./scratch --exclude=./.venv --exclude='*.so' \
  --exclude='*.egg-info' --exclude=__pycache__ -cf "$SRC_TAR" .)
# R: the repo itself, the default build, installed (the sanitizer runs need it)
(
  t=$(date +%s)
  cd "$REPO" && MAX_JOBS=6 timeout 200 "$PY" -m pip install -v --no-build-isolation --no-deps -e . >"$W/logs/build_R.log" 2>&1
  echo $? >"$W/build_R.rc"
  echo $(($(date +%s) - t)) >"$W/buildtime_R"
) &
RPID=$!
say "building R (pip install -e ., MAX_JOBS=6) pid $RPID"

VPIDS=()
VARIANTS=()
variant() { # name nice VAR=VALUE...
  local n=$1 nc=$2
  shift 2
  local d=$W/v$n
  mkdir -p "$d" && tar -C "$d" -xf "$SRC_TAR" && cp "$S/s17_probe_bindings.cpp" "$d/csrc/bindings.cpp"
  echo "$*" >"$W/env_$n.txt"
  (
    cd "$d" && local t=$(date +%s)
    env "$@" MAX_JOBS=3 nice -n "$nc" timeout 190 "$PY" setup.py build_ext --inplace >"$W/logs/build_$n.log" 2>&1
    echo $? >"$W/build_$n.rc"
    echo $(($(date +%s) - t)) >"$W/buildtime_$n"
    so=""
    for f in "$d"/onerec_fast/_C*.so; do so=$f; done
    [ -n "$so" ] && throw_test "$n" "$so"
  ) &
  VPIDS+=($!)
  VARIANTS+=("$n")
}
variant A 5
if [ -x /usr/bin/g++ ] && [ -x /usr/bin/gcc ]; then
  variant B 5 CC=/usr/bin/gcc CXX=/usr/bin/g++ NVCC_APPEND_FLAGS=-allow-unsupported-compiler
else say "no /usr/bin/g++: variant B skipped"; fi
variant C 5 "LDFLAGS=${LDFLAGS:-} -shared-libgcc"
variant D 10 "LDFLAGS=${LDFLAGS:-} -static-libgcc -static-libstdc++"
if [ -x /opt/gcc/bin/g++ ] && [ -x /opt/gcc/bin/gcc ]; then
  variant E 10 CC=/opt/gcc/bin/gcc CXX=/opt/gcc/bin/g++ NVCC_APPEND_FLAGS=-allow-unsupported-compiler
else say "no /opt/gcc/bin/g++: variant E skipped"; fi
variant F 10 "LDFLAGS=${LDFLAGS:-} -Wl,--eh-frame-hdr"
say "building variants ${VARIANTS[*]} (MAX_JOBS=3 each, niced) under $W"

# ------------------------------------------------------------------------------------------------ 1. toolchain
TC=$OUT/toolchain.txt
{
  echo "== uname: $(uname -a)"
  echo "== PATH=$PATH"
  for v in CC CXX CFLAGS CXXFLAGS LDFLAGS LDSHARED LD_LIBRARY_PATH LD_PRELOAD CUDA_HOME TORCH_CUDA_ARCH_LIST MAX_JOBS; do
    echo "$v=${!v-<unset>}"
  done
  echo "== which (-> resolved)"
  for c in g++ c++ gcc cc x86_64-linux-gnu-g++ ld nvcc compute-sanitizer cuda-gdb gdb readelf nm; do
    p=$(command -v $c || true)
    printf '%-22s %s %s\n' "$c" "${p:--}" "$([ -n "$p" ] && readlink -f "$p")"
  done
  declare -A seen=()
  for c in /usr/bin/g++ /opt/gcc/bin/g++ "$(command -v g++)" "$(command -v c++)" /usr/bin/c++; do
    [ -x "$c" ] || continue
    r=$(readlink -f "$c"); [ -n "${seen[$r]+x}" ] && { echo "== $c: same as an earlier one ($r)"; continue; }
    seen[$r]=1
    echo "== compiler $c -> $r"
    "$c" --version 2>&1 | head -1
    echo "dumpfullversion $("$c" -dumpfullversion 2>&1)  GXX_ABI_VERSION $(echo | "$c" -dM -E -x c++ - 2>/dev/null | awk '/__GXX_ABI_VERSION/{print $3}')"
    for q in libgcc_s.so.1 libgcc_s.so libstdc++.so.6 libstdc++.so libgcc_eh.a crtbeginS.o; do
      echo "  -print-file-name=$q: $("$c" -print-file-name=$q 2>&1)"
    done
    echo "  ld: $("$c" -print-prog-name=ld 2>&1) ($("$("$c" -print-prog-name=ld)" --version 2>/dev/null | head -1))"
    echo "  specs: --eh-frame-hdr x$("$c" -dumpspecs 2>/dev/null | grep -o -- '--eh-frame-hdr' | wc -l), static-libgcc x$("$c" -dumpspecs 2>/dev/null | grep -o 'static-libgcc' | wc -l), shared-libgcc x$("$c" -dumpspecs 2>/dev/null | grep -o 'shared-libgcc' | wc -l)"
    echo "  $("$c" -v 2>&1 | grep -i 'configured with' | cut -c1-900)"
  done
  echo "== /opt/gcc: "/opt/gcc*; ls /opt/gcc/lib64 2>/dev/null | grep -E 'libstdc|libgcc_s' | tr '\n' ' '; echo
  echo "== ldconfig"; ldconfig -p 2>/dev/null | grep -E 'libstdc\+\+\.so|libgcc_s\.so'
  for f in /etc/ld.so.conf /etc/ld.so.conf.d/*; do [ -f "$f" ] && echo "$f: $(grep -v '^#' "$f" | tr '\n' ' ')"; done
} >"$TC" 2>&1
"$PY" - >>"$TC" 2>&1 <<'EOF'
import os, subprocess, sys, sysconfig
print("== python", sys.version.split()[0], sys.executable)
for k in ("CC", "CXX", "LDSHARED", "LDCXXSHARED", "CFLAGS", "LDFLAGS", "CCSHARED", "BLDSHARED", "CONFIG_ARGS"):
    v = sysconfig.get_config_var(k)
    print(f"sysconfig {k} = {str(v)[:600]}")
import setuptools
print("setuptools", setuptools.__version__)
import torch
from torch.utils import cpp_extension as ce
print("torch", torch.__version__, "cuda", torch.version.cuda, "cxx11abi", torch.compiled_with_cxx11_abi())
print("cpp_extension.get_cxx_compiler():", getattr(ce, "get_cxx_compiler", lambda: "(absent)")(), "| CUDA_HOME", ce.CUDA_HOME)
print("torch._C pybind11:", {a: getattr(torch._C, a) for a in dir(torch._C) if a.startswith("_PYBIND11")})
cfg = torch.__config__.show().splitlines()
print("torch.__config__:", " | ".join(l.strip() for l in cfg[:4]))
print("  ", " | ".join(l.strip()[:300] for l in cfg if "CXX_COMPILER" in l or "CXX_FLAGS" in l))
try:
    import pytest, pytest_timeout
    print("pytest", pytest.__version__, "pytest-timeout", getattr(pytest_timeout, "__version__", "?"))
except Exception as e:
    print("pytest-timeout:", e)
lib = os.path.join(os.path.dirname(torch.__file__), "lib")
print("TORCHLIB", lib)
EOF
TLIB=$(awk '/^TORCHLIB /{print $2}' "$TC")
{
  echo "== ldd libtorch_python.so (C++ runtime)"; ldd "$TLIB/libtorch_python.so" 2>&1 | grep -E 'stdc|gcc_s|libc\.so|libunwind'
  echo "== .comment libc10.so: $(readelf -p .comment "$TLIB/libc10.so" 2>/dev/null | grep -oE 'GCC: .*' | sort | uniq -c | tr -s ' ' | tr '\n' ';')"
  echo "== torch libs bundling a libstdc++/libgcc_s: $(ls "$TLIB" | grep -E 'stdc|gcc_s' | tr '\n' ' ')"
  for l in $(ldconfig -p 2>/dev/null | awk '/libstdc\+\+\.so\.6 /{print $NF}') /opt/gcc/lib64/libstdc++.so.6; do
    [ -f "$l" ] && echo "== $l -> $(readlink -f "$l"): newest $(strings "$l" | grep -E '^GLIBCXX_3\.4\.[0-9]+$' | sort -V | tail -1), $(strings "$l" | grep -E '^CXXABI_1\.3\.[0-9]+$' | sort -V | tail -1)"
  done
  echo "== libc10.so needs: $(objdump -T "$TLIB/libc10.so" 2>/dev/null | grep -oE 'GLIBCXX_[0-9.]+|CXXABI_[0-9.]+' | sort -Vu | tail -2 | tr '\n' ' ')"
} >>"$TC" 2>&1
SANBIN=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || true)
KF=()
SOPT=()
if [ -n "$SANBIN" ]; then
  SH=$("$SANBIN" --help 2>&1)
  grep -q -- '--print-limit' <<<"$SH" && SOPT+=(--print-limit 30)
  echo "== compute-sanitizer $("$SANBIN" --version 2>&1 | tail -1)" >>"$TC"
  if grep -q -- '--kernel-name ' <<<"$SH"; then KF=(--kernel-name kns=beam_step_kernel)
  elif grep -q -- '--filter ' <<<"$SH"; then KF=(--filter kns=beam_step_kernel); fi
  echo "racecheck kernel filter: ${KF[*]:-(none: every kernel is checked)}" >>"$TC"
fi
PT=()
PH=$(cd "$REPO" && "$PY" -m pytest --help 2>/dev/null)
grep -q -- '--session-timeout' <<<"$PH" && PT+=(--session-timeout=X)
grep -q -- '--timeout=' <<<"$PH" && PT+=(--timeout=150)
echo "pytest timeout options: ${PT[*]:-(none)}" >>"$TC"
say "toolchain facts in $TC:"
grep -E '^(== compiler|dumpfullversion|  specs|  -print-file-name=libgcc_s.so.1|  -print-file-name=libstdc\+\+.so.6|sysconfig (CXX|LDSHARED|LDCXXSHARED) |cpp_extension|setuptools|torch |torch.__config__|CXX=|LDFLAGS=|LD_LIBRARY_PATH=|== .*libstdc\+\+.so.6 ->|racecheck kernel|pytest timeout|c\+\+ |g\+\+ )' "$TC" | cut -c1-300

# ------------------------------------------------------------------------------------------------ 4. sanitizers
wait "$RPID"
RRC=$(cat "$W/build_R.rc" 2>/dev/null || echo '?')
say "R build rc $RRC"
RSO=""
for f in "$REPO"/onerec_fast/_C*.so; do RSO=$f; done
[ -z "$RSO" ] && RSO=$(cd "$REPO" && "$PY" -c "import onerec_fast._C as m; print(m.__file__)" 2>/dev/null)
if [ "$RRC" != 0 ] || [ -z "$RSO" ]; then
  say "R build failed or no _C: $(tail -5 "$W/logs/build_R.log")"
  if [ "$RRC" != 0 ]; then # keep the Triton memcheck going: pure install
    (cd "$REPO" && ONEREC_FAST_NO_CUDA=1 "$PY" -m pip install --no-build-isolation --no-deps -e . >"$W/logs/build_R_pure.log" 2>&1)
  fi
fi
SPIDS=()
SANS=()
san() { # name tool filter(0/1) files... -- kexpr
  local n=$1 tool=$2 kf=$3
  shift 3
  local files=()
  while [ "$1" != -- ]; do files+=("$1"); shift; done
  shift
  local kexpr=$1 budget=$((T0 + SAN_END - $(date +%s)))
  [ "$budget" -lt 40 ] && { say "sanitizer run $n skipped: ${budget}s left"; return; }
  local extra=() pt=() envs=()
  [ "$kf" = 1 ] && extra=("${KF[@]}")
  for o in "${PT[@]}"; do
    [ "$o" = --session-timeout=X ] && o=--session-timeout=$((budget - 12))
    pt+=("$o")
  done
  [ "$tool" = memcheck ] && envs=(PYTORCH_NO_CUDA_MEMORY_CACHING=1)
  echo "budget ${budget}s: compute-sanitizer --tool $tool ${extra[*]} pytest ${files[*]} -k \"$kexpr\"" >"$W/logs/san_$n.log"
  (
    cd "$REPO" && env "${envs[@]}" timeout -k 8 -s INT "$budget" "$SANBIN" --tool "$tool" --error-exitcode 1 \
      "${SOPT[@]}" "${extra[@]}" "$PY" -m pytest -v -p no:cacheprovider -o addopts= -rfE "${pt[@]}" \
      "${files[@]}" -k "$kexpr" >>"$W/logs/san_$n.log" 2>&1
    echo $? >"$W/san_$n.rc"
  ) &
  SPIDS+=($!)
  SANS+=("$n")
}
if [ -n "$SANBIN" ] && [ -n "$RSO" ]; then
  BS=tests/test_beam_step_cuda.py
  san rc1 racecheck 1 $BS -- "test_exact_ties or test_fewer_candidates_than_beam_and_dead_rows or test_strided_and_unaligned_logits"
  san rc2 racecheck 1 $BS -- "test_matches_reference and (3-16-64-500 or 5-7-33-300) and (dtype0 or dtype2)"
  san rc3 racecheck 1 $BS -- "test_matches_reference and 2-128-512 and dtype2 or test_matches_reference and 1-256-1000 and True-1- and dtype2 or test_candidates_entry_matches_dense"
fi
if [ -n "$SANBIN" ]; then
  san mc_moe memcheck 0 tests/test_moe.py -- "test_moe_kernels_match_ref_output_and_grads and ([0-triton-cuda] or [2-triton-cuda] or [5-triton-cuda]) or test_moe_zero_tokens and triton-cuda or test_moe_all_tokens_to_one_expert_and_recompute and triton-cuda"
  san mc_varlen memcheck 0 tests/test_varlen_attention.py -- "test_kernels_write_every_output and cuda or test_backward_stays_finite_at_very_negative_lse and cuda or test_no_rows and triton-cuda or test_triton_matches_reference and (cuda-bfloat16-d64-lq7-rows-h4/2 or cuda-float16-d128-lq128-shared-h2/2 or cuda-float32-d32-lq1-rows-h2/2) or test_beam_shared_matches_replicated_sdpa and triton-jagged-cuda"
  san mc_lmhead memcheck 0 tests/test_lm_head.py -- "test_candidates_match_reference and cuda and (shape6 or shape2 and 1-cuda) or test_gemm_chunked_epilogue_matches_reference and 1-cuda or test_without_scores_every_live_node_counts and cuda or test_candidates_step_with_fewer_candidates_than_beam and cuda or test_fused_step_matches_dense_beam_step and 1-full-cuda"
  san mc_route memcheck 0 tests/test_moe_routing.py -- "test_route_kernel_matches_ref and ([0-triton-cuda] or [2-triton-cuda] or [4-triton-cuda] or [6-triton-cuda] or [8-triton-cuda]) or test_route_kernel_half_logits_and_all_to_one_expert and triton-cuda or test_route_gradient_matches_autograd_of_ref and triton-cuda or test_route_zero_tokens_and_losses and triton-cuda"
  say "sanitizer runs ${SANS[*]} started (end by ${SAN_END}s; racecheck filter: ${KF[*]:-none})"
else
  say "no compute-sanitizer found: sanitizer runs skipped"
fi
RTPID=
if [ -n "$RSO" ]; then
  (throw_test R "$RSO") &
  RTPID=$!
fi

# ------------------------------------------------------------------------------------------------ 3b. builds end, gdb
wait_pids "${VPIDS[@]}" $RTPID || say "some builds/throw tests still running at the deadline"
say "builds and throw tests done"
TJ=("$W"/throw_*.json)
"$PY" "$S/s17_throw.py" --table "${TJ[@]}" >"$W/throw_table.txt" 2>&1
GDB=$(command -v cuda-gdb || command -v gdb || true)
CR=$("$PY" - "$W" <<'EOF' 2>/dev/null
import glob, json, sys
order = "RAWBCEFD"
runs = sorted(glob.glob(sys.argv[1] + "/throw_*.json"), key=lambda p: order.find(p[-6]) % 99)
for p in runs:
    r = json.load(open(p))
    crashes = [c for c, v in r["results"].items() if v["status"] == "CRASH"]
    cpu = [c for c in crashes if "cuda" not in c]
    if crashes:
        print(r["label"], r["so"], (cpu or crashes)[0])
        break
EOF
)
if [ -n "$CR" ] && [ -n "$GDB" ] && [ "$(left)" -gt 40 ]; then
  set -- $CR
  gl=$(($(left) - 20)); [ $gl -gt 80 ] && gl=80
  say "native backtrace of build $1 case $3 with $(basename "$GDB") (${gl}s)"
  cv=""; case "$3" in *cuda*) ;; *) cv=1 ;; esac
  (
    [ -n "$cv" ] && export CUDA_VISIBLE_DEVICES=
    timeout -k 5 $gl "$GDB" -q -batch -nx -ex "set pagination off" -ex "set confirm off" -ex "set auto-solib-add off" \
      -ex run -ex "sharedlibrary libgcc_s" -ex "sharedlibrary libstdc" -ex "sharedlibrary _C" -ex "sharedlibrary libc10\.so" \
      -ex "bt 40" -ex "info registers rip" -ex "x/3i \$pc" -ex "info sharedlibrary" \
      --args "$PY" "$S/s17_throw.py" --child --so "$2" --cases "$3"
  ) >"$W/logs/gdb.txt" 2>&1
fi

# ------------------------------------------------------------------------------------------------ 5. summary
wait_pids "${SPIDS[@]}" || say "sanitizer runs still going at the deadline"
SUM=$OUT/s17_summary.txt
{
  echo "=================== s17 summary ($(el)s, $(hostname), $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1), kernel $(uname -r))"
  echo "--- toolchain"
  grep -E '^(== compiler|dumpfullversion|  specs|  ld: |  -print-file-name=libgcc_s.so.1|sysconfig (CXX|LDSHARED|LDCXXSHARED) |cpp_extension|setuptools |torch [0-9]|CXX=|LDFLAGS=|LD_LIBRARY_PATH=|== .*libstdc\+\+.so.6 ->|== ldd|racecheck kernel)' "$TC" | cut -c1-240
  grep -A3 '^== ldd libtorch_python' "$TC" | tail -n +2 | tr -s ' \t' ' '
  echo "--- builds (rc, seconds, link driver + flags that reached the link line; ELF facts)"
  for n in R "${VARIANTS[@]}"; do
    log=$W/logs/build_$n.log
    ll=$(link_line "$log")
    flags=$(grep -oE -- '-(static|shared)-lib(gcc|stdc\+\+)|-Wl,--eh-frame-hdr' <<<"$ll" | sort -u | tr '\n' ' ')
    echo "[$n] rc $(cat "$W/build_$n.rc" 2>/dev/null || echo '?') $(cat "$W/buildtime_$n" 2>/dev/null || echo '-')s env: $(cat "$W/env_$n.txt" 2>/dev/null) | link: $(awk '{print $1}' <<<"$ll") ${flags}"
    if [ -f "$W/logs/elf_$n.txt" ]; then grep -E 'NEEDED|ldd|EH_FRAME|_Unwind|cxa_throw|\.comment' "$W/logs/elf_$n.txt" | sed "s/^/[$n] /" | cut -c1-300; fi
    [ "$(cat "$W/build_$n.rc" 2>/dev/null)" != 0 ] && grep -E 'error|Error' "$log" 2>/dev/null | grep -v 'Werror' | head -3 | sed "s/^/[$n]   /" | cut -c1-300
  done
  echo "--- throw tests (ok = the expected Python exception or return value; see throw.txt for messages)"
  cat "$W"/logs/throw_R.txt "$W"/logs/throw_A.txt 2>/dev/null | grep -E '^\[R\]     (loaded|so) |^\[A\]     so ' | cut -c1-400
  cat "$W/throw_table.txt"
  for f in "$W"/logs/throw_*.txt; do
    grep -E ' CRASH |UNEXPECTED|NOEXC|load error' "$f" | cut -c1-240
    grep -m1 -A3 ' CRASH ' "$f" | grep 'S17SEGV pc' | head -1 | cut -c1-240
  done
  [ -f "$W/logs/gdb.txt" ] && { echo "--- native backtrace ($(basename "${GDB:-gdb}")): ${CR}"; grep -E '^#[0-9]+ |signal SIG|Program received|^=>' "$W/logs/gdb.txt" | head -30 | cut -c1-220; }
  echo "--- sanitizers (rc: 0 clean; tests by outcome; sanitizer summary)"
  for n in "${SANS[@]}"; do
    f=$W/logs/san_$n.log
    counts=$(grep -oE '(PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)( \([^)]*\))? +\[ *[0-9]+%\]' "$f" | awk '{print $1}' | sort | uniq -c | tr -s ' ' | tr '\n' ',')
    echo "[$n] rc $(cat "$W/san_$n.rc" 2>/dev/null || echo 'running/killed') tests:${counts:- none} | $(grep -E '(ERROR|RACECHECK) SUMMARY' "$f" | tail -1) | $(grep -oE 'collected [0-9]+ items.*selected' "$f" | head -1) | $(grep -E '^=+ .*(passed|failed|error|deselected).* =+$' "$f" | tail -1 | tr -d '=')"
    grep -E '^========= (Invalid|Error|Race|Program hit|Warning|Hazard|.*Saved host backtrace)|^========= +(Address|Write|Read) ' "$f" | sort | uniq -c | sort -rn | head -4 | cut -c1-220
    grep -E 'FAILED tests/|Unrecognized|unrecognized|not supported|Device not supported|error:' "$f" | head -4 | cut -c1-220
    head -1 "$f" | cut -c1-160
  done
} >"$SUM" 2>&1
cat "$SUM"

# files back (8 at most)
{ for n in R "${VARIANTS[@]}"; do
    echo "=================== build $n: rc $(cat "$W/build_$n.rc" 2>/dev/null) env $(cat "$W/env_$n.txt" 2>/dev/null)"
    echo "link: $(link_line "$W/logs/build_$n.log")"
    cat "$W/logs/elf_$n.txt" 2>/dev/null
    echo "-- error lines:"; grep -nE 'error|Error' "$W/logs/build_$n.log" 2>/dev/null | grep -v Werror | head -12 | cut -c1-400
    echo "-- log:"; trim "$W/logs/build_$n.log" 15 25
  done; } >"$OUT/builds.txt" 2>&1
{ for f in "$W"/logs/throw_*.txt; do echo "=================== $f"; cat "$f"; done; echo "=================== gdb"; trim "$W/logs/gdb.txt" 40 150; } >"$OUT/throw.txt" 2>&1
"$PY" -c "import glob,json,sys; json.dump({p.split('throw_')[-1][:-5]: json.load(open(p)) for p in glob.glob('$W/throw_*.json')}, open('$OUT/throw.json','w'), indent=1)" 2>/dev/null
{ for n in rc1 rc2 rc3; do echo "=================== $n rc $(cat "$W/san_$n.rc" 2>/dev/null)"; trim "$W/logs/san_$n.log" 150 80; done; } >"$OUT/racecheck.txt" 2>&1
{ for n in mc_moe mc_varlen mc_lmhead mc_route; do echo "=================== $n rc $(cat "$W/san_$n.rc" 2>/dev/null)"; trim "$W/logs/san_$n.log" 120 80; done; } >"$OUT/memcheck.txt" 2>&1
say "done; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
