/* HTTP/1.x message framing of one direction of a connection, in C: the parser behind
 * agent/l7/http1.py, whose docstring says how the pairing uses it.
 *
 * Why C: with llhttp driven through httptools, every message cost about nine Python
 * callbacks (message begin, the URL or status, one per header, headers complete,
 * body, message complete) plus the Python work in each: nearly half of the agent's
 * CPU per HTTP/1 exchange.  Here a message head comes back whole, in one call, as
 * Python objects; a body is framed and kept here and comes back with its end.
 *
 * The API: feed(data, pos, ts) parses data[pos:] until something happens and
 * returns (event, position after it, value):
 *   NEED     data used up, nothing more to say (position == len(data));
 *   HEAD     a message head, whose body follows: value is the head (below);
 *   MESSAGE  a head of a message without a body, which therefore also ended;
 *   END      the message's body ended: value is (body, body_len, trailers or None);
 *   ERROR    a parse error: value is a fixed reason text (it never quotes the input);
 *            the parser stays failed until reset().
 * A head is (ts of the chunk holding its first byte, method, target, version, headers)
 * for requests and (ts, status, reason, version, headers) for responses; headers are
 * (lower-case name, value) str pairs, values latin-1 with surrounding SP/HT stripped.
 * Stopping after each head lets the caller decide what framing alone cannot (a
 * response to HEAD has no body: no_body(); a switch of protocol: stop feeding) before
 * the next byte is read.
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
 * checked against the buffer it reads, there is no recursion, Content-Length and
 * chunk sizes are checked for overflow, a head (or trailer section) larger than
 * MAX_HEAD is an error, and a body keeps at most body_limit bytes (all are counted).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <limits.h>
#include <stdint.h>
#include <string.h>
#include <structmember.h>

#define MAX_HEAD (1 << 20) /* largest head or trailer section followed (http1.py's _MAX_HEAD) */
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

typedef struct {
    PyObject_HEAD
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
} Http1Stream;

/* llhttp's HTTP methods, the common first: an unknown token is taken for garbage (a
 * resync on bytes that only look like a request line must fail), as it was there. */
