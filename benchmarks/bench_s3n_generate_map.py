"""Time S3N's vectorised generate_map against a per-sample / per-peak Python loop.

The loop version below follows upstream's structure (Yao-DD/S3N
``S3N.generate_map``): a Python loop over the samples, the gate and the peak
list read on the host, one ``gaussian_kernel`` per peak, then the sampler with
MXNet's 61×61 ``Convolution``. It is checked to give the same numbers as
``fgvc_gluon.s3n.generate_map`` (in float64, to rounding) before timing in float32.

Usage: python benchmarks/bench_s3n_generate_map.py [--batch 16] [--size 448] [--classes 200]
       [--repeat 3] [--mode 0]
Prints ms per batch (forward + backward to the images and the radius scales)
for both and their ratio.
"""
import argparse
import time

import numpy as np
from mxnet import autograd, nd

from fgvc_gluon import s3n


def loop_generate_map(images, class_response_maps, p, base_ratio, radius, radius_inv):
    """The straightforward form: Python loops over samples and peaks (p = 0 or 2)."""
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
        grid = nd.contrib.BilinearResize2D(grid, height=images.shape[2], width=images.shape[3],
                                           align_corners=True)
        outputs.append(nd.BilinearSampler(images, grid))
    return outputs[0], outputs[1]


def run(function, images, maps, p, radius, radius_inv, weights):
    """One training-like call: forward under record, backward to images and radius scales."""
    with autograd.record():
        zoom, inv = function(images, maps, p, 0.09, radius, radius_inv)
        objective = nd.sum(zoom * weights[0]) + nd.sum(inv * weights[1])
    objective.backward()
    nd.waitall()
    return zoom, inv, images.grad.copy(), radius.grad.copy(), radius_inv.grad.copy()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=448)
    parser.add_argument("--classes", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--mode", type=int, default=0, choices=(0, 2))
    args = parser.parse_args()

    rng = np.random.RandomState(0)
    # smooth, natural-image-like inputs: low-resolution noise upsampled to the input size
    images = nd.contrib.BilinearResize2D(nd.array(rng.rand(args.batch, 3, 56, 56)),
                                         height=args.size, width=args.size)
    # smooth, CAM-like maps: low-resolution noise upsampled to 31×31
    coarse = nd.array(rng.randn(args.batch, args.classes, 7, 7))
    maps = nd.contrib.BilinearResize2D(coarse, height=s3n.GRID_SIZE, width=s3n.GRID_SIZE)
    weights = [nd.array(rng.randn(*images.shape)) for _ in range(2)]

    # same numbers: checked in float64, where both are exact to rounding (in float32 the radius
    # gradients, sums of many cancelling terms, carry ~1e-2 relative noise, more in the loop form)
    checked = {}
    for name, function in (("vectorised", s3n.generate_map), ("loop", loop_generate_map)):
        radius, radius_inv = nd.array([0.09], dtype="float64"), nd.array([0.3], dtype="float64")
        images64 = images.astype("float64")
        for array in (images64, radius, radius_inv):
            array.attach_grad()
        checked[name] = run(function, images64, maps.astype("float64"), args.mode, radius, radius_inv,
                            [w.astype("float64") for w in weights])
    labels = ("zoomed", "complementary", "d/d images", "d/d radius", "d/d radius_inv")
    for label, fast, slow in zip(labels, checked["vectorised"], checked["loop"]):
        fast, slow = fast.asnumpy(), slow.asnumpy()
        scale = max(1.0, float(np.abs(slow).max()))
        diff = float(np.abs(fast - slow).max())
        print("float64 check %-15s max|diff| %.3g (max|value| %.3g)" % (label, diff, scale))
        assert diff <= 1e-9 * scale, "vectorised and loop versions disagree on %s" % label

    radius, radius_inv = nd.array([0.09]), nd.array([0.3])
    for array in (images, radius, radius_inv):
        array.attach_grad()
    results = {}
    for name, function in (("vectorised", s3n.generate_map), ("loop", loop_generate_map)):
        run(function, images, maps, args.mode, radius, radius_inv, weights)   # warm-up
        train_times, forward_times = [], []
        for _ in range(args.repeat):
            start = time.time()
            run(function, images, maps, args.mode, radius, radius_inv, weights)
            train_times.append(time.time() - start)
            start = time.time()
            function(images, maps, args.mode, 0.09, radius, radius_inv)
            nd.waitall()
            forward_times.append(time.time() - start)
        results[name] = (1000 * min(train_times), 1000 * min(forward_times))

    print("generate_map p=%d, batch %d, input %d, %d classes, 31x31 maps, ms per batch (best of %d):"
          % (args.mode, args.batch, args.size, args.classes, args.repeat))
    print("  %-22s %12s %12s" % ("", "fwd+bwd", "forward"))
    for name in ("vectorised", "loop"):
        print("  %-22s %12.1f %12.1f" % (name, results[name][0], results[name][1]))
    print("  %-22s %11.1fx %11.1fx" % ("ratio loop/vectorised", results["loop"][0] / results["vectorised"][0],
                                         results["loop"][1] / results["vectorised"][1]))


if __name__ == "__main__":
    main()
