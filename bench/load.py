"""End-to-end load benchmark: ``python -m bench.load [--duration S] [--processes P] [--concurrency C]``.

Sets up its own world in a temp directory: a fresh database (SQLite by default, with the server's durable
settings, WAL + synchronous=FULL; or ``--database-url`` for PostgreSQL, a database this benchmark creates
and drops), migrated with ``pdp db upgrade``, two agents (``pdp agents add``: a support and an ops agent),
and ``pdp serve`` as a subprocess on a free port. Then two phases of Propose calls with the realistic mix
(bench/mix.py), each from client *processes* (Python gRPC clients are CPU bound too):

1. concurrency 1: one client process sending one proposal at a time through ``pdp.client.PdpClient``;
2. saturation: ``--processes`` client processes x ``--concurrency`` proposals in flight each (grpc.aio).

Each phase reports throughput, latency percentiles, the outcome mix, errors, and CPU: the server process's
(from /proc/<pid>/stat), the clients', and the whole machine's, per proposal. Prints numbers; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL

from bench import sysinfo
from bench.mix import AGENTS, sample
from bench.sysinfo import MachineCpu, process_cpu
from pdp.client import PdpClient, PdpClientError
from pdp.store.database import create_db_engine, is_sqlite, normalize_url
from pdp.v1 import pdp_pb2, pdp_pb2_grpc

REPO = Path(__file__).resolve().parent.parent
POLICY_DIR = REPO / "policies"
TARGET_SATURATION = 800.0  # proposals/s on SQLite
TARGET_P50_MS = 3.0  # at concurrency 1
CLK_TCK = os.sysconf("SC_CLK_TCK")
REQUESTS_PER_WORKER = 1000  # distinct proposals each client process cycles through


def process_write_bytes(pid: int) -> int | None:
    """Bytes the process caused to be written to storage (/proc/<pid>/io), if readable."""
    try:
        for line in Path(f"/proc/{pid}/io").read_text().splitlines():
            if line.startswith("write_bytes:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


# --- client processes ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    target: str
    tokens: dict[str, str]  # role -> bearer token
    concurrency: int
    start_at: float  # time.time(): every process starts and stops together
    end_at: float
    seed: int
    sync: bool  # PdpClient (blocking) instead of grpc.aio
    timeout: float


@dataclass(slots=True)
class WorkerResult:
    latencies: list[float] = field(default_factory=list)  # seconds, completed requests only
    outcomes: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    error_samples: list[str] = field(default_factory=list)
    cpu: float = 0.0  # this process's CPU seconds within the timed window
    warmup_errors: int = 0

    def error(self, code: str, details: str) -> None:
        self.errors[code] += 1
        if len(self.error_samples) < 3:
            self.error_samples.append(f"{code}: {details}")


def _requests(seed: int) -> list[tuple[str, pdp_pb2.ProposeRequest]]:
    out: list[tuple[str, pdp_pb2.ProposeRequest]] = []
    for proposal in sample(REQUESTS_PER_WORKER, seed=seed):
        item = proposal.item
        request = PdpClient.request(
            item.tool,
            item.operation,
            proposal.resource,
            f"load benchmark: {item.name}",
            params=proposal.params,
            estimated_cost_usd=item.cost,
            session_id=f"bench-{seed}",
        )
        out.append((item.role, request))
    return out


def _outcome(response: pdp_pb2.ProposeResponse) -> str:
    return pdp_pb2.Outcome.Name(response.decision.outcome)


def _until(wall_time: float) -> float:
    """A perf_counter() deadline for a time.time() instant."""
    return time.perf_counter() + (wall_time - time.time())


def _run_sync(spec: WorkerSpec) -> WorkerResult:
    """One agent, one proposal at a time, through the client library agents use."""
    result = WorkerResult()
    requests = _requests(spec.seed)
    clients = {role: PdpClient(spec.target, token, timeout=spec.timeout) for role, token in spec.tokens.items()}
    try:
        for role, request in requests[:20]:  # connect and warm up
            try:
                clients[role].send(request)
            except PdpClientError:
                result.warmup_errors += 1
        time.sleep(max(0.0, spec.start_at - time.time()))
        deadline = _until(spec.end_at)
        cpu0 = time.process_time()
        i = 0
        while time.perf_counter() < deadline:
            role, request = requests[i % len(requests)]
            i += 1
            started = time.perf_counter()
            try:
                response = clients[role].send(request)
            except PdpClientError as exc:
                result.error(exc.code.name, exc.details)
                continue
            result.latencies.append(time.perf_counter() - started)
            result.outcomes[_outcome(response)] += 1
        result.cpu = time.process_time() - cpu0
    finally:
        for client in clients.values():
            client.close()
    return result


async def _run_aio(spec: WorkerSpec) -> WorkerResult:
    """``concurrency`` closed loops on one channel, each sending its next proposal when the last returns."""
    result = WorkerResult()
    requests = _requests(spec.seed)
    metadata_by_role = {role: (("authorization", f"Bearer {token}"),) for role, token in spec.tokens.items()}
    async with grpc.aio.insecure_channel(spec.target) as channel:
        # On an aio channel the stub is typed PolicyDecisionPointAsyncStub (the class exists only in the .pyi).
        stub = pdp_pb2_grpc.PolicyDecisionPointStub(channel)
        await asyncio.wait_for(channel.channel_ready(), 30)
        for role, request in requests[:10]:
            try:
                await stub.Propose(request, metadata=metadata_by_role[role], timeout=spec.timeout)
            except grpc.aio.AioRpcError:
                result.warmup_errors += 1
        await asyncio.sleep(max(0.0, spec.start_at - time.time()))
        deadline = _until(spec.end_at)

        async def loop(k: int) -> None:
            i = k
            while time.perf_counter() < deadline:
                role, request = requests[i % len(requests)]
                i += spec.concurrency
                started = time.perf_counter()
                try:
                    response = await stub.Propose(request, metadata=metadata_by_role[role], timeout=spec.timeout)
                except grpc.aio.AioRpcError as exc:
                    result.error(exc.code().name, exc.details() or "")
                    continue
                result.latencies.append(time.perf_counter() - started)
                result.outcomes[_outcome(response)] += 1

        cpu0 = time.process_time()
        await asyncio.gather(*(loop(k) for k in range(spec.concurrency)))
        result.cpu = time.process_time() - cpu0
    return result


def run_worker(spec: WorkerSpec) -> WorkerResult:
    """Entry point of a client process."""
    if spec.sync:
        return _run_sync(spec)
    return asyncio.run(_run_aio(spec))


# --- the environment: database, agents, server --------------------------------------------------------


def _pdp(*args: str, cwd: Path) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "pdp.cli.main", *args], cwd=cwd, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise SystemExit(f"pdp {' '.join(args[:2])} failed ({done.returncode}):\n{done.stdout}{done.stderr}")
    return done.stdout


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _postgres_admin_url(url: URL) -> tuple[URL, str]:
    name = url.database or ""
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,62}", name):
        raise SystemExit(f"--database-url: database name {name!r} must be a plain identifier")
    return url.set(database="postgres"), name


def create_postgres_database(url: URL) -> None:
    admin_url, name = _postgres_admin_url(url)
    engine = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    finally:
        engine.dispose()


def drop_postgres_database(url: URL) -> None:
    admin_url, name = _postgres_admin_url(url)
    engine = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        engine.dispose()


def describe_database(url: str, directory: Path) -> str:
    """What durability the server's own engine factory configures (pdp/store/database.py)."""
    engine = create_db_engine(url, pool_size=1)
    try:
        with engine.connect() as conn:
            if is_sqlite(url):
                journal = conn.exec_driver_sql("PRAGMA journal_mode").scalar()
                synchronous = conn.exec_driver_sql("PRAGMA synchronous").scalar()
                names = {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}
                fs = "?"
                with contextlib.suppress(OSError):
                    fs = subprocess.run(
                        ["stat", "-f", "-c", "%T", str(directory)], capture_output=True, text=True, check=False
                    ).stdout.strip()
                return (
                    f"SQLite file in {directory} (filesystem {fs}); journal_mode={journal}, "
                    f"synchronous={names.get(int(synchronous or 0), synchronous)}"
                )
            version = conn.exec_driver_sql("SHOW server_version").scalar()
            sync_commit = conn.exec_driver_sql("SHOW synchronous_commit").scalar()
            fsync = conn.exec_driver_sql("SHOW fsync").scalar()
            host = make_safe(url)
            return f"PostgreSQL {version} at {host}; synchronous_commit={sync_commit}, fsync={fsync}"
    finally:
        engine.dispose()


