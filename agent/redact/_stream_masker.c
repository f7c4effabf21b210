/* The HTTP/1 stream masker's byte work, in C: agent/redact/http1_masker.py holds
 * the rules it follows (its docstring) and the Python class built on this type.
 *
 * Why C: every data record of every connection that is not HTTP/2 passes here,
 * and in Python the per-line state machine and the query-parameter search cost
 * 4-25 us per record (a 4 KiB binary chunk was the worst: the search for
 * "name=" lower-cased and scanned the chunk nine times).  Here it is one pass
 * with memchr over the lines and over the "=" signs.
 *
 * Input is untrusted (any process's plaintext): every index is checked against
 * the chunk's length, nothing is written outside the result, and no state grows
 * with the input (the name being read and the query tail are bounded by the
 * longest configured name).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>
#ifdef __SSE2__
#include <emmintrin.h>
#endif

#include "_stream_masker_api.h"

enum state { SCAN, NAME, NAME_WS, VALUE_WS, VALUE, AFTER_VALUE, SKIP };

typedef struct {
    Py_ssize_t count;
    Py_ssize_t longest;
    unsigned char *text; /* every name, lower case, back to back */
    Py_ssize_t *start;   /* name k is text[start[k] .. start[k] + len[k]) */
    Py_ssize_t *len;
    /* The names by length (k ascending within one): those of length n are
     * by_len[len_start[n] .. len_start[n + 1]), so a line's first word is compared
     * only with names as long as it (it was compared with every name). */
    Py_ssize_t *by_len;
    Py_ssize_t *len_start; /* longest + 2 entries */
    /* The first and the last byte of some name, either case: most lines (and most
     * "=" of a binary chunk) are turned away by one look-up. */
    unsigned char first[256], last[256];
} Names;

typedef struct {
    PyObject_HEAD
    Names headers;
    Names query;
    PyObject *rules; /* tuple of str: header rules, the mid-stream rule, query rules */
    char *hit;       /* per rule, during one feed() */
    Py_ssize_t *hits; /* ... the rules hit, in the order they were (n_hits of them) */
    Py_ssize_t n_hits;
    /* header lines */
    int state;
    Py_ssize_t rule;           /* header rule of the value being masked */
    unsigned char *partial;    /* NAME: the line's first bytes, lower case */
    Py_ssize_t partial_len;
    /* query parameters */
    unsigned char *tail;       /* the stream's last `keep` bytes */
    Py_ssize_t tail_len;
    Py_ssize_t keep;
    Py_ssize_t query_rule;     /* query name whose value the last chunk ended in, -1 if none */
    unsigned char *scratch;    /* tail + chunk, when a tail is kept */
    Py_ssize_t scratch_size;
} StreamMasker;

/* One chunk being masked: the bytes read (never written) and the result, a copy
 * made at the first byte that changes. */
typedef struct {
    const unsigned char *src;
    Py_ssize_t n;
    PyObject *copy;
    unsigned char *out;
} Chunk;

static unsigned char lower_table[256];
static unsigned char name_end[256]; /* ':' SP HT CR LF: where a line's first word ends */
static unsigned char name_char[256]; /* what a configured name may hold */
static unsigned char query_value_end[256]; /* & # ; whitespace " ' < > */

static inline unsigned char lower(unsigned char c) { return lower_table[c]; }
static inline unsigned char upper(unsigned char c) {
    return c >= 'a' && c <= 'z' ? (unsigned char)(c - 32) : c;
}
static inline int is_fold(unsigned char c) { return c == ' ' || c == '\t'; }

static int chunk_writable(Chunk *c) {
    if (c->out != NULL)
        return 0;
    /* Allocated empty, then filled: given the bytes, CPython would hand back its
     * shared one-byte object for a chunk of length 1, which must not be written. */
    c->copy = PyBytes_FromStringAndSize(NULL, c->n);
    if (c->copy == NULL)
        return -1;
    c->out = (unsigned char *)PyBytes_AS_STRING(c->copy);
    memcpy(c->out, c->src, c->n);
    return 0;
}

