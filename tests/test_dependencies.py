"""The private dependency APIs gradflow holds in gradflow/_dependencies.py still exist and still mean the same.

These fail on a dependency release that moves them, before any result depends on a changed meaning.
"""

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import pytest

from gradflow import _dependencies


def test_result_codes_round_trip_every_diffrax_result():
    for name in ("successful", "max_steps_reached", "event_occurred", "nonlinear_divergence"):
        item = getattr(diffrax.RESULTS, name)
        code = int(_dependencies.result_code(item))
        assert _dependencies.is_result(code, item)
        assert not _dependencies.is_result(code + 1, item)
    assert int(_dependencies.result_code(diffrax.RESULTS.successful)) == _dependencies.SUCCESSFUL == 0  # theory reads 0
    assert _dependencies.result_code(diffrax.RESULTS.max_steps_reached).dtype == _dependencies.RESULT_DTYPE


def test_result_message_names_the_failure():
    code = int(_dependencies.result_code(diffrax.RESULTS.max_steps_reached))
    assert "max" in _dependencies.result_message(code).lower()
    assert _dependencies.result_message(10_000) == "result code 10000"


def test_runtime_checks_trace_without_host_callbacks():
    # two checks with their own messages: equinox caches a traced check, so each is traced once here
    with _dependencies.runtime_checks_as_nan():
        lowered = jax.jit(lambda x: eqx.error_if(x, x < 0, "negative, switched")).lower(jnp.asarray(1.0))
    assert "callback" not in lowered.as_text()
    assert jnp.isnan(lowered.compile()(jnp.asarray(-1.0)))  # a failed check returns NaN instead of raising
    plain = jax.jit(lambda x: eqx.error_if(x, x < 0, "negative, default")).lower(jnp.asarray(1.0))
    assert "callback" in plain.as_text()  # by default a runtime check is a host callback (never persistently cached)


def test_a_check_traced_both_ways_keeps_each_mode():
    """The same check (shapes and message) traced outside the switch, then inside, then outside again: each trace has
    its own mode.  equinox keeps one jitted check and JAX served its first trace again (a raising host callback inside
    a solve's program, depending on what the process traced before: a flaky slow test)."""
    check = lambda x: eqx.error_if(x, x < 0, "negative, both ways")
    x = jnp.arange(3.0)
    assert "callback" in jax.jit(lambda y: check(y) * 2).lower(x).as_text()
    with _dependencies.runtime_checks_as_nan():
        inside = jax.jit(lambda y: check(y) * 3).lower(x)
    assert "callback" not in inside.as_text() and bool(jnp.all(jnp.isnan(inside.compile()(-x - 1))))
    assert "callback" in jax.jit(lambda y: check(y) * 4).lower(x).as_text()


def test_runtime_checks_switch_is_restored():
    before = _dependencies.equinox_errors.EQX_ON_ERROR
    before_jit = _dependencies.equinox_errors.branched_error_if_impl_jit
    with pytest.raises(RuntimeError), _dependencies.runtime_checks_as_nan():
        raise RuntimeError("inside")
    assert _dependencies.equinox_errors.EQX_ON_ERROR == before
    assert _dependencies.equinox_errors.branched_error_if_impl_jit is before_jit
