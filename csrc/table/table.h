/*
 * What worker.c and reader.c share beyond the layout: attaching by name with
 * the header checked, and the table-name argument check. Both raise a Python
 * error on failure.
 */
#ifndef MEMTRACK_TABLE_H
#define MEMTRACK_TABLE_H

#include "../memtrack.h"
#include "layout.h"

/* Map `name` and check its header; NULL with TableError/OSError set. */
mt_seg_header *mt_table_attach_checked(PyObject *module, const char *name, size_t *size);
/* The UTF-8 of a table name argument, or NULL with TypeError set. */
const char *mt_table_name_arg(PyObject *arg);

#endif /* MEMTRACK_TABLE_H */
