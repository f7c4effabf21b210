/* Redacting a parsed exchange, in C: agent/redact/exchange.py's docstring says what
 * is redacted; this is the redact_exchange() it re-exports, run on every exchange.
 *
 * Why C: nearly every request carries some credential header (Authorization, Cookie),
 * so the lists are walked, each name looked up and a list copied for almost every
 * exchange; in Python that was ~25k CPU instructions per exchange.  With that loop in
 * C, the Python around it (the rules read, one call per message, the union and sort
 * of the rule names) was still ~11k per exchange with the default rules.
 *
 * redact_exchange(exchange, rules) -> None
 *   Here: the sensitive header and trailer values of both messages (either may be
 *   None), the target when ":path" is sensitive, the authority when ":authority" or
 *   "host" is, and exchange.redactions = sorted(set(exchange.redactions) | rules hit).
 *   In Python, exchange.py's helpers, called from here only when they apply: what
 *   needs `re` -- a target's query values when query params are configured and the
 *   target has a "=" (rules.mask_query_values), the regex rules on messages and
 *   notes when there are regexes -- and the gRPC fields of a gRPC exchange.  With
 *   the default rules (names and query params, no regexes) an exchange whose
 *   targets have no query runs no Python at all.  The steps run in exchange.py's
 *   order: query values, names, regexes, gRPC, notes.
 *
 * A header or trailer list with a sensitive value is replaced by a new list holding
 * "[REDACTED]" in its place (an unchanged list stays the very same object).  Each
 * value replaced adds its rule: "header:" and the lower-case name (":path", and
 * ":authority" or "host", for the two fields).  A header value already "[REDACTED]"
 * is left and not reported (an exchange redacted twice reports nothing new).  Names
 * are compared lower-case: the parsers hand them lower-case, but an HTTP/2 peer may
 * send upper case against the RFC, and only such a name is lowered to be looked up.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "_rule_names.h"

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

static PyObject *s_headers, *s_trailers, *s_target, *s_authority, *s_path, *s_host,
    *s_authority_rule, *s_request, *s_response, *s_header_names, *s_regexes, *s_query_params,
    *s_grpc, *s_notes, *s_redactions, *s_equals, *s_redacted;

/* "header:" + name, made once per name: only sensitive names come here, so the
 * cache holds no more than the rules configured. */
static PyObject *rule_cache;

/* The rule of sensitive name `name` (lower-case) joins `hits`. */
static int
add_rule(PyObject *hits, PyObject *name)
{
    PyObject *rule = PyDict_GetItemWithError(rule_cache, name); /* borrowed */
    if (rule == NULL) {
        if (PyErr_Occurred())
            return -1;
        rule = PyUnicode_FromFormat("header:%U", name);
        int stored = rule == NULL ? -1 : PyDict_SetItem(rule_cache, name, rule);
        Py_XDECREF(rule); /* the cache keeps it */
        if (stored < 0)
            return -1;
    }
    return PySet_Add(hits, rule);
}

/* `headers` with the sensitive values replaced (a new reference: `headers` itself when
 * nothing changed, else a new list), the rules behind them added to `hits`. */
static PyObject *
redact_pairs(PyObject *headers, PyObject *names, PyObject *hits)
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
        if (sensitive <= 0 || PyUnicode_Compare(value, s_redacted) == 0) {
            Py_DECREF(lname);
            if (sensitive < 0 || PyErr_Occurred())
                goto fail;
            continue;
        }
        int added = add_rule(hits, lname);
        Py_DECREF(lname);
        if (added < 0)
            goto fail;
        if (out == NULL) {
            out = PyList_GetSlice(headers, 0, PyList_GET_SIZE(headers));
            if (out == NULL)
                goto fail;
        }
        PyObject *replaced = PyTuple_Pack(2, name, s_redacted);
        if (replaced == NULL || PyList_SetItem(out, i, replaced) < 0)
            goto fail; /* PyList_SetItem took (and dropped) `replaced` even on error */
    }
    return out != NULL ? out : Py_NewRef(headers);
fail:
    Py_XDECREF(out);
    return NULL;
}

/* Replaces msg.<attr> with its redacted pairs if any value was sensitive. */
static int
redact_list_field(PyObject *msg, PyObject *attr, PyObject *names, PyObject *hits)
{
    PyObject *before = PyObject_GetAttr(msg, attr);
    if (before == NULL)
        return -1;
    int err = 0;
    if (PyList_Check(before) && PyList_GET_SIZE(before) == 0) {
        Py_DECREF(before);
        return 0; /* no trailers, the usual case */
    }
    PyObject *after = redact_pairs(before, names, hits);
    if (after == NULL)
        err = -1;
    else if (after != before)
        err = PyObject_SetAttr(msg, attr, after);
    Py_XDECREF(after);
    Py_DECREF(before);
    return err;
}

