"""The table definitions and the conflict-aware insert, on each database the suite has."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

pytestmark = pytest.mark.every_database


def test_replays_are_found_through_the_partial_replay_index(database_url: str) -> None:
    # The replay_of index is partial (replay_of IS NOT NULL): empty for ordinary
    # deliveries, and still the one the inspector's "replays of" lookup uses.
    from flask_nachocode.tables import define_deliveries

    engine = sa.create_engine(database_url, poolclass=sa.pool.NullPool)
    table = define_deliveries(sa.MetaData())
    table.drop(engine, checkfirst=True)
    table.create(engine)
    try:
        with engine.begin() as connection:
            if engine.dialect.name == "postgresql":
                # An empty table is scanned whatever the indexes: ask for the plan
                # the index allows.
                connection.exec_driver_sql("SET LOCAL enable_seqscan = off")
                plan = connection.exec_driver_sql(
                    "EXPLAIN SELECT id FROM nachocode_deliveries WHERE replay_of = 5"
                ).all()
            else:
                plan = connection.exec_driver_sql(
                    "EXPLAIN QUERY PLAN SELECT id FROM nachocode_deliveries WHERE replay_of = ?",
                    (5,),
                ).all()
            assert "ix_nachocode_deliveries_replay_of" in " ".join(str(row) for row in plan)
    finally:
        table.drop(engine)
        engine.dispose()


def test_the_portable_claim_refuses_a_second_insert_and_keeps_the_transaction(
    database_url: str,
) -> None:
    # The claim used on databases without ON CONFLICT: exercised here on the two
    # the suite has, inside one outer transaction as a delivery would run it.
    from flask_nachocode.events import utcnow
    from flask_nachocode.store import _savepoint_insert
    from flask_nachocode.tables import define_claims

    engine = sa.create_engine(database_url, poolclass=sa.pool.NullPool)
    claims = define_claims(sa.MetaData())
    claims.drop(engine, checkfirst=True)
    claims.create(engine)
    values = {"identity": "purchase:ios:portable-1", "event": "purchase", "claimed_at": utcnow()}
    try:
        with engine.connect() as connection:
            with connection.begin():
                assert _savepoint_insert(connection, claims, values) is True
                assert _savepoint_insert(connection, claims, values) is False
                other = {**values, "identity": "purchase:ios:portable-2"}
                assert _savepoint_insert(connection, claims, other) is True
            count = connection.execute(sa.select(sa.func.count()).select_from(claims)).scalar()
        assert count == 2
    finally:
        claims.drop(engine)
        engine.dispose()
