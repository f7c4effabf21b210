/* Record's storage and constructor, in C: agent/records/record.py documents the
 * fields (the JSON-lines contract) and builds the Record class on this type.
 *
 * Why C: a Record is made for every TLS call, and the dataclass it replaces
 * cost ~1 us to construct positionally (27 slot stores and two default
 * factories in a generated __init__) and ~4 us with keywords, which pushed the
 * hot path into positional calls that a test had to pin.  Here either way is
 * one pass over the arguments (~0.2 us).
 *
 * Every field is a Python object slot.  A Record can hold anything a caller
 * gives it (an Exchange, a pod, dicts), so the type takes part in the cycle
 * collector like the dataclass did.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stddef.h>
#include <string.h>
#include <structmember.h>

#include "../events/_tls_call.h"
#include "_record.h"

#define AS_NAME(name) #name,

static const char *field_names[N_FIELDS] = {FIELDS(AS_NAME)};
static PyObject *interned_names[N_FIELDS];
/* The default of each field; NULL: required (type, ts_ns).  redactions' and
 * stats' are a shared empty list and dict (record_empty_list, record_empty_dict):
 * see own_container(). */
static PyObject *defaults[N_FIELDS];
static PyObject *record_empty_list, *record_empty_dict;

/* Records that died, kept for the next ones (their memory, untracked, every slot
 * released): a batch's records all die together once written, and the next batch
 * makes as many again.  pymalloc's allocation and release plus the collector's
 * link and unlink cost ~300 instructions per record; this, ~30.  FREE_MAX covers
 * a 4 MiB drain of 1 KiB calls (~1 MB kept at most). */
enum { FREE_MAX = 4096 };
static RecordObject *free_records[FREE_MAX];
static int n_free_records;
/* Field numbers, each list ended by -1: every field, and those for_call does not
 * set (PyInit__record fills both). */
static signed char all_fields[N_FIELDS + 1], call_defaulted[N_FIELDS + 1];

static int Record_traverse(RecordObject *self, visitproc visit, void *arg) {
    for (int k = 0; k < N_FIELDS; k++)
        Py_VISIT(self->slot[k]);
    return 0;
}

static int Record_clear(RecordObject *self) {
    for (int k = 0; k < N_FIELDS; k++)
        Py_CLEAR(self->slot[k]);
    return 0;
}

static void Record_dealloc(RecordObject *self) {
    PyObject_GC_UnTrack(self);
    Py_TRASHCAN_BEGIN(self, Record_dealloc)
    /* Not Record_clear: no field is read again, so none needs setting to NULL. */
    for (int k = 0; k < N_FIELDS; k++)
        Py_XDECREF(self->slot[k]);
    PyTypeObject *type = Py_TYPE(self);
    /* Record, or a subclass adding nothing to its memory (record.py's Record):
     * kept.  A subclass's reference to its type is dropped by subtype_dealloc
     * after this, as for a freed one; record_alloc takes it again. */
    if (n_free_records < FREE_MAX && type->tp_free == PyObject_GC_Del &&
        type->tp_basicsize == (Py_ssize_t)sizeof(RecordObject) && type->tp_itemsize == 0)
        free_records[n_free_records++] = self;
    else
        type->tp_free((PyObject *)self);
    Py_TRASHCAN_END
}

/* A new `cls` object with every slot NULL, tracked by the collector: a kept one
 * when it fits (what cls->tp_alloc would give: the same memory layout, a reference
 * to a heap type, refcount 1). */
static RecordObject *record_alloc(PyTypeObject *cls) {
    if (n_free_records == 0 || cls->tp_basicsize != (Py_ssize_t)sizeof(RecordObject) ||
        cls->tp_itemsize != 0 || cls->tp_free != PyObject_GC_Del ||
        cls->tp_alloc != PyType_GenericAlloc)
        return (RecordObject *)cls->tp_alloc(cls, 0);
    RecordObject *self = free_records[--n_free_records];
    memset(self->slot, 0, sizeof(self->slot));
    Py_SET_TYPE(self, cls);
    if (cls->tp_flags & Py_TPFLAGS_HEAPTYPE)
        Py_INCREF(cls);
    _Py_NewReference((PyObject *)self);
    PyObject_GC_Track(self);
    return self;
}

/* The list or dict of `slot` (F_redactions, F_stats) as Python code may change
 * it: the record's own.  A record starts with the shared empty one, which only
 * C code reading the slot in place sees (agent/l7, agent/sinks: they replace it,
 * never change it): a new list and dict per data record, and their release, cost
 * ~350 instructions, when hardly any data record gets redactions and none but a
 * stats record has stats.  Python code never sees the shared ones, so what it
 * reads it may change, as the dataclass's default_factory lists. */
