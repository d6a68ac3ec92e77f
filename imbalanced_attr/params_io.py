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

Gluon's ``save_parameters`` (what its deprecation warning points to, and what
the original's ``load_params`` also reads: a file with a ``.`` in any name is
taken as structural) names the parameters by position instead:

- heads: ``<child index>.<suffix>``, activations counted (``0.weight``,
  ``1.gamma``, ``3.weight``, … ``9.bias`` for fsr);
- the original's backbone ``SymbolBlock``: the same prefix-stripped names as
  ``save_params``; the model-zoo network it wraps (with the new output):
  ``features.0.weight``, …, ``output.weight``; our own ``TapBackbone``:
  ``to_tap2.0.weight``, …, ``output.weight``.

Both layouts are read (per file, the layout whose names the file holds);
``save_original_params(..., layout=)`` writes either.

File names: ``<stem>.params`` is used when present. Otherwise a ``.params``
file whose name holds exactly one expected stem (``joint_new_fsr_stage_2.params``,
as the original's training script names its saves; ``fsr_stage_2-0010.params``;
any ``<prefix><stem>.params``) is taken for that stem, and for the backbone
also the original script's ``joint_new_base_resNet.params`` (any name holding
``base_resnet`` / ``base_densenet``, case-insensitively). Two candidates for
one stem are refused with the file to rename.

Our blocks get other global names (prefixes and counters depend on what the
process built before), so the mapping is by structure: the zoo-relative
names of the zoo layers, and for the heads a walk over their layers.

