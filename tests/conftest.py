"""Shared fixtures (test helpers are modules of tests/helpers, imported as ``tests.helpers.<module>``)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from medmap.config import OrganConfig
from tests.helpers.stage2 import make_bank, make_organ


@pytest.fixture
def organ() -> OrganConfig:
    return make_organ()


@pytest.fixture
def bank(organ: OrganConfig) -> SimpleNamespace:
    return make_bank(organ)
