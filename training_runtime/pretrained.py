"""ImageNet weights of a backbone: which file, and loading it checked (``--pretrained [FILE]``).

The run definition's ``pretrained`` (:class:`training_runtime.config.ModelConfig`):

- ``False`` / ``None``: no weights (the backbone is initialised like the new layers);
- ``True`` (``--pretrained``): the model store's file of the backbone, as MXNet's
  (``mxnet.gluon.model_zoo.model_store``) or GluonCV's (``gluoncv.model_zoo.model_store``)
  ``get_model_file`` finds it: ``$MXNET_HOME/models/<name>-<first 8 hex digits of
  its sha1>.params`` (default ``~/.mxnet/models``), checked against the store's
  sha1 and downloaded when absent or different (network);
- a path (``--pretrained FILE``): that ``.params`` file, in the model zoo's layout,
  i.e. what ``save_parameters`` of the model-zoo network writes (its structural
  names, e.g. ``features.0.weight`` for MXNet's ``resnet18_v1``, ``conv1.weight``,
  ``layer1.0.conv1.weight`` for GluonCV's ``resnet18_v1b``; the 1000-way output
  included). Machines without network use it (no sha1: any file of that layout).

:func:`load_weights` checks the file against the network before loading
anything: every parameter present with its shape, no other name. The first
mismatch is a one-line :class:`UserError` naming the file. The runtime loads
no weights itself: the model packages call it while they build their backbones
(``fgvc_gluon.zoo``, ``imbalanced_attr.backbones``).
"""
import os

import mxnet as mx
from mxnet.base import MXNetError

from .errors import UserError

__all__ = ["STORES", "model_store_root", "model_store_file", "weights_file", "check_weights_file",
           "load_weights", "describe"]

#: model stores by name: the package whose ``model_zoo.model_store`` holds a network's sha1
STORES = ("mxnet", "gluoncv")
#: input side used to infer the shapes a network leaves deferred (0) until its first forward
PROBE_SIZE = 224


def model_store_root():
    """``$MXNET_HOME/models`` at call time (MXNet binds its default when it is imported)."""
    return os.path.join(mx.base.data_dir(), "models")


def model_store_file(name, store):
    """Path of model ``name``'s ImageNet weights in ``store`` ('mxnet' or 'gluoncv'), downloaded if
    absent or if its sha1 differs from the store's (errors: those of the store's download)."""
    if store == "mxnet":
        from mxnet.gluon.model_zoo import model_store
    elif store == "gluoncv":
        from gluoncv.model_zoo import model_store
    else:
        raise ValueError("store: expected one of %s, got %r" % (", ".join(STORES), store))
    return model_store.get_model_file(name, root=model_store_root())


def describe(pretrained):
    """How a run definition's ``pretrained`` reads in a message: 'off', 'the model store' or the path."""
    if isinstance(pretrained, str):
        return pretrained
    return "the model store" if pretrained else "off"


def weights_file(name, pretrained, store):
    """The ``.params`` file of ``pretrained`` (True: the model store's, a str: that path) for
    model-zoo network ``name``; UserError when it is missing or cannot be fetched."""
    if isinstance(pretrained, str):
        path = os.path.abspath(os.path.expanduser(pretrained))
        if not os.path.isfile(path):
            raise UserError("--pretrained %s: no such file (expected the model zoo's .params file of %s)"
                            % (pretrained, name))
        return path
    try:
        return model_store_file(name, store)
    except Exception as err:  # a download failure surfaces as many error types
        first = str(err).splitlines()[0] if str(err) else ""
        raise UserError("--pretrained: could not load the model-zoo weights of %s (%s: %s); put them "
                        "in %s, give the file (--pretrained FILE) or train without --pretrained"
                        % (name, type(err).__name__, first, model_store_root()))


def _known_shapes(net, params):
    """structural name -> shape of ``net``'s parameters, the deferred (0) dimensions inferred
    symbolically when the network takes a 3×PROBE_SIZE×PROBE_SIZE input; nothing is computed."""
    shapes = {name: tuple(param.shape) for name, param in params.items()}
    if all(all(shapes[name]) for name in shapes) or not isinstance(net, mx.gluon.HybridBlock):
        return shapes
    try:
        out = net(mx.sym.var("data"))
        out = mx.sym.Group(list(out)) if isinstance(out, (list, tuple)) else out
        args, _, auxs = out.infer_shape_partial(data=(1, 3, PROBE_SIZE, PROBE_SIZE))
    except (MXNetError, TypeError, ValueError, AttributeError):
        return shapes
    inferred = dict(zip(out.list_arguments() + out.list_auxiliary_states(), args + auxs))
    for name, param in params.items():
        shape = inferred.get(param.name)
        if shape and all(shape) and len(shape) == len(shapes[name]):
            shapes[name] = tuple(shape)
    return shapes


def _file_layout(loaded, net):
    """The file's arrays by the network's structural names, and those names with shapes.

    Files of the older layout (full parameter names without the network's prefix, no '.')
    are matched the way ``Block.load_parameters`` reads them."""
    params = net._collect_params_with_prefix()
    if loaded and not any("." in key for key in loaded):
        by_full = {param.name[len(net.prefix):] if param.name.startswith(net.prefix) else param.name: name
                   for name, param in params.items()}
        loaded = {by_full.get(key, key): value for key, value in loaded.items()}
    return loaded, params


def check_weights_file(net, path, name, flag="--pretrained"):
    """UserError naming ``path`` and the first mismatch unless the file holds exactly ``net``'s
    parameters (names and shapes; a dimension the network has not inferred yet matches any).
    Returns {structural name: NDArray} of the file."""
    try:
        loaded = mx.nd.load(path)
    except MXNetError as err:
        raise UserError("%s %s: not an MXNet .params file (%s)"
                        % (flag, path, str(err).strip().splitlines()[0][:200]))
    if not isinstance(loaded, dict):
        raise UserError("%s %s: holds a list of %d arrays, expected named parameters (the model zoo's "
                        "layout, Block.save_parameters)" % (flag, path, len(loaded)))
    loaded, params = _file_layout(loaded, net)
    shapes = _known_shapes(net, params)
    for key, expected in shapes.items():
        if key not in loaded:
            raise UserError("%s %s: no parameter %r, which %s has (%s %s); expected the model zoo's "
                            "layout of %s (%d parameters, the file has %d)"
                            % (flag, path, key, name, key, expected, name, len(shapes), len(loaded)))
        theirs = tuple(loaded[key].shape)
        if len(theirs) != len(expected) or any(mine not in (0, other) for mine, other in zip(expected, theirs)):
            raise UserError("%s %s: parameter %r has shape %s, %s expects %s (weights of another network?)"
                            % (flag, path, key, theirs, name, expected))
    extra = sorted(set(loaded) - set(shapes))
    if extra:
        raise UserError("%s %s: holds %r, which %s has not (%d such names; weights of another network?)"
                        % (flag, path, extra[0], name, len(extra)))
    return loaded


def load_weights(net, name, pretrained, store, ctx=None):
    """Load ``pretrained`` (True: the model store's file, a str: that file) into ``net``, model-zoo
    network ``name`` of ``store``, on ``ctx`` (a context or a list; default cpu), after
    :func:`check_weights_file`. Returns the file's path."""
    path = weights_file(name, pretrained, store)
    check_weights_file(net, path, name)
    net.load_parameters(path, ctx=ctx or mx.cpu())
    return path
