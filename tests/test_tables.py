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
            elif engine.dialect.name == "sqlite":
                plan = connection.exec_driver_sql(
                    "EXPLAIN QUERY PLAN SELECT id FROM nachocode_deliveries WHERE replay_of = ?",
                    (5,),
                ).all()
            else:
                # MySQL has no partial index (this one holds every row); its plan
                # lists the indexes the lookup may use.
                plan = connection.exec_driver_sql(
                    "EXPLAIN SELECT id FROM nachocode_deliveries WHERE replay_of = 5"
                ).all()
            assert "ix_nachocode_deliveries_replay_of" in " ".join(str(row) for row in plan)
    finally:
        table.drop(engine)
        engine.dispose()


def test_insert_if_new_refuses_a_second_insert_and_keeps_the_transaction(
    database_url: str,
) -> None:
    # The conflict-aware insert the claim and the ledger rest on (ON CONFLICT DO
    # NOTHING, or on MySQL a caught duplicate-key error), inside one outer
    # transaction as a delivery runs it: the duplicate must leave it usable.
    from flask_nachocode.events import utcnow
    from flask_nachocode.tables import define_claims, insert_if_new

    engine = sa.create_engine(database_url, poolclass=sa.pool.NullPool)
    claims = define_claims(sa.MetaData())
    claims.drop(engine, checkfirst=True)
    claims.create(engine)
    values = {"identity": "purchase:ios:portable-1", "event": "purchase", "claimed_at": utcnow()}
    try:
        with engine.connect() as connection:
            with connection.begin():
                assert insert_if_new(connection, claims, ("identity",), values) is True
                assert insert_if_new(connection, claims, ("identity",), values) is False
                other = {**values, "identity": "purchase:ios:portable-2"}
                assert insert_if_new(connection, claims, ("identity",), other) is True
            count = connection.execute(sa.select(sa.func.count()).select_from(claims)).scalar()
        assert count == 2
    finally:
        claims.drop(engine)
        engine.dispose()
