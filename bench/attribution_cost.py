"""What pod attribution adds per record: RecordWriter.write with and without an
Attribution, side by side in one run, on records whose cgroup ids name containers of
known pods (the cgroup tree is a temporary directory shaped like a kubelet's).

    .venv/bin/python bench/attribution_cost.py [--records 200000] [--pods 200] [--json]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib as bl  # also puts the repository on sys.path

from agent.k8s.attribution import Attribution
from agent.k8s.cgroup import ContainerCache
from agent.k8s.cgroup_ids import CgroupPaths
from agent.k8s.metadata import CapturePolicy, PodIndex, PodResolver
from agent.records.record import Record
from agent.records.writer import RecordWriter


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--records", type=int, default=200_000)
    p.add_argument("--pods", type=int, default=200)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json", action="store_true")
    return p.parse_args(argv)


def make_cluster(root: Path, pods: int) -> tuple[list[int], list[dict]]:
    ids, objs = [], []
    for i in range(pods):
        uid = f"00000000-0000-4000-8000-{i:012d}"
        cid = os.urandom(32).hex()
        scope = (root / "kubepods.slice" / "kubepods-burstable.slice"
                 / f"kubepods-burstable-pod{uid.replace('-', '_')}.slice"
                 / f"cri-containerd-{cid}.scope")  # fmt: skip
        scope.mkdir(parents=True)
        ids.append(scope.stat().st_ino)
        objs.append({"metadata": {"name": f"web-{i}", "namespace": "shop", "uid": uid,
                                  "labels": {"app": "web"}, "annotations": {}},
                     "status": {"containerStatuses": [
                         {"name": "web", "containerID": f"containerd://{cid}"}]}})  # fmt: skip
    return ids, objs


def time_writes(writer: RecordWriter, records: list[Record]) -> float:
    t0 = time.perf_counter()
    for r in records:
        writer.write(r)
    return (time.perf_counter() - t0) / len(records) * 1e9


def run(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        ids, objs = make_cluster(Path(tmp), args.pods)
        index = PodIndex()
        index.replace_pods(objs)
        att = Attribution(PodResolver(index, ContainerCache()), CapturePolicy("node"),
                          cgroups=CgroupPaths(tmp))  # fmt: skip
        records = [Record(type="data", ts_ns=1, pid=1, cgroup_id=ids[i % len(ids)],
                          direction="egress") for i in range(args.records)]  # fmt: skip
        t0 = time.perf_counter()
        att.cgroups.path_of(ids[0])  # the first lookup walks the tree
        walk_ms = (time.perf_counter() - t0) * 1e3
        plain, stamped = [], []
        for _ in range(args.rounds):
            plain.append(time_writes(RecordWriter([], "a", "n"), records))
            stamped.append(time_writes(RecordWriter([], "a", "n", att), records))
        assert all(r.pod is not None for r in records)
    base, with_att = bl.median(plain), bl.median(stamped)
    return {"records": args.records, "pods": args.pods, "cgroup_walk_ms": walk_ms,
            "write_ns": base, "write_with_attribution_ns": with_att,
            "added_ns_per_record": with_att - base, "ratio": with_att / base}  # fmt: skip


def print_table(r: dict) -> None:
    print(f"{r['records']} records over {r['pods']} pods (median of rounds)")
    print(f"RecordWriter.write: {r['write_ns']:.0f} ns/record; with attribution "
          f"{r['write_with_attribution_ns']:.0f} ns (+{r['added_ns_per_record']:.0f} ns, "
          f"x{r['ratio']:.2f}); first cgroup walk {r['cgroup_walk_ms']:.1f} ms")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    return bl.run_cli(argv, parse_args, run, print_table)


if __name__ == "__main__":
    sys.exit(main())
