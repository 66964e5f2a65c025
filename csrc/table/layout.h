/*
 * The worker table's shared layout: one POSIX shared-memory segment per
 * pool, a header and `capacity` fixed-size slots. Every worker claims one
 * slot and is its only writer while it lives (worker.c); the parent and the
 * recorder read all slots, live and after the workers die (reader.c).
 *
 * Writes are lock-free across processes: a per-slot sequence counter is odd
 * while the slot is being written, and a reader retries until it copies the
 * slot between two equal even counts. A worker never waits for a reader.
 * Inside one worker, the threads that write the slot (phase enter/exit, the
 * heartbeat) are serialised by mt_phase_lock.
 *
 * The layout below is part of the file format (docs/internals.md); the
 * static asserts keep it from drifting. Plain C11, no Python.
 */
#ifndef MEMTRACK_TABLE_LAYOUT_H
#define MEMTRACK_TABLE_LAYOUT_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "../platform/platform.h"

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
static_assert(sizeof(mt_slot) == SLOT_SIZE && SLOT_SIZE == 8192u, "slot size");
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
static inline void
write_begin(mt_slot *s)
{
    uint64_t q = atomic_load_explicit(&s->seq, memory_order_relaxed);
    atomic_store_explicit(&s->seq, (q | 1u), memory_order_relaxed);
    atomic_thread_fence(memory_order_release);
}

static inline void
write_end(mt_slot *s)
{
    uint64_t q = atomic_load_explicit(&s->seq, memory_order_relaxed);
    atomic_store_explicit(&s->seq, q + 1, memory_order_release);
}

/* Writes by another process (a reader recording a death, a claimant taking
 * over a dead slot): take the counter from even to odd with a CAS, so two
 * such writers never interleave. Gives up rather than wait long. */
static inline int
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
static inline int
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

static inline void
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

/* ------------------------------------------------------------------------ */
/* Header checks (both sides)                                                 */

/* NULL when the mapping is a usable table; else what is wrong. */
static inline const char *
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
/* Owners: a process is its pid and its start time (pids are reused).        */

static inline void
self_identity(long *pid, uint64_t *start)
{
    *pid = mt_os_pid();
    *start = 0;
    mt_os_proc_identity(*pid, start);
}

/* A slot's owner is gone (or a later process reuses its pid). */
static inline int
owner_dead(const mt_slot *copy)
{
    uint64_t start = 0;
    if (copy->pid <= 0) {
        return 1;
    }
    int st = mt_os_proc_identity((long)copy->pid, &start);
    return st != MT_PROC_ALIVE || start != copy->start_time;
}

#endif /* MEMTRACK_TABLE_LAYOUT_H */
