"""python -m training_runtime.export: the exported MXNet symbol (SymbolBlock.imports) and
the exported ONNX model (onnxruntime) give the checkpoint's predictions within 1e-5, for
the attribute model and every fine-grained method's inference branch (S3N whole, with the
translations of training_runtime.onnx_ops, in both of its evaluation modes); the sidecar
documents the preprocessing and the labels, and scripts/onnx_predict.py applies it to give
--predict's numbers; a bad RUN is a one-line error.

Each model is a one-step run on the demo data (Fashion-MNIST, 28-32 px) made in process.
"""
import csv
import importlib.util
import io
import json
import os

import cv2
import mxnet as mx
import numpy as np
import onnx
import onnxruntime
import pytest

import train_attr
import train_fgvc
from training_runtime import export
from training_runtime.errors import UserError

pytestmark = pytest.mark.slow  # end-to-end runs: not in the fast loop (-m "not slow")

TOL = 1e-5  # absolute and relative (float32 kernels of MXNet and onnxruntime differ in the last bits)
TINY = ["--epochs", "1", "--max-steps", "1", "--batch-size", "16", "--seed", "3"]
RUNS = {
    "attention": (train_attr, ["--train-limit", "200", "--val-limit", "48", "--test-limit", "16"]),
    "baseline": (train_fgvc, ["--method", "baseline", "--train-limit", "32", "--val-limit", "16",
                              "--test-limit", "16"]),
    "mcloss": (train_fgvc, ["--method", "mcloss", "--train-limit", "32", "--val-limit", "16",
                            "--test-limit", "16"]),
    "centerloss": (train_fgvc, ["--method", "centerloss", "--train-limit", "32", "--val-limit", "16",
                                "--test-limit", "16"]),
    "s3n": (train_fgvc, ["--method", "s3n", "--image-size", "32", "--train-limit", "32",
                         "--val-limit", "16", "--test-limit", "16"]),
}
METHODS = sorted(RUNS)

@pytest.fixture(scope="module")
def runs(tmp_path_factory, fashion_mnist_dir):
    """method -> run directory of a one-step run (made on first use)."""
    made = {}

    def get(method):
        if method not in made:
            script, flags = RUNS[method]
            save_dir = str(tmp_path_factory.mktemp("run-" + method) / "run")
            script.main(TINY + flags + ["--save-dir", save_dir])
            made[method] = save_dir
        return made[method]
    return get

@pytest.fixture(scope="module")
def onnx_exports(runs, tmp_path_factory):
    """method -> (path prefix, sidecar, printed output) of its --format onnx export (made on
    first use, shared by the parity and the onnx_predict tests)."""
    made = {}

    def get(method):
        if method not in made:
            prefix = str(tmp_path_factory.mktemp("onnx-" + method) / "model")
            printed = io.StringIO()
            made[method] = (prefix, export.export(runs(method), "onnx", prefix, out=printed),
                            printed.getvalue())
        return made[method]
    return get

_TASKS = {}


def checkpoint_predictions(run, batch, branch=None):
    """The checkpoint's predictions of ``batch`` (N×3×S×S), as --predict computes them."""
    if run not in _TASKS:
        _TASKS[run] = export.load_task(run)
    task, _, _, epoch, _ = _TASKS[run]
    mx.random.seed(11)  # S3N's evaluation mode of early epochs draws random numbers
    outputs = task.predict(mx.nd.array(batch), epoch)
    return (outputs[branch] if branch else next(iter(outputs.values()))).asnumpy()

def input_batch(info, n=3):
    size = info["input"]["size"]
    return np.random.RandomState(0).uniform(-2, 2, (n, 3, size, size)).astype(np.float32)

@pytest.mark.parametrize("method", METHODS)
def test_exported_symbol_gives_the_checkpoints_predictions(runs, method, tmp_path, capsys):
    prefix = str(tmp_path / "model")
    info = export.main([runs(method), "--format", "mxnet", "--output", prefix])
    assert info["files"] == ["model-symbol.json", "model-0000.params"]
    assert info["deterministic"] == (method != "s3n")  # S3N at epoch 0: mode 1 draws in the graph
    assert json.load(open(prefix + ".json")) == info
    batch = input_batch(info)
    net = mx.gluon.SymbolBlock.imports(prefix + "-symbol.json", ["data"], prefix + "-0000.params")
    mx.random.seed(11)
    exported = net(mx.nd.array(batch)).asnumpy()
    expected = checkpoint_predictions(runs(method), batch)
    assert exported.shape == (3, len(info["output"]["labels"]))
    np.testing.assert_allclose(exported, expected, rtol=TOL, atol=TOL)

