// mq::SelectiveScanFloat kernel: scan_cpu.cpp's block loop with float inputs (no dequantisation).
// Same layout of work: a block of kBlock channels keeps its state h[n][j] in a local array and walks the
// sequence once; the inner loop over the block's channels vectorises, exp2 included.
#include "scan_float.h"

#include <algorithm>
#include <cstring>

#include "mq_selective_scan.h"

namespace mq_scan {
namespace {

constexpr int kBlock = 16;

void scan_block(const FloatScanParams &p, int64_t b, int64_t d0, int nd) noexcept {
  const int64_t N = p.dstate, Dm = p.dim;
  alignas(64) float h[MQ_SCAN_MAX_DSTATE][kBlock];
  alignas(64) float A2[MQ_SCAN_MAX_DSTATE][kBlock];
  alignas(64) float Dv[kBlock], bias[kBlock], gs[kBlock];
  alignas(64) float xv[kBlock], dv[kBlock], zv[kBlock], dt[kBlock], dtx[kBlock], acc[kBlock], out[kBlock];

  for (int64_t n = 0; n < N; ++n)
    for (int j = 0; j < kBlock; ++j) {
      const bool live = j < nd;
      A2[n][j] = live ? p.A[(d0 + j) * N + n] * kLog2e : 0.f;
      h[n][j] = live ? p.h0[(b * Dm + d0 + j) * N + n] : 0.f;
    }
  for (int j = 0; j < kBlock; ++j) {
    const bool live = j < nd;
    Dv[j] = live ? p.D[d0 + j] : 0.f;
    bias[j] = live ? p.delta_bias[d0 + j] : 0.f;
    gs[j] = live ? p.gate_scale[d0 + j] : 1.f;
    xv[j] = dv[j] = zv[j] = 0.f;   // padding lanes: x = 0, so dtx = 0 and their state stays 0
  }
  const size_t row = sizeof(float) * static_cast<size_t>(nd);
  for (int64_t l = 0; l < p.seqlen; ++l) {
    const int64_t xo = (b * p.seqlen + l) * Dm + d0;
    const int64_t bco = (b * p.seqlen + l) * N;
    std::memcpy(xv, p.x + xo, row);
    std::memcpy(dv, p.delta + xo, row);
    std::memcpy(zv, p.z + xo, row);
    for (int j = 0; j < kBlock; ++j) {
      dt[j] = discretize(dv[j], bias[j]);
      dtx[j] = dt[j] * xv[j];
      acc[j] = 0.f;
    }
    const float *Bv = p.B + bco, *Cv = p.C + bco;
    for (int64_t n = 0; n < N; ++n) {
      const float bn = Bv[n], cn = Cv[n];
      float *hn = h[n];
      const float *an = A2[n];
      for (int j = 0; j < kBlock; ++j) {
        hn[j] = state_update(hn[j], dt[j], an[j], dtx[j], bn);
        acc[j] += hn[j] * cn;
      }
    }
    for (int j = 0; j < kBlock; ++j) out[j] = finish(acc[j], xv[j], Dv[j], gate(zv[j], gs[j]));
    std::memcpy(p.y + xo, out, row);
  }
  for (int j = 0; j < nd; ++j)
    for (int64_t n = 0; n < N; ++n) p.h_last[(b * Dm + d0 + j) * N + n] = h[n][j];
}

}  // namespace

void scan_float_slice(const FloatScanParams &p, int64_t b, int64_t d0, int64_t nd) noexcept {
  for (int64_t d = d0; d < d0 + nd; d += kBlock)
    scan_block(p, b, d, static_cast<int>(std::min<int64_t>(kBlock, d0 + nd - d)));
}

}  // namespace mq_scan