/* Rule k masked bytes of this chunk.  The rules hit are listed too: a chunk's set of
 * rules is made from the few hit, not from a pass over every rule (~200 CPU
 * instructions with the defaults). */
static void note_hit(StreamMasker *self, Py_ssize_t k) {
    if (!self->hit[k]) {
        self->hit[k] = 1;
        self->hits[self->n_hits++] = k;
    }
}

/* ---- names --------------------------------------------------------------- */

static void names_free(Names *names) {
    PyMem_Free(names->text);
    PyMem_Free(names->start);
    PyMem_Free(names->len);
    PyMem_Free(names->by_len);
    PyMem_Free(names->len_start);
    memset(names, 0, sizeof(*names));
}

static int names_init(Names *names, PyObject *tuple, const char *what) {
    if (!PyTuple_Check(tuple)) {
        PyErr_Format(PyExc_TypeError, "%s: a tuple of bytes", what);
        return -1;
    }
    Py_ssize_t count = PyTuple_GET_SIZE(tuple), total = 0;
    for (Py_ssize_t k = 0; k < count; k++) {
        PyObject *name = PyTuple_GET_ITEM(tuple, k);
        if (!PyBytes_Check(name) || PyBytes_GET_SIZE(name) == 0) {
            PyErr_Format(PyExc_ValueError, "%s: non-empty bytes only", what);
            return -1;
        }
        total += PyBytes_GET_SIZE(name);
    }
    names->count = count;
    names->text = PyMem_Malloc(total + 1);
    names->start = PyMem_Malloc(sizeof(Py_ssize_t) * (count + 1));
    names->len = PyMem_Malloc(sizeof(Py_ssize_t) * (count + 1));
    if (!names->text || !names->start || !names->len) {
        PyErr_NoMemory();
        return -1;
    }
    Py_ssize_t at = 0;
    for (Py_ssize_t k = 0; k < count; k++) {
        PyObject *name = PyTuple_GET_ITEM(tuple, k);
        Py_ssize_t len = PyBytes_GET_SIZE(name);
        const unsigned char *s = (const unsigned char *)PyBytes_AS_STRING(name);
        for (Py_ssize_t j = 0; j < len; j++) {
            if (!name_char[s[j]]) {
                PyErr_Format(PyExc_ValueError, "%s: lower-case tokens only", what);
                return -1;
            }
        }
        memcpy(names->text + at, s, len);
        names->first[s[0]] = names->first[upper(s[0])] = 1;
        names->last[s[len - 1]] = names->last[upper(s[len - 1])] = 1;
        names->start[k] = at;
        names->len[k] = len;
        at += len;
        if (len > names->longest)
            names->longest = len;
    }
    names->by_len = PyMem_Malloc(sizeof(Py_ssize_t) * (count + 1));
    names->len_start = PyMem_Calloc(names->longest + 2, sizeof(Py_ssize_t));
    if (!names->by_len || !names->len_start) {
        PyErr_NoMemory();
        return -1;
    }
    /* A counting sort (stable): names per length, where each length starts, each name
     * put there (moving that start to the next length's), the starts moved back. */
    Py_ssize_t *starts = names->len_start, longest = names->longest;
    for (Py_ssize_t k = 0; k < count; k++)
        starts[names->len[k] + 1]++;
    for (Py_ssize_t n = 1; n <= longest + 1; n++)
        starts[n] += starts[n - 1];
    for (Py_ssize_t k = 0; k < count; k++)
        names->by_len[starts[names->len[k]]++] = k;
    for (Py_ssize_t n = longest + 1; n > 0; n--)
        starts[n] = starts[n - 1];
    starts[0] = 0;
    return 0;
}

