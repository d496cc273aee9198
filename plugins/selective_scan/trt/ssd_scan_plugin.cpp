/* TensorRT IPluginV3 wrapper of the int8 Mamba2 scan (mq::SSDScan). Glue only: check, fill MQSSDParams, call the
 * CUDA library. Every TensorRT entry point is noexcept and catches everything; errors go to the TensorRT logger
 * (and the context's error recorder at run time) and come back as a non-zero status or nullptr.
 *
 * Per-channel scales: the kernel reads them on the device. attachToContext (the run-time clone of each execution
 * context) copies them to device memory it owns; a plugin enqueued without that copy (TensorRT timing a
 * build-phase clone, say) copies them into the head of its workspace on the stream instead, which
 * getWorkspaceSize reserves. Per-tensor scales (what the exporter writes by default) travel in the params.
 */
#include "ssd_scan_plugin.h"

#include "selective_scan_plugin.h"   // logError, kPLUGIN_NAMESPACE, kWORKSPACE_FIELD, MQ_TRT_EXPORT
#include "mq_ssd.h"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <limits>
#include <sstream>

using nvinfer1::DataType;
using nvinfer1::Dims;
using nvinfer1::DimsExprs;
using nvinfer1::DynamicPluginTensorDesc;
using nvinfer1::IPluginCapability;
using nvinfer1::IPluginV3;
using nvinfer1::PluginCapabilityType;
using nvinfer1::PluginField;
using nvinfer1::PluginFieldCollection;
using nvinfer1::PluginFieldType;
using nvinfer1::PluginTensorDesc;
using nvinfer1::TensorFormat;