#define COMMON_METHODS 8
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
static const char *check_line(const Http1Stream *s, const char *p, Py_ssize_t n, int first,
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
static void head_clear(Http1Stream *s) {
    s->head_len = s->line_start = s->checked = 0;
    PyMem_Free(s->head);
    s->head = NULL;
    s->head_cap = 0;
}

static void body_clear(Http1Stream *s) {
    Py_CLEAR(s->body);
    s->kept = 0;
    s->body_len = 0;
    s->remaining = 0;
    s->chunk_digits = 0;
}

/* Counts data[:n] as body and keeps what fits under body_limit.  A Content-Length
 * body's bytes object is made its final size at once; others grow by doubling. */
static int body_add(Http1Stream *s, const char *p, Py_ssize_t n) {
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
/* indices in COMMON_NAMES by length, -1 after the last */
static signed char names_by_len[MAX_NAME_LEN + 1][NAMES_PER_LEN + 1];

static PyObject *lower_name(const char *p, Py_ssize_t n) {
    char small[128];
    char *buf = n <= (Py_ssize_t)sizeof small ? small : PyMem_Malloc((size_t)n);
    if (buf == NULL)
        return PyErr_NoMemory();
    for (Py_ssize_t i = 0; i < n; i++)
        buf[i] = (p[i] >= 'A' && p[i] <= 'Z') ? (char)(p[i] - 'A' + 'a') : p[i];
    for (int j = 0; n <= MAX_NAME_LEN && names_by_len[n][j] >= 0; j++) {
        int k = names_by_len[n][j];
        if (memcmp(COMMON_NAMES[k], buf, (size_t)n) == 0)
            return Py_NewRef(s_names[k]);
    }
    PyObject *name = PyUnicode_DecodeLatin1(buf, n, NULL);
    if (buf != small)
        PyMem_Free(buf);
    return name;
}

/* One header field from its line and the obs-fold lines after it (`lines` lines
 * starting at p, `n` bytes with their line ends).  The joined value is built in
 * `scratch` (room for n bytes) only when there are folds. */
static PyObject *header_field(const char *p, Py_ssize_t n, Py_ssize_t name_len, char *scratch,
                              Framing *f, const char **why) {
    Py_ssize_t first_n = (const char *)memchr(p, '\n', (size_t)n) - p + 1;
    Py_ssize_t len = line_content(p, first_n);
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
    PyObject *name = lower_name(p, name_len);
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
    return field;
}

/* The header fields of lines p[:n] (complete lines, the blank line excluded); framing
 * into f (NULL: trailers, which frame nothing).  NULL with *why set on a parse error,
 * NULL alone on a Python error. */
static PyObject *header_list(const char *p, Py_ssize_t n, Framing *f, const char **why) {
    PyObject *list = PyList_New(0);
    char *scratch = NULL;
    if (list == NULL)
        return NULL;
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
        PyObject *field = header_field(p + i, end - i, name_len, scratch, f, why);
        if (field == NULL)
            goto fail;
        int err = PyList_Append(list, field);
        Py_DECREF(field);
        if (err < 0)
            goto fail;
        i = end;
    }
    PyMem_Free(scratch);
    return list;
fail:
    PyMem_Free(scratch);
    Py_DECREF(list);
    return NULL;
}

static PyObject *method_text(const char *p, Py_ssize_t n) {
    int k = method_index(p, n);
    if (k >= 0 && k < COMMON_METHODS)
        return Py_NewRef(s_methods[k]);
    return PyUnicode_DecodeLatin1(p, n, NULL);
}

/* The head in block[:n] (every line, the blank line last): sets the body's framing
 * and the state after the head; returns (event, head) parts through *head.  -1 with
 * *why on a parse error, -2 on a Python error. */
static int build_head(Http1Stream *s, const char *block, Py_ssize_t n, PyObject **head,
                      const char **why) {
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
    PyObject *headers = header_list(block + first_n, fields_end - first_n, &f, why);
    if (headers == NULL)
        return *why ? -1 : -2;
    int status = 0;
    PyObject *a, *b;
    if (s->response) {
        status = (sl.a[0] - '0') * 100 + (sl.a[1] - '0') * 10 + (sl.a[2] - '0');
        a = PyLong_FromLong(status);
    } else {
        a = method_text(sl.a, sl.a_len);
    }
    b = PyUnicode_DecodeLatin1(sl.b, sl.b_len, NULL);
    PyObject *ts = PyLong_FromLongLong(s->begin_ts);
    PyObject *version = sl.minor ? s_version_11 : s_version_10;
    if (a == NULL || b == NULL || ts == NULL) {
        Py_XDECREF(a);
        Py_XDECREF(b);
        Py_XDECREF(ts);
        Py_DECREF(headers);
        return -2;
    }
    *head = PyTuple_Pack(5, ts, a, b, version, headers);
    Py_DECREF(ts);
    Py_DECREF(a);
    Py_DECREF(b);
    Py_DECREF(headers);
    if (*head == NULL)
        return -2;
    /* RFC 9112 6.3, with Transfer-Encoding winning over Content-Length */
    body_clear(s);
    if (s->response && ((status >= 100 && status < 200) || status == 204 || status == 304)) {
        s->state = S_IDLE;
    } else if (f.has_te && f.chunked) {
        s->state = S_CHUNK_SIZE;
    } else if (f.has_te) {
        if (!s->response) {
            Py_CLEAR(*head);
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
static int head_append(Http1Stream *s, const char *data, Py_ssize_t from, Py_ssize_t to,
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
static int read_section(Http1Stream *s, const char *data, Py_ssize_t n, Py_ssize_t *pos,
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

/* -- Http1Stream -------------------------------------------------------------------- */

static int Http1Stream_init(Http1Stream *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"response", "body_limit", NULL};
    int response;
    Py_ssize_t body_limit;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "pn", kwlist, &response, &body_limit))
        return -1;
    self->response = response;
    self->body_limit = body_limit > 0 ? body_limit : 0;
    self->state = S_IDLE;
    head_clear(self);
    body_clear(self);
    return 0;
}

static void Http1Stream_dealloc(Http1Stream *self) {
    PyMem_Free(self->head);
    Py_XDECREF(self->body);
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

static PyObject *fail(Http1Stream *s, Py_ssize_t pos, const char *why) {
    s->state = S_FAILED;
    head_clear(s);
    return result(EV_ERROR, pos, PyUnicode_FromString(why));
}

/* (body, body_len) of the message being parsed, with `trailers` after them unless
 * NULL; its body forgotten. */
static PyObject *take_body(Http1Stream *s, PyObject *trailers) {
    PyObject *body = s->body;
    s->body = NULL;
    if (body == NULL)
        body = PyBytes_FromStringAndSize(NULL, 0);
    else if (PyBytes_GET_SIZE(body) != s->kept)
        _PyBytes_Resize(&body, s->kept); /* on failure: freed, NULL */
    PyObject *len = PyLong_FromLongLong(s->body_len);
    PyObject *out = PyTuple_New(trailers ? 3 : 2);
    body_clear(s);
    if (body == NULL || len == NULL || out == NULL) {
        Py_XDECREF(body);
        Py_XDECREF(len);
        Py_XDECREF(out);
        return NULL;
    }
    PyTuple_SET_ITEM(out, 0, body);
    PyTuple_SET_ITEM(out, 1, len);
    if (trailers)
        PyTuple_SET_ITEM(out, 2, Py_NewRef(trailers));
    return out;
}

PyDoc_STRVAR(feed_doc,
"feed(data, pos, ts) -> (event, pos, value)\n"
"\n"
"Parse data[pos:] (bytes of one captured chunk, dated ts) until the next event:\n"
"NEED (data used up), HEAD (a head; its body follows), MESSAGE (a head without a\n"
"body: the message ended too), END (the body ended: value (body, body_len,\n"
"trailers or None)), ERROR (value: why, a fixed text).  pos: where parsing stopped.");

static PyObject *Http1Stream_feed(Http1Stream *s, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "feed(data, pos, ts)");
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    PyObject *out = NULL;
    const char *data = view.buf;
    Py_ssize_t n = view.len;
    Py_ssize_t pos = PyLong_AsSsize_t(args[1]);
    if (pos == -1 && PyErr_Occurred())
        goto done;
    long long ts = PyLong_AsLongLong(args[2]);
    if (ts == -1 && PyErr_Occurred())
        goto done;
    if (pos < 0 || pos > n) {
        PyErr_SetString(PyExc_ValueError, "feed: pos outside data");
        goto done;
    }
    for (;;) {
        switch (s->state) {
        case S_FAILED:
            out = result(EV_ERROR, pos, PyUnicode_FromString("parser failed earlier"));
            goto done;
        case S_IDLE:
            while (pos < n && (data[pos] == '\r' || data[pos] == '\n'))
                pos++;
            if (pos == n) {
                out = result(EV_NEED, pos, Py_NewRef(Py_None));
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
            if (r == -2)
                goto done;
            if (r == -1) {
                out = fail(s, pos, why);
                goto done;
            }
            if (r == 0) {
                out = result(EV_NEED, pos, Py_NewRef(Py_None));
                goto done;
            }
            if (s->state == S_TRAILERS) {
                Py_ssize_t fields_end = block_n - 1;
                if (fields_end > 0 && block[fields_end - 1] == '\r')
                    fields_end--;
                PyObject *trailers = fields_end > 0 ? header_list(block, fields_end, NULL, &why)
                                                    : Py_NewRef(Py_None);
                head_clear(s);
                if (trailers == NULL) {
                    if (why != NULL)
                        out = fail(s, pos, why);
                    goto done;
                }
                s->state = S_IDLE;
                out = result(EV_END, pos, take_body(s, trailers));
                Py_DECREF(trailers);
                goto done;
            }
            PyObject *head = NULL;
            int event = build_head(s, block, block_n, &head, &why);
            head_clear(s);
            if (event == -2)
                goto done;
            if (event == -1) {
                out = fail(s, pos, why);
                goto done;
            }
            out = result(event, pos, head);
            goto done;
        }
        case S_LENGTH:
        case S_CHUNK_DATA: {
            Py_ssize_t take = n - pos;
            if ((long long)take > s->remaining)
                take = (Py_ssize_t)s->remaining;
            if (body_add(s, data + pos, take) < 0)
                goto done;
            pos += take;
            s->remaining -= take;
            if (s->remaining > 0) {
                out = result(EV_NEED, pos, Py_NewRef(Py_None));
                goto done;
            }
            if (s->state == S_LENGTH) {
                s->state = S_IDLE;
                out = result(EV_END, pos, take_body(s, Py_None));
                goto done;
            }
            s->state = S_CHUNK_END;
            break;
        }
        case S_EOF:
            if (body_add(s, data + pos, n - pos) < 0)
                goto done;
            out = result(EV_NEED, n, Py_NewRef(Py_None));
            goto done;
        case S_CHUNK_END:
        case S_CHUNK_END_LF:
            if (pos == n) {
                out = result(EV_NEED, pos, Py_NewRef(Py_None));
                goto done;
            }
            if (data[pos] == '\r' && s->state == S_CHUNK_END) {
                s->state = S_CHUNK_END_LF;
            } else if (data[pos] == '\n') {
                s->state = S_CHUNK_SIZE;
                s->chunk_digits = 0;
                s->remaining = 0;
            } else {
                out = fail(s, pos, "Expected LF after chunk data");
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
                            out = fail(s, pos, "Chunk size overflow");
                            goto done;
                        }
                        s->remaining = (s->remaining << 4) | v;
                        s->chunk_digits++;
                    } else if (s->chunk_digits > 0 && (c == ';' || is_ows(c) || c == '\r')) {
                        s->state = S_CHUNK_EXT;
                    } else {
                        out = fail(s, pos, "Invalid character in chunk size");
                        goto done;
                    }
                }
                /* chunk extensions are skipped (their bytes are not kept) */
                pos++;
            }
            if (pos == n) {
                out = result(EV_NEED, pos, Py_NewRef(Py_None));
                goto done;
            }
            pos++; /* the LF */
            if (s->chunk_digits == 0) {
                out = fail(s, pos - 1, "Invalid character in chunk size");
                goto done;
            }
            s->state = s->remaining > 0 ? S_CHUNK_DATA : S_TRAILERS;
            break;
        }
    }
done:
    PyBuffer_Release(&view);
    return out;
}

