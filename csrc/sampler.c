/*
 * The recorder behind memtrack.record(): a native thread (it never takes
 * the GIL) that, every interval, samples this process (rss, the exact peak
 * since the previous sample, pss at a lower rate), every slot of a worker
 * table, and optionally every descendant of a process through /proc, and
 * appends msgpack records (docs/format.md) to a file through msgpack-c.
 *
 * Records are written in whole-record chunks (every second or 64 KiB), so a
 * run killed with SIGKILL leaves a file readable up to its last chunk.
 */
#include "memtrack.h"

#include <stdio.h>
#include <string.h>

#define FLUSH_BYTES (64u * 1024u)
#define FLUSH_SECONDS 1.0
#define MAX_PROCS 4096

/* What the recorder last saw of a slot, to turn changes into events. */
typedef struct {
    int64_t pid; /* 0: nothing seen */
    const char *state;
    uint64_t tasks;
    char phase[256];
} mt_seen_slot;

typedef struct {
    long pid;
    uint64_t pss, uss; /* last reading, 0 before the first */
    int have_pss;
    mt_budget budget; /* its pss readings */
    int present;      /* seen in this round */
    uint64_t rounds;  /* rounds it has been seen in */
} mt_seen_proc;

typedef struct {
    PyObject_HEAD
        /* Set before the thread starts and read-only while it runs. */
        int fd;
    double interval;
    int pss_every;
    long root_pid;
    mt_reader *table; /* NULL: no table */
    uint32_t capacity;
    /* Owned by the thread while it runs (the reader too). */
    mt_seen_slot *seen;
    mt_worker_view view;
    mt_seen_proc *procs;
    size_t nprocs;
    long *tree;
    mt_packer *pk;
    mt_budget self_budget; /* this process's pss readings */
    size_t packed;         /* bytes in pk not yet written */
    double last_flush;
    uint64_t beat;
    /* Protected by lock: the stop request, the status, the write error. */
    mtx_t lock;
    cnd_t wake;
    int stop;
    int running;
    long owner_pid; /* the process whose thread this is */
    thrd_t thread;
    uint64_t samples, records, bytes;
    uint32_t live;
    uint64_t pool_rss, pool_pss, pool_peak, max_pool_pss, max_pool_peak, self_rss;
    mt_oserr write_error;
    int failed;
} RecorderObject;

/* ------------------------------------------------------------------------ */
/* Packing helpers: maps of known size, built key by key.                    */

static int
pack_str_or_nil(mt_packer *pk, const char *s)
{
    return (s == NULL || s[0] == '\0') ? mt_pack_nil(pk) : mt_pack_str(pk, s, strlen(s));
}

static int
pack_sample(mt_packer *pk, double time, long pid, const char *source, uint64_t rss, uint64_t peak,
            int have_pss, uint64_t pss, uint64_t uss, const char *phase)
{
    int rc = mt_pack_map(pk, 9);
    rc |= mt_pack_key(pk, "t") | mt_pack_key(pk, "sample");
    rc |= mt_pack_key(pk, "time") | mt_pack_double(pk, time);
    rc |= mt_pack_key(pk, "pid") | mt_pack_i64(pk, pid);
    rc |= mt_pack_key(pk, "source") | mt_pack_key(pk, source);
    rc |= mt_pack_key(pk, "rss") | mt_pack_u64(pk, rss);
    rc |= mt_pack_key(pk, "peak_rss") | mt_pack_u64(pk, peak > rss ? peak : rss);
    rc |= mt_pack_key(pk, "pss") | (have_pss ? mt_pack_u64(pk, pss) : mt_pack_nil(pk));
    rc |= mt_pack_key(pk, "uss") | (have_pss ? mt_pack_u64(pk, uss) : mt_pack_nil(pk));
    rc |= mt_pack_key(pk, "phase") | pack_str_or_nil(pk, phase);
    return rc;
}

