// CUDA GroupNorm(+scale-shift)+SiLU forward for channels_last x: sample b is HW rows of C channels.
//
// A block owns one sample and a tile of TC channels: whole groups (TC a multiple of C / G) and whole 16-byte vectors
// (TC a multiple of V = 16 / sizeof(T)). Each thread keeps one vector column of the tile and walks the rows, so every
// global access is a 16-byte load or store. Two paths, picked by the launcher from the tile's size:
// - fused (the tile's HW x TC elements fit in shared memory): x is read once into shared memory as float32, the group
//   statistics are computed from it in two exact passes (mean, then centred squares), and y is written once;
// - split (larger groups): blocks also split the rows. A first kernel writes each block's per-channel sums of
//   (x - K) and (x - K)^2, K being the group's first element (the shift keeps the one-pass variance accurate), and a
//   second kernel merges them per group, in float64, before normalising its rows: x is read twice, y written once.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <numeric>

#include "../common.h"

namespace cmfast_ext {
namespace {

using at::Tensor;

constexpr int kThreads = 256;
constexpr int kFusedSmemBytes = 96 * 1024;  // the fused path's shared-memory budget per block (H100: 227 KiB)

template <typename T>
constexpr int kVec = 16 / sizeof(T);  // elements per 16-byte access

// 16-byte loads and stores of V elements converted to and from float32 in registers (bfloat16 and float16 as bits).
__device__ inline float from_bits(uint32_t h, c10::BFloat16) { return __uint_as_float(h << 16); }
__device__ inline float from_bits(uint32_t h, c10::Half) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(h)));
}
__device__ inline uint32_t to_bits(float v, c10::BFloat16) { return __bfloat16_as_ushort(__float2bfloat16_rn(v)); }
__device__ inline uint32_t to_bits(float v, c10::Half) { return __half_as_ushort(__float2half_rn(v)); }

template <typename T>
__device__ inline void load16(const T* p, float (&v)[kVec<T>]) {
  const uint4 raw = *reinterpret_cast<const uint4*>(p);
  const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if constexpr (std::is_same_v<T, float>) {
      v[i] = __uint_as_float(w[i]);
    } else {
      v[2 * i] = from_bits(w[i] & 0xffffu, T{});
      v[2 * i + 1] = from_bits(w[i] >> 16, T{});
    }
  }
}

template <typename T>
__device__ inline void store16(T* p, const float (&v)[kVec<T>]) {
  uint32_t w[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if constexpr (std::is_same_v<T, float>) {
      w[i] = __float_as_uint(v[i]);
    } else {
      w[i] = to_bits(v[2 * i], T{}) | (to_bits(v[2 * i + 1], T{}) << 16);
    }
  }
  *reinterpret_cast<uint4*>(p) = make_uint4(w[0], w[1], w[2], w[3]);
}

struct Params {
  const float* weight;  // (C,)
  const float* bias;    // (C,)
  const float* scale;   // (B, C), or null without the scale-shift form
  const float* shift;   // (B, C), or null
  float* mean;          // (B, G) out
  float* rstd;          // (B, G) out
  float* part1;         // split path: (B, S, C) per-block sums of x - K
  float* part2;         // split path: (B, S, C) per-block sums of (x - K)^2
  int HW, C, G, cpg, TC, S, rows_per_split;
  float eps;
};

// Tile layout of a block: thread = (vector column tv, row lane tr); NV columns, `lanes` rows walked at a time (the
// launcher makes the block exactly NV x lanes threads).
struct Lane {
  int NV, lanes, tv, tr;
  __device__ Lane(int TC, int V) {
    NV = TC / V;
    lanes = blockDim.x / NV;
    tv = threadIdx.x % NV;
    tr = threadIdx.x / NV;
  }
};

