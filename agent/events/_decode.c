/* The first step of the capture path in C: the ring's records walked, and one
 * TlsCall object made per data record.  agent/events/decode.py holds the rules (its
 * docstrings) and the Python class built on this module's BatchDecoder.
 *
 * Why C: every TLS call of every traced process passes here.  In Python, a data
 * record cost a 17-field struct read (17 objects), two cache look-ups and a
 * 17-argument dataclass __init__: ~1.6 us of the ~4 us the whole pipeline spends
 * per record with no output.  Here the header is read in place and the TlsCall's
 * numbers stay C numbers until someone asks for them.
 *
 * Input is untrusted in the sense that a record may be short or inconsistent
 * (a kernel/agent version mismatch, a test's garbage): every length is checked
 * against the record's before anything is read, exactly as the Python checks
 * did, and such a record becomes a DecodeError in the output, not a crash.
 * The layout is bpf/tlscap.h's struct data_event (agent/events/layout.py's
 * ctypes mirror is the reference; tests check that both agree).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <structmember.h>

#include "_tls_call.h"

/* ---- struct data_event, little-endian, 136 bytes ---------------------------- */

enum {
    EV_DATA = 1,
    DIR_INGRESS = 1,
    DATA_FD_WEAK = 1,
    CHUNK_SIZE = 16384,
    HEADER_SIZE = 136,
    COMM_AT = 64,
    COMM_LEN = 16,
    CONN_AT = 80,
    CONN_LEN = 48,
};

struct data_header {
    uint32_t kind, tgid, tid;
    int32_t fd;
    uint64_t ts_ns, ssl, len, offset;
    uint32_t captured_len, chunk_off, chunk_len;
    uint8_t direction, source, flags, pad;
    char comm[COMM_LEN];
    unsigned char conn[CONN_LEN];
    uint64_t cgroup_id;
};

_Static_assert(sizeof(struct data_header) == HEADER_SIZE, "struct data_event is 136 bytes");
_Static_assert(offsetof(struct data_header, comm) == COMM_AT, "comm at 64");
_Static_assert(offsetof(struct data_header, conn) == CONN_AT, "conn at 80");

/* ---- TlsCall ------------------------------------------------------------------ */

/* The layout is in _tls_call.h (agent/records/_record.c reads it too). */
#define AS_NAME(name) #name,
#define AS_MEMBER(name) {#name, T_OBJECT_EX, offsetof(TlsCall, name), 0, NULL},

static char *call_field_names[] = {CALL_FIELDS(AS_NAME) NULL};

static PyTypeObject TlsCallType;

/* TlsCalls that died, kept for the next ones (their memory, every slot released):
 * a batch's calls all die together once it is handled, and the next batch makes
 * as many again; pymalloc's allocation and release cost ~150 instructions a call.
 * FREE_MAX covers a 4 MiB drain of 1 KiB calls (~600 kB kept at most).  The type
 * has no subclasses. */
enum { FREE_MAX = 4096 };
static TlsCall *free_calls[FREE_MAX];
static int n_free_calls;

static void TlsCall_dealloc(TlsCall *self) {
    for (int k = 0; k < N_CALL_FIELDS; k++)
        Py_XDECREF(self->slot[k]);
    if (n_free_calls < FREE_MAX)
        free_calls[n_free_calls++] = self;
    else
        Py_TYPE(self)->tp_free((PyObject *)self);
}

/* A new TlsCall, every slot NULL. */
static TlsCall *call_alloc(void) {
    TlsCall *self;
    if (n_free_calls > 0) {
        self = free_calls[--n_free_calls];
        _Py_NewReference((PyObject *)self);
    } else if ((self = PyObject_New(TlsCall, &TlsCallType)) == NULL) {
        return NULL;
    }
    memset(self->slot, 0, sizeof(self->slot));
    return self;
}

