"""imbalanced_attr.params_io: the original's parameter files (SPEC §1.7).

Our files are checked against blocks built the way the ORIGINAL builds them
(models.getResNet / getDenseNet: a SymbolBlock over named internal outputs of a
model-zoo net with a new ``dense1``; the heads as ``nn.Sequential`` in a fresh
name scope), loaded with Gluon's own ``load_params``.
"""
import os
import re
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
@pytest.mark.slow
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


# ------------------------------------------------------------------ Gluon's save_parameters layout

TAP_SHAPES_64 = [(256, 4), (256, 4), (512, 2)]  # resnet18_v1 at 64×64: (channels, side) of tap2/3/4


def _original_model(seed, num_classes=NUM_CLASSES):
    """(zoo net, backbone SymbolBlock, [(fconv, fatt, fsr)] per stage) built as the original
    builds them, initialised (resnet18_v1, 64×64) with non-trivial BN statistics."""
    prefix = "resnetv10_"
    zoo_features = vision.get_model("resnet18_v1", prefix=prefix)
    net = vision.get_model("resnet18_v1", classes=num_classes, prefix=prefix)
    with net.name_scope():
        net.output = nn.Dense(num_classes, flatten=True)
        net.features = zoo_features.features
    data = mx.sym.var("data")
    internals = net(data).get_internals()
    backbone = gluon.SymbolBlock([internals[name] for name in ORIGINAL_TAPS["resnet18_v1"]], data,
                                 params=net.collect_params())
    backbone._prefix = prefix
    stage_heads = [_original_heads(num_classes, side) for _, side in TAP_SHAPES_64]
    mx.random.seed(seed)
    for block in [backbone] + [head for heads in stage_heads for head in heads]:
        block.collect_params().initialize(mx.init.Xavier(), ctx=mx.cpu())
    _original_forward(backbone, stage_heads, mx.nd.zeros((1, 3, 64, 64)))  # deferred shapes
    _randomize_statistics(backbone, seed)
    for number, heads in enumerate(stage_heads):
        for head in heads:
            _randomize_statistics(head, seed + number + 1)
    return net, backbone, stage_heads


def _save_original_with_save_parameters(backbone, stage_heads, directory):
    backbone.save_parameters(os.path.join(directory, "backbone_resnet.params"))
    for stage, heads in zip((2, 3, 4), stage_heads):
        for stem, block in zip(STEMS, heads):
            block.save_parameters(os.path.join(directory, "%s.params" % (stem % stage)))


@pytest.fixture(scope="module")
def original_saved_with_save_parameters(tmp_path_factory):
    """(zoo net, backbone, stage heads, directory, x, expected prediction): the
    original's blocks written by Gluon's own save_parameters."""
    net, backbone, stage_heads = _original_model(seed=21)
    directory = str(tmp_path_factory.mktemp("save_parameters"))
    _save_original_with_save_parameters(backbone, stage_heads, directory)
    x = mx.nd.random.uniform(-1, 1, shape=(2, 3, 64, 64))
    return net, backbone, stage_heads, directory, x, _original_forward(backbone, stage_heads, x)


def _structural(names):
    return ["%d.%s" % (index, suffix) for index, suffix in names]


STRUCTURAL_FSR = _structural([(0, "weight"), (0, "bias")] + [(1, s) for s in BN]
                             + [(3, "weight"), (3, "bias")] + [(4, s) for s in BN]
                             + [(6, "weight"), (6, "bias")] + [(7, s) for s in BN]
                             + [(9, "weight"), (9, "bias")])


def test_gluon_save_parameters_files_of_the_original_blocks_load(original_saved_with_save_parameters):
    _, _, _, directory, x, expected = original_saved_with_save_parameters
    # what Gluon wrote: structural names for the heads, prefix-stripped names for the SymbolBlock
    assert _file_keys(os.path.join(directory, "fconv_stage_2.params")) == ["0.weight", "0.bias"]
    assert _file_keys(os.path.join(directory, "fsr_stage_4.params")) == STRUCTURAL_FSR
    assert _file_keys(os.path.join(directory, "fatt_stage_3.params"))[-2:] == ["6.weight", "6.bias"]
    backbone_keys = _file_keys(os.path.join(directory, "backbone_resnet.params"))
    assert backbone_keys[0] == "conv0_weight" and "dense1_weight" in backbone_keys
    mx.random.seed(22)
    fresh = AttributeModel(NUM_CLASSES, backbone="resnet18_v1", input_size=64)
    assert not np.allclose(_prediction(fresh, x), expected, atol=1e-3)
    used = load_original_params(fresh, directory)
    assert [os.path.basename(p) for p in used.values()] == [
        "backbone_resnet.params"] + ["%s.params" % (s % n) for n in (2, 3, 4) for s in STEMS]
    np.testing.assert_allclose(_prediction(fresh, x), expected, rtol=1e-5, atol=1e-6)


