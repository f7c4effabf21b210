/* The record path of the L7 stage, in C: agent/l7/connection.py's docstring says
 * what happens to a data record; ConnectionL7 and L7Stage are built on the two
 * types here, which hold the per-record work and its state.
 *
 * - Connection (the base of ConnectionL7): one connection's stream positions, its
 *   maskers' decided bytes not yet in a record, the records held until their bytes
 *   are decided, and the parser and maskers the Python side chose.  on_data() is
 *   one data record: the offset check (gap, overlap), parser.feed, masker.feed, the
 *   short-capture gap, the record straight out or queued and released, the payload
 *   regexes, and the parsed exchanges made records (_exchange_records: each
 *   redacted, counted and given the connection's identity).
 *   While the protocol is being detected (`detecting`), on_data() hands the record
 *   to ConnectionL7._detect_data, which calls process() once it knows.
 * - Dispatch (the base of L7Stage): process() finds a data record's connection (the
 *   least recently used go first) and calls its on_data(); everything else (new
 *   connections, closes, eviction) is L7Stage's Python.
 *
 * Why C: with parsing and masking in C already, the Python around them (offset
 * check, queue, release, finish, counters, the stage's lookup) was 30-50 % of the
 * agent's CPU per event with L7 on.  Now a data record of a decided connection is
 * one call from Python.  An HTTP/1 parser's and masker's feed() are called as C
 * functions (their modules' capsules, _http1_api.h and _stream_masker_api.h: calling
 * them by method name, with the tuple, set and list that came back, was a third of
 * the record path's CPU); any other parser or masker (HTTP/2's, Python objects) by
 * method name through the ordinary C API, so any object with those methods works.
 *
 * Records are read by slot (_record.h), and the counters and an exchange's fields
 * (slots dataclasses) in their slots when they are plain slots (_slots.h); anything
 * else by attribute name.  Stream offsets are C long long: an offset past 2**63
 * raises OverflowError.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include "../records/_record.h"
#include "../redact/_rule_names.h"
#include "../redact/_stream_masker_api.h"
#include "_http1_api.h"
#include "../native/_slots.h"

/* -- a first-in-first-out queue of objects ---------------------------------------- */

/* An object and a number that goes with it: a decided piece and its length, or a
 * held record and its direction. */
typedef struct {
    PyObject *obj;
    Py_ssize_t aux;
} Item;

typedef struct {
    Item *items; /* a ring: items[(head + k) % cap] for k < len */
    Py_ssize_t head, len, cap;
} Fifo;

static int fifo_grow(Fifo *q) {
    Py_ssize_t cap = q->cap ? 2 * q->cap : 8;
    Item *items = PyMem_New(Item, cap);
    if (items == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t k = 0; k < q->len; k++)
        items[k] = q->items[(q->head + k) % q->cap];
    PyMem_Free(q->items);
    q->items = items;
    q->head = 0;
    q->cap = cap;
    return 0;
}

/* Takes a new reference to `obj`. */
static int fifo_push(Fifo *q, PyObject *obj, Py_ssize_t aux) {
    if (q->len == q->cap && fifo_grow(q) < 0)
        return -1;
    q->items[(q->head + q->len) % q->cap] = (Item){Py_NewRef(obj), aux};
    q->len++;
    return 0;
}

/* Steals the reference to `obj`. */
static int fifo_push_front(Fifo *q, PyObject *obj, Py_ssize_t aux) {
    if (q->len == q->cap && fifo_grow(q) < 0) {
        Py_DECREF(obj);
        return -1;
    }
    q->head = (q->head + q->cap - 1) % q->cap;
    q->items[q->head] = (Item){obj, aux};
    q->len++;
    return 0;
}

static Item *fifo_front(Fifo *q) { return q->len ? &q->items[q->head] : NULL; }

/* The front item; its reference passes to the caller. */
static Item fifo_pop(Fifo *q) {
    Item item = q->items[q->head];
    q->head = (q->head + 1) % q->cap;
    q->len--;
    return item;
}

static int fifo_traverse(Fifo *q, visitproc visit, void *arg) {
    for (Py_ssize_t k = 0; k < q->len; k++)
        Py_VISIT(q->items[(q->head + k) % q->cap].obj);
    return 0;
}

static void fifo_clear(Fifo *q) {
    while (q->len) {
        Item item = fifo_pop(q);
        Py_DECREF(item.obj);
    }
}

static void fifo_free(Fifo *q) {
    fifo_clear(q);
    PyMem_Free(q->items);
    q->items = NULL;
    q->cap = 0;
}

/* -- names ------------------------------------------------------------------------ */

#define NAMES(X)                                                                          \
    X(type) X(conn_id) X(direction) X(offset) X(len) X(captured_len) X(ts_ns) X(data)      \
    X(protocol) X(redactions) X(failed) X(feed) X(gap) X(flush) X(unknown_blocks)         \
    X(move_to_end) X(on_data) X(evict_overflow) X(gaps) X(parse_failures)                 \
    X(redacted_records) X(header_blocks_masked_unknown) X(egress) X(ingress) X(request)    \
    X(response) X(undecided) X(_detect_data) X(_start_midstream_http2)                    \
    X(_new_conn) X(_other) X(exchanges) X(redacted_exchanges) X(end_ts_ns) X(enabled)     \
    X(regexes)

#define AS_STATIC(name) static PyObject *s_##name;
NAMES(AS_STATIC)
static PyObject *mask_regexes;     /* agent.redact.payload.mask_regexes */
static PyObject *starts_frame_run; /* agent.l7.http2_frames.starts_frame_run */
static PyObject *redact_exchange;  /* agent.redact.exchange.redact_exchange */
static PyObject *for_exchange;     /* agent.records.record.Record.for_exchange */

/* Whether `obj` is the str `name` (interned: mostly the same object). */
static int is_str(PyObject *obj, PyObject *name) {
    return obj == name || (PyUnicode_Check(obj) && PyUnicode_Compare(obj, name) == 0);
}

/* An int's value; `v` (stolen) NULL: the error of what gave it. */
static int as_ll(PyObject *v, long long *value) {
    if (v == NULL)
        return -1;
    *value = PyLong_AsLongLong(v);
    Py_DECREF(v);
    return *value == -1 && PyErr_Occurred() ? -1 : 0;
}

static int get_ll(PyObject *obj, PyObject *name, long long *value) {
    return as_ll(PyObject_GetAttr(obj, name), value);
}

/* A record's fields by slot (agent/records/_record.h): the base type Record, found
 * when the module loads.  Anything else (no caller passes one) goes by name. */
static PyTypeObject *RecordBase;
static PyObject *RecordClass; /* agent.records.record.Record, what every record is */

static inline int is_record(PyObject *r) {
    return (PyObject *)Py_TYPE(r) == RecordClass || PyObject_TypeCheck(r, RecordBase);
}

/* r.<field> (a new reference), AttributeError when unset, as getattr. */
static inline PyObject *record_get(PyObject *r, int k, PyObject *name) {
    if (!is_record(r))
        return PyObject_GetAttr(r, name);
    PyObject *v = ((RecordObject *)r)->slot[k];
    if (v == NULL)
        PyErr_SetObject(PyExc_AttributeError, name);
    return Py_XNewRef(v);
}

