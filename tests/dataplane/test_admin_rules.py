"""The plane's rules on repository actions, the same for REST and gRPC."""

from __future__ import annotations

import pytest

from bastion.core.errors import InvalidInput
from bastion.dataplane.admin import check_repository_parameters


def test_repository_parameter_rules_refuse_client_supplied_models():
    check_repository_parameters("load", {})
    for key in ("config", "file:1/model.onnx"):
        with pytest.raises(InvalidInput, match="loads models only from its model repository"):
            check_repository_parameters("load", {key: "{}"})
    check_repository_parameters("unload", {"unload_dependents": False})
    with pytest.raises(InvalidInput, match="unknown unloading a model parameter; expected one of unload_dependents"):
        check_repository_parameters("unload", {"other": True})
    with pytest.raises(InvalidInput, match="unknown loading a model parameter; none are supported"):
        check_repository_parameters("load", {"other": True})
