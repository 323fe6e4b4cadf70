// CPU kernels of the cmfast_ext ops: GroupNorm(+scale-shift)+SiLU forward, backward and forward mode (JVP), skip/out
// and its TrigFlow form (each with its JVP), Heun step.
//
// Threads come from at::parallel_for (PyTorch's OpenMP pool). The inner loops are plain loops over one row of
// elements that GCC vectorises; CMFAST_CLONES compiles each of them for AVX-512, AVX2 and baseline x86-64 and picks
// one at load time, so the library runs on any x86-64 CPU and uses the widest vectors it has. Arithmetic is float32
// whatever the storage dtype (float32, bfloat16, float16), and each output element is rounded once.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "../common.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define CMFAST_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CMFAST_CLONES
#endif

namespace cmfast_ext {
namespace {

using at::Tensor;

// --- element helpers ------------------------------------------------------------------------------------------------

inline float to_float(float v) { return v; }
inline float to_float(c10::BFloat16 v) {
  uint32_t bits = static_cast<uint32_t>(v.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
inline float to_float(c10::Half v) { return static_cast<float>(v); }

template <typename T>
inline T from_float(float v) {
  return T(v);  // c10's constructors round to nearest even
}

// e^x, branch-free so that loops over it vectorise: x = n ln2 + r with |r| <= ln2 / 2 (ln2 split in two for an exact
// n ln2), e^r from Cephes' expf minimax polynomial (about 1 ulp), and n added to the exponent bits. Outside
// [-87, 88.3], where e^r 2^n would leave the normal floats, the bits are replaced by 0 or infinity: masking the result
// rather than clamping x keeps GCC from splitting the loop into a path per clamped case.
inline float exp_f32(float x) {
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest through the mantissa
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  uint32_t bits;
  std::memcpy(&bits, &p, sizeof bits);
  bits += static_cast<uint32_t>(static_cast<int32_t>(n)) << 23;
  const uint32_t under = 0u - static_cast<uint32_t>(x < -87.0f), over = 0u - static_cast<uint32_t>(x > 88.3f);
  bits = (bits & ~(under | over)) | (over & 0x7f800000u);
  std::memcpy(&p, &bits, sizeof p);
  return p;
}

inline float sigmoid(float z) { return 1.0f / (1.0f + exp_f32(-z)); }

inline float clamp1(float v) { return std::min(std::max(v, -1.0f), 1.0f); }

// Runs f(begin, end) over [0, items) on PyTorch's threads, in one thread when all items together hold fewer than
// about 32k elements (a parallel region costs more than such a loop).
template <typename F>
void parallel_items(int64_t items, int64_t elements_per_item, const F& f) {
  const int64_t grain = std::max<int64_t>(1, (32768 + elements_per_item - 1) / std::max<int64_t>(elements_per_item, 1));
  at::parallel_for(0, items, grain, f);
}

constexpr int64_t kRowsChunk = 64;  // channels_last: positions per work item
constexpr int64_t kBlock = 16384;   // elementwise ops: elements per work item

// --- GroupNorm + SiLU: row kernels ----------------------------------------------------------------------------------

// s1 += sum (x - K), s2 += sum (x - K)^2 over a contiguous run of n elements, in float64 lanes. Shifting by K, an
// element of the group, keeps the one-pass variance accurate when the mean is large against the spread.
template <typename T>
CMFAST_CLONES void shifted_sums(const T* __restrict x, int64_t n, float K, double* s1, double* s2) {
  double a = 0.0, b = 0.0;
#pragma omp simd reduction(+ : a, b)
  for (int64_t i = 0; i < n; ++i) {
    const double d = to_float(x[i]) - K;
    a += d;
    b += d * d;
  }
  *s1 += a;
  *s2 += b;
}

// channels_last: per-channel s1[c] += sum_p (x[p, c] - K[c]), s2[c] += sum_p (x[p, c] - K[c])^2 over `rows` rows of C.
template <typename T>
CMFAST_CLONES void shifted_sums_rows(const T* __restrict x, int64_t rows, int64_t C, const float* __restrict K,
                                     float* __restrict s1, float* __restrict s2) {
  for (int64_t p = 0; p < rows; ++p) {
    const T* row = x + p * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const float d = to_float(row[c]) - K[c];
      s1[c] += d;
      s2[c] += d * d;
    }
  }
}

// y = act((x - m) A + t) over a contiguous run of one channel: A = a rstd, t the channel's shift.
template <typename T, bool SILU>
CMFAST_CLONES void affine_act(const T* __restrict x, T* __restrict y, int64_t n, float m, float A, float t) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    float z = (to_float(x[i]) - m) * A + t;
    if (SILU) z = z / (1.0f + exp_f32(-z));
    y[i] = from_float<T>(z);
  }
}

// channels_last: the same over `rows` rows of C channels, with per-channel m, A and t.
template <typename T, bool SILU>
CMFAST_CLONES void affine_act_rows(const T* __restrict x, T* __restrict y, int64_t rows, int64_t C,
                                   const float* __restrict m, const float* __restrict A, const float* __restrict t) {
  for (int64_t p = 0; p < rows; ++p) {
    const T* xr = x + p * C;
    T* yr = y + p * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      float z = (to_float(xr[c]) - m[c]) * A[c] + t[c];
      if (SILU) z = z / (1.0f + exp_f32(-z));
      yr[c] = from_float<T>(z);
    }
  }
}

