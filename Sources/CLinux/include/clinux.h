// CLinux: Linux calls that Swift cannot import directly (GNU extensions behind
// _GNU_SOURCE, variadic calls). Kept tiny; KVM's ioctls live in CKVM instead.
#pragma once

/// Names the calling thread (at most 15 bytes are kept), for `top -H` and `ps -L`.
/// Returns 0 or an errno value.
int clinux_set_thread_name(const char *name);
