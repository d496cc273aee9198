// CUDA implementation of mq::SSDScan (libmq_scan_cuda.so), int8 inputs.
//
// ssd_kernel (prefill): a block owns kRows channels (rows) of one head of one batch row; each row's state
// h[0..N) is spread over kR = kN / kS threads holding kS consecutive states each, in registers, for the whole
// sequence. The sequence is cut into chunks of kT steps; per chunk the block stages into shared memory the
// head's dt and decay exp(dt * A) (dequantized, softplus, clamp: once per step, not per thread), its group's
// B_t and C_t (dequantized, zero-padded to kN states) and its rows' x_t, so that every int8 load is done once
// and dequantized in registers. Each thread then updates its kS states per step (h = decay * h + dt x B, two
// 16-byte shared loads for B and C) and writes its part of the readout C . h to shared memory; after the
// chunk the block sums the kR parts of each (step, row), adds D x and writes y (consecutive rows: consecutive
// addresses). The state carries over from chunk to chunk in registers.
//
// L-split (as the Mamba1 scan): with few rows to give threads (small batch x heads x head_dim) and a long
// sequence, the sequence is cut into segments scanned in parallel. Pass 1 scans each segment but the last
// from a zero state and stores its end state and the sum of dt * A over it (the log of its decay); pass 2
// folds the earlier segments into h0 (h <- exp(sum) h + h_segment, exact by linearity: the decay of a head is
// one scalar per step) and scans its own steps writing y.
//
// ssd_step_kernel (decode, seqlen == 1): one thread per (row, state lane), np = min(32, N rounded up to a power
// of two) lanes per row, each lane ceil(N / np) states; the state is read and written once, coalesced, and y
// is a shuffle reduction over the row's lanes. h_last may alias h0.
#include <cstdlib>
#include <cuda_runtime.h>

#include "mq_ssd.h"
#include "scan_common.h"

