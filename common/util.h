/* Small helpers shared by every folder: clocks, writes, messages, strings.
 * Header-only, libc only. */
#pragma once

#include <errno.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define USEC_PER_MSEC UINT64_C(1000)
#define USEC_PER_SEC UINT64_C(1000000)
#define USEC_PER_MIN (60 * USEC_PER_SEC)
#define USEC_PER_HOUR (60 * USEC_PER_MIN)
#define USEC_PER_DAY (24 * USEC_PER_HOUR)

/* Microseconds on clock (CLOCK_MONOTONIC for deadlines, CLOCK_REALTIME for
 * what is shown to people). */
static inline uint64_t now_usec(clockid_t clock) {
        struct timespec ts;

        (void) clock_gettime(clock, &ts);
        return (uint64_t) ts.tv_sec * USEC_PER_SEC + (uint64_t) ts.tv_nsec / 1000;
}

/* Write all n bytes to fd (a blocking fd: retries EINTR and short writes).
 * Returns 0 or a negative errno. */
static inline int write_all(int fd, const void *buf, size_t n) {
        const uint8_t *p = buf;

        while (n > 0) {
                ssize_t k = write(fd, p, n);

                if (k < 0) {
                        if (errno == EINTR)
                                continue;
                        return -errno;
                }
                p += k;
                n -= (size_t) k;
        }
        return 0;
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

/* Append to the NUL-terminated string in buf (size bytes). Returns 0, or
 * -ENOBUFS when it did not fit (buf then holds what fitted). */
static inline int __attribute__((format(printf, 3, 4)))
strappendf(char *buf, size_t size, const char *fmt, ...) {
        size_t n = strnlen(buf, size);
        va_list ap;
        int k;

        if (n + 1 >= size)
                return -ENOBUFS;
        va_start(ap, fmt);
        k = vsnprintf(buf + n, size - n, fmt, ap);
        va_end(ap);
        return k < 0 || (size_t) k >= size - n ? -ENOBUFS : 0;
}

/* Lowercase hex of n bytes into out (2n + 1 bytes with the NUL). Returns 0
 * or -ENOBUFS (out is then ""). */
static inline int hex_encode(const void *p, size_t n, char *out, size_t size) {
        static const char digits[] = "0123456789abcdef";
        const uint8_t *b = p;

        if (size < 2 * n + 1) {
                if (size > 0)
                        out[0] = '\0';
                return -ENOBUFS;
        }
        for (size_t i = 0; i < n; i++) {
                out[2 * i] = digits[b[i] >> 4];
                out[2 * i + 1] = digits[b[i] & 15];
        }
        out[2 * n] = '\0';
        return 0;
}

/* s as a JSON string, quoted, with what JSON requires escaped (quote,
 * backslash, control characters); other bytes pass as they are. */
static inline void json_string(FILE *f, const char *s) {
        fputc('"', f);
        for (; *s; s++) {
                unsigned char ch = (unsigned char) *s;
                if (ch == '"' || ch == '\\')
                        fprintf(f, "\\%c", ch);
                else if (ch < 0x20)
                        fprintf(f, "\\u%04x", ch);
                else
                        fputc(ch, f);
        }
        fputc('"', f);
}
