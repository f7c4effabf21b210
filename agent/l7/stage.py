"""The L7 stage of the record path: parsed exchanges in, secrets out.

RecordWriter hands every record here before numbering it and passing it to the
sinks, so both capture paths (eBPF and proxy) get the same parsing and the same
redaction, and nothing unredacted reaches a sink, the spool or a collector.
Sans-I/O: records in, records out; a test drives it with hand-made records.
"""

from __future__ import annotations

from collections import OrderedDict

from agent.l7._record_path import Dispatch
from agent.l7.connection import ConnectionL7, L7Counters, L7Options
from agent.records.record import Record


class L7Stage(Dispatch):
    """process(record) is the C base's: a data record of a tracked connection goes
    to its on_data() in the same call (the least recently used connections go
    first); new connections, closes and eviction are here."""

    _conns: OrderedDict[str, ConnectionL7]  # the C base's, given at __init__

    def __init__(self, options: L7Options) -> None:
        super().__init__(OrderedDict(), options.max_connections)
        self.options = options
        self.counters = L7Counters()
        # Protocols of connections evicted while open, so that their later records
        # are followed fail-closed (an HTTP/2 stream's framing is picked up again, its
        # header blocks masked) rather than taken for a new, unknown connection.
        self._evicted: OrderedDict[str, str] = OrderedDict()

    @property
    def active(self) -> bool:
        """Anything to do at all (parsing on, or a redaction rule)."""
        return self.options.parse or self.options.rules.enabled

    def _other(self, record: Record) -> list[Record]:
        """Any record but a data record of a connection (process() hands it here)."""
        if record.type == "close" and record.conn_id:
            self._evicted.pop(record.conn_id, None)
            conn = self._conns.pop(record.conn_id, None)
            if conn is not None:
                return conn.on_close(record)
        return [record]

    def flush(self) -> list[Record]:
        """Let every connection go (end of the run): held records and pending exchanges."""
        out: list[Record] = []
        while self._conns:
            _, conn = self._conns.popitem(last=False)
            out.extend(conn.on_close(None))
        return out

    def stats(self) -> dict[str, int]:
        out = self.counters.as_dict()
        out["l7_connections_tracked"] = len(self._conns)
        return out

    def _new_conn(self, conn_id: str) -> ConnectionL7:
        previous = self._evicted.pop(conn_id, "")
        conn = self._conns[conn_id] = ConnectionL7(self.options, self.counters, previous)
        return conn

    def evict_overflow(self) -> list[Record]:
        """Past max_connections, the least recently used connections are finished
        (as at a close) and forgotten; counted."""
        out: list[Record] = []
        while len(self._conns) > self.options.max_connections:
            conn_id, conn = self._conns.popitem(last=False)
            self.counters.connections_evicted += 1
            out.extend(conn.on_close(None))
            if conn.protocol:
                self._evicted[conn_id] = conn.protocol
                while len(self._evicted) > self.options.max_connections:
                    self._evicted.popitem(last=False)
        return out