namespace {

using namespace mq_ssd;
using mq_scan::set_error;

constexpr int kThreads = 128;
constexpr int kMinBlocks = 6;   // blocks per SM the register budget must allow (<= 80 registers a thread)
constexpr int kStepThreads = 256;
constexpr int64_t kMaxGrid = 65535;   // grid y and z

struct __align__(16) F4 {
  float v[4];
};

enum class Mode { kWhole, kLocal, kFinish };

struct Split {
  int64_t seg_len = 0;
  int64_t segs = 1;
  float *ws_h = nullptr;   // [batch, segs, heads, head_dim, dstate]: end states of the segments (zero start)
  float *ws_a = nullptr;   // [batch, segs, heads]: sum of dt * A over each segment
};

template <int kN, int kS, Mode kMode>
__global__ void __launch_bounds__(kThreads, kMinBlocks) ssd_kernel(const MQSSDParams p, const Split sp) {
  constexpr int kR = kN / kS;                        // threads per row
  constexpr int kRows = kThreads / kR;               // rows per block
  constexpr int kT = 2048 / kN < 16 ? 2048 / kN : 16;   // steps per chunk
  constexpr bool kReadout = kMode != Mode::kLocal;
  static_assert(kS % 4 == 0 && kR >= 1 && kR <= 32 && kThreads % kR == 0, "tile shape");
  __shared__ __align__(16) float Bs[kT * kN];
  __shared__ __align__(16) float Cs[kReadout ? kT * kN : 4];
  __shared__ float xs[kT * kRows];
  __shared__ float dts[kT], decs[kT];
  __shared__ float yp[kReadout ? kT * kRows * (kR + 1) : 1];   // +1: the reduction reads without bank conflicts

  const int64_t H = p.heads, P = p.head_dim, N = p.dstate;
  const int64_t h = blockIdx.y;
  const int64_t b = kMode == Mode::kWhole ? static_cast<int64_t>(blockIdx.z) : blockIdx.z / sp.segs;
  const int64_t seg = kMode == Mode::kWhole ? 0 : blockIdx.z % sp.segs;
  const int tid = threadIdx.x, row = tid / kR, lane = tid % kR;
  const int64_t p0 = static_cast<int64_t>(blockIdx.x) * kRows, pr = p0 + row;
  const bool live = pr < P;
  const int64_t g = h / (H / p.groups);
  const int64_t l_begin = kMode == Mode::kWhole ? 0 : seg * sp.seg_len;
  const int64_t l_end = kMode == Mode::kWhole ? p.seqlen
                        : (l_begin + sp.seg_len < p.seqlen ? l_begin + sp.seg_len : p.seqlen);
  const int8_t *x = static_cast<const int8_t *>(p.x), *dtq = static_cast<const int8_t *>(p.dt);
  const int8_t *Bq = static_cast<const int8_t *>(p.B), *Cq = static_cast<const int8_t *>(p.C);

  float st[kS];
  const int64_t so = ((b * H + h) * P + pr) * N;   // this row's state
#pragma unroll
  for (int s = 0; s < kS; ++s) {
    const int64_t n = lane * kS + s;
    st[s] = (kMode != Mode::kLocal && live && n < N && p.h0 != nullptr) ? p.h0[so + n] : 0.f;
  }
  if (kMode == Mode::kFinish && live) {
    for (int64_t s2 = 0; s2 < seg; ++s2) {
      const int64_t e = (b * sp.segs + s2) * H + h;
      const float f = expf(sp.ws_a[e]);
#pragma unroll
      for (int s = 0; s < kS; ++s) {
        const int64_t n = lane * kS + s;
        if (n < N) st[s] = f * st[s] + sp.ws_h[(e * P + pr) * N + n];
      }
    }
  }
  const float A = p.A[h], bias = p.dt_bias != nullptr ? p.dt_bias[h] : 0.f, Dh = p.D != nullptr ? p.D[h] : 0.f;
  float asum = 0.f;   // kLocal, thread 0: sum of dt * A over the segment

  for (int64_t l0 = l_begin; l0 < l_end; l0 += kT) {
    const int len = static_cast<int>(l_end - l0 < kT ? l_end - l0 : kT);
    __syncthreads();   // every thread is done with the previous chunk's staging and partial sums
    for (int i = tid; i < kT * kN; i += kThreads) {
      const int t = i / kN, n = i % kN;
      float bv = 0.f, cv = 0.f;
      if (t < len && n < N) {
        const int64_t o = b * p.bc_batch_stride + (l0 + t) * p.bc_l_stride + g * N + n;
        bv = load(Bq, o, p.B_scales, g * N + n, p.B_scale);
        if (kReadout) cv = load(Cq, o, p.C_scales, g * N + n, p.C_scale);
      }
      Bs[i] = bv;
      if (kReadout) Cs[i] = cv;
    }
    for (int i = tid; i < kT * kRows; i += kThreads) {
      const int t = i / kRows, r = i % kRows;
      const int64_t c = h * P + p0 + r;
      xs[i] = (t < len && p0 + r < P) ? load(x, b * p.x_batch_stride + (l0 + t) * p.x_l_stride + c, p.x_scales, c,
                                             p.x_scale)
                                      : 0.f;
    }
    for (int t = tid; t < kT; t += kThreads) {
      float dt = 0.f;
      if (t < len)
        dt = step_size(load(dtq, b * p.dt_batch_stride + (l0 + t) * p.dt_l_stride + h, p.dt_scales, h, p.dt_scale),
                       bias, p.dt_min, p.dt_max);
      dts[t] = dt;
      decs[t] = t < len ? decay(dt, A) : 1.f;
    }
    __syncthreads();
    if (kMode == Mode::kLocal && tid == 0)
      for (int t = 0; t < len; ++t) asum += dts[t] * A;
    for (int t = 0; t < len; ++t) {
      const float dec = decs[t], xd = dts[t] * xs[t * kRows + row];
      float acc = 0.f;
#pragma unroll
      for (int s4 = 0; s4 < kS; s4 += 4) {
        const F4 bv = *reinterpret_cast<const F4 *>(Bs + t * kN + lane * kS + s4);
        F4 cv{};
        if (kReadout) cv = *reinterpret_cast<const F4 *>(Cs + t * kN + lane * kS + s4);
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          st[s4 + k] = dec * st[s4 + k] + xd * bv.v[k];
          if (kReadout) acc += st[s4 + k] * cv.v[k];
        }
      }
      if (kReadout) yp[(t * kRows + row) * (kR + 1) + lane] = acc;
    }
    if (kReadout) {
      __syncthreads();
      for (int i = tid; i < len * kRows; i += kThreads) {
        const int t = i / kRows, r = i % kRows;
        if (p0 + r >= P) continue;
        const float *part = yp + (t * kRows + r) * (kR + 1);
        float sum = 0.f;
#pragma unroll 4
        for (int l = 0; l < kR; ++l) sum += part[l];
        p.y[b * p.y_batch_stride + (l0 + t) * p.y_l_stride + h * P + p0 + r] = sum + Dh * xs[t * kRows + r];
      }
    }
  }

