/* mq::SSDScan: the Mamba2 scan (SSD) on int8 or float32 inputs, one header for the CPU library, the CUDA
 * library, the ONNX Runtime ops and the TensorRT plugin.
 *
 * Semantics (the contract is mq_deploy.ops.ssd.ssd_scan_int8_ref and mq_deploy/export/ssd_op.py):
 *   dequant  v = q * scale              per tensor, or one scale per channel of the last axis (zero point 0)
 *   dt       = clamp(softplus(dt + dt_bias), dt_min, dt_max)          softplus as torch: v > 20 ? v : log1p(exp(v))
 *   h_t      = exp(dt_t * A) * h_{t-1} + dt_t * x_t (outer) B_t        per head; A one scalar per head
 *   y_t      = h_t . C_t + D * x_t
 *   Head h (of P channels) reads group g = h / (heads / groups) of B and C (N states each).
 *
 * Layout: x, y [batch, seqlen, heads * head_dim]; dt [batch, seqlen, heads]; B, C [batch, seqlen, groups *
 * dstate]; A, D, dt_bias [heads]; the states h0, h_last [batch, heads, head_dim, dstate], contiguous. The
 * (batch, l) strides of x, dt, B/C (shared) and y are given in elements; the last axis is contiguous.
 *
 * The implementations compute the recurrence step by step with the state in float32 (the CPU library per
 * (batch, head, block of rows), the CUDA kernel per (batch, head, block of rows) with the chunk's inputs
 * staged in shared memory); they differ from the reference in summation order and exp/log1p ulps only.
 *
 * ABI: the struct is frozen; fields may only be appended. Errors: 0 or an MQ_SCAN_ERR_* code, the message in
 * mq_scan_last_error() (the same thread-local message as the Mamba1 entry points). No C++ exception leaves
 * either library.
 */
#ifndef MQ_SSD_H_
#define MQ_SSD_H_

#include "mq_selective_scan.h"

#ifdef __cplusplus
extern "C" {
#endif

#define MQ_SSD_MAX_DSTATE 256

typedef struct MQSSDParams {
  int64_t batch, seqlen, heads, head_dim, groups, dstate;
  int32_t in_float;                 /* 0: x, dt, B, C are int8 codes; 1: float32 values (scales ignored) */
  const void *x, *dt, *B, *C;
  /* int8 inputs: a per-tensor scale, or (pointer non-NULL) one scale per channel of the tensor's last axis
   * (heads * head_dim for x, heads for dt, groups * dstate for B and C). The CUDA library reads the per-channel
   * arrays on the device. */
  float x_scale, dt_scale, B_scale, C_scale;
  const float *x_scales, *dt_scales, *B_scales, *C_scales;
  const float *A;                   /* [heads] */
  const float *D;                   /* [heads] or NULL */
  const float *dt_bias;             /* [heads] or NULL */
  float dt_min, dt_max;             /* clamp of dt after softplus; dt_max may be +inf */
  const float *h0;                  /* [batch, heads, head_dim, dstate] or NULL: zeros */
  float *y;                         /* [batch, seqlen, heads * head_dim] */
  float *h_last;                    /* [batch, heads, head_dim, dstate] or NULL; may alias h0 */
  int64_t x_batch_stride, x_l_stride, dt_batch_stride, dt_l_stride, bc_batch_stride, bc_l_stride, y_batch_stride,
      y_l_stride;
} MQSSDParams;

/* strides of contiguous tensors */
MQ_SCAN_API void mq_ssd_set_contiguous_strides(MQSSDParams *p) MQ_SCAN_NOEXCEPT;
/* sizes > 0, heads a multiple of groups, dstate <= 256, required pointers, strides, finite positive scales
 * (per channel: every value), dt_min finite >= 0, dt_max > 0 (inf allowed) */
MQ_SCAN_API int mq_ssd_validate(const MQSSDParams *p) MQ_SCAN_NOEXCEPT;
/* CPU library: std::threads over (batch, head); num_threads <= 0: hardware concurrency; 1: the calling thread
 * only, allocating nothing (what the ONNX Runtime ops call from their pool tasks) */
MQ_SCAN_API int mq_ssd_cpu(const MQSSDParams *p, int num_threads) MQ_SCAN_NOEXCEPT;
/* CUDA library: the chunked scan (asynchronous on the stream); h_last may alias h0. */
MQ_SCAN_API int mq_ssd_cuda(const MQSSDParams *p, void *cuda_stream) MQ_SCAN_NOEXCEPT;
/* Scratch of the L-split at these sizes (0: never splits); mq_ssd_cuda_ws scans with caller-owned scratch
 * (TensorRT's workspace), unsplit when it is too small or NULL. */
MQ_SCAN_API size_t mq_ssd_cuda_workspace_size(const MQSSDParams *p) MQ_SCAN_NOEXCEPT;
MQ_SCAN_API int mq_ssd_cuda_ws(const MQSSDParams *p, void *workspace, size_t workspace_bytes,
                               void *cuda_stream) MQ_SCAN_NOEXCEPT;
/* decode step: seqlen == 1, one thread per state element; h_last may alias h0 */
MQ_SCAN_API int mq_ssd_step_cuda(const MQSSDParams *p, void *cuda_stream) MQ_SCAN_NOEXCEPT;

#ifdef __cplusplus
}  /* extern "C" */

/* ---- per-element math, shared by the CPU and CUDA implementations -------------------------------- */
namespace mq_ssd {

/* torch's softplus (beta 1, threshold 20) */
MQ_HD float softplus(float v) { return v > 20.f ? v : log1pf(expf(v)); }

/* the step size: clamp(softplus(raw + bias), lo, hi), in this order (as the reference and the function body) */
MQ_HD float step_size(float raw, float bias, float lo, float hi) {
  float v = softplus(raw + bias);
  v = v < lo ? lo : v;
  return v > hi ? hi : v;
}

/* the per-step decay of a head's state: exp(dt * A) */
MQ_HD float decay(float dt, float A) { return expf(dt * A); }

/* an input value: q * scale (scales: per channel when non-NULL, else the per-tensor one) */
MQ_HD float load(const int8_t *q, int64_t i, const float *scales, int64_t ch, float scale) {
  return static_cast<float>(q[i]) * (scales != nullptr ? scales[ch] : scale);
}
MQ_HD float load(const float *v, int64_t i, const float *, int64_t, float) { return v[i]; }

/* ONNX QuantizeLinear to int8, zero point 0: saturate(round half to even(v / scale)) */
MQ_HD int8_t quantize(float v, float scale) {
  const float r = rintf(v / scale);
  return static_cast<int8_t>(r < -128.f ? -128.f : (r > 127.f ? 127.f : r));
}

}  // namespace mq_ssd

#endif  /* __cplusplus */

#endif  /* MQ_SSD_H_ */
