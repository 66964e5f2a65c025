/*
 * The worker table's shared layout (version 2): one POSIX shared-memory
 * segment per pool, a header and `capacity` fixed-size slots. Every worker
 * claims one slot and is its only writer while it lives (worker.c); the
 * parent and the recorder read all slots, live and after the workers die
 * (reader.c).
 *
 * Writes are lock-free across processes: a per-slot sequence counter is odd
 * while the slot is being written, and a reader retries until it copies the
 * slot between two equal even counts. A worker never waits for a reader.
 * Inside one worker, the threads that write the slot (phase enter/exit, the
 * heartbeat) are serialised by mt_phase_lock.
 *
 * The layout is part of the contract between builds (a spawn worker imports
 * memtrack afresh): docs/internals.md documents every offset and the static
 * asserts below keep it from drifting. A change of any offset or meaning
 * bumps SEG_VERSION; a reader refuses a version it does not know. Fields are
 * added only in `reserved` areas, which a writer of an older build leaves
 * zero (zero must mean "absent" for any new field). Plain C11, no Python.
 */
#ifndef MEMTRACK_TABLE_LAYOUT_H
#define MEMTRACK_TABLE_LAYOUT_H

#include <assert.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "../platform/platform.h"
#include "../summary.h"

#define SEG_MAGIC "MEMTRACK"
#define SEG_VERSION 2u
#define SEG_HEADER_SIZE 256u
#define SLOT_SIZE 8192u
#define SLOT_HEAD 1024u  /* the part of a slot before its phase entries */
#define SLOT_PHASES 44u  /* phase summary entries per slot */
#define SLOT_ENDS 16u    /* the ring of recent task ends */
#define SLOT_PATH 256u   /* the current phase path, NUL included */
#define SUMMARY_PATH 104u /* a summary entry's path text, NUL included */
#define MAX_CAPACITY 4096u

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
    double created_monotonic; /* CLOCK_MONOTONIC at creation: no slot time is older */
    uint8_t reserved[184];
} mt_seg_header;

/* One entry of a slot's phase summary. Its identity is the hash and length
 * of the full path, so two long paths that share their first 103 bytes get
 * two entries, never one. */
typedef struct {
    char path[SUMMARY_PATH]; /* NUL-terminated; cut at a UTF-8 boundary */
    uint32_t path_len;       /* the full path's length in bytes */
    uint32_t reserved;
    uint64_t path_hash; /* mt_path_hash() of the full path */
    mt_phase_totals totals;
} mt_slot_phase;

/* A task end (an outermost phase ended), for readers that account per task:
 * a ring of the last SLOT_ENDS, written at ends_written % SLOT_ENDS. */
typedef struct {
    double time;        /* CLOCK_MONOTONIC */
    uint64_t retained;  /* rss after it */
    uint64_t peak_rss;  /* its peak */
    uint64_t path_hash; /* its path: the phases[] entry with this hash, if any */
} mt_slot_end;

enum { SLOT_FREE = 0, SLOT_IDLE = 1, SLOT_RUNNING = 2, SLOT_EXITED = 3, SLOT_KILLED = 4 };
enum {
    FLAG_PHASE_CUT = 1,   /* phase[] holds a truncated path */
    FLAG_EXIT_CODE = 2,   /* exit_code is known */
    FLAG_EXIT_SIGNAL = 4, /* exit_signal is known */
    FLAGS_KNOWN = 7,
};
/* What the process in a slot is to the pool. 0 is a worker, so a slot that
 * nobody labelled is one. */