static PyObject *TlsCall_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    PyObject *v[N_CALL_FIELDS] = {NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOOOOOOOOOOOO|OOO:TlsCall", call_field_names,
                                     &v[0], &v[1], &v[2], &v[3], &v[4], &v[5], &v[6], &v[7],
                                     &v[8], &v[9], &v[10], &v[11], &v[12], &v[13], &v[14], &v[15],
                                     &v[16]))
        return NULL;
    (void)type; /* TlsCallType: it has no subclasses */
    TlsCall *self = call_alloc();
    if (self == NULL)
        return NULL;
    for (int k = 0; k < N_CALL_FIELDS; k++)
        self->slot[k] = Py_XNewRef(v[k]);
    if (v[C_cgroup_id] == NULL && (self->cgroup_id = PyLong_FromLong(0)) == NULL) {
        Py_DECREF(self);
        return NULL;
    }
    if (v[C_complete] == NULL)
        self->complete = Py_NewRef(Py_True);
    if (v[C_fd_weak] == NULL)
        self->fd_weak = Py_NewRef(Py_False);
    return (PyObject *)self;
}

static PyObject *TlsCall_truncated(TlsCall *self, void *closure) {
    (void)closure;
    if (self->data == NULL || self->len == NULL) {
        PyErr_SetString(PyExc_AttributeError, "TlsCall without data or len");
        return NULL;
    }
    Py_ssize_t have = PyObject_Length(self->data);
    if (have < 0)
        return NULL;
    PyObject *count = PyLong_FromSsize_t(have);
    if (count == NULL)
        return NULL;
    PyObject *out = PyObject_RichCompare(count, self->len, Py_LT);
    Py_DECREF(count);
    return out;
}

/* Equal when every field is: what the dataclass it replaced compared (tests). */
static PyObject *TlsCall_richcompare(PyObject *a, PyObject *b, int op) {
    if ((op != Py_EQ && op != Py_NE) || !PyObject_TypeCheck(a, &TlsCallType) ||
        !PyObject_TypeCheck(b, &TlsCallType))
        Py_RETURN_NOTIMPLEMENTED;
    int same = 1;
    for (int k = 0; k < N_CALL_FIELDS && same == 1; k++) {
        PyObject *left = ((TlsCall *)a)->slot[k], *right = ((TlsCall *)b)->slot[k];
        same = left == NULL || right == NULL ? left == right
                                             : PyObject_RichCompareBool(left, right, Py_EQ);
    }
    if (same < 0)
        return NULL;
    return PyBool_FromLong(op == Py_EQ ? same : !same);
}

static PyObject *TlsCall_repr(TlsCall *self) {
    PyObject *parts = PyList_New(0), *out = NULL;
    if (parts == NULL)
        return NULL;
    for (int k = 0; k < N_CALL_FIELDS; k++) {
        PyObject *part = self->slot[k] == NULL
                             ? PyUnicode_FromFormat("%s=<unset>", call_field_names[k])
                             : PyUnicode_FromFormat("%s=%R", call_field_names[k], self->slot[k]);
        if (part == NULL || PyList_Append(parts, part) < 0) {
            Py_XDECREF(part);
            goto done;
        }
        Py_DECREF(part);
    }
    PyObject *sep = PyUnicode_FromString(", ");
    PyObject *body = sep ? PyUnicode_Join(sep, parts) : NULL;
    Py_XDECREF(sep);
    if (body != NULL)
        out = PyUnicode_FromFormat("TlsCall(%U)", body);
    Py_XDECREF(body);
done:
    Py_DECREF(parts);
    return out;
}

static PyMemberDef TlsCall_members[] = {CALL_FIELDS(AS_MEMBER){NULL}};

static PyGetSetDef TlsCall_getset[] = {
    {"truncated", (getter)TlsCall_truncated, NULL, "the payload cap cut the call's bytes", NULL},
    {NULL},
};

/* Not a GC type: its objects hold numbers, strings, bytes and a frozen
 * KernelSocket, which make no cycles, and a GC header would cost every call its
 * tracking. */
