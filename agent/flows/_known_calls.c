/* The flow table's step for a TLS call on a connection it already follows, in C.
 *
 * Nearly every event of a busy node is one whole TLS call on a connection the flow
 * table (agent/flows/table.py) has followed since an earlier call: all that happens
 * then is a look-up by (tgid, fd), the connection's offsets moved on, and the call's
 * record made.  In Python, with the pipeline's loop and the call assembler's check
 * around it, that was ~9k CPU instructions per event, most of the agent's cost with
 * no output at all.  Here it is one C loop over a batch's decoded events.
 *
 * KnownCalls(by_fd, wall, for_call, tls_call_type)
 *   by_fd     FlowTable._by_fd: (tgid, fd) -> Connection;
 *   wall      monotonic ns -> wall-clock ns;
 *   for_call  Record.for_call;
 *   tls_call_type  agent.events.decode.TlsCall (its layout is _tls_call.h's).
 *
 * known.take(conn, call, fd) -> Record
 *   The connection's side of a call (last use, comm, cgroup, the offset its direction
 *   expects next) and the call's record, with `fd`.  FlowTable.on_call ends with it,
 *   whatever path found the connection; the offset jump, if any, it has counted.
 *
 * known.records(events, start, out) -> int
 *   From events[start], every event that is a whole call (its one chunk) on a
 *   connection in by_fd under the same socket (the call's
 *   generation 0 or the connection's), not holding records for its socket, and at the
 *   offset its direction expects: take() with the call's fd, its record appended to
 *   `out`.  Returns the index of the first event it left (len(events) when none):
 *   the pipeline hands that one to the general path and calls again after it.  This
 *   is exactly on_call's path for such a call, without the interpreter.  The caller
 *   makes sure the call assembler holds no call in pieces (then every chunk must go
 *   to it, in order).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stddef.h>

#include "../events/_tls_call.h"

static PyObject *s_last_used, *s_comm, *s_cgroup_id, *s_next_offset, *s_conn_id, *s_local,
    *s_remote, *s_role, *s_gen, *s_held;

typedef struct {
    PyObject_HEAD
    PyObject *by_fd;
    PyObject *wall;
    PyObject *for_call;
    PyTypeObject *tls_call_type;
} KnownCalls;

static int
KnownCalls_init(KnownCalls *self, PyObject *args, PyObject *kwargs)
{
    PyObject *by_fd, *wall, *for_call;
    PyTypeObject *type;
    static char *names[] = {"by_fd", "wall", "for_call", "tls_call_type", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O!OOO!:KnownCalls", names, &PyDict_Type,
                                     &by_fd, &wall, &for_call, &PyType_Type, &type))
        return -1;
    if (strcmp(type->tp_name, TLS_CALL_TYPE_NAME) != 0 ||
        type->tp_basicsize != (Py_ssize_t)sizeof(TlsCall)) {
        PyErr_Format(PyExc_TypeError, "tls_call_type must be %s with _tls_call.h's layout",
                     TLS_CALL_TYPE_NAME);
        return -1;
    }
    Py_XSETREF(self->by_fd, Py_NewRef(by_fd));
    Py_XSETREF(self->wall, Py_NewRef(wall));
    Py_XSETREF(self->for_call, Py_NewRef(for_call));
    Py_XSETREF(self->tls_call_type, (PyTypeObject *)Py_NewRef(type));
    return 0;
}

/* `value` if true, else conn.<attr> kept: conn.<attr> = value or conn.<attr>. */
static int
set_if_true(PyObject *conn, PyObject *attr, PyObject *value)
{
    int truth = PyObject_IsTrue(value);
    return truth <= 0 ? truth : PyObject_SetAttr(conn, attr, value);
}