enum { ROLE_WORKER = 0, ROLE_TOOL = 1, ROLE_ROOT = 2, ROLE_HELPER = 3, ROLE_OTHER = 4 };
#define ROLE_LAST ROLE_OTHER

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
    uint64_t last_task_rss;  /* rss when the last task (outermost phase) ended */
    double last_task_time;   /* its CLOCK_MONOTONIC time */
    /* The largest peak since a recorder last took it: raised by the owner,
     * swapped to 0 by a recorder (memtrack.record). Outside the seqlock. */
    _Atomic uint64_t window_peak;
    uint8_t role; /* ROLE_* */
    uint8_t reserved0[3];
    uint32_t phase_len;    /* the current phase path's full length in bytes */
    uint64_t ends_written; /* task ends ever written to ends[] */
    uint64_t pss_rss;      /* rss at the beat that read uss/pss */
    /* Reserved for per-worker side channels (e.g. allocation sites): a new
     * field here must read as "absent" when zero. */
    uint8_t reserved1[80];
    char phase[SLOT_PATH]; /* current phase path, NUL-terminated */
    mt_slot_end ends[SLOT_ENDS];
    mt_slot_phase phases[SLOT_PHASES];
    uint8_t reserved2[SLOT_SIZE - SLOT_HEAD - SLOT_PHASES * 160u];
} mt_slot;

static_assert(sizeof(mt_seg_header) == SEG_HEADER_SIZE, "header size");
static_assert(offsetof(mt_seg_header, capacity) == 16, "header layout");
static_assert(offsetof(mt_seg_header, creator_pid) == 24, "header layout");
static_assert(offsetof(mt_seg_header, heartbeat_ms) == 48, "header layout");
static_assert(offsetof(mt_seg_header, creator_pidns) == 56, "header layout");
static_assert(offsetof(mt_seg_header, created_monotonic) == 64, "header layout");
static_assert(sizeof(mt_phase_totals) == 40, "phase totals size");
static_assert(sizeof(mt_slot_phase) == 160, "phase entry size");
static_assert(offsetof(mt_slot_phase, path_hash) == 112, "phase entry layout");
static_assert(sizeof(mt_slot_end) == 32, "task end size");
static_assert(sizeof(mt_slot) == SLOT_SIZE && SLOT_SIZE == 8192u, "slot size");
static_assert(offsetof(mt_slot, owner) == 8, "slot layout");
static_assert(offsetof(mt_slot, state) == 32, "slot layout");
static_assert(offsetof(mt_slot, rss) == 40, "slot layout");
static_assert(offsetof(mt_slot, updated) == 88, "slot layout");
static_assert(offsetof(mt_slot, nphases) == 116, "slot layout");
static_assert(offsetof(mt_slot, last_task_rss) == 128, "slot layout");
static_assert(offsetof(mt_slot, window_peak) == 144, "slot layout");
static_assert(offsetof(mt_slot, role) == 152, "slot layout");
static_assert(offsetof(mt_slot, phase_len) == 156, "slot layout");
static_assert(offsetof(mt_slot, ends_written) == 160, "slot layout");
static_assert(offsetof(mt_slot, pss_rss) == 168, "slot layout");
static_assert(offsetof(mt_slot, phase) == 256, "slot layout");
static_assert(offsetof(mt_slot, ends) == 512, "slot layout");
static_assert(offsetof(mt_slot, phases) == SLOT_HEAD, "slot layout");
static_assert(sizeof(_Atomic uint64_t) == 8 && sizeof(_Atomic int64_t) == 8, "atomics");

#define SEG_SIZE(cap) ((size_t)SEG_HEADER_SIZE + (size_t)(cap)*SLOT_SIZE)
#define SLOT_AT(h, i) ((mt_slot *)((char *)(h) + SEG_HEADER_SIZE + (size_t)(i)*SLOT_SIZE))

/* FNV-1a, 64 bits: the identity of a phase path in a slot's summary. */
static inline uint64_t
mt_path_hash(const char *s, size_t len)
{
    uint64_t h = UINT64_C(14695981039346656037);
    for (size_t i = 0; i < len; i++) {
        h ^= (unsigned char)s[i];
        h *= UINT64_C(1099511628211);
    }
    return h;
}

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

