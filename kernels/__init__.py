"""Triton kernels of onerec_fast, installed as ``onerec_fast.kernels``.

Each module holds the ``@triton.jit`` kernels of one op and their launchers; launchers take
tensors and plain Python values and import nothing from the package above them.

Launch configs are one type, :class:`~onerec_fast.kernels.launch_config.LaunchConfig` (``BLOCK_M/N/K``,
``BLOCK_C``, ``GROUP_M``, ``num_warps``, ``num_stages``), which every launcher gets from
:func:`~onerec_fast.kernels.launch_config.lookup` by op, GPU and shape bucket: this GPU's tuned entry in
``configs/<op>.json`` (data, written by ``benchmarks/tune_<op>.py``), else the one it tuned on first use
(cached in ``$ONEREC_FAST_CACHE_DIR/launch_configs/<op>.json``, default ``~/.cache/onerec_fast``), else a
tuned entry of a GPU of the same compute capability, else a short timed search over the op's candidates on
the first call of the bucket (not inside CUDA-graph capture or torch.compile tracing; never with
``ONEREC_FAST_AUTOTUNE=0``), else the op's heuristic default. CPU tensors (the interpreter) get the default.
"""
