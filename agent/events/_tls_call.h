/* TlsCall's layout, shared by the module that makes it (agent/events/_decode.c)
 * and the one that turns it into a Record (agent/records/_record.c, which reads
 * its slots instead of looking up nine attributes by name per call).
 *
 * Field order is the constructor's positional order.  Every field is an object
 * slot: CPython 3.11 specializes attribute reads and writes of object slots
 * (LOAD_ATTR_SLOT), and the flow table reads a call's fields ~25 times: with C
 * numbers converted on every read, FlowTable.on_call cost 11.4k instructions
 * per call instead of 9.3k. */
#ifndef TLSCAP_TLS_CALL_H
#define TLSCAP_TLS_CALL_H

#include <Python.h>

#define TLS_CALL_TYPE_NAME "agent.events.decode.TlsCall"

#define CALL_FIELDS(X)                                                                         \
    X(tgid) X(tid) X(fd) X(ts_mono_ns) X(ssl) X(len) X(offset) X(captured_len) X(chunk_off)   \
    X(direction) X(source) X(comm) X(socket) X(data) X(cgroup_id) X(complete) X(fd_weak)

#define CALL_AS_SLOT(name) PyObject *name;
#define CALL_AS_INDEX(name) C_##name,

enum { CALL_FIELDS(CALL_AS_INDEX) N_CALL_FIELDS };

typedef struct {
    PyObject_HEAD
    union {
        struct {
            CALL_FIELDS(CALL_AS_SLOT)
        };
        PyObject *slot[N_CALL_FIELDS];
    };
} TlsCall;

_Static_assert(sizeof(((TlsCall *)0)->slot) == N_CALL_FIELDS * sizeof(PyObject *),
               "the named fields and the slot array overlap exactly");

#endif
