"""`tlscap run`: capture on this host and print or write the records."""

from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import os
import signal
import socket
import sys
from pathlib import Path

from agent.capture.session import CaptureOptions, CaptureSession, WorkerSetup
from agent.cli import l7_options, proxy_options, tls_options
from agent.cli.argtypes import add_output_view_arguments, parse_size, positive_float
from agent.cli.config_file import add_config_argument
from agent.cli.errors import fail
from agent.cli.proxy_options import collector_excludes
from agent.export.targets import parse_collector_addresses
from agent.fallback.config import ConfigError
from agent.fallback.session import ProxyOptions, ProxySession
from agent.health.server import HealthServer, ListenError, parse_listen
from agent.k8s.attribution import Attribution, AttributionError, start_attribution
from agent.l7.stage import L7Stage
from agent.otlp.options import add_otlp_arguments, otlp_settings_from_args, otlp_sink_from_args
from agent.probes import preflight
from agent.probes.kernel_headers import KernelHeadersMissing, bcc_environment

log = logging.getLogger(__name__)


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("run", help="capture TLS plaintext on this host")
    p.add_argument(
        "--mode",
        choices=("ebpf", "auto", "proxy"),
        default="ebpf",
        help="ebpf: uprobes on TLS libraries (default); proxy: iptables redirection to a "
        "local TLS-terminating proxy (needs clients to trust its CA); auto: eBPF where "
        "this host supports it, else proxy",
    )
    p.add_argument(
        "--pid", type=int, action="append", default=[], help="trace only this process (repeatable)"
    )
    p.add_argument(
        "--comm",
        action="append",
        default=[],
        help="trace only processes with this name (repeatable)",
    )
    p.add_argument(
        "--output",
        choices=("text", "jsonl", "pcapng", "har", "none"),
        help="local record format (default: text; none when --collector, --store or "
        "--otlp-endpoint is given); pcapng (needs --output-file) writes the plaintext as TCP "
        "packets for Wireshark; har (needs --output-file) the HTTP/gRPC exchanges as HAR 1.2",
    )
    p.add_argument("--output-file", type=Path, help="write records here instead of stdout")
    p.add_argument("--ready-file", type=Path, help="create this file once every probe is attached")
    p.add_argument("--duration", type=positive_float, help="stop after this many seconds")
    p.add_argument(
        "--max-capture",
        type=parse_size,
        default=1 << 20,
        help="per-call payload cap; larger calls are marked truncated (default 1M)",
    )
    p.add_argument(
        "--ringbuf-mb", type=int, default=64, help="kernel ring buffer size in MiB (default 64)"
    )
    p.add_argument(
        "--shed-fraction",
        type=float,
        default=0.5,
        metavar="F",
        help="shed new connections (whole, counted) while more than this fraction of the "
        "ring is waiting to be read; 0 or 1 never sheds (default 0.5)",
    )
    p.add_argument(
        "--hold-new-libraries",
        action="store_true",
        help="stop a process that maps a TLS library (SIGSTOP, at most 2 s) until its "
        "probes are on, so even short-lived programs with a library copy the agent has "
        "not seen are captured from their first call; not for interactive shells, whose "
        "job control sees the stop",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="run the capture pipeline (decoding, flows, HTTP parsing, output) in N "
        "processes, a traced process's events all in one of them, for nodes where one "
        "core cannot keep up; with N > 1 the output must be --output jsonl with "
        "--output-file, or none, and --collector (each worker spools in "
        "<spool-dir>/worker-<i>), --store and --otlp-endpoint may be given "
        "(default 1: in the agent process)",
    )
    export = p.add_argument_group("export to a collector / local store")
    export.add_argument(
        "--collector",
        action="append",
        metavar="HOST:PORT[,HOST:PORT...]",
        help="stream records to this tlscap collector; give several (repeat the flag, "
        "or a comma list; a name with several DNS addresses counts as several) to fail "
        "over from a dead one to the next",
    )
    export.add_argument(
        "--spool-dir",
        type=Path,
        default=Path("/var/lib/tlscap/spool"),
        help="where records wait while the collector is unreachable "
        "(default /var/lib/tlscap/spool)",
    )
    export.add_argument(
        "--spool-max",
        type=parse_size,
        default=256 << 20,
        metavar="SIZE",
        help="disk bound of the spool; beyond it the oldest records are dropped, "
        "and counted (default 256M)",
    )
    export.add_argument(
        "--node",
        default=socket.gethostname(),
        help="node name put on every record (default: hostname)",
    )
    export.add_argument(
        "--store", type=Path, metavar="PATH", help="also write records to this SQLite store"
    )
    export.add_argument(
        "--collector-token-file",
        type=Path,
        metavar="PATH",
        help="send this Kubernetes projected ServiceAccount token (audience "
        "tlscap-collector) to the collector, which gives the agent its node's identity "
        "with it (collector --token-review); read again for every new stream, as the "
        "kubelet rotates it. Never sent without TLS: refused with --insecure",
    )
    tls_options.add_tls_arguments(export, server=False)
    proxy_options.add_proxy_arguments(p)
    k8s = p.add_argument_group("Kubernetes: pod metadata and opt-in by annotation")
    k8s.add_argument(
        "--k8s-metadata",
        choices=("auto", "on", "off"),
        default="auto",
        help="put pod name, namespace and labels on records, from the API server "
        "(auto: when in a cluster or a kubeconfig is found; on: required; off: never). "
        "Container ids, from /proc/<pid>/cgroup, are always there",
    )
    k8s.add_argument(
        "--kubeconfig", metavar="FILE", help="kubeconfig for running outside a cluster"
    )
    k8s.add_argument(
        "--capture-scope",
        choices=("node", "annotated"),
        default="node",
        help="node: every process (default); annotated: only pods annotated (or in a "
        'namespace annotated) tlscap.io/capture: "true"',
    )
    p.add_argument(
        "--health-listen",
        metavar="HOST:PORT",
        help="serve /healthz, /readyz and Prometheus /metrics here (e.g. 0.0.0.0:9090)",
    )
    l7_options.add_l7_arguments(p)
    add_otlp_arguments(p)
    add_output_view_arguments(p)
    add_config_argument(p)
    p.set_defaults(handler=run_command)
    return p