static inline int record_set(PyObject *r, int k, PyObject *name, PyObject *v) {
    if (!is_record(r))
        return PyObject_SetAttr(r, name, v);
    Py_XSETREF(((RecordObject *)r)->slot[k], Py_NewRef(v));
    return 0;
}

#define GET(r, name) record_get(r, F_##name, s_##name)
#define SET(r, name, v) record_set(r, F_##name, s_##name, v)
#define GET_LL(r, name, value) as_ll(GET(r, name), value)

/* obj.name(args...), the method looked up by name. */
static PyObject *call_method(PyObject *obj, PyObject *name, PyObject *const *args,
                             size_t nargs) {
    PyObject *stack[4] = {obj};
    for (size_t k = 0; k < nargs && k < 3; k++)
        stack[k + 1] = args[k];
    return PyObject_VectorcallMethod(name, stack, (nargs + 1) | PY_VECTORCALL_ARGUMENTS_OFFSET,
                                     NULL);
}

/* list += items (any sequence); 0 or -1. */
static int extend(PyObject *list, PyObject *items) {
    Py_ssize_t n = PyList_GET_SIZE(list);
    return PyList_SetSlice(list, n, n, items);
}

/* The parser's exchanges `found` join *exchanges, a list made when first needed. */
static int collect(PyObject **exchanges, PyObject *found) {
    Py_ssize_t n = PyObject_Size(found);
    if (n <= 0)
        return (int)n;
    if (*exchanges == NULL && (*exchanges = PyList_New(0)) == NULL)
        return -1;
    return extend(*exchanges, found);
}

/* The parser's exchanges `found` (a new list, stolen) join *exchanges. */
static int adopt(PyObject **exchanges, PyObject *found) {
    if (*exchanges == NULL) {
        *exchanges = found;
        return 0;
    }
    int r = extend(*exchanges, found);
    Py_DECREF(found);
    return r;
}

/* -- Connection ------------------------------------------------------------------- */

/* One direction of a connection. */
typedef struct {
    long long next_offset; /* where its next byte belongs, once has_next */
    int has_next;
    PyObject *masker; /* or NULL */
    /* Masked bytes not yet in a record, in the pieces the masker returned them:
     * mostly one record's worth each, which a record then takes as it is. */
    Fifo decided;
    Py_ssize_t decided_len;
    PyObject *hits; /* set of the rules behind `decided` (ours, never a masker's), or NULL */
    long long unknown_counted;    /* the masker's unknown_blocks already counted */
} Direction;

typedef struct {
    PyObject_HEAD
    PyObject *protocol;          /* str: "", "http1", "http2" */
    PyObject *parser;            /* None until one is chosen */
    PyObject *request_direction; /* "egress", "ingress" or None */
    PyObject *last;              /* the latest data record, or None */
    PyObject *counters;          /* L7Counters */
    PyObject *rules;             /* the RedactionRules */
    PyObject *regexes;           /* rules.regexes: the payload regex rules (a tuple) */
    int has_regexes;
    /* rules.enabled: exchanges are redacted, and a connection of unknown protocol
     * is looked at for HTTP/2 frames at each record's start (to mask their headers). */
    int redacting;
    char detecting; /* each data record goes to _detect_data first */
    int parse_failure_counted;
    Direction dirs[2]; /* egress, ingress */
    Fifo queue;        /* held records (and their direction), released in order */
} Connection;

static PyTypeObject ConnectionType;

/* The counters (L7Counters, a slots dataclass), read and set in place. */
static SlotCache c_gaps = SLOT_CACHE("gaps"), c_parse_failures = SLOT_CACHE("parse_failures"),
                 c_redacted_records = SLOT_CACHE("redacted_records"),
                 c_header_blocks_masked_unknown = SLOT_CACHE("header_blocks_masked_unknown"),
                 c_exchanges = SLOT_CACHE("exchanges"),
                 c_redacted_exchanges = SLOT_CACHE("redacted_exchanges");

/* counters.<name> += delta */
static int count(Connection *self, SlotCache *name, long long delta) {
    PyObject *value = slot_get(name, self->counters), *sum = NULL;
    if (value == NULL)
        return -1;
    int overflow = 0;
    long long v = PyLong_CheckExact(value) ? PyLong_AsLongLongAndOverflow(value, &overflow) : 0;
    if (PyLong_CheckExact(value) && !overflow && !(v == -1 && PyErr_Occurred()) &&
        (delta >= 0 ? v <= LLONG_MAX - delta : v >= LLONG_MIN - delta)) {
        sum = PyLong_FromLongLong(v + delta); /* an int's sum, without the number protocol */
    } else {
        PyErr_Clear();
        PyObject *d = PyLong_FromLongLong(delta);
        sum = d ? PyNumber_Add(value, d) : NULL;
        Py_XDECREF(d);
    }
    Py_DECREF(value);
    if (sum == NULL)
        return -1;
    int r = slot_set(name, self->counters, sum);
    Py_DECREF(sum);
    return r;
}

/* Which of dirs a record's direction is (None or "" counts as egress); -1 with
 * KeyError for anything else. */
static int direction_index(PyObject *direction) {
    if (direction == s_ingress)
        return 1;
    if (direction == s_egress)
        return 0;
    if (is_str(direction, s_ingress))
        return 1;
    int falsy = PyObject_Not(direction);
    if (falsy < 0)
        return -1;
    if (falsy || is_str(direction, s_egress))
        return 0;
    PyErr_SetObject(PyExc_KeyError, direction);
    return -1;
}

/* The side ("request" / "response") a direction carries, borrowed, or NULL when
 * the request direction is not known; -1 on error. */
static int side_of(Connection *self, PyObject *direction, PyObject **side) {
    *side = NULL;
    if (self->request_direction == Py_None)
        return 0;
    int same = PyObject_RichCompareBool(direction, self->request_direction, Py_EQ);
    if (same < 0)
        return -1;
    *side = same ? s_request : s_response;
    return 0;
}

/* Whether objects of type t find their attributes on the class alone: no __dict__
 * of their own (that could hold another value) and the generic look-up.  A plain
 * class attribute is then every object's value. */
static int attributes_from_class(PyTypeObject *t) {
    return t->tp_getattro == PyObject_GenericGetAttr && t->tp_dictoffset == 0 &&
           !(t->tp_flags & Py_TPFLAGS_MANAGED_DICT);
}

/* The C entry points of agent.l7._http1 and agent.redact._stream_masker: an
 * Http1Parser's and an HTTP/1 masker's feed() called as C functions, not as methods
 * by name.  Every other parser and masker (HTTP/2's, Python) goes by name. */
static const Http1Api *http1;
static const StreamMaskerApi *stream_masker;
static PyObject *stream_masker_feed; /* StreamMasker.feed, the method descriptor */

/* Whether masker.feed is StreamMasker's C feed: a StreamMasker, or a subclass that
 * left feed alone and whose objects have no __dict__ (that could hold another feed)
 * and no attribute look-up of their own. */
static int masker_in_c(PyObject *masker) {
    PyTypeObject *t = Py_TYPE(masker);
    if (t == stream_masker->type)
        return 1;
    return PyType_IsSubtype(t, stream_masker->type) && attributes_from_class(t) &&
           _PyType_Lookup(t, s_feed) == stream_masker_feed;
}

