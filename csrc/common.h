// What the CPU and CUDA implementations of the cmfast_ext ops share: argument checks (one message per argument, naming
// it), the memory-format rule of cmfast.kernels, and output allocation.
#pragma once

#include <cstdio>
#include <cstdlib>
#include <limits>
#include <optional>
#include <string>
#include <type_traits>

#include <ATen/Dispatch.h>
#include <torch/types.h>

// Instantiates a kernel for the three dtypes the ops take (x's dtype, checked first), with scalar_t bound to it.
#define CMFAST_DISPATCH(dtype, name, ...)                            \
  AT_DISPATCH_SWITCH(dtype, name, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__) AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))

// TORCH_CHECK with a message made here, without iostreams: CMFAST_CHECK(cond, "x has ", x.dim(), " dims").
//
// TORCH_CHECK formats several message arguments through a std::ostringstream (c10::str), and that code is compiled into
// this library. Where parts of libstdc++ end up linked into the library itself (seen with torch 2.11 and g++ 13.3),
// writing an integer into such a stream crashes at the first failed check (in std::ostream::_M_insert<long>), while
// strings do not. So every piece is turned into a std::string here (std::to_string, snprintf), and TORCH_CHECK receives
// one finished std::string, which c10::str hands through without a stream.
#define CMFAST_CHECK(cond, ...) TORCH_CHECK(cond, ::cmfast_ext::message(__VA_ARGS__))

namespace cmfast_ext {
// Internal linkage: the C++ and the CUDA translation units (g++ and nvcc) each keep their own copy, rather than the
// linker picking one of two definitions compiled by different compilers.
namespace {

inline std::string piece(const char* s) { return s; }
inline std::string piece(const std::string& s) { return s; }
inline std::string piece(c10::ScalarType t) { return c10::toString(t); }  // "Float", "BFloat16", as torch prints them
inline std::string piece(const c10::Device& d) { return d.str(); }       // "cuda:0"; Device::str lives in libc10
template <typename T, std::enable_if_t<std::is_integral_v<T>, int> = 0>
inline std::string piece(T v) {
  return std::to_string(v);
}
inline std::string piece(double v) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%g", v);
  return buf;
}
inline std::string piece(c10::IntArrayRef sizes) {  // "[2, 12, 3, 3]", as c10 prints an ArrayRef
  std::string out = "[";
  for (size_t i = 0; i < sizes.size(); ++i) {
    out += (i ? ", " : "") + std::to_string(sizes[i]);
  }
  return out + "]";
}

template <typename... Args>
std::string message(const Args&... args) {
  std::string out;
  ((out += piece(args)), ...);
  return out;
}

// cmfast.kernels._common.memory_format: channels_last for 4-D tensors stored that way, else contiguous. Every op makes
// its inputs dense in x's format and allocates its outputs in it, so sample b is the b-th run of numel / B elements.
inline at::MemoryFormat memory_format(const at::Tensor& x) {
  if (x.dim() == 4 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    return at::MemoryFormat::ChannelsLast;
  }
  return at::MemoryFormat::Contiguous;
}

// An output like x in `format`. With CMFAST_EXT_POISON=1 in the environment it is filled with NaN first, so a test
// sees any element a kernel fails to write (Python's poisoning of torch.empty cannot reach allocations made here).
inline at::Tensor new_output(const at::Tensor& x, at::MemoryFormat format, std::optional<at::ScalarType> dtype = {}) {
  at::Tensor out = at::empty_like(x, x.options().dtype(dtype.value_or(x.scalar_type())), format);
  const char* poison = std::getenv("CMFAST_EXT_POISON");
  if (poison != nullptr && poison[0] == '1') {
    out.fill_(std::numeric_limits<float>::quiet_NaN());
  }
  return out;
}

inline void check_dtype(const char* op, const char* name, const at::Tensor& t) {
  auto dtype = t.scalar_type();
  CMFAST_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, op, ": ", name,
              " must be float32, bfloat16 or float16, got ", dtype);
}

