// CUDA implementation of mq::SelectiveScan (libmq_scan_cuda.so).
//
// scan_kernel: one thread owns one channel d of one batch row and walks the whole sequence, its
// state h[0..kN) and A*log2(e) in registers. The sequence is cut into chunks of kChunk steps; per
// chunk the block stages B_t and C_t (dequantized to float, zero-padded to kN states) in shared
// memory, so each thread reads them as broadcasts, and the state carries over from chunk to chunk
// in registers. x, delta, z are int8 loads that are coalesced across the block's consecutive
// channels and dequantized in registers; softplus, the D skip and the gate are fused; y is written
// once, as float or half. Padded states have A = B = C = 0 and stay 0, so N need not equal kN.
//
// step_kernel (decode, seqlen == 1): the state read and written once dominates the traffic, so one
// thread per (channel, state) element with coalesced h0/h_last access, and a shuffle reduction over
// the channel's states for y. Used for dstate <= 32; larger states use scan_kernel with seqlen 1.
//
// mq_scan_cuda_f16in: the same scan_kernel instantiated for IEEE half inputs, for the benchmark
// (int8 vs fp16 input traffic); not part of the op.
#include <cuda_fp16.h>
#include <cstdlib>
#include <cuda_runtime.h>

#include "mq_selective_scan.h"
#include "scan_common.h"