static PyTypeObject TlsCallType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = TLS_CALL_TYPE_NAME,
    .tp_doc = PyDoc_STR(
        "TlsCall(tgid, tid, fd, ts_mono_ns, ssl, len, offset, captured_len, chunk_off, "
        "direction, source, comm, socket, data, cgroup_id=0, complete=True, fd_weak=False)\n--\n\n"
        "One SSL_read/SSL_write (or equivalent) and the plaintext it moved: `len` bytes\n"
        "moved, `captured_len` of them sent by the kernel (the payload cap), `data`\n"
        "starting at `chunk_off` within the call (0 once assembled); `complete` False\n"
        "when chunks were lost in the kernel; `fd_weak` when the fd came from a\n"
        "read/write on an fd the kernel did not know as a socket."),
    .tp_basicsize = sizeof(TlsCall),
    .tp_flags = Py_TPFLAGS_DEFAULT, /* no subclasses: call_alloc makes TlsCallType's */
    .tp_new = TlsCall_new,
    .tp_dealloc = (destructor)TlsCall_dealloc,
    .tp_repr = (reprfunc)TlsCall_repr,
    .tp_richcompare = TlsCall_richcompare,
    .tp_hash = PyObject_HashNotImplemented,
    .tp_members = TlsCall_members,
    .tp_getset = TlsCall_getset,
};

/* ---- BatchDecoder --------------------------------------------------------------- */

/* Each event names its process (16 bytes of comm) and its socket (48 bytes) raw, and
 * both map to objects decoded once.  A dict lookup of either cost ~450 instructions
 * (a bytes key made, SipHash, freed): a quarter of decoding a call.  A small
 * two-way memo in front of each dict answers the same lookups in ~50 (a multiply
 * per 8 bytes and a memcmp); its misses go to the dict.  Two ways of 512 pairs:
 * direct-mapped in 256 slots, the 64 connections of bench/pipeline.py's run
 * collided in a third of their look-ups (each of two keys sharing a slot evicts the
 * other). */
enum { MEMO_BITS = 10, MEMO_SLOTS = 1 << MEMO_BITS, MEMO_KEY_MAX = 48 };

typedef struct {
    unsigned char raw[MEMO_KEY_MAX]; /* the key's first n bytes */
    PyObject *value;                 /* NULL: empty */
} MemoSlot;

static inline unsigned memo_index(const char *raw, Py_ssize_t n) {
    uint64_t h = 0;
    for (Py_ssize_t at = 0; at + 8 <= n; at += 8) {
        uint64_t word;
        memcpy(&word, raw + at, 8);
        h = (h ^ word) * 0x9E3779B97F4A7C15ull;
    }
    return (unsigned)(h >> (64 - MEMO_BITS)) & ~1u; /* the first slot of its pair */
}

/* A call's numbers repeat from call to call: its process, thread, TLS object, cgroup
 * and, for a stream of equal writes, its length.  An int made and freed costs ~90
 * instructions, one found in this direct-mapped memo ~10. */
enum { INT_BITS = 9, INT_SLOTS = 1 << INT_BITS };

typedef struct {
    unsigned long long value;
    PyObject *number; /* that int; NULL: empty */
} IntSlot;

typedef struct {
    PyObject_HEAD
    PyObject *kernel_socket; /* (48 raw bytes) -> KernelSocket */
    PyObject *comm_text;     /* (16 raw bytes) -> str */
    PyObject *decode_other;  /* (record bytes) -> Event, raises DecodeError */
    PyObject *bad_chunk;     /* (length, call_len, captured_len, chunk_off, chunk_len) -> DecodeError */
    PyObject *decode_error;  /* the DecodeError class */
    PyObject *source_names;  /* dict: source byte -> name */
    PyObject *sockets;       /* dict: 48 raw bytes -> KernelSocket */
    PyObject *comms;         /* dict: 16 raw bytes -> str */
    Py_ssize_t cache_size;
    PyObject *sources[256];  /* source byte -> name, filled on first use */
    MemoSlot comm_memo[MEMO_SLOTS];    /* in front of `comms` */
    MemoSlot socket_memo[MEMO_SLOTS];  /* in front of `sockets` */
    IntSlot ints[INT_SLOTS];           /* number_of()'s */
} BatchDecoder;

static PyObject *s_ingress, *s_egress;

