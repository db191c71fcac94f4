// Psumbook GEMV (CodeGEMM) through the XLA FFI: y = x @ W for batches of 1..16 rows.
//
// One CUDA block owns kTileN = 1024 outputs and a K range of `k_block` inputs (split-K);
// it walks that range in sub-tiles of kTileK = 32 inputs:
//   1. the x sub-tile (B x 32) goes to shared memory;
//   2. the Psumbook of the sub-tile is built in shared memory:
//        P[b][jj][c][i] = <x[b, k0 + jj*v : k0 + jj*v + v], C_c[i]>   (256 centroids)
//   3. each thread reads the codes of its 4 consecutive outputs with one 32-bit load per
//      (chunk, codebook) (coalesced: a warp reads 128 contiguous bytes), looks the partial
//      sums up, and adds them times the group scale into its registers.
// Each block writes its partial sums to partial[split, b, n]; XLA sums the splits, so the
// result is deterministic (no atomics).
//
// Built two ways from this one file:
//   nvcc -arch=sm_90a ...            -> the CUDA handler `PsumbookGemvCuda`
//   g++ -x c++ -DPSUMBOOK_CPU ...    -> `PsumbookGemvCpu`, which runs the same phase
//                                       functions block by block and thread by thread,
//                                       so CPU tests check the kernel's indexing.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

#ifdef PSUMBOOK_CPU
#define HD inline
#else
#define HD __host__ __device__ __forceinline__
#endif

