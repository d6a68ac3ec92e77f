"""The original's parameter files (SPEC §1.7).

The original saves each block with Gluon's ``save_params`` into one
directory: ``backbone_resnet.params`` (or ``backbone_densenet.params``),
``fconv_stage_N.params``, ``fatt_stage_N.params`` and ``fsr_stage_N.params``
for N = 2, 3, 4. ``save_params`` writes ``nd.save(file, {name: array})``
with the block prefix stripped from every parameter name, so the names are:

- backbone: the model-zoo names without the zoo prefix (``conv0_weight``,
  ``stage1_conv0_weight``, …) plus the new output layer ``dense1_weight``,
  ``dense1_bias``; in the order of the original's ``SymbolBlock``: the graph's
  arguments, then its auxiliary states (BN running statistics);
- heads (``nn.Sequential`` of layers in a fresh name scope): ``conv0_*``,
  ``batchnorm0_*``, ``conv1_*``, … , ``dense0_*`` in layer order.

Our blocks get other global names (prefixes and counters depend on what the
process built before), so the mapping is by structure: the zoo-relative
names of the zoo layers, and for the heads a walk over their layers.

Errors: the files are the boundary, so a missing, unreadable or mismatching
parameter file (and an unwritable directory) is a UserError naming the file
and the parameter.
"""
import os
from collections import OrderedDict

import mxnet as mx
from mxnet.base import MXNetError
from mxnet.gluon import nn

from training_runtime.checkpoint import replaced_atomically
from training_runtime.errors import UserError

# the original's SymbolBlock named the new output layer after the zoo's 'dense0'
ORIGINAL_OUTPUT_NAME = "dense1"
# layer type → name hint Gluon gives it inside an nn.Sequential
_LAYER_HINTS = ((nn.Conv2D, "conv"), (nn.BatchNorm, "batchnorm"), (nn.Dense, "dense"))


def _backbone_layout(backbone):
    """OrderedDict original name → Parameter of a TapBackbone."""
    by_name = backbone.collect_params()
    output_params = {p.name: local for local, p in _local_params(backbone.output)}
    graph = backbone(mx.sym.var("data"))
    graph = mx.sym.Group(list(graph))
    layout = OrderedDict()
    for name in graph.list_arguments() + graph.list_auxiliary_states():
        if name == "data":
            continue
        if name in output_params:
            original = "%s_%s" % (ORIGINAL_OUTPUT_NAME, output_params[name])
        else:
            assert name.startswith(backbone.zoo_prefix), name
            original = name[len(backbone.zoo_prefix):]
        layout[original] = by_name[name]
    return layout


def _local_params(layer):
    """[(suffix, Parameter)] of one layer: 'weight', 'bias', 'gamma', …"""
    return [(p.name[len(layer.prefix):], p) for p in layer.collect_params().values()]


def _sequential_layout(block):
    """OrderedDict original name → Parameter of a head built as a sequence of layers."""
    counters = {}
    layout = OrderedDict()
    for layer in block._children.values():
        hint = next((h for cls, h in _LAYER_HINTS if isinstance(layer, cls)), None)
        if hint is None:  # parameter-free layers (activations) get no counter in the files
            assert not list(layer.collect_params().keys()), layer
            continue
        index = counters.get(hint, 0)
        counters[hint] = index + 1
        for suffix, param in _local_params(layer):
            layout["%s%d_%s" % (hint, index, suffix)] = param
    return layout


def original_layout(net):
    """OrderedDict file stem → OrderedDict(original parameter name → Parameter)
    for an ``AttributeModel`` (stems as in ``net.blocks()``)."""
    layout = OrderedDict()
    for stem, block in net.blocks().items():
        if stem.startswith("backbone_"):
            layout[stem] = _backbone_layout(block)
        else:
            layout[stem] = _sequential_layout(block)
    return layout


def _host_copy(param):
    """The parameter's value on the cpu, averaged over its devices (as save_params does)."""
    data = param.list_data()
    if len(data) == 1:
        return data[0] if data[0].context.device_type == "cpu" else data[0].copyto(mx.cpu())
    return mx.nd.add_n(*[d.copyto(mx.cpu()) for d in data]) / len(data)


def save_original_params(net, directory):
    """Write ``<stem>.params`` for every block of ``net`` into ``directory``, in
    the original's layout (``Block.save_params`` format); each file atomically."""
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as err:
        raise UserError("%s: expected a writable directory for the parameter files (%s)"
                        % (directory, err))
    for stem, params in original_layout(net).items():
        arrays = OrderedDict((name, _host_copy(p)) for name, p in params.items())
        path = os.path.join(directory, stem + ".params")
        with replaced_atomically(path) as tmp_path:
            mx.nd.save(tmp_path, arrays)


def _read_params_file(path):
    try:
        loaded = mx.nd.load(path)
    except MXNetError as err:
        raise UserError("%s: expected an MXNet parameter file (nd.save format), could not read it (%s)"
                        % (path, str(err).strip().splitlines()[0]))
    if not isinstance(loaded, dict):
        raise UserError("%s: expected named arrays as written by save_params, got %d unnamed arrays"
                        % (path, len(loaded)))
    return loaded


def load_original_params(net, directory, ctx=None):
    """Load the original's files from ``directory`` into ``net`` (an AttributeModel).

    Every file of ``net.blocks()`` must exist and hold exactly the expected
    names with the expected shapes; otherwise a UserError names the file and
    the parameter. ``ctx`` (Context or list): where to place the parameters
    (default: where they are). Files are checked one at a time: a bad file
    leaves the blocks before it loaded.
    """
    layout = original_layout(net)
    paths = OrderedDict((stem, os.path.join(directory, stem + ".params")) for stem in layout)
    for path in paths.values():
        if not os.path.isfile(path):
            raise UserError("%s: missing parameter file (expected %s in %s)"
                            % (path, ", ".join(os.path.basename(p) for p in paths.values()), directory))
    for stem, params in layout.items():
        path = paths[stem]
        loaded = _read_params_file(path)
        for name, param in params.items():
            if name not in loaded:
                raise UserError("%s: parameter %r missing (expected shape %s)" % (path, name, param.shape))
            if tuple(loaded[name].shape) != tuple(param.shape):
                raise UserError("%s: parameter %r has shape %s, expected %s"
                                % (path, name, tuple(loaded[name].shape), tuple(param.shape)))
        extra = sorted(set(loaded) - set(params))
        if extra:
            raise UserError("%s: unexpected parameter(s) %s for block %s (wrong backbone or file?)"
                            % (path, ", ".join(extra[:5]) + (" …" if len(extra) > 5 else ""), stem))
        for name, param in params.items():
            if ctx is not None:
                param.reset_ctx(ctx)
            param.set_data(loaded[name].astype(param.dtype, copy=False))
