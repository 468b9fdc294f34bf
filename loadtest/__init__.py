"""Load-test stage: Locust scenarios against the BentoML service, and the runner that writes reports.

``server`` starts and stops the service, ``locust_runner`` runs one headless Locust step, ``scenarios``
drives the matrix and gates it, ``report`` writes the results; ``run`` is the CLI.
"""

from utils import UserError


class LoadTestError(UserError):
    """The service or Locust could not be run; the message says what happened (the CLI exits 2)."""
