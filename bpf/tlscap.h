// Shared definitions for every tlscap probe family: event layouts, maps and the
// helpers that emit events.  The loader concatenates this header with the probe
// files into one bcc program, so all probes share the maps declared here.
//
// Layouts here are mirrored by agent/events/layout.py: change both together.
//
// Settings the loader passes with -D (defaults below are for editors/linters):
//   TLSCAP_SELF_TGID   the agent's own pid: never traced, so it never captures itself
//   TLSCAP_FILTER      1 when --pid/--comm restrict tracing to allowed_tgids
//   TLSCAP_MAX_CAPTURE per-call payload cap in bytes (larger calls are truncated)
//   TLSCAP_RINGBUF_PAGES  ring buffer size in pages
//   TLSCAP_WAKE_BYTES  wake the consumer once this much data is pending
//   TLSCAP_SHED_BYTES  ring high-water mark: connections that start while more
//                      than this is pending are shed, and a followed one cut
//                      resumes below it (0: never shed or cut)
//   TLSCAP_CUT_BYTES   a followed connection whose call leaves more than this
//                      pending is cut, or whose call of several chunks would
//                      (above TLSCAP_SHED_BYTES; 0: only a full ring cuts)
//   TLSCAP_SOCK_LENGTH_TP  1 when the kernel has sock:sock_{send,recv}_length (6.3+)
//   TLSCAP_TASK_PT_REGS  1 when the kernel has bpf_task_pt_regs + bpf_get_current_task_btf
//                      (5.15+, BTF): gotls.c finds a syscall's goroutine from its registers
//   TLSCAP_CGROUP_ID   1 when the kernel has bpf_get_current_cgroup_id (4.18+)
//   TLSCAP_SEND_SIGNAL 1 when the kernel has bpf_send_signal (5.3+)
//   (agent/probes/kernel_features.py probes these; a helper the kernel lacks would
//   make the whole program fail to load, so its code is left out instead.)
//   TLSCAP_HOLD        1 with --hold-new-libraries: stop a process that maps a TLS
//                      library until user space has probed it (process.c)
#ifndef TLSCAP_H
#define TLSCAP_H

#include <uapi/linux/ptrace.h>

#ifndef TLSCAP_SELF_TGID
#define TLSCAP_SELF_TGID 0
#endif
#ifndef TLSCAP_FILTER
#define TLSCAP_FILTER 0
#endif
#ifndef TLSCAP_MAX_CAPTURE
#define TLSCAP_MAX_CAPTURE (1 << 20)
#endif
#ifndef TLSCAP_RINGBUF_PAGES
#define TLSCAP_RINGBUF_PAGES 8192
#endif
#ifndef TLSCAP_WAKE_BYTES
#define TLSCAP_WAKE_BYTES (4 << 20)
#endif
#ifndef TLSCAP_HOLD
#define TLSCAP_HOLD 0
#endif
#ifndef TLSCAP_SOCK_LENGTH_TP
#define TLSCAP_SOCK_LENGTH_TP 0
#endif
#ifndef TLSCAP_TASK_PT_REGS
#define TLSCAP_TASK_PT_REGS 1
#endif
#ifndef TLSCAP_CGROUP_ID
#define TLSCAP_CGROUP_ID 1
#endif
#ifndef TLSCAP_SEND_SIGNAL
#define TLSCAP_SEND_SIGNAL 1
#endif
#ifndef TLSCAP_SHED_BYTES
#define TLSCAP_SHED_BYTES (TLSCAP_RINGBUF_PAGES * 2048)  // half the ring (4 KiB pages)
#endif
#ifndef TLSCAP_CUT_BYTES
#define TLSCAP_CUT_BYTES (TLSCAP_RINGBUF_PAGES * 3584)  // 7/8 of the ring
#endif

// One ring-buffer record carries at most CHUNK_SIZE payload bytes; a call that
// moved more is split into several chunk events with the same header.
#define CHUNK_SIZE 16384
// calls.c masks chunk lengths with 0x7fff (2*CHUNK_SIZE-1) for the verifier.
_Static_assert(CHUNK_SIZE == 16384, "update the chunk-length mask in openssl.c");
#define MAX_CHUNKS ((TLSCAP_MAX_CAPTURE + CHUNK_SIZE - 1) / CHUNK_SIZE)

enum event_kind {
    EV_DATA = 1,       // a chunk of TLS plaintext
    EV_CLOSE = 2,      // a socket that carried TLS data was closed
    EV_EXEC = 3,       // a process called execve: new targets may appear
    EV_EXEC_MAP = 4,   // a process mapped a file executable (dlopen): likewise
    EV_EXIT = 5,       // a process that carried TLS data exited
    EV_HOLD = 6,       // a process was stopped at its mapping of a TLS library (process.c)
    EV_BIND = 7,       // a memory-BIO TLS object was bound to its socket (calls.c)
};

