/*
 * The worker side of the table: this process's own slot. Claiming a slot,
 * keeping it in step with the phases (hooks called by phase.c under
 * mt_phase_lock), the heartbeat thread, and leaving.
 */
#include "table.h"

#define FOOTPRINT_EVERY 10 /* heartbeats between uss/pss readings */

static void
raise_window(mt_slot *s, uint64_t value)
{
    uint64_t seen = atomic_load_explicit(&s->window_peak, memory_order_relaxed);
    while (value > seen && !atomic_compare_exchange_weak(&s->window_peak, &seen, value)) {
    }
}
/* ------------------------------------------------------------------------ */
/* The worker side: this process's own slot.                                  */

/* Process-wide by nature (one slot per process). Protected by
 * mt_phase_lock, except the heartbeat's own lock and flag as noted. */
static struct {
    mt_seg_header *seg;
    size_t size;
    uint32_t capacity; /* copied at join: never re-read from the segment */
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
init_slot(mt_slot *s, long pid, uint64_t start)
{
    /* Fields after the counter and the claim word, zeroed. */
    memset((char *)s + offsetof(mt_slot, pid), 0, sizeof *s - offsetof(mt_slot, pid));
    s->pid = pid;
    s->start_time = start;
    s->state = SLOT_IDLE;
    s->role = ROLE_WORKER;
    s->joined = s->updated = mt_os_monotonic();
}

/* Take slot s from `expected` (0: free, else its dead owner) and initialise
 * it. The write begins first, so that a counter left odd by a dead owner is
 * taken over while the claim word still names that owner; the claim word is
 * then moved by CAS, so two claimants never both win. -1 when another writer
 * is mid-write (and not proven dead) or another claimant won. Never waits. */
static int
take_slot(mt_slot *s, int64_t expected, long pid, uint64_t start)
{
    if (foreign_write_begin(s) < 0) {
        return -1;
    }
    if (!atomic_compare_exchange_strong(&s->owner, &expected, (int64_t)pid)) {
        write_end(s);
        return -1;
    }
    init_slot(s, pid, start);
    write_end(s);
    return 0;
}

/* Claim a free slot, else the oldest dead one. phase_lock held. Never
 * waits for another slot: a slot being written is skipped. */
static int
claim_locked(mt_seg_header *h, uint32_t capacity, uint32_t *index)
{
    long pid;
    uint64_t start;
    self_identity(&pid, &start);
    for (uint32_t i = 0; i < capacity; i++) {
        mt_slot *s = SLOT_AT(h, i);
        if (atomic_load_explicit(&s->owner, memory_order_relaxed) == 0 &&
            take_slot(s, 0, pid, start) == 0) {
            *index = i;
            return 0;
        }
    }
    /* Full: reuse the dead slot that was updated longest ago. A slot is
     * dead when its owner (pid + start time) is proven gone, or when the
     * owner itself marked it exited (it gave the slot up). */
    mt_slot *copy = malloc(sizeof *copy);
    int rc = -1;
    if (copy == NULL) {
        return -1;
    }
    for (int attempt = 0; attempt < 4 && rc < 0; attempt++) {
        int64_t best_owner = 0;
        uint32_t best = 0;
        double best_updated = 0;
        for (uint32_t i = 0; i < capacity; i++) {
            mt_slot *s = SLOT_AT(h, i);
            uint64_t seq;
            int64_t owner = atomic_load(&s->owner);
            if (owner == 0) {
                continue;
            }
            int torn = try_read_slot(s, copy, &seq) != 0;
            if (torn) {
                read_slot_torn(s, copy);
            }
            if (owner == pid && (torn || copy->state != SLOT_EXITED)) {
                continue;
            }
            int dead = (!torn && copy->state == SLOT_EXITED) ||
                       process_dead(copy->pid, copy->start_time);
            if (!(copy->updated == copy->updated)) {
                copy->updated = 0; /* a NaN orders nothing: take it first */
            }
            if (owner == pid) {
                copy->updated = -1; /* our own slot, left earlier: take it back first */
            }
            if (dead && (best_owner == 0 || copy->updated < best_updated)) {
                best_owner = owner;
                best = i;
                best_updated = copy->updated;
            }
        }
        if (best_owner == 0) {
            break;
        }
        if (take_slot(SLOT_AT(h, best), best_owner, pid, start) == 0) {
            *index = best;
            rc = 0;
        }
    }
    free(copy);
    return rc;
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
        if (wk.slot != NULL && mt_os_rss(&rss, &e) == 0 && mt_peak_read_locked(&peak, NULL, &e) == 0) {
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
                s->pss_rss = rss;
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

/* From Python: the join waits up to one heartbeat's write, so it waits
 * without the GIL (the heartbeat thread never takes the GIL). */
static void
stop_heartbeat_released(void)
{
    Py_BEGIN_ALLOW_THREADS stop_heartbeat();
    Py_END_ALLOW_THREADS
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

/* The current phase path, with its full length and whether it was cut. */
static void
set_phase(mt_slot *s, const char *path, size_t len)
{
    if (copy_path(s->phase, SLOT_PATH, path, len)) {
        s->flags |= FLAG_PHASE_CUT;
    }
    else {
        s->flags &= ~(uint32_t)FLAG_PHASE_CUT;
    }
    s->phase_len = (uint32_t)len;
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
    set_phase(s, path, len);
    s->depth = depth;
    s->rss = rss;
    if (rss > s->peak_rss) {
        s->peak_rss = rss;
    }
    raise_window(s, rss);
    s->updated = mt_os_monotonic();
    write_end(s);
}

/* Find or add the summary entry of a path; -1 when the slot has no room.
 * An entry is the full path's hash and length: paths cut to the same text
 * stay apart. */
static int
phase_entry_locked(mt_slot *s, const char *path, size_t len)
{
    uint64_t hash = mt_path_hash(path, len);
    uint32_t n = s->nphases < SLOT_PHASES ? s->nphases : SLOT_PHASES;
    for (uint32_t i = 0; i < n; i++) {
        if (s->phases[i].path_hash == hash && s->phases[i].path_len == len) {
            return (int)i;
        }
    }
    if (n == SLOT_PHASES) {
        return -1;
    }
    mt_slot_phase *p = &s->phases[n];
    memset(p, 0, sizeof *p);
    copy_path(p->path, SUMMARY_PATH, path, len);
    p->path_len = (uint32_t)len;
    p->path_hash = hash;
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
    set_phase(s, x->parent_path, x->parent_len);
    s->depth = x->parent_depth;
    s->rss = x->rss_end;
    if (x->peak_rss > s->peak_rss) {
        s->peak_rss = x->peak_rss;
    }
    if (x->rss_end > s->peak_rss) {
        s->peak_rss = x->rss_end;
    }
    if (x->heap_used != 0) { /* 0: not read (phase_heap off); the heartbeat's stays */
        s->heap_used = x->heap_used;
    }
    raise_window(s, x->peak_rss > x->rss_end ? x->peak_rss : x->rss_end);
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
        mt_phase_totals_add(&s->phases[entry].totals, x->duration, x->rss_start, x->rss_end,
                            x->peak_rss);
    }
    double now = mt_os_monotonic();
    if (x->outermost) {
        s->tasks++;
        s->last_task_rss = x->rss_end;
        s->last_task_time = now;
        mt_slot_end *end = &s->ends[s->ends_written % SLOT_ENDS];
        end->time = now;
        end->retained = x->rss_end;
        end->peak_rss = x->peak_rss > x->rss_end ? x->peak_rss : x->rss_end;
        end->path_hash =
            entry >= 0 ? s->phases[entry].path_hash : mt_path_hash(x->path, x->path_len);
        s->ends_written++;
    }
    s->updated = now;
    write_end(s);
}

/* ------------------------------------------------------------------------ */
/* Worker-side Python functions                                               */

/* join(name) -> slot index, or -1 when the table is full (run untracked). */
PyObject *
mt_worker_join(PyObject *module, PyObject *arg)
{
    const char *name = mt_table_name_arg(arg);
    if (name == NULL) {
        return NULL;
    }
    if (name[0] != '/' || strlen(name) >= sizeof wk.name || strchr(name + 1, '/') != NULL) {
        PyErr_Format(PyExc_ValueError, "bad worker table name %R: expected '/memtrack-...'", arg);
        return NULL;
    }
    stop_heartbeat_released();
    size_t size;
    mt_seg_header *h = mt_table_attach_checked(module, name, &size);
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
    wk.capacity = h->capacity; /* checked against the size at attach */
    wk.heartbeat = h->heartbeat_ms / 1000.0;
    uint32_t index = 0;
    long result = -1;
    if (claim_locked(h, wk.capacity, &index) == 0) {
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
        if (claim_locked(wk.seg, wk.capacity, &index) == 0) {
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
    stop_heartbeat_released();
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
    if (!(sec == 0 || (sec >= MT_MIN_INTERVAL && sec <= MT_MAX_INTERVAL))) {
        PyErr_Format(PyExc_ValueError,
                     "heartbeat must be 0 (off) or between 0.001 and 3600 seconds, not %R", arg);
        return NULL;
    }
    stop_heartbeat_released();
    mtx_lock(&mt_phase_lock);
    wk.heartbeat = sec;
    start_heartbeat_locked();
    mtx_unlock(&mt_phase_lock);
    Py_RETURN_NONE;
}

/* set_role(role) -> bool: say what this process is to the pool ("worker",
 * "tool", "root", "helper", "other"); False when it holds no slot. */
PyObject *
mt_worker_set_role(PyObject *module, PyObject *arg)
{
    static const char *const names[] = {"worker", "tool", "root", "helper", "other"};
    const char *role = PyUnicode_Check(arg) ? PyUnicode_AsUTF8(arg) : NULL;
    uint8_t value = ROLE_LAST + 1;
    for (uint8_t i = 0; role != NULL && i <= ROLE_LAST; i++) {
        if (strcmp(role, names[i]) == 0) {
            value = i;
        }
    }
    if (value > ROLE_LAST) {
        if (!PyErr_Occurred()) {
            PyErr_Format(PyExc_ValueError,
                         "role must be 'worker', 'tool', 'root', 'helper' or 'other', not %R",
                         arg);
        }
        return NULL;
    }
    mtx_lock(&mt_phase_lock);
    mt_slot *s = wk.slot;
    if (s != NULL) {
        write_begin(s);
        s->role = value;
        s->updated = mt_os_monotonic();
        write_end(s);
    }
    mtx_unlock(&mt_phase_lock);
    return PyBool_FromLong(s != NULL);
}
