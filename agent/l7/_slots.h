/* An object's attribute read and set in place when it is a slot: the fields of the
 * slots dataclasses the L7 record path goes through per event (agent.l7.exchange's
 * Exchange and HttpMessage, L7Counters).  Shared by agent/l7/_record_path.c and
 * agent/redact/_headers.c.
 *
 * Why: PyObject_GetAttr of a slot is ~115 CPU instructions, the pointer read ~10, and
 * an exchange's record path read and set ~30 of them.
 *
 * Exactly what getattr and setattr do: a SlotCache remembers, for one attribute
 * name, the last type it was looked up on, that type's version tag then (any change
 * to the type or its bases retags it) and the slot's offset when the attribute is a
 * plain writable T_OBJECT_EX member and the type's getattr and setattr are the
 * generic ones.  Anything else (another type, a property, a frozen class, a class
 * changed since) is looked up again, or goes by name.
 */
#ifndef TLSCAP_SLOTS_H
#define TLSCAP_SLOTS_H

#include <Python.h>
#include <structmember.h>

typedef struct {
    const char *text;   /* the attribute's name */
    PyObject *name;     /* ... interned, made with the first look-up */
    PyTypeObject *type; /* the type last looked up (a reference), or NULL */
    unsigned int version;
    Py_ssize_t offset; /* of the slot in `type`'s objects; 0: go by name */
} SlotCache;

#define SLOT_CACHE(text) {text, NULL, NULL, 0, 0}

/* slot_of() when obj's type is not the one looked up last (or has changed since). */
static PyObject **slot_lookup(SlotCache *c, PyObject *obj) {
    PyTypeObject *t = Py_TYPE(obj);
    if (c->name == NULL && (c->name = PyUnicode_InternFromString(c->text)) == NULL)
        return NULL;
    PyObject *descr = _PyType_Lookup(t, c->name); /* borrowed; tags t if it can */
    Py_ssize_t offset = 0;
    if (descr != NULL && Py_IS_TYPE(descr, &PyMemberDescr_Type) &&
        t->tp_getattro == PyObject_GenericGetAttr && t->tp_setattro == PyObject_GenericSetAttr &&
        PyType_IsSubtype(t, PyDescr_TYPE(descr))) {
        PyMemberDef *m = ((PyMemberDescrObject *)descr)->d_member;
        if (m->type == T_OBJECT_EX && m->flags == 0 && m->offset >= (Py_ssize_t)sizeof(PyObject))
            offset = m->offset;
    }
    Py_INCREF(t);
    Py_XSETREF(c->type, t);
    c->version = t->tp_version_tag;
    c->offset = (t->tp_flags & Py_TPFLAGS_VALID_VERSION_TAG) ? offset : 0;
    return offset ? (PyObject **)((char *)obj + offset) : NULL;
}

/* The slot of c's attribute in obj, or NULL: go by name (or an error is set when the
 * name could not be made). */
static inline PyObject **slot_of(SlotCache *c, PyObject *obj) {
    PyTypeObject *t = Py_TYPE(obj);
    if (t == c->type && t->tp_version_tag == c->version &&
        (t->tp_flags & Py_TPFLAGS_VALID_VERSION_TAG))
        return c->offset ? (PyObject **)((char *)obj + c->offset) : NULL;
    return slot_lookup(c, obj);
}

/* getattr(obj, name): a new reference, or NULL with AttributeError (or another). */
static inline PyObject *slot_get(SlotCache *c, PyObject *obj) {
    PyObject **slot = slot_of(c, obj);
    if (slot == NULL)
        return c->name == NULL ? NULL : PyObject_GetAttr(obj, c->name);
    if (*slot == NULL) {
        PyErr_Format(PyExc_AttributeError, "'%.100s' object has no attribute '%U'",
                     Py_TYPE(obj)->tp_name, c->name);
        return NULL;
    }
    return Py_NewRef(*slot);
}

/* setattr(obj, name, value): 0, or -1 with an error. */
static inline int slot_set(SlotCache *c, PyObject *obj, PyObject *value) {
    PyObject **slot = slot_of(c, obj);
    if (slot == NULL)
        return c->name == NULL ? -1 : PyObject_SetAttr(obj, c->name, value);
    Py_XSETREF(*slot, Py_NewRef(value));
    return 0;
}

#endif
