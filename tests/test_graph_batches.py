"""Training batches built from the graph (trainer/graph_batches.py): every example once, fewer distinct images."""

import random

import numpy as np

from trainer import graph_batches

EMPTY = -1


def clustered_examples(clusters=20, per_cluster=10, examples_per_image=5, seed=0):
    """Images in clusters, each image's 3 neighbours in its own cluster; several examples (queries) per image."""
    rng = np.random.default_rng(seed)
    positives, neighbors = [], []
    for image in range(clusters * per_cluster):
        cluster = image // per_cluster
        others = [cluster * per_cluster + i for i in range(per_cluster) if cluster * per_cluster + i != image]
        chosen = rng.choice(others, 3, replace=False).tolist()
        for _ in range(examples_per_image):
            positives.append(image)
            neighbors.append(chosen)
    return np.array(positives), np.array(neighbors)


def test_an_epoch_uses_every_example_at_most_once_in_full_batches():
    positives, neighbors = clustered_examples()
    sets = graph_batches.neighbor_sets(neighbors, EMPTY)
    batches = graph_batches.epoch_batches(positives, sets, 64, random.Random(3))
    assert len(batches) == len(positives) // 64
    used = np.concatenate(batches)
    assert all(len(b) == 64 for b in batches)
    assert len(set(used.tolist())) == len(used)  # the remainder (1,000 - 15 x 64) is dropped, nothing repeats
    # One example per positive image in a batch while there are enough images (200 here).
    assert np.mean([len(set(positives[b].tolist())) for b in batches]) > 60


def test_batches_hold_fewer_distinct_images_than_shuffled_ones():
    positives, neighbors = clustered_examples()
    sets = graph_batches.neighbor_sets(neighbors, EMPTY)
    built = graph_batches.epoch_batches(positives, sets, 64, random.Random(3))
    order = np.random.default_rng(3).permutation(len(positives))
    shuffled = [order[i:i + 64] for i in range(0, len(order) - 63, 64)]
    built_mean = np.mean([graph_batches.distinct_images(positives, sets, b) for b in built])
    shuffled_mean = np.mean([graph_batches.distinct_images(positives, sets, b) for b in shuffled])
    assert built_mean < 0.6 * shuffled_mean, (built_mean, shuffled_mean)


def test_padded_neighbour_slots_are_not_images_and_epochs_differ():
    positives = np.array([0, 1, 2, 3] * 4)
    neighbors = np.array([[1, EMPTY], [0, 2], [3, EMPTY], [2, EMPTY]] * 4)
    sets = graph_batches.neighbor_sets(neighbors, EMPTY)
    assert sets[0] == {1} and sets[1] == {0, 2}
    indices = graph_batches.batch_indices(positives, neighbors, EMPTY, 4, seed=5, repeat=True)
    epochs = [[next(indices).tolist() for _ in range(4)] for _ in range(2)]
    assert all(sorted(sum(epoch, [])) == list(range(16)) for epoch in epochs)
    assert epochs[0] != epochs[1]
    again = graph_batches.batch_indices(positives, neighbors, EMPTY, 4, seed=5, repeat=False)
    assert [b.tolist() for b in again] == epochs[0]  # seeded: the same first epoch
