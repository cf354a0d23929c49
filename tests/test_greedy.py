"""Greedy decoding read-outs (gradflow.greedy) against a brute-force argmax walk on the dense matrix."""

import numpy as np
import pytest
from helpers import case_id, random_theta
from reference import dense_matrix

import gradflow as gf
from gradflow import greedy


def brute_force(theta, n, model, cap, tie_break="first"):
    """(correct, reached, traversed, length) per start distance d by argmax over dense matrix rows."""
    out = np.zeros((4, n - 1), dtype=int)
    n_vertices = 2 * n + model.n_isolated
    for d in range(1, n):
        position = n - d
        p = dense_matrix(theta, n, model, position)
        pick = (
            (lambda row: int(np.argmax(row)))
            if tie_break == "first"
            else (lambda row: n_vertices - 1 - int(np.argmax(row[::-1])))
        )
        u, forward, length, reached, correct = position - 1, True, 0, False, False
        for _ in range(n_vertices if cap is None else cap):
            v = pick(p[u])
            forward &= v == u + 1
            length += 1
            u = v
            if v in (n - 1, 2 * n - 1):
                reached, correct = True, v == n - 1
                break
        out[:, d - 1] = correct, reached, forward and reached, length
    return out


def greedy_outcome(theta, task, model, tie_break="first"):
    per = greedy.greedy_per_start(theta, task, model, tie_break=tie_break)
    return np.stack([np.asarray(per.correct), np.asarray(per.reached), np.asarray(per.traversed), np.asarray(per.length)]).astype(
        int
    ), per


CASES = [
    (5, 6, dict(mask_self=False)),
    (5, None, dict(mask_self=False, n_isolated=2)),
    (4, 3, dict(attention="softmax", mask_self=True, n_isolated=1)),
    (6, None, dict(attention="softmax", mask_self=False, tau=0.05)),
]


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_matches_brute_force_argmax_walk(case, rng):
    n, cap, kw = case
    model = gf.ModelSpec(max_len=cap, **kw)
    task = gf.ChainTask.uniform(n)
    for _ in range(6):  # random theta: forward walks, stalls, cycles, jumps (far vertices of one degree
        theta = random_theta(rng)  # tie exactly: both walks take the first)
        for tie_break in greedy.TIE_BREAKS:
            got, _ = greedy_outcome(theta, task, model, tie_break)
            np.testing.assert_array_equal(got, brute_force(theta, n, model, cap, tie_break))


def test_metrics_average_the_starts(rng):
    n, model = 5, gf.ModelSpec(mask_self=False, max_len=6)
    task = gf.ChainTask(n, rng.dirichlet(np.ones(n - 1)))
    p = np.asarray(task.start_probs)
    for _ in range(4):
        theta = random_theta(rng)
        metrics = greedy.greedy_metrics(theta, task, model)
        per = metrics.per_start
        np.testing.assert_allclose(metrics.accuracy, p @ np.asarray(per.correct, float), rtol=1e-14)
        np.testing.assert_allclose(metrics.reach_rate, p @ np.asarray(per.reached, float), rtol=1e-14)
        np.testing.assert_allclose(metrics.traversal_accuracy, p @ np.asarray(per.traversed, float), rtol=1e-14)
        if metrics.reach_rate > 0:
            np.testing.assert_allclose(metrics.conditional_accuracy, metrics.accuracy / metrics.reach_rate, rtol=1e-14)
        else:
            assert np.isnan(metrics.conditional_accuracy)


def test_symmetric_model_ties_are_reported_and_follow_the_rule():
    """theta = (0.3, 0, 0), self-loops kept: self and forward tie at every vertex of chain a (beta =
    gamma = 0).  "first" takes the self-loop (a_i before a_{i+1}) and stalls: no terminal, with or
    without a cap (a cycle); "last" steps forward and traverses.  Masked self-loops: no tie."""
    n, theta = 5, gf.Theta(0.3, 0.0, 0.0)
    task = gf.ChainTask.uniform(n)
    for cap in (n + 1, None):
        model = gf.ModelSpec(mask_self=False, max_len=cap)
        first, per_first = greedy_outcome(theta, task, model, "first")
        last, per_last = greedy_outcome(theta, task, model, "last")
        np.testing.assert_array_equal(first, brute_force(theta, n, model, cap, "first"))
        np.testing.assert_array_equal(last, brute_force(theta, n, model, cap, "last"))
        np.testing.assert_array_equal(first[1], 0)  # stalls on the self-loop
        np.testing.assert_array_equal(last[2], 1)  # steps forward all the way
        np.testing.assert_array_equal(last[3], np.arange(1, n))
        assert np.all(per_first.tied) and np.all(per_last.tied)
        np.testing.assert_array_equal(per_first.margin, 0.0)
    assert greedy.greedy_path(theta, task, gf.ModelSpec(mask_self=False, max_len=3), 4) == ["a1", "a1", "a1"]
    assert greedy.greedy_path(theta, task, gf.ModelSpec(mask_self=False), 4, tie_break="last") == ["a2", "a3", "a4", "a5"]
    masked, per = greedy_outcome(theta, task, gf.ModelSpec(max_len=n + 1))
    np.testing.assert_array_equal(masked[2], 1)
    assert not np.any(per.tied)


def test_cap_shorter_than_the_path():
    """A perfect forward policy reaches within the cap only the starts with d <= max_len."""
    n, theta = 6, gf.Theta(3.0, -1.0, 0.5)  # self-loops kept: gamma > 0 beats the head self-loop
    per = greedy.greedy_per_start(theta, gf.ChainTask.uniform(n), gf.ModelSpec(mask_self=False, max_len=3))
    np.testing.assert_array_equal(per.reached, np.arange(1, n) <= 3)
    np.testing.assert_array_equal(per.traversed, np.arange(1, n) <= 3)
    np.testing.assert_array_equal(per.length, np.minimum(np.arange(1, n), 3))
    m = greedy.greedy_metrics(theta, gf.ChainTask.uniform(n), gf.ModelSpec(mask_self=False, max_len=3))
    np.testing.assert_allclose([m.accuracy, m.conditional_accuracy, m.reach_rate], [0.6, 1.0, 0.6], rtol=1e-14)


def test_bad_inputs_raise_value_error():
    task, theta = gf.ChainTask.uniform(3), gf.Theta(0.3, 0.0, 0.0)
    with pytest.raises(ValueError, match="tie_break"):
        greedy.greedy_per_start(theta, task, gf.ModelSpec(), tie_break="random")
    with pytest.raises(ValueError, match="context"):
        greedy.greedy_metrics(theta, task, gf.ModelSpec(context="history"))
    with pytest.raises(ValueError, match="max_len"):
        greedy.greedy_metrics(theta, task, gf.ModelSpec(), max_len=0)
    with pytest.raises(ValueError, match="distance"):
        greedy.greedy_path(theta, task, gf.ModelSpec(), 3)
