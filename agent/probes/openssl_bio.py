"""Find the SSL BIO's read/write methods in a libssl file.

Programs that do their TLS I/O through an SSL BIO (BIO_read/BIO_gets on a BIO
stack over BIO_f_ssl(), as `openssl s_server -www` does) never call the
exported SSL_read/SSL_write: OpenSSL's BIO methods call the library-internal
ssl_read_internal/ssl_write_internal directly.  Those methods are static, so
they have no symbol; we find them the way the library itself does:
BIO_f_ssl() returns the address of its BIO_METHOD table, and the table holds
pointers to them.

Statically, from the file (never by loading it: a container's libssl must not
run code inside the agent):
  1. disassemble the exported BIO_f_ssl() and take the RIP-relative address it
     returns (capstone);
  2. read the table's `type` (BIO_TYPE_SSL) and its bwrite/bread pointers, which
     in a shared object are R_X86_64_RELATIVE relocations (the addend is the
     function's address).

The methods take (BIO *, buf, size_t len, size_t *done) and return 1 on success
- the SSL_*_ex shape - so the _ex probes serve them unchanged.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass

from agent.probes.elf_image import ElfImage
from agent.probes.elf_symbols import find_symbol_values

log = logging.getLogger(__name__)

BIO_TYPE_SSL = 7 | 0x0200  # BIO_TYPE_FILTER
# struct bio_method_st (OpenSSL 1.1.1 and 3.x): int type; char *name;
# bwrite; bwrite_old; bread; bread_old; ...
BWRITE_OFFSET = 16
BREAD_OFFSET = 32


@dataclass(frozen=True)
class SslBioMethods:
    write_addr: int  # virtual addresses in the file, as bcc's attach_uprobe(addr=) takes
    read_addr: int


def find_ssl_bio_methods(path: str) -> SslBioMethods | None:
    """The SSL BIO's bwrite/bread addresses, or None (logged) if not found."""
    try:
        return _find(path)
    except Exception as exc:  # malformed or unusual files: skip this refinement only
        log.info("no SSL BIO methods in %s: %s", path, exc)
        return None


def _find(path: str) -> SslBioMethods | None:
    with ElfImage(path) as elf:
        if elf.machine != "amd64":
            log.info("SSL BIO methods: %s is %s, only x86-64 is decoded", path, elf.machine)
            return None
        bio_f_ssl = find_symbol_values(path, ["BIO_f_ssl"]).get("BIO_f_ssl")
        if bio_f_ssl is None or not bio_f_ssl[0]:
            return None
        addr, size = bio_f_ssl
        table = _returned_address(elf.read_vaddr(addr, max(size, 16)), addr)
        if table is None:
            raise ValueError("BIO_f_ssl does not return a RIP-relative address")
        (bio_type,) = struct.unpack("<i", elf.read_vaddr(table, 4))
        if bio_type != BIO_TYPE_SSL:
            raise ValueError(f"BIO_f_ssl's table has type {bio_type:#x}, not BIO_TYPE_SSL")
        # In a shared object these are R_X86_64_RELATIVE relocations; pointer_at
        # applies them.
        write = elf.pointer_at(table + BWRITE_OFFSET)
        read = elf.pointer_at(table + BREAD_OFFSET)
    if not write or not read:
        raise ValueError("SSL BIO table has no bwrite/bread")
    return SslBioMethods(write_addr=write, read_addr=read)


def _returned_address(code: bytes, addr: int) -> int | None:
    """The first `lea reg, [rip + disp]` in the function: what it returns."""
    import capstone
    from capstone import x86_const

    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    md.detail = True
    for insn in md.disasm(code, addr):
        if insn.mnemonic == "lea":
            mem = insn.operands[1].mem
            if mem.base == x86_const.X86_REG_RIP:
                return insn.address + insn.size + mem.disp
        if insn.mnemonic == "ret":
            break
    return None
