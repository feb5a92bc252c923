// Self-registration of per-op bindings: each csrc/<op>/binding.cpp defines
//   static onerec_fast::RegisterBinding reg([](pybind11::module& m) { m.def(...); });
// so adding an op never edits a shared file.
#pragma once
#include <functional>
#include <vector>

#include <pybind11/pybind11.h>

namespace onerec_fast {

using BindingFn = std::function<void(pybind11::module&)>;

inline std::vector<BindingFn>& binding_registry() {
  static std::vector<BindingFn> fns;
  return fns;
}

struct RegisterBinding {
  explicit RegisterBinding(BindingFn fn) { binding_registry().push_back(std::move(fn)); }
};

}  // namespace onerec_fast
