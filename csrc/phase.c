/*
 * Phases: `with memtrack.phase("parse"):` in C.
 *
 * Each thread has its own stack of open phases (a chain through
 * frame->parent from a thread-local top). All open phases of the process
 * are also in one registry, so that a peak reset by any thread first folds
 * the current high-water mark into all of them (see peak.c). Paths are
 * interned once ("index/parse" -> id) and the per-path summary lives next to
 * the interned path, so entering and leaving a known path allocates nothing.
 * Finished phases go to a bounded ring of records.
 */
#include "memtrack.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define ROOT_ID 0u               /* parent of outermost phases */
#define ERROR_PARENT 0xFFFFFFFFu /* interned exception names hang here */
#define OVERFLOW_ID 1u           /* "(overflow)": used when the path table is full */

typedef struct {
    uint32_t parent;
    uint32_t depth;
    uint64_t hash;
    char *name; /* malloc'd, never freed: pointers to it outlive the lock */
    size_t name_len;
    char *path; /* malloc'd, never freed */
    size_t path_len;
    /* The summary of this path. */
    mt_phase_totals totals;
    /* Allocations of the runs measured with allocation tracking on (not part
     * of mt_phase_totals, whose layout the worker slot shares). */
    uint64_t alloc_runs, total_allocated, total_allocations;
    /* Index of this path's entry in the worker slot, valid for slot_gen. */
    int slot_entry;
    uint32_t slot_gen;
} mt_path;

typedef struct {
    uint32_t path_id;
    uint32_t error_id; /* 0: none */
    long pid;
    unsigned long thread_id;
    double start, duration;
    uint64_t rss_start, rss_end, peak_rss;
    int64_t heap_delta;
    uint64_t allocated, allocations; /* ALLOC_NOT_MEASURED unless tracked */
} mt_record;

typedef struct mt_frame {
    struct mt_frame *prev, *next; /* registry links: Protected by phase_lock */
    struct mt_frame *parent;      /* enclosing phase of the same thread */
    uint64_t peak;                /* Protected by phase_lock (folded by others) */
    uint32_t path_id;
    uint32_t depth;
    uint64_t rss_start;
    int64_t heap_start; /* HEAP_NOT_READ unless configure(phase_heap=True) */
    double start;
    unsigned long thread_id;
    int orphaned;  /* exited by another thread: still on its entry thread's chain */
    int inherited; /* open in the parent when this process forked: not ours */
    int watch;     /* a PeakWatch: folded like a phase, never recorded */
    /* Allocation counters of the entering thread at entry, when tracking
     * was on (alloc_session != 0): the thread's own, read without a lock. */
    unsigned alloc_session;
    const mt_alloc_thread *alloc_thread;
    uint64_t alloc_bytes0, alloc_count0;
} mt_frame;

typedef struct {
    PyObject_HEAD PyObject *name; /* str */
    const char *name_utf8;        /* owned by name */
    Py_ssize_t name_len;
    int active;
    int done;
    mt_frame frame;
    mt_record record; /* valid when done */
} PhaseObject;

/* The process-wide phase state. It is process-wide by nature (one kernel
 * high-water mark per process), so it is one static struct rather than
 * module state. Every field is Protected by mt_phase_lock, except where
 * a field says otherwise. Never call the Python C API while holding the
 * lock: it may run the garbage collector, which may enter a phase. */
mtx_t mt_phase_lock;
atomic_bool mt_disabled; /* MEMTRACK_DISABLE: read without the lock */
/* Read malloc's heap at phase enter/exit (heap_delta): off by default, because
 * glibc's mallinfo2() walks every free chunk and takes every arena's lock, so
 * its cost grows with the heap (milliseconds per call in a heap of 200 000
 * fragments, benchmarks/RESULTS.md). configure(phase_heap=True) opts in.
 * The allocation counters of issue 14 (PEP 445 hooks, per thread and phase)
 * are O(1): once they land, read_heap() below takes heap_delta from them and
 * mallinfo2 is no longer needed here. Atomic. */
static atomic_bool phase_heap = false;

/* heap_delta of a phase whose heap was not read (configure(phase_heap=False)). */
#define HEAP_NOT_READ INT64_MIN
/* allocated/allocations of a phase not tracked from enter to exit. */
#define ALLOC_NOT_MEASURED UINT64_MAX

static struct {
    mt_path *paths; /* paths[0] is the root, paths[1] "(overflow)" */
    uint32_t npaths, paths_cap;
    uint32_t *index; /* open addressing: path id or 0 */
    uint32_t index_cap;
    uint64_t overflowed;
    mt_frame open; /* registry sentinel */
    size_t nopen;  /* phases in the registry (watches not counted) */
    mt_record *ring;
    size_t ring_cap, ring_head, ring_count;
    uint64_t dropped;
    uint64_t completed; /* phases ever recorded: reset() never clears it */
} ph;

/* This thread's innermost open phase. Only its own thread touches it. */
static _Thread_local mt_frame *tls_top;

/* ------------------------------------------------------------------------ */
/* Interned paths                                                            */

static uint64_t
path_hash(uint32_t parent, const char *name, size_t len)
{
    uint64_t h = 1469598103934665603ull ^ parent; /* FNV-1a */
    for (size_t i = 0; i < len; i++) {
        h = (h ^ (unsigned char)name[i]) * 1099511628211ull;
    }
    return h;
}

static int
index_put(uint32_t *index, uint32_t cap, uint64_t hash, uint32_t id)
{
    for (uint32_t i = (uint32_t)hash & (cap - 1);; i = (i + 1) & (cap - 1)) {
        if (index[i] == 0) {
            index[i] = id;
            return 0;
        }
    }
}

