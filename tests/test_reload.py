"""Hot reload of the policy bundle (DESIGN §4 tooling): a new bundle goes live only if it loads, type-checks and
passes its own PolicyTests; otherwise the last good one keeps deciding. Every outcome is audited.

The reloader alone first (fast, no server), then through a real server: the watcher, reload under load, refusals,
and SIGHUP on `pdp serve` as a subprocess. Waits poll for the expected state with a generous deadline.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from conftest import POLICIES, TICKETS, Server, break_type, pdp_env, running_server, start_serve
from sqlalchemy import Engine, select

from pdp.client import PdpClient
from pdp.identity.agents import add_agent
from pdp.observability import metrics
from pdp.policy.bundle import ActiveBundle, PolicyBundle
from pdp.policy.loader import load_bundle
from pdp.policy.reload import BundleReloader, ReloadStatus
from pdp.store.database import create_db_engine
from pdp.store.models import audit_events
from pdp.v1 import pdp_pb2

T = TypeVar("T")

WHY = "hot reload test"
DEADLINE = 60.0  # generous: a reload is normally picked up within about two watcher intervals

# A rule that only fires for actions carrying `params.probe`, so it changes no existing PolicyTest's outcome:
# the bundle stays good, and a probe request shows which bundle decided it.
PROBE_RULE = """\
apiVersion: pdp/v1
kind: Rules
rules:
  - id: reload-probe
    description: Added by the hot reload tests.
    tools: [tickets]
    effect: deny
    when: 'has(action.params.probe)'
"""


# --- helpers ------------------------------------------------------------------------------------------


def copy_policies(tmp_path: Path) -> Path:
    bundle = tmp_path / "policies"
    shutil.copytree(POLICIES, bundle)
    return bundle


def add_probe_rule(bundle: Path) -> str:
    """Make a good change; returns the policy_version the changed bundle has."""
    (bundle / "rules" / "reload-probe.yaml").write_text(PROBE_RULE)
    return load_bundle(bundle).policy_version


FAILING_TEST = "support reads a ticket"


def break_test(bundle: Path) -> None:
    """Flip one PolicyTest's expected outcome: the bundle still loads, but its own test fails."""
    path = bundle / "tests" / "support.yaml"
    text = path.read_text()
    old = 'expect: {outcome: allow, rules: [tickets-read], boundary: "", tier: ai_writable}'
    assert text.count(old) == 1, "policies/tests/support.yaml changed: update this test's edit"
    path.write_text(text.replace(old, old.replace("outcome: allow", "outcome: deny")))


def wait_for(condition: Callable[[], T | None], what: str) -> T:
    deadline = time.monotonic() + DEADLINE
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"gave up after {DEADLINE:.0f}s waiting for {what}")
        time.sleep(0.1)


def policy_events(engine: Engine) -> list[dict[str, Any]]:
    """The bodies of the policy.* audit events, in chain order."""
    query = select(audit_events.c.body).where(audit_events.c.type.like("policy.%")).order_by(audit_events.c.seq)
    with engine.connect() as conn:
        return [json.loads(body) for body in conn.execute(query).scalars()]


def events_of(engine: Engine, kind: str) -> list[dict[str, Any]]:
    return [event for event in policy_events(engine) if event["type"] == kind]


def probe(client: PdpClient) -> pdp_pb2.Decision:
    return client.evaluate("tickets", "POST", TICKETS, WHY, params={"probe": 1})


def probe_until(client: PdpClient, done: Callable[[pdp_pb2.Decision], bool], what: str) -> pdp_pb2.Decision:
    """Probe until a decision satisfies ``done``; returns that decision."""
    decisions: list[pdp_pb2.Decision] = []

    def check() -> bool:
        decisions.append(probe(client))
        return done(decisions[-1])

    wait_for(check, what)
    return decisions[-1]


def counter(name: str) -> float:
    """A process-wide counter of the server's metrics (compare before and after, other tests count too)."""
    return metrics.PDP.get_sample_value(f"{name}_total") or 0.0


def admin_health(server: Server) -> dict[str, Any]:
    with urllib.request.urlopen(f"{server.admin_url}/healthz", timeout=10) as response:
        health: dict[str, Any] = json.load(response)
    return health


# --- the reloader on its own --------------------------------------------------------------------------


class Recorder:
    def __init__(self) -> None:
        self.activated: list[tuple[str, str, str]] = []
        self.refused: list[tuple[str, str]] = []

    def on_activated(self, previous: PolicyBundle, new: PolicyBundle, reason: str) -> None:
        self.activated.append((previous.policy_version, new.policy_version, reason))

    def on_refused(self, error: str, reason: str) -> None:
        self.refused.append((error, reason))