def session_of(path):
    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def random_draws_as_input(path, name="uniforms"):
    """The model at ``path`` with its one RandomUniformLike node replaced by a graph input
    ``name`` (float32, N×961: S3N's mode-1 uniforms), saved next to it; returns the path."""
    model = onnx.load(str(path))
    draws = [node for node in model.graph.node if node.op_type == "RandomUniformLike"]
    assert len(draws) == 1
    model.graph.node.remove(draws[0])
    model.graph.node.extend([onnx.helper.make_node("Identity", [name], [draws[0].output[0]])])
    model.graph.input.extend([onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT,
                                                                 ["N", 961])])
    out = str(path) + "-uniforms.onnx"
    onnx.save(model, out)
    return out


@pytest.mark.parametrize("method", METHODS)
def test_exported_onnx_gives_the_checkpoints_predictions(runs, onnx_exports, method):
    prefix, info, printed = onnx_exports(method)
    assert json.load(open(prefix + ".json")) == info
    assert info["onnx"]["complete"] and info["files"] == ["model.onnx"]
    # S3N samples with BilinearSampler: GridSample, opset 16; the others stay at 13
    assert info["onnx"]["opset"] == (16 if method == "s3n" else 13)
    assert onnx.load(prefix + ".onnx").opset_import[0].version == info["onnx"]["opset"]
    session = session_of(prefix + ".onnx")
    assert [i.name for i in session.get_inputs()] == ["data"]  # weights are not inputs
    batch = input_batch(info)
    if method == "s3n":
        # epoch 0: evaluation mode 1 draws N×961 uniforms in the graph (RandomUniformLike),
        # as MXNet's graph does: with the same uniforms fed to both, the same numbers
        assert not info["deterministic"] and info["random_operators"] == ["RandomUniformLike"]
        assert "draws random numbers" in printed
        uniforms = np.random.RandomState(5).uniform(0, 1, (len(batch), 961)).astype(np.float32)
        exported = session_of(random_draws_as_input(prefix + ".onnx")).run(
            None, {"data": batch, "uniforms": uniforms})[0]
        task, _, _, epoch, _ = export.load_task(runs(method))
        expected = task.net(mx.nd.array(batch), 1, uniforms)[0].asnumpy()
    else:
        assert info["deterministic"] and "random_operators" not in info
        exported = session.run(None, {"data": batch})[0]
        expected = checkpoint_predictions(runs(method), batch)
    np.testing.assert_allclose(exported, expected, rtol=TOL, atol=TOL)
    # the batch dimension is dynamic
    assert session.run(None, {"data": batch[:1]})[0].shape == (1, exported.shape[1])


def test_s3n_mode_2_exports_a_deterministic_onnx_graph(runs, tmp_path):
    """After epoch 20 S3N evaluates in mode 2 (the best peaks, no random draw): the whole
    network in ONNX gives predict's concat output, and its graph holds no random operator."""
    task, _, _, _, _ = export.load_task(runs("s3n"))
    path = str(tmp_path / "mode2.onnx")
    assert export.export_onnx(export.inference_network(task, 21), 32, path) == 16
    assert export.onnx_random_operators(path) == []
    assert "GridSample" in set(node.op_type for node in onnx.load(path).graph.node)
    batch = input_batch({"input": {"size": 32}}, n=4)
    expected = task.predict(mx.nd.array(batch), 21)["concat"].asnumpy()
    exported = session_of(path).run(None, {"data": batch})[0]
    np.testing.assert_allclose(exported, expected, rtol=TOL, atol=TOL)


def test_untranslatable_s3n_falls_back_to_its_raw_branch(runs, tmp_path, capsys, monkeypatch):
    """Without GridSample (opset 15 at most) the sampler cannot be translated: the error names
    it, and the raw branch is exported with the gap recorded in the sidecar."""
    monkeypatch.setattr(export, "ONNX_MAX_OPSET", 15)
    prefix = str(tmp_path / "model")
    info = export.main([runs("s3n"), "--format", "onnx", "--output", prefix])
    assert not info["onnx"]["complete"] and "BilinearSampler" in info["onnx"]["error"]
    assert info["files"] == ["model-raw.onnx"] and info["output"]["name"] == "raw"
    assert info["onnx"]["opset"] == 13 and info["deterministic"]
    assert "BilinearSampler" in capsys.readouterr().out
    batch = input_batch(info)
    np.testing.assert_allclose(session_of(tmp_path / "model-raw.onnx").run(None, {"data": batch})[0],
                               checkpoint_predictions(runs("s3n"), batch, "raw"), rtol=TOL, atol=TOL)


