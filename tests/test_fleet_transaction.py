"""The controller commits, the device never switches by itself: against real OpenSSH servers (tests/fleet.py), a
host that times out, whose controller is killed with SIGKILL or interrupted with SIGINT (Ctrl-C) at a random moment
(connect, prepare, copy, or while the device verifies), is never activated, not then and not later.

The devices are slow on purpose (tests/fleet.slow_python: the device runtime starts 30 s late, as an engine build
would take), so every interruption lands before a verification could finish. Each kind runs 20 trials, 4 devices at
a time. After each round the test waits until every device's transaction lock is free (the device-side install has
ended) and counts activations: `current` must still be the release deployed before, no activation recorded in
STATE/history.json, nothing left pending. Finally a normal deploy goes through on every device."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from fleet import MISSING, Fleet, current_release, lock_held, slow_python, wait_lock_free

sys.path.insert(0, str(Path(__file__).parent))
from test_bundle import make_run  # noqa: E402 - a real small build's run folder

pytestmark = [pytest.mark.slow, pytest.mark.skipif(MISSING is not None, reason=MISSING or "")]
TRIALS, DEVICES, DEVICE_DELAY_S = 20, 4, 30


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from edgeres.deploy.bundle import make_bundle
    from edgeres.deploy.ssh import deploy

    root = tmp_path_factory.mktemp("tx")
    run = make_run(root)
    v1 = make_bundle(run, root / "v1" / "demo", probe_size=8)
    v2 = make_bundle(run, root / "v2" / "demo", probe_size=6)
    fleet = Fleet(root / "fleet", DEVICES)
    try:
        base = deploy(v1, [d.alias for d in fleet.devices], iterations=3, host_timeout=120, **fleet.deploy_kwargs())
        assert all(r.ok for r in base), [r.message for r in base]
        yield fleet, v1, v2, base[0].release
    finally:
        fleet.close()


def _activations(d, release_before: str) -> int:
    history = json.loads((d.state / "history.json").read_text())
    return int(current_release(d) != release_before) + sum(1 for rid in history if rid != release_before)


def _settle(fleet: Fleet) -> None:
    for d in fleet.devices:
        wait_lock_free(d.state, timeout=15)   # the device's own abort, not its 30 s delay


def _check_round(fleet: Fleet, v1_release: str) -> int:
    _settle(fleet)
    for d in fleet.devices:
        assert not (d.state / "pending.json").exists(), d.alias
    return sum(_activations(d, v1_release) for d in fleet.devices)


def test_no_activation_after_host_timeout(setup):
    from edgeres.deploy.ssh import deploy

    fleet, _, v2, v1_release = setup
    rng = random.Random(26)
    activations, stages = 0, []
    for _ in range(TRIALS // DEVICES):
        results: list = []

        def one(d, timeout: float, results: list = results) -> None:
            results.extend(deploy(v2, [d.alias], iterations=3, host_timeout=timeout,
                                  **fleet.deploy_kwargs(remote_python=str(slow_python(d.folder, DEVICE_DELAY_S)))))

        threads = [threading.Thread(target=one, args=(d, rng.uniform(0.05, 6.0))) for d in fleet.devices]
        [t.start() for t in threads]
        [t.join(60) for t in threads]
        assert len(results) == DEVICES and not any(r.ok for r in results)
        stages += [r.stage for r in results]
        activations += _check_round(fleet, v1_release)
    print(f"timeout: {TRIALS} trials, {activations} activations, stopped at {sorted(set(stages))}: "
          f"{ {s: stages.count(s) for s in set(stages)} }")
    assert activations == 0
    assert "install" in stages   # the limit hit while the device verified, not only before


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["kill-9", "ctrl-c"])
def test_no_activation_after_the_controller_is_killed_or_interrupted(setup, sig):
    fleet, _, v2, v1_release = setup
    rng = random.Random(int(sig))
    activations, during_install, exits, hung = 0, 0, [], []
    for rnd in range(TRIALS // DEVICES):
        def one(i: int, d, rnd: int = rnd) -> None:
            nonlocal during_install
            cmd = [sys.executable, "-m", "edgeres", "deploy", str(v2), "--host", d.alias, "--iterations", "3",
                   *fleet.deploy_cli_args(), "--remote-python", str(slow_python(d.folder, DEVICE_DELAY_S))]
            p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            if (rnd + i) % 2:   # half the trials: a random moment while the device verifies
                deadline = time.monotonic() + 30
                while not lock_held(d.state) and time.monotonic() < deadline and p.poll() is None:
                    time.sleep(0.02)
                time.sleep(rng.uniform(0.0, 3.0))
            else:               # the other half: a random moment from the start (connect, prepare, copy, install)
                time.sleep(rng.uniform(0.2, 2.5))
            during_install += lock_held(d.state)
            assert p.poll() is None, "the controller ended before it was interrupted"
            os.kill(p.pid, sig)
            try:
                exits.append(p.wait(30))
            except subprocess.TimeoutExpired:   # an interrupt the controller did not act on: it went on deploying
                hung.append(d.alias)
                p.kill()
                p.wait()

        threads = [threading.Thread(target=one, args=(i, d)) for i, d in enumerate(fleet.devices)]
        [t.start() for t in threads]
        [t.join(90) for t in threads]
        activations += _check_round(fleet, v1_release)
    print(f"{signal.Signals(sig).name}: {len(exits)} trials, {activations} activations, {during_install} during the "
          f"device's verification, exit codes {sorted(set(exits))}")
    assert not hung, f"still running 30 s after {signal.Signals(sig).name}: {hung}"
    assert len(exits) == TRIALS and all(code != 0 for code in exits)
    assert activations == 0
    assert during_install >= TRIALS // 4, during_install   # a good share of the interruptions hit the verification


def test_a_normal_deploy_goes_through_afterwards(setup):
    """The next run cleans what the aborted ones left and goes live."""
    from edgeres.deploy.ssh import deploy

    fleet, _, v2, v1_release = setup
    out = deploy(v2, [d.alias for d in fleet.devices], iterations=3, host_timeout=120, **fleet.deploy_kwargs())
    assert all(r.ok for r in out), [r.message for r in out]
    for d in fleet.devices:
        assert current_release(d) == out[0].release != v1_release
        assert not [p for p in (d.root / "releases").iterdir() if p.name.endswith(".partial")]
