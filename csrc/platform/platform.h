/*
 * The platform interface: csrc/platform/<os>/ implements these and nothing
 * else in csrc/ talks to the operating system. Plain C11, no Python: a port
 * and its C-level tests build without the interpreter.
 *
 * Every function returning int returns 0, or -1 with *e filled in, unless
 * its comment says otherwise.
 */
#ifndef MEMTRACK_PLATFORM_H
#define MEMTRACK_PLATFORM_H

#include <stddef.h>
#include <stdint.h>

/* ------------------------------------------------------------------------ */
/* Errors from the platform layer: the call that failed and its errno.      */

typedef struct {
    const char *syscall; /* "pread", "open", ... */
    const char *path;    /* the file involved, or NULL */
    int err;             /* errno */
} mt_oserr;

static inline int
mt_fail(mt_oserr *e, const char *syscall, const char *path, int err)
{
    e->syscall = syscall;
    e->path = path;
    e->err = err;
    return -1;
}


/* ------------------------------------------------------------------------ */
/* Readings (platform-neutral shapes).                                      */

typedef struct {
    double time;
    uint64_t rss, peak_rss, vms, rss_anon, rss_file, rss_shmem, swap;
    uint64_t heap_used, heap_free, minor_faults, major_faults;
} mt_sample;

typedef struct {
    uint64_t uss, pss, shared;
} mt_footprint;

/* Which readings this platform lacks: bits for mt_os_missing(). */
enum {
    MT_LACKS_HEAP = 1 << 0,
    MT_LACKS_PSS = 1 << 1,
    MT_LACKS_SWAP = 1 << 2,
    MT_LACKS_RSS_SPLIT = 1 << 3, /* rss_anon / rss_file / rss_shmem */
    MT_LACKS_FAULTS = 1 << 4,
    MT_LACKS_PEAK_RESET = 1 << 5,
};

int mt_os_init(mt_oserr *e);       /* open the descriptors kept open */
void mt_os_after_fork_child(void); /* reopen them in a forked child */
int mt_os_register_atfork(void (*prepare)(void), void (*parent)(void), void (*child)(void));
unsigned mt_os_missing(void); /* MT_LACKS_* bits */
double mt_os_monotonic(void);
long mt_os_pid(void);
int mt_os_trim(void);                            /* give free heap back to the OS; 1 if any was */
int mt_os_rss(uint64_t *rss, mt_oserr *e);       /* fast path */
int mt_os_hwm(uint64_t *hwm, mt_oserr *e);       /* fast, may be stale: see peak.c */
/* Slow (/proc/self/status), never stale: the mark, and rss from the same read. */
int mt_os_hwm_exact(uint64_t *hwm, uint64_t *rss, mt_oserr *e);
int mt_os_reset_hwm(mt_oserr *e);
/* malloc's heap in use and free (glibc mallinfo2): its cost grows with the number of
 * free chunks and it takes every arena's lock, so no hot path calls it by default. */
int mt_os_heap(uint64_t *used, uint64_t *free_bytes);
int mt_os_sample(mt_sample *s, mt_oserr *e);
int mt_os_footprint(mt_footprint *f, mt_oserr *e);

/* A limit the OS sets on this process's memory, where the platform layer
 * reads it (the cgroup limits of Linux are read by memtrack/limits.py):
 * Linux RLIMIT_AS against the address space; Windows the job object the
 * process runs in (its per-process or whole-job limit on committed memory,
 * the tighter one). Returns 1 with *m filled in, 0 when there is none, or
 * -1 with *e filled in. */
typedef struct {
    uint64_t limit;     /* bytes */
    uint64_t used;      /* what counts against it now, bytes */
    const char *source; /* "RLIMIT_AS", "job object (process memory)" ... */
} mt_memory_limit;
int mt_os_memory_limit(mt_memory_limit *m, mt_oserr *e);

void mt_os_sleep(double seconds);
double mt_os_wall_time(void);
uint64_t mt_os_pid_namespace(void);
int mt_os_random(void *buf, size_t n, mt_oserr *e);
/* Shared segments: create (mode 0600, must not exist; *fd stays open for
 * the caller to close), open an existing one without mapping it (non-blocking,
 * no symlinks: its owner and shape are checked before anything maps it), map
 * an open one, detach, unlink. */
