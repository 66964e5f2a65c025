/*
 * msgpack through msgpack-c: a packer for Python values and for C records,
 * and a bounds-checked reader that turns a stream of msgpack objects into
 * Python values. Whatever the bytes, the reader returns what it could read
 * and says where and why it stopped; it never reads past the buffer.
 */
#include "memtrack.h"

#include <msgpack.h>
#include <string.h>

/* Deepest nesting the reader accepts (profiles use 3). */
#define MAX_DEPTH 32
#define MAX_PACK_DEPTH 64

struct mt_packer {
    msgpack_sbuffer buf;
    msgpack_packer pk;
};

mt_packer *
mt_packer_new(void)
{
    mt_packer *p = malloc(sizeof *p);
    if (p != NULL) {
        msgpack_sbuffer_init(&p->buf);
        msgpack_packer_init(&p->pk, &p->buf, msgpack_sbuffer_write);
    }
    return p;
}

void
mt_packer_free(mt_packer *p)
{
    if (p != NULL) {
        msgpack_sbuffer_destroy(&p->buf);
        free(p);
    }
}

PyObject *
mt_packer_bytes(mt_packer *p)
{
    return PyBytes_FromStringAndSize(p->buf.data ? p->buf.data : "", (Py_ssize_t)p->buf.size);
}

size_t
mt_packer_size(const mt_packer *p)
{
    return p->buf.size;
}
const char *
mt_packer_data(const mt_packer *p)
{
    return p->buf.data;
}
void
mt_packer_clear(mt_packer *p)
{
    msgpack_sbuffer_clear(&p->buf);
}

/* Each returns 0, or -1 when the buffer could not grow. */
int
mt_pack_map(mt_packer *p, size_t n)
{
    return msgpack_pack_map(&p->pk, n) ? -1 : 0;
}
int
mt_pack_array(mt_packer *p, size_t n)
{
    return msgpack_pack_array(&p->pk, n) ? -1 : 0;
}
int
mt_pack_u64(mt_packer *p, uint64_t v)
{
    return msgpack_pack_uint64(&p->pk, v) ? -1 : 0;
}
int
mt_pack_i64(mt_packer *p, int64_t v)
{
    return msgpack_pack_int64(&p->pk, v) ? -1 : 0;
}
int
mt_pack_double(mt_packer *p, double v)
{
    return msgpack_pack_double(&p->pk, v) ? -1 : 0;
}
int
mt_pack_nil(mt_packer *p)
{
    return msgpack_pack_nil(&p->pk) ? -1 : 0;
}

int
mt_pack_bool(mt_packer *p, int v)
{
    return (v ? msgpack_pack_true(&p->pk) : msgpack_pack_false(&p->pk)) ? -1 : 0;
}

int
mt_pack_str(mt_packer *p, const char *s, size_t len)
{
    return (msgpack_pack_str(&p->pk, len) || msgpack_pack_str_body(&p->pk, s, len)) ? -1 : 0;
}

int
mt_pack_key(mt_packer *p, const char *key)
{
    return mt_pack_str(p, key, strlen(key));
}

/* ------------------------------------------------------------------------ */
/* Python values -> msgpack                                                  */

