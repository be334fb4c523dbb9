"""Run configurations: one TOML file names the data, the label budget, the model and its training.

    experiment = "pbmc3k"            # MLflow experiment the runs go to
    [data]     path, label_key, batch_key, counts, unknown, n_top_genes, n_test, n_labelled,
               n_validation, setting ("main" | "inductive"), seed
    [model]    the model settings of `tfp_scmix.Config` (n_topics, hidden_units, prior, label_mode, ...)
    [training] the training settings of `tfp_scmix.Config` (epochs, batch_size, learning_rate,
               classifier_learning_rate, classifier_steps), restarts (members of the trained ensemble,
               default 3 as `tfp_scmix.train`'s) and early_stopping_patience
    [search]   algorithm ("bayesian" | "hyperband"), max_trials, directory, registered_model,
               [search.space] setting = [choices] or {min, max, log, step}: any Config setting, or restarts

A key left out takes its default (the package's, `tfp_scmix.Config`); TOML has no null, so a setting whose
default is None (global_scale, ...: resolved from the data) or "no batches" is the key left out.
`RunConfig.model_config()` is the resolved `tfp_scmix.Config` that `tfp_scmix.train` receives.
"""

import dataclasses
import inspect
import tomllib
import types
import typing
from pathlib import Path

import tfp_scmix as scm
from tfp_scmix.config import MODEL_SETTINGS, TRAINING_SETTINGS
from tfp_scmix.data import did_you_mean

# [training] keys that say how a run uses the recipe rather than what the recipe is.
RESTARTS = inspect.signature(scm.train).parameters["restarts"].default  # the package default
RUN_SETTINGS = ("restarts", "early_stopping_patience")
# What a search may vary: every Config setting, and the number of restarts.
SEARCHABLE = MODEL_SETTINGS + TRAINING_SETTINGS + ("restarts",)
SETTINGS = ("main", "inductive")
ALGORITHMS = ("bayesian", "hyperband")
_TYPES = typing.get_type_hints(scm.Config)