/* The name that `s[0..len)` is, case-insensitively, or -1. */
static Py_ssize_t names_find(const Names *names, const unsigned char *s, Py_ssize_t len) {
    if (len > names->longest)
        return -1;
    for (Py_ssize_t i = names->len_start[len]; i < names->len_start[len + 1]; i++) {
        Py_ssize_t k = names->by_len[i];
        const unsigned char *name = names->text + names->start[k];
        Py_ssize_t j = 0;
        while (j < len && lower(s[j]) == name[j])
            j++;
        if (j == len)
            return k;
    }
    return -1;
}

/* Whether lower-case `s[0..len)` begins some name. */
static int names_prefix(const Names *names, const unsigned char *s, Py_ssize_t len) {
    if (len > names->longest)
        return 0;
    for (Py_ssize_t i = names->len_start[len]; i < names->count; i++) {
        Py_ssize_t k = names->by_len[i];
        if (memcmp(names->text + names->start[k], s, len) == 0)
            return 1;
    }
    return 0;
}

/* ---- header lines -------------------------------------------------------- */

static Py_ssize_t skip_ws(const unsigned char *p, Py_ssize_t i, Py_ssize_t n) {
    while (i < n && is_fold(p[i]))
        i++;
    return i;
}

/* Mask value bytes [i, end) (no LF in it): every byte but CR becomes "*".  A
 * value that was "*" and CR already changes nothing and is no hit. */
static int mask_value(StreamMasker *self, Chunk *c, Py_ssize_t i, Py_ssize_t end) {
    Py_ssize_t j = i;
    while (j < end && (c->src[j] == '*' || c->src[j] == '\r'))
        j++;
    if (j == end)
        return 0;
    if (chunk_writable(c) < 0)
        return -1;
    note_hit(self, self->rule);
    for (; j < end; j++)
        if (c->src[j] != '\r')
            c->out[j] = '*';
    return 0;
}

/* The first of p[i:limit] that ends a line's first word (name_end), else limit.  Every
 * line whose first byte may start a sensitive name comes here (Content-*, Connection,
 * Accept, Server, a body line of "x"s...): 16 bytes a step where the chunk has them
 * (~5 CPU instructions a byte by the table). */
static Py_ssize_t first_name_end(const unsigned char *p, Py_ssize_t i, Py_ssize_t limit) {
#ifdef __SSE2__
    const __m128i colon = _mm_set1_epi8(':'), sp = _mm_set1_epi8(' '),
                  ht = _mm_set1_epi8('\t'), cr = _mm_set1_epi8('\r'), lf = _mm_set1_epi8('\n');
    for (; limit - i >= 16; i += 16) { /* p[i .. i + 16) all before limit */
        __m128i v = _mm_loadu_si128((const __m128i *)(p + i));
        __m128i hit = _mm_or_si128(
            _mm_or_si128(_mm_cmpeq_epi8(v, colon), _mm_cmpeq_epi8(v, sp)),
            _mm_or_si128(_mm_or_si128(_mm_cmpeq_epi8(v, ht), _mm_cmpeq_epi8(v, cr)),
                         _mm_cmpeq_epi8(v, lf)));
        int bits = _mm_movemask_epi8(hit);
        if (bits)
            return i + __builtin_ctz((unsigned)bits);
    }
#endif
    while (i < limit && !name_end[p[i]])
        i++;
    return i;
}

/* A line starting at `i`, in state SCAN: is it a sensitive header?  Sets the
 * state to follow and returns where to go on. */
