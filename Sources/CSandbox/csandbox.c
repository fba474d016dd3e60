#define _GNU_SOURCE
#include "csandbox.h"
#include "syscall_names.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/filter.h>
#include <linux/landlock.h>
#include <linux/seccomp.h>
#include <signal.h>
#include <stddef.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <grp.h>
#include <sched.h>
#include <sys/mount.h>
#include <sys/ptrace.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <ucontext.h>
#include <unistd.h>

int csandbox_set_no_new_privs(void) {
    return prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0 ? 0 : errno;
}

int csandbox_no_new_privs(void) {
    return prctl(PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0);
}

int csandbox_install_filter(const struct csandbox_instruction *program, uint16_t count) {
    _Static_assert(sizeof(struct csandbox_instruction) == sizeof(struct sock_filter), "sock_filter layout");
    struct sock_fprog fprog = { .len = count, .filter = (struct sock_filter *)program };
    return syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, &fprog) == 0 ? 0 : errno;
}

int csandbox_seccomp_mode(void) {
    return prctl(PR_GET_SECCOMP, 0, 0, 0, 0);
}

// --- The violation handler ------------------------------------------------------------------
// Everything here is async-signal-safe and makes two system calls only: write(2) to fd 2
// and exit_group. Every filter allows both (write at least to fd 2).

static __thread char thread_name[32];
static __thread char thread_kind[32];
static int violation_exit_status = 2;

static void copy_label(char *to, const char *from) {
    size_t i = 0;
    for (; from && from[i] && i < 31; i++) to[i] = from[i];
    to[i] = 0;
}

void csandbox_label_calling_thread(const char *kind) {
    char name[32] = {0};
    prctl(PR_GET_NAME, name, 0, 0, 0);
    copy_label(thread_name, name);
    copy_label(thread_kind, kind);
}

int csandbox_open_path(const char *path) {
    return open(path, O_PATH | O_CLOEXEC);
}

const char *csandbox_syscall_name(long number) {
    long count = (long)(sizeof(csandbox_syscall_names) / sizeof(csandbox_syscall_names[0]));
    return number >= 0 && number < count ? csandbox_syscall_names[number] : NULL;
}

struct line { char text[320]; size_t used; };

static void put(struct line *line, const char *text) {
    for (size_t i = 0; text[i] && line->used < sizeof(line->text) - 1; i++) line->text[line->used++] = text[i];
}

static void put_decimal(struct line *line, unsigned long value) {
    char digits[24];
    int count = 0;
    do { digits[count++] = (char)('0' + value % 10); value /= 10; } while (value && count < 24);
    while (count > 0 && line->used < sizeof(line->text) - 1) line->text[line->used++] = digits[--count];
}

static void put_hex(struct line *line, unsigned long value) {
    char digits[20];
    int count = 0;
    do { digits[count++] = "0123456789abcdef"[value & 15]; value >>= 4; } while (value && count < 20);
    put(line, "0x");
    while (count > 0 && line->used < sizeof(line->text) - 1) line->text[line->used++] = digits[--count];
}

static void on_violation(int signal, siginfo_t *info, void *context) {
    (void)signal;
    struct line line = { .used = 0 };
    long number = info->si_syscall;
    const char *name = csandbox_syscall_name(number);
    put(&line, "swiftlet: seccomp: thread '");
    put(&line, thread_name[0] ? thread_name : "?");
    put(&line, "' (");
    put(&line, thread_kind[0] ? thread_kind : "unknown kind");
    put(&line, ") made a forbidden system call: ");
    put(&line, name ? name : "unknown");
    put(&line, " (");
    put_decimal(&line, (unsigned long)number);
    put(&line, ")");
    if (number == SYS_ioctl && context) {
        const ucontext_t *registers = context;
        put(&line, " request ");
        put_hex(&line, (unsigned long)(unsigned int)registers->uc_mcontext.gregs[REG_RSI]);
    }
    put(&line, "; the VM is stopped (exit status ");
    put_decimal(&line, (unsigned long)violation_exit_status);
    put(&line, ")\n");
    size_t offset = 0;
    while (offset < line.used) {
        ssize_t written = write(2, line.text + offset, line.used - offset);
        if (written <= 0) break;
        offset += (size_t)written;
    }
    _exit(violation_exit_status);
}

int csandbox_install_violation_handler(int exit_status) {
    violation_exit_status = exit_status;
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_sigaction = on_violation;
    action.sa_flags = SA_SIGINFO;
    sigfillset(&action.sa_mask);
    return sigaction(SIGSYS, &action, NULL) == 0 ? 0 : errno;
}

long csandbox_syscall3(long number, long a0, long a1, long a2) {
    return syscall(number, a0, a1, a2);
}

// --- Landlock -------------------------------------------------------------------------------

int csandbox_landlock_abi(void) {
    long version = syscall(SYS_landlock_create_ruleset, NULL, 0, LANDLOCK_CREATE_RULESET_VERSION);
    return version < 0 ? 0 : (int)version;
}