/* parser.failed, a new reference. */
static PyObject *parser_failed(PyObject *parser) {
    if (Py_IS_TYPE(parser, http1->type)) {
        PyObject *failed = http1->failed(parser);
        return Py_NewRef(failed ? failed : Py_None);
    }
    return PyObject_GetAttr(parser, s_failed);
}

/* Whether the parser has not given up (its `failed` is None); -1 on error. */
static int parser_running(PyObject *parser) {
    PyObject *failed = parser_failed(parser);
    if (failed == NULL)
        return -1;
    int running = failed == Py_None;
    Py_DECREF(failed);
    return running;
}

static int count_parse_failure(Connection *self) {
    if (self->parser == Py_None || self->parse_failure_counted)
        return 0;
    PyObject *failed = parser_failed(self->parser);
    if (failed == NULL)
        return -1;
    int truth = PyObject_IsTrue(failed);
    Py_DECREF(failed);
    if (truth <= 0)
        return truth;
    self->parse_failure_counted = 1;
    return count(self, &c_parse_failures, 1);
}

/* masker.unknown_blocks: an int class attribute (Http1HeaderMasker's 0) read from
 * the class when attributes_from_class() (a look-up by name was ~120 CPU
 * instructions per record), anything else by name. */
static int unknown_blocks(PyObject *masker, long long *blocks) {
    PyTypeObject *t = Py_TYPE(masker);
    PyObject *fixed = attributes_from_class(t) ? _PyType_Lookup(t, s_unknown_blocks) : NULL;
    if (fixed == NULL || !PyLong_CheckExact(fixed))
        return get_ll(masker, s_unknown_blocks, blocks);
    *blocks = PyLong_AsLongLong(fixed);
    return *blocks == -1 && PyErr_Occurred() ? -1 : 0;
}

static int count_unknown_blocks(Connection *self) {
    for (int d = 0; d < 2; d++) {
        Direction *st = &self->dirs[d];
        if (st->masker == NULL)
            continue;
        long long blocks;
        if (unknown_blocks(st->masker, &blocks) < 0)
            return -1;
        if (blocks > st->unknown_counted) {
            if (count(self, &c_header_blocks_masked_unknown, blocks - st->unknown_counted) < 0)
                return -1;
            st->unknown_counted = blocks;
        }
    }
    return 0;
}

/* The masker's header blocks masked unread since the last record, counted. */
static int masker_blocks(Connection *self, Direction *st) {
    if (st->masker == NULL) /* a Python masker's feed took it away */
        return 0;
    long long blocks;
    if (unknown_blocks(st->masker, &blocks) < 0)
        return -1;
    if (blocks != st->unknown_counted && count_unknown_blocks(self) < 0)
        return -1;
    return 0;
}

/* Bytes of a direction were lost: told to the masker and, if it parses this side,
 * the parser, whose exchanges join *exchanges (a list made when first needed). */
static int gap(Connection *self, Direction *st, PyObject *side, long long length, PyObject *ts,
               PyObject **exchanges) {
    if (count(self, &c_gaps, 1) < 0)
        return -1;
    PyObject *n = PyLong_FromLongLong(length);
    if (n == NULL)
        return -1;
    int r = 0;
    if (st->masker != NULL) {
        PyObject *done = call_method(st->masker, s_gap, &n, 1);
        r = done == NULL ? -1 : 0;
        Py_XDECREF(done);
    }
    if (r == 0 && self->parser != Py_None && side != NULL) {
        r = parser_running(self->parser);
        if (r > 0) {
            PyObject *args[3] = {side, n, ts};
            PyObject *found = call_method(self->parser, s_gap, args, 3);
            r = found == NULL ? -1 : collect(exchanges, found);
            Py_XDECREF(found);
        }
    }
    Py_DECREF(n);
    return r < 0 ? -1 : 0;
}

/* Masked bytes and the rules behind them (a set, or NULL: none) join the decided ones. */
static int add(Direction *st, PyObject *data, PyObject *hits) {
    Py_ssize_t n = PyBytes_GET_SIZE(data);
    if (n && fifo_push(&st->decided, data, n) < 0)
        return -1;
    st->decided_len += n;
    Py_ssize_t nhits = hits == NULL ? 0 : PyObject_Size(hits);
    if (nhits < 0)
        return -1;
    if (nhits == 0)
        return 0;
    if (st->hits == NULL) {
        st->hits = PySet_New(hits);
        return st->hits == NULL ? -1 : 0;
    }
    PyObject *both = PyNumber_InPlaceOr(st->hits, hits);
    if (both == NULL)
        return -1;
    Py_SETREF(st->hits, both);
    return 0;
}

/* The next n decided bytes (a new reference), or NULL: fewer are decided (no error
 * set) or an error. */
static PyObject *take(Direction *st, Py_ssize_t n) {
    if (st->decided_len < n)
        return NULL;
    if (n == 0)
        return PyBytes_FromStringAndSize(NULL, 0);
    Item *front = fifo_front(&st->decided);
    if (front->aux == n) {
        st->decided_len -= n;
        return fifo_pop(&st->decided).obj;
    }
    PyObject *data = PyBytes_FromStringAndSize(NULL, n);
    if (data == NULL)
        return NULL;
    char *out = PyBytes_AS_STRING(data);
    Py_ssize_t have = 0;
    while (have < n) {
        Item piece = fifo_pop(&st->decided);
        Py_ssize_t k = piece.aux < n - have ? piece.aux : n - have;
        memcpy(out + have, PyBytes_AS_STRING(piece.obj), (size_t)k);
        have += k;
        st->decided_len -= k;
        if (k < piece.aux) { /* the rest of the piece stays first */
            PyObject *rest =
                PyBytes_FromStringAndSize(PyBytes_AS_STRING(piece.obj) + k, piece.aux - k);
            Py_DECREF(piece.obj);
            if (rest == NULL || fifo_push_front(&st->decided, rest, piece.aux - k) < 0) {
                st->decided_len -= piece.aux - k; /* lost with the error */
                Py_DECREF(data);
                return NULL;
            }
        } else {
            Py_DECREF(piece.obj);
        }
    }
    return data;
}

/* sorted(redactions | set(r.redactions)) into r.redactions; steals `redactions`. */
static int set_redactions(PyObject *r, PyObject *redactions) {
    PyObject *old = GET(r, redactions);
    PyObject *list = old == NULL ? NULL : sorted_rule_names(redactions, old);
    int result = list == NULL ? -1 : SET(r, redactions, list);
    Py_XDECREF(old);
    Py_XDECREF(list);
    Py_DECREF(redactions);
    return result;
}

/* Give `r` its masked bytes (the reference is stolen), the payload regexes applied,
 * and name the rules that changed any of them. */
