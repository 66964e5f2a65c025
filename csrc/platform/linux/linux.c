/*
 * Linux readings: /proc/self/{statm,status,smaps_rollup,clear_refs},
 * getrusage and glibc mallinfo2. The only file in csrc/ that makes syscalls
 * (with the other csrc/platform/<os>/ folders, when they are built).
 */
#define _GNU_SOURCE
#include "../platform.h"

#include <errno.h>
#include <fcntl.h>
#include <malloc.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#define PROC_STATM "/proc/self/statm"
#define PROC_STATUS "/proc/self/status"
#define PROC_CLEAR_REFS "/proc/self/clear_refs"
#define PROC_SMAPS_ROLLUP "/proc/self/smaps_rollup"
#define PROC_SMAPS "/proc/self/smaps"

/* Descriptors kept open for the fast paths. /proc/self resolves when the
 * file is opened, so a forked child must reopen them or it would read its
 * parent. Written only by mt_os_init() (under the GIL, before any reader
 * thread exists) and by the at-fork child handler (one thread alive); read
 * by any thread without a lock (pread takes an explicit offset). */
static struct {
    int statm;
    int status;
    int clear_refs;     /* -1 when the kernel refused to open it */
    int clear_refs_err; /* errno of that refusal */
    long page_size;
} os = {-1, -1, -1, 0, 4096};

/* The pid, cached: a syscall costs ~0.2 us here and phases record it.
 * Refreshed by the at-fork child handler (mt_os_after_fork_child). */
static long cached_pid;

static int
open_cloexec(const char *path, int flags)
{
    int fd;
    do {
        fd = open(path, flags | O_CLOEXEC);
    } while (fd < 0 && errno == EINTR);
    return fd;
}

/* Read a small /proc file whole into buf (NUL-terminated): its length, or
 * -1 when it cannot be opened (the process is gone) or read. */
static ssize_t
read_small(const char *path, char *buf, size_t size)
{
    int fd = open_cloexec(path, O_RDONLY);
    if (fd < 0) {
        return -1;
    }
    ssize_t n;
    do {
        n = read(fd, buf, size - 1);
    } while (n < 0 && errno == EINTR);
    close(fd);
    if (n >= 0) {
        buf[n] = '\0';
    }
    return n;
}

static void
close_fd(int *fd)
{
    if (*fd >= 0) {
        close(*fd);
        *fd = -1;
    }
}

static int
open_all(mt_oserr *e)
{
    os.page_size = sysconf(_SC_PAGESIZE);
    if (os.page_size <= 0) {
        os.page_size = 4096;
    }
    os.statm = open_cloexec(PROC_STATM, O_RDONLY);
    if (os.statm < 0) {
        return mt_fail(e, "open", PROC_STATM, errno);
    }
    os.status = open_cloexec(PROC_STATUS, O_RDONLY);
    if (os.status < 0) {
        return mt_fail(e, "open", PROC_STATUS, errno);
    }
    os.clear_refs = open_cloexec(PROC_CLEAR_REFS, O_WRONLY);
    os.clear_refs_err = os.clear_refs < 0 ? errno : 0;
    return 0;
}

int
mt_os_init(mt_oserr *e)
{
    if (os.statm >= 0) {
        return 0;
    }
    return open_all(e);
}

void
mt_os_after_fork_child(void)
{
    mt_oserr ignored;
    cached_pid = (long)getpid();
    close_fd(&os.statm);
    close_fd(&os.status);
    close_fd(&os.clear_refs);
    /* A failure here leaves the descriptor at -1; the next read reports it
     * as an OSError instead of reading the parent's memory. */
    (void)open_all(&ignored);
}

int
mt_os_register_atfork(void (*prepare)(void), void (*parent)(void), void (*child)(void))
{
    return pthread_atfork(prepare, parent, child);
}

unsigned
mt_os_missing(void)
{
    unsigned missing = 0;
    if (os.clear_refs < 0) {
        missing |= MT_LACKS_PEAK_RESET;
    }
    if (access(PROC_SMAPS_ROLLUP, R_OK) != 0 && access(PROC_SMAPS, R_OK) != 0) {
        missing |= MT_LACKS_PSS;
    }
    /* A malloc other than glibc's (jemalloc or tcmalloc preloaded, a
     * sanitizer) leaves mallinfo2() all zero: say so rather than report 0. */
    struct mallinfo2 mi = mallinfo2();
    if (mi.arena == 0 && mi.hblkhd == 0 && mi.uordblks == 0) {
        missing |= MT_LACKS_HEAP;
    }
    return missing;
}

