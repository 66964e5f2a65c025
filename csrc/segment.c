/*
 * The worker table: one POSIX shared-memory segment per pool. Every worker
 * claims one fixed-size slot and is its only writer while it lives; the
 * parent reads all slots live and after the workers die.
 *
 * Writes are lock-free across processes: a per-slot sequence counter is odd
 * while the slot is being written, and a reader retries until it copies the
 * slot between two equal even counts. A worker never waits for a reader.
 * Inside one worker, the threads that write the slot (phase enter/exit, the
 * heartbeat) are serialised by mt_phase_lock.
 *
 * The layout below is part of the file format (docs/internals.md); the
 * static asserts keep it from drifting.
 */
#include "memtrack.h"

#include <stddef.h>
#include <string.h>

#define SEG_MAGIC "MEMTRACK"
#define SEG_VERSION 1u
#define SEG_HEADER_SIZE 256u
#define SLOT_SIZE 8192u
#define SLOT_PHASES 48u
#define SLOT_PATH 256u
#define SUMMARY_PATH 112u
#define MAX_CAPACITY 4096u
#define READ_RETRIES 20000
#define READ_PATIENCE 0.05 /* seconds a reader waits for an odd count */
#define FOOTPRINT_EVERY 10 /* heartbeats between uss/pss readings */

typedef struct {
    char magic[8];        /* "MEMTRACK", no NUL */
    uint32_t version;     /* SEG_VERSION */
    uint32_t header_size; /* SEG_HEADER_SIZE */
    uint32_t capacity;    /* slots */
    uint32_t slot_size;   /* SLOT_SIZE */
    int64_t creator_pid;
    uint64_t creator_start; /* clock ticks since boot (/proc/<pid>/stat) */
    double created;         /* unix time */
    uint32_t heartbeat_ms;  /* workers' heartbeat interval; 0: off */
    uint32_t slot_phases;   /* SLOT_PHASES */
    uint64_t creator_pidns; /* the creator's pid namespace: pids mean nothing elsewhere */
    uint8_t reserved[192];
} mt_seg_header;

typedef struct {
    char path[SUMMARY_PATH]; /* NUL-terminated; longer paths are cut */
    uint64_t count;
    double total_time;
    uint64_t max_peak_rss;
    uint64_t max_peak_delta;
    int64_t total_rss_delta;
    uint64_t reserved;
} mt_slot_phase;

enum { SLOT_FREE = 0, SLOT_IDLE = 1, SLOT_RUNNING = 2, SLOT_EXITED = 3, SLOT_KILLED = 4 };
enum {
    FLAG_PHASE_CUT = 1,   /* phase[] holds a truncated path */
    FLAG_EXIT_CODE = 2,   /* exit_code is known */
    FLAG_EXIT_SIGNAL = 4, /* exit_signal is known */
};

typedef struct {
    _Atomic uint64_t seq;  /* odd while being written */
    _Atomic int64_t owner; /* claim word: the owner's pid, 0 when free */
    int64_t pid;
    uint64_t start_time; /* the owner's start, ticks since boot */
    uint32_t state;      /* SLOT_* */
    uint32_t flags;      /* FLAG_* */
    uint64_t rss, peak_rss, uss, pss, heap_used, tasks;
    double updated; /* CLOCK_MONOTONIC seconds (system-wide) */
    double joined;
    uint32_t depth;
    int32_t exit_code;
    int32_t exit_signal;
    uint32_t nphases;        /* used entries of phases[] */
    uint64_t phase_overflow; /* phase ends whose path found no free entry */
    char phase[SLOT_PATH];   /* current phase path, NUL-terminated */
    mt_slot_phase phases[SLOT_PHASES];
    uint64_t last_task_rss; /* rss when the last task (outermost phase) ended */
    double last_task_time;  /* its CLOCK_MONOTONIC time */
    /* The largest peak since a recorder last took it: raised by the owner,
     * swapped to 0 by a recorder (memtrack.record). */
    _Atomic uint64_t window_peak;
    uint8_t reserved[SLOT_SIZE - 8088];
} mt_slot;

static_assert(sizeof(mt_seg_header) == SEG_HEADER_SIZE, "header size");
static_assert(offsetof(mt_seg_header, capacity) == 16, "header layout");
static_assert(offsetof(mt_seg_header, creator_pid) == 24, "header layout");
static_assert(offsetof(mt_seg_header, heartbeat_ms) == 48, "header layout");
static_assert(offsetof(mt_seg_header, creator_pidns) == 56, "header layout");
static_assert(sizeof(mt_slot_phase) == 160, "phase entry size");
static_assert(sizeof(mt_slot) == SLOT_SIZE && SLOT_SIZE == MT_SLOT_BYTES, "slot size");
static_assert(offsetof(mt_slot, owner) == 8, "slot layout");
static_assert(offsetof(mt_slot, state) == 32, "slot layout");
static_assert(offsetof(mt_slot, rss) == 40, "slot layout");
static_assert(offsetof(mt_slot, updated) == 88, "slot layout");
static_assert(offsetof(mt_slot, nphases) == 116, "slot layout");
static_assert(offsetof(mt_slot, phase) == 128, "slot layout");
static_assert(offsetof(mt_slot, phases) == 384, "slot layout");
static_assert(offsetof(mt_slot, last_task_rss) == 8064, "slot layout");
static_assert(offsetof(mt_slot, window_peak) == 8080, "slot layout");
static_assert(sizeof(_Atomic uint64_t) == 8 && sizeof(_Atomic int64_t) == 8, "atomics");

#define SEG_SIZE(cap) ((size_t)SEG_HEADER_SIZE + (size_t)(cap)*SLOT_SIZE)
#define SLOT_AT(h, i) ((mt_slot *)((char *)(h) + SEG_HEADER_SIZE + (size_t)(i)*SLOT_SIZE))

/* ------------------------------------------------------------------------ */
/* Sequence counter                                                          */

/* The owner's writes: it is the only writer while alive (phase_lock held). */
static void
write_begin(mt_slot *s)
{
    uint64_t q = atomic_load_explicit(&s->seq, memory_order_relaxed);
    atomic_store_explicit(&s->seq, (q | 1u), memory_order_relaxed);
    atomic_thread_fence(memory_order_release);
}

static void
write_end(mt_slot *s)
{
    uint64_t q = atomic_load_explicit(&s->seq, memory_order_relaxed);
    atomic_store_explicit(&s->seq, q + 1, memory_order_release);
}

/* Writes by another process (a reader recording a death, a claimant taking
 * over a dead slot): take the counter from even to odd with a CAS, so two
 * such writers never interleave. Gives up rather than wait long. */
