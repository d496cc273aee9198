// The int8 linear's kernels (qlinear.h). The fast path is AVX-512 VNNI: per k-step of four, a 64-byte load of
// each of up to four tiles (64 output channels) and one broadcast of four activation codes per row, multiplied
// and summed into int32 by vpdpbusd; up to four rows at a time (16 accumulators), so a tile's weights are read
// from memory once per four rows of a call (at decode, once per token). Sums are exact in int32 (|u w| <= 2^15,
// K < 2^16), so the fast path and the plain loop (qlinear_block_ref) give the same floats.
#include "qlinear.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define MQ_QLINEAR_VNNI 1
#if defined(__GNUC__) && !defined(__clang__)
// GCC 12's AVX-512 intrinsics start some results from an undefined vector (_mm512_undefined_*), which its
// -Wuninitialized flags inside the header wherever they are inlined: a false positive
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>
#else
#define MQ_QLINEAR_VNNI 0
#endif

namespace mq_scan {

namespace {
constexpr size_t kAlign = 64;

// (a NaN saturates low, as the vector path's max/min leave it: never a float -> int conversion of a NaN)
inline uint8_t static_code(float v, float scale) {   // int8 QuantizeLinear, zero point 0, + 128
  const float r = std::nearbyint(v / scale);
  return static_cast<uint8_t>(static_cast<int32_t>(!(r >= -128.f) ? -128.f : (r > 127.f ? 127.f : r)) + 128);
}
inline uint8_t dynamic_code(float v, float scale, int32_t zp) {   // DynamicQuantizeLinear's uint8 code
  const float r = std::nearbyint(v / scale) + static_cast<float>(zp);
  return static_cast<uint8_t>(!(r >= 0.f) ? 0.f : (r > 255.f ? 255.f : r));
}
}  // namespace

const int8_t *PackedInt8::tile(int64_t t) const {
  const uintptr_t base = reinterpret_cast<uintptr_t>(data.data());
  const uintptr_t aligned = (base + kAlign - 1) & ~static_cast<uintptr_t>(kAlign - 1);
  return reinterpret_cast<const int8_t *>(aligned) + t * K4 * kQTile * 4;
}

void qlinear_pack(const int8_t *w, int64_t K, int64_t N, PackedInt8 *out) {
  PackedInt8 &p = *out;
  p.K = K, p.N = N, p.K4 = (K + 3) / 4, p.tiles = (N + kQTile - 1) / kQTile;
  p.data.assign(static_cast<size_t>(p.tiles * p.K4 * kQTile * 4) + kAlign, 0);
  p.colsum.assign(static_cast<size_t>(p.tiles * kQTile), 0);
  int8_t *dst = const_cast<int8_t *>(p.tile(0));
  for (int64_t k = 0; k < K; ++k) {
    const int8_t *row = w + k * N;
    for (int64_t n = 0; n < N; ++n) {
      const int64_t t = n / kQTile, c = n % kQTile;
      dst[((t * p.K4 + k / 4) * kQTile + c) * 4 + k % 4] = row[n];
      p.colsum[static_cast<size_t>(n)] += row[n];
    }
  }
}

void qlinear_quantize_static(const float *x, int64_t K, int64_t m0, int64_t m1, float scale, uint8_t *u,
                             int64_t ldu) {
  for (int64_t m = m0; m < m1; ++m) {
    const float *xr = x + m * K;
    uint8_t *ur = u + m * ldu;
    int64_t k = 0;
#if MQ_QLINEAR_VNNI
    const __m512 s = _mm512_set1_ps(scale), lo = _mm512_set1_ps(-128.f), hi = _mm512_set1_ps(127.f);
    const __m512i off = _mm512_set1_epi32(128);
    for (; k + 16 <= K; k += 16) {
      __m512 r = _mm512_roundscale_ps(_mm512_div_ps(_mm512_loadu_ps(xr + k), s), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      r = _mm512_min_ps(_mm512_max_ps(r, lo), hi);
      _mm_storeu_si128(reinterpret_cast<__m128i *>(ur + k),
                       _mm512_cvtepi32_epi8(_mm512_add_epi32(_mm512_cvtps_epi32(r), off)));
    }
#endif
    for (; k < K; ++k) ur[k] = static_code(xr[k], scale);
    for (; k < ldu; ++k) ur[k] = 128;
  }
}

void qlinear_dynamic_params(const float *x, int64_t n, float *scale, int32_t *zero_point) {
  float lo = 0.f, hi = 0.f;   // the range always includes 0
  for (int64_t i = 0; i < n; ++i) {
    lo = std::min(lo, x[i]);
    hi = std::max(hi, x[i]);
  }
  const float s = hi == lo ? 1.f : (hi - lo) / 255.f;
  const float zp = std::max(0.f, std::min(255.f, 0.f - lo / s));
  *scale = s;
  *zero_point = static_cast<int32_t>(std::nearbyint(zp));
}

void qlinear_quantize_dynamic(const float *x, int64_t K, int64_t m0, int64_t m1, float scale, int32_t zero_point,
                              uint8_t *u, int64_t ldu) {
  for (int64_t m = m0; m < m1; ++m) {
    const float *xr = x + m * K;
    uint8_t *ur = u + m * ldu;
    int64_t k = 0;
    for (; k < K; ++k) ur[k] = dynamic_code(xr[k], scale, zero_point);
    for (; k < ldu; ++k) ur[k] = static_cast<uint8_t>(zero_point);
  }
}

void qlinear_block_ref(const PackedInt8 &w, const uint8_t *u, int64_t ldu, int64_t m0, int64_t m1, int64_t n0,
                       int64_t n1, int32_t offset, float x_scale, const float *w_scale, float *y) {
  const int64_t N = w.N;
  for (int64_t m = m0; m < m1; ++m)
    for (int64_t n = n0; n < n1; ++n) {
      const int8_t *t = w.tile(n / kQTile) + (n % kQTile) * 4;
      int32_t acc = 0;
      for (int64_t k4 = 0; k4 < w.K4; ++k4)
        for (int64_t j = 0; j < 4; ++j)
          acc += static_cast<int32_t>(u[m * ldu + 4 * k4 + j]) * static_cast<int32_t>(t[k4 * kQTile * 4 + j]);
      acc -= offset * w.colsum[static_cast<size_t>(n)];
      y[m * N + n] = static_cast<float>(acc) * (x_scale * w_scale[n]);
    }
}

#if MQ_QLINEAR_VNNI
namespace {

/* R rows (m .. m + R) x T tiles (t0 .. t0 + T) of the output */
template <int R, int T>
void micro(const PackedInt8 &w, const uint8_t *u, int64_t ldu, int64_t m, int64_t t0, int32_t offset, float x_scale,
           const float *w_scale, float *y) {
  __m512i acc[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) acc[r][t] = _mm512_setzero_si512();
  const int8_t *wt[T];
  for (int t = 0; t < T; ++t) wt[t] = w.tile(t0 + t);
  const uint8_t *ur[R];
  for (int r = 0; r < R; ++r) ur[r] = u + (m + r) * ldu;
  const int64_t K4 = w.K4;
  for (int64_t k4 = 0; k4 < K4; ++k4) {
    __m512i wv[T];
    for (int t = 0; t < T; ++t) wv[t] = _mm512_load_si512(reinterpret_cast<const void *>(wt[t] + k4 * 64));
    for (int r = 0; r < R; ++r) {
      int32_t four;
      std::memcpy(&four, ur[r] + 4 * k4, 4);
      const __m512i a = _mm512_set1_epi32(four);
      for (int t = 0; t < T; ++t) acc[r][t] = _mm512_dpbusd_epi32(acc[r][t], a, wv[t]);
    }
  }
  const int64_t N = w.N;
  const __m512i off = _mm512_set1_epi32(offset);
  const __m512 xs = _mm512_set1_ps(x_scale);
  for (int t = 0; t < T; ++t) {
    const int64_t n = (t0 + t) * kQTile;
    const int64_t live = std::min<int64_t>(kQTile, N - n);
    const __mmask16 mask = live >= kQTile ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << live) - 1);
    const __m512i cs = _mm512_mullo_epi32(off, _mm512_loadu_si512(w.colsum.data() + n));
    const __m512 sc = _mm512_mul_ps(xs, _mm512_maskz_loadu_ps(mask, w_scale + n));
    for (int r = 0; r < R; ++r) {
      const __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc[r][t], cs)), sc);
      _mm512_mask_storeu_ps(y + (m + r) * N + n, mask, v);
    }
  }
}

