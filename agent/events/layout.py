"""ctypes mirrors of the event structs in bpf/tlscap.h (change both together)."""

from __future__ import annotations

import ctypes as ct

CHUNK_SIZE = 16384

EV_DATA = 1
EV_CLOSE = 2
EV_EXEC = 3
EV_EXEC_MAP = 4
EV_EXIT = 5
EV_HOLD = 6
EV_BIND = 7

DIR_EGRESS = 0
DIR_INGRESS = 1

SOURCES = {1: "openssl", 2: "gotls", 3: "gnutls", 4: "nss"}
ROLES = {0: "unknown", 1: "client", 2: "server"}

# data_event.flags: the fd is a guess (a read/write on an fd not known as a socket).
DATA_FD_WEAK = 1

AF_INET = 2
AF_INET6 = 10

# Index of each kernel counter (enum counter in tlscap.h) -> its name in stats.
COUNTERS = (
    "calls",
    "chunks",
    "lost_events",
    "lost_bytes",
    "read_errors",
    "truncated_calls",
    "truncated_bytes",
    "nested_calls",
    "go_fd_fallbacks",
    "nss_plain_calls",
    "shed_connections",
    "shed_calls",
    "shed_bytes",
    "shed_connections_unattributed",
    "map_full",
    "stale_calls",
    "unknown_fds",
    "membio_binds",
    "membio_refused",
    "membio_stale",
    "ring_retried",
    "shed_midstream",
)


class ConnInfo(ct.Structure):
    _fields_ = [
        ("gen", ct.c_uint64),
        ("raddr", ct.c_uint8 * 16),
        ("laddr", ct.c_uint8 * 16),
        ("family", ct.c_uint16),
        ("rport", ct.c_uint16),
        ("lport", ct.c_uint16),
        ("role", ct.c_uint8),
        ("flags", ct.c_uint8),
    ]


class DataEventHeader(ct.Structure):
    _fields_ = [
        ("kind", ct.c_uint32),
        ("tgid", ct.c_uint32),
        ("tid", ct.c_uint32),
        ("fd", ct.c_int32),
        ("ts_ns", ct.c_uint64),
        ("ssl", ct.c_uint64),
        ("len", ct.c_uint64),
        ("offset", ct.c_uint64),
        ("captured_len", ct.c_uint32),
        ("chunk_off", ct.c_uint32),
        ("chunk_len", ct.c_uint32),
        ("direction", ct.c_uint8),
        ("source", ct.c_uint8),
        ("flags", ct.c_uint8),  # DATA_FD_WEAK
        ("_pad", ct.c_uint8 * 1),
        ("comm", ct.c_char * 16),
        ("conn", ConnInfo),
        ("cgroup_id", ct.c_uint64),
    ]


class CloseEvent(ct.Structure):
    _fields_ = [
        ("kind", ct.c_uint32),
        ("tgid", ct.c_uint32),
        ("tid", ct.c_uint32),
        ("fd", ct.c_int32),
        ("ts_ns", ct.c_uint64),
        ("gen", ct.c_uint64),
    ]


class BindEvent(ct.Structure):
    """A memory-BIO TLS object bound to its socket (bpf/calls.c, membio_sent)."""

    _fields_ = [
        ("kind", ct.c_uint32),
        ("tgid", ct.c_uint32),
        ("tid", ct.c_uint32),
        ("fd", ct.c_int32),
        ("ts_ns", ct.c_uint64),
        ("ssl", ct.c_uint64),
        ("conn", ConnInfo),
    ]


class ProcEvent(ct.Structure):
    _fields_ = [
        ("kind", ct.c_uint32),
        ("tgid", ct.c_uint32),
        ("ts_ns", ct.c_uint64),
        ("comm", ct.c_char * 16),
    ]


DATA_HEADER_SIZE = ct.sizeof(DataEventHeader)
assert DATA_HEADER_SIZE == 136, DATA_HEADER_SIZE
BIND_EVENT_SIZE = ct.sizeof(BindEvent)
assert BIND_EVENT_SIZE == 80, BIND_EVENT_SIZE