static double
clock_seconds(clockid_t clock)
{
    struct timespec ts;
    clock_gettime(clock, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

double
mt_os_monotonic(void)
{
    return clock_seconds(CLOCK_MONOTONIC);
}

long
mt_os_pid(void)
{
    if (cached_pid == 0) {
        cached_pid = (long)getpid();
    }
    return cached_pid;
}

int
mt_os_trim(void)
{
    return malloc_trim(0);
}

void
mt_os_sleep(double seconds)
{
    struct timespec ts;
    ts.tv_sec = (time_t)seconds;
    ts.tv_nsec = (long)((seconds - (double)ts.tv_sec) * 1e9);
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
}

/* pread() the whole small /proc file at fd into buf (NUL-terminated). */
static ssize_t
read_proc(int fd, const char *path, char *buf, size_t size, mt_oserr *e)
{
    ssize_t n;
    if (fd < 0) {
        return mt_fail(e, "open", path, EBADF);
    }
    do {
        n = pread(fd, buf, size - 1, 0);
    } while (n < 0 && errno == EINTR);
    if (n < 0) {
        return mt_fail(e, "pread", path, errno);
    }
    buf[n] = '\0';
    return n;
}

/* The decimal number at *p (advanced past it); -1 when there is none. */
static int
parse_decimal(const char **p, const char *end, uint64_t *out)
{
    const char *s = *p;
    uint64_t v = 0;
    if (s == end || *s < '0' || *s > '9') {
        return -1;
    }
    for (; s < end && *s >= '0' && *s <= '9'; s++) {
        v = v * 10 + (uint64_t)(*s - '0');
    }
    *p = s;
    *out = v;
    return 0;
}

/* statm is "size resident shared text lib data dt" in pages. A hand-rolled
 * parse of the first two fields: sscanf costs as much as the pread here. */
int
mt_os_rss(uint64_t *rss, mt_oserr *e)
{
    char buf[128];
    ssize_t n = read_proc(os.statm, PROC_STATM, buf, sizeof buf, e);
    if (n < 0) {
        return -1;
    }
    const char *p = buf, *end = buf + n;
    uint64_t size, resident;
    if (parse_decimal(&p, end, &size) < 0 || p == end || *p++ != ' ' ||
        parse_decimal(&p, end, &resident) < 0) {
        return mt_fail(e, "pread", PROC_STATM, EPROTO);
    }
    *rss = resident * (uint64_t)os.page_size;
    return 0;
}

/* getrusage's ru_maxrss is max(mm high-water mark, signal->maxrss). The
 * kernel raises signal->maxrss whenever a thread exits, so it can sit above
 * the high-water mark after a reset; peak.c detects that and then uses
 * mt_os_hwm_exact(). */
int
mt_os_hwm(uint64_t *hwm, mt_oserr *e)
{
    struct rusage ru;
    if (getrusage(RUSAGE_SELF, &ru) != 0) {
        return mt_fail(e, "getrusage", NULL, errno);
    }
    *hwm = (uint64_t)ru.ru_maxrss * 1024u;
    return 0;
}

/* Value of "Key:   123 kB" in a /proc status-like text, in bytes. */
static int
find_kb(const char *text, const char *key, uint64_t *out)
{
    size_t klen = strlen(key);
    const char *p = text;
    while ((p = strstr(p, key)) != NULL) {
        if ((p == text || p[-1] == '\n') && p[klen] == ':') {
            *out = strtoull(p + klen + 1, NULL, 10) * 1024u;
            return 1;
        }
        p += klen;
    }
    return 0;
}

/* The kB value of the line "Key:<spaces>N kB" at or after *p in [*p, end),
 * key given with its colon; *p is left after the number, so that keys are
 * looked up in the order the kernel prints them. */
static int
scan_kb(const char **p, const char *end, const char *key, size_t klen, uint64_t *out)
{
    const char *s = *p;
    for (;;) {
        if ((size_t)(end - s) < klen) {
            return -1;
        }
        if (memcmp(s, key, klen) == 0) {
            break;
        }
        const char *nl = memchr(s, '\n', (size_t)(end - s));
        if (nl == NULL) {
            return -1;
        }
        s = nl + 1;
    }
    s += klen;
    while (s < end && (*s == ' ' || *s == '\t')) {
        s++;
    }
    uint64_t kb;
    if (parse_decimal(&s, end, &kb) < 0) {
        return -1;
    }
    *p = s;
    *out = kb * 1024u;
    return 0;
}

int
mt_os_hwm_exact(uint64_t *hwm, uint64_t *rss, mt_oserr *e)
{
    char buf[8192];
    ssize_t n = read_proc(os.status, PROC_STATUS, buf, sizeof buf, e);
    if (n < 0) {
        return -1;
    }
    /* VmHWM comes just before VmRSS in every kernel since 2.6. */
    const char *p = buf, *end = buf + n;
    if (scan_kb(&p, end, "VmHWM:", 6, hwm) < 0 || scan_kb(&p, end, "VmRSS:", 6, rss) < 0) {
        return mt_fail(e, "pread", PROC_STATUS, EPROTO);
    }
    return 0;
}

int
mt_os_reset_hwm(mt_oserr *e)
{
    ssize_t n;
    if (os.clear_refs < 0) {
        return mt_fail(e, "open", PROC_CLEAR_REFS, os.clear_refs_err ? os.clear_refs_err : EBADF);
    }
    do {
        n = pwrite(os.clear_refs, "5", 1, 0);
    } while (n < 0 && errno == EINTR);
    if (n != 1) {
        return mt_fail(e, "write", PROC_CLEAR_REFS, n < 0 ? errno : EIO);
    }
    return 0;
}

int
mt_os_heap(uint64_t *used, uint64_t *free_bytes)
{
    struct mallinfo2 mi = mallinfo2();
    /* uordblks: in-use heap chunks; hblkhd: in-use mmap()ed chunks. */
    *used = (uint64_t)mi.uordblks + (uint64_t)mi.hblkhd;
    *free_bytes = (uint64_t)mi.fordblks;
    return 0;
}

int
mt_os_sample(mt_sample *s, mt_oserr *e)
{
    char buf[8192];
    struct rusage ru;
    memset(s, 0, sizeof *s);
    s->time = mt_os_monotonic();
    if (read_proc(os.status, PROC_STATUS, buf, sizeof buf, e) < 0) {
        return -1;
    }
    if (!find_kb(buf, "VmRSS", &s->rss) || !find_kb(buf, "VmHWM", &s->peak_rss) ||
        !find_kb(buf, "VmSize", &s->vms)) {
        return mt_fail(e, "pread", PROC_STATUS, EPROTO);
    }
    /* Present since Linux 4.5 / 2.6.34; absent fields read as 0. */
    find_kb(buf, "RssAnon", &s->rss_anon);
    find_kb(buf, "RssFile", &s->rss_file);
    find_kb(buf, "RssShmem", &s->rss_shmem);
    find_kb(buf, "VmSwap", &s->swap);
    if (getrusage(RUSAGE_SELF, &ru) != 0) {
        return mt_fail(e, "getrusage", NULL, errno);
    }
    s->minor_faults = (uint64_t)ru.ru_minflt;
    s->major_faults = (uint64_t)ru.ru_majflt;
    mt_os_heap(&s->heap_used, &s->heap_free);
    return 0;
}

/* Sum the footprint fields of a smaps or smaps_rollup text stream. */
static int
footprint_from(FILE *f, mt_footprint *fp)
{
    /* On the heap: this runs in the heartbeat thread of forked workers,
     * where ASan misreads stack buffers of threads created after fork(). */
    enum { LINE = 512 };
    char *line = malloc(LINE);
    unsigned long long kb;
    char key[64];
    int seen = 0;
    memset(fp, 0, sizeof *fp);
    if (line == NULL) {
        return 0;
    }
    while (fgets(line, LINE, f) != NULL) {
        if (sscanf(line, "%63[A-Za-z_]: %llu kB", key, &kb) != 2) {
            continue;
        }
        uint64_t bytes = (uint64_t)kb * 1024u;
        if (strcmp(key, "Pss") == 0) {
            fp->pss += bytes;
            seen = 1;
        }
        else if (strcmp(key, "Private_Clean") == 0 || strcmp(key, "Private_Dirty") == 0) {
            fp->uss += bytes;
        }
        else if (strcmp(key, "Shared_Clean") == 0 || strcmp(key, "Shared_Dirty") == 0) {
            fp->shared += bytes;
        }
    }
    free(line);
    return seen;
}

int
mt_os_footprint(mt_footprint *fp, mt_oserr *e)
{
    const char *path = PROC_SMAPS_ROLLUP;
    FILE *f = fopen(path, "re");
    if (f == NULL && errno == ENOENT) {
        path = PROC_SMAPS; /* kernels before 4.14 */
        f = fopen(path, "re");
    }
    if (f == NULL) {
        return mt_fail(e, "open", path, errno);
    }
    int seen = footprint_from(f, fp);
    int failed = ferror(f);
    int err = errno;
    fclose(f);
    if (failed) {
        return mt_fail(e, "read", path, err);
    }
    if (!seen) {
        /* No mappings at all (a kernel thread) or an unknown format. */
        return mt_fail(e, "read", path, EPROTO);
    }
    return 0;
}

/* RLIMIT_AS (ulimit -v) bounds the address space, so also what can become
 * resident; used is VmSize, what counts against it. */
int
mt_os_memory_limit(mt_memory_limit *m, mt_oserr *e)
{
    struct rlimit rl;
    char buf[128];
    unsigned long long size = 0;
    if (getrlimit(RLIMIT_AS, &rl) != 0) {
        return mt_fail(e, "getrlimit", NULL, errno);
    }
    if (rl.rlim_cur == RLIM_INFINITY) {
        return 0;
    }
    if (read_proc(os.statm, PROC_STATM, buf, sizeof buf, e) < 0) {
        return -1;
    }
    if (sscanf(buf, "%llu", &size) != 1) {
        return mt_fail(e, "pread", PROC_STATM, EPROTO);
    }
    m->limit = (uint64_t)rl.rlim_cur;
    m->used = (uint64_t)size * (uint64_t)os.page_size;
    m->source = "RLIMIT_AS";
    return 1;
}

/* ------------------------------------------------------------------------ */
/* Shared segments and other processes (the worker table).                   */

#include <dirent.h>
#include <limits.h>
#include <setjmp.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/sysinfo.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <sys/wait.h>

int
mt_os_shm_create(const char *name, size_t size, void **addr, int *fd_out, mt_oserr *e)
{
    int fd = shm_open(name, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd < 0) {
        return mt_fail(e, "shm_open", name, errno);
    }
    /* The umask cannot widen 0600, but make the mode explicit anyway. */
    if (fchmod(fd, 0600) != 0 || ftruncate(fd, (off_t)size) != 0) {
        int err = errno;
        close(fd);
        shm_unlink(name);
        return mt_fail(e, "ftruncate", name, err);
    }
    void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    int err = errno;
    if (p == MAP_FAILED) {
        close(fd);
        shm_unlink(name);
        return mt_fail(e, "mmap", name, err);
    }
    if (fd_out != NULL) {
        *fd_out = fd;
    }
    else {
        close(fd);
    }
    *addr = p;
    return 0;
}

static void
fill_info(const struct stat *st, mt_file_info *info)
{
    info->size = st->st_size > 0 ? (uint64_t)st->st_size : 0;
    info->uid = (uint32_t)st->st_uid;
    info->mode = (uint32_t)(st->st_mode & 07777);
    info->regular = S_ISREG(st->st_mode);
}

int
mt_os_shm_open(const char *name, int *fd_out, mt_file_info *info, mt_oserr *e)
{
    struct stat st;
    /* O_NONBLOCK: a FIFO planted under the name must not hang the open. */
    int fd = shm_open(name, O_RDWR | O_CLOEXEC | O_NONBLOCK | O_NOFOLLOW, 0);
    if (fd < 0) {
        return mt_fail(e, "shm_open", name, errno);
    }
    if (fstat(fd, &st) != 0) {
        int err = errno;
        close(fd);
        return mt_fail(e, "fstat", name, err);
    }
    fill_info(&st, info);
    *fd_out = fd;
    return 0;
}

int
mt_os_shm_map(int fd, size_t size, void **addr, const char *name, mt_oserr *e)
{
    void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) {
        return mt_fail(e, "mmap", name, errno);
    }
    *addr = p;
    return 0;
}

int
mt_os_fd_info(int fd, mt_file_info *info)
{
    struct stat st;
    if (fstat(fd, &st) != 0) {
        return -1;
    }
    fill_info(&st, info);
    return 0;
}

long
mt_os_pread(int fd, void *buf, size_t n, uint64_t offset)
{
    ssize_t r;
    do {
        r = pread(fd, buf, n, (off_t)offset);
    } while (r < 0 && errno == EINTR);
    return (long)r;
}

uint32_t
mt_os_uid(void)
{
    return (uint32_t)geteuid();
}

uint64_t
mt_os_memory_bound(void)
{
    struct sysinfo si;
    if (sysinfo(&si) != 0) {
        return 0;
    }
    uint64_t unit = si.mem_unit ? si.mem_unit : 1;
    uint64_t total = ((uint64_t)si.totalram + (uint64_t)si.totalswap) * unit;
    uint64_t bound = 1u << 20;
    while (bound < total && bound < (UINT64_C(1) << 62)) {
        bound <<= 1;
    }
    return bound;
}

/* The SIGBUS guard. The handler is installed once (first guard) and kept;
 * the jump buffer is per thread, so guards in different threads (the
 * recorder, a reader under the GIL) never see each other's. */
static _Thread_local sigjmp_buf *volatile guard_jump;
static struct sigaction guard_previous;
static pthread_once_t guard_once = PTHREAD_ONCE_INIT;
static int guard_installed;

static void
guard_handler(int sig, siginfo_t *info, void *ctx)
{
    sigjmp_buf *jump = guard_jump;
    if (jump != NULL) {
        guard_jump = NULL;
        siglongjmp(*jump, 1);
    }
    /* Not ours: hand it to the handler that was there before. */
    if (guard_previous.sa_flags & SA_SIGINFO) {
        guard_previous.sa_sigaction(sig, info, ctx);
    }
    else if (guard_previous.sa_handler == SIG_IGN) {
        return;
    }
    else if (guard_previous.sa_handler == SIG_DFL) {
        signal(sig, SIG_DFL); /* returning re-runs the access: it dies as it would have */
    }
    else {
        guard_previous.sa_handler(sig);
    }
}

static void
guard_install(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = guard_handler;
    sa.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigemptyset(&sa.sa_mask);
    guard_installed = sigaction(SIGBUS, &sa, &guard_previous) == 0;
}

int
mt_os_guarded(void (*fn)(void *), void *arg)
{
    pthread_once(&guard_once, guard_install);
    sigjmp_buf jump;
    sigjmp_buf *volatile outer = guard_jump;
    if (sigsetjmp(jump, 1) != 0) {
        guard_jump = outer;
        return 1;
    }
    guard_jump = &jump;
    fn(arg);
    guard_jump = outer;
    return 0;
}

void
mt_os_shm_detach(void *addr, size_t size)
{
    if (addr != NULL) {
        munmap(addr, size);
    }
}

int
mt_os_shm_unlink(const char *name, mt_oserr *e)
{
    if (shm_unlink(name) != 0 && errno != ENOENT) {
        return mt_fail(e, "shm_unlink", name, errno);
    }
    return 0;
}

/* POSIX shared memory on Linux is a tmpfs mounted here; shm_open(3) maps
 * "/name" to SHM_DIR "/name". */
#define SHM_DIR "/dev/shm"

int
mt_os_shm_list(const char *prefix, mt_os_shm_fn fn, void *ctx, mt_oserr *e)
{
    DIR *d = opendir(SHM_DIR);
    if (d == NULL) {
        return mt_fail(e, "opendir", SHM_DIR, errno);
    }
    size_t plen = strlen(prefix);
    uid_t uid = getuid();
    struct dirent *ent;
    int rc = 0;
    while (rc == 0 && (ent = readdir(d)) != NULL) {
        struct stat st;
        if (strncmp(ent->d_name, prefix, plen) != 0 ||
            fstatat(dirfd(d), ent->d_name, &st, AT_SYMLINK_NOFOLLOW) != 0 ||
            !S_ISREG(st.st_mode) || st.st_uid != uid) {
            continue; /* gone since readdir, not a segment, or not this user's */
        }
        char name[NAME_MAX + 2];
        snprintf(name, sizeof name, "/%s", ent->d_name);
        rc = fn(ctx, name);
    }
    closedir(d);
    return 0;
}

int
mt_os_shm_exists(const char *name)
{
    char path[sizeof SHM_DIR + NAME_MAX + 2];
    snprintf(path, sizeof path, "%s%s", SHM_DIR, name);
    return access(path, F_OK) == 0;
}

int
mt_os_random(void *buf, size_t n, mt_oserr *e)
{
    size_t got = 0;
    while (got < n) {
        ssize_t r = getrandom((char *)buf + got, n - got, 0);
        if (r < 0) {
            if (errno == EINTR) {
                continue;
            }
            return mt_fail(e, "getrandom", NULL, errno);
        }
        got += (size_t)r;
    }
    return 0;
}

/* The identity of this process's pid namespace (the inode of
 * /proc/self/ns/pid); 0 when unknown. */
uint64_t
mt_os_pid_namespace(void)
{
    struct stat st;
    return stat("/proc/self/ns/pid", &st) == 0 ? (uint64_t)st.st_ino : 0;
}

double
mt_os_wall_time(void)
{
    return clock_seconds(CLOCK_REALTIME);
}

/* Process identity: the start time (clock ticks since boot, field 22 of
 * /proc/<pid>/stat) tells a process from a later one that reused its pid.
 * Returns MT_PROC_ALIVE, MT_PROC_ZOMBIE or MT_PROC_GONE. */
int
mt_os_proc_identity(long pid, uint64_t *start_time)
{
    char path[64], buf[1024];
    snprintf(path, sizeof path, "/proc/%ld/stat", pid);
    if (read_small(path, buf, sizeof buf) <= 0) {
        return MT_PROC_GONE;
    }
    /* "pid (comm) S ppid ...": comm may hold spaces and parentheses. */
    char *p = strrchr(buf, ')');
    if (p == NULL || p[1] != ' ') {
        return MT_PROC_GONE;
    }
    char state = p[2];
    p += 3; /* the start of field 4 */
    /* Each step moves to the space before the next field: 18 reach 22. */
    for (int field = 4; field < 22 && p != NULL; field++) {
        p = strchr(p + 1, ' ');
    }
    if (p == NULL) {
        return MT_PROC_GONE;
    }
    *start_time = strtoull(p + 1, NULL, 10);
    return (state == 'Z' || state == 'X') ? MT_PROC_ZOMBIE : MT_PROC_ALIVE;
}

int
mt_os_pid_exists(long pid)
{
    return kill((pid_t)pid, 0) == 0 || errno == EPERM;
}

/* The exit status of our own child that has not been reaped yet, without
 * reaping it (its owner, a pool, still will). 1 when known. */
int
mt_os_child_status(long pid, int *exit_code, int *exit_signal)
{
    siginfo_t info;
    memset(&info, 0, sizeof info);
    if (waitid(P_PID, (id_t)pid, &info, WEXITED | WNOHANG | WNOWAIT) != 0 || info.si_pid == 0) {
        return 0;
    }
    if (info.si_code == CLD_EXITED) {
        *exit_code = info.si_status;
        return 1;
    }
    if (info.si_code == CLD_KILLED || info.si_code == CLD_DUMPED) {
        *exit_signal = info.si_status;
        return 1;
    }
    return 0;
}

int
mt_os_footprint_of(long pid, mt_footprint *fp, mt_oserr *e)
{
    char path[64];
    snprintf(path, sizeof path, "/proc/%ld/smaps_rollup", pid);
    FILE *f = fopen(path, "re");
    if (f == NULL) {
        return mt_fail(e, "open", "/proc/<pid>/smaps_rollup", errno);
    }
    int seen = footprint_from(f, fp);
    fclose(f);
    if (!seen) {
        return mt_fail(e, "read", "/proc/<pid>/smaps_rollup", EPROTO);
    }
    return 0;
}

/* A pidfd names one process for good, never a later one with its pid.
 * -1 when the process is gone or the kernel lacks pidfd_open (< 5.3). */
#include <poll.h>
#include <sys/epoll.h>
#include <sys/syscall.h>

int
mt_os_pidfd_open(long pid)
{
#ifdef SYS_pidfd_open
    return (int)syscall(SYS_pidfd_open, (pid_t)pid, 0);
#else
    (void)pid;
    errno = ENOSYS;
    return -1;
#endif
}

/* 1 while the process runs, 0 once it has exited (zombie or reaped). */
int
mt_os_pidfd_alive(int fd)
{
    struct pollfd p = {.fd = fd, .events = POLLIN};
    int r;
    do {
        r = poll(&p, 1, 0);
    } while (r < 0 && errno == EINTR);
    return r == 0;
}

int
mt_os_epoll_new(void)
{
    return epoll_create1(EPOLL_CLOEXEC);
}

int
mt_os_epoll_add(int ep, int fd, uint64_t key)
{
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = key};
    return epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) == 0 ? 0 : -1;
}

