"""ONNX translations of MXNet operators that mx.onnx (MXNet 1.9.1) lacks.

Registered with mx.onnx's own registry (``MXNetGraph.register``) by
:func:`register` (idempotent; :mod:`training_runtime.export` calls it before
it lists or converts operators), so ``mx.onnx.export_model`` and
``mx.onnx.get_operator_support`` know them. Generic MXNet operators, no model:

- ``BilinearSampler`` -> ``GridSample`` (opset 16). MXNet's sampler takes the
  grid N×2×H'×W' with channels (x, y) in [-1, 1], maps -1..1 onto the pixel
  centres 0..W-1 (``x_pix = (x + 1)(W - 1)/2``: ``align_corners=1``) and reads
  0 outside the image (``padding_mode='zeros'``); GridSample takes the same
  grid as N×H'×W'×2, hence one ``Transpose`` (tests/test_export.py checks
  both against MXNet inside and outside the image).
- the element-wise comparisons without broadcasting ``_greater``,
  ``_greater_equal``, ``_lesser``, ``_lesser_equal``, ``_equal``,
  ``_not_equal`` (what ``a > b`` of two Symbols gives) and the scalar ones
  mx.onnx lacks (``_greater_equal_scalar``, ``_lesser_equal_scalar``,
  ``_not_equal_scalar``): ONNX's comparison and a ``Cast`` back to the input's
  type (MXNet returns 0/1 in the input's dtype). Opset 12 (GreaterOrEqual and
  LessOrEqual), as mx.onnx's own broadcast comparisons.

:data:`OPSETS` gives each translation's opset: a graph using ``BilinearSampler``
needs opset 16 (the exporter picks the lowest opset that holds the graph).
"""
import numpy as np

#: MXNet operator -> the opset its translation here is registered at
OPSETS = {"BilinearSampler": 16}

# MXNet operator -> ONNX comparison (and whether the operator takes a scalar attribute)
_COMPARISONS = {
    "_greater": ("Greater", False), "_greater_equal": ("GreaterOrEqual", False),
    "_lesser": ("Less", False), "_lesser_equal": ("LessOrEqual", False),
    "_equal": ("Equal", False), "_not_equal": ("Equal", False),
    "_greater_equal_scalar": ("GreaterOrEqual", True),
    "_lesser_equal_scalar": ("LessOrEqual", True),
    "_not_equal_scalar": ("Equal", True),
}
for _name in _COMPARISONS:
    OPSETS[_name] = 12

_REGISTERED = []


def _inputs(node, kwargs):
    """(name, input tensor names, input numpy dtypes, attrs) of an mx.onnx graph node."""
    lookup = kwargs["outputs_lookup"]
    names = [lookup[i[0]][i[1]].name for i in node["inputs"]]
    dtypes = [lookup[i[0]][i[1]].dtype for i in node["inputs"]]
    return node["name"], names, dtypes, node.get("attrs", {})


def _comparison(mx_name):
    onnx_op, scalar = _COMPARISONS[mx_name]
    negate = mx_name.startswith("_not_equal")

    def convert(node, **kwargs):
        from onnx import helper
        name, inputs, dtypes, attrs = _inputs(node, kwargs)
        dtype = np.dtype(dtypes[0])
        dtype_t = helper.np_dtype_to_tensor_dtype(dtype)
        nodes = []
        if scalar:  # the scalar as a (1,) constant of the input's type (broadcast)
            value = np.array([float(attrs["scalar"])]).astype(dtype)
            nodes.append(helper.make_node("Constant", [], [name + "_rhs"],
                                          value=helper.make_tensor(name + "_scalar", dtype_t, [1],
                                                                   value.view(np.uint16)
                                                                   if dtype == np.float16 else value)))
            inputs = [inputs[0], name + "_rhs"]
        nodes.append(helper.make_node(onnx_op, inputs, [name + "_bool"]))
        result = name + "_bool"
        if negate:
            nodes.append(helper.make_node("Not", [result], [name + "_not"]))
            result = name + "_not"
        nodes.append(helper.make_node("Cast", [result], [name], to=dtype_t, name=name))
        return nodes
    convert.__name__ = "convert" + mx_name
    convert.__doc__ = "MXNet %s -> ONNX %s%s + Cast to the input's type." % (
        mx_name, "Not(%s)" % onnx_op if negate else onnx_op, " with a constant" if scalar else "")
    return convert


def convert_bilinear_sampler(node, **kwargs):
    """MXNet BilinearSampler(data N×C×H×W, grid N×2×H'×W') -> ONNX GridSample (opset 16) of
    the grid transposed to N×H'×W'×2: bilinear, align_corners=1, zero padding (module
    docstring). ``cudnn_off`` is a kernel choice; nothing else is an attribute."""
    from onnx import helper
    name, inputs, _, _ = _inputs(node, kwargs)
    return [helper.make_node("Transpose", [inputs[1]], [name + "_grid"], perm=[0, 2, 3, 1]),
            helper.make_node("GridSample", [inputs[0], name + "_grid"], [name], name=name,
                             mode="bilinear", padding_mode="zeros", align_corners=1)]


def register():
    """Register the translations with mx.onnx (once); needs the onnx package."""
    if _REGISTERED:
        return
    import onnx  # noqa: F401  (mx.onnx's register silently skips without it)
    from mxnet.onnx.mx2onnx._export_onnx import MXNetGraph
    import mxnet.onnx.mx2onnx._op_translations  # noqa: F401  (mx.onnx's own first: ours add to them)
    for mx_name in _COMPARISONS:
        MXNetGraph.register(mx_name, opset_version=OPSETS[mx_name])(_comparison(mx_name))
    MXNetGraph.register("BilinearSampler", opset_version=OPSETS["BilinearSampler"])(
        convert_bilinear_sampler)
    _REGISTERED.append(True)
