/* mq::SelectiveScan: int8 Mamba1 selective scan, one header for the CPU library, the CUDA library and
 * the TensorRT plugin.
 *
 * Semantics (the contract is mq_deploy.ops.selective_scan.selective_scan_int8_ref):
 *   dequant q -> q * scale (symmetric, zero point 0), per-tensor scales
 *   dt  = softplus(delta + delta_bias)                       softplus as torch: v > 20 ? v : log1p(exp(v))
 *   h_t = exp(dt * A) * h_{t-1} + dt * x_t * B_t              per channel d, per state n
 *   y_t = (sum_n h_t * C_t + D * x_t) * gate(z_t)             gate = z * sigmoid(gate_scale * z), or silu(z)
 *
 * Layout: x, delta, z, y are [batch, seqlen, dim] and share their batch/l strides (d contiguous);
 * B, C are [batch, seqlen, dstate] and share theirs (n contiguous); A [dim, dstate] and the states
 * [batch, dim, dstate] are contiguous.
 *
 * ABI: the struct below is frozen; fields may only be appended at the end. Nothing was appended so far.
 * The benchmark-only fp16-input twin takes its half pointers as extra arguments of its own entry point
 * (mq_scan_cuda_f16in) rather than as struct fields.
 *
 * Errors: every entry point returns 0 on success or an MQ_SCAN_ERR_* code; the message is in
 * mq_scan_last_error() (thread-local, valid until the next call on the same thread). No C++ exception
 * leaves either library.
 */
#ifndef MQ_SELECTIVE_SCAN_H_
#define MQ_SELECTIVE_SCAN_H_

#include <stddef.h>
#include <stdint.h>

#if defined(_WIN32)
#define MQ_SCAN_API __declspec(dllexport)
#elif defined(__GNUC__)
#define MQ_SCAN_API __attribute__((visibility("default")))
#else
#define MQ_SCAN_API
#endif

/* C++ sees every entry point as noexcept: a definition that is not is a compile error, and a throw that
 * escaped one would end the process at the boundary instead of unwinding into C, ctypes or TensorRT. */