static int
pack_event(mt_packer *pk, double time, const char *kind, const mt_worker_view *v, long pid,
           const char *phase, uint64_t rss, uint64_t peak)
{
    int rc = mt_pack_map(pk, 11);
    rc |= mt_pack_key(pk, "t") | mt_pack_key(pk, "event");
    rc |= mt_pack_key(pk, "time") | mt_pack_double(pk, time);
    rc |= mt_pack_key(pk, "kind") | mt_pack_key(pk, kind);
    rc |= mt_pack_key(pk, "pid") | mt_pack_i64(pk, pid);
    rc |= mt_pack_key(pk, "slot") | (v ? mt_pack_u64(pk, v->slot) : mt_pack_nil(pk));
    rc |= mt_pack_key(pk, "phase") | pack_str_or_nil(pk, phase);
    rc |= mt_pack_key(pk, "rss") | mt_pack_u64(pk, rss);
    rc |= mt_pack_key(pk, "peak_rss") | mt_pack_u64(pk, peak);
    rc |= mt_pack_key(pk, "exit_code") |
          ((v && v->has_exit_code) ? mt_pack_i64(pk, v->exit_code) : mt_pack_nil(pk));
    rc |= mt_pack_key(pk, "exit_signal") |
          ((v && v->has_exit_signal) ? mt_pack_i64(pk, v->exit_signal) : mt_pack_nil(pk));
    rc |= mt_pack_key(pk, "state") | (v ? mt_pack_key(pk, v->state) : mt_pack_nil(pk));
    return rc;
}

/* ------------------------------------------------------------------------ */
/* One round of sampling.                                                    */

typedef struct {
    uint32_t live;
    uint64_t rss, pss, peak;
} mt_pool;

static int
sample_self(RecorderObject *r, double now)
{
    uint64_t peak = 0, rss = 0, lost = 0;
    char phase[256];
    mt_oserr e;
    mtx_lock(&mt_phase_lock);
    int rc = mt_peak_take_window_locked(&peak, &lost, &rss, &e);
    if (rc == 0) {
        mt_phase_fold_locked(lost); /* the open phases keep what the reset took */
    }
    mt_phase_current_locked(phase, sizeof phase);
    mtx_unlock(&mt_phase_lock);
    if (rc < 0) {
        return 0; /* a reading failed this round: no sample, no error */
    }
    mt_footprint fp = {0};
    int have_pss = mt_budgeted_footprint(&r->self_budget, 0, r->pss_every * r->interval, &fp);
    mtx_lock(&r->lock);
    r->self_rss = rss;
    mtx_unlock(&r->lock);
    return pack_sample(r->pk, now, mt_os_pid(), "self", rss, peak, have_pss, fp.pss, fp.uss, phase);
}

static int
sample_workers(RecorderObject *r, double now, mt_pool *pool)
{
    int rc = 0;
    mt_worker_view *v = &r->view;
    if (mt_reader_scan(r->table) < 0) {
        return 0; /* damaged: no worker samples, the pool record says none live */
    }
    for (uint32_t i = 0; i < r->capacity; i++) {
        mt_seen_slot *seen = &r->seen[i];
        int st = mt_reader_view(r->table, i, v);
        if (st != 0) {
            seen->pid = st == 1 ? 0 : seen->pid; /* freed or busy; corrupt: keep */
            continue;
        }
        uint64_t window = mt_reader_take_window(r->table, i);
        if (seen->pid != v->pid) { /* a new owner */
            rc |= pack_event(r->pk, v->joined, "join", v, (long)v->pid, v->phase, v->rss,
                             v->peak_rss);
            seen->pid = v->pid;
            seen->state = NULL;
            seen->tasks = 0;
            seen->phase[0] = '\0';
        }
        if (v->alive) {
            rc |= pack_sample(r->pk, now, (long)v->pid, "worker", v->rss, window ? window : v->rss,
                              v->pss != 0, v->pss, v->uss, v->phase);
            pool->live++;
            pool->rss += v->rss;
            pool->pss += mt_pool_memory(v->pss, v->rss);
            pool->peak += window > v->rss ? window : v->rss;
        }
        if (v->tasks > seen->tasks) {
            rc |= mt_pack_map(r->pk, 7);
            rc |= mt_pack_key(r->pk, "t") | mt_pack_key(r->pk, "event");
            rc |= mt_pack_key(r->pk, "time") | mt_pack_double(r->pk, v->last_task_time);
            rc |= mt_pack_key(r->pk, "kind") | mt_pack_key(r->pk, "task");
            rc |= mt_pack_key(r->pk, "pid") | mt_pack_i64(r->pk, (long)v->pid);
            rc |= mt_pack_key(r->pk, "slot") | mt_pack_u64(r->pk, v->slot);
            rc |= mt_pack_key(r->pk, "retained") | mt_pack_u64(r->pk, v->last_task_rss);
            rc |= mt_pack_key(r->pk, "tasks") | mt_pack_u64(r->pk, v->tasks);
            seen->tasks = v->tasks;
        }
        if (strcmp(seen->phase, v->phase) != 0) {
            rc |= pack_event(r->pk, now, "phase", v, (long)v->pid, v->phase, v->rss, v->peak_rss);
            memcpy(seen->phase, v->phase, sizeof seen->phase);
        }
        if (!v->alive && seen->state != v->state) {
            const char *kind = strcmp(v->state, "killed") == 0 ? "death" : "exit";
            rc |= pack_event(r->pk, now, kind, v, (long)v->pid, v->phase, v->rss, v->peak_rss);
        }
        seen->state = v->state;
    }
    return rc;
}

