"""imbalanced_attr.params_io: the original's parameter files (SPEC §1.7).

Our files are checked against blocks built the way the ORIGINAL builds them
(models.getResNet / getDenseNet: a SymbolBlock over named internal outputs of a
model-zoo net with a new ``dense1``; the heads as ``nn.Sequential`` in a fresh
name scope), loaded with Gluon's own ``load_params``.
"""
import os
import warnings

import mxnet as mx
import numpy as np
import pytest
from mxnet import gluon
from mxnet.gluon import nn
from mxnet.gluon.model_zoo import vision

from imbalanced_attr.model import AttributeModel, aggregate_prediction
from imbalanced_attr.params_io import load_original_params, original_layout, save_original_params
from training_runtime.errors import UserError

NUM_CLASSES = 5
STEMS = ["fconv_stage_%d", "fatt_stage_%d", "fsr_stage_%d"]
RESNET_FILES = sorted(["backbone_resnet.params"] + ["%s.params" % (s % n) for n in (2, 3, 4) for s in STEMS])
BN = ["gamma", "beta", "running_mean", "running_var"]
FCONV_NAMES = ["conv0_weight", "conv0_bias"]
FATT_NAMES = (["conv0_weight", "conv0_bias"] + ["batchnorm0_" + s for s in BN]
              + ["conv1_weight", "conv1_bias"] + ["batchnorm1_" + s for s in BN]
              + ["conv2_weight", "conv2_bias"])
FSR_NAMES = (FATT_NAMES[:-2] + ["conv2_weight", "conv2_bias"] + ["batchnorm2_" + s for s in BN]
             + ["dense0_weight", "dense0_bias"])
# the original's tap names (SPEC §1.1) for our split of each zoo net
ORIGINAL_TAPS = {
    "resnet18_v1": ["resnetv10_stage3_activation0_output", "resnetv10_stage3_activation1_output",
                    "resnetv10_stage4_activation1_output", "resnetv10_dense1_fwd_output"],
    "resnet101_v1": ["resnetv10_stage3_activation19_output", "resnetv10_stage3_activation22_output",
                     "resnetv10_stage4_activation2_output", "resnetv10_dense1_fwd_output"],
    "densenet201": ["densenet0_conv3_fwd_output", "densenet0_stage4_concat15_output",
                    "densenet0_dense1_fwd_output"],
}


def _randomize_statistics(net, seed):
    """Non-trivial BN statistics and biases, so that any swapped mapping shows."""
    rng = np.random.RandomState(seed)
    for name, param in net.collect_params().items():
        if name.endswith(("running_var", "gamma")):
            value = rng.uniform(0.5, 1.5, param.shape)
        elif name.endswith(("running_mean", "beta", "bias")):
            value = rng.normal(0, 0.1, param.shape)
        else:
            continue
        param.set_data(mx.nd.array(value))


def _prediction(net, x):
    logits, scores = net(x)
    return aggregate_prediction(logits, scores).asnumpy()


def _file_keys(path):
    return list(mx.nd.load(path).keys())


def _load_params(block, path):
    with warnings.catch_warnings():  # load_params/save_params are deprecated but what the original used
        warnings.simplefilter("ignore")
        block.load_params(path, ctx=mx.cpu())


def _original_backbone(zoo_name, num_classes):
    """models.getResNet / getDenseNet, with the zoo weights left to be loaded."""
    prefix = "densenet0_" if zoo_name.startswith("densenet") else "resnetv10_"
    zoo_features = vision.get_model(zoo_name, prefix=prefix)
    net = vision.get_model(zoo_name, classes=num_classes, prefix=prefix)
    with net.name_scope():
        net.output = nn.Dense(num_classes, flatten=True)
        net.features = zoo_features.features
    data = mx.sym.var("data")
    internals = net(data).get_internals()
    block = gluon.SymbolBlock([internals[name] for name in ORIGINAL_TAPS[zoo_name]], data,
                              params=net.collect_params())
    block._prefix = prefix  # as the original does: save/load strip this prefix
    return block


def _original_sequential(layers):
    net = nn.Sequential()
    with net.name_scope():
        for layer in layers:
            net.add(layer())
    return net


def _original_heads(num_classes, kernel):
    """attention.attention_net_trainer + models.get_fsr: (fconv, fatt, fsr) of one stage."""
    relu = lambda: nn.Activation("relu")  # noqa: E731
    fconv = _original_sequential([lambda: nn.Conv2D(num_classes, kernel_size=1, strides=1),
                                  lambda: nn.Activation("sigmoid")])
    fatt = _original_sequential([lambda: nn.Conv2D(512, kernel_size=1), nn.BatchNorm, relu,
                                 lambda: nn.Conv2D(512, kernel_size=3, padding=1), nn.BatchNorm, relu,
                                 lambda: nn.Conv2D(num_classes, kernel_size=1, strides=1)])
    fsr = _original_sequential([lambda: nn.Conv2D(256, kernel_size=1), nn.BatchNorm, relu,
                                lambda: nn.Conv2D(512, kernel_size=1), nn.BatchNorm, relu,
                                lambda: nn.Conv2D(1024, kernel_size=kernel), nn.BatchNorm, relu,
                                lambda: nn.Dense(num_classes, flatten=True)])
    return fconv, fatt, fsr


