"""The Redis Cluster client (`[redis] cluster = true`): redis-py's, steered to our slot.

Every key shares one hash tag (keys.py), so all the data, and every script call, is on
the master of one slot. redis-py sends keyed commands there by itself and follows
MOVED/ASK; what it sends elsewhere is steered here, so a master down elsewhere in the
cluster (no replica, `cluster-require-full-coverage no`) stops nothing of ours:

- PING, TIME (the agent's clock offset) and SCRIPT LOAD go to that master, not to
  every master;
- XREAD too (redis-py would first ask some node for its key with COMMAND GETKEYS);
- the command table redis-py reads at every (re)connect comes from that master, which
  is also the default node, not the master of slot 0;
- the slot map is read before the first command, so that command goes by its key.
"""

from __future__ import annotations

from typing import Any

from redis._parsers import AsyncCommandsParser
from redis.asyncio.cluster import ClusterNode, RedisCluster

# redis-py's cluster client cannot wait for a free connection, it fails at its cap;
# this one (per node) is far above what one event loop keeps busy.
MAX_CONNECTIONS = 1024
_TO_OUR_SLOT = frozenset({"PING", "TIME", "SCRIPT LOAD", "XREAD"})


class ClusterClient(RedisCluster):
    home_key = ""  # any one of our keys: it names the slot

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.commands_parser = _CommandTableFromOurSlot(self)

    def home_node(self) -> ClusterNode:
        """The master of our slot, from the slot map (kept current by MOVED replies)."""
        return self.get_node_from_key(self.home_key)

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        # The slot map first, from the seed: redis-py (8.1) takes a keyed command sent
        # before it has one for keyless and sends it to a random master.
        await self.initialize()
        if args[0] in _TO_OUR_SLOT and "target_nodes" not in kwargs:
            kwargs["target_nodes"] = self.home_node()
        return await super().execute_command(*args, **kwargs)


class _CommandTableFromOurSlot(AsyncCommandsParser):
    __slots__ = ("client",)

    def __init__(self, client: ClusterClient) -> None:
        super().__init__()
        self.client = client

    async def initialize(self, node: ClusterNode | None = None) -> None:
        home = self.client.home_node()  # the slot map is read just before this
        self.client.set_default_node(home)
        await super().initialize(home)


def cluster_client(url: str, home_key: str, **options: Any) -> ClusterClient:
    """A client of the cluster that `url` (any one node, a seed) belongs to."""
    client = ClusterClient.from_url(url, max_connections=MAX_CONNECTIONS, **options)
    client.home_key = home_key
    return client
