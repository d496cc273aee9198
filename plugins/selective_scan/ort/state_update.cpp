// The fused decode-state update (state_update.h). Three passes over a call's tokens, each split into
// independent tasks: (A) per block of channels, the conv-state shift, the depthwise conv, SiLU and the
// x quant point; (B) per token, x_proj (a dot over all channels) with the dt/B/C quant points; (C) per
// block of channels, dt_proj and then the scan itself from the ssm state. At decode sizes pass B splits
// each token's outputs instead (pass_xproj_part), so that one token still gives every thread work. Only
// tiny calls (b * L * Di * N below kSerialBelow) run on the calling thread: at the 130m shape one token is
// ~0.1 ms of work per layer, far more than the thread-pool handoff (measured: bench/ort_custom_op.py).
#include "state_update.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <mutex>
#include <new>
#include <vector>

#if defined(__unix__) || defined(__APPLE__)
#include <unistd.h>
#endif
#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "mq_selective_scan.h"
#include "scan_float.h"
#include "state_codec.h"

namespace mq_scan {
namespace {

constexpr int64_t kBlock = 64;              // channels per task of passes A and C
constexpr int64_t kTokensPerTask = 16;      // tokens per task of pass B
constexpr int64_t kSerialBelow = int64_t{1} << 13;  // b * L * Di * N: below this one thread is faster
constexpr int64_t kOutParts = 4;             // pass B at decode sizes: tasks per token row
constexpr int64_t kSplitRows = 2 * kTokensPerTask;   // up to this many token rows pass B splits outputs
constexpr int kMaxConv = 16;                // d_conv limit (Mamba uses 4)

constexpr int64_t kDecodeMaxL = 8;           // up to this many tokens pass C scans channel by channel

/* ONNX QuantizeLinear to int8 with zero point 0: round half to even of v / scale, saturated (branch-free,
 * so that the loops over a block vectorise) */
inline int8_t quantize(float v, float scale) {
  const float r = std::nearbyint(v / scale);
  return static_cast<int8_t>(r < -128.f ? -128.f : (r > 127.f ? 127.f : r));
}

inline float silu(float v) { return v * sigmoid(v); }

// Dot products: `omp simd` (-fopenmp-simd, no OpenMP runtime) lets the float one reassociate its sum into
// vector lanes; without it GCC keeps the sequential order and the loop scalar.
inline float dot(const float *__restrict a, const float *__restrict b, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

/* The int8 dot, exact in int32 (|a_i b_i| <= 2^14). With AVX2: 16 codes widened to int16 and multiplied and
 * pair-summed into int32 by one vpmaddwd (the auto-vectorised loop multiplies in int16 and widens the products
 * separately, about twice the instructions); the reference loop is dot_ref, and both give the same integer. */
inline int32_t dot_ref(const int8_t *__restrict a, const int8_t *__restrict b, int64_t n) {
  int32_t s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += static_cast<int32_t>(a[i]) * static_cast<int32_t>(b[i]);
  return s;
}

inline int32_t dot(const int8_t *__restrict a, const int8_t *__restrict b, int64_t n) {
#if defined(__AVX2__)
  __m256i acc0 = _mm256_setzero_si256(), acc1 = _mm256_setzero_si256();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    const __m256i a0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i *>(a + i)));
    const __m256i b0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i *>(b + i)));
    const __m256i a1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i *>(a + i + 16)));
    const __m256i b1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i *>(b + i + 16)));
    acc0 = _mm256_add_epi32(acc0, _mm256_madd_epi16(a0, b0));
    acc1 = _mm256_add_epi32(acc1, _mm256_madd_epi16(a1, b1));
  }
  const __m256i acc = _mm256_add_epi32(acc0, acc1);
  __m128i v = _mm_add_epi32(_mm256_castsi256_si128(acc), _mm256_extracti128_si256(acc, 1));
  v = _mm_add_epi32(v, _mm_shuffle_epi32(v, 0x4e));
  v = _mm_add_epi32(v, _mm_shuffle_epi32(v, 0xb1));
  return _mm_cvtsi128_si32(v) + dot_ref(a + i, b + i, n - i);
#else
  return dot_ref(a, b, n);
#endif
}

struct Work {
  const StateUpdateParams *p;
  int64_t blocks, chunks, n_out;
  // int8 op scratch
  std::vector<int8_t> u_q, delta_q, B_q, C_q, dtl_q;
  // float op scratch
  std::vector<float> u_f, delta_f, B_f, C_f, dtl_f;
  std::vector<float> proj;   // pass B: one x_proj output row (n_out values) per task, or per token row (split)
  std::vector<int> failed;   // per task of pass C (the scan reports through mq_scan_last_error)
  std::mutex mu;
  std::string message;
};