void
mt_os_epoll_del(int ep, int fd)
{
    struct epoll_event ev = {0};
    epoll_ctl(ep, EPOLL_CTL_DEL, fd, &ev);
}

int
mt_os_epoll_ready(int ep, uint64_t *keys, int max)
{
    struct epoll_event ev[64];
    int total = 0;
    while (total < max) {
        int want = max - total < 64 ? max - total : 64;
        int r;
        do {
            r = epoll_wait(ep, ev, want, 0);
        } while (r < 0 && errno == EINTR);
        if (r < 0) {
            return total ? total : -1;
        }
        for (int i = 0; i < r; i++) {
            keys[total++] = ev[i].data.u64;
        }
        if (r < want) {
            break;
        }
    }
    return total;
}

void
mt_os_close(int fd)
{
    if (fd >= 0) {
        close(fd);
    }
}

/* ------------------------------------------------------------------------ */
/* Other processes' memory and the process tree (memtrack run).             */

#include <dirent.h>

int
mt_os_proc_memory(long pid, uint64_t *rss, uint64_t *hwm, uint64_t *anon)
{
    char path[64], buf[8192];
    snprintf(path, sizeof path, "/proc/%ld/status", pid);
    if (read_small(path, buf, sizeof buf) <= 0) {
        return -1;
    }
    *rss = *hwm = *anon = 0;
    if (!find_kb(buf, "VmRSS", rss)) {
        return -1; /* a zombie or a kernel thread: no memory to report */
    }
    find_kb(buf, "VmHWM", hwm);
    find_kb(buf, "RssAnon", anon);
    return 0;
}