// out[t] = sum over the block's row lanes of acc (each thread's V per-channel values), for the TC channels of the tile.
// When the NV columns divide a warp (the block is then 256 threads), a warp's lanes of one column are summed with
// shuffles first; otherwise every lane goes through shared memory. red holds blockDim.x * (V + 1) floats; rows of it
// are TC + 1 apart, so that lanes of one column fall in different banks. Ends synchronised.
template <int V>
__device__ void channel_sums(float (&acc)[V], const Lane& lane, int TC, float* red, float* out) {
  int rows = lane.lanes, row = lane.tr;
  bool writes = true;
  if (32 % lane.NV == 0) {
#pragma unroll
    for (int k = 0; k < V; ++k) {
      for (int offset = 16; offset >= lane.NV; offset /= 2) acc[k] += __shfl_xor_sync(0xffffffffu, acc[k], offset);
    }
    rows = blockDim.x / 32;
    row = threadIdx.x / 32;
    writes = threadIdx.x % 32 < lane.NV;
  }
  if (writes) {
#pragma unroll
    for (int k = 0; k < V; ++k) red[row * (TC + 1) + lane.tv * V + k] = acc[k];
  }
  __syncthreads();
  for (int t = threadIdx.x; t < TC; t += blockDim.x) {
    float s = 0.0f;
    for (int r = 0; r < rows; ++r) s += red[r * (TC + 1) + t];
    out[t] = s;
  }
  __syncthreads();
}

// Per-channel m, A = a rstd, t for the tile's channels from the groups' mean and rstd (gmean, grstd per local group),
// with a = weight (1 + scale), t = bias (1 + scale) + shift. Ends synchronised.
__device__ void channel_coefficients(const Params& p, int b, int c0, const float* gmean, const float* grstd,
                                     float* m, float* A, float* t) {
  for (int j = threadIdx.x; j < p.TC; j += blockDim.x) {
    const int c = c0 + j;
    float a = p.weight[c], tt = p.bias[c];
    if (p.scale != nullptr) {
      const float s1 = 1.0f + p.scale[static_cast<int64_t>(b) * p.C + c];
      a *= s1;
      tt = tt * s1 + p.shift[static_cast<int64_t>(b) * p.C + c];
    }
    m[j] = gmean[j / p.cpg];
    A[j] = a * grstd[j / p.cpg];
    t[j] = tt;
  }
  __syncthreads();
}

// y = act((x - m) A + t) for the thread's vector column, rows [p0, p1) of sample b; x from `src` (global or the
// shared tile, as float32 rows of TC).
template <typename T, bool SILU, bool FROM_TILE>
__device__ void normalise_rows(const T* x, const float* tile, T* y, const Params& p, const Lane& lane, int64_t base,
                               int p0, int p1, const float* m, const float* A, const float* t) {
  constexpr int V = kVec<T>;
  float mv[V], Av[V], tv[V];
#pragma unroll
  for (int k = 0; k < V; ++k) {
    mv[k] = m[lane.tv * V + k];
    Av[k] = A[lane.tv * V + k];
    tv[k] = t[lane.tv * V + k];
  }
  for (int r = p0 + lane.tr; r < p1; r += lane.lanes) {
    float v[V];
    if (FROM_TILE) {
#pragma unroll
      for (int k = 0; k < V; ++k) v[k] = tile[r * (p.TC + 1) + lane.tv * V + k];
    } else {
      load16(x + base + static_cast<int64_t>(r) * p.C + lane.tv * V, v);
    }
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const float z = (v[k] - mv[k]) * Av[k] + tv[k];
      v[k] = SILU ? z / (1.0f + __expf(-z)) : z;
    }
    store16(y + base + static_cast<int64_t>(r) * p.C + lane.tv * V, v);
  }
}