// dz = dy act'(z): SiLU's derivative sigmoid(z) (1 + z (1 - sigmoid(z))), or 1 for the identity.
template <bool SILU>
inline float act_grad(float dy, float z) {
  if (!SILU) return dy;
  const float sig = sigmoid(z);
  return dy * sig * (1.0f + z * (1.0f - sig));
}

// Backward over one channel's n positions (element i at i * stride): sums of dz xhat and dz, with
// dz = dy act'(xhat a + t) and act'(z) = sigmoid(z) (1 + z (1 - sigmoid(z))) for SiLU.
// CONTIG (NCHW, stride 1 known at compile time) lets GCC use contiguous vector loads instead of gathers.
template <typename T, bool SILU, bool CONTIG>
CMFAST_CLONES void backward_sums(const T* __restrict x, const T* __restrict dy, int64_t n, int64_t stride_, float m,
                                 float r, float a, float t, double* sum_a, double* sum_b) {
  const int64_t stride = CONTIG ? 1 : stride_;
  double sa = 0.0, sb = 0.0;
#pragma omp simd reduction(+ : sa, sb)
  for (int64_t i = 0; i < n; ++i) {
    const float xhat = (to_float(x[i * stride]) - m) * r;
    const float dz = act_grad<SILU>(to_float(dy[i * stride]), xhat * a + t);
    sa += static_cast<double>(dz) * xhat;
    sb += dz;
  }
  *sum_a += sa;
  *sum_b += sb;
}

// dx = rstd (dz a - mean_g(dz a) - xhat mean_g(dz a xhat)) over one channel's n positions.
template <typename T, bool SILU, bool CONTIG>
CMFAST_CLONES void backward_dx(const T* __restrict x, const T* __restrict dy, T* __restrict dx, int64_t n,
                               int64_t stride_, float m, float r, float a, float t, float mean_dxhat,
                               float mean_dxhat_xhat) {
  const int64_t stride = CONTIG ? 1 : stride_;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float xhat = (to_float(x[i * stride]) - m) * r;
    const float dz = act_grad<SILU>(to_float(dy[i * stride]), xhat * a + t);
    dx[i * stride] = from_float<T>(r * (dz * a - mean_dxhat - xhat * mean_dxhat_xhat));
  }
}

// Forward mode over one channel's n positions: sums of tx and of xhat tx, for the group means of the tangent rule.
template <typename T, bool CONTIG>
CMFAST_CLONES void jvp_sums(const T* __restrict x, const T* __restrict tx, int64_t n, int64_t stride_, float m, float r,
                            double* sum_t, double* sum_xt) {
  const int64_t stride = CONTIG ? 1 : stride_;
  double st = 0.0, sxt = 0.0;
#pragma omp simd reduction(+ : st, sxt)
  for (int64_t i = 0; i < n; ++i) {
    const float xhat = (to_float(x[i * stride]) - m) * r;
    const float t = to_float(tx[i * stride]);
    st += t;
    sxt += static_cast<double>(xhat) * t;
  }
  *sum_t += st;
  *sum_xt += sxt;
}

// ty = act'(z) (rstd (tx - mean_g(tx) - xhat mean_g(xhat tx)) a + xhat ta + tt), z = xhat a + t, over one channel.
template <typename T, bool SILU, bool CONTIG>
CMFAST_CLONES void jvp_ty(const T* __restrict x, const T* __restrict tx, T* __restrict ty, int64_t n, int64_t stride_,
                          float m, float r, float a, float t, float ta, float tt, float mean_t, float mean_xt) {
  const int64_t stride = CONTIG ? 1 : stride_;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float xhat = (to_float(x[i * stride]) - m) * r;
    const float txhat = r * (to_float(tx[i * stride]) - mean_t - xhat * mean_xt);
    ty[i * stride] = from_float<T>(act_grad<SILU>(txhat * a + xhat * ta + tt, xhat * a + t));
  }
}

// --- GroupNorm + SiLU: ops ------------------------------------------------------------------------------------------

// Per-channel a = weight (1 + scale) and t = bias (1 + scale) + shift of sample b (no scale-shift: weight, bias).
struct ChannelAffine {
  const float *weight, *bias, *scale, *shift;
  int64_t C;
  void operator()(int64_t b, int64_t c, float* a, float* t) const {
    *a = weight[c];
    *t = bias[c];
    if (scale != nullptr) {
      const float s1 = 1.0f + scale[b * C + c];
      *a *= s1;
      *t = *t * s1 + shift[b * C + c];
    }
  }
};

ChannelAffine channel_affine(const GroupNormParams& p, int64_t C) {
  return {p.weight.data_ptr<float>(), p.bias.data_ptr<float>(),
          p.scale.defined() ? p.scale.data_ptr<float>() : nullptr,
          p.shift.defined() ? p.shift.data_ptr<float>() : nullptr, C};
}

