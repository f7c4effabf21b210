/* An HTTP exchange as one compact JSON object, in C: the "exchange" member of the
 * JSON lines agent/sinks/jsonl.py writes.
 *
 * Why C: with HTTP parsing on, every exchange becomes a line, and building the nested
 * dicts of Exchange.to_json() and orjson-encoding them cost ~4 us per exchange (about
 * a fifth of the agent's instructions per HTTP exchange).  Here the fields are read
 * from the objects' slots and written straight into the bytes object returned.
 *
 * The API: exchange_json(exchange) -> bytes, exactly what
 *   json.dumps(exchange.to_json(), separators=(",", ":")).encode()
 * gives (same keys in the same order, ASCII only, json.dumps' escapes byte for byte:
 * \uXXXX in lower-case hex, astral code points as surrogate pairs, lone surrogates
 * escaped as they are) for an agent.l7.exchange.Exchange, exact type, whose grpc is
 * None and whose fields hold what the dataclasses declare (str, int that fits in a
 * long long, bool, bytes, lists of str and of (str, str) pairs).  Anything else
 * (a GrpcCall, a subclass, a huge int, a non-str header name, an unset slot) raises
 * TypeError: the caller then takes the Python path, to_json() and a JSON encoder.
 * (The only difference from that path for ASCII text: DEL (0x7f) is escaped
 * "\u007f" as json.dumps does; orjson writes it raw.  Both are the same JSON.)
 *
 * The fields are read through the classes' slot member descriptors, resolved when
 * the module loads (checked there to be object slots inside the instance), on
 * instances of exactly those classes, so no attribute look-up or Python code runs
 * while a line is built: the lists cannot change under us.  Every write reserves its
 * room first (short ASCII text its worst case, other text its exact escaped length,
 * measured first), every size is checked for overflow, nothing reads past a string's
 * or a body's end (nor before its object: a string shorter than 16 is loaded as the
 * 16 bytes that end with it, the end of its str's header first), and the nesting is
 * fixed (no recursion).
 *
 * Per exchange (a GET with 5 headers and a 1.5 KiB response body) this is ~7k
 * instructions where to_json() and orjson were ~52k: the strings (16 characters at a
 * time), the numbers (8 digits at a time) and the object's fixed text; base64 (bodies
 * and payloads) is encoded into the line with AVX2, 24 bytes a step (below), where a
 * table look-up per character costs ~5x the instructions and pybase64 an intermediate
 * bytes object.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <limits.h>
#include <stdint.h>
#include <string.h>
#include <structmember.h>

#include "../native/_slots.h"    /* slot_offset() */
#include "../records/_record.h" /* Record's layout: its fields by name */

/* Text and base64 are handled 8 bytes at a time in a uint64_t, loaded and stored
 * with memcpy: the first byte in the low bits. */
#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "_json_lines.c assumes a little-endian CPU"
#endif

/* The slots read of an exchange and its messages: their offsets in the instance,
 * found at load time. */
#define EXCHANGE_FIELDS(X) X(protocol) X(request) X(response) X(stream_id) X(grpc) \
    X(notes) X(redactions)
#define MESSAGE_FIELDS(X) X(ts_ns) X(end_ts_ns) X(method) X(target) X(authority) X(status) \
    X(reason) X(version) X(headers) X(trailers) X(body) X(body_len) X(body_truncated) \
    X(complete)
#define AS_EXCHANGE_ENUM(name) EX_##name,
#define AS_MESSAGE_ENUM(name) M_##name,
#define AS_NAME(name) #name,

enum { EXCHANGE_FIELDS(AS_EXCHANGE_ENUM) N_EXCHANGE_FIELDS };
enum { MESSAGE_FIELDS(AS_MESSAGE_ENUM) N_MESSAGE_FIELDS };
static const char *const exchange_names[] = {EXCHANGE_FIELDS(AS_NAME)};
static const char *const message_names[] = {MESSAGE_FIELDS(AS_NAME)};

static PyTypeObject *ExchangeType, *MessageType;
static Py_ssize_t exchange_at[N_EXCHANGE_FIELDS], message_at[N_MESSAGE_FIELDS];

/* A Record's identity: what stays the same for every record of a connection, encoded
 * once per connection by jsonl.py ("run": node, agent_id; "conn": the rest), and
 * checked field by field here (== as a tuple compares: identity first).  I_<name>: the
 * field's place in the identity tuple. */
#define IDENTITY_FIELDS(X) X(node) X(agent_id) X(pid) X(comm) X(cgroup_id) X(container_id) \
    X(pod) X(source) X(fd) X(local) X(remote) X(role)
#define AS_IDENTITY_ENUM(name) I_##name,
enum { IDENTITY_FIELDS(AS_IDENTITY_ENUM) N_IDENTITY_FIELDS };
static const char *const identity_names[] = {IDENTITY_FIELDS(AS_NAME)};

/* agent.records._record.Record, its subclasses too: a record's fields are read at
 * their place in its layout, RECORD(r)->name (the layout _record.c builds it from). */
static PyTypeObject *RecordType;
#define RECORD(obj) ((RecordObject *)(obj))

#define INLINE static inline __attribute__((always_inline))

/* A slot's value (borrowed), or NULL if unset. */
#define SLOT(obj, at) (*(PyObject **)((char *)(obj) + (at)))

/* Bytes a character of text takes once escaped: 1 (as is), 2 (\" \\ \n ...) or 6. */
static unsigned char ascii_width[128];
static const char HEX[] = "0123456789abcdef";

/* -- the output: a bytes object grown as needed --------------------------------------- */

typedef struct {
    PyObject *bytes; /* its size is the capacity */
    char *p;         /* PyBytes_AS_STRING(bytes) */
    Py_ssize_t len, cap;
} Out;

/* Grows the output to hold n more bytes, or -1 (MemoryError). */
static int grow(Out *o, Py_ssize_t n) {
    if (n > PY_SSIZE_T_MAX - o->len) {
        PyErr_NoMemory();
        return -1;
    }
    Py_ssize_t need = o->len + n;
    Py_ssize_t cap = o->cap <= PY_SSIZE_T_MAX / 2 ? o->cap * 2 : PY_SSIZE_T_MAX;
    if (cap < need)
        cap = need;
    if (_PyBytes_Resize(&o->bytes, cap) < 0) /* frees it and sets NULL on failure */
        return -1;
    o->p = PyBytes_AS_STRING(o->bytes);
    o->cap = cap;
    return 0;
}

/* Room for n more bytes.  Always inline, as put(): most writes are a few bytes of
 * literal text, which then compile to a compare and a few moves, not a memcpy call. */
INLINE int reserve(Out *o, Py_ssize_t n) {
    return n <= o->cap - o->len ? 0 : grow(o, n);
}

INLINE int put(Out *o, const char *s, Py_ssize_t n) {
    if (reserve(o, n) < 0)
        return -1;
    memcpy(o->p + o->len, s, (size_t)n);
    o->len += n;
    return 0;
}

/* A literal, e.g. PUT(o, ",\"ts_ns\":") */
#define PUT(o, lit) put((o), (lit), (Py_ssize_t)(sizeof(lit) - 1))
/* A literal as a (text, length) argument pair. */
#define LIT(lit) (lit), (Py_ssize_t)(sizeof(lit) - 1)

static int unsupported(const char *what) {
    PyErr_Format(PyExc_TypeError, "_json_lines: %s", what);
    return -1;
}

