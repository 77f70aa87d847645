"""Training batches built from the graph: each example's neighbours are mostly other examples' positives.

With the graph term on, the image tower embeds every distinct image of a
batch: the positives and their graph neighbours (trainer/distinct_images.py).
In a random batch of 128 examples with 3 neighbours each, about 390 of the 512
image slots are distinct, so the step does about three times the tower work
of a step without the graph.  A batch whose examples are picked so that their
neighbours are already in it holds fewer distinct images: the same loss and
gradient per batch, with less work.

`epoch_batches` builds one epoch greedily.  A batch starts from a random
image; then, as long as some image already in the batch (as a positive or a
neighbour) has an example left that is not yet in the batch, it takes the
one that brings the fewest new images (its positive is in the batch already;
only its neighbours can be new), else it starts again from a random image.
Each example is used at most once per epoch, a batch holds at most one
example per positive image while it can, and the batches come out in random
order.  The remainder of an epoch that does not fill a batch is dropped, as
`drop_remainder` drops it.

What it changes besides speed: look-alike images become each other's
in-batch negatives more often (opt-in, `training.graph_batches`; README,
"Throughput").
"""

from __future__ import annotations

import collections
import random
from typing import Dict, Iterator, List, Sequence, Set

import numpy as np


def neighbor_sets(neighbors: np.ndarray, empty_key: int) -> List[Set[int]]:
    """int64 [N, K] neighbour keys (the empty id's key for a padded slot) -> each example's set of real keys."""
    return [set(row.tolist()) - {empty_key} for row in neighbors]


def epoch_batches(positives: Sequence[int], neighbors: Sequence[Set[int]], batch_size: int,
                  rng: random.Random) -> List[np.ndarray]:
    """One epoch of batches (int64 example indices, `batch_size` each, in random order); see the module doc."""
    queues: Dict[int, List[int]] = collections.defaultdict(list)
    for index in rng.sample(range(len(positives)), len(positives)):
        queues[int(positives[index])].append(index)
    live = list(queues)  # images that may still have examples (emptied ones are dropped lazily)
    most_new = max((len(n) for n in neighbors), default=0)
    remaining = len(positives)
    batches = []
    while remaining >= batch_size:
        in_batch: Set[int] = set()
        positives_in_batch: Set[int] = set()
        by_cost: List[List[int]] = [[] for _ in range(most_new + 1)]
        batch: List[int] = []

        def new_images(image: int) -> int:
            return len(neighbors[queues[image][-1]] - in_batch)

        def enter(image: int) -> None:
            in_batch.add(image)
            if queues.get(image) and image not in positives_in_batch:
                by_cost[new_images(image)].append(image)

        def cheapest():
            # Costs only fall as the batch grows, so a candidate filed under a cost brings at most that many.
            for candidates in by_cost:
                while candidates:
                    image = candidates.pop()
                    if image not in positives_in_batch and queues[image]:
                        return image
            return None

        def random_start():
            tries = 0
            while live:
                slot = rng.randrange(len(live))
                image = live[slot]
                if not queues[image]:
                    live[slot] = live[-1]
                    live.pop()
                    continue
                tries += 1
                if image not in positives_in_batch or tries > 2 * batch_size:
                    return image
            raise AssertionError("no example left for a batch that the count said could be filled")

        while len(batch) < batch_size:
            image = cheapest()
            if image is None:
                image = random_start()
            index = queues[image].pop()
            batch.append(index)
            positives_in_batch.add(image)
            in_batch.add(image)
            for neighbor in neighbors[index]:
                if neighbor not in in_batch:
                    enter(neighbor)
        remaining -= batch_size
        batches.append(np.asarray(batch, np.int64))
    rng.shuffle(batches)
    return batches


def batch_indices(positives: np.ndarray, neighbors: np.ndarray, empty_key: int, batch_size: int, seed: int,
                  repeat: bool) -> Iterator[np.ndarray]:
    """Index batches epoch after epoch (forever with `repeat`), a new greedy epoch each time, seeded."""
    sets = neighbor_sets(neighbors, empty_key)
    rng = random.Random(seed)
    while True:
        yield from epoch_batches(positives, sets, batch_size, rng)
        if not repeat:
            return


def distinct_images(positives: np.ndarray, neighbors: Sequence[Set[int]], batch: np.ndarray) -> int:
    """How many distinct images a batch's positives and neighbours hold."""
    images = {int(positives[i]) for i in batch}
    for i in batch:
        images |= neighbors[i]
    return len(images)
