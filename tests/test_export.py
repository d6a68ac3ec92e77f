"""python -m training_runtime.export: the exported MXNet symbol (SymbolBlock.imports) and
the exported ONNX model (onnxruntime) give the checkpoint's predictions within 1e-5, for
the attribute model and every fine-grained method's inference branch; the sidecar
documents the preprocessing and the labels; a bad RUN is a one-line error.

Each model is a one-step run on the demo data (Fashion-MNIST, 28-32 px) made in process.
"""
import json
import os

import mxnet as mx
import numpy as np
import onnxruntime
import pytest

import train_attr
import train_fgvc
from training_runtime import export
from training_runtime.errors import UserError

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
    assert json.load(open(prefix + ".json")) == info
    batch = input_batch(info)
    net = mx.gluon.SymbolBlock.imports(prefix + "-symbol.json", ["data"], prefix + "-0000.params")
    mx.random.seed(11)
    exported = net(mx.nd.array(batch)).asnumpy()
    expected = checkpoint_predictions(runs(method), batch)
    assert exported.shape == (3, len(info["output"]["labels"]))
    np.testing.assert_allclose(exported, expected, rtol=TOL, atol=TOL)

@pytest.mark.parametrize("method", METHODS)
def test_exported_onnx_gives_the_checkpoints_predictions(runs, method, tmp_path, capsys):
    prefix = str(tmp_path / "model")
    info = export.main([runs(method), "--format", "onnx", "--output", prefix])
    assert info["onnx"]["opset"] == 13
    if method == "s3n":  # the sampler has no ONNX translation: the raw branch is exported
        assert not info["onnx"]["complete"]
        assert "BilinearSampler" in info["onnx"]["error"]
        assert info["files"] == ["model-raw.onnx"] and info["output"]["name"] == "raw"
        assert "BilinearSampler" in capsys.readouterr().out
    else:
        assert info["onnx"]["complete"] and info["files"] == ["model.onnx"]
    session = onnxruntime.InferenceSession(str(tmp_path / info["files"][0]),
                                           providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["data"]  # weights are not inputs
    batch = input_batch(info)
    exported = session.run(None, {"data": batch})[0]
    expected = checkpoint_predictions(runs(method), batch, "raw" if method == "s3n" else None)
    np.testing.assert_allclose(exported, expected, rtol=TOL, atol=TOL)
    # the batch dimension is dynamic
    assert session.run(None, {"data": batch[:1]})[0].shape == (1, exported.shape[1])

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
            grid = F.zeros_like(F.slice_axis(x, axis=1, begin=0, end=2))
            return F.BilinearSampler(x, grid)
    symbol = Sampler()(mx.sym.var("data"))
    assert export.unsupported_operators(symbol) == ["BilinearSampler"]
