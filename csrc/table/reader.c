/*
 * The reader side of the table: the core reader (Python-free, used by the
 * Segment type and by the recorder's native thread), the Segment type the
 * parent reads through (memtrack.WorkerTable), and the WorkerStats views it
 * hands out.
 *
 * A reader trusts nothing another process can change. The capacity, slot
 * size and mapping length are copied once at attach and never read from the
 * segment again; before every pass the file's size is compared with the
 * mapping's and the header with its attach-time copy, and the pass itself
 * runs under a SIGBUS guard, so a segment shrunk or rewritten under the
 * reader makes the table "damaged" instead of killing the process. One pass
 * has a fixed time budget however many slots are stuck mid-write, and every
 * field of every slot is checked against physical limits before it is shown.
 */
#include "table.h"

_Static_assert(SLOT_ENDS == 16 && SUMMARY_PATH == 104,
               "mt_worker_view.ends (memtrack.h) mirrors the slot's ring of task ends");

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>

#define READ_BUDGET 0.002   /* seconds one pass may wait for slots mid-write */
#define RETRY_SLEEP 20e-6   /* between rounds over the slots still mid-write */
#define RETRY_SPIN 200e-6   /* ... after spinning this long without sleeping */
#define SPIN_TRIES 32       /* immediate tries of a slot mid-write */
#define TIME_SLACK 1.0      /* seconds a slot time may lie outside the table's life */
#define MAX_COUNT (UINT64_C(1) << 40) /* tasks, phase ends: 10^12 */
#define MAX_DEPTH (1u << 16)
#define MAX_PATH_LEN (1u << 20)
#define HEAP_BOUND (UINT64_C(1) << 48) /* the address space: malloc can count untouched memory */
#define ERROR_SIZE 160

enum { SNAP_EMPTY = 0, SNAP_OK = 1, SNAP_BUSY = 2, SNAP_CORRUPT = 3, SNAP_PENDING = 4 };

/* A reader's watch on one slot owner: a pidfd for the exact process (pid,
 * start time) it verified, in the reader's epoll set under the slot index,
 * so a reused pid never passes for the owner and one epoll_wait names all
 * owners that died. */
typedef struct {
    int fd; /* -1: none */
    int64_t pid;
    uint64_t start_time;
    int dead; /* its pidfd became ready */
} mt_watch;

/* What the last pass made of one slot. */
typedef struct {
    uint8_t status;  /* SNAP_* */
    uint8_t torn;    /* copied while its dead writer's count was odd */
    uint8_t settled; /* liveness decided for this count: nothing to redo */
    uint64_t seq;    /* the count of the copy */
    int64_t owner;   /* the claim word when copied */
    int64_t pid;     /* for busy and corrupt slots: the pid it names */
    uint32_t stamp;  /* changes whenever what the slot shows changes */
    /* What totals() sums, from the copy (status OK): kept here, next to each
     * other, so that a sum touches one small array, not 256 copies. */
    uint8_t live;
    uint64_t rss, pss, uss, peak_rss, pss_rss;
    char error[ERROR_SIZE];
} mt_snap;

struct mt_reader {
    mt_seg_header *seg; /* the mapping */
    size_t size;        /* its length: fixed at attach */
    uint32_t capacity;  /* copied at attach: never re-read */
    int fd;             /* the segment, for the size check before each pass */
    mt_seg_header header; /* as attached: a pass compares the live one */
    uint64_t mem_bound;
    double budget;
    const char *damaged; /* sticky, points at damage_text */
    char damage_text[ERROR_SIZE];
    int ep; /* the epoll set of pidfds; -1 without epoll */
    int full_check;
    double now; /* CLOCK_MONOTONIC of the current pass */
    mt_watch *watch; /* capacity of each */
    mt_snap *snap;
    mt_slot *copies; /* slot i's copy at copies + i * SLOT_SIZE */
    uint64_t *ready; /* keys from epoll */
    uint32_t pending;
};

static mt_slot *
copy_of(const mt_reader *r, uint32_t i)
{
    return (mt_slot *)((char *)r->copies + (size_t)i * SLOT_SIZE);
}

static void
set_error(mt_snap *s, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(s->error, sizeof s->error, fmt, ap);
    va_end(ap);
}

/* ------------------------------------------------------------------------ */
/* Opening: the file's owner and shape, then its header, before any mapping. */

/* 0 with *fd open and *hdr read; -1 with why (a table problem) or *e set. */
static int
open_checked(const char *name, char *why, size_t why_size, int *fd, mt_seg_header *hdr,
             size_t *size, mt_oserr *e)
{
    mt_file_info info;
    why[0] = '\0';
    if (mt_os_shm_open(name, fd, &info, e) < 0) {
        return -1;
    }
    if (info.uid != mt_os_uid()) {
        snprintf(why, why_size, "it belongs to uid %u, not to this user (uid %u)",
                 (unsigned)info.uid, (unsigned)mt_os_uid());
    }
    else if (!info.regular) {
        snprintf(why, why_size, "it is not a regular file");
    }
    else if (info.mode != 0600) {
        snprintf(why, why_size, "its mode is %04o, not 0600 (anyone it admits could write it)",
                 (unsigned)info.mode);
    }
    else if (info.size < SEG_HEADER_SIZE ||
             mt_os_pread(*fd, hdr, sizeof *hdr, 0) != (long)sizeof *hdr) {
        snprintf(why, why_size, "%s", info.size ? "it is smaller than a table header" : "it is empty");
    }
    else {
        const char *bad = check_header(hdr, (size_t)info.size);
        if (bad != NULL) {
            snprintf(why, why_size, "%s", bad);
        }
    }
    if (why[0] != '\0') {
        mt_os_close(*fd);
        *fd = -1;
        return -1;
    }
    *size = (size_t)info.size;
    return 0;
}

void mt_reader_close(mt_reader *r);

static mt_reader *
reader_new(mt_seg_header *seg, size_t size, int fd, const mt_seg_header *hdr)
{
    mt_reader *r = calloc(1, sizeof *r);
    if (r == NULL) {
        return NULL;
    }
    r->seg = seg;
    r->size = size;
    r->fd = fd;
    r->header = *hdr;
    r->capacity = hdr->capacity;
    r->mem_bound = mt_os_memory_bound();
    if (r->mem_bound == 0) {
        r->mem_bound = UINT64_C(1) << 46;
    }
    r->budget = READ_BUDGET;
    r->ep = mt_os_epoll_new();
    r->watch = calloc(r->capacity, sizeof *r->watch);
    r->snap = calloc(r->capacity, sizeof *r->snap);
    r->ready = calloc(r->capacity, sizeof *r->ready);
    r->copies = calloc(r->capacity, SLOT_SIZE); /* pages are touched only as used */
    if (r->watch == NULL || r->snap == NULL || r->ready == NULL || r->copies == NULL) {
        r->seg = NULL; /* the caller unmaps */
        r->fd = -1;
        mt_reader_close(r);
        return NULL;
    }
    for (uint32_t i = 0; i < r->capacity; i++) {
        r->watch[i].fd = -1;
    }
    return r;
}

/* The mapping's header still says what the pread copy said: a rewrite
 * between the two would otherwise go unseen. */
typedef struct {
    const mt_reader *r;
    int same;
} header_check;

static void
compare_header(void *arg)
{
    header_check *c = arg;
    c->same = memcmp(c->r->seg, &c->r->header, sizeof c->r->header) == 0;
}