// Mean and rstd of a group of n elements from its shifted sums (double), as float32.
inline void finish_stats(double K, double s1, double s2, int64_t n, double eps, float* mean, float* rstd) {
  const double m1 = s1 / n;
  *mean = static_cast<float>(K + m1);
  *rstd = static_cast<float>(1.0 / std::sqrt(std::max(s2 / n - m1 * m1, 0.0) + eps));
}

template <typename T, bool SILU>
void gn_forward_nchw(const T* x, T* y, int64_t B, int64_t C, int64_t G, int64_t HW, double eps, const ChannelAffine& aff,
                     float* mean, float* rstd) {
  const int64_t cpg = C / G, n = cpg * HW;
  parallel_items(B * G, n, [&](int64_t begin, int64_t end) {
    for (int64_t bg = begin; bg < end; ++bg) {
      const int64_t b = bg / G, c0 = (bg % G) * cpg;
      const T* xg = x + bg * n;
      const float K = to_float(xg[0]);
      double s1 = 0.0, s2 = 0.0;
      shifted_sums(xg, n, K, &s1, &s2);
      finish_stats(K, s1, s2, n, eps, &mean[bg], &rstd[bg]);
      for (int64_t c = c0; c < c0 + cpg; ++c) {
        float a, t;
        aff(b, c, &a, &t);
        affine_act<T, SILU>(x + (b * C + c) * HW, y + (b * C + c) * HW, HW, mean[bg], a * rstd[bg], t);
      }
    }
  });
}

// channels_last: sample b is HW rows of C channels. Per-channel shifted sums over chunks of rows (in parallel), merged
// into each group's statistics, then a second sweep applies the per-channel affine and the activation.
template <typename T, bool SILU>
void gn_forward_channels_last(const T* x, T* y, int64_t B, int64_t C, int64_t G, int64_t HW, double eps,
                              const ChannelAffine& aff, float* mean, float* rstd) {
  const int64_t cpg = C / G, chunks = (HW + kRowsChunk - 1) / kRowsChunk;
  std::vector<float> K(B * C);  // the shift of channel c: the group's first element
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t c = 0; c < C; ++c) K[b * C + c] = to_float(x[b * HW * C + (c / cpg) * cpg]);
  }
  std::vector<double> part1(B * chunks * C), part2(B * chunks * C);
  parallel_items(B * chunks, kRowsChunk * C, [&](int64_t begin, int64_t end) {
    std::vector<float> s1(C), s2(C);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / chunks, p0 = (item % chunks) * kRowsChunk, rows = std::min(kRowsChunk, HW - p0);
      std::fill(s1.begin(), s1.end(), 0.0f);
      std::fill(s2.begin(), s2.end(), 0.0f);
      shifted_sums_rows(x + (b * HW + p0) * C, rows, C, &K[b * C], s1.data(), s2.data());
      std::copy(s1.begin(), s1.end(), &part1[item * C]);
      std::copy(s2.begin(), s2.end(), &part2[item * C]);
    }
  });
  std::vector<float> M(B * C), A(B * C), Tc(B * C);  // per (sample, channel): group mean, a rstd, t
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t g = 0; g < G; ++g) {
      double s1 = 0.0, s2 = 0.0;
      for (int64_t k = 0; k < chunks; ++k) {
        for (int64_t c = g * cpg; c < (g + 1) * cpg; ++c) {
          s1 += part1[(b * chunks + k) * C + c];
          s2 += part2[(b * chunks + k) * C + c];
        }
      }
      const int64_t bg = b * G + g;
      finish_stats(K[b * C + g * cpg], s1, s2, cpg * HW, eps, &mean[bg], &rstd[bg]);
      for (int64_t c = g * cpg; c < (g + 1) * cpg; ++c) {
        float a, t;
        aff(b, c, &a, &t);
        M[b * C + c] = mean[bg];
        A[b * C + c] = a * rstd[bg];
        Tc[b * C + c] = t;
      }
    }
  }
  parallel_items(B * chunks, kRowsChunk * C, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / chunks, p0 = (item % chunks) * kRowsChunk, rows = std::min(kRowsChunk, HW - p0);
      const int64_t off = (b * HW + p0) * C;
      affine_act_rows<T, SILU>(x + off, y + off, rows, C, &M[b * C], &A[b * C], &Tc[b * C]);
    }
  });
}

std::tuple<Tensor, Tensor, Tensor> group_norm_silu_cpu(const Tensor& x, const Tensor& weight, const Tensor& bias,
                                                       const std::optional<Tensor>& scale,
                                                       const std::optional<Tensor>& shift, int64_t num_groups,
                                                       double eps, bool silu) {
  const auto p = check_group_norm("cmfast_ext::group_norm_silu", x, weight, bias, scale, shift, num_groups);
  const auto format = memory_format(x);
  const Tensor xc = x.contiguous(format);
  Tensor y = new_output(xc, format);
  const int64_t B = x.size(0), C = x.size(1), G = num_groups;
  Tensor mean = at::zeros({B, G}, x.options().dtype(at::kFloat));
  Tensor rstd = at::zeros({B, G}, x.options().dtype(at::kFloat));
  if (xc.numel() == 0) return {y, mean, rstd};
  const int64_t HW = xc.numel() / (B * C);
  const auto aff = channel_affine(p, C);
  CMFAST_DISPATCH(x.scalar_type(), "group_norm_silu_cpu", [&] {
    auto run = [&](auto silu_tag) {
      constexpr bool SILU = decltype(silu_tag)::value;
      auto kernel = format == at::MemoryFormat::ChannelsLast ? gn_forward_channels_last<scalar_t, SILU>
                                                             : gn_forward_nchw<scalar_t, SILU>;
      kernel(xc.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), B, C, G, HW, eps, aff,
             mean.mutable_data_ptr<float>(), rstd.mutable_data_ptr<float>());
    };
    silu ? run(std::true_type{}) : run(std::false_type{});
  });
  return {y, mean, rstd};
}