static PyObject *own_container(RecordObject *self, int slot) {
    PyObject *value = self->slot[slot];
    if (value == NULL) {
        PyErr_Format(PyExc_AttributeError, "'%.50s' object has no attribute '%s'",
                     Py_TYPE(self)->tp_name, field_names[slot]);
        return NULL;
    }
    if (value == record_empty_list || value == record_empty_dict) {
        PyObject *own = value == record_empty_list ? PyList_New(0) : PyDict_New();
        if (own == NULL)
            return NULL;
        Py_SETREF(self->slot[slot], own);
        value = own;
    }
    return Py_NewRef(value);
}

static int set_container(RecordObject *self, int slot, PyObject *value) {
    if (value == NULL && self->slot[slot] == NULL) {
        PyErr_Format(PyExc_AttributeError, "'%.50s' object has no attribute '%s'",
                     Py_TYPE(self)->tp_name, field_names[slot]);
        return -1;
    }
    Py_XSETREF(self->slot[slot], Py_XNewRef(value));
    return 0;
}

static PyObject *get_redactions(RecordObject *self, void *closure) {
    (void)closure;
    return own_container(self, F_redactions);
}

static int set_redactions(RecordObject *self, PyObject *value, void *closure) {
    (void)closure;
    return set_container(self, F_redactions, value);
}

static PyObject *get_stats(RecordObject *self, void *closure) {
    (void)closure;
    return own_container(self, F_stats);
}

static int set_stats(RecordObject *self, PyObject *value, void *closure) {
    (void)closure;
    return set_container(self, F_stats, value);
}

static int field_index(PyObject *key) {
    for (int k = 0; k < N_FIELDS; k++)
        if (key == interned_names[k])
            return k;
    for (int k = 0; k < N_FIELDS; k++)
        if (PyUnicode_Check(key) && PyUnicode_Compare(key, interned_names[k]) == 0)
            return k;
    return -1;
}

/* Every field of `fields` not given its default; -1 with TypeError if a required one (type, ts_ns) was not
 * given.  `fields`: every field (all_fields), or those a constructor leaves unset. */
static int fill_defaults(RecordObject *self, const signed char *fields) {
    for (; *fields >= 0; fields++) {
        int k = *fields;
        if (self->slot[k] != NULL)
            continue;
        if (defaults[k] != NULL)
            self->slot[k] = Py_NewRef(defaults[k]);
        else {
            PyErr_Format(PyExc_TypeError, "Record missing required argument '%s'",
                         field_names[k]);
            return -1;
        }
        if (self->slot[k] == NULL)
            return -1;
    }
    return 0;
}

static PyObject *Record_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    Py_ssize_t given = PyTuple_GET_SIZE(args);
    if (given > N_FIELDS) {
        PyErr_Format(PyExc_TypeError, "Record takes at most %d arguments (%zd given)", N_FIELDS,
                     given);
        return NULL;
    }
    RecordObject *self = record_alloc(type);
    if (self == NULL)
        return NULL;
    for (Py_ssize_t k = 0; k < given; k++)
        self->slot[k] = Py_NewRef(PyTuple_GET_ITEM(args, k));
    if (kwds != NULL) {
        PyObject *key, *value;
        Py_ssize_t pos = 0;
        while (PyDict_Next(kwds, &pos, &key, &value)) {
            int k = field_index(key);
            if (k < 0) {
                PyErr_Format(PyExc_TypeError, "Record got an unexpected keyword argument %R", key);
                goto fail;
            }
            if (self->slot[k] != NULL) {
                PyErr_Format(PyExc_TypeError, "Record got multiple values for argument '%s'",
                             field_names[k]);
                goto fail;
            }
            self->slot[k] = Py_NewRef(value);
        }
    }
    if (fill_defaults(self, all_fields) == 0)
        return (PyObject *)self;
fail:
    Py_DECREF(self);
    return NULL;
}

/* The TLS call's own fields that its data record carries: (its slot, the
 * record's field). */
static const int call_to_record[][2] = {
    {C_tgid, F_pid},       {C_tid, F_tid},       {C_comm, F_comm},
    {C_cgroup_id, F_cgroup_id}, {C_source, F_source}, {C_direction, F_direction},
    {C_offset, F_offset},  {C_len, F_len},       {C_data, F_data},
};
static PyObject *s_data, *s_exchange;

/* Whether `obj` is a TlsCall: its type is found by name, once (this module
 * does not import agent.events). */
