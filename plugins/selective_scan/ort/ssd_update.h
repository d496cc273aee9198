// mq::SSDStateUpdate and mq::SSDStateUpdateFloat on the CPU: a Mamba2 mixer's conv over x|B|C and its SSD scan
// for L >= 1 tokens that continue from the decode states, in one kernel (no ORT in here; the glue is in
// ssd_ops.cpp). The contract is the ops' function bodies in mq_deploy/export/ssd_state_update_op.py:
//
//   xin = qdq(xbc, conv_scale)                       int8 op only: the conv input's quant point
//   seq = [conv_state | xin]                         per channel, along time; conv_state_out = its last K-1
//   u   = silu(depthwise causal conv(seq) + conv_b)  then split x (H*P) | B (G*N) | C (G*N)
//   int8 op: x, B, C quantized (round half to even of v / scale, saturated; per tensor or per channel)
//   y, ssm_state_out = mq::SSDScan(x, dt, A, B, C, D, dt_bias, ssm_state)   (mq_ssd_cpu, libmq_scan_cpu.so)
#ifndef MQ_SSD_UPDATE_H_
#define MQ_SSD_UPDATE_H_

#include <cstdint>
#include <string>

#include "mq_ssd.h"
#include "state_update.h"   // TaskFn, ParallelFor, kStateUpdateInvalid, kStateUpdateNoMemory

namespace mq_scan {

struct Int8States;   // state_codec.h

struct SSDUpdateParams {
  bool is_float;
  int64_t batch, seqlen, heads, head_dim, groups, dstate, dconv;   // b, L, H, P, G, N, K
  const float *xbc;                                 // [b, L, Cd], Cd = H*P + 2*G*N
  const void *dt;                                   // [b, L, H]: int8 (op) or float (Float op)
  const float *conv_state, *ssm_state;              // one layer: [b, Cd, K-1], [b, H, P, N]
  const float *conv_w, *conv_b;                     // [Cd, K], [Cd]
  const float *A, *D, *dt_bias;                     // [H]
  float dt_min, dt_max;
  // int8 op: the conv input's scale, and the scan's (per tensor, or per channel when the pointer is non-NULL)
  float conv_scale, x_scale, dt_scale, B_scale, C_scale;
  const float *x_scales, *dt_scales, *B_scales, *C_scales;
  float *y, *conv_state_out, *ssm_state_out;        // [b, L, H*P], [b, Cd, K-1], [b, H, P, N]
  // int8 SSM states (mq::SSDStateUpdateInt8State), else NULL: ssm_state / ssm_state_out are then unused, and each
  // (batch, head) task decodes its head's rows a few at a time into a buffer of its own, scans them, and encodes
  // them
  const Int8States *int8_ssm;
};

// The SSD scan of validated params (mq_ssd_validate) as one task per (batch, head), each a single-threaded
// mq_ssd_cpu call on that head's slice: fn(user, i) through parallel_for (ORT's pool: the tasks are noexcept and
// allocate nothing). Returns 0, or the first nonzero return code of a task.
int ssd_scan_heads(const MQSSDParams &s, ParallelFor parallel_for, void *pool, const Int8States *int8_ssm = nullptr);

// 0 on success; else kStateUpdateInvalid or kStateUpdateNoMemory with the message in *error. The scratch (the
// quantized x|B|C of every token, b * L * Cd values) is allocated here on the calling thread before any task
// runs; the tasks allocate nothing and report through flags read after the pool returns.
int ssd_state_update(const SSDUpdateParams &p, ParallelFor parallel_for, void *pool, std::string *error);

}  // namespace mq_scan

#endif  // MQ_SSD_UPDATE_H_
