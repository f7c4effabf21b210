"""The order and the all-or-nothing rule of placing Go TLS probes (no kernel needed)."""

from __future__ import annotations

from types import SimpleNamespace

from agent.probes import gotls
from agent.probes.go_write_completion import CompletionPoint, Location, WriteCompletion
from agent.probes.gotls import (
    GO_READ_ENTRY,
    GO_RETURN,
    GO_WRITE_DONE,
    GO_WRITE_ENTRY,
    attach_gotls,
)


class RecordingAttacher:
    def __init__(self, fail_at: int | None = None) -> None:
        self.fail_at = fail_at
        self.calls: list[tuple] = []
        self.attached: set[int] = set()
        self.counted: list[bool] = []
        self.conflicts: set[int] = set()

    def attach_uprobe(self, path, where, entry_fn, return_fn):
        assert return_fn is None, "no uretprobes on Go functions"
        if where == self.fail_at:
            raise Exception("boom")  # bcc raises bare Exception
        self.calls.append(("attach", where, entry_fn))
        self.attached.add(where)

    def detach_uprobe(self, path, where):
        self.calls.append(("detach", where))
        self.attached.discard(where)

    def set_go_tls_config(self, entry_address, target):
        self.calls.append(("config", entry_address))

    def set_go_write_point(self, point):
        if point.address in self.conflicts:
            raise ValueError(f"{point.address:#x} is another binary's completion point")
        self.calls.append(("point", point.address))

    def note_placement(self, single_stepped_uretprobe):
        self.counted.append(single_stepped_uretprobe)


def target(pie: bool = False) -> SimpleNamespace:
    return SimpleNamespace(
        path="/bin/app",
        pie=pie,
        write=SimpleNamespace(address=0x1000),
        read=SimpleNamespace(address=0x2000),
        write_returns=(0x1010, 0x1020),
        read_returns=(0x2030,),
    )


def test_returns_then_config_then_entry_for_each_function():
    program = RecordingAttacher()
    assert attach_gotls(program, "/proc/1/root/bin/app", target()) == [
        "Write+2 RET",
        "Read+1 RET",
    ]
    assert program.calls == [
        ("attach", 0x1010, GO_RETURN),
        ("attach", 0x1020, GO_RETURN),
        ("config", 0x1000),
        ("attach", 0x1000, GO_WRITE_ENTRY),
        ("attach", 0x2030, GO_RETURN),
        ("config", 0x2000),
        ("attach", 0x2000, GO_READ_ENTRY),
    ]


def test_a_return_that_cannot_be_placed_leaves_that_function_unprobed(caplog):
    program = RecordingAttacher(fail_at=0x1020)
    assert attach_gotls(program, "/bin/app", target()) == ["Read+1 RET"]
    assert 0x1010 not in program.attached and 0x1000 not in program.attached
    assert program.attached == {0x2030, 0x2000}
    assert "cannot probe crypto/tls.(*Conn).Write" in caplog.text


def test_pie_binaries_get_no_address_keyed_config():
    program = RecordingAttacher()
    attach_gotls(program, "/bin/app", target(pie=True))
    assert not [c for c in program.calls if c[0] == "config"]


def test_a_write_only_program_gets_its_write_probed():
    """The linker drops an uncalled (*Conn).Read; Write is probed all the same."""
    program = RecordingAttacher()
    write_only = target()
    write_only.read, write_only.read_returns = None, ()
    assert attach_gotls(program, "/bin/app", write_only) == ["Write+2 RET"]


def proved(monkeypatch) -> None:
    """Write proved: one completion point at 0x1018, RET 0x1010 kept, 0x1020 not."""
    point = CompletionPoint(0x1014, 0x1018, "je 0x1030", Location("rax"), Location("rbx"))
    completion = WriteCompletion((point,), (0x1010,), (0x1020,))
    monkeypatch.setattr(gotls, "go_write_completion", lambda path, t: (completion, "proved"))


def test_a_proved_write_gets_kept_returns_then_points_then_config_then_entry(monkeypatch):
    proved(monkeypatch)
    program = RecordingAttacher()
    assert attach_gotls(program, "/bin/app", target()) == ["Write+1 RET+1 done", "Read+1 RET"]
    assert program.calls[:5] == [
        ("point", 0x1018),
        ("attach", 0x1010, GO_RETURN),
        ("attach", 0x1018, GO_WRITE_DONE),
        ("config", 0x1000),
        ("attach", 0x1000, GO_WRITE_ENTRY),
    ]
    assert program.counted == [False]  # Write counted as emulated, not as a fallback


def test_a_proved_write_whose_point_cannot_be_placed_is_left_unprobed(monkeypatch):
    proved(monkeypatch)
    program = RecordingAttacher(fail_at=0x1018)
    assert attach_gotls(program, "/bin/app", target()) == ["Read+1 RET"]
    assert program.attached == {0x2030, 0x2000}


def test_an_unproved_write_probes_every_ret_and_counts_a_fallback():
    program = RecordingAttacher()
    attach_gotls(program, "/bin/app", target())
    assert program.counted == [True]


def test_a_point_another_binary_holds_with_other_locations_falls_back(monkeypatch, caplog):
    proved(monkeypatch)
    program = RecordingAttacher()
    program.conflicts.add(0x1018)
    caplog.set_level("DEBUG")
    assert attach_gotls(program, "/bin/app", target())[0] == "Write+2 RET"
    assert 0x1018 not in program.attached and {0x1010, 0x1020} <= program.attached
    assert program.counted == [True]
    assert "completion not used: 0x1018 is another binary's completion point" in caplog.text
