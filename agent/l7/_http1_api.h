/* agent.l7._http1's C entry points, for agent/l7/_record_path.c: an Http1Parser's
 * feed() and `failed` without a method call by name (and without the argument
 * parsing, the empty list and the attribute look-up that come with one): ~600 CPU
 * instructions of the ~1k the call cost per data record.  The module holds them in
 * its capsule HTTP1_API_CAPSULE; Http1Parser cannot be subclassed, so an object of
 * exactly `type` is one. */
#ifndef TLSCAP_HTTP1_API_H
#define TLSCAP_HTTP1_API_H

#include <Python.h>

#define HTTP1_API_CAPSULE "agent.l7._http1._C_API"

typedef struct {
    PyTypeObject *type; /* Http1Parser */
    /* parser.feed("request" if request else "response", data, ts_ns): 0 with the
     * exchanges it completed in *found (a new list), or NULL: none; -1 with an error
     * (where feed() raises). */
    int (*feed)(PyObject *parser, int request, PyObject *data, PyObject *ts_ns,
                PyObject **found);
    /* parser.failed, borrowed, or NULL for None. */
    PyObject *(*failed)(PyObject *parser);
} Http1Api;

#endif
