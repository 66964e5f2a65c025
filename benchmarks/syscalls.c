/*
 * The raw cost of the OS primitives memtrack._core is built on, measured in
 * C so that no interpreter overhead is included. bench_core.py compiles this
 * into a temporary directory (cc -O2) and runs it; it bounds what any
 * Python-callable reading can cost.
 *
 * For each primitive: BATCHES batches of N calls, timed with
 * clock_gettime(CLOCK_MONOTONIC) around the whole batch; prints the median
 * per-call time of the batches, one line per primitive:
 *     name<TAB>median_ns<TAB>min_ns<TAB>max_ns
 *
 * usage: syscalls [N [BATCHES]]   (defaults 20000, 11)
 *        syscalls --seq NAME N BATCHES
 *            one sequence only (bare5, bare3, status), for bench_phase.py, which runs it
 *            between its own Python batches so that both share the machine's state;
 *            timed in CPU time (CLOCK_PROCESS_CPUTIME_ID), as bench_phase.py times them
 *
 * Nothing is subtracted: each number includes its share of the loop
 * (a few ns) and of the parse where the name says "+parse".
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <malloc.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static int fd_statm = -1, fd_status = -1, fd_clear = -1;
static volatile uint64_t sink;
static long page_size;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;

/* --seq times CPU time (user + system) of this process, as bench_phase.py does for
 * its Python batches: on a loaded machine, wall time counts the others' time slices. */
static clockid_t timer_clock = CLOCK_MONOTONIC;

