"""A small coin shop that sells coins through Nachocode in-app purchases.

Run it with ``flask --app examples/shop run``. It keeps everything in one
SQLite file in its instance folder, created on first start (or where
``FLASK_SQLALCHEMY_DATABASE_URI`` points), and shares its
Flask-SQLAlchemy ``db`` with flask-nachocode, so a grant and the record of the
delivery that caused it are committed together or not at all.
"""

from __future__ import annotations

import os
from typing import Any

from flask import Flask, jsonify, render_template_string
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from flask_nachocode import (
    NachocodeWebhook,
    PurchaseEvent,
    RefundEvent,
    Refuse,
    UnavailableUsersEvent,
)


class Base(DeclarativeBase):
    pass


db = SQLAlchemy(model_class=Base)
nachocode = NachocodeWebhook(db=db)

#: Coins granted per unit of each store product.
COINS_PER_UNIT = {
    "com.nachocode.example.consumable": 100,
    "coins_500": 500,
}


class Wallet(db.Model):  # type: ignore[name-defined,misc]
    __tablename__ = "shop_wallets"
    user_id: Mapped[str] = mapped_column(primary_key=True)
    coins: Mapped[int] = mapped_column(default=0)


class PushToken(db.Model):  # type: ignore[name-defined,misc]
    __tablename__ = "shop_push_tokens"
    user_id: Mapped[str] = mapped_column(primary_key=True)
    token: Mapped[str]


def _coins_for(event: PurchaseEvent | RefundEvent, units: int) -> int:
    per_unit = COINS_PER_UNIT.get(event.product_id)
    if per_unit is None:
        # Refused, not crashed: the delivery shows as failed in Nachocode's log with
        # this message, and can be re-sent once the product is added here.
        raise Refuse(f"unknown product {event.product_id}", status=422, code="unknown_product")
    return per_unit * units


def _wallet(user_id: str) -> Wallet:
    wallet = db.session.get(Wallet, user_id)
    if wallet is None:
        wallet = Wallet(user_id=user_id, coins=0)
        db.session.add(wallet)
    return wallet


@nachocode.on_purchase
def grant_coins(event: PurchaseEvent) -> None:
    # No commit here: flask-nachocode commits our writes with the delivery record.
    _wallet(event.user_id).coins += _coins_for(event, event.quantity)


@nachocode.on_refund
def take_back_coins(event: RefundEvent) -> None:
    # May go below zero when the coins were already spent: the debt stays visible.
    _wallet(event.user_id).coins -= _coins_for(event, event.refund_quantity)


@nachocode.on_unavailable_users
def forget_push_tokens(event: UnavailableUsersEvent) -> None:
    db.session.execute(db.delete(PushToken).where(PushToken.user_id.in_(event.user_ids)))


PAGE = """<!doctype html>
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Coin shop</title>
<h1>Coin shop</h1>
<table>
  <tr><th>user</th><th>coins</th></tr>
  {% for wallet in wallets %}<tr><td>{{ wallet.user_id }}</td><td>{{ wallet.coins }}</td></tr>
  {% else %}<tr><td colspan="2">no purchases yet</td></tr>{% endfor %}
</table>
"""


def create_app(config: dict[str, Any] | None = None) -> Flask:
    app = Flask(__name__, instance_relative_config=True)
    app.config.update(
        SQLALCHEMY_DATABASE_URI="sqlite:///shop.db",  # in the instance folder
        # Set the same key in the Nachocode dashboard; never commit a real one.
        NACHOCODE_WEBHOOK_KEY=os.environ.get("NACHOCODE_WEBHOOK_KEY", "dev-webhook-key"),
    )
    # Any other key from the environment, Flask's way: FLASK_SQLALCHEMY_DATABASE_URI=...
    app.config.from_prefixed_env()
    app.config.update(config or {})
    db.init_app(app)
    nachocode.init_app(app)
    with app.app_context():
        db.create_all()  # the shop's tables and the nachocode_* ones, on first start

    @app.get("/")
    def index() -> str:
        wallets = db.session.scalars(db.select(Wallet).order_by(Wallet.user_id)).all()
        return render_template_string(PAGE, wallets=wallets)

    @app.get("/balances")
    def balances() -> Any:
        wallets = db.session.scalars(db.select(Wallet).order_by(Wallet.user_id)).all()
        return jsonify({wallet.user_id: wallet.coins for wallet in wallets})

    @app.post("/push-tokens/<user_id>/<token>")
    def register_push_token(user_id: str, token: str) -> Any:
        db.session.merge(PushToken(user_id=user_id, token=token))
        db.session.commit()
        return jsonify(success=True)

    @app.get("/push-tokens")
    def push_tokens() -> Any:
        tokens = db.session.scalars(db.select(PushToken).order_by(PushToken.user_id)).all()
        return jsonify({token.user_id: token.token for token in tokens})

    return app