class _Ops(mx.gluon.HybridBlock):
    """x N×3×S×S -> the sampler and the comparisons of training_runtime.onnx_ops."""

    def __init__(self, ops, **kwargs):
        super(_Ops, self).__init__(**kwargs)
        self.ops = ops

    def hybrid_forward(self, F, x):
        if self.ops == "sampler":  # grid in [-1.4, 1.4]: inside and outside the image
            grid = F.slice_axis(x, axis=1, begin=0, end=2) * 0.7
            return F.BilinearSampler(x, grid)
        a, b = F.floor(F.slice_axis(x, axis=1, begin=0, end=1)), F.floor(F.slice_axis(x, axis=1, begin=1, end=2))
        parts = [a > b, a >= b, a < b, a <= b, a == b, a != b, a >= 1, a <= -1, a != 0]
        return F.concat(*parts, dim=1)


@pytest.mark.parametrize("ops,opset", [("sampler", 16), ("comparisons", 13)])
def test_onnx_translations_match_mxnet(ops, opset, tmp_path):
    """BilinearSampler -> GridSample (align_corners, zero padding) and the comparisons give
    MXNet's numbers; each graph is written at the lowest opset that holds it."""
    block = _Ops(ops)
    block.hybridize()
    path = str(tmp_path / "ops.onnx")
    assert export.export_onnx(block, 9, path) == opset
    x = np.random.RandomState(1).uniform(-2, 2, (2, 3, 9, 9)).astype(np.float32)
    x[0, :2, 0, 0], x[0, :2, 0, 1] = [-1 / 0.7] * 2, [1 / 0.7] * 2   # the corners: pixels 0 and 8
    expected = block(mx.nd.array(x)).asnumpy()
    if ops == "sampler":
        np.testing.assert_allclose(expected[0, :, 0, :2], x[0, :, [0, 8], [0, 8]].T, rtol=1e-5)
        assert (expected == 0).any()   # a whole pixel outside the image: zero padding
    else:
        assert set(np.unique(expected)) == {0.0, 1.0}
    np.testing.assert_allclose(session_of(path).run(None, {"data": x})[0], expected, rtol=1e-6, atol=1e-6)

def test_sidecar_documents_preprocessing_and_labels(runs, tmp_path, capsys):
    attr = export.main([runs("attention"), "--output", str(tmp_path / "attr")])
    assert attr["input"]["layout"] == "NCHW" and attr["input"]["channel_order"] == "RGB"
    assert attr["input"]["shape"] == ["N", 3, 32, 32]
    assert attr["input"]["normalization"]["name"] == "imagenet"  # the demo's setting
    assert attr["input"]["normalization"]["mean"] == [0.485, 0.456, 0.406]
    assert attr["output"]["labels"][:2] == ["footwear", "upper_body"]
    assert attr["output"]["activation"].startswith("sigmoid")
    assert attr["source"]["method"] == "attention" and attr["source"]["epoch"] == 0
    fgvc = export.main([runs("centerloss"), "--output", str(tmp_path / "cl")])
    assert fgvc["output"]["labels"][0] == "T-shirt/top" and len(fgvc["output"]["labels"]) == 10
    assert fgvc["output"]["activation"].startswith("logits")
    assert fgvc["input"]["size"] == 28 and fgvc["input"]["normalization"]["std"] == [0.3081] * 3

def test_original_normalisation_is_documented():
    from imbalanced_attr.task import normalisation_info
    info = normalisation_info("original", 224)
    assert info["normalization"]["mean"] == [104.0, 117.0, 123.0]
    assert info["normalization"]["scale"] == 1.0 and info["normalization"]["std"] == [1.0] * 3
    assert "256" in info["resize"]

def test_bad_run_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(UserError, match="RUN: .*missing not found"):
        export.main([str(tmp_path / "missing"), "--output", str(tmp_path / "m")])
    with pytest.raises(UserError, match="holds neither best.ckpt nor last.ckpt"):
        export.main([str(tmp_path), "--output", str(tmp_path / "m")])
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="bad.ckpt is not a readable checkpoint"):
        export.main([str(bad), "--output", str(tmp_path / "m")])
    with pytest.raises(SystemExit) as stop:
        from training_runtime import cli
        cli.run_main(export.main, [str(tmp_path / "missing"), "--output", str(tmp_path / "m")])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: RUN:")

