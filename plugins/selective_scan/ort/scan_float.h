// mq::SelectiveScanFloat on the CPU: the int8 kernel's twin (scan_cpu.cpp) reading float32 x, delta,
// B, C, z. Internal to libmq_scan_ort.so; the contract is the function body of
// mq_deploy/export/scan_op.py's selective_scan_float_function (and selective_scan_ref).
#ifndef MQ_SCAN_FLOAT_H_
#define MQ_SCAN_FLOAT_H_

#include <cstdint>

namespace mq_scan {

struct FloatScanParams {
  int64_t batch, seqlen, dim, dstate;
  const float *x, *delta, *B, *C, *z;   // [b, L, D], [b, L, D], [b, L, N], [b, L, N], [b, L, D]; contiguous
  const float *A, *D, *delta_bias, *gate_scale;   // [D, N], [D], [D], [D]
  const float *h0;                                // [b, D, N]
  float *y, *h_last;                              // [b, L, D], [b, D, N]
};

// Channels [d0, d0 + nd) of batch element b, single-threaded; nd <= 256. Runs on ORT's thread pool: never
// throws (no allocation).
void scan_float_slice(const FloatScanParams &p, int64_t b, int64_t d0, int64_t nd) noexcept;

}  // namespace mq_scan

#endif  // MQ_SCAN_FLOAT_H_
