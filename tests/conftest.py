"""Test fixtures and the golden reference cases in tests/golden (see tests/golden/README.md).

The cases are loaded from ``tests/golden`` next to this file; the environment
variable ``GOLDEN_DIR`` points them elsewhere (unset or empty = the default).
Helpers shared by several test modules live in ``tests/helpers.py``.
"""
import json
import os

import numpy as np
import pytest

DEFAULT_GOLDEN_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden")
GOLDEN_DIR = os.path.abspath(os.environ.get("GOLDEN_DIR") or DEFAULT_GOLDEN_DIR)
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


def _golden_path(name=None):
    """Path of ``name`` in GOLDEN_DIR (the directory itself for None); a missing directory raises."""
    if not os.path.isdir(GOLDEN_DIR):
        raise FileNotFoundError(
            "golden cases not found: %s is not a directory (the default is %s; the GOLDEN_DIR "
            "environment variable overrides it)" % (GOLDEN_DIR, DEFAULT_GOLDEN_DIR))
    return GOLDEN_DIR if name is None else os.path.join(GOLDEN_DIR, name)


def golden_cases(prefix):
    """Sorted file names of the golden cases whose name starts with ``prefix``."""
    return sorted(f for f in os.listdir(_golden_path()) if f.startswith(prefix) and f.endswith(".npz"))


def load_golden(name):
    """Load one case as a dict of numpy arrays."""
    with np.load(_golden_path(name), allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def golden_tolerance(case, array):
    """(rtol, atol) of ``array`` in ``case`` from MANIFEST.json; (0, 0) for exact."""
    entries = [c for c in _manifest()["cases"] if c["file"] == case]
    if not entries:
        raise KeyError("case %s is not in MANIFEST.json" % case)
    tol = entries[0]["arrays"][array].get("tolerance")
    if tol is None or tol == "exact":
        return 0.0, 0.0
    return float(tol.get("rtol", 0.0)), float(tol.get("atol", 0.0))


_MANIFEST = None


def _manifest():
    global _MANIFEST
    if _MANIFEST is None:
        with open(_golden_path("MANIFEST.json")) as f:
            _MANIFEST = json.load(f)
    return _MANIFEST


def assert_golden(actual, expected, rtol, atol, what=""):
    """Manifest rule: |a - e| <= atol + rtol*|e| elementwise, NaN==NaN, inf exact."""
    actual = np.asarray(actual.asnumpy() if hasattr(actual, "asnumpy") else actual)
    expected = np.asarray(expected)
    assert actual.shape == expected.shape, "%s: shape %s != %s" % (what, actual.shape, expected.shape)
    if rtol == 0 and atol == 0:
        np.testing.assert_array_equal(actual, expected, err_msg=what)
    else:
        assert np.allclose(actual, expected, rtol=rtol, atol=atol, equal_nan=True), (
            "%s: max abs diff %g (rtol %g, atol %g)" % (
                what, np.nanmax(np.abs(actual.astype(np.float64) - expected)), rtol, atol))


@pytest.fixture(scope="session")
def fashion_mnist_dir():
    if not os.path.isfile(os.path.join(FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz")):
        pytest.fail("Fashion-MNIST demo data missing in %s: run `bash scripts/install.sh --test`"
                    % FASHION_MNIST_DIR)
    return FASHION_MNIST_DIR