  if (kMode == Mode::kLocal) {
    const int64_t e = (b * sp.segs + seg) * H + h;
    if (live) {
#pragma unroll
      for (int s = 0; s < kS; ++s) {
        const int64_t n = lane * kS + s;
        if (n < N) sp.ws_h[(e * P + pr) * N + n] = st[s];
      }
    }
    if (tid == 0) sp.ws_a[e] = asum;
    return;
  }
  const bool last_seg = kMode == Mode::kWhole || seg == sp.segs - 1;
  if (live && last_seg && p.h_last != nullptr) {
#pragma unroll
    for (int s = 0; s < kS; ++s) {
      const int64_t n = lane * kS + s;
      if (n < N) p.h_last[so + n] = st[s];
    }
  }
}

// One thread per (row, lane), np lanes per row (a power of two <= 32 dividing the warp). h0 and h_last are not
// __restrict__: they may alias (each element is read, then written, by one thread).
__global__ void __launch_bounds__(kStepThreads) ssd_step_kernel(const MQSSDParams p, int np) {
  const int64_t gid = static_cast<int64_t>(blockIdx.x) * kStepThreads + threadIdx.x;
  const int64_t H = p.heads, P = p.head_dim, N = p.dstate;
  const int64_t rowid = gid / np;
  const int lane = static_cast<int>(gid % np);
  const bool live = rowid < p.batch * H * P;
  const int64_t b = live ? rowid / (H * P) : 0, h = live ? (rowid / P) % H : 0, pr = live ? rowid % P : 0;
  const int64_t g = h / (H / p.groups);
  float part = 0.f, xv = 0.f;
  if (live) {
    const int8_t *dtq = static_cast<const int8_t *>(p.dt), *x = static_cast<const int8_t *>(p.x);
    const int8_t *Bq = static_cast<const int8_t *>(p.B), *Cq = static_cast<const int8_t *>(p.C);
    const float dt = step_size(load(dtq, b * p.dt_batch_stride + h, p.dt_scales, h, p.dt_scale),
                               p.dt_bias != nullptr ? p.dt_bias[h] : 0.f, p.dt_min, p.dt_max);
    const float dec = decay(dt, p.A[h]);
    const int64_t c = h * P + pr;
    xv = load(x, b * p.x_batch_stride + c, p.x_scales, c, p.x_scale);
    const float xd = dt * xv;
    const int64_t so = (b * H * P + c) * N, bo = b * p.bc_batch_stride + g * N;
    for (int64_t n = lane; n < N; n += np) {
      const float hv = dec * (p.h0 != nullptr ? p.h0[so + n] : 0.f) + xd * load(Bq, bo + n, p.B_scales, g * N + n, p.B_scale);
      if (p.h_last != nullptr) p.h_last[so + n] = hv;
      part += hv * load(Cq, bo + n, p.C_scales, g * N + n, p.C_scale);
    }
  }
  for (int off = np / 2; off > 0; off >>= 1) part += __shfl_xor_sync(0xffffffffu, part, off);
  if (live && lane == 0)
    p.y[b * p.y_batch_stride + h * P + pr] = part + (p.D != nullptr ? p.D[h] : 0.f) * xv;
}

int check_launch(const char *what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    return set_error(MQ_SCAN_ERR_CUDA, "%s: CUDA error %s (%s)", what, cudaGetErrorName(err), cudaGetErrorString(err));
  return MQ_SCAN_OK;
}

/* the checks of every CUDA entry point: the params (per-channel scales are device memory: not read) and what
 * the kernels support */
