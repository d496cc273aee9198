// The int8 decode-state codec of the fused step ops (state_codec.h).
#include "state_codec.h"

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"   // GCC 12's AVX-512 headers (their masked builtins' __Y)
#endif

#include <cmath>
#include <cstring>

#if defined(__F16C__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace mq_scan {
namespace {

constexpr float kQmax = 127.f;
constexpr float kScaleUp = 1.f + 1.f / 1024.f;    // 1 + 2^-10 (models/state_codec.py SCALE_UP)
constexpr float kScaleMin = 5.9604644775390625e-08f;   // 2^-24 (SCALE_MIN)
constexpr float kScaleMax = 65504.f;              // float16's largest (SCALE_MAX)
constexpr int64_t kRowChunk = 64;                 // rows whose scales are computed together (vectorised)

/* QuantizeLinear's rounding with scale 1 on an already divided value: half to even, saturated; a NaN gives
 * -128, as ONNX Runtime's QuantizeLinear gives it */
inline int8_t saturate_round(float v) noexcept {
  float r = std::nearbyint(v);
  r = r == r ? r : -128.f;
  r = r < -128.f ? -128.f : r;
  r = r > 127.f ? 127.f : r;
  return static_cast<int8_t>(static_cast<int32_t>(r));
}

// The scales' arithmetic must round after each operation, as the graph's Div, Mul and Add do: no FMA
// contraction (GCC contracts across statements by default; Clang only within one expression).
#if defined(__GNUC__) && !defined(__clang__)
#define MQ_NO_CONTRACT __attribute__((optimize("fp-contract=off")))
#else
#define MQ_NO_CONTRACT
#endif

/* the scales of m <= kRowChunk rows from their amax (Div, Mul, Add, Min in float32, then the float16 cast), and
 * each as float */
MQ_NO_CONTRACT void row_scales(const float *amax, int64_t m, uint16_t *s16, float *sf) noexcept {
  alignas(64) float t[kRowChunk];
  for (int64_t i = 0; i < m; ++i) t[i] = amax[i] / kQmax;
  for (int64_t i = 0; i < m; ++i) t[i] = t[i] * kScaleUp;
  for (int64_t i = 0; i < m; ++i) t[i] = t[i] + kScaleMin;
  for (int64_t i = 0; i < m; ++i) t[i] = t[i] > kScaleMax ? kScaleMax : t[i];
  int64_t i = 0;
#if defined(__F16C__)
  for (; i + 8 <= m; i += 8) {   // vcvtps2ph rounds to nearest even, as half_from_float
    const __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(t + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm_storeu_si128(reinterpret_cast<__m128i *>(s16 + i), h);
    _mm256_storeu_ps(sf + i, _mm256_cvtph_ps(h));
  }
#endif
  for (; i < m; ++i) {
    s16[i] = half_from_float(t[i]);
    sf[i] = float_from_half(s16[i]);
  }
}

}  // namespace

uint16_t half_from_float(float v) noexcept {
  uint32_t x;
  std::memcpy(&x, &v, sizeof x);
  const uint32_t sign = (x >> 16) & 0x8000u, ax = x & 0x7fffffffu;
  if (ax >= 0x7f800000u) return static_cast<uint16_t>(sign | (ax > 0x7f800000u ? 0x7e00u : 0x7c00u));   // NaN, inf
  if (ax >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);   // from 65520 up: rounds to inf
  if (ax < 0x38800000u) {   // below 2^-14: a subnormal half, a multiple of 2^-24 (the scaling is exact)
    float a;
    std::memcpy(&a, &ax, sizeof a);
    return static_cast<uint16_t>(sign | static_cast<uint32_t>(std::nearbyint(a * 16777216.f)));
  }
  uint32_t h = ((((ax >> 23) - 127u + 15u) << 10) | ((ax & 0x7fffffu) >> 13));
  const uint32_t rest = ax & 0x1fffu;   // the 13 bits dropped: round half to even (a carry moves the exponent)
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;
  return static_cast<uint16_t>(sign | h);
}

float float_from_half(uint16_t h) noexcept {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  if (e == 0) {
    const float v = static_cast<float>(m) * 5.9604644775390625e-08f;   // m * 2^-24, exact
    return sign ? -v : v;
  }
  const uint32_t x = sign | (e == 31 ? 0x7f800000u | (m << 13) : ((e - 15u + 127u) << 23) | (m << 13));
  float v;
  std::memcpy(&v, &x, sizeof v);
  return v;
}

namespace {

/* amax(|h|) of a row as the largest bit pattern with the sign cleared (for floats that is their order),
 * passing over NaN (above infinity). A row holding NaN comes from a step whose logits are NaN (y reads every
 * state value), which generation stops at; ONNX Runtime's ReduceMax passes over NaN too, except, for some
 * shapes, a NaN in first place. Its codes are -128 (QuantizeLinear of NaN), the other values' as without it. */
inline uint32_t row_top_ref(const float *hr, int64_t n) noexcept {
  uint32_t top = 0;
  for (int64_t k = 0; k < n; ++k) {
    uint32_t u;
    std::memcpy(&u, hr + k, sizeof u);
    u &= 0x7fffffffu;
    top = (u > top && u <= 0x7f800000u) ? u : top;
  }
  return top;
}

#if defined(__AVX512F__)
inline uint32_t row_top(const float *hr, int64_t n) noexcept {
  __m512i top = _mm512_setzero_si512();
  const __m512i abs_mask = _mm512_set1_epi32(0x7fffffff), inf = _mm512_set1_epi32(0x7f800000);
  int64_t k = 0;
  for (; k + 16 <= n; k += 16) {
    const __m512i u = _mm512_and_si512(_mm512_loadu_si512(hr + k), abs_mask);
    top = _mm512_mask_max_epu32(top, _mm512_cmple_epu32_mask(u, inf), top, u);
  }
  const uint32_t t = _mm512_reduce_max_epu32(top), rest = row_top_ref(hr + k, n - k);
  return t > rest ? t : rest;
}

/* saturate_round(v[k] / s) for 16 values, s a row's scale (a float16 value, so |v / s| <= 127 but for a row
 * past the scale's range). The quotient by a multiply with the reciprocal r = 1/s: t = v * r lies within
 * 1.5 * 2^-23 |v / s| of the float32 quotient (two roundings of 2^-24 each), under 2^-15 for |v / s| <= 128, so
 * where t is more than kTieMargin from every half-integer both round to the same integer. Lanes nearer a tie
 * (about 1 in 8000 of random values; every exact tie), and non-finite or out-of-range ones, take the division. */
constexpr float kTieMargin = 1.f / 16384.f;   // 2^-14

inline void quantize16(const float *v, float s, float r, int8_t *q) noexcept {
  const __m512 x = _mm512_loadu_ps(v);
  const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(r));
  const __m512 near = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  // |t - near| is in [0, 0.5]: its distance to the half-integer between t and its neighbour is 0.5 - |t - near|
  const __m512 dist = _mm512_sub_ps(_mm512_set1_ps(0.5f), _mm512_abs_ps(_mm512_sub_ps(t, near)));
  const __mmask16 safe = _mm512_cmp_ps_mask(dist, _mm512_set1_ps(kTieMargin), _CMP_GT_OQ) &
                         _mm512_cmp_ps_mask(_mm512_abs_ps(t), _mm512_set1_ps(256.f), _CMP_LT_OQ);
  __m512 rounded = near;
  if (safe != 0xffff)   // the division for the lanes near a tie (and NaN, inf, |t| >= 256)
    rounded = _mm512_mask_roundscale_ps(near, static_cast<__mmask16>(~safe), _mm512_div_ps(x, _mm512_set1_ps(s)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  rounded = _mm512_mask_mov_ps(rounded, _mm512_cmp_ps_mask(rounded, rounded, _CMP_UNORD_Q), _mm512_set1_ps(-128.f));
  rounded = _mm512_min_ps(_mm512_max_ps(rounded, _mm512_set1_ps(-128.f)), _mm512_set1_ps(127.f));
  _mm_storeu_si128(reinterpret_cast<__m128i *>(q), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(rounded)));
}
#endif

template <bool Fast>
void rows_decode_impl(const int8_t *q, const uint16_t *scale, int64_t rows, int64_t n, float *h) noexcept {
  for (int64_t r = 0; r < rows; ++r) {
    const float s = float_from_half(scale[r]);
    const int8_t *__restrict qr = q + r * n;
    float *__restrict hr = h + r * n;
    int64_t k = 0;
#if defined(__AVX512F__)
    if (Fast)
      for (; k + 16 <= n; k += 16)
        _mm512_storeu_ps(hr + k, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
                                                   _mm_loadu_si128(reinterpret_cast<const __m128i *>(qr + k)))),
                                               _mm512_set1_ps(s)));
#endif
    for (; k < n; ++k) hr[k] = static_cast<float>(qr[k]) * s;
  }
}

