// What every mq:: custom op of this library fills the same way: the CPU execution provider, required inputs
// and outputs in default memory, no variadics, versions 1 to open-ended, and the OrtCustomOp struct at our
// API level with every other field null. Each op then sets its name, types, counts, kernel and shape
// callbacks (mq_scan_ort.cpp, ssd_ops.cpp, qlinear_ops.cpp).
#ifndef MQ_ORT_OP_BASE_H_
#define MQ_ORT_OP_BASE_H_

#include <cstring>

#include "mq_ort_api.h"

namespace mq_scan {
namespace op_base {

inline const char *MQ_ORT_CALL cpu_ep(const mq_ort::OrtCustomOp *) noexcept { return "CPUExecutionProvider"; }
inline mq_ort::OrtCustomOpInputOutputCharacteristic MQ_ORT_CALL required(const mq_ort::OrtCustomOp *,
                                                                         size_t) noexcept {
  return mq_ort::INPUT_OUTPUT_REQUIRED;
}
inline mq_ort::OrtMemType MQ_ORT_CALL default_memory(const mq_ort::OrtCustomOp *, size_t) noexcept {
  return mq_ort::OrtMemTypeDefault;
}
inline int MQ_ORT_CALL one(const mq_ort::OrtCustomOp *) noexcept { return 1; }
inline int MQ_ORT_CALL start_version(const mq_ort::OrtCustomOp *) noexcept { return 1; }
inline int MQ_ORT_CALL end_version(const mq_ort::OrtCustomOp *) noexcept { return 1 << 30; }   // as ORT's default
inline mq_ort::ONNXTensorElementDataType MQ_ORT_CALL float_type(const mq_ort::OrtCustomOp *, size_t) noexcept {
  return mq_ort::ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
}

/* the shared fields filled; the op's own are left null for the caller */
inline mq_ort::OrtCustomOp base() {
  mq_ort::OrtCustomOp op;
  std::memset(&op, 0, sizeof op);   // the fields of API levels above kApiVersion stay null
  op.version = mq_ort::kApiVersion;
  op.GetExecutionProviderType = cpu_ep;
  op.GetInputCharacteristic = required;
  op.GetOutputCharacteristic = required;
  op.GetInputMemoryType = default_memory;
  op.GetVariadicInputMinArity = one;
  op.GetVariadicInputHomogeneity = one;
  op.GetVariadicOutputMinArity = one;
  op.GetVariadicOutputHomogeneity = one;
  op.GetStartVersion = start_version;
  op.GetEndVersion = end_version;
  return op;
}

}  // namespace op_base
}  // namespace mq_scan

#endif  // MQ_ORT_OP_BASE_H_