static mt_reader *
mt_reader_open_named(const char *name, char *why, size_t why_size, mt_oserr *e)
{
    int fd;
    mt_seg_header hdr;
    size_t size;
    void *addr = NULL;
    if (open_checked(name, why, why_size, &fd, &hdr, &size, e) < 0) {
        return NULL;
    }
    if (mt_os_shm_map(fd, size, &addr, name, e) < 0) {
        mt_os_close(fd);
        return NULL;
    }
    mt_reader *r = reader_new(addr, size, fd, &hdr);
    if (r == NULL) {
        mt_os_shm_detach(addr, size);
        mt_os_close(fd);
        mt_fail(e, "malloc", NULL, ENOMEM);
        return NULL;
    }
    header_check c = {r, 0};
    if (mt_os_guarded(compare_header, &c) != 0 || !c.same) {
        snprintf(why, why_size, "its header changed while it was being attached");
        mt_reader_close(r);
        return NULL;
    }
    return r;
}

mt_reader *
mt_reader_open(const char *name, const char **why, mt_oserr *e)
{
    static _Thread_local char text[ERROR_SIZE];
    mt_reader *r = mt_reader_open_named(name, text, sizeof text, e);
    *why = (r == NULL && text[0] != '\0') ? text : NULL;
    return r;
}

void
mt_reader_close(mt_reader *r)
{
    if (r == NULL) {
        return;
    }
    mt_os_close(r->ep); /* first: its pidfds then close without leaving it one by one */
    for (uint32_t i = 0; r->watch != NULL && i < r->capacity; i++) {
        mt_os_close(r->watch[i].fd);
    }
    if (r->seg != NULL) {
        mt_os_shm_detach(r->seg, r->size);
    }
    mt_os_close(r->fd);
    free(r->watch);
    free(r->snap);
    free(r->ready);
    free(r->copies);
    free(r);
}

uint32_t
mt_reader_capacity(const mt_reader *r)
{
    return r->capacity;
}

/* ------------------------------------------------------------------------ */
/* Validation: every field against physical limits, the field named.         */

static int
time_ok(const mt_reader *r, double t)
{
    return isfinite(t) && t >= r->header.created_monotonic - TIME_SLACK &&
           t <= r->now + TIME_SLACK;
}

static const char *
nul_within(const char *s, size_t size)
{
    return memchr(s, '\0', size);
}

/* 0 when every field of the copy is sane; else -1 with the error set. */
static int
validate(const mt_reader *r, const mt_slot *c, mt_snap *s)
{
    uint64_t bound = r->mem_bound;
    double life = r->now - r->header.created_monotonic + TIME_SLACK;
    if (c->state < SLOT_IDLE || c->state > SLOT_KILLED) {
        set_error(s, "field state: %u is not a known state", (unsigned)c->state);
        return -1;
    }
    if (c->pid <= 0 || c->pid > (1 << 22)) {
        set_error(s, "field pid: %lld is not a pid", (long long)c->pid);
        return -1;
    }
    if (c->flags & ~(uint32_t)FLAGS_KNOWN) {
        set_error(s, "field flags: %#x has unknown bits", (unsigned)c->flags);
        return -1;
    }
    if (c->role > ROLE_LAST) {
        set_error(s, "field role: %u is not a known role", (unsigned)c->role);
        return -1;
    }
    const struct {
        const char *name;
        uint64_t value, bound;
    } sizes[] = {
        {"rss", c->rss, bound},
        {"peak_rss", c->peak_rss, bound},
        {"uss", c->uss, bound},
        {"pss", c->pss, bound},
        {"last_task_rss", c->last_task_rss, bound},
        {"pss_rss", c->pss_rss, bound},
        {"heap_used", c->heap_used, HEAP_BOUND},
    };
    for (size_t k = 0; k < sizeof sizes / sizeof sizes[0]; k++) {
        if (sizes[k].value > sizes[k].bound) {
            set_error(s, "field %s: %llu bytes is more than this machine can hold (%llu)",
                      sizes[k].name, (unsigned long long)sizes[k].value,
                      (unsigned long long)sizes[k].bound);
            return -1;
        }
    }
    const struct {
        const char *name;
        uint64_t value;
    } counts[] = {
        {"tasks", c->tasks},
        {"phase_overflow", c->phase_overflow},
        {"ends_written", c->ends_written},
    };
    for (size_t k = 0; k < sizeof counts / sizeof counts[0]; k++) {
        if (counts[k].value > MAX_COUNT) {
            set_error(s, "field %s: %llu is more than a process can count to", counts[k].name,
                      (unsigned long long)counts[k].value);
            return -1;
        }
    }
    if (!time_ok(r, c->joined)) {
        set_error(s, "field joined: %g is not a time within the table's life", c->joined);
        return -1;
    }
    if (!time_ok(r, c->updated)) {
        set_error(s, "field updated: %g is not a time within the table's life", c->updated);
        return -1;
    }
    if (c->last_task_time != 0 && !time_ok(r, c->last_task_time)) {
        set_error(s, "field last_task_time: %g is not a time within the table's life",
                  c->last_task_time);
        return -1;
    }
    if (c->depth > MAX_DEPTH) {
        set_error(s, "field depth: %u is deeper than any phase can nest", (unsigned)c->depth);
        return -1;
    }
    if ((c->flags & FLAG_EXIT_CODE) && (c->exit_code < 0 || c->exit_code > 255)) {
        set_error(s, "field exit_code: %d is not an exit status (0..255)", (int)c->exit_code);
        return -1;
    }
    if ((c->flags & FLAG_EXIT_SIGNAL) && (c->exit_signal < 1 || c->exit_signal > 64)) {
        set_error(s, "field exit_signal: %d is not a signal (1..64)", (int)c->exit_signal);
        return -1;
    }
    const char *end = nul_within(c->phase, SLOT_PATH);
    if (end == NULL) {
        set_error(s, "field phase: not NUL-terminated within %u bytes", SLOT_PATH);
        return -1;
    }
    if (c->phase_len < (uint32_t)(end - c->phase) || c->phase_len > MAX_PATH_LEN) {
        set_error(s, "field phase_len: %u does not fit the phase text", (unsigned)c->phase_len);
        return -1;
    }
    if (c->nphases > SLOT_PHASES) {
        set_error(s, "field nphases: %u is more than a slot holds (%u)", (unsigned)c->nphases,
                  SLOT_PHASES);
        return -1;
    }
    for (uint32_t i = 0; i < c->nphases; i++) {
        const mt_slot_phase *p = &c->phases[i];
        const mt_phase_totals *t = &p->totals;
        const char *pend = nul_within(p->path, SUMMARY_PATH);
        if (pend == NULL || p->path_len < (uint32_t)(pend - p->path) ||
            p->path_len > MAX_PATH_LEN) {
            set_error(s, "field phases[%u].path: not a NUL-terminated path of its length", i);
            return -1;
        }
        if (t->count == 0 || t->count > MAX_COUNT) {
            set_error(s, "field phases[%u].count: %llu is not a count of phase ends", i,
                      (unsigned long long)t->count);
            return -1;
        }
        if (!isfinite(t->total_time) || t->total_time < 0 ||
            t->total_time > (double)t->count * life) {
            set_error(s, "field phases[%u].total_time: %g is not a duration within the table's life",
                      i, t->total_time);
            return -1;
        }
        if (t->max_peak_rss > bound || t->max_peak_delta > bound) {
            set_error(s, "field phases[%u].max_peak_rss: more than this machine can hold", i);
            return -1;
        }
        double delta = (double)t->total_rss_delta;
        if (fabs(delta) > (double)t->count * (double)bound) {
            set_error(s, "field phases[%u].total_rss_delta: %lld is more than its runs could move",
                      i, (long long)t->total_rss_delta);
            return -1;
        }
    }
    uint64_t nends = c->ends_written < SLOT_ENDS ? c->ends_written : SLOT_ENDS;
    for (uint64_t k = 0; k < nends; k++) {
        const mt_slot_end *e = &c->ends[k];
        if (!time_ok(r, e->time) || e->retained > bound || e->peak_rss > bound) {
            set_error(s, "field ends[%u]: not a task end of this table's life", (unsigned)k);
            return -1;
        }
    }
    return 0;
}

