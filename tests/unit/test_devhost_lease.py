"""tools/devhost: how long a received queue message stays hidden (its lease)."""

from __future__ import annotations

import pytest

from tools.devhost.host import _lease_seconds
from tools.devhost.queue import RECEIVE_VISIBILITY
from tools.devhost.settings import HostError


def test_the_lease_is_the_hosts_ten_minutes_unless_a_test_shortens_it():
    assert _lease_seconds({}) == RECEIVE_VISIBILITY == 600
    assert _lease_seconds({"DEVHOST_QUEUE_LEASE_SECONDS": "3"}) == 3.0


@pytest.mark.parametrize("value", ["soon", "1", "601", "nan"])
def test_an_unusable_lease_is_a_host_error_naming_the_setting(value):
    with pytest.raises(HostError, match="DEVHOST_QUEUE_LEASE_SECONDS"):
        _lease_seconds({"DEVHOST_QUEUE_LEASE_SECONDS": value})