static int
pack_value(mt_packer *p, PyObject *obj, int depth)
{
    if (depth > MAX_PACK_DEPTH) {
        PyErr_SetString(PyExc_ValueError, "cannot pack: nesting deeper than 64 levels");
        return -1;
    }
    int rc;
    if (obj == Py_None) {
        rc = msgpack_pack_nil(&p->pk);
    }
    else if (obj == Py_True) {
        rc = msgpack_pack_true(&p->pk);
    }
    else if (obj == Py_False) {
        rc = msgpack_pack_false(&p->pk);
    }
    else if (PyLong_Check(obj)) {
        int overflow;
        long long v = PyLong_AsLongLongAndOverflow(obj, &overflow);
        if (overflow > 0) {
            unsigned long long u = PyLong_AsUnsignedLongLong(obj);
            if (u == (unsigned long long)-1 && PyErr_Occurred()) {
                PyErr_SetString(PyExc_OverflowError, "cannot pack: int does not fit in 64 bits");
                return -1;
            }
            rc = msgpack_pack_uint64(&p->pk, u);
        }
        else if (overflow < 0) {
            PyErr_SetString(PyExc_OverflowError, "cannot pack: int does not fit in 64 bits");
            return -1;
        }
        else if (v == -1 && PyErr_Occurred()) {
            return -1;
        }
        else {
            rc = msgpack_pack_int64(&p->pk, v);
        }
    }
    else if (PyFloat_Check(obj)) {
        rc = msgpack_pack_double(&p->pk, PyFloat_AS_DOUBLE(obj));
    }
    else if (PyUnicode_Check(obj)) {
        Py_ssize_t len;
        const char *s = PyUnicode_AsUTF8AndSize(obj, &len);
        if (s == NULL) {
            return -1;
        }
        rc = mt_pack_str(p, s, (size_t)len);
    }
    else if (PyBytes_Check(obj)) {
        rc = msgpack_pack_bin(&p->pk, (size_t)PyBytes_GET_SIZE(obj)) ||
             msgpack_pack_bin_body(&p->pk, PyBytes_AS_STRING(obj), (size_t)PyBytes_GET_SIZE(obj));
    }
    else if (PyList_Check(obj) || PyTuple_Check(obj)) {
        PyObject *seq = PySequence_Fast(obj, "");
        if (seq == NULL) {
            return -1;
        }
        Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
        rc = msgpack_pack_array(&p->pk, (size_t)n);
        for (Py_ssize_t i = 0; rc == 0 && i < n; i++) {
            if (pack_value(p, PySequence_Fast_GET_ITEM(seq, i), depth + 1) < 0) {
                Py_DECREF(seq);
                return -1;
            }
        }
        Py_DECREF(seq);
    }
    else if (PyDict_Check(obj)) {
        PyObject *key, *value;
        Py_ssize_t pos = 0;
        rc = msgpack_pack_map(&p->pk, (size_t)PyDict_GET_SIZE(obj));
        while (rc == 0 && PyDict_Next(obj, &pos, &key, &value)) {
            if (pack_value(p, key, depth + 1) < 0 || pack_value(p, value, depth + 1) < 0) {
                return -1;
            }
        }
    }
    else {
        PyErr_Format(PyExc_TypeError,
                     "cannot pack a %.100s; use None, bool, int, float, "
                     "str, bytes, list, tuple or dict",
                     Py_TYPE(obj)->tp_name);
        return -1;
    }
    if (rc != 0) {
        PyErr_NoMemory();
        return -1;
    }
    return 0;
}

PyObject *
mt_pack(PyObject *module, PyObject *obj)
{
    mt_packer *p = mt_packer_new();
    PyObject *result = NULL;
    if (p == NULL) {
        return PyErr_NoMemory();
    }
    if (pack_value(p, obj, 0) == 0) {
        result = mt_packer_bytes(p);
    }
    mt_packer_free(p);
    return result;
}

/* ------------------------------------------------------------------------ */
/* msgpack -> Python values                                                  */

/* Sets *why (static text) and returns NULL for content we refuse; returns
 * NULL with a Python exception set for a Python failure (no memory). */
static PyObject *
to_python(const msgpack_object *o, int depth, const char **why)
{
    if (depth > MAX_DEPTH) {
        *why = "nesting deeper than 32 levels";
        return NULL;
    }
    switch (o->type) {
    case MSGPACK_OBJECT_NIL:
        Py_RETURN_NONE;
    case MSGPACK_OBJECT_BOOLEAN:
        return PyBool_FromLong(o->via.boolean);
    case MSGPACK_OBJECT_POSITIVE_INTEGER:
        return PyLong_FromUnsignedLongLong(o->via.u64);
    case MSGPACK_OBJECT_NEGATIVE_INTEGER:
        return PyLong_FromLongLong(o->via.i64);
    case MSGPACK_OBJECT_FLOAT32:
    case MSGPACK_OBJECT_FLOAT64:
        return PyFloat_FromDouble(o->via.f64);
    case MSGPACK_OBJECT_STR: {
        PyObject *s = PyUnicode_DecodeUTF8(o->via.str.ptr, (Py_ssize_t)o->via.str.size, "strict");
        if (s == NULL && PyErr_ExceptionMatches(PyExc_UnicodeDecodeError)) {
            PyErr_Clear();
            *why = "a string is not valid UTF-8";
        }
        return s;
    }
    case MSGPACK_OBJECT_BIN:
        return PyBytes_FromStringAndSize(o->via.bin.ptr, (Py_ssize_t)o->via.bin.size);
    case MSGPACK_OBJECT_ARRAY: {
        PyObject *list = PyList_New((Py_ssize_t)o->via.array.size);
        for (uint32_t i = 0; list != NULL && i < o->via.array.size; i++) {
            PyObject *item = to_python(&o->via.array.ptr[i], depth + 1, why);
            if (item == NULL) {
                Py_CLEAR(list);
                break;
            }
            PyList_SET_ITEM(list, i, item);
        }
        return list;
    }
    case MSGPACK_OBJECT_MAP: {
        PyObject *dict = PyDict_New();
        for (uint32_t i = 0; dict != NULL && i < o->via.map.size; i++) {
            const msgpack_object_kv *kv = &o->via.map.ptr[i];
            if (kv->key.type != MSGPACK_OBJECT_STR &&
                kv->key.type != MSGPACK_OBJECT_POSITIVE_INTEGER &&
                kv->key.type != MSGPACK_OBJECT_NEGATIVE_INTEGER) {
                *why = "a map key is not a string or an integer";
                Py_CLEAR(dict);
                break;
            }
            PyObject *k = to_python(&kv->key, depth + 1, why);
            PyObject *v = k ? to_python(&kv->val, depth + 1, why) : NULL;
            if (v == NULL || PyDict_SetItem(dict, k, v) < 0) {
                Py_CLEAR(dict);
            }
            Py_XDECREF(k);
            Py_XDECREF(v);
        }
        return dict;
    }
    default:
        *why = "an extension type, which memtrack profiles do not use";
        return NULL;
    }
}

