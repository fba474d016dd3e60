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

// --- Audits and tests ---------------------------------------------------------------------
/// Reads the newest seccomp filter installed on thread `tid` of another process
/// (PTRACE_SECCOMP_GET_FILTER; needs CAP_SYS_ADMIN): seizes the thread, stops it, copies at
/// most `capacity` instructions into `out`, lets it go. Returns the instruction count or
/// -errno.
int csandbox_read_filter(int tid, struct csandbox_instruction *out, int capacity);
/// Forks a child that installs `program` (with no_new_privs; with the violation handler
/// when `handler` is set, stderr sent to `stderr_fd` when it is >= 0) and makes system
/// call `number`, then exits 0 (13 when the call failed with EACCES). Returns the child's exit status, or 128 + the signal that
/// ended it (SIGSYS when the filter trapped or killed it). Only C runs in the child.
int csandbox_probe(const struct csandbox_instruction *program, uint16_t count, int handler, int stderr_fd,
                   long number, long a0, long a1, long a2);

// --- The jailer -------------------------------------------------------------------------------
// Each returns 0 or an errno value.
/// unshare(CLONE_NEWNS [| CLONE_NEWPID]), then makes every mount a slave of the host's, so
/// that mounts made in the jail do not show outside.
int csandbox_unshare_mounts(int new_pid_namespace);
/// setns(fd, CLONE_NEWNET) for a network namespace file (/var/run/netns/NAME).
int csandbox_join_network_namespace(int fd);
/// mount --bind `source` on `target`, read-only unless `writable`.
int csandbox_bind(const char *source, const char *target, int writable);
/// pivot_root into `root` (a mount point), then detaches and removes the old root.
int csandbox_pivot_into(const char *root);
/// mknod a character device with `major`:`minor`, `mode`, owned by `uid`:`gid`.
int csandbox_make_char_device(const char *path, unsigned major, unsigned minor, unsigned mode, unsigned uid, unsigned gid);
/// Drops supplementary groups, then sets the group and user IDs (real, effective, saved).
int csandbox_drop_to(unsigned uid, unsigned gid);
/// Closes every descriptor from `first` up (close_range, else one by one).
void csandbox_close_from(int first);
