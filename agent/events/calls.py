"""Fold the chunk events of one TLS call into one TlsCall.

The kernel sends a call's payload as consecutive chunks from one probe run, so
per thread they arrive in order and are never interleaved with another call of
the same thread.  A call is complete when its captured bytes are all in; when
the ring refused a chunk the kernel stops sending that call (it counts the
loss), and the next event from the same thread - or a flush - releases what
arrived as an incomplete call.

Almost every call fits one chunk (16 KiB): it passes straight through.
"""

from __future__ import annotations

from agent.events.decode import TlsCall


class CallAssembler:
    def __init__(self) -> None:
        # tid -> (the call's first chunk, the payload pieces so far, bytes so far)
        self._pending: dict[int, tuple[TlsCall, list[bytes], int]] = {}
        self.incomplete_calls = 0
        self.out_of_order_chunks = 0

    @property
    def holds_pieces(self) -> bool:
        """Some call is still in pieces: every chunk must come here, in order."""
        return bool(self._pending)

    def passes_through(self, chunk: TlsCall) -> bool:
        """The common case: a whole call in one chunk, nothing pending - the
        chunk is the call, and feed() need not be asked."""
        return not self._pending and chunk.chunk_off == 0 and len(chunk.data) >= chunk.captured_len

    def feed(self, chunk: TlsCall) -> list[TlsCall]:
        if self.passes_through(chunk):
            return [chunk]
        done: list[TlsCall] = []
        pending = self._pending.get(chunk.tid)
        if pending is not None:
            first, parts, received = pending
            if first.ts_mono_ns == chunk.ts_mono_ns and chunk.chunk_off == received:
                parts.append(chunk.data)
                received += len(chunk.data)
                if received >= first.captured_len:
                    del self._pending[chunk.tid]
                    first.data = b"".join(parts)
                    return [first]
                self._pending[chunk.tid] = (first, parts, received)
                return []
            # The rest of the pending call is not coming.
            del self._pending[chunk.tid]
            done.append(self._incomplete(first, parts))
        if chunk.chunk_off != 0:
            # Its start was lost: without it there is nothing to attach this to.
            self.out_of_order_chunks += 1
            return done
        if len(chunk.data) >= chunk.captured_len:
            done.append(chunk)
        else:
            self._pending[chunk.tid] = (chunk, [chunk.data], len(chunk.data))
        return done

    def flush(self, older_than_mono_ns: int | None = None) -> list[TlsCall]:
        """Release pending calls: all of them (at exit), or those that started
        before a time by which their remaining chunks would have arrived."""
        out = []
        for tid, (first, parts, _) in list(self._pending.items()):
            if older_than_mono_ns is None or first.ts_mono_ns < older_than_mono_ns:
                del self._pending[tid]
                out.append(self._incomplete(first, parts))
        return out

    def _incomplete(self, first: TlsCall, parts: list[bytes]) -> TlsCall:
        self.incomplete_calls += 1
        first.data = b"".join(parts)
        first.captured_len = len(first.data)
        first.complete = False
        return first
