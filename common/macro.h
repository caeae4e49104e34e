/* Helpers shared by every folder: scoped cleanup and wiping of secrets.
 * Header-only, no dependencies beyond libc. */
#pragma once

#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define _cleanup_(f) __attribute__((cleanup(f)))

#define ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))

/* AES-256: a KEK, the cache key, KMIP key material, the TPM-sealed secret. */
#define AES256_KEY_SIZE 32

/* Define a function usable with _cleanup_ for a pointer type whose destructor
 * is fn(ptr). The destructor is never called with NULL. */
#define DEFINE_TRIVIAL_CLEANUP_FUNC(type, fn)                                  \
        static inline void fn##p(type *p) {                                    \
                if (*p)                                                        \
                        fn(*p);                                                \
        }

static inline void freep(void *p) {
        free(*(void **) p);
}
#define _cleanup_free_ _cleanup_(freep)

static inline void closep(int *fd) {
        if (*fd >= 0)
                close(*fd);
}
#define _cleanup_close_ _cleanup_(closep)

static inline void fclosep(FILE **f) {
        if (*f)
                fclose(*f);
}
#define _cleanup_fclose_ _cleanup_(fclosep)

/* Take ownership out of a _cleanup_ variable. */
#define TAKE_PTR(p)                                                            \
        ({                                                                     \
                __typeof__(p) _tp = (p);                                       \
                (p) = NULL;                                                    \
                _tp;                                                           \
        })
#define TAKE_FD(fd)                                                            \
        ({                                                                     \
                int _tf = (fd);                                                \
                (fd) = -1;                                                     \
                _tf;                                                           \
        })

/* A key on the stack (a KEK, the cache key), wiped when it goes out of scope
 * on every path:  _cleanup_erase_key_ uint8_t key[AES256_KEY_SIZE]; */
static inline void erase_keyp(unsigned char (*p)[AES256_KEY_SIZE]) {
        explicit_bzero(*p, sizeof(*p));
}
#define _cleanup_erase_key_ _cleanup_(erase_keyp)

/* Wipe then free a heap buffer of known size. Accepts NULL. */
static inline void erase_and_free(void *p, size_t n) {
        if (!p)
                return;
        explicit_bzero(p, n);
        free(p);
}

/* Constant-time comparison of two equal-length byte strings: 0 if equal. */
static inline int memcmp_ct(const void *a, const void *b, size_t n) {
        const volatile unsigned char *x = a, *y = b;
        unsigned char d = 0;
        for (size_t i = 0; i < n; i++)
                d |= x[i] ^ y[i];
        return d != 0;
}
