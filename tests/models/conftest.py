"""Fixtures for the stage-2 model tests (helpers live in stage2_helpers.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from medmap.config import OrganConfig
from stage2_helpers import make_bank, make_organ


@pytest.fixture
def organ() -> OrganConfig:
    return make_organ()


@pytest.fixture
def bank(organ: OrganConfig) -> SimpleNamespace:
    return make_bank(organ)