// The forward's (B, num_groups) float32 statistics, as the backward and the JVP take them.
void check_stats(const char* op, const Tensor& x, const Tensor& mean, const Tensor& rstd, int64_t G) {
  const int64_t B = x.size(0);
  const std::pair<const char*, const Tensor*> stats[] = {{"mean", &mean}, {"rstd", &rstd}};
  for (auto [name, t] : stats) {
    CMFAST_CHECK(t->device() == x.device(), op, ": ", name, " is on ", t->device(), " but x is on ", x.device());
    CMFAST_CHECK(t->scalar_type() == at::kFloat && t->dim() == 2 && t->size(0) == B && t->size(1) == G, op, ": ",
                name, " must be float32 of shape (B, num_groups) = (", B, ", ", G, "), got ", t->scalar_type(), " ",
                t->sizes());
  }
}

// Parallel over (sample, group); channels_last reads with a stride of C (the backward is not tuned).
std::tuple<Tensor, Tensor, Tensor> group_norm_silu_backward_cpu(const Tensor& dy, const Tensor& x,
                                                                const Tensor& weight, const Tensor& bias,
                                                                const std::optional<Tensor>& scale,
                                                                const std::optional<Tensor>& shift, const Tensor& mean,
                                                                const Tensor& rstd, int64_t num_groups, bool silu) {
  const char* op = "cmfast_ext::group_norm_silu_backward";
  const auto p = check_group_norm(op, x, weight, bias, scale, shift, num_groups);
  check_like(op, "dy", dy, x);
  const int64_t B = x.size(0), C = x.size(1), G = num_groups;
  check_stats(op, x, mean, rstd, G);
  const auto format = memory_format(x);
  const Tensor xc = x.contiguous(format), dyc = dy.contiguous(format);
  const Tensor mc = mean.contiguous(), rc = rstd.contiguous();
  Tensor dx = new_output(xc, format);
  Tensor sum_a = at::zeros({B, C}, x.options().dtype(at::kFloat));
  Tensor sum_b = at::zeros({B, C}, x.options().dtype(at::kFloat));
  if (xc.numel() == 0) return {dx, sum_a, sum_b};
  const int64_t HW = xc.numel() / (B * C), cpg = C / G, n = cpg * HW;
  const bool cl = format == at::MemoryFormat::ChannelsLast;
  const int64_t stride_c = cl ? 1 : HW, stride_p = cl ? C : 1;  // within a sample
  const auto aff = channel_affine(p, C);
  const float *m = mc.const_data_ptr<float>(), *r = rc.const_data_ptr<float>();
  float *sa = sum_a.mutable_data_ptr<float>(), *sb = sum_b.mutable_data_ptr<float>();
  CMFAST_DISPATCH(x.scalar_type(), "group_norm_silu_backward_cpu", [&] {
    auto run = [&](auto silu_tag, auto contig_tag) {
      constexpr bool SILU = decltype(silu_tag)::value, CONTIG = decltype(contig_tag)::value;
      const scalar_t *xp = xc.const_data_ptr<scalar_t>(), *dyp = dyc.const_data_ptr<scalar_t>();
      scalar_t* dxp = dx.mutable_data_ptr<scalar_t>();
      parallel_items(B * G, 2 * n, [&](int64_t begin, int64_t end) {
        for (int64_t bg = begin; bg < end; ++bg) {
          const int64_t b = bg / G, c0 = (bg % G) * cpg;
          double mean_dxhat = 0.0, mean_dxhat_xhat = 0.0;
          for (int64_t c = c0; c < c0 + cpg; ++c) {
            float a, t;
            aff(b, c, &a, &t);
            const int64_t off = b * C * HW + c * stride_c;
            double s_a = 0.0, s_b = 0.0;
            backward_sums<scalar_t, SILU, CONTIG>(xp + off, dyp + off, HW, stride_p, m[bg], r[bg], a, t, &s_a, &s_b);
            sa[b * C + c] = static_cast<float>(s_a);
            sb[b * C + c] = static_cast<float>(s_b);
            mean_dxhat += a * s_b / n;
            mean_dxhat_xhat += a * s_a / n;
          }
          for (int64_t c = c0; c < c0 + cpg; ++c) {
            float a, t;
            aff(b, c, &a, &t);
            const int64_t off = b * C * HW + c * stride_c;
            backward_dx<scalar_t, SILU, CONTIG>(xp + off, dyp + off, dxp + off, HW, stride_p, m[bg], r[bg], a, t,
                                        static_cast<float>(mean_dxhat), static_cast<float>(mean_dxhat_xhat));
          }
        }
      });
    };
    if (cl) {
      silu ? run(std::true_type{}, std::false_type{}) : run(std::false_type{}, std::false_type{});
    } else {
      silu ? run(std::true_type{}, std::true_type{}) : run(std::false_type{}, std::true_type{});
    }
  });
  return {dx, sum_a, sum_b};
}

