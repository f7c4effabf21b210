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

#include "../native/_slots.h"
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

static PyObject *s_path, *s_host, *s_authority_rule, *s_header_names, *s_regexes,
    *s_query_params, *s_equals, *s_redacted;

/* The fields read and set per exchange: slots of agent.l7.exchange's dataclasses. */
static SlotCache f_headers = SLOT_CACHE("headers"), f_trailers = SLOT_CACHE("trailers"),
                 f_target = SLOT_CACHE("target"), f_authority = SLOT_CACHE("authority"),
                 f_request = SLOT_CACHE("request"), f_response = SLOT_CACHE("response"),
                 f_grpc = SLOT_CACHE("grpc"), f_notes = SLOT_CACHE("notes"),
                 f_redactions = SLOT_CACHE("redactions");

/* "header:" + name, made once per name: only sensitive names come here, so the
 * cache holds no more than the rules configured. */
static PyObject *rule_cache;

/* The rule of sensitive name `name` (lower-case), borrowed (the cache keeps it). */
static PyObject *
rule_of(PyObject *name)
{
    PyObject *rule = PyDict_GetItemWithError(rule_cache, name); /* borrowed */
    if (rule != NULL || PyErr_Occurred())
        return rule;
    rule = PyUnicode_FromFormat("header:%U", name);
    int stored = rule == NULL ? -1 : PyDict_SetItem(rule_cache, name, rule);
    Py_XDECREF(rule); /* the cache keeps it */
    return stored < 0 ? NULL : rule;
}

/* What a RedactionRules says, read when it is first used and kept while the same
 * one comes (the agent has one for its whole run; it is frozen, so what it says
 * does not change): its three fields and, per header name already looked up, its
 * rule.  Reading the fields by name and probing the set per header was ~2k CPU
 * instructions per exchange. */
typedef struct {
    PyObject *name; /* an interned header name as the message holds it, or NULL */
    PyObject *rule; /* its rule, or NULL: not sensitive */
} Verdict;
/* An open-addressing table by the name's hash, forgotten whole when 3/4 full (the
 * parsers' common names are a few dozen). */
enum { VERDICTS = 128, MOST_VERDICTS = VERDICTS * 3 / 4 };
static struct {
    PyObject *rules; /* the rules read (a reference: its address is the key), or NULL */
    PyObject *names, *params;
    int has_names, has_regexes, has_params;
    int path, authority, host; /* ":path", ":authority", "host" are sensitive */
    Verdict verdicts[VERDICTS];
    int n_verdicts;
} known;

static void
forget_verdicts(void)
{
    for (int k = 0; k < VERDICTS; k++) {
        Py_CLEAR(known.verdicts[k].name);
        Py_CLEAR(known.verdicts[k].rule);
    }
    known.n_verdicts = 0;
}

static void
forget_rules(void)
{
    Py_CLEAR(known.rules);
    Py_CLEAR(known.names);
    Py_CLEAR(known.params);
    forget_verdicts();
}

/* Truth of rules.<attr>, the attribute itself in *value (a new reference). */
static int
rule_field(PyObject *rules, PyObject *attr, PyObject **value)
{
    *value = PyObject_GetAttr(rules, attr);
    return *value == NULL ? -1 : PyObject_IsTrue(*value);
}

/* `rules` into `known`, unless they are there already; 0 or -1. */
static int
read_rules(PyObject *rules)
{
    if (rules == known.rules)
        return 0;
    forget_rules();
    PyObject *regexes = NULL;
    int has_names = rule_field(rules, s_header_names, &known.names);
    int has_regexes = has_names < 0 ? -1 : rule_field(rules, s_regexes, &regexes);
    int has_params = has_regexes < 0 ? -1 : rule_field(rules, s_query_params, &known.params);
    Py_XDECREF(regexes);
    if (has_params < 0)
        goto fail;
    if (has_names) {
        if (!PyAnySet_Check(known.names)) {
            PyErr_SetString(PyExc_TypeError, "rules.header_names must be a set");
            goto fail;
        }
        known.path = PySet_Contains(known.names, s_path);
        known.authority = PySet_Contains(known.names, s_authority_rule);
        known.host = PySet_Contains(known.names, s_host);
        if (known.path < 0 || known.authority < 0 || known.host < 0)
            goto fail;
    }
    known.has_names = has_names;
    known.has_regexes = has_regexes;
    known.has_params = has_params;
    known.rules = Py_NewRef(rules);
    return 0;
fail:
    forget_rules();
    return -1;
}

/* The rule of header `name` (borrowed), or NULL: not sensitive, or an error (set).
 * An interned name (the parsers' common names are) is looked up once per rules: a
 * str never changes, and the verdict keeps a reference, so its address stays its.
 * Only an exact str is interned, and for one nothing below runs Python code (which
 * could change `known`) between finding its place in the table and filling it; a str
 * subclass's lower() can, hence the set held here. */