#ifdef __cplusplus
#define MQ_SCAN_NOEXCEPT noexcept
extern "C" {
#else
#define MQ_SCAN_NOEXCEPT
#endif

#define MQ_SCAN_VERSION "0.1.0"
#define MQ_SCAN_MAX_DSTATE 256

#define MQ_SCAN_OK 0
#define MQ_SCAN_ERR_INVALID 1   /* bad sizes, strides or pointers: the caller's mistake */
#define MQ_SCAN_ERR_CUDA 2      /* a CUDA launch or runtime error */
#define MQ_SCAN_ERR_INTERNAL 3  /* anything else (out of memory, thread start failure, our bug) */

typedef struct MQScanParams {
  int64_t batch, seqlen, dim, dstate;
  const int8_t *x, *delta, *B, *C, *z;       /* z may be NULL */
  float x_scale, delta_scale, B_scale, C_scale, z_scale;
  const float *A;           /* [dim, dstate] */
  const float *D;           /* [dim] or NULL */
  const float *delta_bias;  /* [dim] or NULL */
  const float *gate_scale;  /* [dim] or NULL: silu(z) */
  const float *h0;          /* [batch, dim, dstate] or NULL: zeros */
  void *y;                  /* [batch, seqlen, dim]; float or half per out_fp16 */
  float *h_last;            /* [batch, dim, dstate] or NULL */
  int32_t out_fp16;         /* 0: float32 output, 1: float16 output */
  /* element strides; x/delta/z/y share [b, l, d] strides with d contiguous, B/C share [b, l, n] with n contiguous */
  int64_t x_batch_stride, x_l_stride, bc_batch_stride, bc_l_stride, y_batch_stride, y_l_stride;
} MQScanParams;

/* helper: fill strides for contiguous tensors */
MQ_SCAN_API void mq_scan_set_contiguous_strides(MQScanParams *p) MQ_SCAN_NOEXCEPT;
/* returns 0 on success, nonzero error code; message via mq_scan_last_error() (thread-local) */
MQ_SCAN_API int mq_scan_validate(const MQScanParams *p) MQ_SCAN_NOEXCEPT;   /* sizes > 0, dstate <= 256, non-null required pointers */
MQ_SCAN_API int mq_scan_cpu(const MQScanParams *p, int num_threads) MQ_SCAN_NOEXCEPT;      /* num_threads <= 0: hardware concurrency */
MQ_SCAN_API int mq_scan_cuda(const MQScanParams *p, void *cuda_stream) MQ_SCAN_NOEXCEPT;   /* only in the CUDA library */
/* Scratch the L-split of mq_scan_cuda needs at these sizes (0: it never splits them); an upper
 * bound for any pointers. mq_scan_cuda_ws runs the scan with caller-owned scratch (TensorRT's
 * workspace) instead of allocating it on the stream; with less than that (or NULL) it scans unsplit. */
MQ_SCAN_API size_t mq_scan_cuda_workspace_size(const MQScanParams *p) MQ_SCAN_NOEXCEPT;
MQ_SCAN_API int mq_scan_cuda_ws(const MQScanParams *p, void *workspace, size_t workspace_bytes, void *cuda_stream) MQ_SCAN_NOEXCEPT;
MQ_SCAN_API int mq_scan_step_cuda(const MQScanParams *p, void *cuda_stream) MQ_SCAN_NOEXCEPT; /* decode step: seqlen == 1, h0 read, h_last written (may alias h0) */
/* Benchmark twin, CUDA library only: the same kernel reading fp16 x, delta, B, C, z (pointers to
 * IEEE half, same layout and strides as the int8 ones in p, which are then ignored; the scales are
 * ignored too). Exists to measure what int8 inputs buy; not part of the op. */
MQ_SCAN_API int mq_scan_cuda_f16in(const MQScanParams *p, const void *x, const void *delta, const void *B,
                       const void *C, const void *z, void *cuda_stream) MQ_SCAN_NOEXCEPT;
MQ_SCAN_API const char *mq_scan_last_error(void) MQ_SCAN_NOEXCEPT;
MQ_SCAN_API const char *mq_scan_version(void) MQ_SCAN_NOEXCEPT;

#ifdef __cplusplus
}  /* extern "C" */

/* ---- per-element math, shared by the CPU and CUDA implementations -------------------------------- */
#include <math.h>
#include <string.h>

/* MQ_HOST_DEVICE marks the math for both sides under nvcc and expands to nothing for host-only
 * compilers; MQ_HD adds the inlining every header-defined function needs. */
#if defined(__CUDACC__)
#define MQ_HOST_DEVICE __host__ __device__
#define MQ_HD MQ_HOST_DEVICE __forceinline__
#else
#define MQ_HOST_DEVICE
#define MQ_HD MQ_HOST_DEVICE inline
#endif