Errors: the files are the boundary, so a missing, ambiguous, unreadable or
mismatching parameter file (and an unwritable directory) is a UserError naming
the file and the parameter. A damaged file is reported with MXNet's own last
error line; ``nd.save`` files carry no checksum, so damage inside array values
is found only where it makes a value non-finite.
"""
import os
import re
from collections import OrderedDict

import mxnet as mx
import numpy as np
from mxnet.base import MXNetError
from mxnet.gluon import nn

from training_runtime.checkpoint import replaced_atomically
from training_runtime.errors import UserError

from .backbones import TAP_BACKBONES

# the original's SymbolBlock named the new output layer after the zoo's 'dense0'
ORIGINAL_OUTPUT_NAME = "dense1"
# layer type → name hint Gluon gives it inside an nn.Sequential
_LAYER_HINTS = ((nn.Conv2D, "conv"), (nn.BatchNorm, "batchnorm"), (nn.Dense, "dense"))
#: the two layouts MXNet writes: Block.save_params (prefix-stripped global names)
#: and Block.save_parameters (structural names)
LAYOUTS = ("save_params", "save_parameters")
#: what the original training script calls the backbone file it saves
#: (``saved_models/joint_new_base_resNet.params``), by family
_BACKBONE_ALIASES = {"resnet": "base_resnet", "densenet": "base_densenet"}
# the original's training script saves as 'joint_new_' + stem (heads in attention_models/,
# the backbone in saved_models/)
_ORIGINAL_SAVE_PREFIX = "joint_new_"


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


def _zoo_structural_layout(backbone):
    """OrderedDict structural name of the model-zoo network (``features.0.weight``, …,
    ``output.weight``) → Parameter of a TapBackbone; None if no registered zoo
    network of its family has exactly its parameters."""
    ours = {p.name: p for p in backbone.collect_params().values()}
    output = OrderedDict(_local_params(backbone.output))
    zoo_names = set(ours) - set(p.name for p in output.values())
    for entry in (TAP_BACKBONES.get(name) for name in TAP_BACKBONES.names()):
        if entry.family != backbone.family:
            continue
        zoo = entry.make(prefix=backbone.zoo_prefix)  # parameters are not allocated
        structural = zoo._collect_params_with_prefix()
        features = OrderedDict((k, p) for k, p in structural.items() if not k.startswith("output."))
        if set(p.name for p in features.values()) != zoo_names:
            continue
        layout = OrderedDict((k, ours[p.name]) for k, p in features.items())
        for suffix, param in output.items():
            layout["output." + suffix] = param
        return layout
    return None


def _local_params(layer):
    """[(suffix, Parameter)] of one layer: 'weight', 'bias', 'gamma', …"""
    return [(p.name[len(layer.prefix):], p) for p in layer.collect_params().values()]


def _sequential_layouts(block):
    """{layout: OrderedDict name → Parameter} of a head built as a sequence of layers:
    save_params names (``conv0_weight``) and save_parameters names (``0.weight``)."""
    counters = {}
    by_hint, by_position = OrderedDict(), OrderedDict()
    for position, layer in enumerate(block._children.values()):
        hint = next((h for cls, h in _LAYER_HINTS if isinstance(layer, cls)), None)
        if hint is None:  # parameter-free layers (activations) get no counter in the files
            assert not list(layer.collect_params().keys()), layer
            continue
        index = counters.get(hint, 0)
        counters[hint] = index + 1
        for suffix, param in _local_params(layer):
            by_hint["%s%d_%s" % (hint, index, suffix)] = param
            by_position["%d.%s" % (position, suffix)] = param
    return {"save_params": by_hint, "save_parameters": by_position}


def _sequential_layout(block):
    """OrderedDict original (save_params) name → Parameter of a head."""
    return _sequential_layouts(block)["save_params"]


def original_layout(net, layout="save_params"):
    """OrderedDict file stem → OrderedDict(parameter name → Parameter) for an
    ``AttributeModel`` (stems as in ``net.blocks()``), with the names of
    ``layout``: 'save_params' (the original's files) or 'save_parameters'
    (what Gluon's save_parameters of the original's blocks writes; for the
    backbone's SymbolBlock these are the same names)."""
    if layout not in LAYOUTS:
        raise ValueError("layout: expected one of %s, got %r" % (", ".join(LAYOUTS), layout))
    result = OrderedDict()
    for stem, block in net.blocks().items():
        if stem.startswith("backbone_"):
            result[stem] = _backbone_layout(block)
        else:
            result[stem] = _sequential_layouts(block)[layout]
    return result


def _host_copy(param):
    """The parameter's value on the cpu, averaged over its devices (as save_params does)."""
    data = param.list_data()
    if len(data) == 1:
        return data[0] if data[0].context.device_type == "cpu" else data[0].copyto(mx.cpu())
    return mx.nd.add_n(*[d.copyto(mx.cpu()) for d in data]) / len(data)


def save_original_params(net, directory, layout="save_params"):
    """Write ``<stem>.params`` for every block of ``net`` into ``directory``, in
    the original's layout (``Block.save_params`` format, or with
    ``layout='save_parameters'`` the names Gluon's ``save_parameters`` of the
    original's blocks writes); each file atomically."""
    layouts = original_layout(net, layout)
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as err:
        raise UserError("%s: expected a writable directory for the parameter files (%s)"
                        % (directory, err))
    for stem, params in layouts.items():
        arrays = OrderedDict((name, _host_copy(p)) for name, p in params.items())
        path = os.path.join(directory, stem + ".params")
        with replaced_atomically(path) as tmp_path:
            mx.nd.save(tmp_path, arrays)


# ---------------------------------------------------------------------------- reading

_FRAME = re.compile(r"^(Traceback \(most recent call last\)|File \"|Stack trace|\[bt\]|\d+: |at )")


def _mxnet_reason(err):
    """MXNet's own last error line: the last non-empty line of the message that
    is not part of a stack trace (``File "…ndarray.cc", line 1860``, ``[bt] (0) …``)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    messages = [line for line in lines if not _FRAME.match(line)]
    line = messages[-1] if messages else (lines[-1] if lines else type(err).__name__)
    if line.startswith("MXNetError: "):
        line = line[len("MXNetError: "):]
    return line


def _read_params_file(path):
    try:
        loaded = mx.nd.load(path)
    except MXNetError as err:
        raise UserError("%s: expected an MXNet parameter file (nd.save format), could not read it (%s)"
                        % (path, _mxnet_reason(err)))
    except UnicodeDecodeError as err:
        raise UserError("%s: expected an MXNet parameter file (nd.save format), could not read it "
                        "(a parameter name is not UTF-8 text: %s)" % (path, err))
    except MemoryError:
        raise UserError("%s: expected an MXNet parameter file (nd.save format), could not read it "
                        "(an array header claims more memory than is available)" % path)
    if not isinstance(loaded, dict):
        raise UserError("%s: expected named arrays as written by save_params, got %d unnamed arrays"
                        % (path, len(loaded)))
    return loaded


def _candidate_layouts(stem, block, structural):
    """[build() -> OrderedDict name → Parameter (or None)] of the layouts a file for
    ``block`` may use: structural ones (save_parameters) or not (save_params)."""
    if not structural:
        if stem.startswith("backbone_"):
            return [lambda: _backbone_layout(block)]
        return [lambda: _sequential_layouts(block)["save_params"]]
    if stem.startswith("backbone_"):
        # the original's SymbolBlock writes prefix-stripped names with either function;
        # structural names come from the model-zoo network it wraps, or from our TapBackbone
        return [lambda: _zoo_structural_layout(block),
                lambda: OrderedDict(block._collect_params_with_prefix().items())]
    return [lambda: _sequential_layouts(block)["save_parameters"]]


def _match_layout(stem, block, names):
    """The layout (name → Parameter) of ``block`` that the file's ``names`` use:
    structural or not (Gluon's own test: a '.' in any name), then the one with
    the most names in common."""
    best = None
    for build in _candidate_layouts(stem, block, any("." in name for name in names)):
        layout = build()
        if layout is None:
            continue
        common = len(set(names) & set(layout))
        if best is None or common > best[0]:
            best = (common, layout)
    return best[1]


def _stem_pattern(stem):
    """``stem`` anywhere in a lower-case file name; a stem ending in a digit
    (``fsr_stage_2``) not followed by another digit."""
    return re.compile(re.escape(stem.lower()) + (r"(?![0-9])" if stem[-1].isdigit() else ""))


def _stems_in(filename, stems, aliases):
    """The expected stems whose name (or alias) ``filename`` holds (case-insensitively)."""
    lower = filename.lower()
    found = [stem for stem in stems if _stem_pattern(stem).search(lower)]
    for stem, alias in aliases.items():
        if stem not in found and _stem_pattern(alias).search(lower):
            found.append(stem)
    return found


def find_params_files(directory, stems, family=None):
    """OrderedDict stem → path of the file to load for each stem in ``directory``.

    ``<stem>.params`` first; otherwise the one ``.params`` file whose name holds
    exactly one expected stem (and for the backbone the original script's
    ``joint_new_base_resNet.params``). UserError for a missing stem (with what
    was found) and for two candidates (which file to rename to which)."""
    stems = list(stems)
    aliases = {}
    for stem in stems:
        if stem.startswith("backbone_"):
            alias = _BACKBONE_ALIASES.get(family or stem[len("backbone_"):])
            if alias:
                aliases[stem] = alias
    try:
        files = sorted(f for f in os.listdir(directory)
                       if f.endswith(".params") and os.path.isfile(os.path.join(directory, f)))
    except OSError as err:
        raise UserError("%s: expected a directory of parameter files (%s)" % (directory, err))
    candidates = OrderedDict((stem, []) for stem in stems)
    for name in files:
        held = _stems_in(name, stems, aliases)
        if len(held) == 1:
            candidates[held[0]].append(name)
    found = OrderedDict()
    for stem in stems:
        exact = stem + ".params"
        if exact in files:
            found[stem] = os.path.join(directory, exact)
        elif len(candidates[stem]) == 1:
            found[stem] = os.path.join(directory, candidates[stem][0])
        elif candidates[stem]:
            raise UserError("%s: several parameter files for %s (%s); expected one: rename the one "
                            "to load to %s" % (directory, stem, ", ".join(candidates[stem]), exact))
        else:
            raise UserError("%s: missing parameter file (expected %s in %s%s)"
                            % (os.path.join(directory, exact), ", ".join(s + ".params" for s in stems),
                               directory, _missing_hint(stem, files, stems, aliases)))
    return found


def _missing_hint(stem, files, stems, aliases):
    """What else the directory holds, for the missing-file message."""
    hints = []
    if stem.startswith("backbone_"):
        other = [f for f in files if "backbone_" in f.lower() and stem not in f.lower()]
        if other:
            hints.append("found %s: the model was built with another backbone family (--backbone)"
                         % ", ".join(other[:3]))
        if stem == "backbone_resnet" and any(f.lower().startswith(_ORIGINAL_SAVE_PREFIX) for f in files):
            hints.append("the original's training script saves the backbone separately, as "
                         "saved_models/%sbase_resNet.params: copy it here" % _ORIGINAL_SAVE_PREFIX)
    unmatched = [f for f in files if len(_stems_in(f, stems, aliases)) != 1]
    if unmatched:
        hints.append("not recognised: %s%s" % (", ".join(unmatched[:5]), " …" if len(unmatched) > 5 else ""))
    return "; " + "; ".join(hints) if hints else ""


def load_original_params(net, directory, ctx=None):
    """Load the original's files from ``directory`` into ``net`` (an AttributeModel).

    Every block of ``net.blocks()`` needs its file (see the module docstring
    for the accepted names), holding exactly the expected names of one of
    the two layouts with the expected shapes and finite floating-point values;
    otherwise a UserError names the file and the parameter. ``ctx`` (Context
    or list): where to place the parameters (default: where they are). Files
    are checked one at a time: a bad file leaves the blocks before it loaded.
    Returns OrderedDict stem → path of the file loaded.
    """
    blocks = net.blocks()
    paths = find_params_files(directory, blocks, family=net.backbone.family)
    for stem, block in blocks.items():
        path = paths[stem]
        loaded = _read_params_file(path)
        params = _match_layout(stem, block, list(loaded))
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
        for name in params:
            value = loaded[name]
            if not np.issubdtype(value.dtype, np.floating):
                raise UserError("%s: parameter %r holds %s values, expected floating point (damaged file?)"
                                % (path, name, np.dtype(value.dtype).name))
            if not np.all(np.isfinite(value.asnumpy())):
                raise UserError("%s: parameter %r holds non-finite values (damaged file, or saved "
                                "after training diverged)" % (path, name))
        for name, param in params.items():
            if ctx is not None:
                param.reset_ctx(ctx)
            param.set_data(loaded[name].astype(param.dtype, copy=False))
    return paths