@pytest.fixture
def bundle_dir(tmp_path: Path) -> Path:
    return copy_policies(tmp_path)


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


def reloader_for(bundle: Path, recorder: Recorder) -> tuple[BundleReloader, ActiveBundle]:
    active = ActiveBundle(load_bundle(bundle))
    reloader = BundleReloader(
        bundle, active, on_activated=recorder.on_activated, on_refused=recorder.on_refused, interval=0.05
    )
    return reloader, active


def test_an_unchanged_bundle_is_not_reactivated(bundle_dir: Path, recorder: Recorder) -> None:
    reloader, active = reloader_for(bundle_dir, recorder)
    before = active.current

    result = reloader.reload("sighup")

    assert result.status is ReloadStatus.UNCHANGED
    assert active.current is before
    assert (reloader.activations, reloader.refusals, recorder.activated, recorder.refused) == (0, 0, [], [])


def test_a_good_bundle_is_activated(bundle_dir: Path, recorder: Recorder) -> None:
    reloader, active = reloader_for(bundle_dir, recorder)
    old = active.current.policy_version
    new = add_probe_rule(bundle_dir)

    result = reloader.reload("sighup")

    assert (result.status, result.previous_version, result.policy_version) == (ReloadStatus.ACTIVATED, old, new)
    assert active.current.policy_version == new
    assert any(rule.id == "reload-probe" for rule in active.current.rules)
    assert recorder.activated == [(old, new, "sighup")]
    assert (reloader.activations, reloader.refusals) == (1, 0)


def test_a_type_error_is_refused_with_file_and_line(bundle_dir: Path, recorder: Recorder) -> None:
    reloader, active = reloader_for(bundle_dir, recorder)
    before = active.current
    line = break_type(bundle_dir)

    result = reloader.reload("watch")

    assert result.status is ReloadStatus.REFUSED
    assert active.current is before
    assert f"rules/support.yaml:{line}:" in result.error and "resourse" in result.error
    assert recorder.refused == [(result.error, "watch")]
    assert (reloader.activations, reloader.refusals) == (0, 1)


def test_a_failing_policy_test_is_refused_with_file_and_line(bundle_dir: Path, recorder: Recorder) -> None:
    reloader, active = reloader_for(bundle_dir, recorder)
    before = active.current
    break_test(bundle_dir)
    # The broken bundle loads: only its own test stands between it and production.
    broken = load_bundle(bundle_dir)
    case = next(c for c in broken.tests if c.spec.name == FAILING_TEST)

    result = reloader.reload("watch")

    assert result.status is ReloadStatus.REFUSED
    assert active.current is before
    assert result.error == f"{case.location}: test {FAILING_TEST!r}: outcome: expected deny, got allow"
    assert case.location.file == "tests/support.yaml"
    assert reloader.refusals == 1


def test_a_refused_bundle_fixed_later_is_activated(bundle_dir: Path, recorder: Recorder) -> None:
    reloader, active = reloader_for(bundle_dir, recorder)
    original = (bundle_dir / "rules" / "support.yaml").read_text()
    break_type(bundle_dir)
    assert reloader.reload("sighup").status is ReloadStatus.REFUSED
    (bundle_dir / "rules" / "support.yaml").write_text(original)
    new = add_probe_rule(bundle_dir)

    assert reloader.reload("sighup").status is ReloadStatus.ACTIVATED
    assert active.current.policy_version == new


def test_fingerprint_sees_edits_and_new_files_but_not_hidden_directories(bundle_dir: Path, recorder: Recorder) -> None:
    reloader, _ = reloader_for(bundle_dir, recorder)
    first = reloader.fingerprint()
    assert first and all(not rel.startswith(".") for rel, *_ in first)

    (bundle_dir / ".github").mkdir()
    (bundle_dir / ".github" / "ci.yaml").write_text("on: push\n")
    assert reloader.fingerprint() == first

    (bundle_dir / "rules" / "reload-probe.yaml").write_text(PROBE_RULE)
    second = reloader.fingerprint()
    assert second != first

    support = bundle_dir / "rules" / "support.yaml"
    support.write_text(support.read_text() + "\n# a comment\n")
    assert reloader.fingerprint() != second