// Fused path: grid (C / TC, B). Shared memory: the tile (HW rows of TC floats, TC + 1 apart), the reduction buffer
// (blockDim.x x (V + 1)), per-channel sums, m, A, t (TC each) and the local groups' mean and rstd.
template <typename T, bool SILU>
__global__ void __launch_bounds__(kThreads) gn_fused_kernel(const T* __restrict__ x, T* __restrict__ y, Params p) {
  constexpr int V = kVec<T>;
  extern __shared__ float smem[];
  const int b = blockIdx.y, c0 = blockIdx.x * p.TC, groups = p.TC / p.cpg;
  float* tile = smem;
  float* red = tile + p.HW * (p.TC + 1);
  float* sums = red + blockDim.x * (V + 1);
  float *m = sums + p.TC, *A = m + p.TC, *t = A + p.TC;
  float *gmean = t + p.TC, *grstd = gmean + groups;
  const Lane lane(p.TC, V);
  const int64_t base = static_cast<int64_t>(b) * p.HW * p.C + c0;

  float acc[V] = {};
  for (int r = lane.tr; r < p.HW; r += lane.lanes) {
    float v[V];
    load16(x + base + static_cast<int64_t>(r) * p.C + lane.tv * V, v);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      tile[r * (p.TC + 1) + lane.tv * V + k] = v[k];
      acc[k] += v[k];
    }
  }
  channel_sums(acc, lane, p.TC, red, sums);
  const float n = static_cast<float>(p.cpg) * p.HW;
  for (int g = threadIdx.x; g < groups; g += blockDim.x) {
    float s = 0.0f;
    for (int j = 0; j < p.cpg; ++j) s += sums[g * p.cpg + j];
    gmean[g] = s / n;
  }
  __syncthreads();
  float gm[V];
#pragma unroll
  for (int k = 0; k < V; ++k) {
    gm[k] = gmean[(lane.tv * V + k) / p.cpg];
    acc[k] = 0.0f;
  }
  for (int r = lane.tr; r < p.HW; r += lane.lanes) {
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const float d = tile[r * (p.TC + 1) + lane.tv * V + k] - gm[k];
      acc[k] += d * d;
    }
  }
  channel_sums(acc, lane, p.TC, red, sums);
  for (int g = threadIdx.x; g < groups; g += blockDim.x) {
    float s = 0.0f;
    for (int j = 0; j < p.cpg; ++j) s += sums[g * p.cpg + j];
    grstd[g] = rsqrtf(s / n + p.eps);
    const int64_t bg = static_cast<int64_t>(b) * p.G + c0 / p.cpg + g;
    p.mean[bg] = gmean[g];
    p.rstd[bg] = grstd[g];
  }
  __syncthreads();
  channel_coefficients(p, b, c0, gmean, grstd, m, A, t);
  normalise_rows<T, SILU, true>(x, tile, y, p, lane, base, 0, p.HW, m, A, t);
}

// Split path, pass 1: grid (C / TC, B, S); block s sums rows [s R, (s + 1) R) into part1, part2 (B, S, C).
template <typename T>
__global__ void __launch_bounds__(kThreads) gn_partial_sums_kernel(const T* __restrict__ x, Params p) {
  constexpr int V = kVec<T>;
  extern __shared__ float smem[];
  const int b = blockIdx.y, c0 = blockIdx.x * p.TC, s = blockIdx.z;
  float* red = smem;
  float *sum1 = red + blockDim.x * (V + 1), *sum2 = sum1 + p.TC;
  const Lane lane(p.TC, V);
  const int64_t base = static_cast<int64_t>(b) * p.HW * p.C + c0;
  const int p0 = s * p.rows_per_split, p1 = min(p.HW, p0 + p.rows_per_split);
  float K[V], a1[V] = {}, a2[V] = {};
#pragma unroll
  for (int k = 0; k < V; ++k) {
    const int j = lane.tv * V + k;
    K[k] = static_cast<float>(x[base + (j / p.cpg) * p.cpg]);  // row 0, the group's first channel
  }
  for (int r = p0 + lane.tr; r < p1; r += lane.lanes) {
    float v[V];
    load16(x + base + static_cast<int64_t>(r) * p.C + lane.tv * V, v);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const float d = v[k] - K[k];
      a1[k] += d;
      a2[k] += d * d;
    }
  }
  channel_sums(a1, lane, p.TC, red, sum1);
  channel_sums(a2, lane, p.TC, red, sum2);
  for (int j = threadIdx.x; j < p.TC; j += blockDim.x) {
    const int64_t out = (static_cast<int64_t>(b) * p.S + s) * p.C + c0 + j;
    p.part1[out] = sum1[j];
    p.part2[out] = sum2[j];
  }
}

