"""Checks shared by the layer tests."""

import numpy as np


def roundtrip(layer):
    """A layer rebuilt from its config has the same config and weight shapes."""
    clone = type(layer).from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()
    assert [w.shape for w in clone.weights] == [w.shape for w in layer.weights]


def normal_kl(m1, s1, m2, s2):
    """KL(N(m1, s1) || N(m2, s2)), elementwise."""
    return np.log(s2 / s1) + (s1**2 + (m1 - m2) ** 2) / (2 * s2**2) - 0.5
