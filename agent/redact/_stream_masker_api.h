/* agent.redact._stream_masker's C entry point, for agent/l7/_record_path.c: a
 * StreamMasker's feed() without a method call by name and without the (bytes, set)
 * pair, and no set when no rule masked anything (most records): ~500 CPU
 * instructions of the ~900 around the masking per data record.  The module holds
 * it in its capsule STREAM_MASKER_API_CAPSULE.  StreamMasker can be subclassed
 * (agent/redact/http1_masker.py does): the caller checks that the object's feed is
 * still this type's. */
#ifndef TLSCAP_STREAM_MASKER_API_H
#define TLSCAP_STREAM_MASKER_API_H

#include <Python.h>

#define STREAM_MASKER_API_CAPSULE "agent.redact._stream_masker._C_API"

typedef struct {
    PyTypeObject *type; /* StreamMasker */
    /* masker.feed(data): 0 with the masked bytes in *masked (a new reference: data
     * itself when it is bytes and nothing changed) and the rules that masked any in
     * *hits (a new set), or NULL: none; -1 with an error. */
    int (*feed)(PyObject *masker, PyObject *data, PyObject **masked, PyObject **hits);
} StreamMaskerApi;

#endif
