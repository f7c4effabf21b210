/* Record's layout, shared by the module that makes it (agent/records/_record.c)
 * and the L7 record path (agent/l7/_record_path.c), which reads and sets a
 * record's fields by slot, ~12 per data record, instead of looking each up by name.
 *
 * Field order is the positional order (what the dataclass declared). */
#ifndef TLSCAP_RECORD_H
#define TLSCAP_RECORD_H

#include <Python.h>

#define RECORD_MODULE "agent.records._record" /* its base type: Record */

#define FIELDS(X)                                                                              \
    X(type) X(ts_ns) X(agent_id) X(node) X(seq) X(pid) X(tid) X(comm) X(cgroup_id)             \
    X(container_id) X(pod) X(source) X(conn_id) X(fd) X(local) X(remote) X(role) X(direction)  \
    X(offset) X(len) X(captured_len) X(truncated) X(data) X(protocol) X(redactions)            \
    X(exchange) X(stats)

#define AS_FIELD_SLOT(name) PyObject *name;
#define AS_FIELD_INDEX(name) F_##name,

enum { FIELDS(AS_FIELD_INDEX) N_FIELDS };

typedef struct {
    PyObject_HEAD
    union {
        struct {
            FIELDS(AS_FIELD_SLOT)
        };
        PyObject *slot[N_FIELDS];
    };
} RecordObject;

_Static_assert(sizeof(((RecordObject *)0)->slot) == N_FIELDS * sizeof(PyObject *),
               "the named fields and the slot array overlap exactly");

/* A record's redactions and stats may be a shared empty list and dict (_record.c,
 * own_container): read them in place, replace them, never change them. */

/* Record.for_call's C function, for C callers (agent/flows/_known_calls.c): called
 * as for_call(cls, args, nargs) with the method's arguments, it skips the method
 * call (~60 instructions a record).  In the capsule RECORD_CAPI_NAME. */
#define RECORD_CAPI_NAME RECORD_MODULE "._C_API"
typedef struct {
    PyObject *(*for_call)(PyTypeObject *cls, PyObject *const *args, Py_ssize_t nargs);
} RecordCAPI;

#endif