def make_safe(url: str) -> str:
    return normalize_url(url).render_as_string(hide_password=True)


class Server:
    """``pdp serve`` in a subprocess; stopped with SIGTERM (then SIGKILL) by its own pid."""

    def __init__(self, database_url: str, workdir: Path) -> None:
        self.port = _free_port()
        self.target = f"127.0.0.1:{self.port}"
        self.log_path = workdir / "server.log"
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen(
            [
                sys.executable, "-m", "pdp.cli.main", "serve",
                "--database-url", database_url,
                "--grpc-addr", self.target,
                "--admin-addr", f"127.0.0.1:{_free_port()}",
                "--policy-dir", str(POLICY_DIR),
                "--environment", "dev",
            ],
            cwd=workdir,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip

    def wait_serving(self, timeout: float = 60.0) -> float:
        started = time.perf_counter()
        deadline = started + timeout
        with grpc.insecure_channel(self.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.perf_counter() < deadline:
                if self.proc.poll() is not None:
                    raise SystemExit(f"pdp serve exited with {self.proc.returncode}:\n{self.log_tail()}")
                try:
                    status = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0).status
                    if status == health_pb2.HealthCheckResponse.SERVING:
                        return time.perf_counter() - started
                except grpc.RpcError:
                    pass
                time.sleep(0.1)
        raise SystemExit(f"pdp serve did not report SERVING within {timeout:g} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        if not self._log.closed:
            self._log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log.close()
        return self.proc.returncode


# --- phases -------------------------------------------------------------------------------------------


def percentile(ordered: Sequence[float], p: float) -> float:
    index = min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))
    return ordered[index]