namespace mq_scan {

constexpr float kLog2e = 1.4426950408889634f;

MQ_HD float dequant(int8_t q, float scale) { return static_cast<float>(q) * scale; }

/* 2^v. Device: exp2f. Host: a branch-free degree-6 polynomial (relative error < 1e-7 on the
 * reduced range, inputs clamped to [-126, 126]) that compilers vectorise; exp(dt*A) is computed as
 * exp2(dt * (A*log2e)), with A*log2e precomputed once per (d, n). */
MQ_HD float exp2_fast(float v) {
#if defined(__CUDA_ARCH__)
  return exp2f(v);
#else
  v = v < -126.f ? -126.f : (v > 126.f ? 126.f : v);
  const int i = static_cast<int>(v + 127.5f) - 127;   /* round(v); the argument is positive */
  const float f = v - static_cast<float>(i);           /* [-0.5, 0.5] */
  float p = 1.5337585e-4f;
  p = p * f + 1.3399870e-3f;
  p = p * f + 9.6185198e-3f;
  p = p * f + 5.5503290e-2f;
  p = p * f + 2.4022646e-1f;
  p = p * f + 6.9314718e-1f;
  p = p * f + 1.0f;
  const uint32_t bits = static_cast<uint32_t>(i + 127) << 23;
  float scale;
  memcpy(&scale, &bits, sizeof scale);
  return p * scale;
#endif
}

/* log(1 + u) for u in [0, 1] as 2 atanh(s), s = u / (2 + u) in [0, 1/3]: an odd series to s^15
 * (truncation < 2e-9 relative), accurate in relative terms for tiny u, branch-free, vectorisable. */
MQ_HD float log1p_unit(float u) {
  const float s = u / (2.f + u);
  const float s2 = s * s;
  float p = 1.f / 15.f;
  p = p * s2 + 1.f / 13.f;
  p = p * s2 + 1.f / 11.f;
  p = p * s2 + 1.f / 9.f;
  p = p * s2 + 1.f / 7.f;
  p = p * s2 + 1.f / 5.f;
  p = p * s2 + 1.f / 3.f;
  p = p * s2 + 1.f;
  return 2.f * s * p;
}

/* softplus(v) = log(1 + e^v) = max(v, 0) + log1p(e^-|v|): branch-free and stable everywhere. Equals
 * torch's softplus (beta 1, threshold 20: above it torch returns v) to float32 rounding: above 20 the
 * second term is < 2.1e-9 and vanishes against v. */
MQ_HD float softplus(float v) {
  const float a = v < 0.f ? -v : v;
  return (v > 0.f ? v : 0.f) + log1p_unit(exp2_fast(-a * kLog2e));
}

MQ_HD float sigmoid(float v) { return 1.f / (1.f + exp2_fast(-v * kLog2e)); }

/* gate(z): silu(z) when there is no Smooth-Fused factor (s = 1), z * sigmoid(s * z) when there is */
MQ_HD float gate(float z, float s) { return z * sigmoid(s * z); }

MQ_HD float discretize(float delta, float bias) { return softplus(delta + bias); }

/* one state update: h <- exp2(dt * A2) * h + dtx * b, with A2 = A * log2(e) and dtx = dt * x */
MQ_HD float state_update(float h, float dt, float A2, float dtx, float b) {
  return exp2_fast(dt * A2) * h + dtx * b;
}

/* readout epilogue: (C . h + D * x) * gate */
MQ_HD float finish(float ch, float x, float D, float g) { return (ch + D * x) * g; }

/* float -> IEEE half bits, round to nearest even (as torch's .half()); host-side, the device uses
 * __float2half_rn */
inline uint16_t float_to_half_bits(float f) {
  uint32_t x;
  memcpy(&x, &f, sizeof x);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t absx = x & 0x7fffffffu;
  if (absx >= 0x7f800000u) return static_cast<uint16_t>(sign | (absx > 0x7f800000u ? 0x7e00u : 0x7c00u));
  if (absx >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  /* rounds to >= 65520: inf */
  if (absx < 0x38800000u) {                 /* below the smallest normal half: subnormal or zero */
    if (absx < 0x33000000u) return static_cast<uint16_t>(sign);            /* < 2^-25: rounds to 0 */
    const uint32_t e = absx >> 23;
    const uint32_t m = (absx & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126u - e;        /* value = m * 2^(e-150) = (m >> shift) * 2^-24 */
    const uint32_t half = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1u);
    const uint32_t mid = 1u << (shift - 1u);
    const uint32_t r = half + ((rem > mid || (rem == mid && (half & 1u))) ? 1u : 0u);
    return static_cast<uint16_t>(sign | r);
  }
  uint32_t h = ((absx - 0x38000000u) >> 13);  /* rebias exponent 127 -> 15 */
  const uint32_t rem = absx & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;
  return static_cast<uint16_t>(sign | h);
}

}  // namespace mq_scan

#endif  /* __cplusplus */

#endif  /* MQ_SELECTIVE_SCAN_H_ */