// ---- pass A: conv-state shift, depthwise conv, SiLU, x quant point ------------------------------

/* KT: d_conv as a compile-time constant (4, every Mamba checkpoint), or 0 */
template <int64_t KT>
void pass_conv_k(Work &w, size_t task) noexcept {
  const StateUpdateParams &p = *w.p;
  const int64_t bi = static_cast<int64_t>(task) / w.blocks;
  const int64_t d0 = (static_cast<int64_t>(task) % w.blocks) * kBlock;
  const int64_t nd = std::min(kBlock, p.dim - d0);
  const int64_t K = KT > 0 ? KT : p.dconv, Di = p.dim, L = p.seqlen;
  // win[k][j]: the last K-1 conv inputs of channel d0 + j, oldest first (lanes >= nd stay 0)
  constexpr int64_t kRows = KT > 0 ? KT : kMaxConv;   // (zeroed on every call: no larger than needed)
  alignas(64) float win[kRows][kBlock] = {};
  alignas(64) float wk[kRows][kBlock] = {};
  alignas(64) float bias[kBlock] = {}, cur[kBlock] = {};
  const float *__restrict cw = p.conv_w + d0 * K;
  const float *__restrict cst = p.conv_state + (bi * Di + d0) * (K - 1);
  for (int64_t j = 0; j < nd; ++j) {      // [channel][tap] in memory -> [tap][channel] here
    for (int64_t k = 0; k < K; ++k) wk[k][j] = cw[j * K + k];
    for (int64_t k = 0; k + 1 < K; ++k) win[k][j] = cst[j * (K - 1) + k];
    bias[j] = p.conv_b[d0 + j];
  }
  const size_t nf = sizeof(float) * static_cast<size_t>(nd);
  alignas(64) float acc[kBlock];
  alignas(64) int8_t uq[kBlock];
  const float cs = p.conv_scale, xs = p.x_scale;
  for (int64_t t = 0; t < L; ++t) {
    const int64_t o = (bi * L + t) * Di + d0;
    std::memcpy(cur, p.x + o, nf);   // lanes >= nd keep 0 (set above) or an earlier row's value: never stored
    if (!p.is_float)
      for (int64_t j = 0; j < kBlock; ++j) cur[j] = static_cast<float>(quantize(cur[j], cs)) * cs;
    for (int64_t j = 0; j < kBlock; ++j) acc[j] = bias[j];
    for (int64_t k = 0; k + 1 < K; ++k)
      for (int64_t j = 0; j < kBlock; ++j) acc[j] += wk[k][j] * win[k][j];
    for (int64_t j = 0; j < kBlock; ++j) acc[j] = silu(acc[j] + wk[K - 1][j] * cur[j]);
    for (int64_t k = 0; k + 2 < K; ++k)
      for (int64_t j = 0; j < kBlock; ++j) win[k][j] = win[k + 1][j];
    if (K > 1)
      for (int64_t j = 0; j < kBlock; ++j) win[K - 2][j] = cur[j];
    if (p.is_float) {
      std::memcpy(w.u_f.data() + o, acc, nf);
    } else {
      for (int64_t j = 0; j < kBlock; ++j) uq[j] = quantize(acc[j], xs);
      std::memcpy(w.u_q.data() + o, uq, static_cast<size_t>(nd));
    }
  }
  float *__restrict cso = p.conv_state_out + (bi * Di + d0) * (K - 1);
  for (int64_t j = 0; j < nd; ++j)
    for (int64_t k = 0; k + 1 < K; ++k) cso[j * (K - 1) + k] = win[k][j];
}

void pass_conv(void *user, size_t task) noexcept {
  Work &w = *static_cast<Work *>(user);
  if (w.p->dconv == 4)
    pass_conv_k<4>(w, task);
  else
    pass_conv_k<0>(w, task);
}

// ---- pass B: x_proj, FalconMamba's norms, the dt_low / B / C quant points -------------------------

void rms_normalize(float *v, int64_t n, float eps) noexcept {
  float ss = 0.f;
  for (int64_t i = 0; i < n; ++i) ss += v[i] * v[i];
  const float inv = 1.f / std::sqrt(ss / static_cast<float>(n) + eps);
  for (int64_t i = 0; i < n; ++i) v[i] *= inv;
}