def chosen_output(args: argparse.Namespace) -> str:
    """--output, or its default: text, none where records go elsewhere."""
    return args.output or ("none" if args.collector or args.store or args.otlp_endpoint else "text")


def open_sinks(args: argparse.Namespace, append: bool = False, spans: bool = True) -> list:
    """Sinks in the order records reach them; raises OSError/ValueError/TlsConfigError.
    `append`: add to the output file instead of starting it again (capture workers);
    `spans`: export exchanges over OTLP too, when --otlp-endpoint asks (not for the
    agent process's stats record with workers: no exchange reaches it)."""
    from agent.sinks.jsonl import JsonlSink
    from agent.sinks.terminal import TerminalSink

    sinks: list = []
    output = chosen_output(args)
    if output == "jsonl":
        if args.output_file:
            sinks.append(JsonlSink.open(str(args.output_file), append=append))
        else:
            sinks.append(JsonlSink.open("-"))
    elif output == "pcapng":
        from agent.sinks.pcapng import PcapngSink

        if not args.output_file:
            raise ValueError("--output pcapng needs --output-file")
        sinks.append(PcapngSink.open(str(args.output_file)))
    elif output == "har":
        from agent.sinks.har import HarSink

        if not args.output_file:
            raise ValueError("--output har needs --output-file")
        sinks.append(HarSink.open(str(args.output_file)))
    elif output == "text":
        view = {"detail": args.verbose, "raw": args.raw}
        if args.output_file:
            stream = open(args.output_file, "w", encoding="utf-8")  # noqa: SIM115 - sink owns it
            sinks.append(TerminalSink(stream, color=False, **view))
        else:
            sinks.append(TerminalSink(sys.stdout, **view))
    if args.store:
        from agent.sinks.store import StoreSink

        sinks.append(StoreSink(args.store))
    otlp = otlp_sink_from_args(args) if spans else None
    if otlp is not None:
        sinks.append(otlp)
    if args.collector:
        from agent.export.exporter import CHANNEL_OPTIONS, GrpcExporter

        targets, settings, token_file = collector_settings(args)
        # --tls-server-name wins over the name a resolved address came from.
        with_name = not settings.insecure and settings.server_name is None
        sinks.append(
            GrpcExporter(
                targets,
                channel_factory=lambda endpoint: tls_options.open_channel(
                    endpoint.address,
                    settings,
                    [*CHANNEL_OPTIONS, *(endpoint.channel_options() if with_name else ())],
                ),
                spool_dir=args.spool_dir,
                spool_max_bytes=args.spool_max,
                token_file=token_file,
            )
        )
    elif args.collector_token_file is not None:
        raise ValueError("--collector-token-file needs --collector")
    return sinks


def collector_settings(args: argparse.Namespace) -> tuple:
    """(targets, TLS settings, token file) for --collector, checked: raises
    TlsConfigError, ValueError (a malformed address), OSError (the token file)."""
    from agent.export.targets import CollectorTargets

    settings = tls_options.tls_settings_from_args(args, server=False)
    token_file = None
    if args.collector_token_file is not None:
        from agent.export.token import TokenFile

        if settings.insecure:
            # No override on purpose: whoever reads the token off the wire can
            # send records as this node until it expires.
            raise tls_options.TlsConfigError(
                "--collector-token-file needs TLS to the collector: the token would "
                "cross the network readable with --insecure"
            )
        token_file = TokenFile(args.collector_token_file)  # TokenFileError: OSError
    return CollectorTargets(args.collector), settings, token_file


