/*
 * The names of worker tables, for the Python layer: which segments of this
 * user exist (list_segments) and whether one still does (segment_exists).
 * Where segments live is the platform's business (mt_os_shm_list), so no
 * Python file names a directory.
 */
#include "table.h"

static int
append_name(void *ctx, const char *name)
{
    PyObject *item = PyUnicode_DecodeFSDefault(name);
    if (item == NULL) {
        return -1;
    }
    int rc = PyList_Append((PyObject *)ctx, item);
    Py_DECREF(item);
    return rc;
}

/* list_segments(prefix) -> sorted names ("/<name>") of this user's segments
 * whose name starts with prefix; [] when segments cannot be listed here. */
PyObject *
mt_list_segments(PyObject *module, PyObject *arg)
{
    PyObject *names = NULL, *result = NULL;
    if (!PyUnicode_Check(arg)) {
        PyErr_Format(PyExc_TypeError, "prefix must be a str, not %.100s", Py_TYPE(arg)->tp_name);
        goto done;
    }
    const char *prefix = PyUnicode_AsUTF8(arg);
    if (prefix == NULL) {
        goto done;
    }
    names = PyList_New(0);
    if (names == NULL) {
        goto done;
    }
    mt_oserr e;
    int rc = mt_os_shm_list(prefix, append_name, names, &e);
    if (PyErr_Occurred()) {
        goto done; /* append_name failed (no memory, undecodable name) */
    }
    if (rc < 0) {
        PyList_SetSlice(names, 0, PyList_GET_SIZE(names), NULL); /* none: as if empty */
    }
    if (PyList_Sort(names) < 0) {
        goto done;
    }
    result = Py_NewRef(names);
done:
    Py_XDECREF(names);
    return result;
}

/* segment_exists(name) -> bool */
PyObject *
mt_segment_exists(PyObject *module, PyObject *arg)
{
    const char *name = mt_table_name_arg(arg);
    if (name == NULL) {
        return NULL;
    }
    return PyBool_FromLong(mt_os_shm_exists(name));
}
