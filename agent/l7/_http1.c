/* HTTP/1.x exchanges of a connection, in C: agent/l7/http1.py's Http1Parser, whose
 * docstring says why it works as it does.  Two layers:
 *
 * - Framing (Framer, one per direction; also alone as the Http1Stream type): request
 *   and status lines, header blocks, Content-Length and chunked bodies, bodies read
 *   until the close.  step() parses a chunk until something happens: NEED (data used
 *   up), HEAD (a message head; its body follows), MESSAGE (a head of a message without
 *   a body, which therefore also ended), END (the body ended: body, body_len, trailers)
 *   or ERROR (a fixed reason text, never a quote of the input; the framer stays failed
 *   until reset).  A head is (ts of the chunk holding its first byte, method, target,
 *   version, headers) for requests and (ts, status, reason, version, headers) for
 *   responses; headers are (lower-case name, value) str pairs, values latin-1 with
 *   surrounding SP/HT stripped.  Stopping after each head lets the pairing decide what
 *   framing alone cannot (a response to HEAD has no body; a switch of protocol stops
 *   parsing) before the next byte is read.
 * - Pairing (the Http1Parser type): requests and responses paired first-in-first-out,
 *   1xx responses, CONNECT and Upgrade, resync after gaps, the pending limit.  An
 *   exchange in the making is kept in C and becomes Exchange and HttpMessage objects
 *   only when it is emitted.
 *
 * Why C: with llhttp driven through httptools, every message cost about nine Python
 * callbacks plus the Python work in each; with the framing here and the pairing still
 * in Python, the pairing was three quarters of the parser's CPU per exchange.  Now a
 * chunk costs one call from Python, and an exchange its few objects.
 *
 * The framing is RFC 9112's, with an observer's leniencies (it follows what the peers
 * accepted): no keep-alive checks (bytes after "Connection: close" are parsed), obs-fold
 * lines joined to the value with a space, bare LF line ends, Transfer-Encoding winning
 * over Content-Length, any byte but CR and LF in field values (as llhttp's lenient
 * header parsing).  A response's body runs to the connection's end when nothing frames
 * it; 1xx, 204 and 304 responses have none.  Methods are llhttp's and targets visible
 * ASCII, as there: bytes that only look like a request line (a resync after a gap)
 * fail rather than become a request.
 *
 * Input is untrusted (any peer's bytes, inside a privileged agent): every index is
 * checked against the buffer it reads, there is no recursion on input (held requests
 * are fed once from a response's verdict, and a request never releases them),
 * Content-Length and chunk sizes are checked for overflow, a head (or trailer section)
 * larger than MAX_HEAD is an error, a body keeps at most body_limit bytes (all are
 * counted), request bytes held behind an Upgrade at most MAX_HEAD, and more than
 * MAX_PENDING exchanges queued give up the oldest that neither side is parsing.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <limits.h>
#include <stdint.h>
#include <string.h>
#include <structmember.h>

#include "_http1_api.h"

#define MAX_HEAD (1 << 20) /* largest head or trailer section followed */
#define MAX_METHOD 24      /* the longest method token taken for one */
#define PREFIX_CHECKED 64  /* bytes of an unfinished line checked early */

enum { EV_NEED, EV_HEAD, EV_MESSAGE, EV_END, EV_ERROR };

enum {
    S_IDLE,         /* between messages: CR/LF skipped */
    S_HEAD,         /* in a head */
    S_LENGTH,       /* in a Content-Length body */
    S_EOF,          /* in a body read until the connection closes */
    S_CHUNK_SIZE,   /* in a chunk-size line, digits */
    S_CHUNK_EXT,    /* in a chunk-size line, after the digits */
    S_CHUNK_DATA,   /* in a chunk's data */
    S_CHUNK_END,    /* after a chunk's data: CRLF or LF */
    S_CHUNK_END_LF, /* after a chunk's data and CR */
    S_TRAILERS,     /* in the trailer section */
    S_FAILED,
};

/* One direction's framing state (the Http1Stream type below wraps one for Python; each
 * Http1Parser holds two). */
typedef struct {
    int response; /* parses responses (else requests) */
    int state;
    Py_ssize_t body_limit;
    long long begin_ts; /* of the message being parsed */
    /* An unfinished head or trailer section, copied: it spans chunks. */
    char *head;
    Py_ssize_t head_len, head_cap;
    Py_ssize_t line_start; /* the unfinished line's start in head */
    Py_ssize_t checked;    /* head[:checked] is made of complete lines already checked */
    /* The body of the message being parsed: the bytes object handed over at its end,
     * filled here (nothing else has seen it yet), or NULL.  Nothing is kept between
     * messages: an idle connection holds no buffer. */
    PyObject *body;
    Py_ssize_t kept;           /* bytes of it filled (at most body_limit) */
    long long body_len;        /* bytes seen */
    long long remaining;       /* of the Content-Length body or the chunk */
    int chunk_digits;          /* in the chunk-size line */
    /* Per common header name (COMMON_NAMES), the last field of a head parsed here, or
     * NULL: the next head's field with the same bytes is that same tuple (see
     * header_field).  NULL until a head has such a field. */
    PyObject **fields;
    /* The reason phrase of the last response parsed here ("OK", mostly), or NULL: the
     * next one with the same bytes is that str.  A reason carries no credential. */
    PyObject *reason;
} Framer;

/* llhttp's HTTP methods, the common first: an unknown token is taken for garbage (a
 * resync on bytes that only look like a request line must fail), as it was there. */
#define COMMON_METHODS 8
enum { METHOD_HEAD = 3, METHOD_CONNECT = 7 }; /* in METHODS */
static const char *const METHODS[] = {
    "GET", "POST", "PUT", "HEAD", "DELETE", "OPTIONS", "PATCH", "CONNECT", "TRACE", "COPY",
    "LOCK", "MKCOL", "MOVE", "PROPFIND", "PROPPATCH", "SEARCH", "UNLOCK", "BIND", "REBIND",
    "UNBIND", "ACL", "REPORT", "MKACTIVITY", "CHECKOUT", "MERGE", "M-SEARCH", "NOTIFY",
    "SUBSCRIBE", "UNSUBSCRIBE", "PURGE", "MKCALENDAR", "LINK", "UNLINK", "SOURCE", "QUERY",
    "PRI"};
#define N_METHODS ((int)(sizeof METHODS / sizeof METHODS[0]))
static PyObject *s_version_10, *s_version_11, *s_methods[COMMON_METHODS];

/* The method's index in METHODS, or -1. */
static int method_index(const char *p, Py_ssize_t n) {
    for (int k = 0; k < N_METHODS; k++)
        if ((Py_ssize_t)strlen(METHODS[k]) == n && memcmp(METHODS[k], p, (size_t)n) == 0)
            return k;
    return -1;
}

/* -- bytes ------------------------------------------------------------------------ */

/* RFC 9110 5.6.2 tchar, by byte (filled when the module loads) */
static unsigned char tchar[256];

static int is_tchar(unsigned char c) { return tchar[c]; }

static int is_ows(char c) { return c == ' ' || c == '\t'; }

/* Field values and reason phrases: any byte but a CR inside the line (a CR not before
 * its LF), as llhttp's lenient header parsing took them. */
static int is_text(const char *p, Py_ssize_t n) { return memchr(p, '\r', (size_t)n) == NULL; }

