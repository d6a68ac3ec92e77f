"""Images per second of the attribute model's training input pipeline.

Builds WIDER-like data in a temporary directory: 640×480 JPEG photographs,
each showing 2-3 "persons" (Fashion-MNIST products upscaled to 96-224 px
tall on a textured background; synthetic shapes when the demo data is
missing) with one person box per training item, 14 attributes per box. The
items go through what ``train_attr.py --dataset wider`` runs: decode, crop
the person box, the training transform (resize to 256², random square crop
128..224, resize to 224, mirror, mean subtraction), the runtime's
:class:`~training_runtime.loop.IndexedDataset` (per-sample reseeding) and a
``gluon.data.DataLoader`` of one epoch with 0, 1 and 2 worker processes; then
the same from RecordIO (the crops packed at 256² by
``training_runtime.records.pack_dataset``, as ``--records`` reads them).

Usage: python benchmarks/bench_data.py [--images 96] [--batch-size 32] [--epochs 2]
       [--workers 0 1 2] [--input-size 224]
Prints images/s per configuration and the ratio to the 0-worker JPEG pipeline
(all measured in the same run; the first epoch of each warms the page cache).
"""
import argparse
import os
import tempfile
import time

import mxnet as mx
import numpy as np
from mxnet import gluon

from imbalanced_attr.data import AttributeDataset, make_transform
from training_runtime import fashion_mnist, records
from training_runtime.loop import IndexedDataset, batch_indices, epoch_keys, epoch_order

WIDTH, HEIGHT, ATTRIBUTES = 640, 480, 14


def _products(count, rng):
    """``count`` grey 28×28 uint8 pictures: Fashion-MNIST if installed, else blobs."""
    try:
        images = fashion_mnist.split_arrays("train", limit=count)[0]
        return np.asarray(images, dtype=np.uint8)
    except Exception:  # demo data missing: synthetic ellipses
        yy, xx = np.mgrid[-1:1:28j, -1:1:28j]
        return np.stack([(255 * ((xx / rng.uniform(0.3, 0.9)) ** 2 + (yy / rng.uniform(0.5, 1)) ** 2
                                 < 1)).astype(np.uint8) for _ in range(count)])


def make_photos(directory, num_boxes, rng):
    """JPEG photographs in ``directory``: (paths, boxes (x, y, w, h)), one entry per person box."""
    products = _products(num_boxes + 8, rng)
    paths, boxes = [], []
    photo, used = 0, 0
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH]
    while len(boxes) < num_boxes:
        base = rng.randint(40, 200, 3)
        image = (base + 30 * np.sin(xx[..., None] / rng.uniform(8, 40) + yy[..., None] / rng.uniform(8, 40))
                 + rng.normal(0, 12, (HEIGHT, WIDTH, 3)))
        image = np.clip(image, 0, 255).astype(np.uint8)
        path = os.path.join(directory, "Image", "photo_%04d.jpg" % photo)
        for _ in range(rng.randint(2, 4)):
            if len(boxes) == num_boxes:
                break
            h = int(rng.randint(96, 225))
            w = int(h * rng.uniform(0.4, 0.8))
            x, y = int(rng.randint(0, WIDTH - w)), int(rng.randint(0, HEIGHT - h))
            person = mx.image.imresize(mx.nd.array(np.repeat(products[used][:, :, None], 3, axis=2),
                                                   dtype=np.uint8), w, h).asnumpy()
            colour = rng.randint(0, 256, 3)
            alpha = person.astype(np.float32) / 255.0
            patch = image[y:y + h, x:x + w].astype(np.float32)
            image[y:y + h, x:x + w] = (patch * (1 - alpha) + colour * alpha).astype(np.uint8)
            paths.append(path)
            boxes.append((x, y, w, h))
            used += 1
        with open(path, "wb") as f:
            f.write(_encode(image))
        photo += 1
    return paths, boxes


def _encode(image):
    """JPEG bytes of an H×W×3 RGB uint8 array (cv2 through mxnet's recordio packer)."""
    packed = mx.recordio.pack_img(mx.recordio.IRHeader(0, 0, 0, 0), image[:, :, ::-1], quality=90)
    return mx.recordio.unpack(packed)[1]


def images_per_second(dataset, batch_size, epochs, num_workers, seed=0):
    """Mean images/s over ``epochs`` epochs (after one warm-up epoch) of the runner's loading."""
    indexed = IndexedDataset(dataset, seed)
    rates = []
    for epoch in range(epochs + 1):
        batches = batch_indices(epoch_order(seed, epoch, len(indexed)), batch_size)
        start = time.time()
        loader = gluon.data.DataLoader(indexed, batch_sampler=epoch_keys(epoch, batches),
                                       num_workers=num_workers)
        count = 0
        for data, _, _ in loader:
            data.wait_to_read()
            count += data.shape[0]
        del loader
        if epoch:  # epoch 0 warms the page cache and the decoder
            rates.append(count / (time.time() - start))
    return float(np.mean(rates))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=96, help="person boxes (training items)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs per configuration")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--input-size", type=int, default=224)
    args = parser.parse_args()
    rng = np.random.RandomState(0)
    transform = make_transform(True, input_size=args.input_size)
    with tempfile.TemporaryDirectory() as tmp:
        os.makedirs(os.path.join(tmp, "Image"))
        paths, boxes = make_photos(tmp, args.images, rng)
        labels = rng.choice([-1, 0, 1], size=(len(paths), ATTRIBUTES)).astype(np.float32)
        labels[0] = 1
        names = ["attr_%d" % i for i in range(ATTRIBUTES)]
        jpegs = AttributeDataset(paths, labels, names, boxes=boxes, source="bench", split="train")
        prefix = os.path.join(tmp, "train")
        records.pack_dataset(jpegs, prefix, resize=int(round(256 * args.input_size / 224.0)))
        packed = records.RecordDataset(prefix)
        print("%d person boxes in %d photographs of %dx%d, batch %d, input %d, %d timed epochs"
              % (len(paths), len(set(paths)), WIDTH, HEIGHT, args.batch_size, args.input_size,
                 args.epochs))
        results = []
        for source, dataset in (("jpeg", jpegs), ("recordio", packed)):
            for workers in args.workers:
                rate = images_per_second(dataset.transform_first(transform), args.batch_size,
                                         args.epochs, workers)
                results.append((source, workers, rate))
        base = results[0][2]
        for source, workers, rate in results:
            print("%-9s workers %d: %7.1f images/s  (%.2fx jpeg, 0 workers)"
                  % (source, workers, rate, rate / base))


if __name__ == "__main__":
    main()