static int finish(Connection *self, PyObject *r, Direction *st, PyObject *masked) {
    PyObject *redactions = NULL;
    if (SET(r, protocol, self->protocol) < 0)
        goto fail;
    if (st->hits != NULL) {
        PyObject *data = GET(r, data);
        if (data == NULL)
            goto fail;
        int changed = PyObject_RichCompareBool(masked, data, Py_NE);
        Py_DECREF(data);
        if (changed < 0)
            goto fail;
        if (changed && !st->decided_len) { /* the set is ours and done with: taken */
            redactions = st->hits;
            st->hits = NULL;
        } else if (changed && (redactions = PySet_New(st->hits)) == NULL) {
            goto fail;
        }
        if (!st->decided_len)
            Py_CLEAR(st->hits);
    }
    if (self->has_regexes) {
        PyObject *args[2] = {masked, self->regexes};
        PyObject *pair = PyObject_Vectorcall(mask_regexes, args, 2, NULL);
        if (pair == NULL)
            goto fail;
        if (!PyTuple_Check(pair) || PyTuple_GET_SIZE(pair) != 2) {
            Py_DECREF(pair);
            PyErr_SetString(PyExc_TypeError, "mask_regexes must return (bytes, set)");
            goto fail;
        }
        Py_SETREF(masked, Py_NewRef(PyTuple_GET_ITEM(pair, 0)));
        PyObject *hits = PyTuple_GET_ITEM(pair, 1);
        Py_ssize_t nhits = PyObject_Size(hits);
        if (nhits > 0 && redactions == NULL)
            redactions = PySet_New(hits);
        else if (nhits > 0)
            Py_SETREF(redactions, PyNumber_InPlaceOr(redactions, hits));
        Py_DECREF(pair);
        if (nhits < 0 || (nhits > 0 && redactions == NULL))
            goto fail;
    }
    if (redactions != NULL && PySet_GET_SIZE(redactions)) {
        if (count(self, &c_redacted_records, 1) < 0)
            goto fail;
        int r_ok = set_redactions(r, redactions);
        redactions = NULL;
        if (r_ok < 0)
            goto fail;
    }
    Py_XDECREF(redactions);
    int result = SET(r, data, masked);
    Py_DECREF(masked);
    return result;
fail:
    Py_XDECREF(redactions);
    Py_DECREF(masked);
    return -1;
}

/* Held records whose bytes are all decided, in order, appended to `out`. */
static int release(Connection *self, PyObject *out) {
    Item *front;
    while ((front = fifo_front(&self->queue)) != NULL) {
        Direction *st = &self->dirs[front->aux];
        long long n;
        if (GET_LL(front->obj, captured_len, &n) < 0)
            return -1;
        if (n < 0 || n > PY_SSIZE_T_MAX) {
            PyErr_SetString(PyExc_ValueError, "a record's captured_len is out of range");
            return -1;
        }
        PyObject *masked = take(st, (Py_ssize_t)n);
        if (masked == NULL)
            return PyErr_Occurred() ? -1 : 0;
        Item item = fifo_pop(&self->queue);
        int r = finish(self, item.obj, st, masked);
        if (r == 0)
            r = PyList_Append(out, item.obj);
        Py_DECREF(item.obj);
        if (r < 0)
            return -1;
    }
    return 0;
}

/* Fail closed: a record whose bytes were never decided leaves fully masked. */
static int force_release(Connection *self, PyObject *out) {
    while (self->queue.len) {
        Item item = fifo_pop(&self->queue);
        PyObject *r = item.obj, *redactions = NULL, *zeros = NULL;
        long long n;
        int ok = GET_LL(r, captured_len, &n) == 0 && n >= 0 && n <= PY_SSIZE_T_MAX;
        if (ok && (zeros = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)n)) != NULL)
            memset(PyBytes_AS_STRING(zeros), 0, (size_t)n);
        ok = zeros != NULL && SET(r, data, zeros) == 0 &&
             (redactions = PySet_New(NULL)) != NULL && PySet_Add(redactions, s_undecided) == 0;
        if (ok) {
            ok = set_redactions(r, redactions) == 0;
            redactions = NULL;
        }
        ok = ok && SET(r, protocol, self->protocol) == 0 &&
             count(self, &c_redacted_records, 1) == 0 && PyList_Append(out, r) == 0;
        Py_XDECREF(redactions);
        Py_XDECREF(zeros);
        Py_DECREF(r);
        if (!ok) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_ValueError, "a record's captured_len is out of range");
            return -1;
        }
    }
    return 0;
}

/* When an exchange happened (the ts of its record): its response's end, or start,
 * else its request's end, or start, else (no message has a time) the ts of
 * `fallback`, the connection's latest record.  A new reference. */
static SlotCache x_request = SLOT_CACHE("request"), x_response = SLOT_CACHE("response"),
                 x_redactions = SLOT_CACHE("redactions"), m_end_ts_ns = SLOT_CACHE("end_ts_ns"),
                 m_ts_ns = SLOT_CACHE("ts_ns");

static PyObject *exchange_ts(PyObject *ex, PyObject *fallback) {
    SlotCache *sides[2] = {&x_response, &x_request};
    for (int k = 0; k < 2; k++) {
        PyObject *msg = slot_get(sides[k], ex);
        if (msg == NULL)
            return NULL;
        if (msg == Py_None) {
            Py_DECREF(msg);
            continue;
        }
        PyObject *ts = slot_get(&m_end_ts_ns, msg);
        int set = ts == NULL ? -1 : PyObject_IsTrue(ts);
        if (set == 0) {
            Py_SETREF(ts, slot_get(&m_ts_ns, msg));
            set = ts == NULL ? -1 : PyObject_IsTrue(ts);
        }
        Py_DECREF(msg);
        if (set < 0) {
            Py_XDECREF(ts);
            return NULL;
        }
        if (set)
            return ts;
        Py_DECREF(ts);
    }
    return GET(fallback, ts_ns);
}

/* The next of `exchanges`: a list (what parsers return) by index, its length read each
 * time as redaction may run Python, without the iterator (~130 CPU instructions);
 * anything else through `it`.  A new reference, or NULL: no more (or an error). */
static PyObject *next_exchange(PyObject *exchanges, PyObject *it, Py_ssize_t *next) {
    if (it != NULL)
        return PyIter_Next(it);
    if (*next >= PyList_GET_SIZE(exchanges))
        return NULL;
    return Py_NewRef(PyList_GET_ITEM(exchanges, (*next)++));
}

/* The exchange records of the parser's `exchanges`, appended to `out`: each
 * exchange redacted (when there are rules) and counted, its record given the
 * connection's identity from its latest record (Record.for_exchange). */
static int exchange_records(Connection *self, PyObject *exchanges, PyObject *out) {
    Py_ssize_t next = 0;
    PyObject *it = PyList_CheckExact(exchanges) ? NULL : PyObject_GetIter(exchanges), *ex = NULL;
    if (it == NULL && !PyList_CheckExact(exchanges))
        return -1;
    /* Exchanges only come from a parser, which exists once a data record came; the
     * reference held: redaction runs Python (regex rules), which could set `last`. */
    PyObject *last = Py_NewRef(self->last);
    int result = -1;
    while ((ex = next_exchange(exchanges, it, &next)) != NULL) {
        if (last == Py_None) {
            PyErr_SetString(PyExc_AssertionError, "an exchange before any data record");
            goto done;
        }
        if (self->redacting) {
            PyObject *args[2] = {ex, self->rules};
            PyObject *none = PyObject_Vectorcall(redact_exchange, args, 2, NULL);
            if (none == NULL)
                goto done;
            Py_DECREF(none);
            PyObject *redactions = slot_get(&x_redactions, ex);
            int redacted = redactions == NULL ? -1 : PyObject_IsTrue(redactions);
            Py_XDECREF(redactions);
            if (redacted < 0 || (redacted && count(self, &c_redacted_exchanges, 1) < 0))
                goto done;
        }
        if (count(self, &c_exchanges, 1) < 0)
            goto done;
        PyObject *ts = exchange_ts(ex, last);
        if (ts == NULL)
            goto done;
        PyObject *args[3] = {last, ts, ex};
        PyObject *record = PyObject_Vectorcall(for_exchange, args, 3, NULL);
        Py_DECREF(ts);
        int appended = record == NULL ? -1 : PyList_Append(out, record);
        Py_XDECREF(record);
        if (appended < 0)
            goto done;
        Py_CLEAR(ex);
    }
    result = PyErr_Occurred() ? -1 : 0;
done:
    Py_XDECREF(ex);
    Py_DECREF(last);
    Py_XDECREF(it);
    return result;
}