inline void check_like(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x) {
  CMFAST_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but x is on ", x.device());
  CMFAST_CHECK(t.sizes() == x.sizes(), op, ": ", name, " has shape ", t.sizes(), " but x has ", x.sizes());
  CMFAST_CHECK(t.scalar_type() == x.scalar_type(), op, ": ", name, " is ", t.scalar_type(), " but x is ",
              x.scalar_type(), "; the kernels take one dtype");
}

// A (B,) per-sample noise level as a dense float32 tensor.
inline at::Tensor per_sample(const char* op, const char* name, const at::Tensor& sigma, const at::Tensor& x) {
  CMFAST_CHECK(sigma.device() == x.device(), op, ": ", name, " is on ", sigma.device(), " but x is on ", x.device());
  CMFAST_CHECK(sigma.is_floating_point(), op, ": ", name, " must be floating point, got ", sigma.scalar_type());
  CMFAST_CHECK(sigma.dim() == 1 && sigma.size(0) == x.size(0), op, ": ", name, " must have shape (B,) = (", x.size(0),
              ",), got ", sigma.sizes());
  return sigma.to(at::kFloat).contiguous();
}

// The checks of group_norm_silu's forward and backward; returns weight, bias and (B, C) scale and shift as dense
// float32 (scale and shift undefined without the scale-shift form).
struct GroupNormParams {
  at::Tensor weight, bias, scale, shift;
};

inline GroupNormParams check_group_norm(const char* op, const at::Tensor& x, const at::Tensor& weight,
                                        const at::Tensor& bias, const std::optional<at::Tensor>& scale,
                                        const std::optional<at::Tensor>& shift, int64_t num_groups) {
  CMFAST_CHECK(x.dim() >= 2, op, ": x must be (B, C, *spatial), got shape ", x.sizes());
  check_dtype(op, "x", x);
  const int64_t B = x.size(0), C = x.size(1);
  CMFAST_CHECK(num_groups >= 1 && C % num_groups == 0, op, ": ", C, " channels do not split into num_groups=",
              num_groups, " groups");
  GroupNormParams p;
  const std::pair<const char*, const at::Tensor*> per_channel[] = {{"weight", &weight}, {"bias", &bias}};
  for (auto [name, t] : per_channel) {
    CMFAST_CHECK(t->device() == x.device(), op, ": ", name, " is on ", t->device(), " but x is on ", x.device());
    CMFAST_CHECK(t->dim() == 1 && t->size(0) == C, op, ": ", name, " must have shape (C,) = (", C, ",), got ",
                t->sizes());
    CMFAST_CHECK(t->is_floating_point(), op, ": ", name, " must be floating point, got ", t->scalar_type());
  }
  p.weight = weight.to(at::kFloat).contiguous();
  p.bias = bias.to(at::kFloat).contiguous();
  CMFAST_CHECK(scale.has_value() == shift.has_value(), op,
              ": give both scale and shift (ADM's scale-shift form) or neither");
  if (scale.has_value()) {
    const std::pair<const char*, const at::Tensor*> per_sample_channel[] = {{"scale", &*scale}, {"shift", &*shift}};
    for (auto [name, t] : per_sample_channel) {
      CMFAST_CHECK(t->device() == x.device(), op, ": ", name, " is on ", t->device(), " but x is on ", x.device());
      CMFAST_CHECK(t->numel() == B * C, op, ": ", name, " must hold B x C = ", B, " x ", C, " values, got shape ",
                  t->sizes());
      CMFAST_CHECK(t->is_floating_point(), op, ": ", name, " must be floating point, got ", t->scalar_type());
    }
    p.scale = scale->reshape({B, C}).to(at::kFloat).contiguous();
    p.shift = shift->reshape({B, C}).to(at::kFloat).contiguous();
  }
  return p;
}

}  // namespace
}  // namespace cmfast_ext
