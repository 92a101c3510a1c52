"""An app whose schema Flask-Migrate manages, as a user's would: the extension
with ``db=``, a model of the app's own keyed by an :class:`ExactText` user id, and
``Migrate(app, db)`` with its defaults, set up after the extension.
``flask --app tests/support/migrated_app.py db ...`` from a project directory,
with the database in ``MIGRATED_APP_DATABASE_URL``.

``flask ... exercise`` receives a purchase (and its duplicate) that credits a
wallet, and stores wallets whose ids differ only in case or a trailing space,
then prints what the database kept, as JSON.
"""

from __future__ import annotations

import json
import os
from typing import Any

import sqlalchemy as sa
from flask import Flask
from flask_migrate import Migrate
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from flask_nachocode import ExactText, NachocodeWebhook
from flask_nachocode.testing import post_delivery, purchase_payload

DATABASE_ENV = "MIGRATED_APP_DATABASE_URL"
WEBHOOK_KEY = "migrated-app-key-5e21"


class Base(DeclarativeBase):
    pass


db = SQLAlchemy(model_class=Base)
nachocode = NachocodeWebhook(db=db)


class Wallet(db.Model):  # type: ignore[name-defined,misc]
    __tablename__ = "wallets"
    user_id: Mapped[str] = mapped_column(ExactText(255), primary_key=True)
    coins: Mapped[int] = mapped_column(default=0)


@nachocode.on_purchase
def credit(event: Any) -> None:
    wallet = db.session.get(Wallet, event.user_id) or Wallet(user_id=event.user_id, coins=0)
    wallet.coins += event.quantity
    db.session.add(wallet)


def create_app() -> Flask:
    app = Flask(__name__)
    app.config.update(
        SQLALCHEMY_DATABASE_URI=os.environ[DATABASE_ENV], NACHOCODE_WEBHOOK_KEY=WEBHOOK_KEY
    )
    db.init_app(app)
    nachocode.init_app(app)
    Migrate(app, db)

    @app.cli.command("exercise")
    def exercise() -> None:
        client = app.test_client()
        payload = purchase_payload(userId="testUser", quantity=3)
        answers = [post_delivery(client, "purchase", payload) for _ in range(2)]
        db.session.add_all(Wallet(user_id=user, coins=0) for user in ("TESTUSER", "x", "x "))
        db.session.commit()
        wallets = db.session.execute(sa.select(Wallet.user_id, Wallet.coins)).all()
        print(
            json.dumps(
                {
                    "answers": [[answer.status_code, answer.get_json()] for answer in answers],
                    "wallets": sorted([user, coins] for user, coins in wallets),
                    "purchases": len(nachocode.ledger.purchases_of("testUser", environment=None)),
                }
            )
        )

    return app