static int BatchDecoder_traverse(BatchDecoder *self, visitproc visit, void *arg) {
    Py_VISIT(self->kernel_socket);
    Py_VISIT(self->comm_text);
    Py_VISIT(self->decode_other);
    Py_VISIT(self->bad_chunk);
    Py_VISIT(self->decode_error);
    Py_VISIT(self->source_names);
    Py_VISIT(self->sockets);
    Py_VISIT(self->comms);
    for (int k = 0; k < 256; k++)
        Py_VISIT(self->sources[k]);
    for (int k = 0; k < MEMO_SLOTS; k++) {
        Py_VISIT(self->comm_memo[k].value);
        Py_VISIT(self->socket_memo[k].value);
    }
    return 0;
}

static int BatchDecoder_clear(BatchDecoder *self) {
    Py_CLEAR(self->kernel_socket);
    Py_CLEAR(self->comm_text);
    Py_CLEAR(self->decode_other);
    Py_CLEAR(self->bad_chunk);
    Py_CLEAR(self->decode_error);
    Py_CLEAR(self->source_names);
    Py_CLEAR(self->sockets);
    Py_CLEAR(self->comms);
    for (int k = 0; k < 256; k++)
        Py_CLEAR(self->sources[k]);
    for (int k = 0; k < MEMO_SLOTS; k++) {
        Py_CLEAR(self->comm_memo[k].value);
        Py_CLEAR(self->socket_memo[k].value);
    }
    for (int k = 0; k < INT_SLOTS; k++)
        Py_CLEAR(self->ints[k].number);
    return 0;
}

static void BatchDecoder_dealloc(BatchDecoder *self) {
    PyObject_GC_UnTrack(self);
    BatchDecoder_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int BatchDecoder_init(BatchDecoder *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"kernel_socket", "comm_text", "decode_other", "bad_chunk",
                             "decode_error", "source_names", "cache_size", NULL};
    PyObject *kernel_socket, *comm_text, *decode_other, *bad_chunk, *decode_error, *names;
    Py_ssize_t cache_size;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOOOO!n:BatchDecoder", kwlist,
                                     &kernel_socket, &comm_text, &decode_other, &bad_chunk,
                                     &decode_error, &PyDict_Type, &names, &cache_size))
        return -1;
    BatchDecoder_clear(self);
    self->kernel_socket = Py_NewRef(kernel_socket);
    self->comm_text = Py_NewRef(comm_text);
    self->decode_other = Py_NewRef(decode_other);
    self->bad_chunk = Py_NewRef(bad_chunk);
    self->decode_error = Py_NewRef(decode_error);
    self->source_names = Py_NewRef(names);
    self->cache_size = cache_size;
    self->sockets = PyDict_New();
    self->comms = PyDict_New();
    return self->sockets && self->comms ? 0 : -1;
}

static PyObject *cached_in_dict(BatchDecoder *self, PyObject *cache, const char *raw,
                                Py_ssize_t n, PyObject *make) {
    PyObject *key = PyBytes_FromStringAndSize(raw, n);
    if (key == NULL)
        return NULL;
    PyObject *value = PyDict_GetItemWithError(cache, key);
    if (value != NULL) {
        Py_DECREF(key);
        return Py_NewRef(value);
    }
    if (PyErr_Occurred() || (value = PyObject_CallOneArg(make, key)) == NULL) {
        Py_DECREF(key);
        return NULL;
    }
    if (PyDict_GET_SIZE(cache) >= self->cache_size)
        PyDict_Clear(cache);
    int failed = PyDict_SetItem(cache, key, value);
    Py_DECREF(key);
    if (failed) {
        Py_DECREF(value);
        return NULL;
    }
    return value;
}

/* The value cached under `raw[0..n)`, made by `make` on a miss (a new
 * reference): from the memo, else the dict.  A full dict starts over: a busy node
 * has many connections, but each is seen for many events. */