static int
grow_locked(void)
{
    if (ph.npaths == ph.paths_cap) {
        uint32_t cap = ph.paths_cap ? ph.paths_cap * 2 : 64;
        mt_path *p = realloc(ph.paths, cap * sizeof *p);
        if (p == NULL) {
            return -1;
        }
        ph.paths = p;
        ph.paths_cap = cap;
    }
    if ((uint64_t)ph.npaths * 2 >= ph.index_cap) {
        uint32_t cap = ph.index_cap ? ph.index_cap * 2 : 128;
        uint32_t *index = calloc(cap, sizeof *index);
        if (index == NULL) {
            return -1;
        }
        for (uint32_t id = 1; id < ph.npaths; id++) {
            index_put(index, cap, ph.paths[id].hash, id);
        }
        free(ph.index);
        ph.index = index;
        ph.index_cap = cap;
    }
    return 0;
}

/* Add a path entry; returns its id, or 0 when out of memory. */
static uint32_t
add_path_locked(uint32_t parent, uint32_t depth, uint64_t hash, const char *name, size_t len)
{
    if (grow_locked() < 0) {
        return 0;
    }
    const mt_path *up = parent < ph.npaths ? &ph.paths[parent] : NULL;
    size_t prefix = (up && up->path_len) ? up->path_len + 1 : 0;
    char *n = malloc(len + 1);
    char *p = malloc(prefix + len + 1);
    if (n == NULL || p == NULL) {
        free(n);
        free(p);
        return 0;
    }
    memcpy(n, name, len);
    n[len] = '\0';
    if (prefix) {
        memcpy(p, up->path, up->path_len);
        p[up->path_len] = '/';
    }
    memcpy(p + prefix, name, len);
    p[prefix + len] = '\0';
    uint32_t id = ph.npaths++;
    ph.paths[id] = (mt_path){.parent = parent,
                             .depth = depth,
                             .hash = hash,
                             .name = n,
                             .name_len = len,
                             .path = p,
                             .path_len = prefix + len,
                             .slot_entry = -2};
    index_put(ph.index, ph.index_cap, hash, id);
    return id;
}

static int
init_paths_locked(void)
{
    if (ph.npaths != 0) {
        return 0;
    }
    if (grow_locked() < 0) {
        return -1;
    }
    ph.paths[0] = (mt_path){0};
    ph.paths[0].name = ph.paths[0].path = "";
    ph.npaths = 1;
    static const char overflow[] = "(overflow)";
    if (add_path_locked(ROOT_ID, 1, path_hash(ROOT_ID, overflow, sizeof overflow - 1), overflow,
                        sizeof overflow - 1) != OVERFLOW_ID) {
        return -1;
    }
    return 0;
}

/* The id of parent/name, added when new. Too deep or too long a path is
 * recorded under the parent; a full table records under "(overflow)".
 * Returns 0 only when out of memory. */
static uint32_t
intern_locked(uint32_t parent, uint32_t depth, const char *name, size_t len)
{
    if (parent != ERROR_PARENT) {
        if (depth > MT_MAX_DEPTH) {
            return parent;
        }
        if (parent != ROOT_ID && ph.paths[parent].path_len + 1 + len > MT_MAX_PATH) {
            return parent;
        }
    }
    uint64_t hash = path_hash(parent, name, len);
    for (uint32_t i = (uint32_t)hash & (ph.index_cap - 1);; i = (i + 1) & (ph.index_cap - 1)) {
        uint32_t id = ph.index[i];
        if (id == 0) {
            break;
        }
        const mt_path *p = &ph.paths[id];
        if (p->hash == hash && p->parent == parent && p->name_len == len &&
            memcmp(p->name, name, len) == 0) {
            return id;
        }
    }
    if (ph.npaths >= MT_MAX_PATHS) {
        ph.overflowed++;
        return OVERFLOW_ID;
    }
    return add_path_locked(parent, depth, hash, name, len);
}

/* ------------------------------------------------------------------------ */
/* The open-phase registry                                                   */

void
mt_phase_fold_locked(uint64_t hwm)
{
    for (mt_frame *f = ph.open.next; f != &ph.open; f = f->next) {
        if (hwm > f->peak) {
            f->peak = hwm;
        }
    }
}

int
mt_phase_reset_peak_locked(uint64_t *rss_after, mt_oserr *e)
{
    uint64_t lost;
    if (mt_peak_reset_locked(&lost, rss_after, e) < 0) {
        return -1;
    }
    mt_phase_fold_locked(lost);
    return 0;
}

void
mt_phase_current_locked(char *buf, size_t size)
{
    const char *path = "";
    for (mt_frame *f = ph.open.prev; f != &ph.open; f = f->prev) {
        if (!f->watch) {
            path = ph.paths[f->path_id].path;
            break;
        }
    }
    snprintf(buf, size, "%s", path);
}

uint32_t
mt_phase_current_path_id(void)
{
    for (const mt_frame *f = tls_top; f != NULL; f = f->parent) {
        if (!f->orphaned) {
            return f->path_id;
        }
    }
    return ROOT_ID;
}

const char *
mt_phase_path_of(uint32_t id)
{
    mtx_lock(&mt_phase_lock);
    const char *path = id < ph.npaths ? ph.paths[id].path : "";
    mtx_unlock(&mt_phase_lock);
    return path;
}

static void
link_locked(mt_frame *f)
{
    f->prev = ph.open.prev;
    f->next = &ph.open;
    ph.open.prev->next = f;
    ph.open.prev = f;
    ph.nopen += !f->watch;
}

static void
unlink_locked(mt_frame *f)
{
    f->prev->next = f->next;
    f->next->prev = f->prev;
    f->prev = f->next = NULL;
    ph.nopen -= !f->watch;
}