/* `next_offset`: conn.next_offset when the caller has it already, else NULL. */
static PyObject *
take(KnownCalls *self, PyObject *conn, TlsCall *call, PyObject *fd, PyObject *next_offset)
{
    if (PyObject_SetAttr(conn, s_last_used, call->ts_mono_ns) < 0 ||
        set_if_true(conn, s_comm, call->comm) < 0 ||
        set_if_true(conn, s_cgroup_id, call->cgroup_id) < 0)
        return NULL;
    next_offset = next_offset ? Py_NewRef(next_offset) : PyObject_GetAttr(conn, s_next_offset);
    if (next_offset == NULL)
        return NULL;
    PyObject *end = PyNumber_Add(call->offset, call->len);
    int err = end == NULL || PyObject_SetItem(next_offset, call->direction, end) < 0;
    Py_XDECREF(end);
    Py_DECREF(next_offset);
    if (err)
        return NULL;
    PyObject *args[7] = {(PyObject *)call, NULL, NULL, fd, NULL, NULL, NULL};
    PyObject *record = NULL;
    if ((args[1] = PyObject_CallOneArg(self->wall, call->ts_mono_ns)) != NULL &&
        (args[2] = PyObject_GetAttr(conn, s_conn_id)) != NULL &&
        (args[4] = PyObject_GetAttr(conn, s_local)) != NULL &&
        (args[5] = PyObject_GetAttr(conn, s_remote)) != NULL &&
        (args[6] = PyObject_GetAttr(conn, s_role)) != NULL)
        record = PyObject_Vectorcall(self->for_call, args, 7, NULL);
    for (int k = 1; k < 7; k++)
        if (k != 3)
            Py_XDECREF(args[k]);
    return record;
}

static PyObject *
KnownCalls_take(KnownCalls *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3 || Py_TYPE(args[1]) != self->tls_call_type) {
        PyErr_SetString(PyExc_TypeError, "take(conn, call, fd) with a TlsCall");
        return NULL;
    }
    return take(self, args[0], (TlsCall *)args[1], args[2], NULL);
}

/* 1: `call` takes the short way (its connection in *conn and the connection's
 * next_offset in *offsets, new references, for take()); 0: it goes to on_call; -1: an
 * error. */
static int
on_known_connection(KnownCalls *self, TlsCall *call, PyObject **conn, PyObject **offsets)
{
    *conn = *offsets = NULL;
    long long chunk_off = PyLong_AsLongLong(call->chunk_off);
    Py_ssize_t have = PyObject_Length(call->data);
    Py_ssize_t captured = PyLong_AsSsize_t(call->captured_len);
    long fd = PyLong_AsLong(call->fd);
    if (PyErr_Occurred() || have < 0)
        return -1;
    if (chunk_off != 0 || have < captured || fd < 0)
        return 0;
    PyObject *key = PyTuple_Pack(2, call->tgid, call->fd);
    if (key == NULL)
        return -1;
    PyObject *found = PyDict_GetItemWithError(self->by_fd, key); /* borrowed */
    Py_DECREF(key);
    if (found == NULL)
        return PyErr_Occurred() ? -1 : 0;
    Py_INCREF(found);
    /* The same socket (a call's generation 0: the kernel did not know it), not
     * holding, and no offset jump (on_call counts those). */
    PyObject *gen = PyObject_GetAttr(call->socket, s_gen), *conn_gen = NULL, *held = NULL,
             *next_offset = NULL, *expected = NULL;
    int verdict = -1;
    if (gen == NULL || (conn_gen = PyObject_GetAttr(found, s_gen)) == NULL ||
        (held = PyObject_GetAttr(found, s_held)) == NULL ||
        (next_offset = PyObject_GetAttr(found, s_next_offset)) == NULL ||
        (expected = PyObject_GetItem(next_offset, call->direction)) == NULL)
        goto done;
    int unknown = PyObject_Not(gen), same = PyObject_RichCompareBool(gen, conn_gen, Py_EQ);
    int at = PyObject_RichCompareBool(call->offset, expected, Py_EQ);
    if (unknown < 0 || same < 0 || at < 0)
        goto done;
    verdict = (unknown || same) && held == Py_None && at;
done:
    Py_XDECREF(gen);
    Py_XDECREF(conn_gen);
    Py_XDECREF(held);
    Py_XDECREF(expected);
    if (verdict == 1) {
        *conn = found;
        *offsets = next_offset;
    } else {
        Py_DECREF(found);
        Py_XDECREF(next_offset);
    }
    return verdict;
}