PyDoc_STRVAR(no_body_doc,
"no_body()\n"
"\n"
"The message whose head feed() just returned has no body whatever its headers say\n"
"(a response to HEAD): the next byte starts the next message.");

static PyObject *Http1Stream_no_body(Http1Stream *s, PyObject *unused) {
    (void)unused;
    if (s->state != S_FAILED) {
        s->state = S_IDLE;
        body_clear(s);
    }
    Py_RETURN_NONE;
}

PyDoc_STRVAR(take_body_doc,
"take_body() -> (body, body_len)\n"
"\n"
"The body of the message being parsed so far (its first body_limit bytes, and how\n"
"many were seen), forgotten here: for a message cut short, or ended by the close.");

static PyObject *Http1Stream_take_body(Http1Stream *s, PyObject *unused) {
    (void)unused;
    return take_body(s, NULL);
}

PyDoc_STRVAR(reset_doc, "reset()\n\nForget everything: the next byte starts a message.");

static PyObject *Http1Stream_reset(Http1Stream *s, PyObject *unused) {
    (void)unused;
    s->state = S_IDLE;
    head_clear(s);
    body_clear(s);
    Py_RETURN_NONE;
}

static PyObject *Http1Stream_until_close(Http1Stream *s, void *closure) {
    (void)closure;
    return PyBool_FromLong(s->state == S_EOF);
}

