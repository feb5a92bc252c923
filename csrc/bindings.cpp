// The thin torch binding of onerec_fast._C: one PYBIND11_MODULE that asks each op's binding file
// (csrc/<op>/binding.cpp) to add its functions. Kernels live in torch-free csrc/<op>/*.cu(h) so CI
// can compile-check them with plain nvcc.
#include <torch/extension.h>

#include "common/registry.h"

#ifndef ONEREC_FAST_ARCH_LIST
#define ONEREC_FAST_ARCH_LIST "unknown"
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "onerec_fast CUDA kernels";
  m.attr("ARCH_LIST") = ONEREC_FAST_ARCH_LIST;
  for (auto& reg : onerec_fast::binding_registry()) reg(m);
}