static int is_tls_call(PyObject *obj) {
    static PyTypeObject *tls_call_type;
    PyTypeObject *type = Py_TYPE(obj);
    if (type == tls_call_type)
        return 1;
    if (tls_call_type == NULL && strcmp(type->tp_name, TLS_CALL_TYPE_NAME) == 0 &&
        type->tp_basicsize == (Py_ssize_t)sizeof(TlsCall)) {
        tls_call_type = type;
        return 1;
    }
    return 0;
}

PyDoc_STRVAR(for_call_doc,
"for_call(call, ts_ns, conn_id, fd, local, remote, role) -> Record\n"
"\n"
"The data record of one TLS call (agent/events' TlsCall): its pid, tid, comm,\n"
"cgroup_id, source, direction, offset, len and data from the call, captured_len\n"
"and truncated from its data, the rest given (the connection's), every other\n"
"field at its default.");

/* The fields for_call sets from its arguments (the call's: call_to_record). */
static const int call_given[] = {F_ts_ns, F_conn_id, F_fd, F_local, F_remote, F_role};

static PyObject *for_call(PyTypeObject *cls, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 7) {
        PyErr_Format(PyExc_TypeError, "for_call takes 7 arguments (%zd given)", nargs);
        return NULL;
    }
    if (!is_tls_call(args[0])) {
        PyErr_Format(PyExc_TypeError, "for_call needs a TlsCall, not %.100s",
                     Py_TYPE(args[0])->tp_name);
        return NULL;
    }
    TlsCall *call = (TlsCall *)args[0];
    RecordObject *self = record_alloc(cls);
    if (self == NULL)
        return NULL;
    /* Every slot is NULL yet: plain stores. */
    for (size_t k = 0; k < sizeof(call_to_record) / sizeof(call_to_record[0]); k++) {
        PyObject *value = call->slot[call_to_record[k][0]];
        if (value == NULL) {
            PyErr_Format(PyExc_AttributeError, "the TlsCall has no %s", field_names[call_to_record[k][1]]);
            goto fail;
        }
        self->slot[call_to_record[k][1]] = Py_NewRef(value);
    }
    for (int k = 0; k < 6; k++)
        self->slot[call_given[k]] = Py_NewRef(args[k + 1]);
    self->type = Py_NewRef(s_data);
    Py_ssize_t captured = PyObject_Length(self->data);
    if (captured < 0)
        goto fail;
    /* The call's captured_len is the count, nearly always: no new int then. */
    Py_ssize_t said = call->captured_len && PyLong_CheckExact(call->captured_len)
                          ? PyLong_AsSsize_t(call->captured_len) : -1;
    if (said == -1 && PyErr_Occurred())
        PyErr_Clear(); /* too big for a count: not this one */
    self->captured_len = said == captured ? Py_NewRef(call->captured_len)
                                          : PyLong_FromSsize_t(captured);
    if (self->captured_len == NULL)
        goto fail;
    /* captured < len: in C for an int that fits (the kernel's always does). */
    int overflow = 1;
    long long len = PyLong_CheckExact(self->len) ? PyLong_AsLongLongAndOverflow(self->len, &overflow)
                                                 : 0;
    int truncated = overflow == 0 ? captured < len
                                  : PyObject_RichCompareBool(self->captured_len, self->len, Py_LT);
    if (truncated < 0)
        goto fail;
    self->truncated = Py_NewRef(truncated ? Py_True : Py_False);
    /* The rest: each has a default (PyInit__record checks), and is unset. */
    for (const signed char *k = call_defaulted; *k >= 0; k++)
        self->slot[*k] = Py_NewRef(defaults[*k]);
    return (PyObject *)self;
fail:
    Py_DECREF(self);
    return NULL;
}

static PyTypeObject RecordType;

PyDoc_STRVAR(for_exchange_doc,
"for_exchange(last, ts_ns, exchange) -> Record\n"
"\n"
"The exchange record of a parsed exchange (agent/l7): its connection's identity\n"
"(pid, tid, comm, cgroup_id, container_id, pod, source, conn_id, fd, local,\n"
"remote, role) from `last`, the connection's latest record; protocol from the\n"
"exchange; every other field at its default.");