/* x_proj outputs [o0, o1) of token row `row` into v[o0, o1) */
void xproj_dots(const Work &w, int64_t row, int64_t o0, int64_t o1, float *v) noexcept {
  const StateUpdateParams &p = *w.p;
  const int64_t Di = p.dim;
  if (p.is_float) {
    const float *u = w.u_f.data() + row * Di;
    for (int64_t o = o0; o < o1; ++o) v[o] = dot(u, p.xw_f + o * Di, Di);
  } else {
    const int8_t *u = w.u_q.data() + row * Di;
    for (int64_t o = o0; o < o1; ++o) v[o] = static_cast<float>(dot(u, p.xw_q + o * Di, Di)) * (p.x_scale * p.xw_scale[o]);
  }
}

/* token row `row`'s x_proj outputs v[0, n_out): FalconMamba's norms, then dt_low / B / C stored (quantized) */
void xproj_finish(Work &w, int64_t row, float *v) noexcept {
  const StateUpdateParams &p = *w.p;
  const int64_t R = p.dt_rank, N = p.dstate;
  float *dtl = v, *Bv = v + R, *Cv = v + R + N;
  if (p.norm_eps >= 0.f) {
    rms_normalize(dtl, R, p.norm_eps);
    rms_normalize(Bv, N, p.norm_eps);
    rms_normalize(Cv, N, p.norm_eps);
  }
  if (p.is_float) {
    std::memcpy(w.dtl_f.data() + row * R, dtl, sizeof(float) * static_cast<size_t>(R));
    std::memcpy(w.B_f.data() + row * N, Bv, sizeof(float) * static_cast<size_t>(N));
    std::memcpy(w.C_f.data() + row * N, Cv, sizeof(float) * static_cast<size_t>(N));
  } else {
    for (int64_t r = 0; r < R; ++r) w.dtl_q[row * R + r] = quantize(dtl[r], p.dt_low_scale);
    for (int64_t n = 0; n < N; ++n) {
      w.B_q[row * N + n] = quantize(Bv[n], p.B_scale);
      w.C_q[row * N + n] = quantize(Cv[n], p.C_scale);
    }
  }
}

/* many tokens: one task per kTokensPerTask tokens of a sequence, each with its own output row */
void pass_xproj(void *user, size_t task) noexcept {
  Work &w = *static_cast<Work *>(user);
  const StateUpdateParams &p = *w.p;
  const int64_t bi = static_cast<int64_t>(task) / w.chunks;
  const int64_t t0 = (static_cast<int64_t>(task) % w.chunks) * kTokensPerTask;
  const int64_t t1 = std::min(p.seqlen, t0 + kTokensPerTask);
  float *v = w.proj.data() + static_cast<size_t>(task) * static_cast<size_t>(w.n_out);   // this task's row
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t row = bi * p.seqlen + t;
    xproj_dots(w, row, 0, w.n_out, v);
    xproj_finish(w, row, v);
  }
}

/* decode sizes (a few token rows): the outputs of each row split into kOutParts tasks, so that both threads
 * share the dots (w.proj holds every row's outputs); then pass_xproj_rows finishes each row */
void pass_xproj_part(void *user, size_t task) noexcept {
  Work &w = *static_cast<Work *>(user);
  const int64_t row = static_cast<int64_t>(task) / kOutParts, part = static_cast<int64_t>(task) % kOutParts;
  const int64_t per = (w.n_out + kOutParts - 1) / kOutParts;
  const int64_t o0 = std::min(w.n_out, part * per), o1 = std::min(w.n_out, o0 + per);
  xproj_dots(w, row, o0, o1, w.proj.data() + row * w.n_out);
}

void pass_xproj_rows(void *user, size_t row) noexcept {
  Work &w = *static_cast<Work *>(user);
  xproj_finish(w, static_cast<int64_t>(row), w.proj.data() + static_cast<int64_t>(row) * w.n_out);
}

// ---- pass C: dt_proj and the scan of a block of channels ----------------------------------------

/* iacc[j] = sum_r dl[r] * W[r, j] for the nd (<= kBlock) channels of a block, W rows `stride` apart (dt_proj_w is
 * [R, Di]): R outer-product rows, exact int32 sums. dt_proj_block_ref is the plain loop; the AVX2 path takes
 * two rows at a time, their codes interleaved as int16 pairs, so that one vpmaddwd multiplies both rows and
 * adds them (its lanes come out in unpack order and are put back in channel order when stored). */