static void
record_locked(const mt_record *r)
{
    mt_path *p = &ph.paths[r->path_id];
    mt_phase_totals_add(&p->totals, r->duration, r->rss_start, r->rss_end, r->peak_rss);
    if (r->allocated != ALLOC_NOT_MEASURED) {
        p->alloc_runs++;
        p->total_allocated += r->allocated;
        p->total_allocations += r->allocations;
    }
    ph.completed++;

    if (ph.ring == NULL && ph.ring_cap != 0) {
        ph.ring = malloc(ph.ring_cap * sizeof *ph.ring);
    }
    if (ph.ring == NULL) {
        ph.dropped++;
        return;
    }
    size_t slot = (ph.ring_head + ph.ring_count) % ph.ring_cap;
    ph.ring[slot] = *r;
    if (ph.ring_count < ph.ring_cap) {
        ph.ring_count++;
    }
    else {
        ph.ring_head = (ph.ring_head + 1) % ph.ring_cap;
        ph.dropped++;
    }
}

int
mt_phase_init(void)
{
    if (mtx_init(&mt_phase_lock, mtx_plain) != thrd_success) {
        return -1;
    }
    ph.open.next = ph.open.prev = &ph.open;
    ph.ring_cap = MT_DEFAULT_RECORDS;
    return init_paths_locked();
}

void
mt_phase_after_fork_child(void)
{
    /* The child's phases describe its own work: the phases open in the
     * parent (a pool's "main" around the fork of its workers) are not the
     * child's, so its stack starts empty, like its records and summary.
     * Leaving an inherited phase in the child records nothing. */
    for (mt_frame *f = ph.open.next, *next; f != &ph.open; f = next) {
        next = f->next;
        unlink_locked(f);
        f->inherited = 1;
    }
    tls_top = NULL; /* this runs in the forking thread, the only one left */
    for (uint32_t id = 0; id < ph.npaths; id++) {
        mt_path *p = &ph.paths[id];
        memset(&p->totals, 0, sizeof p->totals);
        p->alloc_runs = p->total_allocated = p->total_allocations = 0;
    }
    ph.ring_head = ph.ring_count = 0;
    ph.dropped = 0;
}

/* ------------------------------------------------------------------------ */
/* The Phase type                                                            */

/* Check a phase name and make it self's (a new reference is taken). */
static int
set_name(PhaseObject *self, PyObject *name)
{
    if (!PyUnicode_Check(name)) {
        PyErr_Format(PyExc_TypeError, "phase name must be a str, not %.100s",
                     Py_TYPE(name)->tp_name);
        return -1;
    }
    Py_ssize_t len;
    const char *utf8 = PyUnicode_AsUTF8AndSize(name, &len);
    if (utf8 == NULL) {
        return -1; /* lone surrogates: UnicodeEncodeError says which */
    }
    if (len == 0) {
        PyErr_SetString(PyExc_ValueError, "phase name must not be empty");
        return -1;
    }
    if (len > MT_MAX_NAME) {
        PyErr_Format(PyExc_ValueError, "phase name is %zd UTF-8 bytes long; the limit is %d", len,
                     MT_MAX_NAME);
        return -1;
    }
    Py_INCREF(name);
    Py_XSETREF(self->name, name);
    self->name_utf8 = utf8;
    self->name_len = len;
    return 0;
}

static int
phase_init(PhaseObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"name", NULL};
    PyObject *name;
    if (kwds == NULL && PyTuple_GET_SIZE(args) == 1) {
        name = PyTuple_GET_ITEM(args, 0); /* phase("x"), as nearly all are made */
    }
    else if (!PyArg_ParseTupleAndKeywords(args, kwds, "O:phase", kwlist, &name)) {
        return -1;
    }
    if (self->active) {
        PyErr_SetString(PyExc_RuntimeError, "cannot re-initialise an active phase");
        return -1;
    }
    if (set_name(self, name) < 0) {
        return -1;
    }
    self->done = 0;
    return 0;
}

static int
phase_traverse(PhaseObject *self, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(self));
    return 0;
}

static void
phase_dealloc(PhaseObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    Py_CLEAR(self->name);
    tp->tp_free(self);
    Py_DECREF(tp);
}

/* heap_delta's source at enter and exit; HEAP_NOT_READ unless opted in. */
static int64_t
read_heap(void)
{
    uint64_t used = 0, free_bytes;
    if (!atomic_load_explicit(&phase_heap, memory_order_relaxed)) {
        return HEAP_NOT_READ;
    }
    mt_os_heap(&used, &free_bytes);
    return (int64_t)used;
}

/* Start f (its path interned) at rss, just after a reset: into the registry
 * and this worker's slot. phase_lock held. */
/* Allocation counters: the entering thread's own, read without a lock. */
static inline void
alloc_begin(mt_frame *f)
{
    f->alloc_session = atomic_load_explicit(&mt_alloc_session, memory_order_relaxed);
    if (f->alloc_session != 0) {
        f->alloc_thread = &mt_alloc_tls;
        mt_alloc_thread_counts(&f->alloc_bytes0, &f->alloc_count0);
    }
}

/* What f's thread allocated since alloc_begin, or ALLOC_NOT_MEASURED unless
 * tracking ran (one session) all along and this is the entering thread. */
static inline void
alloc_span(const mt_frame *f, uint64_t *allocated, uint64_t *allocations)
{
    *allocated = *allocations = ALLOC_NOT_MEASURED;
    if (f->alloc_session != 0 && f->alloc_thread == &mt_alloc_tls &&
        f->alloc_session == atomic_load_explicit(&mt_alloc_session, memory_order_relaxed)) {
        mt_alloc_thread_counts(allocated, allocations);
        *allocated -= f->alloc_bytes0;
        *allocations -= f->alloc_count0;
    }
}

static void
start_frame_locked(mt_frame *f, uint64_t rss)
{
    f->rss_start = rss;
    f->peak = rss;
    link_locked(f);
    const mt_path *p = &ph.paths[f->path_id];
    mt_worker_on_enter_locked(p->path, p->path_len, f->depth, rss);
}

/* End f with the mark `hwm` and `rss` (ok: both were read), record it into
 * self->record and this worker's slot. phase_lock held. */
