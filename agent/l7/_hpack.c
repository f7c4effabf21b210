/* HPACK decoding (RFC 7541) of one direction's header blocks, in C: the decoder
 * behind agent/l7/header_blocks.py, whose docstring says what it is for.
 *
 * Why C: every header block of every HTTP/2 connection is decoded here, in order
 * (the dynamic table must stay in step), and in Python the one-pass decoder cost
 * ~9 us for a request block of seven fields, about a tenth of the whole HTTP/2
 * stage per exchange; most of that was interpreter work per byte and per field.
 *
 * It follows hpack's decoder (the Python package the agent used first, and the
 * reference of the unit tests): the same checks (indices, a table size update
 * only before the first field and within the allowed size, integers of at most
 * five continuation bytes, truncation, the header list size), hpack's exception
 * types, and hpack's own Huffman state table, read from hpack.huffman_table when
 * the module loads, so a string decodes or fails exactly as it does there.  The
 * messages are fixed texts: they never quote the input.
 *
 * Input is untrusted (any peer's header block): every read is checked against
 * the block's length, integers are bounded (prefix plus 5 continuation bytes, so
 * below 2^36), and what a block makes us hold is bounded by the caller's limits
 * (the dynamic table by the allowed table size, a block's fields by the header
 * list size).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <stdint.h>
#include <string.h>

#define STATIC_LEN 61
#define ENTRY_OVERHEAD 32
#define MAX_INTEGER_BYTES 6 /* the prefix and 5 continuation bytes, as hpack allows */
#define HUFFMAN_COMPLETE 1
#define HUFFMAN_EMIT 2
#define HUFFMAN_FAIL 4

/* hpack's nghttp2-derived state machine: 256 states x 16 nibbles. */
static uint8_t huff_state[4096], huff_flags[4096], huff_sym[4096];
static PyObject *static_table[STATIC_LEN]; /* (name, value) tuples of bytes */
static PyObject *DecodingError, *IndexError_, *SizeError, *OversizedError;

/* -- HeaderBlock: the result of one decode ------------------------------------- */

typedef struct {
    PyObject_HEAD
    PyObject *fields;   /* list of (name, value) bytes tuples, in order */
    PyObject *literals; /* list of (position, name index, H bit's byte, start, end) */
    PyObject *emptied;  /* bool: a table size update to 0 */
} HeaderBlock;