class ConfigError(ValueError):
    """A run configuration that cannot be used; the message names the file, the key and the fix."""


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Which cells, and which of their labels, a run may use.

    With numpy's `default_rng(seed).permutation` of the cells, the first `n_test` are test cells and the
    next `n_labelled` keep their labels (the label budget); the first `n_validation` of those are held
    back to score each epoch. "main" (the benchmark's main setting): every cell's counts are trained on,
    without hidden labels; "inductive": test and validation cells are left out of training entirely.
    """

    path: str
    label_key: str = "cell_type"
    batch_key: str | None = None
    counts: str | None = None
    unknown: tuple = ()
    n_top_genes: int = 0
    n_test: int = 0
    n_labelled: int = 150
    n_validation: int = 30
    setting: str = "main"
    seed: int = 0


# The [training] table: Config's training settings (with Config's defaults), then the two settings of a run:
# restarts (tfp_scmix.train's: the members of the trained ensemble) and early_stopping_patience (0: off; else
# the epochs without a better val_macro_f1 after which a restart stops).
TrainingConfig = dataclasses.make_dataclass(
    "TrainingConfig",
    [
        (f.name, _TYPES[f.name], dataclasses.field(default=f.default))
        for f in dataclasses.fields(scm.Config)
        if f.name in TRAINING_SETTINGS
    ]
    + [
        ("restarts", int, dataclasses.field(default=RESTARTS)),
        ("early_stopping_patience", int, dataclasses.field(default=0)),
    ],
    frozen=True,
)
TrainingConfig.__module__ = __name__
TrainingConfig.__doc__ = (
    f"The [training] table: {', '.join(TRAINING_SETTINGS)} (tfp_scmix.Config's settings, "
    "with its defaults), restarts and early_stopping_patience."
)


@dataclasses.dataclass(frozen=True)
class SearchConfig:
    algorithm: str = "bayesian"
    max_trials: int = 10
    directory: str | None = None  # default: <repo>/outputs/tuning
    registered_model: str | None = None  # default: "scmix-<experiment>"
    hyperband_factor: int = 3
    space: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    experiment: str
    data: DataConfig
    model: dict  # the [model] table as written (Config's model settings; the others take Config's defaults)
    training: TrainingConfig
    search: SearchConfig
    run_name: str | None = None
    source: str | None = None  # the file it was read from
    overrides: tuple = ()  # "section.key=value" strings applied on top of it

    def model_config(self) -> scm.Config:
        """The `tfp_scmix.Config` of [model] and [training] (what `tfp_scmix.train` receives)."""
        return scm.Config.from_dict({**self.model, **{k: getattr(self.training, k) for k in TRAINING_SETTINGS}})

    def with_settings(self, values: dict) -> "RunConfig":
        """This configuration with some settings changed ({"n_topics": 8, "restarts": 1, ...}; a search's draw)."""
        unknown = sorted(set(values) - set(SEARCHABLE))
        if unknown:
            raise ConfigError(f"{self.source}: {unknown} are not settings; choose from {sorted(SEARCHABLE)}.")
        model = {**self.model, **{k: v for k, v in values.items() if k in MODEL_SETTINGS}}
        training = dataclasses.replace(self.training, **{k: v for k, v in values.items() if k not in MODEL_SETTINGS})
        return dataclasses.replace(self, model=model, training=training)

    def params(self) -> dict:
        """Flat MLflow parameters named as the keys of the file ("data.n_labelled": 150, "model.n_topics": 50, ...).

        Every `tfp_scmix.Config` field is logged with its value in force (the default where the file leaves it
        out, "None" for a value resolved from the data: the run logs those as "resolved.<name>"): model settings
        as "model.<name>", training settings as "training.<name>", beside training.restarts and
        training.early_stopping_patience and the [data] table.
        """
        flat = {f"data.{k}": list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self.data).items()}
        config = self.model_config().to_dict()
        flat.update({f"model.{name}": config[name] for name in MODEL_SETTINGS})
        flat.update({f"training.{name}": config[name] for name in TRAINING_SETTINGS})
        flat.update({f"training.{name}": getattr(self.training, name) for name in RUN_SETTINGS})
        return flat


def _type_name(hint) -> str:
    if typing.get_origin(hint) is typing.Literal:
        return f"one of {list(typing.get_args(hint))}"
    return {int: "a whole number", float: "a number", bool: "true or false", str: "a string"}.get(hint, str(hint))


def setting_type(name: str):
    """The type of a setting of [model] or [training]: int, float, bool or a `Literal` of the options
    (`X` for `X | None`: TOML has no null, None is the key left out)."""
    hint = _TYPES.get(name, int)  # restarts, early_stopping_patience: whole numbers
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    return hint


def _check_value(name: str, value, hint, where: str):
    """ConfigError unless `value` fits the type `hint`."""
    if typing.get_origin(hint) is typing.Literal:
        fits = value in typing.get_args(hint)
    elif hint is float:
        fits = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif hint is int:
        fits = isinstance(value, int) and not isinstance(value, bool)
    else:
        fits = isinstance(value, hint)
    if not fits:
        raise ConfigError(
            f"{where}: {name} must be {_type_name(hint)}, received {value!r}; write e.g. {name} = {_example(name)}."
        )


def _example(name: str) -> str:
    default = getattr(scm.Config, name, None) if name in _TYPES else dict(restarts=RESTARTS).get(name, 0)
    if default is None:
        return "0.1"
    return str(default).lower() if isinstance(default, bool) else repr(default).replace("'", '"')


def _section(cls, raw: dict, where: str):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {unknown}{did_you_mean(unknown, fields)}; known keys: {sorted(fields)}."
        )
    missing = [
        n
        for n, f in fields.items()
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and n not in raw
    ]
    if missing:
        raise ConfigError(f"{where}: missing required key(s) {missing}.")
    values = {k: tuple(v) if isinstance(fields[k].default, tuple) else v for k, v in raw.items()}
    for name, value in values.items():
        default = fields[name].default
        if isinstance(default, (int, float)) and not isinstance(default, bool) and not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: {name} must be a number, received {value!r}.")
    return cls(**values)


def _settings_table(raw: dict, table: str, allowed: tuple, source: str, overridden: frozenset = frozenset()) -> dict:
    """The [model] or [training] table, each key a known setting of that table and of the right type; `overridden`:
    the "table.key" names that a --set gave (a wrong one is said to come from there, not from the file)."""
    where = f"{source} [{table}]"
    other, elsewhere = ("training", TRAINING_SETTINGS + RUN_SETTINGS) if table == "model" else ("model", MODEL_SETTINGS)
    misplaced = sorted(set(raw) & set(elsewhere))
    if misplaced:
        raise ConfigError(f"{where}: {misplaced} belong to [{other}]: move them to the [{other}] table.")
    unknown = sorted(set(raw) - set(allowed))
    if unknown:
        raise ConfigError(
            f"{where}: unknown setting(s) "
            f"[{', '.join(repr(n) + (' (from --set)' if f'{table}.{n}' in overridden else '') for n in unknown)}]"
            f"{did_you_mean(unknown, allowed)}; [{table}] takes "
            f"{sorted(allowed)} (the settings of tfp_scmix.Config)."
        )
    for name, value in raw.items():
        _check_value(name, value, setting_type(name), where)
    return dict(raw)