def test_concurrent_reloads_activate_once(bundle_dir: Path, recorder: Recorder) -> None:
    reloader, active = reloader_for(bundle_dir, recorder)
    new = add_probe_rule(bundle_dir)
    results: list[ReloadStatus] = []
    threads = [threading.Thread(target=lambda: results.append(reloader.reload("sighup").status)) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    # The lock serialises them: one activates, the others find that bundle already active.
    assert sorted(s.value for s in results) == ["activated", "unchanged", "unchanged", "unchanged"]
    assert active.current.policy_version == new
    assert reloader.activations == 1


def test_the_watcher_activates_a_changed_bundle(bundle_dir: Path, recorder: Recorder) -> None:
    reloader, active = reloader_for(bundle_dir, recorder)
    reloader.start()
    try:
        new = add_probe_rule(bundle_dir)
        wait_for(lambda: active.current.policy_version == new, "the watcher to activate the new bundle")
    finally:
        reloader.stop()
    assert recorder.activated[-1][1:] == (new, "watch")


# --- through a running server -------------------------------------------------------------------------


@pytest.fixture
def reload_server(database_url: str, tmp_path: Path) -> Iterator[tuple[Server, Path]]:
    """A server (PDP_POLICY_RELOAD=watch, the default) deciding with a copy of policies/ the test may edit."""
    bundle = copy_policies(tmp_path)
    with running_server(database_url, policy_dir=bundle) as server:
        yield server, bundle


def test_an_edited_bundle_is_picked_up_by_the_watcher(reload_server: tuple[Server, Path]) -> None:
    server, bundle = reload_server
    assert server.running is not None
    _, client = server.agent_client()
    before = probe(client)
    assert before.outcome == pdp_pb2.ALLOW  # tickets-create
    old = before.policy_version
    assert admin_health(server)["policy_version"] == old
    activations = counter("pdp_policy_reloads")

    new = add_probe_rule(bundle)
    after = probe_until(client, lambda d: d.outcome == pdp_pb2.DENY, "the probe rule to decide")

    assert after.policy_version == new
    assert "rule:reload-probe" in [r.rule_id for r in after.reasons]
    assert admin_health(server)["policy_version"] == new
    assert server.running.policy_version == new
    # Recorded before the swap, so it is there once the new bundle decides: no waiting for it.
    [event] = events_of(server.engine, "policy.activated")
    assert (event["actor"], event["policy_version"], event["proposal_id"], event["agent_id"]) == (
        "pdp",
        new,
        None,
        None,
    )
    assert event["data"] == {
        "previous_policy_version": old,
        "policy_version": new,
        "reason": "watch",
        "bundle_dir": str(bundle),
    }
    assert events_of(server.engine, "policy.refused") == []
    assert server.running.reloader is not None and server.running.reloader.activations == 1
    assert counter("pdp_policy_reloads") == activations + 1


def test_a_bundle_with_a_type_error_is_refused_and_the_old_one_keeps_deciding(
    reload_server: tuple[Server, Path],
) -> None:
    server, bundle = reload_server
    assert server.running is not None
    _, client = server.agent_client()
    old = probe(client).policy_version
    refusals = counter("pdp_policy_reload_failures")

    line = break_type(bundle)
    refused = wait_for(lambda: events_of(server.engine, "policy.refused"), "the refusal to be audited")

    assert len(refused) == 1
    event = refused[0]
    assert (event["actor"], event["policy_version"]) == ("pdp", old)
    assert event["data"]["reason"] == "watch"
    assert event["data"]["kept_policy_version"] == old
    assert event["data"]["bundle_dir"] == str(bundle)
    assert f"rules/support.yaml:{line}:" in event["data"]["error"]
    assert "resourse" in event["data"]["error"]
    # The old bundle still decides, its tickets-create rule included.
    decision = probe(client)
    assert (decision.outcome, decision.policy_version) == (pdp_pb2.ALLOW, old)
    assert [r.rule_id for r in decision.reasons] == ["rule:tickets-create"]
    assert admin_health(server)["policy_version"] == old
    assert events_of(server.engine, "policy.activated") == []
    assert server.running.reloader is not None and server.running.reloader.refusals == 1
    assert counter("pdp_policy_reload_failures") == refusals + 1


@pytest.mark.backend("sqlite")
def test_a_bundle_whose_own_test_fails_is_refused(reload_server: tuple[Server, Path]) -> None:
    server, bundle = reload_server
    _, client = server.agent_client()
    old = probe(client).policy_version

    break_test(bundle)
    refused = wait_for(lambda: events_of(server.engine, "policy.refused"), "the refusal to be audited")

    error = refused[0]["data"]["error"]
    assert f"test {FAILING_TEST!r}: outcome: expected deny, got allow" in error
    assert error.startswith("tests/support.yaml:")
    assert refused[0]["data"]["kept_policy_version"] == old
    assert probe(client).policy_version == old
    assert admin_health(server)["policy_version"] == old


@pytest.mark.backend("sqlite")
def test_a_reload_under_load_drops_no_request(reload_server: tuple[Server, Path]) -> None:
    server, bundle = reload_server
    assert server.running is not None and server.running.reloader is not None
    old = server.running.policy_version
    new_version: list[str] = []
    stop = threading.Event()
    answered: dict[int, list[str]] = {}  # per sender, the policy_version of each answer, in order
    errors: list[BaseException] = []

    def send(number: int, client: PdpClient) -> None:
        versions = answered.setdefault(number, [])
        while not stop.is_set():
            try:
                response = client.propose("tickets", "POST", TICKETS, WHY, params={"title": f"load {number}"})
            except BaseException as exc:  # every failure is a dropped request
                errors.append(exc)
                return
            if response.decision.outcome != pdp_pb2.ALLOW:
                errors.append(AssertionError(f"unexpected decision {response.decision}"))
                return
            versions.append(response.decision.policy_version)

    def count(version: str) -> int:
        return sum(v == version for versions in list(answered.values()) for v in list(versions))

    senders = [threading.Thread(target=send, args=(n, server.agent_client()[1]), name=f"sender-{n}") for n in range(4)]
    for sender in senders:
        sender.start()
    try:
        wait_for(lambda: count(old) >= 40 or errors, "proposals decided by the old bundle")
        new_version.append(add_probe_rule(bundle))
        # Reload in the middle of the stream (the watcher may get there first; then this finds it active).
        server.running.reloader.reload("test")
        assert server.running.policy_version == new_version[0]
        wait_for(lambda: count(new_version[0]) >= 40 or errors, "proposals decided by the new bundle")
    finally:
        stop.set()
        for sender in senders:
            sender.join(timeout=DEADLINE)

    assert errors == []
    for versions in answered.values():
        # Each sender's calls are sequential: once one was decided by the new bundle, all later ones are too.
        switch = versions.index(new_version[0]) if new_version[0] in versions else len(versions)
        assert set(versions[:switch]) <= {old} and set(versions[switch:]) <= {new_version[0]}
    assert len(events_of(server.engine, "policy.activated")) == 1


# --- SIGHUP on `pdp serve` ----------------------------------------------------------------------------


@pytest.mark.backend("sqlite")
def test_sighup_reloads_and_refuses(database_url: str, tmp_path: Path) -> None:
    bundle = copy_policies(tmp_path)
    env = pdp_env(tmp_path) | {"PDP_POLICY_RELOAD": "sighup"}
    engine = create_db_engine(database_url)
    token = add_agent(engine, "sighup-agent", "tester", ("support",))
    serve = start_serve(database_url, tmp_path, env, policy_dir=bundle)
    try:
        with PdpClient(serve.address, token) as client:
            old = probe(client).policy_version
            original = (bundle / "rules" / "support.yaml").read_text()

            # A broken bundle and SIGHUP: refused, audited, and the process keeps serving the old bundle.
            line = break_type(bundle)
            os.kill(serve.process.pid, signal.SIGHUP)
            refused = wait_for(lambda: events_of(engine, "policy.refused"), "the SIGHUP refusal to be audited")
            assert refused[0]["data"]["reason"] == "sighup"
            assert f"rules/support.yaml:{line}:" in refused[0]["data"]["error"]
            assert serve.process.poll() is None
            assert probe(client).policy_version == old
            assert f"rules/support.yaml:{line}:" in serve.stderr.read_text()  # logged with file and line

            # A good bundle: not watched in sighup mode, so it waits for the signal. Three watcher intervals
            # (1 s each) would have been enough for `watch` to pick it up.
            (bundle / "rules" / "support.yaml").write_text(original)
            new = add_probe_rule(bundle)
            time.sleep(3.0)
            unchanged = probe(client)
            assert (unchanged.outcome, unchanged.policy_version) == (pdp_pb2.ALLOW, old)
            assert events_of(engine, "policy.activated") == []

            os.kill(serve.process.pid, signal.SIGHUP)
            after = probe_until(client, lambda d: d.policy_version == new, "SIGHUP to activate the new bundle")
            assert after.outcome == pdp_pb2.DENY
            activated = events_of(engine, "policy.activated")
            assert [(e["data"]["reason"], e["data"]["policy_version"]) for e in activated] == [("sighup", new)]
    finally:
        code = serve.stop()
        engine.dispose()
    assert code == 0, serve.output()