int check_cuda(const MQSSDParams *p) {
  int rc = mq_scan::ssd_validate(p, false);
  if (rc != MQ_SCAN_OK) return rc;
  if (p->in_float) return set_error(MQ_SCAN_ERR_INVALID, "the CUDA SSD scan takes int8 inputs only (in_float = 0)");
  if (p->heads > kMaxGrid)
    return set_error(MQ_SCAN_ERR_INVALID, "heads=%lld exceeds the CUDA kernel's limit %lld", (long long)p->heads,
                     (long long)kMaxGrid);
  if (p->batch > kMaxGrid)
    return set_error(MQ_SCAN_ERR_INVALID, "batch=%lld exceeds the CUDA kernel's limit %lld", (long long)p->batch,
                     (long long)kMaxGrid);
  return MQ_SCAN_OK;
}

// ---- the L-split ----------------------------------------------------------------------------------------

constexpr int64_t kSplitThreads = 65536;   // below this many threads a long sequence is split
constexpr int64_t kMinSegment = 64;
constexpr int64_t kMaxSegments = 64;

/* rows per block of the instantiation that serves dstate N */
int64_t rows_per_block(int64_t N) {
  const int64_t kn = N <= 16 ? 16 : N <= 32 ? 32 : N <= 64 ? 64 : N <= 128 ? 128 : 256;
  const int64_t ks = kn == 256 ? 8 : 4;
  return kThreads / (kn / ks);
}

struct SplitPlan {
  int64_t segs, seg_len;
  size_t n_a, bytes;
};

SplitPlan plan_split(const MQSSDParams &p) {
  SplitPlan pl{1, p.seqlen, 0, 0};
  const char *env = getenv("MQ_SCAN_CUDA_SPLIT");
  if (env != nullptr && env[0] == '0') return pl;
  const int64_t rows = rows_per_block(p.dstate);
  const int64_t threads = p.batch * p.heads * ((p.head_dim + rows - 1) / rows) * kThreads;
  if (threads >= kSplitThreads || p.seqlen < 2 * kMinSegment) return pl;
  if (p.h0 != nullptr && p.h_last != nullptr && p.h_last == p.h0) return pl;   // in place: segments would race
  int64_t segs = (2 * kSplitThreads + threads - 1) / threads;
  if (segs > kMaxSegments) segs = kMaxSegments;
  if (segs > p.seqlen / kMinSegment) segs = p.seqlen / kMinSegment;
  if (segs * p.batch > kMaxGrid) segs = kMaxGrid / p.batch;
  if (segs <= 1) return pl;
  pl.seg_len = (p.seqlen + segs - 1) / segs;
  pl.segs = (p.seqlen + pl.seg_len - 1) / pl.seg_len;
  if (pl.segs <= 1) return SplitPlan{1, p.seqlen, 0, 0};
  pl.n_a = static_cast<size_t>(p.batch * pl.segs * p.heads);
  pl.bytes = sizeof(float) * (pl.n_a + pl.n_a * static_cast<size_t>(p.head_dim * p.dstate));
  return pl;
}

template <int kN, int kS>
int launch(const MQSSDParams &p, cudaStream_t stream, void *workspace, size_t workspace_bytes) {
  constexpr int64_t kRows = kThreads / (kN / kS);
  const unsigned gx = static_cast<unsigned>((p.head_dim + kRows - 1) / kRows);
  const SplitPlan pl = plan_split(p);
  if (pl.segs > 1) {
    void *ws = nullptr;
    bool owned = false;
    if (workspace != nullptr) {
      ws = workspace_bytes >= pl.bytes ? workspace : nullptr;
    } else if (cudaMallocAsync(&ws, pl.bytes, stream) == cudaSuccess) {
      owned = true;
    } else {
      ws = nullptr;
      (void)cudaGetLastError();   // no stream-ordered allocator: clear its error, scan unsplit
    }
    if (ws != nullptr) {
      Split sp;
      sp.segs = pl.segs;
      sp.seg_len = pl.seg_len;
      sp.ws_a = static_cast<float *>(ws);
      sp.ws_h = sp.ws_a + pl.n_a;
      const dim3 g1(gx, static_cast<unsigned>(p.heads), static_cast<unsigned>(p.batch * sp.segs));
      ssd_kernel<kN, kS, Mode::kLocal><<<g1, kThreads, 0, stream>>>(p, sp);
      ssd_kernel<kN, kS, Mode::kFinish><<<g1, kThreads, 0, stream>>>(p, sp);
      const int rc = check_launch("mq_ssd_cuda (L-split)");
      if (owned) cudaFreeAsync(ws, stream);
      return rc;
    }
  }
  const dim3 grid(gx, static_cast<unsigned>(p.heads), static_cast<unsigned>(p.batch));
  ssd_kernel<kN, kS, Mode::kWhole><<<grid, kThreads, 0, stream>>>(p, Split{});
  return check_launch("mq_ssd_cuda");
}