void dt_proj_block_ref(const int8_t *dl, const int8_t *W, int64_t R, int64_t stride, int64_t nd,
                       int32_t *iacc) noexcept {
  for (int64_t j = 0; j < nd; ++j) iacc[j] = 0;
  for (int64_t r = 0; r < R; ++r) {
    const int32_t a = dl[r];
    const int8_t *__restrict wr = W + r * stride;
    for (int64_t j = 0; j < nd; ++j) iacc[j] += a * static_cast<int32_t>(wr[j]);
  }
}

void dt_proj_block(const int8_t *dl, const int8_t *W, int64_t R, int64_t stride, int64_t nd, int32_t *iacc) noexcept {
#if defined(__AVX2__)
  static_assert(kBlock == 64, "the AVX2 dt_proj keeps 64 channels in 8 accumulators");
  if (nd == kBlock) {
    __m256i lo[4], hi[4];
    for (int g = 0; g < 4; ++g) lo[g] = hi[g] = _mm256_setzero_si256();
    for (int64_t r = 0; r < R; r += 2) {
      const bool pair = r + 1 < R;
      const int32_t a0 = dl[r], a1 = pair ? dl[r + 1] : 0;
      const __m256i coef = _mm256_set1_epi32(static_cast<int32_t>((static_cast<uint32_t>(a1) << 16) |
                                                                  (static_cast<uint32_t>(a0) & 0xffffu)));
      const int8_t *w0 = W + r * stride, *w1 = pair ? w0 + stride : w0;   // (a1 = 0 when unpaired)
      for (int g = 0; g < 4; ++g) {
        const __m256i x0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i *>(w0 + 16 * g)));
        const __m256i x1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i *>(w1 + 16 * g)));
        lo[g] = _mm256_add_epi32(lo[g], _mm256_madd_epi16(_mm256_unpacklo_epi16(x0, x1), coef));
        hi[g] = _mm256_add_epi32(hi[g], _mm256_madd_epi16(_mm256_unpackhi_epi16(x0, x1), coef));
      }
    }
    for (int g = 0; g < 4; ++g) {   // lo: channels 0-3 and 8-11 of the group, hi: 4-7 and 12-15
      _mm256_storeu_si256(reinterpret_cast<__m256i *>(iacc + 16 * g), _mm256_permute2x128_si256(lo[g], hi[g], 0x20));
      _mm256_storeu_si256(reinterpret_cast<__m256i *>(iacc + 16 * g + 8), _mm256_permute2x128_si256(lo[g], hi[g], 0x31));
    }
    return;
  }
#endif
  dt_proj_block_ref(dl, W, R, stride, nd, iacc);
}

/* The scan of a few tokens with each channel's state row h[0..N) contiguous (the layout of ssm_state): the
 * library's block kernel transposes every state in and out, which dominates at L = 1. Sub-blocks of kSub
 * channels: the per-channel scalars (dt, x, gate) vectorise across channels, the state update across n.
 * NT: N as a compile-time constant (16, every Mamba1 checkpoint: one vector per state row), or 0. */
constexpr int64_t kSub = 16;

/* C . h summed as a halving tree (vectorises; differs from a sequential sum by float rounding only). With GCC or
 * Clang the d_state 16 case sums eight channels at once instead (rows8_sum). */
inline float tree_sum(float *v, int64_t n) noexcept {
  for (; n > 1 && n % 2 == 0; n /= 2)
    for (int64_t k = 0; k < n / 2; ++k) v[k] += v[k + n / 2];
  float sum = 0.f;
  for (int64_t k = 0; k < n; ++k) sum += v[k];
  return sum;
}

#if defined(__GNUC__)
/* The row sums of part[8][8] into out[8] in registers: three rounds of adding adjacent pairs of two rows
 * (a transpose folded into the adds), instead of eight horizontal sums through memory. */
inline void rows8_sum(const float (&part)[8][8], float *out) noexcept {
  typedef float v8 __attribute__((vector_size(32)));
  v8 r[8];
  std::memcpy(r, part, sizeof r);
  auto pairs = [](v8 a, v8 b) {
    return __builtin_shufflevector(a, b, 0, 2, 4, 6, 8, 10, 12, 14) +
           __builtin_shufflevector(a, b, 1, 3, 5, 7, 9, 11, 13, 15);
  };
  const v8 q0 = pairs(r[0], r[1]), q1 = pairs(r[2], r[3]), q2 = pairs(r[4], r[5]), q3 = pairs(r[6], r[7]);
  const v8 s = pairs(pairs(q0, q1), pairs(q2, q3));
  std::memcpy(out, &s, sizeof s);
}
#endif