/* Children of every thread of `pid` (/proc/<pid>/task/<tid>/children),
 * appended to out[*n..max). Returns -1 when the process is gone. */
int
mt_os_children(long pid, long *out, size_t *n, size_t max)
{
    char path[96];
    snprintf(path, sizeof path, "/proc/%ld/task", pid);
    DIR *d = opendir(path);
    if (d == NULL) {
        return -1;
    }
    struct dirent *ent;
    while ((ent = readdir(d)) != NULL) {
        if (ent->d_name[0] < '0' || ent->d_name[0] > '9') {
            continue;
        }
        char file[128], buf[4096];
        snprintf(file, sizeof file, "/proc/%ld/task/%.20s/children", pid, ent->d_name);
        if (read_small(file, buf, sizeof buf) <= 0) {
            continue;
        }
        char *p = buf, *end;
        for (long child = strtol(p, &end, 10); end != p && *n < max;
             p = end, child = strtol(p, &end, 10)) {
            out[(*n)++] = child;
        }
    }
    closedir(d);
    return 0;
}

int
mt_os_write_all(int fd, const char *buf, size_t len, mt_oserr *e)
{
    while (len > 0) {
        ssize_t w = write(fd, buf, len);
        if (w < 0) {
            if (errno == EINTR) {
                continue;
            }
            return mt_fail(e, "write", NULL, errno);
        }
        buf += w;
        len -= (size_t)w;
    }
    return 0;
}