static PyObject *
KnownCalls_records(KnownCalls *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3 || !PyList_Check(args[0]) || !PyList_Check(args[2])) {
        PyErr_SetString(PyExc_TypeError, "records(events: list, start: int, out: list)");
        return NULL;
    }
    PyObject *events = args[0], *out = args[2];
    Py_ssize_t i = PyLong_AsSsize_t(args[1]);
    if (i < 0) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "start must be >= 0");
        return NULL;
    }
    for (; i < PyList_GET_SIZE(events); i++) {
        PyObject *event = PyList_GET_ITEM(events, i);
        if (Py_TYPE(event) != self->tls_call_type)
            break;
        TlsCall *call = (TlsCall *)event;
        PyObject *conn, *offsets;
        int known = on_known_connection(self, call, &conn, &offsets);
        if (known < 0)
            return NULL;
        if (!known)
            break;
        PyObject *record = take(self, conn, call, call->fd, offsets);
        Py_DECREF(conn);
        Py_DECREF(offsets);
        if (record == NULL)
            return NULL;
        int appended = PyList_Append(out, record);
        Py_DECREF(record);
        if (appended < 0)
            return NULL;
    }
    return PyLong_FromSsize_t(i);
}

static int
KnownCalls_traverse(KnownCalls *self, visitproc visit, void *arg)
{
    Py_VISIT(self->by_fd);
    Py_VISIT(self->wall);
    Py_VISIT(self->for_call);
    Py_VISIT(self->tls_call_type);
    return 0;
}

static int
KnownCalls_clear(KnownCalls *self)
{
    Py_CLEAR(self->by_fd);
    Py_CLEAR(self->wall);
    Py_CLEAR(self->for_call);
    Py_CLEAR(self->tls_call_type);
    return 0;
}

static void
KnownCalls_dealloc(KnownCalls *self)
{
    PyObject_GC_UnTrack(self);
    KnownCalls_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef KnownCalls_methods[] = {
    {"take", (PyCFunction)(void (*)(void))KnownCalls_take, METH_FASTCALL,
     "take(conn, call, fd) -> Record: the connection moved on by the call, its record"},
    {"records", (PyCFunction)(void (*)(void))KnownCalls_records, METH_FASTCALL,
     "records(events, start, out) -> index of the first event left to on_call"},
    {NULL},
};

static PyTypeObject KnownCallsType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "agent.flows._known_calls.KnownCalls",
    .tp_basicsize = sizeof(KnownCalls),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "TLS calls on connections the flow table already follows (module docstring).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)KnownCalls_init,
    .tp_traverse = (traverseproc)KnownCalls_traverse,
    .tp_clear = (inquiry)KnownCalls_clear,
    .tp_dealloc = (destructor)KnownCalls_dealloc,
    .tp_methods = KnownCalls_methods,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_known_calls",
    "The flow table's step for calls on connections it already follows, in C.", -1, NULL,
};

PyMODINIT_FUNC
PyInit__known_calls(void)
{
    struct { PyObject **where; const char *text; } strings[] = {
        {&s_last_used, "last_used"}, {&s_comm, "comm"}, {&s_cgroup_id, "cgroup_id"},
        {&s_next_offset, "next_offset"}, {&s_conn_id, "conn_id"}, {&s_local, "local"},
        {&s_remote, "remote"}, {&s_role, "role"}, {&s_gen, "gen"}, {&s_held, "held"},
    };
    for (size_t k = 0; k < sizeof strings / sizeof strings[0]; k++)
        if ((*strings[k].where = PyUnicode_InternFromString(strings[k].text)) == NULL)
            return NULL;
    if (PyType_Ready(&KnownCallsType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "KnownCalls", (PyObject *)&KnownCallsType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
