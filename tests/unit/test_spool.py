"""The on-disk spool: FIFO order, bounds and loss accounting, restarts, damage."""

from __future__ import annotations

import logging
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from agent.export.spool import MAGIC, Spool, SpoolError, SpoolWriteError, encode_frame


def recs(start: int, n: int, size: int = 10) -> list[bytes]:
    return [f"{i:08d}".encode().ljust(size, b"x") for i in range(start, start + n)]


def drain(spool: Spool) -> list[bytes]:
    out = []
    while (co := spool.checkout()) is not None:
        out.extend(co.records)
        spool.ack(co)
    return out


def segment_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("seg-*.spool"))


def test_fifo_roundtrip_across_segments(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s", max_bytes=1 << 20, segment_bytes=300)
    for i in range(10):
        spool.append(recs(i * 5, 5))
    assert spool.records == 50
    assert len(segment_files(tmp_path / "s")) > 1
    assert drain(spool) == recs(0, 50)
    assert spool.records == 0
    assert spool.bytes == 0
    assert segment_files(tmp_path / "s") == []


def test_directory_and_files_are_private(tmp_path: Path) -> None:
    directory = tmp_path / "a" / "spool"
    spool = Spool(directory, max_bytes=1 << 20)
    spool.append(recs(0, 3))
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    for f in segment_files(directory):
        assert stat.S_IMODE(f.stat().st_mode) == 0o600
    spool.close()


def test_existing_open_directory_is_tightened(tmp_path: Path, caplog) -> None:
    directory = tmp_path / "spool"
    directory.mkdir(mode=0o755)
    directory.chmod(0o755)
    with caplog.at_level(logging.WARNING):
        Spool(directory, max_bytes=1 << 20).close()
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert "tightened" in caplog.text


def test_checkout_release_offers_the_same_segment_again(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=1 << 20)
    spool.append(recs(0, 4))
    co = spool.checkout()
    assert co is not None and co.records == recs(0, 4)
    assert spool.backlog_records == 0
    assert spool.checkout() is None  # nothing else to lend
    spool.release(co)
    assert spool.backlog_records == 4
    again = spool.checkout()
    assert again is not None and again.records == recs(0, 4)
    spool.ack(again)
    assert spool.records == 0


def test_checkout_seals_the_tail_so_new_appends_go_to_a_new_segment(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=1 << 20)
    spool.append(recs(0, 2))
    co = spool.checkout()
    spool.append(recs(2, 2))  # while the first segment is being delivered
    assert spool.backlog_records == 2
    co2 = spool.checkout()
    assert co is not None and co2 is not None
    assert (co.records, co2.records) == (recs(0, 2), recs(2, 2))
    spool.ack(co2)
    spool.ack(co)
    assert spool.records == 0


def test_full_spool_drops_oldest_segments_and_counts_exactly(tmp_path: Path, caplog) -> None:
    spool = Spool(tmp_path, max_bytes=4000, segment_bytes=1000)
    total = 0
    with caplog.at_level(logging.WARNING):
        for i in range(40):
            spool.append(recs(i * 4, 4, size=40))
            total += 4
    assert spool.bytes <= 4000
    assert spool.dropped_records > 0
    assert spool.dropped_bytes > 0
    kept = drain(spool)
    # What is left is exactly the newest records, nothing in between is missing.
    assert len(kept) + spool.dropped_records == total
    assert kept == recs(spool.dropped_records, len(kept), size=40)
    assert "records" in caplog.text and "lost" in caplog.text and "full" in caplog.text


def test_segment_size_is_clamped_to_a_quarter_of_the_bound(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=4000, segment_bytes=4 << 20)
    assert spool.segment_bytes == 1000


def test_batch_larger_than_the_spool_is_dropped_and_counted(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=1000)
    spool.append(recs(0, 2))
    spool.append([b"x" * 2000])
    assert spool.dropped_records == 1
    assert drain(spool) == recs(0, 2)


def test_checked_out_segment_is_evicted_last(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=2000, segment_bytes=500)
    spool.append(recs(0, 4, size=80))
    first = spool.checkout()
    assert first is not None
    for i in range(1, 12):
        spool.append(recs(i * 4, 4, size=80))
    # Others went first; the one being delivered is still there to be acked.
    assert first.segment in spool._segments
    spool.ack(first)
    kept = drain(spool)
    assert 4 + len(kept) + spool.dropped_records == 48


def test_survives_restart_with_counts_recomputed(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=1 << 20, segment_bytes=300)
    for i in range(6):
        spool.append(recs(i * 3, 3))
    size = spool.bytes
    spool.close()
    again = Spool(tmp_path, max_bytes=1 << 20, segment_bytes=300)
    assert again.records == 18
    assert again.bytes == size
    assert drain(again) == recs(0, 18)
    # New segments get numbers after the old ones, so age order holds across runs.
    again.append(recs(100, 1))
    again.close()
    third = Spool(tmp_path, max_bytes=1 << 20)
    assert drain(third) == recs(100, 1)


def test_new_run_appends_after_old_records(tmp_path: Path) -> None:
    s1 = Spool(tmp_path, max_bytes=1 << 20)
    s1.append(recs(0, 3))
    s1.close()
    s2 = Spool(tmp_path, max_bytes=1 << 20)
    s2.append(recs(3, 3))
    assert drain(s2) == recs(0, 6)


@pytest.mark.parametrize("cut", [1, 5, 9, 20])
def test_torn_tail_frame_is_truncated_with_a_warning(tmp_path: Path, caplog, cut: int) -> None:
    spool = Spool(tmp_path, max_bytes=1 << 20)
    spool.append(recs(0, 3))
    spool.append(recs(3, 3))
    spool.close()
    (seg,) = segment_files(tmp_path)
    full = seg.stat().st_size
    os.truncate(seg, full - cut)  # killed in the middle of writing the second frame
    with caplog.at_level(logging.WARNING):
        again = Spool(tmp_path, max_bytes=1 << 20)
    assert "truncated" in caplog.text
    assert again.records == 3
    assert again.corrupt_bytes == full - cut - (len(MAGIC) + len(encode_frame(recs(0, 3))))
    assert drain(again) == recs(0, 3)


def test_garbage_tail_and_bad_checksum_are_cut(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=1 << 20)
    spool.append(recs(0, 2))
    spool.close()
    (seg,) = segment_files(tmp_path)
    good = seg.stat().st_size
    frame = bytearray(encode_frame(recs(2, 2)))
    frame[-1] ^= 0xFF  # damaged payload: CRC no longer matches
    with open(seg, "ab") as f:
        f.write(bytes(frame))
    again = Spool(tmp_path, max_bytes=1 << 20)
    assert again.records == 2
    assert seg.stat().st_size == good
    assert drain(again) == recs(0, 2)


def test_damage_found_at_checkout_keeps_the_intact_part(tmp_path: Path, caplog) -> None:
    spool = Spool(tmp_path, max_bytes=1 << 20)
    spool.append(recs(0, 2))
    spool.append(recs(2, 2))
    spool._seal_tail()
    (seg,) = segment_files(tmp_path)
    data = bytearray(seg.read_bytes())
    data[-3] ^= 0xFF
    seg.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        co = spool.checkout()
    assert co is not None and co.records == recs(0, 2)
    assert spool.dropped_records == 2
    spool.ack(co)
    assert spool.records == 0 and spool.bytes == 0


def test_empty_and_foreign_files_at_startup(tmp_path: Path, caplog) -> None:
    (tmp_path / "seg-000000001.spool").write_bytes(MAGIC[:3])  # killed while creating
    (tmp_path / "seg-000000002.spool").write_bytes(b"not a spool segment at all")
    (tmp_path / "seg-000000003.spool").write_bytes(MAGIC)  # created, nothing written
    (tmp_path / "notes.txt").write_text("left alone")
    with caplog.at_level(logging.WARNING):
        spool = Spool(tmp_path, max_bytes=1 << 20)
    assert spool.records == 0
    assert not (tmp_path / "seg-000000001.spool").exists()
    assert (tmp_path / "seg-000000002.corrupt").exists()
    assert (tmp_path / "notes.txt").exists()
    spool.append(recs(0, 1))
    assert drain(spool) == recs(0, 1)


def test_path_that_is_a_file_gives_a_clear_error(tmp_path: Path) -> None:
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(SpoolError, match="not a directory"):
        Spool(target, max_bytes=1 << 20)
    with pytest.raises(SpoolError, match="cannot create spool directory"):
        Spool(target / "sub", max_bytes=1 << 20)


def test_unreadable_directory_gives_a_clear_error(tmp_path: Path) -> None:
    directory = tmp_path / "locked"
    directory.mkdir()
    directory.chmod(0o000)
    if os.geteuid() != 0:
        try:
            with pytest.raises(SpoolError, match="locked"):
                Spool(directory, max_bytes=1 << 20)
        finally:
            directory.chmod(0o700)
        return
    # Root reads any directory: try it as `nobody` instead, in a child process.
    base = Path(tempfile.mkdtemp(prefix="tlscap-spool-"))
    try:
        base.chmod(0o711)
        locked = base / "locked"
        locked.mkdir(mode=0o000)
        locked.chmod(0o000)
        code = (
            "import sys\n"
            "from agent.export.spool import Spool, SpoolError\n"
            "try:\n"
            f"    Spool({str(locked)!r}, max_bytes=1 << 20)\n"
            "except SpoolError as e:\n"
            "    print('SpoolError:', e)\n"
            "    sys.exit(3)\n"
        )
        proc = subprocess.run(
            [sys.executable, "-c", code],
            cwd=Path(__file__).resolve().parents[2],
            capture_output=True,
            text=True,
            user=65534,
            group=65534,
            timeout=30,
        )
        assert proc.returncode == 3, proc.stderr
        assert str(locked) in proc.stdout
        assert "Traceback" not in proc.stderr
    finally:
        shutil.rmtree(base)


def test_second_process_on_the_same_directory_is_refused(tmp_path: Path) -> None:
    first = Spool(tmp_path, max_bytes=1 << 20)
    with pytest.raises(SpoolError, match="in use"):
        Spool(tmp_path, max_bytes=1 << 20)
    first.close()
    Spool(tmp_path, max_bytes=1 << 20).close()


def test_ack_after_eviction_is_harmless(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=600, segment_bytes=150)
    spool.append(recs(0, 3, size=30))
    co = spool.checkout()
    assert co is not None
    for i in range(1, 20):
        spool.append(recs(i * 3, 3, size=30))
    spool.ack(co)
    spool.release(co)
    assert spool.backlog_records == spool.records


def test_a_batch_bigger_than_a_segment_is_split_so_eviction_stays_fine(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=4000, segment_bytes=1000)
    spool.append(recs(0, 60, size=40))  # ~2.9 kB in one call
    assert len(segment_files(tmp_path)) >= 3
    assert spool.dropped_records == 0
    spool.append(recs(60, 60, size=40))  # over the bound: only the oldest part goes
    assert 0 < spool.dropped_records < 60
    kept = drain(spool)
    assert kept == recs(spool.dropped_records, 120 - spool.dropped_records, size=40)


def test_disk_refusing_a_write_reports_what_was_not_stored(tmp_path: Path, monkeypatch) -> None:
    spool = Spool(tmp_path, max_bytes=1 << 20, segment_bytes=1000)
    real_open = Spool._open_new_tail
    opened = []

    def full_after_first(self):
        opened.append(1)
        if len(opened) > 1:
            raise OSError(28, "No space left on device")
        return real_open(self)

    monkeypatch.setattr(Spool, "_open_new_tail", full_after_first)
    with pytest.raises(SpoolWriteError) as err:
        spool.append(recs(0, 60, size=40))  # needs several segments; the second fails
    lost = err.value.records_lost
    assert 0 < lost < 60
    assert "No space left" in str(err.value)
    monkeypatch.undo()
    assert spool.records == 60 - lost
    assert drain(spool) == recs(0, 60 - lost, size=40)