static PyObject *cached(BatchDecoder *self, PyObject *cache, MemoSlot *memo, const char *raw,
                        Py_ssize_t n, PyObject *make) {
    MemoSlot *pair = NULL;
    if (self->cache_size > 0 && n <= MEMO_KEY_MAX) { /* cache_size 0: nothing is kept */
        pair = &memo[memo_index(raw, n)];
        for (int way = 0; way < 2; way++)
            if (pair[way].value != NULL && memcmp(pair[way].raw, raw, (size_t)n) == 0)
                return Py_NewRef(pair[way].value);
    }
    PyObject *value = cached_in_dict(self, cache, raw, n, make);
    if (value != NULL && pair != NULL) {
        /* The newest first: the older of the two goes. */
        Py_XSETREF(pair[1].value, pair[0].value);
        memcpy(pair[1].raw, pair[0].raw, MEMO_KEY_MAX);
        pair[0].value = Py_NewRef(value);
        memcpy(pair[0].raw, raw, (size_t)n);
    }
    return value;
}

/* The int `value` (a new reference), from the memo when it holds it. */
static PyObject *number_of(BatchDecoder *self, unsigned long long value) {
    IntSlot *slot = &self->ints[(value * 0x9E3779B97F4A7C15ull) >> (64 - INT_BITS)];
    if (slot->number != NULL && slot->value == value)
        return Py_NewRef(slot->number);
    PyObject *number = PyLong_FromUnsignedLongLong(value);
    if (number != NULL) {
        Py_XSETREF(slot->number, Py_NewRef(number));
        slot->value = value;
    }
    return number;
}

/* The name of a source byte: from layout.SOURCES, else "source<N>". */
static PyObject *source_name(BatchDecoder *self, uint8_t source) {
    PyObject *name = self->sources[source];
    if (name == NULL) {
        PyObject *key = PyLong_FromLong(source);
        if (key == NULL)
            return NULL;
        name = PyDict_GetItemWithError(self->source_names, key);
        Py_DECREF(key);
        if (name != NULL && PyObject_IsTrue(name) == 1)
            Py_INCREF(name);
        else if (PyErr_Occurred())
            return NULL;
        else
            name = PyUnicode_FromFormat("source%u", (unsigned int)source);
        if (name == NULL)
            return NULL;
        self->sources[source] = name;
    }
    return Py_NewRef(name);
}

/* A data record's TlsCall (a new reference), or NULL with the exception set;
 * `refused` set to a DecodeError instance (and NULL returned, no exception) for
 * a chunk whose lengths do not add up. */
static PyObject *decode_data(BatchDecoder *self, const char *rec, Py_ssize_t length,
                             PyObject **refused) {
    struct data_header h;
    memcpy(&h, rec, HEADER_SIZE);
    if (h.chunk_len > CHUNK_SIZE || HEADER_SIZE + (Py_ssize_t)h.chunk_len > length ||
        (uint64_t)h.chunk_off + h.chunk_len > h.captured_len || h.captured_len > h.len) {
        *refused = PyObject_CallFunction(self->bad_chunk, "nKIII", length,
                                         (unsigned long long)h.len, h.captured_len, h.chunk_off,
                                         h.chunk_len);
        return NULL;
    }
    TlsCall *call = call_alloc();
    if (call == NULL)
        return NULL;
    /* The steps that may call Python (a cache miss) go first, each only after the
     * one before it succeeded. */
    if ((call->source = source_name(self, h.source)) == NULL ||
        (call->comm = cached(self, self->comms, self->comm_memo, rec + COMM_AT, COMM_LEN,
                             self->comm_text)) == NULL ||
        (call->socket = cached(self, self->sockets, self->socket_memo, rec + CONN_AT, CONN_LEN,
                               self->kernel_socket)) == NULL) {
        Py_DECREF(call);
        return NULL;
    }
    /* The time and the offset are new with every call: not worth the memo. */
    call->tgid = number_of(self, h.tgid);
    call->tid = number_of(self, h.tid);
    call->fd = h.fd < 0 ? PyLong_FromLong(h.fd) : number_of(self, (unsigned long long)h.fd);
    call->ts_mono_ns = PyLong_FromUnsignedLongLong(h.ts_ns);
    call->ssl = number_of(self, h.ssl);
    call->len = number_of(self, h.len);
    call->offset = PyLong_FromUnsignedLongLong(h.offset);
    call->captured_len = h.captured_len == h.len && call->len != NULL
                             ? Py_NewRef(call->len)
                             : number_of(self, h.captured_len);
    call->chunk_off = PyLong_FromUnsignedLong(h.chunk_off);
    call->cgroup_id = number_of(self, h.cgroup_id);
    call->complete = Py_NewRef(Py_True);
    call->fd_weak = Py_NewRef(h.flags & DATA_FD_WEAK ? Py_True : Py_False);
    call->direction = Py_NewRef(h.direction == DIR_INGRESS ? s_ingress : s_egress);
    call->data = PyBytes_FromStringAndSize(rec + HEADER_SIZE, h.chunk_len);
    for (int k = 0; k < N_CALL_FIELDS; k++) {
        if (call->slot[k] == NULL) { /* out of memory */
            Py_DECREF(call);
            return NULL;
        }
    }
    return (PyObject *)call;
}