static PyObject *
name_rule(PyObject *name, PyObject *rules)
{
    if (read_rules(rules) < 0)
        return NULL;
    Verdict *v = NULL;
    Py_hash_t hash = PyUnicode_CHECK_INTERNED(name) ? _PyASCIIObject_CAST(name)->hash : -1;
    if (hash != -1) { /* an interned str's hash is always there */
        for (size_t at = (size_t)hash;; at++) {
            v = &known.verdicts[at % VERDICTS];
            if (v->name == NULL)
                break;
            if (v->name == name)
                return v->rule;
        }
    }
    PyObject *names = Py_NewRef(known.names), *lname = lower_name(name);
    int sensitive = lname == NULL ? -1 : PySet_Contains(names, lname);
    PyObject *rule = sensitive > 0 ? rule_of(lname) : NULL;
    Py_XDECREF(lname);
    Py_DECREF(names);
    if (v != NULL && (rule != NULL || sensitive == 0)) {
        if (known.n_verdicts == MOST_VERDICTS) {
            forget_verdicts();
            return rule; /* borrowed from rule_cache, which keeps it */
        }
        v->name = Py_NewRef(name);
        v->rule = Py_XNewRef(rule);
        known.n_verdicts++;
    }
    return rule;
}

/* (name, "[REDACTED]") for `name`: the last one made when it is for the same name
 * (mostly: one sensitive header, Authorization or Cookie, recurs message after
 * message), else a new one kept for next time.  A tuple of two str never changes, so
 * messages can share it as they share the parser's reused fields. */
static PyObject *last_redacted_pair;

static PyObject *
redacted_pair(PyObject *name)
{
    PyObject *last = last_redacted_pair;
    if (last != NULL && PyTuple_GET_ITEM(last, 0) == name)
        return Py_NewRef(last);
    PyObject *pair = PyTuple_Pack(2, name, s_redacted);
    if (pair != NULL)
        Py_XSETREF(last_redacted_pair, Py_NewRef(pair));
    return pair;
}

/* `headers` with the sensitive values replaced (a new reference: `headers` itself when
 * nothing changed or `owned`, else a new list), the rules behind them added to `hits`.
 * `owned`: no one but the caller can see the list, so it is changed in place rather
 * than copied. */
static PyObject *
redact_pairs(PyObject *headers, PyObject *rules, PyObject *hits, int owned)
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
        PyObject *rule = name_rule(name, rules);
        if (rule == NULL) {
            if (PyErr_Occurred())
                goto fail;
            continue;
        }
        if (value == s_redacted ||
            (PyUnicode_GET_LENGTH(value) == PyUnicode_GET_LENGTH(s_redacted) &&
             PyUnicode_Compare(value, s_redacted) == 0))
            continue;
        if (PyErr_Occurred() || PySet_Add(hits, rule) < 0)
            goto fail;
        if (out == NULL) {
            out = owned ? Py_NewRef(headers)
                        : PyList_GetSlice(headers, 0, PyList_GET_SIZE(headers));
            if (out == NULL)
                goto fail;
        }
        PyObject *replaced = redacted_pair(name);
        if (replaced == NULL || PyList_SetItem(out, i, replaced) < 0)
            goto fail; /* PyList_SetItem took (and dropped) `replaced` even on error */
    }
    return out != NULL ? out : Py_NewRef(headers);
fail:
    Py_XDECREF(out);
    return NULL;
}

/* Replaces msg.<field> with its redacted pairs if any value was sensitive. */
static int
redact_list_field(PyObject *msg, SlotCache *field, PyObject *rules, PyObject *hits)
{
    PyObject *before = slot_get(field, msg);
    if (before == NULL)
        return -1;
    int err = 0;
    if (PyList_Check(before) && PyList_GET_SIZE(before) == 0) {
        Py_DECREF(before);
        return 0; /* no trailers, the usual case */
    }
    /* The field's reference and ours, and an exact list: nothing else holds it (the
     * HTTP/1 parser lets go of a message's lists when it emits it), so a sensitive
     * value is replaced in it, not in a copy (~300 CPU instructions a message). */
    int owned = PyList_CheckExact(before) && Py_REFCNT(before) == 2;
    PyObject *after = redact_pairs(before, rules, hits, owned);
    if (after == NULL)
        err = -1;
    else if (after != before)
        err = slot_set(field, msg, after);
    Py_XDECREF(after);
    Py_DECREF(before);
    return err;
}

/* Replaces a non-empty str field with "[REDACTED]", the rule of `name` behind it. */
static int
redact_text_field(PyObject *msg, SlotCache *field, PyObject *name, PyObject *hits)
{
    PyObject *text = slot_get(field, msg);
    if (text == NULL)
        return -1;
    int nonempty = PyObject_IsTrue(text);
    Py_DECREF(text);
    if (nonempty <= 0)
        return nonempty;
    PyObject *rule = slot_set(field, msg, s_redacted) < 0 ? NULL : rule_of(name);
    return rule == NULL || PySet_Add(hits, rule) < 0 ? -1 : 0;
}