// Split path, pass 2: grid (C / TC, B, S); every block merges the partial sums of its tile's groups (float64), block
// s == 0 writes mean and rstd, and each block normalises its rows.
template <typename T, bool SILU>
__global__ void __launch_bounds__(kThreads) gn_split_normalise_kernel(const T* __restrict__ x, T* __restrict__ y,
                                                                      Params p) {
  constexpr int V = kVec<T>;
  extern __shared__ double smem_d[];
  const int b = blockIdx.y, c0 = blockIdx.x * p.TC, s = blockIdx.z, groups = p.TC / p.cpg;
  double *s1 = smem_d, *s2 = s1 + p.TC;
  float* m = reinterpret_cast<float*>(s2 + p.TC);
  float *A = m + p.TC, *t = A + p.TC, *gmean = t + p.TC, *grstd = gmean + groups;
  const Lane lane(p.TC, V);
  const int64_t base = static_cast<int64_t>(b) * p.HW * p.C + c0;
  for (int j = threadIdx.x; j < p.TC; j += blockDim.x) {
    double a1 = 0.0, a2 = 0.0;
    for (int k = 0; k < p.S; ++k) {
      const int64_t in = (static_cast<int64_t>(b) * p.S + k) * p.C + c0 + j;
      a1 += p.part1[in];
      a2 += p.part2[in];
    }
    s1[j] = a1;
    s2[j] = a2;
  }
  __syncthreads();
  for (int g = threadIdx.x; g < groups; g += blockDim.x) {
    double a1 = 0.0, a2 = 0.0;
    for (int j = 0; j < p.cpg; ++j) {
      a1 += s1[g * p.cpg + j];
      a2 += s2[g * p.cpg + j];
    }
    const double n = static_cast<double>(p.cpg) * p.HW, m1 = a1 / n;
    const double K = static_cast<double>(static_cast<float>(x[base + g * p.cpg]));
    gmean[g] = static_cast<float>(K + m1);
    grstd[g] = static_cast<float>(rsqrt(fmax(a2 / n - m1 * m1, 0.0) + p.eps));
    if (s == 0) {
      const int64_t bg = static_cast<int64_t>(b) * p.G + c0 / p.cpg + g;
      p.mean[bg] = gmean[g];
      p.rstd[bg] = grstd[g];
    }
  }
  __syncthreads();
  channel_coefficients(p, b, c0, gmean, grstd, m, A, t);
  const int p0 = s * p.rows_per_split, p1 = min(p.HW, p0 + p.rows_per_split);
  normalise_rows<T, SILU, false>(x, nullptr, y, p, lane, base, p0, p1, m, A, t);
}