static int
foreign_write_begin(mt_slot *s)
{
    for (int i = 0; i < READ_RETRIES; i++) {
        uint64_t q = atomic_load_explicit(&s->seq, memory_order_acquire);
        if (i == READ_RETRIES - 1 && (q & 1u)) {
            /* Odd for good: its writer died mid-write. Take it over. */
            if (atomic_compare_exchange_strong(&s->seq, &q, q + 2)) {
                atomic_thread_fence(memory_order_release);
                return 0;
            }
        }
        if (!(q & 1u) && atomic_compare_exchange_weak(&s->seq, &q, q + 1)) {
            atomic_thread_fence(memory_order_release);
            return 0;
        }
    }
    return -1;
}

/* Copy a consistent slot. A writer can be preempted mid-write, so after a
 * short spin the reader sleeps between tries, for up to READ_PATIENCE
 * seconds. Returns 0, or -1 when the count stayed odd that long (its writer
 * died mid-write): the copy is then the last state, possibly torn. */
static int
read_slot(const mt_slot *s, mt_slot *out)
{
    double give_up = 0;
    for (int i = 0;; i++) {
        uint64_t q1 = atomic_load_explicit(&s->seq, memory_order_acquire);
        if (q1 & 1u) {
            if (i < 200) {
                continue;
            }
            double now = mt_os_monotonic();
            if (give_up == 0) {
                /* No process to finish the write: do not wait for one. */
                int64_t owner = atomic_load_explicit(&s->owner, memory_order_relaxed);
                if (owner <= 0 || owner > (1 << 30) || !mt_os_pid_exists((long)owner)) {
                    break;
                }
                give_up = now + READ_PATIENCE;
            }
            else if (now > give_up) {
                break;
            }
            mt_os_sleep(20e-6);
            continue;
        }
        memcpy((char *)out, (const char *)s, offsetof(mt_slot, phases));
        uint32_t n = out->nphases < SLOT_PHASES ? out->nphases : SLOT_PHASES;
        memcpy(out->phases, s->phases, n * sizeof(mt_slot_phase));
        out->last_task_rss = s->last_task_rss;
        out->last_task_time = s->last_task_time;
        atomic_thread_fence(memory_order_acquire);
        uint64_t q2 = atomic_load_explicit(&s->seq, memory_order_relaxed);
        if (q1 == q2) {
            return 0;
        }
    }
    memcpy((char *)out, (const char *)s, sizeof *out);
    return -1;
}

static void
copy_path(char *dst, size_t size, const char *src, size_t len, uint32_t *flags)
{
    if (len >= size) {
        len = size - 1;
        /* Do not split a UTF-8 sequence. */
        while (len > 0 && ((unsigned char)src[len] & 0xC0) == 0x80) {
            len--;
        }
        if (flags) {
            *flags |= FLAG_PHASE_CUT;
        }
    }
    else if (flags) {
        *flags &= ~(uint32_t)FLAG_PHASE_CUT;
    }
    memcpy(dst, src, len);
    memset(dst + len, 0, size - len);
}

static void
raise_window(mt_slot *s, uint64_t value)
{
    uint64_t seen = atomic_load_explicit(&s->window_peak, memory_order_relaxed);
    while (value > seen && !atomic_compare_exchange_weak(&s->window_peak, &seen, value)) {
    }
}

/* ------------------------------------------------------------------------ */
/* Header checks (both sides)                                                 */

/* NULL when the mapping is a usable table; else what is wrong. */
static const char *
check_header(const mt_seg_header *h, size_t size)
{
    if (size < SEG_HEADER_SIZE) {
        return "it is smaller than a table header";
    }
    if (memcmp(h->magic, SEG_MAGIC, 8) != 0) {
        return "it is not a memtrack worker table (wrong magic)";
    }
    if (h->version != SEG_VERSION) {
        return "its layout version is not the one this memtrack reads";
    }
    if (h->header_size != SEG_HEADER_SIZE || h->slot_size != SLOT_SIZE ||
        h->slot_phases != SLOT_PHASES) {
        return "its header or slot size does not match this memtrack";
    }
    if (h->capacity == 0 || h->capacity > MAX_CAPACITY || SEG_SIZE(h->capacity) != size) {
        return "its size does not match its declared capacity";
    }
    return NULL;
}

/* ------------------------------------------------------------------------ */
/* The worker side: this process's own slot.                                  */

/* Process-wide by nature (one slot per process). Protected by
 * mt_phase_lock, except the heartbeat's own lock and flag as noted. */
static struct {
    mt_seg_header *seg;
    size_t size;
    char name[256];
    mt_slot *slot; /* NULL: not joined (or the table was full) */
    uint32_t index;
    uint32_t generation; /* bumps on every claim: invalidates entry caches */
    double heartbeat;    /* seconds; 0 disables */
    int pending_rejoin;  /* forked from a joined process: claim on request */
    /* The heartbeat thread. hb_lock protects hb_stop and the wait. */
    mtx_t hb_lock;
    cnd_t hb_wake;
    int hb_stop;
    int hb_started; /* Protected by phase_lock */
    thrd_t hb_thread;
} wk = {.heartbeat = 0.1};

int
mt_worker_joined_locked(void)
{
    return wk.slot != NULL;
}

uint32_t
mt_worker_generation_locked(void)
{
    return wk.generation;
}

static void
self_identity(long *pid, uint64_t *start)
{
    *pid = mt_os_pid();
    *start = 0;
    mt_os_proc_identity(*pid, start);
}

static void
init_slot(mt_slot *s, long pid, uint64_t start)
{
    /* Fields after the counter and the claim word, zeroed. */
    memset((char *)s + offsetof(mt_slot, pid), 0, sizeof *s - offsetof(mt_slot, pid));
    s->pid = pid;
    s->start_time = start;
    s->state = SLOT_IDLE;
    s->joined = s->updated = mt_os_monotonic();
}

/* A slot's owner is gone (or a later process reuses its pid). */
static int
owner_dead(const mt_slot *copy)
{
    uint64_t start = 0;
    if (copy->pid <= 0) {
        return 1;
    }
    int st = mt_os_proc_identity((long)copy->pid, &start);
    return st != MT_PROC_ALIVE || start != copy->start_time;
}

