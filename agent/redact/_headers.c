/* Redacting sensitive header values of a parsed exchange, in C: the part of
 * agent/redact/exchange.py that runs on every exchange.
 *
 * Why C: nearly every request carries some credential header (Authorization, Cookie),
 * so the list is walked, each name looked up and the list copied for almost every
 * exchange; in Python that was ~25k CPU instructions per exchange, a sixth of what
 * the agent then spent on one, and the Python around one call per message still
 * ~10k.  The rules themselves are exchange.py's docstring's; this is their loop.
 *
 * redact_exchange_names(exchange, names, redacted) -> rules
 *   exchange  an Exchange: of its request and response (either may be None), the
 *             headers, trailers, target and authority are read and replaced as
 *             attributes;
 *   names     the sensitive names, lower-case (a set or frozenset);
 *   redacted  the text a sensitive value becomes.
 * A header or trailer list with a sensitive value is replaced by a new list holding
 * `redacted` in its place (an unchanged list stays the very same object); the target
 * becomes `redacted` when ":path" is sensitive, the authority when ":authority" or
 * "host" is.  rules names, once each in the order first met, the rule behind each
 * value replaced: "header:" and the lower-case name (":path", and ":authority" or
 * "host", for the two fields).  A header value already equal to `redacted` is left
 * and not reported (an exchange redacted twice reports nothing new).  Names are
 * compared lower-case: the parsers hand them lower-case, but an HTTP/2 peer may send
 * upper case against the RFC, and only such a name is lowered to be looked up.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

/* `name` lower-cased (a new reference); itself when it has no upper-case letter. */
static PyObject *
lower_name(PyObject *name)
{
    if (PyUnicode_IS_ASCII(name)) {
        const unsigned char *s = PyUnicode_1BYTE_DATA(name);
        Py_ssize_t n = PyUnicode_GET_LENGTH(name);
        Py_ssize_t i = 0;
        while (i < n && !(s[i] >= 'A' && s[i] <= 'Z'))
            i++;
        if (i == n)
            return Py_NewRef(name);
    }
    return PyObject_CallMethod(name, "lower", NULL);
}

/* `headers` with the sensitive values replaced (a new reference: `headers` itself when
 * nothing changed, else a new list), their lower-case names appended to `found`. */
static PyObject *
redact_pairs(PyObject *headers, PyObject *names, PyObject *redacted, PyObject *found)
{
    if (!PyList_Check(headers)) {
        PyErr_SetString(PyExc_TypeError, "headers must be a list");
        return NULL;
    }
    PyObject *out = NULL; /* the copy, made at the first value replaced */
    /* The length is read each turn: nothing here runs Python code that could change
     * the list (lower() and set look-ups of exact str do not), but the check is cheap. */
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(headers); i++) {
        PyObject *pair = PyList_GET_ITEM(headers, i);
        if (!PyTuple_Check(pair) || PyTuple_GET_SIZE(pair) != 2 ||
            !PyUnicode_Check(PyTuple_GET_ITEM(pair, 0)) ||
            !PyUnicode_Check(PyTuple_GET_ITEM(pair, 1))) {
            PyErr_SetString(PyExc_TypeError, "headers must be (str, str) tuples");
            goto fail;
        }
        PyObject *name = PyTuple_GET_ITEM(pair, 0), *value = PyTuple_GET_ITEM(pair, 1);
        PyObject *lname = lower_name(name);
        if (lname == NULL)
            goto fail;
        int sensitive = PySet_Contains(names, lname);
        if (sensitive <= 0 || PyUnicode_Compare(value, redacted) == 0) {
            Py_DECREF(lname);
            if (sensitive < 0 || PyErr_Occurred())
                goto fail;
            continue;
        }
        int appended = PyList_Append(found, lname);
        Py_DECREF(lname);
        if (appended < 0)
            goto fail;
        if (out == NULL) {
            out = PyList_GetSlice(headers, 0, PyList_GET_SIZE(headers));
            if (out == NULL)
                goto fail;
        }
        PyObject *replaced = PyTuple_Pack(2, name, redacted);
        if (replaced == NULL || PyList_SetItem(out, i, replaced) < 0)
            goto fail; /* PyList_SetItem took (and dropped) `replaced` even on error */
    }
    return out != NULL ? out : Py_NewRef(headers);
fail:
    Py_XDECREF(out);
    return NULL;
}

static PyObject *s_headers, *s_trailers, *s_target, *s_authority, *s_path, *s_host,
    *s_authority_rule, *s_request, *s_response;

/* Replaces msg.<attr> with its redacted pairs if any value was sensitive. */
static int
redact_list_field(PyObject *msg, PyObject *attr, PyObject *names, PyObject *redacted,
                  PyObject *found)
{
    PyObject *before = PyObject_GetAttr(msg, attr);
    if (before == NULL)
        return -1;
    int err = 0;
    if (PyList_Check(before) && PyList_GET_SIZE(before) == 0) {
        Py_DECREF(before);
        return 0; /* no trailers, the usual case */
    }
    PyObject *after = redact_pairs(before, names, redacted, found);
    if (after == NULL)
        err = -1;
    else if (after != before)
        err = PyObject_SetAttr(msg, attr, after);
    Py_XDECREF(after);
    Py_DECREF(before);
    return err;
}

