"""The C extensions (everything else is in pyproject.toml).

`make setup` builds them in place (scripts/bootstrap.sh); `pip install .` (the
container image) builds them into the installed package."""

from glob import glob

from setuptools import Extension, setup

# Headers shared between modules (agent/events/_tls_call.h): a change rebuilds all.
SHARED_HEADERS = sorted(glob("agent/*/_*.h"))

setup(
    ext_modules=[
        Extension(
            f"agent.{name.replace('/', '.')}",
            [f"agent/{name}.c"],
            depends=SHARED_HEADERS,
            extra_compile_args=["-O2", "-Wall", "-Werror", "-std=c11"],
        )
        for name in (
            "events/_decode",
            "flows/_known_calls",
            "l7/_hpack",
            "l7/_http1",
            "l7/_record_path",
            "records/_record",
            "redact/_headers",
            "redact/_stream_masker",
            "sinks/_json_lines",
        )
    ]
)
