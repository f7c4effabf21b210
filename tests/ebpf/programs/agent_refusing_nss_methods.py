"""`tlscap` whose bcc refuses every probe by address in an NSS libssl3 (NSS's SSL-layer
methods are attached by address): what a kernel or file that will not take them does.
Used by test_nss_capture.py to check that NSPR's probes then take over."""

import sys

from agent.cli.main import main
from agent.probes import bpf_program

_attach = bpf_program.BpfProgram.attach_uprobe


def refusing_attach(self, path, where, entry_fn, return_fn):
    if isinstance(where, int) and path.endswith("libssl3.so"):
        raise Exception(
            f"Failed to attach BPF to uprobe at {path}:{where:#x} (refused by the test)"
        )
    return _attach(self, path, where, entry_fn, return_fn)


bpf_program.BpfProgram.attach_uprobe = refusing_attach

if __name__ == "__main__":
    sys.exit(main())