static void
end_frame_locked(PhaseObject *self, uint64_t hwm, uint64_t rss, int ok, double end, int64_t heap,
                 const char *error, uint64_t allocated, uint64_t allocations)
{
    mt_frame *f = &self->frame;
    mt_record *r = &self->record;
    if (hwm > f->peak) {
        f->peak = hwm;
    }
    if (rss > f->peak) {
        f->peak = rss;
    }
    unlink_locked(f);
    *r = (mt_record){
        .path_id = f->path_id,
        .error_id = error ? intern_locked(ERROR_PARENT, 0, error, strlen(error)) : 0,
        .pid = mt_os_pid(),
        .thread_id = f->thread_id,
        .start = f->start,
        .duration = end - f->start,
        .rss_start = f->rss_start,
        .rss_end = ok ? rss : f->rss_start,
        .peak_rss = f->peak,
        .heap_delta = (heap != HEAP_NOT_READ && f->heap_start != HEAP_NOT_READ)
                          ? heap - f->heap_start
                          : HEAP_NOT_READ,
        .allocated = allocated,
        .allocations = allocations,
    };
    record_locked(r);
    if (mt_worker_joined_locked()) {
        mt_path *p = &ph.paths[f->path_id];
        const mt_path *up = f->parent ? &ph.paths[f->parent->path_id] : &ph.paths[ROOT_ID];
        mt_worker_exit x = {
            .path = p->path,
            .path_len = p->path_len,
            .parent_path = up->path,
            .parent_len = up->path_len,
            .parent_depth = f->parent ? f->parent->depth : 0,
            .outermost = f->depth == 1,
            .still_open = ph.nopen != 0,
            .rss_start = r->rss_start,
            .rss_end = r->rss_end,
            .peak_rss = r->peak_rss,
            .heap_used = heap != HEAP_NOT_READ ? (uint64_t)heap : 0,
            .duration = r->duration,
        };
        mt_worker_on_exit_locked(&x, &p->slot_entry, &p->slot_gen);
    }
}

static PyObject *
phase_enter(PhaseObject *self, PyObject *unused)
{
    mt_frame *f = &self->frame;
    mt_oserr e;
    uint64_t rss = 0, lost = 0;
    int rc = 0;

    if (atomic_load_explicit(&mt_disabled, memory_order_relaxed)) {
        return Py_NewRef(self);
    }
    if (self->name == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "phase was not initialised");
        return NULL;
    }
    if (self->active || f->orphaned) {
        PyErr_Format(PyExc_RuntimeError, "phase %R is %s; enter a new phase object instead",
                     self->name,
                     self->active ? "already active" : "still open in the thread that entered it");
        return NULL;
    }
    f->inherited = 0;
    while (tls_top != NULL && tls_top->orphaned) {
        tls_top = tls_top->parent; /* skip phases other threads ended */
    }
    mt_frame *parent = tls_top;
    f->parent = parent;
    f->depth = parent ? parent->depth + 1 : 1;
    f->thread_id = PyThread_get_thread_ident();

    mtx_lock(&mt_phase_lock);
    f->path_id = intern_locked(parent ? parent->path_id : ROOT_ID, f->depth, self->name_utf8,
                               (size_t)self->name_len);
    if (f->path_id == 0) {
        rc = -2;
    }
    else if ((rc = mt_peak_reset_locked(&lost, &rss, &e)) == 0) {
        mt_phase_fold_locked(lost);
        start_frame_locked(f, rss);
    }
    mtx_unlock(&mt_phase_lock);

    if (rc == -2) {
        return PyErr_NoMemory();
    }
    if (rc < 0) {
        mt_raise_oserr(&e);
        return NULL;
    }
    f->heap_start = read_heap();
    f->start = mt_os_monotonic();
    alloc_begin(f);
    tls_top = f;
    self->active = 1;
    self->done = 0;
    Py_INCREF(self); /* an open frame is in the registry: keep it alive */
    return Py_NewRef(self);
}

/* Take f out of this thread's chain, wherever it is (exits need not be
 * strictly nested: generators and tasks interleave). */
static int
pop_thread_chain(mt_frame *f)
{
    if (tls_top == f) {
        tls_top = f->parent;
        return 0;
    }
    for (mt_frame *c = tls_top; c != NULL; c = c->parent) {
        if (c->parent == f) {
            c->parent = f->parent;
            return 0;
        }
    }
    /* Entered in another thread, whose chain still points at f: mark it
     * so that thread skips it, and keep the object alive for good. */
    f->orphaned = 1;
    return -1;
}

/* The class name of the exception type __exit__ was given, or NULL. */
static const char *
error_name(PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs > 0 && args[0] != Py_None && PyType_Check(args[0])) {
        const char *name = ((PyTypeObject *)args[0])->tp_name;
        const char *dot = strrchr(name, '.');
        return dot ? dot + 1 : name;
    }
    return NULL;
}

static PyObject *
phase_exit(PhaseObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    mt_frame *f = &self->frame;
    mt_oserr e;
    uint64_t hwm = 0, rss = 0;
    int rc;

    if (!self->active) {
        if (atomic_load_explicit(&mt_disabled, memory_order_relaxed)) {
            Py_RETURN_FALSE;
        }
        PyErr_SetString(PyExc_RuntimeError, "phase is not active");
        return NULL;
    }
    if (f->inherited) { /* entered by the parent before fork(): not ours */
        f->inherited = 0;
        self->active = 0;
        Py_DECREF(self);
        Py_RETURN_FALSE;
    }
    uint64_t allocated, allocations;
    alloc_span(f, &allocated, &allocations);
    double end = mt_os_monotonic();
    int64_t heap = f->heap_start != HEAP_NOT_READ ? read_heap() : HEAP_NOT_READ;
    const char *error = error_name(args, nargs);

    mtx_lock(&mt_phase_lock);
    rc = mt_peak_read_locked(&hwm, &rss, &e);
    end_frame_locked(self, hwm, rss, rc == 0, end, heap, error, allocated, allocations);
    mtx_unlock(&mt_phase_lock);

    int orphaned = pop_thread_chain(f) < 0;
    self->active = 0;
    self->done = 1;
    if (!orphaned) {
        Py_DECREF(self); /* the reference taken by __enter__; the caller holds one */
    }
    if (rc < 0) {
        mt_raise_oserr(&e);
        return NULL;
    }
    Py_RETURN_FALSE;
}

