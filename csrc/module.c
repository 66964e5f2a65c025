/*
 * memtrack._core: module definition (PEP 489 multi-phase init), module
 * state with heap types, process-wide set-up. OSErrors are raised, and the
 * module state is found, in errors.c, so lower files never call up here.
 */
#include "memtrack.h"
#include "table/layout.h" /* MAX_CAPACITY */


/* ------------------------------------------------------------------------ */
/* Process-wide set-up: once per process, whatever the number of modules.   */

static void
before_fork(void)
{
    mtx_lock(&mt_phase_lock); /* fork with the phase state consistent */
    mt_alloc_before_fork();
}

static void
after_fork_parent(void)
{
    mt_alloc_after_fork_parent();
    mtx_unlock(&mt_phase_lock);
}

static void
after_fork_child(void)
{
    /* One thread, no GIL requirements: reset C state only. */
    mt_alloc_after_fork_child();
    mtx_unlock(&mt_phase_lock);
    mt_os_after_fork_child();
    mt_peak_after_fork_child();
    mt_phase_after_fork_child();
    mt_worker_after_fork_child();
}

static once_flag process_once = ONCE_FLAG_INIT;
static int process_init_failed;
static mt_oserr process_init_error;

static void
init_process(void)
{
    if (mt_phase_init() < 0 || mt_worker_init() < 0 || mt_alloc_init() < 0) {
        process_init_failed = 1;
        mt_fail(&process_init_error, "malloc", NULL, ENOMEM);
        return;
    }
    if (mt_os_init(&process_init_error) < 0 || mt_peak_init(&process_init_error) < 0) {
        process_init_failed = 1;
        return;
    }
    if (mt_os_register_atfork(before_fork, after_fork_parent, after_fork_child) != 0) {
        process_init_failed = 1;
        mt_fail(&process_init_error, "pthread_atfork", NULL, ENOMEM);
    }
}

/* ------------------------------------------------------------------------ */
/* Types                                                                     */

static PyStructSequence_Field sample_fields[] = {
    {"time", "monotonic seconds (time.monotonic clock)"},
    {"rss", "resident set size, bytes"},
    {"peak_rss", "high-water mark of rss since the last reset, bytes"},
    {"vms", "virtual memory size, bytes"},
    {"rss_anon", "resident anonymous memory, bytes"},
    {"rss_file", "resident file-backed memory, bytes"},
    {"rss_shmem", "resident shared memory, bytes"},
    {"swap", "swapped-out anonymous memory, bytes"},
    {"heap_used", "malloc heap in use (mallinfo2), bytes"},
    {"heap_free", "malloc heap free but not returned to the OS, bytes"},
    {"minor_faults", "page faults served without I/O"},
    {"major_faults", "page faults that needed I/O"},
    {NULL, NULL},
};

static PyStructSequence_Field footprint_fields[] = {
    {"uss", "unique set size: pages only this process maps, bytes"},
    {"pss", "proportional set size: shared pages divided among sharers, bytes"},
    {"shared", "resident pages shared with other processes, bytes"},
    {NULL, NULL},
};

static PyStructSequence_Field phase_stats_fields[] = {
    {"name", "the phase name"},
    {"path", "the names of the enclosing phases and this one, joined by '/'"},
    {"pid", "process id"},
    {"thread_id", "threading.get_ident() of the thread that ran it"},
    {"start", "monotonic seconds at entry"},
    {"duration", "seconds"},
    {"rss_start", "rss at entry, bytes"},
    {"rss_end", "rss at exit, bytes"},
    {"rss_delta", "rss_end - rss_start: memory the phase retained, bytes"},
    {"peak_rss", "exact rss high-water mark during the phase, bytes"},
    {"peak_delta", "peak_rss - rss_start, bytes"},
    {"heap_delta", "change of malloc heap in use, bytes"},
    {"error", "name of the exception that ended the phase, or None"},
    /* by name only (the tuple keeps its 13 items): */
    {"allocated", "bytes the thread allocated in the phase (allocation tracking on), or None"},
    {"allocations", "allocations the thread made in the phase (tracking on), or None"},
    {NULL, NULL},
};

static PyStructSequence_Field phase_summary_fields[] = {
    {"count", "completed runs"},
    {"total_time", "seconds, summed"},
    {"max_peak_rss", "largest peak_rss, bytes"},
    {"max_peak_delta", "largest peak_delta, bytes"},
    {"total_rss_delta", "rss_delta summed, bytes"},
    {"mean_rss_delta", "total_rss_delta / count, bytes"},
    /* by name only (the tuple keeps its 6 items): */
    {"total_allocated", "allocated summed over the runs tracked, bytes, or None"},
    {"total_allocations", "allocations summed over the runs tracked, or None"},
    {NULL, NULL},
};

