"""Settings: every one has a flag and a PDP_* environment variable, with the same defaults everywhere."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, fields


@dataclass(frozen=True, slots=True)
class Setting:
    name: str
    flag: str
    env: str
    default: str
    help: str


SETTINGS = (
    Setting("database_url", "--database-url", "PDP_DATABASE_URL", "sqlite:///pdp.db", "database URL"),
    Setting("policy_dir", "--policy-dir", "PDP_POLICY_DIR", "policies", "policy bundle directory"),
    Setting(
        "policy_reload",
        "--policy-reload",
        "PDP_POLICY_RELOAD",
        "watch",
        "hot reload of the policy bundle: watch (the directory, and on SIGHUP), sighup (only on SIGHUP) or off",
    ),
    Setting("grpc_addr", "--grpc-addr", "PDP_GRPC_ADDR", "127.0.0.1:50051", "agent gRPC listen address"),
    Setting("admin_addr", "--admin-addr", "PDP_ADMIN_ADDR", "127.0.0.1:8181", "admin HTTP listen address"),
    Setting(
        "signing_key",
        "--signing-key",
        "PDP_SIGNING_KEY",
        ".pdp/signing.key",
        "ticket/checkpoint signing key file (created by `pdp keys init`)",
    ),
    Setting("environment", "--environment", "PDP_ENVIRONMENT", "dev", "environment name CEL sees"),
    Setting(
        "checkpoint_file",
        "--checkpoint-file",
        "PDP_CHECKPOINT_FILE",
        ".pdp/checkpoints.jsonl",
        "signed audit checkpoints, appended outside the database",
    ),
    Setting("checkpoint_every", "--checkpoint-every", "PDP_CHECKPOINT_EVERY", "1000", "checkpoint after N events"),
    Setting(
        "checkpoint_interval",
        "--checkpoint-interval",
        "PDP_CHECKPOINT_INTERVAL",
        "1",
        "sign the audit chain's head when it moved and T seconds passed since the last checkpoint",
    ),
    Setting(
        "ticket_ttl",
        "--ticket-ttl",
        "PDP_TICKET_TTL",
        "10m",
        "how long an execution ticket stays valid; the executor refuses it afterwards",
    ),
    Setting(
        "approval_webhooks",
        "--approval-webhooks",
        "PDP_APPROVAL_WEBHOOKS",
        "",
        "comma-separated URLs notified (POST, JSON) when a proposal starts waiting for approval",
    ),
    Setting(
        "admin_url",
        "--admin-url",
        "PDP_ADMIN_URL",
        "",
        "public base URL of the admin endpoint, used in notification links (default http://<admin addr>)",
    ),
    Setting(
        "max_pending_per_agent",
        "--max-pending-per-agent",
        "PDP_MAX_PENDING_PER_AGENT",
        "1000",
        "most proposals one agent may have pending approval; a proposal over it is recorded and denied",
    ),
    Setting("log_format", "--log-format", "PDP_LOG_FORMAT", "json", "log lines: json (one object per line) or text"),
    Setting(
        "otlp_endpoint",
        "--otlp-endpoint",
        "PDP_OTLP_ENDPOINT",
        "",
        "OTLP/HTTP collector that receives traces, e.g. http://127.0.0.1:4318 (default: traces are not exported)",
    ),
)


@dataclass(frozen=True, slots=True)
class Config:
    database_url: str
    policy_dir: str
    grpc_addr: str
    admin_addr: str
    signing_key: str
    environment: str
    checkpoint_file: str = ".pdp/checkpoints.jsonl"
    checkpoint_every: str = "1000"
    checkpoint_interval: str = "1"
    ticket_ttl: str = "10m"
    approval_webhooks: str = ""
    admin_url: str = ""
    log_format: str = "json"
    otlp_endpoint: str = ""
    policy_reload: str = "watch"
    max_pending_per_agent: str = "1000"

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Config:
        source = os.environ if env is None else env
        return cls(**{s.name: source.get(s.env) or s.default for s in SETTINGS})


def add_arguments(parser: argparse.ArgumentParser, names: tuple[str, ...] | None = None) -> None:
    """Add the flags for ``names`` (all settings by default); each falls back to its variable."""
    for setting in SETTINGS:
        if names is None or setting.name in names:
            parser.add_argument(
                setting.flag,
                dest=setting.name,
                default=None,
                help=f"{setting.help} (env {setting.env}, default {setting.default or 'none'})",
            )


def from_args(args: argparse.Namespace) -> Config:
    """Flags win over environment variables, which win over defaults."""
    base = Config.from_env()
    values = {f.name: getattr(args, f.name, None) or getattr(base, f.name) for f in fields(Config)}
    return Config(**values)