def test_the_zoo_networks_and_our_backbones_save_parameters_files_load(original_saved_with_save_parameters,
                                                                       tmp_path):
    """A backbone file with the model-zoo network's structural names (``features.0.weight``,
    ``output.weight``: its save_parameters), or our TapBackbone's own, is read too."""
    net, _, _, directory, x, expected = original_saved_with_save_parameters
    for name in os.listdir(directory):
        if not name.startswith("backbone"):
            os.link(os.path.join(directory, name), str(tmp_path / name))
    zoo_file = str(tmp_path / "backbone_resnet.params")
    net.save_parameters(zoo_file)
    keys = _file_keys(zoo_file)
    assert keys[0] == "features.0.weight" and keys[-2:] == ["output.weight", "output.bias"]
    mx.random.seed(23)
    fresh = AttributeModel(NUM_CLASSES, backbone="resnet18_v1", input_size=64)
    load_original_params(fresh, str(tmp_path))
    np.testing.assert_allclose(_prediction(fresh, x), expected, rtol=1e-5, atol=1e-6)
    os.remove(zoo_file)
    fresh.backbone.save_parameters(zoo_file)  # our own structure: to_tap2.0.weight, …
    assert _file_keys(zoo_file)[0].startswith("to_tap2.")
    mx.random.seed(24)
    other = AttributeModel(NUM_CLASSES, backbone="resnet18_v1", input_size=64)
    load_original_params(other, str(tmp_path))
    np.testing.assert_allclose(_prediction(other, x), expected, rtol=1e-5, atol=1e-6)
    # a structural file with a missing parameter names it in its own layout
    loaded = mx.nd.load(str(tmp_path / "fsr_stage_2.params"))
    del loaded["7.gamma"]
    os.remove(str(tmp_path / "fsr_stage_2.params"))
    mx.nd.save(str(tmp_path / "fsr_stage_2.params"), loaded)
    with pytest.raises(UserError, match=r"fsr_stage_2\.params: parameter '7\.gamma' missing \(expected shape \(1024,\)\)"):
        load_original_params(other, str(tmp_path))


def test_our_save_parameters_layout_is_what_gluon_writes_and_the_original_loads(resnet18_saved, tmp_path):
    """The other direction: our files in the save_parameters layout are loaded by the
    original's blocks with Gluon's load_parameters (and load_params), and Gluon's own
    save_parameters of those blocks writes the same names in the same order."""
    net, _ = resnet18_saved
    ours = str(tmp_path / "ours")
    save_original_params(net, ours, layout="save_parameters")
    assert sorted(os.listdir(ours)) == RESNET_FILES
    assert _file_keys(os.path.join(ours, "fsr_stage_2.params")) == STRUCTURAL_FSR
    _, backbone, stage_heads = _original_model(seed=25)
    backbone.load_parameters(os.path.join(ours, "backbone_resnet.params"), ctx=mx.cpu())
    resaved = str(tmp_path / "resaved")
    os.makedirs(resaved)
    for stage, heads in zip((2, 3, 4), stage_heads):
        for stem, block in zip(STEMS, heads):
            block.load_parameters(os.path.join(ours, "%s.params" % (stem % stage)), ctx=mx.cpu())
    _save_original_with_save_parameters(backbone, stage_heads, resaved)
    for name in RESNET_FILES:
        mine, theirs = mx.nd.load(os.path.join(ours, name)), mx.nd.load(os.path.join(resaved, name))
        assert list(mine) == list(theirs), name
        for key in mine:
            np.testing.assert_array_equal(mine[key].asnumpy(), theirs[key].asnumpy(), err_msg=key)
    x = mx.nd.random.uniform(-1, 1, shape=(2, 3, 64, 64))
    np.testing.assert_allclose(_original_forward(backbone, stage_heads, x), _prediction(net, x),
                               rtol=1e-5, atol=1e-6)
    _load_params(stage_heads[0][2], os.path.join(ours, "fsr_stage_2.params"))  # the deprecated reader too
    with pytest.raises(ValueError, match="layout: expected one of save_params, save_parameters"):
        save_original_params(net, ours, layout="export")


# ------------------------------------------------------------------ file names

def _linked(directory, target, rename=lambda name: name, skip=()):
    os.makedirs(target, exist_ok=True)
    for name in os.listdir(directory):
        if name not in skip:
            os.link(os.path.join(directory, name), os.path.join(target, rename(name)))
    return target


def _joint_new(name):
    """The original training script's save names (wider_training.py, 'Model Saving')."""
    return "joint_new_base_resNet.params" if name == "backbone_resnet.params" else "joint_new_" + name


