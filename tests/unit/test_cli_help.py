"""What the commands tell a new operator: every option's default in --help, and the pip line
(not a traceback) when a command needs the grpc extra that is not installed."""

from __future__ import annotations

import subprocess
import sys

import pytest

from keybroker.cli import grpc_as, kbs, kbs_client, rvps

HELP_DEFAULTS = [
    (kbs_client.main, ["--help"], f"(default: $KBS_URL, else {kbs_client.DEFAULT_URL})"),
    (kbs_client.main, ["admin", "keygen", "--help"], "admin-key.pem)"),
    (kbs_client.main, ["admin", "token", "--help"], "(default 1h)"),
    (rvps.main, ["--help"], f"(default: {rvps.DEFAULT_ADDRESS})"),
    (rvps.tool_main, ["query", "--help"], f"(default: {rvps.DEFAULT_URL})"),
    (grpc_as.main, ["--help"], f"(default: {grpc_as.GRPC_AS_SOCKET})"),
    (kbs.main, ["--help"], "(default: info)"),
    (kbs.main, ["--help"], "`kbs audit keygen|verify ...`"),
    (kbs.main, ["--help"], "`kbs self-signed-cert ...`"),
    (kbs.main, ["self-signed-cert", "--help"], "(default: "),
]


@pytest.mark.parametrize(("main", "args", "shown"), HELP_DEFAULTS)
def test_help_shows_the_defaults(
    main: object, args: list[str], shown: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as done:
        main(args)  # type: ignore[operator]
    assert done.value.code == 0
    assert shown in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize(
    ("entry", "args"),
    [
        ("keybroker.cli.rvps:main", ["-a", "127.0.0.1:1"]),
        ("keybroker.cli.rvps:tool_main", ["query", "-r", "x"]),
        ("keybroker.cli.grpc_as:main", ["-s", "127.0.0.1:1"]),
    ],
)
def test_a_command_without_the_grpc_extra_prints_the_pip_line(entry: str, args: list[str]) -> None:
    module, function = entry.split(":")
    # the grpc extra "not installed": its modules cannot be imported in this interpreter
    script = (
        "import sys\n"
        "for name in ('grpc', 'grpc_tools'):\n"
        "    sys.modules[name] = None\n"
        f"from {module} import {function}\n"
        f"sys.exit({function}({args!r}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 1, done.stderr
    assert "pip install 'keybroker[grpc]'" in done.stderr
    assert "Traceback" not in done.stderr
