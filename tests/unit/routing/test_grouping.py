"""Task grouping: deterministic, order-independent, and it finds planted clusters."""

from __future__ import annotations

import numpy as np
import pytest

from routing.grouping import group_names, group_tasks, spherical_kmeans, task_means


def _planted(seed: int = 0) -> dict[str, np.ndarray]:
    """Three well-separated directions, four tasks around each."""
    rng = np.random.default_rng(seed)
    centers = np.eye(16)[:3]
    tasks = {}
    for c, center in enumerate(centers):
        for i in range(4):
            v = center + 0.05 * rng.standard_normal(16)
            tasks[f"cluster{c}_task{i}"] = v / np.linalg.norm(v)
    return tasks


def test_groups_are_deterministic_and_order_independent() -> None:
    tasks = _planted()
    first = group_tasks(tasks, 3, seed=7)
    again = group_tasks(dict(reversed(list(tasks.items()))), 3, seed=7)
    assert first == again
    assert first.to_json() == again.to_json()


def test_planted_clusters_are_found() -> None:
    grouping = group_tasks(_planted(), 3, seed=0)
    found = sorted(sorted(g.tasks) for g in grouping.groups)
    assert found == [[f"cluster{c}_task{i}" for i in range(4)] for c in range(3)]
    names = [g.name for g in grouping.groups]
    # One word for all: the first group takes it, the others fall back to "tasks".
    assert names == ["spec-0-cluster", "spec-1-tasks", "spec-2-tasks"]


def test_an_outlier_task_joins_the_nearest_group_instead_of_its_own() -> None:
    tasks = _planted()
    outlier = np.eye(16)[0] * 0.6 + np.eye(16)[5] * 0.8  # its own direction, nearest cluster0
    tasks["outlier"] = outlier
    alone = group_tasks(tasks, 4, seed=0, min_tasks=1)
    assert ["outlier"] in [g.tasks for g in alone.groups]
    folded = group_tasks(tasks, 4, seed=0)
    assert len(folded.groups) == 3
    assert sorted(next(g.tasks for g in folded.groups if "outlier" in g.tasks)) == sorted(
        ["outlier", *(f"cluster0_task{i}" for i in range(4))]
    )


def test_more_groups_than_tasks_gives_one_task_each() -> None:
    tasks = dict(list(_planted().items())[:2])
    grouping = group_tasks(tasks, 8, seed=0)
    assert sorted(len(g.tasks) for g in grouping.groups) == [1, 1]


def test_kmeans_centroids_are_unit_and_counts_add_up() -> None:
    x = np.random.default_rng(1).standard_normal((50, 8))
    result = spherical_kmeans(x, 4, seed=3)
    assert np.allclose(np.linalg.norm(result.centroids, axis=1), 1.0)
    assert sum(result.counts) == 50
    assert all(c > 0 for c in result.counts)
    again = spherical_kmeans(x, 4, seed=3)
    assert np.array_equal(result.assignment, again.assignment)
    with pytest.raises(ValueError):
        spherical_kmeans(x, 51, seed=0)


def test_task_means_are_normalized_per_task() -> None:
    vectors = np.array([[1.0, 0.0], [0.0, 1.0], [3.0, 0.0]])
    means = task_means(["a", "b", "a"], vectors)
    assert np.allclose(means["a"], [1.0, 0.0])
    assert np.allclose(means["b"], [0.0, 1.0])


def test_group_names_use_the_common_word() -> None:
    names = group_names(
        [
            [
                "natural_instructions/subtask010_mctaco_answer_generation_event_duration",
                "natural_instructions/subtask003_mctaco_question_generation_event_duration",
            ],
            ["arithmetic/1_digit_addition", "arithmetic/2_digit_subtraction"],
        ]
    )
    assert names == ["spec-0-duration", "spec-1-arithmetic"]
    # The word specific to a group wins over one every group shares.
    shared = group_names([["mctaco_alpha", "mctaco_beta"], ["mctaco_gamma", "drop_gamma"]])
    assert shared == ["spec-0-mctaco", "spec-1-gamma"]
