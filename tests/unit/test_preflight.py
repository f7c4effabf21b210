"""Tests for agent.probes.preflight: the pure parts, with fake checks and fake paths."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from agent.probes import kernel_headers, preflight
from agent.probes.kernel_headers import KernelHeadersMissing
from agent.probes.preflight import (
    EnvironmentProblem,
    Preflight,
    check_environment,
    check_kernel_headers,
    check_root,
    check_tracefs,
    check_uprobes,
    collect_problems,
    has_tracepoint,
)


def ok() -> None:
    return None


def headers_ok() -> tuple[Path | None, str | None]:
    return Path("/cache/6.1.0-56-amd64"), None


def test_all_checks_pass_returns_kernel_source() -> None:
    result = check_environment(checks=[ok, ok], headers_check=headers_ok)
    assert result == Preflight(kernel_source=Path("/cache/6.1.0-56-amd64"))


def test_problems_are_collected_then_raised_once() -> None:
    ran: list[str] = []

    def fail(name: str):
        def check() -> str:
            ran.append(name)
            return f"{name} is missing"

        return check

    with pytest.raises(EnvironmentProblem) as info:
        check_environment(
            checks=[fail("root"), ok, fail("bcc")],
            headers_check=lambda: (None, "headers are missing"),
        )

    assert ran == ["root", "bcc"]  # a failing check does not stop the others
    assert info.value.problems == ["root is missing", "bcc is missing", "headers are missing"]
    assert str(info.value) == "root is missing\nbcc is missing\nheaders are missing"


def test_environment_problem_accepts_a_message() -> None:
    assert EnvironmentProblem("one\ntwo").problems == ["one", "two"]


def test_collect_problems_keeps_order() -> None:
    assert collect_problems([lambda: "a", ok, lambda: "b"]) == ["a", "b"]


def test_check_root() -> None:
    assert check_root(0) is None
    problem = check_root(1000)
    assert problem is not None and "not running as root" in problem and "\n" not in problem


def test_check_uprobes(tmp_path: Path) -> None:
    assert check_uprobes(tmp_path) is None
    problem = check_uprobes(tmp_path / "uprobe")
    assert problem is not None and "CONFIG_UPROBE_EVENTS" in problem


def test_tracefs_already_mounted(tmp_path: Path) -> None:
    (tmp_path / "tracing/events").mkdir(parents=True)

    def must_not_mount(target: Path) -> None:
        raise AssertionError("already mounted")

    assert (
        check_tracefs(
            tmp_path / "tracing", tmp_path / "nodebug", is_root=True, mount=must_not_mount
        )
        is None
    )


def test_tracefs_under_debugfs_counts(tmp_path: Path) -> None:
    (tmp_path / "debug/tracing/events").mkdir(parents=True)
    assert check_tracefs(tmp_path / "tracing", tmp_path / "debug/tracing", is_root=True) is None


def test_tracefs_gets_mounted_when_missing(tmp_path: Path) -> None:
    mounted: list[Path] = []

    def fake_mount(target: Path) -> None:
        mounted.append(target)
        (target / "events").mkdir(parents=True)

    tracefs = tmp_path / "tracing"
    assert check_tracefs(tracefs, tmp_path / "nodebug", is_root=True, mount=fake_mount) is None
    assert mounted == [tracefs]


def test_tracefs_mount_failure_is_a_problem(tmp_path: Path) -> None:
    def failing_mount(target: Path) -> None:
        raise OSError(errno.EPERM, os.strerror(errno.EPERM))

    problem = check_tracefs(
        tmp_path / "tracing", tmp_path / "nodebug", is_root=True, mount=failing_mount
    )
    assert problem is not None
    assert "mount -t tracefs nodev" in problem and "\n" not in problem


def test_tracefs_not_root_does_not_try_to_mount(tmp_path: Path) -> None:
    def must_not_mount(target: Path) -> None:
        raise AssertionError("cannot mount without root")

    assert (
        check_tracefs(
            tmp_path / "tracing", tmp_path / "nodebug", is_root=False, mount=must_not_mount
        )
        is None
    )


def test_headers_missing_becomes_a_problem(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(cache_dir: Path | None = None) -> Path | None:
        raise KernelHeadersMissing("no usable kernel headers; apt-get install linux-headers")

    monkeypatch.delenv(kernel_headers.BCC_KERNEL_SOURCE, raising=False)
    monkeypatch.setattr(kernel_headers, "find_kernel_source", missing)
    assert check_kernel_headers(is_root=True) == (
        None,
        "no usable kernel headers; apt-get install linux-headers",
    )


def test_headers_found_are_returned(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(kernel_headers.BCC_KERNEL_SOURCE, raising=False)
    monkeypatch.setattr(kernel_headers, "find_kernel_source", lambda cache_dir=None: tmp_path)
    assert check_kernel_headers(is_root=True) == (tmp_path, None)


def test_headers_env_override(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(kernel_headers.BCC_KERNEL_SOURCE, str(tmp_path))
    kernel_source, problem = check_kernel_headers(is_root=True)
    assert kernel_source is None and problem is not None and "no include/" in problem

    (tmp_path / "include").mkdir()
    assert check_kernel_headers(is_root=True) == (tmp_path, None)


def test_bpf_check_skipped_without_root() -> None:
    assert preflight.check_bpf_syscall(is_root=False) is None


def test_real_bpf_syscall_works_as_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("bpf() needs root")
    assert preflight.check_bpf_syscall() is None


def test_has_tracepoint_looks_where_bcc_looks(tmp_path: Path) -> None:
    tracefs, debugfs = tmp_path / "tracing", tmp_path / "debug-tracing"
    (tracefs / "events" / "sock" / "sock_recv_length").mkdir(parents=True)
    assert has_tracepoint("sock", "sock_recv_length", tracefs, debugfs)
    assert not has_tracepoint("sock", "no_such_event", tracefs, debugfs)
    # debugfs's tracing directory wins when it exists, as in bcc.
    (debugfs / "events").mkdir(parents=True)
    assert not has_tracepoint("sock", "sock_recv_length", tracefs, debugfs)
