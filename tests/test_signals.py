"""GracefulStop: first signal sets a flag and prints one line, a second one kills, handlers are restored."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from rlswift.signals import GracefulStop

SCRIPT = textwrap.dedent(
    """
    import os, signal, sys, time
    from rlswift.signals import GracefulStop
    prev = signal.getsignal(signal.SIGTERM)
    with GracefulStop() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(200):  # the handler runs in the main thread between bytecodes
            if stop.requested:
                break
            time.sleep(0.01)
        print("requested", stop.requested, stop.signum, flush=True)
        if sys.argv[1] == "twice":
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(10)
            print("survived a second SIGTERM", flush=True)
    print("restored", signal.getsignal(signal.SIGTERM) is prev, flush=True)
    """
)


def _run(mode: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_first_sigterm_sets_flag_and_prints_one_line():
    res = _run("once")
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == ["requested True 15", "restored True"]
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("rlswift:")]
    assert lines == ["rlswift: got SIGTERM, will save a checkpoint at the end of this step and exit; "
                     "send again to abort"]


def test_second_sigterm_kills_at_once():
    t0 = time.perf_counter()
    res = _run("twice")
    assert res.returncode == -signal.SIGTERM  # -15: died of the signal, not a clean exit
    assert "requested True 15" in res.stdout and "survived" not in res.stdout
    assert time.perf_counter() - t0 < 9  # did not sleep out the 10 s


def test_in_process_flag_signum_and_restore():
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    out = io.StringIO()
    with GracefulStop(stream=out) as stop:
        assert stop.installed and not stop.requested
        assert signal.getsignal(signal.SIGUSR1) == stop._handle
        os.kill(os.getpid(), signal.SIGUSR1)
        for _ in range(200):
            if stop.requested:
                break
            time.sleep(0.005)
        assert stop.requested and stop.signum == signal.SIGUSR1
    assert out.getvalue() == ("rlswift: got SIGUSR1, will save a checkpoint at the end of this step and exit; "
                              "send again to abort\n")
    assert {s: signal.getsignal(s) for s in before} == before
    assert not stop.installed


def test_only_chosen_signals_and_manual_request():
    with GracefulStop(signals=(signal.SIGUSR1,)) as stop:
        assert signal.getsignal(signal.SIGTERM) != stop._handle
        stop.request()
        assert stop.requested and stop.signum is None


def test_outside_main_thread_is_a_noop_with_warning():
    seen: dict = {}

    def body():
        with pytest.warns(UserWarning, match="main thread"):
            with GracefulStop() as stop:
                seen["installed"] = stop.installed
                seen["handler"] = signal.getsignal(signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    t = threading.Thread(target=body)
    t.start()
    t.join()
    assert seen == {"installed": False, "handler": before}