/* ------------------------------------------------------------------------ */
/* Liveness                                                                  */

static void
unwatch(mt_reader *r, uint32_t i)
{
    mt_watch *w = &r->watch[i];
    if (w->fd >= 0) {
        if (r->ep >= 0) {
            mt_os_epoll_del(r->ep, w->fd);
        }
        mt_os_close(w->fd);
    }
    w->fd = -1;
    w->dead = 0;
}

/* Is the owner of copy c (pid + start time) still running? Exact: a
 * verified owner is watched through a pidfd in the epoll set; without one,
 * /proc is asked. */
static int
owner_alive(mt_reader *r, uint32_t i, const mt_slot *c)
{
    mt_watch *w = &r->watch[i];
    if (w->fd >= 0 && w->pid == c->pid && w->start_time == c->start_time) {
        return !w->dead;
    }
    unwatch(r, i);
    /* The pidfd first, then /proc: if /proc then shows the owner (pid and
     * start time) alive, the owner held the pid through the open too, so the
     * pidfd is the owner's and never a later process's with its pid. */
    int fd = c->pid > 0 && c->pid <= (1 << 22) ? mt_os_pidfd_open((long)c->pid) : -1;
    if (process_dead(c->pid, c->start_time)) {
        mt_os_close(fd);
        return 0;
    }
    if (fd >= 0) {
        if (r->ep >= 0 && mt_os_epoll_add(r->ep, fd, i) == 0) {
            w->fd = fd;
            w->pid = c->pid;
            w->start_time = c->start_time;
            w->dead = 0;
        }
        else {
            mt_os_close(fd);
        }
    }
    return 1;
}

/* A live-state slot whose owner is gone: learn how it ended if we can, and
 * write the verdict into the shared slot so that every reader agrees. */
static void
settle(mt_reader *r, uint32_t i, mt_slot *c, mt_snap *s)
{
    if (c->state == SLOT_KILLED ||
        (c->state == SLOT_EXITED && (c->flags & (FLAG_EXIT_CODE | FLAG_EXIT_SIGNAL)))) {
        return;
    }
    if (owner_alive(r, i, c)) {
        /* With a pidfd the epoll set tells us of its death; without one,
         * ask /proc again next pass. */
        s->settled = r->watch[i].fd >= 0;
        return;
    }
    s->settled = 1;
    int code = 0, sig = 0;
    int known = mt_os_child_status((long)c->pid, &code, &sig);
    uint32_t state = c->state == SLOT_EXITED ? SLOT_EXITED : SLOT_KILLED;
    uint32_t flags = c->flags;
    if (known && sig >= 1 && sig <= 64) {
        state = SLOT_KILLED;
        flags |= FLAG_EXIT_SIGNAL;
    }
    else if (known && code >= 0 && code <= 255) {
        state = code == 0 || c->state == SLOT_EXITED ? SLOT_EXITED : SLOT_KILLED;
        flags |= FLAG_EXIT_CODE;
    }
    else {
        known = 0;
    }
    c->state = state;
    c->flags = flags;
    if (known) {
        c->exit_code = sig ? 0 : code;
        c->exit_signal = sig;
    }
    mt_slot *live = SLOT_AT(r->seg, i);
    if (atomic_load(&live->owner) != c->pid || s->torn || foreign_write_begin(live) < 0) {
        return;
    }
    if (live->pid == c->pid && live->start_time == c->start_time) {
        live->state = state;
        live->flags = flags;
        if (known) {
            live->exit_code = c->exit_code;
            live->exit_signal = c->exit_signal;
        }
    }
    write_end(live);
    s->seq += 2; /* our own write: the copy is still current */
}

/* ------------------------------------------------------------------------ */
/* The pass                                                                  */

static void
keep_figures(mt_snap *s, const mt_slot *c)
{
    s->live = c->state == SLOT_IDLE || c->state == SLOT_RUNNING;
    s->rss = c->rss;
    s->pss = c->pss;
    s->uss = c->uss;
    s->peak_rss = c->peak_rss;
    s->pss_rss = c->pss_rss;
}

static void
take_copy(mt_reader *r, uint32_t i, mt_snap *s, uint64_t seq, int torn)
{
    mt_slot *c = copy_of(r, i);
    s->seq = seq;
    s->torn = (uint8_t)torn;
    s->settled = 0;
    s->stamp++;
    if (validate(r, c, s) < 0) {
        s->status = SNAP_CORRUPT;
        s->pid = c->pid;
        return;
    }
    s->status = SNAP_OK;
    s->error[0] = '\0';
    if (torn) {
        set_error(s, "its writer died while writing it (values may be mixed)");
    }
    settle(r, i, c, s);
    keep_figures(s, c);
}

/* Try slot i once. 1 when it is still mid-write. */
static int
visit(mt_reader *r, uint32_t i)
{
    mt_slot *live = SLOT_AT(r->seg, i);
    mt_snap *s = &r->snap[i];
    int64_t owner = atomic_load_explicit(&live->owner, memory_order_acquire);
    if (owner == 0) {
        if (s->status != SNAP_EMPTY) {
            s->status = SNAP_EMPTY;
            s->stamp++;
            unwatch(r, i);
        }
        return 0;
    }
    uint64_t seq = atomic_load_explicit(&live->seq, memory_order_acquire);
    if ((s->status == SNAP_OK || s->status == SNAP_CORRUPT) && seq == s->seq &&
        owner == s->owner && !r->full_check) {
        /* Unchanged since the last pass: only its owner's death is news. */
        if (s->status == SNAP_OK && (!s->settled || r->watch[i].dead)) {
            mt_slot *c = copy_of(r, i);
            uint32_t state = c->state, flags = c->flags;
            settle(r, i, c, s);
            if (c->state != state || c->flags != flags) {
                s->stamp++;
                keep_figures(s, c);
            }
        }
        return 0;
    }
    mt_slot *c = copy_of(r, i);
    uint64_t q;
    int rc = 1;
    for (int k = 0; k < SPIN_TRIES && rc != 0; k++) {
        rc = try_read_slot(live, c, &q); /* a writer's write lasts ~100 ns: spin a little */
    }
    if (rc == 2 && s->status != SNAP_PENDING) {
        s->status = SNAP_PENDING; /* the copy is mixed now: never show it */
        s->stamp++;
    }
    if (rc != 0) {
        return 1;
    }
    s->owner = owner;
    if (c->state == SLOT_FREE) {
        /* claimed this instant, not yet written */
        if (s->status != SNAP_EMPTY) {
            s->status = SNAP_EMPTY;
            s->stamp++;
        }
        return 0;
    }
    take_copy(r, i, s, q, 0);
    return 0;
}

/* A slot that stayed mid-write for the whole budget. */
static void
give_up(mt_reader *r, uint32_t i)
{
    mt_slot *live = SLOT_AT(r->seg, i);
    mt_snap *s = &r->snap[i];
    int64_t pid = live->pid;
    uint64_t start = live->start_time;
    s->owner = atomic_load(&live->owner);
    if (process_dead(pid, start)) {
        /* Nobody will finish the write: show its last state, checked. */
        mt_slot *c = copy_of(r, i);
        read_slot_torn(live, c);
        take_copy(r, i, s, atomic_load(&live->seq), 1);
        return;
    }
    if (s->status != SNAP_BUSY) {
        s->stamp++;
    }
    s->status = SNAP_BUSY;
    s->pid = pid;
    set_error(s, "its worker kept it mid-write for the whole read (%.0f ms)", r->budget * 1e3);
}

