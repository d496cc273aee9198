// ONNX Runtime custom-op library for mq::SelectiveScan (domain "mq", since version 1) on the CPU EP; the Mamba2
// ops (mq::SSDScan, mq::SSDStateUpdate and their Float twins) are in ssd_ops.cpp and registered below too.
//
// Glue only (STYLE 3): it checks shapes, fills MQScanParams and calls mq_scan_cpu from libmq_scan_cpu.so.
// Written against the plain C API so that no C++ exception can cross the ABI: every callback is
// noexcept, catches everything and reports through an OrtStatus. The C API subset we call is declared
// in mq_ort_api.h (slot indices of ORT's versioned function table), so no ORT header is needed to build.
//
// API level: we ask ORT for API version 17 (ORT >= 1.17), the first with KernelContext_ParallelFor,
// InferOutputShapeFn and GetStartVersion, and call nothing added later. Work is split over the session's
// intra-op thread pool (ParallelFor over (batch, block of channels)), each piece a single-threaded
// mq_scan_cpu call, so intra_op_num_threads governs this op like ORT's own kernels.
//
// Output type: y is float or float16 by the out_dtype attribute. ORT's custom-op schema cannot express
// "type from an attribute", so y is declared with an undefined type (any tensor) and InferOutputShapeFn
// sets its element type from out_dtype, its shape from x; h_last takes h0's type and shape.
#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <new>
#include <memory>
#include <string>

#include "mq_selective_scan.h"
#include "mq_ort_api.h"
#include "ort_op_base.h"
#include "qlinear_ops.h"
#include "scan_float.h"
#include "ssd_ops.h"
#include "state_codec.h"
#include "state_update.h"

using namespace mq_ort;

