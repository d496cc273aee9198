/* TensorRT IPluginV3 wrapper of the int8 Mamba2 scan (mq::SSDScan, version 1), in libmq_scan_trt.so beside the
 * Mamba1 SelectiveScan plugin (whose library entry points, getCreators and friends, return both creators).
 *
 * The plugin only checks shapes, types and attributes and fills an MQSSDParams; the math lives in libmq_scan_cuda
 * (mq_ssd_cuda_ws / mq_ssd_step_cuda). See README.md in this folder for the inputs, outputs and attributes.
 */
#ifndef MQ_SSD_SCAN_TRT_PLUGIN_H_
#define MQ_SSD_SCAN_TRT_PLUGIN_H_

#include <NvInferRuntime.h>

#include <cstdint>
#include <string>
#include <vector>

namespace mq {
namespace trt {

constexpr char const* kSSD_PLUGIN_NAME = "SSDScan";
constexpr char const* kSSD_PLUGIN_VERSION = "1";

/* Input and output positions, as in the ONNX node. */
enum SSDIO : int32_t {
  kSSD_IN_X = 0,
  kSSD_IN_DT = 1,
  kSSD_IN_A = 2,
  kSSD_IN_B = 3,
  kSSD_IN_C = 4,
  kSSD_IN_D = 5,
  kSSD_IN_DT_BIAS = 6,
  kSSD_IN_H0 = 7,
  kSSD_NB_INPUTS = 8,
  kSSD_OUT_Y = 0,
  kSSD_OUT_H_LAST = 1,
  kSSD_NB_OUTPUTS = 2,
};

struct SSDAttributes {
  int32_t heads{0}, head_dim{0}, groups{0}, d_state{0}, chunk{256};
  float dt_min{0.F};
  float dt_max{0.F};   // set to +inf by the constructor of a creator's default (no limit)
  /* x, dt, B, C: one per-tensor scale, or one per channel of the tensor's last axis */
  std::vector<float> scale[4];

  SSDAttributes();
  /* channels of scale i's tensor: heads * head_dim, heads, groups * d_state, groups * d_state */
  int64_t channels(int32_t i) const;
  /* bytes of the per-channel scales that live on the device (0 when all four are per tensor), 256-aligned */
  size_t deviceScaleBytes() const;
  /* Empty string when valid, otherwise what is wrong (for the creator's error message). */
  std::string check() const;
  std::string describe() const;
};

class SSDScanPlugin final : public nvinfer1::IPluginV3,
                            public nvinfer1::IPluginV3OneCore,
                            public nvinfer1::IPluginV3OneBuild,
                            public nvinfer1::IPluginV3OneRuntime {
 public:
  explicit SSDScanPlugin(SSDAttributes const& attrs);
  SSDScanPlugin(SSDScanPlugin const& other);
  SSDScanPlugin& operator=(SSDScanPlugin const&) = delete;
  ~SSDScanPlugin() override;

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

  /* Workspace bytes enqueue may use: what getWorkspaceSize told TensorRT at build time (serialized as the field
   * "workspace_bytes"), never recomputed at run time. Per-channel scales without a device copy (a plugin that
   * was not attached to a context) take its first deviceScaleBytes(); the L-split scratch the rest. */
  size_t workspaceBytes() const noexcept { return mWorkspaceBytes > 0 ? static_cast<size_t>(mWorkspaceBytes) : 0; }
  void setWorkspaceBytes(int64_t bytes) noexcept { mWorkspaceBytes = bytes; }
  /* the device copy of the per-channel scales (attachToContext makes it), or nullptr */
  float const* deviceScales() const noexcept { return mDeviceScales; }

 private:
  void buildFieldsToSerialize();
  void report(std::string const& where, std::string const& message) const noexcept;
  void recordWorkspace(size_t bytes) const noexcept;

  SSDAttributes mAttrs;
  mutable int64_t mWorkspaceBytes{-1};   // as in SelectiveScanPlugin: the smallest size given, or the serialized one
  std::string mDescription;
  std::vector<float> mPacked;            // the per-channel scales, packed as on the device (x, dt, B, C)
  float* mDeviceScales{nullptr};         // owned; made by attachToContext when any scale is per channel
  std::vector<nvinfer1::PluginField> mFields;
  nvinfer1::PluginFieldCollection mFieldCollection{};
  nvinfer1::IErrorRecorder* mErrorRecorder{nullptr};
};

class SSDScanPluginCreator final : public nvinfer1::IPluginCreatorV3One {
 public:
  SSDScanPluginCreator();
  ~SSDScanPluginCreator() override = default;

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

/* the library's one SSDScan creator (registered with the SelectiveScan one, see selective_scan_plugin.cpp) */
SSDScanPluginCreator& ssdScanCreator();

}  // namespace trt
}  // namespace mq

#endif  // MQ_SSD_SCAN_TRT_PLUGIN_H_
