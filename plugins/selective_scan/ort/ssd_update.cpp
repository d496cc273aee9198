// The fused Mamba2 decode-state update (ssd_update.h). Two passes over a call's tokens, each split into
// independent tasks: (A) per block of kBlock channels of x|B|C, the conv-state shift, the depthwise conv, SiLU
// and the x/B/C quant points, vectorised across the block's channels; (B) per (batch, head), the SSD scan from
// the ssm state (mq_ssd_cpu on a one-head slice). At decode sizes (b * L * H * P * N below kSerialBelow)
// everything runs on the calling thread.
#include "ssd_update.h"

#include "state_codec.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <exception>
#include <vector>

#include "mq_ssd.h"

namespace mq_scan {
namespace {

constexpr int64_t kBlock = 64;
constexpr int kMaxConv = 16;
constexpr int64_t kSerialBelow = int64_t{1} << 16;

struct Work {
  const SSDUpdateParams *p;
  int64_t Cd, HP, GN, blocks;
  std::vector<int8_t> uq;     // int8 op: x|B|C codes of every token [b, L, Cd]
  std::vector<float> uf;      // Float op: x|B|C values
  MQSSDParams scan;           // the scan of the whole call over the scratch
};

inline float silu(float v) { return v * (1.f / (1.f + std::exp(-v))); }

/* the scale of channel c of x|B|C (int8 op) */
inline float channel_scale(const SSDUpdateParams &p, int64_t HP, int64_t GN, int64_t c) {
  if (c < HP) return p.x_scales != nullptr ? p.x_scales[c] : p.x_scale;
  if (c < HP + GN) return p.B_scales != nullptr ? p.B_scales[c - HP] : p.B_scale;
  return p.C_scales != nullptr ? p.C_scales[c - HP - GN] : p.C_scale;
}

// ---- pass A: conv-state shift, depthwise conv, SiLU, x/B/C quant points --------------------------

template <int64_t KT>   // d_conv as a compile-time constant (4, every Mamba2 checkpoint), or 0
void pass_conv_k(Work &w, size_t task) noexcept {
  const SSDUpdateParams &p = *w.p;
  const int64_t bi = static_cast<int64_t>(task) / w.blocks;
  const int64_t c0 = (static_cast<int64_t>(task) % w.blocks) * kBlock;
  const int64_t nc = std::min(kBlock, w.Cd - c0);
  const int64_t K = KT > 0 ? KT : p.dconv, Cd = w.Cd, L = p.seqlen;
  // win[k][j]: the last K-1 conv inputs of channel c0 + j, oldest first (lanes >= nc stay 0)
  alignas(64) float win[kMaxConv][kBlock] = {};
  alignas(64) float wk[kMaxConv][kBlock] = {};
  alignas(64) float bias[kBlock] = {}, cur[kBlock] = {}, scl[kBlock], acc[kBlock];
  alignas(64) int8_t q[kBlock];
  const float *__restrict cw = p.conv_w + c0 * K;
  const float *__restrict cst = p.conv_state + (bi * Cd + c0) * (K - 1);
  for (int64_t j = 0; j < kBlock; ++j) scl[j] = 1.f;
  for (int64_t j = 0; j < nc; ++j) {      // [channel][tap] in memory -> [tap][channel] here
    for (int64_t k = 0; k < K; ++k) wk[k][j] = cw[j * K + k];
    for (int64_t k = 0; k + 1 < K; ++k) win[k][j] = cst[j * (K - 1) + k];
    bias[j] = p.conv_b[c0 + j];
    if (!p.is_float) scl[j] = channel_scale(p, w.HP, w.GN, c0 + j);
  }
  const size_t nf = sizeof(float) * static_cast<size_t>(nc);
  const float cs = p.conv_scale;
  for (int64_t t = 0; t < L; ++t) {
    const int64_t o = (bi * L + t) * Cd + c0;
    std::memcpy(cur, p.xbc + o, nf);   // lanes >= nc keep 0 or an earlier row's value: never stored
    if (!p.is_float)
      for (int64_t j = 0; j < kBlock; ++j) cur[j] = static_cast<float>(mq_ssd::quantize(cur[j], cs)) * cs;
    for (int64_t j = 0; j < kBlock; ++j) acc[j] = bias[j];
    for (int64_t k = 0; k + 1 < K; ++k)
      for (int64_t j = 0; j < kBlock; ++j) acc[j] += wk[k][j] * win[k][j];
    for (int64_t j = 0; j < kBlock; ++j) acc[j] = silu(acc[j] + wk[K - 1][j] * cur[j]);
    for (int64_t k = 0; k + 2 < K; ++k)
      for (int64_t j = 0; j < kBlock; ++j) win[k][j] = win[k + 1][j];
    if (K > 1)
      for (int64_t j = 0; j < kBlock; ++j) win[K - 2][j] = cur[j];
    if (p.is_float) {
      std::memcpy(w.uf.data() + o, acc, nf);
    } else {
      for (int64_t j = 0; j < kBlock; ++j) q[j] = mq_ssd::quantize(acc[j], scl[j]);
      std::memcpy(w.uq.data() + o, q, static_cast<size_t>(nc));
    }
  }
  float *__restrict cso = p.conv_state_out + (bi * Cd + c0) * (K - 1);
  for (int64_t j = 0; j < nc; ++j)
    for (int64_t k = 0; k + 1 < K; ++k) cso[j * (K - 1) + k] = win[k][j];
}

void pass_conv(void *user, size_t task) noexcept {
  Work &w = *static_cast<Work *>(user);
  if (w.p->dconv == 4)
    pass_conv_k<4>(w, task);
  else
    pass_conv_k<0>(w, task);
}

// ---- pass B: the scan of one (batch, head) --------------------------------------------------------

// int8 states: a (batch, head) task's rows go through a buffer of this many floats on its stack (32 KiB), as many
// rows per scan call as fit (a whole head of 64 rows at d_state 128)
constexpr int64_t kCodecFloats = 8192;
static_assert(kCodecFloats >= MQ_SSD_MAX_DSTATE, "a row must fit the int8 states' buffer");

struct HeadTasks {
  const MQSSDParams *s;
  const Int8States *int8_ssm;   // NULL, or the int8 SSM state whose head rows each task converts (state_codec.h)
  std::atomic<int> failed{0};   // the first nonzero return code
};

void scan_head(void *user, size_t task) noexcept {
  HeadTasks &w = *static_cast<HeadTasks *>(user);
  const MQSSDParams &s = *w.s;
  const int64_t bi = static_cast<int64_t>(task) / s.heads, h = static_cast<int64_t>(task) % s.heads;
  const int64_t P = s.head_dim, N = s.dstate, g = h / (s.heads / s.groups);
  const size_t in_size = s.in_float ? sizeof(float) : sizeof(int8_t);
  auto at = [&](const void *base, int64_t elems) {
    return static_cast<const void *>(static_cast<const char *>(base) + static_cast<size_t>(elems) * in_size);
  };
  MQSSDParams q = s;   // batch 1, one head, its group: strides stay those of the whole call
  q.batch = 1, q.heads = 1, q.groups = 1;
  q.x = at(s.x, bi * s.x_batch_stride + h * P);
  q.dt = at(s.dt, bi * s.dt_batch_stride + h);
  q.B = at(s.B, bi * s.bc_batch_stride + g * N);
  q.C = at(s.C, bi * s.bc_batch_stride + g * N);
  if (s.x_scales != nullptr) q.x_scales = s.x_scales + h * P;
  if (s.dt_scales != nullptr) q.dt_scales = s.dt_scales + h;
  if (s.B_scales != nullptr) q.B_scales = s.B_scales + g * N;
  if (s.C_scales != nullptr) q.C_scales = s.C_scales + g * N;
  q.A = s.A + h;
  if (s.D != nullptr) q.D = s.D + h;
  if (s.dt_bias != nullptr) q.dt_bias = s.dt_bias + h;
  if (s.h0 != nullptr) q.h0 = s.h0 + (bi * s.heads + h) * P * N;
  if (s.h_last != nullptr) q.h_last = s.h_last + (bi * s.heads + h) * P * N;
  q.y = s.y + bi * s.y_batch_stride + h * P;
  int rc = 0;
  if (w.int8_ssm == nullptr) {
    rc = mq_ssd_cpu(&q, 1);
  } else {   // int8 states: rows through a buffer on this task's stack, in its cache
    const Int8States &c = *w.int8_ssm;
    alignas(64) float rows[kCodecFloats];
    const int64_t per_call = kCodecFloats / N;     // >= 32: N <= MQ_SSD_MAX_DSTATE (256)
    const int64_t row0 = (bi * s.heads + h) * P;   // the head's first row of [b, H, P]
    for (int64_t p0 = 0; p0 < P && rc == 0; p0 += per_call) {
      MQSSDParams r = q;   // rows p0.. of the head: the scan's rows are independent
      r.head_dim = std::min(per_call, P - p0);
      r.x = at(q.x, p0);
      if (q.x_scales != nullptr) r.x_scales = q.x_scales + p0;
      r.h0 = r.h_last = rows;   // (mq_ssd_cpu reads the state before it writes it)
      r.y = q.y + p0;
      c.rows_in(row0 + p0, r.head_dim, rows);
      rc = mq_ssd_cpu(&r, 1);
      c.rows_out(row0 + p0, r.head_dim, rows);
    }
  }
  int none = 0;
  if (rc != 0) w.failed.compare_exchange_strong(none, rc);
}

}  // namespace

int ssd_state_update(const SSDUpdateParams &p, ParallelFor parallel_for, void *pool, std::string *error) {
  if (p.dconv < 1 || p.dconv > kMaxConv) {
    *error = "d_conv must be in [1, " + std::to_string(kMaxConv) + "], got " + std::to_string(p.dconv);
    return kStateUpdateInvalid;
  }
  const int64_t b = p.batch, L = p.seqlen, H = p.heads, P = p.head_dim, G = p.groups, N = p.dstate, K = p.dconv;
  Work w;
  w.p = &p;
  w.HP = H * P, w.GN = G * N, w.Cd = w.HP + 2 * w.GN;
  w.blocks = (w.Cd + kBlock - 1) / kBlock;
  if (b == 0) return 0;
  if (L == 0) {   // no token: the states pass through (int8: decoded and encoded again, as the op's body does)
    std::memcpy(p.conv_state_out, p.conv_state, sizeof(float) * static_cast<size_t>(b * w.Cd * (K - 1)));
    if (p.int8_ssm == nullptr) {
      std::memcpy(p.ssm_state_out, p.ssm_state, sizeof(float) * static_cast<size_t>(b * H * P * N));
    } else {
      alignas(64) float rows[kCodecFloats];
      for (int64_t r0 = 0; r0 < b * H * P; r0 += kCodecFloats / N) {
        const int64_t n = std::min(kCodecFloats / N, b * H * P - r0);
        p.int8_ssm->rows_in(r0, n, rows);
        p.int8_ssm->rows_out(r0, n, rows);
      }
    }
    return 0;
  }
  // the scan over the scratch, validated here (sizes, scales, limits) so that no task can fail on its slice
  MQSSDParams &s = w.scan;
  std::memset(&s, 0, sizeof s);
  s.batch = b, s.seqlen = L, s.heads = H, s.head_dim = P, s.groups = G, s.dstate = N;
  s.in_float = p.is_float ? 1 : 0;
  s.x_scale = p.x_scale, s.dt_scale = p.dt_scale, s.B_scale = p.B_scale, s.C_scale = p.C_scale;
  s.x_scales = p.x_scales, s.dt_scales = p.dt_scales, s.B_scales = p.B_scales, s.C_scales = p.C_scales;
  s.A = p.A, s.D = p.D, s.dt_bias = p.dt_bias, s.dt_min = p.dt_min, s.dt_max = p.dt_max;
  s.h0 = p.ssm_state, s.h_last = p.ssm_state_out, s.y = p.y, s.dt = p.dt;
  s.x_batch_stride = s.bc_batch_stride = L * w.Cd, s.x_l_stride = s.bc_l_stride = w.Cd;
  s.dt_batch_stride = L * H, s.dt_l_stride = H;
  s.y_batch_stride = L * w.HP, s.y_l_stride = w.HP;
  static const int8_t kNonNull = 0;   // stand-ins for the scratch pointers, only checked for NULL here
  s.x = s.B = s.C = &kNonNull;
  if (mq_ssd_validate(&s) != MQ_SCAN_OK) {
    *error = mq_scan_last_error();
    return kStateUpdateInvalid;
  }
  // the scratch: sized with overflow checks and against the machine before allocating
  const size_t elem = p.is_float ? sizeof(float) : sizeof(int8_t);
  size_t values = 0, bytes = 0;
  const bool fits = mul(static_cast<size_t>(b) * static_cast<size_t>(L), static_cast<size_t>(w.Cd), &values) &&
                    mul(values, elem, &bytes);
  const std::string what = "the scratch of " + std::to_string(b * L) + " tokens x " + std::to_string(w.Cd) +
                           " x|B|C channels (" + (p.is_float ? "float" : "int8") + ")";
  const size_t ram = physical_memory();
  if (!fits || (ram != 0 && bytes > ram)) {
    *error = what + (fits ? " is " + gib(static_cast<double>(bytes)) : std::string(" overflows size_t")) +
             (ram != 0 ? ", more than this machine's " + gib(static_cast<double>(ram)) + " of memory" : std::string());
    return kStateUpdateNoMemory;
  }
  try {
    if (p.is_float)
      w.uf.resize(values);
    else
      w.uq.resize(values);
  } catch (const std::exception &) {   // bad_alloc, length_error
    *error = "out of memory allocating " + gib(static_cast<double>(bytes)) + " for " + what;
    return kStateUpdateNoMemory;
  }
  const void *u = p.is_float ? static_cast<const void *>(w.uf.data()) : static_cast<const void *>(w.uq.data());
  s.x = u;
  s.B = static_cast<const char *>(u) + static_cast<size_t>(w.HP) * elem;
  s.C = static_cast<const char *>(u) + static_cast<size_t>(w.HP + w.GN) * elem;
  if (b * L * H * P * N < kSerialBelow || parallel_for == nullptr) parallel_for = serial_for;
  parallel_for(pool, pass_conv, static_cast<size_t>(b * w.blocks), &w);
  if (p.int8_ssm != nullptr) s.h0 = s.h_last = nullptr;   // each task's rows go through its own buffer
  const int rc = ssd_scan_heads(s, parallel_for, pool, p.int8_ssm);
  if (rc != 0) {   // cannot happen for validated params: our bug
    *error = "internal error: the scan of a head failed with code " + std::to_string(rc);
    return kStateUpdateInvalid;
  }
  return 0;
}

int ssd_scan_heads(const MQSSDParams &s, ParallelFor parallel_for, void *pool, const Int8States *int8_ssm) {
  HeadTasks tasks;
  tasks.s = &s;
  tasks.int8_ssm = int8_ssm;
  if (parallel_for == nullptr) parallel_for = serial_for;
  parallel_for(pool, scan_head, static_cast<size_t>(s.batch * s.heads), &tasks);
  return tasks.failed.load();
}

}  // namespace mq_scan