static int
is_worker(const RecorderObject *r, long pid)
{
    for (uint32_t i = 0; r->seen != NULL && i < r->capacity; i++) {
        if (r->seen[i].pid == pid) {
            return 1;
        }
    }
    return 0;
}

static mt_seen_proc *
find_proc(RecorderObject *r, long pid)
{
    for (size_t i = 0; i < r->nprocs; i++) {
        if (r->procs[i].pid == pid) {
            return &r->procs[i];
        }
    }
    if (r->nprocs == MAX_PROCS) {
        return NULL;
    }
    mt_seen_proc *p = &r->procs[r->nprocs++];
    memset(p, 0, sizeof *p);
    p->pid = pid;
    return p;
}

/* Every descendant of root_pid (and root itself) that is not a worker. */
static int
sample_tree(RecorderObject *r, double now, mt_pool *pool)
{
    int rc = 0;
    size_t n = 0;
    r->tree[n++] = r->root_pid;
    for (size_t i = 0; i < n; i++) {
        mt_os_children(r->tree[i], r->tree, &n, MAX_PROCS);
    }
    for (size_t i = 0; i < r->nprocs; i++) {
        r->procs[i].present = 0;
    }
    for (size_t i = 0; i < n; i++) {
        long pid = r->tree[i];
        uint64_t rss, hwm;
        if (is_worker(r, pid) || mt_os_proc_memory(pid, &rss, &hwm) < 0) {
            continue;
        }
        mt_seen_proc *p = find_proc(r, pid);
        if (p == NULL) {
            continue;
        }
        if (p->rounds++ == 0) {
            rc |= pack_event(r->pk, now, "join", NULL, pid, NULL, rss, hwm);
        }
        p->present = 1;
        mt_footprint fp;
        if (mt_budgeted_footprint(&p->budget, pid, r->pss_every * r->interval, &fp)) {
            p->pss = fp.pss;
            p->uss = fp.uss;
            p->have_pss = 1;
        }
        /* The command itself is the pool's parent, not one of its workers. */
        const char *source = pid == r->root_pid ? "root" : "proc";
        rc |= pack_sample(r->pk, now, pid, source, rss, hwm, p->have_pss, p->pss, p->uss, NULL);
        if (pid == r->root_pid) {
            continue; /* in the samples, not in the pool totals */
        }
        pool->live++;
        pool->rss += rss;
        pool->pss += mt_pool_memory(p->have_pss ? p->pss : 0, rss);
        pool->peak += rss; /* another process's mark is its lifetime peak: use rss */
    }
    /* The ones that left since the previous round. */
    for (size_t i = 0; i < r->nprocs;) {
        if (!r->procs[i].present) {
            rc |= pack_event(r->pk, now, "exit", NULL, r->procs[i].pid, NULL, 0, 0);
            r->procs[i] = r->procs[--r->nprocs];
        }
        else {
            i++;
        }
    }
    return rc;
}

static void
flush(RecorderObject *r, int force)
{
    double now = mt_os_monotonic();
    if (r->pk == NULL) {
        return;
    }
    size_t size = mt_packer_size(r->pk);
    if (size == 0 || (!force && size < FLUSH_BYTES && now - r->last_flush < FLUSH_SECONDS)) {
        return;
    }
    mt_oserr e;
    int rc = mt_os_write_all(r->fd, mt_packer_data(r->pk), size, &e);
    mt_packer_clear(r->pk);
    r->last_flush = now;
    mtx_lock(&r->lock);
    if (rc < 0 && !r->failed) {
        r->failed = 1;
        r->write_error = e;
    }
    else if (rc == 0) {
        r->bytes += size;
    }
    mtx_unlock(&r->lock);
}

