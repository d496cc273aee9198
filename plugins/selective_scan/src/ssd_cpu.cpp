// CPU implementation of mq::SSDScan (libmq_scan_cpu.so): the Mamba2 recurrence step by step, float32 state.
//
// Work items are (batch, head); std::threads take whole items (the ONNX Runtime ops call this with one
// item per pool task instead). An item walks its head's channels in blocks of kRows rows whose states
// (kRows x dstate floats, at most 16 KiB) stay in a local array for the whole sequence. Per step the head's
// dt, its decay exp(dt * A) and its group's B_t, C_t are computed once per block; the update of one row,
// h[n] = decay * h[n] + (dt x) B[n] with the readout sum_n h[n] C[n], runs over n in kLanes-wide pieces
// that the compiler vectorises (rows padded with zero states to a multiple of kLanes). Compared with the
// chunked (matmul) form, the step form does the fewest operations on a CPU: 2 FMAs and a multiply-add per
// state element and step.
#include <algorithm>
#include <cstring>
#include <exception>
#include <thread>
#include <vector>

#include "mq_ssd.h"
#include "scan_common.h"

namespace {

using namespace mq_ssd;

constexpr int kRows = 16;
constexpr int kLanes = 16;

#if defined(__GNUC__)
// 8 floats; passed by pointer or reference only (a 32-byte vector by value changes the ABI without AVX)
typedef float v8 __attribute__((vector_size(32)));
inline void ld8(v8 *out, const float *p) noexcept { std::memcpy(out, p, sizeof *out); }
inline void st8(float *p, const v8 &v) noexcept { std::memcpy(p, &v, sizeof v); }
inline float hsum(const v8 &a, const v8 &b) noexcept {
  const v8 s = a + b;
  return ((s[0] + s[4]) + (s[1] + s[5])) + ((s[2] + s[6]) + (s[3] + s[7]));
}

/* Rows r0 and r1 (r1 may be r0's duplicate, then its results are dropped) of one step: the state update and
 * the readout, 16 states per iteration; two rows share the B and C loads and give the FMA unit four
 * independent chains. */
inline void update_rows(float *__restrict r0, float *__restrict r1, const float *__restrict Bv,
                        const float *__restrict Cv, int64_t NP, float dec, float xd0, float xd1, float *y0,
                        float *y1) noexcept {
  v8 a0 = {}, b0 = {}, a1 = {}, b1 = {};
  for (int64_t n = 0; n < NP; n += kLanes) {
    v8 Bl, Bh, Cl, Ch, h0l, h0h, h1l, h1h;
    ld8(&Bl, Bv + n), ld8(&Bh, Bv + n + 8), ld8(&Cl, Cv + n), ld8(&Ch, Cv + n + 8);
    ld8(&h0l, r0 + n), ld8(&h0h, r0 + n + 8), ld8(&h1l, r1 + n), ld8(&h1h, r1 + n + 8);
    const v8 s0l = dec * h0l + xd0 * Bl, s0h = dec * h0h + xd0 * Bh;
    const v8 s1l = dec * h1l + xd1 * Bl, s1h = dec * h1h + xd1 * Bh;
    st8(r0 + n, s0l), st8(r0 + n + 8, s0h), st8(r1 + n, s1l), st8(r1 + n + 8, s1h);
    a0 += s0l * Cl, b0 += s0h * Ch, a1 += s1l * Cl, b1 += s1h * Ch;
  }
  *y0 = hsum(a0, b0);
  *y1 = hsum(a1, b1);
}
#else
inline void update_rows(float *r0, float *r1, const float *Bv, const float *Cv, int64_t NP, float dec, float xd0,
                        float xd1, float *y0, float *y1) noexcept {
  float s0 = 0.f, s1 = 0.f;
  for (int64_t n = 0; n < NP; ++n) {
    r0[n] = dec * r0[n] + xd0 * Bv[n];
    r1[n] = dec * r1[n] + xd1 * Bv[n];
    s0 += r0[n] * Cv[n];
    s1 += r1[n] * Cv[n];
  }
  *y0 = s0;
  *y1 = s1;
}
#endif

template <typename T>
void scan_rows(const MQSSDParams &p, int64_t b, int64_t h, int64_t p0, int nr) noexcept {
  const int64_t N = p.dstate, NP = (N + kLanes - 1) / kLanes * kLanes, P = p.head_dim, H = p.heads;
  const int64_t g = h / (H / p.groups);
  const T *__restrict x = static_cast<const T *>(p.x);
  const T *__restrict dtq = static_cast<const T *>(p.dt);
  const T *__restrict Bq = static_cast<const T *>(p.B);
  const T *__restrict Cq = static_cast<const T *>(p.C);
  alignas(64) float st[kRows + 1][MQ_SSD_MAX_DSTATE];   // + a scratch row for an odd row count
  alignas(64) float Bv[MQ_SSD_MAX_DSTATE], Cv[MQ_SSD_MAX_DSTATE];

  const int64_t so = ((b * H + h) * P + p0) * N;   // this block's first state row
  for (int j = 0; j < nr; ++j) {
    for (int64_t n = 0; n < N; ++n) st[j][n] = p.h0 != nullptr ? p.h0[so + j * N + n] : 0.f;
    for (int64_t n = N; n < NP; ++n) st[j][n] = 0.f;
  }
  for (int64_t n = 0; n < NP; ++n) st[kRows][n] = 0.f;
  for (int64_t n = N; n < NP; ++n) Bv[n] = Cv[n] = 0.f;   // padded states: no input, no readout
  const float A = p.A[h], Dh = p.D != nullptr ? p.D[h] : 0.f, bias = p.dt_bias != nullptr ? p.dt_bias[h] : 0.f;
  const int64_t c0 = h * P + p0, bc0 = g * N;             // first x channel, first B/C channel
  for (int64_t t = 0; t < p.seqlen; ++t) {
    const float dt = step_size(load(dtq, b * p.dt_batch_stride + t * p.dt_l_stride + h, p.dt_scales, h, p.dt_scale),
                               bias, p.dt_min, p.dt_max);
    const float dec = decay(dt, A);
    const int64_t bco = b * p.bc_batch_stride + t * p.bc_l_stride + bc0;
    for (int64_t n = 0; n < N; ++n) {
      Bv[n] = load(Bq, bco + n, p.B_scales, bc0 + n, p.B_scale);
      Cv[n] = load(Cq, bco + n, p.C_scales, bc0 + n, p.C_scale);
    }
    const int64_t xo = b * p.x_batch_stride + t * p.x_l_stride + c0;
    float *__restrict yt = p.y + b * p.y_batch_stride + t * p.y_l_stride + c0;
    for (int j = 0; j < nr; j += 2) {
      const bool pair = j + 1 < nr;
      const float x0 = load(x, xo + j, p.x_scales, c0 + j, p.x_scale);
      const float x1 = pair ? load(x, xo + j + 1, p.x_scales, c0 + j + 1, p.x_scale) : 0.f;
      float y0, y1;
      update_rows(st[j], pair ? st[j + 1] : st[kRows], Bv, Cv, NP, dec, dt * x0, dt * x1, &y0, &y1);
      yt[j] = y0 + Dh * x0;
      if (pair) yt[j + 1] = y1 + Dh * x1;
    }
  }
  if (p.h_last != nullptr)
    for (int j = 0; j < nr; ++j) std::memcpy(p.h_last + so + j * N, st[j], sizeof(float) * static_cast<size_t>(N));
}

template <typename T>
void scan_item(const MQSSDParams &p, int64_t item) noexcept {
  const int64_t b = item / p.heads, h = item % p.heads;
  for (int64_t p0 = 0; p0 < p.head_dim; p0 += kRows)
    scan_rows<T>(p, b, h, p0, static_cast<int>(std::min<int64_t>(kRows, p.head_dim - p0)));
}

// the body of each std::thread: an exception escaping it would call std::terminate, so nothing here throws
void run_items(const MQSSDParams &p, int64_t first, int64_t stride, int64_t count) noexcept {
  for (int64_t i = first; i < count; i += stride) {
    if (p.in_float)
      scan_item<float>(p, i);
    else
      scan_item<int8_t>(p, i);
  }
}

}  // namespace