static int hex_value(char c) {
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

/* The length of the line at p (n bytes up to and including its LF), without its
 * line end (LF or CRLF). */
static Py_ssize_t line_content(const char *p, Py_ssize_t n) {
    Py_ssize_t len = n - 1;
    if (len > 0 && p[len - 1] == '\r')
        len--;
    return len;
}

static int lower_equals(const char *p, Py_ssize_t n, const char *lower) {
    Py_ssize_t k = 0;
    for (; k < n && lower[k]; k++) {
        char c = p[k];
        if (c >= 'A' && c <= 'Z')
            c = (char)(c - 'A' + 'a');
        if (c != lower[k])
            return 0;
    }
    return k == n && lower[k] == 0;
}

/* -- start lines and header lines: checked ----------------------------------------- */

/* The parts of a start line, or NULL: the reason of a parse error. */
typedef struct {
    const char *a, *b; /* method and target, or status digits and reason */
    Py_ssize_t a_len, b_len;
    int minor; /* HTTP/1.<minor> */
} StartLine;

static const char *version_at(const char *p, Py_ssize_t n, int *minor) {
    if (n != 8 || memcmp(p, "HTTP/1.", 7) != 0 || (p[7] != '0' && p[7] != '1'))
        return "Invalid HTTP version";
    *minor = p[7] - '0';
    return NULL;
}

static const char *request_line(const char *p, Py_ssize_t n, StartLine *out) {
    Py_ssize_t i = 0;
    while (i < n && ((p[i] >= 'A' && p[i] <= 'Z') || p[i] == '-' || p[i] == '_'))
        i++;
    if (i == 0 || i > MAX_METHOD || i >= n || p[i] != ' ' || method_index(p, i) < 0)
        return "Invalid method";
    out->a = p;
    out->a_len = i;
    Py_ssize_t t = ++i;
    while (i < n && (unsigned char)p[i] > ' ' && (unsigned char)p[i] < 0x7f) /* visible ASCII */
        i++;
    if (i == t || i >= n || p[i] != ' ')
        return "Invalid request target";
    out->b = p + t;
    out->b_len = i - t;
    return version_at(p + i + 1, n - i - 1, &out->minor);
}

static const char *status_line(const char *p, Py_ssize_t n, StartLine *out) {
    const char *why = version_at(p, n < 8 ? n : 8, &out->minor);
    if (why != NULL || n < 9 || p[8] != ' ')
        return why ? why : "Invalid status line";
    if (n < 12 || !(p[9] >= '0' && p[9] <= '9') || !(p[10] >= '0' && p[10] <= '9') ||
        !(p[11] >= '0' && p[11] <= '9') || (n > 12 && p[12] != ' '))
        return "Invalid status code";
    out->a = p + 9;
    out->a_len = 3;
    out->b = n > 12 ? p + 13 : p + n;
    out->b_len = n > 12 ? n - 13 : 0;
    return is_text(out->b, out->b_len) ? NULL : "Invalid reason phrase";
}

/* A header line (not a continuation): its name's length, or -1. */
static Py_ssize_t header_name(const char *p, Py_ssize_t n) {
    Py_ssize_t i = 0;
    while (i < n && is_tchar((unsigned char)p[i]))
        i++;
    return i > 0 && i < n && p[i] == ':' ? i : -1;
}

/* Whether the start of an unfinished line (n bytes, no line end yet) can still begin
 * a valid one: so a peer talking another protocol fails at once, not 1 MiB later. */
static int prefix_plausible(const char *p, Py_ssize_t n, int start_line, int response) {
    if (n > PREFIX_CHECKED)
        n = PREFIX_CHECKED;
    if (!start_line) {
        if (n == 0 || is_ows(p[0]))
            return 1;
        for (Py_ssize_t i = 0; i < n; i++) {
            if (p[i] == ':')
                return i > 0;
            if (!is_tchar((unsigned char)p[i]))
                return n == 1 && p[0] == '\r'; /* the CR of the blank line */
        }
        return 1;
    }
    if (response) {
        static const char want[] = "HTTP/1.";
        for (Py_ssize_t i = 0; i < n && i < 7; i++)
            if (p[i] != want[i])
                return 0;
        return n < 8 || p[7] == '0' || p[7] == '1';
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        if (p[i] == ' ')
            return i > 0;
        if (!((p[i] >= 'A' && p[i] <= 'Z') || p[i] == '-' || p[i] == '_') || i >= MAX_METHOD)
            return 0;
    }
    return 1;
}

/* A complete line of a head (content without its line end): NULL if it may stand
 * there, else why not. */
static const char *check_line(const Framer *s, const char *p, Py_ssize_t n, int first,
                              int trailers) {
    StartLine sl;
    if (n == 0) /* the blank line that ends the section */
        return NULL;
    if (first && !trailers)
        return s->response ? status_line(p, n, &sl) : request_line(p, n, &sl);
    if (is_ows(p[0]))
        return first ? "Unexpected whitespace after start line"
                     : is_text(p, n) ? NULL : "Invalid header value char";
    Py_ssize_t name_len = header_name(p, n);
    if (name_len < 0)
        return "Invalid header token";
    return is_text(p + name_len + 1, n - name_len - 1) ? NULL : "Invalid header value char";
}

/* -- buffers -------------------------------------------------------------------------- */

/* Grows *buf to hold `need` bytes; never past `most` (the caller checked need <= most). */
static int reserve(char **buf, Py_ssize_t *cap, Py_ssize_t need, Py_ssize_t most) {
    if (need <= *cap)
        return 0;
    Py_ssize_t grown = *cap ? *cap : 512;
    while (grown < need)
        grown = grown > most / 2 ? most : grown * 2;
    char *bigger = PyMem_Realloc(*buf, (size_t)grown);
    if (bigger == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    *buf = bigger;
    *cap = grown;
    return 0;
}

/* The head buffer is only needed while a head spans chunks (rare): not kept after. */
static void head_clear(Framer *s) {
    s->head_len = s->line_start = s->checked = 0;
    PyMem_Free(s->head);
    s->head = NULL;
    s->head_cap = 0;
}

static void body_clear(Framer *s) {
    Py_CLEAR(s->body);
    s->kept = 0;
    s->body_len = 0;
    s->remaining = 0;
    s->chunk_digits = 0;
}

/* Counts data[:n] as body and keeps what fits under body_limit.  A Content-Length
 * body's bytes object is made its final size at once; others grow by doubling. */
static int body_add(Framer *s, const char *p, Py_ssize_t n) {
    s->body_len += n;
    Py_ssize_t room = s->body_limit - s->kept;
    if (room <= 0 || n <= 0)
        return 0;
    if (n > room)
        n = room;
    Py_ssize_t size = s->body ? PyBytes_GET_SIZE(s->body) : 0;
    if (s->kept + n > size) {
        Py_ssize_t want;
        if (s->state == S_LENGTH) /* remaining still counts these n bytes */
            want = s->remaining < room ? s->kept + (Py_ssize_t)s->remaining : s->body_limit;
        else
            want = size > room / 2 ? s->body_limit : (size * 2 > 256 ? size * 2 : 256);
        if (want > s->body_limit)
            want = s->body_limit;
        if (want < s->kept + n)
            want = s->kept + n;
        if (s->body == NULL)
            s->body = PyBytes_FromStringAndSize(NULL, want);
        else
            _PyBytes_Resize(&s->body, want); /* on failure: freed, NULL */
        if (s->body == NULL) {
            s->kept = 0;
            return -1;
        }
    }
    memcpy(PyBytes_AS_STRING(s->body) + s->kept, p, (size_t)n);
    s->kept += n;
    return 0;
}

/* -- building a head ------------------------------------------------------------------ */

/* Framing found in the header fields. */
typedef struct {
    int has_te, chunked, has_cl;
    long long cl;
} Framing;

static const char *content_length(const char *p, Py_ssize_t n, Framing *f) {
    if (n == 0)
        return "Invalid character in Content-Length";
    long long v = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (p[i] < '0' || p[i] > '9')
            return "Invalid character in Content-Length";
        if (v > (LLONG_MAX - 9) / 10)
            return "Content-Length overflow";
        v = v * 10 + (p[i] - '0');
    }
    if (f->has_cl && f->cl != v)
        return "Duplicate Content-Length";
    f->has_cl = 1;
    f->cl = v;
    return NULL;
}

/* Whether a Transfer-Encoding value's last coding is chunked. */
static int ends_chunked(const char *p, Py_ssize_t n) {
    Py_ssize_t end = n;
    while (end > 0 && (is_ows(p[end - 1]) || p[end - 1] == ','))
        end--;
    Py_ssize_t start = end;
    while (start > 0 && p[start - 1] != ',')
        start--;
    while (start < end && is_ows(p[start]))
        start++;
    return lower_equals(p + start, end - start, "chunked");
}

/* Header names seen on most messages, made once: a str less to build per field.  The
 * first two are the framing headers (NAME_CONTENT_LENGTH, NAME_TRANSFER_ENCODING). */
enum { NAME_CONTENT_LENGTH, NAME_TRANSFER_ENCODING, MAX_NAME_LEN = 32, NAMES_PER_LEN = 8 };
static const char *const COMMON_NAMES[] = {
    "content-length", "transfer-encoding", "host", "user-agent", "accept", "accept-encoding", "accept-language", "authorization",
    "cookie", "set-cookie", "content-type", "content-encoding", "connection", "keep-alive", "date", "server", "cache-control", "etag",
    "last-modified", "location", "vary", "expires", "pragma", "origin", "referer", "upgrade",
    "x-request-id", "x-forwarded-for", "x-forwarded-proto", "if-none-match",
    "if-modified-since", "access-control-allow-origin", "strict-transport-security", "age",
    "via", "accept-ranges", "expect", "te", "trailer"};
#define N_NAMES ((int)(sizeof COMMON_NAMES / sizeof COMMON_NAMES[0]))
static PyObject *s_names[N_NAMES];
/* Names whose last field a connection keeps for reuse (header_field): not those that
 * carry credentials or URLs (a token in a Location or Referer), so no secret outlives
 * its exchange in a parser; values up to MAX_REUSED_VALUE bytes. */
static const char *const NOT_REUSED[] = {"authorization", "cookie", "set-cookie", "location",
                                         "origin", "referer", "x-forwarded-for"};
enum { MAX_REUSED_VALUE = 256 };
static char reusable[N_NAMES];
/* indices in COMMON_NAMES by length, -1 after the last */
static signed char names_by_len[MAX_NAME_LEN + 1][NAMES_PER_LEN + 1];

/* Each common name as words: its bytes, zero-padded, each byte ORed with 0x20.  A
 * name of the input (tchar bytes) ORed so is one of them exactly when it is that name
 * in any case: 0x20 lowers A-Z and changes no byte of a common name ([a-z0-9-]), and
 * the tchar it could come from otherwise is only that byte itself.  Eight bytes a
 * compare: lower-casing a copy and comparing it was ~150 CPU instructions a field. */
#define NAME_WORDS (MAX_NAME_LEN / 8)
#define LOWER_BITS 0x2020202020202020ULL
static uint64_t name_words[N_NAMES][NAME_WORDS];

/* The index in COMMON_NAMES of the name p[:n] (tchar bytes), or -1. */
static int common_index(const char *p, Py_ssize_t n) {
    if (n > MAX_NAME_LEN || names_by_len[n][0] < 0)
        return -1;
    uint64_t w[NAME_WORDS] = {0};
    memcpy(w, p, (size_t)n);
    int words = (int)((n + 7) / 8);
    for (int i = 0; i < words; i++)
        w[i] |= LOWER_BITS;
    for (int j = 0; names_by_len[n][j] >= 0; j++) {
        const uint64_t *c = name_words[names_by_len[n][j]];
        int i = 0;
        while (i < words && w[i] == c[i])
            i++;
        if (i == words)
            return names_by_len[n][j];
    }
    return -1;
}

/* The lower-case name; *common: its index in COMMON_NAMES, else -1. */
static PyObject *lower_name(const char *p, Py_ssize_t n, int *common) {
    char small[128];
    *common = common_index(p, n);
    if (*common >= 0)
        return Py_NewRef(s_names[*common]);
    char *buf = n <= (Py_ssize_t)sizeof small ? small : PyMem_Malloc((size_t)n);
    if (buf == NULL)
        return PyErr_NoMemory();
    for (Py_ssize_t i = 0; i < n; i++)
        buf[i] = (p[i] >= 'A' && p[i] <= 'Z') ? (char)(p[i] - 'A' + 'a') : p[i];
    PyObject *name = PyUnicode_DecodeLatin1(buf, n, NULL);
    if (buf != small)
        PyMem_Free(buf);
    return name;
}

/* One header field from its line (first_n bytes with its line end, len without) and
 * the obs-fold lines after it (n bytes in all).  The joined value is built in
 * `scratch` (room for n bytes) only when there are folds. */
static PyObject *header_field(const char *p, Py_ssize_t n, Py_ssize_t first_n, Py_ssize_t len,
                              Py_ssize_t name_len, char *scratch, Framing *f, Framer *cache,
                              const char **why) {
    const char *v = p + name_len + 1;
    Py_ssize_t vn = len - name_len - 1;
    while (vn > 0 && is_ows(v[0]))
        v++, vn--;
    while (vn > 0 && is_ows(v[vn - 1]))
        vn--;
    if (first_n < n) { /* folded: each continuation joined with one space */
        memcpy(scratch, v, (size_t)vn);
        Py_ssize_t at = vn, i = first_n;
        while (i < n) {
            const char *lf = memchr(p + i, '\n', (size_t)(n - i));
            Py_ssize_t line_n = lf - (p + i) + 1;
            const char *c = p + i;
            Py_ssize_t cn = line_content(c, line_n);
            while (cn > 0 && is_ows(c[0]))
                c++, cn--;
            while (cn > 0 && is_ows(c[cn - 1]))
                cn--;
            if (cn > 0) {
                if (at > 0)
                    scratch[at++] = ' ';
                memcpy(scratch + at, c, (size_t)cn);
                at += cn;
            }
            i += line_n;
        }
        v = scratch;
        vn = at;
    }
    int common;
    PyObject *name = lower_name(p, name_len, &common);
    if (name == NULL)
        return NULL;
    /* both are common names: lower_name hands back the one object for each */
    if (f != NULL && name == s_names[NAME_CONTENT_LENGTH]) {
        if ((*why = content_length(v, vn, f)) != NULL) {
            Py_DECREF(name);
            return NULL;
        }
    } else if (f != NULL && name == s_names[NAME_TRANSFER_ENCODING]) {
        f->has_te = 1;
        f->chunked = ends_chunked(v, vn);
    }
    /* A connection repeats most of its header fields head after head (Host, Accept,
     * Server, Content-Type, ...): a field byte-equal to the last one of its name is
     * that same tuple (immutable; redaction replaces fields, never edits them), with
     * no new strings. */
    int cached = cache != NULL && common >= 0 && reusable[common] && first_n == n &&
                 vn <= MAX_REUSED_VALUE;
    PyObject *last = cached && cache->fields ? cache->fields[common] : NULL;
    if (last != NULL) {
        PyObject *lv = PyTuple_GET_ITEM(last, 1);
        if (PyUnicode_GET_LENGTH(lv) == vn && memcmp(PyUnicode_DATA(lv), v, (size_t)vn) == 0) {
            Py_DECREF(name);
            return Py_NewRef(last);
        }
    }
    PyObject *value = PyUnicode_DecodeLatin1(v, vn, NULL);
    if (value == NULL) {
        Py_DECREF(name);
        return NULL;
    }
    PyObject *field = PyTuple_New(2);
    if (field == NULL) {
        Py_DECREF(name);
        Py_DECREF(value);
        return NULL;
    }
    PyTuple_SET_ITEM(field, 0, name);
    PyTuple_SET_ITEM(field, 1, value);
    if (cached && cache->fields == NULL &&
        (cache->fields = PyMem_Calloc(N_NAMES, sizeof(PyObject *))) == NULL) {
        Py_DECREF(field);
        return PyErr_NoMemory();
    }
    if (cached)
        Py_XSETREF(cache->fields[common], Py_NewRef(field));
    return field;
}

/* The header fields of lines p[:n] (complete lines, the blank line excluded); framing
 * into f (NULL: trailers, which frame nothing).  NULL with *why set on a parse error,
 * NULL alone on a Python error. */
static PyObject *header_list(const char *p, Py_ssize_t n, Framing *f, Framer *cache,
                             const char **why) {
    /* The fields are gathered here and the list made at its size once they are all
     * parsed (appending grew it 4, 8, 16...); past FIELDS_AT_HAND they go on in a list. */
    enum { FIELDS_AT_HAND = 32 };
    PyObject *at_hand[FIELDS_AT_HAND], *list = NULL;
    Py_ssize_t count = 0;
    char *scratch = NULL;
    Py_ssize_t i = 0;
    while (i < n) {
        const char *lf = memchr(p + i, '\n', (size_t)(n - i));
        if (lf == NULL)
            break; /* cannot happen: the lines are complete */
        Py_ssize_t line_n = lf - (p + i) + 1;
        Py_ssize_t len = line_content(p + i, line_n);
        if (len > 0 && is_ows(p[i])) { /* a fold with no field before it */
            *why = "Unexpected whitespace after start line";
            goto fail;
        }
        Py_ssize_t name_len = header_name(p + i, len);
        if (name_len < 0) {
            *why = "Invalid header token";
            goto fail;
        }
        if (!is_text(p + i + name_len + 1, len - name_len - 1)) {
            *why = "Invalid header value char";
            goto fail;
        }
        Py_ssize_t end = i + line_n, folds = 0;
        while (end < n && is_ows(p[end])) { /* obs-fold lines join this field */
            const char *next = memchr(p + end, '\n', (size_t)(n - end));
            if (next == NULL)
                break;
            if (!is_text(p + end, line_content(p + end, next - (p + end) + 1))) {
                *why = "Invalid header value char";
                goto fail;
            }
            end = next - p + 1;
            folds++;
        }
        if (folds && scratch == NULL && (scratch = PyMem_Malloc((size_t)n)) == NULL) {
            PyErr_NoMemory();
            goto fail;
        }
        PyObject *field =
            header_field(p + i, end - i, line_n, len, name_len, scratch, f, cache, why);
        if (field == NULL)
            goto fail;
        if (count < FIELDS_AT_HAND) {
            at_hand[count++] = field;
        } else {
            int err = (list == NULL && (list = PyList_New(0)) == NULL) ||
                      PyList_Append(list, field) < 0;
            Py_DECREF(field);
            if (err)
                goto fail;
        }
        i = end;
    }
    PyMem_Free(scratch);
    scratch = NULL;
    PyObject *all = PyList_New(count + (list ? PyList_GET_SIZE(list) : 0));
    if (all == NULL)
        goto fail;
    for (Py_ssize_t k = 0; k < count; k++)
        PyList_SET_ITEM(all, k, at_hand[k]); /* the references move */
    for (Py_ssize_t k = 0; list != NULL && k < PyList_GET_SIZE(list); k++)
        PyList_SET_ITEM(all, count + k, Py_NewRef(PyList_GET_ITEM(list, k)));
    Py_XDECREF(list);
    return all;
fail:
    PyMem_Free(scratch);
    for (Py_ssize_t k = 0; k < count; k++)
        Py_DECREF(at_hand[k]);
    Py_XDECREF(list);
    return NULL;
}

static PyObject *method_text(const char *p, Py_ssize_t n) {
    int k = method_index(p, n);
    if (k >= 0 && k < COMMON_METHODS)
        return Py_NewRef(s_methods[k]);
    return PyUnicode_DecodeLatin1(p, n, NULL);
}

/* What one step of the framing reports (step() below): the parts of a head or of a
 * body's end, as owned references, or why parsing failed. */
typedef struct {
    /* EV_HEAD, EV_MESSAGE */
    long long ts;      /* of the chunk holding the head's first byte */
    int status;        /* responses */
    PyObject *method;  /* requests */
    PyObject *text;    /* the request target, or the reason phrase */
    PyObject *version; /* "1.0" or "1.1" */
    PyObject *headers; /* list of (name, value) */
    /* EV_END */
    PyObject *body; /* its first body_limit bytes */
    long long body_len;
    PyObject *trailers; /* list, or NULL: none */
    /* EV_ERROR */
    const char *why;
} Event;

static void event_clear(Event *e) {
    Py_CLEAR(e->method);
    Py_CLEAR(e->text);
    Py_CLEAR(e->version);
    Py_CLEAR(e->headers);
    Py_CLEAR(e->body);
    Py_CLEAR(e->trailers);
}

/* The head in block[:n] (every line, the blank line last) into e: sets the body's
 * framing and the state after the head; returns EV_HEAD or EV_MESSAGE.  -1 with *why
 * on a parse error, -2 on a Python error. */
static int build_head(Framer *s, const char *block, Py_ssize_t n, Event *e, const char **why) {
    const char *lf = memchr(block, '\n', (size_t)n);
    if (lf == NULL) {
        *why = "Invalid start line";
        return -1;
    }
    Py_ssize_t first_n = lf - block + 1;
    StartLine sl;
    Py_ssize_t len = line_content(block, first_n);
    *why = s->response ? status_line(block, len, &sl) : request_line(block, len, &sl);
    if (*why != NULL)
        return -1;
    /* the blank line's own line end is not a field */
    Py_ssize_t fields_end = n - 1;
    if (fields_end > first_n && block[fields_end - 1] == '\r')
        fields_end--;
    Framing f = {0, 0, 0, 0};
    e->headers = header_list(block + first_n, fields_end - first_n, &f, s, why);
    if (e->headers == NULL)
        return *why ? -1 : -2;
    int status = 0;
    if (s->response)
        status = (sl.a[0] - '0') * 100 + (sl.a[1] - '0') * 10 + (sl.a[2] - '0');
    else if ((e->method = method_text(sl.a, sl.a_len)) == NULL)
        return -2;
    e->status = status;
    e->ts = s->begin_ts;
    e->version = Py_NewRef(sl.minor ? s_version_11 : s_version_10);
    PyObject *reason = s->response ? s->reason : NULL;
    if (reason != NULL && PyUnicode_GET_LENGTH(reason) == sl.b_len &&
        memcmp(PyUnicode_DATA(reason), sl.b, (size_t)sl.b_len) == 0) {
        e->text = Py_NewRef(reason);
    } else {
        if ((e->text = PyUnicode_DecodeLatin1(sl.b, sl.b_len, NULL)) == NULL)
            return -2;
        if (s->response && sl.b_len <= MAX_REUSED_VALUE)
            Py_XSETREF(s->reason, Py_NewRef(e->text));
    }
    /* RFC 9112 6.3, with Transfer-Encoding winning over Content-Length */
    body_clear(s);
    if (s->response && ((status >= 100 && status < 200) || status == 204 || status == 304)) {
        s->state = S_IDLE;
    } else if (f.has_te && f.chunked) {
        s->state = S_CHUNK_SIZE;
    } else if (f.has_te) {
        if (!s->response) {
            *why = "Request has invalid Transfer-Encoding";
            return -1;
        }
        s->state = S_EOF;
    } else if (f.has_cl) {
        s->state = f.cl > 0 ? S_LENGTH : S_IDLE;
        s->remaining = f.cl;
    } else {
        s->state = s->response ? S_EOF : S_IDLE;
    }
    return s->state == S_IDLE ? EV_MESSAGE : EV_HEAD;
}

/* -- reading a head or trailer section ----------------------------------------------- */

/* Appends data[from:to] to the unfinished head, then checks what it completed. */
static int head_append(Framer *s, const char *data, Py_ssize_t from, Py_ssize_t to,
                       const char **why) {
    Py_ssize_t n = to - from;
    if (n > MAX_HEAD - s->head_len) {
        *why = "header block larger than 1048576 bytes";
        return -1;
    }
    if (reserve(&s->head, &s->head_cap, s->head_len + n, MAX_HEAD) < 0)
        return -2;
    memcpy(s->head + s->head_len, data + from, (size_t)n);
    /* A CR is only ever right before its LF: one before anything else fails now, not
     * when (if ever) the line ends. */
    Py_ssize_t at = s->head_len > 0 ? s->head_len - 1 : 0;
    s->head_len += n;
    while (at < s->head_len - 1) {
        const char *cr = memchr(s->head + at, '\r', (size_t)(s->head_len - 1 - at));
        if (cr == NULL)
            break;
        if (cr[1] != '\n') {
            *why = "Expected LF after CR";
            return -1;
        }
        at = cr - s->head + 1;
    }
    int trailers = s->state == S_TRAILERS;
    while (s->checked < s->head_len) {
        const char *p = s->head + s->checked;
        Py_ssize_t left = s->head_len - s->checked;
        const char *lf = memchr(p, '\n', (size_t)left);
        if (lf == NULL) {
            if (!prefix_plausible(p, left, s->checked == 0 && !trailers, s->response)) {
                *why = s->checked == 0 && !trailers ? "Invalid start line" : "Invalid header token";
                return -1;
            }
            break;
        }
        Py_ssize_t line_n = lf - p + 1;
        if ((*why = check_line(s, p, line_content(p, line_n), s->checked == 0, trailers)))
            return -1;
        s->checked += line_n;
    }
    return 0;
}

/* In S_HEAD or S_TRAILERS: reads data[*pos:] up to the section's blank line.
 * 1: the section is complete, in (*block, *block_n); 0: data used up; -1 with *why
 * on a parse error; -2 on a Python error. */
static int read_section(Framer *s, const char *data, Py_ssize_t n, Py_ssize_t *pos,
                        const char **block, Py_ssize_t *block_n, const char **why) {
    Py_ssize_t i = *pos, from = *pos;
    /* the unfinished line so far: its length and whether it is just a CR */
    Py_ssize_t carried = s->head_len - s->line_start;
    int carried_cr = carried == 1 && s->head[s->line_start] == '\r';
    while (i < n) {
        const char *lf = memchr(data + i, '\n', (size_t)(n - i));
        if (lf == NULL)
            break;
        Py_ssize_t at = lf - data; /* the LF */
        Py_ssize_t len = carried + (at - i);
        int blank = len == 0 || (len == 1 && (carried ? carried_cr : data[i] == '\r'));
        if (s->head_len == 0 && at + 1 - from > MAX_HEAD) {
            *why = "header block larger than 1048576 bytes";
            return -1;
        }
        i = at + 1;
        if (blank) {
            *pos = i;
            if (s->head_len == 0) { /* all of it in this chunk: read in place */
                *block = data + from;
                *block_n = i - from;
                return 1;
            }
            int r = head_append(s, data, from, i, why);
            if (r < 0)
                return r;
            *block = s->head;
            *block_n = s->head_len;
            return 1;
        }
        carried = 0;
        carried_cr = 0;
        if (s->head_len == 0)
            continue;
        /* A long head spans chunks: keep its lines as they complete */
        int r = head_append(s, data, from, i, why);
        if (r < 0)
            return r;
        from = i;
        s->line_start = s->head_len;
    }
    /* data used up within the section: keep what is unfinished */
    if (s->head_len == 0) {
        /* the section began in this chunk: its unfinished line starts after its last LF */
        Py_ssize_t line_at = n;
        while (line_at > from && data[line_at - 1] != '\n')
            line_at--;
        s->line_start = line_at - from;
    } /* else s->line_start is kept up to date line by line */
    int r = head_append(s, data, from, n, why);
    if (r < 0)
        return r;
    *pos = n;
    return 0;
}

/* -- stepping the framing ------------------------------------------------------------ */

static void fields_clear(Framer *s) {
    Py_CLEAR(s->reason);
    if (s->fields == NULL)
        return;
    for (int k = 0; k < N_NAMES; k++)
        Py_CLEAR(s->fields[k]);
    PyMem_Free(s->fields);
    s->fields = NULL;
}

static void framer_init(Framer *s, int response, Py_ssize_t body_limit) {
    s->response = response;
    s->body_limit = body_limit > 0 ? body_limit : 0;
    s->state = S_IDLE;
    head_clear(s);
    body_clear(s);
    fields_clear(s);
}

/* Forget everything (also frees what it held): the next byte starts a message. */
static void framer_reset(Framer *s) {
    s->state = S_IDLE;
    head_clear(s);
    body_clear(s);
    fields_clear(s);
}

/* The message whose head was just reported has no body (a response to HEAD). */
static void framer_no_body(Framer *s) {
    if (s->state != S_FAILED) {
        s->state = S_IDLE;
        body_clear(s);
    }
}

/* Bytes of an unfinished head held (0 between messages and in a body). */
static Py_ssize_t framer_head_len(const Framer *s) { return s->state == S_HEAD ? s->head_len : 0; }

static int framer_fail(Framer *s, Event *e, const char *why) {
    s->state = S_FAILED;
    head_clear(s);
    e->why = why;
    return EV_ERROR;
}

/* The body of the message being parsed into e (body, body_len), forgotten here. */
static int take_body(Framer *s, Event *e) {
    PyObject *body = s->body;
    s->body = NULL;
    if (body == NULL)
        body = PyBytes_FromStringAndSize(NULL, 0);
    else if (PyBytes_GET_SIZE(body) != s->kept)
        _PyBytes_Resize(&body, s->kept); /* on failure: freed, NULL */
    e->body_len = s->body_len;
    body_clear(s);
    e->body = body;
    return body == NULL ? -1 : 0;
}

/* Parses data[*at:] (one captured chunk, dated ts) until something happens: returns
 * the event (EV_*), with its parts in e (zeroed by the caller, cleared by it after) and
 * *at moved past what was parsed; -2 on a Python error. */
static int step(Framer *s, const char *data, Py_ssize_t n, Py_ssize_t *at, long long ts,
                Event *e) {
    Py_ssize_t pos = *at;
    int event;
    for (;;) {
        switch (s->state) {
        case S_FAILED:
            e->why = "parser failed earlier";
            event = EV_ERROR;
            goto done;
        case S_IDLE:
            while (pos < n && (data[pos] == '\r' || data[pos] == '\n'))
                pos++;
            if (pos == n) {
                event = EV_NEED;
                goto done;
            }
            s->begin_ts = ts;
            s->state = S_HEAD;
            head_clear(s);
            break;
        case S_HEAD:
        case S_TRAILERS: {
            const char *block = NULL, *why = NULL;
            Py_ssize_t block_n = 0;
            int r = read_section(s, data, n, &pos, &block, &block_n, &why);
            if (r == -2) {
                event = -2;
                goto done;
            }
            if (r == -1) {
                event = framer_fail(s, e, why);
                goto done;
            }
            if (r == 0) {
                event = EV_NEED;
                goto done;
            }
            if (s->state == S_TRAILERS) {
                Py_ssize_t fields_end = block_n - 1;
                if (fields_end > 0 && block[fields_end - 1] == '\r')
                    fields_end--;
                PyObject *trailers = NULL;
                if (fields_end > 0)
                    trailers = header_list(block, fields_end, NULL, NULL, &why);
                head_clear(s);
                if (fields_end > 0 && trailers == NULL) {
                    event = why != NULL ? framer_fail(s, e, why) : -2;
                    goto done;
                }
                s->state = S_IDLE;
                e->trailers = trailers;
                event = take_body(s, e) < 0 ? -2 : EV_END;
                goto done;
            }
            event = build_head(s, block, block_n, e, &why);
            head_clear(s);
            if (event < 0) {
                event_clear(e);
                if (event == -1)
                    event = framer_fail(s, e, why);
            }
            goto done;
        }
        case S_LENGTH:
        case S_CHUNK_DATA: {
            Py_ssize_t take = n - pos;
            if ((long long)take > s->remaining)
                take = (Py_ssize_t)s->remaining;
            if (body_add(s, data + pos, take) < 0) {
                event = -2;
                goto done;
            }
            pos += take;
            s->remaining -= take;
            if (s->remaining > 0) {
                event = EV_NEED;
                goto done;
            }
            if (s->state == S_LENGTH) {
                s->state = S_IDLE;
                event = take_body(s, e) < 0 ? -2 : EV_END;
                goto done;
            }
            s->state = S_CHUNK_END;
            break;
        }
        case S_EOF:
            if (body_add(s, data + pos, n - pos) < 0) {
                event = -2;
                goto done;
            }
            pos = n;
            event = EV_NEED;
            goto done;
        case S_CHUNK_END:
        case S_CHUNK_END_LF:
            if (pos == n) {
                event = EV_NEED;
                goto done;
            }
            if (data[pos] == '\r' && s->state == S_CHUNK_END) {
                s->state = S_CHUNK_END_LF;
            } else if (data[pos] == '\n') {
                s->state = S_CHUNK_SIZE;
                s->chunk_digits = 0;
                s->remaining = 0;
            } else {
                event = framer_fail(s, e, "Expected LF after chunk data");
                goto done;
            }
            pos++;
            break;
        case S_CHUNK_SIZE:
        case S_CHUNK_EXT:
            while (pos < n && data[pos] != '\n') {
                char c = data[pos];
                if (s->state == S_CHUNK_SIZE) {
                    int v = hex_value(c);
                    if (v >= 0) {
                        if (s->remaining > (LLONG_MAX >> 4)) {
                            event = framer_fail(s, e, "Chunk size overflow");
                            goto done;
                        }
                        s->remaining = (s->remaining << 4) | v;
                        s->chunk_digits++;
                    } else if (s->chunk_digits > 0 && (c == ';' || is_ows(c) || c == '\r')) {
                        s->state = S_CHUNK_EXT;
                    } else {
                        event = framer_fail(s, e, "Invalid character in chunk size");
                        goto done;
                    }
                }
                /* chunk extensions are skipped (their bytes are not kept) */
                pos++;
            }
            if (pos == n) {
                event = EV_NEED;
                goto done;
            }
            if (s->chunk_digits == 0) {
                event = framer_fail(s, e, "Invalid character in chunk size");
                goto done;
            }
            pos++; /* the LF */
            s->state = s->remaining > 0 ? S_CHUNK_DATA : S_TRAILERS;
            break;
        default:
            PyErr_SetString(PyExc_SystemError, "_http1: bad framing state");
            event = -2;
            goto done;
        }
    }
done:
    *at = pos;
    return event;
}

/* -- Http1Stream: the framing alone, for Python -------------------------------------- */

typedef struct {
    PyObject_HEAD
    Framer f;
} Http1Stream;

static int Http1Stream_init(Http1Stream *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"response", "body_limit", NULL};
    int response;
    Py_ssize_t body_limit;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "pn", kwlist, &response, &body_limit))
        return -1;
    framer_init(&self->f, response, body_limit);
    return 0;
}