template <int64_t NT>
void scan_channels_n(Work &w, int64_t bi, int64_t d0, int64_t nd) noexcept {
  const StateUpdateParams &p = *w.p;
  const int64_t Di = p.dim, N = NT > 0 ? NT : p.dstate, L = p.seqlen;
  constexpr int64_t kRow = NT > 0 ? NT : MQ_SCAN_MAX_DSTATE;
  alignas(64) float Bd[kDecodeMaxL][kRow], Cd[kDecodeMaxL][kRow];
  for (int64_t t = 0; t < L; ++t) {
    const int64_t row = bi * L + t;
    for (int64_t n = 0; n < N; ++n) {
      Bd[t][n] = p.is_float ? w.B_f[row * N + n] : dequant(w.B_q[row * N + n], p.B_scale);
      Cd[t][n] = p.is_float ? w.C_f[row * N + n] : dequant(w.C_q[row * N + n], p.C_scale);
    }
  }
  alignas(64) float h[kSub][kRow], a2[kSub][kRow];
  alignas(64) float xv[kSub], dt[kSub], dtx[kSub], g[kSub], acc[kSub] = {}, out[kSub];
  alignas(64) float bias[kSub], Dv[kSub], gs[kSub], raw_x[kSub], raw_d[kSub], raw_z[kSub];
  const float xs = p.is_float ? 1.f : p.x_scale, ds = p.is_float ? 1.f : p.delta_scale;
  const float zs = p.is_float ? 1.f : p.z_scale;
  for (int64_t s0 = d0; s0 < d0 + nd; s0 += kSub) {
    const int64_t ns = std::min(kSub, d0 + nd - s0);
    for (int64_t j = 0; j < kSub; ++j) {
      const bool live = j < ns;
      bias[j] = live ? p.delta_bias[s0 + j] : 0.f;
      Dv[j] = live ? p.D[s0 + j] : 0.f;
      gs[j] = live ? p.gate_scale[s0 + j] : 1.f;
      raw_x[j] = raw_d[j] = raw_z[j] = 0.f;
    }
    if (ns < kSub) {   // lanes past the block's end scan zeros (x = 0, so dt * x = 0: h stays 0), never stored
      std::memset(h, 0, sizeof h);
      std::memset(a2, 0, sizeof a2);
    }
    for (int64_t j = 0; j < ns; ++j) {
      const float *__restrict h0 = p.ssm_state + (bi * Di + s0 + j) * N, *__restrict A = p.A + (s0 + j) * N;
      for (int64_t n = 0; n < N; ++n) {
        h[j][n] = h0[n];
        a2[j][n] = A[n] * kLog2e;
      }
    }
    for (int64_t t = 0; t < L; ++t) {
      const int64_t o = (bi * L + t) * Di + s0;
      if (p.is_float) {
        for (int64_t j = 0; j < ns; ++j) raw_x[j] = w.u_f[o + j], raw_d[j] = w.delta_f[o + j], raw_z[j] = p.z_f[o + j];
      } else {
        for (int64_t j = 0; j < ns; ++j) raw_x[j] = w.u_q[o + j], raw_d[j] = w.delta_q[o + j], raw_z[j] = p.z_q[o + j];
      }
      for (int64_t j = 0; j < kSub; ++j) {   // as scan_block: dequant, discretize, dt * x, gate
        xv[j] = raw_x[j] * xs;
        dt[j] = discretize(raw_d[j] * ds, bias[j]);
        dtx[j] = dt[j] * xv[j];
        g[j] = gate(raw_z[j] * zs, gs[j]);
      }
      const float *__restrict Bt = Bd[t], *__restrict Ct = Cd[t];
#if defined(__GNUC__)
      if constexpr (NT == 16) {   // 8 channels at a time, their C . h reduced together (rows8_sum)
        for (int64_t j0 = 0; j0 < kSub; j0 += 8) {
          alignas(32) float part[8][8];
          for (int64_t jj = 0; jj < 8; ++jj) {
            float *__restrict hj = h[j0 + jj];
            const float *__restrict aj = a2[j0 + jj];
            const float dtj = dt[j0 + jj], dtxj = dtx[j0 + jj];
            float *__restrict pj = part[jj];
            for (int64_t n = 0; n < 8; ++n) {
              const float lo = state_update(hj[n], dtj, aj[n], dtxj, Bt[n]);
              const float hi = state_update(hj[n + 8], dtj, aj[n + 8], dtxj, Bt[n + 8]);
              hj[n] = lo;
              hj[n + 8] = hi;
              pj[n] = lo * Ct[n] + hi * Ct[n + 8];
            }
          }
          rows8_sum(part, acc + j0);
        }
      } else
#endif
      for (int64_t j = 0; j < ns; ++j) {
        float *__restrict hj = h[j];
        const float *__restrict aj = a2[j];
        const float dtj = dt[j], dtxj = dtx[j];
        alignas(64) float prod[kRow];
        for (int64_t n = 0; n < N; ++n) {
          const float hn = state_update(hj[n], dtj, aj[n], dtxj, Bt[n]);
          hj[n] = hn;
          prod[n] = hn * Ct[n];
        }
        acc[j] = tree_sum(prod, N);
      }
      for (int64_t j = 0; j < kSub; ++j) out[j] = finish(acc[j], xv[j], Dv[j], g[j]);
      for (int64_t j = 0; j < ns; ++j) p.y[o + j] = out[j];
    }
    for (int64_t j = 0; j < ns; ++j) {
      float *__restrict ho = p.ssm_state_out + (bi * Di + s0 + j) * N;
      for (int64_t n = 0; n < N; ++n) ho[n] = h[j][n];
    }
  }
}