typedef struct {
    mt_reader *r;
    int wait; /* retry the pending slots until the budget is spent */
} pass_args;

static void
pass_body(void *arg)
{
    pass_args *a = arg;
    mt_reader *r = a->r;
    if (!a->wait) {
        if (memcmp(r->seg, &r->header, sizeof r->header) != 0) {
            snprintf(r->damage_text, sizeof r->damage_text,
                     "its header was rewritten after it was attached");
            r->damaged = r->damage_text;
            return;
        }
        if (r->ep >= 0) {
            int n = mt_os_epoll_ready(r->ep, r->ready, (int)r->capacity);
            for (int k = 0; k < n; k++) {
                if (r->ready[k] < r->capacity) {
                    r->watch[r->ready[k]].dead = 1;
                }
            }
        }
        r->pending = 0;
        for (uint32_t i = 0; i < r->capacity; i++) {
            if (visit(r, i)) {
                r->ready[r->pending++] = i; /* reused: the slots to retry */
            }
        }
        return;
    }
    double begin = mt_os_monotonic(), now = begin;
    while (r->pending > 0 && now < begin + r->budget) {
        if (now > begin + RETRY_SPIN) {
            mt_os_sleep(RETRY_SLEEP); /* its writer may be preempted: let it run */
        }
        uint32_t left = 0;
        for (uint32_t k = 0; k < r->pending; k++) {
            uint32_t i = (uint32_t)r->ready[k];
            if (visit(r, i)) {
                r->ready[left++] = i;
            }
        }
        r->pending = left;
        now = mt_os_monotonic();
    }
    for (uint32_t k = 0; k < r->pending; k++) {
        give_up(r, (uint32_t)r->ready[k]);
    }
    r->pending = 0;
}

/* Is the file still the size it was mapped at? Else the table is damaged. */
static int
check_size(mt_reader *r)
{
    mt_file_info info;
    if (r->damaged != NULL) {
        return -1;
    }
    if (mt_os_fd_info(r->fd, &info) < 0 || info.size != r->size) {
        snprintf(r->damage_text, sizeof r->damage_text,
                 "its size changed from %zu to %llu bytes after it was attached", r->size,
                 (unsigned long long)info.size);
        r->damaged = r->damage_text;
        return -1;
    }
    return 0;
}

static int
run_guarded(mt_reader *r, void (*fn)(void *), void *arg)
{
    if (check_size(r) < 0) {
        return -1;
    }
    if (mt_os_guarded(fn, arg) != 0) {
        snprintf(r->damage_text, sizeof r->damage_text,
                 "it was truncated while being read (SIGBUS caught)");
        r->damaged = r->damage_text;
        return -1;
    }
    return r->damaged ? -1 : 0;
}

/* The first part of a pass, never waiting: -1 damaged, else the number of
 * slots that were mid-write (mt_reader_scan_wait finishes them). */
static int
scan_fast(mt_reader *r, int full_check)
{
    pass_args a = {r, 0};
    r->now = mt_os_monotonic();
    r->full_check = full_check;
    if (full_check) { /* forget the pidfds: ask /proc afresh */
        for (uint32_t i = 0; i < r->capacity; i++) {
            unwatch(r, i);
        }
    }
    int rc = run_guarded(r, pass_body, &a);
    r->full_check = 0;
    return rc < 0 ? -1 : (int)r->pending;
}

/* The rest of a pass: may sleep up to the budget. Call without the GIL. */
static int
scan_wait(mt_reader *r)
{
    pass_args a = {r, 1};
    if (r->pending == 0) {
        return 0;
    }
    return run_guarded(r, pass_body, &a);
}

int
mt_reader_scan(mt_reader *r)
{
    int n = scan_fast(r, 0);
    return n < 0 ? -1 : scan_wait(r);
}

/* ------------------------------------------------------------------------ */
/* The recorder's view                                                       */

static const char *const state_names[] = {"free", "idle", "running", "exited", "killed"};

/* Copy NUL-terminated `src` into dst as valid UTF-8: every byte that does
 * not start a well-formed sequence becomes U+FFFD; cut to fit `size`. */
static void
utf8_clean(char *dst, size_t size, const char *src)
{
    const unsigned char *p = (const unsigned char *)src;
    size_t o = 0;
    while (*p) {
        size_t n = 0;
        unsigned c = *p;
        if (c < 0x80) {
            n = 1;
        }
        else if (c >= 0xC2 && c <= 0xDF) {
            n = 2;
        }
        else if (c >= 0xE0 && c <= 0xEF) {
            n = 3;
        }
        else if (c >= 0xF0 && c <= 0xF4) {
            n = 4;
        }
        int good = n > 0;
        for (size_t k = 1; good && k < n; k++) {
            good = (p[k] & 0xC0) == 0x80;
        }
        if (good && n == 3) {
            good = !(c == 0xE0 && p[1] < 0xA0) && !(c == 0xED && p[1] >= 0xA0);
        }
        if (good && n == 4) {
            good = !(c == 0xF0 && p[1] < 0x90) && !(c == 0xF4 && p[1] >= 0x90);
        }
        const char *out = good ? (const char *)p : "\xEF\xBF\xBD";
        size_t len = good ? n : 3;
        if (o + len >= size) {
            break;
        }
        memcpy(dst + o, out, len);
        o += len;
        p += good ? n : 1;
    }
    dst[o] = '\0';
}

int
mt_reader_view(mt_reader *r, uint32_t i, mt_worker_view *v)
{
    const mt_snap *s = &r->snap[i];
    if (s->status == SNAP_EMPTY || s->status == SNAP_BUSY) {
        return 1;
    }
    if (s->status != SNAP_OK) {
        return -1;
    }
    const mt_slot *c = copy_of(r, i);
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
    utf8_clean(v->phase, sizeof v->phase, c->phase);
    v->role = c->role;
    v->ends_written = c->ends_written;
    v->nends = (uint32_t)(c->ends_written < SLOT_ENDS ? c->ends_written : SLOT_ENDS);
    for (uint32_t k = 0; k < v->nends; k++) {
        const mt_slot_end *e = &c->ends[(c->ends_written - v->nends + k) % SLOT_ENDS];
        v->ends[k].time = e->time;
        v->ends[k].retained = e->retained;
        v->ends[k].peak_rss = e->peak_rss;
        v->ends[k].path[0] = '\0';
        for (uint32_t j = 0; j < c->nphases; j++) {
            if (c->phases[j].path_hash == e->path_hash) {
                utf8_clean(v->ends[k].path, sizeof v->ends[k].path, c->phases[j].path);
                break;
            }
        }
    }
    return 0;
}

typedef struct {
    mt_reader *r;
    uint32_t i;
    uint64_t value;
} window_args;

static void
take_window_body(void *arg)
{
    window_args *a = arg;
    a->value = atomic_exchange(&SLOT_AT(a->r->seg, a->i)->window_peak, 0);
}

uint64_t
mt_reader_take_window(mt_reader *r, uint32_t i)
{
    window_args a = {r, i, 0};
    if (i >= r->capacity || run_guarded(r, take_window_body, &a) < 0) {
        return 0;
    }
    return a.value <= r->mem_bound ? a.value : 0;
}

/* ------------------------------------------------------------------------ */
/* Attaching (both sides, from Python)                                       */

