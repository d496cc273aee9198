// The int8 linear of the decode-step graph's mq::QLinear and mq::DynamicQLinear (contracts:
// mq_deploy/export/qlinear_op.py): y[m, n] = (sum_k (u[m, k] - offset) * w[k, n]) * (x_scale * w_scale[n]),
// with u the activation codes as uint8 (static int8 codes + 128, or DynamicQuantizeLinear's uint8 codes and
// offset its zero point) and w int8 [K, N] repacked once per kernel, so that one 64-byte load holds four
// consecutive k of sixteen output channels: the operand layout of AVX-512 VNNI's vpdpbusd (u8 x s8 -> s32).
//
// qlinear_block is the fast path (AVX-512 VNNI when compiled in, else the plain loop); qlinear_block_ref is the
// plain loop with the same signature, its reference: both give the same int32 sums, so the same floats.
#ifndef MQ_QLINEAR_H_
#define MQ_QLINEAR_H_

#include <cstddef>
#include <cstdint>
#include <vector>

namespace mq_scan {

constexpr int64_t kQTile = 16;   // output channels per packed tile (one 512-bit vector of int32 sums)

struct PackedInt8 {
  int64_t K = 0, N = 0, K4 = 0, tiles = 0;   // K4 = ceil(K / 4); tiles = ceil(N / 16)
  std::vector<int8_t> data;                  // [tiles][K4][16][4], zero-padded past K and N (+64 bytes slack)
  std::vector<int32_t> colsum;               // [tiles * 16]: sum_k w[k, n] (0 past N)
  const int8_t *tile(int64_t t) const;       // 64-byte aligned start of tile t
};

/* w int8 [K, N] row-major (ONNX MatMul's B) -> the packed form */
void qlinear_pack(const int8_t *w, int64_t K, int64_t N, PackedInt8 *out);

/* QuantizeLinear to int8 with zero point 0 (round half to even of x / scale, saturated), stored + 128 as uint8:
 * rows [m0, m1) of x [M, K] into u [M, ldu] (ldu >= 4 * K4; the padding past K holds 128, code 0) */
void qlinear_quantize_static(const float *x, int64_t K, int64_t m0, int64_t m1, float scale, uint8_t *u,
                             int64_t ldu);

/* ONNX DynamicQuantizeLinear's scale and zero point of n values (uint8, asymmetric, over the whole tensor) */
void qlinear_dynamic_params(const float *x, int64_t n, float *scale, int32_t *zero_point);
/* its codes: saturate(round(x / scale) + zero_point) to [0, 255], rows [m0, m1); padding past K = zero_point */
void qlinear_quantize_dynamic(const float *x, int64_t K, int64_t m0, int64_t m1, float scale, int32_t zero_point,
                              uint8_t *u, int64_t ldu);

/* Rows [m0, m1) and output channels [n0, n1) (n0 a multiple of 16) of y [M, N]:
 * y[m, n] = float(sum_k u[m, k] w[k, n] - offset * colsum[n]) * (x_scale * w_scale[n]) */
void qlinear_block(const PackedInt8 &w, const uint8_t *u, int64_t ldu, int64_t m0, int64_t m1, int64_t n0, int64_t n1,
                   int32_t offset, float x_scale, const float *w_scale, float *y);
void qlinear_block_ref(const PackedInt8 &w, const uint8_t *u, int64_t ldu, int64_t m0, int64_t m1, int64_t n0,
                       int64_t n1, int32_t offset, float x_scale, const float *w_scale, float *y);

/* true when qlinear_block runs AVX-512 VNNI here (compiled in, and this CPU has it); the op is registered only
 * then: elsewhere ONNX Runtime runs the op's function body, its own int8 kernels */
bool qlinear_fast();

}  // namespace mq_scan

#endif  // MQ_QLINEAR_H_