/* Any other record: decode_other's event, or the DecodeError it raised. */
static PyObject *decode_other(BatchDecoder *self, const char *rec, Py_ssize_t length) {
    PyObject *raw = PyBytes_FromStringAndSize(rec, length);
    if (raw == NULL)
        return NULL;
    PyObject *event = PyObject_CallOneArg(self->decode_other, raw);
    Py_DECREF(raw);
    if (event == NULL && PyErr_ExceptionMatches(self->decode_error)) {
        PyObject *type, *value, *tb;
        PyErr_Fetch(&type, &value, &tb);
        PyErr_NormalizeException(&type, &value, &tb);
        if (tb != NULL)
            PyException_SetTraceback(value, tb);
        Py_XDECREF(type);
        Py_XDECREF(tb);
        return value;
    }
    return event;
}

PyDoc_STRVAR(decode_batch_doc,
"decode_batch(batch) -> list\n"
"\n"
"One event (or the DecodeError that refused it) per record of a RingBatch, in\n"
"order: the i-th record lies at batch.data[spans[2i] : spans[2i] + spans[2i+1]].\n"
"Payloads are copied out, so the batch's memory may be reused afterwards.");

static PyObject *BatchDecoder_decode_batch(BatchDecoder *self, PyObject *batch) {
    PyObject *data = NULL, *spans = PyObject_GetAttrString(batch, "spans");
    if (spans == NULL || (data = PyObject_GetAttrString(batch, "data")) == NULL) {
        Py_XDECREF(spans);
        return NULL;
    }
    Py_buffer view;
    int no_buffer = !PyList_Check(spans) || PyObject_GetBuffer(data, &view, PyBUF_SIMPLE) < 0;
    Py_DECREF(data);
    if (no_buffer) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_TypeError, "a batch's spans are a list of ints");
        Py_DECREF(spans);
        return NULL;
    }
    Py_ssize_t n = PyList_GET_SIZE(spans) / 2;
    PyObject *out = PyList_New(n);
    if (out == NULL)
        goto fail;
    const char *base = view.buf;
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_ssize_t start = PyLong_AsSsize_t(PyList_GET_ITEM(spans, 2 * i));
        Py_ssize_t length = PyLong_AsSsize_t(PyList_GET_ITEM(spans, 2 * i + 1));
        if ((start == -1 || length == -1) && PyErr_Occurred())
            goto fail;
        if (start < 0 || length < 0 || start > view.len - length) {
            PyErr_Format(PyExc_ValueError, "record %zd (%zd bytes at %zd) is outside the %zd-byte buffer",
                         i, length, start, view.len);
            goto fail;
        }
        const char *rec = base + start;
        uint32_t kind = 0;
        if (length >= 4)
            memcpy(&kind, rec, 4);
        PyObject *event, *refused = NULL;
        if (length >= HEADER_SIZE && kind == EV_DATA) {
            event = decode_data(self, rec, length, &refused);
            if (event == NULL && refused != NULL)
                event = refused;
        } else {
            event = decode_other(self, rec, length);
        }
        if (event == NULL) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_SystemError, "bad_chunk returned NULL without an error");
            goto fail;
        }
        PyList_SET_ITEM(out, i, event);
    }
    PyBuffer_Release(&view);
    Py_DECREF(spans);
    return out;
