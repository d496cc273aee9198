// ONNX Runtime custom ops of the Mamba2 scan (domain "mq", version 1): mq::SSDScan, mq::SSDScanFloat,
// mq::SSDStateUpdate, mq::SSDStateUpdateFloat and mq::SSDStateUpdateInt8State (contracts:
// mq_deploy/export/ssd_op.py and ssd_state_update_op.py). Registered by RegisterCustomOps in mq_scan_ort.cpp, beside the Mamba1 ops.
#ifndef MQ_SSD_OPS_H_
#define MQ_SSD_OPS_H_

#include <cstddef>

#include "mq_ort_api.h"

namespace mq_scan {

// The four ops (static, valid for the process' lifetime); `api` is the table they call (loaded once).
const mq_ort::OrtCustomOp *const *ssd_custom_ops(const mq_ort::Api *api, size_t *count) noexcept;

}  // namespace mq_scan

#endif  // MQ_SSD_OPS_H_