void scan_channels(Work &w, int64_t bi, int64_t d0, int64_t nd) noexcept {
  if (w.p->dstate == 16)
    scan_channels_n<16>(w, bi, d0, nd);
  else
    scan_channels_n<0>(w, bi, d0, nd);
}

void pass_scan_block(Work &w, size_t task) noexcept;

/* pass C's task, with an int8 SSM state's rows decoded before it and encoded after it (Int8States) */
void pass_scan(void *user, size_t task) noexcept {
  Work &w = *static_cast<Work *>(user);
  const StateUpdateParams &p = *w.p;
  const int64_t d0 = (static_cast<int64_t>(task) % w.blocks) * kBlock, nd = std::min(kBlock, p.dim - d0);
  const int64_t row0 = (static_cast<int64_t>(task) / w.blocks) * p.dim + d0;
  if (p.int8_ssm != nullptr) p.int8_ssm->rows_in(row0, nd);
  pass_scan_block(w, task);
  if (p.int8_ssm != nullptr) p.int8_ssm->rows_out(row0, nd);
}

void pass_scan_block(Work &w, size_t task) noexcept {
  const StateUpdateParams &p = *w.p;
  const int64_t bi = static_cast<int64_t>(task) / w.blocks;
  const int64_t d0 = (static_cast<int64_t>(task) % w.blocks) * kBlock;
  const int64_t nd = std::min(kBlock, p.dim - d0);
  const int64_t Di = p.dim, R = p.dt_rank, N = p.dstate, L = p.seqlen;
  // dt_proj as R outer-product rows over the block's channels (dt_proj_w is [R, Di]): long, contiguous
  // inner loops, exact int32 sums
  alignas(64) int32_t iacc[kBlock];
  alignas(64) float facc[kBlock];
  alignas(64) int8_t dq[kBlock];
  for (int64_t t = 0; t < L; ++t) {
    const int64_t row = bi * L + t;
    if (p.is_float) {
      const float *dl = w.dtl_f.data() + row * R;
      for (int64_t j = 0; j < kBlock; ++j) facc[j] = 0.f;
      for (int64_t r = 0; r < R; ++r) {
        const float a = dl[r], *__restrict wr = p.dtw_f + r * Di + d0;
        for (int64_t j = 0; j < nd; ++j) facc[j] += a * wr[j];
      }
      std::memcpy(w.delta_f.data() + row * Di + d0, facc, sizeof(float) * static_cast<size_t>(nd));
    } else {
      dt_proj_block(w.dtl_q.data() + row * R, p.dtw_q + d0, R, Di, nd, iacc);
      const float s = p.dt_low_scale;
      for (int64_t j = 0; j < nd; ++j) dq[j] = quantize(static_cast<float>(iacc[j]) * (s * p.dtw_scale[d0 + j]), p.delta_scale);
      std::memcpy(w.delta_q.data() + row * Di + d0, dq, static_cast<size_t>(nd));
    }
  }
  if (L <= kDecodeMaxL) {
    scan_channels(w, bi, d0, nd);
    return;
  }
  if (p.is_float) {
    FloatScanParams s;
    s.batch = p.batch, s.seqlen = L, s.dim = Di, s.dstate = N;
    s.x = w.u_f.data(), s.delta = w.delta_f.data(), s.B = w.B_f.data(), s.C = w.C_f.data(), s.z = p.z_f;
    s.A = p.A, s.D = p.D, s.delta_bias = p.delta_bias, s.gate_scale = p.gate_scale;
    s.h0 = p.ssm_state, s.y = p.y, s.h_last = p.ssm_state_out;
    scan_float_slice(s, bi, d0, nd);
    return;
  }
  MQScanParams s;
  std::memset(&s, 0, sizeof s);
  s.batch = 1, s.seqlen = L, s.dim = nd, s.dstate = N;
  s.x_batch_stride = L * Di, s.x_l_stride = Di, s.bc_batch_stride = L * N, s.bc_l_stride = N;
  s.y_batch_stride = L * Di, s.y_l_stride = Di;
  const int64_t xo = bi * L * Di + d0, bco = bi * L * N, so = (bi * Di + d0) * N;
  s.x = w.u_q.data() + xo, s.delta = w.delta_q.data() + xo, s.z = p.z_q + xo;
  s.B = w.B_q.data() + bco, s.C = w.C_q.data() + bco;
  s.x_scale = p.x_scale, s.delta_scale = p.delta_scale, s.B_scale = p.B_scale, s.C_scale = p.C_scale;
  s.z_scale = p.z_scale;
  s.A = p.A + d0 * N, s.D = p.D + d0, s.delta_bias = p.delta_bias + d0, s.gate_scale = p.gate_scale + d0;
  s.h0 = p.ssm_state + so, s.h_last = p.ssm_state_out + so;
  s.y = p.y + xo;
  if (mq_scan_cpu(&s, 1) != MQ_SCAN_OK) {
    w.failed[task] = 1;
    try {
      std::lock_guard<std::mutex> lock(w.mu);
      if (w.message.empty()) w.message = mq_scan_last_error();   // thread-local in the worker: copied here
    } catch (...) {   // the text could not be copied: state_update reports "the scan failed"
    }
  }
}

}  // namespace

