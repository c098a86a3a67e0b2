"""`pdp serve`: the agent gRPC API with health checks and reflection, stopped gracefully on a signal."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import signal
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import grpc
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from pdp.admin.app import create_app
from pdp.admin.server import AdminServer, bind
from pdp.approvals.notify import WebhookNotifier
from pdp.approvals.service import ApprovalService
from pdp.audit.chain import Event, append, chain_writer
from pdp.audit.checkpointer import Checkpointer
from pdp.audit.keys import KeyFileError, load_private
from pdp.config import Config
from pdp.execution.circuits import CircuitBoard
from pdp.governance.store import prune as prune_counters
from pdp.observability import logs, metrics, tracing
from pdp.observability.collectors import PdpState
from pdp.policy.bundle import ActiveBundle, PolicyBundle
from pdp.policy.duration import parse_duration
from pdp.policy.loader import BundleError, load_bundle
from pdp.policy.reload import BundleReloader
from pdp.policy.testing import failing_tests
from pdp.proposals.service import ProposalService, utc_now
from pdp.server.grpc_api import SERVICE_NAME, PolicyDecisionPointService, generic_handler
from pdp.store.database import create_db_engine
from pdp.store.migrate import is_current
from pdp.store.writer import GroupCommitWriter

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 1024 * 1024
WORKER_THREADS = 8


class StartupError(Exception):
    """The service refuses to start; the message says why and what to do."""


@dataclass
class RunningServer:
    server: grpc.aio.Server
    port: int
    api: PolicyDecisionPointService
    writer: GroupCommitWriter
    pool: ThreadPoolExecutor
    health: health.aio.HealthServicer
    checkpointer: Checkpointer
    circuits: CircuitBoard
    bundles: ActiveBundle
    approvals: ApprovalService
    admin: AdminServer
    sweeper: asyncio.Task[None]
    notifier: WebhookNotifier | None
    reloader: BundleReloader | None = None  # None when PDP_POLICY_RELOAD=off

    @property
    def policy_version(self) -> str:
        """The active bundle's version: it changes when hot reload activates a new bundle."""
        return self.bundles.current.policy_version

    async def stop(self, grace: float = 5.0) -> None:
        """NOT_SERVING, end watch streams, let in-flight calls finish, sign the head, commit queued writes."""
        await self.health.enter_graceful_shutdown()
        self.api.stopping.set()
        self.sweeper.cancel()
        if self.reloader is not None:
            # Before the writer closes: a reload in progress still audits its outcome. Off the loop: it may block.
            await asyncio.to_thread(self.reloader.stop)
        await asyncio.gather(self.server.stop(grace), self.admin.stop())
        await self.checkpointer.stop()
        self.circuits.stop()
        self.writer.close()
        if self.notifier is not None:
            self.notifier.close()
        self.pool.shutdown(wait=True)


def _bind(server: grpc.aio.Server, address: str) -> int:
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as exc:  # grpcio raises when the address is taken or invalid
        raise StartupError(f"cannot listen on {address}: {exc}") from exc
    if port == 0:
        raise StartupError(f"cannot listen on {address}")
    return port


