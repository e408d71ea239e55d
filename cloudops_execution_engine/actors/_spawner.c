/* The spawner: a small process each worker starts once, which starts the
 * worker's commands for it.
 *
 * Why: a process's peak resident size (`ru_maxrss`) starts from the size of the
 * address space it had when it called execve. A command started by vfork from
 * the worker execs from the worker's address space, tens of megabytes of
 * Python, and reports that as its own peak. Started from here it execs from an
 * address space of a few hundred kilobytes, so `max_rss_bytes` is the command's.
 *
 * Each command is cloned with CLONE_PARENT, so it is the worker's child, not
 * ours: the worker reaps it, gets its resource usage and is its subreaper as
 * before. CLONE_VM | CLONE_VFORK makes the clone as cheap as vfork; the child
 * runs on a stack of its own and shares nothing else with us but the failure
 * report (see _child.h).
 *
 * The worker talks to us over our stdout, a stream socket (a command's own stdout is
 * set in its child). A request is a header of
 * five u32 (the length of the rest, argc, envc, the number of signals to
 * default and of limits), the nice increment as i32 and the number of CPUs
 * to pin it to as u32, with the command's stdout and stderr pipes (and its
 * stdin, when it has one) attached as SCM_RIGHTS, then the path, cwd, argv
 * and env as NUL-terminated strings, the signals as i32, the limits as
 * (i32, i64, i64) and the CPUs as i32. The answer is three
 * i32: the pid, and the stage and errno of a failed start (0 and 0 otherwise).
 * End of input, or our parent's death, ends us.
 */
#define _GNU_SOURCE
#include <sched.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/uio.h>

#include "_child.h"

#define CONTROL 1
#define MAX_LIMITS 16

struct header {
    uint32_t length, argc, envc, n_defaults, n_limits;
    int32_t nice;
    uint32_t n_cpus;
};

struct answer {
    int32_t pid, stage, error;
};

struct start {
    const char *path, *cwd;
    char **argv, **envp;
    int out_fd, err_fd;
    int *defaults;
    long n_defaults;
    struct limit limits[MAX_LIMITS];
    long n_limits;
    cpu_set_t affinity;
    struct extras extras;
    sigset_t old_mask;
};

static char child_stack[64 * 1024] __attribute__((aligned(16)));

static int
run_child(void *arg)
{
    struct start *s = arg;
    child(s->path, s->argv, s->envp, s->cwd, s->out_fd, s->err_fd, s->defaults, s->n_defaults, s->limits,
          s->n_limits, &s->extras, &s->old_mask);
}

static int
read_full(int fd, void *buffer, size_t size)
{
    char *at = buffer;
    while (size) {
        ssize_t n = read(fd, at, size);
        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n <= 0) {
            return -1;
        }
        at += n;
        size -= (size_t)n;
    }
    return 0;
}

static int
write_full(int fd, const void *buffer, size_t size)
{
    const char *at = buffer;
    while (size) {
        ssize_t n = write(fd, at, size);
        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n <= 0) {
            return -1;
        }
        at += n;
        size -= (size_t)n;
    }
    return 0;
}

/* The header and the two or three pipes (`fds[2]` is -1 without a stdin); -1 at end of input or on a
 * malformed request. */
static int
read_header(struct header *h, int fds[3])
{
    char control[CMSG_SPACE(3 * sizeof(int))];
    struct iovec iov = {h, sizeof *h};
    struct msghdr msg = {0};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control;
    msg.msg_controllen = sizeof control;
    ssize_t n;
    do {
        n = recvmsg(CONTROL, &msg, MSG_CMSG_CLOEXEC);
    } while (n < 0 && errno == EINTR);
    if (n <= 0) {
        return -1;
    }
    struct cmsghdr *cmsg = CMSG_FIRSTHDR(&msg);
    if (cmsg == NULL || cmsg->cmsg_type != SCM_RIGHTS) {
        return -1;
    }
    fds[2] = -1;
    if (cmsg->cmsg_len == CMSG_LEN(3 * sizeof(int))) {
        memcpy(fds, CMSG_DATA(cmsg), 3 * sizeof(int));
    } else if (cmsg->cmsg_len == CMSG_LEN(2 * sizeof(int))) {
        memcpy(fds, CMSG_DATA(cmsg), 2 * sizeof(int));
    } else {
        return -1;
    }
    if ((size_t)n < sizeof *h && read_full(CONTROL, (char *)h + n, sizeof *h - (size_t)n) != 0) {
        close(fds[0]);
        close(fds[1]);
        if (fds[2] >= 0) {
            close(fds[2]);
        }
        return -1;
    }
    return 0;
}