static Py_ssize_t scan_line(StreamMasker *self, const unsigned char *p, Py_ssize_t i,
                            Py_ssize_t n) {
    const Names *h = &self->headers;
    if (i == n)
        return n; /* SCAN at the start of the next chunk */
    if (!h->first[p[i]]) { /* no name starts so (in [i, j) below there is no LF either) */
        self->state = SKIP;
        return i;
    }
    /* The name runs to the first ":", SP, HT, CR or LF (none is in a token). */
    Py_ssize_t limit = i + h->longest + 1 < n ? i + h->longest + 1 : n;
    Py_ssize_t j = first_name_end(p, i, limit);
    if (j == n) { /* the chunk ends inside the line's first word */
        Py_ssize_t len = n - i;
        if (len <= h->longest) {
            unsigned char *part = self->partial;
            for (Py_ssize_t k = 0; k < len; k++)
                part[k] = lower(p[i + k]);
            if (names_prefix(h, part, len)) {
                self->state = NAME;
                self->partial_len = len;
                return n;
            }
        }
        self->state = SKIP;
        return n;
    }
    if (j == limit) { /* longer than any name */
        self->state = SKIP;
        return j;
    }
    Py_ssize_t k = names_find(h, p + i, j - i);
    if (k < 0) {
        self->state = SKIP;
        return j;
    }
    Py_ssize_t s = skip_ws(p, j, n);
    if (s == n) {
        self->rule = k;
        self->state = NAME_WS;
        return n;
    }
    if (p[s] != ':') {
        self->state = SKIP;
        return s;
    }
    Py_ssize_t v = skip_ws(p, s + 1, n);
    self->rule = k;
    self->state = v < n ? VALUE : VALUE_WS;
    return v;
}

/* NAME: a line start carried over from the last chunk; go on with it. */
static Py_ssize_t go_on_name(StreamMasker *self, const unsigned char *p, Py_ssize_t i,
                             Py_ssize_t n) {
    const Names *h = &self->headers;
    unsigned char *part = self->partial;
    Py_ssize_t len = self->partial_len;
    for (; i < n; i++) {
        unsigned char c = p[i];
        if (c == ':' || is_fold(c)) {
            Py_ssize_t k = names_find(h, part, len);
            if (k >= 0) {
                self->rule = k;
                self->state = c == ':' ? VALUE_WS : NAME_WS;
                return c == ':' ? i + 1 : i;
            }
        }
        if (len == h->longest) {
            self->state = SKIP;
            return i;
        }
        part[len] = lower(c);
        if (!names_prefix(h, part, len + 1)) {
            self->state = SKIP;
            return i;
        }
        len++;
    }
    self->partial_len = len;
    return n;
}

static int mask_headers(StreamMasker *self, Chunk *c) {
    const unsigned char *p = c->src;
    Py_ssize_t n = c->n, i = 0;
    while (i < n) {
        switch (self->state) {
        case SCAN:
            i = scan_line(self, p, i, n);
            break;
        case NAME:
            i = go_on_name(self, p, i, n);
            break;
        case NAME_WS: {
            Py_ssize_t j = skip_ws(p, i, n);
            if (j == n) {
                i = n;
            } else if (p[j] == ':') {
                self->state = VALUE_WS;
                i = j + 1;
            } else {
                self->state = SKIP;
                i = j;
            }
            break;
        }
        case VALUE_WS:
            i = skip_ws(p, i, n);
            if (i < n)
                self->state = VALUE;
            break;
        case VALUE: {
            const unsigned char *nl = memchr(p + i, '\n', n - i);
            Py_ssize_t end = nl ? nl - p : n;
            if (end > i && mask_value(self, c, i, end) < 0)
                return -1;
            if (!nl)
                return 0;
            i = end + 1;
            if (i == n)
                self->state = AFTER_VALUE;
            else
                self->state = is_fold(p[i]) ? VALUE_WS : SCAN;
            break;
        }
        case AFTER_VALUE:
            self->state = is_fold(p[i]) ? VALUE_WS : SCAN;
            break;
        default: { /* SKIP */
            const unsigned char *nl = memchr(p + i, '\n', n - i);
            if (!nl)
                return 0;
            self->state = SCAN;
            i = nl - p + 1;
        }
        }
    }
    return 0;
}

/* ---- query parameters ---------------------------------------------------- */

static int mask_query_range(Chunk *c, Py_ssize_t start, Py_ssize_t end) {
    if (chunk_writable(c) < 0)
        return -1;
    memset(c->out + start, '*', end - start);
    return 0;
}