/* Claim a free slot, else the oldest dead one. phase_lock held. */
static int
claim_locked(mt_seg_header *h, uint32_t *index)
{
    long pid;
    uint64_t start;
    self_identity(&pid, &start);
    for (uint32_t i = 0; i < h->capacity; i++) {
        mt_slot *s = SLOT_AT(h, i);
        int64_t expected = 0;
        if (atomic_load_explicit(&s->owner, memory_order_relaxed) == 0 &&
            atomic_compare_exchange_strong(&s->owner, &expected, (int64_t)pid)) {
            if (foreign_write_begin(s) < 0) {
                atomic_store(&s->owner, 0); /* give the claim back */
                continue;
            }
            init_slot(s, pid, start);
            write_end(s);
            *index = i;
            return 0;
        }
    }
    /* Full: reuse the dead slot that was updated longest ago. */
    for (int attempt = 0; attempt < 4; attempt++) {
        int64_t best_owner = 0;
        uint32_t best = 0;
        double best_updated = 0;
        mt_slot copy;
        for (uint32_t i = 0; i < h->capacity; i++) {
            mt_slot *s = SLOT_AT(h, i);
            read_slot(s, &copy);
            int64_t owner = atomic_load(&s->owner);
            if (owner == 0 || (owner == pid && copy.state != SLOT_EXITED)) {
                continue;
            }
            int dead = copy.state == SLOT_EXITED || copy.state == SLOT_KILLED ||
                       copy.state > SLOT_KILLED || owner_dead(&copy);
            if (owner == pid) {
                copy.updated = -1; /* our own slot, left earlier: take it back first */
            }
            if (dead && (best_owner == 0 || copy.updated < best_updated)) {
                best_owner = owner;
                best = i;
                best_updated = copy.updated;
            }
        }
        if (best_owner == 0) {
            return -1;
        }
        mt_slot *s = SLOT_AT(h, best);
        int64_t dead_owner = best_owner;
        if (atomic_compare_exchange_strong(&s->owner, &best_owner, (int64_t)pid)) {
            if (foreign_write_begin(s) < 0) {
                atomic_store(&s->owner, dead_owner); /* give it back as it was */
                return -1;
            }
            init_slot(s, pid, start);
            write_end(s);
            *index = best;
            return 0;
        }
    }
    return -1;
}

static int
heartbeat_main(void *unused)
{
    (void)unused;
    mt_budget budget = {0}; /* uss/pss readings, within MT_FOOTPRINT_BUDGET */
    mtx_lock(&wk.hb_lock);
    while (!wk.hb_stop) {
        struct timespec until;
        timespec_get(&until, TIME_UTC);
        double sec = wk.heartbeat > 0 ? wk.heartbeat : 0.1;
        until.tv_sec += (time_t)sec;
        until.tv_nsec += (long)((sec - (double)(time_t)sec) * 1e9);
        if (until.tv_nsec >= 1000000000L) {
            until.tv_sec++;
            until.tv_nsec -= 1000000000L;
        }
        cnd_timedwait(&wk.hb_wake, &wk.hb_lock, &until);
        if (wk.hb_stop) {
            break;
        }
        mtx_unlock(&wk.hb_lock);

        mt_footprint fp;
        mt_oserr e;
        int have_fp = mt_budgeted_footprint(&budget, 0, FOOTPRINT_EVERY * wk.heartbeat, &fp);
        uint64_t rss = 0, peak = 0, heap = 0, heap_free;
        mt_os_heap(&heap, &heap_free);
        mtx_lock(&mt_phase_lock);
        if (wk.slot != NULL && mt_os_rss(&rss, &e) == 0 && mt_peak_read_locked(&peak, &e) == 0) {
            mt_slot *s = wk.slot;
            write_begin(s);
            s->rss = rss;
            uint64_t lifetime = mt_peak_lifetime_locked();
            /* statm is exact, the mark may lag it by the kernel's per-CPU
             * counter slack: a peak is never below a reading. */
            if (lifetime > s->peak_rss) {
                s->peak_rss = lifetime;
            }
            if (rss > s->peak_rss) {
                s->peak_rss = rss;
            }
            raise_window(s, peak > rss ? peak : rss);
            if (have_fp) {
                s->uss = fp.uss;
                s->pss = fp.pss;
            }
            s->heap_used = heap;
            s->updated = mt_os_monotonic();
            write_end(s);
        }
        mtx_unlock(&mt_phase_lock);
        mtx_lock(&wk.hb_lock);
    }
    mtx_unlock(&wk.hb_lock);
    return 0;
}

/* phase_lock held. */
static int
start_heartbeat_locked(void)
{
    if (wk.hb_started || wk.heartbeat <= 0 || wk.slot == NULL) {
        return 0;
    }
    mtx_lock(&wk.hb_lock);
    wk.hb_stop = 0;
    mtx_unlock(&wk.hb_lock);
    if (thrd_create(&wk.hb_thread, heartbeat_main, NULL) != thrd_success) {
        return -1;
    }
    wk.hb_started = 1;
    return 0;
}

/* Called without phase_lock (the thread takes it). */
static void
stop_heartbeat(void)
{
    mtx_lock(&mt_phase_lock);
    int started = wk.hb_started;
    thrd_t t = wk.hb_thread;
    wk.hb_started = 0;
    mtx_unlock(&mt_phase_lock);
    if (!started) {
        return;
    }
    mtx_lock(&wk.hb_lock);
    wk.hb_stop = 1;
    cnd_signal(&wk.hb_wake);
    mtx_unlock(&wk.hb_lock);
    thrd_join(t, NULL);
}

int
mt_worker_init(void)
{
    if (mtx_init(&wk.hb_lock, mtx_plain) != thrd_success || cnd_init(&wk.hb_wake) != thrd_success) {
        return -1;
    }
    return 0;
}

void
mt_worker_after_fork_child(void)
{
    /* The heartbeat thread did not survive fork(), and the parent's slot is
     * the parent's: detach from it; worker_rejoin() claims our own. */
    mtx_init(&wk.hb_lock, mtx_plain);
    cnd_init(&wk.hb_wake);
    wk.hb_started = 0;
    if (wk.slot != NULL) {
        wk.slot = NULL;
        wk.pending_rejoin = 1;
    }
}

/* Phase hooks (phase_lock held): keep the slot in step with the phases. */
void
mt_worker_on_enter_locked(const char *path, size_t len, uint32_t depth, uint64_t rss)
{
    mt_slot *s = wk.slot;
    if (s == NULL) {
        return;
    }
    if (!wk.hb_started) {
        start_heartbeat_locked(); /* after a fork, or if it failed once */
    }
    write_begin(s);
    s->state = SLOT_RUNNING;
    copy_path(s->phase, SLOT_PATH, path, len, &s->flags);
    s->depth = depth;
    s->rss = rss;
    if (rss > s->peak_rss) {
        s->peak_rss = rss;
    }
    raise_window(s, rss);
    s->updated = mt_os_monotonic();
    write_end(s);
}

/* Find or add the summary entry of a path; -1 when the slot has no room. */
static int
phase_entry_locked(mt_slot *s, const char *path, size_t len)
{
    char cut[SUMMARY_PATH];
    copy_path(cut, sizeof cut, path, len, NULL);
    uint32_t n = s->nphases < SLOT_PHASES ? s->nphases : SLOT_PHASES;
    for (uint32_t i = 0; i < n; i++) {
        if (memcmp(s->phases[i].path, cut, SUMMARY_PATH) == 0) {
            return (int)i;
        }
    }
    if (n == SLOT_PHASES) {
        return -1;
    }
    memset(&s->phases[n], 0, sizeof s->phases[n]);
    memcpy(s->phases[n].path, cut, SUMMARY_PATH);
    s->nphases = n + 1;
    return (int)n;
}