enum direction { DIR_EGRESS = 0, DIR_INGRESS = 1 };
enum source { SRC_OPENSSL = 1, SRC_GOTLS = 2, SRC_GNUTLS = 3, SRC_NSS = 4 };
enum role { ROLE_UNKNOWN = 0, ROLE_CLIENT = 1, ROLE_SERVER = 2 };

// Counters (per-CPU, summed in user space).  Every place data can be dropped
// in the kernel has one.
enum counter {
    CNT_CALLS = 0,          // TLS calls that moved data
    CNT_CHUNKS = 1,         // chunk events submitted
    CNT_LOST_EVENTS = 2,    // ring buffer full: events dropped
    CNT_LOST_BYTES = 3,     // payload bytes in those dropped events
    CNT_READ_ERRORS = 4,    // payload not readable from the process
    CNT_TRUNCATED = 5,      // calls larger than the capture cap
    CNT_TRUNCATED_BYTES = 6,
    CNT_NESTED = 7,         // SSL calls made inside another traced SSL call
    CNT_GO_FD_FALLBACK = 8, // Go calls whose fd the *tls.Conn walk could not give
    CNT_NSS_PLAIN = 9,      // NSPR calls on descriptors without a TLS layer: not recorded
    // Load shedding (calls.c): connections that started while the ring was
    // above TLSCAP_SHED_BYTES emit no data at all, so the ones already
    // followed stay whole instead of every stream getting holes.
    CNT_SHED_CONNECTIONS = 10,
    CNT_SHED_CALLS = 11,    // calls of shed connections (also in CNT_CALLS)
    CNT_SHED_BYTES = 12,    // bytes those calls moved
    CNT_SHED_UNATTRIBUTED = 13,  // shed connections shed_procs had no room for
    // A tracking map refused an update (full, or no memory): the call, socket
    // or process it was for is not followed, or not followed completely.
    CNT_MAP_FULL = 14,
    // A call entry replaced because its return was never seen (the return
    // probe was not there yet, the thread died or unwound mid-call): only the
    // stale entry's own call is lost, never the ones after it.
    CNT_STALE_CALLS = 15,
    // read()/write() family syscalls inside a TLS call on an fd not known to
    // be a socket (a keylog or other file): not trusted as the call's socket.
    CNT_UNKNOWN_FDS = 16,
    // Memory-BIO TLS objects (asyncio's SSLObject, Node's TLSWrap) bound to the
    // socket their thread moved ciphertext on right around the call (calls.c).
    CNT_MEMBIO_BINDS = 17,
    // Candidate binds refused: the socket already belongs to another TLS
    // object, or a write too small to carry the call's records.
    CNT_MEMBIO_REFUSED = 18,
    // A memory-BIO call's socket syscall came too late to be trusted: no bind.
    CNT_MEMBIO_STALE = 19,
    // Records the ring refused with room to spare, submitted again (ring_output).
    CNT_RING_RETRIED = 20,
    // Followed connections cut because their call left the ring above
    // TLSCAP_CUT_BYTES, or would have (or the full ring refused it; calls.c): they
    // send nothing more until it drains below TLSCAP_SHED_BYTES, so user space
    // falling behind leaves one gap in a few connections, not holes in all of
    // them, and the room above the cut mark keeps every other event (closes,
    // connects, execs) from being refused.  Their calls meanwhile count in
    // CNT_SHED_CALLS and CNT_SHED_BYTES.
    CNT_SHED_MIDSTREAM = 21,
    CNT_MAX = 22,
};

#define AF_INET_ 2
#define AF_INET6_ 10

#define CONN_TLS_SEEN 1  // report the close of this socket

// What the kernel side knows of a socket: filled at connect/accept (or by user
// space for sockets that predate the agent).  `gen` tells two sockets that
// reused the same fd apart: the connect/accept time, or an id user space chose.
struct conn_info {
    u64 gen;
    u8 raddr[16];
    u8 laddr[16];  // all zero until the handshake told us (or user space fills it)
    u16 family;
    u16 rport;
    u16 lport;
    u8 role;
    u8 flags;
};