static PyObject *Http1Stream_head_len(Http1Stream *s, void *closure) {
    (void)closure;
    return PyLong_FromSsize_t(s->state == S_HEAD ? s->head_len : 0);
}

static PyGetSetDef Http1Stream_getset[] = {
    {"until_close", (getter)Http1Stream_until_close, NULL,
     "the body being read runs to the connection's end", NULL},
    {"head_len", (getter)Http1Stream_head_len, NULL,
     "bytes of an unfinished head held (0 between messages and in a body)", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMemberDef Http1Stream_members[] = {
    {"response", T_INT, offsetof(Http1Stream, response), READONLY, "parses responses"},
    {"body_limit", T_PYSSIZET, offsetof(Http1Stream, body_limit), READONLY,
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

/* -- the module ------------------------------------------------------------------- */

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "agent.l7._http1",
    .m_doc = "HTTP/1.x message framing for agent/l7/http1.py.",
    .m_size = -1,
};

PyMODINIT_FUNC PyInit__http1(void) {
    if (PyType_Ready(&Http1StreamType) < 0)
        return NULL;
    s_version_10 = PyUnicode_InternFromString("1.0");
    s_version_11 = PyUnicode_InternFromString("1.1");
    if (s_version_10 == NULL || s_version_11 == NULL)
        return NULL;
    for (int k = 0; k < COMMON_METHODS; k++)
        if ((s_methods[k] = PyUnicode_InternFromString(METHODS[k])) == NULL)
            return NULL;
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
        if ((s_names[k] = PyUnicode_InternFromString(COMMON_NAMES[k])) == NULL)
            return NULL;
    }
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddIntConstant(m, "NEED", EV_NEED) < 0 ||
        PyModule_AddIntConstant(m, "HEAD", EV_HEAD) < 0 ||
        PyModule_AddIntConstant(m, "MESSAGE", EV_MESSAGE) < 0 ||
        PyModule_AddIntConstant(m, "END", EV_END) < 0 ||
        PyModule_AddIntConstant(m, "ERROR", EV_ERROR) < 0 ||
        PyModule_AddIntConstant(m, "MAX_HEAD", MAX_HEAD) < 0 ||
        PyModule_AddObjectRef(m, "Http1Stream", (PyObject *)&Http1StreamType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