void
mt_worker_on_exit_locked(const mt_worker_exit *x, int *entry_cache, uint32_t *entry_gen)
{
    mt_slot *s = wk.slot;
    if (s == NULL) {
        return;
    }
    write_begin(s);
    s->state = x->still_open ? SLOT_RUNNING : SLOT_IDLE;
    copy_path(s->phase, SLOT_PATH, x->parent_path, x->parent_len, &s->flags);
    s->depth = x->parent_depth;
    s->rss = x->rss_end;
    if (x->peak_rss > s->peak_rss) {
        s->peak_rss = x->peak_rss;
    }
    if (x->rss_end > s->peak_rss) {
        s->peak_rss = x->rss_end;
    }
    s->heap_used = x->heap_used;
    raise_window(s, x->peak_rss > x->rss_end ? x->peak_rss : x->rss_end);
    if (x->outermost) {
        s->tasks++;
        s->last_task_rss = x->rss_end;
        s->last_task_time = mt_os_monotonic();
    }
    int entry = (*entry_gen == wk.generation) ? *entry_cache : -2;
    if (entry < -1 || entry >= (int)SLOT_PHASES) {
        entry = phase_entry_locked(s, x->path, x->path_len);
        *entry_cache = entry;
        *entry_gen = wk.generation;
    }
    if (entry < 0) {
        s->phase_overflow++;
    }
    else {
        mt_slot_phase *p = &s->phases[entry];
        uint64_t delta = x->peak_rss > x->rss_start ? x->peak_rss - x->rss_start : 0;
        p->count++;
        p->total_time += x->duration;
        if (x->peak_rss > p->max_peak_rss) {
            p->max_peak_rss = x->peak_rss;
        }
        if (delta > p->max_peak_delta) {
            p->max_peak_delta = delta;
        }
        p->total_rss_delta += (int64_t)x->rss_end - (int64_t)x->rss_start;
    }
    s->updated = mt_os_monotonic();
    write_end(s);
}

/* ------------------------------------------------------------------------ */
/* Worker-side Python functions                                               */

static PyObject *
table_error(PyObject *module, const char *name, const char *why)
{
    mt_state *st = PyModule_GetState(module);
    PyErr_Format(st->TableError, "cannot use worker table %s: %s", name, why);
    return NULL;
}

/* Map `name` and check it; on failure a Python error is set. */
static mt_seg_header *
attach_checked(PyObject *module, const char *name, size_t *size)
{
    void *addr = NULL;
    mt_oserr e;
    if (mt_os_shm_attach(name, &addr, size, &e) < 0) {
        mt_raise_oserr(&e);
        return NULL;
    }
    const char *why = addr ? check_header(addr, *size) : "it is empty";
    if (why != NULL) {
        mt_os_shm_detach(addr, *size);
        table_error(module, name, why);
        return NULL;
    }
    return addr;
}

/* The UTF-8 of a table name argument, or NULL with TypeError set. */
static const char *
name_arg(PyObject *arg)
{
    if (!PyUnicode_Check(arg)) {
        PyErr_Format(PyExc_TypeError, "table name must be a str, not %.100s",
                     Py_TYPE(arg)->tp_name);
        return NULL;
    }
    return PyUnicode_AsUTF8(arg);
}

/* join(name) -> slot index, or -1 when the table is full (run untracked). */
PyObject *
mt_worker_join(PyObject *module, PyObject *arg)
{
    const char *name = name_arg(arg);
    if (name == NULL) {
        return NULL;
    }
    if (name[0] != '/' || strlen(name) >= sizeof wk.name || strchr(name + 1, '/') != NULL) {
        PyErr_Format(PyExc_ValueError, "bad worker table name %R: expected '/memtrack-...'", arg);
        return NULL;
    }
    stop_heartbeat();
    size_t size;
    mt_seg_header *h = attach_checked(module, name, &size);
    if (h == NULL) {
        return NULL;
    }
    mtx_lock(&mt_phase_lock);
    mt_seg_header *old = wk.seg;
    size_t old_size = wk.size;
    if (wk.slot != NULL) { /* joining another table: leave the first */
        write_begin(wk.slot);
        wk.slot->state = SLOT_EXITED;
        write_end(wk.slot);
        atomic_store(&wk.slot->owner, 0);
    }
    wk.seg = h;
    wk.size = size;
    snprintf(wk.name, sizeof wk.name, "%s", name);
    wk.slot = NULL;
    wk.pending_rejoin = 0;
    wk.heartbeat = h->heartbeat_ms / 1000.0;
    uint32_t index = 0;
    long result = -1;
    if (claim_locked(h, &index) == 0) {
        wk.slot = SLOT_AT(h, index);
        wk.index = index;
        wk.generation++;
        mt_peak_restart_lifetime_locked(0);
        start_heartbeat_locked();
        result = (long)index;
    }
    mtx_unlock(&mt_phase_lock);
    if (old != NULL && old != h) {
        mt_os_shm_detach(old, old_size);
    }
    return PyLong_FromLong(result);
}

/* rejoin() after fork: claim our own slot in the table the parent joined.
 * -> slot index, -1 when full, None when the parent had not joined. */
PyObject *
mt_worker_rejoin(PyObject *module, PyObject *unused)
{
    mtx_lock(&mt_phase_lock);
    int pending = wk.pending_rejoin && wk.seg != NULL;
    long result = -1;
    if (pending) {
        uint32_t index;
        wk.pending_rejoin = 0;
        if (claim_locked(wk.seg, &index) == 0) {
            wk.slot = SLOT_AT(wk.seg, index);
            wk.index = index;
            wk.generation++;
            mt_peak_restart_lifetime_locked(0);
            start_heartbeat_locked();
            result = (long)index;
        }
    }
    mtx_unlock(&mt_phase_lock);
    if (!pending) {
        Py_RETURN_NONE;
    }
    return PyLong_FromLong(result);
}

/* leave(exited=True): mark the slot exited (a clean exit) and detach. */
PyObject *
mt_worker_leave(PyObject *module, PyObject *unused)
{
    stop_heartbeat();
    mtx_lock(&mt_phase_lock);
    int had = wk.slot != NULL;
    if (had) {
        mt_slot *s = wk.slot;
        write_begin(s);
        s->state = SLOT_EXITED;
        s->updated = mt_os_monotonic();
        write_end(s);
        wk.slot = NULL;
    }
    wk.pending_rejoin = 0;
    mtx_unlock(&mt_phase_lock);
    return PyBool_FromLong(had);
}

