"""fgvc_gluon.native's s3n_bilinear_sampler: the same numbers as MXNet's BilinearSampler
(forward, both gradients, inside hybridized graphs and in S3N), its build and its fallbacks."""
import json
import os
import shutil
import subprocess
import sys

import mxnet as mx
import numpy as np
import pytest
from mxnet import autograd, gluon, nd

from fgvc_gluon import native, s3n

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_compiler = pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None
                                    or os.environ.get("FGVC_NATIVE") == "0",
                                    reason="no C++ compiler: the native sampler cannot be built")


def _inputs(seed, batch=2, channels=3, size=(13, 17), out=(11, 19), spread=1.3):
    """images, a grid partly outside [-1, 1] (corners outside read 0) and an objective weight."""
    rng = np.random.RandomState(seed)
    images = nd.array(rng.randn(batch, channels, *size))
    grid = nd.array(rng.uniform(-spread, spread, (batch, 2) + out))
    weight = nd.array(rng.randn(batch, channels, *out))
    return images, grid, weight


def _sample_and_grads(impl, images, grid, weight):
    images, grid = images.copy(), grid.copy()
    images.attach_grad()
    grid.attach_grad()
    with autograd.record():
        out = s3n.bilinear_sample(nd, images, grid, impl)
        objective = nd.sum(out * weight)
    objective.backward()
    return out.asnumpy(), images.grad.asnumpy(), grid.grad.asnumpy()


@needs_compiler
@pytest.mark.parametrize("seed,spread", [(0, 1.0), (1, 1.3), (2, 3.0)])
def test_native_sampler_equals_bilinear_sampler(seed, spread):
    assert native.bilinear_sampler_available(), native.unavailable_reason()
    inputs = _inputs(seed, spread=spread)
    reference = _sample_and_grads("mxnet", *inputs)
    fast = _sample_and_grads("native", *inputs)
    for name, expected, actual in zip(("output", "d images", "d grid"), reference, fast):
        assert np.abs(expected).max() > 0, name
        np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max(),
                                   err_msg=name)


@needs_compiler
def test_native_sampler_gradient_matches_finite_differences():
    """d objective / d grid and d images by central differences (float32, smooth interior)."""
    rng = np.random.RandomState(3)
    images = nd.array(rng.rand(1, 2, 6, 7))
    grid = nd.array(rng.uniform(-0.8, 0.8, (1, 2, 4, 5)))
    weight = nd.array(rng.randn(1, 2, 4, 5))
    _, d_images, d_grid = _sample_and_grads("native", images, grid, weight)

    def objective(img, grd):
        return float(nd.sum(s3n.bilinear_sample(nd, img, grd, "native") * weight).asscalar())

    step = 1e-3
    for index in [(0, 0, 1, 2), (0, 1, 3, 4), (0, 0, 0, 0)]:
        shifted = [grid.copy(), grid.copy()]
        shifted[0][index] += step
        shifted[1][index] -= step
        numeric = (objective(images, shifted[0]) - objective(images, shifted[1])) / (2 * step)
        assert abs(numeric - d_grid[index]) <= 2e-2 * max(1.0, abs(numeric)), index
    for index in [(0, 0, 2, 3), (0, 1, 4, 1)]:
        shifted = [images.copy(), images.copy()]
        shifted[0][index] += step
        shifted[1][index] -= step
        numeric = (objective(shifted[0], grid) - objective(shifted[1], grid)) / (2 * step)
        assert abs(numeric - d_images[index]) <= 1e-2 * max(1.0, abs(numeric)), index


class _Sampling(gluon.HybridBlock):
    def __init__(self, impl):
        super(_Sampling, self).__init__()
        self.impl = impl

    def hybrid_forward(self, F, images, grid):
        return s3n.bilinear_sample(F, images, grid, self.impl) * 2


@needs_compiler
def test_native_sampler_in_a_hybridized_graph():
    images, grid, _ = _inputs(4)
    outputs = {}
    for impl in ("mxnet", "native"):
        block = _Sampling(impl)
        block.hybridize(static_alloc=True)
        outputs[impl] = block(images, grid).asnumpy()
        symbol = json.loads(block._cached_graph[1].tojson())
        ops = set(node["op"] for node in symbol["nodes"])
        assert ("s3n_bilinear_sampler" in ops) == (impl == "native")
    np.testing.assert_allclose(outputs["native"], outputs["mxnet"], rtol=1e-5, atol=1e-5)


@needs_compiler
def test_s3n_sampler_auto_is_native_on_cpu_and_export_graph_needs_no_native_op(tmp_path):
    method = s3n.build_method(4, backbone="resnet18_v1", image_size=32, ctx=mx.cpu())
    assert method.net.sampler_impl == "native"
    images = nd.random.uniform(shape=(2, 3, 32, 32))
    with autograd.predict_mode():
        native_out = method.net(images, 2)[0].asnumpy()
    block = method.inference_block(30)             # evaluation mode 2 after epoch 20
    block.hybridize()
    exported = block(images).asnumpy()
    np.testing.assert_allclose(exported, native_out, rtol=1e-4, atol=1e-4 * np.abs(native_out).max())
    block.export(str(tmp_path / "s3n"), epoch=0)
    ops = set(node["op"] for node in json.load(open(str(tmp_path / "s3n-symbol.json")))["nodes"])
    assert "BilinearSampler" in ops and "s3n_bilinear_sampler" not in ops


def test_sampler_impl_errors_name_the_choice():
    with pytest.raises(ValueError, match="S3N sampler_impl: expected one of auto, native, mxnet, got 'fast'"):
        s3n.resolve_sampler_impl("fast")
    with pytest.raises(ValueError, match="native sampler runs on CPU only"):
        s3n.resolve_sampler_impl("native", [mx.cpu(), mx.gpu(0)])
    assert s3n.resolve_sampler_impl("auto", [mx.gpu(0)]) == "mxnet"
    assert s3n.resolve_sampler_impl("mxnet") == "mxnet"


def test_without_the_native_kernel_s3n_falls_back_and_native_is_refused():
    code = ("from fgvc_gluon import s3n, native\n"
            "assert not native.bilinear_sampler_available()\n"
            "assert s3n.resolve_sampler_impl('auto') == 'mxnet'\n"
            "try:\n    s3n.resolve_sampler_impl('native')\n"
            "except ValueError as err:\n    print(err)\n")
    env = dict(os.environ, FGVC_NATIVE="0", PYTHONPATH=ROOT)
    done = subprocess.run([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, universal_newlines=True, timeout=120)
    assert done.returncode == 0, done.stdout
    assert "S3N sampler_impl 'native': unavailable (disabled by FGVC_NATIVE=0)" in done.stdout


def test_build_without_a_compiler_names_it(tmp_path):
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler 'no-such-c\\+\\+' on PATH"):
        native.build(str(tmp_path / "lib.so"), compiler="no-such-c++")
    assert os.listdir(str(tmp_path)) == []


@needs_compiler
def test_failed_build_leaves_no_partial_library(tmp_path):
    """A compiler that fails: RuntimeError with its output, no .so and no .part file left."""
    fake = tmp_path / "fake-cxx"
    fake.write_text("#!/bin/sh\necho 'fake compiler: out of memory' >&2\nexit 3\n")
    fake.chmod(0o755)
    target = tmp_path / "out" / "lib.so"
    with pytest.raises(RuntimeError, match="(?s)exit 3.*fake compiler: out of memory"):
        native.build(str(target), compiler=str(fake))
    assert os.listdir(str(tmp_path / "out")) == []
