import numpy as np
import pytest

from tests.layers.helpers import normal_kl, roundtrip
from tfp_scmix.layers import TopicBranch


def test_topic_branch_kl_and_shape():
    layer = TopicBranch(4, 10, prior_scale=0.7)
    layer.set_background(np.arange(1, 11))
    topic_gene = layer(None).numpy()
    assert topic_gene.shape == (4, 10) and np.allclose(topic_gene.sum(1), 1, atol=1e-5)
    q = layer.posterior()
    expected = normal_kl(q.loc.numpy(), q.scale.numpy(), layer.background.numpy(), 0.7).sum()
    assert float(layer.kl()) == pytest.approx(expected, rel=1e-4)
    roundtrip(layer)
