// Psumbook GEMV (CodeGEMM) through the XLA FFI: y = x @ W for batches of 1..16 rows.
//
// Work decomposition (one `Plan`, computed on the host by `MakePlan`):
//   * the K axis is cut into tiles of kTileK = 32 inputs (one scale group holds whole
//     tiles: g % 32 == 0) and the N axis into blocks of BN = 256 * OPT outputs;
//   * CTA (sb, sk, sn) owns batch slice sb (<= 8 rows for f32 entries, 16 for f16/bf16),
//     the K slice sk (`tiles_per_slice` tiles) and the N range sn (`blocks_per_cta` N
//     blocks); the grid is s_b * s_k * s_n >= kCtasPerSm * (SM count) CTAs, the SM count
//     read off the device at run time (132 on an H100 SXM / H200);
//   * each CTA builds the Psumbook of its K slice in shared memory ONCE and every N block
//     of its N range reuses it (when the slice does not fit, the planner gives the CTA one
//     N block and it rebuilds per chunk of `chunk_tiles` tiles: still one build per tile);
//   * codes stream through a kStages-deep ring of shared-memory stages filled with 16-byte
//     `cp.async` copies (one stage = one K tile x one N block, rows x BN bytes), issued
//     kStages-1 steps ahead, so the next tiles' codes are in flight during the lookups;
//   * split-K is fused: each CTA adds its partial sums into the f32 output with (vector)
//     atomicAdd; the output is zeroed by a memset on the same stream first. The order of
//     the additions varies between runs: results agree to float reassociation, not bits.
//
// Cost of the per-CTA build against the code loads (m1v4, B = 1, f32 entries, 4096 x 14336
// on 132 SMs: the planner picks s_k = 19 slices of <= 7 tiles, s_n = 14 ranges of one
// 1024-wide block, 266 CTAs): a CTA builds 7 * 8 * 256 = 14336 entries of v = 4 FMAs =
// 57 K FMAs (~900 clocks at the 64 FP32 lanes per clock of half an SM) and loads
// 7 * 8 * 1024 B = 57 KB of codes (~6200 clocks at its 1/266 share of 4.8 TB/s, ~9 B per
// clock at 1.98 GHz): the build is ~15% of the code-load time, and it overlaps the
// first kStages-1 stages already in flight. In general build/load = 147 * BP * v / NR
// (NR: outputs per CTA), which is why large batches prefer fewer, wider N ranges.
//
// Psumbook layout per CTA: P[tile][jj][c][i][b] (b innermost, padded to BP = 1, 2, 4, 8,
// 16 rows), so one lookup reads the BP batch rows of an entry with 16-byte loads
// (BP * sizeof(entry) >= 16) and a warp's code reads are contiguous.
//
// Built two ways from this one file:
//   nvcc -gencode=arch=compute_90a,code=sm_90a ...  -> `PsumbookGemvCuda`
//   g++ -x c++ -DPSUMBOOK_CPU ...  -> `PsumbookGemvCpu`, the CPU twin: the same phase
//       functions (prologue, copy issue, Psumbook build, lookup step) run CTA by CTA and
//       thread by thread in the device's phase order, with cp.async emulated by memcpy
//       into the same stage ring (an early overwrite of a stage shows as a wrong result),
//       and `PsumbookPlan`, the planner, exported for Python (`ffi.plan`).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "xla/ffi/api/ffi.h"

#ifndef PSUMBOOK_CPU
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

namespace ffi = xla::ffi;

#ifdef PSUMBOOK_CPU
#define HD inline
#else
#define HD __host__ __device__ __forceinline__
#endif

