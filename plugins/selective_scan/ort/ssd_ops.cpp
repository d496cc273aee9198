// ONNX Runtime glue of mq::SSDScan(Float) and mq::SSDStateUpdate(Float / Int8State) (ssd_ops.h): attributes read and
// checked when the kernel is created, shapes checked against them at each run, MQSSDParams / SSDUpdateParams
// filled, the work split over the session's intra-op pool. Same rules as the Mamba1 ops in mq_scan_ort.cpp:
// every callback is noexcept and reports through an OrtStatus; the pool tasks are noexcept and allocate nothing.
#include "ssd_ops.h"

#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "mq_ssd.h"
#include "ort_op_base.h"
#include "ssd_update.h"
#include "state_codec.h"

using namespace mq_ort;

namespace mq_scan {
namespace {

const Api *g_api = nullptr;

// kUpdateInt8State: kUpdate on int8 states (the conv state on conv_scale, the SSM state with float16 row
// scales: state_codec.h), one more input (ssm_state_scale) and output (ssm_state_scale_out)
enum class Kind { kScan, kScanFloat, kUpdate, kUpdateFloat, kUpdateInt8State };

const char *op_name(Kind k) {
  switch (k) {
    case Kind::kScan: return "SSDScan";
    case Kind::kScanFloat: return "SSDScanFloat";
    case Kind::kUpdate: return "SSDStateUpdate";
    case Kind::kUpdateInt8State: return "SSDStateUpdateInt8State";
    default: return "SSDStateUpdateFloat";
  }
}
bool quantized(Kind k) { return k == Kind::kScan || k == Kind::kUpdate || k == Kind::kUpdateInt8State; }
bool is_update(Kind k) { return k == Kind::kUpdate || k == Kind::kUpdateFloat || k == Kind::kUpdateInt8State; }

OrtStatus *error(Kind k, OrtErrorCode code, const std::string &msg) {
  return g_api->CreateStatus(code, (std::string("mq::") + op_name(k) + ": " + msg).c_str());
}

constexpr int64_t kMaxSize = int64_t{1} << 20;   // shape attributes (as the runner's artifact check)
constexpr int64_t kSerialBelow = int64_t{1} << 16;   // b*L*H*P*N: below this one thread is faster
const char *const kScaleNames[4] = {"x_scale", "dt_scale", "B_scale", "C_scale"};

struct Kernel {
  Kind kind;
  int64_t heads = 0, head_dim = 0, groups = 0, d_state = 0, chunk = 256, layer = 0;
  float dt_min = 0.f, dt_max = std::numeric_limits<float>::infinity(), conv_scale = 1.f;
  std::vector<float> scale[4];   // x, dt, B, C (int8 ops): one value, or one per channel
  mutable ScratchCache scratch;  // the int8-state update's float states (state_codec.h)
  /* the per-tensor value, or the per-channel array, of scale i */
  float value(int i) const { return scale[i].size() == 1 ? scale[i][0] : 1.f; }
  const float *channels(int i) const { return scale[i].size() > 1 ? scale[i].data() : nullptr; }
};

// ---- attributes -----------------------------------------------------------------------------------

/* an int attribute; `fallback` >= 0: optional with that default */
OrtStatus *read_int(const Kernel &k, const OrtKernelInfo *info, const char *name, int64_t fallback, int64_t *out) {
  OrtStatus *st = g_api->KernelInfoGetAttribute_int64(info, name, out);
  if (!st) return nullptr;
  g_api->ReleaseStatus(st);
  if (fallback < 0) return error(k.kind, ORT_INVALID_ARGUMENT, std::string("missing int attribute ") + name);
  *out = fallback;
  return nullptr;
}

OrtStatus *read_float(const Kernel &k, const OrtKernelInfo *info, const char *name, bool required, float fallback,
                      float *out) {
  OrtStatus *st = g_api->KernelInfoGetAttribute_float(info, name, out);
  if (!st) return nullptr;
  g_api->ReleaseStatus(st);
  if (required) return error(k.kind, ORT_INVALID_ARGUMENT, std::string("missing float attribute ") + name);
  *out = fallback;
  return nullptr;
}

/* a scale attribute: floats (one, or `channels` values), or a single float */
OrtStatus *read_scales(const Kernel &k, const OrtKernelInfo *info, const char *name, int64_t channels,
                       std::vector<float> *out) {
  size_t n = 0;
  OrtStatus *st = g_api->KernelInfoGetAttributeArray_float(info, name, nullptr, &n);
  if (!st && n > 0) {
    out->resize(n);
    st = g_api->KernelInfoGetAttributeArray_float(info, name, out->data(), &n);
    if (st) return st;
  } else {
    if (st) g_api->ReleaseStatus(st);
    float v = 0.f;
    if ((st = g_api->KernelInfoGetAttribute_float(info, name, &v))) {
      g_api->ReleaseStatus(st);
      return error(k.kind, ORT_INVALID_ARGUMENT, std::string("missing attribute ") + name +
                                                     " (floats: one per-tensor value or one per channel)");
    }
    out->assign(1, v);
  }
  if (out->size() != 1 && static_cast<int64_t>(out->size()) != channels)
    return error(k.kind, ORT_INVALID_ARGUMENT, std::string("attribute ") + name + " has " +
                                                   std::to_string(out->size()) + " values; expected 1 (per tensor) or " +
                                                   std::to_string(channels) + " (one per channel)");
  for (size_t i = 0; i < out->size(); ++i)
    if (!((*out)[i] > 0.f && std::isfinite((*out)[i])))
      return error(k.kind, ORT_INVALID_ARGUMENT, std::string("attribute ") + name + " must hold finite values > 0, got " +
                                                     std::to_string((*out)[i]) + " at " + std::to_string(i));
  return nullptr;
}

OrtStatus *read_attributes(Kernel &k, const OrtKernelInfo *info) {
  OrtStatus *st;
  struct {
    const char *name;
    int64_t *out;
  } sizes[] = {{"heads", &k.heads}, {"head_dim", &k.head_dim}, {"groups", &k.groups}, {"d_state", &k.d_state}};
  for (auto &s : sizes) {
    if ((st = read_int(k, info, s.name, -1, s.out))) return st;
    if (*s.out < 1 || *s.out > kMaxSize)
      return error(k.kind, ORT_INVALID_ARGUMENT, std::string("attribute ") + s.name + " must be in [1, " +
                                                     std::to_string(kMaxSize) + "], got " + std::to_string(*s.out));
  }
  if ((st = read_int(k, info, "chunk", 256, &k.chunk))) return st;
  if (k.chunk < 1 || k.chunk > kMaxSize)
    return error(k.kind, ORT_INVALID_ARGUMENT, "attribute chunk must be in [1, " + std::to_string(kMaxSize) +
                                                   "], got " + std::to_string(k.chunk));
  if (k.heads % k.groups != 0)
    return error(k.kind, ORT_INVALID_ARGUMENT, "attribute heads (" + std::to_string(k.heads) +
                                                   ") is not a multiple of groups (" + std::to_string(k.groups) + ")");
  if (k.d_state > MQ_SSD_MAX_DSTATE)
    return error(k.kind, ORT_INVALID_ARGUMENT, "attribute d_state " + std::to_string(k.d_state) +
                                                   " exceeds the native kernel's maximum " +
                                                   std::to_string(MQ_SSD_MAX_DSTATE));
  if ((st = read_float(k, info, "dt_min", false, 0.f, &k.dt_min))) return st;
  if ((st = read_float(k, info, "dt_max", false, std::numeric_limits<float>::infinity(), &k.dt_max))) return st;
  if (!(std::isfinite(k.dt_min) && k.dt_min >= 0.f))
    return error(k.kind, ORT_INVALID_ARGUMENT, "attribute dt_min must be finite and >= 0, got " + std::to_string(k.dt_min));
  if (!(k.dt_max > 0.f))
    return error(k.kind, ORT_INVALID_ARGUMENT, "attribute dt_max must be > 0 (inf: no limit), got " +
                                                   std::to_string(k.dt_max));
  if (quantized(k.kind)) {
    const int64_t channels[4] = {k.heads * k.head_dim, k.heads, k.groups * k.d_state, k.groups * k.d_state};
    for (int i = 0; i < 4; ++i)
      if ((st = read_scales(k, info, kScaleNames[i], channels[i], &k.scale[i]))) return st;
  }
  if (is_update(k.kind)) {
    if ((st = read_int(k, info, "layer", -1, &k.layer))) return st;
    if (k.layer < 0)
      return error(k.kind, ORT_INVALID_ARGUMENT, "attribute layer must be >= 0, got " + std::to_string(k.layer));
    if (quantized(k.kind)) {
      if ((st = read_float(k, info, "conv_scale", true, 0.f, &k.conv_scale))) return st;
      if (!(k.conv_scale > 0.f && std::isfinite(k.conv_scale)))
        return error(k.kind, ORT_INVALID_ARGUMENT, "attribute conv_scale must be finite and > 0, got " +
                                                       std::to_string(k.conv_scale));
    }
  }
  return nullptr;
}

// ---- shapes ---------------------------------------------------------------------------------------

struct Shape {
  int64_t d[8];
  size_t rank;
};

std::string str(const Shape &s) {
  std::string out = "[";
  for (size_t i = 0; i < s.rank; ++i) out += (i ? ", " : "") + std::to_string(s.d[i]);
  return out + "]";
}

bool same(const Shape &a, const Shape &b) {
  if (a.rank != b.rank) return false;
  for (size_t i = 0; i < a.rank; ++i)
    if (a.d[i] != b.d[i]) return false;
  return true;
}

OrtStatus *shape_of(Kind kind, const OrtValue *v, Shape *s) {
  OrtTensorTypeAndShapeInfo *info = nullptr;
  OrtStatus *st = g_api->GetTensorTypeAndShape(v, &info);
  if (st) return st;
  size_t rank = 0;
  st = g_api->GetDimensionsCount(info, &rank);
  if (!st && rank > 8) st = error(kind, ORT_INVALID_ARGUMENT, "an input has rank " + std::to_string(rank));
  if (!st) {
    s->rank = rank;
    st = g_api->GetDimensions(info, s->d, rank);
  }
  g_api->ReleaseTensorTypeAndShapeInfo(info);
  return st;
}

/* The inputs of one call: values, shapes, data. */
struct Inputs {
  static constexpr size_t kMax = 10;
  const OrtValue *v[kMax];
  Shape s[kMax];
  void *data[kMax];
};

OrtStatus *get_inputs(Kind kind, OrtKernelContext *ctx, const char *const *names, size_t n, Inputs *in) {
  size_t n_in = 0;
  OrtStatus *st = g_api->KernelContext_GetInputCount(ctx, &n_in);
  if (st) return st;
  if (n_in != n)
    return error(kind, ORT_INVALID_ARGUMENT, "expects " + std::to_string(n) + " inputs, got " + std::to_string(n_in));
  for (size_t i = 0; i < n; ++i) {
    if ((st = g_api->KernelContext_GetInput(ctx, i, &in->v[i]))) return st;
    if (in->v[i] == nullptr) return error(kind, ORT_INVALID_ARGUMENT, std::string("input ") + names[i] + " is missing");
    if ((st = shape_of(kind, in->v[i], &in->s[i]))) return st;
    if ((st = g_api->GetTensorMutableData(const_cast<OrtValue *>(in->v[i]), &in->data[i]))) return st;
  }
  return nullptr;
}

struct Want {
  size_t i;
  Shape s;
};

OrtStatus *check_wanted(Kind kind, const Inputs &in, const char *const *names, const Want *want, size_t n,
                        const std::string &from) {
  for (size_t w = 0; w < n; ++w)
    if (!same(in.s[want[w].i], want[w].s))
      return error(kind, ORT_INVALID_ARGUMENT, std::string(names[want[w].i]) + " has shape " + str(in.s[want[w].i]) +
                                                   ", expected " + str(want[w].s) + " from " + from);
  return nullptr;
}

// ---- running the scan on ORT's pool -----------------------------------------------------------------

struct PoolCall {
  OrtKernelContext *ctx;
  OrtStatus *status;
};

void ort_parallel_for(void *pool, TaskFn fn, size_t n, void *user) noexcept {
  PoolCall &c = *static_cast<PoolCall *>(pool);
  if (c.status) return;   // an earlier pass failed to start: skip the rest
  c.status = g_api->KernelContext_ParallelFor(c.ctx, fn, n, 0, user);
}

/* params of the scan from the kernel's attributes (sizes and pointers filled by the caller) */
void fill_attributes(const Kernel &k, MQSSDParams *p) {
  p->heads = k.heads, p->head_dim = k.head_dim, p->groups = k.groups, p->dstate = k.d_state;
  p->in_float = quantized(k.kind) ? 0 : 1;
  p->dt_min = k.dt_min, p->dt_max = k.dt_max;
  if (quantized(k.kind)) {
    p->x_scale = k.value(0), p->dt_scale = k.value(1), p->B_scale = k.value(2), p->C_scale = k.value(3);
    p->x_scales = k.channels(0), p->dt_scales = k.channels(1), p->B_scales = k.channels(2);
    p->C_scales = k.channels(3);
  }
}

// ---- mq::SSDScan / mq::SSDScanFloat -----------------------------------------------------------------

const char *const kScanInputs[8] = {"x", "dt", "A", "B", "C", "D", "dt_bias", "h0"};

OrtStatus *compute_scan(const Kernel &k, OrtKernelContext *ctx) {
  Inputs in;
  OrtStatus *st = get_inputs(k.kind, ctx, kScanInputs, 8, &in);
  if (st) return st;
  const int64_t H = k.heads, P = k.head_dim, G = k.groups, N = k.d_state;
  const Shape &xs = in.s[0];
  if (xs.rank != 3 || xs.d[2] != H * P)
    return error(k.kind, ORT_INVALID_ARGUMENT, "x must be [b, L, heads * head_dim] = [b, L, " + std::to_string(H * P) +
                                                   "] (attributes heads " + std::to_string(H) + ", head_dim " +
                                                   std::to_string(P) + "), got " + str(xs));
  const int64_t b = xs.d[0], L = xs.d[1];
  const Want want[] = {{1, {{b, L, H}, 3}}, {2, {{H}, 1}},          {3, {{b, L, G * N}, 3}}, {4, {{b, L, G * N}, 3}},
                       {5, {{H}, 1}},       {6, {{H}, 1}},          {7, {{b, H, P, N}, 4}}};
  if ((st = check_wanted(k.kind, in, kScanInputs, want, 7, "x " + str(xs) + " and the attributes heads " +
                                                               std::to_string(H) + ", head_dim " + std::to_string(P) +
                                                               ", groups " + std::to_string(G) + ", d_state " +
                                                               std::to_string(N))))
    return st;
  const int64_t y_dims[3] = {b, L, H * P}, h_dims[4] = {b, H, P, N};
  OrtValue *y_val = nullptr, *h_val = nullptr;
  if ((st = g_api->KernelContext_GetOutput(ctx, 0, y_dims, 3, &y_val))) return st;
  if ((st = g_api->KernelContext_GetOutput(ctx, 1, h_dims, 4, &h_val))) return st;
  void *y = nullptr, *h_last = nullptr;
  if ((st = g_api->GetTensorMutableData(y_val, &y))) return st;
  if ((st = g_api->GetTensorMutableData(h_val, &h_last))) return st;
  if (b == 0) return nullptr;   // empty outputs
  if (L == 0) {                  // no step: the state passes through
    std::memcpy(h_last, in.data[7], sizeof(float) * static_cast<size_t>(b * H * P * N));
    return nullptr;
  }
  MQSSDParams p;
  std::memset(&p, 0, sizeof p);
  fill_attributes(k, &p);
  p.batch = b, p.seqlen = L;
  p.x = in.data[0], p.dt = in.data[1], p.B = in.data[3], p.C = in.data[4];
  p.A = static_cast<const float *>(in.data[2]);
  p.D = static_cast<const float *>(in.data[5]);
  p.dt_bias = static_cast<const float *>(in.data[6]);
  p.h0 = static_cast<const float *>(in.data[7]);
  p.y = static_cast<float *>(y);
  p.h_last = static_cast<float *>(h_last);
  mq_ssd_set_contiguous_strides(&p);
  if (mq_ssd_validate(&p) != MQ_SCAN_OK) return error(k.kind, ORT_INVALID_ARGUMENT, mq_scan_last_error());
  PoolCall pool{ctx, nullptr};
  const bool serial = b * L * H * P * N < kSerialBelow;
  const int rc = ssd_scan_heads(p, serial ? serial_for : ort_parallel_for, &pool);
  if (pool.status) return pool.status;
  if (rc != 0)   // validated above: our bug
    return error(k.kind, ORT_FAIL, "internal error: the scan of a head failed with code " + std::to_string(rc));
  return nullptr;
}

// ---- mq::SSDStateUpdate / mq::SSDStateUpdateFloat ----------------------------------------------------

const char *const kUpdateInputs[10] = {"xbc", "dt", "conv_state", "ssm_state", "conv_w", "conv_b", "A", "D", "dt_bias",
                                       "ssm_state_scale"};

OrtStatus *compute_update(const Kernel &k, OrtKernelContext *ctx) {
  Inputs in;
  const bool i8 = k.kind == Kind::kUpdateInt8State;
  OrtStatus *st = get_inputs(k.kind, ctx, kUpdateInputs, i8 ? 10 : 9, &in);
  if (st) return st;
  const int64_t H = k.heads, P = k.head_dim, G = k.groups, N = k.d_state, Cd = H * P + 2 * G * N;
  const Shape &xs = in.s[0], &cs = in.s[2], &ws = in.s[4];
  if (xs.rank != 3 || xs.d[2] != Cd)
    return error(k.kind, ORT_INVALID_ARGUMENT, "xbc must be [b, L, heads * head_dim + 2 * groups * d_state] = [b, L, " +
                                                   std::to_string(Cd) + "] from the attributes, got " + str(xs));
  if (cs.rank != 4 || ws.rank != 2)
    return error(k.kind, ORT_INVALID_ARGUMENT, "conv_state must be [n_layer, b, channels, K-1] and conv_w [channels, K]"
                                               ", got " + str(cs) + " and " + str(ws));
  const int64_t b = xs.d[0], L = xs.d[1], n_layer = cs.d[0], K = ws.d[1];
  if (k.layer >= n_layer)
    return error(k.kind, ORT_INVALID_ARGUMENT, "attribute layer " + std::to_string(k.layer) + " is outside the " +
                                                   std::to_string(n_layer) + " layers of conv_state");
  if (K < 1 || K > 16)
    return error(k.kind, ORT_INVALID_ARGUMENT, "conv_w must have 1 to 16 taps, got " + str(ws));
  const Want want[] = {{1, {{b, L, H}, 3}},          {2, {{n_layer, b, Cd, K - 1}, 4}}, {3, {{n_layer, b, H, P, N}, 5}},
                       {4, {{Cd, K}, 2}},             {5, {{Cd}, 1}},                   {6, {{H}, 1}},
                       {7, {{H}, 1}},                 {8, {{H}, 1}}};
  if ((st = check_wanted(k.kind, in, kUpdateInputs, want, 8, "xbc " + str(xs) + ", conv_w " + str(ws) +
                                                                 ", conv_state " + str(cs) + " and the attributes")))
    return st;
  const Want scales[] = {{9, {{n_layer, b, H, P}, 4}}};
  if (i8 && (st = check_wanted(k.kind, in, kUpdateInputs, scales, 1, "ssm_state " + str(in.s[3]))))
    return st;
  const int64_t y_dims[3] = {b, L, H * P}, c_dims[3] = {b, Cd, K - 1}, h_dims[4] = {b, H, P, N}, s_dims[3] = {b, H, P};
  OrtValue *out[4] = {nullptr, nullptr, nullptr, nullptr};
  if ((st = g_api->KernelContext_GetOutput(ctx, 0, y_dims, 3, &out[0]))) return st;
  if ((st = g_api->KernelContext_GetOutput(ctx, 1, c_dims, 3, &out[1]))) return st;
  if ((st = g_api->KernelContext_GetOutput(ctx, 2, h_dims, 4, &out[2]))) return st;
  if (i8 && (st = g_api->KernelContext_GetOutput(ctx, 3, s_dims, 3, &out[3]))) return st;
  void *outp[4] = {nullptr, nullptr, nullptr, nullptr};
  for (size_t o = 0; o < (i8 ? 4u : 3u); ++o)
    if ((st = g_api->GetTensorMutableData(out[o], &outp[o]))) return st;

  SSDUpdateParams p;
  std::memset(&p, 0, sizeof p);
  p.is_float = !quantized(k.kind);
  p.batch = b, p.seqlen = L, p.heads = H, p.head_dim = P, p.groups = G, p.dstate = N, p.dconv = K;
  auto f = [&](size_t i) { return static_cast<const float *>(in.data[i]); };
  p.xbc = f(0);
  p.dt = in.data[1];
  p.conv_w = f(4), p.conv_b = f(5), p.A = f(6), p.D = f(7), p.dt_bias = f(8);
  p.dt_min = k.dt_min, p.dt_max = k.dt_max;
  if (quantized(k.kind)) {
    p.conv_scale = k.conv_scale;
    p.x_scale = k.value(0), p.dt_scale = k.value(1), p.B_scale = k.value(2), p.C_scale = k.value(3);
    p.x_scales = k.channels(0), p.dt_scales = k.channels(1), p.B_scales = k.channels(2), p.C_scales = k.channels(3);
  }
  p.y = static_cast<float *>(outp[0]);
  PoolCall pool{ctx, nullptr};
  std::string message;
  int rc = 0;
  if (!i8) {
    p.conv_state = f(2) + k.layer * b * Cd * (K - 1);
    p.ssm_state = f(3) + k.layer * b * H * P * N;
    p.conv_state_out = static_cast<float *>(outp[1]), p.ssm_state_out = static_cast<float *>(outp[2]);
    rc = ssd_state_update(p, ort_parallel_for, &pool, &message);
  } else {   // this layer's int8 states: decoded, updated, encoded (state_codec.h)
    Int8States c;
    c.batch = b, c.rows = H * P, c.n = N, c.conv = Cd * (K - 1), c.conv_scale = k.conv_scale;
    c.conv_q = static_cast<const int8_t *>(in.data[2]) + k.layer * b * c.conv;
    c.ssm_q = static_cast<const int8_t *>(in.data[3]) + k.layer * b * H * P * N;
    c.ssm_scale = static_cast<const uint16_t *>(in.data[9]) + k.layer * b * H * P;
    c.conv_q_out = static_cast<int8_t *>(outp[1]), c.ssm_q_out = static_cast<int8_t *>(outp[2]);
    c.ssm_scale_out = static_cast<uint16_t *>(outp[3]);
    // the conv state's float scratch (every value is written before it is read: decode fills the input, the
    // update the output); the SSM state's rows go through each (batch, head) task's own buffer (ssd_update.cpp)
    std::unique_lock<std::mutex> held;
    std::unique_ptr<float[]> own;
    float *f32 = k.scratch.get(static_cast<size_t>(2 * b * c.conv), &held, &own);
    c.conv_f = f32, c.conv_f_out = f32 + b * c.conv;
    c.ssm_f = c.ssm_f_out = nullptr;
    c.conv_decode();
    p.conv_state = c.conv_f, p.conv_state_out = c.conv_f_out, p.ssm_state = p.ssm_state_out = nullptr;
    p.int8_ssm = &c;
    rc = ssd_state_update(p, ort_parallel_for, &pool, &message);
    if (!pool.status && rc == 0) c.conv_encode();
  }
  if (pool.status) return pool.status;
  if (rc != 0) return error(k.kind, rc == kStateUpdateNoMemory ? ORT_FAIL : ORT_INVALID_ARGUMENT, message);
  return nullptr;
}

// ---- shape inference ---------------------------------------------------------------------------------

/* A new type-and-shape: `like`'s dims (values and symbolic names) without the first `skip`, of `type`, with dim
 * `set_dim` (if >= 0) replaced by the value `set_value`. */
OrtStatus *copy_shape(Kind kind, const OrtTensorTypeAndShapeInfo *like, size_t skip, int64_t set_dim,
                      int64_t set_value, ONNXTensorElementDataType type, OrtTensorTypeAndShapeInfo **out) {
  return op_base::copy_shape(g_api, (std::string("mq::") + op_name(kind)).c_str(), "mq_ssd_dim_", like, type, skip,
                             set_dim, set_value, 8, out);
}

/* output o's element type: float, but the int8-state update's states (int8) and row scales (float16) */
ONNXTensorElementDataType output_type_of(Kind kind, size_t o) {
  if (kind != Kind::kUpdateInt8State || o == 0) return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  return o == 3 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16 : ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8;
}

OrtStatus *read_int_attr(Kind kind, OrtShapeInferContext *ctx, const char *name, int64_t *out) {
  const OrtOpAttr *attr = nullptr;
  OrtStatus *st = g_api->ShapeInferContext_GetAttribute(ctx, name, &attr);
  if (st) return st;
  if (attr == nullptr) return error(kind, ORT_INVALID_ARGUMENT, std::string("missing int attribute ") + name);
  size_t len = 0;
  return g_api->ReadOpAttr(attr, ORT_OP_ATTR_INT, out, sizeof *out, &len);
}

OrtStatus *infer(Kind kind, OrtShapeInferContext *ctx) {
  // scan: y like x, h_last like h0; update: y [b, L, heads * head_dim] from xbc, the states (and the int8-state
  // update's row scales) one layer of theirs
  const bool upd = is_update(kind);
  const size_t n_out = kind == Kind::kUpdateInt8State ? 4 : upd ? 3 : 2;
  const size_t from[4] = {0, upd ? size_t{2} : size_t{7}, 3, 9};
  const size_t skip[4] = {0, upd ? size_t{1} : size_t{0}, 1, 1};
  int64_t width = -1;
  if (upd) {
    int64_t heads = 0, head_dim = 0;
    OrtStatus *st = read_int_attr(kind, ctx, "heads", &heads);
    if (!st) st = read_int_attr(kind, ctx, "head_dim", &head_dim);
    if (st) return st;
    width = heads * head_dim;
  }
  for (size_t o = 0; o < n_out; ++o) {
    OrtTensorTypeAndShapeInfo *in = nullptr, *out = nullptr;   // `in` belongs to the context
    OrtStatus *st = g_api->ShapeInferContext_GetInputTypeShape(ctx, from[o], &in);
    if (st) return st;
    if ((st = copy_shape(kind, in, skip[o], (upd && o == 0) ? 2 : -1, width, output_type_of(kind, o), &out)))
      return st;
    st = g_api->ShapeInferContext_SetOutputTypeShape(ctx, o, out);
    g_api->ReleaseTensorTypeAndShapeInfo(out);
    if (st) return st;
  }
  return nullptr;
}

// ---- OrtCustomOp callbacks (all noexcept: nothing may unwind into ORT) --------------------------------

template <Kind K>
OrtStatus *MQ_ORT_CALL create_kernel(const OrtCustomOp *, const OrtApi *, const OrtKernelInfo *info,
                                     void **out) noexcept {
  const char *what = "mq::SSD op: internal error (out of memory?) creating the kernel";
  return op_base::guarded(g_api, what, [&]() -> OrtStatus * {
    Kernel *k = new Kernel();
    k->kind = K;
    if (OrtStatus *st = read_attributes(*k, info)) {
      delete k;
      return st;
    }
    *out = k;
    return nullptr;
  });
}

OrtStatus *MQ_ORT_CALL kernel_compute(void *kernel, OrtKernelContext *ctx) noexcept {
  return op_base::guarded(g_api, "mq::SSD op: internal error (out of memory?) in compute", [&]() -> OrtStatus * {
    const Kernel &k = *static_cast<const Kernel *>(kernel);
    return is_update(k.kind) ? compute_update(k, ctx) : compute_scan(k, ctx);
  });
}

void MQ_ORT_CALL kernel_destroy(void *kernel) noexcept { delete static_cast<Kernel *>(kernel); }

template <Kind K>
OrtStatus *MQ_ORT_CALL infer_shapes(const OrtCustomOp *, OrtShapeInferContext *ctx) noexcept {
  return op_base::guarded(g_api, "mq::SSD op: internal error in shape inference", [&]() -> OrtStatus * {
    return infer(K, ctx);
  });
}

template <Kind K>
const char *MQ_ORT_CALL get_name(const OrtCustomOp *) noexcept {
  return op_name(K);
}
template <Kind K>
size_t MQ_ORT_CALL input_count(const OrtCustomOp *) noexcept {
  return K == Kind::kUpdateInt8State ? 10 : is_update(K) ? 9 : 8;
}
template <Kind K>
size_t MQ_ORT_CALL output_count(const OrtCustomOp *) noexcept {
  return K == Kind::kUpdateInt8State ? 4 : is_update(K) ? 3 : 2;
}
/* int8 inputs: SSDScan's x, dt, B, C; SSDStateUpdate's dt; SSDStateUpdateInt8State's dt and both states, and its
 * row scales float16; everything else float */
template <Kind K>
ONNXTensorElementDataType MQ_ORT_CALL input_type(const OrtCustomOp *, size_t i) noexcept {
  if (K == Kind::kUpdateInt8State && i == 9) return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
  const bool i8 = (K == Kind::kScan && (i == 0 || i == 1 || i == 3 || i == 4)) || (K == Kind::kUpdate && i == 1) ||
                  (K == Kind::kUpdateInt8State && (i == 1 || i == 2 || i == 3));
  return i8 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
}
template <Kind K>
ONNXTensorElementDataType MQ_ORT_CALL output_type(const OrtCustomOp *, size_t i) noexcept {
  return output_type_of(K, i);
}

template <Kind K>
OrtCustomOp make_op() {
  OrtCustomOp op = op_base::base();
  op.GetName = get_name<K>;
  op.GetInputType = input_type<K>;
  op.GetInputTypeCount = input_count<K>;
  op.GetOutputType = output_type<K>;
  op.GetOutputTypeCount = output_count<K>;
  op.KernelDestroy = kernel_destroy;
  op.CreateKernelV2 = create_kernel<K>;
  op.KernelComputeV2 = kernel_compute;
  op.InferOutputShapeFn = infer_shapes<K>;
  return op;
}

// must outlive every session that registered them: static
const OrtCustomOp g_ops[5] = {make_op<Kind::kScan>(), make_op<Kind::kScanFloat>(), make_op<Kind::kUpdate>(),
                              make_op<Kind::kUpdateFloat>(), make_op<Kind::kUpdateInt8State>()};
const OrtCustomOp *const g_op_ptrs[5] = {&g_ops[0], &g_ops[1], &g_ops[2], &g_ops[3], &g_ops[4]};

}  // namespace

const OrtCustomOp *const *ssd_custom_ops(const Api *api, size_t *count) noexcept {
  g_api = api;
  *count = 5;
  return g_op_ptrs;
}

}  // namespace mq_scan