struct data_event {
    u32 kind;
    u32 tgid;
    u32 tid;
    s32 fd;              // -1: no socket known (memory BIO)
    u64 ts_ns;           // CLOCK_MONOTONIC at the call's return
    u64 ssl;             // the SSL* (connection identity when fd is unknown)
    u64 len;             // bytes the call moved
    u64 offset;          // where they start in this direction of the connection
    u32 captured_len;    // bytes of the call we send: min(len, cap)
    u32 chunk_off;       // where this chunk starts within the call
    u32 chunk_len;
    u8 direction;
    u8 source;
    u8 flags;            // DATA_FD_WEAK
    u8 _pad[1];
    char comm[16];
    struct conn_info conn;
    u64 cgroup_id;       // the caller's cgroup (container identity)
    u8 data[CHUNK_SIZE];
};
// fd came from a read/write on an fd not known as a socket (a keylog or
// timezone file read inside the call, or a socket nobody registered yet):
// user space asks /proc before trusting it.
#define DATA_FD_WEAK 1
#define DATA_HEADER_SIZE (sizeof(struct data_event) - CHUNK_SIZE)

struct close_event {
    u32 kind;
    u32 tgid;
    u32 tid;
    s32 fd;
    u64 ts_ns;
    u64 gen;
};

// A memory-BIO TLS object found its socket after some of its data went out
// without one (calls.c, membio_bind): from here on its data events carry fd
// and conn; user space joins the earlier ones to it.
struct bind_event {
    u32 kind;
    u32 tgid;
    u32 tid;
    s32 fd;
    u64 ts_ns;
    u64 ssl;
    struct conn_info conn;
};

// EV_EXEC, EV_EXEC_MAP, EV_EXIT
struct proc_event {
    u32 kind;
    u32 tgid;
    u64 ts_ns;
    char comm[16];
};

// BPF_RINGBUF_OUTPUT(events, TLSCAP_RINGBUF_PAGES) spelled out, plus one
// member: Debian's bcc (0.26) has no events.ringbuf_query() (iovisor/bcc#4595
// added it later) and no other way to name this map in a helper call.  bcc
// rewrites `events.perf_read(f)` into bpf_perf_event_read(<this map>, f)
// whatever the map type; the macro below turns that rewritten call into the
// ring query (same arguments, same result).  Works on every bcc with ring
// buffers; nothing else here calls bpf_perf_event_read.
struct events_table_t {
    int key;
    u32 leaf;
    int (*ringbuf_output)(void *, u64, u64);
    void *(*ringbuf_reserve)(u64);
    void (*ringbuf_discard)(void *, u64);
    void (*ringbuf_submit)(void *, u64);
    u64 (*perf_read)(int);  // ring_pending_bytes()
    u32 max_entries;
};
__attribute__((section("maps/ringbuf")))
struct events_table_t events = {.max_entries = TLSCAP_RINGBUF_PAGES * PAGE_SIZE};
#define bpf_perf_event_read(map, flags) bpf_ringbuf_query(map, flags)

// Bytes submitted and not yet consumed.  Asked cold, it reads the consumer's
// cache line: ~+400 ns (bench/README.md), so not on its own once per event.
// Right after a ring output, whose reserve has just read the same positions,
// it costs nothing measurable (the cut mark, calls.c past_cut_mark).
static __always_inline u64 ring_pending_bytes(void) {
    return events.perf_read(BPF_RB_AVAIL_DATA);
}

BPF_PERCPU_ARRAY(counters, u64, CNT_MAX);
// Bytes submitted since the last forced wake-up (approximate: shared, no lock).
BPF_ARRAY(pending_bytes, u64, 1);
// A data_event is too big for the 512-byte BPF stack.
BPF_PERCPU_ARRAY(scratch, struct data_event, 1);

// (tgid << 32 | fd) -> socket; LRU so sockets we never see closed age out.
// It need only hold a socket from its connect/accept to its first TLS call
// (and the sockets user space finds at start-up until theirs: one evicted
// before that is found again through /proc and registered, flow table).
// Every connect/accept of every process on the host lands here, so the churn
// of plain connections would evict a quiet TLS connection (and lose its close)
// if it stayed here: a socket moves to tls_sockets on its first TLS call.
BPF_TABLE("lru_hash", u64, struct conn_info, sockets, 65536);
// Sockets that carried TLS data, same key: a plain hash, evicted by nothing but
// their close (sockets.c), a new socket on the same fd (connect/accept: the
// close we missed is reported then), or user space when their process exits
// (BpfProgram.register_socket with forget).  Sized for a busy node's live TLS
// connections (idle keep-alive ones included); not preallocated, so memory
// follows the real count.  When it is full the socket stays in the LRU (the
// old behaviour) and CNT_MAP_FULL says so.
BPF_F_TABLE("hash", u64, struct conn_info, tls_sockets, 262144, BPF_F_NO_PREALLOC);
// Processes whose TLS traffic we reported: their exit closes their connections.
BPF_TABLE("lru_hash", u32, u8, tls_tgids, 16384);
// --pid / --comm filters: the tgids we may trace, and the comms that admit a
// process at exec time.
BPF_HASH(allowed_tgids, u32, u8, 65536);
struct comm_key {
    char comm[16];
};
BPF_HASH(allowed_comms, struct comm_key, u8, 64);