/* The records it releases now, then the exchange records of what the parser
 * finished: appended to `out`. */
static int process(Connection *self, PyObject *r, PyObject *out) {
    PyObject *direction = NULL, *data = NULL, *fed = NULL, *ts = NULL, *exchanges = NULL;
    PyObject *pair = NULL, *masked = NULL, *hits = NULL, *side;
    /* held while they run: a Python parser or masker could replace them meanwhile */
    PyObject *parser = NULL, *masker = NULL;
    int result = -1;
    long long offset, length, captured;
    if ((direction = GET(r, direction)) == NULL)
        goto done;
    int d = direction_index(direction);
    if (d < 0 || side_of(self, direction, &side) < 0)
        goto done;
    Direction *st = &self->dirs[d];
    if (side != NULL && self->parser != Py_None)
        parser = Py_NewRef(self->parser);
    if (st->masker != NULL)
        masker = Py_NewRef(st->masker);
    if (GET_LL(r, offset, &offset) < 0 || GET_LL(r, len, &length) < 0 ||
        GET_LL(r, captured_len, &captured) < 0 || (ts = GET(r, ts_ns)) == NULL ||
        (data = GET(r, data)) == NULL)
        goto done;
    fed = Py_NewRef(data);
    if (st->has_next && offset != st->next_offset) {
        if (offset > st->next_offset) {
            if (gap(self, st, side, offset - st->next_offset, ts, &exchanges) < 0)
                goto done;
        } else {
            /* Bytes we already had (a re-read cannot happen at this layer; a reused
             * conn id could): parse only what is new. */
            Py_ssize_t n = PyObject_Size(data);
            if (n < 0)
                goto done;
            long long skip = st->next_offset - offset;
            Py_SETREF(fed, PySequence_GetSlice(data, skip < n ? (Py_ssize_t)skip : n,
                                               PY_SSIZE_T_MAX));
            if (fed == NULL)
                goto done;
        }
    }
    st->next_offset = offset + length;
    st->has_next = 1;
    if (parser != NULL && Py_IS_TYPE(parser, http1->type)) {
        PyObject *found;
        if (http1->failed(parser) == NULL &&
            (http1->feed(parser, side == s_request, fed, ts, &found) < 0 ||
             (found != NULL && adopt(&exchanges, found) < 0)))
            goto done;
    } else if (parser != NULL) {
        int running = parser_running(parser);
        if (running < 0)
            goto done;
        if (running) {
            PyObject *args[3] = {side, fed, ts};
            PyObject *found = call_method(parser, s_feed, args, 3);
            int r_ok = found != NULL && collect(&exchanges, found) == 0;
            Py_XDECREF(found);
            if (!r_ok)
                goto done;
        }
    }
    if (masker != NULL && masker_in_c(masker)) {
        if (stream_masker->feed(masker, data, &masked, &hits) < 0)
            goto done;
        if (masker_blocks(self, st) < 0)
            goto done;
    } else if (masker != NULL) {
        pair = PyObject_CallMethodOneArg(masker, s_feed, data);
        if (pair == NULL)
            goto done;
        if (!PyTuple_Check(pair) || PyTuple_GET_SIZE(pair) != 2) {
            PyErr_SetString(PyExc_TypeError, "a masker's feed() must return (bytes, set)");
            goto done;
        }
        masked = PyBytes_FromObject(PyTuple_GET_ITEM(pair, 0));
        if (masked == NULL)
            goto done;
        /* a set of our own: the record path adds to it and hands it on */
        Py_ssize_t nhits = PyObject_Size(PyTuple_GET_ITEM(pair, 1));
        if (nhits < 0 || (nhits && (hits = PySet_New(PyTuple_GET_ITEM(pair, 1))) == NULL))
            goto done;
        if (masker_blocks(self, st) < 0)
            goto done;
    } else if ((masked = PyBytes_FromObject(data)) == NULL) {
        goto done;
    }
    if (length > captured && gap(self, st, side, length - captured, ts, &exchanges) < 0)
        goto done;
    if (!self->queue.len && !st->decided_len && PyBytes_GET_SIZE(masked) == captured) {
        /* Decided at once, nothing held before it (always so for HTTP/1, whose masker
         * holds nothing back): the record goes out now, past the queue. */
        Py_XSETREF(st->hits, hits);
        hits = NULL;
        PyObject *m = masked;
        masked = NULL;
        if (finish(self, r, st, m) < 0 || PyList_Append(out, r) < 0)
            goto done;
    } else {
        if (add(st, masked, hits) < 0 || fifo_push(&self->queue, r, d) < 0 ||
            release(self, out) < 0)
            goto done;
    }
    if (parser != NULL && count_parse_failure(self) < 0)
        goto done;
    if (exchanges != NULL && exchange_records(self, exchanges, out) < 0)
        goto done;
    result = 0;
done:
    Py_XDECREF(direction);
    Py_XDECREF(data);
    Py_XDECREF(fed);
    Py_XDECREF(ts);
    Py_XDECREF(exchanges);
    Py_XDECREF(pair);
    Py_XDECREF(masked);
    Py_XDECREF(hits);
    Py_XDECREF(parser);
    Py_XDECREF(masker);
    return result;
}

PyDoc_STRVAR(process_doc,
"process(record) -> list[Record]\n"
"\n"
"One data record of a connection whose protocol is decided: the records released\n"
"now (it, or ones held before it, or none), then the exchange records of what\n"
"the parser finished.");

/* 0, or -1 with an error if the cycle collector cleared the connection. */
static int intact(Connection *self) {
    if (self->protocol && self->parser && self->request_direction && self->last &&
        self->counters && self->rules)
        return 0;
    PyErr_SetString(PyExc_RuntimeError, "the connection was cleared");
    return -1;
}

static PyObject *Connection_process(Connection *self, PyObject *record) {
    if (intact(self) < 0)
        return NULL;
    PyObject *out = PyList_New(0);
    if (out != NULL && process(self, record, out) < 0)
        Py_CLEAR(out);
    return out;
}

/* Whether a connection of unknown protocol turns out to carry HTTP/2 frames from
 * this record on (its start was not seen): then _start_midstream_http2. */
