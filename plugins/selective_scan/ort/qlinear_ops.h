// ONNX Runtime custom ops of the decode step's int8 linears (domain "mq", version 1): mq::QLinear (a static
// per-tensor int8 activation scale) and mq::DynamicQLinear (the int8 head's run-time uint8 activation scale).
// Contracts and function bodies: mq_deploy/export/qlinear_op.py. Registered by RegisterCustomOps in
// mq_scan_ort.cpp, only where their fast kernel runs (qlinear_fast(): AVX-512 VNNI) and MQ_ORT_QLINEAR is not
// "0"; otherwise ONNX Runtime inlines the function bodies and runs its own int8 kernels. MQ_ORT_QLINEAR=ref
// registers them anywhere with the plain-loop kernel (qlinear_block_ref), for parity tests and A/B timing.
#ifndef MQ_QLINEAR_OPS_H_
#define MQ_QLINEAR_OPS_H_

#include <cstddef>

#include "mq_ort_api.h"

namespace mq_scan {

// The ops to register (static, valid for the process' lifetime): *count is 2, or 0 where they are not offered.
const mq_ort::OrtCustomOp *const *qlinear_custom_ops(const mq_ort::Api *api, size_t *count) noexcept;

}  // namespace mq_scan

#endif  // MQ_QLINEAR_OPS_H_
