"""A small coin shop that sells coins through Nachocode in-app purchases.

Run it with ``flask --app examples/shop run --debug`` (debug mode also switches on the
delivery inspector at ``/nachocode/deliveries``). It keeps everything in one
SQLite file in its instance folder, created on first start (or where
``FLASK_SQLALCHEMY_DATABASE_URI`` points), and shares its
Flask-SQLAlchemy ``db`` with flask-nachocode, so a grant and the record of the
delivery that caused it are committed together or not at all.

The purchase flow, as Nachocode's guide has it: the shop's front end calls
``Nachocode.iap.purchase(productKey, userId, callback)``; on success it opens
``/receipt/<purchaseId>?userId=...``, which shows "processing" and polls the
extension's purchase-status route until the ``purchase`` webhook has been
handled, then shows what was granted.

Config can also come from ``FLASK_*`` environment variables, e.g.
``FLASK_SQLALCHEMY_DATABASE_URI``.

With deferral (``NACHOCODE_DEFERRED``; needs ``pip install 'flask-nachocode[celery]' redis``
and a Redis server), the web answers 202 at once and a Celery worker grants the coins,
retrying when a grant fails. Run the two side by side, from the repository's root::

    export FLASK_NACHOCODE_DEFERRED=true FLASK_CELERY_BROKER_URL=redis://127.0.0.1:6379/0
    flask --app examples/shop run --debug
    celery -A examples.shop.worker worker --beat --loglevel INFO

(``--beat`` runs the shop's beat entry too, which re-sends the tasks a broker lost;
in production run one ``celery beat`` of its own instead.)
"""

from __future__ import annotations

import os
from typing import Any

