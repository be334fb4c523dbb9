"""The package's top level: its public names are listed before they load."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_dir_lists_the_public_names_without_loading_them():
    """`dir(tfp_scmix)` (tab completion) names `train`, `from_anndata`, ... in a fresh process, and listing them imports
    neither TensorFlow nor the stages they live in."""
    code = (
        "import json, sys, tfp_scmix; names = dir(tfp_scmix); "
        "print(json.dumps([names, 'tensorflow' in sys.modules, 'tfp_scmix.train' in sys.modules]))"
    )
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    names, tensorflow_loaded, train_loaded = json.loads(run.stdout.strip().splitlines()[-1])
    import tfp_scmix

    assert set(tfp_scmix.__all__) <= set(names)
    assert {"train", "from_anndata", "annotate", "predict", "save_model", "adapt", "read"} <= set(names)
    assert not tensorflow_loaded and not train_loaded