namespace {

using namespace mq_scan;

constexpr int kThreads = 128;           // channels per block of scan_kernel
constexpr int kStageFloats = 2048;      // chunk * kN floats per staged tensor (8 KiB each for B and C)
constexpr int kStepThreads = 256;
constexpr int64_t kMaxGridY = 65535;

template <typename T>
__device__ __forceinline__ float load_in(const T *__restrict__ p, int64_t i, float scale);

template <>
__device__ __forceinline__ float load_in<int8_t>(const int8_t *__restrict__ p, int64_t i, float scale) {
  return dequant(p[i], scale);
}

template <>
__device__ __forceinline__ float load_in<__half>(const __half *__restrict__ p, int64_t i, float) {
  return __half2float(p[i]);
}

__device__ __forceinline__ void store_out(void *y, int64_t i, float v, int fp16) {
  if (fp16)
    static_cast<__half *>(y)[i] = __float2half_rn(v);
  else
    static_cast<float *>(y)[i] = v;
}

// How a launch of scan_kernel cuts the sequence (blockIdx.z is the segment).
//   kWhole:  one segment; state from h0, writes y and h_last.
//   kLocal:  pass 1 of the L-split: each segment but the last scans from a zero state and writes
//            its end state and the sum of its dt to the workspace (no y).
//   kFinish: pass 2: each segment folds the earlier segments' workspace entries into h0
//            (h <- exp2(A2 * sum dt) * h + h_local, exact by linearity), then scans its steps
//            writing y; the last segment writes h_last.
enum class Mode { kWhole, kLocal, kFinish };

struct Split {
  int64_t seg_len = 0;   // steps per segment
  int64_t segs = 1;
  float *ws_h = nullptr;   // [batch, segs, dstate, dim] end states, d innermost (coalesced)
  float *ws_dt = nullptr;  // [batch, segs, dim] sums of dt
};

template <int kN, typename TIn, Mode kMode>
__global__ void __launch_bounds__(kThreads)
scan_kernel(const MQScanParams p, const TIn *__restrict__ x, const TIn *__restrict__ delta,
            const TIn *__restrict__ Bg, const TIn *__restrict__ Cg, const TIn *__restrict__ z, const Split sp) {
  constexpr int kChunk = kStageFloats / kN;
  static_assert(kChunk >= 1 && (kN & (kN - 1)) == 0, "kN must be a power of two <= kStageFloats");
  constexpr bool kReadout = kMode != Mode::kLocal;
  __shared__ __align__(16) float Bs[kChunk * kN];
  __shared__ __align__(16) float Cs[kReadout ? kChunk * kN : 1];

  const int64_t b = blockIdx.y;
  const int64_t seg = blockIdx.z;
  const int64_t d = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const bool live = d < p.dim;
  const int N = static_cast<int>(p.dstate);
  const int64_t l_begin = kMode == Mode::kWhole ? 0 : seg * sp.seg_len;
  const int64_t l_end = kMode == Mode::kWhole ? p.seqlen
                        : (l_begin + sp.seg_len < p.seqlen ? l_begin + sp.seg_len : p.seqlen);

  float h[kN], A2[kN];
#pragma unroll
  for (int n = 0; n < kN; ++n) {
    const bool on = live && n < N;
    A2[n] = on ? p.A[d * N + n] * kLog2e : 0.f;
    h[n] = (kMode != Mode::kLocal && on && p.h0 != nullptr) ? p.h0[(b * p.dim + d) * N + n] : 0.f;
  }
  if (kMode == Mode::kFinish && live) {
    for (int64_t s = 0; s < seg; ++s) {
      const int64_t e = (b * sp.segs + s);
      const float dtsum = sp.ws_dt[e * p.dim + d];
#pragma unroll
      for (int n = 0; n < kN; ++n)
        if (n < N) h[n] = exp2_fast(dtsum * A2[n]) * h[n] + sp.ws_h[(e * N + n) * p.dim + d];
    }
  }
  float dtsum = 0.f;
  const float Dv = (live && p.D != nullptr) ? p.D[d] : 0.f;
  const float bias = (live && p.delta_bias != nullptr) ? p.delta_bias[d] : 0.f;
  const float gs = (live && p.gate_scale != nullptr) ? p.gate_scale[d] : 1.f;
  const int64_t xb = b * p.x_batch_stride + d;
  const int64_t yb = b * p.y_batch_stride + d;
  const int64_t bcb = b * p.bc_batch_stride;

  for (int64_t l0 = l_begin; l0 < l_end; l0 += kChunk) {
    const int len = static_cast<int>(l_end - l0 < kChunk ? l_end - l0 : kChunk);
    __syncthreads();  // every thread is done reading the previous chunk
    for (int i = threadIdx.x; i < kChunk * kN; i += kThreads) {
      const int t = i / kN, n = i % kN;
      float bv = 0.f, cv = 0.f;
      if (t < len && n < N) {
        const int64_t o = bcb + (l0 + t) * p.bc_l_stride + n;
        bv = load_in(Bg, o, p.B_scale);
        if constexpr (kReadout) cv = load_in(Cg, o, p.C_scale);
      }
      Bs[i] = bv;
      if constexpr (kReadout) Cs[i] = cv;
    }
    __syncthreads();
    if (!live) continue;
#pragma unroll 2
    for (int t = 0; t < len; ++t) {
      const int64_t o = xb + (l0 + t) * p.x_l_stride;
      const float xv = load_in(x, o, p.x_scale);
      const float dt = discretize(load_in(delta, o, p.delta_scale), bias);
      const float dtx = dt * xv;
      const float *bt = Bs + t * kN;
      if constexpr (kReadout) {
        const float g = z != nullptr ? gate(load_in(z, o, p.z_scale), gs) : 1.f;
        const float *ct = Cs + t * kN;
        float acc = 0.f;
#pragma unroll
        for (int n = 0; n < kN; ++n) {
          h[n] = state_update(h[n], dt, A2[n], dtx, bt[n]);
          acc += h[n] * ct[n];
        }
        store_out(p.y, yb + (l0 + t) * p.y_l_stride, finish(acc, xv, Dv, g), p.out_fp16);
      } else {
        dtsum += dt;
#pragma unroll
        for (int n = 0; n < kN; ++n) h[n] = state_update(h[n], dt, A2[n], dtx, bt[n]);
      }
    }
  }

  if constexpr (kMode == Mode::kLocal) {
    if (live) {
      const int64_t e = b * sp.segs + seg;
      sp.ws_dt[e * p.dim + d] = dtsum;
#pragma unroll
      for (int n = 0; n < kN; ++n)
        if (n < N) sp.ws_h[(e * N + n) * p.dim + d] = h[n];
    }
    return;
  }
  const bool last_seg = kMode == Mode::kWhole || seg == sp.segs - 1;
  if (live && last_seg && p.h_last != nullptr) {
#pragma unroll
    for (int n = 0; n < kN; ++n)
      if (n < N) p.h_last[(b * p.dim + d) * N + n] = h[n];
  }
}

// One thread per (batch, channel, state) with np (a power of two >= dstate, <= 32) lanes per channel.
// h0 and h_last are not __restrict__: they may alias (each element is read, then written, by one thread).
__global__ void __launch_bounds__(kStepThreads) step_kernel(const MQScanParams p, int np) {
  const int64_t gid = static_cast<int64_t>(blockIdx.x) * kStepThreads + threadIdx.x;
  const int64_t ch = gid / np;
  const int n = static_cast<int>(gid % np);
  const bool live = ch < p.batch * p.dim;
  const int64_t b = live ? ch / p.dim : 0, d = live ? ch % p.dim : 0;
  const int64_t N = p.dstate;
  const bool on = live && n < N;

  float xv = 0.f, dt = 0.f, hn = 0.f, part = 0.f;
  const int64_t o = b * p.x_batch_stride + d;
  if (live) {
    xv = dequant(p.x[o], p.x_scale);
    dt = discretize(dequant(p.delta[o], p.delta_scale), p.delta_bias != nullptr ? p.delta_bias[d] : 0.f);
  }
  if (on) {
    const int64_t si = (b * p.dim + d) * N + n;
    const int64_t bo = b * p.bc_batch_stride + n;
    const float h = p.h0 != nullptr ? p.h0[si] : 0.f;
    hn = state_update(h, dt, p.A[d * N + n] * kLog2e, dt * xv, dequant(p.B[bo], p.B_scale));
    part = hn * dequant(p.C[bo], p.C_scale);
    if (p.h_last != nullptr) p.h_last[si] = hn;
  }
  for (int off = np / 2; off > 0; off >>= 1) part += __shfl_xor_sync(0xffffffffu, part, off);
  if (live && n == 0) {
    const float g = p.z != nullptr
                        ? gate(dequant(p.z[o], p.z_scale), p.gate_scale != nullptr ? p.gate_scale[d] : 1.f)
                        : 1.f;
    store_out(p.y, b * p.y_batch_stride + d, finish(part, xv, p.D != nullptr ? p.D[d] : 0.f, g), p.out_fp16);
  }
}

int check_launch(const char *what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    return set_error(MQ_SCAN_ERR_CUDA, "%s: CUDA error %s (%s)", what, cudaGetErrorName(err), cudaGetErrorString(err));
  return MQ_SCAN_OK;
}

int check_grid(const MQScanParams &p) {
  if (p.batch > kMaxGridY)
    return set_error(MQ_SCAN_ERR_INVALID, "batch=%lld exceeds the CUDA kernel's limit %lld", (long long)p.batch,
                     (long long)kMaxGridY);
  return MQ_SCAN_OK;
}

// The L-split: one thread per channel gives batch * dim threads, too few to fill a GPU at batch 1
// (D = 1536: 12 blocks). Below kSplitThreads threads, long sequences are cut into segments scanned
// in parallel (pass 1 writes each segment's end state, pass 2 folds them in and writes y). Pass 1
// repeats the exp work of its segments, so the split is only used where parallelism is missing.
// MQ_SCAN_CUDA_SPLIT=0 in the environment turns it off (tests cover both paths).
constexpr int64_t kSplitThreads = 32768;
constexpr int64_t kMinSegment = 64;
constexpr int64_t kMaxSegments = 64;

int64_t choose_segments(const MQScanParams &p) {
  const char *env = getenv("MQ_SCAN_CUDA_SPLIT");
  if (env != nullptr && env[0] == '0') return 1;
  const int64_t threads = p.batch * ((p.dim + kThreads - 1) / kThreads) * kThreads;
  if (threads >= kSplitThreads || p.seqlen < 2 * kMinSegment) return 1;
  // h_last aliasing h0 (in-place state) would race with segments still reading h0
  if (p.h0 != nullptr && p.h_last != nullptr && p.h_last == p.h0) return 1;
  int64_t segs = (2 * kSplitThreads + threads - 1) / threads;
  if (segs > kMaxSegments) segs = kMaxSegments;
  if (segs > p.seqlen / kMinSegment) segs = p.seqlen / kMinSegment;
  if (segs > kMaxGridY) segs = kMaxGridY;
  return segs < 1 ? 1 : segs;
}

// Segments of the L-split for p and the scratch bytes they need (per segment and channel: the
// segment's sum of dt and its end state). {1, 0} when the scan runs unsplit.
struct SplitPlan {
  int64_t segs, seg_len;
  size_t n_dt, bytes;
};

SplitPlan plan_split(const MQScanParams &p) {
  SplitPlan pl{choose_segments(p), p.seqlen, 0, 0};
  if (pl.segs > 1) {
    pl.seg_len = (p.seqlen + pl.segs - 1) / pl.segs;
    pl.segs = (p.seqlen + pl.seg_len - 1) / pl.seg_len;
  }
  if (pl.segs > 1) {
    pl.n_dt = static_cast<size_t>(p.batch * pl.segs * p.dim);
    pl.bytes = pl.n_dt * sizeof(float) * static_cast<size_t>(1 + p.dstate);
  }
  return pl;
}

// workspace: caller-provided scratch of workspace_bytes (TensorRT's enqueue workspace), or nullptr to
// allocate it stream-ordered here. A workspace that is too small runs the scan unsplit.
template <int kN, typename TIn>
int launch_scan(const MQScanParams &p, const TIn *x, const TIn *delta, const TIn *B, const TIn *C, const TIn *z,
                cudaStream_t stream, void *workspace = nullptr, size_t workspace_bytes = 0) {
  const unsigned gx = static_cast<unsigned>((p.dim + kThreads - 1) / kThreads);
  const SplitPlan pl = plan_split(p);
  if (pl.segs > 1) {
    Split sp;
    sp.segs = pl.segs;
    sp.seg_len = pl.seg_len;
    void *ws = nullptr;
    bool owned = false;
    if (workspace != nullptr) {
      ws = workspace_bytes >= pl.bytes ? workspace : nullptr;
    } else if (cudaMallocAsync(&ws, pl.bytes, stream) == cudaSuccess) {
      owned = true;
    } else {
      ws = nullptr;
      (void)cudaGetLastError();   // no stream-ordered allocator here: clear its error, scan unsplit
    }
    if (ws != nullptr) {
      sp.ws_dt = static_cast<float *>(ws);
      sp.ws_h = sp.ws_dt + pl.n_dt;
      const dim3 g1(gx, static_cast<unsigned>(p.batch), static_cast<unsigned>(sp.segs - 1));
      scan_kernel<kN, TIn, Mode::kLocal><<<g1, kThreads, 0, stream>>>(p, x, delta, B, C, z, sp);
      const dim3 g2(gx, static_cast<unsigned>(p.batch), static_cast<unsigned>(sp.segs));
      scan_kernel<kN, TIn, Mode::kFinish><<<g2, kThreads, 0, stream>>>(p, x, delta, B, C, z, sp);
      const int rc = check_launch("mq_scan_cuda (L-split)");
      if (owned) cudaFreeAsync(ws, stream);
      return rc;
    }
  }
  const dim3 grid(gx, static_cast<unsigned>(p.batch));
  scan_kernel<kN, TIn, Mode::kWhole><<<grid, kThreads, 0, stream>>>(p, x, delta, B, C, z, Split{});
  return check_launch("mq_scan_cuda");
}

int dispatch_int8(const MQScanParams &p, cudaStream_t s, void *ws = nullptr, size_t ws_bytes = 0) {
  const int8_t *x = p.x, *dl = p.delta, *B = p.B, *C = p.C, *z = p.z;
  if (p.dstate <= 16) return launch_scan<16>(p, x, dl, B, C, z, s, ws, ws_bytes);
  if (p.dstate <= 32) return launch_scan<32>(p, x, dl, B, C, z, s, ws, ws_bytes);
  if (p.dstate <= 64) return launch_scan<64>(p, x, dl, B, C, z, s, ws, ws_bytes);
  if (p.dstate <= 128) return launch_scan<128>(p, x, dl, B, C, z, s, ws, ws_bytes);   // state spills to local memory
  return launch_scan<256>(p, x, dl, B, C, z, s, ws, ws_bytes);
}

}  // namespace

