/*
 * The readings users call directly: rss(), peak_rss(), reset_peak(),
 * snapshot(), footprint(), capabilities().
 */
#include "memtrack.h"

#include <stdio.h>

PyObject *
mt_rss(PyObject *module, PyObject *unused)
{
    uint64_t rss;
    mt_oserr e;
    if (mt_os_rss(&rss, &e) < 0) {
        mt_raise_oserr(&e);
        return NULL;
    }
    return PyLong_FromUnsignedLongLong(rss);
}

PyObject *
mt_peak_rss(PyObject *module, PyObject *unused)
{
    uint64_t peak;
    mt_oserr e;
    uint64_t rss = 0;
    mtx_lock(&mt_phase_lock);
    int rc = mt_peak_read_locked(&peak, &rss, &e);
    peak = mt_peak_user_locked();
    mtx_unlock(&mt_phase_lock);
    if (rc < 0) {
        mt_raise_oserr(&e);
        return NULL;
    }
    /* statm is exact; the kernel's mark may lag it by its per-CPU counter
     * slack (up to 64 pages per CPU): a peak is never below a reading. */
    return PyLong_FromUnsignedLongLong(peak > rss ? peak : rss);
}

PyObject *
mt_reset_peak(PyObject *module, PyObject *unused)
{
    uint64_t rss;
    mt_oserr e;
    mtx_lock(&mt_phase_lock);
    int rc = mt_phase_reset_peak_locked(&rss, &e);
    if (rc == 0) {
        mt_peak_restart_user_locked(rss);
    }
    mtx_unlock(&mt_phase_lock);
    if (rc < 0) {
        mt_raise_oserr(&e);
        return NULL;
    }
    Py_RETURN_NONE;
}

PyObject *
mt_snapshot(PyObject *module, PyObject *unused)
{
    mt_state *st = PyModule_GetState(module);
    mt_sample s;
    mt_oserr e;
    if (mt_os_sample(&s, &e) < 0) {
        mt_raise_oserr(&e);
        return NULL;
    }
    /* VmHWM restarts at every phase; report the peak since reset_peak(). */
    uint64_t peak;
    mtx_lock(&mt_phase_lock);
    int rc = mt_peak_read_locked(&peak, NULL, &e);
    peak = mt_peak_user_locked();
    mtx_unlock(&mt_phase_lock);
    if (rc < 0) {
        mt_raise_oserr(&e);
        return NULL;
    }
    s.peak_rss = peak; /* since reset_peak(), like peak_rss() */
    if (s.rss > s.peak_rss) {
        s.peak_rss = s.rss;
    }
    PyObject *out = PyStructSequence_New(st->Sample);
    if (out == NULL) {
        return NULL;
    }
    PyObject *items[] = {
        PyFloat_FromDouble(s.time),
        PyLong_FromUnsignedLongLong(s.rss),
        PyLong_FromUnsignedLongLong(s.peak_rss),
        PyLong_FromUnsignedLongLong(s.vms),
        PyLong_FromUnsignedLongLong(s.rss_anon),
        PyLong_FromUnsignedLongLong(s.rss_file),
        PyLong_FromUnsignedLongLong(s.rss_shmem),
        PyLong_FromUnsignedLongLong(s.swap),
        PyLong_FromUnsignedLongLong(s.heap_used),
        PyLong_FromUnsignedLongLong(s.heap_free),
        PyLong_FromUnsignedLongLong(s.minor_faults),
        PyLong_FromUnsignedLongLong(s.major_faults),
    };
    int failed = 0;
    for (Py_ssize_t i = 0; i < (Py_ssize_t)(sizeof items / sizeof items[0]); i++) {
        failed |= items[i] == NULL;
        PyStructSequence_SET_ITEM(out, i, items[i] ? items[i] : Py_NewRef(Py_None));
    }
    if (failed) {
        Py_DECREF(out);
        return NULL;
    }
    return out;
}

