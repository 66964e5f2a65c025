/*
 * The reader side of the table: the Segment type the parent reads through
 * (memtrack.WorkerTable), the checks every mapping passes, liveness of slot
 * owners, and the views the recorder (sampler.c) reads slots through.
 */
#include "table.h"

/* ------------------------------------------------------------------------ */
/* Attaching (both sides)                                                    */

static PyObject *
table_error(PyObject *module, const char *name, const char *why)
{
    mt_state *st = PyModule_GetState(module);
    PyErr_Format(st->TableError, "cannot use worker table %s: %s", name, why);
    return NULL;
}

/* Map `name` and check it; on failure a Python error is set. */
mt_seg_header *
mt_table_attach_checked(PyObject *module, const char *name, size_t *size)
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
/* The Segment type                                                          */

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
        self->seg = mt_table_attach_checked(module, name, &self->size);
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
    const char *name = mt_table_name_arg(arg);
    if (name == NULL) {
        return NULL;
    }
    size_t size;
    mt_seg_header *h = mt_table_attach_checked(module, name, &size);
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