fail:
    Py_XDECREF(out);
    PyBuffer_Release(&view);
    Py_DECREF(spans);
    return NULL;
}

static PyMethodDef BatchDecoder_methods[] = {
    {"decode_batch", (PyCFunction)BatchDecoder_decode_batch, METH_O, decode_batch_doc},
    {NULL},
};

static PyTypeObject BatchDecoderType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "agent.events._decode.BatchDecoder",
    .tp_doc = PyDoc_STR("Decodes batches of ring-buffer records; data records here, every "
                        "other kind through decode_other."),
    .tp_basicsize = sizeof(BatchDecoder),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)BatchDecoder_init,
    .tp_dealloc = (destructor)BatchDecoder_dealloc,
    .tp_traverse = (traverseproc)BatchDecoder_traverse,
    .tp_clear = (inquiry)BatchDecoder_clear,
    .tp_methods = BatchDecoder_methods,
};

/* ---- the ring's records ------------------------------------------------------- */

enum { RING_BUSY = 1u << 31, RING_DISCARD = 1u << 30, RING_HEADER = 8 };

PyDoc_STRVAR(walk_records_doc,
"walk_records(data, size, consumer, producer, max_bytes, base) -> (pos, spans)\n"
"\n"
"agent/events/ring.py's take_records without its RingBatch: where the committed\n"
"records in [consumer, producer) lie in `data` (flat: start, length, ...) and the\n"
"position the walk reached.  The rules are take_records' docstring.");

static PyObject *walk_records(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    unsigned long long size, consumer, producer, max_bytes, base;
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError,
                        "walk_records(data, size, consumer, producer, max_bytes, base)");
        return NULL;
    }
    unsigned long long *numbers[] = {&size, &consumer, &producer, &max_bytes, &base};
    for (int k = 0; k < 5; k++) {
        *numbers[k] = PyLong_AsUnsignedLongLong(args[k + 1]);
        if (*numbers[k] == (unsigned long long)-1 && PyErr_Occurred())
            return NULL;
    }
    if (size == 0 || (size & (size - 1)) != 0) {
        PyErr_Format(PyExc_ValueError, "ring size %llu is not a power of two", size);
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    PyObject *spans = PyList_New(0);
    if (spans == NULL)
        goto fail;
    const unsigned long long mask = size - 1, mapped = (unsigned long long)view.len;
    unsigned long long limit = producer;
    if (max_bytes < producer - consumer && producer > consumer)
        limit = consumer + max_bytes;
    unsigned long long pos = consumer;
    while (pos < limit) {
        unsigned long long at = base + (pos & mask);
        if (at + 4 > mapped) {
            PyErr_Format(PyExc_ValueError, "ring record header at %llu is past the %llu-byte mapping",
                         pos, mapped);
            goto fail;
        }
        /* The kernel writes the word last (BUSY cleared) once the record is
         * complete: read it once, before anything of the record. */
        uint32_t word = __atomic_load_n((const uint32_t *)((const char *)view.buf + at),
                                        __ATOMIC_ACQUIRE);
        if (word & RING_BUSY)
            break;
        unsigned long long length = word & ~(RING_BUSY | RING_DISCARD);
        if (!(word & RING_DISCARD)) {
            if (at + RING_HEADER + length > mapped) {
                PyErr_Format(PyExc_ValueError,
                             "ring record at %llu wraps past the %llu-byte mapping: pass the data "
                             "area mapped twice, as the kernel maps it",
                             pos, mapped - base);
                goto fail;
            }
            PyObject *start = PyLong_FromUnsignedLongLong(at + RING_HEADER);
            PyObject *len = start ? PyLong_FromUnsignedLongLong(length) : NULL;
            int failed = len == NULL || PyList_Append(spans, start) || PyList_Append(spans, len);
            Py_XDECREF(start);
            Py_XDECREF(len);
            if (failed)
                goto fail;
        }
        pos += (length + RING_HEADER + 7) & ~7ull;
    }
    PyBuffer_Release(&view);
    PyObject *out = Py_BuildValue("(KN)", pos, spans);
    return out;
fail:
    Py_XDECREF(spans);
    PyBuffer_Release(&view);
    return NULL;
}

