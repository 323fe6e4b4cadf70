// CUDA channels_last GroupNorm(+scale-shift)(+SiLU) forward with fused pre-adds, for inference (the math, its
// PyTorch reference and the Triton kernels are in cmfast/kernels/group_norm_silu_nhwc.py):
//
//   h = round(x + pre_add + alpha residual),  y = act((h - mean_g) rstd_g a + t),
//   a = weight (1 + scale),  t = bias (1 + scale) + shift
//
// h is summed in float32 and rounded once to x's dtype; the statistics and arithmetic run in float32 on that h.
//
// Sample b is HW rows of C contiguous channels. A block's threads form `lanes` rows of NV = C / V columns, with
// V = 16 / sizeof(T): thread (lane, col) owns channels [col V, col V + V) of every lanes-th row, so every global
// access is one 16-byte vector and consecutive threads read consecutive vectors of a row. Per-channel sums are
// reduced over the lanes in shared memory, then folded into groups (a group's C / G channels need not fill whole
// vectors: 6 for C = 192). Two paths, picked by the launcher from the sample's size:
// - single (the sample's h fits in shared memory in x's dtype): one block per sample reads x (and the residual) once,
//   keeps the rounded h in shared memory, takes the statistics from it in two exact passes (mean, then centred
//   squares) and writes y once;
// - split: blocks take ranges of rows. A stats kernel writes each block's per-channel sums of (h - K) and (h - K)^2,
//   K being the channel's value at pixel 0 (the shift keeps one-pass sums accurate); a merge kernel combines them per
//   group in float64 (channel means and centred sums, then Chan et al.'s formula across the group's channels); a
//   normalise kernel writes y, reading h back when it was written, else recomputing it from x and the residual.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>

#include "../common.h"

