"""Where the attribute model looks: attention maps per attribute and stage.

For an image the model predicts C attribute probabilities; each stage
(taps 2, 3, 4) attends with ``spatial_softmax(fatt(tap)) * fconv(tap)``, an
N×C×h×w map per attribute (:meth:`imbalanced_attr.model.AttributeModel.attention_maps`,
the very tensor the stage's fsr head reads). A figure shows the image as the
network sees it (after the evaluation transform), the predicted attributes
with their probabilities and, for the chosen attributes (the most probable
ones and any named), each stage's map upsampled (bilinear) to the image and
overlaid, scaled to its own range (its maximum is printed above it).

- :func:`attention_pictures`: the figure of a few evaluation images (what
  training writes into RUN/pictures/attention_epoch<N>.png after every
  evaluation; ``AttributeTask.pictures``);
- :data:`EXPLAIN`: the ``--explain IMAGE... --weights RUN --output DIR
  [--attributes NAME,...]`` action of ``train_attr.py`` (one PNG per image).

Drawing uses matplotlib's Agg canvas (no display, no global backend).
"""
import os

import numpy as np

from training_runtime import figures
from training_runtime.errors import UserError, writing
from training_runtime.figures import new_figure, overlay, save_figure
from training_runtime.images import IMAGENET_MEAN, IMAGENET_STD

from .data import ORIGINAL_MEAN

#: attributes shown per image besides the named ones: the most probable ones
TOP_ATTRIBUTES = 3
#: attributes per image in the pictures written during training
PICTURE_ATTRIBUTES = 2
STAGE_NAMES = ("stage 2", "stage 3", "stage 4")


# ---------------------------------------------------------------------------- numbers

def display_images(data, normalize):
    """Network input N×3×S×S (normalised as ``normalize``: 'original' or 'imagenet')
    -> N×S×S×3 uint8 (what the network sees)."""
    if normalize == "original":
        return figures.display_images(data, np.asarray(ORIGINAL_MEAN) / 255.0, (1 / 255.0,) * 3)
    if normalize == "imagenet":
        return figures.display_images(data, IMAGENET_MEAN, IMAGENET_STD)
    raise ValueError("normalize: expected 'original' or 'imagenet', got %r" % (normalize,))


def attention_of(net, data):
    """(probabilities N×C, [attention N×C×h×w per stage]) as numpy, from
    :meth:`~imbalanced_attr.model.AttributeModel.attention_maps` of ``net`` on ``data``
    (N×3×S×S NDArray)."""
    from .model import aggregate_prediction
    logits, scores, maps = net.attention_maps(data)
    probs = aggregate_prediction(logits, scores).asnumpy()
    return probs, [m["attention"].asnumpy() for m in maps]


def chosen_attributes(probs, names, top=TOP_ATTRIBUTES, named=()):
    """Indices of the ``top`` most probable attributes of one image (probs (C,)),
    then those of ``named`` not among them, in order."""
    order = [int(i) for i in np.argsort(-np.asarray(probs), kind="stable")[:top]]
    for name in named:
        index = list(names).index(name)
        if index not in order:
            order.append(index)
    return order


# ---------------------------------------------------------------------------- drawing

def draw_rows(figure, rows, columns):
    """One row per (image, label text, attribute name, probability, [map per stage])."""
    for r, (image, text, name, prob, maps) in enumerate(rows):
        axis = figure.add_subplot(len(rows), columns, r * columns + 1)
        axis.imshow(image)
        axis.set_title(text, fontsize=7)
        axis.axis("off")
        for s, attention_map in enumerate(maps):
            overlay(figure.add_subplot(len(rows), columns, r * columns + 2 + s), image, attention_map,
                    "%s p=%.2f\n%s %dx%d (max %.3g)" % (name, prob, STAGE_NAMES[s], attention_map.shape[0],
                                                       attention_map.shape[1], attention_map.max()))


def attention_pictures(images, names, probs, stage_maps, path, epoch, labels=None,
                       per_image=PICTURE_ATTRIBUTES):
    """The training-time figure: for each image (N×S×S×3 uint8) its ``per_image`` most
    probable attributes (probs N×C), each with the three stages' maps (stage_maps:
    three N×C×h×w); labels (N×C in {1, -1, 0}) name the true attributes."""
    rows = []
    for n in range(len(images)):
        true = ""
        if labels is not None:
            true = ",".join(names[c] for c in np.flatnonzero(np.asarray(labels[n]) == 1)) or "none"
            true = "true: " + true
        for c in chosen_attributes(probs[n], names, per_image):
            rows.append((images[n], "image %d %s" % (n, true), names[c], probs[n, c],
                         [m[n, c] for m in stage_maps]))
    columns = 1 + len(stage_maps)
    figure = new_figure(1.9 * columns, 1.9 * len(rows))
    draw_rows(figure, rows, columns)
    figure.suptitle("attention after epoch %d" % epoch, fontsize=9)
    return save_figure(figure, path, grid=True)


