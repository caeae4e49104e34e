/* Small helpers shared by every folder: clocks, writes, messages, strings.
 * Header-only, libc only. */
#pragma once

#include <errno.h>
#include <stdarg.h>
#include <stdbool.h>
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

/* usec (CLOCK_REALTIME) as "2024-05-01T12:00:00Z" into buf; "" for 0 or
 * what cannot be formatted. */
static inline void format_utc(uint64_t usec, char *buf, size_t size) {
        time_t t = (time_t) (usec / USEC_PER_SEC);
        struct tm tm;

        if (usec == 0 || !gmtime_r(&t, &tm) || strftime(buf, size, "%Y-%m-%dT%H:%M:%SZ", &tm) == 0)
                snprintf(buf, size, "%s", "");
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

/* The length of the well-formed UTF-8 sequence at s (1 to 4; RFC 3629: no
 * overlong forms, no surrogates, at most U+10FFFF), or 0 when s does not
 * start one (an empty string included). */
static inline size_t utf8_char_len(const char *s) {
        const unsigned char *u = (const unsigned char *) s;
        uint32_t cp;
        size_t n;

        if (u[0] == 0)
                return 0;
        if (u[0] < 0x80)
                return 1;
        if (u[0] >= 0xc2 && u[0] <= 0xdf)
                n = 2, cp = u[0] & 0x1f;
        else if (u[0] >= 0xe0 && u[0] <= 0xef)
                n = 3, cp = u[0] & 0x0f;
        else if (u[0] >= 0xf0 && u[0] <= 0xf4)
                n = 4, cp = u[0] & 0x07;
        else
                return 0;
        for (size_t i = 1; i < n; i++) {
                if ((u[i] & 0xc0) != 0x80)
                        return 0;
                cp = cp << 6 | (u[i] & 0x3f);
        }
        if ((n == 3 && cp < 0x800) || (n == 4 && (cp < 0x10000 || cp > 0x10ffff)) ||
            (cp >= 0xd800 && cp <= 0xdfff))
                return 0;
        return n;
}

/* Whether the NUL-terminated s is well-formed UTF-8 throughout. */
static inline bool utf8_valid(const char *s) {
        for (size_t n; *s; s += n)
                if ((n = utf8_char_len(s)) == 0)
                        return false;
        return true;
}

/* s as a JSON string (RFC 8259), quoted: quotes, backslashes and control
 * characters escaped, and a byte that does not begin well-formed UTF-8
 * written as U+FFFD, so the output stays valid whatever s holds. */
static inline void json_string(FILE *f, const char *s) {
        fputc('"', f);
        for (size_t n; *s; s += n) {
                unsigned char ch = (unsigned char) *s;

                n = utf8_char_len(s);
                if (n == 0) {
                        fputs("\\ufffd", f);
                        n = 1;
                } else if (ch == '"' || ch == '\\')
                        fprintf(f, "\\%c", ch);
                else if (ch < 0x20 || ch == 0x7f)
                        fprintf(f, "\\u%04x", ch);
                else
                        fwrite(s, 1, n, f);
        }
        fputc('"', f);
}
