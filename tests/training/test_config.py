"""training/config.py: run configurations, their tfp_scmix.Config, their parameters, their mistakes."""

import dataclasses
import re

import pytest

import tfp_scmix as scm
from training import config


def test_config_rejects_mistakes_with_the_fix(tmp_path, small_config, config_file):
    where = re.escape(f"{config_file} [model]")  # each message names the file and the table
    with pytest.raises(
        config.ConfigError,
        match=rf"{where}: unknown setting\(s\) \['n_topic' \(from --set\)\] "
        r"\(did you mean 'n_topics'\?\); \[model\] takes",
    ):
        small_config("model.n_topic=5")
    with pytest.raises(config.ConfigError, match=r"\[model\]: \['epochs'\] belong to \[training\]: move them"):
        small_config("model.epochs=5")
    with pytest.raises(config.ConfigError, match=r"\[training\]: \['n_topics'\] belong to \[model\]: move them"):
        small_config("training.n_topics=5")
    with pytest.raises(config.ConfigError, match="n_validation .* smaller than the label budget"):
        small_config("data.n_validation=150")
    for negative in ("data.n_test=-5", "data.n_top_genes=-1", "data.seed=-2"):  # not a misleading data error later
        name, value = negative.removeprefix("data.").split("=")
        with pytest.raises(config.ConfigError, match=rf"\[data\]: {name} \({value}\) must be at least 0"):
            small_config(negative)
    with pytest.raises(config.ConfigError, match=r"\[search.space\]: 'n_cells' is not a setting a search can vary"):
        small_config("search.space.n_cells=[100, 200]")
    with pytest.raises(config.ConfigError, match="list of choices or a range"):
        small_config("search.space.label_weight={min = 2.0, max = 1.0}")
    with pytest.raises(
        config.ConfigError,
        match=r"\[training\]: epochs must be a whole number, received 'ten'; "
        "write e.g. epochs = 100",
    ):
        small_config('training.epochs="ten"')
    with pytest.raises(config.ConfigError, match=r"\[training\]: restarts must be a whole number, received 1.5"):
        small_config("training.restarts=1.5")
    with pytest.raises(config.ConfigError, match=r"\[model\]: learn_alpha must be true or false, received 1"):
        small_config("model.learn_alpha=1")
    # values the Config refuses, named with their table; in a search space, every choice and each end of a range
    with pytest.raises(config.ConfigError, match=r"\[model\]: prior must be one of .*received 'bogus'"):
        small_config("model.prior='bogus'")
    with pytest.raises(config.ConfigError, match=r"\[model\]: n_topics must be a positive whole number"):
        small_config("model.n_topics=0")
    with pytest.raises(config.ConfigError, match=r"\[training\]: learning_rate must be positive"):
        small_config("training.learning_rate=-0.1")
    with pytest.raises(config.ConfigError, match=r"\[training\]: restarts must be 1 or more"):
        small_config("training.restarts=0")
    with pytest.raises(config.ConfigError, match=r"\[search.space\]: prior must be one of .*received 'bogus'"):
        small_config("search.space.prior=['regularized', 'bogus']")
    with pytest.raises(config.ConfigError, match=r"\[search.space\]: dropout must be in \[0, 1\), received 1.5"):
        small_config("search.space.dropout={min = 0.1, max = 1.5}")
    with pytest.raises(config.ConfigError, match=r"\[search.space\]: n_topics must be a whole number, received 8.5"):
        small_config("search.space.n_topics={min = 8.5, max = 12}")
    with pytest.raises(config.ConfigError, match="hyperband chooses each trial's epochs itself"):
        small_config("search.algorithm='hyperband'", "search.space.epochs=[1, 2]")
    with pytest.raises(config.ConfigError, match="not found; the examples are in training/configs"):
        config.load(tmp_path / "missing.toml")
    assert small_config().training.epochs == 2


def test_model_config_is_the_package_config_of_the_model_and_training_tables(small_config):
    cfg = small_config("training.restarts=2", "model.global_scale=0.5")
    assert cfg.model_config() == scm.Config(
        n_topics=8,
        hidden_units=32,
        n_predictive_samples=8,
        prior="regularized",
        label_mode="joint",
        kl_warmup_epochs=10,
        global_scale=0.5,
        epochs=2,
        batch_size=128,
        learning_rate=2e-3,
        classifier_steps=200,
    )
    assert cfg.training.restarts == 2 and cfg.training.early_stopping_patience == 0
    # what a file leaves out is the package's default: Config's settings, and tfp_scmix.train's 3 restarts
    bare = config.from_dict({"experiment": "x", "data": {"path": "embedded"}})
    assert bare.model_config() == scm.Config() and bare.training.restarts == 3
    assert {f.name for f in dataclasses.fields(config.TrainingConfig)} == {
        *scm.config.TRAINING_SETTINGS,
        "restarts",
        "early_stopping_patience",
    }
    # a search's draw goes to the table of each setting
    drawn = cfg.with_settings({"n_topics": 10, "learning_rate": 0.01, "restarts": 1})
    assert (drawn.model["n_topics"], drawn.training.learning_rate, drawn.training.restarts) == (10, 0.01, 1)
    assert drawn.model_config() == cfg.model_config().replace(n_topics=10, learning_rate=0.01)
    assert cfg.model_config().n_topics == 8  # unchanged


def test_params_hold_every_config_setting_under_its_table(small_config):
    cfg = small_config("training.restarts=2")
    params, settings = cfg.params(), cfg.model_config().to_dict()
    for name in scm.config.names():
        table = "model" if name in scm.config.MODEL_SETTINGS else "training"
        assert params[f"{table}.{name}"] == settings[name], name
    assert params["model.n_topics"] == 8 and params["model.global_scale"] is None  # resolved from the data later
    assert (params["training.restarts"], params["training.early_stopping_patience"]) == (2, 0)
    assert params["data.n_labelled"] == 150 and params["data.unknown"] == []
    assert len(params) == len(scm.config.names()) + 2 + len(dataclasses.fields(config.DataConfig))