static void keep_tail(StreamMasker *self, const unsigned char *buf, Py_ssize_t len) {
    Py_ssize_t keep = len < self->keep ? len : self->keep;
    memmove(self->tail, buf + len - keep, keep);
    self->tail_len = keep;
}

/* "[?&;]name=value" for every query name, the name maybe in the previous chunk
 * (the tail), the value maybe going on into the next one.  Matches are found
 * from their "=" (a name holds none), leftmost first, and a search goes on
 * after a match's value, as a regex scan of the stream would. */
static int mask_query(StreamMasker *self, Chunk *c) {
    const Names *q = &self->query;
    const unsigned char *data = c->src;
    Py_ssize_t n = c->n, i = 0;
    Py_ssize_t first_query_rule = self->headers.count + 1;
    if (self->query_rule >= 0) { /* a value cut by the last chunk's end */
        while (i < n && !query_value_end[data[i]])
            i++;
        if (i > 0) {
            if (mask_query_range(c, 0, i) < 0)
                return -1;
            note_hit(self, first_query_rule + self->query_rule);
        }
        if (i < n)
            self->query_rule = -1;
    }
    if (n == 0 || memchr(data, '=', n) == NULL) {
        /* Every match holds its "=" in this chunk (one in the tail was done). */
        if (n >= self->keep) {
            keep_tail(self, data, n);
        } else {
            memcpy(self->scratch, self->tail, self->tail_len);
            memcpy(self->scratch + self->tail_len, data, n);
            keep_tail(self, self->scratch, self->tail_len + n);
        }
        return 0;
    }
    Py_ssize_t base = self->tail_len, total = base + n;
    const unsigned char *buf = data;
    if (base) {
        if (total > self->scratch_size) {
            unsigned char *grown = PyMem_Realloc(self->scratch, total);
            if (grown == NULL) {
                PyErr_NoMemory();
                return -1;
            }
            self->scratch = grown;
            self->scratch_size = total;
        }
        memcpy(self->scratch, self->tail, base);
        memcpy(self->scratch + base, data, n);
        buf = self->scratch;
    }
    Py_ssize_t from = i ? base + i : 0; /* no match starts before this */
    const unsigned char *eq = memchr(buf + base, '=', n);
    while (eq != NULL) {
        Py_ssize_t e = eq - buf, name = -1;
        for (Py_ssize_t k = 0; k < q->count && e > from && q->last[buf[e - 1]]; k++) {
            Py_ssize_t len = q->len[k], sep = e - len - 1;
            if (sep < from || (buf[sep] != '?' && buf[sep] != '&' && buf[sep] != ';'))
                continue;
            const unsigned char *s = buf + sep + 1, *want = q->text + q->start[k];
            Py_ssize_t j = 0;
            while (j < len && lower(s[j]) == want[j])
                j++;
            if (j == len) {
                name = k;
                break;
            }
        }
        Py_ssize_t next = e + 1;
        if (name >= 0) {
            Py_ssize_t end = e + 1;
            while (end < total && !query_value_end[buf[end]])
                end++;
            Py_ssize_t start = e + 1;
            if (end > start) {
                if (mask_query_range(c, start - base, end - base) < 0)
                    return -1;
                note_hit(self, first_query_rule + name);
            }
            if (end == total)
                self->query_rule = name;
            from = end;
            next = end > next ? end : next;
        }
        eq = next < total ? memchr(buf + next, '=', total - next) : NULL;
    }
    keep_tail(self, buf, total);
    return 0;
}

/* ---- the type ------------------------------------------------------------ */