template <typename T, bool SILU>
void launch(const Tensor& x, Tensor& y, Params p, int B, int sm_count, cudaStream_t stream) {
  constexpr int V = kVec<T>;
  const int NV = p.TC / V, threads = NV * (kThreads / NV), groups = p.TC / p.cpg;
  const dim3 tiles(p.C / p.TC, B);
  const T* xp = x.const_data_ptr<T>();
  T* yp = y.mutable_data_ptr<T>();
  const size_t fused_smem =
      sizeof(float) * (static_cast<size_t>(p.HW) * (p.TC + 1) + threads * (V + 1) + 4 * p.TC + 2 * groups);
  if (fused_smem <= kFusedSmemBytes) {
    auto kernel = gn_fused_kernel<T, SILU>;
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kFusedSmemBytes));
    kernel<<<tiles, threads, fused_smem, stream>>>(xp, yp, p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  // Split the rows so that the grid has a few blocks per multiprocessor.
  const int64_t tile_count = static_cast<int64_t>(tiles.x) * B;
  const int max_splits = (p.HW + kThreads - 1) / kThreads;
  p.S = static_cast<int>(std::clamp<int64_t>((4 * sm_count + tile_count - 1) / tile_count, 1, max_splits));
  p.rows_per_split = (p.HW + p.S - 1) / p.S;
  p.S = (p.HW + p.rows_per_split - 1) / p.rows_per_split;
  Tensor part = at::empty({2, B, p.S, p.C}, x.options().dtype(at::kFloat));
  p.part1 = part[0].data_ptr<float>();
  p.part2 = part[1].data_ptr<float>();
  const dim3 grid(tiles.x, B, p.S);
  gn_partial_sums_kernel<T><<<grid, threads, sizeof(float) * (threads * (V + 1) + 2 * p.TC), stream>>>(xp, p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const size_t smem = sizeof(double) * 2 * p.TC + sizeof(float) * (3 * p.TC + 2 * groups);
  gn_split_normalise_kernel<T, SILU><<<grid, threads, smem, stream>>>(xp, yp, p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<Tensor, Tensor, Tensor> group_norm_silu_cuda(const Tensor& x_in, const Tensor& weight, const Tensor& bias,
                                                        const std::optional<Tensor>& scale,
                                                        const std::optional<Tensor>& shift, int64_t num_groups,
                                                        double eps, bool silu) {
  const char* op = "cmfast_ext::group_norm_silu (CUDA)";
  const auto params = check_group_norm(op, x_in, weight, bias, scale, shift, num_groups);
  CMFAST_CHECK(x_in.dim() == 4 && x_in.is_contiguous(at::MemoryFormat::ChannelsLast), op,
              ": the CUDA kernel needs a 4-D channels_last x (x.contiguous(memory_format=torch.channels_last)), got ",
              "shape ", x_in.sizes(), " strides ", x_in.strides());
  c10::cuda::CUDAGuard guard(x_in.device());
  const int64_t B = x_in.size(0), C = x_in.size(1), G = num_groups, HW = x_in.size(2) * x_in.size(3);
  const int64_t cpg = C / G, V = 16 / x_in.element_size();
  CMFAST_CHECK(C % V == 0, op, ": the CUDA kernel reads 16-byte vectors, so C must be a multiple of ", V, " for ",
              x_in.scalar_type(), ", got C = ", C);
  int64_t TC = std::lcm(cpg, V);  // tile: whole groups and whole vectors
  CMFAST_CHECK(TC / V <= kThreads, op, ": ", cpg, " channels per group make a tile of ", TC,
              " channels, more than the kernel's ", kThreads * V);
  CMFAST_CHECK(HW * C < (int64_t{1} << 31), op, ": ", HW * C, " elements per sample overflow 32-bit row offsets");
  // A misaligned view (storage offset) is copied so that every row start is 16-byte aligned.
  const Tensor x = reinterpret_cast<uintptr_t>(x_in.const_data_ptr()) % 16 == 0
                       ? x_in
                       : x_in.clone(at::MemoryFormat::ChannelsLast);
  Tensor y = new_output(x, memory_format(x));  // channels_last, or both layouts at once (H = W = 1)
  Tensor mean = at::zeros({B, G}, x.options().dtype(at::kFloat));
  Tensor rstd = at::zeros({B, G}, x.options().dtype(at::kFloat));
  if (x.numel() == 0) return {y, mean, rstd};
  int device = x.get_device(), sm_count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, device));
  // Wider tiles make wider rows per access while the grid still has two blocks per multiprocessor.
  while (C % (2 * TC) == 0 && 2 * TC * x.element_size() <= 128 && B * C / (2 * TC) >= 2 * sm_count &&
         2 * TC / V <= kThreads) {
    TC *= 2;
  }
  Params p{params.weight.data_ptr<float>(),
           params.bias.data_ptr<float>(),
           params.scale.defined() ? params.scale.data_ptr<float>() : nullptr,
           params.shift.defined() ? params.shift.data_ptr<float>() : nullptr,
           mean.data_ptr<float>(),
           rstd.data_ptr<float>(),
           nullptr,
           nullptr,
           static_cast<int>(HW),
           static_cast<int>(C),
           static_cast<int>(G),
           static_cast<int>(cpg),
           static_cast<int>(TC),
           1,
           static_cast<int>(HW),
           static_cast<float>(eps)};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  CMFAST_DISPATCH(x.scalar_type(), "group_norm_silu_cuda", [&] {
    silu ? launch<scalar_t, true>(x, y, p, static_cast<int>(B), sm_count, stream)
         : launch<scalar_t, false>(x, y, p, static_cast<int>(B), sm_count, stream);
  });
  return {y, mean, rstd};
}

}  // namespace

TORCH_LIBRARY_IMPL(cmfast_ext, CUDA, m) { m.impl("group_norm_silu", &group_norm_silu_cuda); }

}  // namespace cmfast_ext
