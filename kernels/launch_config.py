"""Launch configs of the Triton kernels: one typed config, one table format, one lookup, tune on first use.

A :class:`LaunchConfig` is what a launcher needs besides its tensors: the tile sizes (the kernel's
``BLOCK_*``/``GROUP_M`` constexprs; a kernel reads the fields it has, the others stay ``None``) and Triton's
``num_warps``/``num_stages``.

**Tables.** ``kernels/configs/<op>.json`` (shipped, written by ``benchmarks/tune_<op>.py``) and the
tune-on-first-use cache ``$ONEREC_FAST_CACHE_DIR/launch_configs/<op>.json`` (default
``~/.cache/onerec_fast``) share one format, keyed by normalized GPU name (:func:`gpu_key`, ``"NVIDIA H200"``
-> ``"h200"``) then by shape key (:func:`shape_key`, ``"<kernel> <dtype> <dim><bucket> ..."``)::

    {"h200": {"name": "NVIDIA H200", "capability": "9.0",
              "configs": {"gemm1 bfloat16 d1024 f2048 E24 k2 T16384":
                          {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8,
                           "num_warps": 8, "num_stages": 4}}}}

**Lookup** (:func:`lookup`), per (op, GPU, shape key), first hit wins:

1. the shipped table's entry for this GPU;
2. the cache's entry for this GPU (an earlier tune-on-first-use, of this process or another);
3. the shipped entry of another GPU of the same compute capability (an H200's for an H100: same SM, same
   shared memory, so its tiles fit), taken as is;
4. tune on first use: the op's handful of candidates (the heuristic default first) run on the caller's
   own tensors, a few timed repetitions each; the fastest is written to the cache (atomically) and used.
   Skipped, and the default used, when ``ONEREC_FAST_AUTOTUNE=0``, inside CUDA-graph capture or
   torch.compile tracing, and for callers that only ask (no ``run``);
5. the op's heuristic default.

The result is remembered in memory, so every later call of that shape bucket is one dict lookup: no file
read, no timing, no host sync. CPU tensors (the Triton interpreter) have no GPU name: they get the default.

A shipped table that does not parse is a ``ValueError`` naming the file (it is package data: a bug). A
cache that does not parse is ignored with a :class:`UserWarning` naming the file, and replaced by the next
tuning (it is disposable; a half-written file must not stop a training run).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .timing import run_times_ms

log = logging.getLogger("onerec_fast")

ENV_CACHE_DIR = "ONEREC_FAST_CACHE_DIR"  # shared with onerec_fast.train.evaluate's baseline cache
ENV_AUTOTUNE = "ONEREC_FAST_AUTOTUNE"
CONFIG_DIR = Path(__file__).resolve().parent / "configs"
# Tune-on-first-use runs each candidate once untimed (it compiles there), then TUNE_REPS times timed.
TUNE_REPS = 5


@dataclass(frozen=True, kw_only=True)
class LaunchConfig:
    """Tiles and launch options of one kernel launch. ``BLOCK_M/N/K``: the tile's rows, columns and
    reduction depth; ``BLOCK_C``: the LM head's children per step (0: a whole tile at once); ``GROUP_M``:
    row tiles swept together for L2 reuse; ``num_stages`` ``None``: Triton's default."""

    num_warps: int
    num_stages: int | None = None
    BLOCK_M: int | None = None
    BLOCK_N: int | None = None
    BLOCK_K: int | None = None
    BLOCK_C: int | None = None
    GROUP_M: int | None = None

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v is None and f.name != "num_warps":
                continue
            if type(v) is not int or v < 0 or (v == 0 and f.name != "BLOCK_C"):
                raise ValueError(f"LaunchConfig.{f.name} must be a positive int (BLOCK_C may be 0), got {v!r}")

    def launch_options(self) -> dict[str, int]:
        """``num_warps`` and (when set) ``num_stages``, as Triton's launch takes them."""
        opts = {"num_warps": self.num_warps}
        if self.num_stages is not None:
            opts["num_stages"] = self.num_stages
        return opts

    def to_json(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}

    @classmethod
    def from_json(cls, data: object, where: str) -> LaunchConfig:
        """From a table entry; ``where`` (file and key) names it in the error."""
        names = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(data, dict) or not set(data) <= names:
            raise ValueError(f"{where}: expected an object with fields among {sorted(names)}, got {data!r}")
        try:
            return cls(**data)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: {e}") from None


# ------------------------------------------------------------------------------------------------
# keys


def gpu_key(name: str) -> str:
    """Normalized GPU name, the tables' first key: lower case, vendor prefix dropped, other characters
    than letters and digits as ``_`` (``"NVIDIA H100 80GB HBM3"`` -> ``"h100_80gb_hbm3"``)."""
    words = "".join(c if c.isalnum() else " " for c in name.lower()).split()
    if words[:1] == ["nvidia"]:
        words = words[1:]
    return "_".join(words)


