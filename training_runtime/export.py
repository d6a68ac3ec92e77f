"""Export a trained model for use without this package (and without MXNet).

    python -m training_runtime.export RUN --format mxnet|onnx --output PATH

RUN is a run directory (its best, else last checkpoint) or a checkpoint file.
The task is rebuilt from the checkpoint's run definition exactly as ``--test``
and ``--predict`` do (:mod:`training_runtime.app`), on the CPU, and its
inference network is taken from the task contract
(``TrainingTask.inference_block(epoch)``: a HybridBlock mapping a normalised
N×3×S×S float32 batch to the main output of ``predict``, N×K).

- ``--format mxnet``: ``PATH-symbol.json`` + ``PATH-0000.params``
  (``HybridBlock.export``; load with ``mx.gluon.SymbolBlock.imports``);
- ``--format onnx``: ``PATH.onnx`` through ``mx.onnx.export_model`` (dynamic
  batch), with this package's translations of the operators mx.onnx lacks
  (:mod:`training_runtime.onnx_ops`: ``BilinearSampler`` -> ``GridSample``, the
  element-wise comparisons), at the lowest opset from 13 to 16 that holds the
  graph (16 when it samples with ``BilinearSampler``: S3N). When an operator
  has no translation at all, the error names every such operator; the task's
  ``inference_subnetwork`` (if any) is exported instead as ``PATH-<name>.onnx``
  and the sidecar records what is missing.

Either way ``PATH.json`` (the sidecar) documents the preprocessing and the
output: input size, layout NCHW, channel order, resize, mean/std (or the
original's 0-255 minus (104, 117, 123)), output name, activation and labels
(attribute or class names), the checkpoint and epoch it came from, and
whether the graph is deterministic (``random_operators`` lists the operators
that draw random numbers otherwise: S3N's evaluation mode of epochs <= 20).

The runtime stays model-agnostic: it only calls the contract's hooks.
"""
import argparse
import contextlib
import io
import json
import logging
import os
import sys

import mxnet as mx
import numpy as np

from . import app, checkpoint, cli, onnx_ops, registry
from .errors import UserError, writing

#: the ONNX opsets written: the lowest one that holds the graph, from mx.onnx's newest
#: translations (13) to GridSample's (16, :mod:`training_runtime.onnx_ops`)
ONNX_OPSET = 13
ONNX_MAX_OPSET = 16
#: ONNX operators whose outputs are random (the sidecar says the model is not deterministic)
ONNX_RANDOM_OPS = ("RandomUniform", "RandomUniformLike", "RandomNormal", "RandomNormalLike",
                   "Multinomial", "Bernoulli")
SIDECAR_FORMAT = "training_runtime-export-1"


class ExportError(UserError):
    """The model cannot be exported in the asked format (the message says why)."""


def _family_of(path, flag):
    record = checkpoint.read(path, flag)[0]
    script = record["meta"].get("script")
    for family in registry.families().values():
        if family.script == script:
            return family
    raise UserError("%s: %s is a checkpoint of %r, which no installed task family trains"
                    % (flag, path, script))


def load_task(run, flag="RUN"):
    """(task, config, label names, epoch, checkpoint path) of ``run`` on cpu(0)."""
    path = checkpoint.run_checkpoint(run)
    if path is None:
        if os.path.isdir(run):
            raise UserError("%s: %s holds neither %s nor %s (is it a run directory?)"
                            % (flag, run, checkpoint.BEST, checkpoint.LAST))
        raise UserError("%s: %s not found (expected a run directory or a .ckpt file)" % (flag, run))
    family = _family_of(path, flag)
    args = argparse.Namespace(test=path, weights=None)
    return app._inference_task(family, args, {"gpus": "", "cpus": 1}, flag, "test")


def inference_network(task, epoch):
    """The task's inference HybridBlock, hybridized; ExportError when it has none."""
    block = task.inference_block(epoch)
    if block is None:
        raise ExportError("RUN: the task %s has no inference_block (it cannot be exported)"
                          % type(task).__name__)
    block.hybridize()
    return block


def _operators(symbol):
    return set(node["op"] for node in json.loads(symbol.tojson())["nodes"] if node["op"] != "null")


def unsupported_operators(symbol, opset=None):
    """Sorted names of the operators of ``symbol`` that mx.onnx, with the translations of
    :mod:`training_runtime.onnx_ops`, cannot translate at ``opset`` (default ONNX_MAX_OPSET)."""
    from mxnet.onnx import get_operator_support
    onnx_ops.register()
    opset = ONNX_MAX_OPSET if opset is None else opset
    return sorted(_operators(symbol) - set(get_operator_support(opset)))


