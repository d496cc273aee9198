// What every mq:: custom op of this library fills the same way: the CPU execution provider, required inputs
// and outputs in default memory, no variadics, versions 1 to open-ended, and the OrtCustomOp struct at our
// API level with every other field null. Each op then sets its name, types, counts, kernel and shape
// callbacks (mq_scan_ort.cpp, ssd_ops.cpp, qlinear_ops.cpp). Also what their callbacks share: the exception
// guard (guarded) and the output-shape helper of their shape inference (copy_shape).
#ifndef MQ_ORT_OP_BASE_H_
#define MQ_ORT_OP_BASE_H_

#include <atomic>
#include <cstdint>
#include <cstring>
#include <string>

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

/* f() for a callback ORT calls (noexcept: nothing may unwind into ORT): an exception it throws (bad_alloc, or a
 * std::string's) becomes an ORT_FAIL status `what`, a literal, so that reporting it allocates nothing of ours */
template <class F>
mq_ort::OrtStatus *guarded(const mq_ort::Api *api, const char *what, F &&f) noexcept {
  try {
    return f();
  } catch (...) {
    return api->CreateStatus(mq_ort::ORT_FAIL, what);
  }
}

/* A new type-and-shape for an output: `like`'s dims (values and symbolic names) without its first `skip`, dim
 * `set_dim` of those (when >= 0) set to `set_value`, element type `type`. ORT writes an unnamed dim as its value
 * (-1 when unknown): the unknown ones get a unique name (`prefix` + a counter), so that they stay unknown
 * downstream. A rank above `max_rank` (<= 8) or below `skip` is INVALID_ARGUMENT "`op`: an input has rank R". */
inline mq_ort::OrtStatus *copy_shape(const mq_ort::Api *api, const char *op, const char *prefix,
                                     const mq_ort::OrtTensorTypeAndShapeInfo *like,
                                     mq_ort::ONNXTensorElementDataType type, size_t skip, int64_t set_dim,
                                     int64_t set_value, size_t max_rank, mq_ort::OrtTensorTypeAndShapeInfo **out) {
  static std::atomic<uint64_t> unnamed{0};
  size_t full = 0;
  mq_ort::OrtStatus *st = api->GetDimensionsCount(like, &full);
  if (st) return st;
  if (full > max_rank || full > 8 || full < skip)
    return api->CreateStatus(mq_ort::ORT_INVALID_ARGUMENT,
                             (std::string(op) + ": an input has rank " + std::to_string(full)).c_str());
  int64_t all_dims[8];
  const char *all_names[8] = {nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr};
  if ((st = api->GetDimensions(like, all_dims, full))) return st;
  if ((st = api->GetSymbolicDimensions(like, all_names, full))) return st;
  const size_t rank = full - skip;
  int64_t *dims = all_dims + skip;
  const char **names = all_names + skip;
  if (set_dim >= 0 && static_cast<size_t>(set_dim) < rank) {
    dims[set_dim] = set_value;
    names[set_dim] = "";
  }
  std::string fresh[8];
  for (size_t i = 0; i < rank; ++i)
    if (dims[i] < 0 && (names[i] == nullptr || names[i][0] == '\0')) {
      fresh[i] = prefix + std::to_string(unnamed.fetch_add(1));
      names[i] = fresh[i].c_str();
    }
  if ((st = api->CreateTensorTypeAndShapeInfo(out))) return st;
  if (!(st = api->SetTensorElementType(*out, type)) && !(st = api->SetDimensions(*out, dims, rank)))
    st = api->SetSymbolicDimensions(*out, names, rank);
  if (st) {
    api->ReleaseTensorTypeAndShapeInfo(*out);
    *out = nullptr;
  }
  return st;
}

}  // namespace op_base
}  // namespace mq_scan

#endif  // MQ_ORT_OP_BASE_H_
