/*
 * macOS readings: task_info (MACH_TASK_BASIC_INFO, TASK_VM_INFO's
 * phys_footprint), proc_pid_rusage and proc_pidinfo for other processes,
 * malloc_zone_statistics for the heap, POSIX shm_open/mmap for the worker
 * table and kqueue EVFILT_PROC as the pidfd. Plain C11, no Python.
 *
 * UNTESTED: never compiled against the macOS SDK nor run. Here (Linux) only
 * the POSIX parts are syntax-checked, with -DMT_MACOS_SYNTAX_CHECK
 * (tests/test_platform_macos.py); the Mach, libproc, malloc-zone and kqueue
 * parts below `#ifdef __APPLE__` have not been compiled at all. See
 * README.md for what each reading is.
 */
#if defined(__APPLE__) || defined(MT_MACOS_SYNTAX_CHECK)

#ifdef MT_MACOS_SYNTAX_CHECK
#define _DEFAULT_SOURCE /* glibc: the BSD names macOS has by default */
#endif
#include "../platform.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#ifdef __APPLE__
#include <libproc.h>
#include <mach/mach.h>
#include <malloc/malloc.h>
#include <sys/event.h>
#include <sys/proc.h> /* SZOMB */
#include <sys/proc_info.h>
#include <sys/sysctl.h>
#endif

/* Written by mt_os_init() (under the GIL, before any reader thread) and by
 * the at-fork child handler (one thread alive); read-only otherwise. */
static struct {
    long page_size;
    long pid;
} os = {4096, 0};

/* ------------------------------------------------------------------------ */
/* The POSIX part (syntax-checked on Linux).                                */

int
mt_os_init(mt_oserr *e)
{
    (void)e;
    long page = sysconf(_SC_PAGESIZE);
    os.page_size = page > 0 ? page : 4096;
    os.pid = (long)getpid();
    return 0;
}

/* Nothing is kept open: mach_task_self() is valid in a forked child. */
void
mt_os_after_fork_child(void)
{
    os.pid = (long)getpid();
}

int
mt_os_register_atfork(void (*prepare)(void), void (*parent)(void), void (*child)(void))
{
    return pthread_atfork(prepare, parent, child);
}