/* What finish() leaves unused at the end of a line rather than give back. */
#define SLACK 1024

/* The output as a bytes object of its length, a new reference; NULL on error (it is
 * released).  The first guess at a line's size (line_of(), size_hint()) is over by a
 * few hundred bytes: up to SLACK of them are kept and only the size set, where giving
 * them back (_PyBytes_Resize, a realloc) cost ~300 instructions a line.  A bytes
 * object's memory is freed whatever its size says, and a line lives only until the
 * sink has written it. */
static PyObject *finish(Out *o) {
    if (o->cap - o->len <= SLACK) {
        Py_SET_SIZE(o->bytes, o->len);
        o->p[o->len] = '\0'; /* as every bytes object ends */
        return o->bytes;
    }
    return _PyBytes_Resize(&o->bytes, o->len) < 0 ? NULL : o->bytes;
}

/* -- values ------------------------------------------------------------------------- */

/* as_int64()'s general case: an int beyond 3 digits of 30 bits, or not a long long. */
static int as_int64_checked(PyObject *v, long long *x) {
    int overflow = 0;
    *x = PyLong_AsLongLongAndOverflow(v, &overflow);
    if (overflow)
        return unsupported("an int beyond 64 bits");
    return *x == -1 && PyErr_Occurred() ? -1 : 0;
}

/* A C long long from an exact int (bool and subclasses go to the Python path), or
 * -1 with TypeError.  An int of up to 3 digits of 30 bits under 2^63 (every count,
 * offset and size here, and every timestamp in nanoseconds until 2262) is read from
 * its digits, inline: PyLong_AsLongLongAndOverflow's call and checks, and this
 * function's own call, were ~45 instructions of an int's ~110. */
INLINE int as_int64(PyObject *v, long long *x) {
    if (v == NULL || !PyLong_CheckExact(v))
        return unsupported("an int field holds something else");
#if PY_VERSION_HEX < 0x030C0000 && PyLong_SHIFT == 30 /* 3.12 keeps the size elsewhere */
    Py_ssize_t size = Py_SIZE(v);
    const digit *d = ((PyLongObject *)v)->ob_digit;
    unsigned long long u;
    switch (size < 0 ? -size : size) {
    case 0: *x = 0; return 0; /* (0 may have no digit) */
    case 1: u = d[0]; break;
    case 2: u = d[0] | (unsigned long long)d[1] << 30; break;
    case 3:
        if (d[2] >= 8) /* 2^63 or more */
            return as_int64_checked(v, x);
        u = d[0] | (unsigned long long)d[1] << 30 | (unsigned long long)d[2] << 60;
        break;
    default: return as_int64_checked(v, x);
    }
    *x = size < 0 ? -(long long)u : (long long)u;
    return 0;
#else
    return as_int64_checked(v, x);
#endif
}

/* x in decimal, as int.__repr__: by hand, straight into the output (snprintf cost
 * ~0.1 us a number, a timestamp has 19 digits, and even a memcpy call from a digit
 * buffer showed in profiles). */
static char digit_pairs[200]; /* "00" "01" ... "99" */

static const unsigned long long POW10[20] = {
    1ULL, 10ULL, 100ULL, 1000ULL, 10000ULL, 100000ULL, 1000000ULL, 10000000ULL,
    100000000ULL, 1000000000ULL, 10000000000ULL, 100000000000ULL, 1000000000000ULL,
    10000000000000ULL, 100000000000000ULL, 1000000000000000ULL, 10000000000000000ULL,
    100000000000000000ULL, 1000000000000000000ULL, 10000000000000000000ULL};

/* How many decimal digits u has: t = floor(bits * log10(2)) (1233 / 4096 is close
 * enough for 64 bits) is that count or one less, and one compare tells which, where
 * a loop of compares took up to 19 multiplies.  (u | 1: 0 has one digit; no power of
 * ten above 1 is odd, so it changes no other answer.) */
INLINE int decimal_digits(unsigned long long u) {
    int t = (64 - __builtin_clzll(u | 1)) * 1233 >> 12;
    return t + ((u | 1) >= POW10[t]);
}

/* The 8 decimal digits of u < 10^8, leading zeros included, as the 8 bytes of a word
 * (the first digit in the low byte): u split into two 4-digit halves in 32-bit lanes,
 * each into 2-digit quarters in 16-bit lanes, each into digits in bytes, a multiply
 * and a shift (x / 100 = x * 10486 >> 20 for x < 10^4, x / 10 = x * 103 >> 10 for
 * x < 100) doing every lane at once; where two digits a step, each a division by
 * 100, took ~17 instructions per two. */
INLINE uint64_t eight_digits(uint32_t u) {
    uint64_t v = u / 10000 | (uint64_t)(u % 10000) << 32;
    uint64_t q = (v * 10486 >> 20) & 0x0000007f0000007fULL;
    v = q | (v - q * 100) << 16;
    q = (v * 103 >> 10) & 0x000f000f000f000fULL;
    v = q | (v - q * 10) << 8;
    return v + 0x3030303030303030ULL; /* '0' added to each */
}

/* Writes u's last n digits (1..8; u < 10^8, leading zeros included) at w, and 8 - n
 * bytes of zeros after them, in room the next write takes. */
INLINE void put_digits(char *w, uint32_t u, int n) {
    uint64_t d = eight_digits(u) >> (8 * (8 - n)); /* the leading zeros shifted out */
    memcpy(w, &d, 8);
}

/* Room for the sign, 19 digits and the 8-byte store of the last part. */
#define INT_ROOM 28

static int put_int64(Out *o, long long x);

/* put_int64() once it has room: apart, and tail-called, so that put_int64() calls
 * nothing and keeps its values in registers that need no saving. */
static __attribute__((noinline)) int put_int64_grown(Out *o, long long x) {
    return grow(o, INT_ROOM) < 0 ? -1 : put_int64(o, x);
}

static int put_int64(Out *o, long long x) {
    if (o->cap - o->len < INT_ROOM)
        return put_int64_grown(o, x);
    char *w = o->p + o->len;
    unsigned long long u = (unsigned long long)x;
    if (x < 0) {
        *w++ = '-';
        u = 0ULL - u;
    }
    if (u < 10) {
        *w++ = (char)('0' + u);
    } else if (u < 100) {
        memcpy(w, digit_pairs + 2 * u, 2);
        w += 2;
    } else {
        int len = decimal_digits(u); /* at most 19 (|x| <= 2^63) */
        if (len <= 8) { /* the leading part first: each part's store runs into the next */
            put_digits(w, (uint32_t)u, len);
        } else if (len <= 16) {
            put_digits(w, (uint32_t)(u / 100000000), len - 8);
            put_digits(w + len - 8, (uint32_t)(u % 100000000), 8);
        } else {
            unsigned long long high = u / 100000000;
            put_digits(w, (uint32_t)(high / 100000000), len - 16);
            put_digits(w + len - 16, (uint32_t)(high % 100000000), 8);
            put_digits(w + len - 8, (uint32_t)(u % 100000000), 8);
        }
        w += len;
    }
    o->len = w - o->p;
    return 0;
}

static int put_int(Out *o, PyObject *v) {
    long long x;
    return as_int64(v, &x) < 0 ? -1 : put_int64(o, x);
}

static int put_bool(Out *o, PyObject *v) {
    if (v == Py_True)
        return PUT(o, "true");
    if (v == Py_False)
        return PUT(o, "false");
    return unsupported("a bool field holds something else");
}

