/* The control socket (root only): one command line in, one reply out.
 *
 *   request:  "<command> [arg...]\n"            (at most CONTROL_LINE_MAX bytes)
 *   reply:    "OK\n" or "ERR <message>\n", then the command's output; EOF ends it.
 *
 * The daemon side runs on sd-event and answers from a handler; tpmkmsctl uses
 * control_call. */
#pragma once

#include <stdint.h>
#include <stdio.h>

#include "util.h"

typedef struct sd_event sd_event;

#define CONTROL_LINE_MAX 256
#define CONTROL_ARGS_MAX 8
#define CONTROL_TIMEOUT_USEC (30u * USEC_PER_SEC)

struct control_conn;

/* Split a request line (NUL-terminated, without its newline) in place into
 * blank-separated arguments, each well-formed UTF-8. Returns argc (>= 1),
 * or -E2BIG (more than CONTROL_ARGS_MAX) / -EINVAL (empty, not UTF-8) with a
 * message in err. */
int control_parse_line(char *line, char *argv[CONTROL_ARGS_MAX + 1], char *err, size_t err_size);

/* Run one command. argv[0] is the command. Writes output to out. Returns 0,
 * or a negative errno with a message in err, or CONTROL_DEFERRED after taking
 * conn to answer later with control_conn_reply (e.g. when a sync ends). */
#define CONTROL_DEFERRED 1
typedef int (*control_handler_t)(void *userdata, struct control_conn *conn, int argc, char **argv,
                                 FILE *out, char *err, size_t err_size);

/* Answer a deferred command: r < 0 sends "ERR err", else "OK" and body.
 * Frees conn. */
void control_conn_reply(struct control_conn *conn, int r, const char *body, const char *err);
/* A deferred conn can also end without control_conn_reply: the client's
 * time is up (it is told so) or the server stops. fn(conn, userdata) runs
 * then, so that its owner forgets the pointer. */
void control_conn_on_drop(struct control_conn *conn, void (*fn)(struct control_conn *conn, void *userdata),
                          void *userdata);

struct control_server;

/* Listen on path (mode 0600; only uid 0 is answered). Returns 0 or -errno. */
int control_server_new(sd_event *e, const char *path, control_handler_t handler, void *userdata,
                       struct control_server **ret);
/* Accepts NULL. Closes the socket, removes its file, and drops open
 * connections (deferred ones included). */
void control_server_free(struct control_server *s);

/* Client: send "argv...\n" to path and copy the reply body to out. Returns 0
 * for OK; -EREMOTEIO with the daemon's message in err for ERR; another
 * negative errno (with err set) when the daemon cannot be reached. */
int control_call(const char *path, int argc, char **argv, FILE *out, char *err, size_t err_size);