/* p.next(name): end this phase and start its sibling `name` in the same
 * object, with one reading shared by both: the mark read before the reset is
 * the ended phase's peak and the one its enclosing phases keep; the rss read
 * after the reset is its end and the sibling's start. 3 system calls where an
 * exit and an enter make 5, exact as they are. */
static PyObject *
phase_next(PhaseObject *self, PyObject *name)
{
    mt_frame *f = &self->frame;
    mt_oserr e;
    uint64_t lost = 0, rss = 0;
    uint32_t path_id = 0;
    int rc = 0;

    if (atomic_load_explicit(&mt_disabled, memory_order_relaxed)) {
        if (set_name(self, name) < 0) {
            return NULL;
        }
        return Py_NewRef(self);
    }
    if (!self->active) {
        PyErr_SetString(PyExc_RuntimeError, "phase is not active: next() ends an open phase");
        return NULL;
    }
    if (f->inherited) {
        /* Opened by the parent before fork(): not ours, like its exit. */
        return set_name(self, name) < 0 ? NULL : Py_NewRef(self);
    }
    if (f->thread_id != PyThread_get_thread_ident()) {
        PyErr_Format(PyExc_RuntimeError, "phase %R was entered by another thread; next() "
                     "must be called by the thread that entered it", self->name);
        return NULL;
    }
    if (tls_top != f) {
        PyErr_Format(PyExc_RuntimeError, "phase %R has inner phases still open; end them "
                     "before next()", self->name);
        return NULL;
    }
    /* The old name stays alive until the record holds its interned copy. */
    PyObject *old_name = Py_NewRef(self->name);
    if (set_name(self, name) < 0) {
        Py_DECREF(old_name);
        return NULL;
    }
    double now = mt_os_monotonic();
    int64_t heap = read_heap();
    uint64_t allocated, allocations;
    alloc_span(f, &allocated, &allocations);

    mtx_lock(&mt_phase_lock);
    path_id = intern_locked(f->parent ? f->parent->path_id : ROOT_ID, f->depth,
                            self->name_utf8, (size_t)self->name_len);
    if (path_id == 0) {
        rc = -2;
    }
    else if ((rc = mt_peak_reset_locked(&lost, &rss, &e)) == 0) {
        /* The lost mark ends this phase, then every other open one gets it. */
        end_frame_locked(self, lost, rss, 1, now, heap, NULL, allocated, allocations);
        mt_phase_fold_locked(lost);
        f->path_id = path_id;
        start_frame_locked(f, rss);
    }
    mtx_unlock(&mt_phase_lock);

    if (rc < 0) {
        /* Nothing changed under the lock: the phase goes on under its old name. */
        int failed = set_name(self, old_name);
        (void)failed; /* a name that was valid once is valid again */
        Py_DECREF(old_name);
        if (rc == -2) {
            return PyErr_NoMemory();
        }
        mt_raise_oserr(&e);
        return NULL;
    }
    Py_DECREF(old_name);
    self->done = 1;
    f->heap_start = heap;
    f->start = now;
    alloc_begin(f);
    return Py_NewRef(self);
}

/* Fill `out` (PhaseStats) from a record; the path strings are stable. */
static PyObject *
stats_from_record(PyTypeObject *tp, const mt_record *r, const char *name, const char *path,
                  const char *error)
{
    PyObject *s = PyStructSequence_New(tp);
    if (s == NULL) {
        return NULL;
    }
    int64_t rss_delta = (int64_t)r->rss_end - (int64_t)r->rss_start;
    uint64_t peak_delta = r->peak_rss > r->rss_start ? r->peak_rss - r->rss_start : 0;
    PyObject *items[] = {
        PyUnicode_DecodeUTF8(name, strlen(name), "replace"),
        PyUnicode_DecodeUTF8(path, strlen(path), "replace"),
        PyLong_FromLong(r->pid),
        PyLong_FromUnsignedLong(r->thread_id),
        PyFloat_FromDouble(r->start),
        PyFloat_FromDouble(r->duration),
        PyLong_FromUnsignedLongLong(r->rss_start),
        PyLong_FromUnsignedLongLong(r->rss_end),
        PyLong_FromLongLong(rss_delta),
        PyLong_FromUnsignedLongLong(r->peak_rss),
        PyLong_FromUnsignedLongLong(peak_delta),
        r->heap_delta == HEAP_NOT_READ ? Py_NewRef(Py_None) : PyLong_FromLongLong(r->heap_delta),
        error ? PyUnicode_DecodeUTF8(error, strlen(error), "replace") : Py_NewRef(Py_None),
        r->allocated == ALLOC_NOT_MEASURED ? Py_NewRef(Py_None)
                                           : PyLong_FromUnsignedLongLong(r->allocated),
        r->allocations == ALLOC_NOT_MEASURED ? Py_NewRef(Py_None)
                                             : PyLong_FromUnsignedLongLong(r->allocations),
    };
    int failed = 0;
    for (Py_ssize_t i = 0; i < (Py_ssize_t)(sizeof items / sizeof items[0]); i++) {
        if (items[i] == NULL) {
            failed = 1;
        }
        PyStructSequence_SET_ITEM(s, i, items[i] ? items[i] : Py_NewRef(Py_None));
    }
    if (failed) {
        Py_DECREF(s);
        return NULL;
    }
    return s;
}

typedef struct {
    mt_record r;
    const char *name, *path, *error;
} mt_named_record;