template <int R>
void micro_tiles(int T, const PackedInt8 &w, const uint8_t *u, int64_t ldu, int64_t m, int64_t t0, int32_t offset,
                 float x_scale, const float *w_scale, float *y) {
  switch (T) {
    case 4: return micro<R, 4>(w, u, ldu, m, t0, offset, x_scale, w_scale, y);
    case 3: return micro<R, 3>(w, u, ldu, m, t0, offset, x_scale, w_scale, y);
    case 2: return micro<R, 2>(w, u, ldu, m, t0, offset, x_scale, w_scale, y);
    default: return micro<R, 1>(w, u, ldu, m, t0, offset, x_scale, w_scale, y);
  }
}

}  // namespace
#endif

void qlinear_block(const PackedInt8 &w, const uint8_t *u, int64_t ldu, int64_t m0, int64_t m1, int64_t n0, int64_t n1,
                   int32_t offset, float x_scale, const float *w_scale, float *y) {
#if MQ_QLINEAR_VNNI
  if (qlinear_fast()) {
    const int64_t t_end = (n1 + kQTile - 1) / kQTile;
    for (int64_t t0 = n0 / kQTile; t0 < t_end; t0 += 4) {
      const int T = static_cast<int>(std::min<int64_t>(4, t_end - t0));
      int64_t m = m0;
      for (; m + 4 <= m1; m += 4) micro_tiles<4>(T, w, u, ldu, m, t0, offset, x_scale, w_scale, y);
      switch (m1 - m) {
        case 3: micro_tiles<3>(T, w, u, ldu, m, t0, offset, x_scale, w_scale, y); break;
        case 2: micro_tiles<2>(T, w, u, ldu, m, t0, offset, x_scale, w_scale, y); break;
        case 1: micro_tiles<1>(T, w, u, ldu, m, t0, offset, x_scale, w_scale, y); break;
        default: break;
      }
    }
    return;
  }
#endif
  qlinear_block_ref(w, u, ldu, m0, m1, n0, n1, offset, x_scale, w_scale, y);
}

bool qlinear_fast() {
#if MQ_QLINEAR_VNNI && defined(__GNUC__)
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vnni");
  return ok;
#else
  return false;
#endif
}

}  // namespace mq_scan