namespace cmfast_ext {
namespace {

using at::Tensor;

constexpr int kBlock = 256;               // threads per block at most; NV = C / V must not exceed it
constexpr int kSingleSmem = 96 * 1024;    // the single-pass kernel's shared-memory budget per block (at most)
constexpr int kMaxSplits = 1024;          // row ranges per sample on the split path (the merge reads them all)
constexpr int kMergeThreads = 256;

template <typename T>
constexpr int kV = 16 / sizeof(T);  // elements per 16-byte access

template <typename T>
struct alignas(16) Vec {
  T v[kV<T>];
};

template <typename T>
__device__ inline void load_vec(const T* p, float (&out)[kV<T>]) {
  const Vec<T> pk = *reinterpret_cast<const Vec<T>*>(p);
#pragma unroll
  for (int k = 0; k < kV<T>; ++k) out[k] = static_cast<float>(pk.v[k]);
}

template <typename T>
__device__ inline void store_vec(T* p, const float (&in)[kV<T>]) {
  Vec<T> pk;
#pragma unroll
  for (int k = 0; k < kV<T>; ++k) pk.v[k] = static_cast<T>(in[k]);
  *reinterpret_cast<Vec<T>*>(p) = pk;
}

struct Params {
  const float* weight;  // (C,)
  const float* bias;    // (C,)
  const float* pre;     // (B or 1, C) at b pre_b + c, or null
  const float* scale;   // (B, C), or null without the scale-shift form
  const float* shift;   // (B, C), or null
  float* part1;         // split: (B, S, C) per-block sums of h - K
  float* part2;         // split: (B, S, C) per-block sums of (h - K)^2
  float* K;             // split: (B, C) h at pixel 0
  float* mean;          // split: (B, G)
  float* rstd;          // split: (B, G)
  int64_t pre_b;        // 0 when the pre-add is shared by the batch
  int HW, C, G, cpg;
  int S, rows;  // split: row ranges per sample, rows per range
  float alpha, eps;
  bool silu;
};

// Thread (lane, col) of a block of lanes x NV threads (the launcher makes the block exactly that size).
struct Layout {
  int NV, lanes, col, lane;
  __device__ Layout(int C, int V) : NV(C / V), lanes(blockDim.x / (C / V)), col(threadIdx.x % (C / V)),
                                    lane(threadIdx.x / (C / V)) {}
};

template <int V>
__device__ inline void load_pre(const Params& p, int b, int c0, float (&pre)[V]) {
#pragma unroll
  for (int k = 0; k < V; ++k) pre[k] = p.pre != nullptr ? p.pre[b * p.pre_b + c0 + k] : 0.0f;
}

// h = round(x + pre + alpha res) for one vector at element offset `off` (x itself when nothing is added: adding 0 and
// rounding a value of x's dtype leave it unchanged).
template <typename T>
__device__ inline void load_sum(const T* x, const T* res, int64_t off, const float (&pre)[kV<T>], float alpha,
                                float (&h)[kV<T>]) {
  constexpr int V = kV<T>;
  load_vec(x + off, h);
  float r[V] = {};
  if (res != nullptr) load_vec(res + off, r);
#pragma unroll
  for (int k = 0; k < V; ++k) h[k] = static_cast<float>(static_cast<T>(h[k] + pre[k] + alpha * r[k]));
}

// sums[c] = the sum over the block's lanes of each thread's V per-channel values; red holds lanes x C floats. Ends
// synchronised.
template <int V>
__device__ void reduce_lanes(const float (&acc)[V], const Layout& L, int C, float* red, float* sums) {
#pragma unroll
  for (int k = 0; k < V; ++k) red[L.lane * C + L.col * V + k] = acc[k];
  __syncthreads();
  for (int c = threadIdx.x; c < C; c += blockDim.x) {
    float s = 0.0f;
    for (int l = 0; l < L.lanes; ++l) s += red[l * C + c];
    sums[c] = s;
  }
  __syncthreads();
}

// out[g] = (the sum of sums[c] over group g's channels) * inv, then f applied; ends synchronised.
template <typename F>
__device__ void fold_groups(const float* sums, const Params& p, float inv, float* out, F f) {
  for (int g = threadIdx.x; g < p.G; g += blockDim.x) {
    float s = 0.0f;
    for (int j = 0; j < p.cpg; ++j) s += sums[g * p.cpg + j];
    out[g] = f(s * inv);
  }
  __syncthreads();
}

// The thread's per-channel m = mean, A = a rstd and t (see the top of the file) for channels c0 + k of sample b.
template <int V>
__device__ inline void coefficients(const Params& p, int b, int c0, const float* gmean, const float* grstd,
                                    float (&m)[V], float (&A)[V], float (&t)[V]) {
#pragma unroll
  for (int k = 0; k < V; ++k) {
    const int c = c0 + k, g = c / p.cpg;
    float a = p.weight[c], tt = p.bias[c];
    if (p.scale != nullptr) {
      const float s1 = 1.0f + p.scale[static_cast<int64_t>(b) * p.C + c];
      a *= s1;
      tt = tt * s1 + p.shift[static_cast<int64_t>(b) * p.C + c];
    }
    m[k] = gmean[g];
    A[k] = a * grstd[g];
    t[k] = tt;
  }
}

template <int V>
__device__ inline void normalise(float (&v)[V], const float (&m)[V], const float (&A)[V], const float (&t)[V],
                                 bool silu) {
#pragma unroll
  for (int k = 0; k < V; ++k) {
    const float z = (v[k] - m[k]) * A[k] + t[k];
    v[k] = silu ? z / (1.0f + __expf(-z)) : z;
  }
}

// Single path: grid (B,). Shared memory: h (HW x C in T), the lane reduction (lanes x C), per-channel sums (C), the
// groups' mean and rstd (G each).
template <typename T>
__global__ void __launch_bounds__(kBlock)
    single_kernel(const T* __restrict__ x, const T* __restrict__ res, T* __restrict__ sum, T* __restrict__ y,
                  Params p) {
  constexpr int V = kV<T>;
  extern __shared__ __align__(16) unsigned char smem[];
  const Layout L(p.C, V);
  T* tile = reinterpret_cast<T*>(smem);
  float* red = reinterpret_cast<float*>(tile + static_cast<size_t>(p.HW) * p.C);
  float* chan = red + L.lanes * p.C;
  float* gmean = chan + p.C;
  float* grstd = gmean + p.G;
  const int b = blockIdx.x, c0 = L.col * V;
  const int64_t base = static_cast<int64_t>(b) * p.HW * p.C;
  float pre[V], acc[V] = {};
  load_pre(p, b, c0, pre);
#pragma unroll 4  // several 16-byte loads in flight per thread
  for (int r = L.lane; r < p.HW; r += L.lanes) {
    const int off = r * p.C + c0;
    float h[V];
    load_sum(x, res, base + off, pre, p.alpha, h);
    store_vec(tile + off, h);  // exact: h is already rounded to T
    if (sum != nullptr) store_vec(sum + base + off, h);
#pragma unroll
    for (int k = 0; k < V; ++k) acc[k] += h[k];
  }
  const float inv_n = 1.0f / (static_cast<float>(p.HW) * p.cpg);
  reduce_lanes(acc, L, p.C, red, chan);
  fold_groups(chan, p, inv_n, gmean, [](float v) { return v; });
  float m[V];
#pragma unroll
  for (int k = 0; k < V; ++k) {
    m[k] = gmean[(c0 + k) / p.cpg];
    acc[k] = 0.0f;
  }
  for (int r = L.lane; r < p.HW; r += L.lanes) {
    float h[V];
    load_vec(tile + r * p.C + c0, h);
#pragma unroll
    for (int k = 0; k < V; ++k) acc[k] += (h[k] - m[k]) * (h[k] - m[k]);
  }
  reduce_lanes(acc, L, p.C, red, chan);
  const float eps = p.eps;
  fold_groups(chan, p, inv_n, grstd, [eps](float var) { return rsqrtf(var + eps); });
  float A[V], t[V];
  coefficients(p, b, c0, gmean, grstd, m, A, t);
  for (int r = L.lane; r < p.HW; r += L.lanes) {
    const int off = r * p.C + c0;
    float v[V];
    load_vec(tile + off, v);
    normalise(v, m, A, t, p.silu);
    store_vec(y + base + off, v);
  }
}

// Split path, pass 1: grid (S, B); block s sums rows [s rows, (s + 1) rows) of sample b into part1, part2, and block
// 0 writes K. Shared memory: the lane reduction (lanes x C) and two per-channel sums (C each).
template <typename T>
__global__ void __launch_bounds__(kBlock)
    stats_kernel(const T* __restrict__ x, const T* __restrict__ res, T* __restrict__ sum, Params p) {
  constexpr int V = kV<T>;
  extern __shared__ __align__(16) unsigned char smem[];
  const Layout L(p.C, V);
  float* red = reinterpret_cast<float*>(smem);
  float* sum1 = red + L.lanes * p.C;
  float* sum2 = sum1 + p.C;
  const int s = blockIdx.x, b = blockIdx.y, c0 = L.col * V;
  const int64_t base = static_cast<int64_t>(b) * p.HW * p.C;
  const int r0 = s * p.rows, r1 = min(p.HW, r0 + p.rows);
  float pre[V], K[V], a1[V] = {}, a2[V] = {};
  load_pre(p, b, c0, pre);
  load_sum(x, res, base + c0, pre, p.alpha, K);
  if (s == 0 && L.lane == 0) {
#pragma unroll
    for (int k = 0; k < V; ++k) p.K[static_cast<int64_t>(b) * p.C + c0 + k] = K[k];
  }
#pragma unroll 4
  for (int r = r0 + L.lane; r < r1; r += L.lanes) {
    const int64_t off = base + r * p.C + c0;
    float h[V];
    load_sum(x, res, off, pre, p.alpha, h);
    if (sum != nullptr) store_vec(sum + off, h);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const float d = h[k] - K[k];
      a1[k] += d;
      a2[k] += d * d;
    }
  }
  reduce_lanes(a1, L, p.C, red, sum1);
  reduce_lanes(a2, L, p.C, red, sum2);
  for (int c = threadIdx.x; c < p.C; c += blockDim.x) {
    const int64_t out = (static_cast<int64_t>(b) * p.S + s) * p.C + c;
    p.part1[out] = sum1[c];
    p.part2[out] = sum2[c];
  }
}

// Split path, merge: grid (ceil(G / groups_per_block), B). Each thread takes channels of the block's groups: its
// mean and centred sum of squares over all HW rows from the S blocks' shifted sums (float64); then each group's mean
// and rstd by Chan et al.'s formula over its channels (equal counts). Shared memory: 2 doubles per channel.
__global__ void __launch_bounds__(kMergeThreads) merge_kernel(Params p, int groups_per_block) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int b = blockIdx.y, g0 = blockIdx.x * groups_per_block;
  const int groups = min(groups_per_block, p.G - g0), channels = groups * p.cpg, c_first = g0 * p.cpg;
  double* cmean = reinterpret_cast<double*>(smem);
  double* cm2 = cmean + channels;
  const double hw = p.HW;
  for (int j = threadIdx.x; j < channels; j += blockDim.x) {
    const int c = c_first + j;
    double s1 = 0.0, s2 = 0.0;
    for (int s = 0; s < p.S; ++s) {
      const int64_t in = (static_cast<int64_t>(b) * p.S + s) * p.C + c;
      s1 += p.part1[in];
      s2 += p.part2[in];
    }
    cmean[j] = p.K[static_cast<int64_t>(b) * p.C + c] + s1 / hw;
    cm2[j] = fmax(s2 - s1 * s1 / hw, 0.0);
  }
  __syncthreads();
  for (int gl = threadIdx.x; gl < groups; gl += blockDim.x) {
    double mean = 0.0, m2 = 0.0;
    for (int j = gl * p.cpg; j < (gl + 1) * p.cpg; ++j) mean += cmean[j];
    mean /= p.cpg;
    for (int j = gl * p.cpg; j < (gl + 1) * p.cpg; ++j) {
      const double d = cmean[j] - mean;
      m2 += cm2[j] + hw * d * d;
    }
    const int64_t bg = static_cast<int64_t>(b) * p.G + g0 + gl;
    p.mean[bg] = static_cast<float>(mean);
    p.rstd[bg] = static_cast<float>(rsqrt(m2 / (hw * p.cpg) + p.eps));
  }
}

