/* The child side of starting a command, shared by the `_spawn` extension (which
 * runs it in a vfork child of the worker) and the `_spawner` helper (which runs
 * it in a child that shares the helper's own small address space).
 *
 * The child only makes system calls on memory the parent prepared before the
 * fork; an error is reported through that shared memory, never by returning.
 */
#ifndef CLOUDOPS_CHILD_H
#define CLOUDOPS_CHILD_H

#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <unistd.h>
#ifdef __linux__
#include <sys/prctl.h>
#endif

#ifndef CLOSE_RANGE_CLOEXEC
#define CLOSE_RANGE_CLOEXEC (1U << 2)
#endif

/* One resource limit for the child: setrlimit(resource, {soft, hard}). */
struct limit {
    int resource;
    struct rlimit value;
};

/* STAGE_LIMITS: a resource limit, the nice increment or the CPU affinity was refused. */
enum stage { STAGE_NONE = 0, STAGE_CHDIR, STAGE_EXEC, STAGE_OTHER, STAGE_LIMITS };

/* What the command gets besides its limits: a stdin (-1: the one inherited), a
 * nice increment (0: none) and a CPU set (NULL: the one inherited). */
struct extras {
    int in_fd;
    int nice;
    const cpu_set_t *affinity;
};

struct failure {
    volatile int stage;
    volatile int error;
};

/* Where the child reports why it could not start. Static, not on the stack: to
 * the compiler, stores the child makes to a local just before _exit() are dead
 * and may be dropped. One at a time is enough: the extension holds the GIL
 * throughout, and the spawner is single-threaded. */
static struct failure failed;

/* What a process that starts commands (a worker, its spawner) was set to when
 * it began: resource limits, nice value and CPU set. A command may change them
 * in it (`prlimit`, `renice` or `taskset` on its parent), and every command
 * started after would inherit the change; so each start puts them back first
 * (`restore_own`). Best effort: what cannot be put back (a hard limit lowered,
 * in a process without the privilege to raise it) stays as it is. */
struct own_settings {
    int recorded;
    struct rlimit limits[RLIM_NLIMITS];
    int have_nice;
    int nice;
    int have_affinity;
    cpu_set_t affinity;
};

static struct own_settings own;

static void __attribute__((unused))
record_own(void)
{
    for (int r = 0; r < RLIM_NLIMITS; r++) {
        if (getrlimit(r, &own.limits[r]) != 0) {
            own.limits[r].rlim_cur = own.limits[r].rlim_max = RLIM_INFINITY;
        }
    }
    errno = 0;
    own.nice = getpriority(PRIO_PROCESS, 0);
    own.have_nice = errno == 0;
    own.have_affinity = sched_getaffinity(0, sizeof own.affinity, &own.affinity) == 0;
    own.recorded = 1;
}

/* Put back what `record_own` saw; returns how many settings could not be. */
static int __attribute__((unused))
restore_own(void)
{
    if (!own.recorded) {
        return 0;
    }
    int stuck = 0;
    for (int r = 0; r < RLIM_NLIMITS; r++) {
        struct rlimit now;
        if (getrlimit(r, &now) != 0 ||
            (now.rlim_cur == own.limits[r].rlim_cur && now.rlim_max == own.limits[r].rlim_max)) {
            continue;
        }
        if (setrlimit(r, &own.limits[r]) == 0) {
            continue;
        }
        stuck++;
        if (now.rlim_max < own.limits[r].rlim_max) {
            /* Its hard limit was lowered: the soft one at least goes back as far as it can. */
            struct rlimit most = {own.limits[r].rlim_cur < now.rlim_max ? own.limits[r].rlim_cur : now.rlim_max,
                                  now.rlim_max};
            setrlimit(r, &most);
        }
    }
    if (own.have_nice) {
        errno = 0;
        int now = getpriority(PRIO_PROCESS, 0);
        if (errno == 0 && now != own.nice && setpriority(PRIO_PROCESS, 0, own.nice) != 0) {
            stuck++;
        }
    }
    if (own.have_affinity) {
        cpu_set_t now;
        if (sched_getaffinity(0, sizeof now, &now) == 0 && !CPU_EQUAL(&now, &own.affinity) &&
            sched_setaffinity(0, sizeof own.affinity, &own.affinity) != 0) {
            stuck++;
        }
    }
    return stuck;
}