static uint64_t
now_ns(void)
{
    struct timespec ts;
    clock_gettime(timer_clock, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void
die(const char *what)
{
    fprintf(stderr, "syscalls: %s: %s\n", what, strerror(errno));
    exit(1);
}

/* ---- the primitives (one call each) ------------------------------------ */

static void
p_empty(void)
{
    sink++;
}

static void
p_clock_gettime(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    sink += (uint64_t)ts.tv_nsec;
}

static void
p_getpid(void)
{
    sink += (uint64_t)syscall(SYS_getpid);
}

static void
p_mutex(void)
{
    pthread_mutex_lock(&lock);
    sink++;
    pthread_mutex_unlock(&lock);
}

static void
p_pread_statm(void)
{
    char buf[128];
    ssize_t n = pread(fd_statm, buf, sizeof buf - 1, 0);
    if (n <= 0) die("pread statm");
    sink += (uint64_t)n;
}

static void
p_pread_statm_parse(void)
{
    char buf[128];
    unsigned long long size, resident;
    ssize_t n = pread(fd_statm, buf, sizeof buf - 1, 0);
    if (n <= 0) die("pread statm");
    buf[n] = '\0';
    if (sscanf(buf, "%llu %llu", &size, &resident) != 2) die("parse statm");
    sink += resident * (uint64_t)page_size;
}

static void
p_open_read_close_statm(void)
{
    char buf[128];
    int fd = open("/proc/self/statm", O_RDONLY | O_CLOEXEC);
    if (fd < 0) die("open statm");
    ssize_t n = read(fd, buf, sizeof buf - 1);
    if (n <= 0) die("read statm");
    close(fd);
    sink += (uint64_t)n;
}

static void
p_getrusage(void)
{
    struct rusage ru;
    if (getrusage(RUSAGE_SELF, &ru) != 0) die("getrusage");
    sink += (uint64_t)ru.ru_maxrss;
}

static void
p_clear_refs(void)
{
    if (pwrite(fd_clear, "5", 1, 0) != 1) die("pwrite clear_refs");
}

static void
p_mallinfo2(void)
{
    struct mallinfo2 mi = mallinfo2();
    sink += mi.uordblks;
}

static void
p_pread_status(void)
{
    char buf[8192];
    ssize_t n = pread(fd_status, buf, sizeof buf - 1, 0);
    if (n <= 0) die("pread status");
    sink += (uint64_t)n;
}

static void
p_smaps_rollup(void)
{
    char buf[4096];
    int fd = open("/proc/self/smaps_rollup", O_RDONLY | O_CLOEXEC);
    if (fd < 0) die("open smaps_rollup");
    ssize_t n, total = 0;
    while ((n = read(fd, buf, sizeof buf)) > 0) total += n;
    close(fd);
    sink += (uint64_t)total;
}

/* The system calls of one phase enter+exit in memtrack._core (csrc/phase.c,
 * csrc/peak.c, csrc/platform/linux/linux.c), without Python:
 *   enter: lock, getrusage (the mark about to be lost), clear_refs write,
 *          pread statm, unlock, clock_gettime
 *   exit:  clock_gettime, lock, getrusage, pread statm, unlock
 * (the pid of the record is cached; mallinfo2 only with
 * configure(phase_heap=True)). A nested phase makes the same calls. The
 * statm parse here is sscanf, memtrack's is hand-rolled (cheaper). */
static void
p_phase_sequence(void)
{
    p_mutex();
    p_getrusage();
    p_clear_refs();
    p_pread_statm_parse();
    p_clock_gettime();
    p_clock_gettime();
    p_mutex();
    p_getrusage();
    p_pread_statm_parse();
}

/* The floor of a phase enter+exit: its 5 system calls and nothing else (no
 * parse, no lock, no clock): getrusage (the mark about to be lost),
 * clear_refs, statm (rss at start); getrusage (the peak), statm (rss at end). */
static void
p_bare5(void)
{
    p_getrusage();
    p_clear_refs();
    p_pread_statm();
    p_getrusage();
    p_pread_statm();
}

/* The floor of p.next(): getrusage, clear_refs, statm. */
static void
p_bare3(void)
{
    p_getrusage();
    p_clear_refs();
    p_pread_statm();
}

/* ---- the harness ------------------------------------------------------- */

static int
cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

static void
measure(const char *name, void (*fn)(void), long n, int batches)
{
    uint64_t per[64];
    for (long i = 0; i < n / 10 + 1; i++) fn(); /* warm up */
    for (int b = 0; b < batches; b++) {
        uint64_t t0 = now_ns();
        for (long i = 0; i < n; i++) fn();
        per[b] = now_ns() - t0;
    }
    qsort(per, (size_t)batches, sizeof per[0], cmp_u64);
    printf("%s\t%.1f\t%.1f\t%.1f\n", name, (double)per[batches / 2] / (double)n,
           (double)per[0] / (double)n, (double)per[batches - 1] / (double)n);
    fflush(stdout);
}

static int
main_sequence(int argc, char **argv)
{
    static const struct {
        const char *name;
        void (*fn)(void);
    } seqs[] = {{"bare5", p_bare5}, {"bare3", p_bare3}, {"status", p_pread_status}};
    long n = argc > 3 ? atol(argv[3]) : 2000;
    int batches = argc > 4 ? atoi(argv[4]) : 5;
    if (n < 1) n = 1;
    if (batches < 1) batches = 1;
    if (batches > 64) batches = 64;
    for (size_t i = 0; i < sizeof seqs / sizeof seqs[0]; i++) {
        if (argc > 2 && strcmp(argv[2], seqs[i].name) == 0) {
            measure(seqs[i].name, seqs[i].fn, n, batches);
            return 0;
        }
    }
    fprintf(stderr, "syscalls: --seq takes bare5, bare3 or status\n");
    return 2;
}

int
main(int argc, char **argv)
{
    page_size = sysconf(_SC_PAGESIZE);
    fd_statm = open("/proc/self/statm", O_RDONLY | O_CLOEXEC);
    if (fd_statm < 0) die("open /proc/self/statm");
    fd_status = open("/proc/self/status", O_RDONLY | O_CLOEXEC);
    if (fd_status < 0) die("open /proc/self/status");
    fd_clear = open("/proc/self/clear_refs", O_WRONLY | O_CLOEXEC);
    if (argc > 1 && strcmp(argv[1], "--seq") == 0) {
        if (fd_clear < 0) die("open /proc/self/clear_refs");
        timer_clock = CLOCK_PROCESS_CPUTIME_ID;
        return main_sequence(argc, argv);
    }
    long n = argc > 1 ? atol(argv[1]) : 20000;
    int batches = argc > 2 ? atoi(argv[2]) : 11;
    if (n < 1) n = 1;
    if (batches < 1) batches = 1;
    if (batches > 64) batches = 64;

    measure("empty_loop", p_empty, n, batches);
    measure("clock_gettime(MONOTONIC)", p_clock_gettime, n, batches);
    measure("mutex lock+unlock", p_mutex, n, batches);
    measure("getpid() (a null syscall)", p_getpid, n, batches);
    measure("pread /proc/self/statm (kept-open fd)", p_pread_statm, n, batches);
    measure("pread /proc/self/statm +parse", p_pread_statm_parse, n, batches);
    measure("open+read+close /proc/self/statm", p_open_read_close_statm, n, batches);
    measure("getrusage(RUSAGE_SELF)", p_getrusage, n, batches);
    if (fd_clear >= 0) {
        measure("pwrite 5 > /proc/self/clear_refs", p_clear_refs, n, batches);
    }
    else {
        printf("pwrite 5 > /proc/self/clear_refs\tnan\tnan\tnan\n");
    }
    measure("pread /proc/self/status (8 KiB buf)", p_pread_status, n, batches);
    measure("open+read+close /proc/self/smaps_rollup", p_smaps_rollup, n / 10 + 1, batches);

    char name[96];
    struct mallinfo2 mi = mallinfo2();
    snprintf(name, sizeof name, "mallinfo2() [%zu+%zu free chunks]", mi.ordblks, mi.smblks);
    measure(name, p_mallinfo2, n, batches);
    if (fd_clear >= 0) {
        measure("SEQUENCE: phase enter+exit", p_phase_sequence, n / 4 + 1, batches);
    }

    /* A fragmented heap: many free chunks of many sizes in glibc's bins. */
    enum { NBLOCKS = 4096 };
    static void *blocks[NBLOCKS];
    for (int i = 0; i < NBLOCKS; i++) blocks[i] = malloc((size_t)(16 + (i * 37) % 2000));
    for (int i = 0; i < NBLOCKS; i += 2) free(blocks[i]);
    mi = mallinfo2();
    snprintf(name, sizeof name, "mallinfo2() [%zu+%zu free chunks]", mi.ordblks, mi.smblks);
    measure(name, p_mallinfo2, n, batches);
    return 0;
}
