"""Config: the one frozen record of settings; bad values and unknown names are refused with what was received."""

import dataclasses

import pytest

from tfp_scmix import config
from tfp_scmix.config import Config


@pytest.mark.parametrize(
    "changes, named",
    [
        ({"prior": "laplace"}, r"prior must be one of .*'laplace'"),
        ({"label_mode": "semi"}, r"label_mode must be one of .*'semi'"),
        ({"n_topics": 0}, "n_topics must be a positive whole number, received 0"),
        ({"hidden_units": -3}, "hidden_units must be a positive whole number, received -3"),
        ({"n_predictive_samples": 0}, "n_predictive_samples must be a positive whole number, received 0"),
        ({"epochs": 0}, "epochs must be a positive whole number, received 0"),
        ({"batch_size": 0}, "batch_size must be a positive whole number, received 0"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\), received 1.0"),
        ({"dropout": -0.1}, r"dropout must be in \[0, 1\), received -0.1"),
        ({"learning_rate": 0.0}, "learning_rate must be positive, received 0.0"),
        ({"classifier_learning_rate": -1e-3}, "classifier_learning_rate must be positive, received -0.001"),
        ({"prior_alpha": 0.0}, "prior_alpha must be positive, received 0.0"),
        ({"topic_prior_scale": -1.0}, "topic_prior_scale must be positive, received -1.0"),
        ({"slab_scale": 0.0}, "slab_scale must be positive, received 0.0"),
        ({"classifier_steps": -1}, "classifier_steps.* must not be negative, received -1"),
        ({"kl_warmup_epochs": -2.0}, "kl_warmup_epochs.* must not be negative, received .*-2.0"),
        ({"label_weight": -0.5}, "label_weight must not be negative, received .*-0.5"),
        ({"n_topics": "20"}, "n_topics must be a positive whole number, received '20'"),  # was a TypeError
        ({"learning_rate": "0.01"}, "learning_rate must be positive, received '0.01'"),
        ({"kl_warmup_epochs": "3"}, "kl_warmup_epochs must not be negative, received '3'"),
        ({"dropout": "0.1"}, r"dropout must be in \[0, 1\), received '0.1'"),
    ],
)
def test_bad_values_are_refused_naming_setting_and_value(changes, named):
    with pytest.raises(ValueError, match=named):
        Config(**changes)
    with pytest.raises(ValueError, match=named):  # replace validates too
        Config().replace(**changes)
    with pytest.raises(ValueError, match=named):
        Config.from_dict(changes)


@pytest.mark.parametrize(
    "changes",
    [
        pytest.param({"label_noise": 1.5}, id="label_noise-not-a-switch"),
        pytest.param({"label_noise": "yes"}, id="label_noise-a-string"),
        pytest.param({"slab_df": -1.0}, id="slab_df<0"),
        pytest.param({"global_scale": -1.0}, id="global_scale<0"),
        pytest.param({"expected_active_topics": -2.0}, id="expected_active_topics<0"),
        pytest.param({"n_topics": 2.5}, id="n_topics-not-whole"),
        pytest.param({"balanced_classes": "yes"}, id="balanced_classes-a-string"),
        pytest.param({"self_training": 1}, id="self_training-a-number"),
    ],
)
def test_optional_settings_out_of_range_are_refused(changes):
    ((name, value),) = changes.items()
    with pytest.raises(ValueError, match=rf"{name}.*{value}"):
        Config(**changes)


def test_frozen_and_replace_returns_a_new_record():
    base = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        base.n_topics = 3
    changed = base.replace(n_topics=7, prior="horseshoe")
    assert (changed.n_topics, changed.prior) == (7, "horseshoe")
    assert (base.n_topics, base.prior) == (50, "regularized")  # the original is unchanged
    assert changed == Config(n_topics=7, prior="horseshoe") and changed != base
    assert hash(changed) == hash(Config(n_topics=7, prior="horseshoe"))  # usable as a key


def test_replace_and_from_dict_refuse_unknown_names():
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['n_topic'\]"):
        Config().replace(n_topic=3)
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['restarts', 'seed'\]"):
        Config.from_dict({"n_topics": 3, "seed": 0, "restarts": 2})
    with pytest.raises(TypeError):
        Config(n_topic=3)


def test_dict_round_trip_and_setting_groups():
    custom = Config(n_topics=9, label_noise=True, learn_alpha=True, global_scale=0.3, epochs=3)
    values = custom.to_dict()
    assert values["n_topics"] == 9 and values["label_noise"] is True and values["global_scale"] == 0.3
    assert Config.from_dict(values) == custom
    assert tuple(values) == config.names() == tuple(f.name for f in dataclasses.fields(Config))
    # Every setting is either a model or a training setting, never both.
    assert config.MODEL_SETTINGS + config.TRAINING_SETTINGS == config.names()
    assert {
        "epochs",
        "batch_size",
        "learning_rate",
        "classifier_learning_rate",
        "classifier_steps",
        "balanced_classes",
        "self_training",
    } == set(config.TRAINING_SETTINGS)
    assert set(config.PRIORS) == {"normal", "horseshoe", "regularized", "santa_barbara"}
    assert set(config.LABEL_MODES) == {"cut", "joint", "class_prior"}
    for prior in config.PRIORS:
        for mode in config.LABEL_MODES:
            assert Config(prior=prior, label_mode=mode).prior == prior


def test_whole_number_floats_are_stored_as_integers():
    """20.0 topics (from a TOML file or a tuner) is 20: a trial's model trained with n_topics=20.0 saved and then
    could not be loaded (its saved config held 20.0, which loading refused)."""
    settings = Config(n_topics=20.0, epochs=10.0, batch_size=256.0, classifier_steps=0.0)
    assert (settings.n_topics, settings.epochs, settings.batch_size, settings.classifier_steps) == (20, 10, 256, 0)
    assert all(type(v) is int for v in (settings.n_topics, settings.epochs, settings.batch_size))
    assert Config.from_dict(settings.to_dict()) == settings
