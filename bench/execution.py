"""Execution benchmark: ``python -m bench.execution [--database-url URL] [--proposals N] [--samples S]``.

Builds its own world in a temp directory: a fresh database (SQLite, or PostgreSQL with
``--database-url``, a database it creates and drops), a bundle whose ``web`` tool points at a fast
local HTTP target (``bench.target``, its own process), ``pdp serve`` and ``pdp-executor`` processes.

1. Latency, one executor: S proposals one at a time; for each, the time from Propose returning ALLOW
   to the SUCCEEDED result being visible through GetProposal (polled every 2 ms). p50/p90/p99.
2. Throughput: N allowed proposals are queued with no executor running; then 1 (and, on PostgreSQL,
   2) executor processes start, and executions/s is N over the span from the first execution's start
   to the last one's finish (from the ``executions`` table), so executor start-up is not counted.

Prints numbers; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml
from sqlalchemy import func, select

from bench import sysinfo
from bench.load import (
    _free_port,
    _pdp,
    create_postgres_database,
    describe_database,
    drop_postgres_database,
    percentile,
)
from pdp.client import PdpClient
from pdp.store.database import create_db_engine, is_sqlite, normalize_url
from pdp.store.models import executions, proposals
from pdp.v1 import pdp_pb2

REPO = Path(__file__).resolve().parent.parent
TARGET_PICKUP_MS = 100.0


def write_world(workdir: Path, target_url: str, database_url: str, token_file: Path, worker: str) -> Path:
    bundle = workdir / "bundle"
    bundle.mkdir(exist_ok=True)
    docs = [
        {"apiVersion": "pdp/v1", "kind": "Bundle", "name": "bench-exec", "default_tier": "ai_writable"},
        {
            "apiVersion": "pdp/v1",
            "kind": "Tools",
            "tools": [{"name": "web", "type": "http", "resource_prefix": target_url, "operations": {"POST": "write"}}],
        },
        {"apiVersion": "pdp/v1", "kind": "Rules", "rules": [{"id": "all", "effect": "allow", "when": "true"}]},
    ]
    (bundle / "bundle.yaml").write_text(yaml.safe_dump_all(docs))
    config = workdir / f"executor-{worker}.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "database_url": database_url,
                "public_key": str(workdir / ".pdp" / "signing.key.pub"),
                "policy_dir": str(bundle),
                "worker_id": worker,
                "concurrency": 16,
                "metrics_addr": "127.0.0.1:0",  # several executors on one host
                "tools": {"web": {"headers": {"Authorization": {"file": str(token_file), "template": "Bearer {}"}}}},
            }
        )
    )
    return bundle


class Process:
    def __init__(self, args: list[str], workdir: Path, name: str) -> None:
        self.name = name
        self.log_path = workdir / f"{name}.log"
        self._log = self.log_path.open("w")
        env = {k: v for k, v in os.environ.items() if not k.startswith("PDP_")}
        env["PDP_SIGNING_KEY"] = str(workdir / ".pdp" / "signing.key")
        env["PYTHONPATH"] = str(REPO)  # bench.target runs from the temp directory
        self.proc = subprocess.Popen(args, cwd=workdir, stdout=self._log, stderr=subprocess.STDOUT, env=env)

    def wait_for(self, text: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log_path.read_text(errors="replace"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"{self.name} did not start:\n{self.log_path.read_text()}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(2)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


def wait_listening(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit(f"nothing listens on port {port}") from None
            time.sleep(0.05)


def executor(workdir: Path, worker: str) -> Process:
    config = workdir / f"executor-{worker}.yaml"
    process = Process([sys.executable, "-m", "executor.main", "--config", str(config)], workdir, f"executor-{worker}")
    process.wait_for("executing tools")
    return process


def latency(client: PdpClient, target_url: str, samples: int, workdir: Path) -> None:
    worker = executor(workdir, "latency")
    try:
        results: list[float] = []
        for i in range(samples):
            response = client.propose("web", "POST", f"{target_url}lat/{i}", "bench", params={"i": i})
            returned = time.perf_counter()
            while True:
                proposal = client.get(response.proposal_id)
                if proposal.state == pdp_pb2.SUCCEEDED:
                    results.append((time.perf_counter() - returned) * 1000)
                    break
                if proposal.state in (pdp_pb2.FAILED, pdp_pb2.UNKNOWN):
                    raise SystemExit(f"execution failed: {proposal.execution.error}")
                time.sleep(0.002)
    finally:
        worker.stop()
    results.sort()
    print(
        f"latency, Propose→result visible ({samples} sequential, 1 executor, poll interval 20 ms): "
        f"p50 {percentile(results, 50):.1f} ms, p90 {percentile(results, 90):.1f} ms, "
        f"p99 {percentile(results, 99):.1f} ms, max {results[-1]:.1f} ms "
        f"(target: picked up within {TARGET_PICKUP_MS:.0f} ms)"
    )


def throughput(
    target: str, token: str, target_url: str, database_url: str, count: int, workers: int, workdir: Path
) -> None:
    session = f"tp-{workers}"

    def send(chunk: range) -> list[str]:
        with PdpClient(target, token) as client:
            return [
                client.propose(
                    "web", "POST", f"{target_url}{session}/{i}", "bench", params={"i": i}, session_id=session
                ).proposal_id
                for i in chunk
            ]

    with ThreadPoolExecutor(8) as pool:
        ids = [pid for part in pool.map(send, [range(k, count, 8) for k in range(8)]) for pid in part]
    engine = create_db_engine(database_url, pool_size=1)
    running = [executor(workdir, f"tp{workers}-{n}") for n in range(workers)]
    cpu_before = [sysinfo.process_cpu(p.proc.pid) for p in running]
    try:
        deadline = time.monotonic() + 600
        query = select(func.count()).where(proposals.c.session_id == session, proposals.c.state == "SUCCEEDED")
        while True:
            with engine.connect() as conn:
                done = conn.execute(query).scalar_one()
            if done == len(ids) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        cpu = sum(sysinfo.process_cpu(p.proc.pid) for p in running) - sum(cpu_before)
        with engine.connect() as conn:
            first, last = conn.execute(
                select(func.min(executions.c.started_at), func.max(executions.c.finished_at)).where(
                    executions.c.proposal_id.in_(ids)
                )
            ).one()
    finally:
        for process in running:
            process.stop()
        engine.dispose()
    span = (last - first).total_seconds()
    print(
        f"throughput, {workers} executor(s): {done}/{len(ids)} executed in {span:.2f} s = "
        f"{done / span:,.0f} executions/s; executor CPU {cpu / done * 1000:.2f} ms per execution"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database-url", default="", help="PostgreSQL URL of a database to create and drop")
    parser.add_argument("--proposals", type=int, default=1000)
    parser.add_argument("--samples", type=int, default=200)
    args = parser.parse_args(argv)
    for line in sysinfo.describe(("grpcio", "SQLAlchemy", "httpx", "psycopg")):
        print(line)
    with tempfile.TemporaryDirectory(prefix="pdp-bench-exec-") as tmp:
        workdir = Path(tmp)
        url = args.database_url or f"sqlite:///{workdir / 'pdp.db'}"
        postgres = not is_sqlite(url)
        if postgres:
            create_postgres_database(normalize_url(url))
        processes: list[Process] = []
        try:
            _pdp("db", "upgrade", "--database-url", url, cwd=workdir)
            _pdp("keys", "init", "--signing-key", str(workdir / ".pdp" / "signing.key"), cwd=workdir)
            out = _pdp(
                "agents", "add", "bench", "--owner", "bench", "--roles", "support", "--database-url", url, cwd=workdir
            )
            token = out.strip().splitlines()[-1]
            print(describe_database(url, workdir))
            target_token = "bench-" + os.urandom(16).hex()
            token_file = workdir / "target.token"
            token_file.write_text(target_token)
            port = _free_port()
            target_url = f"http://127.0.0.1:{port}/api/"
            processes.append(
                Process([sys.executable, "-m", "bench.target", str(port), target_token], workdir, "target")
            )
            names = ["latency"] + [f"tp{k}-{n}" for k in (1, 2) for n in range(k)]
            bundle = Path()
            for name in names:
                bundle = write_world(workdir, target_url, url, token_file, name)
            grpc_addr = f"127.0.0.1:{_free_port()}"
            serve = Process(
                [sys.executable, "-m", "pdp.cli.main", "serve", "--database-url", url, "--grpc-addr", grpc_addr,
                 "--policy-dir", str(bundle), "--checkpoint-file", str(workdir / "checkpoints.jsonl")],
                workdir,
                "serve",
            )  # fmt: skip
            processes.append(serve)
            serve.wait_for("agent gRPC API on")
            with PdpClient(grpc_addr, token) as client:
                latency(client, target_url, args.samples, workdir)
            for workers in (1, 2) if postgres else (1,):
                throughput(grpc_addr, token, target_url, url, args.proposals, workers, workdir)
        finally:
            for process in reversed(processes):
                process.stop()
            if postgres:
                drop_postgres_database(normalize_url(url))
    return 0


if __name__ == "__main__":
    sys.exit(main())