PyObject *
mt_worker_task_done(PyObject *module, PyObject *unused)
{
    mtx_lock(&mt_phase_lock);
    if (wk.slot != NULL) {
        uint64_t rss = 0;
        mt_oserr e;
        int have = mt_os_rss(&rss, &e) == 0;
        write_begin(wk.slot);
        wk.slot->tasks++;
        wk.slot->updated = wk.slot->last_task_time = mt_os_monotonic();
        if (have) {
            wk.slot->last_task_rss = rss;
            wk.slot->rss = rss;
        }
        write_end(wk.slot);
    }
    mtx_unlock(&mt_phase_lock);
    Py_RETURN_NONE;
}

/* worker_info() -> (name, slot) or None */
PyObject *
mt_worker_info(PyObject *module, PyObject *unused)
{
    char name[256];
    long index = -1;
    mtx_lock(&mt_phase_lock);
    if (wk.slot != NULL) {
        snprintf(name, sizeof name, "%s", wk.name);
        index = (long)wk.index;
    }
    mtx_unlock(&mt_phase_lock);
    if (index < 0) {
        Py_RETURN_NONE;
    }
    return Py_BuildValue("(sl)", name, index);
}

PyObject *
mt_worker_set_heartbeat(PyObject *module, PyObject *arg)
{
    double sec = PyFloat_AsDouble(arg);
    if (sec == -1.0 && PyErr_Occurred()) {
        return NULL;
    }
    if (!(sec == 0 || (sec >= 0.001 && sec <= 3600))) {
        PyErr_Format(PyExc_ValueError,
                     "heartbeat must be 0 (off) or between 0.001 and 3600 seconds, not %R", arg);
        return NULL;
    }
    stop_heartbeat();
    mtx_lock(&mt_phase_lock);
    wk.heartbeat = sec;
    start_heartbeat_locked();
    mtx_unlock(&mt_phase_lock);
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------------------ */
/* The reader side: the Segment type                                          */

/* What this reader knows about a slot's owner: a pidfd for the exact
 * process (pid, start_time) it verified, so later liveness checks are one
 * poll() and a reused pid can never pass for the owner. */

/* A reader's mapping. Its fields are Protected by the GIL: every method
 * runs with it held and none releases it. The mapped slots are shared with
 * the workers and follow the sequence-counter protocol above. */
typedef struct {
    PyObject_HEAD mt_seg_header *seg; /* NULL once closed */
    size_t size;
    int owner;      /* created it: unlink on close */
    long owner_pid; /* the creating process: a forked copy never unlinks */
    char name[256];
    mt_watch *watch; /* one per slot; NULL until the first read */
} SegmentObject;

static int
segment_init(SegmentObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"name", "capacity", "heartbeat_ms", NULL};
    const char *name;
    int capacity = 0;
    unsigned int heartbeat_ms = 100;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "s|iI:Segment", kwlist, &name, &capacity,
                                     &heartbeat_ms)) {
        return -1;
    }
    if (self->seg != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Segment is already open");
        return -1;
    }
    if (name[0] != '/' || strlen(name) >= sizeof self->name || strchr(name + 1, '/') != NULL) {
        PyErr_Format(PyExc_ValueError, "bad worker table name %s: expected '/memtrack-...'", name);
        return -1;
    }
    snprintf(self->name, sizeof self->name, "%s", name);
    PyObject *module = PyType_GetModuleByDef(Py_TYPE(self), &mt_module_def);
    if (module == NULL) {
        return -1;
    }
    if (capacity == 0) { /* attach to an existing table */
        self->seg = attach_checked(module, name, &self->size);
        return self->seg ? 0 : -1;
    }
    if (capacity < 1 || (unsigned)capacity > MAX_CAPACITY) {
        PyErr_Format(PyExc_ValueError, "capacity must be between 1 and %u, not %d", MAX_CAPACITY,
                     capacity);
        return -1;
    }
    void *addr;
    mt_oserr e;
    size_t size = SEG_SIZE(capacity);
    if (mt_os_shm_create(name, size, &addr, &e) < 0) {
        mt_raise_oserr(&e);
        return -1;
    }
    mt_seg_header *h = addr; /* ftruncate gave zeroes: all slots free */
    memcpy(h->magic, SEG_MAGIC, 8);
    h->version = SEG_VERSION;
    h->header_size = SEG_HEADER_SIZE;
    h->capacity = (uint32_t)capacity;
    h->slot_size = SLOT_SIZE;
    h->slot_phases = SLOT_PHASES;
    h->heartbeat_ms = heartbeat_ms;
    long pid;
    uint64_t start;
    self_identity(&pid, &start);
    h->creator_pid = pid;
    h->creator_start = start;
    h->creator_pidns = mt_os_pid_namespace();
    h->created = mt_os_wall_time();
    self->seg = h;
    self->size = size;
    self->owner = 1;
    self->owner_pid = mt_os_pid();
    return 0;
}

static void
segment_close_impl(SegmentObject *self)
{
    if (self->watch != NULL) {
        for (uint32_t i = 0; self->seg != NULL && i < self->seg->capacity; i++) {
            mt_os_close(self->watch[i].fd);
        }
        PyMem_Free(self->watch);
        self->watch = NULL;
    }
    if (self->seg == NULL) {
        return;
    }
    mt_oserr e;
    /* If this process joined the same mapping as a worker, it keeps its own
     * mapping (attach maps separately), so unmapping ours is safe. */
    mt_os_shm_detach(self->seg, self->size);
    self->seg = NULL;
    /* A forked child holds a copy of its parent's table (and its exit hooks):
     * removing the segment is the creating process's job alone. */
    if (self->owner && self->owner_pid == mt_os_pid()) {
        mt_os_shm_unlink(self->name, &e);
    }
}

static void
segment_dealloc(SegmentObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    segment_close_impl(self);
    tp->tp_free(self);
    Py_DECREF(tp);
}

static int
check_open(SegmentObject *self)
{
    if (self->seg == NULL) {
        PyErr_SetString(PyExc_ValueError, "worker table is closed");
        return -1;
    }
    return 0;
}

static const char *const state_names[] = {"free", "idle", "running", "exited", "killed"};

/* Validate a copied slot: NULL when sane, else why not. Terminates strings. */
static const char *
validate_slot(mt_slot *c)
{
    c->phase[SLOT_PATH - 1] = '\0';
    if (c->state < SLOT_IDLE || c->state > SLOT_KILLED) {
        return "its state is not a known value";
    }
    if (c->pid <= 0 || c->pid > (1 << 30)) {
        return "its pid is out of range";
    }
    if (c->nphases > SLOT_PHASES) {
        return "it claims more phase entries than a slot holds";
    }
    if (c->peak_rss && c->rss > c->peak_rss && c->rss - c->peak_rss > (1u << 30)) {
        return "its rss is far above its peak";
    }
    for (uint32_t i = 0; i < c->nphases; i++) {
        c->phases[i].path[SUMMARY_PATH - 1] = '\0';
        if (c->phases[i].count == 0) {
            return "a phase entry has a count of zero";
        }
    }
    return NULL;
}