/* The sensitive values of one message (not None) redacted, and the target and
 * authority when their header (":path"; ":authority" or "host") is sensitive; the
 * rules behind them added to `hits`. */
static int
redact_names(PyObject *msg, PyObject *rules, PyObject *hits)
{
    if (read_rules(rules) < 0)
        return -1;
    int path = known.path, authority = known.authority, host = known.host;
    return redact_list_field(msg, &f_headers, rules, hits) < 0 ||
                   redact_list_field(msg, &f_trailers, rules, hits) < 0 ||
                   (path && redact_text_field(msg, &f_target, s_path, hits) < 0) ||
                   ((authority || host) &&
                    redact_text_field(msg, &f_authority, authority ? s_authority_rule : s_host,
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
    PyObject *target = slot_get(&f_target, msg);
    if (target == NULL)
        return -1;
    int found;
    if (PyUnicode_Check(target)) {
        Py_ssize_t at = PyUnicode_FindChar(target, '=', 0, PyUnicode_GET_LENGTH(target), 1);
        found = at == -2 ? -1 : at >= 0;
    } else {
        found = PySequence_Contains(target, s_equals);
    }
    Py_DECREF(target);
    return found;
}

/* ex.redactions = sorted(set(ex.redactions) | hits), `hits` (ours) emptied on the way. */
static int
set_redactions(PyObject *ex, PyObject *hits)
{
    PyObject *old = slot_get(&f_redactions, ex);
    PyObject *list = old == NULL ? NULL : sorted_rule_names(hits, old);
    int err = list == NULL || slot_set(&f_redactions, ex, list) < 0;
    Py_XDECREF(old);
    Py_XDECREF(list);
    return err ? -1 : 0;
}

/* The steps of redact_exchange, in its order, by the rules in `known`. */
static int
redact(PyObject *ex, PyObject *rules, PyObject *hits)
{
    PyObject *msgs[2] = {NULL, NULL}, *grpc = NULL;
    int result = -1;
    /* Taken now: a helper (Python) could read other rules into `known`, which the
     * steps that use it read again (read_rules: a pointer compare when unchanged). */
    int has_names = known.has_names, has_regexes = known.has_regexes;
    int has_params = known.has_params;
    if ((msgs[0] = slot_get(&f_request, ex)) == NULL ||
        (msgs[1] = slot_get(&f_response, ex)) == NULL)
        goto done;
    /* Query values first (their "=" first: most targets have no query), then the
     * sensitive headers, trailers and derived fields, then the regexes. */
    for (int k = 0; k < 2 && has_params; k++) {
        int query = msgs[k] == Py_None ? 0 : has_equals(msgs[k]);
        if (query < 0)
            goto done;
        if (query) {
            /* held: the helper runs Python, which could (it does not) change `known` */
            PyObject *params = Py_NewRef(known.params);
            int r = call_helper(MASK_QUERY, msgs[k], params, hits);
            Py_DECREF(params);
            if (r < 0 || read_rules(rules) < 0)
                goto done;
        }
    }
    for (int k = 0; k < 2 && has_names; k++)
        if (msgs[k] != Py_None && redact_names(msgs[k], rules, hits) < 0)
            goto done;
    for (int k = 0; k < 2 && has_regexes; k++)
        if (msgs[k] != Py_None && call_helper(MASK_MESSAGE_REGEXES, msgs[k], rules, hits) < 0)
            goto done;
    if ((grpc = slot_get(&f_grpc, ex)) == NULL)
        goto done;
    if (grpc != Py_None && call_helper(REDACT_GRPC, grpc, rules, hits) < 0)
        goto done;
    if (has_regexes) {
        PyObject *notes = slot_get(&f_notes, ex);
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
    PyObject *ex = args[0], *rules = args[1], *hits = NULL;
    if (read_rules(rules) < 0)
        return NULL;
    /* The rules are held across the calls below, which may run Python (helpers). */
    Py_INCREF(rules);
    int err = 0;
    if (known.has_names || known.has_regexes || known.has_params)
        err = (hits = PySet_New(NULL)) == NULL || redact(ex, rules, hits) < 0;
    Py_XDECREF(hits);
    Py_DECREF(rules);
    return err ? NULL : Py_NewRef(Py_None);
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
        {&s_path, ":path"}, {&s_host, "host"}, {&s_authority_rule, ":authority"},
        {&s_header_names, "header_names"}, {&s_regexes, "regexes"},
        {&s_query_params, "query_params"}, {&s_equals, "="}, {&s_redacted, "[REDACTED]"},
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
