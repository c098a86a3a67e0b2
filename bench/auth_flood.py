"""Failed authentications must cost other agents nothing: ``python -m bench.auth_flood [--duration S]``.

Builds what bench.load builds (a fresh database, a support agent, ``pdp serve`` as a subprocess), then
measures one good agent's Propose latency at concurrency 1 (PdpClient, the realistic mix) three times:

1. alone;
2. while ``--flooders`` client processes send Propose with bad bearer tokens (random, well formed, each one new,
   so no cache can answer for it) as fast as ``--concurrency`` loops each can (grpc.aio);
3. while the same processes send ``GET /api/v1/proposals`` with bad approver tokens to the admin endpoint
   (``--concurrency`` keep-alive connections each).

Prints the good agent's p50/p90/p99, the flood's rate and answers, and the server's CPU. Asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import secrets
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import grpc
from sqlalchemy.engine import URL

from bench import sysinfo
from bench.load import (
    POLICY_DIR,
    Server,
    _pdp,
    _requests,
    create_postgres_database,
    drop_postgres_database,
    percentile,
)
from bench.sysinfo import process_cpu
from pdp.client import PdpClient, PdpClientError
from pdp.store.database import is_sqlite, normalize_url
from pdp.v1 import pdp_pb2_grpc


@dataclass(frozen=True, slots=True)
class FloodSpec:
    kind: str  # grpc | admin
    target: str  # host:port
    concurrency: int
    end_at: float  # time.time()
    deadline: float  # seconds the flooder waits for each answer before giving up and sending the next


def _bad_token() -> str:
    return "pdp_" + secrets.token_urlsafe(32)


async def _grpc_flood(spec: FloodSpec) -> Counter[str]:
    answers: Counter[str] = Counter()
    request = PdpClient.request("tickets", "GET", "http://127.0.0.1:8282/api/tickets/1", "flood")
    async with grpc.aio.insecure_channel(spec.target) as channel:
        stub = pdp_pb2_grpc.PolicyDecisionPointStub(channel)
        await asyncio.wait_for(channel.channel_ready(), 30)

        async def loop() -> None:
            while time.time() < spec.end_at:
                try:
                    metadata = (("authorization", f"Bearer {_bad_token()}"),)
                    await stub.Propose(request, metadata=metadata, timeout=spec.deadline)
                    answers["OK"] += 1
                except grpc.aio.AioRpcError as exc:
                    answers[exc.code().name] += 1

        await asyncio.gather(*(loop() for _ in range(spec.concurrency)))
    return answers


def _admin_flood(spec: FloodSpec) -> Counter[str]:
    answers: Counter[str] = Counter()
    lock = threading.Lock()
    host, _, port = spec.target.rpartition(":")

    def loop() -> None:
        conn = http.client.HTTPConnection(host, int(port), timeout=spec.deadline)
        while time.time() < spec.end_at:
            try:
                conn.request("GET", "/api/v1/proposals", headers={"authorization": f"Bearer {_bad_token()}"})
                response = conn.getresponse()
                response.read()
                status = str(response.status)
            except OSError as exc:
                status = exc.__class__.__name__
                conn.close()
                conn = http.client.HTTPConnection(host, int(port), timeout=spec.deadline)
            with lock:
                answers[status] += 1
        conn.close()

    threads = [threading.Thread(target=loop) for _ in range(spec.concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return answers


def run_flood(spec: FloodSpec) -> Counter[str]:
    """Entry point of a flooding process."""
    if spec.kind == "grpc":
        return asyncio.run(_grpc_flood(spec))
    return _admin_flood(spec)


def good_agent(target: str, token: str, duration: float) -> list[float]:
    """Latencies (s) of one agent's Propose calls, one at a time, for ``duration`` seconds."""
    requests = [request for role, request in _requests(seed=7) if role == "support"]
    latencies: list[float] = []
    with PdpClient(target, token, timeout=30) as client:
        for request in requests[:20]:
            client.send(request)
        deadline = time.perf_counter() + duration
        i = 0
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            try:
                client.send(requests[i % len(requests)])
            except PdpClientError as exc:
                print(f"  good agent error: {exc.code.name}: {exc.details}")
            latencies.append(time.perf_counter() - started)
            i += 1
    return latencies