static void
sample_round(RecorderObject *r)
{
    double now = mt_os_monotonic();
    mt_pool pool = {0};
    int rc = sample_self(r, now);
    if (r->table != NULL) {
        rc |= sample_workers(r, now, &pool);
    }
    if (r->root_pid > 0) {
        rc |= sample_tree(r, now, &pool);
    }
    if (r->table != NULL || r->root_pid > 0) {
        rc |= mt_pack_map(r->pk, 6);
        rc |= mt_pack_key(r->pk, "t") | mt_pack_key(r->pk, "pool");
        rc |= mt_pack_key(r->pk, "time") | mt_pack_double(r->pk, now);
        rc |= mt_pack_key(r->pk, "live") | mt_pack_u64(r->pk, pool.live);
        rc |= mt_pack_key(r->pk, "rss") | mt_pack_u64(r->pk, pool.rss);
        rc |= mt_pack_key(r->pk, "pss") | mt_pack_u64(r->pk, pool.pss);
        rc |= mt_pack_key(r->pk, "peak_rss") | mt_pack_u64(r->pk, pool.peak);
    }
    r->beat++;
    mtx_lock(&r->lock);
    r->samples++;
    r->live = pool.live;
    r->pool_rss = pool.rss;
    r->pool_pss = pool.pss;
    r->pool_peak = pool.peak;
    if (pool.pss > r->max_pool_pss) {
        r->max_pool_pss = pool.pss;
    }
    if (pool.peak > r->max_pool_peak) {
        r->max_pool_peak = pool.peak;
    }
    if (rc != 0 && !r->failed) {
        r->failed = 1;
        mt_fail(&r->write_error, "malloc", NULL, ENOMEM);
    }
    mtx_unlock(&r->lock);
    flush(r, 0);
}

static int
recorder_main(void *arg)
{
    RecorderObject *r = arg;
    mtx_lock(&r->lock);
    while (!r->stop) {
        mtx_unlock(&r->lock);
        sample_round(r);
        mtx_lock(&r->lock);
        if (r->stop) {
            break;
        }
        struct timespec until;
        timespec_get(&until, TIME_UTC);
        double whole = (double)(time_t)r->interval;
        until.tv_sec += (time_t)r->interval;
        until.tv_nsec += (long)((r->interval - whole) * 1e9);
        if (until.tv_nsec >= 1000000000L) {
            until.tv_sec++;
            until.tv_nsec -= 1000000000L;
        }
        cnd_timedwait(&r->wake, &r->lock, &until);
    }
    mtx_unlock(&r->lock);
    sample_round(r); /* the state at the end */
    flush(r, 1);
    return 0;
}

/* ------------------------------------------------------------------------ */
/* The Python type                                                           */

static void
free_buffers(RecorderObject *r)
{
    PyMem_RawFree(r->seen);
    PyMem_RawFree(r->procs);
    PyMem_RawFree(r->tree);
    r->seen = NULL;
    r->procs = NULL;
    r->tree = NULL;
    mt_packer_free(r->pk);
    r->pk = NULL;
    mt_reader_close(r->table);
    r->table = NULL;
}

static int
recorder_init(RecorderObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"fd", "interval", "table", "root_pid", "pss_every", NULL};
    int fd;
    double interval;
    const char *table = NULL;
    long root_pid = 0;
    int pss_every = 10;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "id|zli:Recorder", kwlist, &fd, &interval, &table,
                                     &root_pid, &pss_every)) {
        return -1;
    }
    if (self->running || self->pk != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Recorder is already initialised");
        return -1;
    }
    if (!(interval >= 0.001 && interval <= 3600)) {
        PyErr_Format(PyExc_ValueError, "interval must be between 0.001 and 3600 s, not %g",
                     interval);
        return -1;
    }
    if (pss_every < 1 || fd < 0 || root_pid < 0) {
        PyErr_SetString(PyExc_ValueError, "pss_every must be >= 1, fd and root_pid >= 0");
        return -1;
    }
    self->fd = fd;
    self->interval = interval;
    self->pss_every = pss_every;
    self->root_pid = root_pid;
    if (mtx_init(&self->lock, mtx_plain) != thrd_success || cnd_init(&self->wake) != thrd_success) {
        PyErr_NoMemory();
        return -1;
    }
    self->pk = mt_packer_new();
    self->procs = PyMem_RawCalloc(MAX_PROCS, sizeof *self->procs);
    self->tree = PyMem_RawCalloc(MAX_PROCS, sizeof *self->tree);
    if (self->pk == NULL || self->procs == NULL || self->tree == NULL) {
        free_buffers(self);
        PyErr_NoMemory();
        return -1;
    }
    if (table != NULL) {
        const char *why;
        mt_oserr e;
        self->table = mt_reader_open(table, &why, &e);
        if (self->table == NULL) {
            free_buffers(self);
            if (why != NULL) {
                mt_state *st = mt_state_from_type(Py_TYPE(self));
                if (st != NULL) {
                    PyErr_Format(st->TableError, "cannot record worker table %s: %s", table, why);
                }
            }
            else {
                mt_raise_oserr(&e);
            }
            return -1;
        }
        self->capacity = mt_reader_capacity(self->table);
        self->seen = PyMem_RawCalloc(self->capacity, sizeof *self->seen);
        if (self->seen == NULL) {
            free_buffers(self);
            PyErr_NoMemory();
            return -1;
        }
    }
    return 0;
}

