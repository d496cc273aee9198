// ONNX Runtime glue of mq::QLinear and mq::DynamicQLinear (qlinear_ops.h; contracts and function bodies:
// mq_deploy/export/qlinear_op.py). The weight, a constant initializer, is repacked once when the kernel is
// created (KernelInfoGetConstantInput_tensor); a weight that is not constant is repacked on every call. The
// activations are quantized on the calling thread, then blocks of (rows, 64 output channels) are spread over
// the session's intra-op pool. Same rules as the other ops: every callback is noexcept and reports through an
// OrtStatus; the pool tasks allocate nothing.
#include "qlinear_ops.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "ort_op_base.h"
#include "qlinear.h"

using namespace mq_ort;

namespace mq_scan {
namespace {

const Api *g_api = nullptr;
std::atomic<bool> g_reference{false};   // MQ_ORT_QLINEAR=ref: qlinear_block_ref (the tests' view of it)

enum class Kind { kStatic, kDynamic };
// input slots: QLinear (x, x_scale, x_zero_point, w, w_scale, w_zero_point); DynamicQLinear (x, w, w_scale,
// w_zero_point)
constexpr size_t kW[2] = {3, 1};
constexpr size_t kInputs[2] = {6, 4};
constexpr int64_t kColsPerTask = 64;         // four packed tiles
constexpr int64_t kRowsPerTask = 64;
constexpr int64_t kSerialBelow = 1 << 15;    // M * K * N: below this one thread is faster

const char *op_name(Kind k) { return k == Kind::kStatic ? "QLinear" : "DynamicQLinear"; }

OrtStatus *error(Kind k, const std::string &msg) {
  return g_api->CreateStatus(ORT_INVALID_ARGUMENT, (std::string("mq::") + op_name(k) + ": " + msg).c_str());
}

struct Kernel {
  Kind kind;
  std::unique_ptr<PackedInt8> packed;   // null: the weight is not a constant, packed per call
  const void *packed_from = nullptr;    // the constant's data when packed
  bool reference = false;               // qlinear_block_ref (MQ_ORT_QLINEAR=ref when the session was made)
};

struct Tensor {
  const OrtValue *v = nullptr;
  int64_t d[8];
  size_t rank = 0;
  int64_t count = 1;
  void *data = nullptr;
};

OrtStatus *read_tensor(Kind k, const OrtValue *v, Tensor *t) {
  t->v = v;
  OrtTensorTypeAndShapeInfo *info = nullptr;
  OrtStatus *st = g_api->GetTensorTypeAndShape(v, &info);
  if (st) return st;
  st = g_api->GetDimensionsCount(info, &t->rank);
  if (!st && t->rank > 8) st = error(k, "an input has rank " + std::to_string(t->rank));
  if (!st) st = g_api->GetDimensions(info, t->d, t->rank);
  g_api->ReleaseTensorTypeAndShapeInfo(info);
  if (st) return st;
  t->count = 1;
  for (size_t i = 0; i < t->rank; ++i) t->count *= t->d[i];
  return g_api->GetTensorMutableData(const_cast<OrtValue *>(v), &t->data);
}

OrtStatus *check_weight(Kind k, const Tensor &w) {
  if (w.rank != 2) return error(k, "w must be int8 [K, N], got rank " + std::to_string(w.rank));
  if (w.d[0] < 1 || w.d[1] < 1 || w.d[0] >= (int64_t{1} << 16))   // (qlinear_op.MAX_K: export never writes one)
    return error(k, "w must be [K, N] with 1 <= K < 65536 and N >= 1, got [" + std::to_string(w.d[0]) + ", " +
                        std::to_string(w.d[1]) + "]");
  return nullptr;
}

struct Call {
  const PackedInt8 *w;
  const uint8_t *u;
  int64_t ldu, M, col_tasks, rows;
  int32_t offset;
  float x_scale;
  const float *w_scale;
  float *y;
  bool reference;
};

void run_task(void *user, size_t task) noexcept {
  const Call &c = *static_cast<const Call *>(user);
  const int64_t ct = static_cast<int64_t>(task) % c.col_tasks, rt = static_cast<int64_t>(task) / c.col_tasks;
  const int64_t n0 = ct * kColsPerTask, n1 = std::min(c.w->N, n0 + kColsPerTask);
  const int64_t m0 = rt * c.rows, m1 = std::min(c.M, m0 + c.rows);
  (c.reference ? qlinear_block_ref : qlinear_block)(
      *c.w, c.u, c.ldu, m0, m1, n0, n1, c.offset, c.x_scale, c.w_scale, c.y);
}

OrtStatus *compute(Kernel &k, OrtKernelContext *ctx) {
  const Kind kind = k.kind;
  size_t n_in = 0;
  OrtStatus *st = g_api->KernelContext_GetInputCount(ctx, &n_in);
  if (st) return st;
  if (n_in != kInputs[static_cast<int>(kind)])
    return error(kind, "expects " + std::to_string(kInputs[static_cast<int>(kind)]) + " inputs, got " +
                           std::to_string(n_in));
  Tensor in[6];
  for (size_t i = 0; i < n_in; ++i) {
    const OrtValue *v = nullptr;
    if ((st = g_api->KernelContext_GetInput(ctx, i, &v))) return st;
    if (v == nullptr) return error(kind, "input " + std::to_string(i) + " is missing");
    if ((st = read_tensor(kind, v, &in[i]))) return st;
  }
  const size_t wi = kW[static_cast<int>(kind)];
  const Tensor &x = in[0], &w = in[wi], &ws = in[wi + 1], &wz = in[wi + 2];
  if ((st = check_weight(kind, w))) return st;
  const int64_t K = w.d[0], N = w.d[1];
  if (x.rank < 1 || x.d[x.rank - 1] != K)
    return error(kind, "x's last dimension must be w's K = " + std::to_string(K));
  if (ws.count != N || wz.count != N)
    return error(kind, "w_scale and w_zero_point must hold one value per output channel (" + std::to_string(N) + ")");
  const int8_t *wzp = static_cast<const int8_t *>(wz.data);
  for (int64_t n = 0; n < N; ++n)
    if (wzp[n] != 0) return error(kind, "w_zero_point must be 0 (symmetric int8 weights)");
  const float *w_scale = static_cast<const float *>(ws.data);
  float x_scale = 1.f;
  if (kind == Kind::kStatic) {
    if (in[1].count != 1 || in[2].count != 1) return error(kind, "x_scale and x_zero_point must be scalars");
    x_scale = *static_cast<const float *>(in[1].data);
    if (!(x_scale > 0.f && std::isfinite(x_scale))) return error(kind, "x_scale must be finite and > 0");
    if (*static_cast<const int8_t *>(in[2].data) != 0) return error(kind, "x_zero_point must be 0");
  }
  // the output: x's shape with N last
  int64_t dims[8];
  std::copy(x.d, x.d + x.rank, dims);
  dims[x.rank - 1] = N;
  OrtValue *out = nullptr;
  if ((st = g_api->KernelContext_GetOutput(ctx, 0, dims, x.rank, &out))) return st;
  void *y = nullptr;
  if ((st = g_api->GetTensorMutableData(out, &y))) return st;
  const int64_t M = x.count / K;
  if (M == 0) return nullptr;

  PackedInt8 local;
  const PackedInt8 *pw = k.packed.get();
  if (pw == nullptr || k.packed_from != w.data) {   // not a constant: packed for this call
    qlinear_pack(static_cast<const int8_t *>(w.data), K, N, &local);
    pw = &local;
  }
  const int64_t ldu = pw->K4 * 4;
  std::vector<uint8_t> u(static_cast<size_t>(M * ldu));
  const float *xf = static_cast<const float *>(x.data);
  int32_t offset = 128;
  if (kind == Kind::kStatic) {
    qlinear_quantize_static(xf, K, 0, M, x_scale, u.data(), ldu);
  } else {
    qlinear_dynamic_params(xf, M * K, &x_scale, &offset);
    qlinear_quantize_dynamic(xf, K, 0, M, x_scale, offset, u.data(), ldu);
  }
  Call c{pw, u.data(), ldu, M, (N + kColsPerTask - 1) / kColsPerTask, M <= kRowsPerTask ? M : kRowsPerTask,
         offset, x_scale, w_scale, static_cast<float *>(y), k.reference};
  const int64_t tasks = c.col_tasks * ((M + c.rows - 1) / c.rows);
  if (M * K * N < kSerialBelow) {
    for (int64_t t = 0; t < tasks; ++t) run_task(&c, static_cast<size_t>(t));
    return nullptr;
  }
  return g_api->KernelContext_ParallelFor(ctx, run_task, static_cast<size_t>(tasks), 0, &c);
}

// ---- shape inference: x's shape with w's N last ---------------------------------------------------------

OrtStatus *infer(Kind kind, OrtShapeInferContext *ctx) {
  OrtTensorTypeAndShapeInfo *xi = nullptr, *wi = nullptr, *out = nullptr;   // xi, wi belong to the context
  OrtStatus *st = g_api->ShapeInferContext_GetInputTypeShape(ctx, 0, &xi);
  if (!st) st = g_api->ShapeInferContext_GetInputTypeShape(ctx, kW[static_cast<int>(kind)], &wi);
  if (st) return st;
  size_t rank = 0, wrank = 0;
  if ((st = g_api->GetDimensionsCount(xi, &rank)) || (st = g_api->GetDimensionsCount(wi, &wrank))) return st;
  if (rank < 1 || rank > 8 || wrank != 2) return error(kind, "x must have rank 1 to 8 and w rank 2");
  int64_t wd[2];
  if ((st = g_api->GetDimensions(wi, wd, 2))) return st;
  const std::string op = std::string("mq::") + op_name(kind);
  if ((st = op_base::copy_shape(g_api, op.c_str(), "mq_qlinear_dim_", xi, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, 0,
                                static_cast<int64_t>(rank) - 1, wd[1], 8, &out)))
    return st;
  st = g_api->ShapeInferContext_SetOutputTypeShape(ctx, 0, out);
  g_api->ReleaseTensorTypeAndShapeInfo(out);
  return st;
}

// ---- OrtCustomOp callbacks --------------------------------------------------------------------------------

template <Kind K>
OrtStatus *MQ_ORT_CALL create_kernel(const OrtCustomOp *, const OrtApi *, const OrtKernelInfo *info,
                                     void **out) noexcept {
  const char *what = "mq::QLinear: internal error (out of memory?) creating the kernel";
  return op_base::guarded(g_api, what, [&]() -> OrtStatus * {
    std::unique_ptr<Kernel> k(new Kernel());
    k->kind = K;
    k->reference = g_reference.load(std::memory_order_relaxed);
    int is_constant = 0;
    const OrtValue *wv = nullptr;
    OrtStatus *st = g_api->KernelInfoGetConstantInput_tensor(info, kW[static_cast<int>(K)], &is_constant, &wv);
    if (st) return st;
    if (is_constant && wv != nullptr) {
      Tensor w;
      if ((st = read_tensor(K, wv, &w)) || (st = check_weight(K, w))) return st;
      k->packed.reset(new PackedInt8());
      qlinear_pack(static_cast<const int8_t *>(w.data), w.d[0], w.d[1], k->packed.get());
      k->packed_from = w.data;
    }
    *out = k.release();
    return nullptr;
  });
}

OrtStatus *MQ_ORT_CALL kernel_compute(void *kernel, OrtKernelContext *ctx) noexcept {
  return op_base::guarded(g_api, "mq::QLinear: internal error (out of memory?) in compute", [&]() -> OrtStatus * {
    return compute(*static_cast<Kernel *>(kernel), ctx);
  });
}

void MQ_ORT_CALL kernel_destroy(void *kernel) noexcept { delete static_cast<Kernel *>(kernel); }

template <Kind K>
OrtStatus *MQ_ORT_CALL infer_shapes(const OrtCustomOp *, OrtShapeInferContext *ctx) noexcept {
  return op_base::guarded(g_api, "mq::QLinear: internal error in shape inference", [&]() -> OrtStatus * {
    return infer(K, ctx);
  });
}

template <Kind K>
const char *MQ_ORT_CALL get_name(const OrtCustomOp *) noexcept {
  return op_name(K);
}
template <Kind K>
size_t MQ_ORT_CALL input_count(const OrtCustomOp *) noexcept {
  return kInputs[static_cast<int>(K)];
}
size_t MQ_ORT_CALL output_count(const OrtCustomOp *) noexcept { return 1; }
template <Kind K>
ONNXTensorElementDataType MQ_ORT_CALL input_type(const OrtCustomOp *, size_t i) noexcept {
  const size_t w = kW[static_cast<int>(K)];
  const bool i8 = i == w || i == w + 2 || (K == Kind::kStatic && i == 2);
  return i8 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
}

template <Kind K>
OrtCustomOp make_op() {
  OrtCustomOp op = op_base::base();
  op.GetName = get_name<K>;
  op.GetInputType = input_type<K>;
  op.GetInputTypeCount = input_count<K>;
  op.GetOutputType = op_base::float_type;
  op.GetOutputTypeCount = output_count;
  op.KernelDestroy = kernel_destroy;
  op.CreateKernelV2 = create_kernel<K>;
  op.KernelComputeV2 = kernel_compute;
  op.InferOutputShapeFn = infer_shapes<K>;
  return op;
}

const OrtCustomOp g_ops[2] = {make_op<Kind::kStatic>(), make_op<Kind::kDynamic>()};
const OrtCustomOp *const g_op_ptrs[2] = {&g_ops[0], &g_ops[1]};

}  // namespace

const OrtCustomOp *const *qlinear_custom_ops(const Api *api, size_t *count) noexcept {
  g_api = api;
  // MQ_ORT_QLINEAR: "0" never registers the ops, "ref" always does, with the plain-loop kernel; read at each
  // registration (a session's options)
  const char *env = std::getenv("MQ_ORT_QLINEAR");
  const bool disabled = env != nullptr && std::strcmp(env, "0") == 0;
  const bool reference = env != nullptr && std::strcmp(env, "ref") == 0;
  g_reference.store(reference, std::memory_order_relaxed);
  *count = ((qlinear_fast() || reference) && !disabled) ? 2 : 0;
  return g_op_ptrs;
}

}  // namespace mq_scan
