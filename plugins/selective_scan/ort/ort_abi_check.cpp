// Compile-time check of mq_ort_api.h against a real onnxruntime_c_api.h (any release with API >= 17):
// every slot we read, every OrtCustomOp field we fill and every enum value we pass must sit where the
// real header puts it. Compiles to nothing; a mismatch is a static_assert failure naming the member.
//   c++ -std=c++17 -fsyntax-only -I ORT_INCLUDE_DIR -I plugins/selective_scan/ort ort_abi_check.cpp
#include <cstddef>

#include "onnxruntime_c_api.h"
#include "mq_ort_api.h"

static_assert(ORT_API_VERSION >= mq_ort::kApiVersion, "these headers are older than the API version we request");

#define MQ_CHECK_SLOT(slot, name, ret, params)                                                   \
  static_assert(offsetof(::OrtApi, name) == (slot) * sizeof(void *), "OrtApi slot of " #name); \
  static_assert((slot) * sizeof(void *) < sizeof(::OrtApi), #name);
MQ_ORT_API_FUNCTIONS(MQ_CHECK_SLOT)
#undef MQ_CHECK_SLOT

#define MQ_CHECK_FIELD(type, field) \
  static_assert(offsetof(::type, field) == offsetof(mq_ort::type, field), #type "::" #field);
MQ_CHECK_FIELD(OrtApiBase, GetApi)
MQ_CHECK_FIELD(OrtApiBase, GetVersionString)
static_assert(sizeof(::OrtApiBase) == sizeof(mq_ort::OrtApiBase), "OrtApiBase size");
MQ_CHECK_FIELD(OrtCustomOp, version)
MQ_CHECK_FIELD(OrtCustomOp, CreateKernel)
MQ_CHECK_FIELD(OrtCustomOp, GetName)
MQ_CHECK_FIELD(OrtCustomOp, GetExecutionProviderType)
MQ_CHECK_FIELD(OrtCustomOp, GetInputType)
MQ_CHECK_FIELD(OrtCustomOp, GetInputTypeCount)
MQ_CHECK_FIELD(OrtCustomOp, GetOutputType)
MQ_CHECK_FIELD(OrtCustomOp, GetOutputTypeCount)
MQ_CHECK_FIELD(OrtCustomOp, KernelCompute)
MQ_CHECK_FIELD(OrtCustomOp, KernelDestroy)
MQ_CHECK_FIELD(OrtCustomOp, GetInputCharacteristic)
MQ_CHECK_FIELD(OrtCustomOp, GetOutputCharacteristic)
MQ_CHECK_FIELD(OrtCustomOp, GetInputMemoryType)
MQ_CHECK_FIELD(OrtCustomOp, GetVariadicInputMinArity)
MQ_CHECK_FIELD(OrtCustomOp, GetVariadicInputHomogeneity)
MQ_CHECK_FIELD(OrtCustomOp, GetVariadicOutputMinArity)
MQ_CHECK_FIELD(OrtCustomOp, GetVariadicOutputHomogeneity)
MQ_CHECK_FIELD(OrtCustomOp, CreateKernelV2)
MQ_CHECK_FIELD(OrtCustomOp, KernelComputeV2)
MQ_CHECK_FIELD(OrtCustomOp, InferOutputShapeFn)
MQ_CHECK_FIELD(OrtCustomOp, GetStartVersion)
MQ_CHECK_FIELD(OrtCustomOp, GetEndVersion)
static_assert(sizeof(mq_ort::OrtCustomOp) == offsetof(::OrtCustomOp, GetEndVersion) + sizeof(void *),
              "our OrtCustomOp ends with the last field of API 17");
#undef MQ_CHECK_FIELD

#define MQ_CHECK_ENUM(name) static_assert(static_cast<long>(::name) == static_cast<long>(mq_ort::name), #name);
MQ_CHECK_ENUM(ORT_OK)
MQ_CHECK_ENUM(ORT_FAIL)
MQ_CHECK_ENUM(ORT_INVALID_ARGUMENT)
MQ_CHECK_ENUM(ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED)
MQ_CHECK_ENUM(ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT)
MQ_CHECK_ENUM(ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8)
MQ_CHECK_ENUM(ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8)
MQ_CHECK_ENUM(ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64)
MQ_CHECK_ENUM(ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16)
MQ_CHECK_ENUM(OrtMemTypeDefault)
MQ_CHECK_ENUM(INPUT_OUTPUT_REQUIRED)
MQ_CHECK_ENUM(INPUT_OUTPUT_OPTIONAL)
MQ_CHECK_ENUM(ORT_OP_ATTR_UNDEFINED)
MQ_CHECK_ENUM(ORT_OP_ATTR_INT)
MQ_CHECK_ENUM(ORT_OP_ATTR_INTS)
MQ_CHECK_ENUM(ORT_OP_ATTR_FLOAT)
#undef MQ_CHECK_ENUM