/* ------------------------------------------------------------------------ */
/* What a process is, and the OOM killer's counters (memtrack run's roles    */
/* and deaths, sampler.c).                                                   */

long
mt_os_proc_cmdline(long pid, char *buf, size_t size)
{
    char path[64];
    snprintf(path, sizeof path, "/proc/%ld/cmdline", pid);
    ssize_t n = read_small(path, buf, size);
    if (n < 0) {
        return -1;
    }
    for (ssize_t i = 0; i < n; i++) {
        if (buf[i] == '\0') {
            buf[i] = ' ';
        }
    }
    while (n > 0 && buf[n - 1] == ' ') {
        buf[--n] = '\0';
    }
    return (long)n;
}

/* Inodes of the listening Unix sockets in /proc/<pid>/net/unix: a line
 * "Num RefCount Protocol Flags Type St Inode Path", Flags bit 0x10000 being
 * __SO_ACCEPTCON (listen() was called). */
static size_t
listening_inodes(long pid, unsigned long *out, size_t max)
{
    char path[64], line[512];
    snprintf(path, sizeof path, "/proc/%ld/net/unix", pid);
    FILE *f = fopen(path, "re");
    size_t n = 0;
    if (f == NULL) {
        return 0;
    }
    while (n < max && fgets(line, sizeof line, f) != NULL) {
        unsigned long refs, proto, flags, type, state, inode;
        char *colon = strchr(line, ':');
        if (colon == NULL || sscanf(colon + 1, "%lx %lx %lx %lx %lx %lu", &refs, &proto, &flags,
                                    &type, &state, &inode) != 6) {
            continue; /* the header line */
        }
        if ((flags & 0x10000UL) && inode != 0) {
            out[n++] = inode;
        }
    }
    fclose(f);
    return n;
}

