"""The shipped units: one ExecStart layout, hardened, verified and rated by systemd-analyze.

``systemd-analyze verify`` checks every unit written for this venv's prefix
(``sys.prefix``, whose ``bin/`` must hold the ``tvm-*`` launchers), and
``systemd-analyze security --offline=true`` must rate each service at most
4.5. ``tvmrpc systemd-units`` is run as the operator runs it; the plugin cache
it refreshes keeps an unprivileged daemon from warning after an upgrade.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.support import REPO_ROOT, run_module, subprocess_env
from tests.systemd_support import SYSTEMD_ANALYZE, needs_systemd_analyze
from tvmrpc import cli
from tvmrpc.systemd import launch, units

SERVICES = ("tvm-tracker.service", "tvm-proxy.service", "tvm-server@.service")
SOCKETS = ("tvm-tracker.socket", "tvm-proxy.socket")
MAX_EXPOSURE = 4.5
LAUNCHERS = ("tvm-tracker", "tvm-proxy", "tvm-server")


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """Sections → key → every value (systemd allows repeated keys); comments dropped."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key, []).append(value)
    return sections


def one(unit: dict[str, dict[str, list[str]]], section: str, key: str) -> str:
    values = unit[section][key]
    assert len(values) == 1, (key, values)
    return values[0]


# -- the files -------------------------------------------------------------------------


def test_shipped_files_are_the_units_and_env_examples():
    assert set(units.shipped()) == {
        *SERVICES,
        *SOCKETS,
        "tvm-server.env",
        "tracker.env",
        "proxy.env",
    }
    assert set(units.unit_names()) == {*SERVICES, *SOCKETS}


def test_one_exec_start_layout_prefix_bin_tvm_daemon():
    for name in SERVICES:
        unit = parse_unit(units.render(units.shipped()[name], "/opt/tvmrpc"))
        command = one(unit, "Service", "ExecStart").split()
        daemon = name.split("@")[0].split(".")[0]
        assert command[0] == f"/opt/tvmrpc/bin/{daemon}", name
        assert one(unit, "Service", "Type") == "notify"
        assert "@PREFIX@" not in units.render(units.shipped()[name], "/opt/tvmrpc")


@pytest.mark.parametrize("name", SERVICES)
def test_services_are_hardened_and_restart_on_failure(name):
    service = parse_unit(units.shipped()[name])["Service"]
    assert service["DynamicUser"] == ["yes"]
    assert "User" not in service
    for key in (
        "NoNewPrivileges",
        "ProtectHome",
        "PrivateTmp",
        "PrivateDevices",
        "RestrictNamespaces",
    ):
        assert service[key] == ["yes"], key
    assert service["ProtectSystem"] == ["strict"]
    assert service["RestrictAddressFamilies"] == ["AF_INET AF_INET6 AF_UNIX"]
    assert service["CapabilityBoundingSet"] == [""]
    assert service["Restart"] == ["on-failure"]
    assert float(service["RestartSec"][0]) > 0
    assert service["WatchdogSec"]
    unit = parse_unit(units.shipped()[name])["Unit"]
    assert "network-online.target" in unit["Wants"][0]
    assert "network-online.target" in unit["After"][0]


def test_server_unit_stops_the_kill_mode_mixed_way_with_time_for_grace():
    unit = parse_unit(units.shipped()["tvm-server@.service"])
    service = unit["Service"]
    assert service["KillMode"] == ["mixed"]
    exec_start = one(unit, "Service", "ExecStart")
    grace = float(re.search(r"--grace (\S+)", exec_start).group(1))
    assert float(one(unit, "Service", "TimeoutStopSec")) > grace
    assert service["EnvironmentFile"] == ["/etc/tvmrpc/%i.env"]
    assert "--key ${TVM_KEY}" in exec_start


def test_tracker_service_takes_its_socket_from_the_socket_unit():
    service = parse_unit(units.shipped()["tvm-tracker.service"])
    assert service["Unit"]["Requires"] == ["tvm-tracker.socket"]
    assert "--listen systemd:domain=INET6:index=0" in one(service, "Service", "ExecStart")
    socket_unit = parse_unit(units.shipped()["tvm-tracker.socket"])
    assert socket_unit["Socket"]["ListenStream"] == ["9190"]


def test_prefix_must_be_absolute_without_spaces():
    assert units.check_prefix("/opt/tvmrpc/") == "/opt/tvmrpc"
    with pytest.raises(units.UnitsError, match="absolute path"):
        units.check_prefix("opt/tvmrpc")
    with pytest.raises(units.UnitsError, match="spaces"):
        units.check_prefix("/opt/tvm rpc")


def test_launcher_runs_twistd_in_the_foreground_with_extra_twistd_options():
    assert launch.twistd_argv("tvm-server", ["--key", "k"], {}) == [
        "twistd",
        "--nodaemon",
        "--pidfile=",
        "tvm-server",
        "--key",
        "k",
    ]
    env = {"TVMRPC_TWISTD_ARGS": "--logger=tvmrpc.jsonlog.observer --umask 022"}
    assert launch.twistd_argv("tvm-tracker", [], env)[3:] == [
        "--logger=tvmrpc.jsonlog.observer",
        "--umask",
        "022",
        "tvm-tracker",
    ]


# -- tvmrpc systemd-units ----------------------------------------------------------------


