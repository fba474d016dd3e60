// CSandbox: the Linux calls the Sandbox module needs that Swift cannot make directly
// (prctl and syscall are variadic), and the SIGSYS handler, which must be async-signal-safe
// and so is written in C. Kept tiny: the filters themselves are built in Swift.
#pragma once

#include <stdint.h>

/// One classic BPF instruction (`struct sock_filter`).
struct csandbox_instruction {
    uint16_t code;
    uint8_t jt;
    uint8_t jf;
    uint32_t k;
};

/// prctl(PR_SET_NO_NEW_PRIVS, 1): this thread and its children can never gain privileges
/// through execve (set-user-ID files, file capabilities). Returns 0 or an errno value.
int csandbox_set_no_new_privs(void);
/// prctl(PR_GET_NO_NEW_PRIVS): 1 when set, 0 when not, -1 on error.
int csandbox_no_new_privs(void);
/// seccomp(SECCOMP_SET_MODE_FILTER, 0, program) for the calling thread only. Returns 0 or an
/// errno value.
int csandbox_install_filter(const struct csandbox_instruction *program, uint16_t count);
/// prctl(PR_GET_SECCOMP): 0 no filter, 2 filter mode; -1 on error (or the call trapped).
int csandbox_seccomp_mode(void);

/// Records what the SIGSYS handler names when this thread makes a forbidden call: the
/// thread's name (PR_GET_NAME, as `ps -L` shows it) and `kind` (at most 31 bytes).
void csandbox_label_calling_thread(const char *kind);
/// open(path, O_PATH | O_CLOEXEC), for Landlock rules.
int csandbox_open_path(const char *path);
/// Installs the process-wide SIGSYS handler: one line on stderr naming the thread and the
/// system call (name, number; for ioctl the request), then `_exit(exit_status)`.
/// Returns 0 or an errno value.
int csandbox_install_violation_handler(int exit_status);
/// The system call's name, or NULL for a number the table does not know.
const char *csandbox_syscall_name(long number);

/// syscall(number, a0, a1, a2) for tests and the violation hook: returns the result or
/// -1 with errno set.
long csandbox_syscall3(long number, long a0, long a1, long a2);

// --- Landlock (a second fence around files) -----------------------------------------------
/// The Landlock ABI version the kernel offers (1, 2, ...), or 0 when it has none (not
/// built, or disabled at boot).
int csandbox_landlock_abi(void);
/// landlock_create_ruleset handling `fs_access`: the descriptor, or -1 with errno.
int csandbox_landlock_create_ruleset(uint64_t fs_access);
/// landlock_add_rule(LANDLOCK_RULE_PATH_BENEATH) for an open path descriptor.
int csandbox_landlock_allow_path(int ruleset, int path_fd, uint64_t access);
/// landlock_restrict_self for the calling thread. Returns 0 or an errno value.
int csandbox_landlock_restrict_self(int ruleset);

// --- Request numbers the filters name (beyond KVM's, which CKVM has) -------------------------
#include <asm/ioctls.h>
#include <linux/if_tun.h>
static const unsigned long CSANDBOX_TUNSETOFFLOAD = TUNSETOFFLOAD;
static const unsigned long CSANDBOX_TCGETS = TCGETS;
static const unsigned long CSANDBOX_TCSETS = TCSETS;
static const unsigned long CSANDBOX_TCSETSW = TCSETSW;
static const unsigned long CSANDBOX_TCSETSF = TCSETSF;
static const unsigned long CSANDBOX_FIONBIO = FIONBIO;