static void
name_record_locked(mt_named_record *out, const mt_record *r)
{
    out->r = *r;
    out->name = ph.paths[r->path_id].name;
    out->path = ph.paths[r->path_id].path;
    out->error = r->error_id ? ph.paths[r->error_id].name : NULL;
}

static PyObject *
phase_get_stats(PhaseObject *self, void *closure)
{
    if (!self->done) {
        Py_RETURN_NONE;
    }
    mt_state *st = mt_state_from_type(Py_TYPE(self));
    if (st == NULL) {
        return NULL;
    }
    mt_named_record nr;
    mtx_lock(&mt_phase_lock);
    name_record_locked(&nr, &self->record);
    mtx_unlock(&mt_phase_lock);
    return stats_from_record(st->PhaseStats, &nr.r, nr.name, nr.path, nr.error);
}

static PyObject *
phase_get_name(PhaseObject *self, void *closure)
{
    return Py_NewRef(self->name ? self->name : Py_None);
}

static PyObject *
phase_get_active(PhaseObject *self, void *closure)
{
    return PyBool_FromLong(self->active);
}

static PyObject *
phase_repr(PhaseObject *self)
{
    return PyUnicode_FromFormat("<memtrack.phase %R%s>", self->name ? self->name : Py_None,
                                self->active ? " active" : "");
}

