// The Python module onerec_fast._C. Importing it loads this library, whose static initializers register
// every op of csrc/<op>/binding.cpp with the dispatcher under torch.ops.onerec_fast_C (TORCH_LIBRARY_FRAGMENT),
// so adding an op never edits a shared file. Kernels live in torch-free csrc/<op>/*.cu(h) so CI can
// compile-check them with plain nvcc.
#include <torch/extension.h>

#ifndef ONEREC_FAST_ARCH_LIST
#define ONEREC_FAST_ARCH_LIST "unknown"
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "onerec_fast CUDA kernels; the ops are torch.ops.onerec_fast_C.*";
  m.attr("ARCH_LIST") = ONEREC_FAST_ARCH_LIST;
}