namespace {

constexpr int kThreads = 256;
constexpr int kTileK = 32;     // inputs per K tile (and per Psumbook tile)
constexpr int kCentroids = 256;  // b = 8; the build gives thread i centroid i
constexpr int kMaxBatch = 16;
constexpr int kMaxV = 32;
constexpr int kStages = 3;     // code ring depth: kStages - 1 tiles in flight
constexpr int kCtasPerSm = 2;
constexpr int kDefaultSms = 132;  // H100 SXM / H200; the CUDA path asks the device
// Shared memory per CTA: two CTAs fit in a Hopper SM's 228 KB (1 KB reserved per CTA).
constexpr int kSmemBudget = 112 * 1024;
static_assert(kThreads == kCentroids, "the build maps thread i to centroid i");

enum PsumType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

HD int PsumBytes(int ptype) { return ptype == kF32 ? 4 : 2; }
// Batch rows per CTA: 8 for f32 entries (a 16-row f32 tile, 128 KB, fits no SM twice).
HD int SliceRows(int ptype) { return ptype == kF32 ? 8 : 16; }
// Outputs per thread: at most 32 f32 accumulators (plus as many tile sums) per thread.
HD constexpr int OutPerThread(int bp) { return bp <= 4 ? 4 : 16 / bp; }

struct Dims {
  int B, K, N, m, v, g;
};

struct Plan {
  int bp, opt, bn, rows, chunks;  // padded batch, outputs/thread, N block, code rows/tile
  int kt, nb;                     // K tiles, N blocks
  int s_b, s_k, s_n;              // grid = s_b * s_k * s_n CTAs
  int tiles_per_slice, blocks_per_cta, chunk_tiles;  // K slice, N range, tiles per build
  int stage_bytes, p_bytes, smem_bytes;
  int ptype;
};

HD int CeilDiv(int a, int b) { return (a + b - 1) / b; }
HD int Min(int a, int b) { return a < b ? a : b; }
HD int Max(int a, int b) { return a > b ? a : b; }

// ------------------------------------------------------------------------- the planner

// Chooses the grid (see the header). `k_block` > 0 forces the K slice; `budget` caps the
// shared memory per CTA. Rule: the widest K slice whose Psumbook fits (fewest atomics),
// then enough N ranges to reach kCtasPerSm * num_sms CTAs; if N has too few blocks for
// that, narrower K slices.
std::string MakePlan(const Dims& d, int ptype, int num_sms, int k_block, int budget,
                     Plan* p) {
  if (d.B < 1 || d.B > kMaxBatch) return "batch must be in [1, 16]";
  if (d.v < 1 || d.v > kMaxV || kTileK % d.v) return "v must divide 32";
  if (d.g % kTileK) return "g must be a multiple of 32";
  if (d.N % 16) return "N must be a multiple of 16";
  if (d.K % kTileK) return "K must be a multiple of 32";
  if (ptype < kF32 || ptype > kBF16) return "psum_dtype must be 0 (f32), 1 (f16), 2 (bf16)";
  if (k_block && (k_block < kTileK || k_block % kTileK || d.K % k_block))
    return "k_block must be a multiple of 32 that divides K";
  Plan q;
  q.ptype = ptype;
  const int rows_b = std::min(d.B, SliceRows(ptype));
  q.bp = 1;
  while (q.bp < rows_b) q.bp *= 2;
  q.opt = OutPerThread(q.bp);
  q.bn = kThreads * q.opt;
  q.chunks = kTileK / d.v;
  q.rows = d.m * q.chunks;
  q.kt = d.K / kTileK;
  q.nb = CeilDiv(d.N, q.bn);
  q.s_b = CeilDiv(d.B, SliceRows(ptype));
  q.stage_bytes = q.rows * q.bn;
  const int tile_p = q.rows * kCentroids * q.bp * PsumBytes(ptype);
  const int cap = (budget - kStages * q.stage_bytes) / tile_p;  // Psumbook tiles that fit
  if (cap < 1) return "shared memory budget too small for one Psumbook tile";
  const int target = kCtasPerSm * std::max(num_sms, 1);
  int tiles = k_block ? k_block / kTileK : std::min(cap, q.kt);
  q.s_k = CeilDiv(q.kt, tiles);
  int s_n = std::min(q.nb, CeilDiv(target, q.s_k * q.s_b));
  if (!k_block && q.s_b * q.s_k * s_n < target) {  // too few N blocks: split K further
    q.s_k = std::min(q.kt, CeilDiv(target, s_n * q.s_b));
    tiles = CeilDiv(q.kt, q.s_k);
    q.s_k = CeilDiv(q.kt, tiles);
  }
  q.tiles_per_slice = tiles;
  if (tiles > cap) s_n = q.nb;  // rebuilt per chunk: one N block per CTA, never twice
  q.blocks_per_cta = CeilDiv(q.nb, s_n);
  q.s_n = CeilDiv(q.nb, q.blocks_per_cta);
  q.chunk_tiles = std::min(tiles, cap);
  q.p_bytes = q.chunk_tiles * tile_p;
  q.smem_bytes = kStages * q.stage_bytes + q.p_bytes;
  *p = q;
  return "";
}

// ------------------------------------------------------------------------- primitives

// Psumbook entries: f32, or f16/bf16 (rounded to nearest even); sums are always f32.
#ifdef PSUMBOOK_CPU
template <int PT> struct Entry;
template <> struct Entry<kF32> {
  using T = float;
  static float From(float f) { return f; }
  static float To(float f) { return f; }
};
template <> struct Entry<kF16> {
  using T = uint16_t;
  static T From(float f) {
    _Float16 h = (_Float16)f;  // IEEE round to nearest even, like __float2half_rn
    T t;
    std::memcpy(&t, &h, 2);
    return t;
  }
  static float To(T t) {
    _Float16 h;
    std::memcpy(&h, &t, 2);
    return (float)h;
  }
};
template <> struct Entry<kBF16> {
  using T = uint16_t;
  static T From(float f) {  // round to nearest even, like __float2bfloat16_rn
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (T)((u >> 16) | 0x40);  // quiet NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    return (T)(u >> 16);
  }
  static float To(T t) {
    uint32_t u = (uint32_t)t << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
};
#else
template <int PT> struct Entry;
template <> struct Entry<kF32> {
  using T = float;
  static __device__ __forceinline__ float From(float f) { return f; }
  static __device__ __forceinline__ float To(float f) { return f; }
};
template <> struct Entry<kF16> {
  using T = __half;
  static __device__ __forceinline__ T From(float f) { return __float2half_rn(f); }
  static __device__ __forceinline__ float To(T t) { return __half2float(t); }
};
template <> struct Entry<kBF16> {
  using T = __nv_bfloat16;
  static __device__ __forceinline__ T From(float f) { return __float2bfloat16_rn(f); }
  static __device__ __forceinline__ float To(T t) { return __bfloat162float(t); }
};
#endif

#ifdef PSUMBOOK_CPU
#define DEV inline
#else
#define DEV __device__ __forceinline__
#endif

// Aligned raw words of 16, 8, 4, 2 bytes: one shared-memory access each.
struct alignas(16) Raw16 { uint32_t w[4]; };
struct alignas(8) Raw8 { uint32_t w[2]; };
template <int BYTES> struct RawOf { using T = Raw16; };
template <> struct RawOf<8> { using T = Raw8; };
template <> struct RawOf<4> { using T = uint32_t; };
template <> struct RawOf<2> { using T = uint16_t; };
template <> struct RawOf<1> { using T = uint8_t; };

// One 16-byte code copy global -> shared; `valid` false zero-fills (outputs past N).
DEV void CopyAsync16(uint8_t* dst, const uint8_t* src, bool valid) {
#ifdef PSUMBOOK_CPU
  if (valid) std::memcpy(dst, src, 16);
  else std::memset(dst, 0, 16);
#else
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(src),
               "r"(valid ? 16 : 0));
#endif
}

DEV void CommitGroup() {
#ifndef PSUMBOOK_CPU
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

template <int N>
DEV void WaitGroup() {  // at most N of this thread's newest groups still in flight
#ifndef PSUMBOOK_CPU
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

// ------------------------------------------------------------------------- phases

// What one CTA owns (from blockIdx.x; batch slices of one (K, N) tile are adjacent so
// their code reads meet in L2).
struct Cta {
  int b0, rows_b;          // batch rows [b0, b0 + rows_b)
  int tile_lo, tile_hi;    // K tiles
  int nb_lo, nb_hi;        // N blocks
  int steps;               // (nb_hi - nb_lo) * (tile_hi - tile_lo)
};

HD Cta CtaAt(const Dims& d, const Plan& p, int cta) {
  Cta c;
  const int sb = cta % p.s_b, rest = cta / p.s_b;
  const int sn = rest % p.s_n, sk = rest / p.s_n;
  c.b0 = sb * SliceRows(p.ptype);
  c.rows_b = Min(d.B - c.b0, p.bp);
  c.tile_lo = sk * p.tiles_per_slice;
  c.tile_hi = Min(p.kt, c.tile_lo + p.tiles_per_slice);
  c.nb_lo = sn * p.blocks_per_cta;
  c.nb_hi = Min(p.nb, c.nb_lo + p.blocks_per_cta);
  c.steps = Max(0, c.nb_hi - c.nb_lo) * Max(0, c.tile_hi - c.tile_lo);
  return c;
}

// Step s of a CTA: N block outer, K tile inner (the accumulators of one N block stay in
// registers while the Psumbook, built for the whole slice, serves every block).
HD void StepAt(const Cta& c, int s, int* nb, int* tile) {
  const int nt = c.tile_hi - c.tile_lo;
  *nb = c.nb_lo + s / nt;
  *tile = c.tile_lo + s % nt;
}

// Issues this thread's 16-byte copies of step s's codes into ring slot s % kStages.
// Stage layout: [row r = c * chunks + jj][BN bytes]; chunk q of the stage is copied by
// thread q % kThreads, so a warp copies 512 contiguous bytes of one row.
DEV void IssueCodes(int t, const Dims& d, const Plan& p, const Cta& c, int s,
                    const uint8_t* codes, uint8_t* ring) {
  if (s >= c.steps) return;
  int nb, tile;
  StepAt(c, s, &nb, &tile);
  uint8_t* stage = ring + (s % kStages) * p.stage_bytes;
  const int per_row = p.bn / 16, total = p.rows * per_row;
  const int64_t j_rows = d.K / d.v;
  for (int q = t; q < total; q += kThreads) {
    const int r = q / per_row, col = (q % per_row) * 16;
    const int cb = r / p.chunks, jj = r % p.chunks;
    const int n = nb * p.bn + col;
    const bool valid = n < d.N;  // N % 16 == 0: a 16-byte chunk is all in or all out
    const uint8_t* src =
        valid ? codes + ((int64_t)cb * j_rows + (int64_t)tile * p.chunks + jj) * d.N + n
              : codes;
    CopyAsync16(stage + r * p.bn + col, src, valid);
  }
}

// Builds tiles [t0, t1) of the CTA's Psumbook: thread i computes centroid i of every
// (tile, jj, c) table for the BP rows (rows past the batch are zero).
//   P[((tt * chunks + jj) * m + c) * 256 + i][b] = <x[b0 + b, k0 + jj*v : +v], C_c[i]>
template <int BP, int PT>
DEV void BuildPsumbook(int i, const Dims& d, const Plan& p, const Cta& c, int t0, int t1,
                       const float* x, const float* cb, typename Entry<PT>::T* psum) {
  for (int ci = 0; ci < d.m; ++ci) {
    float cv[kMaxV];
#pragma unroll
    for (int u = 0; u < kMaxV; ++u)
      cv[u] = u < d.v ? cb[((int64_t)ci * kCentroids + i) * d.v + u] : 0.f;
    for (int tile = t0; tile < t1; ++tile) {
      for (int jj = 0; jj < p.chunks; ++jj) {
        const int k0 = tile * kTileK + jj * d.v;
        typename Entry<PT>::T* e =
            psum + ((((int64_t)(tile - t0) * p.chunks + jj) * d.m + ci) * kCentroids + i) * BP;
#pragma unroll
        for (int b = 0; b < BP; ++b) {
          float s = 0.f;
          if (b < c.rows_b) {
            const float* xv = x + (int64_t)(c.b0 + b) * d.K + k0;
#pragma unroll
            for (int u = 0; u < kMaxV; ++u)
              if (u < d.v) s += xv[u] * cv[u];
          }
          e[b] = Entry<PT>::From(s);
        }
      }
    }
  }
}

// BP entries (one batch slice of one centroid) -> f32, in accesses of <= 16 bytes.
template <int BP, int PT>
DEV void LoadEntry(const typename Entry<PT>::T* e, float* out) {
  using T = typename Entry<PT>::T;
  constexpr int kBytes = BP * (int)sizeof(T);
  constexpr int kAccess = kBytes < 16 ? kBytes : 16;
  using R = typename RawOf<kAccess>::T;
  constexpr int kPer = kAccess / (int)sizeof(T);
#pragma unroll
  for (int w = 0; w < kBytes / kAccess; ++w) {
    const R raw = reinterpret_cast<const R*>(e)[w];
    T vals[kPer];
    std::memcpy(vals, &raw, kAccess);
#pragma unroll
    for (int u = 0; u < kPer; ++u) out[w * kPer + u] = Entry<PT>::To(vals[u]);
  }
}

// Per-thread state across steps: the f32 sums of the current N block (registers).
template <int BP>
struct Acc {
  float a[BP][OutPerThread(BP)];
};

// Adds this thread's sums of N block `nb` into y (fused split-K) and clears them.
template <int BP>
DEV void Flush(int t, const Dims& d, const Cta& c, int nb, Acc<BP>* acc, float* y) {
  constexpr int kOpt = OutPerThread(BP);
  const int n = nb * kThreads * kOpt + t * kOpt;
  if (n < d.N) {  // N % 16 == 0 and kOpt | 16: all kOpt outputs are in or all out
#pragma unroll
    for (int b = 0; b < BP; ++b) {
      if (b >= c.rows_b) break;
      float* dst = y + (int64_t)(c.b0 + b) * d.N + n;
#ifdef PSUMBOOK_CPU
      for (int q = 0; q < kOpt; ++q) dst[q] += acc->a[b][q];
#else
      if constexpr (kOpt == 4) {  // sm_90: one 16-byte vector reduction in L2
        atomicAdd(reinterpret_cast<float4*>(dst),
                  make_float4(acc->a[b][0], acc->a[b][1], acc->a[b][2], acc->a[b][3]));
      } else if constexpr (kOpt == 2) {
        atomicAdd(reinterpret_cast<float2*>(dst), make_float2(acc->a[b][0], acc->a[b][1]));
      } else {
        atomicAdd(dst, acc->a[b][0]);
      }
#endif
    }
  }
#pragma unroll
  for (int b = 0; b < BP; ++b)
#pragma unroll
    for (int q = 0; q < kOpt; ++q) acc->a[b][q] = 0.f;
}

// Step s: thread t's kOpt outputs, all rows of the K tile: one code read per row from the
// stage (kOpt bytes), one BP-row Psumbook lookup per code, tile sums times the scale.
template <int BP, int PT>
DEV void LookupStep(int t, const Dims& d, const Plan& p, const Cta& c, int s,
                    const uint8_t* ring, const typename Entry<PT>::T* psum,
                    const float* scales, Acc<BP>* acc, float* y) {
  constexpr int kOpt = OutPerThread(BP);
  using Codes = typename RawOf<kOpt>::T;
  int nb, tile;
  StepAt(c, s, &nb, &tile);
  const int n = nb * p.bn + t * kOpt;
  if (n < d.N) {
    const uint8_t* stage = ring + (s % kStages) * p.stage_bytes;
    const int tt = (tile - c.tile_lo) % p.chunk_tiles;  // tile within the built chunk
    float sum[BP][kOpt];
#pragma unroll
    for (int b = 0; b < BP; ++b)
#pragma unroll
      for (int q = 0; q < kOpt; ++q) sum[b][q] = 0.f;
    for (int r = 0; r < p.rows; ++r) {
      const int ci = r / p.chunks, jj = r % p.chunks;
      const Codes word = *reinterpret_cast<const Codes*>(stage + r * p.bn + t * kOpt);
      uint8_t code[kOpt];
      std::memcpy(code, &word, kOpt);
      const typename Entry<PT>::T* table =
          psum + (((int64_t)tt * p.chunks + jj) * d.m + ci) * kCentroids * BP;
#pragma unroll
      for (int q = 0; q < kOpt; ++q) {
        float e[BP];
        LoadEntry<BP, PT>(table + code[q] * BP, e);
#pragma unroll
        for (int b = 0; b < BP; ++b) sum[b][q] += e[b];
      }
    }
    // kTileK divides g: one scale per output for the whole tile.
    const float* sc = scales + (int64_t)(tile * kTileK / d.g) * d.N + n;
    float scale[kOpt];
#pragma unroll
    for (int q = 0; q < kOpt; ++q) scale[q] = sc[q];
#pragma unroll
    for (int b = 0; b < BP; ++b)
#pragma unroll
      for (int q = 0; q < kOpt; ++q) acc->a[b][q] = fmaf(sum[b][q], scale[q], acc->a[b][q]);
  }
  if (tile + 1 == c.tile_hi) Flush<BP>(t, d, c, nb, acc, y);  // the N block is done
}

// Whether step s starts a Psumbook chunk (then the CTA builds tiles [*t0, *t1)).
HD bool ChunkStarts(const Plan& p, const Cta& c, int s, int* t0, int* t1) {
  int nb, tile;
  StepAt(c, s, &nb, &tile);
  const int rel = tile - c.tile_lo;
  if (rel % p.chunk_tiles) return false;
  // With several N blocks per CTA the slice is one chunk, built on the first step only.
  if (nb != c.nb_lo && p.chunk_tiles >= c.tile_hi - c.tile_lo) return false;
  *t0 = tile;
  *t1 = Min(c.tile_hi, tile + p.chunk_tiles);
  return true;
}

#define PSUMBOOK_DISPATCH(BP, PT, F)                                         \
  switch (PT) {                                                              \
    case kF32:                                                               \
      switch (BP) {                                                          \
        case 1: F(1, kF32); break;                                           \
        case 2: F(2, kF32); break;                                           \
        case 4: F(4, kF32); break;                                           \
        default: F(8, kF32); break;                                          \
      }                                                                      \
      break;                                                                 \
    case kF16:                                                               \
      switch (BP) {                                                          \
        case 1: F(1, kF16); break;                                           \
        case 2: F(2, kF16); break;                                           \
        case 4: F(4, kF16); break;                                           \
        case 8: F(8, kF16); break;                                           \
        default: F(16, kF16); break;                                         \
      }                                                                      \
      break;                                                                 \
    default:                                                                 \
      switch (BP) {                                                          \
        case 1: F(1, kBF16); break;                                          \
        case 2: F(2, kBF16); break;                                          \
        case 4: F(4, kBF16); break;                                          \
        case 8: F(8, kBF16); break;                                          \
        default: F(16, kBF16); break;                                        \
      }                                                                      \
  }

template <typename XB, typename CB, typename CodesB, typename SB, typename RB>
std::string GetDims(const XB& x, const CB& cb, const CodesB& codes, const SB& scales,
                    const RB& y, Dims* d) {
  auto xd = x.dimensions(), cd = cb.dimensions(), kd = codes.dimensions(),
       sd = scales.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || cd.size() != 3 || kd.size() != 3 || sd.size() != 2 || yd.size() != 2)
    return "x, codebooks, codes, scales, y must have ranks 2, 3, 3, 2, 2";
  d->B = xd[0];
  d->K = xd[1];
  d->m = cd[0];
  d->v = cd[2];
  d->N = kd[2];
  if (cd[1] != kCentroids) return "codebooks must have 256 centroids (b = 8)";
  if (d->v < 1 || kd[0] != d->m || (int64_t)kd[1] * d->v != d->K)
    return "codes must be [m, K / v, N]";
  if (sd[1] != d->N || sd[0] < 1 || d->K % sd[0]) return "scales must be [K / g, N]";
  d->g = d->K / sd[0];
  if (yd[0] != d->B || yd[1] != d->N) return "y must be [B, N]";
  return "";
}

}  // namespace

// The planner for Python (`ffi.plan`): fills out[14] with bp, opt, bn, rows, s_b, s_k,
// s_n, tiles_per_slice, blocks_per_cta, chunk_tiles, stage_bytes, p_bytes, smem_bytes,
// grid; returns 0, or -1 with the error in err[0..err_len).
extern "C" int PsumbookPlan(int B, int K, int N, int m, int v, int g, int ptype,
                            int num_sms, int k_block, int budget, int* out, char* err,
                            int err_len) {
  Dims d{B, K, N, m, v, g};
  Plan p;
  std::string e = MakePlan(d, ptype, num_sms ? num_sms : kDefaultSms, k_block,
                           budget ? budget : kSmemBudget, &p);
  if (!e.empty()) {
    std::snprintf(err, err_len, "%s", e.c_str());
    return -1;
  }
  const int vals[14] = {p.bp, p.opt, p.bn, p.rows, p.s_b, p.s_k, p.s_n, p.tiles_per_slice,
                        p.blocks_per_cta, p.chunk_tiles, p.stage_bytes, p.p_bytes,
                        p.smem_bytes, p.s_b * p.s_k * p.s_n};
  std::memcpy(out, vals, sizeof(vals));
  return 0;
}

#ifdef PSUMBOOK_CPU

namespace {

// The CPU twin: each CTA's threads run phase by phase in the order the barriers impose.
template <int BP, int PT>
void RunCpu(const Dims& d, const Plan& p, const float* x, const float* cb,
            const uint8_t* codes, const float* scales, float* y) {
  using T = typename Entry<PT>::T;
  std::fill(y, y + (int64_t)d.B * d.N, 0.f);  // the CUDA path's memset
  std::vector<uint8_t> ring(kStages * p.stage_bytes);
  std::vector<T> psum(p.p_bytes / sizeof(T));
  std::vector<Acc<BP>> acc(kThreads);
  const int grid = p.s_b * p.s_k * p.s_n;
  for (int cta = 0; cta < grid; ++cta) {
    const Cta c = CtaAt(d, p, cta);
    for (auto& a : acc) a = Acc<BP>{};
    for (int s = 0; s < kStages - 1; ++s)  // prologue
      for (int t = 0; t < kThreads; ++t) IssueCodes(t, d, p, c, s, codes, ring.data());
    for (int s = 0; s < c.steps; ++s) {
      // __syncthreads: slot (s - 1) % kStages is consumed; refill it with step s+kStages-1.
      for (int t = 0; t < kThreads; ++t)
        IssueCodes(t, d, p, c, s + kStages - 1, codes, ring.data());
      int t0, t1;
      if (ChunkStarts(p, c, s, &t0, &t1))
        for (int t = 0; t < kThreads; ++t)
          BuildPsumbook<BP, PT>(t, d, p, c, t0, t1, x, cb, psum.data());
      // __syncthreads: stage s and the Psumbook are visible.
      for (int t = 0; t < kThreads; ++t)
        LookupStep<BP, PT>(t, d, p, c, s, ring.data(), psum.data(), scales, &acc[t], y);
    }
  }
}

}  // namespace

static ffi::Error PsumbookGemvCpuImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> cb,
                                      ffi::Buffer<ffi::U8> codes,
                                      ffi::Buffer<ffi::F32> scales,
                                      ffi::ResultBuffer<ffi::F32> y, int64_t k_block,
                                      int64_t psum_dtype, int64_t num_sms,
                                      int64_t smem_budget) {
  Dims d;
  std::string err = GetDims(x, cb, codes, scales, y, &d);
  Plan p;
  if (err.empty())
    err = MakePlan(d, (int)psum_dtype, num_sms ? (int)num_sms : kDefaultSms, (int)k_block,
                   smem_budget ? (int)smem_budget : kSmemBudget, &p);
  if (!err.empty()) return ffi::Error::InvalidArgument("psumbook_gemv: " + err);
#define RUN_CPU(BP, PT)                                                            \
  RunCpu<BP, PT>(d, p, x.typed_data(), cb.typed_data(), codes.typed_data(),        \
                 scales.typed_data(), y->typed_data())
  PSUMBOOK_DISPATCH(p.bp, p.ptype, RUN_CPU)
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
                                  .Attr<int64_t>("k_block")
                                  .Attr<int64_t>("psum_dtype")
                                  .Attr<int64_t>("num_sms")
                                  .Attr<int64_t>("smem_budget"));