// Split path, pass 2: grid (S, B); block s normalises rows [s rows, (s + 1) rows) of sample b.
template <typename T>
__global__ void __launch_bounds__(kBlock)
    normalise_kernel(const T* __restrict__ x, const T* __restrict__ res, const T* __restrict__ sum,
                     T* __restrict__ y, Params p) {
  constexpr int V = kV<T>;
  const Layout L(p.C, V);
  const int s = blockIdx.x, b = blockIdx.y, c0 = L.col * V;
  const int64_t base = static_cast<int64_t>(b) * p.HW * p.C;
  const int r0 = s * p.rows, r1 = min(p.HW, r0 + p.rows);
  float pre[V], m[V], A[V], t[V];
  load_pre(p, b, c0, pre);
  coefficients(p, b, c0, p.mean + static_cast<int64_t>(b) * p.G, p.rstd + static_cast<int64_t>(b) * p.G, m, A, t);
#pragma unroll 4
  for (int r = r0 + L.lane; r < r1; r += L.lanes) {
    const int64_t off = base + r * p.C + c0;
    float v[V];
    if (sum != nullptr) {
      load_vec(sum + off, v);
    } else {
      load_sum(x, res, off, pre, p.alpha, v);
    }
    normalise(v, m, A, t, p.silu);
    store_vec(y + off, v);
  }
}