static void StreamMasker_dealloc(StreamMasker *self) {
    names_free(&self->headers);
    names_free(&self->query);
    Py_XDECREF(self->rules);
    PyMem_Free(self->hit);
    PyMem_Free(self->hits);
    PyMem_Free(self->partial);
    PyMem_Free(self->tail);
    PyMem_Free(self->scratch);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int StreamMasker_init(StreamMasker *self, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"header_names", "query_names", "rules", NULL};
    PyObject *headers, *query, *rules;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O!O!O!", kwlist, &PyTuple_Type, &headers,
                                     &PyTuple_Type, &query, &PyTuple_Type, &rules))
        return -1;
    if (self->rules != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "StreamMasker is initialised once");
        return -1;
    }
    if (names_init(&self->headers, headers, "header_names") < 0 ||
        names_init(&self->query, query, "query_names") < 0)
        return -1;
    Py_ssize_t nrules = self->headers.count + 1 + self->query.count;
    if (PyTuple_GET_SIZE(rules) != nrules) {
        PyErr_SetString(PyExc_ValueError,
                        "rules: one per header name, the mid-stream rule, one per query name");
        return -1;
    }
    Py_INCREF(rules);
    self->rules = rules;
    self->keep = 2 + self->query.longest; /* separator, name, "=" */
    self->hit = PyMem_Calloc(nrules, 1);
    self->hits = PyMem_Malloc(sizeof(Py_ssize_t) * (nrules + 1));
    self->partial = PyMem_Malloc(self->headers.longest + 1);
    self->tail = PyMem_Malloc(self->keep);
    self->scratch_size = 2 * self->keep + 4096;
    self->scratch = PyMem_Malloc(self->scratch_size);
    if (!self->hit || !self->hits || !self->partial || !self->tail || !self->scratch) {
        PyErr_NoMemory();
        return -1;
    }
    self->state = SCAN;
    self->query_rule = -1;
    return 0;
}

/* feed() without the pair: 0 with the masked chunk in *masked and the rules that
 * masked any of it in *hits (a new set, or NULL: none), or -1 with an error. */
static int masker_feed(PyObject *obj, PyObject *data, PyObject **masked, PyObject **hits) {
    StreamMasker *self = (StreamMasker *)obj;
    *masked = *hits = NULL;
    if (self->rules == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "StreamMasker not initialised");
        return -1;
    }
    Py_buffer view = {0};
    Chunk c = {0};
    int exact = PyBytes_CheckExact(data);
    if (exact) {
        c.src = (const unsigned char *)PyBytes_AS_STRING(data);
        c.n = PyBytes_GET_SIZE(data);
    } else {
        if (PyObject_GetBuffer(data, &view, PyBUF_SIMPLE) < 0)
            return -1;
        c.src = view.buf;
        c.n = view.len;
    }
    self->n_hits = 0;
    int failed = (self->query.count && mask_query(self, &c) < 0) ||
                 (self->headers.count && mask_headers(self, &c) < 0);
    PyObject *result = NULL, *set = NULL;
    if (failed)
        goto done;
    if (c.copy != NULL) {
        result = c.copy;
        c.copy = NULL;
    } else if (exact) {
        result = Py_NewRef(data);
    } else {
        result = PyBytes_FromStringAndSize((const char *)c.src, c.n);
        if (result == NULL)
            goto done;
    }
    for (Py_ssize_t i = 0; i < self->n_hits; i++)
        if ((set == NULL && (set = PySet_New(NULL)) == NULL) ||
            PySet_Add(set, PyTuple_GET_ITEM(self->rules, self->hits[i])) < 0)
            goto done;
    *masked = result;
    *hits = set;
    result = set = NULL;
done: /* -1 (an error set) unless *masked was set */
    for (Py_ssize_t i = 0; i < self->n_hits; i++) /* all clear for the next chunk */
        self->hit[self->hits[i]] = 0;
    self->n_hits = 0;
    Py_XDECREF(result);
    Py_XDECREF(set);
    Py_XDECREF(c.copy);
    if (!exact)
        PyBuffer_Release(&view);
    return *masked == NULL ? -1 : 0;
}

PyDoc_STRVAR(feed_doc, "feed(data) -> (bytes, set[str]): `data` masked (same length), and "
                       "the rules that masked bytes of it.");

