/* Redacting the values of sensitive headers in a parsed header list, in C: the part of
 * agent/redact/exchange.py that runs on every exchange.
 *
 * Why C: nearly every request carries some credential header (Authorization, Cookie),
 * so the list is walked, each name looked up and the list copied for almost every
 * exchange; in Python that was ~20k CPU instructions per exchange, a tenth of what
 * the agent spends on one.  The rule itself stays in exchange.py's docstring; this
 * is its loop.
 *
 * redact_header_values(headers, names, redacted) -> (headers', found)
 *   headers   a list of (name, value) str tuples, as the parsers make them;
 *   names     the sensitive names, lower-case (a set or frozenset);
 *   redacted  the text a sensitive value becomes.
 * headers' is `headers` itself when nothing changed (the usual response), else a new
 * list with the sensitive values replaced; found lists the lower-case names of the
 * values replaced, in order, repeats kept.  A value already equal to `redacted` is
 * left and not reported (an exchange redacted twice reports nothing new).  Names are
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

static PyObject *
redact_header_values(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "redact_header_values(headers, names, redacted)");
        return NULL;
    }
    PyObject *headers = args[0], *names = args[1], *redacted = args[2];
    if (!PyList_Check(headers) || !PyAnySet_Check(names) || !PyUnicode_Check(redacted)) {
        PyErr_SetString(PyExc_TypeError, "expected a list, a set and a str");
        return NULL;
    }
    PyObject *out = NULL; /* the copy, made at the first value replaced */
    PyObject *found = PyList_New(0);
    if (found == NULL)
        return NULL;
    /* The length is read each turn: nothing here can run Python code that changes the
     * list (lower() and set lookups of exact str do not), but a bound check is cheap. */
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
        if (sensitive <= 0) {
            Py_DECREF(lname);
            if (sensitive < 0)
                goto fail;
            continue;
        }
        int same = PyUnicode_Compare(value, redacted) == 0;
        if (same || PyErr_Occurred()) {
            Py_DECREF(lname);
            if (PyErr_Occurred())
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
    PyObject *result = PyTuple_Pack(2, out != NULL ? out : headers, found);
    Py_XDECREF(out);
    Py_DECREF(found);
    return result;
fail:
    Py_XDECREF(out);
    Py_DECREF(found);
    return NULL;
}

static PyMethodDef methods[] = {
    {"redact_header_values", (PyCFunction)(void (*)(void))redact_header_values, METH_FASTCALL,
     "redact_header_values(headers, names, redacted) -> (headers, found names)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_headers", "Sensitive header values redacted in C.", -1, methods,
};

PyMODINIT_FUNC
PyInit__headers(void)
{
    return PyModule_Create(&module);
}