#else  // CUDA

template <int BP, int PT>
__global__ void __launch_bounds__(kThreads, kCtasPerSm)
    PsumbookGemvKernel(Dims d, Plan p, const float* __restrict__ x,
                       const float* __restrict__ cb, const uint8_t* __restrict__ codes,
                       const float* __restrict__ scales, float* __restrict__ y) {
  using T = typename Entry<PT>::T;
  extern __shared__ __align__(16) uint8_t smem[];
  uint8_t* ring = smem;
  T* psum = reinterpret_cast<T*>(smem + kStages * p.stage_bytes);
  const int t = threadIdx.x;
  const Cta c = CtaAt(d, p, blockIdx.x);
  Acc<BP> acc = {};
  // Prologue: the first kStages - 1 stages are in flight while the Psumbook is built.
  for (int s = 0; s < kStages - 1; ++s) {
    IssueCodes(t, d, p, c, s, codes, ring);
    CommitGroup();
  }
  for (int s = 0; s < c.steps; ++s) {
    __syncthreads();  // slot (s - 1) % kStages and the old Psumbook are no longer read
    IssueCodes(t, d, p, c, s + kStages - 1, codes, ring);
    CommitGroup();  // possibly empty: keeps one group per step for the wait below
    WaitGroup<kStages - 1>();  // this thread's copies of step s have landed
    int t0, t1;
    if (ChunkStarts(p, c, s, &t0, &t1)) BuildPsumbook<BP, PT>(t, d, p, c, t0, t1, x, cb, psum);
    __syncthreads();  // every thread's copies of step s and the Psumbook are visible
    LookupStep<BP, PT>(t, d, p, c, s, ring, psum, scales, &acc, y);
  }
}

