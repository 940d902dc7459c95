"""The roles' defaults derive who talks to whom from the inventory's groups (deploy/ansible/filter_plugins):
one host keeps everything on loopback; a load balancer plus app hosts get private addresses, a shared
Redis with a password, and firewall rules that open each port to exactly the hosts that need it.

The second half renders the real role defaults with ansible-playbook against local inventories, so the
Jinja in defaults/main.yml is checked as Ansible evaluates it."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from ansible.errors import AnsibleFilterError

ROOT = Path(__file__).resolve().parents[2]
ANSIBLE_DIR = ROOT / "deploy" / "ansible"
BIN = Path(sys.executable).parent
# The filter plugin as Ansible loads it: a file in filter_plugins/, not an installed module.
_spec = importlib.util.spec_from_file_location("mlapi_topology", ANSIBLE_DIR / "filter_plugins" / "mlapi_topology.py")
assert _spec is not None and _spec.loader is not None
mlapi_topology = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mlapi_topology)
firewall_rules = mlapi_topology.firewall_rules
grpc_upstream_servers = mlapi_topology.grpc_upstream_servers
node_exporter_address = mlapi_topology.node_exporter_address
redis_address = mlapi_topology.redis_address
service_address = mlapi_topology.service_address
unreachable_instances = mlapi_topology.unreachable_instances
upstream_servers = mlapi_topology.upstream_servers

SINGLE = {"lb": ["one"], "app": ["one"], "redis": ["one"]}
CLUSTER = {"lb": ["lb1"], "app": ["app1", "app2"], "redis": ["lb1"]}
CLUSTER_VARS = {"lb1": {"private_ip": "10.0.1.10"}, "app1": {"private_ip": "10.0.1.21"},
                "app2": {"private_ip": "10.0.1.22", "app_instances": 3}}


def test_a_single_host_keeps_everything_on_loopback():
    hostvars = {"one": {"private_ip": "10.0.1.5"}}
    assert upstream_servers(["one"], SINGLE, hostvars) == ["127.0.0.1:8001", "127.0.0.1:8002"]
    assert grpc_upstream_servers(["one"], SINGLE, hostvars) == ["127.0.0.1:8501", "127.0.0.1:8502"]
    assert service_address("one", SINGLE, hostvars) == "127.0.0.1"
    assert redis_address("one", SINGLE, hostvars) == "127.0.0.1"
    assert firewall_rules("one", SINGLE, hostvars) == []


def test_a_cluster_reaches_each_app_hosts_instances_at_its_private_address():
    assert upstream_servers(["app1", "app2"], CLUSTER, CLUSTER_VARS) == [
        "10.0.1.21:8001", "10.0.1.21:8002", "10.0.1.22:8001", "10.0.1.22:8002", "10.0.1.22:8003"]
    assert service_address("app1", CLUSTER, CLUSTER_VARS) == "10.0.1.21"
    assert redis_address("app1", CLUSTER, CLUSTER_VARS) == "10.0.1.10"
    assert redis_address("lb1", CLUSTER, CLUSTER_VARS) == "127.0.0.1"


def test_a_cluster_opens_the_service_ports_to_the_lb_and_redis_to_the_app_hosts_only():
    assert firewall_rules("app2", CLUSTER, CLUSTER_VARS) == [
        {"port": port, "proto": "tcp", "from": "10.0.1.10"} for port in (8001, 8002, 8003, 8501, 8502, 8503)]
    assert firewall_rules("lb1", CLUSTER, CLUSTER_VARS) == [
        {"port": 6379, "proto": "tcp", "from": "10.0.1.21"}, {"port": 6379, "proto": "tcp", "from": "10.0.1.22"}]


def test_grpc_follows_the_instances_and_opens_to_the_load_balancers_only():
    hostvars = {**CLUSTER_VARS, "app1": {**CLUSTER_VARS["app1"], "app_grpc_port_prefix": "900"},
                "app2": {**CLUSTER_VARS["app2"], "app_grpc_enabled": "false"}}
    groups = {**CLUSTER, "monitoring": ["mon"]}
    hostvars["mon"] = {"private_ip": "10.0.1.30"}
    assert grpc_upstream_servers(["app1", "app2"], groups, hostvars) == ["10.0.1.21:9001", "10.0.1.21:9002"]
    grpc_rules = [r for r in firewall_rules("app1", groups, hostvars) if r["port"] in (9001, 9002)]
    # Prometheus scrapes the HTTP port: the monitoring host gets no gRPC rule.
    assert grpc_rules == [{"port": p, "proto": "tcp", "from": "10.0.1.10"} for p in (9001, 9002)]
    assert [r["port"] for r in firewall_rules("app2", groups, hostvars) if r["port"] > 8500] == [9100]
    assert grpc_upstream_servers(["app2"], groups, hostvars) == []


def test_an_lb_that_also_serves_keeps_its_own_instances_on_loopback():
    groups = {"lb": ["lb1"], "app": ["lb1", "app1"], "redis": ["lb1"]}
    assert upstream_servers(["lb1", "app1"], groups, CLUSTER_VARS) == [
        "127.0.0.1:8001", "127.0.0.1:8002", "10.0.1.21:8001", "10.0.1.21:8002"]


def test_a_monitoring_host_that_is_the_lb_needs_no_more_than_its_node_exporter_ports():
    groups = {**CLUSTER, "monitoring": ["lb1"]}
    assert node_exporter_address("lb1", groups, CLUSTER_VARS) == "127.0.0.1"
    assert node_exporter_address("app1", groups, CLUSTER_VARS) == "10.0.1.21"
    assert firewall_rules("app1", groups, CLUSTER_VARS) == [
        {"port": port, "proto": "tcp", "from": "10.0.1.10"} for port in (8001, 8002, 8501, 8502, 9100)]
    assert firewall_rules("lb1", groups, CLUSTER_VARS) == firewall_rules("lb1", CLUSTER, CLUSTER_VARS)


def test_a_monitoring_host_of_its_own_reaches_every_node_exporter_but_not_loopback_instances():
    groups = {**SINGLE, "monitoring": ["mon"]}
    hostvars = {"one": {"private_ip": "10.0.1.5"}, "mon": {"private_ip": "10.0.1.9"}}
    assert node_exporter_address("one", groups, hostvars) == "10.0.1.5"
    assert node_exporter_address("mon", groups, hostvars) == "127.0.0.1"
    assert firewall_rules("one", groups, hostvars) == [{"port": 9100, "proto": "tcp", "from": "10.0.1.9"}]
    assert firewall_rules("mon", groups, hostvars) == []
    # The single host's instances stay on loopback (NGINX is their client): the role refuses this layout.
    assert unreachable_instances("mon", groups, hostvars) == ["one"]
    assert unreachable_instances("lb1", {**CLUSTER, "monitoring": ["lb1"]}, CLUSTER_VARS) == []


def test_the_private_address_falls_back_to_the_facts_and_else_names_the_variable():
    groups = {"lb": ["lb1"], "app": ["app1"]}
    assert (
        service_address("app1", groups, {"app1": {"ansible_default_ipv4": {"address": "172.31.5.9"}}}) == "172.31.5.9"
    )
    with pytest.raises(AnsibleFilterError, match=r"app1.*private_ip"):
        service_address("app1", groups, {"app1": {}})


def test_an_empty_app_group_is_an_error_that_says_what_to_do():
    with pytest.raises(AnsibleFilterError, match="group app"):
        upstream_servers([], {"lb": ["lb1"], "app": []}, CLUSTER_VARS)


# --- the role defaults as Ansible renders them ----------------------------------------------------------

RENDER_PLAYBOOK = """
- hosts: all
  gather_facts: false
  connection: local
  vars_files:
    - {ansible}/roles/base/defaults/main.yml
    - {ansible}/roles/redis/defaults/main.yml
    - {ansible}/roles/app/defaults/main.yml
    - {ansible}/roles/nginx/defaults/main.yml
  tasks:
    - name: Write the derived settings of each host
      ansible.builtin.copy:
        dest: "{out}/{{{{ inventory_hostname }}}}.json"
        content: "{{{{ dict(keys | zip(query('vars', *keys))) | to_json }}}}"
        mode: "0644"
      vars:
        keys: [base_firewall_allowed_tcp_ports, base_firewall_deployment_rules, redis_bind, app_bind_address,
               app_rate_limit_storage_uri, app_trusted_proxies, app_ip_address_allow, nginx_upstream_servers,
               nginx_grpc_upstream_servers]