/* Whether 8 ASCII bytes (all below 0x80: put_text() reads ASCII strings only) hold
 * one that json.dumps escapes: a control character, a quote, a backslash or DEL.  In
 * each term a byte's high bit comes on exactly when it is such a byte (below 0x20,
 * equal to one of them, 0x7f + 1); a borrow only ever crosses out of a byte that is
 * one already, so the answer for the word is exact. */
#define ONES 0x0101010101010101ULL
#define HIGHS 0x8080808080808080ULL
INLINE int needs_escape(uint64_t x) {
    return (((x - ONES * 0x20) | ((x ^ ONES * '"') - ONES) | ((x ^ ONES * '\\') - ONES) |
             (x + ONES)) & HIGHS) != 0;
}

/* The escaped length of code point c (without the quotes). */
static Py_ssize_t escaped_width(Py_UCS4 c) {
    if (c < 128)
        return ascii_width[c];
    return c >= 0x10000 ? 12 : 6;
}

static char *put_u(char *w, Py_UCS4 c) {
    w[0] = '\\';
    w[1] = 'u';
    w[2] = HEX[(c >> 12) & 0xf];
    w[3] = HEX[(c >> 8) & 0xf];
    w[4] = HEX[(c >> 4) & 0xf];
    w[5] = HEX[c & 0xf];
    return w + 6;
}

static inline char *put_escaped(char *w, Py_UCS4 c) {
    if (c < 128 && ascii_width[c] == 1) {
        *w++ = (char)c;
        return w;
    }
    switch (c) {
    case '"': *w++ = '\\'; *w++ = '"'; return w;
    case '\\': *w++ = '\\'; *w++ = '\\'; return w;
    case '\b': *w++ = '\\'; *w++ = 'b'; return w;
    case '\f': *w++ = '\\'; *w++ = 'f'; return w;
    case '\n': *w++ = '\\'; *w++ = 'n'; return w;
    case '\r': *w++ = '\\'; *w++ = 'r'; return w;
    case '\t': *w++ = '\\'; *w++ = 't'; return w;
    default: break;
    }
    if (c >= 0x10000) { /* a surrogate pair, as json.dumps writes it */
        Py_UCS4 v = c - 0x10000;
        w = put_u(w, 0xd800 | ((v >> 10) & 0x3ff));
        return put_u(w, 0xdc00 | (v & 0x3ff));
    }
    return put_u(w, c); /* control characters, DEL, the BMP (lone surrogates too) */
}

/* Short ASCII text (nearly every string here: header names and values, methods,
 * targets) in one pass: room for the worst case (6 bytes a character) is reserved,
 * and 16 characters at a time are copied while none needs escaping. */
#define SHORT_TEXT 4096
/* The room write_short_ascii() takes for n characters: the worst case, the quotes,
 * and 8 bytes for the store of a short last word. */
#define SHORT_ROOM(n) ((n) * 6 + 10)

/* A compact ASCII str's characters (PyUnicode_1BYTE_DATA) come right after its
 * header, which write_short_ascii() reads into (below). */
_Static_assert(sizeof(PyASCIIObject) >= 16, "a str's header is at least 16 bytes");

INLINE int is_short_ascii(PyObject *v) {
    /* (a legacy string, possible before 3.12, is not compact: not IS_ASCII) */
    return PyUnicode_Check(v) && PyUnicode_IS_COMPACT_ASCII(v) &&
           PyUnicode_GET_LENGTH(v) <= SHORT_TEXT;
}

/* n ASCII characters as a JSON string at w, escaped one by one: a string with one
 * that json.dumps escapes (rare here).  Apart, and tail-called, so that the few
 * registers write_short_ascii() needs are not saved and restored on every call. */
static __attribute__((noinline)) char *write_escaped(char *w, const Py_UCS1 *s, Py_ssize_t n) {
    *w++ = '"';
    for (Py_ssize_t k = 0; k < n; k++)
        w = put_escaped(w, s[k]);
    *w++ = '"';
    return w;
}

/* 16 bytes in a vector register (SSE2, NEON: GCC's and clang's vector extensions). */
typedef unsigned char Bytes16 __attribute__((vector_size(16)));
typedef uint64_t Words2 __attribute__((vector_size(16)));

/* 0xff for each of 16 ASCII bytes that json.dumps escapes (a control character, a
 * quote, a backslash or DEL), 0 for the others. */
INLINE Bytes16 escapes16(Bytes16 v) {
    return (Bytes16)((v < 0x20) | (v == '"') | (v == '\\') | (v == 0x7f));
}

INLINE int any16(Bytes16 v) {
    Words2 w = (Words2)v;
    return (w[0] | w[1]) != 0;
}

/* 16 bytes of 0, then 16 of 0xff: from LAST_N + n, the 16 bytes that keep the last n
 * of a vector. */
static const unsigned char LAST_N[32] = {
    0,    0,    0,    0,    0,    0,    0,    0,    0,    0,    0,    0,    0,    0,    0,    0,
    0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff};

/* Writes the n characters s of a compact ASCII str (is_short_ascii()) as a JSON
 * string at w, which has SHORT_ROOM(n) bytes of room; returns its end.  16 characters
 * at a time are checked and copied while none needs escaping; at the first that
 * does, the string is written again from its start by write_escaped().  A string of
 * up to 16 is checked in the 16 bytes that end with it: in a string that short, the
 * first of those are the end of the str's header, never past the object (the check
 * leaves them out), where a word at a time, its last one loaded byte by byte, cost
 * ~60 instructions a string. */
static char *write_short_ascii(char *w, const Py_UCS1 *s, Py_ssize_t n) {
    char *start = w;
    *w++ = '"';
    Bytes16 v, keep;
    if (n <= 16) {
        memcpy(&v, s + n - 16, 16);
        memcpy(&keep, LAST_N + n, 16);
        if (any16(escapes16(v) & keep))
            return write_escaped(start, s, n);
        uint64_t a, b;
        if (n >= 8) { /* two words, overlapping for fewer than 16 */
            memcpy(&a, s, 8);
            memcpy(&b, s + n - 8, 8);
            memcpy(w, &a, 8);
            memcpy(w + n - 8, &b, 8);
        } else if (n > 0) { /* the last 8 bytes, shifted: what comes after is room */
            memcpy(&a, s + n - 8, 8);
            a >>= 8 * (8 - n);
            memcpy(w, &a, 8);
        }
    } else {
        for (Py_ssize_t k = 0; n - k > 16; k += 16) {
            memcpy(&v, s + k, 16);
            if (any16(escapes16(v)))
                return write_escaped(start, s, n);
            memcpy(w + k, &v, 16);
        }
        memcpy(&v, s + n - 16, 16); /* the last 16: again some already written, the same */
        if (any16(escapes16(v)))
            return write_escaped(start, s, n);
        memcpy(w + n - 16, &v, 16);
    }
    w += n;
    *w++ = '"';
    return w;
}

/* Any other str (not ASCII, or long), in two passes: the escaped length first
 * (exact, so a long string reserves what it needs and no more), then the bytes. */
