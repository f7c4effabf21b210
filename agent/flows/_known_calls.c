/* The flow table's step for a TLS call on a connection it already follows, in C.
 *
 * Nearly every event of a busy node is one whole TLS call on a connection the flow
 * table (agent/flows/table.py) has followed since an earlier call: all that happens
 * then is a look-up by (tgid, fd), the connection's offsets moved on, and the call's
 * record made.  In Python, with the pipeline's loop and the call assembler's check
 * around it, that was ~9k CPU instructions per event, most of the agent's cost with
 * no output at all.  Here it is one C loop over a batch's decoded events.
 *
 * KnownCalls(by_fd, wall, for_call, tls_call_type, conn_type, socket_type, wall_offset=None)
 *   by_fd     FlowTable._by_fd: (tgid, fd) -> Connection;
 *   wall      monotonic ns -> wall-clock ns;
 *   for_call  Record.for_call (called as a C function: _record.h's RecordCAPI), or
 *             any callable taking its arguments;
 *   tls_call_type  agent.events.decode.TlsCall (its layout is _tls_call.h's);
 *   conn_type, socket_type  Connection and KernelSocket, whose fields this reads and
 *             writes by slot;
 *   wall_offset  an int when `wall` is mono_ns + it (a WallClock): added here instead
 *             of a call into Python per record.
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
#include <stdint.h>
#include <structmember.h>

#include "../events/_tls_call.h"
#include "../native/_slots.h"    /* slot_offset() */
#include "../records/_record.h" /* RecordCAPI */

/* The Connection fields (agent/flows/connection.py) this step reads or writes: by
 * slot, where PyObject_GetAttr and PyObject_SetAttr find the member descriptor by
 * name each time (~120 instructions each, ten per call). */
#define CONN_FIELDS(X)                                                                         \
    X(conn_id) X(gen) X(comm) X(local) X(remote) X(role) X(cgroup_id) X(next_offset)           \
    X(last_used) X(held)
#define CONN_AS_INDEX(name) K_##name,
#define CONN_AS_NAME(name) #name,
enum { CONN_FIELDS(CONN_AS_INDEX) N_CONN_FIELDS };
static const char *conn_field_names[N_CONN_FIELDS] = {CONN_FIELDS(CONN_AS_NAME)};

/* by_fd's answers for (tgid, fd), each valid while by_fd is unchanged since:
 * looking up a (tgid, fd) tuple cost ~390 instructions a call (the tuple made,
 * hashed, compared and freed), a memo hit ~20.  by_fd changes when a connection
 * opens or closes, not per call, and CPython gives a dict a new version tag
 * (ma_version_tag, unique in the process) at every change, so a slot whose tag is
 * by_fd's is by_fd's answer now: its connection, borrowed, is still in by_fd.  (The
 * tag is CPython 3.11's, the interpreter bcc is built for here; 3.12 deprecates it,
 * so there the memo is compiled out and every call looks its tuple up.) */
#define FD_MEMO (PY_VERSION_HEX < 0x030C0000)
enum { FD_MEMO_BITS = 8, FD_MEMO_SLOTS = 1 << FD_MEMO_BITS };

typedef struct {
    unsigned long tgid;
    long fd;
    uint64_t version; /* by_fd's when filled */
    PyObject *conn;   /* borrowed from by_fd; NULL: empty */
} FdMemoSlot;

typedef struct {
    PyObject_HEAD
    PyObject *by_fd;
    PyObject *wall;
    PyObject *wall_offset; /* an int: wall = mono + it, without calling `wall`; or NULL */
    PyObject *for_call;
    /* for_call's C function and class when for_call is Record.for_call (of
     * agent.records._record's Record or a subclass): called directly.  Else NULL. */
    PyObject *(*for_call_c)(PyTypeObject *, PyObject *const *, Py_ssize_t);
    PyTypeObject *record_cls; /* borrowed: for_call holds it */
    PyTypeObject *tls_call_type;
    PyTypeObject *conn_type;
    PyTypeObject *socket_type;
    Py_ssize_t conn_at[N_CONN_FIELDS]; /* each field's offset in a Connection */
    Py_ssize_t socket_gen_at;          /* KernelSocket.gen's */
    FdMemoSlot fd_memo[FD_MEMO_SLOTS];
} KnownCalls;

