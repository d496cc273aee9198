// Internal helpers of both libraries (not installed).
#pragma once

#include <cstdarg>

#include "mq_selective_scan.h"
#include "mq_ssd.h"

namespace mq_scan {
// Formats the thread-local message and returns code.
int set_error(int code, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;
void clear_error();
// mq_ssd_validate; host_scales false: the per-channel scales are device memory, not read (ssd_common.cpp)
int ssd_validate(const MQSSDParams *p, bool host_scales);
}  // namespace mq_scan
