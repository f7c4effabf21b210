// Process probes: tell user space when new attach targets may have appeared
// (a process exec'd, or mapped a file executable — the dynamic loader or a
// dlopen bringing in a libssl of its own), and keep --pid/--comm filters
// current across exec and fork.
#include "tlscap.h"

#define PROT_EXEC_ 0x4

// mmap's entry knows the protection, its exit knows the mapping exists: user
// space must not read /proc/<pid>/maps before the new mapping is in it.
BPF_HASH(exec_mmaps, u32, u8, 16384);

TRACEPOINT_PROBE(sched, sched_process_exec) {
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
#if TLSCAP_FILTER
    // comm is already the new program's name here.
    struct comm_key key = {};
    bpf_get_current_comm(&key.comm, sizeof(key.comm));
    if (allowed_comms.lookup(&key)) {
        u8 one = 1;
        if (allowed_tgids.update(&tgid, &one) != 0)
            count(CNT_MAP_FULL, 1);
    }
#endif
    if (tgid_wanted(tgid))
        emit_proc_event(EV_EXEC, tgid);
    return 0;
}

#if TLSCAP_FILTER
// Children of an allowed process (pre-forked servers) are allowed too.
TRACEPOINT_PROBE(sched, sched_process_fork) {
    u32 parent = args->parent_pid;
    if (!allowed_tgids.lookup(&parent))
        return 0;
    // child_pid is a thread id when the parent made a thread rather than a
    // process (this tracepoint fires for both): sched_process_exit (sockets.c)
    // removes every ending thread's id, so these do not pile up.
    u32 child = args->child_pid;
    u8 one = 1;
    if (allowed_tgids.update(&child, &one) != 0)
        count(CNT_MAP_FULL, 1);
    return 0;
}
#endif

TRACEPOINT_PROBE(syscalls, sys_enter_mmap) {
    if (!(args->prot & PROT_EXEC_) || (s64)args->fd < 0)
        return 0;
    u64 id = bpf_get_current_pid_tgid();
    if (!tgid_wanted(id >> 32))
        return 0;
    u32 tid = (u32)id;
    u8 one = 1;
    exec_mmaps.update(&tid, &one);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_mmap) {
    u64 id = bpf_get_current_pid_tgid();
    u32 tid = (u32)id;
    if (!exec_mmaps.lookup(&tid))
        return 0;
    exec_mmaps.delete(&tid);
    if (args->ret < 0 && args->ret > -4096)
        return 0;  // the mapping failed
    emit_proc_event(EV_EXEC_MAP, id >> 32);
    return 0;
}