static int
KnownCalls_init(KnownCalls *self, PyObject *args, PyObject *kwargs)
{
    PyObject *by_fd, *wall, *for_call, *wall_offset = Py_None;
    PyTypeObject *type, *conn_type, *socket_type;
    static char *names[] = {"by_fd",     "wall",        "for_call", "tls_call_type",
                            "conn_type", "socket_type", "wall_offset", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O!OOO!O!O!|O:KnownCalls", names,
                                     &PyDict_Type, &by_fd, &wall, &for_call, &PyType_Type, &type,
                                     &PyType_Type, &conn_type, &PyType_Type, &socket_type,
                                     &wall_offset))
        return -1;
    if (strcmp(type->tp_name, TLS_CALL_TYPE_NAME) != 0 ||
        type->tp_basicsize != (Py_ssize_t)sizeof(TlsCall)) {
        PyErr_Format(PyExc_TypeError, "tls_call_type must be %s with _tls_call.h's layout",
                     TLS_CALL_TYPE_NAME);
        return -1;
    }
    if (wall_offset != Py_None && !PyLong_CheckExact(wall_offset)) {
        PyErr_SetString(PyExc_TypeError, "wall_offset must be an int or None");
        return -1;
    }
    for (int k = 0; k < N_CONN_FIELDS; k++)
        if (slot_offset(conn_type, conn_field_names[k], &self->conn_at[k]) < 0)
            return -1;
    if (slot_offset(socket_type, "gen", &self->socket_gen_at) < 0)
        return -1;
    Py_XSETREF(self->by_fd, Py_NewRef(by_fd));
    memset(self->fd_memo, 0, sizeof(self->fd_memo));
    Py_XSETREF(self->wall, Py_NewRef(wall));
    Py_XSETREF(self->wall_offset, wall_offset == Py_None ? NULL : Py_NewRef(wall_offset));
    const RecordCAPI *capi = PyCapsule_Import(RECORD_CAPI_NAME, 0);
    if (capi == NULL)
        return -1;
    Py_XSETREF(self->for_call, Py_NewRef(for_call));
    self->for_call_c = NULL;
    self->record_cls = NULL;
    if (PyCFunction_Check(for_call) &&
        PyCFunction_GET_FUNCTION(for_call) == (PyCFunction)(void (*)(void))capi->for_call &&
        PyCFunction_GET_SELF(for_call) != NULL && PyType_Check(PyCFunction_GET_SELF(for_call))) {
        self->for_call_c = capi->for_call;
        self->record_cls = (PyTypeObject *)PyCFunction_GET_SELF(for_call);
    }
    Py_XSETREF(self->tls_call_type, (PyTypeObject *)Py_NewRef(type));
    Py_XSETREF(self->conn_type, (PyTypeObject *)Py_NewRef(conn_type));
    Py_XSETREF(self->socket_type, (PyTypeObject *)Py_NewRef(socket_type));
    return 0;
}

static inline PyObject **
conn_slot(KnownCalls *self, PyObject *conn, int k)
{
    return (PyObject **)((char *)conn + self->conn_at[k]);
}

/* conn.<field> (borrowed), or NULL with AttributeError as the member descriptor
 * would raise for a slot never set. */
static PyObject *
conn_get(KnownCalls *self, PyObject *conn, int k)
{
    PyObject *value = *conn_slot(self, conn, k);
    if (value == NULL)
        PyErr_Format(PyExc_AttributeError, "'%.50s' object has no attribute '%s'",
                     Py_TYPE(conn)->tp_name, conn_field_names[k]);
    return value;
}

static inline void
conn_set(KnownCalls *self, PyObject *conn, int k, PyObject *value)
{
    Py_XSETREF(*conn_slot(self, conn, k), Py_NewRef(value));
}

/* conn.<field> = value or conn.<field>. */
static int
set_if_true(KnownCalls *self, PyObject *conn, int k, PyObject *value)
{
    int truth = PyObject_IsTrue(value);
    if (truth > 0)
        conn_set(self, conn, k, value);
    return truth < 0 ? -1 : 0;
}

