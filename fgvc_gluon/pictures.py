"""What the fine-grained methods learned: the pictures each writes after an evaluation.

``FGVCTask.pictures(batches, directory, epoch)`` (the runtime calls it on the
first ``picture_images`` images of the validation split, always the same
ones) writes into RUN/pictures:

- S3N (``s3n_epoch<N>.png``): per image the input, the class response map
  the sampler uses (the gated, min-max normalised decide map on the 31×31
  grid) with its peaks (red: sampled for the zoomed image, blue: for the
  complementary one), the zoomed and the complementary samples
  (:func:`fgvc_gluon.s3n.generate_map` with the evaluation mode of the epoch);
- MC-Loss (``mcloss_epoch<N>.png``): per image the ξ channel maps of the
  true class's group and of the predicted class's group, shown directly
  (no gradient weighting: the author's answer in PRIS-CV/Mutual-Channel-Loss #9);
- center loss (``centerloss_epoch<N>.png``): the deep features of the
  validation images coloured by class with the class centers (upstream's
  figure per epoch); a PCA projection (fitted on the features) when the
  feature dimension is above 2;
- baseline (``cam_epoch<N>.png``): class activation maps (Zhou et al. 2016)
  of the true and the predicted class: the new output layer's weights
  applied to the last feature maps before the global average pooling.

Shapes: data N×3×S×S (the evaluation transform's output), labels (N,).
"""
import os

import numpy as np
from mxnet import autograd, nd
from mxnet.gluon import nn

from training_runtime.figures import display_images, new_figure, overlay, save_figure, show_image


def _gather(batches):
    """(list of data slices, labels (N,) int numpy) of ``batches``."""
    data, labels = [], []
    for x, y in batches:
        data.append(x)
        labels.append(y.asnumpy().astype(np.int64).reshape(-1))
    return data, (np.concatenate(labels) if labels else np.zeros((0,), np.int64))


def _images(task, data):
    """The network inputs of the slices as N×S×S×3 uint8."""
    return display_images(np.concatenate([x.asnumpy() for x in data]), task.defaults["mean"],
                          task.defaults["std"])


def _class_name(task, k):
    names = getattr(task, "class_names", None)
    return names[k] if names else str(k)


# ---------------------------------------------------------------------------- S3N

def s3n_samples(net, data, mode, uniforms=None):
    """S3N's sampling of ``data`` (N×3×S×S) as the network does it in mode ``mode``
    (``uniforms``: mode 1's N×961 U(0, 1) numbers, default drawn from MXNet's RNG):
    dict of numpy arrays ``scores`` N×31×31 (the decide map), ``to_zoom`` /
    ``to_complement`` N×31×31 (0/1 peaks), ``zoom`` / ``complement`` N×3×S×S and
    ``logits`` N×K (the raw classifier)."""
    from .s3n import GRID_SIZE, generate_map
    ctx = data.context
    with autograd.predict_mode():
        features = net.features(data)
        weight, bias = net.raw_classifier_weight.data(ctx), net.raw_classifier_bias.data(ctx)
        logits = nd.FullyConnected(nd.mean(features, axis=(2, 3)), weight, bias, num_hidden=net.num_classes)
        maps = net.class_response_maps(nd, features, weight, bias)
        _, _, details = generate_map(data, maps, mode, net.base_ratio, net.radius.data(ctx),
                                     net.radius_inv.data(ctx), net.filter.data(ctx), return_details=True,
                                     uniforms=uniforms)
    grid = (-1, GRID_SIZE, GRID_SIZE)
    out = {k: details[k].asnumpy().reshape(grid) for k in ("scores", "to_zoom", "to_complement")}
    out.update(zoom=details["zoom"].asnumpy(), complement=details["complement"].asnumpy(),
               logits=logits.asnumpy())
    return out