static int put_text(Out *o, PyObject *v) {
#if PY_VERSION_HEX < 0x030C0000 /* legacy strings; 3.12 has none (and deprecates this) */
    if (PyUnicode_READY(v) < 0)
        return -1;
#endif
    Py_ssize_t n = PyUnicode_GET_LENGTH(v);
    int kind = PyUnicode_KIND(v);
    const void *data = PyUnicode_DATA(v);
    /* At most 12 bytes per code point: no overflow below this bound. */
    if (n > (PY_SSIZE_T_MAX - 2) / 12)
        return (PyErr_NoMemory(), -1);
    Py_ssize_t width = 0;
    if (kind == PyUnicode_1BYTE_KIND) {
        const Py_UCS1 *s = data;
        Py_ssize_t k = 0;
        if (PyUnicode_IS_ASCII(v)) /* 8 characters at a time while none needs escaping */
            for (; n - k >= 8; k += 8) {
                uint64_t x;
                memcpy(&x, s + k, 8);
                if (needs_escape(x)) {
                    for (int j = 0; j < 8; j++)
                        width += ascii_width[s[k + j]];
                } else {
                    width += 8;
                }
            }
        for (; k < n; k++)
            width += s[k] < 128 ? ascii_width[s[k]] : 6;
    } else {
        for (Py_ssize_t k = 0; k < n; k++)
            width += escaped_width(PyUnicode_READ(kind, data, k));
    }
    if (reserve(o, width + 2) < 0)
        return -1;
    char *w = o->p + o->len;
    *w++ = '"';
    if (width == n && kind == PyUnicode_1BYTE_KIND) { /* nothing to escape */
        memcpy(w, data, (size_t)n);
        w += n;
    } else if (kind == PyUnicode_1BYTE_KIND) {
        const Py_UCS1 *s = data;
        for (Py_ssize_t k = 0; k < n; k++)
            w = put_escaped(w, s[k]);
    } else {
        for (Py_ssize_t k = 0; k < n; k++)
            w = put_escaped(w, PyUnicode_READ(kind, data, k));
    }
    *w++ = '"';
    o->len = w - o->p;
    return 0;
}

/* A str as a JSON string. */
INLINE int put_str(Out *o, PyObject *v) {
    if (v == NULL || !PyUnicode_Check(v))
        return unsupported("a str field holds something else");
    if (!is_short_ascii(v))
        return put_text(o, v);
    Py_ssize_t n = PyUnicode_GET_LENGTH(v);
    if (reserve(o, SHORT_ROOM(n)) < 0)
        return -1;
    o->len = write_short_ascii(o->p + o->len, PyUnicode_1BYTE_DATA(v), n) - o->p;
    return 0;
}

/* A list of str as a JSON array. */
static int put_str_list(Out *o, PyObject *v) {
    if (v == NULL || !PyList_Check(v))
        return unsupported("notes or redactions is not a list");
    if (PUT(o, "[") < 0)
        return -1;
    for (Py_ssize_t k = 0; k < PyList_GET_SIZE(v); k++)
        if ((k && PUT(o, ",") < 0) || put_str(o, PyList_GET_ITEM(v, k)) < 0)
            return -1;
    return PUT(o, "]");
}

/* Headers or trailers, (name, value) pairs, as an array of 2-element arrays. */
static int put_pairs(Out *o, PyObject *v) {
    if (v == NULL || !PyList_Check(v))
        return unsupported("headers or trailers is not a list");
    if (PUT(o, "[") < 0)
        return -1;
    for (Py_ssize_t k = 0; k < PyList_GET_SIZE(v); k++) {
        PyObject *pair = PyList_GET_ITEM(v, k);
        if (!PyTuple_Check(pair) || PyTuple_GET_SIZE(pair) != 2)
            return unsupported("a header is not a (name, value) tuple");
        PyObject *name = PyTuple_GET_ITEM(pair, 0), *value = PyTuple_GET_ITEM(pair, 1);
        if (is_short_ascii(name) && is_short_ascii(value)) { /* one reservation for both */
            Py_ssize_t n = PyUnicode_GET_LENGTH(name), m = PyUnicode_GET_LENGTH(value);
            if (reserve(o, SHORT_ROOM(n) + SHORT_ROOM(m) + 3) < 0)
                return -1;
            char *w = o->p + o->len;
            if (k)
                *w++ = ',';
            *w++ = '[';
            w = write_short_ascii(w, PyUnicode_1BYTE_DATA(name), n);
            *w++ = ',';
            w = write_short_ascii(w, PyUnicode_1BYTE_DATA(value), m);
            *w++ = ']';
            o->len = w - o->p;
        } else if ((k && PUT(o, ",") < 0) || PUT(o, "[") < 0 || put_str(o, name) < 0 ||
                   PUT(o, ",") < 0 || put_str(o, value) < 0 || PUT(o, "]") < 0) {
            return -1;
        }
    }
    return PUT(o, "]");
}

/* -- base64, written straight into the line ----------------------------------------- */

static const char B64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/* Standard base64 with padding of n bytes, one table look-up per character: the tail
 * the vector loop leaves, and CPUs without AVX2.  Returns the end of what it wrote. */
static char *b64_scalar(char *w, const unsigned char *s, Py_ssize_t n) {
    Py_ssize_t i = 0;
    for (; n - i >= 3; i += 3, w += 4) {
        uint32_t v = (uint32_t)s[i] << 16 | (uint32_t)s[i + 1] << 8 | s[i + 2];
        w[0] = B64[v >> 18];
        w[1] = B64[v >> 12 & 63];
        w[2] = B64[v >> 6 & 63];
        w[3] = B64[v & 63];
    }
    if (n - i > 0) {
        uint32_t v = (uint32_t)s[i] << 16 | (n - i == 2 ? (uint32_t)s[i + 1] << 8 : 0);
        w[0] = B64[v >> 18];
        w[1] = B64[v >> 12 & 63];
        w[2] = n - i == 2 ? B64[v >> 6 & 63] : '=';
        w[3] = '=';
        w += 4;
    }
    return w;
}

#if defined(__x86_64__)
#include <immintrin.h>
/* 24 bytes -> 32 characters per step, the technique of Muła and Lemire ("Faster
 * Base64 Encoding and Decoding Using AVX2 Instructions", 2018): a byte shuffle puts
 * each 3-byte group in a 32-bit lane as [b1 b0 b2 b1]; two masked 16-bit multiplies
 * move the four 6-bit indices into the lane's four bytes; a 16-entry shuffle table
 * then gives the offset that turns each index into its character (A-Z, a-z, 0-9, +,
 * /).  Each 128-bit half takes 12 bytes: the low half loads bytes 0..15, the high
 * half 8..23 and takes its 4..15, so a step reads its 24 bytes and no more.  Writes
 * at w the characters of s's 3-byte groups (all but its last 0..2 bytes) and returns
 * how many bytes they are; 0 for fewer than 24 (b64_scalar's).  Steps of 24 bytes,
 * then one over the 24 bytes that end with the last group, which writes again, the
 * same, what the step before wrote of them: the table loop cost ~20 instructions a
 * group, and a tail has up to 7. */