/* dup2 onto the same number does nothing, and leaves close-on-exec set on a descriptor received
   with it (a process started with 1 or 2 closed gets its pipes there): the command would start
   without it. */
static int move_fd(int from, int to) {
    if (from != to) {
        return dup2(from, to);
    }
    int flags = fcntl(to, F_GETFD);
    return flags < 0 ? -1 : fcntl(to, F_SETFD, flags & ~FD_CLOEXEC);
}

static void __attribute__((noinline, noreturn, unused))
child(const char *path, char *const argv[], char *const envp[], const char *cwd, int out_fd, int err_fd,
      const int *defaults, long n_defaults, const struct limit *limits, long n_limits,
      const struct extras *extras, const sigset_t *old_mask)
{
    struct sigaction dfl;
    memset(&dfl, 0, sizeof dfl);
    dfl.sa_handler = SIG_DFL;
    /* A handler of the worker must never run here, on memory shared with it. */
    for (int sig = 1; sig < NSIG; sig++) {
        struct sigaction current;
        if (sig == SIGKILL || sig == SIGSTOP || sigaction(sig, NULL, &current) != 0) {
            continue;
        }
        void *handler = (current.sa_flags & SA_SIGINFO) ? (void *)current.sa_sigaction
                                                          : (void *)current.sa_handler;
        if (handler != (void *)SIG_DFL && handler != (void *)SIG_IGN) {
            sigaction(sig, &dfl, NULL);
        }
    }
    /* Ignored dispositions survive execve; these the command gets as defaults. */
    for (long i = 0; i < n_defaults; i++) {
        sigaction(defaults[i], &dfl, NULL);
    }
    if (setsid() < 0 || move_fd(out_fd, 1) < 0 || move_fd(err_fd, 2) < 0 ||
        (extras->in_fd >= 0 && move_fd(extras->in_fd, 0) < 0)) {
        failed.error = errno;
        failed.stage = STAGE_OTHER;
        _exit(127);
    }
    if (chdir(cwd) != 0) {
        failed.error = errno;
        failed.stage = STAGE_CHDIR;
        _exit(127);
    }
    if (extras->affinity != NULL && sched_setaffinity(0, sizeof(cpu_set_t), extras->affinity) != 0) {
        failed.error = errno;
        failed.stage = STAGE_LIMITS;
        _exit(127);
    }
    if (extras->nice != 0) {
        /* nice() may return -1 as the new value: only errno tells a failure. */
        errno = 0;
        if (nice(extras->nice) == -1 && errno != 0) {
            failed.error = errno;
            failed.stage = STAGE_LIMITS;
            _exit(127);
        }
    }
    for (long i = 0; i < n_limits; i++) {
        if (setrlimit(limits[i].resource, &limits[i].value) != 0) {
            failed.error = errno;
            failed.stage = STAGE_LIMITS;
            _exit(127);
        }
    }
#ifdef __linux__
    /* The command adopts what its own descendants orphan, so a process that
     * double-forks, clears its environment and calls setsid still stays in
     * the command's tree while the command runs. */
    prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
#endif
#ifdef SYS_close_range
    /* Whatever the worker holds without close-on-exec stays out of the command:
     * it sees exactly fds 0, 1 and 2. Kernels without the call have it fail,
     * and the worker marks its own fds close-on-exec at start for them. */
    syscall(SYS_close_range, 3U, ~0U, CLOSE_RANGE_CLOEXEC);
#endif
    sigprocmask(SIG_SETMASK, old_mask, NULL);
    execve(path, argv, envp);
    failed.error = errno;
    failed.stage = STAGE_EXEC;
    _exit(127);
}

#endif
