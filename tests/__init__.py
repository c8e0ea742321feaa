"""txpilot's trial tests.

Hypothesis runs derandomized (reproducible) when ``CI`` is set, without deadlines:
the CI machine has two cores and timing varies.
"""

import os

from hypothesis import HealthCheck, settings

settings.register_profile("ci", derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")
