"""ImageNet weights end to end: the model store (``--pretrained``) and a local file
(``--pretrained FILE``) for the backbones the recipes use, checked after each method's build:
backbone = the file, new layers initialised as documented, lr multipliers on the trainers;
bad files are one-line errors before any work; GluonCV's torchvision-layout ResNets (v1b).

No network: the tests write their own weight files (random values) into a temporary model
store ($MXNET_HOME/models/<name>-<sha1[:8]>.params), with the store's sha1 table pointed at
them, so MXNet's and GluonCV's own ``get_model_file`` find and verify them.
"""
import hashlib
import json
import os
import re
import shutil

import mxnet as mx
import numpy as np
import pytest
from mxnet import nd

import fgvc_gluon.family  # noqa: F401  (registers every method)
import imbalanced_attr.family  # noqa: F401
from fgvc_gluon.family import FAMILY as FGVC
from fgvc_gluon.zoo import ZOO
from helpers import seed_everything
from imbalanced_attr.backbones import TAP_BACKBONES
from imbalanced_attr.family import FAMILY as ATTR
from training_runtime import app, cli, config as run_config
from training_runtime.errors import UserError
from training_runtime.loop import make_trainer
from training_runtime.schedule import make_schedule

import train_fgvc


@pytest.fixture(scope="module")
def zoo_files(tmp_path_factory):
    """zoo name -> (path, {structural name: array}) of a random weights file, written once."""
    directory, files = tmp_path_factory.mktemp("zoo"), {}

    def get(name):
        if name not in files:
            path = str(directory / ("%s.params" % name))
            files[name] = (path, write_zoo_file(ZOO.get(name).make(), path))
        return files[name]
    return get


@pytest.fixture
def store(tmp_path, monkeypatch, zoo_files):
    """An empty model store in tmp_path (no network); put(name) copies a weights file into it
    under the store's file name, with the store's sha1 table pointing at it; returns its arrays."""
    monkeypatch.setenv("MXNET_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MXNET_GLUON_REPO", "http://127.0.0.1:9/")

    def put(name):
        from mxnet.gluon.model_zoo import model_store as mxnet_store
        from gluoncv.model_zoo import model_store as gluoncv_store
        path, arrays = zoo_files(name)
        sha1 = hashlib.sha1(open(path, "rb").read()).hexdigest()
        module = mxnet_store if ZOO.get(name).store == "mxnet" else gluoncv_store
        monkeypatch.setitem(module._model_sha1, name, sha1)
        os.makedirs(str(tmp_path / "home" / "models"), exist_ok=True)
        shutil.copy(path, str(tmp_path / "home" / "models" / ("%s-%s.params" % (name, sha1[:8]))))
        return arrays
    return put


def write_zoo_file(net, path):
    """Random weights (every array, BN statistics too: none is 0 or 1) of a model-zoo network,
    saved in its layout; returns {structural name: numpy array}."""
    net.initialize()
    net(nd.zeros((1, 3, 32, 32)))   # completes the deferred shapes
    rng = np.random.RandomState(len(path))
    for name, param in net._collect_params_with_prefix().items():
        positive = name.endswith(("gamma", "running_var"))
        values = rng.uniform(0.5, 1.5, param.shape) if positive else rng.uniform(0.01, 0.05, param.shape)
        param.set_data(nd.array(values * np.sign(rng.uniform(-1, 1 if not positive else 2, param.shape))))
    net.save_parameters(path)
    return {k: v.asnumpy() for k, v in nd.load(path).items()}


def by_relative_name(zoo_name, arrays):
    """The file's arrays by parameter name without the zoo prefix ('stage1_conv0_weight')."""
    reference = ZOO.get(zoo_name).make() if zoo_name in ZOO else TAP_BACKBONES.get(zoo_name).make()
    return {relative(p.name): arrays[k] for k, p in reference._collect_params_with_prefix().items()}


def relative(name):
    """A zoo Parameter's name without the prefixes ('s3n0_resnetv10_stage1_conv0_weight' ->
    'stage1_conv0_weight')."""
    return re.sub(r"^.*?resnetv1(?:b|\d+)_", "", name)


def assert_from_file(params, expected, count):
    """Every Parameter of ``params`` (a zoo block) holds the file's array of its name."""
    params = list(params.values())
    assert len(params) == count
    for param in params:
        np.testing.assert_array_equal(param.data().asnumpy(), expected[relative(param.name)], param.name)


