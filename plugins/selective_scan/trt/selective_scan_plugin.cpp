/* TensorRT IPluginV3 wrapper of the int8 selective scan. Glue only: check, fill MQScanParams, call
 * the CUDA library. Every TensorRT entry point is noexcept and catches everything; errors go to the
 * TensorRT logger (and the context's error recorder at run time) and come back as a non-zero status.
 */
#include "selective_scan_plugin.h"
#include "ssd_scan_plugin.h"

#include "mq_selective_scan.h"

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstdio>
#include <cstring>
#include <exception>
#include <mutex>
#include <new>
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

/* ---- logging ---------------------------------------------------------------------------------- */

/* TensorRT hands a logger finder to libraries it loads itself (loadLibrary / --dynamicPlugins).
 * A library registered through mq_scan_trt_register_creators gets none and falls back to stderr. */
std::mutex gLoggerMutex;
nvinfer1::ILoggerFinder* gLoggerFinder{nullptr};
thread_local std::string tLastError;

}  // namespace

void logError(std::string const& message) noexcept {
  try {
    tLastError = message;
    nvinfer1::ILogger* logger{nullptr};
    {
      std::lock_guard<std::mutex> lock(gLoggerMutex);
      if (gLoggerFinder != nullptr) logger = gLoggerFinder->findLogger();
    }
    if (logger != nullptr) {
      logger->log(nvinfer1::ILogger::Severity::kERROR, message.c_str());
    } else {
      std::fprintf(stderr, "[mq_scan_trt] ERROR: %s\n", message.c_str());
    }
  } catch (...) {
    // Nothing left to report with; the caller still returns a failure status.
  }
}

