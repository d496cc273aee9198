// Internal helpers of both libraries (not installed).
#pragma once

#include <cstdarg>

#include "mq_selective_scan.h"

namespace mq_scan {
// Formats the thread-local message and returns code.
int set_error(int code, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;
void clear_error();
}  // namespace mq_scan
