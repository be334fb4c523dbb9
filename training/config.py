"""Run configurations: one TOML file names the data, the label budget, the model and the optimizer.

    experiment = "pbmc3k"            # MLflow experiment the runs go to
    [data]     path, label_key, batch_key, counts, unknown, n_top_genes, n_test, n_labelled,
               n_validation, setting ("main" | "inductive"), seed
    [model]    keyword arguments of `SCMix.from_data` (n_topics, hidden_units, prior, label_mode, ...)
    [training] epochs, batch_size, learning_rate, classifier_steps, early_stopping_patience
    [search]   algorithm ("bayesian" | "hyperband"), max_trials, directory, registered_model,
               [search.space] setting = [choices] or {min, max, log, step}

A key left out takes its default; TOML has no null, so "no batches" is `batch_key` left out.
"""

import dataclasses
import inspect
import tomllib
from pathlib import Path

from tfp_scmix import SCMix

# SCMix arguments that come from the data, not from a configuration.
_FROM_DATA = {"self", "genes", "class_names", "n_cells", "n_labelled", "total_counts", "kwargs"}
MODEL_SETTINGS = tuple(name for name in inspect.signature(SCMix.__init__).parameters if name not in _FROM_DATA)
# Settings of the fit rather than of the model that a search may vary.
FIT_SETTINGS = ("learning_rate", "batch_size")
SETTINGS = ("main", "inductive")
ALGORITHMS = ("bayesian", "hyperband")


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


@dataclasses.dataclass(frozen=True)
class TrainingConfig:
    epochs: int = 100
    batch_size: int = 256
    learning_rate: float = 2e-3
    classifier_steps: int = 2000  # full-batch steps of SCMix.fit_classifier after the last epoch; 0: none
    early_stopping_patience: int = 0  # 0: off; else stop when val_macro_f1 has not improved for this many epochs


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
    model: dict
    training: TrainingConfig
    search: SearchConfig
    run_name: str | None = None
    source: str | None = None  # the file it was read from
    overrides: tuple = ()  # "section.key=value" strings applied on top of it

    def params(self) -> dict:
        """The data, training and search settings as flat MLflow parameters ("data.n_labelled": 150, ...).

        The model's settings are logged from `model.settings`, which also holds the defaults it resolved.
        """
        flat = {}
        for section in ("data", "training"):
            for key, value in dataclasses.asdict(getattr(self, section)).items():
                flat[f"{section}.{key}"] = list(value) if isinstance(value, tuple) else value
        return flat


def _section(cls, raw: dict, where: str):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known keys: {sorted(fields)}.")
    missing = [n for n, f in fields.items() if f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING and n not in raw]
    if missing:
        raise ConfigError(f"{where}: missing required key(s) {missing}.")
    values = {k: tuple(v) if isinstance(fields[k].default, tuple) else v for k, v in raw.items()}
    for name, value in values.items():
        default = fields[name].default
        if isinstance(default, (int, float)) and not isinstance(default, bool) and not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: {name} must be a number, received {value!r}.")
    return cls(**values)


def _check_space(space: dict, where: str):
    allowed = MODEL_SETTINGS + FIT_SETTINGS
    for name, spec in space.items():
        if name not in allowed:
            raise ConfigError(f"{where}: {name!r} is not a setting a search can vary; choose from {sorted(allowed)}.")
        if isinstance(spec, list):
            if not spec:
                raise ConfigError(f"{where}: {name} lists no values to choose from.")
        elif isinstance(spec, dict):
            extra = set(spec) - {"min", "max", "log", "step"}
            if extra or not {"min", "max"} <= set(spec) or spec["min"] >= spec["max"]:
                raise ConfigError(f"{where}: {name} must be a list of choices or a range "
                                  f"{{min = a, max = b, log = true|false, step = s}} with min < max; received {spec}.")
        else:
            raise ConfigError(f"{where}: {name} must be a list of choices or a {{min, max}} range, received {spec!r}.")


def from_dict(raw: dict, source: str = "<config>", overrides=()) -> RunConfig:
    """A validated `RunConfig` from the parsed TOML tables."""
    raw = dict(raw)
    unknown = sorted(set(raw) - {"experiment", "run_name", "data", "model", "training", "search"})
    if unknown:
        raise ConfigError(f"{source}: unknown top-level key(s) {unknown}; expected experiment, run_name and "
                          "the tables [data], [model], [training], [search].")
    if not isinstance(raw.get("experiment"), str) or not raw["experiment"]:
        raise ConfigError(f'{source}: set experiment = "name" (the MLflow experiment the runs go to).')
    data = _section(DataConfig, raw.get("data", {}), f"{source} [data]")
    if data.setting not in SETTINGS:
        raise ConfigError(f"{source} [data]: setting must be one of {SETTINGS}, received {data.setting!r}.")
    if not 0 <= data.n_validation < data.n_labelled:
        raise ConfigError(f"{source} [data]: n_validation ({data.n_validation}) must be at least 0 and smaller "
                          f"than the label budget n_labelled ({data.n_labelled}): it is carved from it.")
    model = dict(raw.get("model", {}))
    bad = sorted(set(model) - set(MODEL_SETTINGS))
    if bad:
        raise ConfigError(f"{source} [model]: unknown setting(s) {bad}; SCMix takes {sorted(MODEL_SETTINGS)}.")
    training = _section(TrainingConfig, raw.get("training", {}), f"{source} [training]")
    search_raw = dict(raw.get("search", {}))
    search = _section(SearchConfig, search_raw, f"{source} [search]")
    if search.algorithm not in ALGORITHMS:
        raise ConfigError(f"{source} [search]: algorithm must be one of {ALGORITHMS}, received {search.algorithm!r}.")
    _check_space(search.space, f"{source} [search.space]")
    return RunConfig(raw["experiment"], data, model, training, search, raw.get("run_name"), source,
                     tuple(overrides))


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
