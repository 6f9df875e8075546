import os
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

# CI runs more examples; a developer's quick run fewer.
settings.register_profile(
    "ci", max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("dev", max_examples=100, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


@pytest.fixture(params=("twisted", "asyncio"))
def adapter(request: pytest.FixtureRequest) -> Any:
    """Each ReplicationClient adapter in turn: the scenario runs for both.

    (client_helpers is imported here, not at the top: importing the reactor
    before pytest-twisted installs the asyncio one would pick the default.)
    """
    from client_helpers import Adapter

    return Adapter(request.param)