// A TLS call in progress: opened by a library probe's entry, completed by the
// socket probes (fd), emitted by the probe's return.  OpenSSL calls are kept
// per thread (active_calls); Go calls per goroutine (gotls.c).
struct active_call {
    u64 ssl;      // the connection object: SSL* or Go *tls.Conn
    u64 buf;
    u64 len_ptr;  // SSL_*_ex: where the library stores the byte count; Go: b.len
    s32 fd;       // learned from a syscall inside the call, -1 until then
    u32 depth;    // >1 while a traced SSL function calls another one
    u8 direction;
    u8 ex;
    u8 source;
    u8 fd_weak;   // fd came from read/write on an fd not known as a socket
    u32 go_done;  // Go Write: bytes of b already written (TLS 1.0 CBC's first byte)
    u64 sp;       // stack pointer at entry: tells a nested call from a stale entry
    u64 ts;       // entry time (CLOCK_MONOTONIC)
};
// One entry per thread inside a C-library TLS call.  What grows with idle
// connections is threads blocked in SSL_read (thread-per-connection servers),
// bounded by the host's thread count, not by 16k: sized for 128k blocked
// threads, not preallocated (memory follows use).  A refused update is counted
// in CNT_MAP_FULL.
BPF_F_TABLE("hash", u32, struct active_call, active_calls, 131072, BPF_F_NO_PREALLOC);

static __always_inline void count(u32 idx, u64 n) {
    u64 *v = counters.lookup(&idx);
    if (v)
        *v += n;
}

static __always_inline int tgid_wanted(u32 tgid) {
    if (tgid == TLSCAP_SELF_TGID)
        return 0;
#if TLSCAP_FILTER
    return allowed_tgids.lookup(&tgid) != NULL;
#else
    return 1;
#endif
}

// Waking the consumer per event costs more than the uprobe itself here, so
// events are submitted silently and the consumer drains on a short timer; only
// when a burst fills a good part of the ring do we wake it early.
static __always_inline u64 wake_flag(u64 size) {
    u32 zero = 0;
    u64 *pending = pending_bytes.lookup(&zero);
    if (!pending)
        return 0;
    __sync_fetch_and_add(pending, size);
    if (*pending < TLSCAP_WAKE_BYTES)
        return BPF_RB_NO_WAKEUP;
    *pending = 0;
    return BPF_RB_FORCE_WAKEUP;
}

// Submit a record: 0 when the ring took it (the caller counts a loss).  A ring
// with room to spare can still refuse a record: since Linux 6.15 its lock is a
// resilient spinlock, which gives up (a timeout, a suspected deadlock) where a
// plain one would spin on, and the refusal looks like a full ring.  Such a
// record is tried once more (CNT_RING_RETRIED); one that does not fit is not.
// (The refusals once seen here at 2% fill were ours: user space stored the
// consumer position a byte at a time, see agent/probes/ring_reader.py.  Since
// it stores it whole, bench/load_nginx.py has seen no retry.)
static __always_inline int ring_output(void *data, u64 size, u64 flags) {
    if (events.ringbuf_output(data, size, flags) == 0)
        return 0;
    if (ring_pending_bytes() + size + 8 > (u64)TLSCAP_RINGBUF_PAGES * PAGE_SIZE)
        return -1;
    count(CNT_RING_RETRIED, 1);
    return events.ringbuf_output(data, size, flags) == 0 ? 0 : -1;
}

static __always_inline u64 socket_key(u32 tgid, s32 fd) {
    return ((u64)tgid << 32) | (u32)fd;
}

// What we know of a socket: tls_sockets first (most lookups are TLS calls on
// sockets already moved there), then the connect/accept LRU.
static __always_inline struct conn_info *find_socket(u64 key) {
    struct conn_info *c = tls_sockets.lookup(&key);
    if (c)
        return c;
    return sockets.lookup(&key);
}

static __always_inline void emit_proc_event(u32 kind, u32 tgid) {
    struct proc_event e = {};
    e.kind = kind;
    e.tgid = tgid;
    e.ts_ns = bpf_ktime_get_ns();
    bpf_get_current_comm(&e.comm, sizeof(e.comm));
    // Target discovery races the traced program: wake the agent now.
    if (ring_output(&e, sizeof(e), BPF_RB_FORCE_WAKEUP) != 0)
        count(CNT_LOST_EVENTS, 1);
}

#endif  // TLSCAP_H