PyObject *
mt_footprint_py(PyObject *module, PyObject *unused)
{
    mt_state *st = PyModule_GetState(module);
    mt_footprint f;
    mt_oserr e;
    int rc;
    Py_BEGIN_ALLOW_THREADS /* smaps_rollup walks every mapping: slow */
        rc = mt_os_footprint(&f, &e);
    Py_END_ALLOW_THREADS if (rc < 0)
    {
        mt_raise_oserr(&e);
        return NULL;
    }
    PyObject *out = PyStructSequence_New(st->Footprint);
    if (out == NULL) {
        return NULL;
    }
    PyObject *items[] = {
        PyLong_FromUnsignedLongLong(f.uss),
        PyLong_FromUnsignedLongLong(f.pss),
        PyLong_FromUnsignedLongLong(f.shared),
    };
    int failed = 0;
    for (Py_ssize_t i = 0; i < 3; i++) {
        failed |= items[i] == NULL;
        PyStructSequence_SET_ITEM(out, i, items[i] ? items[i] : Py_NewRef(Py_None));
    }
    if (failed) {
        Py_DECREF(out);
        return NULL;
    }
    return out;
}

PyObject *
mt_capabilities(PyObject *module, PyObject *unused)
{
    static const struct {
        unsigned bit;
        const char *name;
    } readings[] = {
        {MT_LACKS_HEAP, "heap"},     {MT_LACKS_PSS, "pss"},
        {MT_LACKS_SWAP, "swap"},     {MT_LACKS_RSS_SPLIT, "rss_split"},
        {MT_LACKS_FAULTS, "faults"}, {MT_LACKS_PEAK_RESET, "peak_reset"},
    };
    unsigned missing = mt_os_missing();
    int sampler = mt_peak_method_in_force() == MT_PEAK_SAMPLER;
    if (sampler) {
        missing |= MT_LACKS_PEAK_RESET;
    }
    PyObject *lacks = PyList_New(0);
    if (lacks == NULL) {
        return NULL;
    }
    for (size_t i = 0; i < sizeof readings / sizeof readings[0]; i++) {
        if (missing & readings[i].bit) {
            PyObject *name = PyUnicode_FromString(readings[i].name);
            if (name == NULL || PyList_Append(lacks, name) < 0) {
                Py_XDECREF(name);
                Py_DECREF(lacks);
                return NULL;
            }
            Py_DECREF(name);
        }
    }
    char reason[160] = "";
    mtx_lock(&mt_phase_lock);
    if (mt_peak_fallback_reason() != NULL) {
        snprintf(reason, sizeof reason, "%s", mt_peak_fallback_reason());
    }
    mtx_unlock(&mt_phase_lock);
    PyObject *why = sampler ? PyUnicode_FromString(reason) : Py_NewRef(Py_None);
    return Py_BuildValue("{s:s,s:O,s:s,s:N,s:d,s:N,s:O}", "platform", MT_PLATFORM,
                         "platform_tested", MT_PLATFORM_TESTED ? Py_True : Py_False, "peak_method",
                         sampler ? "sampler" : "kernel", "peak_fallback_reason", why,
                         "sampler_interval", mt_peak_sampler_interval(), "lacks", lacks, "disabled",
                         atomic_load(&mt_disabled) ? Py_True : Py_False);
}

/* memory_limit() -> (limit, used, source) or None: the limit the platform
 * layer reads (RLIMIT_AS on Linux, the job object on Windows). */
PyObject *
mt_memory_limit_py(PyObject *module, PyObject *unused)
{
    mt_memory_limit m;
    mt_oserr e;
    int rc = mt_os_memory_limit(&m, &e);
    if (rc < 0) {
        mt_raise_oserr(&e);
        return NULL;
    }
    if (rc == 0) {
        Py_RETURN_NONE;
    }
    return Py_BuildValue("(KKs)", (unsigned long long)m.limit, (unsigned long long)m.used,
                         m.source);
}

int
mt_budgeted_footprint(mt_budget *b, long pid, double min_gap, mt_footprint *f)
{
    mt_oserr e;
    double start = mt_os_monotonic();
    if (start < b->next) {
        return 0;
    }
    int ok = (pid == 0 ? mt_os_footprint(f, &e) : mt_os_footprint_of(pid, f, &e)) == 0;
    double end = mt_os_monotonic();
    double gap = (end - start) / MT_FOOTPRINT_BUDGET;
    b->next = end + (gap > min_gap ? gap : min_gap);
    return ok;
}
