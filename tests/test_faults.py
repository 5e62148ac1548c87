"""The one variable that names a crash point for the crash tests, and its message when it names none."""

from __future__ import annotations

import pytest

from fabrika.errors import FabrikaError
from fabrika.faults import fault


def test_inert_unless_the_variable_names_the_point(monkeypatch):
    monkeypatch.delenv("FABRIKA_FAULT", raising=False)
    assert fault("kill_at_step") is None
    monkeypatch.setenv("FABRIKA_FAULT", "kill_at_step=3")
    assert fault("kill_at_step") == 3
    assert fault("kill_after_rows") is None


@pytest.mark.parametrize("value", ["kill_at_stpe=3", "kill_at_step", "kill_at_step=x", "kill_at_step=0"])
def test_a_value_that_names_no_crash_point_is_refused(monkeypatch, value):
    monkeypatch.setenv("FABRIKA_FAULT", value)
    with pytest.raises(FabrikaError, match=r"FABRIKA_FAULT=.* is not a crash point; expected one of: kill_at_step=N"):
        fault("kill_after_rows")