__attribute__((target("avx2"))) static Py_ssize_t b64_avx2(char *w, const unsigned char *s,
                                                          Py_ssize_t n) {
    const __m256i spread = _mm256_setr_epi8(1, 0, 2, 1, 4, 3, 5, 4, 7, 6, 8, 7, 10, 9, 11, 10,
                                            5, 4, 6, 5, 8, 7, 9, 8, 11, 10, 12, 11, 14, 13, 15, 14);
    const __m256i offsets = _mm256_setr_epi8(
        'A', 'a' - 26, '0' - 52, '0' - 52, '0' - 52, '0' - 52, '0' - 52, '0' - 52, '0' - 52,
        '0' - 52, '0' - 52, '0' - 52, '+' - 62, '/' - 63, 0, 0, 'A', 'a' - 26, '0' - 52, '0' - 52,
        '0' - 52, '0' - 52, '0' - 52, '0' - 52, '0' - 52, '0' - 52, '0' - 52, '0' - 52, '+' - 62,
        '/' - 63, 0, 0);
    const __m256i mask02 = _mm256_set1_epi32(0x0fc0fc00), mul02 = _mm256_set1_epi32(0x04000040);
    const __m256i mask13 = _mm256_set1_epi32(0x003f03f0), mul13 = _mm256_set1_epi32(0x01000010);
    const __m256i c51 = _mm256_set1_epi8(51), c25 = _mm256_set1_epi8(25);
    /* One step: the 24 bytes at S to the 32 characters at W. */
#define B64_STEP(S, W)                                                                          \
    do {                                                                                       \
        __m128i lo = _mm_loadu_si128((const __m128i *)(S));                                    \
        __m128i hi = _mm_loadu_si128((const __m128i *)((S) + 8));                              \
        __m256i in = _mm256_shuffle_epi8(                                                      \
            _mm256_inserti128_si256(_mm256_castsi128_si256(lo), hi, 1), spread);               \
        /* [b1 b0 b2 b1]: index 0 is b0's top 6 bits, 2 the middle of b1:b2 (mulhi         \
         * shifts them down to bytes 0 and 2); 1 and 3 go up into bytes 1 and 3. */          \
        __m256i i02 = _mm256_mulhi_epu16(_mm256_and_si256(in, mask02), mul02);                 \
        __m256i i13 = _mm256_mullo_epi16(_mm256_and_si256(in, mask13), mul13);                 \
        __m256i index = _mm256_or_si256(i02, i13);                                             \
        /* Which offset: 0..25 -> 0 ('A'), 26..51 -> 1, 52..61 -> 2..11, 62 -> 12, 63 -> 13: \
         * a saturated 51 less, then 1 more from 26 on (less the compare's -1; as Klomp's     \
         * base64 library does, a step fewer than an and and an or of 13 for 0..25). */       \
        __m256i which = _mm256_subs_epu8(index, c51);                                          \
        which = _mm256_sub_epi8(which, _mm256_cmpgt_epi8(index, c25));                         \
        __m256i text = _mm256_add_epi8(_mm256_shuffle_epi8(offsets, which), index);            \
        _mm256_storeu_si256((__m256i *)(W), text);                                             \
    } while (0)
    Py_ssize_t end = n / 3 * 3; /* the groups' end */
    if (end < 24)
        return 0;
    const unsigned char *stop = s + end, *last = stop - 24;
    /* Two steps a turn: the loop's own instructions were a fifth of a step's. */
    for (; last - s >= 24; s += 48, w += 64) {
        B64_STEP(s, w);
        B64_STEP(s + 24, w + 32);
    }
    if (s <= last) {
        B64_STEP(s, w);
        s += 24;
        w += 32;
    }
    if (s < stop) /* the last step, back at a group's start: it overlaps the one before */
        B64_STEP(last, w + (last - s) / 3 * 4);
#undef B64_STEP
    return end;
}
static int have_avx2;
#endif

/* Writes n bytes' base64 at w (room for 4 * ceil(n / 3) characters); returns its end.
 * `simd` 0 forces the table loop (tests compare both with the standard library). */
static char *b64_write(char *w, const unsigned char *s, Py_ssize_t n, int simd) {
#if defined(__x86_64__)
    if (simd && have_avx2) {
        Py_ssize_t done = b64_avx2(w, s, n);
        return b64_scalar(w + done / 3 * 4, s + done, n - done);
    }
#endif
    (void)simd;
    return b64_scalar(w, s, n);
}

/* n bytes as a JSON string of standard base64 with padding. */
static int put_b64(Out *o, const unsigned char *s, Py_ssize_t n) {
    if (n > (PY_SSIZE_T_MAX - 2) / 4 * 3 - 3)
        return (PyErr_NoMemory(), -1);
    if (reserve(o, (n + 2) / 3 * 4 + 2) < 0)
        return -1;
    char *w = o->p + o->len;
    *w++ = '"';
    w = b64_write(w, s, n, 1);
    *w++ = '"';
    o->len = w - o->p;
    return 0;
}

/* Any buffer (a body is bytes, a payload maybe a memoryview of the ring) as a JSON
 * string of standard base64 with padding, encoded into the line itself: no
 * intermediate bytes object, no second copy.  (bytes, exact type, without taking a
 * buffer: ~60 instructions less.) */
static int put_payload(Out *o, PyObject *v) {
    if (PyBytes_CheckExact(v))
        return put_b64(o, (const unsigned char *)PyBytes_AS_STRING(v), PyBytes_GET_SIZE(v));
    Py_buffer view;
    if (PyObject_GetBuffer(v, &view, PyBUF_SIMPLE) < 0)
        return -1;
    int err = put_b64(o, view.buf, view.len);
    PyBuffer_Release(&view);
    return err;
}

/* A message body: bytes as a JSON string of standard base64 with padding. */
static int put_base64(Out *o, PyObject *v) {
    if (v == NULL || !PyBytes_Check(v))
        return unsupported("a body is not bytes");
    return put_payload(o, v);
}

/* -- the objects ---------------------------------------------------------------------- */

/* An HttpMessage (exact type) as Exchange.to_json()'s HttpMessage.to_json(). */
static int put_message(Out *o, PyObject *m) {
    if (!Py_IS_TYPE(m, MessageType))
        return unsupported("a request or response is not an HttpMessage");
#define F(name) SLOT(m, message_at[M_##name])
    if (PUT(o, "{\"ts_ns\":") < 0 || put_int(o, F(ts_ns)) < 0 ||
        PUT(o, ",\"end_ts_ns\":") < 0 || put_int(o, F(end_ts_ns)) < 0 ||
        PUT(o, ",\"method\":") < 0 || put_str(o, F(method)) < 0 ||
        PUT(o, ",\"target\":") < 0 || put_str(o, F(target)) < 0 ||
        PUT(o, ",\"authority\":") < 0 || put_str(o, F(authority)) < 0 ||
        PUT(o, ",\"status\":") < 0 || put_int(o, F(status)) < 0 ||
        PUT(o, ",\"reason\":") < 0 || put_str(o, F(reason)) < 0 ||
        PUT(o, ",\"version\":") < 0 || put_str(o, F(version)) < 0 ||
        PUT(o, ",\"headers\":") < 0 || put_pairs(o, F(headers)) < 0 ||
        PUT(o, ",\"trailers\":") < 0 || put_pairs(o, F(trailers)) < 0 ||
        PUT(o, ",\"body_b64\":") < 0 || put_base64(o, F(body)) < 0 ||
        PUT(o, ",\"body_len\":") < 0 || put_int(o, F(body_len)) < 0 ||
        PUT(o, ",\"body_truncated\":") < 0 || put_bool(o, F(body_truncated)) < 0 ||
        PUT(o, ",\"complete\":") < 0 || put_bool(o, F(complete)) < 0 || PUT(o, "}") < 0)
        return -1;
#undef F
    return 0;
}

static int put_message_or_null(Out *o, PyObject *m) {
    if (m == NULL)
        return unsupported("request or response unset");
    return m == Py_None ? PUT(o, "null") : put_message(o, m);
}

