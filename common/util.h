/* Small helpers shared by every folder: clocks and one-line messages.
 * Header-only, libc only. */
#pragma once

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <time.h>

#define USEC_PER_SEC UINT64_C(1000000)

/* Microseconds on clock (CLOCK_MONOTONIC for deadlines, CLOCK_REALTIME for
 * what is shown to people). */
static inline uint64_t now_usec(clockid_t clock) {
        struct timespec ts;

        (void) clock_gettime(clock, &ts);
        return (uint64_t) ts.tv_sec * USEC_PER_SEC + (uint64_t) ts.tv_nsec / 1000;
}

/* Write a one-line message into err; truncation is acceptable (it is a
 * message). err may be NULL. */
static inline void __attribute__((format(printf, 3, 4)))
errorf(char *err, size_t err_size, const char *fmt, ...) {
        va_list ap;

        if (!err || err_size == 0)
                return;
        va_start(ap, fmt);
        (void) vsnprintf(err, err_size, fmt, ap);
        va_end(ap);
}
