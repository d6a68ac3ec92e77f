"""S3N (fgvc_gluon.s3n): golden parity with Yao-DD/S3N, gradients, crash cases, training."""
import numpy as np
import mxnet as mx
import pytest
from mxnet import autograd, gluon, nd
from mxnet.gluon import nn

from conftest import assert_golden, golden_cases, golden_tolerance, load_golden
from fgvc_gluon import s3n
from helpers import central_difference


def check(case, data, name, actual):
    rtol, atol = golden_tolerance(case, name)
    assert_golden(actual, data[name], rtol, atol, "%s %s" % (case, name))


# ---------------------------------------------------------------------------------------------
# helpers: makeGaussian, kernel_generate, peak_stimulation, create_grid
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", golden_cases("s3n_gaussian_"))
def test_make_gaussian_golden(case):
    data = load_golden(case)
    center = None if data["center_is_none"] else tuple(data["center"])
    gaussian = s3n.make_gaussian(int(data["size"]), fwhm=float(data["fwhm"]), center=center)
    assert gaussian.dtype == np.float64
    check(case, data, "gaussian", gaussian)


@pytest.mark.parametrize("case", golden_cases("s3n_kernel_"))
def test_gaussian_kernel_golden(case):
    data = load_golden(case)
    offset = None if data["offset_is_none"] else tuple(int(v) for v in data["offset"])
    kernel = s3n.gaussian_kernel(nd.array(data["theta"]), int(data["size"]), offset)
    assert kernel.dtype == np.float32
    check(case, data, "kernel", kernel)


@pytest.mark.parametrize("case", golden_cases("s3n_peaks_"))
def test_find_peaks_golden(case):
    data = load_golden(case)
    maps = nd.array(data["input"])
    check(case, data, "mean_threshold", s3n.mean_threshold(maps))
    peaks, aggregation = s3n.find_peaks(data["input"], win_size=3, mean_filter=False)
    check(case, data, "peak_list_nofilter", peaks)
    check(case, data, "aggregation_nofilter", aggregation)
    maps.attach_grad()
    with autograd.record():
        peaks, aggregation = s3n.find_peaks(maps, win_size=3, mean_filter=True)
        objective = nd.sum(aggregation * nd.array(data["grad_weight"]))
    objective.backward()
    assert peaks.dtype == np.int64
    check(case, data, "peak_list", peaks)
    check(case, data, "aggregation", aggregation)
    check(case, data, "grad_input", maps.grad)


def test_find_peaks_plateau_and_empty():
    plateau = np.zeros((1, 1, 5, 5), np.float32)
    plateau[0, 0, 1:3, 2:4] = 1.0          # a 2×2 plateau: only its first (row-major) cell is a peak
    peaks, _ = s3n.find_peaks(plateau, mean_filter=True)
    assert peaks.tolist() == [[0, 0, 1, 2]]
    peaks, aggregation = s3n.find_peaks(np.full((1, 2, 4, 4), -np.inf, np.float32))
    assert peaks.shape == (0, 4)
    assert np.isnan(aggregation.asnumpy()).all()     # 0/0 as upstream


@pytest.mark.parametrize("case", golden_cases("s3n_create_grid_"))
@pytest.mark.parametrize("resize_impl", s3n.RESIZE_IMPLS)
def test_create_grid_golden(case, resize_impl):
    data = load_golden(case)
    grid = s3n.create_grid(nd.array(data["xs_hm"]), int(data["input_size"]), resize_impl=resize_impl)
    check(case, data, "grid", grid)


@pytest.mark.parametrize("in_shape,out_size", [((3, 2, 31, 31), (448, 448)), ((2, 5, 14, 14), (31, 31)),
                                               ((1, 2, 31, 31), (48, 40)), ((2, 1, 7, 5), (5, 9)),
                                               ((1, 1, 1, 1), (3, 3)), ((1, 1, 4, 6), (1, 1))])