/* Whether `pid` has a descriptor on one of these socket inodes. */
static int
holds_socket(long pid, const unsigned long *inodes, size_t count, unsigned long *which)
{
    char path[64];
    snprintf(path, sizeof path, "/proc/%ld/fd", pid);
    DIR *d = opendir(path);
    int found = 0;
    if (d == NULL) {
        return -1;
    }
    struct dirent *ent;
    while (!found && (ent = readdir(d)) != NULL) {
        char link[96], target[64];
        if (ent->d_name[0] < '0' || ent->d_name[0] > '9') {
            continue;
        }
        snprintf(link, sizeof link, "/proc/%ld/fd/%.20s", pid, ent->d_name);
        ssize_t n = readlink(link, target, sizeof target - 1);
        unsigned long inode;
        if (n <= 0) {
            continue;
        }
        target[n] = '\0';
        if (sscanf(target, "socket:[%lu]", &inode) != 1) {
            continue;
        }
        for (size_t i = 0; i < count && !found; i++) {
            found = inodes[i] == inode;
        }
        if (found && which != NULL) {
            *which = inode;
        }
    }
    closedir(d);
    return found;
}

int
mt_os_proc_listens(long pid, long parent)
{
    unsigned long inodes[256];
    size_t count = listening_inodes(pid, inodes, sizeof inodes / sizeof *inodes);
    /* One at a time: a socket the parent holds too was inherited (a child
     * between fork and exec, a forkserver's child), not the process's own. */
    while (count > 0) {
        unsigned long inode = 0;
        int held = holds_socket(pid, inodes, count, &inode);
        if (held <= 0) {
            return held;
        }
        if (parent <= 0 || holds_socket(parent, &inode, 1, NULL) != 1) {
            return 1;
        }
        for (size_t i = 0; i < count; i++) {
            if (inodes[i] == inode) {
                inodes[i] = inodes[--count];
                break;
            }
        }
    }
    return 0;
}

