"""Settings shared by the evaluation tests."""

from __future__ import annotations

import pytest

from tests.helpers_models import one_torch_thread


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_torch_thread():
        yield
