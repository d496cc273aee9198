/* The subset of ONNX Runtime's C API (onnxruntime_c_api.h) that libmq_scan_ort.so uses, declared here.
 *
 * Why our own declarations: no registry we can reach ships ORT's headers, so `pip install` could not
 * build the custom-op library. What a custom-op library needs from the header is a public, versioned
 * ABI fact:
 *   - OrtApiBase: two function pointers, GetApi(version) and GetVersionString().
 *   - OrtApi: an append-only table of function pointers; GetApi(v) returns one whose first slots are
 *     those of every release up to v. A function's position (slot) never changes. We read the slots we
 *     call by index, into typed pointers (mq_ort::Api below), and never touch one added after
 *     kApiVersion.
 *   - OrtCustomOp: a struct we fill, whose fields ORT reads up to its `version`; the fields of API
 *     versions 1..17 are declared below in their order.
 *   - The enum values we pass (element types, error codes, ...).
 * Slot indices and layouts follow the order of declarations in onnxruntime_c_api.h (ORT's public API
 * reference documents the OrtApi members in that order, with the version each was added in). They are
 * checked against the real header by ort_abi_check.cpp (static_asserts, compiled by the tests and by
 * CMake whenever ONNXRUNTIME_INCLUDE_DIR points at one) and exercised at run time by
 * tests/test_ort_custom_op.py in the onnxruntime from PyPI.
 *
 * Everything lives in namespace mq_ort, so that this header and the real one can be included in one
 * translation unit (the check does exactly that).
 */
#ifndef MQ_ORT_API_H_
#define MQ_ORT_API_H_

#include <cstddef>
#include <cstdint>

#if defined(_WIN32)
#define MQ_ORT_CALL __stdcall
#else
#define MQ_ORT_CALL
#endif