def shape_key(kernel: str, dtype: torch.dtype, **dims: int) -> str:
    """The tables' second key, ``"<kernel> <dtype> <name><value> ..."`` in the order given, e.g.
    ``shape_key("fwd", torch.bfloat16, d=64, lq=128, lk=2048) == "fwd bfloat16 d64 lq128 lk2048"``. Callers
    pass bucketed sizes (:func:`pow2_bucket`) where a size varies from call to call."""
    return " ".join((kernel, str(dtype).removeprefix("torch."), *(f"{k}{v}" for k, v in dims.items())))


def pow2_bucket(n: int, lo: int = 1, hi: int | None = None) -> int:
    """The next power of two of ``n``, clamped to ``[lo, hi]`` (``lo``, ``hi`` powers of two)."""
    b = 1 << max(0, (max(n, lo) - 1).bit_length())
    return b if hi is None else min(b, hi)


@dataclass(frozen=True)
class Gpu:
    """A device as the tables name it: ``key`` (:func:`gpu_key`), the driver's ``name``, and the compute
    ``capability`` (``"9.0"``; ``None`` where unknown)."""

    key: str
    name: str
    capability: str | None


def device_gpu(device: torch.device) -> Gpu | None:
    """The GPU of ``device``; ``None`` for CPU tensors (the interpreter: nothing to tune)."""
    if device.type != "cuda":
        return None
    return _cuda_gpu(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _cuda_gpu(index: int) -> Gpu:
    name = torch.cuda.get_device_name(index)
    major, minor = torch.cuda.get_device_capability(index)
    return Gpu(gpu_key(name), name, f"{major}.{minor}")


# ------------------------------------------------------------------------------------------------
# tables


@dataclass
class GpuTable:
    """One GPU's entry of a table: the driver's name, its capability and ``{shape key: config}``."""

    name: str
    capability: str | None
    configs: dict[str, LaunchConfig]


def shipped_path(op: str) -> Path:
    """``kernels/configs/<op>.json``."""
    return CONFIG_DIR / f"{op}.json"


def cache_path(op: str) -> Path:
    """``$ONEREC_FAST_CACHE_DIR/launch_configs/<op>.json`` (default ``~/.cache/onerec_fast``), read at each
    lookup miss so that a directory set after import counts."""
    root = os.environ.get(ENV_CACHE_DIR) or Path.home() / ".cache" / "onerec_fast"
    return Path(root) / "launch_configs" / f"{op}.json"


def read_table(path: Path) -> dict[str, GpuTable]:
    """``{gpu key: GpuTable}`` of the table at ``path`` ({} when there is no file); ``ValueError`` naming
    the file and entry when it does not parse."""
    if not path.exists():
        return {}
    with open(path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected an object of GPU entries, got {type(data).__name__}")
    out = {}
    for gpu, entry in data.items():
        if not isinstance(entry, dict) or set(entry) != {"name", "capability", "configs"} \
                or not isinstance(entry["configs"], dict):
            raise ValueError(f"{path}: GPU entry {gpu!r} must be an object with exactly 'name', 'capability' "
                             f"and 'configs' (an object of shape key -> config)")
        configs = {key: LaunchConfig.from_json(cfg, f"{path}: {gpu} {key!r}") for key, cfg in entry["configs"].items()}
        out[gpu] = GpuTable(entry["name"], entry["capability"], configs)
    return out


def save_configs(path: Path, gpu: Gpu, configs: Mapping[str, LaunchConfig | None],
                 table: dict[str, GpuTable] | None = None) -> None:
    """Merge ``configs`` into ``gpu``'s entry (``None`` removes that key) of ``table`` (default: the table
    now at ``path``) and write the result to ``path`` atomically (a temporary file in the same folder,
    then ``os.replace``: a reader sees the old file or the new one, never half of one)."""
    table = read_table(path) if table is None else table
    mine = table.setdefault(gpu.key, GpuTable(gpu.name, gpu.capability, {}))
    for key, cfg in configs.items():
        if cfg is None:
            mine.configs.pop(key, None)
        else:
            mine.configs[key] = cfg
    data = {g: {"name": t.name, "capability": t.capability,
                "configs": {k: t.configs[k].to_json() for k in sorted(t.configs)}}
            for g, t in sorted(table.items())}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


@functools.lru_cache(maxsize=None)
def shipped_table(op: str) -> dict[str, GpuTable]:
    """The shipped table of ``op``, read once per process."""
    return read_table(shipped_path(op))


def _read_cache(op: str) -> dict[str, GpuTable]:
    path = cache_path(op)
    try:
        return read_table(path)
    except (OSError, ValueError) as e:
        warnings.warn(f"ignoring the launch-config cache {path}: {e}; the next tuning replaces it", stacklevel=3)
        return {}


# ------------------------------------------------------------------------------------------------
# timing and search


def _median_ms(fn: Callable[[], object], device: torch.device, warmup: int, reps: int) -> float:
    """Median milliseconds of ``reps`` runs of ``fn`` after ``warmup`` untimed ones (``kernels.timing``)."""
    return statistics.median(run_times_ms(fn, device, warmup, reps))


def fastest(candidates: Iterable[LaunchConfig], run: Callable[[LaunchConfig], object], device: torch.device, *,
            warmup: int, reps: int, log_line: Callable[[str], object] | None = None
            ) -> tuple[LaunchConfig | None, float]:
    """``(config, median ms)`` of the fastest of ``candidates`` (duplicates timed once, ties to the
    earlier), each run by ``run(config)`` ``warmup`` times untimed, then ``reps`` times timed on ``device``;
    ``(None, inf)`` when none runs. A candidate that raises (does not compile, out of shared memory or
    registers) is skipped. ``log_line`` receives one line per candidate (the tuners print them)."""
    best, best_ms = None, math.inf
    for cfg in dict.fromkeys(candidates):
        try:
            ms = _median_ms(lambda: run(cfg), device, warmup, reps)
        except Exception as e:  # noqa: BLE001 -- whatever a config that does not fit raises: skip it
            if log_line:
                log_line(f"{cfg.to_json()}: skipped ({type(e).__name__})")
            continue
        if log_line:
            log_line(f"{cfg.to_json()}: {ms * 1e3:.1f} us")
        if ms < best_ms:
            best, best_ms = cfg, ms
    return best, best_ms


def _tracing() -> bool:
    """Inside torch.compile tracing or CUDA-graph capture, where nothing may be timed or synced."""
    # is_initialized first: CPU builds of torch raise on the capture query.
    return torch.compiler.is_compiling() or (torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing())


# ------------------------------------------------------------------------------------------------
# lookup

# (op, gpu key, shape key) -> the config every later call of that bucket gets.
_resolved: dict[tuple[str, str, str], LaunchConfig] = {}


def _stored(op: str, gpu: Gpu, key: str) -> LaunchConfig | None:
    """Steps 1-3 of the lookup (module docstring): this GPU's shipped entry, its cached one, then the
    shipped entry of a GPU of the same capability (in the order of their keys)."""
    shipped = shipped_table(op)
    tables = [t[gpu.key] for t in (shipped, _read_cache(op)) if gpu.key in t]
    if gpu.capability is not None:
        tables += [shipped[g] for g in sorted(shipped) if g != gpu.key and shipped[g].capability == gpu.capability]
    return next((t.configs[key] for t in tables if key in t.configs), None)


def lookup(op: str, key: str, device: torch.device, candidates: Callable[[], Sequence[LaunchConfig]],
           run: Callable[[LaunchConfig], object] | None = None) -> LaunchConfig:
    """The config of ``op``'s shape ``key`` on ``device`` (order: module docstring).

    ``candidates()``: the op's configs worth timing for this shape, every one valid for it, its heuristic
    default first (the answer where nothing stored or tuned applies); called only when the answer is not
    remembered, so a hit costs no more than the key. ``run(config)`` launches the kernel on the caller's
    tensors with that config, for tuning on first use; it must give the same result however often it runs
    (outputs written, never accumulated into). Without it nothing is tuned.
    """
    gpu = device_gpu(device)
    if gpu is None:
        return candidates()[0]
    memo = (op, gpu.key, key)
    hit = _resolved.get(memo)
    if hit is not None:
        return hit
    cfg = _stored(op, gpu, key)
    if cfg is None:
        space = candidates()
        if os.environ.get(ENV_AUTOTUNE, "1") == "0":
            cfg = space[0]  # switched off: the default, remembered like a tuned config
        elif run is None or _tracing():
            return space[0]  # a question, or a trace that must not time: a later call may still tune
        else:
            cfg = _tune(op, key, gpu, device, space, run)
    _resolved[memo] = cfg
    return cfg


def _tune(op: str, key: str, gpu: Gpu, device: torch.device, space: Sequence[LaunchConfig],
          run: Callable[[LaunchConfig], object]) -> LaunchConfig:
    """Step 4 of the lookup: the fastest of ``space`` (default first), written to the cache."""
    t0 = time.perf_counter()
    best, ms = fastest(space, run, device, warmup=1, reps=TUNE_REPS)
    if best is None:  # nothing ran: the launch with the default raises the real error
        return space[0]
    path = cache_path(op)
    save_configs(path, gpu, {key: best}, _read_cache(op))
    log.info("onerec_fast: tuned %s %r on %s in %.1f s: %s (%.1f us), cached in %s",
             op, key, gpu.name, time.perf_counter() - t0, best.to_json(), ms * 1e3, path)
    return best