def explanation_figure(image, names, probs, stage_maps, chosen, path, source):
    """One image's figure: the image, every attribute's probability (bars) and, per
    chosen attribute, the stages' maps (stage_maps: three C×h×w)."""
    columns = 1 + len(stage_maps)
    rows = len(chosen)
    figure = new_figure(2.0 * columns, 2.0 * (rows + 1))
    axis = figure.add_subplot(rows + 1, 2, 1)
    axis.imshow(image)
    axis.set_title(os.path.basename(source), fontsize=8)
    axis.axis("off")
    bars = figure.add_subplot(rows + 1, 2, 2)
    order = np.argsort(probs)
    bars.barh(np.arange(len(names)), probs[order], color=["C3" if probs[i] >= 0.5 else "C0" for i in order])
    bars.set_yticks(np.arange(len(names)))
    bars.set_yticklabels([names[i] for i in order], fontsize=6)
    bars.set_xlim(0, 1)
    bars.tick_params(axis="x", labelsize=6)
    bars.set_title("predicted probabilities", fontsize=8)
    for r, c in enumerate(chosen):
        for s, stage_map in enumerate(stage_maps):
            overlay(figure.add_subplot(rows + 1, columns, (r + 1) * columns + 2 + s), image, stage_map[c],
                    "%s p=%.2f\n%s %dx%d (max %.3g)" % (names[c], probs[c], STAGE_NAMES[s], stage_map.shape[1],
                                                       stage_map.shape[2], stage_map[c].max()))
        axis = figure.add_subplot(rows + 1, columns, (r + 1) * columns + 1)
        axis.imshow(image)
        axis.set_title(names[c], fontsize=8)
        axis.axis("off")
    return save_figure(figure, path)


# ---------------------------------------------------------------------------- the task's pictures

def task_pictures(task, batches, directory, epoch):
    """``AttributeTask.pictures``: RUN/pictures/attention_epoch<N>.png of the batches."""
    images, labels, probs, maps = [], [], [], []
    for data, label in batches:
        p, m = attention_of(task.net, data)
        images.append(display_images(data.asnumpy(), task.normalize))
        labels.append(label.asnumpy())
        probs.append(p)
        maps.append(m)
    if not images:
        return []
    maps = [np.concatenate(stage) for stage in zip(*maps)]
    path = os.path.join(directory, "attention_epoch%d.png" % epoch)
    return [attention_pictures(np.concatenate(images), task.attribute_names, np.concatenate(probs), maps,
                               path, epoch, labels=np.concatenate(labels))]


# ---------------------------------------------------------------------------- --explain

def parse_attributes(text, names):
    """``--attributes a,b`` -> [names]; UserError naming an unknown attribute."""
    if not text:
        return []
    chosen = [name.strip() for name in text.split(",") if name.strip()]
    for name in chosen:
        if name not in names:
            raise UserError("--attributes: unknown attribute %r; the model's attributes are %s"
                            % (name, ", ".join(names)))
    return chosen


def output_names(paths):
    """One PNG name per image path: <stem>_attention.png (numbered when stems repeat)."""
    seen, out = {}, []
    for path in paths:
        stem = os.path.splitext(os.path.basename(path))[0] or "image"
        count = seen.get(stem, 0)
        seen[stem] = count + 1
        out.append("%s%s_attention.png" % (stem, "" if not count else "_%d" % count))
    return out


class ExplainAction(object):
    """``--explain IMAGE... --weights RUN --output DIR [--attributes NAME,...]``: a task-family
    action of ``train_attr.py`` (see ``training_runtime.registry.TaskFamily``)."""

    def add_arguments(self, group):
        group.add_argument("--explain", nargs="+", default=None, metavar="IMAGE",
                           help="write one PNG per image into --output DIR: the predicted attributes "
                                "and the attention of each stage for the %d most probable attributes "
                                "(and those of --attributes)" % TOP_ATTRIBUTES)
        group.add_argument("--attributes", default=None, metavar="NAME,...",
                           help="attributes --explain always shows (comma-separated)")

    def requested(self, args):
        return args.explain is not None

    def run(self, family, args, given):
        from training_runtime import app, cli
        from training_runtime.loop import evaluation_batches
        if not args.output:
            raise UserError("--output: give the directory --explain writes its PNGs into")
        output = args.output
        if os.path.exists(output) and not os.path.isdir(output):
            raise UserError("--output: %s is a file; expected a directory for --explain" % output)
        parent = os.path.dirname(os.path.abspath(output))
        if not os.path.isdir(parent):
            raise UserError("--output: directory %s does not exist" % parent)
        # the images are decoded before the model is loaded: a bad one fails fast
        images = app.ImageFiles(args.explain, None, bool(given.get("skip_bad_images")))
        task, config, names, epoch, _ = app._inference_task(family, args, given, "--weights", "test")
        named = parse_attributes(args.attributes, names)
        images.transform_fn = task.transform(False)
        for path in images.skipped:
            print("skipped unreadable image %s (--skip-bad-images)" % path)
        if not len(images):
            raise UserError("--explain: none of the %d images could be read" % len(args.explain))
        with writing(output):
            os.makedirs(output, exist_ok=True)
        ctx = cli.contexts(config.runtime)
        written, position = [], 0
        files = output_names(images.paths)
        for data, _ in evaluation_batches(images, ctx, config.runtime.batch_size, 0, "explain"):
            probs, maps = attention_of(task.net, data)
            shown = display_images(data.asnumpy(), task.normalize)
            for n in range(len(shown)):
                path = images.paths[position]
                target = os.path.join(output, files[position])
                chosen = chosen_attributes(probs[n], names, TOP_ATTRIBUTES, named)
                written.append(explanation_figure(shown[n], names, probs[n], [m[n] for m in maps], chosen,
                                                  target, path))
                print("%s: %s -> %s" % (path, ", ".join("%s %.2f" % (names[c], probs[n, c]) for c in chosen),
                                        target))
                position += 1
        print("wrote %d attention figures to %s" % (len(written), output))
        return written


EXPLAIN = ExplainAction()
