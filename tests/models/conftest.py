"""Fixtures for the model tests."""

from __future__ import annotations

import socket
import urllib.request

import pytest
import torch


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make every network or download call fail at once and record it (weights are offline)."""
    calls: list[str] = []

    def refuse(name: str):
        def _refuse(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"network access attempted: {name}")

        return _refuse

    for owner, attr in [
        (socket.socket, "connect"),
        (socket.socket, "connect_ex"),
        (socket, "create_connection"),
        (socket, "getaddrinfo"),
        (urllib.request, "urlopen"),
        (torch.hub, "download_url_to_file"),
        (torch.hub, "load_state_dict_from_url"),
    ]:
        monkeypatch.setattr(owner, attr, refuse(f"{getattr(owner, '__name__', owner)}.{attr}"))
    return calls
