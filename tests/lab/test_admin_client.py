"""The operator's REST client (``bastion.client.AdminClient``) the tradeoff sweep drives the
server with: keys, tenants' limits and defense classes, ``/metrics``."""

from __future__ import annotations

import pytest

from bastion.client import ZOO_OUTCOMES, AdminClient, Client, ClientError
from bastion.guard.keystore import KeyStore
from tests.lab.conftest import LabServer

pytestmark = pytest.mark.slow


def test_admin_client_manages_a_tenant_and_reads_the_zoo_counters(lab_server: LabServer) -> None:
    with KeyStore(lab_server.keys_db) as store:
        admin_key, _ = store.create_key("admin-client-test", role="admin", description="AdminClient test")
    assert admin_key is not None
    with AdminClient(lab_server.url, admin_key) as admin:
        admin.wait_for_key(admin_key, "image")
        new = admin.create_key("admin-client-tenant", models=["image"], description="made over REST")
        assert new.tenant == "admin-client-tenant" and new.key_id and new.token not in str(new.info)
        admin.wait_for_key(new.token, "image")
        with Client(lab_server.url, api_key=new.token) as client:
            assert client.model_metadata("image")["name"] == "image"
        tenant = admin.set_limits("admin-client-tenant", quota=5, quota_period="total")
        assert tenant["limits"]["quota"] == 5 and tenant["limits"]["quota_period"] == "total"
        assert admin.set_defense_class("admin-client-tenant", "default")["defense_class"] == "default"
        with pytest.raises(ClientError) as bad:
            admin.set_defense_class("admin-client-tenant", "Not A Class!")
        assert bad.value.status == 400
        assert "bastion_zoo_requests" in admin.metrics_text()
        counters = admin.zoo_counters("image")
        assert set(counters.requests) >= set(ZOO_OUTCOMES)
    with Client(lab_server.url, api_key=new.token) as client, pytest.raises(ClientError) as refused:
        client.load("image_cnn")  # an infer key is no admin
    assert refused.value.status == 403


def test_waiting_for_an_unknown_key_gives_up_at_the_deadline(lab_server: LabServer) -> None:
    with Client(lab_server.url, api_key="bst_not-a-key") as client, pytest.raises(ClientError, match="still refused"):
        client.wait_until_accepted("image", timeout_s=0.5, interval_s=0.1)