namespace {

/* ---- descriptions of the I/O ------------------------------------------------------------------ */

char const* const kIONames[kNB_INPUTS + kNB_OUTPUTS] = {
    "x", "delta", "A", "B", "C", "D", "z", "delta_bias", "gate_scale", "h0", "y", "h_last"};

int32_t const kInputRanks[kNB_INPUTS] = {3, 3, 2, 3, 3, 1, 3, 1, 1, 3};

bool isInt8Input(int32_t pos) {
  return pos == kIN_X || pos == kIN_DELTA || pos == kIN_B || pos == kIN_C || pos == kIN_Z;
}

DataType outputYType(ScanAttributes const& attrs) {
  return attrs.out_dtype == kONNX_FLOAT16 ? DataType::kHALF : DataType::kFLOAT;
}

DataType expectedType(int32_t pos, ScanAttributes const& attrs) {
  if (pos < kNB_INPUTS) return isInt8Input(pos) ? DataType::kINT8 : DataType::kFLOAT;
  return pos == kNB_INPUTS + kOUT_Y ? outputYType(attrs) : DataType::kFLOAT;
}

char const* typeName(DataType t) {
  switch (t) {
    case DataType::kFLOAT: return "float32";
    case DataType::kHALF: return "float16";
    case DataType::kINT8: return "int8";
    case DataType::kINT32: return "int32";
    case DataType::kBOOL: return "bool";
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

/* Two extents agree unless both are known (>= 0) and differ; -1 is a runtime dimension. */
bool agree(int64_t a, int64_t b) { return a < 0 || b < 0 || a == b; }

/* Ranks and cross-input extents; works on build-time dims (with -1) and run-time dims alike.
 * `maxDims` (optional) gives the profile's upper bounds, used for the dstate limit when dims has -1. */
std::string checkShapes(Dims const* dims, Dims const* maxDims) {
  std::ostringstream err;
  for (int32_t i = 0; i < kNB_INPUTS; ++i) {
    if (dims[i].nbDims != kInputRanks[i]) {
      err << "input " << i << " (" << kIONames[i] << ") must have rank " << kInputRanks[i] << ", got "
          << dimsToString(dims[i]);
      return err.str();
    }
  }
  Dims const& x = dims[kIN_X];
  Dims const& A = dims[kIN_A];
  int64_t const b = x.d[0], L = x.d[1], D = x.d[2], N = A.d[1];
  auto same3 = [&](int32_t i, int64_t e0, int64_t e1, int64_t e2, char const* want) -> bool {
    Dims const& t = dims[i];
    if (agree(t.d[0], e0) && agree(t.d[1], e1) && agree(t.d[2], e2)) return true;
    err << "input " << kIONames[i] << " has shape " << dimsToString(t) << ", expected " << want << " = ["
        << e0 << "," << e1 << "," << e2 << "] (x is " << dimsToString(x) << ", A is " << dimsToString(A) << ")";
    return false;
  };
  if (!same3(kIN_DELTA, b, L, D, "[batch, seqlen, dim]")) return err.str();
  if (!same3(kIN_Z, b, L, D, "[batch, seqlen, dim]")) return err.str();
  if (!same3(kIN_B, b, L, N, "[batch, seqlen, dstate]")) return err.str();
  if (!same3(kIN_C, b, L, N, "[batch, seqlen, dstate]")) return err.str();
  if (!same3(kIN_H0, b, D, N, "[batch, dim, dstate]")) return err.str();
  if (!agree(A.d[0], D)) {
    err << "A has shape " << dimsToString(A) << ", expected [dim, dstate] with dim = " << D << " from x";
    return err.str();
  }
  for (int32_t i : {static_cast<int32_t>(kIN_D), static_cast<int32_t>(kIN_DELTA_BIAS),
                    static_cast<int32_t>(kIN_GATE_SCALE)}) {
    if (!agree(dims[i].d[0], D)) {
      err << "input " << kIONames[i] << " has shape " << dimsToString(dims[i]) << ", expected [dim] = [" << D << "]";
      return err.str();
    }
  }
  int64_t dstate = N;
  if (dstate < 0 && maxDims != nullptr) dstate = maxDims[kIN_A].d[1];
  if (dstate < 0 && maxDims != nullptr) dstate = maxDims[kIN_B].d[2];
  if (dstate > MQ_SCAN_MAX_DSTATE) {
    err << "dstate (A.shape[1]) is " << dstate << "; the int8 scan kernel keeps the state in registers and supports "
        << "dstate <= " << MQ_SCAN_MAX_DSTATE;
    return err.str();
  }
  return {};
}

std::string checkTypes(DataType const* types, int32_t n, ScanAttributes const& attrs) {
  for (int32_t i = 0; i < n; ++i) {
    DataType const want = expectedType(i, attrs);
    if (types[i] != want) {
      std::ostringstream err;
      err << (i < kNB_INPUTS ? "input " : "output ") << kIONames[i] << " is " << typeName(types[i]) << ", expected "
          << typeName(want);
      if (isInt8Input(i) && i < kNB_INPUTS) {
        err << " (feed the scan from a QuantizeLinear, never from a DequantizeLinear)";
      }
      return err.str();
    }
  }
  return {};
}

/* Scratch of the CUDA scan's L-split (per segment: sum of dt and end state) for a build profile, so that
 * enqueue never allocates. The split has more segments at small batch, so take the largest need over the
 * profile's batch range at its longest sequence and widest channels. 0 where nothing splits. */
size_t workspaceForProfile(DynamicPluginTensorDesc const* inputs, int32_t nbInputs) noexcept {
  if (inputs == nullptr || nbInputs != kNB_INPUTS) return 0;
  Dims const& lo = inputs[kIN_X].min;
  Dims const& hi = inputs[kIN_X].max;
  Dims const& a = inputs[kIN_A].max;
  if (hi.nbDims != 3 || a.nbDims != 2) return 0;
  MQScanParams p;
  std::memset(&p, 0, sizeof p);
  p.seqlen = hi.d[1];
  p.dim = hi.d[2];
  p.dstate = a.d[1];
  size_t most = 0;
  int64_t const b0 = lo.nbDims == 3 && lo.d[0] > 0 ? lo.d[0] : 1;
  for (int64_t b = b0; b <= hi.d[0] && b < b0 + 4096; ++b) {
    p.batch = b;
    size_t const need = mq_scan_cuda_workspace_size(&p);
    if (need > most) most = need;
  }
  return most;
}

}  // namespace

char const* lastError() noexcept { return tLastError.c_str(); }

/* ---- attributes --------------------------------------------------------------------------------- */

std::string ScanAttributes::check() const {
  std::ostringstream err;
  float const scales[5] = {x_scale, delta_scale, B_scale, C_scale, z_scale};
  char const* names[5] = {"x_scale", "delta_scale", "B_scale", "C_scale", "z_scale"};
  for (int32_t i = 0; i < 5; ++i) {
    if (!(std::isfinite(scales[i]) && scales[i] > 0.F)) {
      err << names[i] << " must be a finite positive float, got " << scales[i];
      return err.str();
    }
  }
  if (out_dtype != kONNX_FLOAT && out_dtype != kONNX_FLOAT16) {
    err << "out_dtype must be 1 (float32) or 10 (float16) as in ONNX TensorProto, got " << out_dtype;
    return err.str();
  }
  return {};
}

std::string ScanAttributes::describe() const {
  std::ostringstream os;
  os.precision(9);
  os << "x_scale=" << x_scale << " delta_scale=" << delta_scale << " B_scale=" << B_scale << " C_scale=" << C_scale
     << " z_scale=" << z_scale << " out_dtype=" << out_dtype;
  return os.str();
}

/* ---- plugin ------------------------------------------------------------------------------------- */

SelectiveScanPlugin::SelectiveScanPlugin(ScanAttributes const& attrs)
    : mAttrs(attrs), mDescription(attrs.describe()) {
  buildFieldsToSerialize();
}

/* The fields point into this object, so a copy rebuilds them instead of copying the pointers. */
SelectiveScanPlugin::SelectiveScanPlugin(SelectiveScanPlugin const& other)
    : nvinfer1::IPluginV3(other),
      nvinfer1::IPluginV3OneCore(other),
      nvinfer1::IPluginV3OneBuild(other),
      nvinfer1::IPluginV3OneRuntime(other),
      mAttrs(other.mAttrs),
      mWorkspaceBytes(other.mWorkspaceBytes),
      mDescription(other.mDescription),
      mErrorRecorder(other.mErrorRecorder) {
  buildFieldsToSerialize();
}

void SelectiveScanPlugin::buildFieldsToSerialize() {
  mFields.clear();
  mFields.emplace_back("x_scale", &mAttrs.x_scale, PluginFieldType::kFLOAT32, 1);
  mFields.emplace_back("delta_scale", &mAttrs.delta_scale, PluginFieldType::kFLOAT32, 1);
  mFields.emplace_back("B_scale", &mAttrs.B_scale, PluginFieldType::kFLOAT32, 1);
  mFields.emplace_back("C_scale", &mAttrs.C_scale, PluginFieldType::kFLOAT32, 1);
  mFields.emplace_back("z_scale", &mAttrs.z_scale, PluginFieldType::kFLOAT32, 1);
  mFields.emplace_back("out_dtype", &mAttrs.out_dtype, PluginFieldType::kINT32, 1);
  // points at the member: a size recorded after construction (getWorkspaceSize) is what gets serialized
  mFields.emplace_back(kWORKSPACE_FIELD, &mWorkspaceBytes, PluginFieldType::kINT64, 1);
  mFieldCollection.nbFields = static_cast<int32_t>(mFields.size());
  mFieldCollection.fields = mFields.data();
}

void SelectiveScanPlugin::report(std::string const& where, std::string const& message) const noexcept {
  try {
    std::string const full = std::string(kPLUGIN_NAMESPACE) + "::" + kPLUGIN_NAME + " " + where + ": " + message;
    logError(full);
    if (mErrorRecorder != nullptr) {
      mErrorRecorder->reportError(nvinfer1::ErrorCode::kUNSPECIFIED_ERROR, full.c_str());
    }
  } catch (...) {
  }
}

IPluginCapability* SelectiveScanPlugin::getCapabilityInterface(PluginCapabilityType type) noexcept {
  try {
    switch (type) {
      case PluginCapabilityType::kCORE: return static_cast<nvinfer1::IPluginV3OneCore*>(this);
      case PluginCapabilityType::kBUILD: return static_cast<nvinfer1::IPluginV3OneBuild*>(this);
      case PluginCapabilityType::kRUNTIME: return static_cast<nvinfer1::IPluginV3OneRuntime*>(this);
    }
  } catch (...) {
  }
  return nullptr;
}

IPluginV3* SelectiveScanPlugin::clone() noexcept {
  try {
    return new SelectiveScanPlugin(*this);
  } catch (std::exception const& e) {
    report("clone", e.what());
  } catch (...) {
    report("clone", "unknown exception");
  }
  return nullptr;
}

char const* SelectiveScanPlugin::getPluginName() const noexcept { return kPLUGIN_NAME; }
char const* SelectiveScanPlugin::getPluginVersion() const noexcept { return kPLUGIN_VERSION; }
char const* SelectiveScanPlugin::getPluginNamespace() const noexcept { return kPLUGIN_NAMESPACE; }

int32_t SelectiveScanPlugin::getNbOutputs() const noexcept { return kNB_OUTPUTS; }

int32_t SelectiveScanPlugin::configurePlugin(DynamicPluginTensorDesc const* in, int32_t nbInputs,
                                             DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept {
  try {
    if (nbInputs != kNB_INPUTS || nbOutputs != kNB_OUTPUTS) {
      report("configurePlugin", "expected " + std::to_string(kNB_INPUTS) + " inputs and " +
                                    std::to_string(kNB_OUTPUTS) + " outputs, got " + std::to_string(nbInputs) +
                                    " and " + std::to_string(nbOutputs));
      return 1;
    }
    Dims dims[kNB_INPUTS];
    Dims maxDims[kNB_INPUTS];
    DataType types[kNB_INPUTS + kNB_OUTPUTS];
    for (int32_t i = 0; i < kNB_INPUTS; ++i) {
      dims[i] = in[i].desc.dims;
      maxDims[i] = in[i].max;
      types[i] = in[i].desc.type;
    }
    for (int32_t i = 0; i < kNB_OUTPUTS; ++i) types[kNB_INPUTS + i] = out[i].desc.type;
    std::string err = checkShapes(dims, maxDims);
    if (err.empty()) err = checkTypes(types, kNB_INPUTS + kNB_OUTPUTS, mAttrs);
    if (!err.empty()) {
      report("configurePlugin", err);
      return 1;
    }
    // the profile's workspace, as getWorkspaceSize reports it: whichever clone TensorRT asks for the size
    // and whichever it serializes, a configured plugin carries the size TensorRT allocates
    recordWorkspace(workspaceForProfile(in, nbInputs));
    return 0;
  } catch (std::exception const& e) {
    report("configurePlugin", e.what());
  } catch (...) {
    report("configurePlugin", "unknown exception");
  }
  return 1;
}

int32_t SelectiveScanPlugin::getOutputDataTypes(DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes,
                                                int32_t nbInputs) const noexcept {
  try {
    if (nbInputs != kNB_INPUTS || nbOutputs != kNB_OUTPUTS) {
      report("getOutputDataTypes", "expected " + std::to_string(kNB_INPUTS) + " inputs (x, delta, A, B, C, D, z, "
                                   "delta_bias, gate_scale, h0) and 2 outputs (y, h_last), got " +
                                       std::to_string(nbInputs) + " and " + std::to_string(nbOutputs));
      return 1;
    }
    // Strongly typed networks give the real input types here: refuse a float-fed scan early.
    std::string const err = checkTypes(inputTypes, kNB_INPUTS, mAttrs);
    if (!err.empty()) {
      report("getOutputDataTypes", err);
      return 1;
    }
    outputTypes[kOUT_Y] = outputYType(mAttrs);
    outputTypes[kOUT_H_LAST] = DataType::kFLOAT;
    return 0;
  } catch (std::exception const& e) {
    report("getOutputDataTypes", e.what());
  } catch (...) {
    report("getOutputDataTypes", "unknown exception");
  }
  return 1;
}

int32_t SelectiveScanPlugin::getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const* /*shapeInputs*/,
                                             int32_t nbShapeInputs, DimsExprs* outputs, int32_t nbOutputs,
                                             nvinfer1::IExprBuilder& /*exprBuilder*/) noexcept {
  try {
    if (nbInputs != kNB_INPUTS || nbOutputs != kNB_OUTPUTS || nbShapeInputs != 0) {
      report("getOutputShapes", "expected 10 inputs, no shape inputs and 2 outputs");
      return 1;
    }
    if (inputs[kIN_X].nbDims != 3 || inputs[kIN_A].nbDims != 2) {
      report("getOutputShapes", "x must be [batch, seqlen, dim] and A [dim, dstate]; got ranks " +
                                    std::to_string(inputs[kIN_X].nbDims) + " and " +
                                    std::to_string(inputs[kIN_A].nbDims));
      return 1;
    }
    outputs[kOUT_Y] = inputs[kIN_X];  // y: [batch, seqlen, dim]
    outputs[kOUT_H_LAST].nbDims = 3;  // h_last: [batch, dim, dstate]
    outputs[kOUT_H_LAST].d[0] = inputs[kIN_X].d[0];
    outputs[kOUT_H_LAST].d[1] = inputs[kIN_A].d[0];
    outputs[kOUT_H_LAST].d[2] = inputs[kIN_A].d[1];
    return 0;
  } catch (std::exception const& e) {
    report("getOutputShapes", e.what());
  } catch (...) {
    report("getOutputShapes", "unknown exception");
  }
  return 1;
}

bool SelectiveScanPlugin::supportsFormatCombination(int32_t pos, DynamicPluginTensorDesc const* inOut,
                                                    int32_t nbInputs, int32_t nbOutputs) noexcept {
  try {
    if (nbInputs != kNB_INPUTS || nbOutputs != kNB_OUTPUTS || pos < 0 || pos >= nbInputs + nbOutputs) return false;
    PluginTensorDesc const& d = inOut[pos].desc;
    return d.format == TensorFormat::kLINEAR && d.type == expectedType(pos, mAttrs);
  } catch (...) {
    return false;
  }
}

/* The size given to TensorRT is the size enqueue may use, whatever the environment says at run time
 * (MQ_SCAN_CUDA_SPLIT changes the split plan, and so mq_scan_cuda_workspace_size): it is recorded here
 * and serialized with the plugin. Over several profiles the smallest is kept, so enqueue never claims more
 * than TensorRT allocated for any of them; a plan that needs more scans unsplit. */
void SelectiveScanPlugin::recordWorkspace(size_t bytes) const noexcept {
  int64_t const b = bytes > static_cast<size_t>(INT64_MAX) ? INT64_MAX : static_cast<int64_t>(bytes);
  if (mWorkspaceBytes < 0 || b < mWorkspaceBytes) mWorkspaceBytes = b;
}

size_t SelectiveScanPlugin::getWorkspaceSize(DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
                                             DynamicPluginTensorDesc const* /*outputs*/,
                                             int32_t /*nbOutputs*/) const noexcept {
  size_t const bytes = workspaceForProfile(inputs, nbInputs);
  if (inputs != nullptr && nbInputs == kNB_INPUTS) recordWorkspace(bytes);
  return bytes;
}

char const* SelectiveScanPlugin::getTimingCacheID() noexcept { return mDescription.c_str(); }
char const* SelectiveScanPlugin::getMetadataString() noexcept { return mDescription.c_str(); }

int32_t SelectiveScanPlugin::onShapeChange(PluginTensorDesc const* in, int32_t nbInputs, PluginTensorDesc const* out,
                                           int32_t nbOutputs) noexcept {
  try {
    if (nbInputs != kNB_INPUTS || nbOutputs != kNB_OUTPUTS) {
      report("onShapeChange", "expected 10 inputs and 2 outputs");
      return 1;
    }
    Dims dims[kNB_INPUTS];
    DataType types[kNB_INPUTS + kNB_OUTPUTS];
    for (int32_t i = 0; i < kNB_INPUTS; ++i) {
      dims[i] = in[i].dims;
      types[i] = in[i].type;
    }
    for (int32_t i = 0; i < kNB_OUTPUTS; ++i) types[kNB_INPUTS + i] = out[i].type;
    std::string err = checkShapes(dims, nullptr);
    if (err.empty()) err = checkTypes(types, kNB_INPUTS + kNB_OUTPUTS, mAttrs);
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

int32_t SelectiveScanPlugin::enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const* outputDesc,
                                     void const* const* inputs, void* const* outputs, void* workspace,
                                     cudaStream_t stream) noexcept {
  try {
    Dims const& x = inputDesc[kIN_X].dims;
    MQScanParams p;
    std::memset(&p, 0, sizeof p);
    p.batch = x.d[0];
    p.seqlen = x.d[1];
    p.dim = x.d[2];
    p.dstate = inputDesc[kIN_A].dims.d[1];
    if (p.batch == 0 || p.dim == 0) return 0;  // empty tensors: nothing to compute
    if (p.seqlen == 0) {  // no steps: the state passes through unchanged
      size_t bytes = static_cast<size_t>(p.batch) * static_cast<size_t>(p.dim) * static_cast<size_t>(p.dstate) *
                     sizeof(float);
      if (bytes == 0 || outputs[1] == inputs[kIN_H0]) return 0;
      return cudaMemcpyAsync(outputs[1], inputs[kIN_H0], bytes, cudaMemcpyDeviceToDevice, stream) == cudaSuccess
                 ? 0 : 1;
    }
    p.x = static_cast<int8_t const*>(inputs[kIN_X]);
    p.delta = static_cast<int8_t const*>(inputs[kIN_DELTA]);
    p.B = static_cast<int8_t const*>(inputs[kIN_B]);
    p.C = static_cast<int8_t const*>(inputs[kIN_C]);
    p.z = static_cast<int8_t const*>(inputs[kIN_Z]);
    // The node's attributes carry the scales (they equal the feeding QuantizeLinear's); the
    // PluginTensorDesc::scale field is not meaningful in explicitly quantized networks.
    p.x_scale = mAttrs.x_scale;
    p.delta_scale = mAttrs.delta_scale;
    p.B_scale = mAttrs.B_scale;
    p.C_scale = mAttrs.C_scale;
    p.z_scale = mAttrs.z_scale;
    p.A = static_cast<float const*>(inputs[kIN_A]);
    p.D = static_cast<float const*>(inputs[kIN_D]);
    p.delta_bias = static_cast<float const*>(inputs[kIN_DELTA_BIAS]);
    p.gate_scale = static_cast<float const*>(inputs[kIN_GATE_SCALE]);
    p.h0 = static_cast<float const*>(inputs[kIN_H0]);
    p.y = outputs[kOUT_Y];
    p.h_last = static_cast<float*>(outputs[kOUT_H_LAST]);
    p.out_fp16 = outputDesc[kOUT_Y].type == DataType::kHALF ? 1 : 0;
    mq_scan_set_contiguous_strides(&p);
    int status = mq_scan_validate(&p);
    if (status == MQ_SCAN_OK) {
      // The decode step kernel is the same recurrence for one token without the chunking.
      // The L-split's scratch is TensorRT's workspace, of the size getWorkspaceSize gave at build time
      // (serialized with the plugin); a split that needs more than that scans unsplit.
      status = p.seqlen == 1 ? mq_scan_step_cuda(&p, stream)
                             : mq_scan_cuda_ws(&p, workspace, workspace != nullptr ? workspaceBytes() : 0, stream);
    }
    if (status != MQ_SCAN_OK) {
      char const* msg = mq_scan_last_error();
      report("enqueue", std::string(status == MQ_SCAN_ERR_CUDA ? "CUDA error: " : "") +
                            (msg != nullptr && msg[0] != '\0' ? msg : "mq_scan_cuda failed") + " (code " +
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

IPluginV3* SelectiveScanPlugin::attachToContext(nvinfer1::IPluginResourceContext* context) noexcept {
  try {
    auto* p = new SelectiveScanPlugin(*this);
    p->mErrorRecorder = context != nullptr ? context->getErrorRecorder() : nullptr;
    return p;
  } catch (std::exception const& e) {
    report("attachToContext", e.what());
  } catch (...) {
    report("attachToContext", "unknown exception");
  }
  return nullptr;
}

PluginFieldCollection const* SelectiveScanPlugin::getFieldsToSerialize() noexcept { return &mFieldCollection; }

/* ---- creator ------------------------------------------------------------------------------------ */

SelectiveScanPluginCreator::SelectiveScanPluginCreator() {
  // The ONNX parser passes exactly the node attributes named here (FLOAT -> kFLOAT32, INT -> kINT32);
  // a missing one keeps its default (scales 1, out_dtype float32) after a parser warning.
  mFieldNames.emplace_back("x_scale", nullptr, PluginFieldType::kFLOAT32, 1);
  mFieldNames.emplace_back("delta_scale", nullptr, PluginFieldType::kFLOAT32, 1);
  mFieldNames.emplace_back("B_scale", nullptr, PluginFieldType::kFLOAT32, 1);
  mFieldNames.emplace_back("C_scale", nullptr, PluginFieldType::kFLOAT32, 1);
  mFieldNames.emplace_back("z_scale", nullptr, PluginFieldType::kFLOAT32, 1);
  mFieldNames.emplace_back("out_dtype", nullptr, PluginFieldType::kINT32, 1);
  mFieldNameCollection.nbFields = static_cast<int32_t>(mFieldNames.size());
  mFieldNameCollection.fields = mFieldNames.data();
}

namespace {

bool readFloat(PluginField const& f, float& value, std::string& err) {
  if (f.data == nullptr || f.length != 1) {
    err = std::string("attribute ") + f.name + " must be one float";
    return false;
  }
  switch (f.type) {
    case PluginFieldType::kFLOAT32: value = *static_cast<float const*>(f.data); return true;
    case PluginFieldType::kFLOAT64: value = static_cast<float>(*static_cast<double const*>(f.data)); return true;
    default: err = std::string("attribute ") + f.name + " must be float32, got field type " +
                   std::to_string(static_cast<int32_t>(f.type));
      return false;
  }
}

bool readInt64(PluginField const& f, int64_t& value, std::string& err) {
  if (f.data == nullptr || f.length != 1) {
    err = std::string("field ") + f.name + " must be one integer";
    return false;
  }
  switch (f.type) {
    case PluginFieldType::kINT64: value = *static_cast<int64_t const*>(f.data); return true;
    case PluginFieldType::kINT32: value = *static_cast<int32_t const*>(f.data); return true;
    default: err = std::string("field ") + f.name + " must be int64, got field type " +
                   std::to_string(static_cast<int32_t>(f.type));
      return false;
  }
}

bool readInt(PluginField const& f, int32_t& value, std::string& err) {
  if (f.data == nullptr || f.length != 1) {
    err = std::string("attribute ") + f.name + " must be one integer";
    return false;
  }
  switch (f.type) {
    case PluginFieldType::kINT32: value = *static_cast<int32_t const*>(f.data); return true;
    case PluginFieldType::kINT64: value = static_cast<int32_t>(*static_cast<int64_t const*>(f.data)); return true;
    default: err = std::string("attribute ") + f.name + " must be int32, got field type " +
                   std::to_string(static_cast<int32_t>(f.type));
      return false;
  }
}

}  // namespace

IPluginV3* SelectiveScanPluginCreator::createPlugin(char const* name, PluginFieldCollection const* fc,
                                                    nvinfer1::TensorRTPhase /*phase*/) noexcept {
  std::string const where = std::string("createPlugin(") + (name != nullptr ? name : "") + ")";
  try {
    ScanAttributes attrs;
    int64_t workspace = -1;   // absent (an engine built before the field existed): enqueue never splits
    std::string err;
    for (int32_t i = 0; fc != nullptr && i < fc->nbFields && err.empty(); ++i) {
      PluginField const& f = fc->fields[i];
      if (f.name == nullptr) continue;
      std::string const key = f.name;
      if (key == "x_scale") readFloat(f, attrs.x_scale, err);
      else if (key == "delta_scale") readFloat(f, attrs.delta_scale, err);
      else if (key == "B_scale") readFloat(f, attrs.B_scale, err);
      else if (key == "C_scale") readFloat(f, attrs.C_scale, err);
      else if (key == "z_scale") readFloat(f, attrs.z_scale, err);
      else if (key == "out_dtype") readInt(f, attrs.out_dtype, err);
      else if (key == kWORKSPACE_FIELD) readInt64(f, workspace, err);
      // other fields (none today) are ignored so newer engines' extra fields do not break loading
    }
    if (err.empty()) err = attrs.check();
    if (!err.empty()) {
      logError(std::string(kPLUGIN_NAMESPACE) + "::" + kPLUGIN_NAME + " " + where + ": " + err);
      return nullptr;
    }
    auto* plugin = new SelectiveScanPlugin(attrs);
    plugin->setWorkspaceBytes(workspace);
    return plugin;
  } catch (std::exception const& e) {
    logError(where + ": " + e.what());
  } catch (...) {
    logError(where + ": unknown exception");
  }
  return nullptr;
}

PluginFieldCollection const* SelectiveScanPluginCreator::getFieldNames() noexcept { return &mFieldNameCollection; }
char const* SelectiveScanPluginCreator::getPluginName() const noexcept { return kPLUGIN_NAME; }
char const* SelectiveScanPluginCreator::getPluginVersion() const noexcept { return kPLUGIN_VERSION; }
char const* SelectiveScanPluginCreator::getPluginNamespace() const noexcept { return kPLUGIN_NAMESPACE; }

namespace {
SelectiveScanPluginCreator& theCreator() {
  static SelectiveScanPluginCreator creator;
  return creator;
}
/* Self-registration on dlopen, so loaders that only dlopen find the creators: Polygraphy's
 * LoadPlugins and `polygraphy run --plugins`, trtexec --staticPlugins, Triton's LD_PRELOAD. TensorRT's
 * IPluginRegistry::loadLibrary (trtexec --dynamicPlugins, Triton's plugins= backend config) dlopens
 * the library too and then registers what getCreators returns: getCreators first takes back the
 * creators registered here, so none is registered twice. MQ_SCAN_TRT_NO_AUTOREGISTER=1 turns it off. */
constexpr int32_t kNB_CREATORS = 2;   // SelectiveScan (Mamba1), SSDScan (Mamba2)
bool gAutoRegistered[kNB_CREATORS] = {false, false};

nvinfer1::IPluginCreatorV3One& creatorAt(int32_t i) {
  if (i == 0) return theCreator();
  return ssdScanCreator();
}

struct AutoRegister {
  AutoRegister() noexcept {
    try {
      if (std::getenv("MQ_SCAN_TRT_NO_AUTOREGISTER") != nullptr) return;
      nvinfer1::IPluginRegistry* registry = getPluginRegistry();
      if (registry == nullptr) return;
      for (int32_t i = 0; i < kNB_CREATORS; ++i) {
        nvinfer1::IPluginCreatorV3One& c = creatorAt(i);
        if (registry->getCreator(c.getPluginName(), c.getPluginVersion(), kPLUGIN_NAMESPACE) != nullptr) continue;
        gAutoRegistered[i] = registry->registerCreator(c, kPLUGIN_NAMESPACE);
      }
    } catch (...) {   // never throw out of a library constructor
    }
  }
};
AutoRegister const gAutoRegister;

}  // namespace

void takeBackAutoRegistration() noexcept {
  try {
    nvinfer1::IPluginRegistry* registry = getPluginRegistry();
    if (registry == nullptr) return;
    for (int32_t i = 0; i < kNB_CREATORS; ++i)
      if (gAutoRegistered[i] && registry->deregisterCreator(creatorAt(i))) gAutoRegistered[i] = false;
  } catch (...) {
  }
}

}  // namespace trt
}  // namespace mq

/* ---- library entry points ------------------------------------------------------------------------ */

extern "C" MQ_TRT_EXPORT nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators) {
  try {
    mq::trt::takeBackAutoRegistration();
    static nvinfer1::IPluginCreatorInterface* const kCreators[] = {&mq::trt::theCreator(), &mq::trt::ssdScanCreator()};
    nbCreators = 2;
    return kCreators;
  } catch (...) {
    nbCreators = 0;
    return nullptr;
  }
}

extern "C" MQ_TRT_EXPORT void setLoggerFinder(nvinfer1::ILoggerFinder* finder) {
  try {   // std::mutex::lock may throw std::system_error: never across the C boundary
    std::lock_guard<std::mutex> lock(mq::trt::gLoggerMutex);
    if (mq::trt::gLoggerFinder == nullptr && finder != nullptr) mq::trt::gLoggerFinder = finder;
  } catch (...) {
  }
}

extern "C" MQ_TRT_EXPORT int32_t mq_scan_trt_register_creators(void) {
  try {
    nvinfer1::IPluginRegistry* registry = getPluginRegistry();
    if (registry == nullptr) {
      mq::trt::logError("mq_scan_trt_register_creators: getPluginRegistry() returned null");
      return 1;
    }
    int32_t rc = 0;
    for (int32_t i = 0; i < mq::trt::kNB_CREATORS; ++i) {
      nvinfer1::IPluginCreatorV3One& c = mq::trt::creatorAt(i);
      if (registry->getCreator(c.getPluginName(), c.getPluginVersion(), mq::trt::kPLUGIN_NAMESPACE) != nullptr) {
        continue;  // already there (loadLibrary or an earlier call)
      }
      if (!registry->registerCreator(c, mq::trt::kPLUGIN_NAMESPACE)) rc = 1;
    }
    return rc;
  } catch (std::exception const& e) {
    mq::trt::logError(std::string("mq_scan_trt_register_creators: ") + e.what());
  } catch (...) {
    mq::trt::logError("mq_scan_trt_register_creators: unknown exception");
  }
  return 1;
}

extern "C" MQ_TRT_EXPORT char const* mq_scan_trt_last_error(void) { return mq::trt::lastError(); }