def run_command(args: argparse.Namespace) -> int:
    if args.health_listen:
        try:
            parse_listen(args.health_listen)
        except ValueError as exc:
            return fail(f"--health-listen: {exc}")
    for pid in args.pid:
        if pid <= 0 or not os.path.exists(f"/proc/{pid}"):
            return fail(f"no such process: --pid {pid}")
    if args.ringbuf_mb <= 0:
        return fail("--ringbuf-mb must be positive")
    if not 0.0 <= args.shed_fraction <= 1.0:
        return fail("--shed-fraction must be between 0 and 1")
    if problem := workers_problem(args):
        return fail(problem)
    if args.otlp_endpoint and args.l7 == "off":
        log.warning("--otlp-endpoint with --l7 off: no exchanges are parsed, so no spans")
    try:
        args.collector = parse_collector_addresses(args.collector) or None
    except ValueError as exc:
        return fail(f"--collector: {exc}")
    proxy_config = None
    if args.mode != "ebpf":
        try:
            proxy_config = proxy_options.proxy_config_from_args(args)
            excludes = tuple(
                sorted({n for c in args.collector or () for n in collector_excludes(c)})
            )
        except ConfigError as exc:
            return fail(str(exc))
        except OSError as exc:
            return fail(f"cannot read --proxy-config: {exc}")

    if args.collector:
        workers_now = args.workers if args.workers > 1 else 0
        for stale in stale_worker_spools(args.spool_dir, workers_now):
            log.warning(
                "%s holds records a capture worker of an earlier run spooled: they are "
                "sent by a run with --workers %d or more",
                stale, int(stale.name[7:]) + 1,
            )  # fmt: skip
    try:
        l7 = L7Stage(l7_options.l7_options_from_args(args))
    except ValueError as exc:
        return fail(str(exc))
    try:
        attribution = start_attribution(
            args.k8s_metadata, args.capture_scope, args.node, args.kubeconfig
        )
    except AttributionError as exc:
        return fail(str(exc))

    options = CaptureOptions(
        pids=args.pid,
        comms=args.comm,
        max_capture=args.max_capture,
        ringbuf_bytes=args.ringbuf_mb << 20,
        hold_new_libraries=args.hold_new_libraries,
        shed_fraction=args.shed_fraction,
        duration=args.duration,
        ready_file=args.ready_file,
        node=args.node,
    )
    program = None
    if args.mode != "proxy":
        try:
            program = _load_ebpf(options)
        except EbpfUnavailable as exc:
            if args.mode == "ebpf":
                attribution.close()  # its API watch threads were started
                return fail(str(exc))
            log.warning("eBPF capture is not possible here, using proxy mode instead: %s", exc)

    workers = None
    if program is not None and args.workers > 1:
        workers = worker_setup(args)
        attribution.close()  # each worker makes its own, after the fork
        attribution, l7 = None, None
    elif args.workers > 1:
        log.warning("--workers applies to eBPF capture: the proxy runs in one process")
    try:
        if workers is not None:
            # Each worker opens its outputs after the fork, and this process its own
            # (the stats record) then too: a gRPC channel made before a fork is not
            # safe to use in either process.  Checked here, so a bad setting fails now.
            check_worker_outputs(args)
            sinks = []
        else:
            sinks = open_sinks(args)
    except (tls_options.TlsConfigError, OSError, ValueError) as exc:
        if attribution is not None:
            attribution.close()
        detail = (
            exc if isinstance(exc, tls_options.TlsConfigError) else f"cannot open output: {exc}"
        )
        return fail(str(detail))

    session: CaptureSession | ProxySession
    if program is not None:
        session = CaptureSession(
            options, sinks, program=program, attribution=attribution, l7=l7, workers=workers
        )
    else:
        assert proxy_config is not None
        if args.pid or args.comm:
            log.warning(
                "--pid/--comm do not apply in proxy mode: every redirected connection is captured"
            )
        session = ProxySession(
            ProxyOptions(
                config=proxy_config,
                max_capture=args.max_capture,
                duration=args.duration,
                ready_file=args.ready_file,
                node=args.node,
                extra_excludes=excludes,
                pods=args.proxy_pods,
            ),
            sinks,
            attribution,
            l7,
        )
    health = None
    if args.health_listen:
        health = HealthServer(
            args.health_listen,
            snapshot=session.summary,
            ready=lambda: session.liveness.ready,
            alive=session.liveness.alive,
        )
        try:
            health.start()
        except ListenError as exc:
            return fail(str(exc))
        log.info("health and metrics on http://%s:%d/", *health.address)
    try:
        return _drive(session)
    finally:
        if health is not None:
            health.stop()