def test_unconvertible_operators_are_named():
    class Sampler(mx.gluon.HybridBlock):
        def hybrid_forward(self, F, x):
            grid = F.GridGenerator(F.zeros_like(F.slice_axis(F.reshape(x, (0, -1)), axis=1, begin=0,
                                                             end=6)), transform_type="affine",
                                   target_shape=(4, 4))
            return F.BilinearSampler(x, grid)
    symbol = Sampler()(mx.sym.var("data"))
    assert export.unsupported_operators(symbol) == ["GridGenerator"]
    assert export.unsupported_operators(symbol, 15) == ["BilinearSampler", "GridGenerator"]
    assert export.graph_opset(symbol) is None


def _onnx_predict_module():
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "scripts", "onnx_predict.py")
    spec = importlib.util.spec_from_file_location("onnx_predict", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("method", ["baseline", "attention"])
def test_onnx_predict_script_gives_the_predict_numbers(runs, onnx_exports, method, tmp_path, capsys):
    """scripts/onnx_predict.py (numpy, OpenCV, onnxruntime: the sidecar's resize, crop and
    normalisation as code) gives train_*.py --predict's CSV on images of other sizes and
    aspect ratios than the network's input."""
    prefix, info, _ = onnx_exports(method)
    rs = np.random.RandomState(2)
    images = []
    for i, (h, w) in enumerate([(45, 31), (26, 60)]):
        image = rs.randint(0, 256, (h, w, 3)).astype(np.uint8)  # noise: any resize error shows
        images.append(str(tmp_path / ("image%d.png" % i)))
        cv2.imwrite(images[-1], image)
    script, _ = RUNS[method]
    expected_csv, got_csv = str(tmp_path / "predict.csv"), str(tmp_path / "onnx.csv")
    expected = script.main(["--predict"] + images + ["--weights", runs(method), "--output", expected_csv])
    got = _onnx_predict_module().main([prefix + ".json"] + images + ["--output", got_csv])
    np.testing.assert_allclose(got, expected, rtol=TOL, atol=TOL)
    rows = [list(csv.reader(open(name))) for name in (expected_csv, got_csv)]
    assert rows[0][0] == rows[1][0] == ["image"] + info["output"]["labels"]
    assert [r[0] for r in rows[0]] == [r[0] for r in rows[1]]
    assert info["input"]["preprocess"] == PREPROCESS[method]
    # a bad file is a one-line error naming it (exit status 2), before any prediction
    bad = str(tmp_path / "bad.png")
    open(bad, "wb").write(b"not an image")
    capsys.readouterr()
    for argv, named in (([prefix + ".json", images[0], bad], "bad.png: expected a JPEG/PNG"),
                        ([str(tmp_path / "none.json"), images[0]], "none.json: expected the JSON")):
        with pytest.raises(SystemExit) as stop:
            _onnx_predict_module().main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert stop.value.code == 2 and len(err) == 1 and named in err[0]


PREPROCESS = {  # the demo runs' evaluation transforms (imbalanced_attr / fgvc_gluon make_transform)
    "attention": [{"op": "resize", "width": 37, "height": 37, "interpolation": "area"},
                  {"op": "center_crop", "width": 32, "height": 32}],
    "baseline": [{"op": "resize", "width": 43, "height": 43, "interpolation": "bilinear"},
                 {"op": "center_crop", "width": 32, "height": 32}]}


@pytest.mark.parametrize("resize", [None, 40, (50, 37), 20])
def test_onnx_predict_preprocessing_is_the_evaluation_transform(resize):
    """onnx_predict.preprocess of the sidecar's steps == fgvc_gluon's evaluation transform, for
    every resize kind (exact size, short side, width×height pair, smaller than the crop)."""
    from fgvc_gluon.data import make_transform
    from fgvc_gluon.task import eval_resize_steps
    defaults = {"image_size": 32, "resize": resize, "mean": (0.5, 0.4, 0.3), "std": (0.2, 0.3, 0.25)}
    inputs = {"preprocess": eval_resize_steps(defaults),
              "normalization": {"scale": 1 / 255.0, "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.3, 0.25]}}
    script = _onnx_predict_module()
    for shape in [(45, 31, 3), (26, 61, 3)]:
        image = np.random.RandomState(len(shape)).randint(0, 256, shape).astype(np.uint8)
        expected = make_transform(defaults, False)(mx.nd.array(image, dtype="uint8")).asnumpy()
        np.testing.assert_allclose(script.preprocess(image, inputs), expected, rtol=1e-6, atol=1e-6)
