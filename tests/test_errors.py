"""One error path: every error type roam defines is a RoamError (with a code the CLI's
exit code and the API's problem document come from), but for the few listed here."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import roam
from roam.errors import ErrorCode, RoamError

NOT_ROAM_ERRORS = {
    "roam.migration.errors.Decline": "control flow: raised to decline authority, caught",
    "roam.migration.channel.PeerLost": "a ConnectionError (OSError), reported as one",
    "roam.guest.agent.RpcError": "the guest agent's, with the agent protocol's string codes",
    "roam.guest.client.GuestAgentError": "the guest agent's, with its string codes",
    "roam.control.etcd.client._Retry": "control flow: this member cannot serve, try the next",
}


def _error_types() -> dict[str, type[BaseException]]:
    found = {}
    for module in pkgutil.walk_packages(roam.__path__, "roam."):
        if module.name.startswith("roam.demo") or module.name.endswith("__main__"):
            continue
        for name, value in vars(importlib.import_module(module.name)).items():
            if (inspect.isclass(value) and issubclass(value, BaseException)
                    and value.__module__ == module.name):
                found[f"{module.name}.{name}"] = value
    return found


def test_every_error_is_a_roam_error_with_a_code() -> None:
    types = _error_types()
    assert "roam.storage.provider.StorageError" in types
    strays = sorted(n for n, t in types.items()
                    if not issubclass(t, RoamError) and n not in NOT_ROAM_ERRORS)
    assert strays == []
    assert all(isinstance(t.code, ErrorCode) for t in types.values()
               if issubclass(t, RoamError))
    assert set(NOT_ROAM_ERRORS) <= set(types)  # the list stays true
