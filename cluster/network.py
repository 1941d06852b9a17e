"""Rendezvous addresses for process groups a role hosts (learner groups, weight transfer).

The address is the node's IP as Ray knows it (`ray.util.get_node_ip_address()`): the one other
nodes reach it by. `gethostbyname(gethostname())` is 127.0.1.1 on Debian-style hosts, which
no other node can reach, so multi-node groups could never form with it.
"""
from __future__ import annotations

import socket


def node_ip() -> str:
    """This node's IP for other nodes to reach; 127.0.0.1 outside Ray (one machine)."""
    try:
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except ImportError:
        pass
    return "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def host_and_free_port() -> tuple[str, int]:
    """This node's address and a free port: a rendezvous point hosted by the calling process."""
    return node_ip(), free_port()