// Forward mode: the tangent of y along tx and the (B, C) tangents ta, tt of the per-channel affine (undefined: none),
// from the forward's mean and rstd. Parallel over (sample, group): one sweep for the group means of tx and xhat tx,
// one that writes ty; channels_last reads with a stride of C, as the backward.
Tensor group_norm_silu_jvp_cpu(const Tensor& x, const Tensor& tx, const Tensor& weight, const Tensor& bias,
                               const std::optional<Tensor>& scale, const std::optional<Tensor>& shift,
                               const Tensor& mean, const Tensor& rstd, const std::optional<Tensor>& ta,
                               const std::optional<Tensor>& tt, int64_t num_groups, bool silu) {
  const char* op = "cmfast_ext::group_norm_silu_jvp";
  const auto p = check_group_norm(op, x, weight, bias, scale, shift, num_groups);
  check_like(op, "tx", tx, x);
  const int64_t B = x.size(0), C = x.size(1), G = num_groups;
  check_stats(op, x, mean, rstd, G);
  CMFAST_CHECK(ta.has_value() == tt.has_value(), op, ": give both ta and tt or neither");
  Tensor tac, ttc;
  if (ta.has_value()) {
    const std::pair<const char*, const Tensor*> tangents[] = {{"ta", &*ta}, {"tt", &*tt}};
    for (auto [name, t] : tangents) {
      CMFAST_CHECK(t->device() == x.device(), op, ": ", name, " is on ", t->device(), " but x is on ", x.device());
      CMFAST_CHECK(t->numel() == B * C, op, ": ", name, " must hold B x C = ", B, " x ", C, " values, got shape ",
                  t->sizes());
    }
    tac = ta->reshape({B, C}).to(at::kFloat).contiguous();
    ttc = tt->reshape({B, C}).to(at::kFloat).contiguous();
  }
  const auto format = memory_format(x);
  const Tensor xc = x.contiguous(format), txc = tx.contiguous(format);
  const Tensor mc = mean.contiguous(), rc = rstd.contiguous();
  Tensor ty = new_output(xc, format);
  if (xc.numel() == 0) return ty;
  const int64_t HW = xc.numel() / (B * C), cpg = C / G, n = cpg * HW;
  const bool cl = format == at::MemoryFormat::ChannelsLast;
  const int64_t stride_c = cl ? 1 : HW, stride_p = cl ? C : 1;
  const auto aff = channel_affine(p, C);
  const float *m = mc.const_data_ptr<float>(), *r = rc.const_data_ptr<float>();
  const float* tap = tac.defined() ? tac.const_data_ptr<float>() : nullptr;
  const float* ttp = ttc.defined() ? ttc.const_data_ptr<float>() : nullptr;
  CMFAST_DISPATCH(x.scalar_type(), "group_norm_silu_jvp_cpu", [&] {
    auto run = [&](auto silu_tag, auto contig_tag) {
      constexpr bool SILU = decltype(silu_tag)::value, CONTIG = decltype(contig_tag)::value;
      const scalar_t *xp = xc.const_data_ptr<scalar_t>(), *txp = txc.const_data_ptr<scalar_t>();
      scalar_t* typ = ty.mutable_data_ptr<scalar_t>();
      parallel_items(B * G, 2 * n, [&](int64_t begin, int64_t end) {
        for (int64_t bg = begin; bg < end; ++bg) {
          const int64_t b = bg / G, c0 = (bg % G) * cpg;
          double sum_t = 0.0, sum_xt = 0.0;
          for (int64_t c = c0; c < c0 + cpg; ++c) {
            const int64_t off = b * C * HW + c * stride_c;
            jvp_sums<scalar_t, CONTIG>(xp + off, txp + off, HW, stride_p, m[bg], r[bg], &sum_t, &sum_xt);
          }
          const float mean_t = static_cast<float>(sum_t / n), mean_xt = static_cast<float>(sum_xt / n);
          for (int64_t c = c0; c < c0 + cpg; ++c) {
            float a, t;
            aff(b, c, &a, &t);
            const float ta_c = tap != nullptr ? tap[b * C + c] : 0.0f, tt_c = ttp != nullptr ? ttp[b * C + c] : 0.0f;
            const int64_t off = b * C * HW + c * stride_c;
            jvp_ty<scalar_t, SILU, CONTIG>(xp + off, txp + off, typ + off, HW, stride_p, m[bg], r[bg], a, t, ta_c,
                                           tt_c, mean_t, mean_xt);
          }
        }
      });
    };
    if (cl) {
      silu ? run(std::true_type{}, std::false_type{}) : run(std::false_type{}, std::false_type{});
    } else {
      silu ? run(std::true_type{}, std::true_type{}) : run(std::false_type{}, std::true_type{});
    }
  });
  return ty;
}

// --- skip/out and the Heun step -------------------------------------------------------------------------------------