int csandbox_landlock_create_ruleset(uint64_t fs_access) {
    struct landlock_ruleset_attr attributes;
    memset(&attributes, 0, sizeof attributes);
    attributes.handled_access_fs = fs_access;
    // Only the first field: older kernels refuse a larger structure with fields they lack.
    return (int)syscall(SYS_landlock_create_ruleset, &attributes, sizeof attributes.handled_access_fs, 0);
}

int csandbox_landlock_allow_path(int ruleset, int path_fd, uint64_t access) {
    struct landlock_path_beneath_attr rule = { .allowed_access = access, .parent_fd = path_fd };
    return syscall(SYS_landlock_add_rule, ruleset, LANDLOCK_RULE_PATH_BENEATH, &rule, 0) == 0 ? 0 : errno;
}

int csandbox_landlock_restrict_self(int ruleset) {
    return syscall(SYS_landlock_restrict_self, ruleset, 0) == 0 ? 0 : errno;
}

// --- Audits and tests -----------------------------------------------------------------------

int csandbox_read_filter(int tid, struct csandbox_instruction *out, int capacity) {
    if (ptrace(PTRACE_SEIZE, tid, 0, 0) != 0) return -errno;
    int result;
    if (ptrace(PTRACE_INTERRUPT, tid, 0, 0) != 0) {
        result = -errno;
    } else {
        int status;
        if (waitpid(tid, &status, __WALL) < 0) {
            result = -errno;
        } else {
            long count = ptrace(PTRACE_SECCOMP_GET_FILTER, tid, 0, NULL);
            if (count < 0) {
                result = -errno;
            } else if (count > capacity) {
                result = -ENOSPC;
            } else {
                long copied = ptrace(PTRACE_SECCOMP_GET_FILTER, tid, 0, out);
                result = copied < 0 ? -errno : (int)copied;
            }
        }
    }
    ptrace(PTRACE_DETACH, tid, 0, 0);
    return result;
}

int csandbox_probe(const struct csandbox_instruction *program, uint16_t count, int handler, int stderr_fd,
                   long number, long a0, long a1, long a2) {
    pid_t child = fork();
    if (child < 0) return -1;
    if (child == 0) {
        struct rlimit none = { 0, 0 };
        setrlimit(RLIMIT_CORE, &none);
        signal(SIGSYS, SIG_DFL);
        if (stderr_fd >= 0) dup2(stderr_fd, 2);
        if (handler) {
            csandbox_install_violation_handler(8);
            csandbox_label_calling_thread("probe");
        }
        if (csandbox_set_no_new_privs() != 0 || csandbox_install_filter(program, count) != 0) _exit(100);
        long result = syscall(number, a0, a1, a2);
        _exit(result < 0 && errno == EACCES ? 13 : 0);
    }
    int status;
    while (waitpid(child, &status, 0) < 0) {
        if (errno != EINTR) return -1;
    }
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

// --- The jailer -------------------------------------------------------------------------------

int csandbox_unshare_mounts(int new_pid_namespace) {
    if (unshare(CLONE_NEWNS | (new_pid_namespace ? CLONE_NEWPID : 0)) != 0) return errno;
    return mount(NULL, "/", NULL, MS_SLAVE | MS_REC, NULL) == 0 ? 0 : errno;
}

int csandbox_join_network_namespace(int fd) {
    return setns(fd, CLONE_NEWNET) == 0 ? 0 : errno;
}

int csandbox_bind(const char *source, const char *target, int writable) {
    if (mount(source, target, NULL, MS_BIND | MS_REC, NULL) != 0) return errno;
    if (writable) return 0;
    return mount(NULL, target, NULL, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV, NULL) == 0 ? 0 : errno;
}

int csandbox_pivot_into(const char *root) {
    if (chdir(root) != 0) return errno;
    if (mkdir("old_root", 0700) != 0 && errno != EEXIST) return errno;
    if (syscall(SYS_pivot_root, ".", "old_root") != 0) return errno;
    if (chdir("/") != 0) return errno;
    if (umount2("/old_root", MNT_DETACH) != 0) return errno;
    return rmdir("/old_root") == 0 ? 0 : errno;
}

int csandbox_make_char_device(const char *path, unsigned major_number, unsigned minor_number, unsigned mode,
                              unsigned uid, unsigned gid) {
    if (mknod(path, S_IFCHR | mode, makedev(major_number, minor_number)) != 0 && errno != EEXIST) return errno;
    if (chmod(path, mode) != 0) return errno;
    return chown(path, uid, gid) == 0 ? 0 : errno;
}

int csandbox_drop_to(unsigned uid, unsigned gid) {
    if (setgroups(0, NULL) != 0) return errno;
    if (setresgid(gid, gid, gid) != 0) return errno;
    return setresuid(uid, uid, uid) == 0 ? 0 : errno;
}

void csandbox_close_from(int first) {
    if (syscall(SYS_close_range, first, ~0U, 0) == 0) return;
    long limit = sysconf(_SC_OPEN_MAX);
    for (int fd = first; fd < limit; fd++) close(fd);
}
