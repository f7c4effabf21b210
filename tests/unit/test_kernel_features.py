"""Kernel feature decisions (agent/probes/kernel_features.py): pure, no kernel needed."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from agent.probes import kernel_features as kf

ALL_YES = {f.name: True for f in kf.FEATURES}


def test_every_optional_feature_with_code_to_leave_out_has_a_flag_in_tlscap_h() -> None:
    header = (Path(__file__).resolve().parents[2] / "bpf" / "tlscap.h").read_text()
    for f in kf.FEATURES:
        if f.macro:
            assert f"#ifndef {f.macro}" in header, f.macro


def test_probe_answers_win_over_the_release() -> None:
    probed = dict(ALL_YES, task_pt_regs=False)
    k = kf.decide(probed, "6.18.0")
    assert not k.has("task_pt_regs") and k.has("ringbuf")
    assert "-DTLSCAP_TASK_PT_REGS=0" in k.cflags()
    assert "-DTLSCAP_CGROUP_ID=1" in k.cflags()


@pytest.mark.parametrize(
    ("release", "pt_regs", "ringbuf"),
    [("5.4.0-150-generic", False, False), ("5.10.0-32-cloud-amd64", False, True),
     ("5.15.0", True, True), ("6.1.0-50-cloud-amd64", True, True), ("garbage", False, False)],
)  # fmt: skip
def test_unanswered_probes_fall_back_to_the_first_release_with_the_feature(
    release: str, pt_regs: bool, ringbuf: bool
) -> None:
    k = kf.decide({}, release)
    assert k.has("task_pt_regs") is pt_regs
    assert k.has("ringbuf") is ringbuf


def test_5_10_loses_only_the_task_pt_regs_fallback_and_the_sock_length_tracepoints() -> None:
    k = kf.decide({}, "5.10.0-32-cloud-amd64")
    assert [f.name for f in k.missing] == ["task_pt_regs", "sock_length_tracepoints"]
    assert k.required_problem() is None
    assert k.stats()["kernel_features_missing"] == 2
    assert k.stats()["kernel_feature_task_pt_regs"] == 0
    assert k.stats()["kernel_feature_cgroup_id"] == 1
    lines = k.off_lines()
    assert len(lines) == 2
    assert lines[0].startswith("kernel feature off: task_pt_regs (")
    assert "Linux 5.15+" in lines[0] and "5.10.0-32-cloud-amd64" in lines[0]


def test_no_ring_buffer_is_a_one_line_preflight_reason() -> None:
    k = kf.decide(dict(ALL_YES, ringbuf=False), "5.4.0")
    problem = k.required_problem()
    assert problem is not None and "\n" not in problem
    assert "ring buffer" in problem and "5.8+" in problem and "--mode proxy" in problem


def test_forced_off_features_say_so() -> None:
    k = kf.decide(ALL_YES, "6.18.0", kf.parse_override("task_pt_regs, cgroup_id"))
    assert {f.name for f in k.missing} == {"task_pt_regs", "cgroup_id"}
    assert all(kf.OVERRIDE_ENV in line for line in k.off_lines())
    forced = kf.decide(ALL_YES, "6.18.0", kf.parse_override("ringbuf"))
    assert kf.OVERRIDE_ENV in (forced.required_problem() or "")


def test_unknown_override_names_are_refused() -> None:
    assert kf.parse_override("") == frozenset()
    with pytest.raises(ValueError, match="no_such_thing"):
        kf.parse_override("task_pt_regs,no_such_thing")


@pytest.mark.parametrize(
    ("err", "log", "known"),
    [
        (0, "", True),
        (errno.EINVAL, "0: (85) call unknown#175\ninvalid func unknown#175\n", False),
        (errno.EINVAL, "unknown func bpf_task_pt_regs#175\n", False),
        (errno.EACCES, "R1 type=ctx expected=ptr_, trusted_ptr_\n", True),
        (errno.EPERM, "", None),
        (errno.ENOSYS, "", None),
        (errno.EINVAL, "", None),
    ],
)
def test_helper_verdict_from_the_verifier_log(err: int, log: str, known: bool | None) -> None:
    assert kf.helper_known_from_log(err, log) is known


def test_probe_all_combines_helpers_btf_and_tracepoints(tmp_path: Path) -> None:
    def helper(helper_id: int) -> bool | None:
        return helper_id != 175  # no bpf_task_pt_regs

    answers = kf.probe_all(helper=helper, tracepoint=lambda c, n: n != "sock_recv_length",
                           btf=tmp_path / "vmlinux")  # fmt: skip
    assert answers["task_pt_regs"] is False
    assert answers["cgroup_id"] is True
    assert answers["sock_length_tracepoints"] is False
    assert answers["syscall_tracepoints"] is True
    (tmp_path / "vmlinux").write_bytes(b"")
    everything = kf.probe_all(helper=lambda i: True, tracepoint=lambda c, n: True,
                              btf=tmp_path / "vmlinux")  # fmt: skip
    assert everything["task_pt_regs"] is True
    no_btf = kf.probe_all(helper=lambda i: True, tracepoint=lambda c, n: True,
                          btf=tmp_path / "missing")  # fmt: skip
    assert no_btf["task_pt_regs"] is False  # bpf_get_current_task_btf needs vmlinux BTF