def test_resize_align_corners_matches_bilinear_resize2d(in_shape, out_size):
    """The matmul resize equals contrib.BilinearResize2D(align_corners) forward and backward, nd and sym."""
    rng = np.random.RandomState(sum(in_shape) + sum(out_size))
    height, width = out_size
    x = nd.array(rng.randn(*in_shape))
    head = nd.array(rng.randn(in_shape[0], in_shape[1], height, width))
    results = []
    for resize in (lambda v: s3n.resize_align_corners(nd, v, height, width),
                   lambda v: nd.contrib.BilinearResize2D(v, height=height, width=width, align_corners=True)):
        x.attach_grad()
        with autograd.record():
            out = resize(x)
        out.backward(head)
        results.append((out.asnumpy(), x.grad.asnumpy()))
    (fast, fast_grad), (reference, reference_grad) = results
    assert fast.shape == reference.shape == in_shape[:2] + out_size
    np.testing.assert_allclose(fast, reference, rtol=1e-5, atol=2e-6)
    np.testing.assert_allclose(fast_grad, reference_grad, rtol=1e-5, atol=2e-5 * np.abs(reference_grad).max())
    # symbol graph: h and w unknown when the graph is built
    symbolic = s3n.resize_align_corners(mx.sym, mx.sym.var("x"), height, width)
    np.testing.assert_allclose(symbolic.eval(ctx=mx.cpu(), x=x)[0].asnumpy(), reference, rtol=1e-5, atol=2e-6)


