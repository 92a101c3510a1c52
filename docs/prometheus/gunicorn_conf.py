"""gunicorn's configuration for an app with NACHOCODE_METRICS and several workers:
prometheus_client's multiprocess mode, in which each worker writes its counters to a
file of its own and a scrape, whichever worker serves it, adds them all up.

    gunicorn --config gunicorn_conf.py --workers 4 "yourapp:create_app()"
"""

import glob
import os
import tempfile

# Set before prometheus_client is first imported (it chooses its mode on import), and
# so before the app is: the workers inherit it.
directory = os.environ.setdefault(
    "PROMETHEUS_MULTIPROC_DIR", os.path.join(tempfile.gettempdir(), "nachocode-metrics")
)
os.makedirs(directory, exist_ok=True)
# Emptied at each start: the files of the last run would be added to this one's counts.
for stale in glob.glob(os.path.join(directory, "*.db")):
    os.remove(stale)


def child_exit(server, worker):
    # A dead worker's counters are kept (they are still counts); its live gauges are not.
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)
