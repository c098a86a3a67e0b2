"""verify's trigger fingerprints are exactly what migration 0002 creates, on both databases."""

from __future__ import annotations

from pdp.audit.verify import POSTGRES_TRIGGERS, SQLITE_TRIGGERS, missing_triggers, trigger_fingerprints
from pdp.store.database import create_db_engine


def test_fingerprints_match_a_fresh_migration(database_url: str) -> None:
    engine = create_db_engine(database_url)
    try:
        with engine.connect() as conn:
            expected = POSTGRES_TRIGGERS if conn.dialect.name == "postgresql" else SQLITE_TRIGGERS
            assert trigger_fingerprints(conn) == expected
            assert missing_triggers(conn) == []
    finally:
        engine.dispose()