/* Exchange.latency_ns, computed as the property does. */
static int put_latency(Out *o, PyObject *request, PyObject *response) {
    if (request == NULL || response == NULL || request == Py_None || response == Py_None)
        return PUT(o, "null");
    if (!Py_IS_TYPE(request, MessageType) || !Py_IS_TYPE(response, MessageType))
        return unsupported("a request or response is not an HttpMessage");
    long long end, begin, latency;
    if (as_int64(SLOT(response, message_at[M_end_ts_ns]), &end) < 0)
        return -1;
    if (end == 0)
        return PUT(o, "null");
    if (as_int64(SLOT(request, message_at[M_ts_ns]), &begin) < 0)
        return -1;
    if (__builtin_sub_overflow(end, begin, &latency))
        return unsupported("a latency beyond 64 bits");
    return put_int64(o, latency > 0 ? latency : 0);
}

static int put_exchange(Out *o, PyObject *ex) {
#define F(name) SLOT(ex, exchange_at[EX_##name])
    PyObject *request = F(request), *response = F(response);
    if (F(grpc) != Py_None)
        return unsupported("a gRPC exchange (or grpc unset)");
    if (PUT(o, "{\"protocol\":") < 0 || put_str(o, F(protocol)) < 0 ||
        PUT(o, ",\"stream_id\":") < 0 || put_int(o, F(stream_id)) < 0 ||
        PUT(o, ",\"latency_ns\":") < 0 || put_latency(o, request, response) < 0 ||
        PUT(o, ",\"request\":") < 0 || put_message_or_null(o, request) < 0 ||
        PUT(o, ",\"response\":") < 0 || put_message_or_null(o, response) < 0 ||
        PUT(o, ",\"grpc\":null,\"notes\":") < 0 || put_str_list(o, F(notes)) < 0 ||
        PUT(o, ",\"redactions\":") < 0 || put_str_list(o, F(redactions)) < 0 ||
        PUT(o, "}") < 0)
        return -1;
#undef F
    return 0;
}

/* A first guess at the size, so that a typical exchange needs no regrowth: the
 * fixed text, the bodies' base64 and a head's worth of headers each. */
static Py_ssize_t size_hint(PyObject *ex) {
    Py_ssize_t hint = 1024;
    PyObject *sides[2] = {SLOT(ex, exchange_at[EX_request]), SLOT(ex, exchange_at[EX_response])};
    for (int k = 0; k < 2; k++) {
        PyObject *m = sides[k];
        if (m == NULL || !Py_IS_TYPE(m, MessageType))
            continue;
        PyObject *body = SLOT(m, message_at[M_body]);
        if (body != NULL && PyBytes_Check(body) && PyBytes_GET_SIZE(body) < (1 << 24))
            hint += PyBytes_GET_SIZE(body) / 3 * 4 + 4;
    }
    return hint;
}

PyDoc_STRVAR(exchange_json_doc,
             "exchange_json(exchange) -> bytes\n\n"
             "The compact, ASCII-only JSON object of an Exchange (exact type, grpc None):\n"
             "json.dumps(exchange.to_json(), separators=(',', ':')).encode(), byte for\n"
             "byte.  TypeError for anything it does not encode (a gRPC exchange, an int\n"
             "beyond 64 bits, a field of another type): the caller takes the Python path.");

static PyObject *exchange_json(PyObject *module, PyObject *ex) {
    (void)module;
    if (!Py_IS_TYPE(ex, ExchangeType))
        return PyErr_Format(PyExc_TypeError, "exchange_json: not an Exchange: %.100s",
                            Py_TYPE(ex)->tp_name);
    Out o = {NULL, NULL, 0, size_hint(ex)};
    o.bytes = PyBytes_FromStringAndSize(NULL, o.cap);
    if (o.bytes == NULL)
        return NULL;
    o.p = PyBytes_AS_STRING(o.bytes);
    if (put_exchange(&o, ex) < 0) {
        Py_XDECREF(o.bytes); /* (NULL if a grow() failed) */
        return NULL;
    }
    return finish(&o);
}

/* -- whole lines of Records ------------------------------------------------------------ */

/* Whether a record's field v (NULL: unset, TypeError) still equals what it was: 1, 0,
 * or -1.  Most often it is the very object the identity was taken from: no call then. */
INLINE int same_value(PyObject *v, PyObject *was) {
    if (v == NULL)
        return unsupported("a record field is unset");
    return v == was ? 1 : PyObject_RichCompareBool(v, was, Py_EQ);
}

/* The run and connection fragments of `cached` (identity, run, conn) if the record's
 * identity is still the one they were encoded from: 1; 0 if it is not (the caller
 * encodes them again), -1 on error. */