namespace {

constexpr int kThreads = 256;
constexpr int kOutPerThread = 4;
constexpr int kTileN = kThreads * kOutPerThread;  // outputs per block
constexpr int kTileK = 32;                         // inputs per Psumbook sub-tile
constexpr int kCentroids = 256;                    // b = 8
constexpr int kMaxBatch = 16;

struct Dims {
  int B, K, N, m, v, g, k_block;
};

// Shared memory (floats): codebooks [m*256*v], x tile [B*kTileK], P [B*(kTileK/v)*m*256].
// Four consecutive codes as one 32-bit word (callers keep the address 4-byte aligned).
HD uint32_t Load4(const uint8_t* ptr) {
#ifdef PSUMBOOK_CPU
  uint32_t word;
  std::memcpy(&word, ptr, sizeof(word));
  return word;
#else
  return *reinterpret_cast<const uint32_t*>(ptr);
#endif
}

HD int SmemFloats(const Dims& d) {
  return d.m * kCentroids * d.v + d.B * kTileK + d.B * (kTileK / d.v) * d.m * kCentroids;
}

HD void LoadCodebooks(int t, const Dims& d, const float* cb, float* cb_s) {
  for (int i = t; i < d.m * kCentroids * d.v; i += kThreads) cb_s[i] = cb[i];
}

HD void LoadX(int t, const Dims& d, int k0, const float* x, float* xs) {
  for (int i = t; i < d.B * kTileK; i += kThreads) {
    const int b = i / kTileK, kk = i % kTileK;
    xs[i] = x[(int64_t)b * d.K + k0 + kk];
  }
}

HD void BuildPsumbook(int t, const Dims& d, const float* xs, const float* cb_s, float* p) {
  const int chunks = kTileK / d.v;
  const int total = d.B * chunks * d.m * kCentroids;
  for (int idx = t; idx < total; idx += kThreads) {
    const int i = idx % kCentroids;
    const int c = (idx / kCentroids) % d.m;
    const int jj = (idx / (kCentroids * d.m)) % chunks;
    const int b = idx / (kCentroids * d.m * chunks);
    const float* xv = xs + b * kTileK + jj * d.v;
    const float* cv = cb_s + (c * kCentroids + i) * d.v;
    float s = 0.f;
    for (int u = 0; u < d.v; ++u) s += xv[u] * cv[u];
    p[idx] = s;  // P[b][jj][c][i]
  }
}

template <int BT>
HD void Lookup(int t, const Dims& d, int n0, int k0, const float* p, const uint8_t* codes,
               const float* scales, float* acc /* [BT][4] */) {
  const int o = n0 + t * kOutPerThread;
  if (o >= d.N) return;
  const int chunks = kTileK / d.v;
  const int j0 = k0 / d.v;
  const int64_t rows = d.K / d.v;
  float tile[BT][kOutPerThread];
  for (int b = 0; b < BT; ++b)
    for (int q = 0; q < kOutPerThread; ++q) tile[b][q] = 0.f;
  for (int jj = 0; jj < chunks; ++jj) {
    for (int c = 0; c < d.m; ++c) {
      // Four outputs' codes in one 32-bit load (N % 4 == 0, so it is aligned).
      const uint32_t word = Load4(codes + (c * rows + j0 + jj) * d.N + o);
      const float* pc = p + (jj * d.m + c) * kCentroids;
      for (int q = 0; q < kOutPerThread; ++q) {
        const int code = (word >> (8 * q)) & 0xff;
        for (int b = 0; b < BT; ++b) tile[b][q] += pc[b * chunks * d.m * kCentroids + code];
      }
    }
  }
  // kTileK divides g: one scale per output for the whole sub-tile.
  const float* s = scales + (int64_t)(k0 / d.g) * d.N + o;
  for (int b = 0; b < BT; ++b)
    for (int q = 0; q < kOutPerThread; ++q) acc[b * kOutPerThread + q] += tile[b][q] * s[q];
}

template <int BT>
HD void WritePartial(int t, const Dims& d, int n0, int split, const float* acc,
                     float* partial) {
  const int o = n0 + t * kOutPerThread;
  if (o >= d.N) return;
  for (int b = 0; b < BT; ++b)
    for (int q = 0; q < kOutPerThread; ++q)
      partial[((int64_t)split * d.B + b) * d.N + o + q] = acc[b * kOutPerThread + q];
}

std::string CheckDims(const Dims& d) {
  if (d.B < 1 || d.B > kMaxBatch) return "batch must be in [1, 16]";
  if (d.v < 1 || kTileK % d.v) return "v must divide 32";
  if (d.g % kTileK) return "g must be a multiple of 32";
  if (d.k_block < kTileK || d.k_block % kTileK || d.K % d.k_block)
    return "k_block must be a multiple of 32 that divides K";
  if (d.N % kOutPerThread) return "N must be a multiple of 4";
  return "";
}

#define PSUMBOOK_DISPATCH(B, F) \
  switch (B) {                  \
    case 1: F(1); break;        \
    case 2: F(2); break;        \
    case 3: F(3); break;        \
    case 4: F(4); break;        \
    case 5: F(5); break;        \
    case 6: F(6); break;        \
    case 7: F(7); break;        \
    case 8: F(8); break;        \
    case 9: F(9); break;        \
    case 10: F(10); break;      \
    case 11: F(11); break;      \
    case 12: F(12); break;      \
    case 13: F(13); break;      \
    case 14: F(14); break;      \
    case 15: F(15); break;      \
    default: F(16); break;      \
  }

template <typename XB, typename CB, typename CodesB, typename SB, typename RB>
std::string GetDims(const XB& x, const CB& cb, const CodesB& codes, const SB& scales,
                    const RB& partial, int64_t k_block, Dims* d) {
  auto xd = x.dimensions(), cd = cb.dimensions(), kd = codes.dimensions(),
       sd = scales.dimensions(), pd = partial->dimensions();
  if (xd.size() != 2 || cd.size() != 3 || kd.size() != 3 || sd.size() != 2 || pd.size() != 3)
    return "x, codebooks, codes, scales, partial must have ranks 2, 3, 3, 2, 3";
  d->B = xd[0];
  d->K = xd[1];
  d->m = cd[0];
  d->v = cd[2];
  d->N = kd[2];
  d->k_block = (int)k_block;
  if (cd[1] != kCentroids) return "codebooks must have 256 centroids (b = 8)";
  if (kd[0] != d->m || (int64_t)kd[1] * d->v != d->K) return "codes must be [m, K / v, N]";
  if (sd[1] != d->N || sd[0] < 1 || d->K % sd[0]) return "scales must be [K / g, N]";
  d->g = d->K / sd[0];
  if (pd[0] != d->K / k_block || pd[1] != d->B || pd[2] != d->N)
    return "partial must be [K / k_block, B, N]";
  return CheckDims(*d);
}

}  // namespace

#ifdef PSUMBOOK_CPU