namespace mq_ort {

/* The API version we request: ORT >= 1.17 (KernelContext_ParallelFor, InferOutputShapeFn, custom-op
 * GetStartVersion/GetEndVersion and the ShapeInferContext functions are of 1.17). */
constexpr uint32_t kApiVersion = 17;

struct OrtStatus;
struct OrtValue;
struct OrtTensorTypeAndShapeInfo;
struct OrtKernelInfo;
struct OrtKernelContext;
struct OrtShapeInferContext;
struct OrtOpAttr;
struct OrtCustomOpDomain;
struct OrtSessionOptions;
struct OrtApi;   /* opaque here: read through Api::load */

enum OrtErrorCode { ORT_OK = 0, ORT_FAIL = 1, ORT_INVALID_ARGUMENT = 2 };

enum ONNXTensorElementDataType {
  ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED = 0,
  ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT = 1,
  ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8 = 2,
  ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8 = 3,
  ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64 = 7,
  ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16 = 10,
};

enum OrtMemType { OrtMemTypeDefault = 0 };
enum OrtCustomOpInputOutputCharacteristic { INPUT_OUTPUT_REQUIRED = 0, INPUT_OUTPUT_OPTIONAL = 1 };
enum OrtOpAttrType { ORT_OP_ATTR_UNDEFINED = 0, ORT_OP_ATTR_INT = 1, ORT_OP_ATTR_INTS = 2, ORT_OP_ATTR_FLOAT = 3 };

struct OrtApiBase {
  const OrtApi *(MQ_ORT_CALL *GetApi)(uint32_t version) noexcept;
  const char *(MQ_ORT_CALL *GetVersionString)(void) noexcept;
};

/* Fields of API versions 1..17, in the header's order. ORT reads only the fields of the version we
 * put in `version` (later ones: GetMayInplace 18, GetAliasMap 20, ... are never read). */
struct OrtCustomOp {
  uint32_t version;
  void *(MQ_ORT_CALL *CreateKernel)(const OrtCustomOp *op, const OrtApi *api, const OrtKernelInfo *info) noexcept;
  const char *(MQ_ORT_CALL *GetName)(const OrtCustomOp *op) noexcept;
  const char *(MQ_ORT_CALL *GetExecutionProviderType)(const OrtCustomOp *op) noexcept;
  ONNXTensorElementDataType(MQ_ORT_CALL *GetInputType)(const OrtCustomOp *op, size_t index) noexcept;
  size_t(MQ_ORT_CALL *GetInputTypeCount)(const OrtCustomOp *op) noexcept;
  ONNXTensorElementDataType(MQ_ORT_CALL *GetOutputType)(const OrtCustomOp *op, size_t index) noexcept;
  size_t(MQ_ORT_CALL *GetOutputTypeCount)(const OrtCustomOp *op) noexcept;
  void(MQ_ORT_CALL *KernelCompute)(void *op_kernel, OrtKernelContext *context) noexcept;
  void(MQ_ORT_CALL *KernelDestroy)(void *op_kernel) noexcept;
  OrtCustomOpInputOutputCharacteristic(MQ_ORT_CALL *GetInputCharacteristic)(const OrtCustomOp *op, size_t index) noexcept;
  OrtCustomOpInputOutputCharacteristic(MQ_ORT_CALL *GetOutputCharacteristic)(const OrtCustomOp *op, size_t index) noexcept;
  OrtMemType(MQ_ORT_CALL *GetInputMemoryType)(const OrtCustomOp *op, size_t index) noexcept;
  int(MQ_ORT_CALL *GetVariadicInputMinArity)(const OrtCustomOp *op) noexcept;
  int(MQ_ORT_CALL *GetVariadicInputHomogeneity)(const OrtCustomOp *op) noexcept;
  int(MQ_ORT_CALL *GetVariadicOutputMinArity)(const OrtCustomOp *op) noexcept;
  int(MQ_ORT_CALL *GetVariadicOutputHomogeneity)(const OrtCustomOp *op) noexcept;
  OrtStatus *(MQ_ORT_CALL *CreateKernelV2)(const OrtCustomOp *op, const OrtApi *api, const OrtKernelInfo *info,
                                           void **kernel) noexcept;
  OrtStatus *(MQ_ORT_CALL *KernelComputeV2)(void *op_kernel, OrtKernelContext *context) noexcept;
  OrtStatus *(MQ_ORT_CALL *InferOutputShapeFn)(const OrtCustomOp *op, OrtShapeInferContext *ctx) noexcept;
  int(MQ_ORT_CALL *GetStartVersion)(const OrtCustomOp *op) noexcept;
  int(MQ_ORT_CALL *GetEndVersion)(const OrtCustomOp *op) noexcept;
};

/* X(slot, name, return type, parameters): every OrtApi function we call, at its slot (index of the
 * function pointer in the table). All slots are < 275, i.e. within API version 17. */
#define MQ_ORT_API_FUNCTIONS(X)                                                                            \
  X(0, CreateStatus, OrtStatus *, (OrtErrorCode code, const char *msg))                                     \
  X(1, GetErrorCode, OrtErrorCode, (const OrtStatus *status))                                               \
  X(2, GetErrorMessage, const char *, (const OrtStatus *status))                                            \
  X(26, CreateCustomOpDomain, OrtStatus *, (const char *domain, OrtCustomOpDomain **out))                   \
  X(27, CustomOpDomain_Add, OrtStatus *, (OrtCustomOpDomain * domain, const OrtCustomOp *op))               \
  X(28, AddCustomOpDomain, OrtStatus *, (OrtSessionOptions * options, OrtCustomOpDomain *domain))           \
  X(51, GetTensorMutableData, OrtStatus *, (OrtValue * value, void **out))                                  \
  X(57, CreateTensorTypeAndShapeInfo, OrtStatus *, (OrtTensorTypeAndShapeInfo * *out))                      \
  X(58, SetTensorElementType, OrtStatus *, (OrtTensorTypeAndShapeInfo * info, ONNXTensorElementDataType t)) \
  X(59, SetDimensions, OrtStatus *, (OrtTensorTypeAndShapeInfo * info, const int64_t *dims, size_t count))  \
  X(60, GetTensorElementType, OrtStatus *, (const OrtTensorTypeAndShapeInfo *info, ONNXTensorElementDataType *out)) \
  X(61, GetDimensionsCount, OrtStatus *, (const OrtTensorTypeAndShapeInfo *info, size_t *out))              \
  X(62, GetDimensions, OrtStatus *, (const OrtTensorTypeAndShapeInfo *info, int64_t *dims, size_t count))   \
  X(63, GetSymbolicDimensions, OrtStatus *, (const OrtTensorTypeAndShapeInfo *info, const char *names[], size_t count)) \
  X(65, GetTensorTypeAndShape, OrtStatus *, (const OrtValue *value, OrtTensorTypeAndShapeInfo **out))       \
  X(85, KernelInfoGetAttribute_float, OrtStatus *, (const OrtKernelInfo *info, const char *name, float *out)) \
  X(86, KernelInfoGetAttribute_int64, OrtStatus *, (const OrtKernelInfo *info, const char *name, int64_t *out)) \
  X(88, KernelContext_GetInputCount, OrtStatus *, (const OrtKernelContext *ctx, size_t *out))               \
  X(89, KernelContext_GetOutputCount, OrtStatus *, (const OrtKernelContext *ctx, size_t *out))              \
  X(90, KernelContext_GetInput, OrtStatus *, (const OrtKernelContext *ctx, size_t index, const OrtValue **out)) \
  X(91, KernelContext_GetOutput, OrtStatus *,                                                               \
    (OrtKernelContext * ctx, size_t index, const int64_t *dims, size_t count, OrtValue **out))              \
  X(93, ReleaseStatus, void, (OrtStatus * status))                                                          \
  X(99, ReleaseTensorTypeAndShapeInfo, void, (OrtTensorTypeAndShapeInfo * info))                            \
  X(162, KernelInfoGetAttributeArray_float, OrtStatus *,                                                    \
    (const OrtKernelInfo *info, const char *name, float *out, size_t *size))                                \
  X(249, KernelInfoGetConstantInput_tensor, OrtStatus *,                                                    \
    (const OrtKernelInfo *info, size_t index, int *is_constant, const OrtValue **out))                      \
  X(268, ShapeInferContext_GetInputTypeShape, OrtStatus *,                                                  \
    (const OrtShapeInferContext *ctx, size_t index, OrtTensorTypeAndShapeInfo **info))                      \
  X(269, ShapeInferContext_GetAttribute, OrtStatus *,                                                       \
    (const OrtShapeInferContext *ctx, const char *name, const OrtOpAttr **attr))                            \
  X(270, ShapeInferContext_SetOutputTypeShape, OrtStatus *,                                                 \
    (const OrtShapeInferContext *ctx, size_t index, const OrtTensorTypeAndShapeInfo *info))                 \
  X(271, SetSymbolicDimensions, OrtStatus *, (OrtTensorTypeAndShapeInfo * info, const char *names[], size_t count)) \
  X(272, ReadOpAttr, OrtStatus *, (const OrtOpAttr *attr, OrtOpAttrType type, void *data, size_t len, size_t *out)) \
  X(274, KernelContext_ParallelFor, OrtStatus *,                                                            \
    (const OrtKernelContext *ctx, void (*fn)(void *, size_t), size_t total, size_t num_batch, void *user))

/* Typed pointers to the functions above, read from the table GetApi(kApiVersion) returned. */
struct Api {
#define MQ_ORT_FIELD(slot, name, ret, params) ret(MQ_ORT_CALL *name) params noexcept;
  MQ_ORT_API_FUNCTIONS(MQ_ORT_FIELD)
#undef MQ_ORT_FIELD

  /* Fills every field from `table` (an OrtApi of version >= kApiVersion). */
  void load(const OrtApi *table) {
    void *const *slots = reinterpret_cast<void *const *>(table);
#define MQ_ORT_LOAD(slot, name, ret, params) name = reinterpret_cast<decltype(name)>(slots[slot]);
    MQ_ORT_API_FUNCTIONS(MQ_ORT_LOAD)
#undef MQ_ORT_LOAD
  }
};

}  // namespace mq_ort

#endif  /* MQ_ORT_API_H_ */