"""


def render(tmp_path: Path, inventory: dict) -> dict[str, dict]:
    (tmp_path / "inventory.json").write_text(json.dumps(inventory))
    playbook = tmp_path / "render.yml"
    playbook.write_text(RENDER_PLAYBOOK.format(ansible=ANSIBLE_DIR, out=tmp_path))
    env = {
        **os.environ,
        "ANSIBLE_CONFIG": str(ANSIBLE_DIR / "ansible.cfg"),
        "ANSIBLE_NOCOLOR": "1",
        "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
    }
    # The defaults are loaded as vars_files, which outrank the inventory: the password goes in as an extra var.
    result = subprocess.run(
        [
            str(BIN / "ansible-playbook"),
            "-i",
            str(tmp_path / "inventory.json"),
            "-e",
            "redis_password=s3cret",
            str(playbook),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return {path.stem: json.loads(path.read_text()) for path in tmp_path.glob("*.json") if path.stem != "inventory"}


def inventory(groups: dict[str, list[str]], hostvars: dict[str, dict]) -> dict:
    return {
        "all": {"vars": {"ansible_python_interpreter": sys.executable}},
        **{group: {"hosts": {h: hostvars.get(h, {}) for h in hosts}} for group, hosts in groups.items()},
    }


def test_the_role_defaults_of_a_single_host(tmp_path):
    hosts = render(tmp_path, inventory(SINGLE, {"one": {"private_ip": "10.0.1.5"}}))
    assert hosts["one"] == {
        "base_firewall_allowed_tcp_ports": [22, 80, 443],
        "base_firewall_deployment_rules": [],
        "redis_bind": ["127.0.0.1"],
        "app_bind_address": "127.0.0.1",
        "app_rate_limit_storage_uri": "redis://:s3cret@127.0.0.1:6379/0",
        "app_trusted_proxies": ["127.0.0.1", "::1"],
        "app_ip_address_allow": [],
        "nginx_upstream_servers": ["127.0.0.1:8001", "127.0.0.1:8002"],
        "nginx_grpc_upstream_servers": ["127.0.0.1:8501", "127.0.0.1:8502"],
    }


def test_the_role_defaults_of_a_load_balancer_and_two_app_hosts(tmp_path):
    hosts = render(tmp_path, inventory(CLUSTER, CLUSTER_VARS))
    lb, app = hosts["lb1"], hosts["app1"]
    assert lb["base_firewall_allowed_tcp_ports"] == [22, 80, 443]
    assert lb["redis_bind"] == ["127.0.0.1", "10.0.1.10"]
    assert lb["nginx_upstream_servers"] == [
        "10.0.1.21:8001",
        "10.0.1.21:8002",
        "10.0.1.22:8001",
        "10.0.1.22:8002",
        "10.0.1.22:8003",
    ]
    assert app["base_firewall_allowed_tcp_ports"] == [22]
    assert lb["nginx_grpc_upstream_servers"] == [
        "10.0.1.21:8501", "10.0.1.21:8502", "10.0.1.22:8501", "10.0.1.22:8502", "10.0.1.22:8503"]
    assert app["base_firewall_deployment_rules"] == [
        {"port": port, "proto": "tcp", "from": "10.0.1.10"} for port in (8001, 8002, 8501, 8502)]
    assert app["app_bind_address"] == "10.0.1.21"
    assert app["app_rate_limit_storage_uri"] == "redis://:s3cret@10.0.1.10:6379/0"
    assert app["app_trusted_proxies"] == ["127.0.0.1", "::1", "10.0.1.10"]
    assert app["app_ip_address_allow"] == ["10.0.1.21", "10.0.1.10"]
