/* tpmkmsd: wiring of config, vault, keyring, KMS server and control socket on
 * one sd-event loop. */
#pragma once

#include "config.h"

/* Run the daemon until SIGTERM/SIGINT. Returns the process exit status
 * (0 after a clean stop; 1 when it could not start, with the cause logged). */
int daemon_run(const struct config *c);