def run_phase(
    title: str,
    server: Server,
    tokens: dict[str, str],
    *,
    processes: int,
    concurrency: int,
    duration: float,
    sync: bool,
    timeout: float,
    sqlite_target: bool,
    p50_target: bool,
    local_db: bool,
) -> None:
    print(f"\n== {title}")
    context = get_context("spawn")  # no fork after gRPC has started threads in this process
    with ProcessPoolExecutor(max_workers=processes, mp_context=context) as pool:
        # Processes start (spawn + imports) before the window opens; every process opens and closes it together.
        start_at = time.time() + 4.0 + 0.5 * processes
        end_at = start_at + duration
        specs = [
            WorkerSpec(server.target, tokens, concurrency, start_at, end_at, seed + 1, sync, timeout)
            for seed in range(processes)
        ]
        futures = [pool.submit(run_worker, spec) for spec in specs]
        time.sleep(max(0.0, start_at - time.time()))
        server_cpu0, machine0, bytes0 = (
            process_cpu(server.proc.pid),
            MachineCpu.read(),
            process_write_bytes(server.proc.pid),
        )
        time.sleep(max(0.0, end_at - time.time()))
        server_cpu1, machine1, bytes1 = (
            process_cpu(server.proc.pid),
            MachineCpu.read(),
            process_write_bytes(server.proc.pid),
        )
        results = [f.result() for f in futures]

    latencies = sorted(lat for r in results for lat in r.latencies)
    outcomes: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    for r in results:
        outcomes.update(r.outcomes)
        errors.update(r.errors)
    done = len(latencies)
    if done == 0:
        print("   no proposal completed")
        for r in results:
            for sample_error in r.error_samples:
                print(f"   error: {sample_error}")
        return
    rate = done / duration
    ms = [lat * 1000 for lat in latencies]
    p50 = percentile(ms, 50)
    print(f"   proposals      {done:,} in {duration:g} s = {rate:,.0f}/s", end="")
    if sqlite_target:
        met = "met" if rate >= TARGET_SATURATION else "NOT met"
        print(f"   (target >= {TARGET_SATURATION:,.0f}/s at saturation on SQLite: {met})", end="")
    print()
    print(
        f"   latency ms     p50 {p50:.2f}   p90 {percentile(ms, 90):.2f}   p99 {percentile(ms, 99):.2f}   "
        f"max {ms[-1]:.1f}   mean {sum(ms) / done:.2f}",
        end="",
    )
    if p50_target:
        print(
            f"   (target p50 <= {TARGET_P50_MS:g} ms at concurrency 1: {'met' if p50 <= TARGET_P50_MS else 'NOT met'})",
            end="",
        )
    print()
    mix = "   ".join(f"{name} {count:,} ({count / done:.0%})" for name, count in outcomes.most_common())
    print(f"   outcomes       {mix}")
    total_errors = sum(errors.values())
    warm = sum(r.warmup_errors for r in results)
    print(
        f"   errors         {total_errors:,}"
        + (f"  {dict(errors)}" if errors else "")
        + (f"  (warm-up: {warm})" if warm else "")
    )
    for r in results:
        for sample_error in r.error_samples[:1]:
            print(f"     e.g. {sample_error}")

    server_cpu = server_cpu1 - server_cpu0
    client_cpu = sum(r.cpu for r in results)
    busy = machine1.busy_cores_since(machine0)
    other = busy - (server_cpu + client_cpu) / duration
    print(
        f"   server CPU     {server_cpu / done * 1000:.3f} ms per proposal; "
        f"{server_cpu / duration:.2f} cores busy (pid {server.proc.pid}, all threads)"
    )
    print(
        f"   client CPU     {client_cpu / done * 1000:.3f} ms per proposal; {client_cpu / duration:.2f} cores busy "
        f"({processes} process{'es' if processes > 1 else ''} x {concurrency} in flight)"
    )
    print(
        f"   machine        {busy:.2f} of {sysinfo.cores()} cores busy ({machine1.shares_since(machine0)}); "
        f"everything else (database server, kernel, other processes): {max(0.0, other):.2f} cores"
    )
    if local_db and bytes0 is not None and bytes1 is not None:
        print(f"   server writes  {(bytes1 - bytes0) / done / 1024:.1f} KiB to storage per proposal (/proc/<pid>/io)")