static int pick_up_http2(Connection *self, PyObject *record) {
    PyObject *data = GET(record, data);
    if (data == NULL)
        return -1;
    PyObject *found = PyObject_CallOneArg(starts_frame_run, data);
    Py_DECREF(data);
    if (found == NULL)
        return -1;
    int truth = PyObject_IsTrue(found);
    Py_DECREF(found);
    if (truth <= 0)
        return truth;
    PyObject *done = PyObject_CallMethodNoArgs((PyObject *)self, s__start_midstream_http2);
    Py_XDECREF(done);
    return done == NULL ? -1 : 0;
}

/* on_data(), its records appended to `out` (the stage's list: no list of its own). */
static int on_data_into(Connection *self, PyObject *record, PyObject *out) {
    Py_XSETREF(self->last, Py_NewRef(record));
    if (self->detecting) {
        PyObject *found = PyObject_CallMethodOneArg((PyObject *)self, s__detect_data, record);
        int r = found == NULL ? -1 : extend(out, found);
        Py_XDECREF(found);
        return r;
    }
    if (self->redacting && PyUnicode_Check(self->protocol) &&
        PyUnicode_GET_LENGTH(self->protocol) == 0 && pick_up_http2(self, record) < 0)
        return -1;
    return intact(self) < 0 ? -1 : process(self, record, out);
}

static PyObject *on_data(Connection *self, PyObject *record) {
    PyObject *out = PyList_New(0);
    if (out != NULL && on_data_into(self, record, out) < 0)
        Py_CLEAR(out);
    return out;
}

PyDoc_STRVAR(on_data_doc,
"on_data(record) -> list[Record]\n"
"\n"
"One data record: the records to emit now, in order (see process()).  While\n"
"`detecting`, the record goes to _detect_data(record) instead.");

PyDoc_STRVAR(drain_doc,
"drain() -> list[Record]\n"
"\n"
"The connection ends: whatever the maskers hold is decided (an incomplete header\n"
"block wiped), the held records go out, any still undecided fully masked.");

static PyObject *Connection_drain(Connection *self, PyObject *unused) {
    (void)unused;
    if (intact(self) < 0)
        return NULL;
    PyObject *out = PyList_New(0);
    if (out == NULL)
        return NULL;
    for (int d = 0; d < 2; d++) {
        Direction *st = &self->dirs[d];
        if (st->masker == NULL)
            continue;
        PyObject *pair = PyObject_CallMethodNoArgs(st->masker, s_flush), *data = NULL;
        int ok = pair != NULL && PyTuple_Check(pair) && PyTuple_GET_SIZE(pair) == 2;
        if (pair != NULL && !ok)
            PyErr_SetString(PyExc_TypeError, "a masker's flush() must return (bytes, set)");
        ok = ok && (data = PyBytes_FromObject(PyTuple_GET_ITEM(pair, 0))) != NULL &&
             add(st, data, PyTuple_GET_ITEM(pair, 1)) == 0;
        Py_XDECREF(data);
        Py_XDECREF(pair);
        if (!ok)
            goto fail;
    }
    if (count_unknown_blocks(self) < 0 || release(self, out) < 0)
        goto fail;
    /* The queue is empty after flush(); never keep a record back all the same. */
    if (force_release(self, out) < 0 || count_parse_failure(self) < 0)
        goto fail;
    return out;
fail:
    Py_DECREF(out);
    return NULL;
}

PyDoc_STRVAR(exchange_records_doc,
"_exchange_records(exchanges) -> list[Record]\n"
"\n"
"The exchange records of what the parser finished, in order: each exchange\n"
"redacted by the rules (when enabled), counted (exchanges, redacted_exchanges)\n"
"and given the connection's identity from `last`.  The record path calls this\n"
"itself; ConnectionL7.on_close for what the parser's close() finishes.");

static PyObject *Connection_exchange_records(Connection *self, PyObject *exchanges) {
    if (intact(self) < 0)
        return NULL;
    PyObject *out = PyList_New(0);
    if (out != NULL && exchange_records(self, exchanges, out) < 0)
        Py_CLEAR(out);
    return out;
}

PyDoc_STRVAR(side_doc,
"side(direction) -> 'request', 'response', or None while the request direction\n"
"is not known: the stream a direction carries.");

static PyObject *Connection_side(Connection *self, PyObject *direction) {
    PyObject *side;
    if (side_of(self, direction, &side) < 0)
        return NULL;
    return Py_NewRef(side ? side : Py_None);
}

static int masker_index(PyObject *direction) {
    if (!PyUnicode_Check(direction) ||
        !(is_str(direction, s_egress) || is_str(direction, s_ingress))) {
        PyErr_SetString(PyExc_ValueError, "direction: 'egress' or 'ingress'");
        return -1;
    }
    return is_str(direction, s_ingress);
}

PyDoc_STRVAR(masker_doc, "masker(direction) -> the direction's masker, or None.");

static PyObject *Connection_masker(Connection *self, PyObject *direction) {
    int d = masker_index(direction);
    if (d < 0)
        return NULL;
    return Py_NewRef(self->dirs[d].masker ? self->dirs[d].masker : Py_None);
}

PyDoc_STRVAR(set_masker_doc,
"set_masker(direction, masker): the direction's bytes are masked by `masker` from\n"
"the next record on (its blocks masked unread are counted from zero).");

static PyObject *Connection_set_masker(Connection *self, PyObject *const *args,
                                       Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "set_masker(direction, masker)");
        return NULL;
    }
    int d = masker_index(args[0]);
    if (d < 0)
        return NULL;
    Py_XSETREF(self->dirs[d].masker, args[1] == Py_None ? NULL : Py_NewRef(args[1]));
    self->dirs[d].unknown_counted = 0;
    Py_RETURN_NONE;
}

static int Connection_traverse(Connection *self, visitproc visit, void *arg) {
    Py_VISIT(self->protocol);
    Py_VISIT(self->parser);
    Py_VISIT(self->request_direction);
    Py_VISIT(self->last);
    Py_VISIT(self->counters);
    Py_VISIT(self->rules);
    Py_VISIT(self->regexes);
    for (int d = 0; d < 2; d++) {
        Py_VISIT(self->dirs[d].masker);
        Py_VISIT(self->dirs[d].hits);
        if (fifo_traverse(&self->dirs[d].decided, visit, arg) < 0)
            return -1;
    }
    return fifo_traverse(&self->queue, visit, arg);
}

static int Connection_clear(Connection *self) {
    Py_CLEAR(self->protocol);
    Py_CLEAR(self->parser);
    Py_CLEAR(self->request_direction);
    Py_CLEAR(self->last);
    Py_CLEAR(self->counters);
    Py_CLEAR(self->rules);
    Py_CLEAR(self->regexes);
    for (int d = 0; d < 2; d++) {
        Py_CLEAR(self->dirs[d].masker);
        Py_CLEAR(self->dirs[d].hits);
        fifo_clear(&self->dirs[d].decided);
        self->dirs[d].decided_len = 0;
    }
    fifo_clear(&self->queue);
    return 0;
}

static void Connection_dealloc(Connection *self) {
    PyObject_GC_UnTrack(self);
    Py_TRASHCAN_BEGIN(self, Connection_dealloc)
    Connection_clear(self);
    for (int d = 0; d < 2; d++)
        fifo_free(&self->dirs[d].decided);
    fifo_free(&self->queue);
    Py_TYPE(self)->tp_free((PyObject *)self);
    Py_TRASHCAN_END
}

