// mq::SelectiveStateUpdate and mq::SelectiveStateUpdateFloat on the CPU: a Mamba1 mixer's inner part for
// L >= 1 tokens that continue from the decode states, fused in one kernel (no ORT in here; the glue is in
// mq_scan_ort.cpp). The contract is the ops' function bodies in mq_deploy/export/state_update_op.py:
//
//   xin  = qdq(x, conv_scale)                         int8 op only: the conv input's quant point
//   seq  = [conv_state | xin]                          per channel, along time; conv_state_out = its last K-1
//   xc   = silu(depthwise causal conv(seq) + conv_b)
//   u    = q(xc, x_scale)                              int8 (the scan's x and x_proj's input), else xc
//   dbc  = u x_proj_w^T                                (int8: int32 sums times x_scale * x_proj_scale[o])
//   dt_low, B, C = split(dbc, [R, N, N]); FalconMamba: each / rms (weightless, norm_eps)
//   delta = qdq(dt_low, dt_low_scale) dt_proj_w^T     (int8: q(., delta_scale)); B, C -> q(., B/C_scale)
//   y, ssm_state_out = selective scan of (u, delta, A, B, C, D, z, delta_bias, gate_scale) from ssm_state
//
// Quantization as ONNX QuantizeLinear / DequantizeLinear (zero point 0): q = saturate_int8(round_half_even(
// v / scale)), v = q * scale. The scan is the library's own (mq_scan_cpu / scan_float_slice), so for the
// same int8 inputs it is bit-identical to mq::SelectiveScan.
#ifndef MQ_STATE_UPDATE_H_
#define MQ_STATE_UPDATE_H_

#include <cstdint>
#include <string>

namespace mq_scan {

struct Int8States;   // state_codec.h

struct StateUpdateParams {
  bool is_float;
  int64_t batch, seqlen, dim, dstate, dt_rank, dconv;   // b, L, Di, N, R, K
  const float *x;                                        // [b, L, Di]
  const int8_t *z_q;                                     // [b, L, Di] int8 op
  const float *z_f;                                      // [b, L, Di] float op
  const float *conv_state, *ssm_state;                   // [b, Di, K-1], [b, Di, N]
  const float *conv_w, *conv_b;                          // [Di, K], [Di]
  const int8_t *xw_q;                                    // [R + 2N, Di] int8 op, with xw_scale [R + 2N]
  const float *xw_scale, *xw_f;                          // xw_f [R + 2N, Di] float op
  const int8_t *dtw_q;                                   // [R, Di] int8 op, with dtw_scale [Di]
  const float *dtw_scale, *dtw_f;                        // dtw_f [R, Di] float op
  const float *delta_bias, *A, *D, *gate_scale;          // [Di], [Di, N], [Di], [Di]
  float conv_scale, x_scale, dt_low_scale, delta_scale, B_scale, C_scale, z_scale;   // int8 op
  float norm_eps;                                        // < 0: no dt/B/C norm
  float *y, *conv_state_out, *ssm_state_out;             // [b, L, Di], [b, Di, K-1], [b, Di, N]
  // int8 SSM states (mq::SelectiveStateUpdateInt8State), else NULL: ssm_state / ssm_state_out are its float
  // scratch, and each scan task decodes its channels' rows into it before its scan and encodes them after
  const Int8States *int8_ssm;
};

// Runs fn(user, i) for i in [0, n): the caller's thread pool (ORT's ParallelFor) or a plain loop. The tasks are
// noexcept (an exception on ORT's pool threads ends the process): they allocate nothing and report failures
// through flags that state_update reads after the pool returns.
using TaskFn = void (*)(void *user, size_t task) noexcept;
using ParallelFor = void (*)(void *pool, TaskFn fn, size_t n, void *user) noexcept;

constexpr int kStateUpdateInvalid = 1;   // the inputs are wrong (shapes, sizes): *error says how
constexpr int kStateUpdateNoMemory = 2;  // the scratch cannot be had: *error says how much

// 0 on success; else kStateUpdateInvalid or kStateUpdateNoMemory, with the message in *error. All scratch
// (b * L * (2 Di + 2 N + R) values, plus one x_proj row per task of pass B) is allocated here, on the
// calling thread, before any task runs; a size beyond the machine's physical memory is refused before
// allocating, a failed allocation is reported, never thrown.
int state_update(const StateUpdateParams &p, ParallelFor parallel_for, void *pool, std::string *error);

// Helpers of the fused updates (state_update.cpp): fn(user, i) for i < n on the calling thread; a * b, false when it
// overflows; the machine's physical memory in bytes (0: unknown); bytes as "x.y GiB".
void serial_for(void *pool, TaskFn fn, size_t n, void *user) noexcept;
bool mul(size_t a, size_t b, size_t *out);
size_t physical_memory();
std::string gib(double bytes);

}  // namespace mq_scan

#endif  // MQ_STATE_UPDATE_H_