typedef struct {
    uint64_t size;
    uint32_t uid;
    uint32_t mode;  /* permission bits */
    int regular;    /* a regular file (not a FIFO, socket, device ...) */
} mt_file_info;
int mt_os_shm_create(const char *name, size_t size, void **addr, int *fd, mt_oserr *e);
int mt_os_shm_open(const char *name, int *fd, mt_file_info *info, mt_oserr *e);
int mt_os_shm_map(int fd, size_t size, void **addr, const char *name, mt_oserr *e);
void mt_os_shm_detach(void *addr, size_t size);
int mt_os_shm_unlink(const char *name, mt_oserr *e);
int mt_os_fd_info(int fd, mt_file_info *info); /* 0, or -1 when fstat fails */
/* Read up to n bytes at offset: the count read (short at end of file), -1. */
long mt_os_pread(int fd, void *buf, size_t n, uint64_t offset);
uint32_t mt_os_uid(void);                      /* the effective uid */
/* A bound no memory size of this machine can exceed: RAM + swap, rounded up
 * to a power of two (0 when unknown). */
uint64_t mt_os_memory_bound(void);
/* Run fn(arg) so that a SIGBUS it takes (a shared file shrunk under its
 * mapping by another process) returns 1 instead of killing the process;
 * 0 when fn ran to its end. A SIGBUS outside a guard goes to whatever
 * handler was installed before. Guards nest per thread. */
int mt_os_guarded(void (*fn)(void *), void *arg);
/* This user's segments whose name (without the leading '/') starts with
 * `prefix`: fn(ctx, "/<name>") for each, in no particular order, until fn
 * returns nonzero. 0; -1 (e set) when the segments cannot be listed. */
typedef int (*mt_os_shm_fn)(void *ctx, const char *name);
int mt_os_shm_list(const char *prefix, mt_os_shm_fn fn, void *ctx, mt_oserr *e);
/* 1 when the segment `name` exists, else 0. */
int mt_os_shm_exists(const char *name);
/* Other processes. */
enum { MT_PROC_GONE = 0, MT_PROC_ALIVE = 1, MT_PROC_ZOMBIE = 2 };
int mt_os_proc_identity(long pid, uint64_t *start_time);
int mt_os_pid_exists(long pid);
int mt_os_child_status(long pid, int *exit_code, int *exit_signal);
int mt_os_footprint_of(long pid, mt_footprint *fp, mt_oserr *e);
/* rss, its high-water mark, and its anonymous part (0 where unknown). */
int mt_os_proc_memory(long pid, uint64_t *rss, uint64_t *hwm, uint64_t *anon);
int mt_os_children(long pid, long *out, size_t *n, size_t max);
int mt_os_write_all(int fd, const char *buf, size_t len, mt_oserr *e);
int mt_os_pidfd_open(long pid);
int mt_os_pidfd_alive(int fd);
void mt_os_close(int fd); /* a descriptor or handle any mt_os_* function returned */
/* One epoll set of pidfds: a pidfd becomes ready when its process exits, so
 * one mt_os_epoll_ready() call (never blocking) names every owner that died
 * since the last call, however many are watched. Keys are the caller's. */
int mt_os_epoll_new(void); /* -1 when the kernel lacks epoll */
int mt_os_epoll_add(int ep, int fd, uint64_t key);
void mt_os_epoll_del(int ep, int fd);
int mt_os_epoll_ready(int ep, uint64_t *keys, int max); /* keys filled, or -1 */
/* What a process is (memtrack run decides its role from these; see
 * sampler.c). The command line with its NULs turned into spaces: its length,
 * or -1 when the process is gone (or the platform cannot read it). */
long mt_os_proc_cmdline(long pid, char *buf, size_t size);
/* 1 when the process holds a listening Unix socket that `parent` (0: none)
 * does not also hold (a server of its own: a multiprocessing Manager), 0 when
 * not, -1 when that cannot be read. */
int mt_os_proc_listens(long pid, long parent);
/* Its parent's pid: 0, or -1 when the process is gone. */
int mt_os_proc_parent(long pid, long *ppid);
/* A zombie's exit: 1 with its code or signal (the other -1), 0 when the
 * process is not a zombie (or gone). */
int mt_os_proc_exit_status(long pid, int *exit_code, int *exit_signal);
/* The kernel OOM killer. Where the OOM kills of `pid`'s memory cgroup are
 * counted (cgroup v2 memory.events, v1 memory.oom_control; /proc/vmstat when
 * neither is readable): copied into `file`, 0, or -1 when the process is gone. */
int mt_os_oom_counter_file(long pid, char *file, size_t size);
/* The oom_kill count in such a file, or -1 when it cannot be read. */
int64_t mt_os_oom_kills(const char *file);

#endif /* MEMTRACK_PLATFORM_H */