async def start(config: Config) -> RunningServer:
    """Load the bundle, check the schema, bind, and start serving. Refuses with StartupError."""
    try:
        bundle = load_bundle(config.policy_dir)
    except BundleError as exc:
        raise StartupError(f"policy bundle {config.policy_dir!r} does not load:\n{exc}") from exc
    failures = failing_tests(bundle)  # the same bar hot reload sets: a bundle must pass its own tests
    if failures:
        raise StartupError(f"policy bundle {config.policy_dir!r} fails its own tests:\n" + "\n".join(failures))
    try:
        key = load_private(Path(config.signing_key))
        every, interval = int(config.checkpoint_every), float(config.checkpoint_interval)
    except KeyFileError as exc:
        raise StartupError(str(exc)) from exc
    except ValueError as exc:
        raise StartupError(f"checkpoint settings must be numbers: {exc}") from exc
    if every < 1 or not 0 < interval <= 86400:
        raise StartupError(
            "checkpoint_every must be at least 1 and checkpoint_interval between 0 and 86400 seconds "
            f"(got {config.checkpoint_every!r} and {config.checkpoint_interval!r})"
        )
    try:
        ticket_ttl = parse_duration(config.ticket_ttl)
    except ValueError as exc:
        raise StartupError(f"ticket_ttl: {exc}") from exc
    max_pending = _positive(config.max_pending_per_agent)
    if max_pending is None:
        raise StartupError(
            f"max_pending_per_agent must be a whole number of at least 1, not {config.max_pending_per_agent!r}"
        )
    if config.policy_reload not in RELOAD_MODES:
        raise StartupError(f"policy_reload must be one of {', '.join(RELOAD_MODES)}, not {config.policy_reload!r}")
    # Once per process (a later call only adds a new endpoint); spans exist, for log lines, even when not exported.
    tracing.configure(endpoint=config.otlp_endpoint)
    reader = create_db_engine(config.database_url, pool_size=WORKER_THREADS)
    try:
        current = is_current(reader)
    except SQLAlchemyError as exc:
        reader.dispose()
        raise StartupError(f"cannot reach the database {reader.url!r}: {exc.__class__.__name__}") from exc
    if not current:
        reader.dispose()
        raise StartupError("the database schema is not current: run `pdp db upgrade` first")

    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            # Off: a second `pdp serve` on a taken port must fail, not silently share its traffic.
            ("grpc.so_reuseport", 0),
        ]
    )
    try:
        port = _bind(server, config.grpc_addr)
    except StartupError:
        reader.dispose()
        raise
    try:
        admin_socket = bind(config.admin_addr)
    except (OSError, ValueError) as exc:
        reader.dispose()
        raise StartupError(f"cannot listen on {config.admin_addr} (admin endpoint): {exc}") from exc
    admin_url = config.admin_url or f"http://{config.admin_addr.rsplit(':', 1)[0]}:{admin_socket.getsockname()[1]}"
    try:
        urls = [u.strip() for u in config.approval_webhooks.split(",") if u.strip()]
        notifier = WebhookNotifier(urls, admin_url) if urls else None
    except ValueError as exc:
        admin_socket.close()
        reader.dispose()
        raise StartupError(str(exc)) from exc
    writer = chain_writer(create_db_engine(config.database_url, writer=True, pool_size=1))
    pool = ThreadPoolExecutor(WORKER_THREADS, thread_name_prefix="pdp-io")
    circuits = CircuitBoard(reader)
    circuits.start()
    bundles = ActiveBundle(bundle)
    reloader = _reloader(config, bundles, writer)
    service = ProposalService(
        reader,
        writer,
        bundles,
        config.environment,
        key,
        ticket_ttl=ticket_ttl,
        circuits=circuits,
        notifier=notifier,
        max_pending=max_pending,
    )
    api = PolicyDecisionPointService(service, pool)
    server.add_generic_rpc_handlers((generic_handler(api),))
    approvals = ApprovalService(
        reader, writer, bundles, key, environment=config.environment, ticket_ttl=ticket_ttl, clock=utc_now
    )

    def admin_health() -> dict[str, object]:
        return {
            "status": "stopping" if api.stopping.is_set() else "serving",
            "policy_version": bundles.current.policy_version,
        }

    # Counters are process-wide; the gauges of this server's database and bundle are computed per scrape.
    registry = metrics.registry(metrics.PDP, [PdpState(reader, bundles)])
    admin_app = create_app(approvals, session_key=session_key(key), health=admin_health, metrics=registry)
    admin = AdminServer(admin_app, admin_socket)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )
    checkpointer = Checkpointer(
        reader, writer, key, Path(config.checkpoint_file), every=every, interval=interval, clock=utc_now
    )
    await server.start()
    await admin.start()
    checkpointer.start()
    if reloader is not None and config.policy_reload == "watch":
        reloader.start()
    sweeper = asyncio.create_task(_sweep(approvals, pool, writer, bundles))
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return RunningServer(
        server,
        port,
        api,
        writer,
        pool,
        health_servicer,
        checkpointer,
        circuits,
        bundles,
        approvals,
        admin,
        sweeper,
        notifier,
        reloader,
    )


RELOAD_MODES = ("watch", "sighup", "off")


def _positive(value: str) -> int | None:
    text = value.strip()
    return int(text) if text.isascii() and text.isdigit() and int(text) >= 1 else None


