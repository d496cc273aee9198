// CPU implementation of mq::SelectiveScan (libmq_scan_cpu.so).
//
// Work is split over (batch, block of kBlock channels); each std::thread takes whole blocks. A block
// keeps its state h[n][j] (dstate x kBlock floats, at most 16 KiB) in a local array and walks the
// sequence once; the inner loop runs over the kBlock channels of one state n, so it is one or a few
// SIMD vectors wide and the compiler vectorises the state update including exp2 (the header's
// polynomial). Padding lanes of a partial last block run with dt = 0, x = 0 and stay at zero.
#include <algorithm>
#include <cstring>
#include <exception>
#include <thread>
#include <vector>

#include "mq_selective_scan.h"
#include "scan_common.h"

namespace {

constexpr int kBlock = 16;

void scan_block(const MQScanParams &p, int64_t b, int64_t d0) noexcept {
  using namespace mq_scan;
  const int64_t N = p.dstate;
  const int nd = static_cast<int>(std::min<int64_t>(kBlock, p.dim - d0));
  alignas(64) float h[MQ_SCAN_MAX_DSTATE][kBlock];
  alignas(64) float A2[MQ_SCAN_MAX_DSTATE][kBlock];
  alignas(64) float Dv[kBlock], bias[kBlock], gs[kBlock];
  alignas(64) float xv[kBlock], dt[kBlock], dtx[kBlock], acc[kBlock];
  float Bv[MQ_SCAN_MAX_DSTATE], Cv[MQ_SCAN_MAX_DSTATE];

  for (int64_t n = 0; n < N; ++n)
    for (int j = 0; j < kBlock; ++j) {
      const bool live = j < nd;
      A2[n][j] = live ? p.A[(d0 + j) * N + n] * kLog2e : 0.f;
      h[n][j] = (live && p.h0 != nullptr) ? p.h0[(b * p.dim + d0 + j) * N + n] : 0.f;
    }
  for (int j = 0; j < kBlock; ++j) {
    const bool live = j < nd;
    Dv[j] = (live && p.D != nullptr) ? p.D[d0 + j] : 0.f;
    bias[j] = (live && p.delta_bias != nullptr) ? p.delta_bias[d0 + j] : 0.f;
    gs[j] = (live && p.gate_scale != nullptr) ? p.gate_scale[d0 + j] : 1.f;
  }

  const bool full = nd == kBlock;
  const bool has_z = p.z != nullptr;
  alignas(64) int8_t xq[kBlock] = {}, dq[kBlock] = {}, zq[kBlock] = {};
  alignas(64) float out[kBlock];
  for (int64_t l = 0; l < p.seqlen; ++l) {
    const int64_t xo = b * p.x_batch_stride + l * p.x_l_stride + d0;
    const int64_t bco = b * p.bc_batch_stride + l * p.bc_l_stride;
    // int8 rows into padded local copies, so that every per-channel loop below is a full vector
    if (full) {
      memcpy(xq, p.x + xo, kBlock);
      memcpy(dq, p.delta + xo, kBlock);
      if (has_z) memcpy(zq, p.z + xo, kBlock);
    } else {
      for (int j = 0; j < nd; ++j) {
        xq[j] = p.x[xo + j];
        dq[j] = p.delta[xo + j];
        if (has_z) zq[j] = p.z[xo + j];
      }
    }
    for (int j = 0; j < kBlock; ++j) {   // padding lanes: x = 0, so dtx = 0 and their state stays 0
      xv[j] = dequant(xq[j], p.x_scale);
      dt[j] = discretize(dequant(dq[j], p.delta_scale), bias[j]);
      dtx[j] = dt[j] * xv[j];
      acc[j] = 0.f;
    }
    for (int64_t n = 0; n < N; ++n) {
      Bv[n] = dequant(p.B[bco + n], p.B_scale);
      Cv[n] = dequant(p.C[bco + n], p.C_scale);
    }
    for (int64_t n = 0; n < N; ++n) {
      const float bn = Bv[n], cn = Cv[n];
      float *hn = h[n];
      const float *an = A2[n];
      for (int j = 0; j < kBlock; ++j) {
        hn[j] = state_update(hn[j], dt[j], an[j], dtx[j], bn);
        acc[j] += hn[j] * cn;
      }
    }
    if (has_z)
      for (int j = 0; j < kBlock; ++j) out[j] = finish(acc[j], xv[j], Dv[j], gate(dequant(zq[j], p.z_scale), gs[j]));
    else
      for (int j = 0; j < kBlock; ++j) out[j] = finish(acc[j], xv[j], Dv[j], 1.f);
    const int64_t yo = b * p.y_batch_stride + l * p.y_l_stride + d0;
    if (p.out_fp16) {
      uint16_t *y = static_cast<uint16_t *>(p.y) + yo;
      for (int j = 0; j < nd; ++j) y[j] = float_to_half_bits(out[j]);
    } else {
      memcpy(static_cast<float *>(p.y) + yo, out, sizeof(float) * static_cast<size_t>(nd));
    }
  }

  if (p.h_last != nullptr)
    for (int j = 0; j < nd; ++j)
      for (int64_t n = 0; n < N; ++n) p.h_last[(b * p.dim + d0 + j) * N + n] = h[n][j];
}

// the body of each std::thread: an exception escaping it would call std::terminate, so nothing here throws
void run_items(const MQScanParams &p, int64_t first, int64_t stride, int64_t count, int64_t blocks_per_batch) noexcept {
  for (int64_t i = first; i < count; i += stride) scan_block(p, i / blocks_per_batch, (i % blocks_per_batch) * kBlock);
}

}  // namespace

extern "C" int mq_scan_cpu(const MQScanParams *p, int num_threads) noexcept {
  try {
    const int rc = mq_scan_validate(p);
    if (rc != MQ_SCAN_OK) return rc;
    const int64_t blocks_per_batch = (p->dim + kBlock - 1) / kBlock;
    const int64_t items = p->batch * blocks_per_batch;
    int64_t threads = num_threads > 0 ? num_threads : static_cast<int64_t>(std::thread::hardware_concurrency());
    threads = std::max<int64_t>(1, std::min<int64_t>(threads, items));
    // Starting a thread costs ~10-50 us: not worth it for a decode step of a small layer.
    if (p->batch * p->seqlen * p->dim * p->dstate < (int64_t{1} << 16)) threads = 1;
    if (threads == 1) {
      run_items(*p, 0, 1, items, blocks_per_batch);
      return MQ_SCAN_OK;
    }
    std::vector<std::thread> pool;
    pool.reserve(static_cast<size_t>(threads - 1));
    std::exception_ptr failure;
    try {
      for (int64_t t = 1; t < threads; ++t)
        pool.emplace_back(run_items, std::cref(*p), t, threads, items, blocks_per_batch);
    } catch (...) {
      failure = std::current_exception();   // fewer threads started; join those before reporting
    }
    if (!failure) run_items(*p, 0, threads, items, blocks_per_batch);
    for (auto &th : pool) th.join();
    if (failure) std::rethrow_exception(failure);
    return MQ_SCAN_OK;
  } catch (const std::exception &e) {
    return mq_scan::set_error(MQ_SCAN_ERR_INTERNAL, "mq_scan_cpu failed: %s", e.what());
  } catch (...) {
    return mq_scan::set_error(MQ_SCAN_ERR_INTERNAL, "mq_scan_cpu failed with an unknown exception");
  }
}