extern "C" int mq_scan_cuda(const MQScanParams *p, void *cuda_stream) noexcept {
  try {
    int rc = mq_scan_validate(p);
    if (rc == MQ_SCAN_OK) rc = check_grid(*p);
    if (rc != MQ_SCAN_OK) return rc;
    return dispatch_int8(*p, static_cast<cudaStream_t>(cuda_stream));
  } catch (...) {
    return set_error(MQ_SCAN_ERR_INTERNAL, "mq_scan_cuda: unexpected exception");
  }
}

extern "C" size_t mq_scan_cuda_workspace_size(const MQScanParams *p) noexcept {
  try {
    if (p == nullptr || p->batch <= 0 || p->seqlen <= 0 || p->dim <= 0 || p->dstate <= 0) return 0;
    MQScanParams q = *p;
    q.h0 = nullptr;   // an upper bound: in-place state (h_last == h0) never splits
    return plan_split(q).bytes;
  } catch (...) {
    return 0;
  }
}

extern "C" int mq_scan_cuda_ws(const MQScanParams *p, void *workspace, size_t workspace_bytes,
                               void *cuda_stream) noexcept {
  try {
    int rc = mq_scan_validate(p);
    if (rc == MQ_SCAN_OK) rc = check_grid(*p);
    if (rc != MQ_SCAN_OK) return rc;
    if (workspace == nullptr) workspace_bytes = 0;
    // workspace == nullptr with workspace_bytes == 0 and a split wanted: scan unsplit, allocate nothing
    static char no_workspace;
    return dispatch_int8(*p, static_cast<cudaStream_t>(cuda_stream),
                         workspace != nullptr ? workspace : static_cast<void *>(&no_workspace), workspace_bytes);
  } catch (...) {
    return set_error(MQ_SCAN_ERR_INTERNAL, "mq_scan_cuda_ws: unexpected exception");
  }
}