int
mt_os_proc_parent(long pid, long *ppid)
{
    char path[64], buf[2048];
    snprintf(path, sizeof path, "/proc/%ld/stat", pid);
    if (read_small(path, buf, sizeof buf) <= 0) {
        return -1;
    }
    char *p = strrchr(buf, ')'); /* "pid (comm) S ppid ...": comm may hold anything */
    char state;
    if (p == NULL || sscanf(p + 1, " %c %ld", &state, ppid) != 2) {
        return -1;
    }
    return 0;
}

int
mt_os_proc_exit_status(long pid, int *exit_code, int *exit_signal)
{
    char path[64], buf[2048];
    snprintf(path, sizeof path, "/proc/%ld/stat", pid);
    if (read_small(path, buf, sizeof buf) <= 0) {
        return 0;
    }
    /* "pid (comm) S ...": the comm may hold spaces and parentheses. */
    char *p = strrchr(buf, ')');
    if (p == NULL || p[1] != ' ' || p[2] != 'Z') {
        return 0;
    }
    p += 2; /* field 3, the state */
    long status = -1;
    for (int field = 3; field < 52 && p != NULL; field++) {
        p = strchr(p, ' ');
        p = p ? p + 1 : NULL;
    }
    if (p == NULL || sscanf(p, "%ld", &status) != 1 || status < 0) {
        return 0;
    }
    *exit_code = -1;
    *exit_signal = -1;
    if (WIFSIGNALED((int)status)) {
        *exit_signal = WTERMSIG((int)status);
    }
    else {
        *exit_code = WEXITSTATUS((int)status);
    }
    return 1;
}