static double
clock_seconds(clockid_t clock)
{
    struct timespec ts;
    clock_gettime(clock, &ts); /* macOS 10.12+ */
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

double
mt_os_monotonic(void)
{
    return clock_seconds(CLOCK_MONOTONIC);
}

double
mt_os_wall_time(void)
{
    return clock_seconds(CLOCK_REALTIME);
}

long
mt_os_pid(void)
{
    return os.pid ? os.pid : (long)getpid();
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

/* No pid namespaces on macOS: one pid space per machine. */
uint64_t
mt_os_pid_namespace(void)
{
    return 0;
}

int
mt_os_random(void *buf, size_t n, mt_oserr *e)
{
    (void)e;
    arc4random_buf(buf, n); /* cannot fail */
    return 0;
}

/* macOS does not enforce RLIMIT_AS (setrlimit accepts it, nothing checks
 * it) and has no other per-process memory limit to read. */
int
mt_os_memory_limit(mt_memory_limit *m, mt_oserr *e)
{
    (void)m;
    (void)e;
    return 0;
}

int
mt_os_pid_exists(long pid)
{
    return kill((pid_t)pid, 0) == 0 || errno == EPERM;
}

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

void
mt_os_close(int fd)
{
    if (fd >= 0) {
        close(fd);
    }
}

/* 1 while the process runs: the kqueue of mt_os_pidfd_open() turns
 * readable once NOTE_EXIT is pending, and poll() never dequeues it, so a
 * dead process stays dead for every later ask (as a Linux pidfd); so does
 * the watch set below, which waits for that readability. */
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

/* ------------------------------------------------------------------------ */
/* Shared segments: POSIX shm, with three macOS differences handled here.   */

/*
 * - A shm name holds at most 31 bytes (PSHMNAMLEN) and memtrack's are
 *   longer: a longer name maps to "/mt" and 26 hex digits of two FNV-1a
 *   hashes of it, the same in every process. The random part of the name
 *   stays in the hash, and O_EXCL keeps anyone from taking it over first.
 * - fstat() reports a shm object's size rounded up to whole pages, and
 *   ftruncate() works only once: the segment starts with one page that
 *   records the size the creator asked for; callers see the bytes after it,
 *   and offsets and sizes are those of the caller's bytes.
 * - read() and pread() do not work on a shm descriptor: mt_os_pread maps.
 * The size cannot change after the first ftruncate(), so no mapping can
 * lose its pages under a reader (mt_os_guarded has nothing to catch).
 */
#define SHM_NAME_MAX 31
#define SEG_PREFIX 4096u
#define SEG_MAGIC "MTSEGMAC"

typedef struct {
    char magic[8];
    uint64_t size; /* the size asked for, without this prefix */
} seg_prefix;

static const char *
shm_name(const char *name, char *out, size_t out_len)
{
    if (strlen(name) <= SHM_NAME_MAX) {
        return name;
    }
    uint64_t a = 0xcbf29ce484222325ull, b = 0x84222325cbf29ce4ull;
    for (const unsigned char *p = (const unsigned char *)name; *p; p++) {
        a = (a ^ *p) * 0x100000001b3ull;
        b = (b ^ *p) * 0x100000001b3ull + 1;
    }
    snprintf(out, out_len, "/mt%016llx%010llx", (unsigned long long)a,
             (unsigned long long)(b & 0xffffffffffull));
    return out;
}

int
mt_os_shm_create(const char *name, size_t size, void **addr, int *fd_out, mt_oserr *e)
{
    char short_name[SHM_NAME_MAX + 1];
    const char *path = shm_name(name, short_name, sizeof short_name);
    if (size > (size_t)-1 - SEG_PREFIX) {
        return mt_fail(e, "ftruncate", name, ENOMEM);
    }
    int fd = shm_open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd < 0) {
        return mt_fail(e, "shm_open", name, errno);
    }
    size_t total = size + SEG_PREFIX;
    if (ftruncate(fd, (off_t)total) != 0) {
        int err = errno;
        close(fd);
        shm_unlink(path);
        return mt_fail(e, "ftruncate", name, err);
    }
    char *p = mmap(NULL, total, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) {
        int err = errno;
        close(fd);
        shm_unlink(path);
        return mt_fail(e, "mmap", name, err);
    }
    seg_prefix *h = (seg_prefix *)p;
    memcpy(h->magic, SEG_MAGIC, sizeof h->magic);
    h->size = size;
    if (fd_out != NULL) {
        *fd_out = fd;
    }
    else {
        close(fd);
    }
    *addr = p + SEG_PREFIX;
    return 0;
}

/* The size the creator recorded in the first page; 0 when there is none. */
static uint64_t
recorded_size(int fd, uint64_t file_size)
{
    uint64_t size = 0;
    if (file_size < SEG_PREFIX) {
        return 0;
    }
    const seg_prefix *h = mmap(NULL, SEG_PREFIX, PROT_READ, MAP_SHARED, fd, 0);
    if (h == MAP_FAILED) {
        return 0;
    }
    if (memcmp(h->magic, SEG_MAGIC, sizeof h->magic) == 0 && h->size <= file_size - SEG_PREFIX) {
        size = h->size;
    }
    munmap((void *)h, SEG_PREFIX);
    return size;
}

int
mt_os_fd_info(int fd, mt_file_info *info)
{
    struct stat st;
    if (fstat(fd, &st) != 0) {
        return -1;
    }
    uint64_t file_size = st.st_size > 0 ? (uint64_t)st.st_size : 0;
    info->size = recorded_size(fd, file_size);
    info->uid = (uint32_t)st.st_uid;
    info->mode = (uint32_t)(st.st_mode & 07777);
    /* Not from st_mode: macOS does not document S_IFREG for a shm object,
     * and a descriptor shm_open() gave is one (the shm namespace holds no
     * FIFOs or devices). */
    info->regular = 1;
    return 0;
}

int
mt_os_shm_open(const char *name, int *fd_out, mt_file_info *info, mt_oserr *e)
{
    char short_name[SHM_NAME_MAX + 1];
    int fd = shm_open(shm_name(name, short_name, sizeof short_name), O_RDWR | O_CLOEXEC, 0);
    if (fd < 0) {
        return mt_fail(e, "shm_open", name, errno);
    }
    if (mt_os_fd_info(fd, info) != 0) {
        int err = errno;
        close(fd);
        return mt_fail(e, "fstat", name, err);
    }
    *fd_out = fd;
    return 0;
}

int
mt_os_shm_map(int fd, size_t size, void **addr, const char *name, mt_oserr *e)
{
    if (size > (size_t)-1 - SEG_PREFIX) {
        return mt_fail(e, "mmap", name, ENOMEM);
    }
    char *p = mmap(NULL, size + SEG_PREFIX, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) {
        return mt_fail(e, "mmap", name, errno);
    }
    *addr = p + SEG_PREFIX;
    return 0;
}

long
mt_os_pread(int fd, void *buf, size_t n, uint64_t offset)
{
    mt_file_info info;
    if (mt_os_fd_info(fd, &info) != 0) {
        return -1;
    }
    if (offset >= info.size || n == 0) {
        return 0;
    }
    if (n > info.size - offset) {
        n = (size_t)(info.size - offset);
    }
    size_t span = (size_t)(SEG_PREFIX + offset + n);
    char *p = mmap(NULL, span, PROT_READ, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) {
        return -1;
    }
    memcpy(buf, p + SEG_PREFIX + offset, n);
    munmap(p, span);
    return (long)n;
}

void
mt_os_shm_detach(void *addr, size_t size)
{
    if (addr != NULL) {
        munmap((char *)addr - SEG_PREFIX, size + SEG_PREFIX);
    }
}

int
mt_os_shm_unlink(const char *name, mt_oserr *e)
{
    char short_name[SHM_NAME_MAX + 1];
    if (shm_unlink(shm_name(name, short_name, sizeof short_name)) != 0 && errno != ENOENT) {
        return mt_fail(e, "shm_unlink", name, errno);
    }
    return 0;
}

/* macOS's POSIX shared memory has no directory to list: no table can be
 * found without its name (memtrack top then asks for the NAME). */
int
mt_os_shm_list(const char *prefix, mt_os_shm_fn fn, void *ctx, mt_oserr *e)
{
    (void)prefix;
    (void)fn;
    (void)ctx;
    return mt_fail(e, "listing shared memory", NULL, ENOSYS);
}

int
mt_os_shm_exists(const char *name)
{
    char short_name[SHM_NAME_MAX + 1];
    int fd = shm_open(shm_name(name, short_name, sizeof short_name), O_RDONLY | O_CLOEXEC, 0);
    if (fd >= 0) {
        close(fd);
    }
    return fd >= 0 || errno == EACCES; /* EACCES: it is there, not ours to open */
}

uint32_t
mt_os_uid(void)
{
    return (uint32_t)geteuid();
}

/* A shm object cannot shrink after its first ftruncate(): nothing to catch. */
int
mt_os_guarded(void (*fn)(void *), void *arg)
{
    fn(arg);
    return 0;
}

/* ------------------------------------------------------------------------ */
/* The Mach / libproc part: not compiled anywhere yet.                      */

#ifdef __APPLE__

static int
basic_info(mach_task_basic_info_data_t *info, mt_oserr *e)
{
    mach_msg_type_number_t count = MACH_TASK_BASIC_INFO_COUNT;
    kern_return_t kr =
        task_info(mach_task_self(), MACH_TASK_BASIC_INFO, (task_info_t)info, &count);
    if (kr != KERN_SUCCESS) {
        return mt_fail(e, "task_info", NULL, kr == KERN_INVALID_ARGUMENT ? EINVAL : EIO);
    }
    return 0;
}

static int
vm_info(task_vm_info_data_t *info, mt_oserr *e)
{
    mach_msg_type_number_t count = TASK_VM_INFO_COUNT;
    kern_return_t kr = task_info(mach_task_self(), TASK_VM_INFO, (task_info_t)info, &count);
    if (kr != KERN_SUCCESS) {
        return mt_fail(e, "task_info", NULL, EIO);
    }
    return 0;
}

/* Missing: PSS and shared pages (macOS has no per-page share counts for a
 * process; footprint() reports phys_footprint as uss and pss), swap (the
 * compressor is not per-process swap), the anon/file/shmem split and a
 * reset of resident_size_max. */
unsigned
mt_os_missing(void)
{
    return MT_LACKS_PSS | MT_LACKS_SWAP | MT_LACKS_RSS_SPLIT | MT_LACKS_PEAK_RESET;
}

int
mt_os_trim(void)
{
    return malloc_zone_pressure_relief(NULL, 0) > 0;
}

int
mt_os_rss(uint64_t *rss, mt_oserr *e)
{
    mach_task_basic_info_data_t info;
    if (basic_info(&info, e) < 0) {
        return -1;
    }
    *rss = (uint64_t)info.resident_size;
    return 0;
}

/* resident_size_max is the kernel's own mark, never stale, never reset. */
int
mt_os_hwm(uint64_t *hwm, mt_oserr *e)
{
    mach_task_basic_info_data_t info;
    if (basic_info(&info, e) < 0) {
        return -1;
    }
    *hwm = (uint64_t)info.resident_size_max;
    return 0;
}

int
mt_os_hwm_exact(uint64_t *hwm, uint64_t *rss, mt_oserr *e)
{
    return (mt_os_hwm(hwm, e) < 0 || mt_os_rss(rss, e) < 0) ? -1 : 0;
}

int
mt_os_reset_hwm(mt_oserr *e)
{
    return mt_fail(e, "reset of resident_size_max", NULL, ENOSYS);
}

int
mt_os_heap(uint64_t *used, uint64_t *free_bytes)
{
    malloc_statistics_t st;
    malloc_zone_statistics(NULL, &st); /* every zone */
    *used = (uint64_t)st.size_in_use;
    *free_bytes = st.size_allocated > st.size_in_use
                      ? (uint64_t)(st.size_allocated - st.size_in_use)
                      : 0;
    return 0;
}

int
mt_os_sample(mt_sample *s, mt_oserr *e)
{
    mach_task_basic_info_data_t info;
    struct rusage ru;
    memset(s, 0, sizeof *s);
    s->time = mt_os_monotonic();
    if (basic_info(&info, e) < 0) {
        return -1;
    }
    s->rss = (uint64_t)info.resident_size;
    s->peak_rss = (uint64_t)info.resident_size_max;
    s->vms = (uint64_t)info.virtual_size;
    if (getrusage(RUSAGE_SELF, &ru) != 0) {
        return mt_fail(e, "getrusage", NULL, errno);
    }
    s->minor_faults = (uint64_t)ru.ru_minflt;
    s->major_faults = (uint64_t)ru.ru_majflt;
    mt_os_heap(&s->heap_used, &s->heap_free);
    return 0;
}

/* phys_footprint is what Activity Monitor calls Memory: the dirty private
 * memory charged to the process (compressed included). It stands for uss
 * and pss; shared is unknown (MT_LACKS_PSS). */
int
mt_os_footprint(mt_footprint *fp, mt_oserr *e)
{
    task_vm_info_data_t info;
    if (vm_info(&info, e) < 0) {
        return -1;
    }
    fp->uss = fp->pss = (uint64_t)info.phys_footprint;
    fp->shared = 0;
    return 0;
}

/* Identity: the start time in microseconds since the epoch, from the BSD
 * info of the process; SZOMB is the zombie state. */
int
mt_os_proc_identity(long pid, uint64_t *start_time)
{
    struct proc_bsdinfo info;
    int n = proc_pidinfo((pid_t)pid, PROC_PIDTBSDINFO, 0, &info, (int)sizeof info);
    if (n != (int)sizeof info) {
        return MT_PROC_GONE;
    }
    *start_time = (uint64_t)info.pbi_start_tvsec * 1000000u + (uint64_t)info.pbi_start_tvusec;
    return info.pbi_status == SZOMB ? MT_PROC_ZOMBIE : MT_PROC_ALIVE;
}

int
mt_os_footprint_of(long pid, mt_footprint *fp, mt_oserr *e)
{
    struct rusage_info_v2 ri;
    if (proc_pid_rusage((pid_t)pid, RUSAGE_INFO_V2, (rusage_info_t *)&ri) != 0) {
        return mt_fail(e, "proc_pid_rusage", NULL, errno);
    }
    fp->uss = fp->pss = (uint64_t)ri.ri_phys_footprint;
    fp->shared = 0;
    return 0;
}

/* Another process's peak: ri_lifetime_max_phys_footprint (the footprint's
 * mark, not the resident one's, which libproc does not give). */
int
mt_os_proc_memory(long pid, uint64_t *rss, uint64_t *hwm, uint64_t *anon)
{
    struct rusage_info_v4 ri;
    *anon = 0; /* libproc does not split the resident size by kind */
    if (proc_pid_rusage((pid_t)pid, RUSAGE_INFO_V4, (rusage_info_t *)&ri) != 0) {
        return -1;
    }
    *rss = (uint64_t)ri.ri_resident_size;
    *hwm = (uint64_t)ri.ri_lifetime_max_phys_footprint;
    if (*hwm < *rss) {
        *hwm = *rss;
    }
    return 0;
}

int
mt_os_proc_parent(long pid, long *ppid)
{
    struct proc_bsdinfo info;
    if (proc_pidinfo((pid_t)pid, PROC_PIDTBSDINFO, 0, &info, (int)sizeof info) !=
        (int)sizeof info) {
        return -1;
    }
    *ppid = (long)info.pbi_ppid;
    return 0;
}

int
mt_os_children(long pid, long *out, size_t *n, size_t max)
{
    pid_t pids[1024];
    int bytes = proc_listpids(PROC_PPID_ONLY, (uint32_t)pid, pids, (int)sizeof pids);
    if (bytes < 0) {
        return -1;
    }
    for (int i = 0; i < bytes / (int)sizeof(pid_t) && *n < max; i++) {
        if (pids[i] > 0) {
            out[(*n)++] = (long)pids[i];
        }
    }
    return 0;
}

/* The pidfd of macOS: a kqueue watching the process for NOTE_EXIT. -1 when
 * the process is gone (ESRCH) or no kqueue can be had. */
int
mt_os_pidfd_open(long pid)
{
    int kq = kqueue();
    if (kq < 0) {
        return -1;
    }
    fcntl(kq, F_SETFD, FD_CLOEXEC);
    struct kevent ev;
    EV_SET(&ev, (uintptr_t)pid, EVFILT_PROC, EV_ADD, NOTE_EXIT, 0, NULL);
    if (kevent(kq, &ev, 1, NULL, 0, NULL) != 0) {
        int err = errno;
        close(kq);
        errno = err;
        return -1;
    }
    return kq;
}

/* RAM plus swap in use and free (vm.swapusage), rounded up to a power of
 * two; 0 when unknown. */
uint64_t
mt_os_memory_bound(void)
{
    uint64_t ram = 0;
    size_t len = sizeof ram;
    if (sysctlbyname("hw.memsize", &ram, &len, NULL, 0) != 0) {
        return 0;
    }
    struct xsw_usage swap;
    len = sizeof swap;
    uint64_t total = ram;
    if (sysctlbyname("vm.swapusage", &swap, &len, NULL, 0) == 0) {
        total += (uint64_t)swap.xsu_total;
    }
    uint64_t bound = 1u << 20;
    while (bound < total && bound < (UINT64_C(1) << 62)) {
        bound <<= 1;
    }
    return bound;
}

/* The watch set: a kqueue that waits for each watch's kqueue to turn
 * readable (EVFILT_READ, level-triggered: a dead owner stays ready until
 * it is removed, as in an epoll set of pidfds). */
int
mt_os_epoll_new(void)
{
    int kq = kqueue();
    if (kq >= 0) {
        fcntl(kq, F_SETFD, FD_CLOEXEC);
    }
    return kq;
}

int
mt_os_epoll_add(int ep, int fd, uint64_t key)
{
    struct kevent ev;
    EV_SET(&ev, (uintptr_t)fd, EVFILT_READ, EV_ADD, 0, 0, (void *)(uintptr_t)key);
    return kevent(ep, &ev, 1, NULL, 0, NULL) == 0 ? 0 : -1;
}

void
mt_os_epoll_del(int ep, int fd)
{
    struct kevent ev;
    EV_SET(&ev, (uintptr_t)fd, EVFILT_READ, EV_DELETE, 0, 0, NULL);
    kevent(ep, &ev, 1, NULL, 0, NULL);
}

int
mt_os_epoll_ready(int ep, uint64_t *keys, int max)
{
    struct kevent ev[64];
    struct timespec zero = {0, 0};
    int total = 0;
    while (total < max) {
        int want = max - total < 64 ? max - total : 64;
        int r;
        do {
            r = kevent(ep, NULL, 0, ev, want, &zero);
        } while (r < 0 && errno == EINTR);
        if (r < 0) {
            return total ? total : -1;
        }
        for (int i = 0; i < r; i++) {
            keys[total++] = (uint64_t)(uintptr_t)ev[i].udata;
        }
        if (r < want) {
            break;
        }
    }
    return total;
}

#endif /* __APPLE__ */

/* What a process runs, what it listens on, a zombie's status and the OOM
 * killer's counters are read from Linux's /proc and cgroups; this port does
 * not read them (macOS has jetsam, not an OOM-kill counter), so the recorder
 * decides roles from the parent relation alone (docs/report.md, "Roles"). */
long
mt_os_proc_cmdline(long pid, char *buf, size_t size)
{
    (void)pid;
    if (size > 0) {
        buf[0] = '\0';
    }
    return -1;
}

int
mt_os_proc_listens(long pid, long parent)
{
    (void)pid;
    (void)parent;
    return -1;
}

int
mt_os_proc_exit_status(long pid, int *exit_code, int *exit_signal)
{
    (void)pid;
    (void)exit_code;
    (void)exit_signal;
    return 0;
}

int
mt_os_oom_counter_file(long pid, char *file, size_t size)
{
    (void)pid;
    if (size > 0) {
        file[0] = '\0';
    }
    return -1;
}

int64_t
mt_os_oom_kills(const char *file)
{
    (void)file;
    return -1;
}

#endif /* __APPLE__ || MT_MACOS_SYNTAX_CHECK */
