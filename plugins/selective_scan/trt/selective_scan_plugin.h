/* TensorRT IPluginV3 wrapper of the int8 selective scan (mq::SelectiveScan, version 1).
 *
 * The plugin only checks shapes and types and fills an MQScanParams; the math lives in
 * libmq_scan_cuda (mq_scan_cuda / mq_scan_step_cuda). See README.md in this folder for the
 * inputs, outputs, attributes and how the ONNX parser finds this creator.
 */
#ifndef MQ_SELECTIVE_SCAN_TRT_PLUGIN_H_
#define MQ_SELECTIVE_SCAN_TRT_PLUGIN_H_

#include <NvInferRuntime.h>

#include <cstdint>
#include <string>
#include <vector>

namespace mq {
namespace trt {

/* Serialized plugin field (not an ONNX attribute, so not in the creator's field names): the enqueue
 * workspace size in bytes, as getWorkspaceSize returned it when the engine was built. */
constexpr char const* kWORKSPACE_FIELD = "workspace_bytes";

/* The ONNX parser looks the creator up by (node.op_type, attribute plugin_version or "1",
 * attribute plugin_namespace or ""); mq-deploy's TensorRT build writes plugin_namespace="mq" on
 * every mq::SelectiveScan node when it strips the function bodies. */
constexpr char const* kPLUGIN_NAME = "SelectiveScan";
constexpr char const* kPLUGIN_VERSION = "1";
constexpr char const* kPLUGIN_NAMESPACE = "mq";

/* Input and output positions, as in the ONNX node. */
enum ScanIO : int32_t {
  kIN_X = 0,
  kIN_DELTA = 1,
  kIN_A = 2,
  kIN_B = 3,
  kIN_C = 4,
  kIN_D = 5,
  kIN_Z = 6,
  kIN_DELTA_BIAS = 7,
  kIN_GATE_SCALE = 8,
  kIN_H0 = 9,
  kNB_INPUTS = 10,
  kOUT_Y = 0,
  kOUT_H_LAST = 1,
  kNB_OUTPUTS = 2,
};

/* ONNX TensorProto data types accepted by out_dtype. */
constexpr int32_t kONNX_FLOAT = 1;
constexpr int32_t kONNX_FLOAT16 = 10;

struct ScanAttributes {
  float x_scale{1.F};
  float delta_scale{1.F};
  float B_scale{1.F};
  float C_scale{1.F};
  float z_scale{1.F};
  int32_t out_dtype{kONNX_FLOAT};