def _fresh_model_loaded_from(directory, seed):
    """(a freshly initialised resnet18 model, load_original_params' file per block) of ``directory``."""
    mx.random.seed(seed)
    fresh = AttributeModel(NUM_CLASSES, backbone="resnet18_v1", input_size=64)
    return fresh, load_original_params(fresh, directory)


def test_the_original_scripts_save_names_and_other_prefixes_load(resnet18_saved, tmp_path):
    net, directory = resnet18_saved
    x = mx.nd.random.uniform(-1, 1, shape=(2, 3, 64, 64))
    expected = _prediction(net, x)
    joint = _linked(directory, str(tmp_path / "joint"), _joint_new)
    fresh, used = _fresh_model_loaded_from(joint, seed=31)
    assert os.path.basename(used["backbone_resnet"]) == "joint_new_base_resNet.params"
    assert os.path.basename(used["fatt_stage_3"]) == "joint_new_fatt_stage_3.params"
    np.testing.assert_allclose(_prediction(fresh, x), expected, rtol=1e-6, atol=1e-7)
    # <stem>-<epoch>.params and <prefix><stem>.params
    epochs = _linked(directory, str(tmp_path / "epochs"),
                     lambda name: name.replace(".params", "-0042.params") if "stage_2" in name
                     else "best_" + name)
    fresh, used = _fresh_model_loaded_from(epochs, seed=32)
    assert os.path.basename(used["fsr_stage_2"]) == "fsr_stage_2-0042.params"
    assert os.path.basename(used["backbone_resnet"]) == "best_backbone_resnet.params"
    np.testing.assert_allclose(_prediction(fresh, x), expected, rtol=1e-6, atol=1e-7)


def test_ambiguous_and_missing_file_names(resnet18_saved, tmp_path):
    net, directory = resnet18_saved
    # two candidates for one stem: refused with the file to rename
    both = _linked(directory, str(tmp_path / "both"), _joint_new)
    os.link(os.path.join(directory, "fsr_stage_2.params"), os.path.join(both, "fsr_stage_2-0001.params"))
    with pytest.raises(UserError, match=r"both: several parameter files for fsr_stage_2 \(fsr_stage_2-0001\.params, "
                                        r"joint_new_fsr_stage_2\.params\); expected one: rename the one to "
                                        r"load to fsr_stage_2\.params"):
        load_original_params(net, both)
    # the exact name wins over other candidates
    os.link(os.path.join(directory, "fsr_stage_2.params"), os.path.join(both, "fsr_stage_2.params"))
    assert os.path.basename(load_original_params(net, both)["fsr_stage_2"]) == "fsr_stage_2.params"
    # the original saves its heads and its backbone into different directories
    heads = _linked(directory, str(tmp_path / "heads"), _joint_new, skip=("backbone_resnet.params",))
    with pytest.raises(UserError, match=r"heads/backbone_resnet\.params: missing parameter file \(expected "
                                        r"backbone_resnet\.params, fconv_stage_2\.params, .* in .*heads; the "
                                        r"original's training script saves the backbone separately, as "
                                        r"saved_models/joint_new_base_resNet\.params: copy it here\)$"):
        load_original_params(net, heads)
    # a backbone file of the other family, and a name holding two stems, are named
    other = _linked(directory, str(tmp_path / "other"), skip=("backbone_resnet.params", "fatt_stage_2.params"))
    os.link(os.path.join(directory, "backbone_resnet.params"), os.path.join(other, "backbone_densenet.params"))
    with pytest.raises(UserError, match=r"found backbone_densenet\.params: the model was built with another "
                                        r"backbone family \(--backbone\)"):
        load_original_params(net, other)
    os.link(os.path.join(directory, "backbone_resnet.params"), os.path.join(other, "backbone_resnet.params"))
    os.link(os.path.join(directory, "fatt_stage_2.params"), os.path.join(other, "fconv_stage_2_fatt_stage_2.params"))
    with pytest.raises(UserError, match=r"other/fatt_stage_2\.params: missing parameter file .*not recognised: "
                                        r"backbone_densenet\.params, fconv_stage_2_fatt_stage_2\.params\)$"):
        load_original_params(net, other)


# ------------------------------------------------------------------ damaged files

def _damaged_copy(directory, target, name, damage):
    """A directory of links to ``directory``'s files with ``name`` replaced by ``damage(bytes)``."""
    _linked(directory, target, skip=(name,))
    with open(os.path.join(directory, name), "rb") as f:
        data = f.read()
    with open(os.path.join(target, name), "wb") as f:
        f.write(damage(data))
    return target


def _flipped(position, mask):
    def damage(data):
        data = bytearray(data)
        data[position if position >= 0 else len(data) + position] ^= mask
        return bytes(data)
    return damage


NOT_READABLE = r"fconv_stage_2\.params: expected an MXNet parameter file \(nd\.save format\), could not read it \(%s\)$"