static PyObject *
recorder_start(RecorderObject *self, PyObject *unused)
{
    if (self->pk == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Recorder was not initialised or has stopped");
        return NULL;
    }
    if (self->running) {
        PyErr_SetString(PyExc_RuntimeError, "Recorder is already running");
        return NULL;
    }
    self->stop = 0;
    self->last_flush = mt_os_monotonic();
    if (thrd_create(&self->thread, recorder_main, self) != thrd_success) {
        PyErr_SetString(PyExc_OSError, "cannot start the recorder thread");
        return NULL;
    }
    self->running = 1;
    self->owner_pid = mt_os_pid();
    Py_INCREF(self); /* the thread uses it until stop() joins */
    Py_RETURN_NONE;
}

static void
stop_thread(RecorderObject *self)
{
    if (!self->running) {
        return;
    }
    if (self->owner_pid != mt_os_pid()) {
        self->running = 0; /* a forked child: the thread is the parent's */
        return;
    }
    mtx_lock(&self->lock);
    self->stop = 1;
    cnd_signal(&self->wake);
    mtx_unlock(&self->lock);
    Py_BEGIN_ALLOW_THREADS thrd_join(self->thread, NULL);
    Py_END_ALLOW_THREADS self->running = 0;
}

/* stop() -> status dict; raises the first write error, after stopping. */
static PyObject *recorder_status(RecorderObject *self, PyObject *unused);

static PyObject *
recorder_stop(RecorderObject *self, PyObject *unused)
{
    int was_running = self->running;
    stop_thread(self);
    PyObject *status = recorder_status(self, NULL);
    free_buffers(self);
    if (was_running) {
        Py_DECREF(self); /* the thread's reference; the caller still holds one */
    }
    if (status != NULL && self->failed) {
        Py_DECREF(status);
        mt_raise_oserr(&self->write_error);
        return NULL;
    }
    return status;
}

static PyObject *
recorder_status(RecorderObject *self, PyObject *unused)
{
    mtx_lock(&self->lock);
    unsigned long long samples = self->samples, bytes = self->bytes, rss = self->pool_rss,
                       pss = self->pool_pss, peak = self->pool_peak, max_pss = self->max_pool_pss,
                       max_peak = self->max_pool_peak, self_rss = self->self_rss;
    unsigned live = self->live;
    int failed = self->failed;
    mtx_unlock(&self->lock);
    return Py_BuildValue("{s:K,s:K,s:I,s:K,s:K,s:K,s:K,s:K,s:K,s:O,s:O}", "samples", samples,
                         "bytes", bytes, "live", live, "pool_rss", rss, "pool_pss", pss,
                         "pool_peak", peak, "max_pool_pss", max_pss, "max_pool_peak", max_peak,
                         "self_rss", self_rss, "failed", failed ? Py_True : Py_False, "running",
                         self->running ? Py_True : Py_False);
}

static void
recorder_dealloc(RecorderObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    /* The running thread holds a reference, so a running recorder is never
     * deallocated; only the buffers of a stopped one remain. */
    free_buffers(self);
    tp->tp_free(self);
    Py_DECREF(tp);
}

static PyMethodDef recorder_methods[] = {
    {"start", (PyCFunction)recorder_start, METH_NOARGS, "Start the sampling thread."},
    {"stop", (PyCFunction)recorder_stop, METH_NOARGS,
     "Stop, write what is buffered, and return the status."},
    {"status", (PyCFunction)recorder_status, METH_NOARGS, "The latest pool figures."},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot recorder_slots[] = {
    {Py_tp_doc, "Recorder(fd, interval, table=None, root_pid=0, pss_every=10)"},
    {Py_tp_init, recorder_init},
    {Py_tp_new, PyType_GenericNew},
    {Py_tp_dealloc, recorder_dealloc},
    {Py_tp_methods, recorder_methods},
    {0, NULL},
};

PyType_Spec mt_recorder_spec = {
    .name = "memtrack._core.Recorder",
    .basicsize = sizeof(RecorderObject),
    .flags = Py_TPFLAGS_DEFAULT,
    .slots = recorder_slots,
};