template <typename T, bool CLAMP>
CMFAST_CLONES void skip_out_row(const T* __restrict x, const T* __restrict f, T* __restrict out, int64_t n,
                                float c_skip, float c_out) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float o = c_skip * to_float(x[i]) + c_out * to_float(f[i]);
    out[i] = from_float<T>(CLAMP ? clamp1(o) : o);
  }
}

// EDM's coefficients at sigma (cmfast.preconditioning.edm_c_skip, edm_c_out), in float32 as the reference computes them.
struct EdmCoefficients {
  float c_skip, c_out;
  EdmCoefficients(float sigma, float sigma_data, float sd2) {
    c_skip = sd2 / (sigma * sigma + sd2);
    c_out = sigma * sigma_data / std::sqrt(sigma * sigma + sd2);
  }
};

// Pass 1 (HEUN false): x_e = x + (s - t) d with d = (x - D(x, t)) / t; pass 2: x + (s - t) (d + d') / 2 with
// d' = (x_e - D(x_e, s)) / s. D = c_skip x + c_out F, clamped to [-1, 1] with CLAMP.
template <typename T, bool HEUN, bool CLAMP>
CMFAST_CLONES void heun_row(const T* __restrict x, const T* __restrict f, const T* __restrict f_next,
                            T* __restrict out, int64_t n, float t, float s, EdmCoefficients at_t,
                            EdmCoefficients at_s) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float xv = to_float(x[i]);
    float D = at_t.c_skip * xv + at_t.c_out * to_float(f[i]);
    if (CLAMP) D = clamp1(D);
    const float d = (xv - D) / t;
    float x_next = xv + (s - t) * d;
    if (HEUN) {
      float D2 = at_s.c_skip * x_next + at_s.c_out * to_float(f_next[i]);
      if (CLAMP) D2 = clamp1(D2);
      const float d2 = (x_next - D2) / s;
      x_next = xv + (s - t) * (d + d2) / 2.0f;
    }
    out[i] = from_float<T>(x_next);
  }
}

// Work items are blocks of kBlock elements of one sample, so each item's coefficients are those of one sigma.
template <typename F>
void per_sample_blocks(int64_t B, int64_t n, const F& f) {
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  parallel_items(B * blocks, std::min(n, kBlock), [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / blocks, start = (item % blocks) * kBlock;
      f(b, b * n + start, std::min(kBlock, n - start));
    }
  });
}

Tensor skip_out_cpu(const Tensor& x, const Tensor& F, const Tensor& sigma, double sigma_min, double sigma_data,
                    bool clamp) {
  const char* op = "cmfast_ext::skip_out";
  CMFAST_CHECK(x.dim() >= 1, op, ": x must be (B, ...), got a scalar");
  check_dtype(op, "x", x);
  check_like(op, "F", F, x);
  const Tensor sig = per_sample(op, "sigma", sigma, x);
  const auto format = memory_format(x);
  const Tensor xc = x.contiguous(format), Fc = F.contiguous(format);
  Tensor out = new_output(xc, format);
  if (out.numel() == 0) return out;
  const int64_t B = x.size(0), n = xc.numel() / B;
  const float smin = static_cast<float>(sigma_min), sd = static_cast<float>(sigma_data);
  const float sd2 = static_cast<float>(sigma_data * sigma_data);
  const float* s = sig.const_data_ptr<float>();
  CMFAST_DISPATCH(x.scalar_type(), "skip_out_cpu", [&] {
    const scalar_t *xp = xc.const_data_ptr<scalar_t>(), *fp = Fc.const_data_ptr<scalar_t>();
    scalar_t* op_ = out.mutable_data_ptr<scalar_t>();
    per_sample_blocks(B, n, [&](int64_t b, int64_t off, int64_t len) {
      const float d = s[b] - smin;  // Appendix C: c_skip = 1 and c_out = 0 at sigma_min, so f(x, sigma_min) = x
      const float c_skip = sd2 / (d * d + sd2), c_out = sd * d / std::sqrt(s[b] * s[b] + sd2);
      (clamp ? skip_out_row<scalar_t, true> : skip_out_row<scalar_t, false>)(xp + off, fp + off, op_ + off, len,
                                                                              c_skip, c_out);
    });
  });
  return out;
}

// Forward mode of skip/out: c_skip tx + c_out tF + tsigma (c_skip' x + c_out' F), zero where the clamp is active.
template <typename T, bool CLAMP>
CMFAST_CLONES void skip_out_jvp_row(const T* __restrict x, const T* __restrict f, const T* __restrict tx,
                                    const T* __restrict tf, T* __restrict tout, int64_t n, float c_skip, float c_out,
                                    float tc_skip, float tc_out) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float xv = to_float(x[i]), fv = to_float(f[i]);
    float t = c_skip * to_float(tx[i]) + c_out * to_float(tf[i]) + tc_skip * xv + tc_out * fv;
    if (CLAMP) {
      const float o = c_skip * xv + c_out * fv;
      t = (o > -1.0f && o < 1.0f) ? t : 0.0f;
    }
    tout[i] = from_float<T>(t);
  }
}

// A tangent like x made dense in x's format, or zeros where there is none.
Tensor tangent_or_zeros(const char* op, const char* name, const std::optional<Tensor>& t, const Tensor& xc,
                        at::MemoryFormat format) {
  if (!t.has_value()) return at::zeros_like(xc, format);
  check_like(op, name, *t, xc);
  return t->contiguous(format);
}