static PyObject *
table_error(PyObject *module, const char *name, const char *why)
{
    mt_state *st = PyModule_GetState(module);
    PyErr_Format(st->TableError, "cannot use worker table %s: %s", name, why);
    return NULL;
}

static void
raise_open_error(PyObject *module, const char *name, const char *why, const mt_oserr *e)
{
    if (why[0] != '\0') {
        table_error(module, name, why);
    }
    else {
        mt_raise_oserr(e);
    }
}

mt_seg_header *
mt_table_attach_checked(PyObject *module, const char *name, size_t *size)
{
    char why[ERROR_SIZE];
    mt_oserr e;
    int fd;
    mt_seg_header hdr;
    void *addr = NULL;
    if (open_checked(name, why, sizeof why, &fd, &hdr, size, &e) < 0) {
        raise_open_error(module, name, why, &e);
        return NULL;
    }
    int rc = mt_os_shm_map(fd, *size, &addr, name, &e);
    mt_os_close(fd);
    if (rc < 0) {
        mt_raise_oserr(&e);
        return NULL;
    }
    return addr;
}

const char *
mt_table_name_arg(PyObject *arg)
{
    if (!PyUnicode_Check(arg)) {
        PyErr_Format(PyExc_TypeError, "table name must be a str, not %.100s",
                     Py_TYPE(arg)->tp_name);
        return NULL;
    }
    return PyUnicode_AsUTF8(arg);
}

/* ------------------------------------------------------------------------ */
/* WorkerStats: a view of one slot as one pass saw it                        */

/* Immutable once made: it owns a copy of the slot (head and used phase
 * entries), and decodes a field only when it is read; `phases` is built on
 * first access. A Segment hands the same view out again while its slot
 * shows the same thing. */
typedef struct {
    PyObject_HEAD mt_slot *copy; /* NULL for busy and corrupt slots */
    uint32_t slot;
    uint8_t status; /* SNAP_OK, SNAP_BUSY, SNAP_CORRUPT */
    int64_t pid;
    PyObject *error;  /* str or NULL */
    PyObject *phases; /* built on first access */
} ViewObject;

static PyObject *
view_new(PyTypeObject *tp, const mt_reader *r, uint32_t i)
{
    const mt_snap *s = &r->snap[i];
    ViewObject *v = PyObject_New(ViewObject, tp);
    if (v == NULL) {
        return NULL;
    }
    v->copy = NULL;
    v->slot = i;
    v->status = s->status;
    v->pid = s->pid;
    v->error = NULL;
    v->phases = NULL;
    if (s->error[0] != '\0') {
        v->error = PyUnicode_DecodeUTF8(s->error, strlen(s->error), "replace");
        if (v->error == NULL) {
            Py_DECREF(v);
            return NULL;
        }
    }
    if (s->status == SNAP_OK) {
        const mt_slot *c = copy_of(r, i);
        size_t n = SLOT_HEAD + (size_t)c->nphases * sizeof(mt_slot_phase);
        v->copy = PyMem_Malloc(n);
        if (v->copy == NULL) {
            Py_DECREF(v);
            return PyErr_NoMemory();
        }
        memcpy(v->copy, c, n);
        v->pid = c->pid;
    }
    return (PyObject *)v;
}

static void
view_dealloc(ViewObject *v)
{
    PyTypeObject *tp = Py_TYPE(v);
    PyMem_Free(v->copy);
    Py_XDECREF(v->error);
    Py_XDECREF(v->phases);
    PyObject_Free(v);
    Py_DECREF(tp);
}

#define VIEW_FIELD(name, expr)                                                                    \
    static PyObject *view_get_##name(ViewObject *v, void *closure)                               \
    {                                                                                             \
        const mt_slot *c = v->copy;                                                               \
        if (c == NULL) {                                                                          \
            Py_RETURN_NONE;                                                                       \
        }                                                                                         \
        return expr;                                                                              \
    }

VIEW_FIELD(depth, PyLong_FromUnsignedLong(c->depth))
VIEW_FIELD(rss, PyLong_FromUnsignedLongLong(c->rss))
VIEW_FIELD(peak_rss, PyLong_FromUnsignedLongLong(c->peak_rss))
VIEW_FIELD(uss, PyLong_FromUnsignedLongLong(c->uss))
VIEW_FIELD(pss, PyLong_FromUnsignedLongLong(c->pss))
VIEW_FIELD(heap_used, PyLong_FromUnsignedLongLong(c->heap_used))
VIEW_FIELD(tasks, PyLong_FromUnsignedLongLong(c->tasks))
VIEW_FIELD(updated, PyFloat_FromDouble(c->updated))
VIEW_FIELD(joined, PyFloat_FromDouble(c->joined))
VIEW_FIELD(last_task_rss, PyLong_FromUnsignedLongLong(c->last_task_rss))
VIEW_FIELD(last_task_time, c->last_task_time ? PyFloat_FromDouble(c->last_task_time)
                                             : Py_NewRef(Py_None))
VIEW_FIELD(phase_truncated, PyBool_FromLong(c->flags & FLAG_PHASE_CUT))
VIEW_FIELD(phase_overflow, PyLong_FromUnsignedLongLong(c->phase_overflow))
VIEW_FIELD(exit_code,
           (c->flags & FLAG_EXIT_CODE) ? PyLong_FromLong(c->exit_code) : Py_NewRef(Py_None))
VIEW_FIELD(exit_signal,
           (c->flags & FLAG_EXIT_SIGNAL) ? PyLong_FromLong(c->exit_signal) : Py_NewRef(Py_None))
VIEW_FIELD(phase, PyUnicode_DecodeUTF8(c->phase, strlen(c->phase), "replace"))

static const char *const role_names[] = {"worker", "tool", "root", "helper", "other"};
VIEW_FIELD(role, PyUnicode_FromString(role_names[c->role]))

static PyObject *
view_get_pid(ViewObject *v, void *closure)
{
    return PyLong_FromLongLong(v->pid);
}

static PyObject *
view_get_slot(ViewObject *v, void *closure)
{
    return PyLong_FromUnsignedLong(v->slot);
}

static PyObject *
view_get_state(ViewObject *v, void *closure)
{
    if (v->status == SNAP_BUSY) {
        return PyUnicode_FromString("busy");
    }
    if (v->status != SNAP_OK) {
        return PyUnicode_FromString("corrupt");
    }
    return PyUnicode_FromString(state_names[v->copy->state]);
}

static PyObject *
view_get_error(ViewObject *v, void *closure)
{
    return Py_NewRef(v->error ? v->error : Py_None);
}

/* The key of a summary entry: its path, or for a path cut to fit, the cut
 * text with "…#" and the full path's hash, so cut paths never merge. */
static PyObject *
entry_key(const mt_slot_phase *p)
{
    size_t len = strlen(p->path);
    if (p->path_len == len) {
        return PyUnicode_DecodeUTF8(p->path, len, "replace");
    }
    char buf[SUMMARY_PATH + 32];
    int n = snprintf(buf, sizeof buf, "%s\xE2\x80\xA6#%016llx", p->path,
                     (unsigned long long)p->path_hash);
    return PyUnicode_DecodeUTF8(buf, (Py_ssize_t)n, "replace");
}

static PyObject *
view_get_phases(ViewObject *v, void *closure)
{
    if (v->phases != NULL) {
        return Py_NewRef(v->phases);
    }
    mt_state *st = mt_state_from_type(Py_TYPE(v));
    if (st == NULL) {
        return NULL;
    }
    PyObject *d = PyDict_New();
    for (uint32_t i = 0; d != NULL && v->copy != NULL && i < v->copy->nphases; i++) {
        const mt_slot_phase *p = &v->copy->phases[i];
        PyObject *k = entry_key(p);
        PyObject *s = mt_phase_summary_new(st, &p->totals);
        if (k == NULL || s == NULL || PyDict_SetItem(d, k, s) < 0) {
            Py_CLEAR(d);
        }
        Py_XDECREF(k);
        Py_XDECREF(s);
    }
    v->phases = d;
    return Py_XNewRef(d);
}