def test_damaged_files_are_reported_with_mxnets_own_error_line(resnet18_saved, tmp_path):
    net, directory = resnet18_saved
    size = os.path.getsize(os.path.join(directory, "fconv_stage_2.params"))
    cases = [(lambda d: d[:0], r"Check failed: fi->Read\(&header\): Invalid NDArray file format"),
             (lambda d: d[:30], r"Check failed: fi->Read\(data\): Invalid NDArray file format"),
             (lambda d: d[:size // 2], r"Check failed: .*Invalid NDArray file format"),
             (lambda d: d[:-3], r"Check failed: fi->Read\(keys\): Invalid NDArray file format"),
             (_flipped(0, 0x01), r"Check failed: header == kMXAPINDArrayListMagic: Invalid NDArray file format"),
             (lambda d: b"not a params file", r"Check failed: header == kMXAPINDArrayListMagic: .*")]
    for number, (damage, reason) in enumerate(cases):
        target = _damaged_copy(directory, str(tmp_path / str(number)), "fconv_stage_2.params", damage)
        with pytest.raises(UserError) as caught:
            load_original_params(net, target)
        message = str(caught.value)
        assert re.search(NOT_READABLE % reason, message), message
        assert "\n" not in message and "Traceback" not in message and "ndarray.cc" not in message


def test_flipped_bytes_in_names_and_values(resnet18_saved, tmp_path):
    net, directory = resnet18_saved  # nothing is loaded into net: each file fails before set_data
    fconv = mx.nd.load(os.path.join(directory, "fconv_stage_2.params"))
    # the names are stored last: conv0_weight, conv0_bias
    target = _damaged_copy(directory, str(tmp_path / "name"), "fconv_stage_2.params", _flipped(-2, 0x01))
    with pytest.raises(UserError, match=r"fconv_stage_2\.params: parameter 'conv0_bias' missing"):
        load_original_params(net, target)  # conv0_bias → conv0_bi`s
    target = _damaged_copy(directory, str(tmp_path / "utf8"), "fconv_stage_2.params", _flipped(-1, 0x80))
    with pytest.raises(UserError, match=r"fconv_stage_2\.params: .*could not read it \(a parameter name is not "
                                        r"UTF-8 text"):
        load_original_params(net, target)
    # the exponent of one bias value: a non-finite parameter
    bias = fconv["conv0_bias"].asnumpy()
    with open(os.path.join(directory, "fconv_stage_2.params"), "rb") as f:
        data = f.read()
    position = data.index(bias.tobytes()) + 4 * 2 + 2  # bias[2]: bytes 2-3 hold sign and exponent

    def exponent_all_ones(data):  # flip every exponent bit that is 0: the value becomes inf or NaN
        data = bytearray(data)
        data[position] ^= ~data[position] & 0x80
        data[position + 1] ^= ~data[position + 1] & 0x7f
        return bytes(data)
    target = _damaged_copy(directory, str(tmp_path / "value"), "fconv_stage_2.params", exponent_all_ones)
    with pytest.raises(UserError, match=r"fconv_stage_2\.params: parameter 'conv0_bias' holds non-finite values"):
        load_original_params(net, target)


@pytest.mark.slow
def test_random_flips_in_a_params_file_give_user_errors(resnet18_saved, tmp_path):
    """Flips in a small file (mostly in its header, shapes, types and names): a UserError, or a load (nd.save files have no checksum: a
    flipped value bit goes unnoticed) - never another exception."""
    _, directory = resnet18_saved
    model = AttributeModel(NUM_CLASSES, backbone="resnet18_v1", input_size=64)  # loads may change it
    with open(os.path.join(directory, "fconv_stage_2.params"), "rb") as f:
        data = f.read()
    rng = np.random.RandomState(5)
    outcomes = {"loaded": 0, "error": 0}
    target = _linked(directory, str(tmp_path / "fuzz"), skip=("fconv_stage_2.params",))
    path = os.path.join(target, "fconv_stage_2.params")
    names_start = data.index(b"conv0_weight") - 8  # the names block: lengths and text
    for _ in range(30):
        # headers (magic, counts, shapes, types: the first 100 bytes), names, or anywhere
        position = [rng.randint(100), names_start + rng.randint(len(data) - names_start),
                    rng.randint(len(data))][rng.randint(3)]
        damaged = bytearray(data)
        damaged[position] ^= 1 << rng.randint(8)
        with open(path, "wb") as f:
            f.write(bytes(damaged))
        try:
            load_original_params(model, target)
            outcomes["loaded"] += 1
        except UserError as err:
            assert "\n" not in str(err) and "Traceback" not in str(err), str(err)
            assert "fconv_stage_2" in str(err)
            outcomes["error"] += 1
    assert outcomes["error"] >= 10, outcomes