static PyObject *StreamMasker_feed(StreamMasker *self, PyObject *data) {
    PyObject *masked, *hits;
    if (masker_feed((PyObject *)self, data, &masked, &hits) < 0)
        return NULL;
    if (hits == NULL && (hits = PySet_New(NULL)) == NULL) {
        Py_DECREF(masked);
        return NULL;
    }
    PyObject *pair = PyTuple_Pack(2, masked, hits);
    Py_DECREF(masked);
    Py_DECREF(hits);
    return pair;
}

PyDoc_STRVAR(gap_doc, "gap(length=0): bytes of the stream were lost; the line position is "
                      "unknown (a value being masked goes on to its line's end).");

static PyObject *StreamMasker_gap(StreamMasker *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs > 1) {
        PyErr_SetString(PyExc_TypeError, "gap() takes at most one argument");
        return NULL;
    }
    int in_value = self->state == VALUE_WS || self->state == VALUE || self->state == AFTER_VALUE;
    self->state = in_value ? VALUE : SKIP;
    self->partial_len = 0;
    self->tail_len = 0;
    Py_RETURN_NONE;
}

PyDoc_STRVAR(midline_doc, "start_midline(): the stream is picked up past its start: mask up "
                          "to the first line end, reported as the mid-stream rule.");

static PyObject *StreamMasker_start_midline(StreamMasker *self, PyObject *unused) {
    self->state = VALUE;
    self->rule = self->headers.count; /* the mid-stream rule, right after the header rules */
    Py_RETURN_NONE;
}

static PyMethodDef StreamMasker_methods[] = {
    {"feed", (PyCFunction)StreamMasker_feed, METH_O, feed_doc},
    {"gap", (PyCFunction)(void (*)(void))StreamMasker_gap, METH_FASTCALL, gap_doc},
    {"start_midline", (PyCFunction)StreamMasker_start_midline, METH_NOARGS, midline_doc},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject StreamMaskerType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "agent.redact._stream_masker.StreamMasker",
    .tp_doc = PyDoc_STR("Sensitive HTTP/1 header values and query parameter values in a byte "
                        "stream, masked chunk by chunk (see agent/redact/http1_masker.py)."),
    .tp_basicsize = sizeof(StreamMasker),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)StreamMasker_init,
    .tp_dealloc = (destructor)StreamMasker_dealloc,
    .tp_methods = StreamMasker_methods,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "agent.redact._stream_masker",
    .m_doc = "The byte work of agent/redact/http1_masker.py.",
    .m_size = -1,
};

PyMODINIT_FUNC PyInit__stream_masker(void) {
    for (int c = 0; c < 256; c++)
        lower_table[c] = (c >= 'A' && c <= 'Z') ? c + 32 : c;
    for (const char *e = ": \t\r\n"; *e; e++)
        name_end[(unsigned char)*e] = 1;
    for (int c = 0; c < 256; c++) /* lower-case tokens: visible ASCII but ':', '=' */
        name_char[c] = lower_table[c] == c && c > ' ' && c != ':' && c != '=' && c < 0x7f;
    const char *ends = "&#;\"'<> \t\n\r\f\v";
    for (const char *e = ends; *e; e++)
        query_value_end[(unsigned char)*e] = 1;
    if (PyType_Ready(&StreamMaskerType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&StreamMaskerType);
    if (PyModule_AddObject(m, "StreamMasker", (PyObject *)&StreamMaskerType) < 0) {
        Py_DECREF(&StreamMaskerType);
        Py_DECREF(m);
        return NULL;
    }
    static StreamMaskerApi api = {&StreamMaskerType, masker_feed};
    PyObject *capsule = PyCapsule_New(&api, STREAM_MASKER_API_CAPSULE, NULL);
    int added = capsule == NULL ? -1 : PyModule_AddObjectRef(m, "_C_API", capsule);
    Py_XDECREF(capsule);
    if (added < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
