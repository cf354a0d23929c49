"""Schedule families as data (gradflow.schedules): JSON round trip, exact simplex, one compilation."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gradflow  # noqa: F401  (float64)
from gradflow import schedules as S

N = 6


def examples():
    easy, hard, uniform = np.eye(N - 1)[0], np.eye(N - 1)[-1], np.full(N - 1, 1 / (N - 1))
    return [
        S.Constant(uniform),
        S.Step(2.5, easy, hard),
        S.PiecewiseConstant([0.1, 1.0], np.stack([easy, uniform, hard])),
        S.PiecewiseLinear([0.1, 1.0, 10.0], np.stack([easy, uniform, hard])),
        S.from_logits("piecewise_linear", np.random.default_rng(0).normal(size=(4, N - 1)), knots=[0.01, 0.1, 1, 10]),
    ]


@pytest.mark.parametrize("schedule", examples(), ids=lambda s: type(s).__name__)
def test_json_round_trip_and_simplex(schedule):
    record = json.loads(json.dumps(schedule.to_dict()))
    assert record["kind"] in S.KINDS
    back = S.from_dict(record)
    assert type(back) is type(schedule)
    for t in [0.0, 0.05, 0.1, 0.5, 1.0, 2.49, 2.5, 3.0, 10.0, 1e4]:
        probs = np.asarray(schedule(t))
        np.testing.assert_array_equal(np.asarray(back(t)), probs)
        assert probs.shape == (N - 1,) and np.all(probs >= 0)
        assert abs(probs.sum() - 1.0) < 1e-14
    assert back.n == N


@pytest.mark.parametrize("schedule", examples()[1:4], ids=lambda s: type(s).__name__)
def test_mean_probs_is_the_time_average(schedule):
    """Against Gauss-Legendre quadrature on each smooth piece (between jumps and knots)."""
    nodes, weights = np.polynomial.legendre.leggauss(60)
    for t0, t1 in [(0.0, 5.0), (0.3, 50.0), (0.0, 0.05)]:
        edges = np.unique([t0, t1] + [j for j in (0.1, 1.0, 2.5, 10.0) if t0 < j < t1])
        lo, hi = edges[:-1, None], edges[1:, None]
        ts = (0.5 * (hi - lo) * nodes + 0.5 * (hi + lo)).ravel()
        w = (0.5 * (hi - lo) * weights).ravel()
        values = np.asarray(jax.vmap(schedule)(jnp.asarray(ts)))
        np.testing.assert_allclose(np.asarray(schedule.mean_probs(t0, t1)), w @ values / (t1 - t0), atol=1e-9)


def test_two_schedules_share_one_compilation_and_vmap():
    easy, hard = np.eye(N - 1)[0], np.eye(N - 1)[-1]
    first = S.PiecewiseLinear([0.1, 1.0, 10.0], np.stack([easy, hard, hard]))
    second = S.PiecewiseLinear([0.2, 2.0, 20.0], np.stack([hard, easy, easy]))
    traces = []

    @jax.jit
    def at(schedule, t):
        traces.append(1)
        return schedule(t)

    np.testing.assert_allclose(at(first, 1.0), hard)
    np.testing.assert_allclose(at(second, 2.0), easy)
    assert len(traces) == 1
    stacked = jax.tree_util.tree_map(lambda a, b: jnp.stack([a, b]), first, second)
    out = jax.vmap(lambda s: s(0.05))(stacked)
    np.testing.assert_allclose(out, np.stack([easy, hard]))
    steps = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *[S.Step(s, easy, hard) for s in (1.0, 3.0)])
    np.testing.assert_allclose(jax.vmap(lambda s: s(2.0))(steps), np.stack([hard, easy]))


def test_gradient_flows_to_the_parameters():
    logits = jnp.zeros((3, N - 1))
    f = lambda z: S.from_logits("piecewise_linear", z, knots=[0.1, 1.0, 10.0])(0.5)[0]
    assert np.all(np.isfinite(np.asarray(jax.grad(f)(logits))))


def test_spec_parser():
    step = S.schedule_from_spec("step:t=2.5,before=easiest,after=hardest", N)
    assert isinstance(step, S.Step) and float(step.switch_time) == 2.5
    np.testing.assert_array_equal(step(1.0), np.eye(N - 1)[0])
    mix = S.schedule_from_spec("constant:mix0.1", N)
    np.testing.assert_allclose(mix(0.0), 0.1 * np.eye(N - 1)[0] + 0.9 * np.eye(N - 1)[-1])
    pwc = S.schedule_from_spec("pwc:boundaries=1|10,probs=easiest|uniform|0.5/0/0/0/0.5", N)
    np.testing.assert_allclose(pwc(20.0), [0.5, 0, 0, 0, 0.5])
    pwl = S.schedule_from_spec("pwl:knots=0.1|10,probs=d1|d5", N)
    np.testing.assert_allclose(pwl(1.0), [0.5, 0, 0, 0, 0.5])
    assert isinstance(S.schedule_from_spec(json.dumps(step.to_dict()), N), S.Step)


def test_spec_parser_reads_a_json_file(tmp_path):
    path = tmp_path / "schedule.json"
    path.write_text(json.dumps(examples()[3].to_dict()))
    assert isinstance(S.schedule_from_spec(str(path), N), S.PiecewiseLinear)
    with pytest.raises(ValueError, match="expected n-1"):
        S.schedule_from_spec(str(path), N + 1)


@pytest.mark.parametrize(
    "spec, field",
    [
        ("step:t=-1,before=easiest,after=hardest", "switch_time"),
        ("step:t=x,before=easiest,after=hardest", "t"),
        ("step:t=1,before=d9,after=hardest", "d9"),
        ("pwl:knots=1|0.1,probs=easiest|hardest", "knots"),
        ("pwc:boundaries=1,probs=easiest", "boundaries"),
        ("constant:0.5/0.5", "distribution"),
        ("constant:0.5/0.6/0/0/0", "sum to 1"),
        ("spline:t=1", "kind"),
        ("step:t=1,before=easiest", "keys"),
        ("missing.json", "cannot read"),
    ],
)
def test_bad_specs_name_the_field(spec, field):
    with pytest.raises(ValueError, match=field):
        S.schedule_from_spec(spec, N)


def test_validation_names_the_field():
    easy = np.eye(N - 1)[0]
    with pytest.raises(ValueError, match="probs"):
        S.Constant([0.5, 0.6, 0, 0, 0])
    with pytest.raises(ValueError, match=r"probs\[1\]"):
        S.PiecewiseConstant([1.0], np.stack([easy, -easy]))
    with pytest.raises(ValueError, match="before and after"):
        S.Step(1.0, easy, easy[:-1])
    with pytest.raises(ValueError, match="kind"):
        S.from_dict({"probs": [1.0]})
    with pytest.raises(ValueError, match="unknown"):
        S.from_dict({"kind": "constant", "probs": [1.0], "extra": 1})


def test_named_distribution_k_hardest():
    np.testing.assert_array_equal(S.named_distribution("k_hardest:2", 5), [0.0, 0.0, 0.5, 0.5])
    np.testing.assert_array_equal(S.named_distribution("k_hardest:4", 5), np.full(4, 0.25))
    with pytest.raises(ValueError, match="k must lie in 1..4"):
        S.named_distribution("k_hardest:5", 5)