/* Replaces a non-empty str field with "[REDACTED]", the rule of `name` behind it. */
static int
redact_text_field(PyObject *msg, PyObject *attr, PyObject *name, PyObject *hits)
{
    PyObject *text = PyObject_GetAttr(msg, attr);
    if (text == NULL)
        return -1;
    int nonempty = PyObject_IsTrue(text);
    Py_DECREF(text);
    if (nonempty <= 0)
        return nonempty;
    return PyObject_SetAttr(msg, attr, s_redacted) < 0 || add_rule(hits, name) < 0 ? -1 : 0;
}

/* The sensitive values of one message (not None) redacted, and the target and
 * authority when their header (":path"; ":authority" or "host") is sensitive; the
 * rules behind them added to `hits`. */
static int
redact_names(PyObject *msg, PyObject *names, int path, int authority, int host,
             PyObject *hits)
{
    return redact_list_field(msg, s_headers, names, hits) < 0 ||
                   redact_list_field(msg, s_trailers, names, hits) < 0 ||
                   (path && redact_text_field(msg, s_target, s_path, hits) < 0) ||
                   ((authority || host) &&
                    redact_text_field(msg, s_authority, authority ? s_authority_rule : s_host,
                                      hits) < 0)
               ? -1
               : 0;
}

/* The Python halves (agent/redact/exchange.py), imported when first needed: that
 * module imports this one, so not at this one's import. */
enum { MASK_QUERY, MASK_MESSAGE_REGEXES, REDACT_GRPC, MASK_NOTES, N_HELPERS };
static const char *const helper_names[N_HELPERS] = {
    "_mask_query", "_mask_message_regexes", "_redact_grpc", "_mask_notes",
};
static PyObject *helpers[N_HELPERS];

/* helper(a, b, hits); 0 or -1 with its error. */
static int
call_helper(int which, PyObject *a, PyObject *b, PyObject *hits)
{
    if (helpers[which] == NULL) {
        PyObject *m = PyImport_ImportModule("agent.redact.exchange");
        if (m == NULL)
            return -1;
        helpers[which] = PyObject_GetAttrString(m, helper_names[which]);
        Py_DECREF(m);
        if (helpers[which] == NULL)
            return -1;
    }
    PyObject *args[3] = {a, b, hits};
    PyObject *done = PyObject_Vectorcall(helpers[which], args, 3, NULL);
    Py_XDECREF(done);
    return done == NULL ? -1 : 0;
}

/* msg.target holds a "=": a query may carry a credential (most targets have none,
 * and then no Python runs); 1, 0 or -1. */
static int
has_equals(PyObject *msg)
{
    PyObject *target = PyObject_GetAttr(msg, s_target);
    if (target == NULL)
        return -1;
    int found = PySequence_Contains(target, s_equals);
    Py_DECREF(target);
    return found;
}

/* ex.redactions = sorted(set(ex.redactions) | hits), `hits` (ours) emptied on the way. */
static int
set_redactions(PyObject *ex, PyObject *hits)
{
    PyObject *old = PyObject_GetAttr(ex, s_redactions);
    PyObject *list = old == NULL ? NULL : sorted_rule_names(hits, old);
    int err = list == NULL || PyObject_SetAttr(ex, s_redactions, list) < 0;
    Py_XDECREF(old);
    Py_XDECREF(list);
    return err ? -1 : 0;
}