def s3n_pictures(task, batches, directory, epoch):
    from .s3n import evaluation_mode
    data, labels = _gather(batches)
    if not data:
        return []
    mode = evaluation_mode(epoch)
    uniforms = getattr(task, "evaluation_uniforms", lambda x, epoch: None)
    parts = [s3n_samples(task.net, x, mode, uniforms(x, epoch)) for x in data]
    sampled = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    mean, std = task.defaults["mean"], task.defaults["std"]
    images = _images(task, data)
    zoom = display_images(sampled["zoom"], mean, std)
    complement = display_images(sampled["complement"], mean, std)
    rows, columns = len(images), 4
    figure = new_figure(2.0 * columns, 2.0 * rows)
    for n in range(rows):
        predicted = int(np.argmax(sampled["logits"][n]))
        show_image(figure.add_subplot(rows, columns, n * columns + 1), images[n],
                   "input: %s (raw: %s)" % (_class_name(task, labels[n]), _class_name(task, predicted)))
        axis = figure.add_subplot(rows, columns, n * columns + 2)
        overlay(axis, images[n], sampled["scores"][n], "class response map + peaks")
        size = images[n].shape[0] / float(sampled["scores"].shape[1])
        for mask, colour in (("to_zoom", "red"), ("to_complement", "cyan")):
            ys, xs = np.nonzero(sampled[mask][n] > 0)
            axis.scatter((xs + 0.5) * size - 0.5, (ys + 0.5) * size - 0.5, s=60, c=colour, marker="x",
                         linewidths=2, clip_on=False)
        show_image(figure.add_subplot(rows, columns, n * columns + 3), zoom[n], "zoomed")
        show_image(figure.add_subplot(rows, columns, n * columns + 4), complement[n], "complementary")
    figure.suptitle("S3N samples after epoch %d (mode p=%d)" % (epoch, mode), fontsize=9)
    return [save_figure(figure, os.path.join(directory, "s3n_epoch%d.png" % epoch), grid=True)]


# ---------------------------------------------------------------------------- MC-Loss

def mc_channel_maps(net, data):
    """(feature maps N×cξ×H×W, logits N×c) of the MC network in inference mode."""
    with autograd.predict_mode():
        features = net.features(data)
        logits = net.classifier(features)
    return features.asnumpy(), logits.asnumpy()


def class_group(features, k, xi):
    """The ξ channels of class ``k`` (channel j belongs to class j // ξ): N×ξ×H×W."""
    return features[:, k * xi:(k + 1) * xi]


#: channels drawn per class group (resnet50_mc's groups have 10-11, more for fewer classes):
#: the strongest ones, in channel order
MC_SHOWN_CHANNELS = 5


def shown_channels(group, limit=MC_SHOWN_CHANNELS):
    """Indices into a ξ×H×W group of the channels to draw: all when ξ <= limit, else the
    ``limit`` with the largest maxima, in channel order."""
    if len(group) <= limit:
        return list(range(len(group)))
    strongest = np.argsort(-group.reshape(len(group), -1).max(axis=1), kind="stable")[:limit]
    return sorted(int(j) for j in strongest)


def mcloss_pictures(task, batches, directory, epoch):
    data, labels = _gather(batches)
    if not data:
        return []
    block = task.mc_loss
    parts = [mc_channel_maps(task.net, x) for x in data]
    features = np.concatenate([p[0] for p in parts])
    logits = np.concatenate([p[1] for p in parts])
    images = _images(task, data)
    width = min(max(size for _, size in block.groups), MC_SHOWN_CHANNELS)
    rows, columns = len(images), 1 + 2 * width
    figure = new_figure(1.7 * columns, 1.9 * rows)
    for n in range(rows):
        true, predicted = int(labels[n]), int(np.argmax(logits[n]))
        show_image(figure.add_subplot(rows, columns, n * columns + 1), images[n],
                   "true %s\npredicted %s" % (_class_name(task, true), _class_name(task, predicted)))
        for g, (what, k) in enumerate((("true", true), ("pred", predicted))):
            start, size = block.class_channels(k)
            group = features[n, start:start + size]
            for i, j in enumerate(shown_channels(group)):
                overlay(figure.add_subplot(rows, columns, n * columns + 2 + g * width + i), images[n], group[j],
                        "%s %s ch %d\n(max %.3g)" % (what, _class_name(task, k), start + j, group[j].max()))
    xi = "xi=%d" % block.xi if block.xi is not None else "groups " + " + ".join("%dx%d" % r for r in block.groups)
    figure.suptitle("MC-Loss channel groups after epoch %d (%s)" % (epoch, xi), fontsize=9)
    return [save_figure(figure, os.path.join(directory, "mcloss_epoch%d.png" % epoch), grid=True)]


# ---------------------------------------------------------------------------- center loss

def pca_projection(features, dims=2):
    """(mean (D,), components dims×D) of ``features`` N×D (D > dims): project with
    ``(x - mean) @ components.T``."""
    mean = features.mean(axis=0)
    _, _, vt = np.linalg.svd(features - mean, full_matrices=False)
    return mean, vt[:dims]


