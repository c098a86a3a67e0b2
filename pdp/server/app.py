"""`pdp serve`: the agent gRPC API with health checks and reflection, stopped gracefully on a signal."""

from __future__ import annotations

import asyncio
import logging
import signal
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from pdp.config import Config
from pdp.policy.loader import load_bundle
from pdp.proposals.service import BundleHolder, ProposalService
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
    writer: GroupCommitWriter
    pool: ThreadPoolExecutor
    health: health.aio.HealthServicer

    async def stop(self, grace: float = 5.0) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        self.writer.close()
        self.pool.shutdown(wait=True)


async def start(config: Config) -> RunningServer:
    """Load the bundle, check the schema, bind, and start serving. Refuses with StartupError."""
    from pdp.policy.loader import BundleError

    try:
        bundle = load_bundle(config.policy_dir)
    except BundleError as exc:
        raise StartupError(f"policy bundle {config.policy_dir!r} does not load:\n{exc}") from exc
    reader = create_db_engine(config.database_url, pool_size=WORKER_THREADS)
    if not is_current(reader):
        raise StartupError("the database schema is not current: run `pdp db upgrade` first")
    writer_engine = create_db_engine(config.database_url, writer=True, pool_size=1)
    writer = GroupCommitWriter(writer_engine)
    pool = ThreadPoolExecutor(WORKER_THREADS, thread_name_prefix="pdp-io")
    service = ProposalService(reader, writer, BundleHolder(bundle), config.environment)

    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 1),
        ]
    )
    server.add_generic_rpc_handlers((generic_handler(PolicyDecisionPointService(service, pool)),))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )
    port = server.add_insecure_port(config.grpc_addr)
    if port == 0:
        raise StartupError(f"cannot listen on {config.grpc_addr}")
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("serving %s on %s with policy %s", SERVICE_NAME, config.grpc_addr, bundle.policy_version)
    return RunningServer(server, port, writer, pool, health_servicer)


async def serve(config: Config) -> None:
    running = await start(config)
    bundle_note = f"policy bundle {config.policy_dir}"
    print(
        f"pdp: agent gRPC API on {config.grpc_addr} ({bundle_note}, database {config.database_url})",
        flush=True,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    print("pdp: shutting down", flush=True)
    await running.stop()
