"""Every deprecated name lives in gradflow._deprecated, keeps working, and warns once naming its replacement."""

import warnings

import numpy as np
import pytest

import gradflow as gf
from gradflow import _deprecated, model, sampling, theory, training

MODULE_ALIASES = [alias for alias in _deprecated.ALIASES if ":" in alias.old]


def _fresh(old):
    _deprecated._WARNED.discard(old)


def _warnings_of(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = fn()
    return value, [w for w in caught if issubclass(w.category, DeprecationWarning)]


@pytest.mark.parametrize("alias", MODULE_ALIASES, ids=lambda a: a.old)
def test_module_alias_resolves_to_its_replacement_and_warns_once(alias):
    module, _, name = alias.old.partition(":")
    _fresh(alias.old)
    first, caught = _warnings_of(lambda: getattr(__import__(module, fromlist=[name]), name))
    assert len(caught) == 1 and alias.old in str(caught[0].message) and alias.new in str(caught[0].message)
    second, again = _warnings_of(lambda: getattr(__import__(module, fromlist=[name]), name))
    assert again == []  # once per process
    expected = _deprecated._resolve(alias.target)
    if isinstance(expected, gf.Theta):
        np.testing.assert_array_equal(first.as_array(), expected.as_array())
    else:
        assert first is expected and second is expected


def test_unknown_module_attribute_still_raises():
    with pytest.raises(AttributeError, match="no attribute 'nosuch'"):
        sampling.nosuch  # noqa: B018
    with pytest.raises(AttributeError):
        theory.nosuch  # noqa: B018


def test_renamed_property_and_int_task_warn_once():
    theta, task = gf.Theta(0.3, 0.0, 0.0), gf.ChainTask.uniform(5)
    steps = gf.step_probabilities(theta, task, gf.ModelSpec())
    _fresh("StepProbabilities.self")
    stay, caught = _warnings_of(lambda: steps.self)
    assert stay is steps.stay and len(caught) == 1 and "StepProbabilities.stay" in str(caught[0].message)
    assert _warnings_of(lambda: steps.self)[1] == []
    _fresh(_deprecated.INT_TASK)
    by_int, caught = _warnings_of(lambda: gf.step_probabilities(theta, 5, gf.ModelSpec()))
    assert len(caught) == 1 and "ChainTask" in str(caught[0].message)
    np.testing.assert_array_equal(by_int.forward, steps.forward)


def test_renamed_keyword_warns_and_refuses_a_contradiction():
    _fresh("gradflow.training.train(params=)")
    value, caught = _warnings_of(lambda: _deprecated.renamed_keyword("gradflow.training.train(params=)", "full", None))
    assert value == "full" and len(caught) == 1 and "train(coords=)" in str(caught[0].message)
    with pytest.raises(ValueError, match="contradicts coords"):
        _deprecated.renamed_keyword("gradflow.training.train(params=)", "full", "reduced")
    assert _deprecated.renamed_keyword("gradflow.training.train(params=)", None, "reduced") == "reduced"


def test_every_alias_names_a_replacement_that_exists():
    for alias in MODULE_ALIASES:
        assert _deprecated._resolve(alias.target) is not None
    assert hasattr(model.StepProbabilities, "stay") and "coords" in training.train.__code__.co_varnames