static PyObject *
slot_phases_dict(mt_state *st, const mt_slot *c)
{
    PyObject *d = PyDict_New();
    for (uint32_t i = 0; d != NULL && i < c->nphases; i++) {
        const mt_slot_phase *p = &c->phases[i];
        PyObject *s = PyStructSequence_New(st->PhaseSummary);
        PyObject *k = PyUnicode_DecodeUTF8(p->path, strlen(p->path), "replace");
        if (s == NULL || k == NULL) {
            Py_XDECREF(s);
            Py_XDECREF(k);
            Py_CLEAR(d);
            break;
        }
        PyObject *items[] = {
            PyLong_FromUnsignedLongLong(p->count),
            PyFloat_FromDouble(p->total_time),
            PyLong_FromUnsignedLongLong(p->max_peak_rss),
            PyLong_FromUnsignedLongLong(p->max_peak_delta),
            PyLong_FromLongLong(p->total_rss_delta),
            PyFloat_FromDouble((double)p->total_rss_delta / (double)p->count),
        };
        int bad = 0;
        for (int j = 0; j < 6; j++) {
            bad |= items[j] == NULL;
            PyStructSequence_SET_ITEM(s, j, items[j] ? items[j] : Py_NewRef(Py_None));
        }
        if (bad || PyDict_SetItem(d, k, s) < 0) {
            Py_CLEAR(d);
        }
        Py_DECREF(s);
        Py_DECREF(k);
    }
    return d;
}

/* Is the slot's owner (pid + start time) still running? Exact: a verified
 * owner is watched through a pidfd; without one, /proc is asked each time. */
static int
owner_alive(mt_watch *w, const mt_slot *c)
{
    if (w != NULL && w->fd >= 0 && w->pid == c->pid && w->start_time == c->start_time) {
        return w->polled ? w->alive : mt_os_pidfd_alive(w->fd);
    }
    if (owner_dead(c)) {
        return 0;
    }
    if (w != NULL) {
        mt_os_close(w->fd);
        w->fd = mt_os_pidfd_open((long)c->pid);
        w->pid = c->pid;
        w->start_time = c->start_time;
        /* The owner could have died, and its pid been reused, between the
         * check and the open: check again with the pidfd held. */
        if (w->fd >= 0 && owner_dead(c)) {
            mt_os_close(w->fd);
            w->fd = -1;
            return 0;
        }
    }
    return 1;
}

/* Decide whether a live-state slot's owner is still alive; record a death
 * in the shared slot so that every reader agrees. */
static void
settle_liveness(mt_slot *live, mt_slot *c, mt_watch *w)
{
    if (c->state != SLOT_IDLE && c->state != SLOT_RUNNING && c->state != SLOT_EXITED) {
        return;
    }
    if (c->state == SLOT_EXITED && (c->flags & (FLAG_EXIT_CODE | FLAG_EXIT_SIGNAL))) {
        return;
    }
    if (owner_alive(w, c)) {
        return;
    }
    int code = 0, sig = 0;
    int known = mt_os_child_status((long)c->pid, &code, &sig);
    uint32_t state = c->state == SLOT_EXITED ? SLOT_EXITED : SLOT_KILLED;
    uint32_t flags = c->flags;
    if (known && sig) {
        state = SLOT_KILLED;
        flags |= FLAG_EXIT_SIGNAL;
    }
    else if (known) {
        state = code == 0 || c->state == SLOT_EXITED ? SLOT_EXITED : SLOT_KILLED;
        flags |= FLAG_EXIT_CODE;
    }
    if (state == c->state && flags == c->flags) {
        return; /* an exit already recorded: nothing new to write */
    }
    int64_t owner = atomic_load(&live->owner);
    if (owner != c->pid || foreign_write_begin(live) < 0) {
        return;
    }
    if (live->pid == c->pid) {
        live->state = state;
        live->flags = flags;
        live->exit_code = code;
        live->exit_signal = sig;
    }
    write_end(live);
    c->state = state;
    c->flags = flags;
    c->exit_code = code;
    c->exit_signal = sig;
}

/* Prepare a pass over the slots: the watch array, and every watched owner
 * asked at once (one poll() for all pidfds instead of one per worker). */
