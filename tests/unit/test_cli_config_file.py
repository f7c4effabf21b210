"""--config FILE and TLSCAP_<OPTION>: the same names as the flags, parsed by the same
parser; the command line wins over the environment, which wins over the file."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.cli.config_file import ConfigFileError, env_name, expand_argv
from agent.cli.main import build_parser, main


def run_args(argv: list[str], environ: dict[str, str] | None = None):
    parser = build_parser()
    expanded = expand_argv(parser.configurable["run"], argv, environ or {})
    return parser.parse_args(["run", *expanded])


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return str(path)


def test_file_values_are_parsed_like_flags(tmp_path: Path) -> None:
    cfg = write(tmp_path, '''
        mode = "ebpf"
        max-capture = "64K"
        ringbuf-mb = 8
        comm = ["curl", "nginx"]
        intercept-loopback = true
        collector = "collector:7300"
        spool-max = "1M"
    ''')  # fmt: skip
    args = run_args(["--config", cfg])
    assert args.max_capture == 64 << 10 and args.ringbuf_mb == 8
    assert args.comm == ["curl", "nginx"]
    assert args.intercept_loopback is True
    assert (args.collector, args.spool_max) == (["collector:7300"], 1 << 20)


def test_command_line_beats_environment_beats_file(tmp_path: Path) -> None:
    cfg = write(tmp_path, 'node = "from-file"\nmax-capture = "1K"\nringbuf-mb = 2\n')
    env = {"TLSCAP_NODE": "from-env", "TLSCAP_MAX_CAPTURE": "2K"}
    args = run_args(["--config", cfg, "--max-capture", "4K"], env)
    assert args.node == "from-env"
    assert args.max_capture == 4 << 10
    assert args.ringbuf_mb == 2


def test_config_file_named_by_the_environment(tmp_path: Path) -> None:
    cfg = write(tmp_path, "ringbuf-mb = 3\n")
    assert run_args([], {"TLSCAP_CONFIG": cfg}).ringbuf_mb == 3


def test_repeatable_options_from_the_environment_are_comma_separated() -> None:
    args = run_args([], {"TLSCAP_COMM": "curl,wget", "TLSCAP_INTERCEPT_LOOPBACK": "true"})
    assert args.comm == ["curl", "wget"] and args.intercept_loopback is True


def test_environment_names() -> None:
    assert env_name("health-listen") == "TLSCAP_HEALTH_LISTEN"


def test_variables_that_are_no_option_are_ignored() -> None:
    args = run_args([], {"TLSCAP_BPF_DIR": "/x", "TLSCAP_CACHE_DIR": "/y"})
    assert args.ringbuf_mb == 64


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("no-such-option = 1\n", "'no-such-option' is not an option"),
        ("ringbuf-mb = [1, 2]\n", "takes one value"),
        ('intercept-loopback = "maybe"\n', "takes true or false"),
        ("node = { a = 1 }\n", "plain value"),
        ('node = "unterminated\n', "not valid TOML"),
    ],
)
def test_bad_files_name_the_problem(tmp_path: Path, text: str, message: str) -> None:
    cfg = write(tmp_path, text)
    with pytest.raises(ConfigFileError, match=message):
        run_args(["--config", cfg])


def test_main_reports_a_bad_file_as_a_usage_error(tmp_path: Path, capsys) -> None:
    cfg = write(tmp_path, "bogus = 1\n")
    with pytest.raises(SystemExit) as exc:
        main(["run", "--config", cfg])
    assert exc.value.code == 2
    assert "'bogus' is not an option of `tlscap run`" in capsys.readouterr().err


def test_bad_value_is_rejected_by_the_flag_parser(tmp_path: Path, capsys) -> None:
    cfg = write(tmp_path, 'max-capture = "lots"\n')
    with pytest.raises(SystemExit):
        run_args(["--config", cfg])
    assert "not a size" in capsys.readouterr().err


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigFileError, match="cannot read"):
        run_args(["--config", str(tmp_path / "nope.toml")])


def test_collector_takes_a_config_file_too(tmp_path: Path) -> None:
    cfg = write(tmp_path, 'listen = "127.0.0.1:7301"\ninsecure = true\nstore = "/tmp/r.db"\n')
    parser = build_parser()
    argv = expand_argv(parser.configurable["collector"], ["--config", cfg], {})
    args = parser.parse_args(["collector", *argv])
    assert args.listen == "127.0.0.1:7301" and args.insecure is True