def test_resize_align_corners_float64_is_exact():
    """float64: source positions i·(n−1)/(out−1) in float64 (BilinearResize2D uses float32 ones)."""
    rng = np.random.RandomState(0)
    x = rng.randn(1, 1, 31, 31)
    out = s3n.resize_align_corners(nd, nd.array(x, dtype="float64"), 448, 448, "float64").asnumpy()[0, 0]

    def matrix(n, size):
        position = np.arange(size) * (n - 1.0) / (size - 1.0)
        return np.maximum(0.0, 1.0 - np.abs(position[:, None] - np.arange(n)[None, :]))

    np.testing.assert_allclose(out, matrix(31, 448).dot(x[0, 0]).dot(matrix(31, 448).T), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# generate_map
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", golden_cases("s3n_generate_map_"))
@pytest.mark.parametrize("p", [0, 2])
@pytest.mark.parametrize("resize_impl", s3n.RESIZE_IMPLS)
def test_generate_map_golden(case, p, resize_impl):
    data = load_golden(case)
    images = nd.array(data["input_x"])
    radius = nd.array(data["radius_scale"])
    radius_inv = nd.array(data["radius_inv_scale"])
    for array in (images, radius, radius_inv):
        array.attach_grad()
    with autograd.record():
        zoom, complement, details = s3n.generate_map(
            images, data["class_response_maps"], p, float(data["base_ratio"]), radius, radius_inv,
            return_details=True, resize_impl=resize_impl)
        objective = (nd.sum(zoom * nd.array(data["grad_weight_zoom_p%d" % p]))
                     + nd.sum(complement * nd.array(data["grad_weight_inv_p%d" % p])))
    objective.backward()
    check(case, data, "x_sampled_zoom_p%d" % p, zoom)
    check(case, data, "x_sampled_inv_p%d" % p, complement)
    check(case, data, "grad_radius_scale_p%d" % p, radius.grad)
    check(case, data, "grad_radius_inv_scale_p%d" % p, radius_inv.grad)
    check(case, data, "grad_input_x_p%d" % p, images.grad)
    # intermediates (info arrays)
    check(case, data, "decide_map_p%d" % p, details["scores"].reshape((-1, 31, 31)))
    peaks = np.argwhere(details["peaks"].asnumpy().reshape(-1, 31, 31) > 0)
    check(case, data, "peaks_p%d" % p, peaks)
    check(case, data, "xs_p%d" % p, details["xs"])
    check(case, data, "xs_inv_p%d" % p, details["xs_inv"])
    check(case, data, "grid_p%d" % p, nd.transpose(details["grid"], axes=(0, 2, 3, 1)))
    check(case, data, "grid_inv_p%d" % p, nd.transpose(details["grid_inv"], axes=(0, 2, 3, 1)))


def _reference_saliency(scores, selected, weight_of, theta_of, scale, base_ratio=0.09):
    """Per-peak sum with gaussian_kernel (upstream's loop), one sample: 31×31 numpy."""
    total = np.full((31, 31), base_ratio, np.float64)
    for row, col in np.argwhere(selected.reshape(31, 31) > 0):
        s = scores.reshape(31, 31)[row, col]
        kernel = s3n.gaussian_kernel(nd.array([scale * theta_of(s)]), 31, (int(col), int(row)))
        total += weight_of(s) * kernel.asnumpy()
    return total


def test_generate_map_mode1_random_split_matches_per_peak_loop():
    data = load_golden("s3n_generate_map_public_01.npz")
    images = nd.array(data["input_x"])
    mx.random.seed(7)
    _, _, first = s3n.generate_map(images, data["class_response_maps"], 1, 0.09, nd.array([0.09]),
                                   nd.array([0.3]), return_details=True)
    mx.random.seed(7)
    _, _, again = s3n.generate_map(images, data["class_response_maps"], 1, 0.09, nd.array([0.09]),
                                   nd.array([0.3]), return_details=True)
    mx.random.seed(8)
    _, _, other = s3n.generate_map(images, data["class_response_maps"], 1, 0.09, nd.array([0.09]),
                                   nd.array([0.3]), return_details=True)
    peaks = first["peaks"].asnumpy()
    to_zoom, to_complement = first["to_zoom"].asnumpy(), first["to_complement"].asnumpy()
    np.testing.assert_array_equal(to_zoom + to_complement, peaks)   # every peak goes to one map
    assert to_zoom.sum() > 0 and to_complement.sum() > 0
    np.testing.assert_array_equal(again["to_zoom"].asnumpy(), to_zoom)   # seeded: reproducible
    assert not np.array_equal(other["to_zoom"].asnumpy(), to_zoom)
    scores = first["scores"].asnumpy()
    for n in range(len(scores)):
        zoom_ref = _reference_saliency(scores[n], to_zoom[n], lambda s: s, np.sqrt, 0.09)
        comp_ref = _reference_saliency(scores[n], to_complement[n], lambda s: 1 / s, np.sqrt, 0.3)
        np.testing.assert_allclose(first["xs"].asnumpy()[n], zoom_ref, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(first["xs_inv"].asnumpy()[n], comp_ref, rtol=1e-5, atol=1e-5)


def test_generate_map_constant_map_gives_base_ratio_only():
    """S3N-1/S3N-2: upstream crashes; ours gives base_ratio maps = an identity sampling grid."""
    data = load_golden("s3n_generate_map_public_01.npz")
    images = nd.array(data["input_x"])
    maps = data["class_response_maps"].copy()
    maps[1] = 0.0                                  # sample 1: all-zero (constant) maps
    for p in (0, 1, 2):
        zoom, complement, details = s3n.generate_map(images, maps, p, 0.09, nd.array([0.09]),
                                                     nd.array([0.3]), return_details=True)
        assert details["peaks"].asnumpy()[1].sum() == 0
        np.testing.assert_array_equal(details["xs"].asnumpy()[1], np.float32(0.09))
        np.testing.assert_array_equal(details["xs_inv"].asnumpy()[1], np.float32(0.09))
        # uniform saliency: the weighted mean coordinate is the cell's own → identity sampling
        identity = np.linspace(-1, 1, 64)
        for grid in (details["grid"], details["grid_inv"]):
            np.testing.assert_allclose(grid.asnumpy()[1, 0], np.tile(identity, (64, 1)), atol=1e-5)
            np.testing.assert_allclose(grid.asnumpy()[1, 1], np.tile(identity[:, None], (1, 64)),
                                       atol=1e-5)
        np.testing.assert_allclose(zoom.asnumpy()[1], data["input_x"][1], atol=1e-3)
        np.testing.assert_allclose(complement.asnumpy()[1], data["input_x"][1], atol=1e-3)
    # sample 0 is unaffected by its batch neighbour (no leakage across the batch)
    for p in (0, 2):
        zoom, complement = s3n.generate_map(images, maps, p, 0.09, nd.array([0.09]), nd.array([0.3]))
        check("s3n_generate_map_public_01.npz", {k: data[k][:1] for k in data if k.startswith("x_")},
              "x_sampled_zoom_p%d" % p, zoom[:1])
        check("s3n_generate_map_public_01.npz", {k: data[k][:1] for k in data if k.startswith("x_")},
              "x_sampled_inv_p%d" % p, complement[:1])


@pytest.mark.parametrize("p", [0, 2])
def test_generate_map_gradients_finite_differences(p):
    """float64: d/d radius, d/d radius_inv, d/d images of J = Σ Wz·zoom + Σ Wc·complement."""
    rng = np.random.RandomState(3)
    data = load_golden("s3n_generate_map_public_03.npz")
    maps = nd.array(data["class_response_maps"][:2], dtype="float64")
    images = nd.array(rng.rand(2, 3, 12, 12), dtype="float64")
    weight_zoom = nd.array(rng.randn(2, 3, 12, 12), dtype="float64")
    weight_comp = nd.array(rng.randn(2, 3, 12, 12), dtype="float64")

    def objective(images, radius, radius_inv):
        zoom, comp = s3n.generate_map(images, maps, p, 0.09, radius, radius_inv)
        return nd.sum(zoom * weight_zoom) + nd.sum(comp * weight_comp)

    radius = nd.array([0.09], dtype="float64")
    radius_inv = nd.array([0.3], dtype="float64")
    for array in (images, radius, radius_inv):
        array.attach_grad()
    with autograd.record():
        value = objective(images, radius, radius_inv)
    value.backward()
    step = 1e-6
    scales = {"radius": radius, "radius_inv": radius_inv}
    for name, scale in scales.items():
        def with_scale(value, name=name):
            return objective(images, **dict(scales, **{name: nd.array(value, dtype="float64")}))
        numeric = central_difference(with_scale, scale.asnumpy(), step)[0]
        assert abs(numeric) > 1e-3, "degenerate check for %s" % name
        np.testing.assert_allclose(scale.grad.asscalar(), numeric, rtol=1e-4, err_msg=name)
    picked = rng.choice(images.size, 6, replace=False)
    numeric = central_difference(lambda x: objective(nd.array(x, dtype="float64"), radius, radius_inv),
                                 images.asnumpy(), step, indices=picked).ravel()
    np.testing.assert_allclose(images.grad.asnumpy().ravel()[picked], numeric[picked], rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("p", [0, 2])
def test_generate_map_resize_impls_agree_float32(p):
    """Both resize paths: same images and same gradients (images, radius, radius_inv, filter)."""
    rng = np.random.RandomState(7)
    data = load_golden("s3n_generate_map_public_03.npz")
    maps = nd.array(data["class_response_maps"][:2])
    weights = [nd.array(rng.randn(2, 3, 40, 40)) for _ in range(2)]
    results = {}
    for impl in s3n.RESIZE_IMPLS:
        images = nd.array(rng.rand(2, 3, 40, 40)) if not results else results["images"]
        inputs = dict(images=images.copy(), radius=nd.array([0.09]), radius_inv=nd.array([0.3]),
                      filter=s3n._default_filter(mx.cpu(), "float32"))
        for array in inputs.values():
            array.attach_grad()
        with autograd.record():
            zoom, comp = s3n.generate_map(inputs["images"], maps, p, 0.09, inputs["radius"],
                                          inputs["radius_inv"], inputs["filter"], resize_impl=impl)
            objective = nd.sum(zoom * weights[0]) + nd.sum(comp * weights[1])
        objective.backward()
        results.setdefault("images", images)
        results[impl] = dict([("zoom", zoom), ("comp", comp)]
                             + [("d " + name, array.grad) for name, array in inputs.items()])
    for name, reference in results["mxnet"].items():
        reference, fast = reference.asnumpy(), results["matmul"][name].asnumpy()
        assert np.abs(reference).max() > 0, name
        np.testing.assert_allclose(fast, reference, rtol=1e-4, atol=1e-4 * np.abs(reference).max(), err_msg=name)


def test_generate_map_parameters_and_second_device():
    """radius/radius_inv/filter as gluon Parameters on two devices; same numbers on cpu(1)."""
    data = load_golden("s3n_generate_map_public_02.npz")
    contexts = [mx.cpu(0), mx.cpu(1)]
    radius = gluon.Parameter("radius", shape=(1,), init=mx.init.Constant(0.09))
    radius_inv = gluon.Parameter("radius_inv", shape=(1,), init=mx.init.Constant(0.3))
    for param in (radius, radius_inv):
        param.initialize(ctx=contexts)
    images = nd.array(data["input_x"], ctx=mx.cpu(1))
    with autograd.record():
        zoom, comp = s3n.generate_map(images, data["class_response_maps"], 0, 0.09, radius, radius_inv)
        objective = (nd.sum(zoom * nd.array(data["grad_weight_zoom_p0"], ctx=mx.cpu(1)))
                     + nd.sum(comp * nd.array(data["grad_weight_inv_p0"], ctx=mx.cpu(1))))
    objective.backward()
    assert zoom.context == mx.cpu(1)
    check("s3n_generate_map_public_02.npz", data, "x_sampled_zoom_p0", zoom)
    check("s3n_generate_map_public_02.npz", data, "grad_radius_scale_p0", radius.grad(mx.cpu(1)))
    check("s3n_generate_map_public_02.npz", data, "grad_radius_inv_scale_p0", radius_inv.grad(mx.cpu(1)))


def test_generate_map_bad_input():
    images = nd.zeros((2, 3, 16, 16))
    with pytest.raises(ValueError, match="p: expected 0, 1 or 2"):
        s3n.generate_map(images, nd.zeros((2, 4, 31, 31)), 3, 0.09, nd.array([0.09]), nd.array([0.3]))
    with pytest.raises(ValueError, match="class_response_maps: expected 2×K×31×31"):
        s3n.generate_map(images, nd.zeros((2, 4, 14, 14)), 0, 0.09, nd.array([0.09]), nd.array([0.3]))
    with pytest.raises(ValueError, match="saliency_padded"):
        s3n.create_grid(nd.zeros((1, 1, 31, 31)), 16)
    with pytest.raises(ValueError, match="generate_map resize_impl: expected one of matmul, mxnet"):
        s3n.generate_map(images, nd.zeros((2, 4, 31, 31)), 0, 0.09, nd.array([0.09]), nd.array([0.3]),
                         resize_impl="torch")
    with pytest.raises(ValueError, match="create_grid resize_impl"):
        s3n.create_grid(nd.zeros((1, 1, 91, 91)), 16, resize_impl=None)
    with pytest.raises(ValueError, match="S3N resize_impl"):
        s3n.S3N(5, backbone=nn.HybridSequential(), num_features=8, resize_impl="fast")


# ---------------------------------------------------------------------------------------------
# multi_smooth_loss
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", golden_cases("s3n_smooth_loss_"))
def test_multi_smooth_loss_golden(case):
    data = load_golden(case)
    logits = [nd.array(data["logits_%d" % i]) for i in range(4)]
    for array in logits:
        array.attach_grad()
    labels = nd.array(data["target"])
    loss_weight = None
    if "loss_weight_keys" in data:   # upstream passes string keys through int()
        loss_weight = {str(k): float(v) for k, v in zip(data["loss_weight_keys"],
                                                        data["loss_weight_values"])}
    with autograd.record():
        loss = s3n.multi_smooth_loss(tuple(logits), labels, float(data["smooth_ratio"]), loss_weight)
    loss.backward()
    assert loss.shape == (1,)
    check(case, data, "loss", loss.asnumpy().reshape(()))
    for i in range(4):
        check(case, data, "grad_logits_%d" % i, logits[i].grad)
    per_sample = s3n.multi_smooth_loss(tuple(logits), labels, float(data["smooth_ratio"]),
                                       loss_weight, per_sample=True)
    assert per_sample.shape == (len(data["target"]),)
    check(case, data, "loss", per_sample.asnumpy().mean(dtype=np.float64).astype(np.float32))


def test_multi_smooth_loss_bad_weight_key():
    logits = (nd.zeros((2, 3)),) * 4
    with pytest.raises(ValueError, match="branch index 4 out of range"):
        s3n.multi_smooth_loss(logits, nd.array([0, 1]), loss_weight={4: 1.0})


# ---------------------------------------------------------------------------------------------
# the network
# ---------------------------------------------------------------------------------------------

FORWARD_CASE = "s3n_forward_public_01.npz"


def _stand_in_network(data, resize_impl="matmul", sampler_impl="auto"):
    """The golden case's model: features = AvgPool(4) + Conv1×1(3→2048), identity buffers."""
    features = nn.HybridSequential(prefix="standin_")
    with features.name_scope():
        features.add(nn.AvgPool2D(4), nn.Conv2D(2048, 1, in_channels=3))
    net = s3n.S3N(5, backbone=features, num_features=2048, image_size=int(data["input_x"].shape[-1]),
                  resize_impl=resize_impl, sampler_impl=sampler_impl)
    net.initialize()
    features[1].weight.set_data(nd.array(data["features_conv_weight"]))
    features[1].bias.set_data(nd.array(data["features_conv_bias"]))
    net.raw_classifier_weight.set_data(nd.array(data["raw_classifier_weight"]))
    net.raw_classifier_bias.set_data(nd.array(data["raw_classifier_bias"]))
    for block, key in ((net.sampler_classifier, "sampler_classifier"),
                       (net.sampler_classifier1, "sampler_classifier1"),
                       (net.con_classifier, "con_classifier")):
        block.weight.set_data(nd.array(data[key + "_weight"]))
        block.bias.set_data(nd.array(data[key + "_bias"]))
    identity = np.zeros((2048, 2048, 3, 3), np.float32)
    identity[np.arange(2048), np.arange(2048), 1, 1] = 1
    for buffer in (net.sampler_buffer, net.sampler_buffer1):
        buffer[0].weight.set_data(nd.array(identity))
    return net


@pytest.mark.parametrize("hybridize,resize_impl,sampler_impl",
                         [(False, "matmul", "auto"), (True, "matmul", "auto"), (True, "mxnet", "auto"),
                          (True, "matmul", "mxnet")])
def test_forward_golden_stand_in_backbone(hybridize, resize_impl, sampler_impl):
    data = load_golden(FORWARD_CASE)
    net = _stand_in_network(data, resize_impl, sampler_impl)
    if hybridize:
        net.hybridize()
    images = nd.array(data["input_x"])
    for p in (0, 2):
        outputs = net(images, p)          # outside record: BatchNorm in inference mode (eval)
        for output, name in zip(outputs, ("aggregation", "agg_origin", "agg_sampler", "agg_sampler1")):
            check(FORWARD_CASE, data, "%s_p%d" % (name, p), output)
    feature = net.features(images)
    maps = net.class_response_maps(nd, feature, net.raw_classifier_weight.data(),
                                   net.raw_classifier_bias.data())
    check(FORWARD_CASE, data, "class_response_maps", maps)


def test_network_shapes_groups_and_gradients_resnet18():
    mx.random.seed(0)
    method = s3n.build_method(6, backbone="resnet18_v1", image_size=48)
    net = method.net
    images = nd.random.uniform(shape=(2, 3, 48, 48))
    with autograd.record():
        outputs = net(images, 0)
        loss = s3n.multi_smooth_loss(outputs, nd.array([1, 4]))
    loss.backward()
    assert [o.shape for o in outputs] == [(2, 6)] * 4
    groups = {g.name: g for g in method.param_groups()}
    assert {name: g.lr_mult for name, g in groups.items()} == {
        "classifier": 10.0, "radius": 1e-4, "filter": 1e-4, "rest": 1.0}
    assert len(groups["classifier"].params) == 8
    assert [p.name for p in groups["radius"].params] == [net.radius.name, net.radius_inv.name]
    all_params = [p for g in groups.values() for p in g.params]
    assert len(all_params) == len(list(net.collect_params().values()))
    assert len(set(id(p) for p in all_params)) == len(all_params)
    # the learnable scales and the filter receive gradients through the sampler
    for param in (net.radius, net.radius_inv, net.filter):
        assert np.abs(param.grad().asnumpy()).sum() > 0, param.name
    # the CAM path carries no gradient: raw classifier weights get only the raw/concat terms
    assert net.filter.data().shape == (1, 1, 61, 61)
    predictions = method.predict(images, epoch=30)
    assert list(predictions) == ["concat", "raw", "zoom", "complementary"]
    assert all(v.shape == (2, 6) for v in predictions.values())
    assert method.training_loss(images, nd.array([0, 5]), None, epoch=0).shape == (2,)
    defaults = method.defaults
    assert (defaults["lr"], defaults["momentum"], defaults["wd"], defaults["batch_size"],
            defaults["epochs"], defaults["lr_steps"], defaults["lr_factor"]) == (
        0.001, 0.9, 1e-4, 16, 60, [39], 0.1)


def test_three_stage_schedule():
    assert [s3n.training_mode(e) for e in (0, 20, 21, 59)] == [0, 0, 1, 1]
    assert [s3n.evaluation_mode(e) for e in (0, 20, 21, 59)] == [1, 1, 2, 2]
    with pytest.raises(ValueError, match=r"^backbone: expected one of resnet18_v1, .* for S3N, got 'vgg16'"):
        s3n.S3N(5, backbone="vgg16")


# S3N's loss falls in a real run: tests/test_train_fgvc.py (short run); two devices:
# tests/test_invariance.py and tests/test_split_invariance_methods.py