# --- main ---------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=30.0, help="timed seconds at saturation (30)")
    parser.add_argument("--seq-duration", type=float, default=15.0, help="timed seconds at concurrency 1 (15)")
    parser.add_argument("--processes", type=int, default=4, help="client processes at saturation (4)")
    parser.add_argument("--concurrency", type=int, default=8, help="proposals in flight per client process (8)")
    parser.add_argument("--timeout", type=float, default=30.0, help="per-request deadline, seconds (30)")
    parser.add_argument(
        "--database-url",
        help="PostgreSQL URL, e.g. postgresql+psycopg://postgres@127.0.0.1:5432/pdp_bench: the benchmark "
        "DROPS and re-creates that database, and drops it at the end. Default: a fresh SQLite file in a temp dir.",
    )
    parser.add_argument("--skip-sequential", action="store_true", help="only the saturation phase")
    parser.add_argument("--skip-saturation", action="store_true", help="only the concurrency-1 phase")
    args = parser.parse_args(argv)

    print("agent-pdp end-to-end load benchmark (Propose over gRPC, pdp serve as a subprocess)")
    for line in sysinfo.describe(("grpcio", "protobuf", "SQLAlchemy", "cel-expr-python")):
        print(line)
    print(sysinfo.background_load())

    workdir = Path(tempfile.mkdtemp(prefix="pdp-bench-load-"))
    postgres_url: URL | None = None
    server: Server | None = None
    try:
        if args.database_url and not is_sqlite(args.database_url):
            postgres_url = normalize_url(args.database_url)
            database_url = postgres_url.render_as_string(hide_password=False)
            create_postgres_database(postgres_url)
        else:
            database_url = args.database_url or f"sqlite:///{workdir / 'bench.db'}"
        started = time.perf_counter()
        _pdp("db", "upgrade", "--database-url", database_url, cwd=workdir)
        _pdp("keys", "init", cwd=workdir)  # the server signs audit checkpoints with it
        tokens: dict[str, str] = {}
        for role, (agent_id, owner, roles) in AGENTS.items():
            out = _pdp("agents", "add", agent_id, "--owner", owner, "--roles", ",".join(roles),
                       "--database-url", database_url, cwd=workdir)  # fmt: skip
            tokens[role] = out.strip().splitlines()[-1]
        print(f"database: {describe_database(database_url, workdir)}")
        server = Server(database_url, workdir)
        ready = server.wait_serving()
        print(
            f"setup: migrated, agents {', '.join(a[0] for a in AGENTS.values())} created; pdp serve pid "
            f"{server.proc.pid} on {server.target} SERVING after {ready:.1f} s "
            f"(setup {time.perf_counter() - started:.1f} s); policy bundle {POLICY_DIR.relative_to(REPO)}"
        )
        sqlite_target = postgres_url is None
        if not args.skip_sequential:
            run_phase(
                f"concurrency 1: one client process, one proposal at a time (PdpClient), {args.seq_duration:g} s",
                server, tokens, processes=1, concurrency=1, duration=args.seq_duration, sync=True,
                timeout=args.timeout, sqlite_target=False, p50_target=True, local_db=postgres_url is None,
            )  # fmt: skip
        if not args.skip_saturation:
            run_phase(
                f"saturation: {args.processes} client processes x {args.concurrency} in flight (grpc.aio), "
                f"{args.duration:g} s",
                server, tokens, processes=args.processes, concurrency=args.concurrency, duration=args.duration,
                sync=False, timeout=args.timeout, sqlite_target=sqlite_target, p50_target=False,
                local_db=postgres_url is None,
            )  # fmt: skip
    finally:
        if server is not None:
            code = server.stop()
            print(f"\nserver stopped (exit {code})")
            errors = [line for line in server.log_tail(200).splitlines() if " ERROR " in line or "Traceback" in line]
            if errors:
                print(f"server log has {len(errors)} error lines, e.g.: {errors[0]}")
        if postgres_url is not None:
            drop_postgres_database(postgres_url)
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