  /* Empty string when valid, otherwise what is wrong (for the creator's error message). */
  std::string check() const;
  std::string describe() const;
};

class SelectiveScanPlugin final : public nvinfer1::IPluginV3,
                                  public nvinfer1::IPluginV3OneCore,
                                  public nvinfer1::IPluginV3OneBuild,
                                  public nvinfer1::IPluginV3OneRuntime {
 public:
  explicit SelectiveScanPlugin(ScanAttributes const& attrs);
  SelectiveScanPlugin(SelectiveScanPlugin const& other);
  SelectiveScanPlugin& operator=(SelectiveScanPlugin const&) = delete;
  ~SelectiveScanPlugin() override = default;

  // IPluginV3
  nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override;
  nvinfer1::IPluginV3* clone() noexcept override;

  // IPluginV3OneCore
  char const* getPluginName() const noexcept override;
  char const* getPluginVersion() const noexcept override;
  char const* getPluginNamespace() const noexcept override;

  // IPluginV3OneBuild
  int32_t configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
                          nvinfer1::DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept override;
  int32_t getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs,
                             nvinfer1::DataType const* inputTypes, int32_t nbInputs) const noexcept override;
  int32_t getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs,
                          nvinfer1::DimsExprs const* shapeInputs, int32_t nbShapeInputs,
                          nvinfer1::DimsExprs* outputs, int32_t nbOutputs,
                          nvinfer1::IExprBuilder& exprBuilder) noexcept override;
  bool supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
                                 int32_t nbOutputs) noexcept override;
  int32_t getNbOutputs() const noexcept override;
  size_t getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
                          nvinfer1::DynamicPluginTensorDesc const* outputs,
                          int32_t nbOutputs) const noexcept override;
  char const* getTimingCacheID() noexcept override;
  char const* getMetadataString() noexcept override;

  // IPluginV3OneRuntime
  int32_t onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs,
                        nvinfer1::PluginTensorDesc const* out, int32_t nbOutputs) noexcept override;
  int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
                  void const* const* inputs, void* const* outputs, void* workspace,
                  cudaStream_t stream) noexcept override;
  nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext* context) noexcept override;
  nvinfer1::PluginFieldCollection const* getFieldsToSerialize() noexcept override;

  /* Workspace bytes this plugin may use in enqueue: what getWorkspaceSize told TensorRT at build time
   * (serialized with the plugin as field "workspace_bytes"), never recomputed at run time. */
  size_t workspaceBytes() const noexcept { return mWorkspaceBytes > 0 ? static_cast<size_t>(mWorkspaceBytes) : 0; }
  void setWorkspaceBytes(int64_t bytes) noexcept { mWorkspaceBytes = bytes; }

 private:
  void buildFieldsToSerialize();
  void report(std::string const& where, std::string const& message) const noexcept;
  void recordWorkspace(size_t bytes) const noexcept;

  ScanAttributes mAttrs;
  /* -1 until a build-time query sized it (then the smallest size reported to TensorRT for any profile,
   * so never more than it allocated), or the serialized value at run time; mutable: getWorkspaceSize is const */
  mutable int64_t mWorkspaceBytes{-1};
  std::string mDescription;  // "x_scale=... out_dtype=1": timing cache id and engine-inspector metadata
  std::vector<nvinfer1::PluginField> mFields;
  nvinfer1::PluginFieldCollection mFieldCollection{};
  nvinfer1::IErrorRecorder* mErrorRecorder{nullptr};  // set by attachToContext (runtime only)
};

class SelectiveScanPluginCreator final : public nvinfer1::IPluginCreatorV3One {
 public:
  SelectiveScanPluginCreator();
  ~SelectiveScanPluginCreator() override = default;

  nvinfer1::IPluginV3* createPlugin(char const* name, nvinfer1::PluginFieldCollection const* fc,
                                    nvinfer1::TensorRTPhase phase) noexcept override;
  nvinfer1::PluginFieldCollection const* getFieldNames() noexcept override;
  char const* getPluginName() const noexcept override;
  char const* getPluginVersion() const noexcept override;
  char const* getPluginNamespace() const noexcept override;

 private:
  std::vector<nvinfer1::PluginField> mFieldNames;
  nvinfer1::PluginFieldCollection mFieldNameCollection{};
};

/* The last error this library reported on the calling thread ("" if none); also sent to the
 * TensorRT logger. */
char const* lastError() noexcept;
/* Reports an error of either plugin: the calling thread's last error, and the logger TensorRT handed over
 * through setLoggerFinder (stderr if none). */
void logError(std::string const& message) noexcept;

}  // namespace trt
}  // namespace mq

/* TENSORRTAPI only exports when building libnvinfer itself (TENSORRT_BUILD_LIB); the library is
 * compiled with hidden visibility, so its entry points carry their own attribute. */
#if defined(_WIN32)
#define MQ_TRT_EXPORT __declspec(dllexport)
#else
#define MQ_TRT_EXPORT __attribute__((visibility("default")))
#endif

/* Entry points TensorRT looks up in a plugin library loaded with IPluginRegistry::loadLibrary,
 * trtexec --dynamicPlugins or tensorrt.get_plugin_registry().load_library(). */
extern "C" MQ_TRT_EXPORT nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators);
extern "C" MQ_TRT_EXPORT void setLoggerFinder(nvinfer1::ILoggerFinder* finder);

/* For hosts that dlopen the library themselves (ctypes) instead of calling loadLibrary: registers
 * the creators (SelectiveScan and SSDScan, namespace "mq") with the process-wide registry of the libnvinfer
 * this library is linked to. Returns 0 on success (also when already registered), 1 otherwise. */
extern "C" MQ_TRT_EXPORT int32_t mq_scan_trt_register_creators(void);
extern "C" MQ_TRT_EXPORT char const* mq_scan_trt_last_error(void);

#endif  // MQ_SELECTIVE_SCAN_TRT_PLUGIN_H_