static PyObject *Connection_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    (void)args;
    (void)kwds;
    Connection *self = (Connection *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->protocol = PyUnicode_FromStringAndSize(NULL, 0);
    self->parser = Py_NewRef(Py_None);
    self->request_direction = Py_NewRef(Py_None);
    self->last = Py_NewRef(Py_None);
    self->counters = Py_NewRef(Py_None);
    self->rules = Py_NewRef(Py_None);
    self->regexes = PyTuple_New(0);
    self->detecting = 1;
    if (self->protocol == NULL || self->regexes == NULL) {
        Py_DECREF(self);
        return NULL;
    }
    return (PyObject *)self;
}

static int Connection_init(Connection *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"counters", "rules", NULL};
    PyObject *counters, *rules;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO", kwlist, &counters, &rules))
        return -1;
    /* The rules are frozen: what they say is read once. */
    PyObject *regexes = PyObject_GetAttr(rules, s_regexes);
    if (regexes == NULL)
        return -1;
    if (!PyTuple_Check(regexes)) {
        Py_DECREF(regexes);
        PyErr_SetString(PyExc_TypeError, "rules.regexes must be a tuple");
        return -1;
    }
    PyObject *enabled = PyObject_GetAttr(rules, s_enabled);
    int redacting = enabled == NULL ? -1 : PyObject_IsTrue(enabled);
    Py_XDECREF(enabled);
    if (redacting < 0) {
        Py_DECREF(regexes);
        return -1;
    }
    Py_XSETREF(self->counters, Py_NewRef(counters));
    Py_XSETREF(self->rules, Py_NewRef(rules));
    Py_XSETREF(self->regexes, regexes);
    self->has_regexes = PyTuple_GET_SIZE(regexes) > 0;
    self->redacting = redacting;
    return 0;
}

static PyObject *Connection_held(Connection *self, void *closure) {
    (void)closure;
    return PyLong_FromSsize_t(self->queue.len);
}

static PyObject *Connection_decided_bytes(Connection *self, void *closure) {
    (void)closure;
    return Py_BuildValue("(nn)", self->dirs[0].decided_len, self->dirs[1].decided_len);
}

/* protocol, parser, request_direction and last: read and set from Python, never
 * deleted (the record path relies on each being an object). */
#define ATTRIBUTE(name)                                                                   \
    static PyObject *get_##name(Connection *self, void *closure) {                        \
        (void)closure;                                                                    \
        return Py_NewRef(self->name ? self->name : Py_None); /* NULL: cleared */          \
    }                                                                                     \
    static int set_##name(Connection *self, PyObject *value, void *closure) {             \
        (void)closure;                                                                    \
        if (value == NULL) {                                                              \
            PyErr_SetString(PyExc_AttributeError, "cannot delete " #name);                \
            return -1;                                                                    \
        }                                                                                 \
        Py_XSETREF(self->name, Py_NewRef(value));                                         \
        return 0;                                                                         \
    }
ATTRIBUTE(protocol)
ATTRIBUTE(parser)
ATTRIBUTE(request_direction)
ATTRIBUTE(last)

static PyGetSetDef Connection_getset[] = {
    {"protocol", (getter)get_protocol, (setter)set_protocol,
     "'' until decided, then 'http1' or 'http2' (or '' for any other)", NULL},
    {"parser", (getter)get_parser, (setter)set_parser, "the parser, or None", NULL},
    {"request_direction", (getter)get_request_direction, (setter)set_request_direction,
     "'egress' or 'ingress' once known, else None", NULL},
    {"last", (getter)get_last, (setter)set_last,
     "the latest data record (the identity of exchange records), or None", NULL},
    {"held", (getter)Connection_held, NULL, "records held until their bytes are decided",
     NULL},
    {"decided_bytes", (getter)Connection_decided_bytes, NULL,
     "(egress, ingress): masked bytes decided and not yet in a record", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMemberDef Connection_members[] = {
    {"counters", T_OBJECT_EX, offsetof(Connection, counters), READONLY, "the stage's L7Counters"},
    {"detecting", T_BOOL, offsetof(Connection, detecting), 0,
     "each data record goes to _detect_data first"},
    {NULL, 0, 0, 0, NULL},
};

static PyMethodDef Connection_methods[] = {
    {"on_data", (PyCFunction)on_data, METH_O, on_data_doc},
    {"process", (PyCFunction)Connection_process, METH_O, process_doc},
    {"drain", (PyCFunction)Connection_drain, METH_NOARGS, drain_doc},
    {"_exchange_records", (PyCFunction)Connection_exchange_records, METH_O,
     exchange_records_doc},
    {"side", (PyCFunction)Connection_side, METH_O, side_doc},
    {"masker", (PyCFunction)Connection_masker, METH_O, masker_doc},
    {"set_masker", (PyCFunction)(void (*)(void))Connection_set_masker, METH_FASTCALL,
     set_masker_doc},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject ConnectionType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "agent.l7._record_path.Connection",
    .tp_doc = PyDoc_STR("Connection(counters, rules): one connection's record path "
                        "(agent/l7/connection.py builds ConnectionL7 on it)."),
    .tp_basicsize = sizeof(Connection),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_new = Connection_new,
    .tp_init = (initproc)Connection_init,
    .tp_dealloc = (destructor)Connection_dealloc,
    .tp_traverse = (traverseproc)Connection_traverse,
    .tp_clear = (inquiry)Connection_clear,
    .tp_methods = Connection_methods,
    .tp_members = Connection_members,
    .tp_getset = Connection_getset,
};

/* -- Dispatch --------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    PyObject *conns; /* OrderedDict: conn_id -> connection, least recently used first */
    Py_ssize_t max_connections;
} Dispatch;

/* One record's output, appended to `out`: a data record of a connection goes to its
 * on_data() (a new connection from _new_conn(conn_id), then evict_overflow() past
 * max_connections); any other record to _other(record). */
static int dispatch(Dispatch *self, PyObject *record, PyObject *out) {
    PyObject *type = GET(record, type), *conn_id = NULL, *conn = NULL;
    PyObject *found = NULL;
    int err = -1;
    if (type == NULL || (conn_id = GET(record, conn_id)) == NULL)
        goto done;
    int data = is_str(type, s_data);
    int has_id = data ? PyObject_IsTrue(conn_id) : 0;
    if (has_id < 0)
        goto done;
    if (!has_id) {
        found = PyObject_CallMethodOneArg((PyObject *)self, s__other, record);
        err = found == NULL ? -1 : extend(out, found);
        goto done;
    }
    conn = PyDict_GetItemWithError(self->conns, conn_id);
    if (conn != NULL) {
        Py_INCREF(conn);
        PyObject *args[2] = {self->conns, conn_id}; /* the least recently used go first */
        PyObject *moved = PyObject_VectorcallMethod(s_move_to_end, args, 2, NULL);
        if (moved == NULL)
            goto done;
        Py_DECREF(moved);
    } else if (PyErr_Occurred() ||
               (conn = PyObject_CallMethodOneArg((PyObject *)self, s__new_conn, conn_id)) ==
                   NULL) {
        goto done;
    }
    if (PyObject_TypeCheck(conn, &ConnectionType)) {
        if (on_data_into((Connection *)conn, record, out) < 0)
            goto done;
    } else if ((found = PyObject_CallMethodOneArg(conn, s_on_data, record)) == NULL ||
               extend(out, found) < 0) {
        goto done;
    }
    Py_ssize_t tracked = PyObject_Size(self->conns);
    if (tracked < 0)
        goto done;
    if (tracked > self->max_connections) {
        PyObject *evicted = PyObject_CallMethodNoArgs((PyObject *)self, s_evict_overflow);
        if (evicted == NULL || extend(out, evicted) < 0) {
            Py_XDECREF(evicted);
            goto done;
        }
        Py_DECREF(evicted);
    }
    err = 0;
done:
    Py_XDECREF(type);
    Py_XDECREF(conn_id);
    Py_XDECREF(conn);
    Py_XDECREF(found);
    return err;
}

PyDoc_STRVAR(dispatch_process_doc,
"process(record) -> list[Record]\n"
"\n"
"The records to emit now, in order (held ones may come out later).  A data record\n"
"of a connection goes to its on_data() (a new connection from _new_conn(conn_id),\n"
"then evict_overflow() past max_connections); any other record to _other(record).");

static PyObject *Dispatch_process(Dispatch *self, PyObject *record) {
    PyObject *out = PyList_New(0);
    if (out != NULL && dispatch(self, record, out) < 0)
        Py_CLEAR(out);
    return out;
}

PyDoc_STRVAR(dispatch_process_many_doc,
"process_many(records) -> list[Record]\n"
"\n"
"process() of each of `records` (a list), their outputs in one list: a batch from\n"
"the ring is one call.");

static PyObject *Dispatch_process_many(Dispatch *self, PyObject *records) {
    if (!PyList_Check(records)) {
        PyErr_SetString(PyExc_TypeError, "process_many() takes a list of records");
        return NULL;
    }
    PyObject *out = PyList_New(0);
    /* Index by index: a connection's code may run Python, which could change the list. */
    for (Py_ssize_t k = 0; out != NULL && k < PyList_GET_SIZE(records); k++) {
        PyObject *record = Py_NewRef(PyList_GET_ITEM(records, k));
        if (dispatch(self, record, out) < 0)
            Py_CLEAR(out);
        Py_DECREF(record);
    }
    return out;
}

static int Dispatch_init(Dispatch *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"conns", "max_connections", NULL};
    PyObject *conns;
    Py_ssize_t max_connections;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!n", kwlist, &PyDict_Type, &conns,
                                     &max_connections))
        return -1;
    Py_XSETREF(self->conns, Py_NewRef(conns));
    self->max_connections = max_connections;
    return 0;
}

