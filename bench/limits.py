"""What governance limits cost: ``python -m bench.limits [--database-url URL] [--duration S]``.

Runs the same Propose load twice against the example bundle: once as shipped (its `kind: Limits` active:
agent and agent+tool rates, two budgets, a retry-storm limit) and once with `limits.yaml` removed. On SQLite
one `pdp serve`; with a PostgreSQL URL two replicas on one database, clients spread across both. The load is
64 agents sending distinct, zero-cost proposals (tickets and scratch writes and reads, some denied), so the
limits are checked and counted on every proposal but rarely change an outcome: the cost measured is the
checking. Then one agent repeats a denied action 20 times, and the benchmark reports how many were decided
before the retry-storm quarantine stopped it (target: exactly the limit's `repeats`, 5).

Prints numbers; asserts nothing. Target: limits cost at most 20% of throughput.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import grpc

from bench import sysinfo
from bench.load import _free_port, _pdp, create_postgres_database, drop_postgres_database
from pdp.client import PdpClient
from pdp.store.database import is_sqlite, normalize_url
from pdp.v1 import pdp_pb2, pdp_pb2_grpc

REPO = Path(__file__).resolve().parent.parent
AGENTS = 64
TICKETS = "http://127.0.0.1:8282/api/tickets"
SCRATCH = "https://scratch.internal/bench/"


@dataclass(frozen=True, slots=True)
class Spec:
    targets: tuple[str, ...]
    tokens: tuple[str, ...]
    concurrency: int
    start_at: float
    end_at: float
    worker: int


def _request(n: int) -> pdp_pb2.ProposeRequest:
    kind = n % 4
    if kind == 0:  # allowed ticket write
        return PdpClient.request("tickets", "POST", TICKETS, "bench", params={"title": f"t{n}"})
    if kind == 1:  # allowed scratch write
        return PdpClient.request("scratch", "PUT", f"{SCRATCH}{n}.txt", "bench")
    if kind == 2:  # allowed read
        return PdpClient.request("tickets", "GET", f"{TICKETS}/{n}", "bench")
    return PdpClient.request("tickets", "PATCH", f"{TICKETS}/x{n}", "bench")  # denied (not one ticket)


async def _run(spec: Spec) -> tuple[int, Counter[str], int]:
    done, outcomes, errors = 0, Counter[str](), 0
    channels = [grpc.aio.insecure_channel(t) for t in spec.targets]
    stubs = [pdp_pb2_grpc.PolicyDecisionPointStub(c) for c in channels]
    await asyncio.sleep(max(0.0, spec.start_at - time.time()))
    deadline = time.perf_counter() + (spec.end_at - time.time())

    async def loop(k: int) -> None:
        nonlocal done, errors
        n = spec.worker * 10_000_000 + k * 100_000
        token = spec.tokens[(spec.worker * spec.concurrency + k) % len(spec.tokens)]
        stub = stubs[k % len(stubs)]
        metadata = (("authorization", f"Bearer {token}"),)
        while time.perf_counter() < deadline:
            n += 1
            try:
                response = await stub.Propose(_request(n), metadata=metadata, timeout=30)
            except grpc.aio.AioRpcError:
                errors += 1
                continue
            done += 1
            outcomes[pdp_pb2.Outcome.Name(response.decision.outcome)] += 1

    await asyncio.gather(*(loop(k) for k in range(spec.concurrency)))
    for channel in channels:
        await channel.close()
    return done, outcomes, errors


def run_worker(spec: Spec) -> tuple[int, Counter[str], int]:
    return asyncio.run(_run(spec))


class Serve:
    def __init__(self, url: str, policy_dir: Path, workdir: Path, name: str) -> None:
        self.target = f"127.0.0.1:{_free_port()}"
        self.log = (workdir / f"{name}.log").open("w")
        env = {k: v for k, v in os.environ.items() if not k.startswith("PDP_")}
        env.update(PDP_SIGNING_KEY=str(workdir / ".pdp" / "signing.key"), PDP_POLICY_RELOAD="off")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pdp.cli.main", "serve", "--database-url", url, "--grpc-addr", self.target,
             "--admin-addr", "127.0.0.1:0", "--policy-dir", str(policy_dir),
             "--checkpoint-file", str(workdir / f"{name}.checkpoints")],
            cwd=workdir, stdout=self.log, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
        self.log_path = workdir / f"{name}.log"
        deadline = time.monotonic() + 60
        while "agent gRPC API on" not in self.log_path.read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"pdp serve did not start:\n{self.log_path.read_text()}")
            time.sleep(0.1)

    def stop(self) -> None:
        self.proc.send_signal(2)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def phase(url: str, policy_dir: Path, workdir: Path, replicas: int, duration: float, label: str) -> float:
    tokens = tuple(
        _pdp("agents", "add", f"{label}-{i}", "--owner", "bench", "--roles", "support", "--database-url", url,
             cwd=workdir).strip().splitlines()[-1]
        for i in range(AGENTS)
    )  # fmt: skip
    servers = [Serve(url, policy_dir, workdir, f"{label}-serve-{i}") for i in range(replicas)]
    try:
        start = time.time() + 3
        specs = [Spec(tuple(s.target for s in servers), tokens, 16, start, start + duration, w) for w in range(2)]
        with ProcessPoolExecutor(len(specs), mp_context=get_context("spawn")) as pool:
            results = list(pool.map(run_worker, specs))
        done = sum(r[0] for r in results)
        outcomes = sum((r[1] for r in results), Counter[str]())
        errors = sum(r[2] for r in results)
        rate = done / duration
        print(f"  {label:<16} {rate:8,.0f} proposals/s  outcomes {dict(outcomes)}  errors {errors}")
        if label == "with-limits":
            storm(servers[0].target, url, workdir)
        return rate
    finally:
        for server in servers:
            server.stop()


def storm(target: str, url: str, workdir: Path) -> None:
    token = _pdp("agents", "add", "stormer", "--owner", "bench", "--roles", "support", "--database-url", url,
                 cwd=workdir).strip().splitlines()[-1]  # fmt: skip
    decided = 0
    with PdpClient(target, token) as client:
        for _ in range(20):
            response = client.propose("iam", "POST", "iam://roles/admin/members", "let me in")
            if not response.decision.reasons[0].rule_id.startswith("limit:"):
                decided += 1
    print(f"  retry storm: {decided} of 20 identical denied proposals decided before quarantine (target: exactly 5)")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database-url", default="")
    parser.add_argument("--duration", type=float, default=15.0)
    parser.add_argument("--rounds", type=int, default=2, help="alternate with/without this many times")
    args = parser.parse_args(argv)
    for line in sysinfo.describe(("grpcio", "SQLAlchemy", "psycopg")):
        print(line)
    print(sysinfo.background_load())
    with tempfile.TemporaryDirectory(prefix="pdp-bench-limits-") as tmp:
        workdir = Path(tmp)
        without = workdir / "policies-without-limits"
        shutil.copytree(REPO / "policies", without)
        (without / "limits.yaml").unlink()
        _pdp("keys", "init", "--signing-key", str(workdir / ".pdp" / "signing.key"), cwd=workdir)
        rates: dict[str, list[float]] = {"with-limits": [], "without-limits": []}
        for round_ in range(args.rounds):
            for label, policy_dir in (("with-limits", REPO / "policies"), ("without-limits", without)):
                url = args.database_url or f"sqlite:///{workdir / f'{label}-{round_}.db'}"
                if not is_sqlite(url):
                    create_postgres_database(normalize_url(url))
                try:
                    _pdp("db", "upgrade", "--database-url", url, cwd=workdir)
                    replicas = 1 if is_sqlite(url) else 2
                    rates[label].append(phase(url, policy_dir, workdir, replicas, args.duration, label))
                finally:
                    if not is_sqlite(url):
                        drop_postgres_database(normalize_url(url))
        best = {label: max(values) for label, values in rates.items()}
        cost = 1 - best["with-limits"] / best["without-limits"]
        with_, without_ = best["with-limits"], best["without-limits"]
        print(
            f"best of {args.rounds}: with limits {with_:,.0f}/s, without {without_:,.0f}/s: "
            f"limits cost {cost:.0%} (target ≤ 20%)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