def center_features(task, data):
    """Deep features N×D of the slices (inference mode) and the centers K×D."""
    with autograd.predict_mode():
        features = np.concatenate([task.net(x)[0].asnumpy() for x in data])
    return features, task.center_loss.centers.data(data[0].context).asnumpy()


def centerloss_pictures(task, batches, directory, epoch):
    data, labels = _gather(batches)
    if not data:
        return []
    features, centers = center_features(task, data)
    what = "features"
    if features.shape[1] > 2:
        mean, components = pca_projection(features)
        features, centers = (features - mean) @ components.T, (centers - mean) @ components.T
        what = "PCA of the %d-D features" % components.shape[1]
    elif features.shape[1] == 1:
        features = np.concatenate([features, np.zeros_like(features)], axis=1)
        centers = np.concatenate([centers, np.zeros_like(centers)], axis=1)
    figure = new_figure(6, 5.5)
    axis = figure.add_subplot(1, 1, 1)
    colours = [("C%d" % (k % 10)) for k in range(len(centers))]
    for k in range(len(centers)):
        mine = labels == k
        axis.scatter(features[mine, 0], features[mine, 1], s=4, c=colours[k], alpha=0.6,
                     label=_class_name(task, k))
    axis.scatter(centers[:, 0], centers[:, 1], s=80, c=colours, marker="X", edgecolors="black",
                 linewidths=1.0)
    axis.scatter([], [], s=40, c="white", marker="X", edgecolors="black", label="centers")  # legend entry
    axis.legend(fontsize=6, markerscale=2, loc="best")
    axis.set_title("center loss: %s of %d validation images, epoch %d" % (what, len(labels), epoch),
                   fontsize=9)
    return [save_figure(figure, os.path.join(directory, "centerloss_epoch%d.png" % epoch))]


# ---------------------------------------------------------------------------- baseline: CAM

def class_activation_maps(net, data):
    """(CAMs N×K×h×w, logits N×K) of a model-zoo classifier whose ``features`` end in
    global average pooling (then ``output`` Dense): CAM_k = Σ_f w_kf·A_f + b_k over the
    last feature maps A (N×F×h×w); ValueError for other backbones."""
    layers = list(net.features)
    pools = [i for i, layer in enumerate(layers) if isinstance(layer, nn.GlobalAvgPool2D)]
    if not pools or any(not isinstance(layer, nn.Flatten) for layer in layers[pools[-1] + 1:]):
        raise ValueError("class activation maps need a backbone whose features end in global average "
                         "pooling (e.g. the ResNets), got %s" % type(net).__name__)
    ctx = data.context
    with autograd.predict_mode():
        x = data
        for layer in layers[:pools[-1]]:
            x = layer(x)
        logits = net.output(nd.mean(x, axis=(2, 3)))  # first: the output's shapes may be deferred
        weight, bias = net.output.weight.data(ctx), net.output.bias.data(ctx)
        cams = nd.Convolution(x, weight.reshape((0, 0, 1, 1)), bias, kernel=(1, 1),
                              num_filter=weight.shape[0])
    return cams.asnumpy(), logits.asnumpy()


def cam_pictures(task, batches, directory, epoch):
    data, labels = _gather(batches)
    if not data:
        return []
    parts = [class_activation_maps(task.net, x) for x in data]
    cams = np.concatenate([p[0] for p in parts])
    logits = np.concatenate([p[1] for p in parts])
    images = _images(task, data)
    rows, columns = len(images), 3
    figure = new_figure(2.0 * columns, 2.0 * rows)
    for n in range(rows):
        true, predicted = int(labels[n]), int(np.argmax(logits[n]))
        show_image(figure.add_subplot(rows, columns, n * columns + 1), images[n], "input")
        for g, (what, k) in enumerate((("true", true), ("predicted", predicted))):
            overlay(figure.add_subplot(rows, columns, n * columns + 2 + g), images[n], cams[n, k],
                    "CAM %s: %s (%dx%d)" % (what, _class_name(task, k), cams.shape[2], cams.shape[3]))
    figure.suptitle("class activation maps after epoch %d" % epoch, fontsize=9)
    return [save_figure(figure, os.path.join(directory, "cam_epoch%d.png" % epoch), grid=True)]
