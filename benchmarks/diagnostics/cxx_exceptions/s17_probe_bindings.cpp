// Issue 17 probe build of csrc/bindings.cpp: s17.sh copies this over csrc/bindings.cpp in the
// /tmp copies of the repo it builds (never in the repo). Same module as the real file (ARCH_LIST) plus
// pybind11 functions that narrow down where a C++ exception crashes:
//   _s17_in_std        throw std::runtime_error and catch it inside _C      (unwinder over _C's own frames)
//   _s17_in_c10_nobt   throw c10::Error(msg, nullptr) and catch it inside _C (no backtrace captured)
//   _s17_in_check      TORCH_CHECK(false) and catch c10::Error inside _C    (thrown from libc10, backtrace taken)
//   _s17_bt_glibc      glibc backtrace() from _C                           (_Unwind_Backtrace over every frame)
//   _s17_bt_c10        c10::get_backtrace() from _C                        (what c10::Error records)
//   _s17_pb_std / _s17_pb_c10_nobt / _s17_pb_check / _s17_pb_value: the same errors left to pybind11
//                      (translated to RuntimeError / RuntimeError / RuntimeError / ValueError)
#include <execinfo.h>
#include <torch/extension.h>

#include <c10/util/Backtrace.h>

#include <stdexcept>
#include <string>

#ifndef ONEREC_FAST_ARCH_LIST
#define ONEREC_FAST_ARCH_LIST "unknown"
#endif

namespace {

std::string in_std() {
  try {
    throw std::runtime_error("s17 probe std::runtime_error");
  } catch (const std::exception& e) {
    return std::string("caught ") + e.what();
  }
}

std::string in_c10_nobt() {
  try {
    throw c10::Error("s17 probe c10::Error without backtrace", nullptr);
  } catch (const c10::Error& e) {
    return std::string("caught ") + e.what_without_backtrace();
  }
}

std::string in_check() {
  try {
    TORCH_CHECK(false, "s17 probe TORCH_CHECK caught inside _C");
  } catch (const c10::Error& e) {
    return std::string("caught ") + e.what_without_backtrace();
  }
  return "not thrown";
}

int bt_glibc() {
  void* frames[64];
  return backtrace(frames, 64);
}

int64_t bt_c10() { return static_cast<int64_t>(c10::get_backtrace(0, 64, true).size()); }

void pb_std() { throw std::runtime_error("s17 probe std::runtime_error through pybind11"); }
void pb_c10_nobt() { throw c10::Error("s17 probe c10::Error without backtrace through pybind11", nullptr); }
void pb_check() { TORCH_CHECK(false, "s17 probe TORCH_CHECK through pybind11"); }
void pb_value() { TORCH_CHECK_VALUE(false, "s17 probe TORCH_CHECK_VALUE through pybind11"); }

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "onerec_fast CUDA kernels (issue 17 probe build); the ops are torch.ops.onerec_fast_C.*";
  m.attr("ARCH_LIST") = ONEREC_FAST_ARCH_LIST;
  m.attr("S17_PROBES") = true;
  m.attr("S17_GXX_ABI") = static_cast<int>(__GXX_ABI_VERSION);
#if defined(__GNUC__) && !defined(__clang__)
  m.attr("S17_COMPILER") = std::string("gcc ") + __VERSION__;
#else
  m.attr("S17_COMPILER") = std::string("other ") + __VERSION__;
#endif
  m.def("_s17_in_std", &in_std);
  m.def("_s17_in_c10_nobt", &in_c10_nobt);
  m.def("_s17_in_check", &in_check);
  m.def("_s17_bt_glibc", &bt_glibc);
  m.def("_s17_bt_c10", &bt_c10);
  m.def("_s17_pb_std", &pb_std);
  m.def("_s17_pb_c10_nobt", &pb_c10_nobt);
  m.def("_s17_pb_check", &pb_check);
  m.def("_s17_pb_value", &pb_value);
}