def _original_forward(backbone, stage_heads, x):
    """The original's test-time forward with its own spatial softmax in numpy terms."""
    *taps, logits = backbone(x)
    total = logits.asnumpy().astype(np.float64)
    for tap, (fconv, fatt, fsr) in zip(taps, stage_heads):
        att = fatt(tap).asnumpy().astype(np.float64)
        n, c, h, w = att.shape
        flat = att.reshape(n * c, h * w)
        soft = np.exp(flat - flat.max(axis=1, keepdims=True))
        soft = (soft / soft.sum(axis=1, keepdims=True)).reshape(n, c, h, w)
        total += fsr(mx.nd.array(soft * fconv(tap).asnumpy())).asnumpy()
    return 1.0 / (1.0 + np.exp(-0.25 * total))


@pytest.fixture(scope="module")
def resnet18_saved(tmp_path_factory):
    """(model, directory) of a resnet18_v1 model at 64×64 saved in the original layout."""
    mx.random.seed(11)
    net = AttributeModel(NUM_CLASSES, backbone="resnet18_v1", input_size=64)
    _randomize_statistics(net, seed=11)
    directory = str(tmp_path_factory.mktemp("resnet18_params"))
    save_original_params(net, directory)
    return net, directory


def test_saved_files_and_parameter_names(resnet18_saved):
    net, directory = resnet18_saved
    assert sorted(os.listdir(directory)) == RESNET_FILES  # no temporary files left behind
    for stage in (2, 3, 4):
        assert _file_keys(os.path.join(directory, "fconv_stage_%d.params" % stage)) == FCONV_NAMES
        assert _file_keys(os.path.join(directory, "fatt_stage_%d.params" % stage)) == FATT_NAMES
        assert _file_keys(os.path.join(directory, "fsr_stage_%d.params" % stage)) == FSR_NAMES
    saved = mx.nd.load(os.path.join(directory, "fsr_stage_4.params"))
    fsr = net.blocks()["fsr_stage_4"]
    assert saved["conv2_weight"].shape == (1024, 512, 2, 2)  # k = the 2×2 stage-4 tap at 64×64
    np.testing.assert_array_equal(saved["batchnorm1_running_var"].asnumpy(),
                                  fsr[4].running_var.data().asnumpy())
    np.testing.assert_array_equal(saved["dense0_bias"].asnumpy(), fsr[9].bias.data().asnumpy())


def test_backbone_names_and_order_match_the_original_save(resnet18_saved, tmp_path):
    """The original's SymbolBlock loads our backbone file, and its own save_params
    writes exactly our names in our order."""
    _, directory = resnet18_saved
    ours = os.path.join(directory, "backbone_resnet.params")
    original = _original_backbone("resnet18_v1", NUM_CLASSES)
    _load_params(original, ours)
    resaved = str(tmp_path / "resaved.params")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        original.save_params(resaved)
    keys = _file_keys(ours)
    assert keys == _file_keys(resaved)
    assert keys[0] == "conv0_weight" and keys[-1].endswith("running_var")  # aux states last
    assert {"dense1_weight", "dense1_bias"} <= set(keys) and len(keys) == 102