def _check_space(space: dict, cfg: RunConfig, where: str):
    for name, spec in space.items():
        if name not in SEARCHABLE:
            raise ConfigError(
                f"{where}: {name!r} is not a setting a search can vary; choose from {sorted(SEARCHABLE)}."
            )
        if isinstance(spec, list):
            if not spec:
                raise ConfigError(f"{where}: {name} lists no values to choose from.")
            values = spec
        elif isinstance(spec, dict):
            extra = set(spec) - {"min", "max", "log", "step"}
            if extra or not {"min", "max"} <= set(spec) or spec["min"] >= spec["max"]:
                raise ConfigError(
                    f"{where}: {name} must be a list of choices or a range "
                    f"{{min = a, max = b, log = true|false, step = s}} with min < max; received {spec}."
                )
            if setting_type(name) not in (int, float):
                raise ConfigError(f"{where}: {name} is not a number: list its choices, e.g. {name} = [...].")
            if "step" in spec:
                _check_value(f"{name}'s step", spec["step"], setting_type(name), where)
            values = [spec["min"], spec["max"]]
        else:
            raise ConfigError(f"{where}: {name} must be a list of choices or a {{min, max}} range, received {spec!r}.")
        for value in values:  # every choice (each end of a range) must make a valid Config
            _check_value(name, value, setting_type(name), where)
            _check_settings(cfg.with_settings({name: value}), where)
    if cfg.search.algorithm == "hyperband" and "epochs" in space:
        raise ConfigError(
            f"{where}: hyperband chooses each trial's epochs itself (up to [training] epochs); "
            'remove epochs from the space, or use algorithm = "bayesian".'
        )


def _check_settings(cfg: RunConfig, where: str):
    """ConfigError unless the settings make a `tfp_scmix.Config` and a sensible run."""
    try:
        cfg.model_config()
    except ValueError as err:
        raise ConfigError(f"{where}: {err}.") from err
    if cfg.training.restarts < 1:
        raise ConfigError(
            f"{where}: restarts must be 1 or more (the members of the trained ensemble), "
            f"received {cfg.training.restarts}."
        )
    if cfg.training.early_stopping_patience < 0:
        raise ConfigError(
            f"{where}: early_stopping_patience must be 0 (off) or more, "
            f"received {cfg.training.early_stopping_patience}."
        )


def from_dict(raw: dict, source: str = "<config>", overrides=()) -> RunConfig:
    """A validated `RunConfig` from the parsed TOML tables."""
    raw = dict(raw)
    unknown = sorted(set(raw) - {"experiment", "run_name", "data", "model", "training", "search"})
    if unknown:
        raise ConfigError(
            f"{source}: unknown top-level key(s) {unknown}; expected experiment, run_name and "
            "the tables [data], [model], [training], [search]."
        )
    if not isinstance(raw.get("experiment"), str) or not raw["experiment"]:
        raise ConfigError(f'{source}: set experiment = "name" (the MLflow experiment the runs go to).')
    data = _section(DataConfig, raw.get("data", {}), f"{source} [data]")
    if data.setting not in SETTINGS:
        raise ConfigError(f"{source} [data]: setting must be one of {SETTINGS}, received {data.setting!r}.")
    negative = {name: getattr(data, name) for name in ("n_top_genes", "n_test", "seed") if getattr(data, name) < 0}
    if negative:
        raise ConfigError(
            f"{source} [data]: {', '.join(f'{k} ({v})' for k, v in negative.items())} must be at least 0 "
            "(n_top_genes 0: every gene; n_test 0: no test cells)."
        )
    if not 0 <= data.n_validation < data.n_labelled:
        raise ConfigError(
            f"{source} [data]: n_validation ({data.n_validation}) must be at least 0 and smaller "
            f"than the label budget n_labelled ({data.n_labelled}): it is carved from it."
        )
    overridden = frozenset(a.split("=", 1)[0].strip() for a in overrides)
    model = _settings_table(raw.get("model", {}), "model", MODEL_SETTINGS, source, overridden)
    training = TrainingConfig(
        **_settings_table(raw.get("training", {}), "training", TRAINING_SETTINGS + RUN_SETTINGS, source, overridden)
    )
    search = _section(SearchConfig, dict(raw.get("search", {})), f"{source} [search]")
    if search.algorithm not in ALGORITHMS:
        raise ConfigError(f"{source} [search]: algorithm must be one of {ALGORITHMS}, received {search.algorithm!r}.")
    cfg = RunConfig(raw["experiment"], data, model, training, search, raw.get("run_name"), source, tuple(overrides))
    try:  # the model's settings alone first, so that an error names the right table
        scm.Config.from_dict(model)
    except ValueError as err:
        raise ConfigError(f"{source} [model]: {err}.") from err
    _check_settings(cfg, f"{source} [training]")
    _check_space(search.space, cfg, f"{source} [search.space]")
    return cfg


def _set(raw: dict, assignment: str):
    """Apply one "section.key=value" override (value in TOML syntax; bare words are strings)."""
    key, sep, text = assignment.partition("=")
    if not sep:
        raise ConfigError(f"override {assignment!r} must look like section.key=value, e.g. training.epochs=3.")
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text
    *tables, last = key.strip().split(".")
    node = raw
    for table in tables:
        node = node.setdefault(table, {})
    node[last] = value


def load(path, overrides=()) -> RunConfig:
    """Read and validate a TOML run configuration; `overrides` are "section.key=value" strings."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"run configuration {path} not found; the examples are in training/configs/.")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path} is not valid TOML: {err}.") from err
    for assignment in overrides:
        _set(raw, assignment)
    return from_dict(raw, str(path), overrides)