static PyObject *for_exchange(PyTypeObject *cls, PyObject *const *args, Py_ssize_t nargs) {
    static const int identity[] = {F_pid, F_tid, F_comm, F_cgroup_id, F_container_id, F_pod,
                                   F_source, F_conn_id, F_fd, F_local, F_remote, F_role};
    if (nargs != 3) {
        PyErr_Format(PyExc_TypeError, "for_exchange takes 3 arguments (%zd given)", nargs);
        return NULL;
    }
    if (!PyObject_TypeCheck(args[0], &RecordType)) {
        PyErr_Format(PyExc_TypeError, "for_exchange needs a Record, not %.100s",
                     Py_TYPE(args[0])->tp_name);
        return NULL;
    }
    PyObject *protocol = PyObject_GetAttr(args[2], interned_names[F_protocol]);
    if (protocol == NULL)
        return NULL;
    RecordObject *last = (RecordObject *)args[0];
    RecordObject *self = record_alloc(cls);
    if (self == NULL) {
        Py_DECREF(protocol);
        return NULL;
    }
    for (size_t k = 0; k < sizeof(identity) / sizeof(identity[0]); k++)
        self->slot[identity[k]] = Py_XNewRef(last->slot[identity[k]]);
    self->type = Py_NewRef(s_exchange);
    self->ts_ns = Py_NewRef(args[1]);
    self->exchange = Py_NewRef(args[2]);
    self->protocol = protocol;
    if (fill_defaults(self, all_fields) == 0)
        return (PyObject *)self;
    Py_DECREF(self);
    return NULL;
}

static PyMethodDef Record_methods[] = {
    {"for_call", (PyCFunction)(void (*)(void))for_call, METH_FASTCALL | METH_CLASS, for_call_doc},
    {"for_exchange", (PyCFunction)(void (*)(void))for_exchange, METH_FASTCALL | METH_CLASS,
     for_exchange_doc},
    {NULL},
};

#define AS_MEMBER(name) {#name, T_OBJECT_EX, offsetof(RecordObject, name), 0, NULL},
/* Every field but redactions and stats, which are Record_getset's (own_container);
 * PyInit__record fills it. */
static PyMemberDef Record_members[N_FIELDS - 1];

static PyGetSetDef Record_getset[] = {
    {"redactions", (getter)get_redactions, (setter)set_redactions, NULL, NULL},
    {"stats", (getter)get_stats, (setter)set_stats, NULL, NULL},
    {NULL},
};

static PyTypeObject RecordType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "agent.records._record.Record",
    .tp_doc = PyDoc_STR("A Record's fields (agent/records/record.py builds the Record class "
                        "on this type)."),
    .tp_basicsize = sizeof(RecordObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_new = Record_new,
    .tp_dealloc = (destructor)Record_dealloc,
    .tp_traverse = (traverseproc)Record_traverse,
    .tp_clear = (inquiry)Record_clear,
    .tp_members = Record_members,
    .tp_getset = Record_getset,
    .tp_methods = Record_methods,
};

PyDoc_STRVAR(stamp_doc,
"stamp(records, agent_id, node, seq, stride) -> int\n"
"\n"
"Give each Record of the list the run's identity and its sequence number (seq,\n"
"seq + stride, ...); return the captured bytes of its data records\n"
"(RecordWriter's numbering, over a batch).");

static PyObject *stamp(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    if (nargs != 5 || !PyList_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "stamp(records: list, agent_id, node, seq, stride)");
        return NULL;
    }
    PyObject *records = args[0], *agent_id = args[1], *node = args[2];
    long long seq = PyLong_AsLongLong(args[3]), stride = PyLong_AsLongLong(args[4]);
    if ((seq == -1 || stride == -1) && PyErr_Occurred())
        return NULL;
    long long data_bytes = 0;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(records); i++) {
        PyObject *item = PyList_GET_ITEM(records, i);
        if (!PyObject_TypeCheck(item, &RecordType)) {
            PyErr_Format(PyExc_TypeError, "stamp: item %zd is a %.100s, not a Record", i,
                         Py_TYPE(item)->tp_name);
            return NULL;
        }
        RecordObject *r = (RecordObject *)item;
        PyObject *number = PyLong_FromLongLong(seq);
        if (number == NULL)
            return NULL;
        Py_XSETREF(r->seq, number);
        Py_XSETREF(r->agent_id, Py_NewRef(agent_id));
        Py_XSETREF(r->node, Py_NewRef(node));
        seq += stride;
        if (r->type == s_data || (r->type != NULL && PyUnicode_Check(r->type) &&
                                  PyUnicode_Compare(r->type, s_data) == 0)) {
            long long n = r->captured_len ? PyLong_AsLongLong(r->captured_len) : -1;
            if (n == -1 && PyErr_Occurred())
                return NULL;
            data_bytes += n;
        }
    }
    return PyLong_FromLongLong(data_bytes);
}