Tensor skip_out_jvp_cpu(const Tensor& x, const Tensor& F, const Tensor& sigma, const std::optional<Tensor>& tx,
                        const std::optional<Tensor>& tF, const std::optional<Tensor>& tsigma, double sigma_min,
                        double sigma_data, bool clamp) {
  const char* op = "cmfast_ext::skip_out_jvp";
  CMFAST_CHECK(x.dim() >= 1, op, ": x must be (B, ...), got a scalar");
  check_dtype(op, "x", x);
  check_like(op, "F", F, x);
  const Tensor sig = per_sample(op, "sigma", sigma, x);
  const Tensor tsig = tsigma.has_value() ? per_sample(op, "tsigma", *tsigma, x) : at::zeros_like(sig);
  const auto format = memory_format(x);
  const Tensor xc = x.contiguous(format), Fc = F.contiguous(format);
  const Tensor txc = tangent_or_zeros(op, "tx", tx, xc, format), tFc = tangent_or_zeros(op, "tF", tF, xc, format);
  Tensor tout = new_output(xc, format);
  if (tout.numel() == 0) return tout;
  const int64_t B = x.size(0), n = xc.numel() / B;
  const float smin = static_cast<float>(sigma_min), sd = static_cast<float>(sigma_data);
  const float sd2 = static_cast<float>(sigma_data * sigma_data);
  const float *s = sig.const_data_ptr<float>(), *ts = tsig.const_data_ptr<float>();
  CMFAST_DISPATCH(x.scalar_type(), "skip_out_jvp_cpu", [&] {
    const scalar_t *xp = xc.const_data_ptr<scalar_t>(), *fp = Fc.const_data_ptr<scalar_t>();
    const scalar_t *txp = txc.const_data_ptr<scalar_t>(), *tfp = tFc.const_data_ptr<scalar_t>();
    scalar_t* top = tout.mutable_data_ptr<scalar_t>();
    per_sample_blocks(B, n, [&](int64_t b, int64_t off, int64_t len) {
      // c_skip = sd2 / (d^2 + sd2), c_out = sd d / sqrt(sigma^2 + sd2) (Appendix C), d = sigma - sigma_min, and their
      // derivatives in sigma: -2 sd2 d / (d^2 + sd2)^2 and sd (sd2 + sigma sigma_min) / (sigma^2 + sd2)^(3/2).
      const float d = s[b] - smin, den = d * d + sd2, q = s[b] * s[b] + sd2, rq = 1.0f / std::sqrt(q);
      const float c_skip = sd2 / den, c_out = sd * d * rq;
      const float tc_skip = ts[b] * (-2.0f * sd2 * d / (den * den)), tc_out = ts[b] * sd * (sd2 + s[b] * smin) * rq / q;
      (clamp ? skip_out_jvp_row<scalar_t, true> : skip_out_jvp_row<scalar_t, false>)(
          xp + off, fp + off, txp + off, tfp + off, top + off, len, c_skip, c_out, tc_skip, tc_out);
    });
  });
  return tout;
}

// TrigFlow's consistency function cos(t) x - sin(t) sigma_data F (OUT) and its tangent
// cos(t) tx - sin(t) sigma_data tF - tt (sin(t) x + cos(t) sigma_data F) (TANGENT), in one pass over x and F.
template <typename T, bool OUT, bool TANGENT>
CMFAST_CLONES void trig_row(const T* __restrict x, const T* __restrict f, const T* __restrict tx,
                            const T* __restrict tf, T* __restrict out, T* __restrict tout, int64_t n, float cos_t,
                            float sin_t, float sd, float tt) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float xv = to_float(x[i]), fv = to_float(f[i]);
    if (OUT) out[i] = from_float<T>(cos_t * xv - sin_t * sd * fv);
    if (TANGENT) {
      const float d = cos_t * to_float(tx[i]) - sin_t * sd * to_float(tf[i]) - tt * (sin_t * xv + cos_t * sd * fv);
      tout[i] = from_float<T>(d);
    }
  }
}