template <bool Fast>
void rows_encode_impl(const float *h, int64_t rows, int64_t n, int8_t *q, uint16_t *scale) noexcept {
  alignas(64) float amax[kRowChunk], sf[kRowChunk];
  for (int64_t r0 = 0; r0 < rows; r0 += kRowChunk) {
    const int64_t m = rows - r0 < kRowChunk ? rows - r0 : kRowChunk;
    for (int64_t i = 0; i < m; ++i) {
      const float *hr = h + (r0 + i) * n;
#if defined(__AVX512F__)
      const uint32_t top = Fast ? row_top(hr, n) : row_top_ref(hr, n);
#else
      const uint32_t top = row_top_ref(hr, n);
#endif
      std::memcpy(amax + i, &top, sizeof top);
    }
    row_scales(amax, m, scale + r0, sf);
    for (int64_t i = 0; i < m; ++i) {
      const float *__restrict hr = h + (r0 + i) * n;
      int8_t *__restrict qr = q + (r0 + i) * n;
      const float s = sf[i];
      int64_t k = 0;
#if defined(__AVX512F__)
      if (Fast) {
        const float r = 1.f / s;
        for (; k + 16 <= n; k += 16) quantize16(hr + k, s, r, qr + k);
      }
#endif
      for (; k < n; ++k) qr[k] = saturate_round(hr[k] / s);
    }
  }
}

}  // namespace

