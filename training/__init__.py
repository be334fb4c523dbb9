"""The application around tfp_scmix: MLflow-tracked training runs and keras-tuner searches.

`python -m training.run CONFIG.toml` trains one model and records it; `python -m training.tune CONFIG.toml`
searches the model's settings, each trial a nested MLflow run. The library never imports this package.
"""

import tfp_scmix

# Before keras, keras_tuner and MLflow's keras flavour import TensorFlow with its start-up lines on stderr.
tfp_scmix.import_tensorflow()
