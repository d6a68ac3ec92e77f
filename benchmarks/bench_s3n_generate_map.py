"""Time S3N's generate_map: forward and forward+backward, with a breakdown, optionally against upstream.

Inputs (random, fixed seed): batch×3×size×size smooth images, batch×classes×crm×crm class
response maps (``--maps blobs``: two Gaussian blobs per class plus a little noise, CAM-like with
1-4 peaks per sample; ``noise``: white noise, ~30 peaks per sample), resized to 31×31
(align_corners, no gradient) inside the timed region, as S3N's forward does.

Timed, best of ``--rounds`` interleaved rounds of ``--repeat`` calls: forward (outside autograd) and forward+backward (under record,
backward of a random linear objective of both sampled images to radius, radius_inv, the 61×61
filter and, unless ``--no-image-grad``, the images), in one run, for the port's variants
(:data:`VARIANTS`: the former path, BilinearSampler with the matmul resize, and the default: the
matmul resize with the native sampler of :mod:`fgvc_gluon.native`).
Breakdown (default path): the grid resize and both samplers alone, the rest by difference.

``--upstream-script`` runs a timing script for upstream's PyTorch code (kept outside this
repository) with ``--upstream-python`` on the same data; it gets
``BATCH SIZE CLASSES REPEAT IMAGE_GRAD MODE DATA.npz`` and must print
``upstream_forward=<s> upstream_train=<s>``. ``--check`` compares against the per-sample /
per-peak loop form below in float64 (to rounding) before timing.

Usage: python benchmarks/bench_s3n_generate_map.py [--batch 16] [--size 448] [--classes 200]
       [--crm-size 14] [--maps blobs] [--repeat 3] [--rounds 2] [--mode 0] [--no-image-grad] [--check]
       [--upstream-script S --upstream-python P]
Last line: ``step_seconds=<forward+backward of the default path>``.
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

import numpy as np
from mxnet import autograd, nd

from fgvc_gluon import native, s3n


def loop_generate_map(images, class_response_maps, p, base_ratio, radius, radius_inv, resize_impl="mxnet"):
    """The straightforward form: Python loops over samples and peaks (p = 0 or 2).

    The grid is resized with ``resize_impl`` (BilinearResize2D computes its source positions in
    float32 even for float64 data, so a float64 comparison uses the same resize on both sides).
    """
    num, num_classes = class_response_maps.shape[:2]
    size = s3n.GRID_SIZE
    gap = nd.softmax(nd.mean(class_response_maps, axis=(2, 3)), axis=1).asnumpy()
    saliency, saliency_inv = [], []
    for n in range(num):
        order = np.argsort(-gap[n], kind="stable")[:min(s3n.GATE_TOP, num_classes)]
        top = gap[n][order]
        gate = float(np.sum(top * np.log(top)))
        if gate > s3n.GATE_THRESHOLD:
            decide = class_response_maps[n, int(order[0])]
        else:
            decide = nd.mean(class_response_maps[n].take(nd.array(order, dtype=images.dtype), axis=0),
                             axis=0)
        low, high = decide.min(), decide.max()
        blank = nd.full((size, size), base_ratio, dtype=images.dtype)
        if (high - low).asscalar() == 0:             # constant map: no peak (S3N-1/2 fixed)
            saliency.append(blank)
            saliency_inv.append(blank)
            continue
        decide = (decide - low) / (high - low)
        peaks, _ = s3n.find_peaks(decide.reshape((1, 1, size, size)))
        values = decide.asnumpy()
        scores = [float(values[r, c]) for _, _, r, c in peaks]
        zoom, inv = blank, blank
        if p == 0:
            chosen_zoom = chosen_inv = range(len(scores))
        else:
            chosen_zoom, chosen_inv = [int(np.argmax(scores))], [int(np.argmin(scores))]
        for i in chosen_zoom:
            _, _, row, col = peaks[i]
            score = decide[int(row), int(col)]
            theta = radius * (score if p == 2 else nd.sqrt(score))
            zoom = zoom + score * s3n.gaussian_kernel(theta, size, (int(col), int(row)))
        for i in chosen_inv:
            _, _, row, col = peaks[i]
            score = decide[int(row), int(col)]
            inv = inv + 1 / score * s3n.gaussian_kernel(radius_inv * nd.sqrt(score), size,
                                                        (int(col), int(row)))
        saliency.append(zoom)
        saliency_inv.append(inv)
    outputs = []
    weight = s3n._default_filter(images.context, images.dtype)
    for maps in (saliency, saliency_inv):
        padded = nd.pad(nd.stack(*maps).expand_dims(1), mode="edge",
                        pad_width=(0, 0, 0, 0) + (s3n.PADDING,) * 4)
        coords = (nd.arange(s3n.GLOBAL_SIZE, dtype=images.dtype) - s3n.PADDING) / (s3n.GRID_SIZE - 1.0)
        stacked = nd.concat(padded, padded * coords.reshape((1, 1, 1, -1)),
                            padded * coords.reshape((1, 1, -1, 1)), dim=1)
        filtered = nd.Convolution(stacked.reshape((-1, 1, s3n.GLOBAL_SIZE, s3n.GLOBAL_SIZE)), weight,
                                  kernel=(s3n.FILTER_SIZE,) * 2, num_filter=1, no_bias=True)
        filtered = filtered.reshape((-1, 3, size, size))
        grid = nd.clip(filtered[:, 1:] / filtered[:, :1] * 2 - 1, -1, 1)
        if resize_impl == "matmul":
            grid = s3n.resize_align_corners(nd, grid, images.shape[2], images.shape[3], "float64")
        else:
            grid = nd.contrib.BilinearResize2D(grid, height=images.shape[2], width=images.shape[3],
                                               align_corners=True)
        outputs.append(nd.BilinearSampler(images, grid))
    return outputs[0], outputs[1]


def make_inputs(args):
    """images N×3×S×S, coarse CAMs N×K×c×c and two objective weights N×3×S×S (float32 numpy)."""
    rng = np.random.RandomState(0)
    images = nd.contrib.BilinearResize2D(nd.array(rng.rand(args.batch, 3, 56, 56)),
                                         height=args.size, width=args.size).asnumpy()
    side = args.crm_size
    if args.maps == "noise":
        coarse = rng.randn(args.batch, args.classes, side, side)
    else:
        rows, cols = np.mgrid[0:side, 0:side]
        coarse = 0.05 * rng.randn(args.batch, args.classes, side, side)
        for _ in range(2):
            cy, cx = (rng.uniform(0, side - 1, (2, args.batch, args.classes, 1, 1)))
            spread = rng.uniform(0.1, 0.25, (args.batch, args.classes, 1, 1)) * side
            height = rng.uniform(0.5, 2.0, (args.batch, args.classes, 1, 1))
            coarse += height * np.exp(-((rows - cy) ** 2 + (cols - cx) ** 2) / (2 * spread ** 2))
    weights = [rng.randn(args.batch, 3, args.size, args.size) for _ in range(2)]
    return [np.asarray(a, np.float32) for a in (images, coarse, weights[0], weights[1])]


def crm_31(coarse, resize_impl):
    """The CAMs resized to 31×31 (align_corners), as S3N.class_response_maps does."""
    if resize_impl == "matmul":
        return s3n.resize_align_corners(nd, coarse, s3n.GRID_SIZE, s3n.GRID_SIZE)
    return nd.contrib.BilinearResize2D(coarse, height=s3n.GRID_SIZE, width=s3n.GRID_SIZE, align_corners=True)


def best(function, repeat):
    function()
    nd.waitall()
    times = []
    for _ in range(repeat):
        start = time.time()
        function()
        nd.waitall()
        times.append(time.time() - start)
    return min(times)


#: (label, resize_impl, sampler_impl); the first is the reference of the "vs old" columns, the last the default
VARIANTS = (("port, former (mxnet, mxnet)", "mxnet", "mxnet"),
            ("port, matmul + BilinearSampler", "matmul", "mxnet"),
            ("port, default (matmul+native)", "matmul", "native"))


def time_port(args, arrays, resize_impl, sampler_impl):
    images, coarse, weight0, weight1 = [nd.array(a) for a in arrays]
    radius, radius_inv = nd.array([0.09]), nd.array([0.3])
    filter_weight = s3n._default_filter(images.context, "float32")
    for array in ([radius, radius_inv, filter_weight] + ([] if args.no_image_grad else [images])):
        array.attach_grad()

    def forward():
        return s3n.generate_map(images, crm_31(coarse, resize_impl), args.mode, 0.09, radius, radius_inv,
                                filter_weight, resize_impl=resize_impl, sampler_impl=sampler_impl)

    def train():
        with autograd.record():
            zoom, inv = forward()
            objective = nd.sum(zoom * weight0) + nd.sum(inv * weight1)
        objective.backward()

    return best(forward, args.repeat), best(train, args.repeat)


def time_parts(args, arrays):
    """Grid resize 31→S and the samplers alone, per map, forward and forward+backward."""
    rng = np.random.RandomState(1)
    images = nd.array(arrays[0])
    if not args.no_image_grad:
        images.attach_grad()
    coarse_grid = nd.array(np.clip(rng.randn(args.batch, 2, s3n.GRID_SIZE, s3n.GRID_SIZE) * 0.3, -1, 1))
    coarse_grid.attach_grad()
    parts = {}
    for impl in s3n.RESIZE_IMPLS:
        def resize(impl=impl):
            if impl == "matmul":
                return s3n.resize_align_corners(nd, coarse_grid, args.size, args.size)
            return nd.contrib.BilinearResize2D(coarse_grid, height=args.size, width=args.size,
                                               align_corners=True)

        def resize_train(resize=resize):
            with autograd.record():
                out = resize()
            out.backward(nd.ones_like(out))

        parts["grid resize (%s)" % impl] = (best(resize, args.repeat), best(resize_train, args.repeat))
    grid = s3n.resize_align_corners(nd, coarse_grid, args.size, args.size)
    grid.attach_grad()

    for label, impl in (("BilinearSampler", "mxnet"), ("native sampler", "native")):
        def sample_train(impl=impl):
            with autograd.record():
                out = s3n.bilinear_sample(nd, images, grid, impl)
            out.backward(nd.ones_like(out))

        parts[label] = (best(lambda impl=impl: s3n.bilinear_sample(nd, images, grid, impl), args.repeat),
                        best(sample_train, args.repeat))
    return parts


def time_upstream(args, arrays):
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "inputs.npz")
        np.savez(path, images=arrays[0], coarse=arrays[1], w0=arrays[2], w1=arrays[3])
        command = [args.upstream_python, args.upstream_script, str(args.batch), str(args.size),
                   str(args.classes), str(args.repeat), "0" if args.no_image_grad else "1", str(args.mode), path]
        output = subprocess.run(command, check=True, stdout=subprocess.PIPE, universal_newlines=True).stdout
    found = re.search(r"upstream_forward=([0-9.]+) upstream_train=([0-9.]+)", output)
    if not found:
        sys.exit("--upstream-script: no 'upstream_forward=… upstream_train=…' line in its output:\n" + output)
    return float(found.group(1)), float(found.group(2))


def check_against_loop(args, arrays):
    """float64: the vectorised form equals the loop form to rounding (both resize impls)."""
    images, coarse, weight0, weight1 = [nd.array(a, dtype="float64") for a in arrays]
    maps = crm_31(coarse, "mxnet")
    weights = [weight0, weight1]
    checked = {}
    for name, function in [(impl + suffix, lambda *a, impl=impl, f=f: f(*a, resize_impl=impl))
                           for impl in s3n.RESIZE_IMPLS
                           for suffix, f in (("", s3n.generate_map), ("_loop", loop_generate_map))]:
        radius, radius_inv = nd.array([0.09], dtype="float64"), nd.array([0.3], dtype="float64")
        image_copy = images.copy()
        for array in (image_copy, radius, radius_inv):
            array.attach_grad()
        with autograd.record():
            zoom, inv = function(image_copy, maps, args.mode, 0.09, radius, radius_inv)
            objective = nd.sum(zoom * weights[0]) + nd.sum(inv * weights[1])
        objective.backward()
        checked[name] = [zoom, inv, image_copy.grad, radius.grad, radius_inv.grad]
    labels = ("zoomed", "complementary", "d/d images", "d/d radius", "d/d radius_inv")
    for impl in s3n.RESIZE_IMPLS:
        for label, fast, slow in zip(labels, checked[impl], checked[impl + "_loop"]):
            fast, slow = fast.asnumpy(), slow.asnumpy()
            scale = max(1.0, float(np.abs(slow).max()))
            diff = float(np.abs(fast - slow).max())
            print("float64 check %-7s %-15s max|diff| %.3g (max|value| %.3g)" % (impl, label, diff, scale))
            assert diff <= 1e-9 * scale, "vectorised (%s) and loop versions disagree on %s" % (impl, label)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=448)
    parser.add_argument("--classes", type=int, default=200)
    parser.add_argument("--crm-size", type=int, default=14, help="side of the CAMs before the 31×31 resize")
    parser.add_argument("--maps", choices=("blobs", "noise"), default="blobs")
    parser.add_argument("--repeat", type=int, default=3, help="timed calls per variant and round")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds over the variants")
    parser.add_argument("--mode", type=int, default=0, choices=(0, 2))
    parser.add_argument("--no-image-grad", action="store_true", help="no gradient to the images (as in training)")
    parser.add_argument("--check", action="store_true", help="float64 check against the loop form first")
    parser.add_argument("--upstream-script", help="timing script for upstream's PyTorch code (outside the repo)")
    parser.add_argument("--upstream-python", default=sys.executable, help="python with torch for the script")
    args = parser.parse_args()
    if not native.bilinear_sampler_available():
        parser.error("the native sampler is unavailable (%s): python -m fgvc_gluon.native builds it"
                     % native.unavailable_reason())
    for name in ("batch", "size", "classes", "crm_size", "repeat", "rounds"):
        if getattr(args, name) < 1:
            parser.error("--%s: expected a positive int, got %d" % (name.replace("_", "-"), getattr(args, name)))
    if args.upstream_script and not os.path.isfile(args.upstream_script):
        parser.error("--upstream-script: no such file: %s" % args.upstream_script)

    arrays = make_inputs(args)
    if args.check:
        check_against_loop(args, arrays)
    maps = crm_31(nd.array(arrays[1]), "matmul")
    _, _, details = s3n.generate_map(nd.array(arrays[0]), maps, args.mode, 0.09, nd.array([0.09]),
                                     nd.array([0.3]), return_details=True)
    peaks = details["peaks"].sum(axis=1).asnumpy()
    results = {}

    def keep_best(name, times):
        results[name] = tuple(min(pair) for pair in zip(results.get(name, times), times))

    # rounds interleave the variants so that a change of load on a shared machine hits all of them
    for _ in range(args.rounds):
        if args.upstream_script:
            keep_best("upstream (PyTorch)", time_upstream(args, arrays))
        for label, resize_impl, sampler_impl in VARIANTS:
            keep_best(label, time_port(args, arrays, resize_impl, sampler_impl))
    parts = time_parts(args, arrays)

    print("generate_map p=%d, batch %d, input %d, %d classes, CAMs %d->31 (%s, %.1f peaks/sample), "
          "image grad %s, s per batch (best of %d×%d):"
          % (args.mode, args.batch, args.size, args.classes, args.crm_size, args.maps, peaks.mean(),
             "no" if args.no_image_grad else "yes", args.rounds, args.repeat))
    reference = results[VARIANTS[0][0]]
    print("  %-32s %9s %9s %12s %12s" % ("", "forward", "fwd+bwd", "fwd vs old", "f+b vs old"))
    for name, (forward, train) in results.items():
        print("  %-32s %9.3f %9.3f %11.2fx %11.2fx" % (name, forward, train, reference[0] / forward,
                                                      reference[1] / train))
    print("  breakdown, per map (the whole call does two):")
    for name, (forward, train) in parts.items():
        print("  %-32s %9.3f %9.3f" % (name, forward, train))
    forward, train = results[VARIANTS[-1][0]]
    rest = (forward - 2 * (parts["grid resize (matmul)"][0] + parts["native sampler"][0]),
            train - 2 * (parts["grid resize (matmul)"][1] + parts["native sampler"][1]))
    print("  %-32s %9.3f %9.3f" % ("rest of the call (whole)", rest[0], rest[1]))
    if args.upstream_script:
        upstream = results["upstream (PyTorch)"]
        print("ratio upstream/port (default): forward %.2fx, fwd+bwd %.2fx" % (upstream[0] / forward,
                                                                               upstream[1] / train))
    print("forward_seconds=%.4f" % forward)
    print("step_seconds=%.4f" % train)


if __name__ == "__main__":
    main()
