"""The shop's Celery worker, when it runs with deferral (see the shop's docstring)::

    FLASK_NACHOCODE_DEFERRED=true celery -A examples.shop.worker worker --loglevel INFO

flask-nachocode's task, registered by ``init_app``, grants the coins inside the app
context, with the shop's handlers.
"""

from __future__ import annotations

from . import create_app

# The worker exists for deferral only: on here, whatever the environment says.
flask_app = create_app({"NACHOCODE_DEFERRED": True})
celery_app = flask_app.extensions["celery"]
