"""Structure: turn an unstructured mask into a hardware-friendly one.

refill (whole channels, paper Alg. 2), regroup (dense blocks by hypergraph partitioning,
Alg. 3), channel couplings found from the model's graph."""

from .coupling import ChannelGroup, channel_companions, channel_groups  # noqa: E402
from .partition import PartitionerError, partition_rows  # noqa: E402
from .refill import COUPLINGS, CRITERIA, refill, refill_counts  # noqa: E402
from .regroup import regroup, regroup_layer, regroup_settings, regroup_stats  # noqa: E402

__all__ = ["ChannelGroup", "channel_groups", "channel_companions", "refill", "refill_counts", "CRITERIA", "COUPLINGS",
           "regroup", "regroup_layer", "regroup_settings", "regroup_stats", "partition_rows",
           "PartitionerError"]