/* `conn` must be a Connection (conn_type itself). */
static PyObject *
take(KnownCalls *self, PyObject *conn, TlsCall *call, PyObject *fd)
{
    conn_set(self, conn, K_last_used, call->ts_mono_ns);
    if (set_if_true(self, conn, K_comm, call->comm) < 0 ||
        set_if_true(self, conn, K_cgroup_id, call->cgroup_id) < 0)
        return NULL;
    PyObject *next_offset = conn_get(self, conn, K_next_offset);
    if (next_offset == NULL)
        return NULL;
    Py_INCREF(next_offset);
    PyObject *end = PyNumber_Add(call->offset, call->len);
    int err = end == NULL || (PyDict_CheckExact(next_offset)
                                  ? PyDict_SetItem(next_offset, call->direction, end)
                                  : PyObject_SetItem(next_offset, call->direction, end)) < 0;
    Py_XDECREF(end);
    Py_DECREF(next_offset);
    if (err)
        return NULL;
    PyObject *ts_ns = self->wall_offset ? PyNumber_Add(call->ts_mono_ns, self->wall_offset)
                                        : PyObject_CallOneArg(self->wall, call->ts_mono_ns);
    if (ts_ns == NULL)
        return NULL;
    /* Read after `wall`, which may be any Python code; held while for_call runs. */
    PyObject *args[7] = {(PyObject *)call, ts_ns, NULL, fd, NULL, NULL, NULL};
    static const int from_conn[][2] = {{2, K_conn_id}, {4, K_local}, {5, K_remote}, {6, K_role}};
    PyObject *record = NULL;
    int k = 0;
    for (; k < 4; k++) {
        PyObject *value = conn_get(self, conn, from_conn[k][1]);
        if (value == NULL)
            break;
        args[from_conn[k][0]] = Py_NewRef(value);
    }
    if (k == 4)
        record = self->for_call_c ? self->for_call_c(self->record_cls, args, 7)
                                  : PyObject_Vectorcall(self->for_call, args, 7, NULL);
    Py_DECREF(ts_ns);
    while (k-- > 0)
        Py_DECREF(args[from_conn[k][0]]);
    return record;
}

static PyObject *
KnownCalls_take(KnownCalls *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3 || Py_TYPE(args[0]) != self->conn_type ||
        Py_TYPE(args[1]) != self->tls_call_type) {
        PyErr_SetString(PyExc_TypeError, "take(conn, call, fd) with a Connection and a TlsCall");
        return NULL;
    }
    return take(self, args[0], (TlsCall *)args[1], args[2]);
}

/* by_fd[(call.tgid, fd)] (borrowed), or NULL: not there (no error set) or an
 * error.  `fd` is call.fd's value. */
static PyObject *
connection_of(KnownCalls *self, TlsCall *call, long fd)
{
    FdMemoSlot *slot = NULL;
#if FD_MEMO
    uint64_t version = ((PyDictObject *)self->by_fd)->ma_version_tag;
    unsigned long tgid = PyLong_AsUnsignedLong(call->tgid);
    if (tgid == (unsigned long)-1 && PyErr_Occurred())
        PyErr_Clear(); /* not a pid: by the tuple, as any key */
    else {
        uint64_t mix = ((uint64_t)tgid << 32 ^ (uint64_t)fd) * 0x9E3779B97F4A7C15ull;
        slot = &self->fd_memo[mix >> (64 - FD_MEMO_BITS)];
        if (slot->conn != NULL && slot->version == version && slot->tgid == tgid &&
            slot->fd == fd)
            return slot->conn;
    }
#endif
    PyObject *key = PyTuple_Pack(2, call->tgid, call->fd);
    if (key == NULL)
        return NULL;
    PyObject *conn = PyDict_GetItemWithError(self->by_fd, key);
    Py_DECREF(key);
    /* The look-up compared keys, which may run Python code: the version is read
     * again (a change meanwhile: nothing kept). */
#if FD_MEMO
    if (conn != NULL && slot != NULL &&
        ((PyDictObject *)self->by_fd)->ma_version_tag == version)
        *slot = (FdMemoSlot){tgid, fd, version, conn};
#else
    (void)slot, (void)fd;
#endif
    return conn;
}