static int Dispatch_traverse(Dispatch *self, visitproc visit, void *arg) {
    Py_VISIT(self->conns);
    return 0;
}

static int Dispatch_clear(Dispatch *self) {
    Py_CLEAR(self->conns);
    return 0;
}

static void Dispatch_dealloc(Dispatch *self) {
    PyObject_GC_UnTrack(self);
    Dispatch_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMemberDef Dispatch_members[] = {
    {"_conns", T_OBJECT, offsetof(Dispatch, conns), READONLY,
     "conn_id -> connection, the least recently used first (an OrderedDict)"},
    {NULL, 0, 0, 0, NULL},
};

static PyMethodDef Dispatch_methods[] = {
    {"process", (PyCFunction)Dispatch_process, METH_O, dispatch_process_doc},
    {"process_many", (PyCFunction)Dispatch_process_many, METH_O, dispatch_process_many_doc},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject DispatchType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "agent.l7._record_path.Dispatch",
    .tp_doc = PyDoc_STR("Dispatch(conns, max_connections): the L7 stage's data records to "
                        "their connections (agent/l7/stage.py builds L7Stage on it)."),
    .tp_basicsize = sizeof(Dispatch),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Dispatch_init,
    .tp_dealloc = (destructor)Dispatch_dealloc,
    .tp_traverse = (traverseproc)Dispatch_traverse,
    .tp_clear = (inquiry)Dispatch_clear,
    .tp_members = Dispatch_members,
    .tp_methods = Dispatch_methods,
};

/* -- the module ------------------------------------------------------------------- */

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "agent.l7._record_path",
    .m_doc = "The L7 stage's record path (agent/l7/connection.py, agent/l7/stage.py).",
    .m_size = -1,
};

static PyObject *import_attr(const char *module_name, const char *name) {
    PyObject *m = PyImport_ImportModule(module_name);
    if (m == NULL)
        return NULL;
    PyObject *attr = PyObject_GetAttrString(m, name);
    Py_DECREF(m);
    return attr;
}

/* A module's capsule (PyCapsule_Import imports only the top package itself). */
static void *import_api(const char *module_name, const char *capsule) {
    PyObject *m = PyImport_ImportModule(module_name);
    if (m == NULL)
        return NULL;
    Py_DECREF(m);
    return PyCapsule_Import(capsule, 0);
}

#define AS_INTERN(name)                                                                   \
    if ((s_##name = PyUnicode_InternFromString(#name)) == NULL)                           \
        return NULL;

PyMODINIT_FUNC PyInit__record_path(void) {
    NAMES(AS_INTERN)
    RecordBase = (PyTypeObject *)import_attr(RECORD_MODULE, "Record");
    if (RecordBase != NULL && !PyType_Check(RecordBase)) {
        PyErr_SetString(PyExc_ImportError, "_record_path: " RECORD_MODULE ".Record not a class");
        Py_CLEAR(RecordBase);
    }
    if (RecordBase == NULL ||
        (mask_regexes = import_attr("agent.redact.payload", "mask_regexes")) == NULL ||
        (starts_frame_run = import_attr("agent.l7.http2_frames", "starts_frame_run")) == NULL ||
        (redact_exchange = import_attr("agent.redact.exchange", "redact_exchange")) == NULL)
        return NULL;
    /* The Python subclass's (for_exchange makes an instance of the class it is called on). */
    if ((RecordClass = import_attr("agent.records.record", "Record")) == NULL ||
        (for_exchange = PyObject_GetAttrString(RecordClass, "for_exchange")) == NULL)
        return NULL;
    if (!PyType_Check(RecordClass) || !PyType_IsSubtype((PyTypeObject *)RecordClass, RecordBase)) {
        PyErr_SetString(PyExc_ImportError, "_record_path: Record is not built on " RECORD_MODULE);
        return NULL;
    }
    if ((http1 = import_api("agent.l7._http1", HTTP1_API_CAPSULE)) == NULL ||
        (stream_masker = import_api("agent.redact._stream_masker", STREAM_MASKER_API_CAPSULE)) ==
            NULL)
        return NULL;
    /* borrowed: a static type's dict is never changed */
    stream_masker_feed = _PyType_Lookup(stream_masker->type, s_feed);
    if (stream_masker_feed == NULL) {
        PyErr_SetString(PyExc_ImportError, "_record_path: StreamMasker has no feed");
        return NULL;
    }
    if (PyType_Ready(&ConnectionType) < 0 || PyType_Ready(&DispatchType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "Connection", (PyObject *)&ConnectionType) < 0 ||
        PyModule_AddObjectRef(m, "Dispatch", (PyObject *)&DispatchType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