static PyMethodDef module_methods[] = {
    {"stamp", (PyCFunction)(void (*)(void))stamp, METH_FASTCALL, stamp_doc},
    {NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "agent.records._record",
    .m_doc = "Record's storage and constructor (agent/records/record.py).",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC PyInit__record(void) {
    PyObject *names = PyTuple_New(N_FIELDS);
    if (names == NULL)
        return NULL;
    for (int k = 0; k < N_FIELDS; k++) {
        interned_names[k] = PyUnicode_InternFromString(field_names[k]);
        if (interned_names[k] == NULL) {
            Py_DECREF(names);
            return NULL;
        }
        PyTuple_SET_ITEM(names, k, Py_NewRef(interned_names[k]));
    }
    int n_defaulted = 0;
    for (int k = 0; k < N_FIELDS; k++) {
        int set = k == F_type || k == F_captured_len || k == F_truncated;
        for (size_t j = 0; j < sizeof(call_to_record) / sizeof(call_to_record[0]); j++)
            set |= call_to_record[j][1] == k;
        for (size_t j = 0; j < sizeof(call_given) / sizeof(call_given[0]); j++)
            set |= call_given[j] == k;
        all_fields[k] = (signed char)k;
        if (!set)
            call_defaulted[n_defaulted++] = (signed char)k;
    }
    all_fields[N_FIELDS] = call_defaulted[n_defaulted] = -1;
    s_data = PyUnicode_InternFromString("data");
    s_exchange = PyUnicode_InternFromString("exchange");
    if (s_data == NULL || s_exchange == NULL) {
        Py_DECREF(names);
        return NULL;
    }
    PyObject *empty = PyUnicode_FromString(""), *zero = PyLong_FromLong(0);
    if (empty == NULL || zero == NULL)
        goto fail;
    const int empty_text[] = {F_agent_id, F_node, F_comm, F_container_id, F_source, F_conn_id,
                              F_protocol};
    const int zero_number[] = {F_seq, F_pid, F_tid, F_cgroup_id, F_offset, F_len, F_captured_len};
    const int none[] = {F_pod, F_local, F_remote, F_direction, F_exchange};
    for (size_t k = 0; k < sizeof(empty_text) / sizeof(int); k++)
        defaults[empty_text[k]] = Py_NewRef(empty);
    for (size_t k = 0; k < sizeof(zero_number) / sizeof(int); k++)
        defaults[zero_number[k]] = Py_NewRef(zero);
    for (size_t k = 0; k < sizeof(none) / sizeof(int); k++)
        defaults[none[k]] = Py_NewRef(Py_None);
    defaults[F_fd] = PyLong_FromLong(-1);
    defaults[F_role] = PyUnicode_InternFromString("unknown");
    defaults[F_truncated] = Py_NewRef(Py_False);
    defaults[F_data] = PyBytes_FromStringAndSize(NULL, 0);
    defaults[F_redactions] = record_empty_list = PyList_New(0);
    defaults[F_stats] = record_empty_dict = PyDict_New();
    Py_CLEAR(empty);
    Py_CLEAR(zero);
    if (defaults[F_fd] == NULL || defaults[F_role] == NULL || defaults[F_data] == NULL ||
        record_empty_list == NULL || record_empty_dict == NULL)
        goto fail;
    for (const signed char *k = call_defaulted; *k >= 0; k++)
        if (defaults[*k] == NULL) { /* for_call stores them unchecked */
            PyErr_Format(PyExc_SystemError, "Record.%s has no default", field_names[*k]);
            goto fail;
        }
    const PyMemberDef every[] = {FIELDS(AS_MEMBER)};
    for (int k = 0, n = 0; k < N_FIELDS; k++)
        if (k != F_redactions && k != F_stats)
            Record_members[n++] = every[k];
    if (PyType_Ready(&RecordType) < 0)
        goto fail;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        goto fail;
    static const RecordCAPI capi = {for_call};
    PyObject *capsule = PyCapsule_New((void *)&capi, RECORD_CAPI_NAME, NULL);
    if (capsule == NULL || PyModule_AddObject(m, "_C_API", capsule) < 0) {
        Py_XDECREF(capsule);
        Py_DECREF(m);
        goto fail;
    }
    if (PyModule_AddObjectRef(m, "Record", (PyObject *)&RecordType) < 0 ||
        PyModule_AddObject(m, "FIELDS", names) < 0) {
        Py_DECREF(m);
        goto fail;
    }
    return m;
fail:
    Py_XDECREF(empty);
    Py_XDECREF(zero);
    Py_DECREF(names);
    return NULL;
}