namespace mq {
namespace trt {
namespace {

char const* const kScaleNames[4] = {"x_scale", "dt_scale", "B_scale", "C_scale"};
char const* const kSSDNames[kSSD_NB_INPUTS + kSSD_NB_OUTPUTS] = {"x", "dt", "A", "B", "C", "D", "dt_bias", "h0",
                                                                 "y", "h_last"};
int32_t const kSSDRanks[kSSD_NB_INPUTS] = {3, 3, 1, 3, 3, 1, 1, 4};
constexpr int64_t kMaxSize = int64_t{1} << 20;

bool isInt8(int32_t pos) { return pos == kSSD_IN_X || pos == kSSD_IN_DT || pos == kSSD_IN_B || pos == kSSD_IN_C; }

DataType expectedType(int32_t pos) {
  return pos < kSSD_NB_INPUTS && isInt8(pos) ? DataType::kINT8 : DataType::kFLOAT;
}

char const* typeName(DataType t) {
  switch (t) {
    case DataType::kFLOAT: return "float32";
    case DataType::kHALF: return "float16";
    case DataType::kINT8: return "int8";
    case DataType::kINT32: return "int32";
    default: return "another type";
  }
}

std::string dimsToString(Dims const& d) {
  std::ostringstream os;
  os << "[";
  for (int32_t i = 0; i < d.nbDims; ++i) os << (i ? "," : "") << d.d[i];
  os << "]";
  return os.str();
}

bool agree(int64_t a, int64_t b) { return a < 0 || b < 0 || a == b; }

/* ranks and extents against x's [b, L] and the attributes; -1 (a runtime dimension) agrees with anything */
std::string checkShapes(Dims const* dims, SSDAttributes const& a) {
  std::ostringstream err;
  for (int32_t i = 0; i < kSSD_NB_INPUTS; ++i)
    if (dims[i].nbDims != kSSDRanks[i]) {
      err << "input " << i << " (" << kSSDNames[i] << ") must have rank " << kSSDRanks[i] << ", got "
          << dimsToString(dims[i]);
      return err.str();
    }
  int64_t const b = dims[kSSD_IN_X].d[0], L = dims[kSSD_IN_X].d[1];
  int64_t const H = a.heads, P = a.head_dim, GN = int64_t{a.groups} * a.d_state;
  struct {
    int32_t i;
    int64_t want[4];
  } const rules[] = {{kSSD_IN_X, {b, L, H * P}},      {kSSD_IN_DT, {b, L, H}}, {kSSD_IN_A, {H}},
                     {kSSD_IN_B, {b, L, GN}},          {kSSD_IN_C, {b, L, GN}}, {kSSD_IN_D, {H}},
                     {kSSD_IN_DT_BIAS, {H}},           {kSSD_IN_H0, {b, H, P, a.d_state}}};
  for (auto const& r : rules) {
    Dims const& d = dims[r.i];
    for (int32_t k = 0; k < d.nbDims; ++k)
      if (!agree(d.d[k], r.want[k])) {
        Dims w = d;
        for (int32_t j = 0; j < d.nbDims; ++j) w.d[j] = r.want[j];
        err << "input " << kSSDNames[r.i] << " has shape " << dimsToString(d) << ", expected " << dimsToString(w)
            << " from x " << dimsToString(dims[kSSD_IN_X]) << " and the attributes heads=" << a.heads
            << " head_dim=" << a.head_dim << " groups=" << a.groups << " d_state=" << a.d_state;
        return err.str();
      }
  }
  return {};
}

std::string checkTypes(DataType const* types, int32_t n) {
  for (int32_t i = 0; i < n; ++i) {
    DataType const want = expectedType(i);
    if (types[i] != want) {
      std::ostringstream err;
      err << (i < kSSD_NB_INPUTS ? "input " : "output ") << kSSDNames[i] << " is " << typeName(types[i])
          << ", expected " << typeName(want);
      if (i < kSSD_NB_INPUTS && isInt8(i)) err << " (feed the scan from a QuantizeLinear, never from a DequantizeLinear)";
      return err.str();
    }
  }
  return {};
}

/* the scan's params from the attributes (sizes and pointers filled by the caller); scales: device copy or NULL */
void fillAttributes(SSDAttributes const& a, float const* deviceScales, MQSSDParams* p) {
  p->heads = a.heads, p->head_dim = a.head_dim, p->groups = a.groups, p->dstate = a.d_state;
  p->in_float = 0;
  p->dt_min = a.dt_min, p->dt_max = a.dt_max;
  float* value[4] = {&p->x_scale, &p->dt_scale, &p->B_scale, &p->C_scale};
  float const** array[4] = {&p->x_scales, &p->dt_scales, &p->B_scales, &p->C_scales};
  size_t offset = 0;
  for (int32_t i = 0; i < 4; ++i) {
    if (a.scale[i].size() == 1) {
      *value[i] = a.scale[i][0];
      *array[i] = nullptr;
    } else {
      *value[i] = 1.F;
      *array[i] = deviceScales != nullptr ? deviceScales + offset : nullptr;
      offset += a.scale[i].size();
    }
  }
}

/* Workspace of a build profile: the device scales' slot plus the L-split scratch, the largest over the profile's
 * batch range at its longest sequence (enqueue never allocates). */
size_t workspaceForProfile(SSDAttributes const& a, DynamicPluginTensorDesc const* inputs, int32_t nbInputs) noexcept {
  if (inputs == nullptr || nbInputs != kSSD_NB_INPUTS) return 0;
  Dims const& lo = inputs[kSSD_IN_X].min;
  Dims const& hi = inputs[kSSD_IN_X].max;
  if (hi.nbDims != 3) return 0;
  MQSSDParams p;
  std::memset(&p, 0, sizeof p);
  fillAttributes(a, nullptr, &p);
  p.seqlen = hi.d[1];
  size_t most = 0;
  int64_t const b0 = lo.nbDims == 3 && lo.d[0] > 0 ? lo.d[0] : 1;
  for (int64_t b = b0; b <= hi.d[0] && b < b0 + 4096; ++b) {
    p.batch = b;
    size_t const need = mq_ssd_cuda_workspace_size(&p);
    if (need > most) most = need;
  }
  return a.deviceScaleBytes() + most;
}

}  // namespace

/* ---- attributes ---------------------------------------------------------------------------------------- */

SSDAttributes::SSDAttributes() : dt_max(std::numeric_limits<float>::infinity()) {}

int64_t SSDAttributes::channels(int32_t i) const {
  return i == 0 ? int64_t{heads} * head_dim : i == 1 ? int64_t{heads} : int64_t{groups} * d_state;
}

size_t SSDAttributes::deviceScaleBytes() const {
  size_t n = 0;
  for (int32_t i = 0; i < 4; ++i)
    if (scale[i].size() > 1) n += scale[i].size();
  return (n * sizeof(float) + 255) / 256 * 256;
}

std::string SSDAttributes::check() const {
  std::ostringstream err;
  struct {
    char const* name;
    int32_t v;
  } const sizes[] = {{"heads", heads}, {"head_dim", head_dim}, {"groups", groups}, {"d_state", d_state}, {"chunk", chunk}};
  for (auto const& s : sizes)
    if (s.v < 1 || s.v > kMaxSize) {
      err << s.name << " must be in [1, " << kMaxSize << "], got " << s.v;
      return err.str();
    }
  if (heads % groups != 0) {
    err << "heads (" << heads << ") is not a multiple of groups (" << groups << ")";
    return err.str();
  }
  if (d_state > MQ_SSD_MAX_DSTATE) {
    err << "d_state " << d_state << " exceeds the kernel's maximum " << MQ_SSD_MAX_DSTATE;
    return err.str();
  }
  if (!(std::isfinite(dt_min) && dt_min >= 0.F)) {
    err << "dt_min must be finite and >= 0, got " << dt_min;
    return err.str();
  }
  if (!(dt_max > 0.F)) {
    err << "dt_max must be > 0 (inf: no limit), got " << dt_max;
    return err.str();
  }
  for (int32_t i = 0; i < 4; ++i) {
    int64_t const n = static_cast<int64_t>(scale[i].size());
    if (n != 1 && n != channels(i)) {
      err << kScaleNames[i] << " has " << n << " values; expected 1 (per tensor) or " << channels(i)
          << " (one per channel)";
      return err.str();
    }
    for (int64_t k = 0; k < n; ++k)
      if (!(std::isfinite(scale[i][k]) && scale[i][k] > 0.F)) {
        err << kScaleNames[i] << "[" << k << "] must be a finite positive float, got " << scale[i][k];
        return err.str();
      }
  }
  return {};
}

std::string SSDAttributes::describe() const {
  std::ostringstream os;
  os.precision(9);
  os << "heads=" << heads << " head_dim=" << head_dim << " groups=" << groups << " d_state=" << d_state
     << " chunk=" << chunk << " dt_min=" << dt_min << " dt_max=" << dt_max;
  for (int32_t i = 0; i < 4; ++i) {
    os << " " << kScaleNames[i] << "=";
    if (scale[i].size() == 1) {
      os << scale[i][0];
    } else {   // per channel: the count and a checksum, so that differing scales time separately
      double sum = 0;
      for (size_t k = 0; k < scale[i].size(); ++k) sum += scale[i][k] * static_cast<double>(k + 1);
      os << "[" << scale[i].size() << " values, weighted sum " << sum << "]";
    }
  }
  return os.str();
}

/* ---- plugin ---------------------------------------------------------------------------------------------- */

SSDScanPlugin::SSDScanPlugin(SSDAttributes const& attrs) : mAttrs(attrs), mDescription(attrs.describe()) {
  for (int32_t i = 0; i < 4; ++i)
    if (mAttrs.scale[i].size() > 1) mPacked.insert(mPacked.end(), mAttrs.scale[i].begin(), mAttrs.scale[i].end());
  buildFieldsToSerialize();
}

/* The fields point into this object, so a copy rebuilds them; the device scales belong to the original. */
SSDScanPlugin::SSDScanPlugin(SSDScanPlugin const& other)
    : nvinfer1::IPluginV3(other),
      nvinfer1::IPluginV3OneCore(other),
      nvinfer1::IPluginV3OneBuild(other),
      nvinfer1::IPluginV3OneRuntime(other),
      mAttrs(other.mAttrs),
      mWorkspaceBytes(other.mWorkspaceBytes),
      mDescription(other.mDescription),
      mPacked(other.mPacked),
      mErrorRecorder(other.mErrorRecorder) {
  buildFieldsToSerialize();
}

SSDScanPlugin::~SSDScanPlugin() {
  if (mDeviceScales != nullptr) (void)cudaFree(mDeviceScales);
}

void SSDScanPlugin::buildFieldsToSerialize() {
  mFields.clear();
  for (int32_t i = 0; i < 4; ++i)
    mFields.emplace_back(kScaleNames[i], mAttrs.scale[i].data(), PluginFieldType::kFLOAT32,
                         static_cast<int32_t>(mAttrs.scale[i].size()));
  mFields.emplace_back("heads", &mAttrs.heads, PluginFieldType::kINT32, 1);
  mFields.emplace_back("head_dim", &mAttrs.head_dim, PluginFieldType::kINT32, 1);
  mFields.emplace_back("groups", &mAttrs.groups, PluginFieldType::kINT32, 1);
  mFields.emplace_back("d_state", &mAttrs.d_state, PluginFieldType::kINT32, 1);
  mFields.emplace_back("chunk", &mAttrs.chunk, PluginFieldType::kINT32, 1);
  mFields.emplace_back("dt_min", &mAttrs.dt_min, PluginFieldType::kFLOAT32, 1);
  mFields.emplace_back("dt_max", &mAttrs.dt_max, PluginFieldType::kFLOAT32, 1);
  // points at the member: a size recorded after construction (getWorkspaceSize) is what gets serialized
  mFields.emplace_back(kWORKSPACE_FIELD, &mWorkspaceBytes, PluginFieldType::kINT64, 1);
  mFieldCollection.nbFields = static_cast<int32_t>(mFields.size());
  mFieldCollection.fields = mFields.data();
}

void SSDScanPlugin::report(std::string const& where, std::string const& message) const noexcept {
  try {
    std::string const full = std::string(kPLUGIN_NAMESPACE) + "::" + kSSD_PLUGIN_NAME + " " + where + ": " + message;
    logError(full);
    if (mErrorRecorder != nullptr) mErrorRecorder->reportError(nvinfer1::ErrorCode::kUNSPECIFIED_ERROR, full.c_str());
  } catch (...) {
  }
}

IPluginCapability* SSDScanPlugin::getCapabilityInterface(PluginCapabilityType type) noexcept {
  switch (type) {
    case PluginCapabilityType::kCORE: return static_cast<nvinfer1::IPluginV3OneCore*>(this);
    case PluginCapabilityType::kBUILD: return static_cast<nvinfer1::IPluginV3OneBuild*>(this);
    case PluginCapabilityType::kRUNTIME: return static_cast<nvinfer1::IPluginV3OneRuntime*>(this);
  }
  return nullptr;
}

IPluginV3* SSDScanPlugin::clone() noexcept {
  try {
    return new SSDScanPlugin(*this);
  } catch (std::exception const& e) {
    report("clone", e.what());
  } catch (...) {
    report("clone", "unknown exception");
  }
  return nullptr;
}

char const* SSDScanPlugin::getPluginName() const noexcept { return kSSD_PLUGIN_NAME; }
char const* SSDScanPlugin::getPluginVersion() const noexcept { return kSSD_PLUGIN_VERSION; }
char const* SSDScanPlugin::getPluginNamespace() const noexcept { return kPLUGIN_NAMESPACE; }
int32_t SSDScanPlugin::getNbOutputs() const noexcept { return kSSD_NB_OUTPUTS; }

int32_t SSDScanPlugin::configurePlugin(DynamicPluginTensorDesc const* in, int32_t nbInputs,
                                       DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept {
  try {
    if (nbInputs != kSSD_NB_INPUTS || nbOutputs != kSSD_NB_OUTPUTS) {
      report("configurePlugin", "expected 8 inputs and 2 outputs, got " + std::to_string(nbInputs) + " and " +
                                    std::to_string(nbOutputs));
      return 1;
    }
    Dims dims[kSSD_NB_INPUTS];
    DataType types[kSSD_NB_INPUTS + kSSD_NB_OUTPUTS];
    for (int32_t i = 0; i < kSSD_NB_INPUTS; ++i) {
      dims[i] = in[i].desc.dims;
      types[i] = in[i].desc.type;
    }
    for (int32_t i = 0; i < kSSD_NB_OUTPUTS; ++i) types[kSSD_NB_INPUTS + i] = out[i].desc.type;
    std::string err = checkShapes(dims, mAttrs);
    if (err.empty()) err = checkTypes(types, kSSD_NB_INPUTS + kSSD_NB_OUTPUTS);
    if (!err.empty()) {
      report("configurePlugin", err);
      return 1;
    }
    recordWorkspace(workspaceForProfile(mAttrs, in, nbInputs));
    return 0;
  } catch (std::exception const& e) {
    report("configurePlugin", e.what());
  } catch (...) {
    report("configurePlugin", "unknown exception");
  }
  return 1;
}

int32_t SSDScanPlugin::getOutputDataTypes(DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes,
                                          int32_t nbInputs) const noexcept {
  try {
    if (nbInputs != kSSD_NB_INPUTS || nbOutputs != kSSD_NB_OUTPUTS) {
      report("getOutputDataTypes", "expected 8 inputs (x, dt, A, B, C, D, dt_bias, h0) and 2 outputs (y, h_last), "
                                   "got " + std::to_string(nbInputs) + " and " + std::to_string(nbOutputs));
      return 1;
    }
    std::string const err = checkTypes(inputTypes, kSSD_NB_INPUTS);
    if (!err.empty()) {
      report("getOutputDataTypes", err);
      return 1;
    }
    outputTypes[kSSD_OUT_Y] = DataType::kFLOAT;
    outputTypes[kSSD_OUT_H_LAST] = DataType::kFLOAT;
    return 0;
  } catch (std::exception const& e) {
    report("getOutputDataTypes", e.what());
  } catch (...) {
    report("getOutputDataTypes", "unknown exception");
  }
  return 1;
}

int32_t SSDScanPlugin::getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const* /*shapeInputs*/,
                                       int32_t nbShapeInputs, DimsExprs* outputs, int32_t nbOutputs,
                                       nvinfer1::IExprBuilder& exprBuilder) noexcept {
  try {
    if (nbInputs != kSSD_NB_INPUTS || nbOutputs != kSSD_NB_OUTPUTS || nbShapeInputs != 0) {
      report("getOutputShapes", "expected 8 inputs, no shape inputs and 2 outputs");
      return 1;
    }
    if (inputs[kSSD_IN_X].nbDims != 3) {
      report("getOutputShapes", "x must be [batch, seqlen, heads * head_dim], got rank " +
                                    std::to_string(inputs[kSSD_IN_X].nbDims));
      return 1;
    }
    outputs[kSSD_OUT_Y] = inputs[kSSD_IN_X];   // y: [batch, seqlen, heads * head_dim]
    outputs[kSSD_OUT_H_LAST].nbDims = 4;      // h_last: [batch, heads, head_dim, d_state]
    outputs[kSSD_OUT_H_LAST].d[0] = inputs[kSSD_IN_X].d[0];
    outputs[kSSD_OUT_H_LAST].d[1] = exprBuilder.constant(mAttrs.heads);
    outputs[kSSD_OUT_H_LAST].d[2] = exprBuilder.constant(mAttrs.head_dim);
    outputs[kSSD_OUT_H_LAST].d[3] = exprBuilder.constant(mAttrs.d_state);
    return 0;
  } catch (std::exception const& e) {
    report("getOutputShapes", e.what());
  } catch (...) {
    report("getOutputShapes", "unknown exception");
  }
  return 1;
}

bool SSDScanPlugin::supportsFormatCombination(int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
                                              int32_t nbOutputs) noexcept {
  if (nbInputs != kSSD_NB_INPUTS || nbOutputs != kSSD_NB_OUTPUTS || pos < 0 || pos >= nbInputs + nbOutputs) return false;
  PluginTensorDesc const& d = inOut[pos].desc;
  return d.format == TensorFormat::kLINEAR && d.type == expectedType(pos);
}

/* as SelectiveScanPlugin::recordWorkspace: the smallest size reported over profiles, serialized with the plugin */
void SSDScanPlugin::recordWorkspace(size_t bytes) const noexcept {
  int64_t const b = bytes > static_cast<size_t>(INT64_MAX) ? INT64_MAX : static_cast<int64_t>(bytes);
  if (mWorkspaceBytes < 0 || b < mWorkspaceBytes) mWorkspaceBytes = b;
}

size_t SSDScanPlugin::getWorkspaceSize(DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
                                       DynamicPluginTensorDesc const* /*outputs*/, int32_t /*nbOutputs*/) const noexcept {
  size_t const bytes = workspaceForProfile(mAttrs, inputs, nbInputs);
  if (inputs != nullptr && nbInputs == kSSD_NB_INPUTS) recordWorkspace(bytes);
  return bytes;
}

char const* SSDScanPlugin::getTimingCacheID() noexcept { return mDescription.c_str(); }
char const* SSDScanPlugin::getMetadataString() noexcept { return mDescription.c_str(); }

int32_t SSDScanPlugin::onShapeChange(PluginTensorDesc const* in, int32_t nbInputs, PluginTensorDesc const* out,
                                     int32_t nbOutputs) noexcept {
  try {
    if (nbInputs != kSSD_NB_INPUTS || nbOutputs != kSSD_NB_OUTPUTS) {
      report("onShapeChange", "expected 8 inputs and 2 outputs");
      return 1;
    }
    Dims dims[kSSD_NB_INPUTS];
    DataType types[kSSD_NB_INPUTS + kSSD_NB_OUTPUTS];
    for (int32_t i = 0; i < kSSD_NB_INPUTS; ++i) {
      dims[i] = in[i].dims;
      types[i] = in[i].type;
    }
    for (int32_t i = 0; i < kSSD_NB_OUTPUTS; ++i) types[kSSD_NB_INPUTS + i] = out[i].type;
    std::string err = checkShapes(dims, mAttrs);
    if (err.empty()) err = checkTypes(types, kSSD_NB_INPUTS + kSSD_NB_OUTPUTS);
    if (!err.empty()) {
      report("onShapeChange", err);
      return 1;
    }
    return 0;
  } catch (std::exception const& e) {
    report("onShapeChange", e.what());
  } catch (...) {
    report("onShapeChange", "unknown exception");
  }
  return 1;
}

int32_t SSDScanPlugin::enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const* /*outputDesc*/,
                               void const* const* inputs, void* const* outputs, void* workspace,
                               cudaStream_t stream) noexcept {
  try {
    Dims const& x = inputDesc[kSSD_IN_X].dims;
    int64_t const b = x.d[0], L = x.d[1];
    int64_t const state = b * mAttrs.heads * mAttrs.head_dim * mAttrs.d_state;
    if (b == 0) return 0;   // empty tensors: nothing to compute
    if (L == 0) {           // no steps: the state passes through unchanged
      if (outputs[kSSD_OUT_H_LAST] == inputs[kSSD_IN_H0]) return 0;
      return cudaMemcpyAsync(outputs[kSSD_OUT_H_LAST], inputs[kSSD_IN_H0], static_cast<size_t>(state) * sizeof(float),
                             cudaMemcpyDeviceToDevice, stream) == cudaSuccess
                 ? 0 : 1;
    }
    // the per-channel scales: the context's device copy, or the head of the workspace
    size_t const slot = mAttrs.deviceScaleBytes();
    float const* scales = mDeviceScales;
    size_t avail = workspace != nullptr ? workspaceBytes() : 0;
    char* scratch = static_cast<char*>(workspace);
    if (slot > 0 && scales == nullptr) {
      if (avail < slot) {
        report("enqueue", "per-channel scales need " + std::to_string(slot) + " bytes of workspace (the plugin was "
                          "not attached to a context and TensorRT gave " + std::to_string(avail) + ")");
        return MQ_SCAN_ERR_INVALID;
      }
      if (cudaMemcpyAsync(workspace, mPacked.data(), mPacked.size() * sizeof(float), cudaMemcpyHostToDevice,
                          stream) != cudaSuccess) {
        report("enqueue", "copying the per-channel scales to the workspace failed");
        return MQ_SCAN_ERR_CUDA;
      }
      scales = static_cast<float const*>(workspace);
    }
    if (slot > 0 && scratch != nullptr) {   // the scratch follows the scales' slot, whether used or not
      scratch += slot;
      avail = avail >= slot ? avail - slot : 0;
    }
    MQSSDParams p;
    std::memset(&p, 0, sizeof p);
    fillAttributes(mAttrs, scales, &p);
    p.batch = b;
    p.seqlen = L;
    p.x = inputs[kSSD_IN_X];
    p.dt = inputs[kSSD_IN_DT];
    p.A = static_cast<float const*>(inputs[kSSD_IN_A]);
    p.B = inputs[kSSD_IN_B];
    p.C = inputs[kSSD_IN_C];
    p.D = static_cast<float const*>(inputs[kSSD_IN_D]);
    p.dt_bias = static_cast<float const*>(inputs[kSSD_IN_DT_BIAS]);
    p.h0 = static_cast<float const*>(inputs[kSSD_IN_H0]);
    p.y = static_cast<float*>(outputs[kSSD_OUT_Y]);
    p.h_last = static_cast<float*>(outputs[kSSD_OUT_H_LAST]);
    mq_ssd_set_contiguous_strides(&p);
    // the decode step kernel for one token; the chunked scan (with the L-split in TensorRT's workspace, of the
    // size serialized at build time) otherwise
    int const status = L == 1 ? mq_ssd_step_cuda(&p, stream)
                              : mq_ssd_cuda_ws(&p, avail > 0 ? scratch : nullptr, avail, stream);
    if (status != MQ_SCAN_OK) {
      char const* msg = mq_scan_last_error();
      report("enqueue", std::string(status == MQ_SCAN_ERR_CUDA ? "CUDA error: " : "") +
                            (msg != nullptr && msg[0] != '\0' ? msg : "mq_ssd_cuda failed") + " (code " +
                            std::to_string(status) + ")");
      return status;
    }
    return 0;
  } catch (std::exception const& e) {
    report("enqueue", e.what());
  } catch (...) {
    report("enqueue", "unknown exception");
  }
  return MQ_SCAN_ERR_INTERNAL;
}

IPluginV3* SSDScanPlugin::attachToContext(nvinfer1::IPluginResourceContext* context) noexcept {
  try {
    auto* p = new SSDScanPlugin(*this);
    p->mErrorRecorder = context != nullptr ? context->getErrorRecorder() : nullptr;
    if (!p->mPacked.empty()) {   // the per-channel scales, once per context, on its device
      size_t const bytes = p->mPacked.size() * sizeof(float);
      void* dev = nullptr;
      if (cudaMalloc(&dev, bytes) != cudaSuccess) {
        (void)cudaGetLastError();
        p->report("attachToContext", "cudaMalloc of " + std::to_string(bytes) + " bytes for the per-channel scales failed");
        delete p;
        return nullptr;
      }
      p->mDeviceScales = static_cast<float*>(dev);
      if (cudaMemcpy(dev, p->mPacked.data(), bytes, cudaMemcpyHostToDevice) != cudaSuccess) {
        (void)cudaGetLastError();
        p->report("attachToContext", "copying the per-channel scales to the device failed");
        delete p;
        return nullptr;
      }
    }
    return p;
  } catch (std::exception const& e) {
    report("attachToContext", e.what());
  } catch (...) {
    report("attachToContext", "unknown exception");
  }
  return nullptr;
}

PluginFieldCollection const* SSDScanPlugin::getFieldsToSerialize() noexcept { return &mFieldCollection; }

/* ---- creator ---------------------------------------------------------------------------------------------- */

SSDScanPluginCreator::SSDScanPluginCreator() {
  // The ONNX parser passes exactly the node attributes named here (FLOATS -> kFLOAT32 arrays, INT -> kINT32,
  // FLOAT -> kFLOAT32). The sizes have no default: a node without them is refused.
  for (char const* name : kScaleNames) mFieldNames.emplace_back(name, nullptr, PluginFieldType::kFLOAT32, 0);
  for (char const* name : {"heads", "head_dim", "groups", "d_state", "chunk"})
    mFieldNames.emplace_back(name, nullptr, PluginFieldType::kINT32, 1);
  mFieldNames.emplace_back("dt_min", nullptr, PluginFieldType::kFLOAT32, 1);
  mFieldNames.emplace_back("dt_max", nullptr, PluginFieldType::kFLOAT32, 1);
  mFieldNameCollection.nbFields = static_cast<int32_t>(mFieldNames.size());
  mFieldNameCollection.fields = mFieldNames.data();
}

namespace {

bool readFloats(PluginField const& f, std::vector<float>& out, std::string& err) {
  if (f.data == nullptr || f.length < 1) {
    err = std::string("attribute ") + f.name + " must hold at least one float";
    return false;
  }
  out.resize(static_cast<size_t>(f.length));
  for (int32_t i = 0; i < f.length; ++i) {
    switch (f.type) {
      case PluginFieldType::kFLOAT32: out[i] = static_cast<float const*>(f.data)[i]; break;
      case PluginFieldType::kFLOAT64: out[i] = static_cast<float>(static_cast<double const*>(f.data)[i]); break;
      default:
        err = std::string("attribute ") + f.name + " must be float32, got field type " +
              std::to_string(static_cast<int32_t>(f.type));
        return false;
    }
  }
  return true;
}

bool readFloat(PluginField const& f, float& value, std::string& err) {
  std::vector<float> v;
  if (!readFloats(f, v, err)) return false;
  if (v.size() != 1) {
    err = std::string("attribute ") + f.name + " must be one float";
    return false;
  }
  value = v[0];
  return true;
}

bool readInt64(PluginField const& f, int64_t& value, std::string& err) {
  if (f.data == nullptr || f.length != 1) {
    err = std::string("field ") + f.name + " must be one integer";
    return false;
  }
  switch (f.type) {
    case PluginFieldType::kINT64: value = *static_cast<int64_t const*>(f.data); return true;
    case PluginFieldType::kINT32: value = *static_cast<int32_t const*>(f.data); return true;
    default:
      err = std::string("field ") + f.name + " must be an integer, got field type " +
            std::to_string(static_cast<int32_t>(f.type));
      return false;
  }
}

bool readInt(PluginField const& f, int32_t& value, std::string& err) {
  int64_t v = 0;
  if (!readInt64(f, v, err)) return false;
  if (v < INT32_MIN || v > INT32_MAX) {
    err = std::string("attribute ") + f.name + " is out of the int32 range";
    return false;
  }
  value = static_cast<int32_t>(v);
  return true;
}

}  // namespace

IPluginV3* SSDScanPluginCreator::createPlugin(char const* name, PluginFieldCollection const* fc,
                                              nvinfer1::TensorRTPhase /*phase*/) noexcept {
  std::string const where = std::string("createPlugin(") + (name != nullptr ? name : "") + ")";
  try {
    SSDAttributes attrs;
    int64_t workspace = -1;   // absent: enqueue claims no workspace
    bool seen[4] = {false, false, false, false};
    std::string err;
    for (int32_t i = 0; fc != nullptr && i < fc->nbFields && err.empty(); ++i) {
      PluginField const& f = fc->fields[i];
      if (f.name == nullptr) continue;
      std::string const key = f.name;
      bool scale = false;
      for (int32_t s = 0; s < 4; ++s)
        if (key == kScaleNames[s]) {
          readFloats(f, attrs.scale[s], err);
          seen[s] = scale = true;
        }
      if (scale) continue;
      if (key == "heads") readInt(f, attrs.heads, err);
      else if (key == "head_dim") readInt(f, attrs.head_dim, err);
      else if (key == "groups") readInt(f, attrs.groups, err);
      else if (key == "d_state") readInt(f, attrs.d_state, err);
      else if (key == "chunk") readInt(f, attrs.chunk, err);
      else if (key == "dt_min") readFloat(f, attrs.dt_min, err);
      else if (key == "dt_max") readFloat(f, attrs.dt_max, err);
      else if (key == kWORKSPACE_FIELD) readInt64(f, workspace, err);
      // other fields are ignored so that newer engines' extra fields do not break loading
    }
    for (int32_t s = 0; s < 4 && err.empty(); ++s)
      if (!seen[s]) err = std::string("attribute ") + kScaleNames[s] + " is missing";
    if (err.empty()) err = attrs.check();
    if (!err.empty()) {
      logError(std::string(kPLUGIN_NAMESPACE) + "::" + kSSD_PLUGIN_NAME + " " + where + ": " + err);
      return nullptr;
    }
    auto* plugin = new SSDScanPlugin(attrs);
    plugin->setWorkspaceBytes(workspace);
    return plugin;
  } catch (std::exception const& e) {
    logError(where + ": " + e.what());
  } catch (...) {
    logError(where + ": unknown exception");
  }
  return nullptr;
}

PluginFieldCollection const* SSDScanPluginCreator::getFieldNames() noexcept { return &mFieldNameCollection; }
char const* SSDScanPluginCreator::getPluginName() const noexcept { return kSSD_PLUGIN_NAME; }
char const* SSDScanPluginCreator::getPluginVersion() const noexcept { return kSSD_PLUGIN_VERSION; }
char const* SSDScanPluginCreator::getPluginNamespace() const noexcept { return kPLUGIN_NAMESPACE; }

SSDScanPluginCreator& ssdScanCreator() {
  static SSDScanPluginCreator creator;
  return creator;
}

}  // namespace trt
}  // namespace mq
