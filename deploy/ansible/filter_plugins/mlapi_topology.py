"""Who talks to whom, derived from the inventory's groups, so that going from one host to a load
balancer plus several app hosts is an inventory edit and nothing else.

Groups: ``lb`` (NGINX and TLS), ``app`` (the service instances), ``redis`` (the shared rate-limit
store), ``monitoring`` (Prometheus, which scrapes every host). One host in all of them is the single-host
layout: everything stays on loopback. Otherwise hosts
reach each other at their private address: the host variable ``private_ip`` (the EC2 private IPv4, the
sandbox's bridge address), else the address of the default route that Ansible's facts report.

Each role takes its defaults from these filters; an inventory may still set any role variable itself.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from ansible.errors import AnsibleFilterError

LOOPBACK = "127.0.0.1"
# The app role's defaults, for app hosts whose inventory does not set them.
APP_INSTANCES = 2
APP_PORT_PREFIX = "800"
# Instance N of an app host serves gRPC on <app_grpc_port_prefix>N unless app_grpc_enabled is false.
APP_GRPC_PORT_PREFIX = "850"
# The monitoring role's default, for hosts whose inventory does not set it.
NODE_EXPORTER_PORT = 9100


def _vars(hostvars: Mapping[str, Any], host: str) -> Mapping[str, Any]:
    try:
        return hostvars[host]
    except KeyError:
        raise AnsibleFilterError(f"host {host!r} is in a group but not in the inventory's hosts") from None


def private_address(host: str, hostvars: Mapping[str, Any]) -> str:
    """The address other hosts of the deployment reach `host` at."""
    host_vars = _vars(hostvars, host)
    address = host_vars.get("private_ip")
    if not address:
        address = (host_vars.get("ansible_default_ipv4") or {}).get("address")
    if not address:
        raise AnsibleFilterError(
            f"host {host!r} needs its private address: set the host variable private_ip in the inventory "
            "(on EC2 the instance's private IPv4), or gather its facts in the same run"
        )
    return str(address)


def private_addresses(hosts: Iterable[str], hostvars: Mapping[str, Any]) -> list[str]:
    return [private_address(host, hostvars) for host in hosts]


def _local_only(host: str, group: str, groups: Mapping[str, list[str]]) -> bool:
    """Whether every host of `group` is `host` itself (an empty group has no host elsewhere either)."""
    return set(groups.get(group, [])) <= {host}


def service_address(host: str, groups: Mapping[str, list[str]], hostvars: Mapping[str, Any]) -> str:
    """Where `host`'s service instances listen: loopback when the one load balancer is `host` itself
    (NGINX on the same host is their only client, and Prometheus must run there too), else the private
    address, which the firewall opens to the load balancers and monitoring hosts only."""
    if list(groups.get("lb", [])) == [host]:
        return LOOPBACK
    return private_address(host, hostvars)


def unreachable_instances(monitor: str, groups: Mapping[str, list[str]], hostvars: Mapping[str, Any]) -> list[str]:
    """The app hosts whose instances listen on loopback on another host than `monitor`: its Prometheus
    cannot scrape them."""
    return [host for host in groups.get("app", [])
            if host != monitor and service_address(host, groups, hostvars) == LOOPBACK]


def node_exporter_address(host: str, groups: Mapping[str, list[str]], hostvars: Mapping[str, Any]) -> str:
    """Where `host`'s node exporter listens: loopback on the monitoring host itself, else the private
    address, which the firewall opens to the monitoring hosts only."""
    if _local_only(host, "monitoring", groups):
        return LOOPBACK
    return private_address(host, hostvars)


def upstream_servers(app_hosts: Iterable[str], groups: Mapping[str, list[str]],
                     hostvars: Mapping[str, Any]) -> list[str]:
    """Every instance of every app host as address:port, the NGINX upstream."""
    servers = []
    for host in app_hosts:
        host_vars = _vars(hostvars, host)
        address = service_address(host, groups, hostvars)
        prefix = str(host_vars.get("app_port_prefix", APP_PORT_PREFIX))
        count = int(host_vars.get("app_instances", APP_INSTANCES))
        servers += [f"{address}:{prefix}{instance}" for instance in range(1, count + 1)]
    if not servers:
        raise AnsibleFilterError("the app group has no hosts: put the hosts that run the service in group app")
    return servers


def grpc_upstream_servers(app_hosts: Iterable[str], groups: Mapping[str, list[str]],
                          hostvars: Mapping[str, Any]) -> list[str]:
    """The gRPC port of every instance of every app host that serves gRPC, as address:port; empty when
    none does (NGINX then has no gRPC location)."""
    servers = []
    for host in app_hosts:
        address = service_address(host, groups, hostvars)
        servers += [f"{address}:{port}" for port in grpc_ports(host, hostvars)]
    return servers


def app_ports(host: str, hostvars: Mapping[str, Any]) -> list[int]:
    host_vars = _vars(hostvars, host)
    prefix = str(host_vars.get("app_port_prefix", APP_PORT_PREFIX))
    return [int(f"{prefix}{i}") for i in range(1, int(host_vars.get("app_instances", APP_INSTANCES)) + 1)]


def grpc_ports(host: str, hostvars: Mapping[str, Any]) -> list[int]:
    """The gRPC ports of `host`'s instances; none when app_grpc_enabled is false."""
    host_vars = _vars(hostvars, host)
    if not _truthy(host_vars.get("app_grpc_enabled", True)):
        return []
    prefix = str(host_vars.get("app_grpc_port_prefix", APP_GRPC_PORT_PREFIX))
    return [int(f"{prefix}{i}") for i in range(1, int(host_vars.get("app_instances", APP_INSTANCES)) + 1)]