// The CPU twin: the CUDA block/thread structure run sequentially, phase by phase.
template <int BT>
void RunCpu(const Dims& d, const float* x, const float* cb, const uint8_t* codes,
            const float* scales, float* partial) {
  std::vector<float> smem(SmemFloats(d));
  float* cb_s = smem.data();
  float* xs = cb_s + d.m * kCentroids * d.v;
  float* p = xs + d.B * kTileK;
  std::vector<float> acc(kThreads * BT * kOutPerThread);
  const int blocks_n = (d.N + kTileN - 1) / kTileN, splits = d.K / d.k_block;
  for (int split = 0; split < splits; ++split) {
    for (int bn = 0; bn < blocks_n; ++bn) {
      const int n0 = bn * kTileN;
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int t = 0; t < kThreads; ++t) LoadCodebooks(t, d, cb, cb_s);
      for (int k0 = split * d.k_block; k0 < (split + 1) * d.k_block; k0 += kTileK) {
        for (int t = 0; t < kThreads; ++t) LoadX(t, d, k0, x, xs);
        for (int t = 0; t < kThreads; ++t) BuildPsumbook(t, d, xs, cb_s, p);
        for (int t = 0; t < kThreads; ++t)
          Lookup<BT>(t, d, n0, k0, p, codes, scales, &acc[t * BT * kOutPerThread]);
      }
      for (int t = 0; t < kThreads; ++t)
        WritePartial<BT>(t, d, n0, split, &acc[t * BT * kOutPerThread], partial);
    }
  }
}

static ffi::Error PsumbookGemvCpuImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> cb,
                                      ffi::Buffer<ffi::U8> codes,
                                      ffi::Buffer<ffi::F32> scales,
                                      ffi::ResultBuffer<ffi::F32> partial, int64_t k_block) {
  Dims d;
  std::string err = GetDims(x, cb, codes, scales, partial, k_block, &d);
  if (!err.empty()) return ffi::Error::InvalidArgument("psumbook_gemv: " + err);
#define RUN_CPU(BT)                                                                 \
  RunCpu<BT>(d, x.typed_data(), cb.typed_data(), codes.typed_data(),                \
             scales.typed_data(), partial->typed_data())
  PSUMBOOK_DISPATCH(d.B, RUN_CPU)
#undef RUN_CPU
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(PsumbookGemvCpu, PsumbookGemvCpuImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("k_block"));

#else  // CUDA

template <int BT>
__global__ void __launch_bounds__(kThreads)
    PsumbookGemvKernel(Dims d, const float* __restrict__ x, const float* __restrict__ cb,
                       const uint8_t* __restrict__ codes, const float* __restrict__ scales,
                       float* __restrict__ partial) {
  extern __shared__ float smem[];
  float* cb_s = smem;
  float* xs = cb_s + d.m * kCentroids * d.v;
  float* p = xs + d.B * kTileK;
  const int t = threadIdx.x, n0 = blockIdx.x * kTileN, split = blockIdx.y;
  float acc[BT * kOutPerThread];
#pragma unroll
  for (int i = 0; i < BT * kOutPerThread; ++i) acc[i] = 0.f;
  LoadCodebooks(t, d, cb, cb_s);
  for (int k0 = split * d.k_block; k0 < (split + 1) * d.k_block; k0 += kTileK) {
    __syncthreads();  // the previous sub-tile's P and x are no longer read
    LoadX(t, d, k0, x, xs);
    __syncthreads();
    BuildPsumbook(t, d, xs, cb_s, p);
    __syncthreads();
    Lookup<BT>(t, d, n0, k0, p, codes, scales, acc);
  }
  WritePartial<BT>(t, d, n0, split, acc, partial);
}

static ffi::Error PsumbookGemvCudaImpl(cudaStream_t stream, ffi::Buffer<ffi::F32> x,
                                       ffi::Buffer<ffi::F32> cb, ffi::Buffer<ffi::U8> codes,
                                       ffi::Buffer<ffi::F32> scales,
                                       ffi::ResultBuffer<ffi::F32> partial,
                                       int64_t k_block) {
  Dims d;
  std::string err = GetDims(x, cb, codes, scales, partial, k_block, &d);
  if (!err.empty()) return ffi::Error::InvalidArgument("psumbook_gemv: " + err);
  const size_t smem = sizeof(float) * SmemFloats(d);
  const dim3 grid((d.N + kTileN - 1) / kTileN, d.K / d.k_block);
#define LAUNCH(BT)                                                                      \
  do {                                                                                  \
    cudaFuncSetAttribute(PsumbookGemvKernel<BT>,                                        \
                         cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);       \
    PsumbookGemvKernel<BT><<<grid, kThreads, smem, stream>>>(                           \
        d, x.typed_data(), cb.typed_data(), codes.typed_data(), scales.typed_data(),    \
        partial->typed_data());                                                         \
  } while (0)
  PSUMBOOK_DISPATCH(d.B, LAUNCH)
#undef LAUNCH
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess)
    return ffi::Error::Internal(std::string("psumbook_gemv CUDA error: ") +
                                cudaGetErrorString(e));
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(PsumbookGemvCuda, PsumbookGemvCudaImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("k_block"),
                              {ffi::Traits::kCmdBufferCompatible});

#endif
