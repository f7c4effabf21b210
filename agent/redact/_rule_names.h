/* A record's or an exchange's `redactions`: the names of the rules that changed it,
 * sorted, each once.  Shared by the modules that add to them: agent/l7/_record_path.c
 * (data records) and agent/redact/_headers.c (exchanges). */
#ifndef TLSCAP_RULE_NAMES_H
#define TLSCAP_RULE_NAMES_H

#include <Python.h>

/* sorted(set(old) | names) as a new list, or NULL with an error.  `names` is a set
 * the caller owns and no longer needs: the old names join it (mostly there are none)
 * and it is popped empty into the list, a third of what the set and list copies of
 * the expression cost. */
static inline PyObject *sorted_rule_names(PyObject *names, PyObject *old) {
    PyObject *item;
    /* An empty list or tuple (what records and exchanges start with) adds nothing. */
    if (!((PyList_CheckExact(old) && PyList_GET_SIZE(old) == 0) ||
          (PyTuple_CheckExact(old) && PyTuple_GET_SIZE(old) == 0))) {
        PyObject *it = PyObject_GetIter(old);
        if (it == NULL)
            return NULL;
        while ((item = PyIter_Next(it)) != NULL) {
            int added = PySet_Add(names, item);
            Py_DECREF(item);
            if (added < 0)
                break;
        }
        Py_DECREF(it);
        if (PyErr_Occurred())
            return NULL;
    }
    Py_ssize_t n = PySet_GET_SIZE(names);
    PyObject *list = PyList_New(n);
    if (list == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        if ((item = PySet_Pop(names)) == NULL) {
            Py_DECREF(list); /* its unset items are NULL, which it skips */
            return NULL;
        }
        PyList_SET_ITEM(list, i, item);
    }
    if (n > 1 && PyList_Sort(list) < 0)
        Py_CLEAR(list);
    return list;
}

#endif