/* Point `out` at `count` strings from `*at`; -1 if they run past `end`. */
static int
take_strings(char **at, const char *end, char **out, uint32_t count)
{
    for (uint32_t i = 0; i < count; i++) {
        char *nul = memchr(*at, '\0', (size_t)(end - *at));
        if (nul == NULL) {
            return -1;
        }
        out[i] = *at;
        *at = nul + 1;
    }
    out[count] = NULL;
    return 0;
}

/* Start one command; the answer says how it went. -1 when the request was malformed. */
static int
start_one(const struct header *h, char *body, const int fds[3], struct answer *answer)
{
    static struct start s;
    char *at = body, *end = body + h->length;
    char *fixed[3];
    if (h->n_limits > MAX_LIMITS || take_strings(&at, end, fixed, 2) != 0) {
        return -1;
    }
    s.path = fixed[0];
    s.cwd = fixed[1];
    s.argv = calloc((size_t)h->argc + 1, sizeof(char *));
    s.envp = calloc((size_t)h->envc + 1, sizeof(char *));
    s.defaults = calloc((size_t)h->n_defaults + 1, sizeof(int));
    int ok = s.argv != NULL && s.envp != NULL && s.defaults != NULL &&
             take_strings(&at, end, s.argv, h->argc) == 0 && take_strings(&at, end, s.envp, h->envc) == 0 &&
             h->n_cpus <= CPU_SETSIZE &&
             (size_t)(end - at) == (size_t)h->n_defaults * 4 + (size_t)h->n_limits * 20 + (size_t)h->n_cpus * 4;
    if (ok) {
        memcpy(s.defaults, at, h->n_defaults * 4);
        at += h->n_defaults * 4;
        for (uint32_t i = 0; i < h->n_limits; i++, at += 20) {
            int32_t resource;
            int64_t soft, hard;
            memcpy(&resource, at, 4);
            memcpy(&soft, at + 4, 8);
            memcpy(&hard, at + 12, 8);
            s.limits[i].resource = resource;
            s.limits[i].value.rlim_cur = soft < 0 ? RLIM_INFINITY : (rlim_t)soft;
            s.limits[i].value.rlim_max = hard < 0 ? RLIM_INFINITY : (rlim_t)hard;
        }
        CPU_ZERO(&s.affinity);
        for (uint32_t i = 0; i < h->n_cpus; i++, at += 4) {
            int32_t cpu;
            memcpy(&cpu, at, 4);
            if (cpu < 0 || cpu >= CPU_SETSIZE) {
                ok = 0;
                break;
            }
            CPU_SET(cpu, &s.affinity);
        }
        s.extras.in_fd = fds[2];
        s.extras.nice = h->nice;
        s.extras.affinity = h->n_cpus ? &s.affinity : NULL;
        s.n_defaults = h->n_defaults;
        s.n_limits = h->n_limits;
        s.out_fd = fds[0];
        s.err_fd = fds[1];
    }
    if (ok) {
        failed.stage = STAGE_NONE;
        failed.error = 0;
        restore_own();  /* what an earlier command changed in us, its child does not inherit */
        sigset_t all;
        sigfillset(&all);
        sigprocmask(SIG_BLOCK, &all, &s.old_mask);
        int pid = clone(run_child, child_stack + sizeof child_stack,
                        CLONE_PARENT | CLONE_VM | CLONE_VFORK | SIGCHLD, &s);
        int clone_error = errno;
        sigprocmask(SIG_SETMASK, &s.old_mask, NULL);
        answer->pid = pid < 0 ? 0 : pid;
        /* A child that failed has exited already; the worker, its parent, reaps it. */
        answer->stage = pid < 0 ? STAGE_OTHER : failed.stage;
        answer->error = pid < 0 ? clone_error : failed.error;
    }
    free(s.argv);
    free(s.envp);
    free(s.defaults);
    return ok ? 0 : -1;
}

int
main(void)
{
#ifdef __linux__
    prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0);
#endif
    signal(SIGINT, SIG_IGN);
    signal(SIGPIPE, SIG_IGN);
    record_own();
    for (;;) {
        struct header h;
        int fds[3];
        if (read_header(&h, fds) != 0) {
            return 0;
        }
        char *body = malloc((size_t)h.length + 1);
        int ok = body != NULL && read_full(CONTROL, body, h.length) == 0;
        struct answer answer = {0, 0, 0};
        if (ok) {
            ok = start_one(&h, body, fds, &answer) == 0;
        }
        free(body);
        close(fds[0]);
        close(fds[1]);
        if (fds[2] >= 0) {
            close(fds[2]);
        }
        /* A malformed request means the stream is lost: stop, and the worker starts commands itself. */
        if (!ok || write_full(CONTROL, &answer, sizeof answer) != 0) {
            return 3;
        }
    }
}