/* Walk one object's structure from `off` without allocating anything, so
 * that hostile headers never reach msgpack-c's allocator: a container that
 * declares more items than bytes remain (each item takes at least one) is
 * refused. 0: *end is where the object ends; 1: the data ends inside it;
 * 2: not msgpack (0xc1) or an impossible count (*why says which). */
static int
prescan(const unsigned char *b, size_t len, size_t off, size_t *end, const char **why)
{
    uint64_t pending = 1;
    while (pending > 0) {
        if (off >= len) {
            return 1;
        }
        pending--;
        unsigned c = b[off];
        uint64_t skip = 0, items = 0; /* bytes after the header, nested objects */
        size_t head = 1;
        if (c <= 0x7f || c >= 0xe0 || c == 0xc0 || c == 0xc2 || c == 0xc3) {
            head = 1;
        }
        else if (c <= 0x8f) {
            items = 2u * (c & 0x0f);
        }
        else if (c <= 0x9f) {
            items = c & 0x0f;
        }
        else if (c <= 0xbf) {
            skip = c & 0x1f;
        }
        else if (c == 0xc1) {
            *why = "not msgpack";
            return 2;
        }
        else {
            /* Fixed-size scalars and the sized kinds: n is big-endian. */
            static const unsigned char width[0xdf - 0xc4 + 1] = {
                [0xc4 - 0xc4] = 1, [0xc5 - 0xc4] = 2, [0xc6 - 0xc4] = 4, /* bin */
                [0xc7 - 0xc4] = 1, [0xc8 - 0xc4] = 2, [0xc9 - 0xc4] = 4, /* ext */
                [0xd9 - 0xc4] = 1, [0xda - 0xc4] = 2, [0xdb - 0xc4] = 4, /* str */
                [0xdc - 0xc4] = 2, [0xdd - 0xc4] = 4,                    /* array */
                [0xde - 0xc4] = 2, [0xdf - 0xc4] = 4,                    /* map */
            };
            static const unsigned char fixed[0xdf - 0xc4 + 1] = {
                [0xca - 0xc4] = 4, [0xcb - 0xc4] = 8, [0xcc - 0xc4] = 1,  [0xcd - 0xc4] = 2,
                [0xce - 0xc4] = 4, [0xcf - 0xc4] = 8, [0xd0 - 0xc4] = 1,  [0xd1 - 0xc4] = 2,
                [0xd2 - 0xc4] = 4, [0xd3 - 0xc4] = 8, [0xd4 - 0xc4] = 2,  [0xd5 - 0xc4] = 3,
                [0xd6 - 0xc4] = 5, [0xd7 - 0xc4] = 9, [0xd8 - 0xc4] = 17,
            };
            unsigned w = width[c - 0xc4];
            if (w == 0) {
                skip = fixed[c - 0xc4];
            }
            else {
                if (off + 1 + w > len) {
                    return 1;
                }
                uint64_t n = 0;
                for (unsigned i = 0; i < w; i++) {
                    n = (n << 8) | b[off + 1 + i];
                }
                head = 1 + w;
                if (c >= 0xdc && c <= 0xdd) {
                    items = n;
                }
                else if (c >= 0xde) {
                    items = 2 * n;
                }
                else {
                    skip = n + ((c >= 0xc7 && c <= 0xc9) ? 1 : 0); /* ext: type byte */
                }
            }
        }
        if (skip > len - off - head) {
            return 1;
        }
        off += head + (size_t)skip;
        pending += items;
        if (pending > len - off) {
            /* Every pending item needs a byte: more than remain is either a
             * cut file or a lie. Tell which by the size of the claim. */
            if (items > len) {
                *why = "a container declares more items than the file holds";
                return 2;
            }
            return 1;
        }
    }
    *end = off;
    return 0;
}