static ffi::Error PsumbookGemvCudaImpl(cudaStream_t stream, ffi::Buffer<ffi::F32> x,
                                       ffi::Buffer<ffi::F32> cb, ffi::Buffer<ffi::U8> codes,
                                       ffi::Buffer<ffi::F32> scales,
                                       ffi::ResultBuffer<ffi::F32> y, int64_t k_block,
                                       int64_t psum_dtype, int64_t num_sms,
                                       int64_t smem_budget) {
  Dims d;
  std::string err = GetDims(x, cb, codes, scales, y, &d);
  int sms = (int)num_sms;
  if (err.empty() && !sms) {
    int dev = 0;
    cudaGetDevice(&dev);
    if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess)
      sms = kDefaultSms;
  }
  Plan p;
  if (err.empty())
    err = MakePlan(d, (int)psum_dtype, sms, (int)k_block,
                   smem_budget ? (int)smem_budget : kSmemBudget, &p);
  if (!err.empty()) return ffi::Error::InvalidArgument("psumbook_gemv: " + err);
  // Split-K adds into y: zero it on the stream first (no extra XLA pass).
  cudaMemsetAsync(y->typed_data(), 0, sizeof(float) * (size_t)d.B * d.N, stream);
  const int grid = p.s_b * p.s_k * p.s_n;
#define LAUNCH(BP, PT)                                                                   \
  do {                                                                                   \
    cudaFuncSetAttribute(PsumbookGemvKernel<BP, PT>,                                     \
                         cudaFuncAttributeMaxDynamicSharedMemorySize, p.smem_bytes);     \
    PsumbookGemvKernel<BP, PT><<<grid, kThreads, p.smem_bytes, stream>>>(                \
        d, p, x.typed_data(), cb.typed_data(), codes.typed_data(), scales.typed_data(),  \
        y->typed_data());                                                                \
  } while (0)
  PSUMBOOK_DISPATCH(p.bp, p.ptype, LAUNCH)
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
                                  .Attr<int64_t>("k_block")
                                  .Attr<int64_t>("psum_dtype")
                                  .Attr<int64_t>("num_sms")
                                  .Attr<int64_t>("smem_budget"),
                              {ffi::Traits::kCmdBufferCompatible});

#endif