def assert_xavier(param, fan_in, fan_out, kind):
    """Xavier statistics and not one of the file's values (all >= 0.5 in absolute value)."""
    w = param.data().asnumpy()
    if kind == "uniform avg 3":       # mx.init.Xavier()
        bound = np.sqrt(3.0 / ((fan_in + fan_out) / 2.0))
        assert np.abs(w).max() <= bound and abs(w.std() / (bound / np.sqrt(3)) - 1) < 0.1
    else:                             # Xavier(gaussian, "in", 2)
        assert abs(w.std() / np.sqrt(2.0 / fan_in) - 1) < 0.1
    assert w.shape == (fan_out, fan_in)


def trainer_lrs(task, lr=0.01):
    """{group: (lr of its Trainer, its parameter names)} as the runner attaches them."""
    optim = run_config.OptimConfig(lr=lr, momentum=0.9, wd=1e-4, epochs=2, schedule="step", lr_steps=[1])
    schedule = make_schedule(optim)
    out = {}
    for group in task.trainable_groups():
        trainer = schedule.attach(make_trainer(group.params, optim, group.optimizer_params),
                                  group.lr_mult, group.follows_schedule)
        params = group.params.values() if hasattr(group.params, "values") else group.params
        out[group.name] = (trainer.learning_rate, set(p.name for p in params))
    return out


def build(family, method, backbone, pretrained, image_size=32, names=("a", "b", "c", "d", "e"), **options):
    entry = family.methods.get(method)
    opts = dict(entry.default_options(), **options)
    model = run_config.ModelConfig(method=method, backbone=backbone, image_size=image_size,
                                   pretrained=pretrained, options=opts)
    return app.build_task(family, run_config.RunConfig(family=family.name, model=model), names,
                          [mx.cpu()], pretrained)


# ---------------------------------------------------------------- the model store, per method

def test_baseline_v1b_from_the_gluoncv_store_and_the_new_output(store):
    seed_everything()
    expected = by_relative_name("resnet18_v1b", store("resnet18_v1b"))
    task = build(FGVC, "baseline", "resnet18_v1b", True)
    out = task.net(nd.random.uniform(shape=(2, 3, 32, 32)))   # completes the new layer's shapes
    assert out.shape == (2, 5) and np.isfinite(out.asnumpy()).all()
    assert_from_file(task.net.features.collect_params(), expected, len(expected) - 2)
    assert_xavier(task.net.output.weight, 512, 5, "uniform avg 3")
    assert not task.net.output.bias.data().asnumpy().any()
    lrs = trainer_lrs(task)
    assert lrs["backbone"][0] == pytest.approx(0.01) and lrs["classifier"][0] == pytest.approx(0.1)
    assert lrs["classifier"][1] == set(task.net.output.collect_params().keys())


def test_s3n_from_the_mxnet_store_new_layers_and_groups(store):
    seed_everything()
    expected = by_relative_name("resnet18_v1", store("resnet18_v1"))
    task = build(FGVC, "s3n", "resnet18_v1", True, image_size=48, sampler_impl="mxnet")
    net = task.net
    assert_from_file(net.features.collect_params(), expected, len(expected) - 2)
    # the new layers: Xavier(gaussian, 'in', 2), the sampler's constants (S3N build_method)
    assert_xavier(net.con_classifier.weight, 3 * 512, 5, "gaussian in 2")
    assert float(net.radius.data().asscalar()) == pytest.approx(0.09)
    assert float(net.radius_inv.data().asscalar()) == pytest.approx(0.3)
    lrs = trainer_lrs(task)
    assert {g: lr for g, (lr, _) in lrs.items()} == pytest.approx(
        {"classifier": 0.1, "radius": 1e-6, "filter": 1e-6, "rest": 0.01})
    assert set(net.features.collect_params().keys()) <= lrs["rest"][1]


