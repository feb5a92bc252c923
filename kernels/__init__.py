"""Triton kernels of onerec_fast, installed as ``onerec_fast.kernels``.

Each module holds the ``@triton.jit`` kernels of one op and their launchers; launchers take
tensors and plain Python values and import nothing from the package above them. Tuned launch
configs are data (``configs/<op>.json``, written by ``benchmarks/tune_<op>.py``), keyed by GPU and
shape, read through :func:`load_configs`.
"""

import functools
import json
import os

_CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


@functools.lru_cache(maxsize=None)
def load_configs(op: str) -> dict:
    """The tuned configs of ``op``: ``{gpu_name: {shape_key: {param: value}}}`` ({} when none)."""
    path = os.path.join(_CONFIG_DIR, f"{op}.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)