static void Http1Stream_dealloc(Http1Stream *self) {
    framer_reset(&self->f);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* (event, pos, value), taking `value`'s reference. */
static PyObject *result(int event, Py_ssize_t pos, PyObject *value) {
    if (value == NULL)
        return NULL;
    PyObject *out = PyTuple_New(3), *at = PyLong_FromSsize_t(pos);
    if (out == NULL || at == NULL) {
        Py_XDECREF(out);
        Py_XDECREF(at);
        Py_DECREF(value);
        return NULL;
    }
    PyTuple_SET_ITEM(out, 0, PyLong_FromLong(event)); /* a small int: cached, never NULL */
    PyTuple_SET_ITEM(out, 1, at);
    PyTuple_SET_ITEM(out, 2, value);
    return out;
}

/* An event's value as Python sees it (feed() below). */
static PyObject *event_value(int event, Event *e) {
    switch (event) {
    case EV_HEAD:
    case EV_MESSAGE: {
        PyObject *ts = PyLong_FromLongLong(e->ts);
        PyObject *a = e->method ? Py_NewRef(e->method) : PyLong_FromLong(e->status);
        PyObject *head = ts && a ? PyTuple_Pack(5, ts, a, e->text, e->version, e->headers) : NULL;
        Py_XDECREF(ts);
        Py_XDECREF(a);
        return head;
    }
    case EV_END: {
        PyObject *len = PyLong_FromLongLong(e->body_len);
        PyObject *end = len ? PyTuple_Pack(3, e->body, len, e->trailers ? e->trailers : Py_None)
                            : NULL;
        Py_XDECREF(len);
        return end;
    }
    case EV_ERROR:
        return PyUnicode_FromString(e->why);
    default:
        return Py_NewRef(Py_None);
    }
}

PyDoc_STRVAR(feed_doc,
"feed(data, pos, ts) -> (event, pos, value)\n"
"\n"
"Parse data[pos:] (bytes of one captured chunk, dated ts) until the next event:\n"
"NEED (data used up), HEAD (a head; its body follows), MESSAGE (a head without a\n"
"body: the message ended too), END (the body ended: value (body, body_len,\n"
"trailers or None)), ERROR (value: why, a fixed text).  pos: where parsing stopped.");

static PyObject *Http1Stream_feed(Http1Stream *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "feed(data, pos, ts)");
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    PyObject *out = NULL;
    Py_ssize_t pos = PyLong_AsSsize_t(args[1]);
    if (pos == -1 && PyErr_Occurred())
        goto done;
    long long ts = PyLong_AsLongLong(args[2]);
    if (ts == -1 && PyErr_Occurred())
        goto done;
    if (pos < 0 || pos > view.len) {
        PyErr_SetString(PyExc_ValueError, "feed: pos outside data");
        goto done;
    }
    Event e = {0};
    int event = step(&self->f, view.buf, view.len, &pos, ts, &e);
    if (event >= 0)
        out = result(event, pos, event_value(event, &e));
    event_clear(&e);
done:
    PyBuffer_Release(&view);
    return out;
}

