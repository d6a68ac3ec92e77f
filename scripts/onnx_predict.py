"""Predict with an exported ONNX model and its sidecar, without MXNet or this package.

    python scripts/onnx_predict.py exported/model.json IMAGE... [--output predictions.csv]

The reference for deploying ``python -m training_runtime.export RUN --format onnx
--output exported/model``: it applies the sidecar's preprocessing as code and
gives the numbers of ``train_*.py --predict`` (tests/test_export.py checks it):

1. decode the image as RGB, H×W×3 uint8 (grey images replicated);
2. the sidecar's ``input.preprocess`` steps, in order: ``resize`` to exactly
   width×height, ``resize_short`` (the short side to ``size``, the long side
   ``floor(long * size / short)``), ``center_crop`` width×height (offsets
   ``floor((W - w) / 2)``, ``floor((H - h) / 2)``); interpolation ``bilinear`` or
   ``area`` (OpenCV's INTER_LINEAR / INTER_AREA, the kernels MXNet's image
   operators use);
3. ``x = (pixel * scale - mean) / std`` per channel (``input.normalization``),
   float32, transposed to 3×S×S, stacked into N×3×S×S;
4. the model's output N×K (``output``: logits or scores, one column per label).

Needs numpy, opencv-python and onnxruntime. Writes a CSV (image, one column per
label, 6 decimals) like ``--predict``, to ``--output`` or standard output.
"""
import argparse
import csv
import json
import os
import sys

import numpy as np

INTERPOLATION = {"bilinear": 1, "area": 3}   # OpenCV's INTER_LINEAR, INTER_AREA


class InputError(ValueError):
    """A bad file: the message names it and says what was expected."""


def read_image(path):
    """``path`` -> H×W×3 uint8 RGB; InputError naming the file when it cannot be decoded."""
    import cv2
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as err:
        raise InputError("%s: cannot read (%s)" % (path, err.strerror))
    image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if image is None:
        raise InputError("%s: expected a JPEG/PNG/BMP image, the decoder could not read it" % path)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def _resize(image, width, height, interpolation):
    import cv2
    return cv2.resize(image, (int(width), int(height)), interpolation=INTERPOLATION[interpolation])


def preprocess(image, inputs):
    """H×W×3 uint8 RGB -> 3×S×S float32 by the sidecar's ``input`` entry."""
    for step in inputs["preprocess"]:
        height, width = image.shape[:2]
        interpolation = step.get("interpolation", "bilinear")
        if step["op"] == "resize":
            image = _resize(image, step["width"], step["height"], interpolation)
        elif step["op"] == "resize_short":
            size = int(step["size"])
            if height > width:
                image = _resize(image, size, height * size // width, interpolation)
            else:
                image = _resize(image, width * size // height, size, interpolation)
        elif step["op"] == "center_crop":
            crop_w, crop_h = int(step["width"]), int(step["height"])
            # an image smaller than the crop: the largest crop of the crop's aspect ratio that
            # fits (mx.image.scale_down), resized up to the crop size
            w, h = float(crop_w), float(crop_h)
            if height < h:
                w, h = w * height / h, height
            if width < w:
                w, h = width, h * width / w
            w, h = int(w), int(h)
            x0, y0 = int((width - w) / 2), int((height - h) / 2)
            image = image[y0:y0 + h, x0:x0 + w]
            if (w, h) != (crop_w, crop_h):
                image = _resize(image, crop_w, crop_h, interpolation)
        else:
            raise ValueError("input.preprocess: unknown step %r" % (step["op"],))
    norm = inputs["normalization"]
    x = (image.astype(np.float32) * np.float32(norm["scale"]) - np.float32(norm["mean"])) \
        / np.float32(norm["std"])
    return np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32)


def load(sidecar_path):
    """(sidecar dict, onnxruntime session) of an export's ``PATH.json``; InputError when it
    is not the sidecar of an ONNX export or its model file is missing."""
    import onnxruntime
    try:
        with open(sidecar_path) as f:
            info = json.load(f)
    except (OSError, ValueError) as err:
        raise InputError("%s: expected the JSON sidecar of an export (%s)" % (sidecar_path, err))
    if not isinstance(info, dict) or info.get("model_format") != "onnx" \
            or "preprocess" not in info.get("input", {}):
        raise InputError("%s: expected the sidecar of an --format onnx export with input.preprocess"
                         % sidecar_path)
    model = os.path.join(os.path.dirname(os.path.abspath(sidecar_path)), info["files"][0])
    if not os.path.isfile(model):
        raise InputError("%s: its model %s is missing" % (sidecar_path, model))
    session = onnxruntime.InferenceSession(model, providers=["CPUExecutionProvider"])
    return info, session


def predict(sidecar_path, images, batch_size=32):
    """N×K float32 outputs of the image files ``images`` (all decoded first: a bad file stops
    before any work); also the sidecar."""
    info, session = load(sidecar_path)
    decoded = [read_image(p) for p in images]
    name = session.get_inputs()[0].name
    rows = []
    for start in range(0, len(decoded), batch_size):
        batch = np.stack([preprocess(image, info["input"]) for image in decoded[start:start + batch_size]])
        rows.append(session.run(None, {name: batch})[0])
    return np.concatenate(rows, axis=0), info


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sidecar", metavar="MODEL.json", help="the export's sidecar (PATH.json)")
    parser.add_argument("images", nargs="+", metavar="IMAGE")
    parser.add_argument("--output", default=None, help="CSV to write (default: standard output)")
    args = parser.parse_args(argv)
    if args.output and not os.path.isdir(os.path.dirname(os.path.abspath(args.output))):
        parser.exit(2, "error: --output: directory %s does not exist\n"
                    % os.path.dirname(os.path.abspath(args.output)))
    try:
        scores, info = predict(args.sidecar, args.images)
    except InputError as err:
        parser.exit(2, "error: %s\n" % err)
    labels = info["output"]["labels"]
    if not info.get("deterministic", True):
        print("note: the model draws random numbers (%s): its outputs vary from run to run"
              % ", ".join(info.get("random_operators", [])), file=sys.stderr)
    out = open(args.output + ".tmp", "w", newline="") if args.output else sys.stdout
    writer = csv.writer(out)
    writer.writerow(["image"] + list(labels))
    for path, row in zip(args.images, scores):
        writer.writerow([path] + ["%.6f" % v for v in row])
    if args.output:
        out.close()
        os.replace(args.output + ".tmp", args.output)
    return scores


if __name__ == "__main__":
    main()
