"""Shared test configuration: hypothesis profiles.

Select a profile with ``HYPOTHESIS_PROFILE=ci`` (longer runs); the default keeps the suite fast.
CI machines set ``CI=true``, which selects the ``ci`` profile unless a profile is named.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "default",
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "ci",
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
_default_profile = "ci" if os.environ.get("CI", "").lower() in ("1", "true") else "default"
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", _default_profile))
