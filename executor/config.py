"""The executor's own config file (YAML), with flags and environment variables for the shared settings.

Precedence: flag > environment variable > file > default. Credentials appear in the file only as
references (``{env: NAME}`` or ``{file: PATH}``) inside each tool's connector section; relative
paths are read from the working directory, as for ``pdp serve``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from pdp.observability.exposition import split_address
from pdp.policy.duration import DurationText, parse_duration

# Settings the executor shares with `pdp serve`: same variables, so one environment configures both.
OVERRIDES = {
    "database_url": ("--database-url", "PDP_DATABASE_URL"),
    "policy_dir": ("--policy-dir", "PDP_POLICY_DIR"),
    "public_key": ("--public-key", "PDP_PUBLIC_KEY"),
    "log_format": ("--log-format", "PDP_LOG_FORMAT"),
    "otlp_endpoint": ("--otlp-endpoint", "PDP_OTLP_ENDPOINT"),
}


class ConfigError(Exception):
    """The config cannot be used; the message names the file and the key."""


class BreakerSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    failures: int = Field(default=5, ge=1, le=1000)  # consecutive execution failures that open it
    cooldown: DurationText = "30s"  # how long it stays open before one trial
    # Distinct agents whose failures it takes to open the tool-wide breaker; below that, an agent's own
    # breaker stops that agent alone (executor/breakers.py). 1: any agent's failures, no per-agent breakers.
    min_agents: int = Field(default=2, ge=1, le=100)


class FileConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    database_url: str = "sqlite:///pdp.db"
    public_key: str = ".pdp/signing.key.pub"
    policy_dir: str = "policies"
    worker_id: str | None = Field(default=None, min_length=1, max_length=100)
    concurrency: int = Field(default=8, ge=1, le=256)
    poll_interval: DurationText = "20ms"
    lease: DurationText = "30s"
    max_attempts: int = Field(default=3, ge=1, le=20)  # idempotent tools: runs in all, after crashes
    retry_backoff: DurationText = "1s"  # before the 2nd run; doubles for each later one
    breaker: BreakerSettings = BreakerSettings()
    breakers: dict[str, BreakerSettings] = {}  # per-tool overrides of `breaker`
    tools: dict[str, dict[str, Any]] = {}  # tool name -> its connector's section
    metrics_addr: str = "127.0.0.1:9464"  # Prometheus /metrics; "" turns it off, port 0 picks a free one
    log_format: Literal["json", "text"] = "json"
    otlp_endpoint: str = ""  # OTLP/HTTP collector for traces; none: spans are not exported

    @field_validator("metrics_addr")
    @classmethod
    def _address(cls, value: str) -> str:
        if value:
            split_address(value)
        return value


@dataclass(frozen=True, slots=True)
class Settings:
    database_url: str
    public_key: Path
    policy_dir: Path
    worker_id: str | None
    concurrency: int
    poll_interval: timedelta
    lease: timedelta
    max_attempts: int
    retry_backoff: timedelta
    breaker: BreakerSettings
    breakers: Mapping[str, BreakerSettings]
    tools: Mapping[str, Mapping[str, Any]]
    metrics_addr: str = "127.0.0.1:9464"
    log_format: str = "json"
    otlp_endpoint: str = ""

    def breaker_for(self, tool: str) -> BreakerSettings:
        return self.breakers.get(tool, self.breaker)


def load(
    path: Path | None, flags: Mapping[str, str | None] | None = None, env: Mapping[str, str] | None = None
) -> Settings:
    """Read the config file (optional) and apply environment variables and flags over it."""
    environ = os.environ if env is None else env
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
        raw = dict(loaded or {})
    for name, (_flag, variable) in OVERRIDES.items():
        value = (flags or {}).get(name) or environ.get(variable)
        if value:
            raw[name] = value
    try:
        parsed = FileConfig.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"{path or 'executor config'}: {problems}") from None
    return Settings(
        database_url=parsed.database_url,
        public_key=Path(parsed.public_key),
        policy_dir=Path(parsed.policy_dir),
        worker_id=parsed.worker_id,
        concurrency=parsed.concurrency,
        poll_interval=parse_duration(parsed.poll_interval),
        lease=parse_duration(parsed.lease),
        max_attempts=parsed.max_attempts,
        retry_backoff=parse_duration(parsed.retry_backoff),
        breaker=parsed.breaker,
        breakers=parsed.breakers,
        tools=parsed.tools,
        metrics_addr=parsed.metrics_addr,
        log_format=parsed.log_format,
        otlp_endpoint=parsed.otlp_endpoint,
    )