def test_centerloss_v1b_backbone_from_the_store(store):
    seed_everything()
    expected = by_relative_name("resnet18_v1b", store("resnet18_v1b"))
    task = build(FGVC, "centerloss", "resnet18_v1b", True)
    task.net(nd.random.uniform(shape=(2, 3, 32, 32)))
    assert_from_file(task.net.backbone.collect_params(), expected, len(expected) - 2)
    assert_xavier(task.net.embedding[1].weight, 512, 512, "uniform avg 3")
    lrs = trainer_lrs(task)
    assert lrs["net"][0] == pytest.approx(0.01) and lrs["centers"][0] == pytest.approx(0.5)


def test_mcloss_resnet50_recipe_is_torchvisions_layout_with_the_stores_weights(store):
    """The one full-size network: MC_ResNet50.py's recipe on GluonCV's resnet50_v1b."""
    seed_everything()
    run = run_config.resolve(FGVC, {"method": "mcloss", "backbone": "resnet50_mc", "data_dir": "/cub"})
    assert run.model.pretrained is True
    expected = by_relative_name("resnet50_v1b", store("resnet50_v1b"))
    task = build(FGVC, "mcloss", "resnet50_mc", True, image_size=448, names=[str(i) for i in range(200)])
    assert_from_file(task.net.features.collect_params(), expected, len(expected) - 2)
    # stride in the 3x3 conv (torchvision), not in the first 1x1 (Gluon v1)
    first = task.net.features[5][0]     # layer2's first bottleneck
    assert first.conv1._kwargs["stride"] == (1, 1) and first.conv2._kwargs["stride"] == (2, 2)
    with mx.autograd.train_mode():
        task.net(nd.random.uniform(shape=(1, 3, 64, 64)))
    classifier_bn = task.net.classifier[2]
    assert (classifier_bn.gamma.data().asnumpy() == 1).all()   # new layers: not from the file
    lrs = trainer_lrs(task)
    assert lrs["backbone"][0] == pytest.approx(0.01) and lrs["classifier"][0] == pytest.approx(0.1)
    # Gluon's v1 stays selectable, with its own recipe line
    assert run_config.resolve(FGVC, {"method": "mcloss", "backbone": "resnet50_v1_mc",
                                     "data_dir": "/cub"}).optim.schedule == "cosine"


@pytest.mark.parametrize("backbone", ["resnet18_v1", "resnet18_v1b"])
def test_attribute_taps_from_the_store(store, backbone):
    seed_everything()
    zoo_arrays = store(backbone)
    expected = by_relative_name(backbone, zoo_arrays)
    task = build(ATTR, "attention", backbone, True)
    tap = task.net.backbone
    zoo_params = {k: p for k, p in tap.collect_params().items() if not k.startswith(tap.output.prefix)}
    assert_from_file(zoo_params, expected, len(expected) - 2)
    assert_xavier(tap.output.weight, 512, 5, "gaussian in 2")
    lrs = trainer_lrs(task)
    assert set(lrs) == set(task.blocks()) and all(lr == pytest.approx(0.01) for lr, _ in lrs.values())


def test_v1b_taps_exist_and_keep_the_v1_shapes():
    for depth in (18, 34, 50, 101):
        assert TAP_BACKBONES.get("resnet%d_v1b" % depth).store == "gluoncv"
    from imbalanced_attr.backbones import get_backbone, tap_shapes
    assert tap_shapes(get_backbone("resnet18_v1b", 3), 64) == [(256, 4, 4), (256, 4, 4), (512, 2, 2)]


# ---------------------------------------------------------------- --pretrained FILE

def test_flag_forms_and_the_typed_run_definition(tmp_path, monkeypatch):
    parser = app.build_parser(FGVC, train_fgvc.__doc__)
    monkeypatch.chdir(tmp_path)
    given = lambda argv: run_config.given_values(parser.parse_args(argv), FGVC)  # noqa: E731
    assert given(["--pretrained"]) == {"pretrained": True}
    assert given(["--no-pretrained"]) == {"pretrained": False}
    assert given(["--pretrained", "w/r18.params", "--lr", "0.1"]) == {
        "pretrained": str(tmp_path / "w" / "r18.params"), "lr": 0.1}
    run = run_config.resolve(FGVC, dict(given(["--pretrained", "r18.params"]), method="s3n"))
    assert run.model.pretrained == str(tmp_path / "r18.params")
    again = run_config.RunConfig.from_dict(json.loads(json.dumps(run.to_dict())))
    assert again == run
    # older run definitions (a bool) stay readable, and a resume with the same FILE changes nothing
    old = run.to_dict()
    old["model"]["pretrained"] = True
    assert run_config.RunConfig.from_dict(old).model.pretrained is True
    assert run_config.reconcile(run, given(["--pretrained", "r18.params"]), FGVC, "resume", "x")[1] == []
    assert "--pretrained [FILE]" in parser.format_help()
    assert "resnet50_v1b" in app.recipes_text(FGVC)


