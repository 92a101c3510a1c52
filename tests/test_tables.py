"""The table definitions and the conflict-aware insert, on each database the suite has."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa

from flask_nachocode.tables import MYSQL_DIALECTS

TESTS = Path(__file__).resolve().parent

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


MIGRATED_APP = TESTS / "support" / "migrated_app.py"


@pytest.mark.integration
@pytest.mark.once
def test_flask_migrate_migrations_run_as_generated(database_url: str, tmp_path: Path) -> None:
    # Flask-Migrate's own templates, unedited, in a new project directory: the
    # extension's tables and the app's ExactText-keyed model are created, checked,
    # dropped and created again by the real `flask db` commands.
    pytest.importorskip("flask_migrate")
    from support.migrated_app import DATABASE_ENV

    environment = {**os.environ, DATABASE_ENV: database_url, "PYTHONPATH": str(TESTS)}
    engine = sa.create_engine(database_url, poolclass=sa.pool.NullPool)

    def flask(*args: str) -> str:
        command = [sys.executable, "-m", "flask", "--app", str(MIGRATED_APP), *args]
        result = subprocess.run(
            command, cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=120
        )
        output = result.stdout + result.stderr
        assert result.returncode == 0, f"flask {' '.join(args)} failed:\n{output}"
        assert "Traceback" not in output, output
        lines = (result.stdout.strip() or result.stderr.strip()).splitlines()
        print(f"[{engine.dialect.name}] flask {' '.join(args)}: {lines[-1] if lines else ''}")
        return output

    flask("db", "init")
    flask("db", "migrate", "-m", "nachocode")
    (script,) = (tmp_path / "migrations" / "versions").glob("*.py")
    generated = script.read_text()
    assert "flask_nachocode" not in generated
    # The lengths survive: an identity's key on MySQL fits only with them.
    assert "sa.String(length=512).with_variant(mysql.VARBINARY(length=2048)" in generated
    flask("db", "upgrade")
    assert "No new upgrade operations detected" in flask("db", "check")
    flask("db", "downgrade", "base")
    assert "nachocode_claims" not in sa.inspect(engine).get_table_names()
    flask("db", "upgrade")
    assert "No new upgrade operations detected" in flask("db", "check")

    try:
        inspector = sa.inspect(engine)
        columns = {c["name"]: c["type"] for c in inspector.get_columns("nachocode_claims")}
        indexes = {i["name"]: i for i in inspector.get_indexes("nachocode_deliveries")}
        wallet_key = {c["name"]: c["type"] for c in inspector.get_columns("wallets")}["user_id"]
    finally:
        engine.dispose()
    if engine.dialect.name in MYSQL_DIALECTS:
        # Bytes, compared exactly, with the lengths; the unbounded user id indexed by a prefix.
        assert str(columns["identity"]) == "VARBINARY(2048)"
        assert str(wallet_key) == "VARBINARY(1020)"
        user_index = indexes["ix_nachocode_deliveries_user_id"]
        assert user_index["dialect_options"]["mysql_length"] == {"user_id": 255}
    else:
        assert str(columns["identity"]) == "VARCHAR(512)"
        assert str(wallet_key) == "VARCHAR(255)"
    # Aware times keep their zone on PostgreSQL and their microseconds on MySQL.
    if engine.dialect.name == "postgresql":
        assert columns["claimed_at"].timezone is True
    elif engine.dialect.name in MYSQL_DIALECTS:
        assert columns["claimed_at"].fsp == 6

    exercised = json.loads(flask("exercise").splitlines()[-1])
    assert [status for status, _ in exercised["answers"]] == [200, 200]
    assert [answer["duplicate"] for _, answer in exercised["answers"]] == [False, True]
    # Credited once, and four wallets: case and a trailing space make different users.
    assert exercised["wallets"] == [["TESTUSER", 0], ["testUser", 3], ["x", 0], ["x ", 0]]
    assert exercised["purchases"] == 1
