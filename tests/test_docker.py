"""docker/: the compose file parses and wires the services; every felrec-stream command it runs exists.

No Docker engine is needed: each felrec service's `command` is resolved against the real click
command tree (sub-command path -> `--help` must succeed; every option used must exist on that
command, flags take no value, Choice values are valid). A command that does not exist fails.
"""

from __future__ import annotations

import re
import shlex
import tomllib
from importlib import import_module
from pathlib import Path
from typing import Any

import click
import pytest
import yaml
from click.testing import CliRunner

from felrec_stream.cli import cli

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
COMPOSE = yaml.safe_load((DOCKER / "docker-compose.yml").read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]
FELREC_SERVICES = sorted(name for name, s in SERVICES.items() if "build" in s)


def _command(service: dict[str, Any]) -> list[str]:
    command = service.get("command", [])
    return shlex.split(command) if isinstance(command, str) else [str(part) for part in command]


def _takes_value(param: click.Parameter) -> bool:
    return isinstance(param, click.Option) and not param.is_flag and not param.count


def _options(command: click.Command) -> dict[str, click.Parameter]:
    return {opt: p for p in command.params for opt in (*p.opts, *p.secondary_opts) if opt.startswith("-")}


def resolve(args: list[str]) -> tuple[list[str], click.Command | None, list[str]]:
    """(sub-command path, command or None when not registered, its remaining args)."""
    command: click.Command = cli
    path: list[str] = []
    rest = list(args)
    while isinstance(command, click.Group):
        options = _options(command)
        while rest and rest[0].startswith("-"):  # group-level options before the sub-command
            token = rest.pop(0)
            param = options.get(token.split("=", 1)[0])
            assert param is not None, f"unknown option {token} on {' '.join(['felrec-stream', *path])}"
            if _takes_value(param) and "=" not in token:
                rest.pop(0)
        assert rest, f"no sub-command after {' '.join(['felrec-stream', *path])}"
        name = rest.pop(0)
        path.append(name)
        sub = command.get_command(click.Context(command), name)
        if sub is None:
            return path, None, rest
        command = sub
    return path, command, rest


def check_options(command: click.Command, path: list[str], args: list[str]) -> None:
    options = _options(command)
    required = {p.name for p in command.params if isinstance(p, click.Option) and p.required}
    seen: set[str] = set()
    it = iter(args)
    for token in it:
        if not token.startswith("-"):
            continue  # positional arguments are validated by click itself
        flag, _, inline = token.partition("=")
        param = options.get(flag)
        assert param is not None, f"`felrec-stream {' '.join(path)}` has no option {flag}; known: {sorted(options)}"
        seen.add(param.name)
        if not _takes_value(param):
            assert not inline, f"{flag} is a flag and takes no value"
            continue
        value = inline or next(it, None)
        assert value is not None and not value.startswith("--"), f"{flag} needs a value"
        if isinstance(param.type, click.Choice):
            assert value in param.type.choices, f"{flag}={value!r} not in {param.type.choices}"
        if isinstance(param.type, (click.IntRange, click.FloatRange)) or param.type in (click.INT, click.FLOAT):
            param.type.convert(value, param, None)
    missing = required - seen
    assert not missing, f"`felrec-stream {' '.join(path)}` misses required option(s) {sorted(missing)}"


def test_compose_file_parses_and_has_every_role():
    assert {"kafka", "topic-init", "replay", "worker", "api"} <= set(SERVICES)
    assert FELREC_SERVICES, "no service is built from docker/Dockerfile"
    for name in FELREC_SERVICES:
        build = SERVICES[name]["build"]
        assert (DOCKER / build["context"] / build["dockerfile"]).resolve() == (DOCKER / "Dockerfile").resolve()


@pytest.mark.parametrize("service", FELREC_SERVICES)
def test_service_command_is_a_real_cli_command_with_valid_options(service):
    args = _command(SERVICES[service])
    path, command, rest = resolve(args)
    assert command is not None, f"service {service!r} runs `felrec-stream {' '.join(path)}`, which does not exist"
    result = CliRunner().invoke(cli, [*path, "--help"])
    assert result.exit_code == 0, result.output
    check_options(command, path, rest)


def test_kafka_is_a_single_kraft_node_reachable_as_kafka_9092():
    kafka = SERVICES["kafka"]
    env = kafka["environment"]
    assert kafka["image"].startswith("apache/kafka:")
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"].startswith(f"{env['KAFKA_NODE_ID']}@kafka:")
    assert "PLAINTEXT://kafka:9092" in env["KAFKA_ADVERTISED_LISTENERS"]
    for name in FELREC_SERVICES:
        args = _command(SERVICES[name])
        if "--bootstrap-servers" in args:
            assert args[args.index("--bootstrap-servers") + 1] == "kafka:9092", name
    assert "kafka-topics.sh" in " ".join(_command(SERVICES["topic-init"]))


def test_api_serves_the_workers_snapshots_on_a_published_port():
    worker, api = _command(SERVICES["worker"]), _command(SERVICES["api"])
    assert worker[0] == "consume" and "--serve" in worker
    assert api[0] == "serve"
    snapshots = worker[worker.index("--snapshot-dir") + 1]
    assert api[api.index("--snapshot-dir") + 1] == snapshots
    worker_volume = next(v for v in SERVICES["worker"]["volumes"] if snapshots.startswith(v.split(":")[1]))
    api_volume = next(v for v in SERVICES["api"]["volumes"] if snapshots.startswith(v.split(":")[1]))
    assert worker_volume.split(":")[0] == api_volume.split(":")[0], "worker and api must share the snapshot volume"
    assert api[api.index("--host") + 1] == "0.0.0.0"  # inside the container; published on 127.0.0.1 only
    port = api[api.index("--port") + 1]
    assert f"127.0.0.1:{port}:{port}" in SERVICES["api"]["ports"]


def test_dockerfile_installs_the_package_and_enters_the_console_script():
    text = (DOCKER / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", text, re.M)
    assert "download.pytorch.org/whl/cpu" in text and "-c constraints.txt" in text
    assert re.search(r'^ENTRYPOINT \["felrec-stream"\]', text, re.M)
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, attr = scripts["felrec-stream"].partition(":")
    assert callable(getattr(import_module(module), attr))
    for line in re.findall(r"^COPY (.+)$", text, re.M):
        for source in line.split()[:-1]:  # the last word is the destination
            assert (ROOT / source).exists(), f"Dockerfile copies {source}, which is not in the repository"