/* recent_ends: the last task ends, oldest first, as (time, retained,
 * peak_rss, path) with path None when its entry is not in the summary. */
static PyObject *
view_get_recent_ends(ViewObject *v, void *closure)
{
    const mt_slot *c = v->copy;
    if (c == NULL) {
        Py_RETURN_NONE;
    }
    uint64_t n = c->ends_written < SLOT_ENDS ? c->ends_written : SLOT_ENDS;
    PyObject *list = PyList_New((Py_ssize_t)n);
    for (uint64_t k = 0; list != NULL && k < n; k++) {
        const mt_slot_end *e = &c->ends[(c->ends_written - n + k) % SLOT_ENDS];
        PyObject *path = NULL;
        for (uint32_t j = 0; j < c->nphases && path == NULL; j++) {
            if (c->phases[j].path_hash == e->path_hash) {
                path = entry_key(&c->phases[j]);
                if (path == NULL) {
                    Py_CLEAR(list);
                }
            }
        }
        if (list == NULL) {
            break;
        }
        PyObject *t = Py_BuildValue("(dKKN)", e->time, (unsigned long long)e->retained,
                                    (unsigned long long)e->peak_rss,
                                    path ? path : Py_NewRef(Py_None));
        if (t == NULL) {
            Py_CLEAR(list);
            break;
        }
        PyList_SET_ITEM(list, (Py_ssize_t)k, t);
    }
    return list;
}

static PyObject *
view_repr(ViewObject *v)
{
    PyObject *state = view_get_state(v, NULL);
    PyObject *r = NULL;
    if (state == NULL) {
        return NULL;
    }
    if (v->copy != NULL) {
        PyObject *phase = view_get_phase(v, NULL);
        if (phase != NULL) {
            r = PyUnicode_FromFormat("<WorkerStats slot %u pid %lld %U phase %R rss %llu>",
                                     v->slot, (long long)v->pid, state, phase,
                                     (unsigned long long)v->copy->rss);
            Py_DECREF(phase);
        }
    }
    else {
        r = PyUnicode_FromFormat("<WorkerStats slot %u pid %lld %U: %S>", v->slot,
                                 (long long)v->pid, state, v->error ? v->error : Py_None);
    }
    Py_DECREF(state);
    return r;
}