extern "C" int mq_scan_step_cuda(const MQScanParams *p, void *cuda_stream) noexcept {
  try {
    const int rc = mq_scan_validate(p);
    if (rc != MQ_SCAN_OK) return rc;
    if (p->seqlen != 1)
      return set_error(MQ_SCAN_ERR_INVALID, "mq_scan_step_cuda is the decode step: seqlen must be 1, got %lld",
                       (long long)p->seqlen);
    const cudaStream_t stream = static_cast<cudaStream_t>(cuda_stream);
    if (p->dstate > 32) {
      const int grc = check_grid(*p);
      return grc != MQ_SCAN_OK ? grc : dispatch_int8(*p, stream);
    }
    int np = 1;
    while (np < p->dstate) np *= 2;
    const int64_t threads = p->batch * p->dim * np;
    const int64_t blocks = (threads + kStepThreads - 1) / kStepThreads;
    if (blocks > 0x7fffffffLL) return set_error(MQ_SCAN_ERR_INVALID, "batch * dim too large for the step kernel");
    step_kernel<<<static_cast<unsigned>(blocks), kStepThreads, 0, stream>>>(*p, np);
    return check_launch("mq_scan_step_cuda");
  } catch (...) {
    return set_error(MQ_SCAN_ERR_INTERNAL, "mq_scan_step_cuda: unexpected exception");
  }
}