int
mt_os_oom_counter_file(long pid, char *file, size_t size)
{
    char path[64], buf[4096];
    snprintf(path, sizeof path, "/proc/%ld/cgroup", pid);
    if (read_small(path, buf, sizeof buf) <= 0) {
        return -1;
    }
    /* v1 "N:memory:/path" (or "N:...,memory,...:/path"), v2 "0::/path". */
    char *v1 = NULL, *v2 = NULL;
    for (char *line = strtok(buf, "\n"); line != NULL; line = strtok(NULL, "\n")) {
        char *controllers = strchr(line, ':');
        char *where = controllers ? strchr(controllers + 1, ':') : NULL;
        if (where == NULL) {
            continue;
        }
        *where++ = '\0';
        controllers++;
        if (controllers[0] == '\0') {
            v2 = where;
        }
        for (char *c = controllers; v1 == NULL && c != NULL; c = strchr(c, ',')) {
            c += c[0] == ',';
            if (strncmp(c, "memory", 6) == 0 && (c[6] == '\0' || c[6] == ',')) {
                v1 = where;
            }
        }
    }
    if (v1 != NULL) {
        snprintf(file, size, "/sys/fs/cgroup/memory%s/memory.oom_control",
                 strcmp(v1, "/") == 0 ? "" : v1);
        if (mt_os_oom_kills(file) >= 0) {
            return 0;
        }
    }
    if (v2 != NULL) {
        snprintf(file, size, "/sys/fs/cgroup%s/memory.events", strcmp(v2, "/") == 0 ? "" : v2);
        if (mt_os_oom_kills(file) >= 0) {
            return 0;
        }
    }
    snprintf(file, size, "/proc/vmstat");
    return 0;
}

int64_t
mt_os_oom_kills(const char *file)
{
    char buf[8192];
    if (read_small(file, buf, sizeof buf) <= 0) {
        return -1;
    }
    for (char *p = buf; (p = strstr(p, "oom_kill ")) != NULL; p++) {
        if (p == buf || p[-1] == '\n') {
            return strtoll(p + 9, NULL, 10);
        }
    }
    return -1;
}