/* The steps of redact_exchange, in its order; the rules' three fields borrowed. */
static int
redact(PyObject *ex, PyObject *rules, PyObject *names, int has_names, int has_regexes,
       PyObject *params, int has_params, PyObject *hits)
{
    PyObject *msgs[2] = {NULL, NULL}, *grpc = NULL;
    int result = -1;
    if ((msgs[0] = PyObject_GetAttr(ex, s_request)) == NULL ||
        (msgs[1] = PyObject_GetAttr(ex, s_response)) == NULL)
        goto done;
    /* Query values first (their "=" first: most targets have no query), then the
     * sensitive headers, trailers and derived fields, then the regexes. */
    for (int k = 0; k < 2 && has_params; k++) {
        int query = msgs[k] == Py_None ? 0 : has_equals(msgs[k]);
        if (query < 0 || (query && call_helper(MASK_QUERY, msgs[k], params, hits) < 0))
            goto done;
    }
    if (has_names) {
        if (!PyAnySet_Check(names)) {
            PyErr_SetString(PyExc_TypeError, "rules.header_names must be a set");
            goto done;
        }
        int path = PySet_Contains(names, s_path);
        int authority = PySet_Contains(names, s_authority_rule);
        int host = PySet_Contains(names, s_host);
        if (path < 0 || authority < 0 || host < 0)
            goto done;
        for (int k = 0; k < 2; k++)
            if (msgs[k] != Py_None &&
                redact_names(msgs[k], names, path, authority, host, hits) < 0)
                goto done;
    }
    for (int k = 0; k < 2 && has_regexes; k++)
        if (msgs[k] != Py_None && call_helper(MASK_MESSAGE_REGEXES, msgs[k], rules, hits) < 0)
            goto done;
    if ((grpc = PyObject_GetAttr(ex, s_grpc)) == NULL)
        goto done;
    if (grpc != Py_None && call_helper(REDACT_GRPC, grpc, rules, hits) < 0)
        goto done;
    if (has_regexes) {
        PyObject *notes = PyObject_GetAttr(ex, s_notes);
        int any = notes == NULL ? -1 : PyObject_IsTrue(notes);
        Py_XDECREF(notes);
        if (any < 0 || (any && call_helper(MASK_NOTES, ex, rules, hits) < 0))
            goto done;
    }
    result = PySet_GET_SIZE(hits) ? set_redactions(ex, hits) : 0;
done:
    Py_XDECREF(msgs[0]);
    Py_XDECREF(msgs[1]);
    Py_XDECREF(grpc);
    return result;
}

/* Truth of rules.<attr>, the attribute itself in *value (a new reference). */
static int
rule_field(PyObject *rules, PyObject *attr, PyObject **value)
{
    *value = PyObject_GetAttr(rules, attr);
    return *value == NULL ? -1 : PyObject_IsTrue(*value);
}

PyDoc_STRVAR(redact_exchange_doc,
"redact_exchange(exchange, rules) -> None\n"
"\n"
"Redact `exchange` in place by `rules` (a RedactionRules) and add the names of\n"
"the rules that changed it to exchange.redactions (sorted, no duplicates).");

static PyObject *
redact_exchange(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "redact_exchange(exchange, rules)");
        return NULL;
    }
    PyObject *ex = args[0], *rules = args[1];
    PyObject *names = NULL, *regexes = NULL, *params = NULL, *hits = NULL, *result = NULL;
    /* rules.enabled, from the three fields it is made of. */
    int has_names = rule_field(rules, s_header_names, &names);
    int has_regexes = has_names < 0 ? -1 : rule_field(rules, s_regexes, &regexes);
    int has_params = has_regexes < 0 ? -1 : rule_field(rules, s_query_params, &params);
    if (has_params < 0)
        goto done;
    if ((has_names || has_regexes || has_params) &&
        ((hits = PySet_New(NULL)) == NULL ||
         redact(ex, rules, names, has_names, has_regexes, params, has_params, hits) < 0))
        goto done;
    result = Py_NewRef(Py_None);
done:
    Py_XDECREF(names);
    Py_XDECREF(regexes);
    Py_XDECREF(params);
    Py_XDECREF(hits);
    return result;
}

static PyMethodDef methods[] = {
    {"redact_exchange", (PyCFunction)(void (*)(void))redact_exchange, METH_FASTCALL,
     redact_exchange_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_headers", "Exchanges redacted in C.", -1, methods,
};

PyMODINIT_FUNC
PyInit__headers(void)
{
    struct { PyObject **where; const char *text; } strings[] = {
        {&s_headers, "headers"}, {&s_trailers, "trailers"}, {&s_target, "target"},
        {&s_authority, "authority"}, {&s_path, ":path"}, {&s_host, "host"},
        {&s_authority_rule, ":authority"}, {&s_request, "request"}, {&s_response, "response"},
        {&s_header_names, "header_names"}, {&s_regexes, "regexes"},
        {&s_query_params, "query_params"}, {&s_grpc, "grpc"}, {&s_notes, "notes"},
        {&s_redactions, "redactions"}, {&s_equals, "="}, {&s_redacted, "[REDACTED]"},
    };
    for (size_t k = 0; k < sizeof strings / sizeof strings[0]; k++)
        if ((*strings[k].where = PyUnicode_InternFromString(strings[k].text)) == NULL)
            return NULL;
    if ((rule_cache = PyDict_New()) == NULL)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m != NULL && PyModule_AddObjectRef(m, "REDACTED", s_redacted) < 0)
        Py_CLEAR(m);
    return m;
}