static void HeaderBlock_dealloc(HeaderBlock *self) {
    Py_XDECREF(self->fields);
    Py_XDECREF(self->literals);
    Py_XDECREF(self->emptied);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMemberDef HeaderBlock_members[] = {
    {"fields", T_OBJECT_EX, offsetof(HeaderBlock, fields), READONLY,
     "the fields, (name, value) as bytes, in order"},
    {"literals", T_OBJECT_EX, offsetof(HeaderBlock, literals), READONLY,
     "literal fields: (position in fields, name index (0: a literal name), position of the "
     "byte holding the value string's H bit, start, end of the value string)"},
    {"emptied", T_OBJECT_EX, offsetof(HeaderBlock, emptied), READONLY,
     "a dynamic table size update to 0 emptied the table"},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject HeaderBlockType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "agent.l7._hpack.HeaderBlock",
    .tp_doc = PyDoc_STR("One decoded header block: its fields and where its literal fields' "
                        "value strings are (the masker's business)."),
    .tp_basicsize = sizeof(HeaderBlock),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_dealloc = (destructor)HeaderBlock_dealloc,
    .tp_members = HeaderBlock_members,
};

/* -- the decoder ------------------------------------------------------------------ */

typedef struct {
    PyObject_HEAD
    PyObject **ring;      /* the dynamic table's (name, value) tuples */
    Py_ssize_t cap;       /* ring slots (a power of two) */
    Py_ssize_t head;      /* slot of the newest entry */
    Py_ssize_t count;     /* entries */
    Py_ssize_t size;      /* RFC 7541 4.1 size of the entries */
    Py_ssize_t max_size;  /* the table's current maximum size */
    Py_ssize_t max_header_list;
    Py_ssize_t max_allowed_table_size;
} HpackDecoder;

static void table_clear(HpackDecoder *self) {
    for (Py_ssize_t k = 0; k < self->count; k++)
        Py_CLEAR(self->ring[(self->head + k) & (self->cap - 1)]);
    self->count = 0;
    self->size = 0;
}

static Py_ssize_t entry_size(PyObject *field) {
    return ENTRY_OVERHEAD + PyBytes_GET_SIZE(PyTuple_GET_ITEM(field, 0)) +
           PyBytes_GET_SIZE(PyTuple_GET_ITEM(field, 1));
}

static void table_shrink(HpackDecoder *self) {
    while (self->size > self->max_size && self->count > 0) {
        Py_ssize_t slot = (self->head + self->count - 1) & (self->cap - 1);
        self->size -= entry_size(self->ring[slot]);
        Py_CLEAR(self->ring[slot]);
        self->count--;
    }
}

/* Newest first, as RFC 7541 2.3.3 numbers them; a field larger than the table
 * empties it (4.4). */
static int table_add(HpackDecoder *self, PyObject *field) {
    Py_ssize_t size = entry_size(field);
    if (size > self->max_size) {
        table_clear(self);
        return 0;
    }
    if (self->count == self->cap) {
        /* At most max_size / 32 entries fit, so the ring stays bounded by the
         * allowed table size. */
        Py_ssize_t cap = self->cap ? self->cap * 2 : 64;
        PyObject **ring = PyMem_Calloc(cap, sizeof(PyObject *));
        if (ring == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        for (Py_ssize_t k = 0; k < self->count; k++)
            ring[k] = self->ring[(self->head + k) & (self->cap - 1)];
        PyMem_Free(self->ring);
        self->ring = ring;
        self->cap = cap;
        self->head = 0;
    }
    self->head = (self->head - 1) & (self->cap - 1);
    Py_INCREF(field);
    self->ring[self->head] = field;
    self->count++;
    self->size += size;
    table_shrink(self);
    return 0;
}

/* The field at `index` of the static table followed by the dynamic one
 * (borrowed), or NULL with InvalidTableIndexError. */
static PyObject *entry(HpackDecoder *self, uint64_t index) {
    if (index >= 1 && index <= STATIC_LEN)
        return static_table[index - 1];
    if (index > STATIC_LEN && index - STATIC_LEN <= (uint64_t)self->count)
        return self->ring[(self->head + (Py_ssize_t)(index - STATIC_LEN - 1)) & (self->cap - 1)];
    PyErr_SetString(IndexError_, "invalid HPACK table index");
    return NULL;
}

/* RFC 7541 5.1 past the prefix: the integer whose prefix at data[*i] is all ones
 * (`limit`); *i moves past it.  -1 with HPACKDecodingError when truncated or
 * longer than hpack allows. */
static int integer(const uint8_t *data, Py_ssize_t n, Py_ssize_t *i, uint64_t limit,
                   uint64_t *out) {
    uint64_t value = limit;
    int shift = 0;
    Py_ssize_t end = *i + MAX_INTEGER_BYTES < n ? *i + MAX_INTEGER_BYTES : n;
    Py_ssize_t k = *i + 1;
    while (k < end) {
        uint8_t byte = data[k++];
        value += (uint64_t)(byte & 0x7F) << shift;
        if (!(byte & 0x80)) {
            *i = k;
            *out = value;
            return 0;
        }
        shift += 7;
    }
    PyErr_SetString(DecodingError, "truncated or oversized HPACK integer");
    return -1;
}

static PyObject *huffman(const uint8_t *src, Py_ssize_t len) {
    /* A nibble emits at most one byte. */
    PyObject *out = PyBytes_FromStringAndSize(NULL, len * 2);
    if (out == NULL)
        return NULL;
    uint8_t *dst = (uint8_t *)PyBytes_AS_STRING(out);
    Py_ssize_t w = 0;
    unsigned state = 0, flags = 0;
    for (Py_ssize_t k = 0; k < len; k++) {
        for (int half = 0; half < 2; half++) {
            unsigned nibble = half ? (src[k] & 0x0F) : (src[k] >> 4);
            unsigned at = state * 16 + nibble;
            state = huff_state[at];
            flags = huff_flags[at];
            if (flags & HUFFMAN_FAIL) {
                Py_DECREF(out);
                PyErr_SetString(DecodingError, "Invalid Huffman string");
                return NULL;
            }
            if (flags & HUFFMAN_EMIT)
                dst[w++] = huff_sym[at];
        }
    }
    if (!(flags & HUFFMAN_COMPLETE)) {
        Py_DECREF(out);
        PyErr_SetString(DecodingError, "Incomplete Huffman string");
        return NULL;
    }
    if (_PyBytes_Resize(&out, w) < 0)
        return NULL;
    return out;
}

/* RFC 7541 5.2 at data[*i]: the string (new reference), with where its H bit's byte
 * and its bytes are; *i moves past it. */
static PyObject *string(const uint8_t *data, Py_ssize_t n, Py_ssize_t *i, Py_ssize_t *h_pos,
                        Py_ssize_t *start) {
    if (*i >= n) {
        PyErr_SetString(DecodingError, "truncated header block");
        return NULL;
    }
    *h_pos = *i;
    uint64_t length = data[*i] & 0x7F;
    Py_ssize_t s = *i + 1;
    if (length == 0x7F) {
        s = *i;
        if (integer(data, n, &s, 0x7F, &length) < 0)
            return NULL;
    }
    if (length > (uint64_t)(n - s)) {
        PyErr_SetString(DecodingError, "truncated header block");
        return NULL;
    }
    *start = s;
    *i = s + (Py_ssize_t)length;
    if ((data[*h_pos] & 0x80) && length)
        return huffman(data + s, (Py_ssize_t)length);
    return PyBytes_FromStringAndSize((const char *)data + s, (Py_ssize_t)length);
}

static int HpackDecoder_init(HpackDecoder *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"max_header_list", "max_table_size", NULL};
    Py_ssize_t max_header_list = (Py_ssize_t)1 << 24, max_table_size = (Py_ssize_t)1 << 16;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|nn", kwlist, &max_header_list,
                                     &max_table_size))
        return -1;
    table_clear(self);
    self->max_size = 4096; /* SETTINGS_HEADER_TABLE_SIZE's initial value */
    self->max_header_list = max_header_list;
    self->max_allowed_table_size = max_table_size;
    return 0;
}