template <typename T>
void launch(const Tensor& x, const Tensor& res, Tensor& sum, Tensor& y, Params p, int B) {
  constexpr int V = kV<T>;
  const int NV = p.C / V, lanes = kBlock / NV, threads = lanes * NV;
  const T* xp = x.const_data_ptr<T>();
  const T* rp = res.defined() ? res.const_data_ptr<T>() : nullptr;
  T* sp = sum.numel() > 0 ? sum.mutable_data_ptr<T>() : nullptr;
  T* yp = y.mutable_data_ptr<T>();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  int device = x.get_device(), sm_count = 0, smem_optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  const int single_budget = std::min(kSingleSmem, smem_optin);
  const size_t single_smem = sizeof(T) * static_cast<size_t>(p.HW) * p.C +
                             sizeof(float) * (static_cast<size_t>(lanes) * p.C + p.C + 2 * p.G);
  if (single_smem <= static_cast<size_t>(single_budget)) {
    auto kernel = single_kernel<T>;
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, single_budget));
    kernel<<<B, threads, single_smem, stream>>>(xp, rp, sp, yp, p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  // Row ranges: enough blocks for about four per multiprocessor, each at least 4 rows per lane.
  const int max_splits = std::clamp(p.HW / (4 * lanes), 1, kMaxSplits);
  p.S = std::clamp((4 * sm_count + B - 1) / B, 1, max_splits);
  p.rows = (p.HW + p.S - 1) / p.S;
  p.S = (p.HW + p.rows - 1) / p.rows;
  const auto f32 = x.options().dtype(at::kFloat);
  Tensor part = at::empty({2, B, p.S, p.C}, f32);
  Tensor K = at::empty({B, p.C}, f32);
  Tensor stats = at::empty({2, B, p.G}, f32);
  p.part1 = part[0].data_ptr<float>();
  p.part2 = part[1].data_ptr<float>();
  p.K = K.data_ptr<float>();
  p.mean = stats[0].data_ptr<float>();
  p.rstd = stats[1].data_ptr<float>();
  const dim3 grid(p.S, B);
  stats_kernel<T><<<grid, threads, sizeof(float) * (static_cast<size_t>(lanes) + 2) * p.C, stream>>>(xp, rp, sp, p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int groups_per_block = std::max(1, kMergeThreads / p.cpg);
  const dim3 merge_grid((p.G + groups_per_block - 1) / groups_per_block, B);
  const size_t merge_smem = 2 * sizeof(double) * static_cast<size_t>(std::min(groups_per_block, p.G)) * p.cpg;
  merge_kernel<<<merge_grid, kMergeThreads, merge_smem, stream>>>(p, groups_per_block);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  normalise_kernel<T><<<grid, threads, 0, stream>>>(xp, rp, sp, yp, p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// x, or a channels_last copy of it whose rows start 16-byte aligned (a view with a storage offset may not).
Tensor aligned_channels_last(const Tensor& t) {
  Tensor out = t.contiguous(at::MemoryFormat::ChannelsLast);
  if (reinterpret_cast<uintptr_t>(out.const_data_ptr()) % 16 != 0) out = out.clone(at::MemoryFormat::ChannelsLast);
  return out;
}

std::tuple<Tensor, Tensor> group_norm_silu_nhwc_cuda(const Tensor& x_in, const Tensor& weight, const Tensor& bias,
                                                     const std::optional<Tensor>& pre_add,
                                                     const std::optional<Tensor>& residual, double alpha,
                                                     const std::optional<Tensor>& scale,
                                                     const std::optional<Tensor>& shift, int64_t num_groups,
                                                     double eps, bool silu, bool return_sum) {
  const char* op = "cmfast_ext::group_norm_silu_nhwc (CUDA)";
  const auto params = check_group_norm(op, x_in, weight, bias, scale, shift, num_groups);
  CMFAST_CHECK(x_in.dim() == 4 && x_in.is_contiguous(at::MemoryFormat::ChannelsLast), op,
               ": the CUDA kernel needs a 4-D channels_last x (x.contiguous(memory_format=torch.channels_last)), got ",
               "shape ", x_in.sizes(), " strides ", x_in.strides());
  c10::cuda::CUDAGuard guard(x_in.device());
  const int64_t B = x_in.size(0), C = x_in.size(1), G = num_groups, HW = x_in.size(2) * x_in.size(3);
  const int64_t V = 16 / x_in.element_size();
  CMFAST_CHECK(C % V == 0, op, ": the CUDA kernel reads 16-byte vectors, so C must be a multiple of ", V, " for ",
               x_in.scalar_type(), ", got C = ", C);
  CMFAST_CHECK(C / V <= kBlock, op, ": the CUDA kernel takes at most ", kBlock * V, " channels for ",
               x_in.scalar_type(), ", got C = ", C);
  CMFAST_CHECK(HW * C < (int64_t{1} << 31), op, ": ", HW * C, " elements per sample overflow 32-bit row offsets");
  CMFAST_CHECK(B <= 65535, op, ": batch ", B, " is above the grid limit 65535");
  Tensor pre;
  if (pre_add.has_value()) {
    const Tensor& t = *pre_add;
    CMFAST_CHECK(t.device() == x_in.device(), op, ": pre_add is on ", t.device(), " but x is on ", x_in.device());
    CMFAST_CHECK(t.is_floating_point(), op, ": pre_add must be floating point, got ", t.scalar_type());
    const bool shared = (t.dim() == 1 && t.size(0) == C) || (t.dim() == 2 && t.size(0) == 1 && t.size(1) == C);
    CMFAST_CHECK(shared || (t.dim() == 2 && t.size(0) == B && t.size(1) == C), op,
                 ": pre_add must have shape (C,), (1, C) or (B, C) = (", B, ", ", C, "), got ", t.sizes());
    pre = t.reshape({-1, C}).to(at::kFloat).contiguous();
  }
  Tensor res;
  if (residual.has_value()) {
    check_like(op, "residual", *residual, x_in);
    res = aligned_channels_last(*residual);
  }
  const Tensor x = aligned_channels_last(x_in);
  Tensor y = new_output(x, memory_format(x));  // channels_last, or both layouts at once (H = W = 1)
  const bool store_sum = return_sum && (pre.defined() || res.defined());
  Tensor sum = store_sum ? new_output(x, memory_format(x)) : at::empty({0}, x.options());
  if (x.numel() == 0) return {y, sum};
  Params p{};
  p.weight = params.weight.data_ptr<float>();
  p.bias = params.bias.data_ptr<float>();
  p.pre = pre.defined() ? pre.data_ptr<float>() : nullptr;
  p.pre_b = pre.defined() && pre.size(0) > 1 ? C : 0;
  p.scale = params.scale.defined() ? params.scale.data_ptr<float>() : nullptr;
  p.shift = params.shift.defined() ? params.shift.data_ptr<float>() : nullptr;
  p.HW = static_cast<int>(HW);
  p.C = static_cast<int>(C);
  p.G = static_cast<int>(G);
  p.cpg = static_cast<int>(C / G);
  p.S = 1;
  p.rows = p.HW;
  p.alpha = static_cast<float>(alpha);
  p.eps = static_cast<float>(eps);
  p.silu = silu;
  CMFAST_DISPATCH(x.scalar_type(), "group_norm_silu_nhwc_cuda",
                  [&] { launch<scalar_t>(x, res, sum, y, p, static_cast<int>(B)); });
  return {y, sum};
}

}  // namespace

TORCH_LIBRARY_IMPL(cmfast_ext, CUDA, m) { m.impl("group_norm_silu_nhwc", &group_norm_silu_nhwc_cuda); }

}  // namespace cmfast_ext