def test_systemd_units_command_writes_units_and_keeps_existing_env_files(tmp_path, capsys):
    out, env_dir = tmp_path / "system", tmp_path / "etc"
    env_dir.mkdir()
    (env_dir / "tracker.env").write_text("TVM_TRACKER_ARGS=--verbose\n")
    argv = ["systemd-units", "--prefix", "/opt/tvmrpc", "--out", str(out)]
    assert cli.main([*argv, "--env-dir", str(env_dir), "--no-plugin-cache"]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted([*SERVICES, *SOCKETS])
    text = (out / "tvm-server@.service").read_text()
    assert "ExecStart=/opt/tvmrpc/bin/tvm-server --key ${TVM_KEY}" in text
    assert (env_dir / "tracker.env").read_text() == "TVM_TRACKER_ARGS=--verbose\n"
    assert "TVM_PROXY_ARGS=" in (env_dir / "proxy.env").read_text()
    assert "TVM_KEY=" in (env_dir / "KEY.env.example").read_text()
    captured = capsys.readouterr()
    assert f"wrote {out / 'tvm-tracker.service'}" in captured.out
    assert "/opt/tvmrpc/bin/tvm-tracker" in captured.err  # not installed there: said so


def test_systemd_units_command_refuses_a_relative_prefix(tmp_path, capsys):
    argv = ["systemd-units", "--prefix", "opt", "--out", str(tmp_path)]
    assert cli.main(argv) == 2
    assert capsys.readouterr().err.strip() == (
        "tvmrpc systemd-units: --prefix must be an absolute path, got 'opt'"
    )


# -- systemd-analyze ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("units")
    units.write_units(sys.prefix, out)
    return out


@needs_systemd_analyze
def test_systemd_analyze_verify_every_unit_for_this_venv(written):
    missing = [cmd for cmd in LAUNCHERS if not Path(sys.prefix, "bin", cmd).exists()]
    if missing:
        pytest.skip(
            f"{', '.join(missing)} not in {sys.prefix}/bin: this venv's tvmrpc was installed "
            "before the launchers existed; reinstall it (./dev.sh does when setup.py changes)"
        )
    paths = [str(written / name) for name in (*SERVICES, *SOCKETS)]
    # A template is verified through an instance, as systemctl would start it.
    instance = written / "tvm-server@lab-board.service"
    shutil.copy(written / "tvm-server@.service", instance)
    paths[paths.index(str(written / "tvm-server@.service"))] = str(instance)
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", *paths],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "SYSTEMD_LOG_LEVEL": "notice"},
    )
    problems = [
        line
        for line in (result.stdout + result.stderr).splitlines()
        if any(Path(p).name.split("@")[0] in line for p in paths)
    ]
    assert result.returncode == 0, result.stdout + result.stderr
    assert problems == [], "\n".join(problems)


@needs_systemd_analyze
@pytest.mark.parametrize("name", SERVICES)
def test_systemd_analyze_security_exposure_at_most_4_5(written, name):
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "security", "--offline=true", str(written / name)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    exposure = float(match.group(1))
    print(f"{name}: systemd-analyze security exposure {exposure}")
    assert exposure <= MAX_EXPOSURE, result.stdout


# -- the plugin cache after an upgrade ------------------------------------------------------

CACHE_WARNING = "Unable to write to plugin cache"
LIST_PLUGINS = (
    "import sys; from twisted.python import log; log.startLogging(sys.stdout); "
    "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"
)


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to an unprivileged user needs root")
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv (util-linux) is missing")
def test_no_plugin_cache_warning_for_an_unprivileged_daemon_after_systemd_units():
    # An "upgrade": a plugin directory, owned by root, with a new plugin file and no cache.
    root = Path(tempfile.mkdtemp(prefix="tvmrpc-upgrade-"))
    try:
        root.chmod(0o755)
        plugins = root / "twisted" / "plugins"
        plugins.mkdir(parents=True)
        probe = plugins / "tvmrpc_upgrade_probe.py"  # a name no other plugin directory has
        shutil.copy(REPO_ROOT / "twisted" / "plugins" / "tvmrpc_plugins.py", probe)
        for path in (root / "twisted", plugins, probe):
            path.chmod(0o755 if path.is_dir() else 0o644)
        env = subprocess_env({"PYTHONPATH": str(root)})
        as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]

        def list_plugins_as_nobody() -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [*as_nobody, sys.executable, "-c", LIST_PLUGINS],
                capture_output=True,
                text=True,
                env=env,
                cwd=root,
                timeout=120,
            )

        before = list_plugins_as_nobody()
        assert f"{CACHE_WARNING} {plugins / 'dropin.cache'}" in before.stdout, before.stdout
        # What the operator runs as root after installing or upgrading.
        install = run_module(
            "tvmrpc.cli",
            "systemd-units",
            "--prefix",
            sys.prefix,
            "--out",
            str(root / "units"),
            env=subprocess_env({"PYTHONPATH": f"{root}:{REPO_ROOT}"}),
            timeout=120,
            check=False,
        )
        assert install.returncode == 0, install.stderr
        assert "refreshed Twisted's plugin cache" in install.stdout
        after = list_plugins_as_nobody()
        assert after.returncode == 0, after.stderr
        assert CACHE_WARNING not in after.stdout, after.stdout
    finally:
        shutil.rmtree(root, ignore_errors=True)
