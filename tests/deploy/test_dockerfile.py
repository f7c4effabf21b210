"""deploy/Dockerfile and .dockerignore, checked as text (no container engine here)."""

from __future__ import annotations

import re
import shlex

import pytest

from tests.deploy.manifests import DEPLOY, REPO

DOCKERFILE = DEPLOY / "Dockerfile"
BOOTSTRAP = REPO / "scripts" / "bootstrap.sh"

# Tools that build things: bcc carries its own LLVM, so the image has none of them.
COMPILERS = {"gcc", "g++", "clang", "llvm", "make", "build-essential", "libssl-dev", "golang-go"}


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    logical: list[str] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        logical.append(pending + stripped)
        pending = ""
    assert not pending, "Dockerfile ends inside a continued line"
    result = []
    for text in logical:
        keyword, _, rest = text.partition(" ")
        result.append((keyword.upper(), rest.strip()))
    return result


def stages() -> list[list[tuple[str, str]]]:
    """Instructions per build stage (the ARGs before the first FROM are left out)."""
    out: list[list[tuple[str, str]]] = []
    for keyword, rest in instructions():
        if keyword == "FROM":
            out.append([])
        if out:
            out[-1].append((keyword, rest))
    return out


def apt_packages(stage: list[tuple[str, str]]) -> set[str]:
    packages: set[str] = set()
    for keyword, rest in stage:
        if keyword != "RUN":
            continue
        for command in re.split(r"&&|;", rest):
            if "apt-get" not in command:
                continue  # only apt-get commands are split into words
            words = shlex.split(command)
            if "install" in words:
                after = words[words.index("install") + 1 :]
                packages |= {w for w in after if not w.startswith("-")}
    return packages


def bootstrap_packages() -> set[str]:
    text = BOOTSTRAP.read_text()
    body = re.search(r"^packages=\(\n(.*?)^\)", text, re.S | re.M)
    assert body, "scripts/bootstrap.sh has no packages=( ... ) list"
    words = []
    for line in body.group(1).splitlines():
        words += line.split("#", 1)[0].split()
    return {w.strip('"').replace("$arch", "amd64") for w in words}


def base_image_default() -> str:
    (arg,) = [rest for keyword, rest in instructions() if keyword == "ARG" and "DEBIAN" in rest]
    return arg.split("=", 1)[1]


def test_multi_stage_build_on_a_pinned_debian_12():
    froms = [rest for keyword, rest in instructions() if keyword == "FROM"]
    assert len(froms) >= 2, "expected a build stage and a runtime stage"
    assert all(f.split()[0] == "${DEBIAN_IMAGE}" for f in froms)
    image = base_image_default()
    # Debian 12 (bookworm): bcc's Python module is built for its python3 (3.11).
    # A dated tag or a digest, never a moving one.
    assert re.fullmatch(r"debian:bookworm-\d{8}-slim(@sha256:[0-9a-f]{64})?", image), image


def test_runtime_packages_are_a_subset_of_bootstrap():
    # The image needs fewer packages than a development machine: no kernel headers
    # (the node's are mounted), no compilers and no test programs (Dockerfile comment).
    runtime = apt_packages(stages()[-1])
    # python3 itself is not in bootstrap's list: bootstrap requires /usr/bin/python3 to
    # be there already; the slim image has to install it.
    assert runtime - {"python3"} <= bootstrap_packages()
    assert {"python3", "python3-bpfcc", "libbpfcc", "bpftool", "iptables", "iproute2"} <= runtime
    assert "ca-certificates" in runtime
    assert not runtime & COMPILERS
    assert not any(p.startswith("linux-headers") for p in runtime)
    build = apt_packages(stages()[0])
    assert build - {"python3"} <= bootstrap_packages()


def test_installs_use_no_recommends():
    for stage in stages():
        for keyword, rest in stage:
            if keyword == "RUN" and "apt-get install" in rest:
                assert "--no-install-recommends" in rest, rest


def test_protobuf_code_is_generated_at_build_time_only():
    build, runtime = stages()[0], stages()[-1]
    build_text = " ".join(rest for _, rest in build)
    assert "scripts/generate_proto.py" in build_text
    assert "grpcio-tools" in build_text
    assert "--system-site-packages" in build_text
    runtime_text = " ".join(rest for _, rest in runtime)
    assert "grpcio-tools" not in runtime_text
    assert "/opt/protoc" not in runtime_text
    assert "COPY --from=build /opt/tlscap/venv /opt/tlscap/venv" in " ".join(
        f"{k} {r}" for k, r in runtime
    )


def test_runtime_environment_and_entrypoint():
    runtime = stages()[-1]
    env_text = " ".join(rest for keyword, rest in runtime if keyword == "ENV")
    env = dict(item.split("=", 1) for item in shlex.split(env_text))
    copies = [rest.split() for keyword, rest in runtime if keyword == "COPY"]
    assert ["bpf/", env["TLSCAP_BPF_DIR"] + "/"] in copies
    assert env["TLSCAP_CACHE_DIR"] == "/var/cache/tlscap"
    assert env["PATH"].startswith("/opt/tlscap/venv/bin:")
    (entrypoint,) = [rest for keyword, rest in runtime if keyword == "ENTRYPOINT"]
    (cmd,) = [rest for keyword, rest in runtime if keyword == "CMD"]
    assert entrypoint == '["tlscap"]'
    assert cmd == '["run", "--config", "/etc/tlscap/agent.toml"]'
    assert not [rest for keyword, rest in runtime if keyword == "USER"]


def test_bpf_dir_holds_every_source_the_loader_reads():
    from agent.probes.bpf_program import BPF_SOURCES

    for name in BPF_SOURCES:
        assert (REPO / "bpf" / name).is_file(), name


def _dockerignore() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


@pytest.mark.parametrize(
    "source",
    sorted(
        {
            word
            for keyword, rest in instructions()
            if keyword == "COPY" and not rest.startswith("--from")
            for word in rest.split()[:-1]
        }
    ),
)
def test_copy_sources_exist_and_pass_dockerignore(source):
    assert (REPO / source).exists(), source
    patterns = _dockerignore()
    # .dockerignore excludes everything, then lets the build inputs back in.
    assert patterns[0] == "*"
    assert "!" + source in patterns


def test_dockerignore_keeps_local_build_output_out():
    patterns = _dockerignore()
    assert "agent/schema/generated/" in patterns
    assert "**/__pycache__/" in patterns