from flask import Flask, jsonify, render_template_string, request, url_for
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from flask_nachocode import (
    ExactText,
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
    # Exact: on MySQL a plain string key would give "testUser" and "TESTUSER" one wallet.
    user_id: Mapped[str] = mapped_column(ExactText(255), primary_key=True)
    coins: Mapped[int] = mapped_column(default=0)


class PushToken(db.Model):  # type: ignore[name-defined,misc]
    __tablename__ = "shop_push_tokens"
    user_id: Mapped[str] = mapped_column(ExactText(255), primary_key=True)
    token: Mapped[str] = mapped_column(Text)


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
    # The ledger already holds this purchase, with any refund that arrived before
    # it: grant only the units that were not refunded.
    purchase = nachocode.ledger.find(event)
    units = purchase.net_quantity if purchase is not None else event.quantity
    _wallet(event.user_id).coins += _coins_for(event, units)


@nachocode.on_refund
def take_back_coins(event: RefundEvent) -> None:
    purchase = nachocode.ledger.find(event)
    if purchase is not None and not purchase.purchase_received:
        # Refunded before the purchase itself arrived: nothing was granted yet, and
        # grant_coins will leave these units out.
        _coins_for(event, event.refund_quantity)  # still refuse unknown products
        return
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


RECEIPT_PAGE = """<!doctype html>
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Your purchase</title>
<h1>Your purchase</h1>
<p id="purchase-status" data-state="processing">Processing your purchase&hellip;</p>
<button id="check-again" hidden>Check again</button>
<script>
// The front end comes here from the Nachocode SDK's purchase callback:
//   Nachocode.iap.purchase(productKey, userId, (result) => {
//     if (result.status.success) location.href = `/receipt/${result.purchaseId}?userId=${encodeURIComponent(userId)}`;
//   });
// result.purchaseId is the iapLogId of the purchase webhook.
const statusUrl = {{ status_url|tojson }};
const giveUpMs = {{ give_up_ms|tojson }};
const line = document.getElementById("purchase-status");
const checkAgain = document.getElementById("check-again");
const TEXT = {
  granted: (p) => `Thank you! ${p.netQuantity} \u00d7 ${p.productId} added to your account.`,
  partially_refunded: (p) => `${p.netQuantity} of ${p.quantity} \u00d7 ${p.productId} kept; the rest was refunded.`,
  refunded: (p) => `This purchase of ${p.productId} was refunded.`,
};

async function waitForGrant() {
  const deadline = Date.now() + giveUpMs;
  let delay = 250;
  for (;;) {
    try {
      const response = await fetch(statusUrl, {cache: "no-store", credentials: "same-origin"});
      if (response.ok) return await response.json();
      // 404 is "pending", 5xx may pass; any other answer will not change by asking again.
      if (response.status !== 404 && response.status < 500) return null;
    } catch (networkError) { /* offline for a moment: keep trying until the deadline */ }
    if (Date.now() + delay > deadline) return null;
    await new Promise((resolve) => setTimeout(resolve, delay));
    delay = Math.min(delay * 1.5, 2000);
  }
}

async function show() {
  checkAgain.hidden = true;
  line.dataset.state = "processing";
  line.textContent = "Processing your purchase\u2026";
  const purchase = await waitForGrant();
  if (purchase === null) {
    // Not a failure: the store charged, the webhook is late. The grant will come.
    line.textContent = "Still processing. Your purchase will appear in your account shortly.";
    checkAgain.hidden = false;
    return;
  }
  line.dataset.state = purchase.status;
  line.textContent = TEXT[purchase.status](purchase);
}

checkAgain.addEventListener("click", show);
show();
</script>
"""


def celery_init_app(app: Flask) -> Any:
    """Flask's "Background Tasks with Celery" pattern: the app's Celery instance, in
    ``app.extensions["celery"]`` where flask-nachocode looks for it."""
    from celery import Celery, Task  # the `celery` extra, needed only with deferral

    class FlaskTask(Task):  # type: ignore[misc]
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            with app.app_context():
                return self.run(*args, **kwargs)

    celery_app = Celery(app.name, task_cls=FlaskTask)
    celery_app.config_from_object(
        {
            "broker_url": app.config.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/0"),
            "task_ignore_result": True,
            # flask-nachocode's task is acknowledged late: one task at a time per process.
            "worker_prefetch_multiplier": 1,
            "beat_schedule": {
                # Re-send the tasks of deliveries queued for more than 10 minutes (a
                # Redis restarted without persistence loses its queue).
                "nachocode-requeue": {
                    "task": "flask_nachocode.requeue",
                    "schedule": 300.0,
                    "kwargs": {"older_than": 600},
                },
            },
        }
    )
    celery_app.set_default()
    app.extensions["celery"] = celery_app
    return celery_app


def create_app(config: dict[str, Any] | None = None) -> Flask:
    app = Flask(__name__, instance_relative_config=True)
    app.config.update(
        SQLALCHEMY_DATABASE_URI="sqlite:///shop.db",  # in the instance folder
        # Set the same key in the Nachocode dashboard; never commit a real one.
        NACHOCODE_WEBHOOK_KEY=os.environ.get("NACHOCODE_WEBHOOK_KEY", "dev-webhook-key"),
        # GET /nachocode/purchases/<iapLogId>?userId=..., polled by the receipt page.
        NACHOCODE_PURCHASE_STATUS_ROUTE=True,
        # How long the receipt page polls before it says "still processing".
        SHOP_STATUS_GIVE_UP_MS=10_000,
    )
    # Any other key from the environment, Flask's way: FLASK_SQLALCHEMY_DATABASE_URI=...
    app.config.from_prefixed_env()
    app.config.update(config or {})
    if app.config.get("NACHOCODE_DEFERRED"):
        celery_init_app(app)  # before nachocode.init_app, which registers its task there
    if app.debug:
        # `flask run --debug` on a developer's machine: watch deliveries arrive at
        # /nachocode/deliveries. The inspector keeps its CSRF token in the session, so
        # it needs a SECRET_KEY; this one is for development only. In production set
        # your own SECRET_KEY and protect the inspector (NACHOCODE_INSPECTOR_TOKEN or
        # NACHOCODE_INSPECTOR_DECORATORS), or leave it off.
        app.config.setdefault("NACHOCODE_INSPECTOR", True)
        if not app.secret_key:
            app.secret_key = "dev-only-not-secret"
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

    @app.get("/receipt/<int:iap_log_id>")
    def receipt(iap_log_id: int) -> str:
        status_url = url_for(
            "nachocode.purchase_status",
            iap_log_id=iap_log_id,
            userId=request.args.get("userId", ""),
        )
        return render_template_string(
            RECEIPT_PAGE, status_url=status_url, give_up_ms=app.config["SHOP_STATUS_GIVE_UP_MS"]
        )

    @app.get("/users/<user_id>/purchases")
    def purchases(user_id: str) -> Any:
        # Sandbox too: the shop shows test purchases, marked by their environment.
        found = nachocode.ledger.purchases_of(user_id, environment=None)
        return jsonify(
            [
                {
                    "iapLogId": p.iap_log_id,
                    "productId": p.product_id,
                    "environment": p.environment,
                    "status": p.status,
                    "quantity": p.quantity,
                    "netQuantity": p.net_quantity,
                }
                for p in found
            ]
        )

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
