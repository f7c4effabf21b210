"""Options from a TOML file (`--config FILE`) and the environment (`TLSCAP_<OPTION>`),
with the same names as the command-line flags - what a ConfigMap and a DaemonSet's
`env:` hand the agent.

Both are turned into command-line tokens and parsed by the subcommand's own argparse
parser, so types, choices and defaults are checked in exactly one place.  Precedence:
the command line, then the environment, then the file.
"""

from __future__ import annotations

import argparse
import os
import tomllib
from collections.abc import Mapping, Sequence

ENV_PREFIX = "TLSCAP_"
CONFIG_FLAG = "--config"
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off", ""})


class ConfigFileError(ValueError):
    """A config file or environment setting that names no option or has a bad shape."""


def expand_argv(
    parser: argparse.ArgumentParser,
    argv: Sequence[str],
    environ: Mapping[str, str] | None = None,
) -> list[str]:
    """argv with the file's and the environment's settings put in front of it (so the
    command line, parsed last, wins)."""
    environ = os.environ if environ is None else environ
    options = _long_options(parser)
    given = _options_in(argv, options)
    from_env: list[str] = []
    for name, action in options.items():
        value = environ.get(env_name(name))
        if value is None or name in given or name == "config":
            continue
        from_env += _tokens(name, action, value.split(",") if _repeatable(action) else value)
        given.add(name)
    config_path = _config_path(argv) or environ.get(env_name("config"))
    from_file: list[str] = []
    if config_path:
        for name, value in load_config(config_path).items():
            action = options.get(name)
            if action is None or name == "config":
                raise ConfigFileError(
                    f"{config_path}: {name!r} is not an option of `{parser.prog}`"
                )
            if name not in given:
                from_file += _tokens(name, action, value, source=config_path)
    return [*from_file, *from_env, *argv]


def env_name(option: str) -> str:
    """TLSCAP_HEALTH_LISTEN for --health-listen."""
    return ENV_PREFIX + option.upper().replace("-", "_")


def load_config(path: str) -> dict[str, object]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as exc:
        raise ConfigFileError(f"cannot read {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigFileError(f"{path} is not valid TOML: {exc}") from None


def add_config_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        CONFIG_FLAG,
        metavar="FILE",
        help="TOML file of options (keys: long option names without the dashes); "
        f"{ENV_PREFIX}<OPTION> environment variables set options too. The command line "
        "wins over the environment, which wins over the file",
    )


def _long_options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    out = {}
    for action in parser._actions:
        for flag in action.option_strings:
            if flag.startswith("--") and flag not in ("--help", "--version"):
                out[flag[2:]] = action
    return out


def _options_in(argv: Sequence[str], options: Mapping[str, argparse.Action]) -> set[str]:
    found = set()
    for token in argv:
        if token.startswith("--"):
            name = token[2:].split("=", 1)[0]
            if name in options:
                found.add(name)
    return found


def _config_path(argv: Sequence[str]) -> str | None:
    for i, token in enumerate(argv):
        if token == CONFIG_FLAG and i + 1 < len(argv):
            return argv[i + 1]
        if token.startswith(CONFIG_FLAG + "="):
            return token.split("=", 1)[1]
    return None


def _repeatable(action: argparse.Action) -> bool:
    return isinstance(action, argparse._AppendAction)


def _tokens(name: str, action: argparse.Action, value: object, source: str = "env") -> list[str]:
    flag = f"--{name}"
    if action.nargs == 0:  # store_true / store_false / count
        if isinstance(value, str):
            word = value.strip().lower()
            if word in _TRUE | _FALSE:
                value = word in _TRUE
        if isinstance(value, bool):
            return [flag] if value else []
        if isinstance(value, int) and isinstance(action, argparse._CountAction):
            return [flag] * value
        raise ConfigFileError(f"{source}: {name} takes true or false, not {value!r}")
    values = value if isinstance(value, list) else [value]
    if len(values) > 1 and not _repeatable(action):
        raise ConfigFileError(f"{source}: {name} takes one value, not a list")
    out = []
    for v in values:
        if isinstance(v, dict | list):
            raise ConfigFileError(f"{source}: {name} takes a plain value, not {v!r}")
        text = str(v).lower() if isinstance(v, bool) else str(v)
        out.append(f"{flag}={text}")
    return out
