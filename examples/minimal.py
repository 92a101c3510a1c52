"""The quickstart's complete app: coins granted by Nachocode purchases.

Run it from the repository root with ``flask --app examples/minimal.py run``.
"""

from __future__ import annotations

import os

from flask import Flask
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.orm import Mapped, mapped_column

from flask_nachocode import ExactText, NachocodeWebhook, PurchaseEvent, RefundEvent

db = SQLAlchemy()
nachocode = NachocodeWebhook(db=db)  # the deliveries share your database and transaction

COINS_PER_UNIT = 100


class Wallet(db.Model):
    # ExactText: compared exactly on every database (MySQL's default collation
    # would take "Alice" and "alice " for one user).
    user_id: Mapped[str] = mapped_column(ExactText(255), primary_key=True)
    coins: Mapped[int]


def wallet_of(user_id: str) -> Wallet:
    # FOR UPDATE: another purchase of this user, handled at the same moment by another
    # worker, waits for this one to commit instead of overwriting its coins.
    wallet = db.session.get(Wallet, user_id, with_for_update=True)
    if wallet is None:
        wallet = Wallet(user_id=user_id, coins=0)
        db.session.add(wallet)
    return wallet


@nachocode.on_purchase
def grant_coins(event: PurchaseEvent) -> None:
    # No commit: the extension commits these writes together with the delivery.
    wallet_of(event.user_id).coins += COINS_PER_UNIT * event.quantity


@nachocode.on_refund
def take_back_coins(event: RefundEvent) -> None:
    # A refund can arrive before its purchase (re-sent by hand): the sum still comes out right.
    wallet_of(event.user_id).coins -= COINS_PER_UNIT * event.refund_quantity


def create_app() -> Flask:
    app = Flask(__name__)
    app.config.update(
        SQLALCHEMY_DATABASE_URI="sqlite:///minimal.db",  # in the instance folder
        # The webhook key set in the Nachocode dashboard; never commit a real one.
        NACHOCODE_WEBHOOK_KEY=os.environ.get("NACHOCODE_WEBHOOK_KEY", "dev-webhook-key"),
    )
    app.config.from_prefixed_env()  # any other key as FLASK_<KEY> from the environment
    db.init_app(app)
    nachocode.init_app(app)
    with app.app_context():
        db.create_all()  # the wallets and the nachocode_* tables (gunicorn: --preload)

    @app.get("/coins/<user_id>")
    def coins(user_id: str) -> dict[str, int]:
        wallet = db.session.get(Wallet, user_id)
        return {"coins": wallet.coins if wallet is not None else 0}

    return app