static PyMethodDef phase_methods[] = {
    {"__enter__", (PyCFunction)phase_enter, METH_NOARGS, "Start the phase."},
    {"__exit__", (PyCFunction)(void (*)(void))phase_exit, METH_FASTCALL,
     "End the phase and record it; exceptions propagate."},
    {"next", (PyCFunction)phase_next, METH_O,
     "next(name): end this phase (stats) and start its sibling `name` in this object,\n"
     "with one reading shared by both; returns self."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef phase_getset[] = {
    {"stats", (getter)phase_get_stats, NULL,
     "PhaseStats of the last completed run of this phase, or None.", NULL},
    {"name", (getter)phase_get_name, NULL, "The phase name.", NULL},
    {"active", (getter)phase_get_active, NULL, "True between enter and exit.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot phase_slots[] = {
    {Py_tp_doc, "phase(name): measure the memory of a block of code.\n\n"
                "A context manager; p.stats is a PhaseStats once the block ends."},
    {Py_tp_init, phase_init},
    {Py_tp_new, PyType_GenericNew},
    {Py_tp_dealloc, phase_dealloc},
    {Py_tp_traverse, phase_traverse},
    {Py_tp_methods, phase_methods},
    {Py_tp_getset, phase_getset},
    {Py_tp_repr, phase_repr},
    {0, NULL},
};

PyType_Spec mt_phase_spec = {
    .name = "memtrack._core.Phase",
    .basicsize = sizeof(PhaseObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .slots = phase_slots,
};

/* ------------------------------------------------------------------------ */
/* PeakWatch: the exact peak of a stretch of time, across all threads, that  */
/* is never recorded, is on no thread's stack and never changes phase paths  */
/* (the pytest plugin measures a test body with one).                        */

typedef struct {
    PyObject_HEAD int active;
    mt_frame frame;
} WatchObject;

static PyObject *
watch_start(WatchObject *self, PyObject *unused)
{
    mt_frame *f = &self->frame;
    uint64_t rss = 0;
    mt_oserr e;
    if (self->active) {
        PyErr_SetString(PyExc_RuntimeError, "PeakWatch is already running");
        return NULL;
    }
    mtx_lock(&mt_phase_lock);
    int rc = mt_phase_reset_peak_locked(&rss, &e);
    if (rc == 0) {
        *f = (mt_frame){.watch = 1, .rss_start = rss, .peak = rss};
        link_locked(f);
    }
    mtx_unlock(&mt_phase_lock);
    f->start = mt_os_monotonic();
    if (rc < 0) {
        mt_raise_oserr(&e);
        return NULL;
    }
    self->active = 1;
    Py_INCREF(self); /* in the registry until stop() */
    Py_RETURN_NONE;
}

/* stop() -> (rss_start, rss_end, peak_rss, duration) */
static PyObject *
watch_stop(WatchObject *self, PyObject *unused)
{
    mt_frame *f = &self->frame;
    uint64_t hwm = 0, rss = 0;
    mt_oserr e;
    if (!self->active) {
        PyErr_SetString(PyExc_RuntimeError, "PeakWatch is not running");
        return NULL;
    }
    int rc = 0;
    mtx_lock(&mt_phase_lock);
    if (!f->inherited) {
        rc = mt_peak_read_locked(&hwm, &rss, &e);
        f->peak = hwm > f->peak ? hwm : f->peak;
        f->peak = rss > f->peak ? rss : f->peak;
        unlink_locked(f);
    }
    mtx_unlock(&mt_phase_lock);
    self->active = 0;
    double duration = mt_os_monotonic() - f->start;
    PyObject *result =
        rc < 0 ? NULL
               : Py_BuildValue("(KKKd)", (unsigned long long)f->rss_start, (unsigned long long)rss,
                               (unsigned long long)f->peak, duration);
    if (rc < 0) {
        mt_raise_oserr(&e);
    }
    Py_DECREF(self);
    return result;
}

static void
watch_dealloc(WatchObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    tp->tp_free(self);
    Py_DECREF(tp);
}

static PyMethodDef watch_methods[] = {
    {"start", (PyCFunction)watch_start, METH_NOARGS, "Start watching: the peak starts at rss."},
    {"stop", (PyCFunction)watch_stop, METH_NOARGS,
     "stop() -> (rss_start, rss_end, peak_rss, duration)."},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot watch_slots[] = {
    {Py_tp_doc, "PeakWatch(): the exact rss peak between start() and stop(), in every thread,\n"
                "without a phase record."},
    {Py_tp_new, PyType_GenericNew},
    {Py_tp_dealloc, watch_dealloc},
    {Py_tp_methods, watch_methods},
    {0, NULL},
};

PyType_Spec mt_watch_spec = {
    .name = "memtrack._core.PeakWatch",
    .basicsize = sizeof(WatchObject),
    .flags = Py_TPFLAGS_DEFAULT,
    .slots = watch_slots,
};

/* ------------------------------------------------------------------------ */
/* Aggregates                                                                */

/* A PhaseSummary of `t`: the one place totals become Python objects (the
 * process's summary() here, a worker slot's summary in table/reader.c). */
PyObject *
mt_phase_summary_new(mt_state *st, const mt_phase_totals *t)
{
    PyObject *s = PyStructSequence_New(st->PhaseSummary);
    if (s == NULL) {
        return NULL;
    }
    PyObject *items[] = {
        PyLong_FromUnsignedLongLong(t->count),
        PyFloat_FromDouble(t->total_time),
        PyLong_FromUnsignedLongLong(t->max_peak_rss),
        PyLong_FromUnsignedLongLong(t->max_peak_delta),
        PyLong_FromLongLong(t->total_rss_delta),
        PyFloat_FromDouble(t->count ? (double)t->total_rss_delta / (double)t->count : 0.0),
    };
    int bad = 0;
    for (int j = 0; j < 6; j++) {
        bad |= items[j] == NULL;
        PyStructSequence_SET_ITEM(s, j, items[j] ? items[j] : Py_NewRef(Py_None));
    }
    /* total_allocated, total_allocations (by name only): None here; summary()
     * fills them in for the paths that allocation tracking measured. */
    PyStructSequence_SET_ITEM(s, 6, Py_NewRef(Py_None));
    PyStructSequence_SET_ITEM(s, 7, Py_NewRef(Py_None));
    if (bad) {
        Py_CLEAR(s);
    }
    return s;
}

PyObject *
mt_summary(PyObject *module, PyObject *unused)
{
    mt_state *st = PyModule_GetState(module);
    mt_path *copy = NULL;
    uint32_t n = 0;
    PyObject *result = NULL;

    mtx_lock(&mt_phase_lock);
    copy = malloc((ph.npaths ? ph.npaths : 1) * sizeof *copy);
    if (copy != NULL) {
        for (uint32_t id = 1; id < ph.npaths; id++) {
            if (ph.paths[id].totals.count != 0 && ph.paths[id].parent != ERROR_PARENT) {
                copy[n++] = ph.paths[id];
            }
        }
    }
    mtx_unlock(&mt_phase_lock);
    if (copy == NULL) {
        return PyErr_NoMemory();
    }
    result = PyDict_New();
    for (uint32_t i = 0; result != NULL && i < n; i++) {
        const mt_path *p = &copy[i];
        PyObject *s = mt_phase_summary_new(st, &p->totals);
        PyObject *key = PyUnicode_DecodeUTF8(p->path, p->path_len, "replace");
        if (s != NULL && p->alloc_runs) { /* by name only; None when untracked */
            PyObject *bytes = PyLong_FromUnsignedLongLong(p->total_allocated);
            PyObject *count = PyLong_FromUnsignedLongLong(p->total_allocations);
            if (bytes == NULL || count == NULL) {
                Py_XDECREF(bytes);
                Py_XDECREF(count);
                Py_CLEAR(s);
            }
            else {
                PyObject *none6 = PyStructSequence_GET_ITEM(s, 6);
                PyObject *none7 = PyStructSequence_GET_ITEM(s, 7);
                PyStructSequence_SET_ITEM(s, 6, bytes);
                PyStructSequence_SET_ITEM(s, 7, count);
                Py_DECREF(none6);
                Py_DECREF(none7);
            }
        }
        if (s == NULL || key == NULL || PyDict_SetItem(result, key, s) < 0) {
            Py_CLEAR(result);
        }
        Py_XDECREF(s);
        Py_XDECREF(key);
    }
    free(copy);
    return result;
}

/* Copy the ring (oldest first) with names resolved; NULL on no memory. */
static mt_named_record *
copy_records(size_t *count, uint64_t *dropped)
{
    mtx_lock(&mt_phase_lock);
    size_t n = ph.ring_count;
    mt_named_record *copy = malloc((n ? n : 1) * sizeof *copy);
    if (copy != NULL) {
        for (size_t i = 0; i < n; i++) {
            name_record_locked(&copy[i], &ph.ring[(ph.ring_head + i) % ph.ring_cap]);
        }
        *count = n;
        *dropped = ph.dropped;
    }
    mtx_unlock(&mt_phase_lock);
    return copy;
}

PyObject *
mt_records(PyObject *module, PyObject *unused)
{
    mt_state *st = PyModule_GetState(module);
    size_t n;
    uint64_t dropped;
    mt_named_record *copy = copy_records(&n, &dropped);
    PyObject *list = NULL, *result = NULL;
    if (copy == NULL) {
        return PyErr_NoMemory();
    }
    list = PyList_New((Py_ssize_t)n);
    for (size_t i = 0; list != NULL && i < n; i++) {
        PyObject *s = stats_from_record(st->PhaseStats, &copy[i].r, copy[i].name, copy[i].path,
                                        copy[i].error);
        if (s == NULL) {
            Py_CLEAR(list);
            break;
        }
        PyList_SET_ITEM(list, (Py_ssize_t)i, s);
    }
    if (list != NULL) {
        result = Py_BuildValue("(NK)", list, (unsigned long long)dropped);
    }
    free(copy);
    return result;
}

PyObject *
mt_reset(PyObject *module, PyObject *unused)
{
    mtx_lock(&mt_phase_lock);
    for (uint32_t id = 0; id < ph.npaths; id++) {
        mt_path *p = &ph.paths[id];
        memset(&p->totals, 0, sizeof p->totals);
        p->alloc_runs = p->total_allocated = p->total_allocations = 0;
    }
    ph.ring_head = ph.ring_count = 0;
    ph.dropped = 0;
    ph.overflowed = 0;
    mtx_unlock(&mt_phase_lock);
    Py_RETURN_NONE;
}

PyObject *
mt_configure(PyObject *module, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"max_records", "phase_heap", NULL};
    Py_ssize_t max_records = -1;
    int heap = -1;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|$np:configure", kwlist, &max_records, &heap)) {
        return NULL;
    }
    if (heap != -1) {
        atomic_store(&phase_heap, heap != 0);
    }
    if (max_records != -1) {
        if (max_records < 1 || (size_t)max_records > SIZE_MAX / sizeof(mt_record)) {
            PyErr_Format(PyExc_ValueError, "max_records must be at least 1, not %zd", max_records);
            return NULL;
        }
        mt_record *ring = malloc((size_t)max_records * sizeof *ring);
        if (ring == NULL) {
            return PyErr_NoMemory();
        }
        mtx_lock(&mt_phase_lock);
        /* Keep the newest records that fit. */
        size_t keep = ph.ring_count < (size_t)max_records ? ph.ring_count : (size_t)max_records;
        size_t skip = ph.ring_count - keep;
        for (size_t i = 0; i < keep; i++) {
            ring[i] = ph.ring[(ph.ring_head + skip + i) % ph.ring_cap];
        }
        mt_record *old = ph.ring;
        ph.dropped += skip;
        ph.ring = ring;
        ph.ring_cap = (size_t)max_records;
        ph.ring_head = 0;
        ph.ring_count = keep;
        mtx_unlock(&mt_phase_lock);
        free(old);
    }
    mtx_lock(&mt_phase_lock);
    size_t cap = ph.ring_cap;
    mtx_unlock(&mt_phase_lock);
    return Py_BuildValue("{s:n,s:O}", "max_records", (Py_ssize_t)cap, "phase_heap",
                         atomic_load(&phase_heap) ? Py_True : Py_False);
}

PyObject *
mt_phase_counters(PyObject *module, PyObject *unused)
{
    mtx_lock(&mt_phase_lock);
    unsigned long long paths = ph.npaths - 2, open = ph.nopen, overflowed = ph.overflowed,
                       dropped = ph.dropped, records = ph.ring_count, completed = ph.completed;
    mtx_unlock(&mt_phase_lock);
    return Py_BuildValue("{s:K,s:K,s:K,s:K,s:K,s:K}", "paths", paths, "open", open, "overflowed",
                         overflowed, "dropped", dropped, "records", records, "completed",
                         completed);
}

/* The records as msgpack maps (docs/format.md), packed without building a
 * Python object per record: the one encoder of a phase record, for dump()
 * and for the recorder. pack_phase_records(since=None) keeps the records
 * that started at or after `since` (seconds, PhaseStats.start's clock). */
PyObject *
mt_pack_phase_records(PyObject *module, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"since", NULL};
    PyObject *since_arg = Py_None;
    double since = -INFINITY;
    size_t n;
    uint64_t dropped;
    mt_named_record *copy = NULL;
    mt_packer *pk = NULL;
    PyObject *result = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|O:pack_phase_records", kwlist, &since_arg)) {
        return NULL;
    }
    if (since_arg != Py_None) {
        since = PyFloat_AsDouble(since_arg);
        if (since == -1.0 && PyErr_Occurred()) {
            return NULL;
        }
    }
    copy = copy_records(&n, &dropped);
    if (copy == NULL) {
        return PyErr_NoMemory();
    }
    pk = mt_packer_new();
    if (pk == NULL) {
        free(copy);
        return PyErr_NoMemory();
    }
    int rc = 0;
    for (size_t i = 0; rc == 0 && i < n; i++) {
        const mt_named_record *c = &copy[i];
        if (!(c->r.start >= since)) {
            continue;
        }
        /* allocated/allocations only when tracked: a profile of untracked phases
         * is as large as before (readers take an absent key as nil). */
        int tracked = c->r.allocated != ALLOC_NOT_MEASURED;
        rc |= mt_pack_map(pk, tracked ? 14 : 12);
        rc |= mt_pack_key(pk, "t") | mt_pack_str(pk, "phase", 5);
        rc |= mt_pack_key(pk, "name") | mt_pack_str(pk, c->name, strlen(c->name));
        rc |= mt_pack_key(pk, "path") | mt_pack_str(pk, c->path, strlen(c->path));
        rc |= mt_pack_key(pk, "pid") | mt_pack_i64(pk, c->r.pid);
        rc |= mt_pack_key(pk, "thread_id") | mt_pack_u64(pk, c->r.thread_id);
        rc |= mt_pack_key(pk, "start") | mt_pack_double(pk, c->r.start);
        rc |= mt_pack_key(pk, "duration") | mt_pack_double(pk, c->r.duration);
        rc |= mt_pack_key(pk, "rss_start") | mt_pack_u64(pk, c->r.rss_start);
        rc |= mt_pack_key(pk, "rss_end") | mt_pack_u64(pk, c->r.rss_end);
        rc |= mt_pack_key(pk, "peak_rss") | mt_pack_u64(pk, c->r.peak_rss);
        rc |=
            mt_pack_key(pk, "heap_delta") |
            (c->r.heap_delta == HEAP_NOT_READ ? mt_pack_nil(pk) : mt_pack_i64(pk, c->r.heap_delta));
        rc |= mt_pack_key(pk, "error");
        rc |= c->error ? mt_pack_str(pk, c->error, strlen(c->error)) : mt_pack_nil(pk);
        if (tracked) {
            rc |= mt_pack_key(pk, "allocated") | mt_pack_u64(pk, c->r.allocated);
            rc |= mt_pack_key(pk, "allocations") | mt_pack_u64(pk, c->r.allocations);
        }
    }
    free(copy);
    if (rc != 0) {
        PyErr_NoMemory();
    }
    else {
        result = Py_BuildValue("(NK)", mt_packer_bytes(pk), (unsigned long long)dropped);
    }
    mt_packer_free(pk);
    return result;
}
