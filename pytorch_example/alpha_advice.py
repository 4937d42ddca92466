"""When `DirichletPartitioner` cannot satisfy `dirichlet-alpha`: which alpha would work.

The partitioner retries random draws until every partition holds its minimum; past
its retries it gives up. The data layer then names an alpha that works, found here.
"""

import time
import warnings
from collections.abc import Callable

from pytorch_example.config import Partitioning

# Dirichlet concentrations offered when the configured one cannot be satisfied.
ALPHA_LADDER = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0)
ALPHA_SEARCH_S = 20.0


def can_assign(partitioner) -> bool:
    """Whether the partitioner finds partitions of its minimum size within its retries."""
    with warnings.catch_warnings():
        # It warns on every failed try; the caller reports the outcome in one line.
        warnings.simplefilter("ignore", UserWarning)
        try:
            partitioner.load_partition(0)
        except ValueError:
            return False
    return True


def why_unsatisfiable(
    num_rows: int, partitioning: Partitioning, min_partition_size: int, partitioner_for: Callable
) -> str:
    """Why the partitioner gave up on `num_rows` rows, and the smallest concentration
    that works here (`partitioner_for(alpha)` makes the partitioner to try)."""
    message = (
        f"alpha {partitioning.dirichlet_alpha} leaves some of the {partitioning.num_partitions} "
        f"partitions of {num_rows} images with fewer than the partitioner's minimum of "
        f"{min_partition_size} in every try"
    )
    most_partitions = num_rows // min_partition_size
    if partitioning.num_partitions > most_partitions:
        return f"{message}, whatever alpha: use at most {most_partitions} partitions"
    deadline = time.monotonic() + ALPHA_SEARCH_S
    for alpha in (candidate for candidate in ALPHA_LADDER if candidate > partitioning.dirichlet_alpha):
        if time.monotonic() > deadline:
            break
        if can_assign(partitioner_for(alpha)):
            return f"{message}: use {alpha} or more, or fewer partitions"
    return f"{message}: use a larger alpha or fewer partitions"