// Both trig_skip_out ops: out (when `primal`; else an empty tensor) and, with `tangent`, tout along tx, tF, tt
// (missing ones are zero).
std::tuple<Tensor, Tensor> trig_skip_out_impl(const char* op, const Tensor& x, const Tensor& F, const Tensor& t,
                                              const std::optional<Tensor>& tx, const std::optional<Tensor>& tF,
                                              const std::optional<Tensor>& tt, double sigma_data, bool primal,
                                              bool tangent) {
  CMFAST_CHECK(x.dim() >= 1, op, ": x must be (B, ...), got a scalar");
  check_dtype(op, "x", x);
  check_like(op, "F", F, x);
  const Tensor tc = per_sample(op, "t", t, x);
  const auto format = memory_format(x);
  const Tensor xc = x.contiguous(format), Fc = F.contiguous(format);
  Tensor out = primal ? new_output(xc, format) : at::empty({0}, x.options());
  Tensor tout = tangent ? new_output(xc, format) : at::empty({0}, x.options());
  Tensor txc, tFc, ttc;
  if (tangent) {
    txc = tangent_or_zeros(op, "tx", tx, xc, format);
    tFc = tangent_or_zeros(op, "tF", tF, xc, format);
    ttc = tt.has_value() ? per_sample(op, "tt", *tt, x) : at::zeros_like(tc);
  }
  if (xc.numel() == 0) return {out, tout};
  const int64_t B = x.size(0), n = xc.numel() / B;
  const float sd = static_cast<float>(sigma_data);
  const float* tp = tc.const_data_ptr<float>();
  const float* ttp = tangent ? ttc.const_data_ptr<float>() : nullptr;
  CMFAST_DISPATCH(x.scalar_type(), "trig_skip_out_cpu", [&] {
    const scalar_t *xp = xc.const_data_ptr<scalar_t>(), *fp = Fc.const_data_ptr<scalar_t>();
    const scalar_t* txp = tangent ? txc.const_data_ptr<scalar_t>() : xp;
    const scalar_t* tfp = tangent ? tFc.const_data_ptr<scalar_t>() : fp;
    scalar_t* op_ = primal ? out.mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* top = tangent ? tout.mutable_data_ptr<scalar_t>() : nullptr;
    auto row = primal ? (tangent ? trig_row<scalar_t, true, true> : trig_row<scalar_t, true, false>)
                      : trig_row<scalar_t, false, true>;
    per_sample_blocks(B, n, [&](int64_t b, int64_t off, int64_t len) {
      row(xp + off, fp + off, txp + off, tfp + off, primal ? op_ + off : nullptr, tangent ? top + off : nullptr, len,
          std::cos(tp[b]), std::sin(tp[b]), sd, tangent ? ttp[b] : 0.0f);
    });
  });
  return {out, tout};
}

Tensor trig_skip_out_cpu(const Tensor& x, const Tensor& F, const Tensor& t, double sigma_data) {
  return std::get<0>(trig_skip_out_impl("cmfast_ext::trig_skip_out", x, F, t, {}, {}, {}, sigma_data, true, false));
}

std::tuple<Tensor, Tensor> trig_skip_out_jvp_cpu(const Tensor& x, const Tensor& F, const Tensor& t,
                                                 const std::optional<Tensor>& tx, const std::optional<Tensor>& tF,
                                                 const std::optional<Tensor>& tt, double sigma_data, bool primal) {
  return trig_skip_out_impl("cmfast_ext::trig_skip_out_jvp", x, F, t, tx, tF, tt, sigma_data, primal, true);
}

Tensor heun_step_cpu(const Tensor& x, const Tensor& F, const Tensor& sigma, const Tensor& sigma_next,
                     const std::optional<Tensor>& F_next, double sigma_data, bool clamp) {
  const char* op = "cmfast_ext::heun_step";
  CMFAST_CHECK(x.dim() >= 1, op, ": x must be (B, ...), got a scalar");
  check_dtype(op, "x", x);
  check_like(op, "F", F, x);
  if (F_next.has_value()) check_like(op, "F_next", *F_next, x);
  const Tensor t = per_sample(op, "sigma", sigma, x), s = per_sample(op, "sigma_next", sigma_next, x);
  const auto format = memory_format(x);
  const Tensor xc = x.contiguous(format), Fc = F.contiguous(format);
  const Tensor Fn = F_next.has_value() ? F_next->contiguous(format) : Fc;
  Tensor out = new_output(xc, format);
  if (out.numel() == 0) return out;
  const int64_t B = x.size(0), n = xc.numel() / B;
  const float sd = static_cast<float>(sigma_data), sd2 = static_cast<float>(sigma_data * sigma_data);
  const float *tp = t.const_data_ptr<float>(), *sp = s.const_data_ptr<float>();
  CMFAST_DISPATCH(x.scalar_type(), "heun_step_cpu", [&] {
    const scalar_t *xp = xc.const_data_ptr<scalar_t>(), *fp = Fc.const_data_ptr<scalar_t>();
    const scalar_t* fnp = Fn.const_data_ptr<scalar_t>();
    scalar_t* op_ = out.mutable_data_ptr<scalar_t>();
    auto row = F_next.has_value() ? (clamp ? heun_row<scalar_t, true, true> : heun_row<scalar_t, true, false>)
                                  : (clamp ? heun_row<scalar_t, false, true> : heun_row<scalar_t, false, false>);
    per_sample_blocks(B, n, [&](int64_t b, int64_t off, int64_t len) {
      row(xp + off, fp + off, fnp + off, op_ + off, len, tp[b], sp[b], EdmCoefficients(tp[b], sd, sd2),
          EdmCoefficients(sp[b], sd, sd2));
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(cmfast_ext, CPU, m) {
  m.impl("group_norm_silu", &group_norm_silu_cpu);
  m.impl("group_norm_silu_backward", &group_norm_silu_backward_cpu);
  m.impl("group_norm_silu_jvp", &group_norm_silu_jvp_cpu);
  m.impl("skip_out", &skip_out_cpu);
  m.impl("skip_out_jvp", &skip_out_jvp_cpu);
  m.impl("trig_skip_out", &trig_skip_out_cpu);
  m.impl("trig_skip_out_jvp", &trig_skip_out_jvp_cpu);
  m.impl("heun_step", &heun_step_cpu);
}

}  // namespace cmfast_ext
