"""What the offline commands print: every bad argument is one line naming it and the fix, before
any work; progress on a terminal only; plot axes and tables people can read."""

from __future__ import annotations

import importlib.util
import io
import os
import pty
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from shared import traces
from shared.service_settings import DEFAULT_HTTP_PORTS
from sim import plot, progress, simulate_cli
from tests.conftest import REPO

TRACE = str(traces.bundled_trace_path("azure_llm_2023_code.csv"))


def slaplanner(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "services.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(("command", "flag"), [
    pytest.param("simulate", "--plot", id="simulate's plot"),
    pytest.param("simulate", "--json", id="simulate's report"),
    pytest.param("simulate", "--requests", id="simulate's per-request rows"),
    pytest.param("replay", "--plot", id="replay's plot"),
    pytest.param("replay", "--requests", id="replay's per-request rows"),
    pytest.param("dry-run", "--json", id="the dry run's report"),
    pytest.param("dry-run", "--plot", id="the dry run's plot"),
])
def test_an_output_into_a_missing_folder_is_refused_before_the_run(
    command: str, flag: str, tmp_path: Path
) -> None:
    started = time.monotonic()
    result = slaplanner(command, "--trace", TRACE, "--speedup", "10", flag, "out/run.file",
                        cwd=tmp_path)
    assert time.monotonic() - started < 20  # the whole run takes longer; nothing was run
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [
        f"slaplanner {command}: {flag} out/run.file: the folder out does not exist; create it "
        "(mkdir -p out) or write elsewhere"]


def test_an_output_that_is_a_folder_is_refused(tmp_path: Path) -> None:
    result = slaplanner("simulate", "--trace", TRACE, "--json", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"slaplanner simulate: --json {tmp_path}: is a folder; name a file in it"]


INSTALL_PROPHET = "pip install 'slaplanner[prophet]'"  # quoted: zsh globs the brackets


@pytest.mark.skipif(importlib.util.find_spec("prophet") is not None,
                    reason="the prophet extra is installed here")
@pytest.mark.parametrize(("command", "env", "prefix"), [
    pytest.param(["simulate", "--trace", TRACE, "--predictor", "prophet"], {},
                 "slaplanner simulate: --predictor prophet: ", id="simulate"),
    pytest.param(["replay", "--trace", TRACE, "--predictor", "prophet"], {},
                 "slaplanner replay: --predictor prophet: ", id="replay"),
    pytest.param(["demo", "--predictor", "prophet"], {},
                 "slaplanner demo: --predictor prophet: ", id="demo"),
    pytest.param(["dry-run", "--trace", TRACE, "--predictor", "prophet"], {},
                 "slaplanner dry-run: --predictor prophet: ", id="dry-run"),
    pytest.param(["forecaster", "--predictor", "prophet"], {},
                 "slaplanner forecaster: ", id="the forecaster service"),
    pytest.param(["forecaster"], {"SLAPLANNER_PREDICTOR_OVERRIDES": "prod/llama=prophet"},
                 "slaplanner forecaster: ", id="the forecaster with one deployment on prophet"),
])
def test_a_missing_optional_extra_is_one_line_with_its_install_command(
    command: list[str], env: dict[str, str], prefix: str, tmp_path: Path
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "services.cli", *command], cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", **env}, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [
        f"{prefix}the prophet predictor needs the optional dependency: {INSTALL_PROPHET}"]
    assert list(tmp_path.iterdir()) == []  # nothing was run or written


@pytest.mark.skipif(importlib.util.find_spec("prophet") is not None,
                    reason="the prophet extra is installed here")
