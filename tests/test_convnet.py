"""mmsearch's small convnet image towers, built by open_clip through timm."""

import open_clip
import pytest
import torch

from mmsearch.convnet import ARCHITECTURES, ConvNet, ConvNetCfg
from mmsearch.encoders import register_packaged_configs


def test_stages_halve_the_resolution_and_pool_to_the_last_width():
    net = ConvNet(ConvNetCfg(channels=(4, 8, 16), convs_per_stage=2))
    assert net.forward_features(torch.zeros(2, 3, 32, 32)).shape == (2, 16, 8, 8)
    assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 16) and net.num_features == 16
    assert sum(isinstance(m, torch.nn.Conv2d) for m in net.modules()) == 6


def test_open_clip_builds_the_fashion_cnn_config():
    assert "mmsearch-fashion-cnn" in register_packaged_configs()
    model = open_clip.create_model("mmsearch-fashion-cnn").eval()
    assert isinstance(model.visual.trunk, ConvNet)
    with torch.no_grad():
        out = model.encode_image(torch.randn(3, 3, 32, 32))
    assert out.shape == (3, 128) and torch.isfinite(out).all()


def test_no_pretrained_weights_and_no_classifier():
    import timm

    register_packaged_configs()
    name = next(iter(ARCHITECTURES))
    with pytest.raises(ValueError, match="no pretrained weights"):
        timm.create_model(name, pretrained=True)
    with pytest.raises(ValueError, match="no classifier head"):
        timm.create_model(name).reset_classifier(10)


def test_grid_pooling_keeps_where_features_are():
    net = ConvNet(ConvNetCfg(channels=(4, 8), convs_per_stage=1))
    net.reset_classifier(0, "avg2")
    assert net.num_features == 8 * 2 * 2
    features = torch.zeros(1, 8, 16, 16)
    features[0, 3, :8, :8] = 1.0  # something in the top-left quarter only
    net.features = torch.nn.Identity()  # pool a known feature map
    pooled = net(features).view(8, 2, 2)
    assert pooled[3, 0, 0] == 1.0 and pooled.sum() == 1.0  # the global average would say 0.25, nowhere
    net.reset_classifier(0, "avg")
    assert net(features).shape == (1, 8) and net.num_features == 8
    net.reset_classifier(0, "")
    assert net(features).shape == (1, 8, 16, 16)


@pytest.mark.parametrize("pool", ["max", "avg0", "avgx", "avg-2"])
def test_unknown_pooling_is_refused(pool):
    with pytest.raises(ValueError, match=f"unsupported pooling '{pool}'"):
        ConvNet(ConvNetCfg(channels=(4,))).reset_classifier(0, pool)