static PyStructSequence_Desc sample_desc = {
    "memtrack.Sample", "Sample: one reading of this process's memory (bytes unless said).",
    sample_fields, 12};
static PyStructSequence_Desc footprint_desc = {
    "memtrack.Footprint", "Footprint: private and proportional memory of this process.",
    footprint_fields, 3};
static PyStructSequence_Desc phase_stats_desc = {
    "memtrack.PhaseStats", "PhaseStats: one completed phase.", phase_stats_fields, 13};
static PyStructSequence_Desc phase_summary_desc = {
    "memtrack.PhaseSummary", "PhaseSummary: the totals of every completed run of one phase path.",
    phase_summary_fields, 6};

/* ------------------------------------------------------------------------ */
/* Module                                                                    */

static PyObject *
mt_set_disabled(PyObject *module, PyObject *flag)
{
    int v = PyObject_IsTrue(flag);
    if (v < 0) {
        return NULL;
    }
    atomic_store(&mt_disabled, v != 0);
    Py_RETURN_NONE;
}

static PyObject *
mt_is_disabled(PyObject *module, PyObject *unused)
{
    return PyBool_FromLong(atomic_load(&mt_disabled));
}

static PyObject *
mt_use_sampler(PyObject *module, PyObject *reason)
{
    if (!PyUnicode_Check(reason)) {
        PyErr_SetString(PyExc_TypeError, "reason must be a str");
        return NULL;
    }
    const char *text = PyUnicode_AsUTF8(reason);
    if (text == NULL) {
        return NULL;
    }
    mt_oserr e;
    mtx_lock(&mt_phase_lock);
    int rc = mt_peak_use_sampler(text, &e);
    mtx_unlock(&mt_phase_lock);
    if (rc < 0) {
        mt_raise_oserr(&e);
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *
mt_trim(PyObject *module, PyObject *unused)
{
    int released;
    Py_BEGIN_ALLOW_THREADS released = mt_os_trim();
    Py_END_ALLOW_THREADS return PyBool_FromLong(released);
}

static PyMethodDef module_methods[] = {
    {"alloc_start", (PyCFunction)(void (*)(void))mt_alloc_start, METH_VARARGS | METH_KEYWORDS,
     "alloc_start(*, interval=524288, frames=16, seed=-1): install the allocation hooks."},
    {"alloc_stop", mt_alloc_stop, METH_NOARGS,
     "alloc_stop() -> bool: stop accounting; True when the hooks came out."},
    {"alloc_clear", mt_alloc_clear, METH_NOARGS, "alloc_clear(): forget every sampled site."},
    {"alloc_counters", mt_alloc_counters, METH_NOARGS,
     "alloc_counters() -> dict: exact allocation counters and sampling state."},
    {"alloc_sites", mt_alloc_sites, METH_NOARGS,
     "alloc_sites() -> list of (phase path, frames, samples, bytes, count, live, live_samples, "
     "overflow)."},
    {"alloc_install_numpy", mt_alloc_install_numpy, METH_O,
     "alloc_install_numpy(capsule) -> bool: hook numpy's data allocator in this context."},
    {"alloc_uninstall_numpy", mt_alloc_uninstall_numpy, METH_NOARGS,
     "alloc_uninstall_numpy() -> bool: put numpy's previous handler back."},
    {"trim", mt_trim, METH_NOARGS,
     "trim() -> bool: return free malloc heap to the OS (malloc_trim(0))."},
    {"rss", mt_rss, METH_NOARGS, "rss() -> int: resident set size in bytes (fast)."},
    {"peak_rss", mt_peak_rss, METH_NOARGS,
     "peak_rss() -> int: rss high-water mark since the last reset_peak(), bytes."},
    {"reset_peak", mt_reset_peak, METH_NOARGS,
     "reset_peak(): restart the high-water mark at the current rss."},
    {"snapshot", mt_snapshot, METH_NOARGS, "snapshot() -> Sample."},
    {"footprint", mt_footprint_py, METH_NOARGS, "footprint() -> Footprint (uss, pss, shared)."},
    {"memory_limit", mt_memory_limit_py, METH_NOARGS,
     "memory_limit() -> (limit, used, source) | None: the OS's limit on this process "
     "(RLIMIT_AS on Linux, the job object on Windows)."},
    {"capabilities", mt_capabilities, METH_NOARGS,
     "capabilities() -> dict: peak method in force, readings this platform lacks."},
    {"summary", mt_summary, METH_NOARGS, "summary() -> {path: PhaseSummary}."},
    {"records", mt_records, METH_NOARGS, "records() -> (list of PhaseStats, dropped)."},
    {"reset", mt_reset, METH_NOARGS, "reset(): forget records and summary."},
    {"configure", (PyCFunction)(void (*)(void))mt_configure, METH_VARARGS | METH_KEYWORDS,
     "configure(*, max_records=None) -> dict of the settings in force."},
    {"counters", mt_phase_counters, METH_NOARGS, "counters() -> dict of table sizes."},
    {"pack", mt_pack, METH_O, "pack(obj) -> bytes: msgpack via msgpack-c."},
    {"pack_phase_records", (PyCFunction)(void (*)(void))mt_pack_phase_records,
     METH_VARARGS | METH_KEYWORDS,
     "pack_phase_records(since=None) -> (bytes, dropped): the records (started at or after "
     "since) as msgpack maps."},
    {"unpack_stream", mt_unpack_stream, METH_O,
     "unpack_stream(data) -> (objects, consumed, error or None)."},
    {"set_disabled", mt_set_disabled, METH_O, "set_disabled(flag): MEMTRACK_DISABLE."},
    {"is_disabled", mt_is_disabled, METH_NOARGS,
     "is_disabled() -> bool: MEMTRACK_DISABLE or set_disabled(True) in force (no syscall)."},
    {"use_sampler", mt_use_sampler, METH_O,
     "use_sampler(reason): keep peaks with the sampling thread from now on."},
    {"join", mt_worker_join, METH_O, "join(name) -> slot index, or -1 when the table is full."},
    {"rejoin", mt_worker_rejoin, METH_NOARGS, "rejoin() after fork -> slot, -1, or None."},
    {"leave", mt_worker_leave, METH_NOARGS, "leave() -> bool: mark this worker exited."},
    {"task_done", mt_worker_task_done, METH_NOARGS, "task_done(): count a task."},
    {"worker_info", mt_worker_info, METH_NOARGS, "worker_info() -> (name, slot) or None."},
    {"set_heartbeat", mt_worker_set_heartbeat, METH_O, "set_heartbeat(seconds); 0 disables."},
    {"set_role", mt_worker_set_role, METH_O, "set_role(role) -> bool: this process's role."},
    {"segment_creator", mt_segment_creator, METH_O, "segment_creator(name) -> (pid, start, same_namespace, damage)."},
    {"proc_identity", mt_proc_identity, METH_O, "proc_identity(pid) -> (state, start_time)."},
    {"oom_kills", mt_oom_kills_py, METH_O,
     "oom_kills(pid) -> (counter file, kills so far) of pid's memory cgroup, or None."},
    {"unlink_segment", mt_unlink_segment, METH_O, "unlink_segment(name)."},
    {"list_segments", mt_list_segments, METH_O,
     "list_segments(prefix) -> sorted names of this user's segments starting with prefix."},
    {"segment_exists", mt_segment_exists, METH_O, "segment_exists(name) -> bool."},
    {NULL, NULL, 0, NULL},
};

static int
add_type(PyObject *module, PyTypeObject **slot, PyStructSequence_Desc *desc)
{
    *slot = PyStructSequence_NewType(desc);
    if (*slot == NULL) {
        return -1;
    }
    const char *name = strrchr(desc->name, '.') + 1;
    return PyModule_AddObjectRef(module, name, (PyObject *)*slot);
}

static int
add_float(PyObject *module, const char *name, double value)
{
    PyObject *v = PyFloat_FromDouble(value);
    int rc = PyModule_AddObjectRef(module, name, v); /* NULL v: fails with its error */
    Py_XDECREF(v);
    return rc;
}

static int
module_exec(PyObject *module)
{
    mt_state *st = PyModule_GetState(module);
    call_once(&process_once, init_process);
    if (process_init_failed) {
        mt_raise_oserr(&process_init_error);
        return -1;
    }
    if (add_type(module, &st->Sample, &sample_desc) < 0 ||
        add_type(module, &st->Footprint, &footprint_desc) < 0 ||
        add_type(module, &st->PhaseStats, &phase_stats_desc) < 0 ||
        add_type(module, &st->PhaseSummary, &phase_summary_desc) < 0) {
        return -1;
    }
    st->Phase = (PyTypeObject *)PyType_FromModuleAndSpec(module, &mt_phase_spec, NULL);
    if (st->Phase == NULL || PyModule_AddObjectRef(module, "Phase", (PyObject *)st->Phase) < 0) {
        return -1;
    }
    st->WorkerStats =
        (PyTypeObject *)PyType_FromModuleAndSpec(module, &mt_worker_stats_spec, NULL);
    if (st->WorkerStats == NULL ||
        PyModule_AddObjectRef(module, "WorkerStats", (PyObject *)st->WorkerStats) < 0) {
        return -1;
    }
    st->Segment = (PyTypeObject *)PyType_FromModuleAndSpec(module, &mt_segment_spec, NULL);
    if (st->Segment == NULL ||
        PyModule_AddObjectRef(module, "Segment", (PyObject *)st->Segment) < 0) {
        return -1;
    }
    PyObject *watch = PyType_FromModuleAndSpec(module, &mt_watch_spec, NULL);
    if (watch == NULL || PyModule_AddObjectRef(module, "PeakWatch", watch) < 0) {
        Py_XDECREF(watch);
        return -1;
    }
    Py_DECREF(watch);
    PyObject *recorder = PyType_FromModuleAndSpec(module, &mt_recorder_spec, NULL);
    if (recorder == NULL || PyModule_AddObjectRef(module, "Recorder", recorder) < 0) {
        Py_XDECREF(recorder);
        return -1;
    }
    Py_DECREF(recorder);
    st->TableError = PyErr_NewExceptionWithDoc(
        "memtrack.TableError",
        "A worker table segment is not usable: wrong magic, version or size.", PyExc_ValueError,
        NULL);
    if (st->TableError == NULL || PyModule_AddObjectRef(module, "TableError", st->TableError) < 0) {
        return -1;
    }
    st->ProfileError = PyErr_NewExceptionWithDoc(
        "memtrack.ProfileError", "A profile file is truncated, corrupt or not a memtrack profile.",
        PyExc_ValueError, NULL);
    if (st->ProfileError == NULL ||
        PyModule_AddObjectRef(module, "ProfileError", st->ProfileError) < 0) {
        return -1;
    }
    if (PyModule_AddStringConstant(module, "__version__", MT_VERSION) < 0 ||
        PyModule_AddIntConstant(module, "MAX_NAME", MT_MAX_NAME) < 0 ||
        PyModule_AddIntConstant(module, "MAX_DEPTH", MT_MAX_DEPTH) < 0 ||
        PyModule_AddIntConstant(module, "MAX_PATH", MT_MAX_PATH) < 0 ||
        PyModule_AddIntConstant(module, "MAX_PATHS", MT_MAX_PATHS) < 0 ||
        PyModule_AddIntConstant(module, "MAX_CAPACITY", MAX_CAPACITY) < 0 ||
        add_float(module, "MIN_INTERVAL", MT_MIN_INTERVAL) < 0 ||
        add_float(module, "MAX_INTERVAL", MT_MAX_INTERVAL) < 0 ||
        PyModule_AddIntConstant(module, "ALLOC_MAX_FRAMES", MT_ALLOC_MAX_FRAMES) < 0) {
        return -1;
    }
    return 0;
}

static int
module_traverse(PyObject *module, visitproc visit, void *arg)
{
    mt_state *st = PyModule_GetState(module);
    Py_VISIT(st->Sample);
    Py_VISIT(st->Footprint);
    Py_VISIT(st->PhaseStats);
    Py_VISIT(st->PhaseSummary);
    Py_VISIT(st->Phase);
    Py_VISIT(st->WorkerStats);
    Py_VISIT(st->Segment);
    Py_VISIT(st->ProfileError);
    Py_VISIT(st->TableError);
    return 0;
}

static int
module_clear(PyObject *module)
{
    mt_state *st = PyModule_GetState(module);
    Py_CLEAR(st->Sample);
    Py_CLEAR(st->Footprint);
    Py_CLEAR(st->PhaseStats);
    Py_CLEAR(st->PhaseSummary);
    Py_CLEAR(st->Phase);
    Py_CLEAR(st->WorkerStats);
    Py_CLEAR(st->Segment);
    Py_CLEAR(st->ProfileError);
    Py_CLEAR(st->TableError);
    return 0;
}

static void
module_free(void *module)
{
    module_clear((PyObject *)module);
}

static PyModuleDef_Slot module_slots[] = {
    {Py_mod_exec, module_exec},
    {0, NULL},
};

PyModuleDef mt_module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "memtrack._core",
    .m_doc = "memtrack's C core: readings, exact peaks, phases, msgpack.",
    .m_size = sizeof(mt_state),
    .m_methods = module_methods,
    .m_slots = module_slots,
    .m_traverse = module_traverse,
    .m_clear = module_clear,
    .m_free = module_free,
};

PyMODINIT_FUNC
PyInit__core(void)
{
    return PyModuleDef_Init(&mt_module_def);
}
