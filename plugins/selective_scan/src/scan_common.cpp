// Validation, error reporting and stride helpers shared by the CPU and CUDA libraries.
#include "scan_common.h"

#include <cstdio>
#include <string>

namespace {
thread_local std::string g_last_error;
}

namespace mq_scan {

int set_error(int code, const char *fmt, ...) {
  char buf[512];
  va_list ap;
  va_start(ap, fmt);
  std::vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  try {
    g_last_error = buf;
  } catch (...) {
  }
  return code;
}

void clear_error() { g_last_error.clear(); }

}  // namespace mq_scan

extern "C" {

void mq_scan_set_contiguous_strides(MQScanParams *p) noexcept {
  if (p == nullptr) return;
  p->x_l_stride = p->dim;
  p->x_batch_stride = p->seqlen * p->dim;
  p->bc_l_stride = p->dstate;
  p->bc_batch_stride = p->seqlen * p->dstate;
  p->y_l_stride = p->dim;
  p->y_batch_stride = p->seqlen * p->dim;
}

int mq_scan_validate(const MQScanParams *p) noexcept {
  using mq_scan::set_error;
  mq_scan::clear_error();
  if (p == nullptr) return set_error(MQ_SCAN_ERR_INVALID, "params pointer is NULL");
  if (p->batch <= 0 || p->seqlen <= 0 || p->dim <= 0 || p->dstate <= 0)
    return set_error(MQ_SCAN_ERR_INVALID, "sizes must be > 0, got batch=%lld seqlen=%lld dim=%lld dstate=%lld",
                     (long long)p->batch, (long long)p->seqlen, (long long)p->dim, (long long)p->dstate);
  if (p->dstate > MQ_SCAN_MAX_DSTATE)
    return set_error(MQ_SCAN_ERR_INVALID, "dstate=%lld exceeds the supported maximum %d", (long long)p->dstate,
                     MQ_SCAN_MAX_DSTATE);
  const struct {
    const void *ptr;
    const char *name;
  } required[] = {{p->x, "x"}, {p->delta, "delta"}, {p->B, "B"}, {p->C, "C"}, {p->A, "A"}, {p->y, "y"}};
  for (const auto &r : required)
    if (r.ptr == nullptr) return set_error(MQ_SCAN_ERR_INVALID, "required pointer %s is NULL", r.name);
  if (p->out_fp16 != 0 && p->out_fp16 != 1)
    return set_error(MQ_SCAN_ERR_INVALID, "out_fp16 must be 0 or 1, got %d", (int)p->out_fp16);
  // Rows must not overlap: a row of dim (dstate) elements per l, a block of rows per batch.
  if (p->x_l_stride < p->dim || p->y_l_stride < p->dim || p->bc_l_stride < p->dstate)
    return set_error(MQ_SCAN_ERR_INVALID,
                     "l strides must be >= the row length (x_l_stride=%lld y_l_stride=%lld vs dim=%lld, "
                     "bc_l_stride=%lld vs dstate=%lld); call mq_scan_set_contiguous_strides for contiguous tensors",
                     (long long)p->x_l_stride, (long long)p->y_l_stride, (long long)p->dim,
                     (long long)p->bc_l_stride, (long long)p->dstate);
  if (p->batch > 1 && (p->x_batch_stride < p->x_l_stride * (p->seqlen - 1) + p->dim ||
                       p->y_batch_stride < p->y_l_stride * (p->seqlen - 1) + p->dim ||
                       p->bc_batch_stride < p->bc_l_stride * (p->seqlen - 1) + p->dstate))
    return set_error(MQ_SCAN_ERR_INVALID, "batch strides overlap the rows of the previous batch");
  const float scales[] = {p->x_scale, p->delta_scale, p->B_scale, p->C_scale};
  for (float s : scales)
    if (!(s == s) || s == INFINITY || s == -INFINITY)
      return set_error(MQ_SCAN_ERR_INVALID, "scales must be finite");
  if (p->z != nullptr && (!(p->z_scale == p->z_scale) || p->z_scale == INFINITY || p->z_scale == -INFINITY))
    return set_error(MQ_SCAN_ERR_INVALID, "z_scale must be finite when z is given");
  return MQ_SCAN_OK;
}

const char *mq_scan_last_error(void) noexcept { return g_last_error.c_str(); }

const char *mq_scan_version(void) noexcept { return MQ_SCAN_VERSION; }

}  // extern "C"
