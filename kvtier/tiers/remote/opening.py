"""Opening the valkey-py clients a RemoteClient runs on, checked before use: a standalone
server's pool (the packer that sends Parts unjoined, sendmsg writes) or a cluster client.

RemoteError with the fix when one cannot be used; opens and checks, never stores or reads a
value (client.py does).
"""

from __future__ import annotations

from typing import Any

from kvtier.errors import RemoteError
from kvtier.tiers.remote.connect import (
    buffers_connection,
    connect_error,
    connection_options,
    parts_packer,
    probe_options,
)
from kvtier.tiers.remote.url import RemoteSpec

try:
    import valkey
    from valkey.cluster import ClusterNode, ValkeyCluster
    from valkey.exceptions import NoPermissionError, ValkeyClusterException, ValkeyError
except ImportError:  # pragma: no cover - RemoteClient.connect() refuses first without the extra
    pass

BUFFER_CUTOFF = 6000  # valkey-py's own: arguments longer than this are sent as separate buffers


def open_standalone(spec: RemoteSpec) -> Any:
    """A valkey.Valkey on a pool of the spec's one node, after checking it answers and is not a
    cluster node. Blocks for at most about timeout_ms."""
    node = spec.nodes[0]
    # (SSL sockets have no sendmsg: TLS connections send buffer by buffer)
    connection_class = valkey.SSLConnection if spec.tls else buffers_connection()
    pool = valkey.ConnectionPool(
        connection_class=connection_class,
        host=node.host,
        port=node.port,
        db=spec.db,
        # With libvalkey installed valkey-py packs each command into one bytes object,
        # copying every value: 8 MiB SETs ran at 370-550 MiB/s instead of 1000-1300
        # (loopback, 2-core dev box). The Python packer sends large values as they are.
        # (ValkeyCluster drops this option; cluster nodes use whatever valkey-py picks.)
        command_packer=parts_packer(BUFFER_CUTOFF),
        **connection_options(spec),
    )
    client = valkey.Valkey(connection_pool=pool)
    try:
        cluster_enabled = client.info("cluster").get("cluster_enabled")
    except ValkeyError as exc:
        pool.disconnect()
        raise connect_error(spec, node, exc) from None
    if cluster_enabled == 1:
        pool.disconnect()
        raise RemoteError(
            f"valkey at {node} runs in cluster mode; list its nodes in remote.url "
            "or set remote.cluster = true"
        )
    return client


def open_cluster(spec: RemoteSpec) -> Any:
    """A ValkeyCluster client, after finding a node that answers (so errors name the cause).
    Blocks for at most about timeout_ms per node it tries."""
    options = connection_options(spec)
    first_error: RemoteError | None = None
    for node in spec.nodes:  # find a node that answers, so the error names the real cause
        probe = valkey.Valkey(host=node.host, port=node.port, **probe_options(spec, options))
        try:
            probe.ping()
            break
        except ValkeyError as exc:
            first_error = first_error or connect_error(spec, node, exc)
        finally:
            probe.close()
    else:
        assert first_error is not None
        raise first_error
    try:
        cluster = ValkeyCluster(
            startup_nodes=[ClusterNode(node.host, node.port) for node in spec.nodes],
            cluster_error_retry_attempts=0,
            require_full_coverage=False,
            **options,
        )
    except (ValkeyError, ValkeyClusterException) as exc:
        denied = _denied(exc)
        if denied is not None:  # valkey-py reports a CLUSTER SLOTS denied as "not enabled"
            raise connect_error(spec, spec.nodes[0], denied) from None
        if "Cluster mode is not enabled" in str(exc):
            raise RemoteError(
                f"valkey at {spec.nodes[0]} is not a cluster node; name one node in "
                "remote.url, or set remote.cluster = false"
            ) from None
        raise connect_error(spec, spec.nodes[0], exc) from None
    return cluster


def _denied(exc: BaseException) -> BaseException | None:
    """The NOPERM reply behind `exc` (ValkeyCluster wraps the one its CLUSTER SLOTS got in two
    exceptions of its own), or None."""
    seen: set[int] = set()
    error: BaseException | None = exc
    while error is not None and id(error) not in seen:
        if isinstance(error, NoPermissionError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None
