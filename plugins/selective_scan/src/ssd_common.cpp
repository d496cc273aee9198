// mq::SSDScan validation and stride helpers, shared by the CPU and CUDA libraries.
#include <cmath>

#include "mq_ssd.h"
#include "scan_common.h"

namespace {

bool finite_positive(float s) { return s > 0.f && std::isfinite(s); }

/* scales of an int8 input: the per-tensor one, or every per-channel value (host-readable only) */
int check_scales(const char *name, float scale, const float *scales, int64_t n, bool host_readable) {
  if (scales == nullptr) {
    if (!finite_positive(scale))
      return mq_scan::set_error(MQ_SCAN_ERR_INVALID, "%s_scale must be finite and > 0, got %g", name, (double)scale);
    return MQ_SCAN_OK;
  }
  if (host_readable)
    for (int64_t i = 0; i < n; ++i)
      if (!finite_positive(scales[i]))
        return mq_scan::set_error(MQ_SCAN_ERR_INVALID, "%s_scale[%lld] must be finite and > 0, got %g", name,
                                  (long long)i, (double)scales[i]);
  return MQ_SCAN_OK;
}

}  // namespace

namespace mq_scan {

/* mq_ssd_validate without reading the per-channel scales (device memory in the CUDA library) */
int ssd_validate(const MQSSDParams *p, bool host_scales) {
  clear_error();
  if (p == nullptr) return set_error(MQ_SCAN_ERR_INVALID, "params pointer is NULL");
  if (p->batch <= 0 || p->seqlen <= 0 || p->heads <= 0 || p->head_dim <= 0 || p->groups <= 0 || p->dstate <= 0)
    return set_error(MQ_SCAN_ERR_INVALID,
                     "sizes must be > 0, got batch=%lld seqlen=%lld heads=%lld head_dim=%lld groups=%lld dstate=%lld",
                     (long long)p->batch, (long long)p->seqlen, (long long)p->heads, (long long)p->head_dim,
                     (long long)p->groups, (long long)p->dstate);
  if (p->heads % p->groups != 0)
    return set_error(MQ_SCAN_ERR_INVALID, "heads=%lld is not a multiple of groups=%lld", (long long)p->heads,
                     (long long)p->groups);
  if (p->dstate > MQ_SSD_MAX_DSTATE)
    return set_error(MQ_SCAN_ERR_INVALID, "dstate=%lld exceeds the supported maximum %d", (long long)p->dstate,
                     MQ_SSD_MAX_DSTATE);
  if (p->in_float != 0 && p->in_float != 1)
    return set_error(MQ_SCAN_ERR_INVALID, "in_float must be 0 or 1, got %d", (int)p->in_float);
  const struct {
    const void *ptr;
    const char *name;
  } required[] = {{p->x, "x"}, {p->dt, "dt"}, {p->B, "B"}, {p->C, "C"}, {p->A, "A"}, {p->y, "y"}};
  for (const auto &r : required)
    if (r.ptr == nullptr) return set_error(MQ_SCAN_ERR_INVALID, "required pointer %s is NULL", r.name);
  const int64_t HP = p->heads * p->head_dim, GN = p->groups * p->dstate, L = p->seqlen;
  if (p->x_l_stride < HP || p->y_l_stride < HP || p->dt_l_stride < p->heads || p->bc_l_stride < GN)
    return set_error(MQ_SCAN_ERR_INVALID,
                     "l strides must be >= the row length (x %lld, y %lld vs heads*head_dim %lld; dt %lld vs heads "
                     "%lld; B/C %lld vs groups*dstate %lld); call mq_ssd_set_contiguous_strides for contiguous tensors",
                     (long long)p->x_l_stride, (long long)p->y_l_stride, (long long)HP, (long long)p->dt_l_stride,
                     (long long)p->heads, (long long)p->bc_l_stride, (long long)GN);
  if (p->batch > 1 && (p->x_batch_stride < p->x_l_stride * (L - 1) + HP ||
                       p->y_batch_stride < p->y_l_stride * (L - 1) + HP ||
                       p->dt_batch_stride < p->dt_l_stride * (L - 1) + p->heads ||
                       p->bc_batch_stride < p->bc_l_stride * (L - 1) + GN))
    return set_error(MQ_SCAN_ERR_INVALID, "batch strides overlap the rows of the previous batch");
  if (!p->in_float) {
    int rc;
    if ((rc = check_scales("x", p->x_scale, p->x_scales, HP, host_scales)) ||
        (rc = check_scales("dt", p->dt_scale, p->dt_scales, p->heads, host_scales)) ||
        (rc = check_scales("B", p->B_scale, p->B_scales, GN, host_scales)) ||
        (rc = check_scales("C", p->C_scale, p->C_scales, GN, host_scales)))
      return rc;
  }
  if (!(std::isfinite(p->dt_min) && p->dt_min >= 0.f))
    return set_error(MQ_SCAN_ERR_INVALID, "dt_min must be finite and >= 0, got %g", (double)p->dt_min);
  if (!(p->dt_max > 0.f))   // also NaN; +inf is no limit
    return set_error(MQ_SCAN_ERR_INVALID, "dt_max must be > 0 (inf: no limit), got %g", (double)p->dt_max);
  return MQ_SCAN_OK;
}

}  // namespace mq_scan

extern "C" {

void mq_ssd_set_contiguous_strides(MQSSDParams *p) noexcept {
  if (p == nullptr) return;
  const int64_t HP = p->heads * p->head_dim, GN = p->groups * p->dstate;
  p->x_l_stride = p->y_l_stride = HP;
  p->x_batch_stride = p->y_batch_stride = p->seqlen * HP;
  p->dt_l_stride = p->heads;
  p->dt_batch_stride = p->seqlen * p->heads;
  p->bc_l_stride = GN;
  p->bc_batch_stride = p->seqlen * GN;
}

int mq_ssd_validate(const MQSSDParams *p) noexcept {
  try {
    return mq_scan::ssd_validate(p, true);
  } catch (...) {
    return mq_scan::set_error(MQ_SCAN_ERR_INTERNAL, "mq_ssd_validate: unexpected exception");
  }
}

}  // extern "C"