def report(name: str, latencies: list[float], floods: Counter[str], seconds: float, cpu: float) -> None:
    ordered = sorted(latencies)
    ms = [percentile(ordered, p) * 1000 for p in (50, 90, 99)]
    flood = sum(floods.values())
    answers = ", ".join(f"{code} {n}" for code, n in floods.most_common()) or "-"
    print(
        f"{name:<28} good agent: {len(ordered):>5} proposals, p50 {ms[0]:6.1f} ms, p90 {ms[1]:6.1f} ms, "
        f"p99 {ms[2]:6.1f} ms | flood {flood / seconds:7.0f}/s ({answers}) | server CPU {cpu / seconds:.2f} cores"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.auth_flood", description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per phase (10)")
    parser.add_argument("--flooders", type=int, default=2, help="flooding client processes (2)")
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight per flooder (16)")
    parser.add_argument(
        "--deadline", type=float, default=30.0, help="seconds a flooder waits for an answer before sending anew (30)"
    )
    parser.add_argument("--database-url", help="PostgreSQL URL (DROPPED and re-created); default a fresh SQLite")
    args = parser.parse_args(argv)

    print("agent-pdp: a bad-token flood against one good agent's latency")
    print(sysinfo.background_load())
    workdir = Path(tempfile.mkdtemp(prefix="pdp-bench-flood-"))
    postgres_url: URL | None = None
    server: Server | None = None
    try:
        if args.database_url and not is_sqlite(args.database_url):
            postgres_url = normalize_url(args.database_url)
            database_url = postgres_url.render_as_string(hide_password=False)
            create_postgres_database(postgres_url)
        else:
            database_url = args.database_url or f"sqlite:///{workdir / 'bench.db'}"
        _pdp("db", "upgrade", "--database-url", database_url, cwd=workdir)
        _pdp("keys", "init", cwd=workdir)
        out = _pdp("agents", "add", "good-agent", "--owner", "alice", "--roles", "support",
                   "--database-url", database_url, cwd=workdir)  # fmt: skip
        token = out.strip().splitlines()[-1]
        server = Server(database_url, workdir)
        server.wait_serving()
        admin = _admin_target(server)
        print(f"pdp serve pid {server.proc.pid}: gRPC {server.target}, admin {admin}; policy {POLICY_DIR.name}")
        pool = ProcessPoolExecutor(args.flooders, mp_context=get_context("spawn"))
        try:
            for name, kind in (("alone", ""), ("gRPC bad-token flood", "grpc"), ("admin bad-token flood", "admin")):
                end_at = time.time() + args.duration + 1.0
                futures: list[Future[Counter[str]]] = []
                if kind:
                    address = server.target if kind == "grpc" else admin
                    spec = FloodSpec(kind, address, args.concurrency, end_at, args.deadline)
                    futures = [pool.submit(run_flood, spec) for _ in range(args.flooders)]
                    time.sleep(1.0)  # the flood is under way before the measurement starts
                cpu0, wall0 = process_cpu(server.proc.pid), time.perf_counter()
                latencies = good_agent(server.target, token, args.duration)
                cpu, wall = process_cpu(server.proc.pid) - cpu0, time.perf_counter() - wall0
                floods: Counter[str] = Counter()
                for future in futures:
                    floods.update(future.result())
                # The flood ran from 1 s before the measurement to its end: rate over its whole run.
                report(name, latencies, floods, wall + 1.0 if kind else wall, cpu)
        finally:
            pool.shutdown()
    finally:
        if server is not None:
            server.stop()
        if postgres_url is not None:
            drop_postgres_database(postgres_url)
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def _admin_target(server: Server) -> str:
    """The admin address ``pdp serve`` printed on its first line."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for line in server.log_tail(50).splitlines():
            if "admin endpoint on http://" in line:
                return line.split("admin endpoint on http://", 1)[1].split("/", 1)[0]
        time.sleep(0.1)
    raise SystemExit("pdp serve did not print its admin address")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