PyDoc_STRVAR(no_body_doc,
"no_body()\n"
"\n"
"The message whose head feed() just returned has no body whatever its headers say\n"
"(a response to HEAD): the next byte starts the next message.");

static PyObject *Http1Stream_no_body(Http1Stream *self, PyObject *unused) {
    (void)unused;
    framer_no_body(&self->f);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(take_body_doc,
"take_body() -> (body, body_len)\n"
"\n"
"The body of the message being parsed so far (its first body_limit bytes, and how\n"
"many were seen), forgotten here: for a message cut short, or ended by the close.");

static PyObject *Http1Stream_take_body(Http1Stream *self, PyObject *unused) {
    (void)unused;
    Event e = {0};
    PyObject *out = NULL, *len;
    if (take_body(&self->f, &e) == 0 && (len = PyLong_FromLongLong(e.body_len)) != NULL) {
        out = PyTuple_Pack(2, e.body, len);
        Py_DECREF(len);
    }
    event_clear(&e);
    return out;
}

PyDoc_STRVAR(reset_doc, "reset()\n\nForget everything: the next byte starts a message.");

static PyObject *Http1Stream_reset(Http1Stream *self, PyObject *unused) {
    (void)unused;
    framer_reset(&self->f);
    Py_RETURN_NONE;
}

static PyObject *Http1Stream_until_close(Http1Stream *self, void *closure) {
    (void)closure;
    return PyBool_FromLong(self->f.state == S_EOF);
}

static PyObject *Http1Stream_head_len(Http1Stream *self, void *closure) {
    (void)closure;
    return PyLong_FromSsize_t(framer_head_len(&self->f));
}

static PyGetSetDef Http1Stream_getset[] = {
    {"until_close", (getter)Http1Stream_until_close, NULL,
     "the body being read runs to the connection's end", NULL},
    {"head_len", (getter)Http1Stream_head_len, NULL,
     "bytes of an unfinished head held (0 between messages and in a body)", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMemberDef Http1Stream_members[] = {
    {"response", T_INT, offsetof(Http1Stream, f.response), READONLY, "parses responses"},
    {"body_limit", T_PYSSIZET, offsetof(Http1Stream, f.body_limit), READONLY,
     "body bytes kept per message"},
    {NULL, 0, 0, 0, NULL},
};

static PyMethodDef Http1Stream_methods[] = {
    {"feed", (PyCFunction)(void (*)(void))Http1Stream_feed, METH_FASTCALL, feed_doc},
    {"no_body", (PyCFunction)Http1Stream_no_body, METH_NOARGS, no_body_doc},
    {"take_body", (PyCFunction)Http1Stream_take_body, METH_NOARGS, take_body_doc},
    {"reset", (PyCFunction)Http1Stream_reset, METH_NOARGS, reset_doc},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject Http1StreamType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "agent.l7._http1.Http1Stream",
    .tp_doc = PyDoc_STR("Http1Stream(response, body_limit): the messages of one direction "
                        "of an HTTP/1.x connection, fed a chunk at a time."),
    .tp_basicsize = sizeof(Http1Stream),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Http1Stream_init,
    .tp_dealloc = (destructor)Http1Stream_dealloc,
    .tp_methods = Http1Stream_methods,
    .tp_members = Http1Stream_members,
    .tp_getset = Http1Stream_getset,
};

/* -- Http1Parser: pairing requests with responses ------------------------------------ */

/* The pairing http1.py's docstring describes, over two Framers.  Every Python method
 * of the type runs the state machine below and hands back the Exchanges it completed;
 * an exchange in the making is kept in C (an Ex: the requests' and responses' heads
 * as the framing made them) and becomes Exchange and HttpMessage objects only when it
 * is emitted, each in one call.
 *
 * A parser holds only objects it made (str, bytes, int, lists and tuples of them; the
 * Exchanges only while the call that made them runs) and cannot be subclassed: it
 * cannot be part of a reference cycle, so it does not take part in the garbage
 * collector. */

#define MAX_PENDING 512 /* exchanges queued before the oldest not being parsed is given up */
#define NOTE_MAX 320    /* a note made here (numbers and fixed texts) fits */

/* One side of an exchange. */
typedef struct {
    int seen;     /* its head was parsed */
    int complete; /* its end was seen */
    int status;   /* responses */
    long long ts, end_ts, body_len;
    PyObject *method;  /* requests */
    PyObject *text;    /* the request target, or the reason phrase */
    PyObject *version; /* "1.0" or "1.1" */
    PyObject *headers; /* list of (name, value) */
    PyObject *body;    /* NULL: b"" */
    PyObject *trailers; /* NULL: [] */
} Msg;

/* An Exchange in the making, with what pairing needs. */
typedef struct Ex {
    struct Ex *prev, *next; /* in the parser's queue */
    long long stream_id;
    Msg req, resp;
    PyObject *notes; /* list of str, NULL: none yet */
    int head;        /* the request was HEAD: its response has no body */
    int connect;     /* the request was CONNECT */
    int upgrade;     /* a CONNECT/Upgrade request: what follows waits for the verdict */
    int req_done, resp_done;
    int awaiting; /* in the parser's await deque */
} Ex;

/* Request chunks held behind a CONNECT/Upgrade request awaiting its verdict: their
 * bytes, one after the other (at most MAX_HEAD), and each chunk's length and time. */
typedef struct {
    Py_ssize_t len;
    long long ts;
} HeldChunk;

typedef struct {
    char *bytes;
    Py_ssize_t size, cap;
    HeldChunk *chunks;
    Py_ssize_t n, chunks_cap;
} Held;

/* One direction: its framing, the message in progress, resync state. */
typedef struct {
    Framer f;
    const char *name; /* "request" or "response" */
    int synced;       /* 0: waiting for a chunk that starts a message */
    int resynced;     /* notes owed to the next message */
    int fresh;        /* resynced, and no message head parsed since */
    Ex *cur;          /* the exchange whose message this side is parsing */
    int has_msg;      /* ... once its head is parsed (http1.py's st.msg) */
    long long ts;     /* of the chunk being fed */
    long long fed;    /* bytes fed since the last resync */
    long long lost, dropped; /* bytes not captured / skipped while out of sync */
    int holding;      /* requests only: later bytes wait in `held` */
    Held held;
} Side;

typedef struct {
    PyObject_HEAD
    PyObject *failed; /* str once failed, else NULL */
    Py_ssize_t body_limit;
    int closed;
    int busy; /* in a call: re-entry (from Python code run inside it) is refused */
    /* not yet emitted, in stream_id order */
    Ex *first, *last;
    Py_ssize_t queued;
    /* awaiting a response, oldest first; NULL entries: a request-side gap.  A ring. */
    Ex **aw;
    Py_ssize_t aw_start, aw_len, aw_cap;
    /* The Upgrade/CONNECT request awaiting its verdict.  blocked_done: one emitted
     * already (its response ended before the request did): no response can release the
     * held requests then, only a gap on the response side (or the MAX_HEAD stall). */
    Ex *blocked;
    int blocked_done;
    long long next_id;
    PyObject *out; /* the Exchanges emitted during this call (a list), or NULL */
    /* The ts_ns int of the chunk being fed (borrowed: feed()'s caller holds it; NULL
     * outside feed()) and its value: a message emitted while it is fed mostly ends, and
     * often began, in it, so its times are that int rather than new ones. */
    PyObject *ts_obj;
    long long ts_val;
    Side req, resp;
} Http1Parser;

/* agent.l7.exchange's HttpMessage and Exchange: slots dataclasses whose __init__ only
 * assigns the fields, so an instance is made here as that would (the Python call cost
 * a third of an exchange's CPU): allocated, then each field's slot filled.  Loaded with
 * the first parser, and checked then (field order, slots, no __post_init__ or __new__). */
#define MESSAGE_FIELDS 14
#define EXCHANGE_FIELDS 7
typedef struct {
    PyTypeObject *type;
    Py_ssize_t offsets[MESSAGE_FIELDS]; /* of each field's slot, in field order */
} Maker;
static Maker message_maker, exchange_maker;
/* agent.l7.http1's start checks (loaded on the first resync: http1.py imports this module) */
static PyObject *looks_request, *looks_response;
static PyObject *s_empty, *s_empty_bytes, *s_http1, *s_request, *s_name_host, *s_name_upgrade,
    *s_name_connection;

/* -- small helpers ------------------------------------------------------------------- */

static long long add_sat(long long a, long long b) { return a > LLONG_MAX - b ? LLONG_MAX : a + b; }

/* The first value of header `name` (a name object from COMMON_NAMES, which the framing
 * hands out for that name every time), borrowed; NULL if absent. */
static PyObject *first_header(PyObject *headers, PyObject *name) {
    if (headers == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(headers); i++) {
        PyObject *field = PyList_GET_ITEM(headers, i);
        if (PyTuple_GET_ITEM(field, 0) == name)
            return PyTuple_GET_ITEM(field, 1);
    }
    return NULL;
}

static int nonempty(PyObject *s) { return s != NULL && PyUnicode_GET_LENGTH(s) > 0; }

/* Whether a Connection value v[:n] has "upgrade" among its comma-separated options
 * (compared without case, stripped of SP and HT). */
static int upgrade_option(const char *v, Py_ssize_t n) {
    for (Py_ssize_t start = 0; start <= n;) {
        Py_ssize_t end = start;
        while (end < n && v[end] != ',')
            end++;
        Py_ssize_t a = start, b = end;
        while (a < b && is_ows(v[a]))
            a++;
        while (b > a && is_ows(v[b - 1]))
            b--;
        if (lower_equals(v + a, b - a, "upgrade"))
            return 1;
        start = end + 1;
    }
    return 0;
}

/* Whether a request may switch protocols (as llhttp decides): CONNECT, or an Upgrade
 * header and "upgrade" among the Connection options. */
static int upgrades(const Ex *x) {
    PyObject *headers = x->req.headers;
    if (x->connect)
        return 1;
    if (first_header(headers, s_name_upgrade) == NULL)
        return 0;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(headers); i++) {
        PyObject *field = PyList_GET_ITEM(headers, i), *value = PyTuple_GET_ITEM(field, 1);
        /* values are latin-1 (one byte a character), as the framing decoded them */
        if (PyTuple_GET_ITEM(field, 0) == s_name_connection &&
            PyUnicode_KIND(value) == PyUnicode_1BYTE_KIND &&
            upgrade_option((const char *)PyUnicode_1BYTE_DATA(value), PyUnicode_GET_LENGTH(value)))
            return 1;
    }
    return 0;
}

static void msg_clear(Msg *m) {
    Py_CLEAR(m->method);
    Py_CLEAR(m->text);
    Py_CLEAR(m->version);
    Py_CLEAR(m->headers);
    Py_CLEAR(m->body);
    Py_CLEAR(m->trailers);
    m->seen = 0;
}

/* A message's head from the framing's event (its references moved). */
static void msg_head(Msg *m, Event *e) {
    msg_clear(m);
    m->seen = 1;
    m->ts = e->ts;
    m->status = e->status;
    m->method = e->method;
    m->text = e->text;
    m->version = e->version;
    m->headers = e->headers;
    e->method = e->text = e->version = e->headers = NULL;
}

static void ex_free(Ex *x) {
    msg_clear(&x->req);
    msg_clear(&x->resp);
    Py_XDECREF(x->notes);
    PyMem_Free(x);
}

/* Adds a note, taking `text`'s reference (NULL: a Python error, passed on). */
static int note(Ex *x, PyObject *text) {
    if (text == NULL)
        return -1;
    if (x->notes == NULL && (x->notes = PyList_New(0)) == NULL) {
        Py_DECREF(text);
        return -1;
    }
    int r = PyList_Append(x->notes, text);
    Py_DECREF(text);
    return r;
}

/* -- the queue and the await deque --------------------------------------------------- */

static Ex *ex_new(Http1Parser *p) {
    Ex *x = PyMem_Calloc(1, sizeof(Ex));
    if (x == NULL) {
        PyErr_NoMemory();
        return NULL;
    }
    x->stream_id = p->next_id++;
    x->prev = p->last;
    if (p->last)
        p->last->next = x;
    else
        p->first = x;
    p->last = x;
    p->queued++;
    return x;
}

/* Takes x out of the queue. */
static void queue_unlink(Http1Parser *p, Ex *x) {
    if (x->prev)
        x->prev->next = x->next;
    else
        p->first = x->next;
    if (x->next)
        x->next->prev = x->prev;
    else
        p->last = x->prev;
    x->prev = x->next = NULL;
    p->queued--;
}

static Ex *queue_pop(Http1Parser *p) {
    Ex *x = p->first;
    if (x != NULL)
        queue_unlink(p, x);
    return x;
}

static Ex **aw_slot(Http1Parser *p, Py_ssize_t i) {
    return &p->aw[(p->aw_start + i) % p->aw_cap];
}

static Ex *aw_at(Http1Parser *p, Py_ssize_t i) { return *aw_slot(p, i); }

static int aw_grow(Http1Parser *p) {
    if (p->aw_len < p->aw_cap)
        return 0;
    Py_ssize_t cap = p->aw_cap ? p->aw_cap * 2 : 16;
    Ex **bigger = PyMem_Malloc((size_t)cap * sizeof(Ex *));
    if (bigger == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < p->aw_len; i++)
        bigger[i] = aw_at(p, i);
    PyMem_Free(p->aw);
    p->aw = bigger;
    p->aw_cap = cap;
    p->aw_start = 0;
    return 0;
}

static int aw_append(Http1Parser *p, Ex *x) {
    if (aw_grow(p) < 0)
        return -1;
    *aw_slot(p, p->aw_len++) = x;
    if (x)
        x->awaiting = 1;
    return 0;
}

static int aw_appendleft(Http1Parser *p, Ex *x) {
    if (aw_grow(p) < 0)
        return -1;
    p->aw_start = (p->aw_start + p->aw_cap - 1) % p->aw_cap;
    p->aw_len++;
    *aw_slot(p, 0) = x;
    if (x)
        x->awaiting = 1;
    return 0;
}

static Ex *aw_popleft(Http1Parser *p) {
    Ex *x = aw_at(p, 0);
    p->aw_start = (p->aw_start + 1) % p->aw_cap;
    p->aw_len--;
    if (x)
        x->awaiting = 0;
    return x;
}

/* Removes x.  Request-gap entries are never removed but by a pairing that takes the
 * request after one, and a run of two or more of them stops all pairing: a run longer
 * than two (left where x was) is cut to two, which bounds the deque by the queue. */
static void aw_remove(Http1Parser *p, Ex *x) {
    Py_ssize_t i = 0;
    while (i < p->aw_len && aw_at(p, i) != x)
        i++;
    if (i == p->aw_len)
        return;
    x->awaiting = 0;
    for (Py_ssize_t k = i; k + 1 < p->aw_len; k++)
        *aw_slot(p, k) = aw_at(p, k + 1);
    p->aw_len--;
    /* Gaps that x stood between are one gap now: two side by side would stop pairing
     * for good (start_response looks one entry past a gap for the request after it). */
    Py_ssize_t a = i, b = i;
    while (a > 0 && aw_at(p, a - 1) == NULL)
        a--;
    while (b < p->aw_len && aw_at(p, b) == NULL)
        b++;
    Py_ssize_t extra = b - a - 1;
    if (extra > 0) {
        for (Py_ssize_t k = a + 1; k + extra < p->aw_len; k++)
            *aw_slot(p, k) = aw_at(p, k + extra);
        p->aw_len -= extra;
    }
}

static void aw_clear(Http1Parser *p) {
    for (Py_ssize_t i = 0; i < p->aw_len; i++)
        if (aw_at(p, i))
            aw_at(p, i)->awaiting = 0;
    p->aw_len = p->aw_start = 0;
}

/* -- emitting ------------------------------------------------------------------------ */

/* An instance of m's class with `values` (borrowed) in its fields. */
static PyObject *make(const Maker *m, PyObject *const *values, int n) {
    PyObject *obj = m->type->tp_alloc(m->type, 0);
    if (obj == NULL)
        return NULL;
    for (int i = 0; i < n; i++)
        *(PyObject **)((char *)obj + m->offsets[i]) = Py_NewRef(values[i]);
    return obj;
}

/* The int for time `t`: the fed chunk's own when it is that time, else a new one. */
static PyObject *ts_int(const Http1Parser *p, long long t) {
    return p->ts_obj != NULL && t == p->ts_val ? Py_NewRef(p->ts_obj) : PyLong_FromLongLong(t);
}

static PyObject *message_object(const Http1Parser *p, const Msg *m, int request) {
    PyObject *authority = request ? first_header(m->headers, s_name_host) : NULL;
    PyObject *body = m->body ? m->body : s_empty_bytes;
    /* one int for both when the message began and ended in one chunk (mostly) */
    PyObject *ts = ts_int(p, m->ts);
    PyObject *end_ts = m->end_ts == m->ts ? Py_XNewRef(ts) : ts_int(p, m->end_ts);
    PyObject *status = PyLong_FromLong(m->status), *body_len = PyLong_FromLongLong(m->body_len);
    PyObject *trailers = m->trailers ? Py_NewRef(m->trailers) : PyList_New(0);
    PyObject *msg = NULL;
    if (ts && end_ts && status && body_len && trailers) {
        /* HttpMessage's fields, in order */
        PyObject *values[MESSAGE_FIELDS] = {
            ts, end_ts,
            request ? m->method : s_empty,
            request ? m->text : s_empty,
            nonempty(authority) ? authority : s_empty,
            status,
            request ? s_empty : m->text,
            m->version, m->headers, trailers, body, body_len,
            m->body_len > PyBytes_GET_SIZE(body) ? Py_True : Py_False,
            m->complete ? Py_True : Py_False,
        };
        msg = make(&message_maker, values, MESSAGE_FIELDS);
    }
    Py_XDECREF(ts);
    Py_XDECREF(end_ts);
    Py_XDECREF(status);
    Py_XDECREF(body_len);
    Py_XDECREF(trailers);
    return msg;
}

static PyObject *exchange_object(const Http1Parser *p, const Ex *x) {
    PyObject *req = x->req.seen ? message_object(p, &x->req, 1) : Py_NewRef(Py_None);
    PyObject *resp = x->resp.seen ? message_object(p, &x->resp, 0) : Py_NewRef(Py_None);
    PyObject *id = PyLong_FromLongLong(x->stream_id);
    PyObject *notes = x->notes ? Py_NewRef(x->notes) : PyList_New(0);
    PyObject *redactions = PyList_New(0);
    PyObject *ex = NULL;
    if (req && resp && id && notes && redactions) {
        /* Exchange's fields, in order */
        PyObject *values[EXCHANGE_FIELDS] = {s_http1, req, resp, id, Py_None, notes, redactions};
        ex = make(&exchange_maker, values, EXCHANGE_FIELDS);
    }
    Py_XDECREF(req);
    Py_XDECREF(resp);
    Py_XDECREF(id);
    Py_XDECREF(notes);
    Py_XDECREF(redactions);
    return ex;
}

/* Hands x (out of the queue) to the caller and frees it, also on a Python error. */
static int emit(Http1Parser *p, Ex *x) {
    if (p->blocked == x) { /* its response ended: it can only be unblocked by a desync */
        p->blocked = NULL;
        p->blocked_done = 1;
    }
    if (x->awaiting)
        aw_remove(p, x);
    int r = -1;
    PyObject *ex = exchange_object(p, x);
    if (ex != NULL && (p->out != NULL || (p->out = PyList_New(0)) != NULL))
        r = PyList_Append(p->out, ex);
    Py_XDECREF(ex);
    ex_free(x);
    return r;
}

static int emit_ready(Http1Parser *p) {
    while (p->first && p->first->req_done && p->first->resp_done)
        if (emit(p, queue_pop(p)) < 0)
            return -1;
    return 0;
}

/* -- ending -------------------------------------------------------------------------- */

static int flush(Http1Parser *p, const char *why);

/* Fails the parser for good: `reason` (its reference taken) in `failed`, everything
 * unfinished emitted, saying `why`. */
static int fail(Http1Parser *p, PyObject *reason, const char *why) {
    if (reason == NULL)
        return -1;
    if (p->failed != NULL) {
        Py_DECREF(reason);
        return 0;
    }
    p->failed = reason;
    int r = flush(p, why);
    p->req.synced = p->resp.synced = 0;
    return r;
}

/* A Python error in the state machine: the parser fails with its type's name only (an
 * exception's text could quote captured bytes); never raised into the caller. */
static void internal_error(Http1Parser *p) {
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    if (type != NULL)
        PyErr_NormalizeException(&type, &value, &tb);
    PyObject *name = value ? PyType_GetName(Py_TYPE(value)) : NULL;
    PyErr_Clear();
    PyObject *reason = name ? PyUnicode_FromFormat("internal error in HTTP/1 parser: %U", name)
                            : PyUnicode_FromString("internal error in HTTP/1 parser: SystemError");
    Py_XDECREF(name);
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(tb);
    if (fail(p, reason, "parser error") < 0)
        PyErr_Clear();
}

/* The message in progress on st ended: completely or cut short.  `done` has its body
 * (body, body_len and trailers as the framing reported its end; all empty: a message
 * without a body); NULL: what the framing holds.  Returns its exchange. */
static Ex *end(Http1Parser *p, Side *st, int complete, Event *done) {
    Ex *x = st->cur;
    if (x == NULL) {
        PyErr_SetString(PyExc_AttributeError, "no message in progress");
        return NULL;
    }
    int had_msg = st->has_msg;
    st->cur = NULL;
    st->has_msg = 0;
    int request = st == &p->req;
    if (request)
        x->req_done = 1;
    else
        x->resp_done = 1;
    if (!had_msg)
        return x;
    Msg *m = request ? &x->req : &x->resp;
    Event taken = {0};
    if (done == NULL) {
        if (take_body(&st->f, &taken) < 0)
            return NULL;
        done = &taken;
    }
    Py_XSETREF(m->body, done->body);
    done->body = NULL;
    m->body_len = done->body_len;
    if (complete) {
        m->complete = 1;
        m->end_ts = st->ts;
        if (done->trailers && PyList_GET_SIZE(done->trailers) > 0) {
            Py_XSETREF(m->trailers, done->trailers);
            done->trailers = NULL;
        }
    }
    event_clear(&taken);
    return x;
}

/* Emits every unfinished exchange, saying what is missing and why; goes on past a
 * Python error (the first is passed on). */
static int flush(Http1Parser *p, const char *why) {
    PyObject *type = NULL, *value = NULL, *tb = NULL;
    Side *sides[] = {&p->req, &p->resp};
    for (int k = 0; k < 2; k++) {
        Side *st = sides[k];
        if (st->cur == NULL)
            continue;
        Ex *x = end(p, st, 0, NULL);
        if (x != NULL && (st == &p->req || x->resp.seen))
            note(x, PyUnicode_FromFormat("%s incomplete: %s", st->name, why));
        if (PyErr_Occurred() && type == NULL)
            PyErr_Fetch(&type, &value, &tb);
        PyErr_Clear();
    }
    aw_clear(p);
    p->blocked = NULL;
    p->blocked_done = 0;
    Ex *x;
    while ((x = queue_pop(p)) != NULL) {
        if (!x->resp.seen)
            note(x, PyUnicode_FromFormat("no response: %s", why));
        if (PyErr_Occurred() && type == NULL)
            PyErr_Fetch(&type, &value, &tb);
        PyErr_Clear();
        if (emit(p, x) < 0 && type == NULL)
            PyErr_Fetch(&type, &value, &tb);
        PyErr_Clear();
    }
    if (type == NULL)
        return 0;
    PyErr_Restore(type, value, tb);
    return -1;
}

/* -- holding requests behind an Upgrade ---------------------------------------------- */

static void held_free(Held *h) {
    PyMem_Free(h->bytes);
    PyMem_Free(h->chunks);
    memset(h, 0, sizeof *h);
}

/* Holds data[:n] (a request chunk after a CONNECT/Upgrade request), at most MAX_HEAD
 * bytes in all: a peer that never answers must not make the agent keep its bytes. */
static int hold(Http1Parser *p, Side *st, const char *data, Py_ssize_t n, long long ts) {
    Held *h = &st->held;
    if (n > MAX_HEAD - h->size)
        return fail(p, PyUnicode_FromString("request stream stalled behind an unanswered Upgrade"),
                    "stalled");
    if (n == 0)
        return 0;
    if (h->n == h->chunks_cap) {
        Py_ssize_t cap = h->chunks_cap ? h->chunks_cap * 2 : 8;
        HeldChunk *bigger = PyMem_Realloc(h->chunks, (size_t)cap * sizeof(HeldChunk));
        if (bigger == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        h->chunks = bigger;
        h->chunks_cap = cap;
    }
    if (reserve(&h->bytes, &h->cap, h->size + n, MAX_HEAD) < 0)
        return -1;
    memcpy(h->bytes + h->size, data, (size_t)n);
    h->size += n;
    h->chunks[h->n].len = n;
    h->chunks[h->n].ts = ts;
    h->n++;
    return 0;
}

static int chunk(Http1Parser *p, Side *st, PyObject *obj, const char *data, Py_ssize_t n,
                 long long ts);

/* The Upgrade/CONNECT request was answered without switching: the held requests are
 * parsed now, in their chunks and with their times. */
static int unblock(Http1Parser *p) {
    p->blocked = NULL;
    p->blocked_done = 0;
    Side *st = &p->req;
    if (!st->holding)
        return 0;
    Held held = st->held;
    memset(&st->held, 0, sizeof st->held);
    st->holding = 0;
    int r = 0;
    Py_ssize_t at = 0;
    /* Each chunk is fed as it came (a gap drops them all: the side is in sync unless the
     * parser failed); one that loses sync leaves the next ones to the resync check. */
    if (!st->synced)
        held.n = 0;
    for (Py_ssize_t i = 0; i < held.n; i++) {
        r = chunk(p, st, NULL, held.bytes + at, held.chunks[i].len, held.chunks[i].ts);
        at += held.chunks[i].len;
        if (r < 0 || p->failed != NULL)
            break;
        if (st->holding) { /* blocked again: the rest waits too */
            for (Py_ssize_t k = i + 1; k < held.n && r == 0; k++) {
                r = hold(p, st, held.bytes + at, held.chunks[k].len, held.chunks[k].ts);
                at += held.chunks[k].len;
            }
            break;
        }
    }
    held_free(&held);
    return r;
}

/* -- a side's messages --------------------------------------------------------------- */

/* st's message starts, in x: the notes a resync owes go to it. */
static int begin(Side *st, Ex *x) {
    st->cur = x;
    st->has_msg = 1;
    st->fresh = 0;
    if (!st->resynced)
        return 0;
    char text[NOTE_MAX];
    int k = snprintf(text, sizeof text, "%s side resynced here", st->name);
    if (st->lost || st->dropped)
        k += snprintf(text + k, sizeof text - (size_t)k, ": ");
    if (st->lost)
        k += snprintf(text + k, sizeof text - (size_t)k, "%lld bytes not captured%s", st->lost,
                      st->dropped ? ", " : "");
    if (st->dropped)
        snprintf(text + k, sizeof text - (size_t)k, "%lld bytes skipped", st->dropped);
    st->resynced = 0;
    st->lost = st->dropped = 0;
    return note(x, PyUnicode_FromString(text));
}

static int limit_pending(Http1Parser *p);

static int request_head(Http1Parser *p, Side *st, Event *e) {
    Ex *x = ex_new(p);
    if (x == NULL)
        return -1;
    msg_head(&x->req, e);
    /* method_text hands out its one object for each common method, these among them */
    x->head = x->req.method == s_methods[METHOD_HEAD];
    x->connect = x->req.method == s_methods[METHOD_CONNECT];
    x->upgrade = upgrades(x);
    if (begin(st, x) < 0 || aw_append(p, x) < 0)
        return -1;
    return p->queued > MAX_PENDING ? limit_pending(p) : 0;
}

/* A request ended; after a CONNECT or Upgrade request later bytes (the rest of this
 * chunk first) wait for the response's verdict: they may be another protocol. */
static int request_done(Http1Parser *p, Side *st, Ex *x, const char *rest, Py_ssize_t n,
                        long long ts) {
    /* decided before emitting, which may free x */
    int block = x->upgrade && p->failed == NULL && st->synced;
    if (block) {
        p->blocked = x;
        p->blocked_done = 0;
    }
    if (emit_ready(p) < 0)
        return -1;
    if (!block)
        return 0;
    held_free(&st->held);
    st->holding = 1;
    return hold(p, st, rest, n, ts);
}

static int response_done(Http1Parser *p, Ex *x) {
    if (p->blocked == x && unblock(p) < 0)
        return -1;
    return emit_ready(p);
}

/* Pairs the response now starting (its head dated ts) with the request it answers. */
static int start_response(Http1Parser *p, Side *st, long long ts) {
    const char *notes[2];
    int n_notes = 0;
    if (p->aw_len > 0 && aw_at(p, 0) == NULL) { /* requests may have been lost in a gap */
        Ex *next = p->aw_len > 1 ? aw_at(p, 1) : NULL;
        if (next != NULL && (!next->req.seen || next->req.ts <= ts)) {
            aw_popleft(p);
            notes[n_notes++] = "request side had a gap before this request; pairing may be off";
        }
    }
    Ex *x;
    if (p->aw_len > 0 && aw_at(p, 0) != NULL) {
        x = aw_popleft(p);
        if (st->resynced)
            notes[n_notes++] = "response paired with the oldest unanswered request after a gap";
    } else {
        if ((x = ex_new(p)) == NULL)
            return -1;
        x->req_done = 1;
        notes[n_notes++] = p->aw_len > 0 ? "no request seen for this response (request gap)"
                                         : "no request seen for this response";
    }
    st->cur = x;
    st->has_msg = 0;
    if (p->queued > MAX_PENDING && limit_pending(p) < 0) /* responses without requests */
        return -1;
    for (int k = 0; k < n_notes; k++) { /* x may be paired again after a response gap */
        int seen = 0;
        for (Py_ssize_t i = 0; x->notes && i < PyList_GET_SIZE(x->notes) && !seen; i++)
            seen = PyUnicode_CompareWithASCIIString(PyList_GET_ITEM(x->notes, i), notes[k]) == 0;
        if (!seen && note(x, PyUnicode_FromString(notes[k])) < 0)
            return -1;
    }
    return 0;
}

static int response_head(Http1Parser *p, Side *st, Event *e, int bodiless) {
    if (st->cur == NULL && start_response(p, st, e->ts) < 0) /* not the final one after a 1xx */
        return -1;
    Ex *x = st->cur;
    int status = e->status;
    if (status >= 100 && status < 200 && status != 101) /* the final response is to come */
        return note(x, PyUnicode_FromFormat("%d %U", status, e->text));
    msg_head(&x->resp, e);
    if (begin(st, x) < 0)
        return -1;
    if (status == 101 || (x->connect && status >= 200 && status < 300)) {
        /* Switched (to the Upgrade, or into a tunnel): no longer HTTP/1. */
        Event none = {0};
        if (end(p, st, 1, &none) == NULL)
            return -1;
        PyObject *to = first_header(x->resp.headers, s_name_upgrade), *reason;
        if (!nonempty(to))
            to = x->req.seen ? first_header(x->req.headers, s_name_upgrade) : NULL;
        if (to == NULL && x->req.seen && x->connect)
            reason = PyUnicode_FromFormat("protocol switched to a CONNECT tunnel to %U",
                                          x->req.text);
        else if (nonempty(to))
            reason = PyUnicode_FromFormat("protocol switched to %U", to);
        else
            reason = PyUnicode_FromString("protocol switched to another protocol");
        if (reason == NULL)
            return -1;
        if (emit_ready(p) < 0) { /* x may be gone now */
            Py_DECREF(reason);
            return -1;
        }
        return fail(p, reason, "protocol switched");
    }
    if (bodiless || x->head) { /* a response to HEAD has no body whatever the headers say */
        if (!bodiless)
            framer_no_body(&st->f);
        Event none = {0};
        return end(p, st, 1, &none) == NULL ? -1 : response_done(p, x);
    }
    return 0;
}

/* -- losing sync --------------------------------------------------------------------- */

/* Stops parsing st until a chunk starts a new message (a gap of `lost` bytes, or a false
 * resync). */
static int desync(Http1Parser *p, Side *st, long long lost) {
    if (st->has_msg) {
        Ex *x = end(p, st, 0, NULL);
        if (x == NULL ||
            note(x, PyUnicode_FromFormat("%lld bytes not captured in %s", lost, st->name)) < 0)
            return -1;
    } else {
        st->lost = add_sat(st->lost, lost);
        st->dropped = add_sat(st->dropped, framer_head_len(&st->f)); /* a partial head */
        if (st->cur != NULL) { /* response head not seen: its request awaits again */
            if (aw_appendleft(p, st->cur) < 0)
                return -1;
            st->cur = NULL;
        }
    }
    if (st == &p->req) {
        if (st->holding) {
            st->dropped = add_sat(st->dropped, st->held.size);
            held_free(&st->held);
            st->holding = 0;
        }
        p->blocked = NULL;
        p->blocked_done = 0;
        if ((p->aw_len == 0 || aw_at(p, p->aw_len - 1) != NULL) && aw_append(p, NULL) < 0)
            return -1;
    }
    framer_reset(&st->f);
    st->synced = 0;
    st->resynced = 1;
    if (p->blocked_done || (p->blocked != NULL && p->blocked->resp_done))
        return unblock(p); /* its response was cut short: assume it did not switch */
    return 0;
}

static int parse_error(Http1Parser *p, Side *st, const char *why) {
    if (st->fresh) { /* a resync on something that only looked like a message */
        st->dropped = add_sat(st->dropped, st->fed);
        framer_reset(&st->f); /* its partial head is counted already */
        return desync(p, st, 0);
    }
    char text[NOTE_MAX];
    snprintf(text, sizeof text, "parse error: %s", why);
    return fail(p, PyUnicode_FromFormat("HTTP/1 parse error in %s stream: %s", st->name, why),
                text);
}

/* Gives up on the oldest exchanges while too many are queued: requests awaiting a
 * response that will not come (sync was lost), or exchanges waiting behind one whose
 * response is read until the connection closes while the client goes on sending.  The
 * oldest that neither side is parsing goes, past the queue's head if need be (it is
 * then emitted ahead of that one), so the queue stays bounded whatever the peers do. */
static int limit_pending(Http1Parser *p) {
    while (p->queued > MAX_PENDING) {
        Ex *x = p->first;
        while (x != NULL && (x == p->resp.cur || x == p->req.cur))
            x = x->next;
        if (x == NULL)
            return 0;
        queue_unlink(p, x);
        if (x->awaiting)
            aw_remove(p, x);
        int r = x->resp.seen
                    ? 0
                    : note(x, PyUnicode_FromString(
                                  "no response seen (too many unanswered requests)"));
        if (emit(p, x) < 0 || r < 0) /* emitted (and freed) also after an error */
            return -1;
    }
    return 0;
}

/* -- feeding ------------------------------------------------------------------------- */

/* Whether a chunk starts a message of st's direction (http1.py's checks); obj: the chunk
 * as the caller gave it, NULL to make one from data. */
static int starts_message(Side *st, PyObject *obj, const char *data, Py_ssize_t n) {
    if (looks_request == NULL) {
        PyObject *mod = PyImport_ImportModule("agent.l7.http1");
        if (mod == NULL)
            return -1;
        looks_request = PyObject_GetAttrString(mod, "looks_like_request_start");
        looks_response = PyObject_GetAttrString(mod, "looks_like_response_start");
        Py_DECREF(mod);
        if (looks_request == NULL || looks_response == NULL) {
            Py_CLEAR(looks_request);
            Py_CLEAR(looks_response);
            return -1;
        }
    }
    PyObject *arg = obj ? Py_NewRef(obj) : PyBytes_FromStringAndSize(data, n);
    if (arg == NULL)
        return -1;
    PyObject *r = PyObject_CallOneArg(st->f.response ? looks_response : looks_request, arg);
    Py_DECREF(arg);
    if (r == NULL)
        return -1;
    int yes = PyObject_IsTrue(r);
    Py_DECREF(r);
    return yes;
}

/* Parses one chunk of st (obj: as the caller gave it, or NULL). */
static int chunk(Http1Parser *p, Side *st, PyObject *obj, const char *data, Py_ssize_t n,
                 long long ts) {
    int request = st == &p->req;
    if (!st->synced) { /* out of sync: wait for a chunk that starts a message */
        int yes = starts_message(st, obj, data, n);
        if (yes < 0)
            return -1;
        if (!yes) {
            st->dropped = add_sat(st->dropped, n);
            return 0;
        }
        framer_reset(&st->f);
        st->synced = st->fresh = st->resynced = 1;
        st->fed = 0;
    }
    if (st->holding)
        return hold(p, st, data, n, ts);
    st->ts = ts;
    st->fed = add_sat(st->fed, n);
    Py_ssize_t pos = 0;
    for (;;) {
        Event e = {0};
        int event = step(&st->f, data, n, &pos, ts, &e), r = 0;
        Ex *x;
        switch (event) {
        case EV_NEED:
            return 0;
        case EV_END:
            x = end(p, st, 1, &e);
            r = x == NULL ? -1
                : request ? request_done(p, st, x, data + pos, n - pos, ts)
                          : response_done(p, x);
            break;
        case EV_HEAD:
        case EV_MESSAGE:
            if (!request) {
                r = response_head(p, st, &e, event == EV_MESSAGE);
            } else {
                r = request_head(p, st, &e);
                if (r == 0 && event == EV_MESSAGE) { /* a request without a body: ended too */
                    Event none = {0};
                    x = end(p, st, 1, &none);
                    r = x == NULL ? -1 : request_done(p, st, x, data + pos, n - pos, ts);
                }
            }
            break;
        case EV_ERROR:
            return parse_error(p, st, e.why);
        default: /* a Python error */
            event_clear(&e);
            return -1;
        }
        event_clear(&e);
        if (r < 0)
            return -1;
        if (p->failed != NULL || !st->synced || st->holding || pos == n)
            return 0;
    }
}

/* -- the type ------------------------------------------------------------------------ */

/* m for agent.l7.exchange's class `name`, whose fields must be `fields`: each a slot (a
 * T_OBJECT_EX member), no __post_init__, no __new__ of its own. */
static int load_maker(Maker *m, PyObject *mod, PyObject *dataclasses, const char *name,
                      const char *const *fields, int n) {
    PyObject *cls = PyObject_GetAttrString(mod, name);
    PyObject *list = cls ? PyObject_CallMethod(dataclasses, "fields", "O", cls) : NULL;
    int ok = list != NULL && PyType_Check(cls) && PyTuple_GET_SIZE(list) == n &&
             !PyObject_HasAttrString(cls, "__post_init__") &&
             ((PyTypeObject *)cls)->tp_new == PyBaseObject_Type.tp_new;
    for (int i = 0; ok && i < n; i++) {
        PyObject *field_name = PyObject_GetAttrString(PyTuple_GET_ITEM(list, i), "name");
        ok = field_name != NULL && PyUnicode_Check(field_name) &&
             PyUnicode_CompareWithASCIIString(field_name, fields[i]) == 0;
        Py_XDECREF(field_name);
        PyMemberDef *member = ok ? ((PyTypeObject *)cls)->tp_members : NULL;
        while (member != NULL && member->name != NULL && strcmp(member->name, fields[i]) != 0)
            member++;
        ok = member != NULL && member->name != NULL && member->type == T_OBJECT_EX &&
             !(member->flags & READONLY) && member->offset >= (Py_ssize_t)sizeof(PyObject) &&
             member->offset + (Py_ssize_t)sizeof(PyObject *) <= ((PyTypeObject *)cls)->tp_basicsize;
        if (ok)
            m->offsets[i] = member->offset;
    }
    Py_XDECREF(list);
    if (!ok) {
        if (!PyErr_Occurred())
            PyErr_Format(PyExc_ImportError,
                         "_http1: agent.l7.exchange.%s is no longer the slots dataclass it fills",
                         name);
        Py_XDECREF(cls);
        return -1;
    }
    m->type = (PyTypeObject *)cls;
    return 0;
}

static int load_classes(void) {
    static const char *const message_fields[MESSAGE_FIELDS] = {
        "ts_ns", "end_ts_ns", "method", "target", "authority", "status", "reason", "version",
        "headers", "trailers", "body", "body_len", "body_truncated", "complete"};
    static const char *const exchange_fields[EXCHANGE_FIELDS] = {
        "protocol", "request", "response", "stream_id", "grpc", "notes", "redactions"};
    if (exchange_maker.type != NULL)
        return 0;
    PyObject *mod = PyImport_ImportModule("agent.l7.exchange");
    PyObject *dataclasses = mod ? PyImport_ImportModule("dataclasses") : NULL;
    int r = -1;
    if (dataclasses != NULL &&
        load_maker(&message_maker, mod, dataclasses, "HttpMessage", message_fields,
                   MESSAGE_FIELDS) == 0) {
        r = load_maker(&exchange_maker, mod, dataclasses, "Exchange", exchange_fields,
                       EXCHANGE_FIELDS);
        if (r < 0)
            Py_CLEAR(message_maker.type);
    }
    Py_XDECREF(mod);
    Py_XDECREF(dataclasses);
    return r;
}

static void side_init(Side *st, const char *name, int response, Py_ssize_t body_limit) {
    framer_reset(&st->f);
    held_free(&st->held);
    memset(st, 0, sizeof *st);
    framer_init(&st->f, response, body_limit);
    st->name = name;
    st->synced = 1;
}

/* Frees everything held (also for a second __init__). */
static void parser_clear(Http1Parser *p) {
    Ex *x;
    aw_clear(p);
    p->blocked = NULL;
    p->blocked_done = 0;
    p->req.cur = p->resp.cur = NULL;
    while ((x = queue_pop(p)) != NULL)
        ex_free(x);
    PyMem_Free(p->aw);
    p->aw = NULL;
    p->aw_cap = 0;
    framer_reset(&p->req.f);
    framer_reset(&p->resp.f);
    held_free(&p->req.held);
    Py_CLEAR(p->failed);
    Py_CLEAR(p->out);
}

static int Http1Parser_init(Http1Parser *p, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"body_limit", NULL};
    Py_ssize_t body_limit = 4096;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|n", kwlist, &body_limit))
        return -1;
    if (p->busy) {
        PyErr_SetString(PyExc_RuntimeError, "Http1Parser re-entered");
        return -1;
    }
    if (load_classes() < 0)
        return -1;
    parser_clear(p);
    p->body_limit = body_limit > 0 ? body_limit : 0;
    p->closed = 0;
    p->next_id = 1;
    side_init(&p->req, "request", 0, p->body_limit);
    side_init(&p->resp, "response", 1, p->body_limit);
    return 0;
}

static void Http1Parser_dealloc(Http1Parser *p) {
    parser_clear(p);
    Py_TYPE(p)->tp_free((PyObject *)p);
}

/* The exchanges emitted during this call. */
static PyObject *take(Http1Parser *p) {
    PyObject *out = p->out ? p->out : PyList_New(0);
    p->out = NULL;
    p->busy = 0;
    return out;
}

/* Positional and keyword arguments of a METH_FASTCALL | METH_KEYWORDS method into
 * out[:n] (all required). */
static int arguments(PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames,
                     const char *const *names, int n, PyObject **out, const char *signature) {
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    for (int k = 0; k < n; k++)
        out[k] = k < nargs ? args[k] : NULL;
    int ok = nargs <= n;
    for (Py_ssize_t i = 0; ok && i < nkw; i++) {
        int k = 0;
        while (k < n && PyUnicode_CompareWithASCIIString(PyTuple_GET_ITEM(kwnames, i), names[k]))
            k++;
        ok = k < n && out[k] == NULL;
        if (ok)
            out[k] = args[nargs + i];
    }
    for (int k = 0; ok && k < n; k++)
        ok = out[k] != NULL;
    if (!ok)
        PyErr_Format(PyExc_TypeError, "%s", signature);
    return ok ? 0 : -1;
}

/* The side a "request" or "response" argument names (anything else: the response). */
static Side *side_of(Http1Parser *p, PyObject *side) {
    int request = side == s_request ||
                  (PyUnicode_Check(side) && PyUnicode_CompareWithASCIIString(side, "request") == 0);
    return request ? &p->req : &p->resp;
}

/* Whether a call does nothing (failed, closed) or may not run (re-entered). */
static int idle(Http1Parser *p) {
    if (p->busy) {
        PyErr_SetString(PyExc_RuntimeError, "Http1Parser re-entered");
        return -1;
    }
    return p->failed != NULL || p->closed;
}

PyDoc_STRVAR(parser_feed_doc,
"feed(side, data, ts_ns) -> list[Exchange]\n"
"\n"
"Parse one captured chunk of `side` (\"request\" or \"response\"); return the exchanges\n"
"it completed.");

/* feed() past its arguments: 0 with the exchanges the chunk completed in *found (a
 * new list, or NULL: none), or -1 with an error (re-entered, or data's truth). */
static int feed(Http1Parser *p, Side *st, PyObject *data, PyObject *ts_ns, PyObject **found) {
    *found = NULL;
    int skip = idle(p);
    if (skip)
        return skip < 0 ? -1 : 0;
    int full = PyBytes_CheckExact(data) ? PyBytes_GET_SIZE(data) > 0 : PyObject_IsTrue(data);
    if (full <= 0)
        return full;
    p->busy = 1;
    Py_buffer view;
    long long ts = PyLong_AsLongLong(ts_ns);
    if (ts == -1 && PyErr_Occurred()) {
        internal_error(p);
    } else {
        /* an exact int only: a subclass's would be the wrong type in the messages */
        p->ts_obj = PyLong_CheckExact(ts_ns) ? ts_ns : NULL;
        p->ts_val = ts;
        if (PyBytes_CheckExact(data)) { /* what records carry: no buffer to get and release */
            if (chunk(p, st, data, PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data), ts) < 0)
                internal_error(p);
        } else if (PyObject_GetBuffer(data, &view, PyBUF_SIMPLE) < 0) {
            internal_error(p);
        } else {
            if (chunk(p, st, data, view.buf, view.len, ts) < 0)
                internal_error(p);
            PyBuffer_Release(&view);
        }
        p->ts_obj = NULL;
    }
    *found = p->out;
    p->out = NULL;
    p->busy = 0;
    return 0;
}

static PyObject *Http1Parser_feed(Http1Parser *p, PyObject *const *args, Py_ssize_t nargs,
                                  PyObject *kwnames) {
    static const char *const names[] = {"side", "data", "ts_ns"};
    PyObject *a[3], *found;
    if (arguments(args, nargs, kwnames, names, 3, a, "feed(side, data, ts_ns)") < 0 ||
        feed(p, side_of(p, a[0]), a[1], a[2], &found) < 0)
        return NULL;
    return found ? found : PyList_New(0);
}

/* -- the C API (_http1_api.h) ------------------------------------------------------- */

static int api_feed(PyObject *parser, int request, PyObject *data, PyObject *ts_ns,
                    PyObject **found) {
    Http1Parser *p = (Http1Parser *)parser;
    return feed(p, request ? &p->req : &p->resp, data, ts_ns, found);
}

static PyObject *api_failed(PyObject *parser) { return ((Http1Parser *)parser)->failed; }

static Http1Api api = {NULL, api_feed, api_failed};

PyDoc_STRVAR(parser_gap_doc,
"gap(side, length, ts_ns) -> list[Exchange]\n"
"\n"
"`length` bytes of `side` were not captured: end its message and resync.");

static PyObject *Http1Parser_gap(Http1Parser *p, PyObject *const *args, Py_ssize_t nargs,
                                 PyObject *kwnames) {
    static const char *const names[] = {"side", "length", "ts_ns"};
    PyObject *a[3];
    if (arguments(args, nargs, kwnames, names, 3, a, "gap(side, length, ts_ns)") < 0)
        return NULL;
    int skip = idle(p);
    if (skip < 0)
        return NULL;
    int overflow = 0;
    long long length = PyLong_AsLongLongAndOverflow(a[1], &overflow);
    if (length == -1 && PyErr_Occurred())
        return NULL;
    if (overflow) /* more than anyone can lose: as good as the most a count holds */
        length = overflow > 0 ? LLONG_MAX : -1;
    if (skip || length <= 0)
        return PyList_New(0);
    p->busy = 1;
    Side *st = side_of(p, a[0]);
    int r = 0;
    if (!st->synced)
        st->lost = add_sat(st->lost, length);
    else
        r = desync(p, st, length);
    if (r < 0 || emit_ready(p) < 0)
        internal_error(p);
    return take(p);
}

PyDoc_STRVAR(parser_close_doc,
"close(ts_ns) -> list[Exchange]\n"
"\n"
"The connection closed: end read-until-close bodies, return all unfinished.  A\n"
"read-until-close body's end_ts_ns is its last byte's chunk, not the close.");

static PyObject *Http1Parser_close(Http1Parser *p, PyObject *const *args, Py_ssize_t nargs,
                                   PyObject *kwnames) {
    static const char *const names[] = {"ts_ns"};
    PyObject *a[1];
    if (arguments(args, nargs, kwnames, names, 1, a, "close(ts_ns)") < 0)
        return NULL;
    int skip = idle(p);
    if (skip < 0)
        return NULL;
    if (skip)
        return PyList_New(0);
    p->busy = 1;
    p->closed = 1;
    Side *st = &p->resp;
    int r = 0;
    if (st->synced && st->has_msg && st->f.state == S_EOF) {
        Ex *x = end(p, st, 1, NULL);
        if (x == NULL ||
            note(x, PyUnicode_FromString("response body delimited by connection close")) < 0 ||
            response_done(p, x) < 0)
            r = -1;
    }
    if (r < 0 || flush(p, "connection closed") < 0)
        internal_error(p);
    return take(p);
}

static PyObject *Http1Parser_failed(Http1Parser *p, void *closure) {
    (void)closure;
    return Py_NewRef(p->failed ? p->failed : Py_None);
}

static PyGetSetDef Http1Parser_getset[] = {
    {"failed", (getter)Http1Parser_failed, NULL,
     "why parsing stopped for good (no quote of captured bytes), or None", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMemberDef Http1Parser_members[] = {
    {"body_limit", T_PYSSIZET, offsetof(Http1Parser, body_limit), READONLY,
     "body bytes kept per message"},
    {NULL, 0, 0, 0, NULL},
};

static PyMethodDef Http1Parser_methods[] = {
    {"feed", (PyCFunction)(void (*)(void))Http1Parser_feed, METH_FASTCALL | METH_KEYWORDS,
     parser_feed_doc},
    {"gap", (PyCFunction)(void (*)(void))Http1Parser_gap, METH_FASTCALL | METH_KEYWORDS,
     parser_gap_doc},
    {"close", (PyCFunction)(void (*)(void))Http1Parser_close, METH_FASTCALL | METH_KEYWORDS,
     parser_close_doc},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject Http1ParserType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "agent.l7._http1.Http1Parser",
    .tp_doc = PyDoc_STR("Http1Parser(body_limit=4096): turns one HTTP/1.x connection's two "
                        "byte streams into Exchanges."),
    .tp_basicsize = sizeof(Http1Parser),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Http1Parser_init,
    .tp_dealloc = (destructor)Http1Parser_dealloc,
    .tp_methods = Http1Parser_methods,
    .tp_members = Http1Parser_members,
    .tp_getset = Http1Parser_getset,
};

/* -- the module ------------------------------------------------------------------- */

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "agent.l7._http1",
    .m_doc = "HTTP/1.x framing and request/response pairing for agent/l7/http1.py.",
    .m_size = -1,
};

/* The one object the framing hands out for a COMMON_NAMES name. */
static PyObject *common_name(const char *name) {
    for (int k = 0; k < N_NAMES; k++)
        if (strcmp(COMMON_NAMES[k], name) == 0)
            return s_names[k];
    PyErr_Format(PyExc_SystemError, "_http1: %s not in COMMON_NAMES", name);
    return NULL;
}

PyMODINIT_FUNC PyInit__http1(void) {
    if (PyType_Ready(&Http1StreamType) < 0 || PyType_Ready(&Http1ParserType) < 0)
        return NULL;
    s_version_10 = PyUnicode_InternFromString("1.0");
    s_version_11 = PyUnicode_InternFromString("1.1");
    s_empty = PyUnicode_FromString("");
    s_empty_bytes = PyBytes_FromStringAndSize(NULL, 0);
    s_http1 = PyUnicode_InternFromString("http1");
    s_request = PyUnicode_InternFromString("request");
    if (!s_version_10 || !s_version_11 || !s_empty || !s_empty_bytes || !s_http1 || !s_request)
        return NULL;
    for (int k = 0; k < COMMON_METHODS; k++)
        if ((s_methods[k] = PyUnicode_InternFromString(METHODS[k])) == NULL)
            return NULL;
    if (strcmp(METHODS[METHOD_HEAD], "HEAD") != 0 ||
        strcmp(METHODS[METHOD_CONNECT], "CONNECT") != 0) {
        PyErr_SetString(PyExc_SystemError, "_http1: METHOD_HEAD, METHOD_CONNECT are off");
        return NULL;
    }
    for (int c = 0; c < 256; c++)
        tchar[c] = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                   (c != 0 && strchr("!#$%&'*+-.^_`|~", c) != NULL);
    memset(names_by_len, -1, sizeof names_by_len);
    for (int k = 0; k < N_NAMES; k++) {
        size_t len = strlen(COMMON_NAMES[k]);
        int j = 0;
        while (len <= MAX_NAME_LEN && j < NAMES_PER_LEN && names_by_len[len][j] >= 0)
            j++;
        if (len > MAX_NAME_LEN || j == NAMES_PER_LEN) {
            PyErr_SetString(PyExc_SystemError, "_http1: COMMON_NAMES outgrew names_by_len");
            return NULL;
        }
        names_by_len[len][j] = (signed char)k;
        memcpy(name_words[k], COMMON_NAMES[k], len);
        for (int i = 0; i < NAME_WORDS; i++)
            name_words[k][i] |= LOWER_BITS;
        if ((s_names[k] = PyUnicode_InternFromString(COMMON_NAMES[k])) == NULL)
            return NULL;
        reusable[k] = 1;
        for (size_t i = 0; i < sizeof NOT_REUSED / sizeof NOT_REUSED[0]; i++)
            if (strcmp(COMMON_NAMES[k], NOT_REUSED[i]) == 0)
                reusable[k] = 0;
    }
    if ((s_name_host = common_name("host")) == NULL ||
        (s_name_upgrade = common_name("upgrade")) == NULL ||
        (s_name_connection = common_name("connection")) == NULL)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddIntConstant(m, "NEED", EV_NEED) < 0 ||
        PyModule_AddIntConstant(m, "HEAD", EV_HEAD) < 0 ||
        PyModule_AddIntConstant(m, "MESSAGE", EV_MESSAGE) < 0 ||
        PyModule_AddIntConstant(m, "END", EV_END) < 0 ||
        PyModule_AddIntConstant(m, "ERROR", EV_ERROR) < 0 ||
        PyModule_AddIntConstant(m, "MAX_HEAD", MAX_HEAD) < 0 ||
        PyModule_AddIntConstant(m, "MAX_PENDING", MAX_PENDING) < 0 ||
        PyModule_AddObjectRef(m, "Http1Stream", (PyObject *)&Http1StreamType) < 0 ||
        PyModule_AddObjectRef(m, "Http1Parser", (PyObject *)&Http1ParserType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    api.type = &Http1ParserType;
    PyObject *capsule = PyCapsule_New(&api, HTTP1_API_CAPSULE, NULL);
    int added = capsule == NULL ? -1 : PyModule_AddObjectRef(m, "_C_API", capsule);
    Py_XDECREF(capsule);
    if (added < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
