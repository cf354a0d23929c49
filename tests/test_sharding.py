"""simulate_many(devices=...) on a 4-device CPU mesh gives the unsharded results (5 configs: padding).

XLA_FLAGS=--xla_force_host_platform_device_count=4 must be set before jax starts, so the check runs
in a subprocess.
"""

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import jax, numpy as np
    import gradflow as gf
    from gradflow.flow import FlowParams, simulate_many
    assert len(jax.devices()) == 4, jax.devices()
    ts = np.array([0.0, 0.5, 1.0, 3.0])
    configs = [FlowParams(gf.ChainTask.uniform(4), theta0=gf.Theta(0.1 * (k + 1), 0.0, 0.0), t1=3.0, save_ts=ts)
               for k in range(5)]
    plain = simulate_many(configs)
    sharded = simulate_many(configs, devices=jax.devices())
    assert len(sharded) == 5
    for a, b in zip(plain, sharded):
        for name in ("theta", "reward", "forward_prob", "expected_length"):
            np.testing.assert_allclose(getattr(a, name), getattr(b, name), rtol=1e-12, atol=1e-14)
        assert a.events.keys() == b.events.keys(), (a.events, b.events)
        for key, x in a.events.items():  # root-found times: equal to the event solver's tolerance
            y = b.events[key]
            assert (x is None) == (y is None) and (x is None or abs(x - y) <= 1e-7 * abs(x)), (key, x, y)
        assert a.stats["num_steps"] == b.stats["num_steps"], (a.stats, b.stats)
    print("SHARDING_OK", [round(float(t.reward[-1]), 6) for t in sharded])
    """
)


@pytest.mark.slow
def test_sharded_simulate_many_matches_unsharded():
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()
    env["JAX_PLATFORMS"] = "cpu"
    result = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SHARDING_OK" in result.stdout