extern "C" int mq_ssd_cpu(const MQSSDParams *p, int num_threads) noexcept {
  try {
    const int rc = mq_scan::ssd_validate(p, true);
    if (rc != MQ_SCAN_OK) return rc;
    const int64_t items = p->batch * p->heads;
    int64_t threads = num_threads > 0 ? num_threads : static_cast<int64_t>(std::thread::hardware_concurrency());
    threads = std::max<int64_t>(1, std::min<int64_t>(threads, items));
    // starting a thread costs ~10-50 us: not worth it for a small step
    if (p->batch * p->seqlen * p->heads * p->head_dim * p->dstate < (int64_t{1} << 16)) threads = 1;
    if (threads == 1) {
      run_items(*p, 0, 1, items);
      return MQ_SCAN_OK;
    }
    std::vector<std::thread> pool;
    pool.reserve(static_cast<size_t>(threads - 1));
    std::exception_ptr failure;
    try {
      for (int64_t t = 1; t < threads; ++t) pool.emplace_back(run_items, std::cref(*p), t, threads, items);
    } catch (...) {
      failure = std::current_exception();   // fewer threads started; join those before reporting
    }
    if (!failure) run_items(*p, 0, threads, items);
    for (auto &th : pool) th.join();
    if (failure) std::rethrow_exception(failure);
    return MQ_SCAN_OK;
  } catch (const std::exception &e) {
    return mq_scan::set_error(MQ_SCAN_ERR_INTERNAL, "mq_ssd_cpu failed: %s", e.what());
  } catch (...) {
    return mq_scan::set_error(MQ_SCAN_ERR_INTERNAL, "mq_ssd_cpu failed with an unknown exception");
  }
}