def graph_opset(symbol):
    """The lowest opset from ONNX_OPSET to ONNX_MAX_OPSET that translates every operator of
    ``symbol`` (None: none does)."""
    for opset in range(ONNX_OPSET, ONNX_MAX_OPSET + 1):
        if not unsupported_operators(symbol, opset):
            return opset
    return None


def random_operators(symbol):
    """Sorted names of the MXNet operators of ``symbol`` that draw random numbers."""
    return sorted(op for op in _operators(symbol)
                  if op.startswith(("_random_", "_sample_", "random_", "sample_")))


def export_mxnet(block, size, prefix):
    """``prefix``-symbol.json and ``prefix``-0000.params of ``block`` (one forward on a
    1×3×size×size zero batch builds the graph); returns the two paths."""
    block(mx.nd.zeros((1, 3, size, size)))
    with writing(prefix + "-symbol.json"):
        block.export(prefix, epoch=0)
    return prefix + "-symbol.json", prefix + "-0000.params"


def _strip_initializer_inputs(path, opset):
    """Parameters out of the graph inputs (one input left: the images), initializers no node
    reads dropped (mx.onnx leaves some, onnxruntime warns of them), ``opset`` declared."""
    import onnx
    model = onnx.load(path)
    used = set(name for node in model.graph.node for name in node.input)
    used.update(output.name for output in model.graph.output)
    kept = [init for init in model.graph.initializer if init.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    weights = set(init.name for init in model.graph.initializer)
    inputs = [i for i in model.graph.input if i.name not in weights and i.name in used]
    del model.graph.input[:]
    model.graph.input.extend(inputs)
    del model.opset_import[:]
    model.opset_import.extend([onnx.helper.make_opsetid("", opset)])
    onnx.checker.check_model(model)
    onnx.save(model, path)


class _DotNotice(logging.Filter):
    """Drops mx.onnx's notice on ``dot`` of inputs above 2-D (the parity tests check the numbers)."""

    def filter(self, record):
        return "Converting dot operator" not in record.getMessage()


class _checked_at_opset(object):
    """mx.onnx translates to opset 13 (its newest translations; ours up to 16) but validates
    the graph against the onnx package's newest opset, where e.g. ReduceMean's ``axes``
    attribute became an input (opset 18): the converter's check runs at ``opset`` while inside."""

    def __init__(self, opset):
        self.opset = opset

    def __enter__(self):
        import onnx.checker
        self.context = onnx.checker.DEFAULT_CONTEXT
        self.saved = dict(self.context.opset_imports)
        self.context.opset_imports = {"": self.opset}

    def __exit__(self, *exc):
        self.context.opset_imports = self.saved


def export_onnx(block, size, path):
    """``path`` (ONNX) of ``block`` at the lowest opset that holds it; returns that opset.
    ExportError naming the operators that have no translation (or the converter's own
    error)."""
    try:
        import onnx  # noqa: F401  (mx.onnx needs it)
    except ImportError:
        raise ExportError("--format onnx: the onnx package is not installed "
                          "(pip install -e '.[export]' or bash scripts/install.sh)")
    base = os.path.splitext(path)[0] + ".tmp-mxnet"
    symbol_file, params_file = export_mxnet(block, size, base)
    try:
        symbol = mx.sym.load(symbol_file)
        opset = graph_opset(symbol)
        if opset is None:
            missing = unsupported_operators(symbol)
            raise ExportError("--format onnx: mx.onnx (MXNet %s) has no ONNX translation (up to "
                              "opset %d) for the operator%s %s"
                              % (mx.__version__, ONNX_MAX_OPSET, "s" if len(missing) > 1 else "",
                                 ", ".join(missing)))
        loaded = mx.nd.load(params_file)
        params = {k.split(":", 1)[1]: v for k, v in loaded.items()} if loaded else {}  # [] when none
        partial = path + ".tmp"
        notice, root = _DotNotice(), logging.getLogger()
        root.addFilter(notice)
        try:
            # mx.onnx prints the names of some nodes it converts (_rdiv_scalar, ...): not ours to show
            with writing(path), _checked_at_opset(opset), contextlib.redirect_stdout(io.StringIO()):
                mx.onnx.export_model(symbol, params, [(1, 3, size, size)], np.float32, partial,
                                     dynamic=True, dynamic_input_shapes=[(None, 3, size, size)])
                _strip_initializer_inputs(partial, opset)
                os.replace(partial, path)
        except ExportError:
            raise
        except Exception as err:  # the converter's own error: name it
            raise ExportError("--format onnx: mx.onnx failed: %s: %s"
                              % (type(err).__name__, str(err).splitlines()[0] if str(err) else ""))
        finally:
            root.removeFilter(notice)
    finally:
        for name in (symbol_file, params_file, path + ".tmp"):
            if os.path.exists(name):
                os.remove(name)
    return opset


def onnx_random_operators(path):
    """Sorted ONNX operators of the model at ``path`` that draw random numbers."""
    import onnx
    return sorted(set(node.op_type for node in onnx.load(path).graph.node
                      if node.op_type in ONNX_RANDOM_OPS))


def sidecar(task, config, names, epoch, source, fmt, files):
    """The JSON-able sidecar: preprocessing, output and provenance."""
    info = dict(task.export_info())
    output = dict(info.pop("output", {}), labels=list(names), shape=["N", len(names)])
    inputs = dict(info.pop("input", {}))
    size = inputs.get("size", config.model.image_size)
    inputs.update(shape=["N", 3, size, size], name="data")
    return dict(info, format=SIDECAR_FORMAT, model_format=fmt, files=files, input=inputs,
                output=output, source={"checkpoint": os.path.abspath(source), "epoch": epoch,
                                       "method": config.model.method,
                                       "backbone": config.model.backbone,
                                       "dataset": config.data.dataset,
                                       # --ema: the exported weights are the moving average
                                       "ema": config.optim.ema})


def export(run, fmt, output, out=None):
    """Export ``run`` in ``fmt`` ('mxnet' or 'onnx') to ``output`` (a path prefix);
    returns the sidecar dict (also written to ``output``.json)."""
    out = sys.stdout if out is None else out
    if fmt not in ("mxnet", "onnx"):
        raise UserError("--format: expected mxnet or onnx, got %r" % (fmt,))
    prefix = output[:-len(".onnx")] if output.endswith(".onnx") else output
    directory = os.path.dirname(os.path.abspath(prefix))
    if not os.path.isdir(directory):
        raise UserError("--output: directory %s does not exist" % directory)
    task, config, names, epoch, source = load_task(run)
    block = inference_network(task, epoch)
    size = int(task.export_info().get("input", {}).get("size", config.model.image_size))
    onnx_info = None
    if fmt == "mxnet":
        files = [os.path.basename(f) for f in export_mxnet(block, size, prefix)]
        randoms = random_operators(mx.sym.load(prefix + "-symbol.json"))
    else:
        try:
            opset = export_onnx(block, size, prefix + ".onnx")
            files = [os.path.basename(prefix + ".onnx")]
            onnx_info = {"complete": True, "opset": opset}
        except ExportError as err:
            part = task.inference_subnetwork(epoch)
            if part is None:
                raise
            name, sub, description = part
            sub.hybridize()
            sub_path = "%s-%s.onnx" % (prefix, name)
            opset = export_onnx(sub, size, sub_path)
            files = [os.path.basename(sub_path)]
            onnx_info = {"complete": False, "opset": opset, "error": str(err),
                         "exported": name, "exported_meaning": description}
            print("warning: %s; exported %s instead: %s" % (err, sub_path, description), file=out)
        randoms = onnx_random_operators(os.path.join(directory, files[0]))
    info = sidecar(task, config, names, epoch, source, fmt, files)
    info["deterministic"] = not randoms
    if randoms:
        info["random_operators"] = randoms
        print("note: the exported graph draws random numbers (%s): its outputs vary from run to run"
              % ", ".join(randoms), file=out)
    if onnx_info is not None:
        info["onnx"] = onnx_info
        if not onnx_info["complete"]:
            info["output"] = dict(info["output"], name=onnx_info["exported"],
                                  meaning=onnx_info["exported_meaning"])
    app.write_json(prefix + ".json", info)
    print("exported %s (%s after epoch %d) as %s: %s, sidecar %s"
          % (source, config.model.method, epoch, fmt, ", ".join(files), prefix + ".json"), file=out)
    return info


def build_parser():
    parser = cli.make_parser(__doc__.strip().split("\n\n")[0],
                             epilog="\n\n".join(__doc__.strip().split("\n\n")[1:]),
                             prog="python -m training_runtime.export")
    parser.add_argument("run", metavar="RUN", help="run directory or checkpoint (.ckpt)")
    parser.add_argument("--format", choices=("mxnet", "onnx"), default="mxnet",
                        help="mxnet: symbol + params; onnx: one .onnx file (default mxnet)")
    parser.add_argument("--output", required=True, metavar="PATH",
                        help="path prefix of the exported files (PATH-symbol.json, PATH-0000.params "
                             "or PATH.onnx, and PATH.json)")
    parser.add_argument("--traceback", action="store_true", help="show the full stack of an error")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    return export(args.run, args.format, args.output)


if __name__ == "__main__":
    cli.run_main(main)