static int
scan_begin(SegmentObject *self, int full_check)
{
    uint32_t capacity = self->seg->capacity;
    if (self->watch == NULL) {
        self->watch = PyMem_Calloc(capacity, sizeof *self->watch);
        if (self->watch == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        for (uint32_t i = 0; i < capacity; i++) {
            self->watch[i].fd = -1;
        }
    }
    if (full_check) { /* forget the pidfds: ask /proc afresh */
        for (uint32_t i = 0; i < capacity; i++) {
            mt_os_close(self->watch[i].fd);
            self->watch[i].fd = -1;
        }
    }
    mt_os_pidfds_poll(self->watch, capacity);
    return 0;
}

/* From *i on, the next claimed slot: copied into c, validated (*invalid says
 * why not) and its owner's liveness settled. 0 at the end of the table. */
static int
scan_next(SegmentObject *self, uint32_t *i, mt_slot *c, int full_check, const char **invalid,
          const char **torn_why)
{
    (void)full_check;
    for (; *i < self->seg->capacity; (*i)++) {
        mt_slot *live = SLOT_AT(self->seg, *i);
        if (atomic_load_explicit(&live->owner, memory_order_acquire) == 0) {
            continue;
        }
        int torn = read_slot(live, c) < 0;
        *torn_why = NULL;
        if (torn) {
            *torn_why = owner_dead(c) ? "its writer died while writing it (values may be mixed)"
                                      : "its worker was writing it for 50 ms (values may be mixed)";
        }
        if (c->state == SLOT_FREE) {
            continue; /* claimed this instant, not yet written */
        }
        *invalid = validate_slot(c);
        if (*invalid == NULL) {
            settle_liveness(live, c, &self->watch[*i]);
        }
        return 1;
    }
    for (uint32_t j = 0; j < self->seg->capacity; j++) {
        self->watch[j].polled = 0;
    }
    return 0;
}

/* totals() -> (live, rss, pss, uss, peak_rss, dead, memory), without building
 * objects; memory sums each live worker's pss, or its rss before its first pss. */
static PyObject *
segment_totals(SegmentObject *self, PyObject *unused)
{
    if (check_open(self) < 0) {
        return NULL;
    }
    mt_slot *c = PyMem_Malloc(sizeof *c);
    if (c == NULL) {
        return PyErr_NoMemory();
    }
    if (scan_begin(self, 0) < 0) {
        PyMem_Free(c);
        return NULL;
    }
    unsigned long long live = 0, dead = 0, rss = 0, pss = 0, uss = 0, peak = 0, memory = 0;
    const char *invalid, *torn_why;
    for (uint32_t i = 0; scan_next(self, &i, c, 0, &invalid, &torn_why); i++) {
        if (invalid != NULL) {
            continue;
        }
        if (c->state == SLOT_IDLE || c->state == SLOT_RUNNING) {
            live++;
            rss += c->rss;
            pss += c->pss;
            uss += c->uss;
            memory += c->pss ? c->pss : c->rss; /* pss before the first footprint: rss */
        }
        else {
            dead++;
        }
        peak = c->peak_rss > peak ? c->peak_rss : peak;
    }
    PyMem_Free(c);
    return Py_BuildValue("(KKKKKKK)", live, rss, pss, uss, peak, dead, memory);
}

/* read(check=False) -> list of WorkerStats, one per claimed slot. */
static PyObject *
segment_read(SegmentObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"check", NULL};
    int full_check = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|p:read", kwlist, &full_check) ||
        check_open(self) < 0) {
        return NULL;
    }
    mt_state *st = mt_state_from_type(Py_TYPE(self));
    if (st == NULL) {
        return NULL;
    }
    mt_slot *c = PyMem_Malloc(sizeof *c);
    PyObject *list = PyList_New(0);
    if (c == NULL || list == NULL) {
        PyMem_Free(c);
        Py_XDECREF(list);
        return PyErr_NoMemory();
    }
    const char *invalid, *torn_why;
    if (scan_begin(self, full_check) < 0) {
        PyMem_Free(c);
        Py_DECREF(list);
        return NULL;
    }
    for (uint32_t i = 0; scan_next(self, &i, c, full_check, &invalid, &torn_why); i++) {
        PyObject *w = PyStructSequence_New(st->WorkerStats);
        if (w == NULL) {
            goto fail;
        }
        PyObject *items[19];
        if (invalid != NULL) {
            /* Report only what identifies the slot; the rest is untrusted. */
            for (int j = 0; j < 19; j++) {
                items[j] = Py_NewRef(Py_None);
            }
            Py_SETREF(items[0], PyLong_FromLongLong(c->pid));
            Py_SETREF(items[1], PyUnicode_FromString("corrupt"));
            Py_SETREF(items[13], PyDict_New());
            Py_SETREF(items[14], PyLong_FromUnsignedLong(i));
            Py_SETREF(items[18], PyUnicode_FromString(invalid));
        }
        else {
            items[0] = PyLong_FromLongLong(c->pid);
            items[1] = PyUnicode_FromString(state_names[c->state]);
            items[2] = PyUnicode_DecodeUTF8(c->phase, strlen(c->phase), "replace");
            items[3] = PyLong_FromUnsignedLong(c->depth);
            items[4] = PyLong_FromUnsignedLongLong(c->rss);
            items[5] = PyLong_FromUnsignedLongLong(c->peak_rss);
            items[6] = PyLong_FromUnsignedLongLong(c->uss);
            items[7] = PyLong_FromUnsignedLongLong(c->pss);
            items[8] = PyLong_FromUnsignedLongLong(c->heap_used);
            items[9] = PyLong_FromUnsignedLongLong(c->tasks);
            items[10] = PyFloat_FromDouble(c->updated);
            items[11] =
                (c->flags & FLAG_EXIT_CODE) ? PyLong_FromLong(c->exit_code) : Py_NewRef(Py_None);
            items[12] = (c->flags & FLAG_EXIT_SIGNAL) ? PyLong_FromLong(c->exit_signal)
                                                      : Py_NewRef(Py_None);
            items[13] = slot_phases_dict(st, c);
            items[14] = PyLong_FromUnsignedLong(i);
            items[15] = PyFloat_FromDouble(c->joined);
            items[16] = PyBool_FromLong(c->flags & FLAG_PHASE_CUT);
            items[17] = PyLong_FromUnsignedLongLong(c->phase_overflow);
            items[18] = torn_why ? PyUnicode_FromString(torn_why) : Py_NewRef(Py_None);
        }
        int bad = 0;
        for (int j = 0; j < 19; j++) {
            bad |= items[j] == NULL;
            PyStructSequence_SET_ITEM(w, j, items[j] ? items[j] : Py_NewRef(Py_None));
        }
        if (bad || PyList_Append(list, w) < 0) {
            Py_DECREF(w);
            goto fail;
        }
        Py_DECREF(w);
    }
    PyMem_Free(c);
    return list;
fail:
    PyMem_Free(c);
    Py_DECREF(list);
    return NULL;
}

/* forget_dead() -> number of dead slots freed for reuse. */
static PyObject *
segment_forget_dead(SegmentObject *self, PyObject *unused)
{
    if (check_open(self) < 0) {
        return NULL;
    }
    long freed = 0;
    mt_slot c;
    for (uint32_t i = 0; i < self->seg->capacity; i++) {
        mt_slot *live = SLOT_AT(self->seg, i);
        int64_t owner = atomic_load(&live->owner);
        if (owner == 0) {
            continue;
        }
        read_slot(live, &c);
        int dead = c.state == SLOT_KILLED || c.state > SLOT_KILLED || c.state == SLOT_FREE ||
                   owner_dead(&c);
        if (!dead) {
            continue;
        }
        if (foreign_write_begin(live) < 0) {
            continue;
        }
        if (atomic_compare_exchange_strong(&live->owner, &owner, 0)) {
            memset((char *)live + offsetof(mt_slot, pid), 0, sizeof *live - offsetof(mt_slot, pid));
            freed++;
        }
        write_end(live);
    }
    return PyLong_FromLong(freed);
}

/* record_exit(pid, exitcode): what a pool learned (Process.exitcode). */
static PyObject *
segment_record_exit(SegmentObject *self, PyObject *args)
{
    long long pid;
    int exitcode;
    if (!PyArg_ParseTuple(args, "Li:record_exit", &pid, &exitcode) || check_open(self) < 0) {
        return NULL;
    }
    for (uint32_t i = 0; i < self->seg->capacity; i++) {
        mt_slot *live = SLOT_AT(self->seg, i);
        if (atomic_load(&live->owner) != pid || foreign_write_begin(live) < 0) {
            continue;
        }
        if (live->pid == pid) {
            if (exitcode < 0) {
                live->state = SLOT_KILLED;
                live->exit_signal = -exitcode;
                live->flags |= FLAG_EXIT_SIGNAL;
            }
            else {
                live->state = exitcode == 0 ? SLOT_EXITED : SLOT_KILLED;
                live->exit_code = exitcode;
                live->flags |= FLAG_EXIT_CODE;
            }
        }
        write_end(live);
        Py_RETURN_TRUE;
    }
    Py_RETURN_FALSE;
}