def test_original_blocks_load_our_files_and_predict_the_same(resnet18_saved):
    net, directory = resnet18_saved
    backbone = _original_backbone("resnet18_v1", NUM_CLASSES)
    _load_params(backbone, os.path.join(directory, "backbone_resnet.params"))
    stage_heads = []
    for stage, kernel in zip((2, 3, 4), (4, 4, 2)):
        heads = _original_heads(NUM_CLASSES, kernel)
        for stem, block in zip(STEMS, heads):
            _load_params(block, os.path.join(directory, "%s.params" % (stem % stage)))
        stage_heads.append(heads)
    x = mx.nd.random.uniform(-1, 1, shape=(2, 3, 64, 64))
    for ours, original in zip(net.backbone(x), backbone(x)):
        np.testing.assert_allclose(ours.asnumpy(), original.asnumpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(_prediction(net, x), _original_forward(backbone, stage_heads, x),
                               rtol=1e-5, atol=1e-6)


def test_round_trip_into_a_fresh_model(resnet18_saved):
    net, directory = resnet18_saved
    mx.random.seed(12)
    fresh = AttributeModel(NUM_CLASSES, backbone="resnet18_v1", input_size=64)
    x = mx.nd.random.uniform(-1, 1, shape=(2, 3, 64, 64))
    expected = _prediction(net, x)
    assert not np.allclose(_prediction(fresh, x), expected)
    load_original_params(fresh, directory)
    fresh.hybridize()
    np.testing.assert_allclose(_prediction(fresh, x), expected, rtol=1e-6, atol=1e-7)
    for name, param in original_layout(fresh)["fatt_stage_3"].items():
        original = original_layout(net)["fatt_stage_3"][name]
        np.testing.assert_array_equal(param.data().asnumpy(), original.data().asnumpy(), err_msg=name)


def test_multi_device_save_and_load(resnet18_saved, tmp_path):
    net, directory = resnet18_saved
    devices = [mx.cpu(0), mx.cpu(1)]
    replicated = AttributeModel(NUM_CLASSES, backbone="resnet18_v1", input_size=64, ctx=devices)
    load_original_params(replicated, directory, ctx=devices)
    weight = replicated.blocks()["fsr_stage_2"][6].weight
    assert weight.list_ctx() == devices
    expected = net.blocks()["fsr_stage_2"][6].weight.data().asnumpy()
    for copy in weight.list_data():
        np.testing.assert_array_equal(copy.asnumpy(), expected)
    # replicas are averaged on save, as Block.save_params does
    weight.list_data()[1][:] += 2.0
    save_original_params(replicated, str(tmp_path))
    saved = mx.nd.load(str(tmp_path / "fsr_stage_2.params"))["conv2_weight"].asnumpy()
    np.testing.assert_allclose(saved, expected + 1.0, rtol=1e-6)
    # saving again over existing files works and leaves no temporary file
    save_original_params(replicated, str(tmp_path))
    assert sorted(os.listdir(str(tmp_path))) == RESNET_FILES


def test_bad_directories_and_files_raise_user_errors(resnet18_saved, tmp_path):
    net, directory = resnet18_saved
    with pytest.raises(UserError, match=r"fsr_stage_3\.params: missing parameter file"):
        partial = tmp_path / "partial"
        partial.mkdir()
        for name in RESNET_FILES:
            if name != "fsr_stage_3.params":
                os.link(os.path.join(directory, name), str(partial / name))
        load_original_params(net, str(partial))
    # a model for 4 attributes cannot take the 5-attribute files
    other = AttributeModel(4, backbone="resnet18_v1", input_size=64)
    with pytest.raises(UserError, match=r"backbone_resnet\.params: parameter 'dense1_weight' has shape "
                                        r"\(5, 512\), expected \(4, 512\)"):
        load_original_params(other, directory)
    # missing and unexpected names
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in RESNET_FILES:
        os.link(os.path.join(directory, name), str(broken / name))
    fconv = mx.nd.load(str(broken / "fconv_stage_2.params"))
    os.remove(str(broken / "fconv_stage_2.params"))
    mx.nd.save(str(broken / "fconv_stage_2.params"), {"conv0_weight": fconv["conv0_weight"]})
    with pytest.raises(UserError, match=r"fconv_stage_2\.params: parameter 'conv0_bias' missing"):
        load_original_params(net, str(broken))
    fconv["conv9_weight"] = fconv["conv0_weight"]
    mx.nd.save(str(broken / "fconv_stage_2.params"), fconv)
    with pytest.raises(UserError, match=r"fconv_stage_2\.params: unexpected parameter\(s\) conv9_weight"):
        load_original_params(net, str(broken))
    with open(str(broken / "fconv_stage_2.params"), "wb") as f:
        f.write(b"not a params file")
    with pytest.raises(UserError, match=r"fconv_stage_2\.params: expected an MXNet parameter file"):
        load_original_params(net, str(broken))
    mx.nd.save(str(broken / "fconv_stage_2.params"), [fconv["conv0_weight"]])
    with pytest.raises(UserError, match=r"fconv_stage_2\.params: expected named arrays"):
        load_original_params(net, str(broken))


@pytest.mark.parametrize("zoo_name, stem, count", [("resnet101_v1", "backbone_resnet", 588),
                                                   ("densenet201", "backbone_densenet", 1006)])
def test_full_size_backbone_taps_equal_the_originals_named_outputs(zoo_name, stem, count, tmp_path):
    """At 224×224 the original's named internals (stage3_activation19, … /
    conv3, stage4_concat15) equal our taps after loading our backbone file."""
    mx.random.seed(13)
    net = AttributeModel(NUM_CLASSES, backbone=zoo_name, input_size=32)  # small heads: only the backbone matters
    _randomize_statistics(net.backbone, seed=13)
    save_original_params(net, str(tmp_path))
    path = str(tmp_path / (stem + ".params"))
    keys = _file_keys(path)
    assert len(keys) == count and keys[0] == "conv0_weight"
    assert {"dense1_weight", "dense1_bias"} <= set(keys)
    original = _original_backbone(zoo_name, NUM_CLASSES)
    _load_params(original, path)
    x = mx.nd.random.uniform(-1, 1, shape=(1, 3, 224, 224))
    tap2, tap3, tap4, logits = net.backbone(x)
    ours = [tap2, tap3, tap4, logits] if zoo_name.startswith("resnet") else [tap2, tap3, logits]
    for mine, theirs, name in zip(ours, original(x), ORIGINAL_TAPS[zoo_name]):
        scale = float(np.abs(theirs.asnumpy()).max())
        np.testing.assert_allclose(mine.asnumpy(), theirs.asnumpy(), rtol=1e-5, atol=1e-6 * scale,
                                   err_msg=name)