def workers_problem(args: argparse.Namespace) -> str | None:
    """Why --workers cannot be used as given (None: it can)."""
    if not 1 <= args.workers <= 64:
        return "--workers must be between 1 and 64"
    if args.workers == 1:
        return None
    output = chosen_output(args)
    # Text, pcapng and HAR need one writer that sees every record in order; a JSON
    # lines file, the store, the collector and OTLP take records from several processes.
    if not (output == "none" or (output == "jsonl" and args.output_file)):
        return "--workers > 1 needs --output jsonl with --output-file, or --output none"
    return None


def check_worker_outputs(args: argparse.Namespace) -> None:
    """What open_sinks would refuse, refused before the workers start; the JSON
    lines file started empty (created 0600), since every writer appends to it,
    and the store made ready (created 0600, its schema written) before several
    processes open it at once.  No gRPC object is made here: it would be forked."""
    from agent.sinks.jsonl import JsonlSink

    if chosen_output(args) == "jsonl" and args.output_file:
        JsonlSink.open(str(args.output_file)).close()
    if args.store:
        from agent.sinks.store import StoreSink

        StoreSink(args.store).close()
    otlp_settings_from_args(args)
    if args.collector:
        collector_settings(args)
    elif args.collector_token_file is not None:
        raise ValueError("--collector-token-file needs --collector")


def stale_worker_spools(spool_dir: Path, workers: int) -> list[Path]:
    """Spools of capture workers of an earlier run that this run has no worker for,
    holding records still (each is sent by a run with a worker of that number)."""
    stale = []
    try:
        entries = list(spool_dir.iterdir())
    except OSError:
        return stale
    for entry in entries:
        name = entry.name
        if name.startswith("worker-") and name[7:].isdigit() and int(name[7:]) >= workers:
            with contextlib.suppress(OSError):
                if entry.is_dir() and any(entry.iterdir()):
                    stale.append(entry)
    return sorted(stale)


def worker_setup(args: argparse.Namespace) -> WorkerSetup:
    """Outputs each worker opens for itself, after the fork (workers_problem() passed).

    Each worker spools for the collector in a directory of its own (spools are not
    shared between processes): <spool-dir>/worker-<i>.  The agent process keeps
    <spool-dir> for its stats record.  Every worker writes to the same --store
    (SQLite takes writers one at a time) and exports its own exchanges with an OTLP
    exporter of its own; the agent process, whose only record is the stats record,
    opens no OTLP exporter."""

    def open_outputs(index: int) -> tuple[list, Attribution, L7Stage]:
        attribution = start_attribution(
            args.k8s_metadata, args.capture_scope, args.node, args.kubeconfig
        )
        l7 = L7Stage(l7_options.l7_options_from_args(args))
        own = copy.copy(args)
        own.spool_dir = args.spool_dir / f"worker-{index}"
        return open_sinks(own, append=True), attribution, l7

    return WorkerSetup(
        args.workers, open_outputs, lambda: open_sinks(args, append=True, spans=False)
    )


class EbpfUnavailable(RuntimeError):
    """Why eBPF capture cannot run here (one or more lines)."""


def _load_ebpf(options: CaptureOptions):
    """Check the host and compile the probes: the two steps that fail where eBPF cannot run."""
    try:
        checked = preflight.check_environment()
    except preflight.EnvironmentProblem as exc:
        raise EbpfUnavailable(
            "eBPF capture cannot run here:\n  " + "\n  ".join(exc.problems)
        ) from None
    except KernelHeadersMissing as exc:
        raise EbpfUnavailable(str(exc)) from None
    if not os.environ.get("BCC_KERNEL_SOURCE"):
        os.environ.update(bcc_environment(checked.kernel_source))
    from agent.probes.bpf_program import BpfProgram

    try:
        return BpfProgram(options.probe_settings())
    except Exception as exc:  # bcc raises bare Exception on compile/load errors
        log.debug("loading the eBPF program failed", exc_info=True)
        raise EbpfUnavailable(f"the eBPF program does not load: {exc}") from None


def _drive(session: CaptureSession | ProxySession) -> int:
    def stop(signum: int, _frame: object) -> None:
        log.info("received %s, stopping", signal.Signals(signum).name)
        session.stop_event.set()

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        session.start()
        session.run()
    except BrokenPipeError:
        # The reader went away (`tlscap run | head`): not an error of ours.
        # Point stdout at /dev/null so the interpreter's final flush is quiet.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        session.close()
        return 0
    except Exception as exc:  # bcc raises bare Exception on compile/load errors
        log.debug("capture failed", exc_info=True)
        session.close()
        return fail(f"capture failed: {exc}")
    session.close()
    return 0
