/* Objects' fields read and set in place when they are slots (what __slots__ and
 * dataclass(slots=True) make), for the extension modules that go through Python
 * objects per event.  Why: PyObject_GetAttr of a slot is ~115 CPU instructions, the
 * pointer read ~10, and a record's path reads and sets dozens of them.
 *
 * Two ways, by how sure the caller is of the type:
 *
 * slot_offset()  a field's fixed offset in a type the caller checks each object
 *   against (Py_IS_TYPE): found once, when the module or its object is made, and
 *   an error there if the field is not a plain object slot.  agent/flows/_known_calls.c
 *   (Connection, KernelSocket) and agent/sinks/_json_lines.c (Exchange, HttpMessage).
 *
 * SlotCache      exactly what getattr and setattr do, for objects of any type: it
 *   remembers, for one attribute name, the last type it was looked up on, that type's
 *   version tag then (any change to the type or its bases retags it) and the slot's
 *   offset when the attribute is a plain writable T_OBJECT_EX member and the type's
 *   getattr and setattr are the generic ones.  Anything else (another type, a
 *   property, a frozen class, a class changed since) is looked up again, or goes by
 *   name.  agent/l7/_record_path.c and agent/redact/_headers.c (Exchange, HttpMessage,
 *   L7Counters, which tests and gRPC may subclass or replace).
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

/* The offset of object slot `name` of `type` in its instances: 0, or -1 with
 * TypeError when it is not a plain writable T_OBJECT_EX member inside the instance.
 * (A member descriptor looked up on its class gives itself back.) */
static inline int slot_offset(PyTypeObject *type, const char *name, Py_ssize_t *at) {
    PyObject *descr = PyObject_GetAttrString((PyObject *)type, name);
    if (descr == NULL)
        return -1;
    int ok = PyObject_TypeCheck(descr, &PyMemberDescr_Type);
    if (ok) {
        PyMemberDef *member = ((PyMemberDescrObject *)descr)->d_member;
        ok = member->type == T_OBJECT_EX && !(member->flags & READONLY) &&
             member->offset >= (Py_ssize_t)sizeof(PyObject) &&
             member->offset <= type->tp_basicsize - (Py_ssize_t)sizeof(PyObject *);
        *at = member->offset;
    }
    Py_DECREF(descr);
    if (!ok) {
        PyErr_Format(PyExc_TypeError, "%s.%s is not an object slot", type->tp_name, name);
        return -1;
    }
    return 0;
}

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