/* dict[key] (borrowed), or NULL with KeyError as PyObject_GetItem would raise. */
static PyObject *
dict_item(PyObject *dict, PyObject *key)
{
    PyObject *value = PyDict_GetItemWithError(dict, key);
    if (value == NULL && !PyErr_Occurred())
        PyErr_SetObject(PyExc_KeyError, key);
    return value;
}

/* The connection (a new reference) if `call` takes the short way; NULL if it goes
 * to on_call (no error set) or on an error. */
static PyObject *
known_connection(KnownCalls *self, TlsCall *call)
{
    long long chunk_off = PyLong_AsLongLong(call->chunk_off);
    Py_ssize_t have = PyObject_Length(call->data);
    Py_ssize_t captured = PyLong_AsSsize_t(call->captured_len);
    long fd = PyLong_AsLong(call->fd);
    if (PyErr_Occurred() || have < 0)
        return NULL;
    /* Another socket type than the decoder's: on_call's (it reads any .gen). */
    if (chunk_off != 0 || have < captured || fd < 0 || Py_TYPE(call->socket) != self->socket_type)
        return NULL;
    PyObject *conn = connection_of(self, call, fd); /* borrowed */
    if (conn == NULL || Py_TYPE(conn) != self->conn_type)
        return NULL;
    Py_INCREF(conn);
    /* The same socket (a call's generation 0: the kernel did not know it), not
     * holding, and no offset jump (on_call counts those).  What the comparisons use
     * is held: they may run Python code. */
    PyObject *gen = Py_XNewRef(*(PyObject **)((char *)call->socket + self->socket_gen_at)),
             *conn_gen = NULL, *held, *next_offset = NULL, *expected = NULL;
    int verdict = -1;
    if (gen == NULL) {
        PyErr_SetString(PyExc_AttributeError, "the call's socket has no gen");
        goto done;
    }
    if ((conn_gen = Py_XNewRef(conn_get(self, conn, K_gen))) == NULL ||
        (held = conn_get(self, conn, K_held)) == NULL ||
        (next_offset = Py_XNewRef(conn_get(self, conn, K_next_offset))) == NULL ||
        (expected = PyDict_CheckExact(next_offset)
                        ? Py_XNewRef(dict_item(next_offset, call->direction))
                        : PyObject_GetItem(next_offset, call->direction)) == NULL)
        goto done;
    int unknown = PyObject_Not(gen), same = PyObject_RichCompareBool(gen, conn_gen, Py_EQ);
    int at = PyObject_RichCompareBool(call->offset, expected, Py_EQ);
    if (unknown < 0 || same < 0 || at < 0)
        goto done;
    verdict = (unknown || same) && held == Py_None && at;
done:
    Py_XDECREF(gen);
    Py_XDECREF(conn_gen);
    Py_XDECREF(next_offset);
    Py_XDECREF(expected);
    if (verdict != 1)
        Py_CLEAR(conn);
    return conn;
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
        PyObject *conn = known_connection(self, call);
        if (conn == NULL) {
            if (PyErr_Occurred())
                return NULL;
            break;
        }
        PyObject *record = take(self, conn, call, call->fd);
        Py_DECREF(conn);
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
    Py_VISIT(self->wall_offset);
    Py_VISIT(self->for_call);
    Py_VISIT(self->tls_call_type);
    Py_VISIT(self->conn_type);
    Py_VISIT(self->socket_type);
    return 0;
}

static int
KnownCalls_clear(KnownCalls *self)
{
    Py_CLEAR(self->by_fd);
    Py_CLEAR(self->wall);
    Py_CLEAR(self->wall_offset);
    Py_CLEAR(self->for_call);
    self->for_call_c = NULL;
    self->record_cls = NULL;
    Py_CLEAR(self->tls_call_type);
    Py_CLEAR(self->conn_type);
    Py_CLEAR(self->socket_type);
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