def test_the_planning_benchmark_names_the_missing_extra_before_any_run(tmp_path: Path) -> None:
    config = tmp_path / "bench.toml"
    config.write_text(
        '[[scenario]]\nname = "short"\ntrace = "azure_llm_2023_code.csv"\ninterval = "15s"\n'
        'startup_delay = "60s"\nttft = "2s"\nitl = "30ms"\n\n'
        '[[policy]]\nname = "ours with prophet"\nplanner = "slaplanner"\n'
        'predictor = "prophet"\n', encoding="utf-8")
    result = subprocess.run(
        [sys.executable, "-m", "bench.planning_benchmark", "--config", str(config), "--no-docs"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [
        f"python -m bench.planning_benchmark: {config}: policy 'ours with prophet': predictor "
        f"'prophet': the prophet predictor needs the optional dependency: {INSTALL_PROPHET}"]


def test_the_services_default_to_ports_of_their_own() -> None:
    from services.actuator.settings import ActuatorSettings
    from services.collector.settings import CollectorSettings
    from services.decider.settings import DeciderSettings
    from services.forecaster.settings import ForecasterSettings

    ports = {name: cls().http_port for name, cls in (
        ("collector", CollectorSettings), ("forecaster", ForecasterSettings),
        ("decider", DeciderSettings), ("actuator", ActuatorSettings))}
    assert ports == DEFAULT_HTTP_PORTS
    assert len(set(ports.values())) == 4


def test_a_port_in_use_is_one_line_naming_the_setting(tmp_path: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "services.cli", "forecaster", "--http-host", "127.0.0.1",
             "--http-port", str(port), "--nats-url", "nats://127.0.0.1:1"],
            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == (
        f"cannot serve /metrics and /healthz on 127.0.0.1:{port} (Address already in use): "
        "set --http-port / SLAPLANNER_HTTP_PORT (0 picks a free port)")
    assert "Traceback" not in result.stderr


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_one_line_rewritten_on_a_terminal_and_cleared_at_the_end() -> None:
    clock = iter([0.0, 1.0, 1.1, 30.0, 60.0])
    out = _Terminal()
    bar = progress.Progress("slaplanner simulate", stream=out, clock=lambda: next(clock))
    bar(1, 4)  # t = 1 s
    bar(2, 4)  # t = 1.1 s: too soon to redraw
    bar(3, 4)  # t = 30 s
    bar(4, 4)  # t = 60 s
    bar.close()
    assert out.getvalue().split("\r\033[K") == [
        "",
        "slaplanner simulate: 1/4 intervals (25 %), 1 s, about 3 s left",
        "slaplanner simulate: 3/4 intervals (75 %), 30 s, about 10 s left",
        "slaplanner simulate: 4/4 intervals (100 %), 60 s",
        "",
    ]


def test_progress_counts_the_runs_of_a_search_and_times_each_on_its_own() -> None:
    clock = iter([0.0, 1.0, 2.0, 10.0, 11.0])
    out = _Terminal()
    bar = progress.Progress("slaplanner simulate", stream=out, clock=lambda: next(clock))
    bar(1, 2)  # t = 1 s
    bar(2, 2)  # t = 2 s: the first run done
    bar(1, 2)  # t = 10 s: a second run starts, timed from here
    bar(2, 2)  # t = 11 s
    bar.close()
    assert out.getvalue().split("\r\033[K")[1:-1] == [
        "slaplanner simulate: 1/2 intervals (50 %), 1 s, about 1 s left",
        "slaplanner simulate: 2/2 intervals (100 %), 2 s",
        "slaplanner simulate: run 2: 1/2 intervals (50 %), 0 s, about 0 s left",
        "slaplanner simulate: run 2: 2/2 intervals (100 %), 1 s",
    ]


def test_progress_writes_nothing_where_stderr_is_not_a_terminal() -> None:
    out = io.StringIO()
    bar = progress.Progress("slaplanner simulate", stream=out)
    bar(1, 4)
    bar.close()
    assert out.getvalue() == ""


def run_with_stderr_on_a_terminal(
    args: list[str], cwd: Path, terminal: bool, timeout_s: float = 150.0
) -> tuple[int, str, str]:
    """Run ``args`` with stdout piped and stderr on a pseudo-terminal (``terminal``) or a pipe:
    the exit status, stdout, and what stderr received."""
    master, slave = pty.openpty() if terminal else os.pipe()
    try:
        proc = subprocess.Popen(args, cwd=cwd, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=slave)
    finally:
        os.close(slave)
    received = bytearray()

    def drain() -> None:
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: every writer closed the terminal
                return
            if not chunk:
                return
            received.extend(chunk)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reader.join(timeout=10)
        os.close(master)
    return proc.returncode, out.decode(), received.decode(errors="replace")


def _bench_config(folder: Path) -> Path:
    """The benchmark on the demo's scenario alone, once, with three quick policies."""
    config = folder / "bench.toml"
    config.write_text(
        '[defaults]\nperf_skews = [1.0]\n\n'
        '[[scenario]]\nname = "azure-code-x10"\ntrace = "azure_llm_2023_code.csv"\n'
        'speedup = 10.0\ninterval = "15s"\nstartup_delay = "60s"\nttft = "2s"\n'
        'itl = "30ms"\n\n'
        '[[policy]]\nname = "static peak"\nplanner = "static"\n\n'
        '[[policy]]\nname = "best fixed"\nplanner = "best-fixed"\n\n'
        '[[policy]]\nname = "clairvoyant"\nplanner = "clairvoyant"\n', encoding="utf-8")
    return config


LONG_RUNS = {
    "simulate": (["-m", "services.cli", "simulate", "--trace", TRACE, "--speedup", "10",
                  "--quiet"], "slaplanner simulate", "intervals"),
    "simulate a reference": (["-m", "services.cli", "simulate", "--trace", TRACE,
                              "--speedup", "10", "--quiet", "--policy", "clairvoyant"],
                             "slaplanner simulate", "intervals"),
    "replay": (["-m", "services.cli", "replay", "--trace", TRACE, "--speedup", "10",
                "--max-intervals", "3", "--quiet"], "slaplanner replay", "intervals"),
    "benchmark": (["-m", "bench.planning_benchmark", "--config", "{folder}/bench.toml",
                   "--jobs", "1", "--no-docs", "--cache-dir", "{folder}/cache"],
                  "python -m bench.planning_benchmark", "runs"),
}


@pytest.mark.parametrize("terminal", [True, False], ids=["stderr a terminal", "stderr a pipe"])
@pytest.mark.parametrize("command", list(LONG_RUNS))
def test_a_long_run_shows_progress_on_a_terminal_only(
    command: str, terminal: bool, tmp_path: Path
) -> None:
    _bench_config(tmp_path)
    args, label, unit = LONG_RUNS[command]
    status, out, err = run_with_stderr_on_a_terminal(
        [sys.executable, *(a.format(folder=tmp_path) for a in args)], REPO, terminal)
    assert status == 0, out + err
    assert "GPU-h" in out  # the report (or each run's row) is on stdout either way
    if not terminal:
        assert err == ""  # a log file or a pipe gets no progress lines
        return
    # One line rewritten in place ("\r", clear to the end of the line), the last drawing the
    # whole run done, then cleared so that the terminal is left as it was.
    assert err.startswith("\r\033[K") and err.endswith("\r\033[K"), err
    drawings = [drawing for drawing in err.split("\r\033[K") if drawing]
    assert drawings and all(d.startswith(f"{label}: ") for d in drawings), err
    # (a reference's search simulates several runs: "run 2: ...")
    assert re.match(rf"{re.escape(label)}: (run \d+: )?(\d+)/\2 {unit} \(100 %\)",
                    drawings[-1]), err


@pytest.mark.parametrize(("seconds", "span_s", "label"), [
    pytest.param(75, 345, "01:15", id="a short run reads minutes and seconds"),
    pytest.param(43_200, 43_200, "12:00", id="a twelve-hour run reads hours and minutes"),
    pytest.param(5_400, 86_400, "1:30", id="an hour and a half into a day"),
])
def test_the_time_axis_reads_as_a_clock(seconds: float, span_s: float, label: str) -> None:
    assert plot.clock_label(seconds, span_s) == label


@pytest.mark.parametrize(("span_s", "step_s"), [
    pytest.param(345, 60, id="the demo's six minutes: a tick a minute"),
    pytest.param(3_600, 600, id="an hour: every ten minutes"),
    pytest.param(43_200, 7_200, id="twelve hours: every two hours"),
])
def test_time_ticks_are_at_most_ten_at_round_steps(span_s: float, step_s: float) -> None:
    assert plot.time_tick_step_s(span_s) == step_s


@pytest.mark.parametrize(("seconds", "text"), [
    pytest.param(1.4821, "1482", id="above 100 ms: whole milliseconds"),
    pytest.param(0.0104, "10.4", id="above 10 ms: a tenth"),
    pytest.param(0.00626, "6.26", id="below 10 ms: a hundredth"),
    pytest.param(None, "-", id="not observed"),
])
def test_latencies_are_printed_in_milliseconds(seconds: float | None, text: str) -> None:
    assert simulate_cli.ms(seconds) == text


@pytest.mark.parametrize(("seconds", "text"), [
    pytest.param(15, "00:15", id="seconds"),
    pytest.param(345, "05:45", id="minutes"),
    pytest.param(5_400, "1:30:00", id="past an hour"),
])
def test_the_interval_table_reads_time_as_the_runs_clock(seconds: float, text: str) -> None:
    assert simulate_cli.run_clock(seconds) == text