/* Copy `len` bytes of a path into a field of `size` bytes, NUL-padded, cut
 * at a UTF-8 boundary when it does not fit. 1 when it was cut. */
static inline int
copy_path(char *dst, size_t size, const char *src, size_t len)
{
    int cut = len >= size;
    if (cut) {
        len = size - 1;
        /* Do not split a UTF-8 sequence. */
        while (len > 0 && ((unsigned char)src[len] & 0xC0) == 0x80) {
            len--;
        }
    }
    memcpy(dst, src, len);
    memset(dst + len, 0, size - len);
    return cut;
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

/* The process (pid, start) has ended, or a later process reuses its pid:
 * proof that nobody will finish a write it began. A zombie counts as dead. */
static inline int
process_dead(int64_t pid, uint64_t start)
{
    uint64_t actual = 0;
    if (pid <= 0 || pid > (1 << 22)) {
        return 1; /* no such pid on Linux (pid_max <= 2^22) */
    }
    int st = mt_os_proc_identity((long)pid, &actual);
    return st != MT_PROC_ALIVE || actual != start;
}

/* Writes by another process (a reader recording a death, a claimant taking
 * over a dead slot, forget_dead, record_exit): take the counter from even to
 * odd with a CAS, so two such writers never interleave. A count that stays
 * odd is taken over (q -> q + 2, still odd) only when the process that began
 * that write is proven dead: the slot's owner, by pid and start time. Never
 * sleeps; gives up (-1) rather than wait. */
static inline int
foreign_write_begin(mt_slot *s)
{
    for (int i = 0; i < 2000; i++) {
        uint64_t q = atomic_load_explicit(&s->seq, memory_order_acquire);
        if (!(q & 1u)) {
            if (atomic_compare_exchange_weak(&s->seq, &q, q + 1)) {
                atomic_thread_fence(memory_order_release);
                return 0;
            }
            continue;
        }
        if (i == 1999) {
            int64_t pid = s->pid;
            uint64_t start = s->start_time;
            int64_t owner = atomic_load_explicit(&s->owner, memory_order_relaxed);
            /* The write in progress is the owner's, or another foreign
             * writer's (a reader is alive while it writes: it is short). */
            if ((owner == pid || owner == 0 || !mt_os_pid_exists((long)owner)) &&
                process_dead(pid, start) &&
                atomic_compare_exchange_strong(&s->seq, &q, q + 2)) {
                atomic_thread_fence(memory_order_release);
                return 0;
            }
        }
    }
    return -1;
}

/* One attempt, never waiting: copy slot `s` (its head and its used phase
 * entries) into `out`. 0 consistent; 1 the count was odd (being written),
 * `out` untouched; 2 it changed during the copy. */
static inline int
try_read_slot(const mt_slot *s, mt_slot *out, uint64_t *seq)
{
    uint64_t q1 = atomic_load_explicit(&s->seq, memory_order_acquire);
    if (q1 & 1u) {
        return 1;
    }
    memcpy((char *)out, (const char *)s, SLOT_HEAD);
    uint32_t n = out->nphases < SLOT_PHASES ? out->nphases : SLOT_PHASES;
    memcpy(out->phases, s->phases, n * sizeof(mt_slot_phase));
    atomic_thread_fence(memory_order_acquire);
    uint64_t q2 = atomic_load_explicit(&s->seq, memory_order_relaxed);
    if (q1 != q2) {
        return 2;
    }
    *seq = q1;
    return 0;
}

/* Copy a slot as it is, whatever its count says (its writer is dead). */
static inline void
read_slot_torn(const mt_slot *s, mt_slot *out)
{
    memcpy((char *)out, (const char *)s, SLOT_HEAD);
    uint32_t n = out->nphases < SLOT_PHASES ? out->nphases : SLOT_PHASES;
    memcpy(out->phases, s->phases, n * sizeof(mt_slot_phase));
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

#endif /* MEMTRACK_TABLE_LAYOUT_H */
