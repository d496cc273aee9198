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
// what it wrote (Int8States below: the SSM state's rows by the update's own tasks, state_update.cpp and
// ssd_update.cpp).
#ifndef MQ_STATE_CODEC_H_
#define MQ_STATE_CODEC_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>

#include "mq_selective_scan.h"   // MQ_SCAN_API

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
 * state per sequence (row scales beside them) and `conv` values of the conv state per sequence (on
 * `conv_scale`), for `batch` sequences, with float scratch of the same shapes. The conv state is small and is
 * converted whole (conv_decode / conv_encode); the SSM state row range by row range, by the update's own tasks
 * around their scan (rows_in / rows_out: global rows [row0, row0 + count) of [batch * rows]), so that each
 * task's rows go from int8 to float and back while they are in its cache. */
struct Int8States {
  int64_t batch, rows, n, conv;
  float conv_scale;
  const int8_t *conv_q, *ssm_q;          // [batch, conv], [batch, rows, n]
  const uint16_t *ssm_scale;             // [batch, rows]
  int8_t *conv_q_out, *ssm_q_out;
  uint16_t *ssm_scale_out;
  float *conv_f, *ssm_f, *conv_f_out, *ssm_f_out;   // float scratch of the same shapes (ssm_f*: Mamba1's)

  void conv_decode() const noexcept { grid_decode(conv_q, batch * conv, conv_scale, conv_f); }
  void conv_encode() const noexcept { grid_encode(conv_f_out, batch * conv, conv_scale, conv_q_out); }
  void rows_in(int64_t row0, int64_t count) const noexcept { rows_in(row0, count, ssm_f + row0 * n); }
  void rows_out(int64_t row0, int64_t count) const noexcept { rows_out(row0, count, ssm_f_out + row0 * n); }
  // the same through a caller's buffer of count * n floats (a task's own, kept in its cache)
  void rows_in(int64_t row0, int64_t count, float *to) const noexcept {
    rows_decode(ssm_q + row0 * n, ssm_scale + row0, count, n, to);
  }
  void rows_out(int64_t row0, int64_t count, const float *from) const noexcept {
    rows_encode(from, count, n, ssm_q_out + row0 * n, ssm_scale_out + row0);
  }
};

/* The float scratch of an int8-state op, kept by its kernel between calls: a fresh allocation past glibc's mmap
 * threshold (32 MiB at most) is mapped anew and faulted in page by page at every call (measured: a Mamba2-2.7b
 * layer at batch 8 took 12x its float32-state time that way). One call at a time uses it; a concurrent call
 * (another Run of the session) gets a buffer of its own. */
class ScratchCache {
 public:
  /* n floats: the kept buffer (grown if needed) while `lock` holds it, else a new one owned by `own` */
  float *get(size_t n, std::unique_lock<std::mutex> *lock, std::unique_ptr<float[]> *own) {
    std::unique_lock<std::mutex> l(mu_, std::try_to_lock);
    if (!l.owns_lock()) {
      own->reset(new float[n]);
      return own->get();
    }
    if (cap_ < n) {
      buf_.reset();
      buf_.reset(new float[n]);
      cap_ = n;
    }
    *lock = std::move(l);
    return buf_.get();
  }

 private:
  std::mutex mu_;
  std::unique_ptr<float[]> buf_;
  size_t cap_ = 0;
};

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
