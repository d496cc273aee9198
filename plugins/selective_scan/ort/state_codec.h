// int8 decode states inside the fused step ops (mq::SelectiveStateUpdateInt8State, mq::SSDStateUpdateInt8State):
// the rounding rule of `export --decode-step --state-dtype int8`, written a third time beside its PyTorch and
// ONNX forms (mq_deploy/models/state_codec.py, whose doc is the contract), and bit-exact with the ONNX one:
//
//   rows (the SSM state, a float16 scale per row of its last axis):
//     s16 = float16(min(amax(|h|) / 127 * (1 + 2^-10) + 2^-24, 65504))   each step rounded to float32, in
//                                                                         this order; float16 round to nearest even
//     q = saturate_int8(round_half_even(h / float(s16))),   h' = float(q) * float(s16)
//   grid (the conv state, on its conv1d quant point's static scale s):
//     q = saturate_int8(round_half_even(v / s)),            v' = float(q) * s
//
// The ops decode their layer of the stacked int8 states into float scratch, run the float update, and encode
// what it wrote (state_update.cpp / ssd_update.cpp, through run_int8_state below).
#ifndef MQ_STATE_CODEC_H_
#define MQ_STATE_CODEC_H_

#include <cstddef>
#include <cstdint>

#include "mq_selective_scan.h"   // MQ_SCAN_API
#include "state_update.h"        // ParallelFor

namespace mq_scan {

uint16_t half_from_float(float v) noexcept;   // IEEE binary16, round to nearest even (ONNX Cast)
float float_from_half(uint16_t h) noexcept;   // exact

// rows of n values: the AVX-512 form where it is compiled in, and the plain loops (_ref) with the same result
void rows_decode(const int8_t *q, const uint16_t *scale, int64_t rows, int64_t n, float *h) noexcept;
void rows_encode(const float *h, int64_t rows, int64_t n, int8_t *q, uint16_t *scale) noexcept;
void rows_decode_ref(const int8_t *q, const uint16_t *scale, int64_t rows, int64_t n, float *h) noexcept;
void rows_encode_ref(const float *h, int64_t rows, int64_t n, int8_t *q, uint16_t *scale) noexcept;
void grid_decode(const int8_t *q, int64_t count, float scale, float *v) noexcept;
void grid_encode(const float *v, int64_t count, float scale, int8_t *q) noexcept;

/* One layer's int8 states of a fused step op around its float update: `rows` rows of `n` values of the SSM
 * state (row scales beside them) and `conv` values of the conv state (on `conv_scale`), for `batch` sequences
 * (rows and conv are per sequence). decode() fills the float inputs, encode() writes the int8 outputs from the
 * float outputs; both split the batch into tasks on parallel_for. */
struct Int8States {
  int64_t batch, rows, n, conv;
  float conv_scale;
  const int8_t *conv_q, *ssm_q;          // [batch, conv], [batch, rows, n]
  const uint16_t *ssm_scale;             // [batch, rows]
  int8_t *conv_q_out, *ssm_q_out;
  uint16_t *ssm_scale_out;
  float *conv_f, *ssm_f, *conv_f_out, *ssm_f_out;   // float scratch of the same shapes
};
constexpr int64_t kCodecParallelFrom = int64_t{1} << 15;   // SSM state values of a call: from here on the pool
void int8_states_decode(Int8States &s, ParallelFor parallel_for, void *pool) noexcept;
void int8_states_encode(Int8States &s, ParallelFor parallel_for, void *pool) noexcept;

}  // namespace mq_scan

// The codec alone, for its tests (tests/test_state_codec_native.py through ctypes): the library's only exports
// besides RegisterCustomOps. rows_encode / rows_decode (and their _ref loops) over `rows` rows of `n`; halves as
// uint16 bits.
extern "C" {
MQ_SCAN_API void mq_state_rows_encode(const float *h, int64_t rows, int64_t n, int8_t *q, uint16_t *scale) noexcept;
MQ_SCAN_API void mq_state_rows_decode(const int8_t *q, const uint16_t *scale, int64_t rows, int64_t n,
                                      float *h) noexcept;
MQ_SCAN_API void mq_state_rows_encode_ref(const float *h, int64_t rows, int64_t n, int8_t *q, uint16_t *scale) noexcept;
MQ_SCAN_API void mq_state_rows_decode_ref(const int8_t *q, const uint16_t *scale, int64_t rows, int64_t n,
                                          float *h) noexcept;
MQ_SCAN_API void mq_state_grid_encode(const float *v, int64_t count, float scale, int8_t *q) noexcept;
MQ_SCAN_API void mq_half_from_float(const float *v, int64_t count, uint16_t *h) noexcept;
MQ_SCAN_API void mq_float_from_half(const uint16_t *h, int64_t count, float *v) noexcept;
}

#endif  // MQ_STATE_CODEC_H_