/* Replaces a non-empty str field with `redacted` and names the rule. */
static int
redact_text_field(PyObject *msg, PyObject *attr, PyObject *redacted, PyObject *rule,
                  PyObject *found)
{
    PyObject *text = PyObject_GetAttr(msg, attr);
    if (text == NULL)
        return -1;
    int nonempty = PyObject_IsTrue(text);
    Py_DECREF(text);
    if (nonempty <= 0)
        return nonempty;
    return PyObject_SetAttr(msg, attr, redacted) < 0 || PyList_Append(found, rule) < 0 ? -1 : 0;
}

/* Redacts one message (not None), appending the lower-case names behind what it
 * replaced to `found`. */
static int
redact_message(PyObject *msg, PyObject *names, PyObject *redacted, int path, int authority,
               int host, PyObject *found)
{
    return redact_list_field(msg, s_headers, names, redacted, found) < 0 ||
                   redact_list_field(msg, s_trailers, names, redacted, found) < 0 ||
                   (path && redact_text_field(msg, s_target, redacted, s_path, found) < 0) ||
                   ((authority || host) &&
                    redact_text_field(msg, s_authority, redacted,
                                      authority ? s_authority_rule : s_host, found) < 0)
               ? -1
               : 0;
}

/* "header:" + name, made once per name: only sensitive names come here, so the
 * cache holds no more than the rules configured. */
static PyObject *rule_cache;

/* The rule name of each name in `found`, once each, first-met order (a new list). */
static PyObject *
rule_names(PyObject *found)
{
    PyObject *rules = PyList_New(0);
    if (rules == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(found); i++) {
        PyObject *name = PyList_GET_ITEM(found, i);
        PyObject *rule = PyDict_GetItemWithError(rule_cache, name); /* borrowed */
        if (rule == NULL) {
            if (PyErr_Occurred())
                goto fail;
            rule = PyUnicode_FromFormat("header:%U", name);
            int stored = rule == NULL ? -1 : PyDict_SetItem(rule_cache, name, rule);
            Py_XDECREF(rule); /* the cache keeps it */
            if (stored < 0)
                goto fail;
        }
        int seen = 0; /* the cached objects: identity tells repeats */
        for (Py_ssize_t j = 0; j < PyList_GET_SIZE(rules) && !seen; j++)
            seen = PyList_GET_ITEM(rules, j) == rule;
        if (!seen && PyList_Append(rules, rule) < 0)
            goto fail;
    }
    return rules;
fail:
    Py_DECREF(rules);
    return NULL;
}

static PyObject *
redact_exchange_names(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 3 || !PyAnySet_Check(args[1]) || !PyUnicode_Check(args[2])) {
        PyErr_SetString(PyExc_TypeError, "redact_exchange_names(exchange, names, redacted)");
        return NULL;
    }
    PyObject *ex = args[0], *names = args[1], *redacted = args[2];
    int path = PySet_Contains(names, s_path);
    int authority = PySet_Contains(names, s_authority_rule);
    int host = PySet_Contains(names, s_host);
    if (path < 0 || authority < 0 || host < 0)
        return NULL;
    PyObject *found = PyList_New(0);
    if (found == NULL)
        return NULL;
    PyObject *sides[] = {s_request, s_response};
    for (size_t k = 0; k < 2; k++) {
        PyObject *msg = PyObject_GetAttr(ex, sides[k]);
        if (msg == NULL)
            goto fail;
        int err = msg != Py_None &&
                  redact_message(msg, names, redacted, path, authority, host, found) < 0;
        Py_DECREF(msg);
        if (err)
            goto fail;
    }
    if (PyList_GET_SIZE(found) == 0)
        return found; /* nothing replaced, the usual case: the empty list itself */
    PyObject *rules = rule_names(found);
    Py_DECREF(found);
    return rules;
fail:
    Py_DECREF(found);
    return NULL;
}

static PyMethodDef methods[] = {
    {"redact_exchange_names", (PyCFunction)(void (*)(void))redact_exchange_names, METH_FASTCALL,
     "redact_exchange_names(exchange, names, redacted) -> rule names"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_headers", "Sensitive header values redacted in C.", -1, methods,
};

PyMODINIT_FUNC
PyInit__headers(void)
{
    struct { PyObject **where; const char *text; } strings[] = {
        {&s_headers, "headers"}, {&s_trailers, "trailers"}, {&s_target, "target"},
        {&s_authority, "authority"}, {&s_path, ":path"}, {&s_host, "host"},
        {&s_authority_rule, ":authority"}, {&s_request, "request"}, {&s_response, "response"},
    };
    for (size_t k = 0; k < sizeof strings / sizeof strings[0]; k++)
        if ((*strings[k].where = PyUnicode_InternFromString(strings[k].text)) == NULL)
            return NULL;
    if ((rule_cache = PyDict_New()) == NULL)
        return NULL;
    return PyModule_Create(&module);
}