static void HpackDecoder_dealloc(HpackDecoder *self) {
    table_clear(self);
    PyMem_Free(self->ring);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

PyDoc_STRVAR(decode_doc, "decode(data) -> HeaderBlock: the fields of one complete header "
                         "block; raises an hpack HPACKDecodingError (or a subclass).");

static PyObject *HpackDecoder_decode(HpackDecoder *self, PyObject *arg) {
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    const uint8_t *data = view.buf;
    Py_ssize_t n = view.len, i = 0;
    Py_ssize_t listed = 0; /* the header list's size, hpack's accounting */
    int emptied = 0;
    PyObject *fields = PyList_New(0), *literals = PyList_New(0), *result = NULL;
    if (fields == NULL || literals == NULL)
        goto done;
    while (i < n) {
        uint8_t first = data[i];
        PyObject *field; /* a new reference */
        if (first & 0x80) { /* indexed field */
            uint64_t index = first & 0x7F;
            if (index == 0x7F) {
                if (integer(data, n, &i, 0x7F, &index) < 0)
                    goto done;
            } else {
                i++;
            }
            field = entry(self, index);
            if (field == NULL)
                goto done;
            Py_INCREF(field);
        } else if ((first & 0x40) || !(first & 0x20)) { /* a literal */
            uint64_t index, limit = (first & 0x40) ? 0x3F : 0x0F;
            index = first & limit;
            if (index == limit) {
                if (integer(data, n, &i, limit, &index) < 0)
                    goto done;
            } else {
                i++;
            }
            PyObject *name;
            Py_ssize_t h_pos, start;
            if (index) {
                PyObject *named = entry(self, index);
                if (named == NULL)
                    goto done;
                name = PyTuple_GET_ITEM(named, 0);
                Py_INCREF(name);
            } else {
                name = string(data, n, &i, &h_pos, &start);
                if (name == NULL)
                    goto done;
            }
            PyObject *value = string(data, n, &i, &h_pos, &start);
            if (value == NULL) {
                Py_DECREF(name);
                goto done;
            }
            field = PyTuple_New(2);
            if (field == NULL) {
                Py_DECREF(name);
                Py_DECREF(value);
                goto done;
            }
            PyTuple_SET_ITEM(field, 0, name);
            PyTuple_SET_ITEM(field, 1, value);
            PyObject *literal = Py_BuildValue("(nKnnn)", PyList_GET_SIZE(fields),
                                              (unsigned long long)index, h_pos, start, i);
            if (literal == NULL || PyList_Append(literals, literal) < 0) {
                Py_XDECREF(literal);
                Py_DECREF(field);
                goto done;
            }
            Py_DECREF(literal);
            if ((first & 0x40) && table_add(self, field) < 0) {
                Py_DECREF(field);
                goto done;
            }
        } else { /* dynamic table size update: before the first field only */
            if (PyList_GET_SIZE(fields)) {
                PyErr_SetString(DecodingError, "Table size update not at the start of the block");
                goto done;
            }
            uint64_t size = first & 0x1F;
            if (size == 0x1F) {
                if (integer(data, n, &i, 0x1F, &size) < 0)
                    goto done;
            } else {
                i++;
            }
            if (self->max_allowed_table_size < 0 ||
                size > (uint64_t)self->max_allowed_table_size) {
                PyErr_SetString(SizeError, "Encoder exceeded max allowable table size");
                goto done;
            }
            self->max_size = (Py_ssize_t)size;
            table_shrink(self);
            emptied = emptied || size == 0;
            continue;
        }
        int failed = PyList_Append(fields, field);
        listed += entry_size(field);
        Py_DECREF(field);
        if (failed < 0)
            goto done;
        if (listed > self->max_header_list) {
            PyErr_SetString(OversizedError, "header list larger than allowed");
            goto done;
        }
    }
    HeaderBlock *block = PyObject_New(HeaderBlock, &HeaderBlockType);
    if (block == NULL)
        goto done;
    block->fields = fields;
    block->literals = literals;
    block->emptied = PyBool_FromLong(emptied);
    fields = literals = NULL;
    result = (PyObject *)block;
done:
    Py_XDECREF(fields);
    Py_XDECREF(literals);
    PyBuffer_Release(&view);
    return result;
}

static PyObject *HpackDecoder_table(HpackDecoder *self, void *closure) {
    PyObject *out = PyList_New(self->count);
    if (out == NULL)
        return NULL;
    for (Py_ssize_t k = 0; k < self->count; k++) {
        PyObject *field = self->ring[(self->head + k) & (self->cap - 1)];
        Py_INCREF(field);
        PyList_SET_ITEM(out, k, field);
    }
    return out;
}

static PyGetSetDef HpackDecoder_getset[] = {
    {"table", (getter)HpackDecoder_table, NULL, "the dynamic table's fields, newest first",
     NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMemberDef HpackDecoder_members[] = {
    {"max_header_list", T_PYSSIZET, offsetof(HpackDecoder, max_header_list), 0,
     "the largest decoded header list allowed (hpack's accounting)"},
    {"max_allowed_table_size", T_PYSSIZET, offsetof(HpackDecoder, max_allowed_table_size), 0,
     "the largest dynamic table size an update may ask for"},
    {"table_size", T_PYSSIZET, offsetof(HpackDecoder, size), READONLY,
     "RFC 7541 size of the dynamic table's entries"},
    {"max_table_size", T_PYSSIZET, offsetof(HpackDecoder, max_size), READONLY,
     "the dynamic table's current maximum size"},
    {NULL, 0, 0, 0, NULL},
};

static PyMethodDef HpackDecoder_methods[] = {
    {"decode", (PyCFunction)HpackDecoder_decode, METH_O, decode_doc},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject HpackDecoderType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "agent.l7._hpack.HpackDecoder",
    .tp_doc = PyDoc_STR("HpackDecoder(max_header_list=1<<24, max_table_size=1<<16): one "
                        "direction's HPACK decoding context (the dynamic table and its limits)."),
    .tp_basicsize = sizeof(HpackDecoder),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)HpackDecoder_init,
    .tp_dealloc = (destructor)HpackDecoder_dealloc,
    .tp_methods = HpackDecoder_methods,
    .tp_members = HpackDecoder_members,
    .tp_getset = HpackDecoder_getset,
};

/* -- the module ------------------------------------------------------------------- */

/* hpack's tables, checked: a different layout fails the import rather than decoding
 * wrongly. */
static int load_hpack_tables(void) {
    PyObject *mod = PyImport_ImportModule("hpack.huffman_table");
    if (mod == NULL)
        return -1;
    PyObject *table = PyObject_GetAttrString(mod, "HUFFMAN_TABLE");
    Py_DECREF(mod);
    if (table == NULL)
        return -1;
    PyObject *seq = PySequence_Fast(table, "HUFFMAN_TABLE is not a sequence");
    Py_DECREF(table);
    if (seq == NULL)
        return -1;
    int ok = PySequence_Fast_GET_SIZE(seq) == 4096;
    for (Py_ssize_t k = 0; ok && k < 4096; k++) {
        PyObject *row = PySequence_Fast_GET_ITEM(seq, k);
        long v[3];
        ok = PyTuple_Check(row) && PyTuple_GET_SIZE(row) == 3;
        for (int j = 0; ok && j < 3; j++) {
            v[j] = PyLong_AsLong(PyTuple_GET_ITEM(row, j));
            ok = v[j] >= 0 && v[j] <= 255;
        }
        if (ok) {
            huff_state[k] = (uint8_t)v[0];
            huff_flags[k] = (uint8_t)v[1];
            huff_sym[k] = (uint8_t)v[2];
        }
    }
    Py_DECREF(seq);
    if (!ok) {
        PyErr_Clear();
        PyErr_SetString(PyExc_ImportError, "hpack.huffman_table.HUFFMAN_TABLE has changed");
        return -1;
    }
    mod = PyImport_ImportModule("hpack.table");
    if (mod == NULL)
        return -1;
    PyObject *cls = PyObject_GetAttrString(mod, "HeaderTable");
    Py_DECREF(mod);
    if (cls == NULL)
        return -1;
    table = PyObject_GetAttrString(cls, "STATIC_TABLE");
    Py_DECREF(cls);
    if (table == NULL)
        return -1;
    seq = PySequence_Fast(table, "STATIC_TABLE is not a sequence");
    Py_DECREF(table);
    if (seq == NULL)
        return -1;
    ok = PySequence_Fast_GET_SIZE(seq) == STATIC_LEN;
    for (Py_ssize_t k = 0; ok && k < STATIC_LEN; k++) {
        PyObject *row = PySequence_Fast_GET_ITEM(seq, k);
        ok = PyTuple_Check(row) && PyTuple_GET_SIZE(row) == 2 &&
             PyBytes_CheckExact(PyTuple_GET_ITEM(row, 0)) &&
             PyBytes_CheckExact(PyTuple_GET_ITEM(row, 1));
        if (ok) {
            Py_INCREF(row);
            static_table[k] = row;
        }
    }
    Py_DECREF(seq);
    if (!ok) {
        PyErr_SetString(PyExc_ImportError, "hpack.table.HeaderTable.STATIC_TABLE has changed");
        return -1;
    }
    mod = PyImport_ImportModule("hpack.exceptions");
    if (mod == NULL)
        return -1;
    DecodingError = PyObject_GetAttrString(mod, "HPACKDecodingError");
    IndexError_ = PyObject_GetAttrString(mod, "InvalidTableIndexError");
    SizeError = PyObject_GetAttrString(mod, "InvalidTableSizeError");
    OversizedError = PyObject_GetAttrString(mod, "OversizedHeaderListError");
    Py_DECREF(mod);
    return DecodingError && IndexError_ && SizeError && OversizedError ? 0 : -1;
}

PyDoc_STRVAR(text_fields_doc,
             "text_fields(fields) -> list of (str, str): a HeaderBlock's fields as text, each "
             "name and value decoded as bytes.decode('utf-8', 'replace') does (what the HTTP/2 "
             "parser reports).");

static PyObject *text_field(PyObject *item) {
    if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 2 ||
        !PyBytes_Check(PyTuple_GET_ITEM(item, 0)) || !PyBytes_Check(PyTuple_GET_ITEM(item, 1))) {
        PyErr_SetString(PyExc_TypeError, "text_fields() takes (bytes, bytes) pairs");
        return NULL;
    }
    PyObject *pair = PyTuple_New(2);
    if (pair == NULL)
        return NULL;
    for (int j = 0; j < 2; j++) {
        PyObject *raw = PyTuple_GET_ITEM(item, j);
        PyObject *text =
            PyUnicode_DecodeUTF8(PyBytes_AS_STRING(raw), PyBytes_GET_SIZE(raw), "replace");
        if (text == NULL) {
            Py_DECREF(pair);
            return NULL;
        }
        PyTuple_SET_ITEM(pair, j, text);
    }
    return pair;
}

static PyObject *text_fields(PyObject *module, PyObject *fields) {
    if (!PyList_Check(fields)) {
        PyErr_SetString(PyExc_TypeError, "text_fields() takes a list");
        return NULL;
    }
    Py_ssize_t n = PyList_GET_SIZE(fields);
    PyObject *out = PyList_New(n);
    if (out == NULL)
        return NULL;
    for (Py_ssize_t k = 0; k < n; k++) {
        PyObject *pair = text_field(PyList_GET_ITEM(fields, k));
        if (pair == NULL) {
            Py_DECREF(out);
            return NULL;
        }
        PyList_SET_ITEM(out, k, pair);
    }
    return out;
}

static PyMethodDef module_methods[] = {
    {"text_fields", (PyCFunction)text_fields, METH_O, text_fields_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "agent.l7._hpack",
    .m_doc = "HPACK decoding for agent/l7/header_blocks.py.",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC PyInit__hpack(void) {
    if (load_hpack_tables() < 0)
        return NULL;
    if (PyType_Ready(&HeaderBlockType) < 0 || PyType_Ready(&HpackDecoderType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&HeaderBlockType);
    if (PyModule_AddObject(m, "HeaderBlock", (PyObject *)&HeaderBlockType) < 0) {
        Py_DECREF(&HeaderBlockType);
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(&HpackDecoderType);
    if (PyModule_AddObject(m, "HpackDecoder", (PyObject *)&HpackDecoderType) < 0) {
        Py_DECREF(&HpackDecoderType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
