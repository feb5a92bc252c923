// Torch-free error helpers for kernels and launchers: launchers return cudaError_t and never throw,
// so the torch binding turns an error into a Python exception with the op's name.
#pragma once
#include <cuda_runtime.h>

#define ONEREC_RETURN_IF_ERROR(expr)          \
  do {                                        \
    cudaError_t _err = (expr);                \
    if (_err != cudaSuccess) return _err;     \
  } while (0)