def _reloader(config: Config, bundles: ActiveBundle, writer: GroupCommitWriter) -> BundleReloader | None:
    """Hot reload of the bundle, each outcome audited (actor ``pdp``) through the group-commit writer."""
    if config.policy_reload == "off":
        return None
    directory = str(config.policy_dir)

    def record(event: Event) -> None:
        # Waits for the commit: an activation is recorded before the first decision the new bundle makes.
        writer.submit(lambda conn: append(conn, event)).result()

    def activated(previous: PolicyBundle, new: PolicyBundle, reason: str) -> None:
        data = {
            "previous_policy_version": previous.policy_version,
            "policy_version": new.policy_version,
            "reason": reason,
            "bundle_dir": directory,
        }
        record(Event("policy.activated", "pdp", utc_now(), policy_version=new.policy_version, data=data))
        metrics.reload_activated()  # once recorded, the swap follows: it cannot fail

    def refused(error: str, reason: str) -> None:
        metrics.reload_failed()  # first: counted even when the database cannot take the event
        kept = bundles.current.policy_version
        data = {"reason": reason, "error": error, "kept_policy_version": kept, "bundle_dir": directory}
        record(Event("policy.refused", "pdp", utc_now(), policy_version=kept, data=data))

    return BundleReloader(directory, bundles, on_activated=activated, on_refused=refused)


def _reload_on_sighup(running: RunningServer) -> None:
    """SIGHUP's handler, on the event loop: the reload (loading, testing, auditing) runs on the pool."""
    reloader = running.reloader
    if reloader is None:
        log.warning("SIGHUP ignored: policy hot reload is off (PDP_POLICY_RELOAD=off)")
        return

    def reload() -> None:
        try:
            reloader.reload("sighup")
        except Exception:  # nobody awaits this: log here, or the failure would vanish
            log.exception("reloading the policy bundle on SIGHUP failed")

    asyncio.get_running_loop().run_in_executor(running.pool, reload)


SWEEP_SECONDS = 1.0


PRUNE_EVERY = 600  # sweeps, i.e. about every ten minutes


async def _sweep(
    approvals: ApprovalService, pool: ThreadPoolExecutor, writer: GroupCommitWriter, bundles: ActiveBundle
) -> None:
    """Expire pending proposals past their deadline (reads and votes also check, so this only bounds the lag),
    and now and then forget limit-counter windows no active limit can still read."""
    loop = asyncio.get_running_loop()
    sweeps = 0
    while True:
        await asyncio.sleep(SWEEP_SECONDS)
        sweeps += 1
        try:
            await loop.run_in_executor(pool, approvals.expire_due)
            if sweeps % PRUNE_EVERY == 0:
                keep = max((limit.window for limit in bundles.current.limits), default=timedelta(0))
                before = utc_now() - max(keep, timedelta(days=1)) - timedelta(days=1)
                await asyncio.wrap_future(writer.submit(functools.partial(prune_counters, before=before)))
        except Exception:
            log.exception("the sweeper failed; retrying")


def session_key(key: Ed25519PrivateKey) -> bytes:
    """The admin session-cookie key, derived from the signing key so every replica accepts every session."""
    raw = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    return hashlib.sha256(b"agent-pdp/admin-session/v1\n" + raw).digest()


async def serve(config: Config) -> None:
    if config.log_format not in logs.FORMATS:
        raise StartupError(f"log_format must be one of {', '.join(logs.FORMATS)}, not {config.log_format!r}")
    logs.configure(json=config.log_format == "json")
    running = await start(config)
    host = config.grpc_addr.rsplit(":", 1)[0]
    admin_host = config.admin_addr.rsplit(":", 1)[0]
    print(
        f"pdp: agent gRPC API on {host}:{running.port}, admin endpoint on http://{admin_host}:{running.admin.port}/, "
        f"policy {config.policy_dir} ({running.policy_version}), "
        f"database {make_url(config.database_url).render_as_string(hide_password=True)}",
        flush=True,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    # Installed even when reload is off: SIGHUP's default action would end the process.
    loop.add_signal_handler(signal.SIGHUP, _reload_on_sighup, running)
    await stop.wait()
    print("pdp: shutting down", flush=True)
    await running.stop()