def test_a_local_file_needs_no_store(tmp_path, monkeypatch, zoo_files):
    monkeypatch.setenv("MXNET_HOME", str(tmp_path / "empty"))
    monkeypatch.setenv("MXNET_GLUON_REPO", "http://127.0.0.1:9/")
    path, arrays = zoo_files("resnet18_v1b")
    expected = by_relative_name("resnet18_v1b", arrays)
    task = build(FGVC, "baseline", "resnet18_v1b", path)
    assert_from_file(task.net.features.collect_params(), expected, len(expected) - 2)
    assert not os.path.exists(str(tmp_path / "empty"))   # the store was not consulted


def test_bad_files_are_one_line_errors_naming_the_file_and_the_first_mismatch(tmp_path, zoo_files):
    good, arrays = zoo_files("resnet18_v1")
    net = ZOO.get("resnet18_v1").make()
    from training_runtime.pretrained import check_weights_file

    def fails(path, pattern):
        with pytest.raises(UserError) as err:
            check_weights_file(net, path, "resnet18_v1")
        message = str(err.value)
        assert "\n" not in message and path in message, message
        assert pattern in message, message

    check_weights_file(net, good, "resnet18_v1")
    missing = dict(arrays)
    del missing["features.1.gamma"]
    nd.save(str(tmp_path / "missing.params"), {k: nd.array(v) for k, v in missing.items()})
    fails(str(tmp_path / "missing.params"), "no parameter 'features.1.gamma'")
    shaped = dict(arrays, **{"features.0.weight": np.zeros((64, 3, 3, 3), np.float32)})
    nd.save(str(tmp_path / "shape.params"), {k: nd.array(v) for k, v in shaped.items()})
    fails(str(tmp_path / "shape.params"), "'features.0.weight' has shape (64, 3, 3, 3), resnet18_v1 expects "
                                          "(64, 3, 7, 7)")
    # the in_channels of a conv are deferred in the zoo network: inferred before the check
    inner = dict(arrays, **{"features.4.0.body.0.weight": np.zeros((64, 32, 3, 3), np.float32)})
    nd.save(str(tmp_path / "inner.params"), {k: nd.array(v) for k, v in inner.items()})
    fails(str(tmp_path / "inner.params"), "(64, 32, 3, 3), resnet18_v1 expects (64, 64, 3, 3)")
    extra = dict(arrays, **{"features.99.weight": np.zeros((1,), np.float32)})
    nd.save(str(tmp_path / "extra.params"), {k: nd.array(v) for k, v in extra.items()})
    fails(str(tmp_path / "extra.params"), "holds 'features.99.weight'")
    fails(zoo_files("resnet18_v1b")[0], "no parameter 'features.0.weight'")
    with open(str(tmp_path / "junk.params"), "wb") as f:
        f.write(b"not a params file")
    fails(str(tmp_path / "junk.params"), "not an MXNet .params file")
    with pytest.raises(UserError, match=r"^--pretrained .*nope.params: no such file"):
        build(FGVC, "baseline", "resnet18_v1", str(tmp_path / "nope.params"))


def test_a_refused_file_stops_the_script_before_training_and_writes_nothing(tmp_path, capsys, zoo_files,
                                                                            fashion_mnist_dir):
    bad = zoo_files("resnet18_v1b")[0]      # torchvision's layout for Gluon's resnet18_v1
    run_dir = str(tmp_path / "run")
    argv = ["--method", "baseline", "--backbone", "resnet18_v1", "--pretrained", bad, "--max-steps", "1",
            "--train-limit", "8", "--val-limit", "8", "--test-limit", "8", "--figures", "none",
            "--save-dir", run_dir]
    with pytest.raises(SystemExit) as exit_info:
        cli.run_main(train_fgvc.main, argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1, err
    assert err[0].startswith("error: --pretrained %s: " % bad) and "resnet18_v1" in err[0], err
    assert not os.path.exists(run_dir)