static int cached_identity(PyObject *record, PyObject *cached, PyObject **run, PyObject **conn) {
    if (!PyTuple_Check(cached) || PyTuple_GET_SIZE(cached) != 3)
        return unsupported("the identity cache entry is not (identity, run, conn)");
    PyObject *identity = PyTuple_GET_ITEM(cached, 0);
    *run = PyTuple_GET_ITEM(cached, 1);
    *conn = PyTuple_GET_ITEM(cached, 2);
    if (!PyTuple_Check(identity) || PyTuple_GET_SIZE(identity) != N_IDENTITY_FIELDS ||
        !PyBytes_Check(*run) || !PyBytes_Check(*conn))
        return unsupported("the identity cache entry is not (identity, run, conn)");
    int same;
#define SAME(name)                                                                             \
    if ((same = same_value(RECORD(record)->name, PyTuple_GET_ITEM(identity, I_##name))) <= 0)   \
        return same;
    IDENTITY_FIELDS(SAME)
#undef SAME
    return 1;
}

static int put_bytes(Out *o, PyObject *v) {
    return put(o, PyBytes_AS_STRING(v), PyBytes_GET_SIZE(v));
}

/* '{"type":"<type>","ts_ns":N,<run>,"seq":N,"tid":N,<conn>' -- every line's start. */
static int put_line_start(Out *o, PyObject *record, const char *start, Py_ssize_t n,
                          PyObject *run, PyObject *conn) {
#define F(name) RECORD(record)->name
    return put(o, start, n) < 0 || put_int(o, F(ts_ns)) < 0 || PUT(o, ",") < 0 ||
           put_bytes(o, run) < 0 || PUT(o, ",\"seq\":") < 0 || put_int(o, F(seq)) < 0 ||
           PUT(o, ",\"tid\":") < 0 || put_int(o, F(tid)) < 0 || PUT(o, ",") < 0 ||
           put_bytes(o, conn) < 0
               ? -1
               : 0;
#undef F
}

static int put_data_line(Out *o, PyObject *record, PyObject *run, PyObject *conn) {
#define F(name) RECORD(record)->name
    PyObject *direction = F(direction), *truncated = F(truncated), *data = F(data);
    if (direction == NULL || truncated == NULL || data == NULL)
        return unsupported("a record field is unset");
    int is_truncated = PyObject_IsTrue(truncated);
    if (is_truncated < 0)
        return -1;
    if (put_line_start(o, record, LIT("{\"type\":\"data\",\"ts_ns\":"), run, conn) < 0 ||
        PUT(o, ",\"direction\":") < 0)
        return -1;
    /* An unset direction (None, "") is written as egress, as Record.to_json() does. */
    int err = direction == Py_None || (PyUnicode_Check(direction) &&
                                       PyUnicode_GET_LENGTH(direction) == 0)
                  ? PUT(o, "\"egress\"")
                  : put_str(o, direction);
    if (err < 0 || PUT(o, ",\"offset\":") < 0 || put_int(o, F(offset)) < 0 ||
        PUT(o, ",\"len\":") < 0 || put_int(o, F(len)) < 0 ||
        PUT(o, ",\"captured_len\":") < 0 || put_int(o, F(captured_len)) < 0 ||
        (is_truncated ? PUT(o, ",\"truncated\":true") : PUT(o, ",\"truncated\":false")) < 0 ||
        PUT(o, ",\"data_b64\":") < 0 || put_payload(o, data) < 0 ||
        PUT(o, ",\"protocol\":") < 0 || put_str(o, F(protocol)) < 0 ||
        PUT(o, ",\"redactions\":") < 0 || put_str_list(o, F(redactions)) < 0 ||
        PUT(o, "}\n") < 0)
        return -1;
#undef F
    return 0;
}

/* The exchange line; `member`: the exchange's JSON already encoded, or None (then it
 * is encoded here, TypeError for one this module does not take). */
static int put_exchange_line(Out *o, PyObject *record, PyObject *run, PyObject *conn,
                             PyObject *member) {
    PyObject *ex = RECORD(record)->exchange;
    if (member == Py_None && (ex == NULL || !Py_IS_TYPE(ex, ExchangeType)))
        return unsupported("the record's exchange is not an Exchange");
    if (member != Py_None && !PyBytes_Check(member))
        return unsupported("the exchange member is not bytes");
    if (put_line_start(o, record, LIT("{\"type\":\"exchange\",\"ts_ns\":"), run, conn) < 0 ||
        PUT(o, ",\"protocol\":") < 0 || put_str(o, RECORD(record)->protocol) < 0 ||
        PUT(o, ",\"exchange\":") < 0 ||
        (member == Py_None ? put_exchange(o, ex) : put_bytes(o, member)) < 0 ||
        PUT(o, "}\n") < 0)
        return -1;
    return 0;
}

/* The line of `record` (a Record), a new reference; None if `cached` no longer holds
 * its identity; NULL on error.  `member`: for an exchange line, as exchange_line(). */
static PyObject *line_of(PyObject *record, PyObject *cached, PyObject *member, int exchange) {
    PyObject *run, *conn;
    int fresh = cached_identity(record, cached, &run, &conn);
    if (fresh <= 0)
        return fresh < 0 ? NULL : Py_NewRef(Py_None);
    Py_ssize_t cap = 512 + PyBytes_GET_SIZE(run) + PyBytes_GET_SIZE(conn);
    if (exchange) {
        PyObject *ex = RECORD(record)->exchange;
        cap += member != Py_None && PyBytes_Check(member) ? PyBytes_GET_SIZE(member)
               : ex != NULL && Py_IS_TYPE(ex, ExchangeType) ? size_hint(ex)
                                                             : 0;
    } else {
        PyObject *data = RECORD(record)->data;
        Py_ssize_t n = data == NULL               ? 0
                       : PyBytes_Check(data)      ? PyBytes_GET_SIZE(data)
                       : PyMemoryView_Check(data) ? PyMemoryView_GET_BUFFER(data)->len
                                                  : 0;
        if (n < (1 << 28))
            cap += n / 3 * 4 + 4;
    }
    Out o = {NULL, NULL, 0, cap};
    o.bytes = PyBytes_FromStringAndSize(NULL, o.cap);
    if (o.bytes == NULL)
        return NULL;
    o.p = PyBytes_AS_STRING(o.bytes);
    int err = exchange ? put_exchange_line(&o, record, run, conn, member)
                       : put_data_line(&o, record, run, conn);
    if (err < 0) {
        Py_XDECREF(o.bytes); /* (NULL if a grow() failed) */
        return NULL;
    }
    return finish(&o);
}

static PyObject *record_line(PyObject *const *args, Py_ssize_t nargs, int exchange) {
    if (nargs != (exchange ? 3 : 2))
        return PyErr_Format(PyExc_TypeError, "expected %d arguments", exchange ? 3 : 2);
    if (!PyObject_TypeCheck(args[0], RecordType))
        return PyErr_Format(PyExc_TypeError, "not a Record: %.100s", Py_TYPE(args[0])->tp_name);
    return line_of(args[0], args[1], exchange ? args[2] : Py_None, exchange);
}

/* Whether str v is `lit`, an ASCII word of n characters: for a compact ASCII str, a
 * length and a memcmp of a few bytes inline, where PyUnicode_CompareWithASCIIString
 * cost ~85 instructions, up to 3 times a record. */
INLINE int is_word(PyObject *v, const char *lit, Py_ssize_t n) {
    if (PyUnicode_IS_COMPACT_ASCII(v))
        return PyUnicode_GET_LENGTH(v) == n && memcmp(PyUnicode_1BYTE_DATA(v), lit, n) == 0;
    return PyUnicode_CompareWithASCIIString(v, lit) == 0; /* (not ASCII, or legacy) */
}

/* The line of a data or HTTP exchange record whose connection's identity `identities`
 * holds still, a new reference; None for any other (the caller's Python path encodes
 * it: a new connection, another record type, an exchange this module does not take);
 * NULL on error. */
static PyObject *line_of_known(PyObject *record, PyObject *identities) {
    if (!PyObject_TypeCheck(record, RecordType))
        return Py_NewRef(Py_None);
    PyObject *type = RECORD(record)->type, *conn_id = RECORD(record)->conn_id;
    if (type == NULL || conn_id == NULL || !PyUnicode_Check(type))
        return Py_NewRef(Py_None);
    int exchange;
    if (is_word(type, LIT("data")))
        exchange = 0;
    else if (is_word(type, LIT("exchange")))
        exchange = 1;
    else
        return Py_NewRef(Py_None);
    PyObject *ex = RECORD(record)->exchange;
    if (exchange && (ex == NULL || !Py_IS_TYPE(ex, ExchangeType)))
        return Py_NewRef(Py_None);
    PyObject *cached = PyDict_GetItemWithError(identities, conn_id); /* borrowed */
    if (cached == NULL)
        return PyErr_Occurred() ? NULL : Py_NewRef(Py_None);
    Py_INCREF(cached); /* nothing below runs Python code, but the dict is the caller's */
    PyObject *line = line_of(record, cached, Py_None, exchange);
    Py_DECREF(cached);
    if (line == NULL && exchange && PyErr_ExceptionMatches(PyExc_TypeError)) {
        PyErr_Clear(); /* one exchange_json() does not take: the Python path's */
        return Py_NewRef(Py_None);
    }
    return line;
}

PyDoc_STRVAR(encode_lines_doc,
             "encode_lines(records, identities, encode) -> lines\n\n"
             "The JSON lines of a batch of records, in order: a data or exchange record's\n"
             "as data_line() or exchange_line(record, cached, None) make it with cached =\n"
             "identities[record.conn_id]; encode(record) for any other (another record\n"
             "type, a connection not in `identities` or whose identity changed, an\n"
             "exchange those do not take), which may add its connection to `identities`\n"
             "for the records after it.  A close record's connection leaves `identities`.");

/* After a close record: its connection's identity is not needed again (a reused
 * conn_id is a new connection); 0 or -1. */
static int forget_if_closed(PyObject *record, PyObject *identities) {
    PyObject *type, *conn_id;
    if (PyObject_TypeCheck(record, RecordType)) {
        type = Py_XNewRef(RECORD(record)->type);
        conn_id = Py_XNewRef(RECORD(record)->conn_id);
    } else {
        type = PyObject_GetAttrString(record, "type");
        conn_id = type == NULL ? NULL : PyObject_GetAttrString(record, "conn_id");
        if (conn_id == NULL) {
            Py_XDECREF(type);
            return -1;
        }
    }
    int err = 0;
    if (type != NULL && conn_id != NULL && PyUnicode_Check(type) &&
        is_word(type, LIT("close"))) {
        err = PyDict_Contains(identities, conn_id);
        if (err > 0)
            err = PyDict_DelItem(identities, conn_id);
    }
    Py_XDECREF(type);
    Py_XDECREF(conn_id);
    return err;
}

static PyObject *encode_lines(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    if (nargs != 3 || !PyList_Check(args[0]) || !PyDict_Check(args[1]))
        return PyErr_Format(PyExc_TypeError, "encode_lines(records: list, identities: dict, "
                                             "encode)");
    PyObject *records = args[0];
    Py_ssize_t n = PyList_GET_SIZE(records);
    PyObject *lines = PyList_New(n);
    if (lines == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        /* encode() is Python code: the list is checked, and its item held, around it. */
        if (i >= PyList_GET_SIZE(records)) {
            PyErr_SetString(PyExc_RuntimeError, "records changed during encode_lines");
            goto fail;
        }
        PyObject *record = Py_NewRef(PyList_GET_ITEM(records, i));
        PyObject *line = line_of_known(record, args[1]);
        if (line == Py_None) {
            Py_DECREF(line);
            line = PyObject_CallOneArg(args[2], record);
            if (line != NULL && !PyBytes_Check(line)) {
                PyErr_SetString(PyExc_TypeError, "encode() must return bytes");
                Py_CLEAR(line);
            }
        }
        if (line != NULL && forget_if_closed(record, args[1]) < 0)
            Py_CLEAR(line);
        Py_DECREF(record);
        if (line == NULL)
            goto fail;
        PyList_SET_ITEM(lines, i, line);
    }
    return lines;
fail:
    Py_DECREF(lines); /* its unset items are NULL, which list dealloc skips */
    return NULL;
}

PyDoc_STRVAR(data_line_doc,
             "data_line(record, cached) -> bytes | None\n\n"
             "The JSON line (newline included) of a data Record, with the identity\n"
             "fragments of `cached` = (identity, run, conn); None when the record's\n"
             "identity (IDENTITY_FIELDS) no longer equals `identity`: encode them again.");

static PyObject *data_line(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    return record_line(args, nargs, 0);
}

PyDoc_STRVAR(exchange_line_doc,
             "exchange_line(record, cached, member) -> bytes | None\n\n"
             "The JSON line of an exchange Record, as data_line(); `member`: the\n"
             "exchange's JSON (bytes), or None to encode it here (TypeError for an\n"
             "exchange exchange_json() does not take).");

static PyObject *exchange_line(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    return record_line(args, nargs, 1);
}

/* -- the module ------------------------------------------------------------------------ */

static int load_types(void) {
    PyObject *mod = PyImport_ImportModule("agent.l7.exchange");
    if (mod == NULL)
        return -1;
    ExchangeType = (PyTypeObject *)PyObject_GetAttrString(mod, "Exchange");
    MessageType = (PyTypeObject *)PyObject_GetAttrString(mod, "HttpMessage");
    Py_DECREF(mod);
    if (ExchangeType == NULL || MessageType == NULL)
        goto fail;
    if (!PyType_Check(ExchangeType) || !PyType_Check(MessageType)) {
        PyErr_SetString(PyExc_ImportError, "_exchange_json: Exchange or HttpMessage not a class");
        goto fail;
    }
    for (int k = 0; k < N_EXCHANGE_FIELDS; k++)
        if (slot_offset(ExchangeType, exchange_names[k], &exchange_at[k]) < 0)
            goto fail;
    for (int k = 0; k < N_MESSAGE_FIELDS; k++)
        if (slot_offset(MessageType, message_names[k], &message_at[k]) < 0)
            goto fail;
    mod = PyImport_ImportModule(RECORD_MODULE);
    if (mod == NULL)
        goto fail;
    RecordType = (PyTypeObject *)PyObject_GetAttrString(mod, "Record");
    Py_DECREF(mod);
    if (RecordType == NULL)
        goto fail;
    if (!PyType_Check(RecordType) || RecordType->tp_basicsize < (Py_ssize_t)sizeof(RecordObject)) {
        PyErr_SetString(PyExc_ImportError, "_json_lines: Record not a class of _record.h's layout");
        goto fail;
    }
    return 0; /* the classes stay referenced: Py_IS_TYPE compares with them */
fail:
    Py_CLEAR(ExchangeType);
    Py_CLEAR(MessageType);
    Py_CLEAR(RecordType);
    return -1;
}

PyDoc_STRVAR(base64_doc,
"_base64(data, simd) -> bytes\n"
"\n"
"data's base64 as the lines write it; simd False forces the table loop.  For tests:\n"
"both encoders are checked against the standard library.");

static PyObject *base64_for_tests(PyObject *module, PyObject *args) {
    Py_buffer view;
    int simd;
    if (!PyArg_ParseTuple(args, "y*p", &view, &simd))
        return NULL;
    PyObject *out = PyBytes_FromStringAndSize(NULL, (view.len + 2) / 3 * 4);
    if (out != NULL)
        b64_write(PyBytes_AS_STRING(out), view.buf, view.len, simd);
    PyBuffer_Release(&view);
    return out;
}

static PyMethodDef module_methods[] = {
    {"exchange_json", (PyCFunction)exchange_json, METH_O, exchange_json_doc},
    {"data_line", (PyCFunction)(void (*)(void))data_line, METH_FASTCALL, data_line_doc},
    {"exchange_line", (PyCFunction)(void (*)(void))exchange_line, METH_FASTCALL,
     exchange_line_doc},
    {"encode_lines", (PyCFunction)(void (*)(void))encode_lines, METH_FASTCALL, encode_lines_doc},
    {"_base64", (PyCFunction)(void (*)(void))base64_for_tests, METH_VARARGS, base64_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "agent.sinks._json_lines",
    .m_doc = "Data and exchange lines, and exchanges as compact JSON, for agent/sinks/jsonl.py.",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC PyInit__json_lines(void) {
    for (int c = 0; c < 128; c++)
        ascii_width[c] = c < 0x20 || c == 0x7f ? 6 : 1;
    ascii_width['"'] = ascii_width['\\'] = ascii_width['\b'] = ascii_width['\f'] = 2;
    ascii_width['\n'] = ascii_width['\r'] = ascii_width['\t'] = 2;
    for (int k = 0; k < 100; k++) {
        digit_pairs[2 * k] = (char)('0' + k / 10);
        digit_pairs[2 * k + 1] = (char)('0' + k % 10);
    }
#if defined(__x86_64__)
    __builtin_cpu_init();
    have_avx2 = __builtin_cpu_supports("avx2");
#endif
    if (load_types() < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    PyObject *names = PyTuple_New(N_IDENTITY_FIELDS);
    for (int k = 0; names != NULL && k < N_IDENTITY_FIELDS; k++) {
        PyObject *name = PyUnicode_InternFromString(identity_names[k]);
        if (name == NULL)
            Py_CLEAR(names);
        else
            PyTuple_SET_ITEM(names, k, name);
    }
    if (names == NULL || PyModule_AddObject(m, "IDENTITY_FIELDS", names) < 0) {
        Py_XDECREF(names);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
