import pytest
import tensorflow as tf

from tests.layers.helpers import normal_kl, roundtrip
from tfp_scmix.layers import BatchOffsets


def test_batch_offsets_kl_and_config():
    layer = BatchOffsets(2, 5, init_shrinkage=0.3)
    q = layer.posterior()
    expected = normal_kl(q.loc.numpy(), q.scale.numpy(), 0.0, float(layer.shrinkage())).sum()
    assert float(layer.kl()) == pytest.approx(expected, rel=1e-4)
    assert layer(tf.constant([1, 0, 1])).shape == (3, 5)
    roundtrip(layer)