namespace {

constexpr uint32_t kOrtApiLevel = kApiVersion;
constexpr const char *kDomain = "mq";
constexpr const char *kOpName = "SelectiveScan";
constexpr const char *kOpNameFloat = "SelectiveScanFloat";   // float32 x, delta, B, C, z; no scales
constexpr size_t kNumInputs = 10;
constexpr size_t kNumOutputs = 2;
constexpr int64_t kChannelsPerTask = 32;   // a multiple of the CPU kernel's 16-channel block
constexpr int64_t kSerialBelow = int64_t{1} << 16;   // b*L*D*N: below this one thread is faster

enum Input { kX, kDelta, kA, kB, kC, kD, kZ, kDeltaBias, kGateScale, kH0 };
const char *const kInputNames[kNumInputs] = {"x", "delta", "A", "B", "C", "D", "z", "delta_bias", "gate_scale", "h0"};
const char *const kScaleAttrs[5] = {"x_scale", "delta_scale", "B_scale", "C_scale", "z_scale"};

const Api *g_api = nullptr;

bool is_int8_input(size_t i) { return i == kX || i == kDelta || i == kB || i == kC || i == kZ; }

OrtStatus *error(OrtErrorCode code, const std::string &msg) {
  return g_api->CreateStatus(code, ("mq::SelectiveScan: " + msg).c_str());
}
OrtStatus *error_float(OrtErrorCode code, const std::string &msg) {
  return g_api->CreateStatus(code, ("mq::SelectiveScanFloat: " + msg).c_str());
}

/* a failure of ours, not the inputs' (a status allocates nothing on our side) */
OrtStatus *internal_error(const char *msg) { return g_api->CreateStatus(ORT_FAIL, msg); }

struct Kernel {
  bool is_float;    // mq::SelectiveScanFloat: no scales, float32 y
  float scale[5];   // x, delta, B, C, z
  int64_t out_dtype;
};

/* out_dtype: the attribute's value, 1 when absent. Returns an error for anything but 1 or 10. */
OrtStatus *check_out_dtype(int64_t v) {
  if (v == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT || v == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16) return nullptr;
  return error(ORT_INVALID_ARGUMENT, "attribute out_dtype must be 1 (float) or 10 (float16), got " + std::to_string(v));
}

// ---- shapes -------------------------------------------------------------------------------------

struct Shape {
  int64_t d[4];
  size_t rank;
};

OrtStatus *shape_of(const OrtValue *v, Shape *s) {
  OrtTensorTypeAndShapeInfo *info = nullptr;
  OrtStatus *st = g_api->GetTensorTypeAndShape(v, &info);
  if (st) return st;
  size_t rank = 0;
  st = g_api->GetDimensionsCount(info, &rank);
  if (!st && rank > 4) st = error(ORT_INVALID_ARGUMENT, "an input has rank " + std::to_string(rank));
  if (!st) {
    s->rank = rank;
    st = g_api->GetDimensions(info, s->d, rank);
  }
  g_api->ReleaseTensorTypeAndShapeInfo(info);
  return st;
}

std::string str(const Shape &s) {
  std::string out = "[";
  for (size_t i = 0; i < s.rank; ++i) out += (i ? ", " : "") + std::to_string(s.d[i]);
  return out + "]";
}

/* Checks every input against x's [b, L, D] and A's [D, N]; fills the sizes. */
OrtStatus *check_shapes(const Shape *s, int64_t *b, int64_t *L, int64_t *D, int64_t *N) {
  if (s[kX].rank != 3) return error(ORT_INVALID_ARGUMENT, "x must be [b, L, D], got " + str(s[kX]));
  if (s[kA].rank != 2) return error(ORT_INVALID_ARGUMENT, "A must be [D, N], got " + str(s[kA]));
  *b = s[kX].d[0], *L = s[kX].d[1], *D = s[kX].d[2], *N = s[kA].d[1];
  const Shape want[kNumInputs] = {
      {{*b, *L, *D}, 3}, {{*b, *L, *D}, 3}, {{*D, *N}, 2}, {{*b, *L, *N}, 3}, {{*b, *L, *N}, 3},
      {{*D}, 1},         {{*b, *L, *D}, 3}, {{*D}, 1},     {{*D}, 1},         {{*b, *D, *N}, 3}};
  for (size_t i = 0; i < kNumInputs; ++i) {
    bool same = s[i].rank == want[i].rank;
    for (size_t k = 0; same && k < want[i].rank; ++k) same = s[i].d[k] == want[i].d[k];
    if (!same)
      return error(ORT_INVALID_ARGUMENT, std::string(kInputNames[i]) + " has shape " + str(s[i]) + ", expected " +
                                             str(want[i]) + " from x " + str(s[kX]) + " and A " + str(s[kA]));
  }
  if (*D < 1 || *N < 1 || *N > MQ_SCAN_MAX_DSTATE)
    return error(ORT_INVALID_ARGUMENT, "need D >= 1 and 1 <= N <= " + std::to_string(MQ_SCAN_MAX_DSTATE) +
                                           ", got D " + std::to_string(*D) + ", N " + std::to_string(*N));
  return nullptr;
}

// ---- parallel split -----------------------------------------------------------------------------

struct Split {
  const MQScanParams *p;
  int64_t blocks_per_batch;
  size_t y_elem_size;
  std::atomic<int> failed{0};
  std::mutex mu;
  std::string message;
};

/* One task: batch element t / blocks_per_batch, channels [d0, d0 + kChannelsPerTask) of it. Runs on ORT's
 * thread pool, where an escaping exception ends the process: noexcept, and the one thing here that can
 * throw (copying the message) is caught and replaced by a fixed one. */
void run_task(void *user, size_t t) noexcept {
  Split &s = *static_cast<Split *>(user);
  const MQScanParams &p = *s.p;
  const int64_t bi = static_cast<int64_t>(t) / s.blocks_per_batch;
  const int64_t d0 = (static_cast<int64_t>(t) % s.blocks_per_batch) * kChannelsPerTask;
  const int64_t nd = p.dim - d0 < kChannelsPerTask ? p.dim - d0 : kChannelsPerTask;
  MQScanParams q = p;   // batch 1, a slice of channels: strides stay those of the full tensors
  q.batch = 1;
  q.dim = nd;
  const int64_t xo = bi * p.x_batch_stride + d0, bco = bi * p.bc_batch_stride;
  const int64_t so = (bi * p.dim + d0) * p.dstate;
  q.x = p.x + xo, q.delta = p.delta + xo, q.z = p.z + xo;
  q.B = p.B + bco, q.C = p.C + bco;
  q.A = p.A + d0 * p.dstate, q.D = p.D + d0, q.delta_bias = p.delta_bias + d0, q.gate_scale = p.gate_scale + d0;
  q.h0 = p.h0 + so, q.h_last = p.h_last + so;
  q.y = static_cast<char *>(p.y) + static_cast<size_t>(bi * p.y_batch_stride + d0) * s.y_elem_size;
  if (mq_scan_cpu(&q, 1) != MQ_SCAN_OK && s.failed.exchange(1) == 0) {
    try {
      std::lock_guard<std::mutex> lock(s.mu);
      s.message = mq_scan_last_error();   // thread-local in the worker: copy it here
    } catch (...) {
      s.failed.store(2);                  // compute() reports without the worker's text
    }
  }
}

// ---- kernel -------------------------------------------------------------------------------------

OrtStatus *compute(const Kernel &k, OrtKernelContext *ctx) {
  size_t n_in = 0;
  OrtStatus *st = g_api->KernelContext_GetInputCount(ctx, &n_in);
  if (st) return st;
  if (n_in != kNumInputs) return error(ORT_INVALID_ARGUMENT, "expects 10 inputs, got " + std::to_string(n_in));
  const OrtValue *in[kNumInputs];
  Shape shape[kNumInputs];
  for (size_t i = 0; i < kNumInputs; ++i) {
    if ((st = g_api->KernelContext_GetInput(ctx, i, &in[i]))) return st;
    if (in[i] == nullptr) return error(ORT_INVALID_ARGUMENT, std::string("input ") + kInputNames[i] + " is missing");
    if ((st = shape_of(in[i], &shape[i]))) return st;
  }
  int64_t b = 0, L = 0, D = 0, N = 0;
  if ((st = check_shapes(shape, &b, &L, &D, &N))) return st;

  const int64_t y_dims[3] = {b, L, D}, h_dims[3] = {b, D, N};
  OrtValue *y_val = nullptr, *h_val = nullptr;
  if ((st = g_api->KernelContext_GetOutput(ctx, 0, y_dims, 3, &y_val))) return st;
  if ((st = g_api->KernelContext_GetOutput(ctx, 1, h_dims, 3, &h_val))) return st;
  void *y = nullptr;
  float *h_last = nullptr;
  if ((st = g_api->GetTensorMutableData(y_val, &y))) return st;
  if ((st = g_api->GetTensorMutableData(h_val, reinterpret_cast<void **>(&h_last)))) return st;

  const void *data[kNumInputs];
  for (size_t i = 0; i < kNumInputs; ++i)
    if ((st = g_api->GetTensorMutableData(const_cast<OrtValue *>(in[i]), const_cast<void **>(&data[i])))) return st;

  if (b == 0) return nullptr;   // empty outputs
  if (L == 0) {                  // no step: the state passes through
    std::memcpy(h_last, data[kH0], static_cast<size_t>(b * D * N) * sizeof(float));
    return nullptr;
  }

  MQScanParams p;
  std::memset(&p, 0, sizeof p);
  p.batch = b, p.seqlen = L, p.dim = D, p.dstate = N;
  p.x = static_cast<const int8_t *>(data[kX]);
  p.delta = static_cast<const int8_t *>(data[kDelta]);
  p.B = static_cast<const int8_t *>(data[kB]);
  p.C = static_cast<const int8_t *>(data[kC]);
  p.z = static_cast<const int8_t *>(data[kZ]);
  p.x_scale = k.scale[0], p.delta_scale = k.scale[1], p.B_scale = k.scale[2], p.C_scale = k.scale[3];
  p.z_scale = k.scale[4];
  p.A = static_cast<const float *>(data[kA]);
  p.D = static_cast<const float *>(data[kD]);
  p.delta_bias = static_cast<const float *>(data[kDeltaBias]);
  p.gate_scale = static_cast<const float *>(data[kGateScale]);
  p.h0 = static_cast<const float *>(data[kH0]);
  p.y = y;
  p.h_last = h_last;
  p.out_fp16 = k.out_dtype == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16 ? 1 : 0;
  mq_scan_set_contiguous_strides(&p);
  if (mq_scan_validate(&p) != MQ_SCAN_OK) return error(ORT_INVALID_ARGUMENT, mq_scan_last_error());

  if (b * L * D * N < kSerialBelow) {
    if (mq_scan_cpu(&p, 1) != MQ_SCAN_OK) return error(ORT_FAIL, mq_scan_last_error());
    return nullptr;
  }
  Split split;
  split.p = &p;
  split.blocks_per_batch = (D + kChannelsPerTask - 1) / kChannelsPerTask;
  split.y_elem_size = p.out_fp16 ? 2 : 4;
  if ((st = g_api->KernelContext_ParallelFor(ctx, run_task, static_cast<size_t>(b * split.blocks_per_batch), 0,
                                             &split)))
    return st;
  const int failed = split.failed.load();
  if (failed == 1) return error(ORT_FAIL, split.message);
  if (failed != 0) return internal_error("mq::SelectiveScan: the scan of a slice failed (out of memory?)");
  return nullptr;
}

// ---- mq::SelectiveScanFloat ----------------------------------------------------------------------

struct FloatSplit {
  const mq_scan::FloatScanParams *p;
  int64_t blocks_per_batch;
};

void run_float_task(void *user, size_t t) noexcept {   // on ORT's thread pool: nothing here throws
  const FloatSplit &s = *static_cast<const FloatSplit *>(user);
  const int64_t bi = static_cast<int64_t>(t) / s.blocks_per_batch;
  const int64_t d0 = (static_cast<int64_t>(t) % s.blocks_per_batch) * kChannelsPerTask;
  mq_scan::scan_float_slice(*s.p, bi, d0, std::min<int64_t>(kChannelsPerTask, s.p->dim - d0));
}

OrtStatus *compute_float(OrtKernelContext *ctx) {
  size_t n_in = 0;
  OrtStatus *st = g_api->KernelContext_GetInputCount(ctx, &n_in);
  if (st) return st;
  if (n_in != kNumInputs) return error_float(ORT_INVALID_ARGUMENT, "expects 10 inputs, got " + std::to_string(n_in));
  const OrtValue *in[kNumInputs];
  Shape shape[kNumInputs];
  for (size_t i = 0; i < kNumInputs; ++i) {
    if ((st = g_api->KernelContext_GetInput(ctx, i, &in[i]))) return st;
    if (in[i] == nullptr) return error_float(ORT_INVALID_ARGUMENT, std::string("input ") + kInputNames[i] + " is missing");
    if ((st = shape_of(in[i], &shape[i]))) return st;
  }
  int64_t b = 0, L = 0, D = 0, N = 0;
  if ((st = check_shapes(shape, &b, &L, &D, &N))) return st;
  const int64_t y_dims[3] = {b, L, D}, h_dims[3] = {b, D, N};
  OrtValue *y_val = nullptr, *h_val = nullptr;
  if ((st = g_api->KernelContext_GetOutput(ctx, 0, y_dims, 3, &y_val))) return st;
  if ((st = g_api->KernelContext_GetOutput(ctx, 1, h_dims, 3, &h_val))) return st;
  void *y = nullptr, *h_last = nullptr;
  if ((st = g_api->GetTensorMutableData(y_val, &y))) return st;
  if ((st = g_api->GetTensorMutableData(h_val, &h_last))) return st;
  const float *data[kNumInputs];
  for (size_t i = 0; i < kNumInputs; ++i) {
    void *ptr = nullptr;
    if ((st = g_api->GetTensorMutableData(const_cast<OrtValue *>(in[i]), &ptr))) return st;
    data[i] = static_cast<const float *>(ptr);
  }
  if (b == 0) return nullptr;
  if (L == 0) {
    std::memcpy(h_last, data[kH0], static_cast<size_t>(b * D * N) * sizeof(float));
    return nullptr;
  }
  mq_scan::FloatScanParams p;
  p.batch = b, p.seqlen = L, p.dim = D, p.dstate = N;
  p.x = data[kX], p.delta = data[kDelta], p.B = data[kB], p.C = data[kC], p.z = data[kZ];
  p.A = data[kA], p.D = data[kD], p.delta_bias = data[kDeltaBias], p.gate_scale = data[kGateScale];
  p.h0 = data[kH0];
  p.y = static_cast<float *>(y);
  p.h_last = static_cast<float *>(h_last);
  FloatSplit split{&p, (D + kChannelsPerTask - 1) / kChannelsPerTask};
  if (b * L * D * N < kSerialBelow) {
    for (int64_t bi = 0; bi < b; ++bi) mq_scan::scan_float_slice(p, bi, 0, D);
    return nullptr;
  }
  return g_api->KernelContext_ParallelFor(ctx, run_float_task, static_cast<size_t>(b * split.blocks_per_batch), 0,
                                          &split);
}

// ---- mq::SelectiveStateUpdate / mq::SelectiveStateUpdateFloat (state_update.h) -----------------

OrtStatus *copy_shape(const OrtTensorTypeAndShapeInfo *like, ONNXTensorElementDataType type,
                      OrtTensorTypeAndShapeInfo **out, size_t skip = 0);   // below, with the scan's shape inference

/* Shape inference of n outputs: output o is input from[o]'s shape without its first skip[o] dims, of type[o]. The
 * infos that ShapeInferContext_GetInputTypeShape returns belong to the context: never released here. */
OrtStatus *outputs_like_inputs(OrtShapeInferContext *ctx, size_t n, const size_t *from, const size_t *skip,
                               const ONNXTensorElementDataType *type) {
  for (size_t o = 0; o < n; ++o) {
    OrtTensorTypeAndShapeInfo *in = nullptr, *out = nullptr;
    OrtStatus *st = g_api->ShapeInferContext_GetInputTypeShape(ctx, from[o], &in);
    if (st) return st;
    if ((st = copy_shape(in, type[o], &out, skip[o]))) return st;
    st = g_api->ShapeInferContext_SetOutputTypeShape(ctx, o, out);
    g_api->ReleaseTensorTypeAndShapeInfo(out);
    if (st) return st;
  }
  return nullptr;
}

constexpr const char *kUpdateName = "SelectiveStateUpdate";
constexpr const char *kUpdateNameFloat = "SelectiveStateUpdateFloat";
constexpr const char *kUpdateNameInt8State = "SelectiveStateUpdateInt8State";
// the int8-state op: the int8 op's inputs with int8 states, then the SSM state's float16 row scales (15 inputs),
// and one more output, the new row scales
constexpr size_t kUpdateInputs = 14, kUpdateInputsFloat = 12, kUpdateOutputs = 3;
constexpr size_t kUpdateInputsInt8State = 15, kUpdateOutputsInt8State = 4;
const char *const kUpdateInputNames[kUpdateInputsInt8State] = {
    "x", "z", "conv_state", "ssm_state", "conv_w", "conv_b", "x_proj_w", "x_proj_scale", "dt_proj_w",
    "dt_proj_scale", "delta_bias", "A", "D", "gate_scale", "ssm_state_scale"};
const char *const kUpdateInputNamesFloat[kUpdateInputsFloat] = {
    "x", "z", "conv_state", "ssm_state", "conv_w", "conv_b", "x_proj_w", "dt_proj_w", "delta_bias", "A", "D",
    "gate_scale"};
const char *const kUpdateScaleAttrs[7] = {"conv_scale", "x_scale", "dt_low_scale", "delta_scale",
                                          "B_scale", "C_scale", "z_scale"};

struct UpdateKernel {
  bool is_float;
  bool int8_state;  // mq::SelectiveStateUpdateInt8State (an int8 op)
  int64_t layer;    // the slice of the stacked states
  float scale[7];   // kUpdateScaleAttrs order (int8 op)
  float norm_eps;   // < 0: none
  mutable mq_scan::ScratchCache scratch;   // the int8-state op's float states (state_codec.h)
};

OrtStatus *update_error(bool is_float, OrtErrorCode code, const std::string &msg, bool int8_state = false) {
  const char *name = is_float ? kUpdateNameFloat : (int8_state ? kUpdateNameInt8State : kUpdateName);
  return g_api->CreateStatus(code, (std::string("mq::") + name + ": " + msg).c_str());
}

bool is_int8_update_input(size_t i) { return i == 1 || i == 6 || i == 8; }
bool is_int8_state_update_input(size_t i) { return is_int8_update_input(i) || i == 2 || i == 3; }

struct PoolCall {
  OrtKernelContext *ctx;
  OrtStatus *status;
};

void ort_parallel_for(void *pool, void (*fn)(void *, size_t) noexcept, size_t n, void *user) noexcept {
  PoolCall &c = *static_cast<PoolCall *>(pool);
  if (c.status) return;   // an earlier pass failed to start: skip the rest
  c.status = g_api->KernelContext_ParallelFor(c.ctx, fn, n, 0, user);
}

OrtStatus *compute_update(const UpdateKernel &k, OrtKernelContext *ctx) {
  const bool fl = k.is_float, i8 = k.int8_state;
  auto err = [&](OrtErrorCode code, const std::string &msg) { return update_error(fl, code, msg, i8); };
  const size_t want_in = fl ? kUpdateInputsFloat : (i8 ? kUpdateInputsInt8State : kUpdateInputs);
  const char *const *names = fl ? kUpdateInputNamesFloat : kUpdateInputNames;
  size_t n_in = 0;
  OrtStatus *st = g_api->KernelContext_GetInputCount(ctx, &n_in);
  if (st) return st;
  if (n_in != want_in) return err(ORT_INVALID_ARGUMENT, "expects " + std::to_string(want_in) +
                                                                      " inputs, got " + std::to_string(n_in));
  const OrtValue *in[kUpdateInputsInt8State];
  Shape sh[kUpdateInputsInt8State];
  const void *data[kUpdateInputsInt8State];
  for (size_t i = 0; i < want_in; ++i) {
    if ((st = g_api->KernelContext_GetInput(ctx, i, &in[i]))) return st;
    if (in[i] == nullptr) return err(ORT_INVALID_ARGUMENT, std::string("input ") + names[i] + " is missing");
    if ((st = shape_of(in[i], &sh[i]))) return st;
    if ((st = g_api->GetTensorMutableData(const_cast<OrtValue *>(in[i]), const_cast<void **>(&data[i])))) return st;
  }
  // index of each named input in this op's list
  const size_t iX = 0, iZ = 1, iConv = 2, iSsm = 3, iCw = 4, iCb = 5, iXw = 6;
  const size_t iXs = fl ? 0 : 7, iDw = fl ? 7 : 8, iDs = fl ? 0 : 9, iBias = fl ? 8 : 10, iA = fl ? 9 : 11;
  const size_t iD = fl ? 10 : 12, iG = fl ? 11 : 13;
  if (sh[iX].rank != 3) return err(ORT_INVALID_ARGUMENT, "x must be [b, L, Di], got " + str(sh[iX]));
  if (sh[iConv].rank != 4 || sh[iA].rank != 2 || sh[iXw].rank != 2)
    return err(ORT_INVALID_ARGUMENT, "conv_state must be [n_layer, b, Di, K-1], A [Di, N], x_proj_w "
                                                  "[R+2N, Di]; got " + str(sh[iConv]) + ", " + str(sh[iA]) + ", " + str(sh[iXw]));
  const int64_t b = sh[iX].d[0], L = sh[iX].d[1], Di = sh[iX].d[2], K = sh[iConv].d[3] + 1, N = sh[iA].d[1];
  const int64_t n_layer = sh[iConv].d[0];
  if (k.layer < 0 || k.layer >= n_layer)
    return err(ORT_INVALID_ARGUMENT, "attribute layer " + std::to_string(k.layer) + " is outside the " +
                                                      std::to_string(n_layer) + " layers of conv_state");
  const int64_t O = sh[iXw].d[0], R = O - 2 * N;
  if (R < 1) return err(ORT_INVALID_ARGUMENT, "x_proj_w has " + std::to_string(O) + " rows, fewer than 2 N + 1 = " +
                                                            std::to_string(2 * N + 1));
  struct Want { size_t i; Shape s; };
  const Want want[] = {{iZ, {{b, L, Di}, 3}}, {iConv, {{n_layer, b, Di, K - 1}, 4}}, {iSsm, {{n_layer, b, Di, N}, 4}},
                       {iCw, {{Di, K}, 2}},
                       {iCb, {{Di}, 1}}, {iXw, {{O, Di}, 2}}, {iDw, {{R, Di}, 2}}, {iBias, {{Di}, 1}}, {iA, {{Di, N}, 2}},
                       {iD, {{Di}, 1}}, {iG, {{Di}, 1}}};
  for (const Want &w : want) {
    bool same = sh[w.i].rank == w.s.rank;
    for (size_t d = 0; same && d < w.s.rank; ++d) same = sh[w.i].d[d] == w.s.d[d];
    if (!same)
      return err(ORT_INVALID_ARGUMENT, std::string(names[w.i]) + " has shape " + str(sh[w.i]) + ", expected " +
                                                        str(w.s) + " from x " + str(sh[iX]) + ", conv_state, A and x_proj_w");
  }
  if (!fl) {
    const Want scales[] = {{iXs, {{O}, 1}}, {iDs, {{Di}, 1}}};
    for (const Want &w : scales)
      if (sh[w.i].rank != 1 || sh[w.i].d[0] != w.s.d[0])
        return err(ORT_INVALID_ARGUMENT, std::string(names[w.i]) + " has shape " + str(sh[w.i]) +
                                                          ", expected " + str(w.s));
  }
  const size_t iScale = 14;   // the int8-state op's row scales
  if (i8 && (sh[iScale].rank != 3 || sh[iScale].d[0] != n_layer || sh[iScale].d[1] != b || sh[iScale].d[2] != Di))
    return err(ORT_INVALID_ARGUMENT, "ssm_state_scale has shape " + str(sh[iScale]) + ", expected " +
                                         str(Shape{{n_layer, b, Di}, 3}) + " from ssm_state");
  const int64_t y_dims[3] = {b, L, Di}, c_dims[3] = {b, Di, K - 1}, h_dims[3] = {b, Di, N}, s_dims[2] = {b, Di};
  const size_t n_out = i8 ? kUpdateOutputsInt8State : kUpdateOutputs;
  OrtValue *out[kUpdateOutputsInt8State] = {nullptr, nullptr, nullptr, nullptr};
  if ((st = g_api->KernelContext_GetOutput(ctx, 0, y_dims, 3, &out[0]))) return st;
  if ((st = g_api->KernelContext_GetOutput(ctx, 1, c_dims, 3, &out[1]))) return st;
  if ((st = g_api->KernelContext_GetOutput(ctx, 2, h_dims, 3, &out[2]))) return st;
  if (i8 && (st = g_api->KernelContext_GetOutput(ctx, 3, s_dims, 2, &out[3]))) return st;
  void *outp[kUpdateOutputsInt8State] = {nullptr, nullptr, nullptr, nullptr};
  for (size_t o = 0; o < n_out; ++o)
    if ((st = g_api->GetTensorMutableData(out[o], &outp[o]))) return st;

  mq_scan::StateUpdateParams p;
  std::memset(&p, 0, sizeof p);
  p.is_float = fl;
  p.batch = b, p.seqlen = L, p.dim = Di, p.dstate = N, p.dt_rank = R, p.dconv = K;
  auto f = [&](size_t i) { return static_cast<const float *>(data[i]); };
  auto q = [&](size_t i) { return static_cast<const int8_t *>(data[i]); };
  p.x = f(iX);
  if (fl) {
    p.z_f = f(iZ), p.xw_f = f(iXw), p.dtw_f = f(iDw);
  } else {
    p.z_q = q(iZ), p.xw_q = q(iXw), p.xw_scale = f(iXs), p.dtw_q = q(iDw), p.dtw_scale = f(iDs);
    p.conv_scale = k.scale[0], p.x_scale = k.scale[1], p.dt_low_scale = k.scale[2], p.delta_scale = k.scale[3];
    p.B_scale = k.scale[4], p.C_scale = k.scale[5], p.z_scale = k.scale[6];
  }
  p.conv_w = f(iCw), p.conv_b = f(iCb);
  p.delta_bias = f(iBias), p.A = f(iA), p.D = f(iD), p.gate_scale = f(iG);
  p.norm_eps = k.norm_eps;
  p.y = static_cast<float *>(outp[0]);
  PoolCall pool{ctx, nullptr};
  std::string message;
  int rc = 0;
  if (!i8) {
    p.conv_state = f(iConv) + k.layer * b * Di * (K - 1), p.ssm_state = f(iSsm) + k.layer * b * Di * N;
    p.conv_state_out = static_cast<float *>(outp[1]), p.ssm_state_out = static_cast<float *>(outp[2]);
    rc = mq_scan::state_update(p, ort_parallel_for, &pool, &message);
  } else {   // this layer's int8 states decoded into float scratch, updated, encoded (state_codec.h)
    mq_scan::Int8States c;
    c.batch = b, c.rows = Di, c.n = N, c.conv = Di * (K - 1), c.conv_scale = p.conv_scale;
    c.conv_q = q(iConv) + k.layer * b * Di * (K - 1), c.ssm_q = q(iSsm) + k.layer * b * Di * N;
    c.ssm_scale = static_cast<const uint16_t *>(data[iScale]) + k.layer * b * Di;
    c.conv_q_out = static_cast<int8_t *>(outp[1]), c.ssm_q_out = static_cast<int8_t *>(outp[2]);
    c.ssm_scale_out = static_cast<uint16_t *>(outp[3]);
    // (every value is written before it is read: decode fills the inputs, the update the outputs)
    std::unique_lock<std::mutex> held;
    std::unique_ptr<float[]> own;
    float *f32 = k.scratch.get(static_cast<size_t>(2 * b * (c.conv + Di * N)), &held, &own);
    c.conv_f = f32, c.conv_f_out = f32 + b * c.conv;
    c.ssm_f = f32 + 2 * b * c.conv, c.ssm_f_out = c.ssm_f + b * Di * N;
    c.conv_decode();
    p.conv_state = c.conv_f, p.ssm_state = c.ssm_f, p.conv_state_out = c.conv_f_out, p.ssm_state_out = c.ssm_f_out;
    p.int8_ssm = &c;   // the SSM state's rows: by the scan's tasks
    rc = mq_scan::state_update(p, ort_parallel_for, &pool, &message);
    if (!pool.status && rc == 0) c.conv_encode();
  }
  if (pool.status) return pool.status;
  if (rc != 0)
    return err(rc == mq_scan::kStateUpdateNoMemory ? ORT_FAIL : ORT_INVALID_ARGUMENT, message);
  return nullptr;
}

OrtStatus *create_update_kernel_impl(bool is_float, const OrtKernelInfo *info, void **out, bool int8_state = false) {
  UpdateKernel *k = new UpdateKernel();
  k->is_float = is_float;
  k->int8_state = int8_state;
  auto update_error_k = [int8_state, is_float](OrtErrorCode code, const std::string &msg) {
    return update_error(is_float, code, msg, int8_state);
  };
  OrtStatus *lst = g_api->KernelInfoGetAttribute_int64(info, "layer", &k->layer);
  if (lst) {
    g_api->ReleaseStatus(lst);
    delete k;
    return update_error_k(ORT_INVALID_ARGUMENT, "missing int attribute layer");
  }
  if (!is_float) {
    for (int i = 0; i < 7; ++i) {
      OrtStatus *st = g_api->KernelInfoGetAttribute_float(info, kUpdateScaleAttrs[i], &k->scale[i]);
      if (st) {
        g_api->ReleaseStatus(st);
        delete k;
        return update_error_k(ORT_INVALID_ARGUMENT, std::string("missing float attribute ") + kUpdateScaleAttrs[i]);
      }
      if (!(k->scale[i] > 0.f && std::isfinite(k->scale[i]))) {
        const float v = k->scale[i];
        delete k;
        return update_error_k(ORT_INVALID_ARGUMENT, std::string("attribute ") + kUpdateScaleAttrs[i] +
                                                                " must be finite and > 0, got " + std::to_string(v));
      }
    }
  }
  OrtStatus *st = g_api->KernelInfoGetAttribute_float(info, "norm_eps", &k->norm_eps);
  if (st) {   // absent: no dt/B/C norm
    g_api->ReleaseStatus(st);
    k->norm_eps = -1.f;
  } else if (!(k->norm_eps >= 0.f && std::isfinite(k->norm_eps))) {
    const float v = k->norm_eps;
    delete k;
    return update_error_k(ORT_INVALID_ARGUMENT, "attribute norm_eps must be finite and >= 0, got " + std::to_string(v));
  }
  *out = k;
  return nullptr;
}

OrtStatus *MQ_ORT_CALL create_update_kernel(const OrtCustomOp *, const OrtApi *, const OrtKernelInfo *info,
                                             void **out) noexcept {
  const char *what = "mq::SelectiveStateUpdate: internal error (out of memory?) creating the kernel";
  return mq_scan::op_base::guarded(g_api, what, [&]() -> OrtStatus * {
    return create_update_kernel_impl(false, info, out);
  });
}

OrtStatus *MQ_ORT_CALL create_update_kernel_float(const OrtCustomOp *, const OrtApi *, const OrtKernelInfo *info,
                                                   void **out) noexcept {
  const char *what = "mq::SelectiveStateUpdateFloat: internal error (out of memory?) creating the kernel";
  return mq_scan::op_base::guarded(g_api, what, [&]() -> OrtStatus * {
    return create_update_kernel_impl(true, info, out);
  });
}

OrtStatus *MQ_ORT_CALL create_update_kernel_int8_state(const OrtCustomOp *, const OrtApi *, const OrtKernelInfo *info,
                                                        void **out) noexcept {
  const char *what = "mq::SelectiveStateUpdateInt8State: internal error (out of memory?) creating the kernel";
  return mq_scan::op_base::guarded(g_api, what, [&]() -> OrtStatus * {
    return create_update_kernel_impl(false, info, out, true);
  });
}

OrtStatus *MQ_ORT_CALL update_compute(void *kernel, OrtKernelContext *ctx) noexcept {
  const char *what = "mq::SelectiveStateUpdate: internal error (out of memory?) in compute";
  return mq_scan::op_base::guarded(g_api, what, [&]() -> OrtStatus * {
    return compute_update(*static_cast<const UpdateKernel *>(kernel), ctx);
  });
}

void MQ_ORT_CALL update_destroy(void *kernel) noexcept { delete static_cast<UpdateKernel *>(kernel); }

/* outputs: y like x, conv_state_out / ssm_state_out like one layer of conv_state / ssm_state (all float; the
 * int8-state op's: int8 states, and ssm_state_scale_out like one layer of ssm_state_scale, float16) */
OrtStatus *infer_update_shapes_impl(OrtShapeInferContext *ctx, bool int8_state) {
  const size_t from[kUpdateOutputsInt8State] = {0, 2, 3, 14}, skip[kUpdateOutputsInt8State] = {0, 1, 1, 1};
  const ONNXTensorElementDataType state = int8_state ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  const ONNXTensorElementDataType type[kUpdateOutputsInt8State] = {
      ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, state, state, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16};
  return outputs_like_inputs(ctx, int8_state ? kUpdateOutputsInt8State : kUpdateOutputs, from, skip, type);
}

OrtStatus *MQ_ORT_CALL infer_update_shapes_int8_state(const OrtCustomOp *, OrtShapeInferContext *ctx) noexcept {
  const char *what = "mq::SelectiveStateUpdateInt8State: internal error in shape inference";
  return mq_scan::op_base::guarded(g_api, what, [&]() -> OrtStatus * {
    return infer_update_shapes_impl(ctx, true);
  });
}

OrtStatus *MQ_ORT_CALL infer_update_shapes(const OrtCustomOp *, OrtShapeInferContext *ctx) noexcept {
  const char *what = "mq::SelectiveStateUpdate: internal error in shape inference";
  return mq_scan::op_base::guarded(g_api, what, [&]() -> OrtStatus * {
    return infer_update_shapes_impl(ctx, false);
  });
}

// ---- OrtCustomOp callbacks (all noexcept: nothing may unwind into ORT) --------------------------

OrtStatus *MQ_ORT_CALL create_kernel(const OrtCustomOp *, const OrtApi *, const OrtKernelInfo *info,
                                      void **out) noexcept {
  const Api *api = g_api;
  const char *what = "mq::SelectiveScan: internal error (out of memory?) creating the kernel";
  return mq_scan::op_base::guarded(g_api, what, [&]() -> OrtStatus * {
    Kernel *k = new Kernel();
    k->is_float = false;
    for (int i = 0; i < 5; ++i) {
      OrtStatus *st = api->KernelInfoGetAttribute_float(info, kScaleAttrs[i], &k->scale[i]);
      if (st) {
        api->ReleaseStatus(st);
        delete k;
        return error(ORT_INVALID_ARGUMENT, std::string("missing float attribute ") + kScaleAttrs[i]);
      }
      if (!(k->scale[i] > 0.f && std::isfinite(k->scale[i]))) {   // also catches NaN
        const float v = k->scale[i];
        delete k;
        return error(ORT_INVALID_ARGUMENT, std::string("attribute ") + kScaleAttrs[i] +
                                               " must be finite and > 0, got " + std::to_string(v));
      }
    }
    OrtStatus *st = api->KernelInfoGetAttribute_int64(info, "out_dtype", &k->out_dtype);
    if (st) {   // absent: the default
      api->ReleaseStatus(st);
      k->out_dtype = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    }
    if ((st = check_out_dtype(k->out_dtype))) {
      delete k;
      return st;
    }
    *out = k;
    return nullptr;
  });
}

OrtStatus *MQ_ORT_CALL kernel_compute(void *kernel, OrtKernelContext *ctx) noexcept {
  const char *what = "mq::SelectiveScan: internal error (out of memory?) in compute";
  return mq_scan::op_base::guarded(g_api, what, [&]() -> OrtStatus * {
    const Kernel &k = *static_cast<const Kernel *>(kernel);
    return k.is_float ? compute_float(ctx) : compute(k, ctx);
  });
}

void MQ_ORT_CALL kernel_destroy(void *kernel) noexcept { delete static_cast<Kernel *>(kernel); }

/* A new type-and-shape: `like`'s dims (values and symbolic names) without the first `skip`, element type `type`
 * (rank at most 4) */
OrtStatus *copy_shape(const OrtTensorTypeAndShapeInfo *like, ONNXTensorElementDataType type,
                      OrtTensorTypeAndShapeInfo **out, size_t skip) {
  return mq_scan::op_base::copy_shape(g_api, "mq::SelectiveScan", "mq_scan_dim_", like, type, skip, -1, 0, 4, out);
}

/* y: x's shape with out_dtype's element type; h_last: h0's shape, float */
OrtStatus *set_output_shapes(OrtShapeInferContext *ctx, int64_t out_dtype) {
  const size_t from[kNumOutputs] = {kX, kH0}, skip[kNumOutputs] = {0, 0};
  const ONNXTensorElementDataType type[kNumOutputs] = {static_cast<ONNXTensorElementDataType>(out_dtype),
                                                       ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT};
  return outputs_like_inputs(ctx, kNumOutputs, from, skip, type);
}

OrtStatus *MQ_ORT_CALL infer_shapes(const OrtCustomOp *, OrtShapeInferContext *ctx) noexcept {
  return mq_scan::op_base::guarded(g_api, "mq::SelectiveScan: internal error in shape inference", [&]() -> OrtStatus * {
    int64_t out_dtype = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    const OrtOpAttr *attr = nullptr;
    OrtStatus *st = g_api->ShapeInferContext_GetAttribute(ctx, "out_dtype", &attr);
    if (st) {   // absent: the default
      g_api->ReleaseStatus(st);
      attr = nullptr;
    }
    if (attr != nullptr) {
      size_t len = 0;
      if ((st = g_api->ReadOpAttr(attr, ORT_OP_ATTR_INT, &out_dtype, sizeof out_dtype, &len))) return st;
    }
    if ((st = check_out_dtype(out_dtype))) return st;
    return set_output_shapes(ctx, out_dtype);
  });
}

OrtStatus *MQ_ORT_CALL infer_shapes_float(const OrtCustomOp *, OrtShapeInferContext *ctx) noexcept {
  const char *what = "mq::SelectiveScanFloat: internal error in shape inference";
  return mq_scan::op_base::guarded(g_api, what, [&]() -> OrtStatus * {
    return set_output_shapes(ctx, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
  });
}

OrtStatus *MQ_ORT_CALL create_kernel_float(const OrtCustomOp *, const OrtApi *, const OrtKernelInfo *,
                                            void **out) noexcept {
  const char *what = "mq::SelectiveScanFloat: internal error (out of memory?) creating the kernel";
  return mq_scan::op_base::guarded(g_api, what, [&]() -> OrtStatus * {
    Kernel *k = new Kernel();
    k->is_float = true;
    k->out_dtype = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    *out = k;
    return nullptr;
  });
}

const char *MQ_ORT_CALL op_name(const OrtCustomOp *) noexcept { return kOpName; }
const char *MQ_ORT_CALL op_name_float(const OrtCustomOp *) noexcept { return kOpNameFloat; }
size_t MQ_ORT_CALL input_count(const OrtCustomOp *) noexcept { return kNumInputs; }
size_t MQ_ORT_CALL output_count(const OrtCustomOp *) noexcept { return kNumOutputs; }
ONNXTensorElementDataType MQ_ORT_CALL input_type(const OrtCustomOp *, size_t i) noexcept {
  return is_int8_input(i) ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
}
ONNXTensorElementDataType MQ_ORT_CALL output_type(const OrtCustomOp *, size_t i) noexcept {
  return i == 0 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
}

OrtCustomOp make_op(bool is_float) {
  OrtCustomOp op = mq_scan::op_base::base();
  op.GetName = is_float ? op_name_float : op_name;
  op.GetInputType = is_float ? mq_scan::op_base::float_type : input_type;
  op.GetInputTypeCount = input_count;
  op.GetOutputType = is_float ? mq_scan::op_base::float_type : output_type;
  op.GetOutputTypeCount = output_count;
  op.KernelDestroy = kernel_destroy;
  op.CreateKernelV2 = is_float ? create_kernel_float : create_kernel;
  op.KernelComputeV2 = kernel_compute;
  op.InferOutputShapeFn = is_float ? infer_shapes_float : infer_shapes;
  return op;
}

const char *MQ_ORT_CALL update_name(const OrtCustomOp *) noexcept { return kUpdateName; }
const char *MQ_ORT_CALL update_name_float(const OrtCustomOp *) noexcept { return kUpdateNameFloat; }
const char *MQ_ORT_CALL update_name_int8_state(const OrtCustomOp *) noexcept { return kUpdateNameInt8State; }
size_t MQ_ORT_CALL update_input_count(const OrtCustomOp *) noexcept { return kUpdateInputs; }
size_t MQ_ORT_CALL update_input_count_float(const OrtCustomOp *) noexcept { return kUpdateInputsFloat; }
size_t MQ_ORT_CALL update_output_count(const OrtCustomOp *) noexcept { return kUpdateOutputs; }
ONNXTensorElementDataType MQ_ORT_CALL update_input_type(const OrtCustomOp *, size_t i) noexcept {
  return is_int8_update_input(i) ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
}
size_t MQ_ORT_CALL update_input_count_int8_state(const OrtCustomOp *) noexcept { return kUpdateInputsInt8State; }
size_t MQ_ORT_CALL update_output_count_int8_state(const OrtCustomOp *) noexcept { return kUpdateOutputsInt8State; }
ONNXTensorElementDataType MQ_ORT_CALL update_input_type_int8_state(const OrtCustomOp *, size_t i) noexcept {
  return i == 14 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16
                 : is_int8_state_update_input(i) ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
}
ONNXTensorElementDataType MQ_ORT_CALL update_output_type_int8_state(const OrtCustomOp *, size_t i) noexcept {
  return i == 0 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT
                : i == 3 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16 : ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8;
}

OrtCustomOp make_update_op(bool is_float) {
  OrtCustomOp op = make_op(is_float);
  op.GetName = is_float ? update_name_float : update_name;
  op.GetInputType = is_float ? mq_scan::op_base::float_type : update_input_type;
  op.GetInputTypeCount = is_float ? update_input_count_float : update_input_count;
  op.GetOutputType = mq_scan::op_base::float_type;
  op.GetOutputTypeCount = update_output_count;
  op.KernelDestroy = update_destroy;
  op.CreateKernelV2 = is_float ? create_update_kernel_float : create_update_kernel;
  op.KernelComputeV2 = update_compute;
  op.InferOutputShapeFn = infer_update_shapes;
  return op;
}

OrtCustomOp make_update_op_int8_state() {
  OrtCustomOp op = make_update_op(false);
  op.GetName = update_name_int8_state;
  op.GetInputType = update_input_type_int8_state;
  op.GetInputTypeCount = update_input_count_int8_state;
  op.GetOutputType = update_output_type_int8_state;
  op.GetOutputTypeCount = update_output_count_int8_state;
  op.CreateKernelV2 = create_update_kernel_int8_state;
  op.InferOutputShapeFn = infer_update_shapes_int8_state;
  return op;
}

// must outlive every session that registered them: static
const OrtCustomOp g_op = make_op(false);
const OrtCustomOp g_op_float = make_op(true);
const OrtCustomOp g_update_op = make_update_op(false);
const OrtCustomOp g_update_op_float = make_update_op(true);
const OrtCustomOp g_update_op_int8_state = make_update_op_int8_state();

}  // namespace

extern "C" MQ_SCAN_API OrtStatus *MQ_ORT_CALL RegisterCustomOps(OrtSessionOptions *options,
                                                                   const OrtApiBase *api_base) noexcept {
  const OrtApi *table = api_base->GetApi(kOrtApiLevel);
  if (table == nullptr) {
    const OrtApi *v1 = api_base->GetApi(1);
    char msg[160];
    std::snprintf(msg, sizeof msg, "libmq_scan_ort needs ONNX Runtime >= 1.17 (C API %u), this is %s",
                  static_cast<unsigned>(kOrtApiLevel), api_base->GetVersionString());
    if (v1 == nullptr) return nullptr;
    // slot 0 (CreateStatus) is the one function of every version; read nothing else of an old table
    const auto create_status = reinterpret_cast<decltype(Api::CreateStatus)>(reinterpret_cast<void *const *>(v1)[0]);
    return create_status(ORT_FAIL, msg);
  }
  // one table per process: loaded once (thread-safe static initialisation), whatever registers us
  static const Api loaded = [table] {
    Api a;
    a.load(table);
    return a;
  }();
  g_api = &loaded;
  const Api *api = g_api;
  // The domain is never released: ORT keeps a pointer to it for the lifetime of the options and of
  // every session made from them, and it is a few bytes per registration. (The C API calls below do
  // not throw.)
  OrtCustomOpDomain *domain = nullptr;
  OrtStatus *st = api->CreateCustomOpDomain(kDomain, &domain);
  if (st) return st;
  if ((st = api->CustomOpDomain_Add(domain, &g_op))) return st;
  if ((st = api->CustomOpDomain_Add(domain, &g_op_float))) return st;
  if ((st = api->CustomOpDomain_Add(domain, &g_update_op))) return st;
  if ((st = api->CustomOpDomain_Add(domain, &g_update_op_float))) return st;
  if ((st = api->CustomOpDomain_Add(domain, &g_update_op_int8_state))) return st;
  size_t n_ssd = 0;   // mq::SSDScan(Float), mq::SSDStateUpdate(Float): ssd_ops.cpp
  const OrtCustomOp *const *ssd = mq_scan::ssd_custom_ops(api, &n_ssd);
  for (size_t i = 0; i < n_ssd; ++i)
    if ((st = api->CustomOpDomain_Add(domain, ssd[i]))) return st;
  size_t n_qlinear = 0;   // mq::QLinear, mq::DynamicQLinear where their kernel runs: qlinear_ops.cpp
  const OrtCustomOp *const *qlinear = mq_scan::qlinear_custom_ops(api, &n_qlinear);
  for (size_t i = 0; i < n_qlinear; ++i)
    if ((st = api->CustomOpDomain_Add(domain, qlinear[i]))) return st;
  return api->AddCustomOpDomain(options, domain);
}