/* ---- the ring's two positions --------------------------------------------------- */

/* The producer and consumer positions are 8-byte words that the kernel reads and
 * writes on other CPUs at any moment, so each is loaded or stored here in one
 * access.  Python's struct does neither: '<Q' goes through _PyLong_AsByteArray, one
 * byte at a time, and a producer that read a half-written consumer position took the
 * ring for full and refused a record (bench/README.md, "A torn consumer position"). */

static int position_at(PyObject *buffer, PyObject *offset_obj, int flags, Py_buffer *view,
                        uint64_t **word) {
    Py_ssize_t offset = PyLong_AsSsize_t(offset_obj);
    if (offset == -1 && PyErr_Occurred())
        return -1;
    if (PyObject_GetBuffer(buffer, view, flags) < 0)
        return -1;
    uintptr_t at = (uintptr_t)view->buf + (uintptr_t)offset;
    if (offset < 0 || offset > view->len - 8 || at % 8 != 0) {
        PyErr_Format(PyExc_ValueError,
                     "a ring position is an aligned 8-byte word: offset %zd of a %zd-byte buffer",
                     offset, view->len);
        PyBuffer_Release(view);
        return -1;
    }
    *word = (uint64_t *)at;
    return 0;
}

PyDoc_STRVAR(load_position_doc,
"load_position(buffer, offset) -> int\n"
"\n"
"The 8-byte ring position at `offset`, read in one access (acquire).");

static PyObject *load_position(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "load_position(buffer, offset)");
        return NULL;
    }
    Py_buffer view;
    uint64_t *word;
    if (position_at(args[0], args[1], PyBUF_SIMPLE, &view, &word) < 0)
        return NULL;
    uint64_t value = __atomic_load_n(word, __ATOMIC_ACQUIRE);
    PyBuffer_Release(&view);
    return PyLong_FromUnsignedLongLong(value);
}

PyDoc_STRVAR(store_position_doc,
"store_position(buffer, offset, value)\n"
"\n"
"Store the 8-byte ring position at `offset` in one access (release): the kernel\n"
"never sees part of it.");

static PyObject *store_position(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "store_position(buffer, offset, value)");
        return NULL;
    }
    unsigned long long value = PyLong_AsUnsignedLongLong(args[2]);
    if (value == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    Py_buffer view;
    uint64_t *word;
    if (position_at(args[0], args[1], PyBUF_WRITABLE, &view, &word) < 0)
        return NULL;
    __atomic_store_n(word, (uint64_t)value, __ATOMIC_RELEASE);
    PyBuffer_Release(&view);
    Py_RETURN_NONE;
}

static PyMethodDef module_methods[] = {
    {"walk_records", (PyCFunction)(void (*)(void))walk_records, METH_FASTCALL, walk_records_doc},
    {"load_position", (PyCFunction)(void (*)(void))load_position, METH_FASTCALL,
     load_position_doc},
    {"store_position", (PyCFunction)(void (*)(void))store_position, METH_FASTCALL,
     store_position_doc},
    {NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "agent.events._decode",
    .m_doc = "Ring-buffer data records to TlsCall objects (agent/events/decode.py).",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC PyInit__decode(void) {
    if (PyType_Ready(&TlsCallType) < 0 || PyType_Ready(&BatchDecoderType) < 0)
        return NULL;
    s_ingress = PyUnicode_InternFromString("ingress");
    s_egress = PyUnicode_InternFromString("egress");
    if (s_ingress == NULL || s_egress == NULL)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddIntConstant(m, "HEADER_SIZE", HEADER_SIZE) < 0 ||
        PyModule_AddIntConstant(m, "CHUNK_SIZE", CHUNK_SIZE) < 0 ||
        PyModule_AddObjectRef(m, "TlsCall", (PyObject *)&TlsCallType) < 0 ||
        PyModule_AddObjectRef(m, "BatchDecoder", (PyObject *)&BatchDecoderType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