int dispatch(const MQSSDParams &p, cudaStream_t s, void *ws, size_t ws_bytes) {
  if (p.dstate <= 16) return launch<16, 4>(p, s, ws, ws_bytes);
  if (p.dstate <= 32) return launch<32, 4>(p, s, ws, ws_bytes);
  if (p.dstate <= 64) return launch<64, 4>(p, s, ws, ws_bytes);
  if (p.dstate <= 128) return launch<128, 4>(p, s, ws, ws_bytes);
  return launch<256, 8>(p, s, ws, ws_bytes);
}

}  // namespace

extern "C" int mq_ssd_cuda(const MQSSDParams *p, void *cuda_stream) noexcept {
  try {
    const int rc = check_cuda(p);
    return rc != MQ_SCAN_OK ? rc : dispatch(*p, static_cast<cudaStream_t>(cuda_stream), nullptr, 0);
  } catch (...) {
    return set_error(MQ_SCAN_ERR_INTERNAL, "mq_ssd_cuda: unexpected exception");
  }
}

extern "C" size_t mq_ssd_cuda_workspace_size(const MQSSDParams *p) noexcept {
  try {
    if (p == nullptr || p->batch <= 0 || p->seqlen <= 0 || p->heads <= 0 || p->head_dim <= 0 || p->dstate <= 0)
      return 0;
    MQSSDParams q = *p;
    q.h0 = nullptr;   // an upper bound: in-place state (h_last == h0) never splits
    return plan_split(q).bytes;
  } catch (...) {
    return 0;
  }
}

extern "C" int mq_ssd_cuda_ws(const MQSSDParams *p, void *workspace, size_t workspace_bytes,
                              void *cuda_stream) noexcept {
  try {
    const int rc = check_cuda(p);
    if (rc != MQ_SCAN_OK) return rc;
    // no workspace: scan unsplit and allocate nothing (a non-NULL stand-in with 0 bytes)
    static char no_workspace;
    return dispatch(*p, static_cast<cudaStream_t>(cuda_stream),
                    workspace != nullptr ? workspace : static_cast<void *>(&no_workspace),
                    workspace != nullptr ? workspace_bytes : 0);
  } catch (...) {
    return set_error(MQ_SCAN_ERR_INTERNAL, "mq_ssd_cuda_ws: unexpected exception");
  }
}

extern "C" int mq_ssd_step_cuda(const MQSSDParams *p, void *cuda_stream) noexcept {
  try {
    const int rc = check_cuda(p);
    if (rc != MQ_SCAN_OK) return rc;
    if (p->seqlen != 1)
      return set_error(MQ_SCAN_ERR_INVALID, "mq_ssd_step_cuda is the decode step: seqlen must be 1, got %lld",
                       (long long)p->seqlen);
    int np = 1;
    while (np < p->dstate && np < 32) np *= 2;
    const int64_t threads = p->batch * p->heads * p->head_dim * np;
    const int64_t blocks = (threads + kStepThreads - 1) / kStepThreads;
    if (blocks > 0x7fffffffLL)
      return set_error(MQ_SCAN_ERR_INVALID, "batch * heads * head_dim too large for the step kernel");
    ssd_step_kernel<<<static_cast<unsigned>(blocks), kStepThreads, 0, static_cast<cudaStream_t>(cuda_stream)>>>(*p, np);
    return check_launch("mq_ssd_step_cuda");
  } catch (...) {
    return set_error(MQ_SCAN_ERR_INTERNAL, "mq_ssd_step_cuda: unexpected exception");
  }
}