static PyObject *
segment_close(SegmentObject *self, PyObject *unused)
{
    segment_close_impl(self);
    Py_RETURN_NONE;
}

static PyObject *
segment_header(SegmentObject *self, PyObject *unused)
{
    if (check_open(self) < 0) {
        return NULL;
    }
    const mt_seg_header *h = self->seg;
    return Py_BuildValue(
        "{s:I,s:I,s:I,s:L,s:K,s:d,s:I,s:I,s:n}", "version", h->version, "capacity", h->capacity,
        "slot_size", h->slot_size, "creator_pid", (long long)h->creator_pid, "creator_start",
        (unsigned long long)h->creator_start, "created", h->created, "heartbeat_ms",
        h->heartbeat_ms, "slot_phases", h->slot_phases, "size", (Py_ssize_t)self->size);
}

static PyObject *
segment_get_name(SegmentObject *self, void *closure)
{
    return PyUnicode_FromString(self->name);
}

static PyObject *
segment_get_closed(SegmentObject *self, void *closure)
{
    return PyBool_FromLong(self->seg == NULL);
}

static PyMethodDef segment_methods[] = {
    {"read", (PyCFunction)(void (*)(void))segment_read, METH_VARARGS | METH_KEYWORDS,
     "read(check=False) -> list of WorkerStats."},
    {"forget_dead", (PyCFunction)segment_forget_dead, METH_NOARGS, "Free the dead slots."},
    {"totals", (PyCFunction)segment_totals, METH_NOARGS,
     "totals() -> (live, rss, pss, uss, peak_rss, dead, memory)."},
    {"record_exit", (PyCFunction)segment_record_exit, METH_VARARGS,
     "record_exit(pid, exitcode) -> bool."},
    {"header", (PyCFunction)segment_header, METH_NOARGS, "The header fields."},
    {"close", (PyCFunction)segment_close, METH_NOARGS, "Unmap (and unlink if created here)."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef segment_getset[] = {
    {"name", (getter)segment_get_name, NULL, "The segment name.", NULL},
    {"closed", (getter)segment_get_closed, NULL, "True once closed.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot segment_slots[] = {
    {Py_tp_doc, "Segment(name, capacity=0, heartbeat_ms=100): a worker table mapping.\n\n"
                "capacity=0 attaches to an existing table; otherwise creates one."},
    {Py_tp_init, segment_init},
    {Py_tp_new, PyType_GenericNew},
    {Py_tp_dealloc, segment_dealloc},
    {Py_tp_methods, segment_methods},
    {Py_tp_getset, segment_getset},
    {0, NULL},
};

PyType_Spec mt_segment_spec = {
    .name = "memtrack._core.Segment",
    .basicsize = sizeof(SegmentObject),
    .flags = Py_TPFLAGS_DEFAULT,
    .slots = segment_slots,
};

/* segment_creator(name) -> (pid, start_time, same_pid_namespace): for
 * cleanup_stale(), which can judge a creator only from its own namespace. */
PyObject *
mt_segment_creator(PyObject *module, PyObject *arg)
{
    const char *name = name_arg(arg);
    if (name == NULL) {
        return NULL;
    }
    size_t size;
    mt_seg_header *h = attach_checked(module, name, &size);
    if (h == NULL) {
        return NULL;
    }
    int same_ns = h->creator_pidns == mt_os_pid_namespace();
    PyObject *r = Py_BuildValue("(LKO)", (long long)h->creator_pid,
                                (unsigned long long)h->creator_start, same_ns ? Py_True : Py_False);
    mt_os_shm_detach(h, size);
    return r;
}

/* proc_identity(pid) -> ("alive" | "zombie" | "gone", start_time) */
PyObject *
mt_proc_identity(PyObject *module, PyObject *arg)
{
    long pid = PyLong_AsLong(arg);
    if (pid == -1 && PyErr_Occurred()) {
        return NULL;
    }
    uint64_t start = 0;
    int st = pid > 0 ? mt_os_proc_identity(pid, &start) : MT_PROC_GONE;
    static const char *names[] = {"gone", "alive", "zombie"};
    return Py_BuildValue("(sK)", names[st], (unsigned long long)start);
}

PyObject *
mt_unlink_segment(PyObject *module, PyObject *arg)
{
    const char *name = name_arg(arg);
    if (name == NULL) {
        return NULL;
    }
    mt_oserr e;
    if (mt_os_shm_unlink(name, &e) < 0) {
        mt_raise_oserr(&e);
        return NULL;
    }
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------------------ */
/* For the recorder (sampler.c): attach by name and read slots as views.    */

void *
mt_seg_attach(const char *name, size_t *size, const char **why, mt_oserr *e)
{
    void *addr = NULL;
    *why = NULL;
    if (mt_os_shm_attach(name, &addr, size, e) < 0) {
        return NULL;
    }
    *why = addr ? check_header(addr, *size) : "it is empty";
    if (*why != NULL) {
        mt_os_shm_detach(addr, *size);
        return NULL;
    }
    return addr;
}

uint32_t
mt_seg_capacity(const void *seg)
{
    return ((const mt_seg_header *)seg)->capacity;
}

/* `scratch`: MT_SLOT_BYTES from malloc (suitably aligned for a slot). */
int
mt_seg_view(void *seg, uint32_t i, mt_watch *w, void *scratch, mt_worker_view *v)
{
    mt_slot *live = SLOT_AT(seg, i);
    mt_slot *c = scratch;
    if (atomic_load_explicit(&live->owner, memory_order_acquire) == 0) {
        return 1;
    }
    read_slot(live, c);
    if (c->state == SLOT_FREE) {
        return 1;
    }
    if (validate_slot(c) != NULL) {
        return -1;
    }
    settle_liveness(live, c, w);
    v->slot = i;
    v->pid = c->pid;
    v->state = state_names[c->state];
    v->alive = c->state == SLOT_IDLE || c->state == SLOT_RUNNING;
    v->rss = c->rss;
    v->peak_rss = c->peak_rss;
    v->uss = c->uss;
    v->pss = c->pss;
    v->tasks = c->tasks;
    v->last_task_rss = c->last_task_rss;
    v->last_task_time = c->last_task_time;
    v->joined = c->joined;
    v->has_exit_code = (c->flags & FLAG_EXIT_CODE) != 0;
    v->has_exit_signal = (c->flags & FLAG_EXIT_SIGNAL) != 0;
    v->exit_code = c->exit_code;
    v->exit_signal = c->exit_signal;
    memcpy(v->phase, c->phase, sizeof v->phase);
    return 0;
}

uint64_t
mt_seg_take_window(void *seg, uint32_t i)
{
    return atomic_exchange(&SLOT_AT(seg, i)->window_peak, 0);
}