/* unpack_stream(data) -> (objects, consumed, error)
 * error is None when every byte was read, else (kind, offset, message) with
 * kind "truncated" (the data ends inside an object) or "corrupt"; offset is
 * where the object that could not be read starts. */
PyObject *
mt_unpack_stream(PyObject *module, PyObject *data)
{
    Py_buffer view;
    msgpack_unpacked result;
    PyObject *objects = NULL, *error = NULL, *ret = NULL;
    size_t off = 0;

    if (PyObject_GetBuffer(data, &view, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    msgpack_unpacked_init(&result);
    objects = PyList_New(0);
    if (objects == NULL) {
        goto done;
    }
    const char *buf = view.buf;
    size_t len = (size_t)view.len;
    while (off < len) {
        size_t start = off, end = 0;
        const char *bad = NULL;
        int scan = prescan((const unsigned char *)buf, len, off, &end, &bad);
        if (scan == 1) {
            error =
                Py_BuildValue("(snN)", "truncated", (Py_ssize_t)start,
                              PyUnicode_FromFormat("the data ends inside the object at byte %zu "
                                                   "(%zu bytes in all)",
                                                   start, len));
            break;
        }
        if (scan == 2) {
            error = Py_BuildValue("(snN)", "corrupt", (Py_ssize_t)start,
                                  PyUnicode_FromFormat("%s at byte %zu", bad, start));
            break;
        }
        /* msgpack-c sees exactly the bytes of this one object. */
        msgpack_unpack_return rc = msgpack_unpack_next(&result, buf, end, &off);
        if (rc == MSGPACK_UNPACK_CONTINUE) {
            error =
                Py_BuildValue("(snN)", "truncated", (Py_ssize_t)start,
                              PyUnicode_FromFormat("the data ends inside the object at byte %zu "
                                                   "(%zu bytes in all)",
                                                   start, len));
            off = start;
            break;
        }
        if (rc == MSGPACK_UNPACK_NOMEM_ERROR) {
            error = Py_BuildValue("(snN)", "corrupt", (Py_ssize_t)start,
                                  PyUnicode_FromFormat("the object at byte %zu is nested too "
                                                       "deeply or declares more items than "
                                                       "memory allows",
                                                       start));
            off = start;
            break;
        }
        if (rc != MSGPACK_UNPACK_SUCCESS && rc != MSGPACK_UNPACK_EXTRA_BYTES) {
            error = Py_BuildValue("(snN)", "corrupt", (Py_ssize_t)start,
                                  PyUnicode_FromFormat("not msgpack at byte %zu", start));
            off = start;
            break;
        }
        const char *why = NULL;
        PyObject *obj = to_python(&result.data, 0, &why);
        if (obj == NULL) {
            if (why == NULL) {
                goto done; /* a Python error (no memory) */
            }
            error = Py_BuildValue(
                "(snN)", "corrupt", (Py_ssize_t)start,
                PyUnicode_FromFormat("the object at byte %zu is unusable: %s", start, why));
            off = start;
            break;
        }
        int failed = PyList_Append(objects, obj);
        Py_DECREF(obj);
        if (failed) {
            goto done;
        }
    }
    if (error == NULL && PyErr_Occurred()) {
        goto done;
    }
    ret = Py_BuildValue("(OnO)", objects, (Py_ssize_t)off, error ? error : Py_None);
done:
    Py_XDECREF(objects);
    Py_XDECREF(error);
    msgpack_unpacked_destroy(&result);
    PyBuffer_Release(&view);
    return ret;
}