void rows_decode(const int8_t *q, const uint16_t *scale, int64_t rows, int64_t n, float *h) noexcept {
  rows_decode_impl<true>(q, scale, rows, n, h);
}
void rows_decode_ref(const int8_t *q, const uint16_t *scale, int64_t rows, int64_t n, float *h) noexcept {
  rows_decode_impl<false>(q, scale, rows, n, h);
}
void rows_encode(const float *h, int64_t rows, int64_t n, int8_t *q, uint16_t *scale) noexcept {
  rows_encode_impl<true>(h, rows, n, q, scale);
}
void rows_encode_ref(const float *h, int64_t rows, int64_t n, int8_t *q, uint16_t *scale) noexcept {
  rows_encode_impl<false>(h, rows, n, q, scale);
}

void grid_decode(const int8_t *q, int64_t count, float scale, float *v) noexcept {
  for (int64_t k = 0; k < count; ++k) v[k] = static_cast<float>(q[k]) * scale;
}

void grid_encode(const float *v, int64_t count, float scale, int8_t *q) noexcept {
  for (int64_t k = 0; k < count; ++k) q[k] = saturate_round(v[k] / scale);
}

}  // namespace mq_scan

extern "C" {
void mq_state_rows_encode(const float *h, int64_t rows, int64_t n, int8_t *q, uint16_t *scale) noexcept {
  mq_scan::rows_encode(h, rows, n, q, scale);
}
void mq_state_rows_decode(const int8_t *q, const uint16_t *scale, int64_t rows, int64_t n, float *h) noexcept {
  mq_scan::rows_decode(q, scale, rows, n, h);
}
void mq_state_rows_encode_ref(const float *h, int64_t rows, int64_t n, int8_t *q, uint16_t *scale) noexcept {
  mq_scan::rows_encode_ref(h, rows, n, q, scale);
}
void mq_state_rows_decode_ref(const int8_t *q, const uint16_t *scale, int64_t rows, int64_t n, float *h) noexcept {
  mq_scan::rows_decode_ref(q, scale, rows, n, h);
}
void mq_state_grid_encode(const float *v, int64_t count, float scale, int8_t *q) noexcept {
  mq_scan::grid_encode(v, count, scale, q);
}
void mq_half_from_float(const float *v, int64_t count, uint16_t *h) noexcept {
  for (int64_t k = 0; k < count; ++k) h[k] = mq_scan::half_from_float(v[k]);
}
void mq_float_from_half(const uint16_t *h, int64_t count, float *v) noexcept {
  for (int64_t k = 0; k < count; ++k) v[k] = mq_scan::float_from_half(h[k]);
}
}