#define GET(name, doc) {#name, (getter)view_get_##name, NULL, doc, NULL}
static PyGetSetDef view_getset[] = {
    GET(pid, "process id of the worker"),
    GET(state, "'idle', 'running', 'exited', 'killed', 'busy' or 'corrupt' (see error)"),
    GET(phase, "path of the phase it is in (or died in), '' between phases"),
    GET(depth, "nesting depth of that phase"),
    GET(rss, "last resident set size, bytes"),
    GET(peak_rss, "largest rss since the worker joined, bytes"),
    GET(uss, "private memory at the last heartbeat, bytes (0 before the first)"),
    GET(pss, "proportional memory at the last heartbeat, bytes (0 before the first)"),
    GET(heap_used, "malloc heap in use, bytes"),
    GET(tasks, "outermost phases ended plus task_done() calls"),
    GET(updated, "time.monotonic() of the last update"),
    GET(exit_code, "exit status when known, else None"),
    GET(exit_signal, "the signal that killed it when known, else None"),
    GET(phases, "{path: PhaseSummary} of this worker (built when first read)"),
    GET(slot, "index of its slot in the table"),
    GET(joined, "time.monotonic() when it joined"),
    GET(phase_truncated, "True when phase was cut to fit the slot"),
    GET(phase_overflow, "phase ends not summarised: the slot had no room for their path"),
    GET(error, "why this slot could not be read fully, else None"),
    GET(role, "'worker', 'tool', 'root', 'helper' or 'other'"),
    GET(last_task_rss, "rss when its last task ended, bytes"),
    GET(last_task_time, "time.monotonic() when its last task ended, or None"),
    GET(recent_ends, "its last task ends: [(time, retained, peak_rss, path)], oldest first"),
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot view_slots[] = {
    {Py_tp_doc, "WorkerStats: one worker of a WorkerTable, as its slot last said.\n\n"
                "A read-only view: fields are decoded when read. Busy and corrupt slots\n"
                "carry only pid, state, slot and error (the rest is None, phases {})."},
    {Py_tp_dealloc, view_dealloc},
    {Py_tp_getset, view_getset},
    {Py_tp_repr, view_repr},
    {0, NULL},
};

PyType_Spec mt_worker_stats_spec = {
    .name = "memtrack.WorkerStats",
    .basicsize = sizeof(ViewObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_DISALLOW_INSTANTIATION | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = view_slots,
};

/* ------------------------------------------------------------------------ */
/* The Segment type                                                          */

/* A reader's mapping. Its fields are protected by `lock`: a method takes it
 * (waiting without the GIL if another thread holds it) before it touches
 * the reader, and may release the GIL while it waits for slots mid-write.
 * The mapped slots follow the sequence-counter protocol (layout.h). */
typedef struct {
    PyObject_HEAD mt_reader *r; /* NULL once closed */
    int owner;                  /* created it: unlink on close */
    long owner_pid;             /* the creating process: a forked copy never unlinks */
    char name[256];
    PyThread_type_lock lock;
    long lock_pid;      /* the process the lock belongs to (see fresh_lock) */
    PyObject **views;   /* per slot: the last view handed out, or NULL */
    uint32_t *stamps;   /* the snap stamp each view was made at */
} SegmentObject;

/* A forked child inherits the lock in whatever state the parent's threads
 * left it, and none of those threads exists in the child: it gets a lock of
 * its own (the inherited one is left, never used again). */
static int
fresh_lock(SegmentObject *self)
{
    long pid = mt_os_pid();
    if (self->lock != NULL && self->lock_pid == pid) {
        return 0;
    }
    PyThread_type_lock lock = PyThread_allocate_lock();
    if (lock == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    self->lock = lock;
    self->lock_pid = pid;
    return 0;
}

static int
lock_segment(SegmentObject *self)
{
    if (fresh_lock(self) < 0) {
        return -1;
    }
    if (!PyThread_acquire_lock(self->lock, NOWAIT_LOCK)) {
        Py_BEGIN_ALLOW_THREADS PyThread_acquire_lock(self->lock, WAIT_LOCK);
        Py_END_ALLOW_THREADS
    }
    if (self->r == NULL) {
        PyThread_release_lock(self->lock);
        PyErr_SetString(PyExc_ValueError, "worker table is closed");
        return -1;
    }
    return 0;
}

static int
segment_alloc_views(SegmentObject *self)
{
    self->views = PyMem_Calloc(self->r->capacity, sizeof *self->views);
    self->stamps = PyMem_Calloc(self->r->capacity, sizeof *self->stamps);
    if (self->views == NULL || self->stamps == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    return 0;
}

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
    if (self->r != NULL || self->lock != NULL) {
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
    if (fresh_lock(self) < 0) {
        return -1;
    }
    mt_oserr e;
    if (capacity == 0) { /* attach to an existing table */
        char why[ERROR_SIZE];
        self->r = mt_reader_open_named(name, why, sizeof why, &e);
        if (self->r == NULL) {
            raise_open_error(module, name, why, &e);
            return -1;
        }
        return segment_alloc_views(self);
    }
    if (capacity < 1 || (unsigned)capacity > MAX_CAPACITY) {
        PyErr_Format(PyExc_ValueError, "capacity must be between 1 and %u, not %d", MAX_CAPACITY,
                     capacity);
        return -1;
    }
    void *addr;
    int fd;
    size_t size = SEG_SIZE(capacity);
    if (mt_os_shm_create(name, size, &addr, &fd, &e) < 0) {
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
    h->created_monotonic = mt_os_monotonic();
    self->owner = 1;
    self->owner_pid = mt_os_pid();
    self->r = reader_new(h, size, fd, h);
    if (self->r == NULL) {
        mt_os_shm_detach(addr, size);
        mt_os_close(fd);
        mt_os_shm_unlink(name, &e);
        PyErr_NoMemory();
        return -1;
    }
    return segment_alloc_views(self);
}

static void
segment_close_impl(SegmentObject *self)
{
    if (self->views != NULL) {
        for (uint32_t i = 0; self->r != NULL && i < self->r->capacity; i++) {
            Py_CLEAR(self->views[i]);
        }
    }
    PyMem_Free(self->views);
    PyMem_Free(self->stamps);
    self->views = NULL;
    self->stamps = NULL;
    if (self->r == NULL) {
        return;
    }
    /* If this process joined the same table as a worker, it keeps its own
     * mapping (join maps separately), so unmapping ours is safe. */
    mt_reader_close(self->r);
    self->r = NULL;
    /* A forked child holds a copy of its parent's table (and its exit hooks):
     * removing the segment is the creating process's job alone. */
    mt_oserr e;
    if (self->owner && self->owner_pid == mt_os_pid()) {
        mt_os_shm_unlink(self->name, &e);
    }
}

static void
segment_dealloc(SegmentObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    segment_close_impl(self);
    if (self->lock != NULL && self->lock_pid == mt_os_pid()) {
        PyThread_free_lock(self->lock);
    }
    tp->tp_free(self);
    Py_DECREF(tp);
}

/* One pass, the lock held: the fast part with the GIL, the waiting part
 * (only when slots were mid-write) without it. -1 with TableError set when
 * the table is damaged. */
static int
segment_scan(SegmentObject *self, int full_check)
{
    mt_reader *r = self->r;
    int rc = scan_fast(r, full_check);
    if (rc > 0) {
        Py_BEGIN_ALLOW_THREADS rc = scan_wait(r);
        Py_END_ALLOW_THREADS
    }
    if (rc < 0) {
        PyObject *module = PyType_GetModuleByDef(Py_TYPE(self), &mt_module_def);
        if (module != NULL) {
            mt_state *st = PyModule_GetState(module);
            PyErr_Format(st->TableError, "worker table %s is damaged: %s", self->name,
                         r->damaged ? r->damaged : "unknown");
        }
        return -1;
    }
    return 0;
}

static uint64_t
sat_add(uint64_t a, uint64_t b)
{
    return a > UINT64_MAX - b ? UINT64_MAX : a + b;
}

/* totals() -> (live, rss, pss, uss, peak_rss, dead, memory, fresh_memory),
 * without building objects; memory sums each live worker's mt_pool_memory(),
 * fresh_memory its latest rss less the shared part (rss - pss) at its latest
 * pss reading (its rss before the first). */
static PyObject *
segment_totals(SegmentObject *self, PyObject *unused)
{
    if (lock_segment(self) < 0) {
        return NULL;
    }
    PyObject *result = NULL;
    if (segment_scan(self, 0) < 0) {
        goto done;
    }
    mt_reader *r = self->r;
    uint64_t live = 0, dead = 0, rss = 0, pss = 0, uss = 0, peak = 0, memory = 0, fresh = 0;
    for (uint32_t i = 0; i < r->capacity; i++) {
        const mt_snap *c = &r->snap[i];
        if (c->status != SNAP_OK) {
            continue;
        }
        if (c->live) {
            live++;
            rss = sat_add(rss, c->rss);
            pss = sat_add(pss, c->pss);
            uss = sat_add(uss, c->uss);
            memory = sat_add(memory, mt_pool_memory(c->pss, c->rss));
            uint64_t shared = c->pss && c->pss_rss > c->pss ? c->pss_rss - c->pss : 0;
            fresh = sat_add(fresh, c->rss > shared ? c->rss - shared : 0);
        }
        else {
            dead++;
        }
        peak = c->peak_rss > peak ? c->peak_rss : peak;
    }
    result = Py_BuildValue("(KKKKKKKK)", (unsigned long long)live, (unsigned long long)rss,
                           (unsigned long long)pss, (unsigned long long)uss,
                           (unsigned long long)peak, (unsigned long long)dead,
                           (unsigned long long)memory, (unsigned long long)fresh);
done:
    PyThread_release_lock(self->lock);
    return result;
}

/* read(check=False) -> list of WorkerStats, one per claimed slot. */
static PyObject *
segment_read(SegmentObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"check", NULL};
    int full_check = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|p:read", kwlist, &full_check) ||
        lock_segment(self) < 0) {
        return NULL;
    }
    PyObject *list = NULL;
    mt_state *st = mt_state_from_type(Py_TYPE(self));
    if (st == NULL || segment_scan(self, full_check) < 0) {
        goto done;
    }
    mt_reader *r = self->r;
    Py_ssize_t n = 0;
    for (uint32_t i = 0; i < r->capacity; i++) {
        n += r->snap[i].status != SNAP_EMPTY;
    }
    list = PyList_New(n);
    Py_ssize_t k = 0;
    for (uint32_t i = 0; list != NULL && i < r->capacity; i++) {
        const mt_snap *s = &r->snap[i];
        if (s->status == SNAP_EMPTY) {
            Py_CLEAR(self->views[i]);
            continue;
        }
        if (self->views[i] == NULL || self->stamps[i] != s->stamp) {
            PyObject *v = view_new(st->WorkerStats, r, i);
            if (v == NULL) {
                Py_CLEAR(list);
                break;
            }
            Py_XSETREF(self->views[i], v);
            self->stamps[i] = s->stamp;
        }
        PyList_SET_ITEM(list, k++, Py_NewRef(self->views[i]));
    }
done:
    PyThread_release_lock(self->lock);
    return list;
}

/* Free every slot whose owner is proven dead (or that is corrupt and whose
 * pid names no live process). */
typedef struct {
    mt_reader *r;
    long freed;
} forget_args;

static void
forget_body(void *arg)
{
    forget_args *a = arg;
    mt_reader *r = a->r;
    for (uint32_t i = 0; i < r->capacity; i++) {
        mt_slot *live = SLOT_AT(r->seg, i);
        int64_t owner = atomic_load(&live->owner);
        const mt_snap *s = &r->snap[i];
        if (owner == 0 || s->status == SNAP_BUSY || s->status == SNAP_EMPTY) {
            continue;
        }
        const mt_slot *c = copy_of(r, i);
        int dead = s->status == SNAP_CORRUPT
                       ? process_dead(s->pid, live->start_time)
                       : (c->state == SLOT_KILLED || c->state == SLOT_EXITED) &&
                             process_dead(c->pid, c->start_time);
        if (!dead || foreign_write_begin(live) < 0) {
            continue;
        }
        if (atomic_compare_exchange_strong(&live->owner, &owner, 0)) {
            memset((char *)live + offsetof(mt_slot, pid), 0, sizeof *live - offsetof(mt_slot, pid));
            a->freed++;
        }
        write_end(live);
    }
}

/* forget_dead() -> number of dead slots freed for reuse. */
static PyObject *
segment_forget_dead(SegmentObject *self, PyObject *unused)
{
    if (lock_segment(self) < 0) {
        return NULL;
    }
    PyObject *result = NULL;
    forget_args a = {self->r, 0};
    if (segment_scan(self, 1) == 0) {
        if (run_guarded(self->r, forget_body, &a) == 0) {
            result = PyLong_FromLong(a.freed);
        }
        else {
            segment_scan(self, 0); /* sets the damage error */
        }
    }
    PyThread_release_lock(self->lock);
    return result;
}

typedef struct {
    mt_reader *r;
    int64_t pid;
    int exitcode;
    int found;
} exit_args;

static void
record_exit_body(void *arg)
{
    exit_args *a = arg;
    mt_reader *r = a->r;
    for (uint32_t i = 0; i < r->capacity; i++) {
        mt_slot *live = SLOT_AT(r->seg, i);
        if (atomic_load(&live->owner) != a->pid) {
            continue;
        }
        /* The pool says it ended; a write to a live owner's slot could
         * interleave with its own, so believe it only when /proc agrees. */
        if (!process_dead(live->pid, live->start_time) || foreign_write_begin(live) < 0) {
            continue;
        }
        if (live->pid == a->pid) {
            if (a->exitcode < 0) {
                live->state = SLOT_KILLED;
                live->exit_signal = -a->exitcode;
                live->flags |= FLAG_EXIT_SIGNAL;
            }
            else {
                live->state = a->exitcode == 0 ? SLOT_EXITED : SLOT_KILLED;
                live->exit_code = a->exitcode;
                live->flags |= FLAG_EXIT_CODE;
            }
        }
        write_end(live);
        a->found = 1;
        return;
    }
}

/* record_exit(pid, exitcode): what a pool learned (Process.exitcode). */
static PyObject *
segment_record_exit(SegmentObject *self, PyObject *args)
{
    long long pid;
    int exitcode;
    if (!PyArg_ParseTuple(args, "Li:record_exit", &pid, &exitcode)) {
        return NULL;
    }
    if (exitcode < -64 || exitcode > 255 || exitcode == INT32_MIN) {
        PyErr_Format(PyExc_ValueError,
                     "exitcode must be an exit status (0..255) or minus a signal, not %d",
                     exitcode);
        return NULL;
    }
    if (lock_segment(self) < 0) {
        return NULL;
    }
    PyObject *result = NULL;
    exit_args a = {self->r, pid, exitcode, 0};
    if (run_guarded(self->r, record_exit_body, &a) == 0) {
        result = PyBool_FromLong(a.found);
    }
    else {
        segment_scan(self, 0); /* sets the damage error */
    }
    PyThread_release_lock(self->lock);
    return result;
}

static PyObject *
segment_close(SegmentObject *self, PyObject *unused)
{
    if (self->lock != NULL) {
        if (fresh_lock(self) < 0) {
            return NULL;
        }
        Py_BEGIN_ALLOW_THREADS PyThread_acquire_lock(self->lock, WAIT_LOCK);
        Py_END_ALLOW_THREADS segment_close_impl(self);
        PyThread_release_lock(self->lock);
    }
    Py_RETURN_NONE;
}

/* The header as attached: never re-read from the segment. */
static PyObject *
segment_header(SegmentObject *self, PyObject *unused)
{
    if (lock_segment(self) < 0) {
        return NULL;
    }
    const mt_seg_header *h = &self->r->header;
    PyObject *d = Py_BuildValue(
        "{s:I,s:I,s:I,s:L,s:K,s:d,s:I,s:I,s:n}", "version", h->version, "capacity", h->capacity,
        "slot_size", h->slot_size, "creator_pid", (long long)h->creator_pid, "creator_start",
        (unsigned long long)h->creator_start, "created", h->created, "heartbeat_ms",
        h->heartbeat_ms, "slot_phases", h->slot_phases, "size", (Py_ssize_t)self->r->size);
    PyThread_release_lock(self->lock);
    return d;
}

static PyObject *
segment_damage(SegmentObject *self, PyObject *unused)
{
    if (lock_segment(self) < 0) {
        return NULL;
    }
    int rc = check_size(self->r);
    if (rc == 0) {
        header_check c = {self->r, 0};
        rc = run_guarded(self->r, compare_header, &c);
        if (rc == 0 && !c.same) {
            snprintf(self->r->damage_text, sizeof self->r->damage_text,
                     "its header was rewritten after it was attached");
            self->r->damaged = self->r->damage_text;
        }
    }
    PyObject *result = self->r->damaged ? PyUnicode_FromString(self->r->damaged)
                                        : Py_NewRef(Py_None);
    PyThread_release_lock(self->lock);
    return result;
}

static PyObject *
segment_get_name(SegmentObject *self, void *closure)
{
    return PyUnicode_FromString(self->name);
}

static PyObject *
segment_get_closed(SegmentObject *self, void *closure)
{
    return PyBool_FromLong(self->r == NULL);
}

static PyMethodDef segment_methods[] = {
    {"read", (PyCFunction)(void (*)(void))segment_read, METH_VARARGS | METH_KEYWORDS,
     "read(check=False) -> list of WorkerStats."},
    {"forget_dead", (PyCFunction)segment_forget_dead, METH_NOARGS, "Free the dead slots."},
    {"totals", (PyCFunction)segment_totals, METH_NOARGS,
     "totals() -> (live, rss, pss, uss, peak_rss, dead, memory, fresh_memory)."},
    {"record_exit", (PyCFunction)segment_record_exit, METH_VARARGS,
     "record_exit(pid, exitcode) -> bool."},
    {"header", (PyCFunction)segment_header, METH_NOARGS, "The header fields, as attached."},
    {"damage", (PyCFunction)segment_damage, METH_NOARGS,
     "Why the table can no longer be read (resized, header rewritten), or None."},
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

/* segment_creator(name) -> (pid, start_time, same_pid_namespace, damage):
 * for cleanup_stale() and live_tables(). Reads the header with pread, never
 * through a mapping. Raises TableError for what is not this user's table at
 * all (another owner, not a regular file, no memtrack header); a table of
 * ours whose size, version or mode no longer fits comes back with `damage`
 * saying so, so that cleanup_stale() can remove it once its creator is dead. */
PyObject *
mt_segment_creator(PyObject *module, PyObject *arg)
{
    const char *name = mt_table_name_arg(arg);
    if (name == NULL) {
        return NULL;
    }
    mt_oserr e;
    mt_file_info info;
    mt_seg_header h;
    int fd;
    char why[ERROR_SIZE] = "";
    if (mt_os_shm_open(name, &fd, &info, &e) < 0) {
        mt_raise_oserr(&e);
        return NULL;
    }
    long got = mt_os_pread(fd, &h, sizeof h, 0);
    mt_os_close(fd);
    if (info.uid != mt_os_uid()) {
        snprintf(why, sizeof why, "it belongs to uid %u, not to this user", (unsigned)info.uid);
    }
    else if (!info.regular) {
        snprintf(why, sizeof why, "it is not a regular file");
    }
    else if (got != (long)sizeof h || memcmp(h.magic, SEG_MAGIC, 8) != 0) {
        snprintf(why, sizeof why, "it has no memtrack table header");
    }
    if (why[0] != '\0') {
        return table_error(module, name, why);
    }
    const char *damage = check_header(&h, (size_t)info.size);
    if (damage == NULL && info.mode != 0600) {
        damage = "its mode is not 0600";
    }
    int same_ns = h.creator_pidns == mt_os_pid_namespace();
    return Py_BuildValue("(LKOz)", (long long)h.creator_pid, (unsigned long long)h.creator_start,
                         same_ns ? Py_True : Py_False, damage);
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
    const char *name = mt_table_name_arg(arg);
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