// ---- helpers shared with ssd_update.cpp (declared in state_update.h) -----------------------------

void serial_for(void *, TaskFn fn, size_t n, void *user) noexcept {
  for (size_t i = 0; i < n; ++i) fn(user, i);
}

/* a * b, false when it overflows (sizes come from tensors: their product need not fit) */
bool mul(size_t a, size_t b, size_t *out) {
  if (a != 0 && b > SIZE_MAX / a) return false;
  *out = a * b;
  return true;
}

/* The machine's physical memory in bytes (0: unknown). A scratch larger than it can never be had; on a
 * system that overcommits, asking anyway would be granted and then fail page by page in the OOM killer. */
static size_t read_physical_memory() {
#if defined(_SC_PHYS_PAGES) && defined(_SC_PAGE_SIZE)
  const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGE_SIZE);
  size_t bytes = 0;
  if (pages > 0 && page > 0 && mul(static_cast<size_t>(pages), static_cast<size_t>(page), &bytes)) return bytes;
#endif
  return 0;
}

size_t physical_memory() {
  static const size_t bytes = read_physical_memory();   // (a system call: read once, not at every step)
  return bytes;
}

std::string gib(double bytes) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.1f GiB", bytes / 1073741824.0);
  return buf;
}

int state_update(const StateUpdateParams &p, ParallelFor parallel_for, void *pool, std::string *error) {
  if (p.dconv < 1 || p.dconv > kMaxConv) {
    *error = "d_conv must be in [1, " + std::to_string(kMaxConv) + "], got " + std::to_string(p.dconv);
    return kStateUpdateInvalid;
  }
  if (p.dstate < 1 || p.dstate > MQ_SCAN_MAX_DSTATE || p.dt_rank < 1 || p.dim < 1) {
    *error = "need Di >= 1, dt_rank >= 1 and 1 <= d_state <= " + std::to_string(MQ_SCAN_MAX_DSTATE);
    return kStateUpdateInvalid;
  }
  const int64_t b = p.batch, L = p.seqlen, Di = p.dim, N = p.dstate, R = p.dt_rank, K = p.dconv;
  if (b == 0) return 0;
  if (L == 0) {   // no token: the states pass through (int8: decoded and encoded again, as the op's body does)
    std::memcpy(p.conv_state_out, p.conv_state, sizeof(float) * static_cast<size_t>(b * Di * (K - 1)));
    if (p.int8_ssm != nullptr) p.int8_ssm->rows_in(0, b * Di);
    std::memcpy(p.ssm_state_out, p.ssm_state, sizeof(float) * static_cast<size_t>(b * Di * N));
    if (p.int8_ssm != nullptr) p.int8_ssm->rows_out(0, b * Di);
    return 0;
  }
  Work w;
  w.p = &p;
  w.blocks = (Di + kBlock - 1) / kBlock;
  w.chunks = (L + kTokensPerTask - 1) / kTokensPerTask;
  w.n_out = R + 2 * N;
  // Every scratch buffer is sized (with overflow checks) and checked against the machine before anything is
  // allocated: R comes from x_proj_w's rows and b * L from x, so a tiny model with a huge dt_rank (or many
  // tokens) asks for rows * R values that real tensors of a few MiB never hold.
  const size_t rows = static_cast<size_t>(b) * static_cast<size_t>(L);
  const size_t elem = p.is_float ? sizeof(float) : sizeof(int8_t);
  const size_t per_row = 2 * static_cast<size_t>(Di) + 2 * static_cast<size_t>(N) + static_cast<size_t>(R);
  const bool split_b = static_cast<int64_t>(b * L) <= kSplitRows;
  const size_t pass_b_tasks = split_b ? static_cast<size_t>(b * L) : static_cast<size_t>(b) * static_cast<size_t>(w.chunks);
  size_t row_values = 0, row_bytes = 0, proj_values = 0, proj_bytes = 0, total = 0;
  const bool fits = mul(rows, per_row, &row_values) && mul(row_values, elem, &row_bytes) &&
                    mul(pass_b_tasks, static_cast<size_t>(w.n_out), &proj_values) &&
                    mul(proj_values, sizeof(float), &proj_bytes) && row_bytes <= SIZE_MAX - proj_bytes;
  total = fits ? row_bytes + proj_bytes : SIZE_MAX;
  auto what = [&] {   // (built only for an error: every decode step comes through here)
    return "the scratch of " + std::to_string(b * L) + " tokens x (2 Di + 2 N + dt_rank = " + std::to_string(per_row) +
           (p.is_float ? " float" : " int8") + " values; Di " + std::to_string(Di) + ", N " + std::to_string(N) +
           ", dt_rank " + std::to_string(R) + " from x_proj_w's rows)";
  };
  const size_t ram = physical_memory();
  if (!fits || (ram != 0 && total > ram)) {
    *error = what() + (fits ? " is " + gib(static_cast<double>(total)) : std::string(" overflows size_t")) +
             (ram != 0 ? ", more than this machine's " + gib(static_cast<double>(ram)) + " of memory" : std::string());
    return kStateUpdateNoMemory;
  }
  try {
    if (p.is_float) {
      w.u_f.resize(rows * Di), w.delta_f.resize(rows * Di), w.B_f.resize(rows * N), w.C_f.resize(rows * N);
      w.dtl_f.resize(rows * R);
    } else {
      w.u_q.resize(rows * Di), w.delta_q.resize(rows * Di), w.B_q.resize(rows * N), w.C_q.resize(rows * N);
      w.dtl_q.resize(rows * R);
    }
    w.proj.resize(proj_values);
    w.failed.assign(static_cast<size_t>(b * w.blocks), 0);
  } catch (const std::exception &) {   // bad_alloc, length_error
    *error = "out of memory allocating " + gib(static_cast<double>(total)) + " for " + what();
    return kStateUpdateNoMemory;
  }
  if (b * L * Di * N < kSerialBelow || parallel_for == nullptr) parallel_for = serial_for;
  parallel_for(pool, pass_conv, static_cast<size_t>(b * w.blocks), &w);
  if (split_b) {
    parallel_for(pool, pass_xproj_part, pass_b_tasks * kOutParts, &w);
    serial_for(pool, pass_xproj_rows, pass_b_tasks, &w);
  } else {
    parallel_for(pool, pass_xproj, pass_b_tasks, &w);
  }
  parallel_for(pool, pass_scan, static_cast<size_t>(b * w.blocks), &w);
  if (std::any_of(w.failed.begin(), w.failed.end(), [](int f) { return f != 0; })) {
    *error = w.message.empty() ? "the scan failed" : w.message;
    return kStateUpdateInvalid;
  }
  return 0;
}

}  // namespace mq_scan