def _truthy(value: Any) -> bool:
    """An inventory boolean, which may arrive as the string "false"."""
    return value.strip().lower() not in ("false", "no", "off", "0", "") if isinstance(value, str) else bool(value)


def peers(host: str, group: str, groups: Mapping[str, list[str]]) -> list[str]:
    """The other hosts of `group`: those that reach `host` over the network rather than loopback."""
    return [other for other in groups.get(group, []) if other != host]


def firewall_rules(host: str, groups: Mapping[str, list[str]], hostvars: Mapping[str, Any]) -> list[dict]:
    """The ports `host` opens to other hosts of the deployment, and to them only: the service ports to
    the load balancers and monitoring hosts, the Redis port to the app hosts, the node exporter's port to
    the monitoring hosts, the gRPC ports to the load balancers. Empty on a single host."""
    rules = []
    monitors = private_addresses(peers(host, "monitoring", groups), hostvars)
    if host in groups.get("app", []) and service_address(host, groups, hostvars) != LOOPBACK:
        clients = list(dict.fromkeys(private_addresses(peers(host, "lb", groups), hostvars) + monitors))
        for port in app_ports(host, hostvars):
            rules += [{"port": port, "proto": "tcp", "from": address} for address in clients]
        # gRPC is NGINX's alone: Prometheus scrapes the HTTP port.
        lbs = private_addresses(peers(host, "lb", groups), hostvars)
        for port in grpc_ports(host, hostvars):
            rules += [{"port": port, "proto": "tcp", "from": address} for address in lbs]
    if host in groups.get("redis", []):
        port = int(_vars(hostvars, host).get("redis_port", 6379))
        rules += [{"port": port, "proto": "tcp", "from": address}
                  for address in private_addresses(peers(host, "app", groups), hostvars)]
    if monitors:
        port = int(_vars(hostvars, host).get("monitoring_node_exporter_port", NODE_EXPORTER_PORT))
        rules += [{"port": port, "proto": "tcp", "from": address} for address in monitors]
    return rules


def redis_address(host: str, groups: Mapping[str, list[str]], hostvars: Mapping[str, Any]) -> str:
    """Where `host`'s service instances find the rate-limit store: loopback when it runs on `host`
    (or no group names one), else the first redis host's private address."""
    redis_hosts = list(groups.get("redis", []))
    if not redis_hosts or host in redis_hosts:
        return LOOPBACK
    return private_address(redis_hosts[0], hostvars)


class FilterModule:
    def filters(self) -> dict:
        return {
            "mlapi_private_address": private_address,
            "mlapi_private_addresses": private_addresses,
            "mlapi_service_address": service_address,
            "mlapi_node_exporter_address": node_exporter_address,
            "mlapi_unreachable_instances": unreachable_instances,
            "mlapi_upstream_servers": upstream_servers,
            "mlapi_grpc_upstream_servers": grpc_upstream_servers,
            "mlapi_peers": peers,
            "mlapi_firewall_rules": firewall_rules,
            "mlapi_redis_address": redis_address,
        }
