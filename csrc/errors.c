/*
 * The helpers every C file may call: raising OSError from a failed system
 * call (the one place OSErrors are made), and finding the module state of a
 * heap type. They depend on nothing but Python and the module definition,
 * so readings.c, phase.c, sampler.c and table/ need nothing from module.c.
 */
#include "memtrack.h"

#include <string.h>

void
mt_raise_os(int err, const char *syscall, const char *path)
{
    PyObject *exc;
    if (path != NULL) {
        exc = PyObject_CallFunction(PyExc_OSError, "(isz)", err, strerror(err), path);
    }
    else {
        exc = PyObject_CallFunction(PyExc_OSError, "(is)", err, strerror(err));
    }
    if (exc == NULL) {
        return;
    }
    /* OSError(errno, ...) is already the errno subclass; add the call. */
    PyObject *msg = PyUnicode_FromFormat("%s failed: %s", syscall, strerror(err));
    if (msg != NULL) {
        PyObject_SetAttrString(exc, "strerror", msg);
        Py_DECREF(msg);
    }
    PyObject *name = PyUnicode_FromString(syscall);
    if (name != NULL) {
        PyObject_SetAttrString(exc, "syscall", name);
        Py_DECREF(name);
    }
    PyErr_Clear();
    PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
    Py_DECREF(exc);
}

mt_state *
mt_state_from_type(PyTypeObject *tp)
{
    PyObject *module = PyType_GetModuleByDef(tp, &mt_module_def);
    return module ? PyModule_GetState(module) : NULL;
}