extern "C" int mq_scan_cuda_f16in(const MQScanParams *p, const void *x, const void *delta, const void *B,
                                  const void *C, const void *z, void *cuda_stream) noexcept {
  try {
    if (p == nullptr || x == nullptr || delta == nullptr || B == nullptr || C == nullptr)
      return set_error(MQ_SCAN_ERR_INVALID, "mq_scan_cuda_f16in: params and the x, delta, B, C pointers are required");
    // validate the rest with the int8 pointers pointed at the half buffers (only NULL-ness is checked)
    MQScanParams q = *p;
    q.x = static_cast<const int8_t *>(x);
    q.delta = static_cast<const int8_t *>(delta);
    q.B = static_cast<const int8_t *>(B);
    q.C = static_cast<const int8_t *>(C);
    q.z = static_cast<const int8_t *>(z);
    q.x_scale = q.delta_scale = q.B_scale = q.C_scale = q.z_scale = 1.f;
    int rc = mq_scan_validate(&q);
    if (rc == MQ_SCAN_OK) rc = check_grid(q);
    if (rc != MQ_SCAN_OK) return rc;
    if (q.dstate > 64) return set_error(MQ_SCAN_ERR_INVALID, "mq_scan_cuda_f16in supports dstate <= 64");
    const auto *hx = static_cast<const __half *>(x), *hd = static_cast<const __half *>(delta),
               *hB = static_cast<const __half *>(B), *hC = static_cast<const __half *>(C),
               *hz = static_cast<const __half *>(z);
    const cudaStream_t s = static_cast<cudaStream_t>(cuda_stream);
    if (q.dstate <= 16) return launch_scan<16>(q, hx, hd, hB, hC, hz, s);
    if (q.dstate <= 32) return launch_scan<32>(q, hx, hd, hB, hC, hz, s);
    return launch_scan<64>(q, hx, hd, hB, hC, hz, s);
  } catch (...) {
    return set_error(MQ_SCAN_ERR_INTERNAL, "mq_scan_cuda_f16in: unexpected exception");
  }
}
