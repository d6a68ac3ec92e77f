"""Install the attribute model (imbalanced_attr), the fine-grained ports
(fgvc_gluon) and the shared training runtime (training_runtime).

The MXNet build is an extra so the same package serves CPU laptops and GPU
machines:  pip install -e '.[cpu]'  or  pip install -e '.[gpu]'.
"""
from setuptools import find_packages, setup

setup(
    name="imbalanced-attr-gluon",
    version="0.1.0",
    description=("Gluon ports of imbalanced attribute classification (ECCV 2018) "
                 "and of MC-Loss, S3N and center loss"),
    packages=find_packages(include=["imbalanced_attr*", "fgvc_gluon*", "training_runtime*"]),
    py_modules=["train_attr", "train_fgvc"],
    # the C++ source of the native CPU kernels, built on first use (fgvc_gluon.native)
    package_data={"fgvc_gluon": ["native/*.cc"]},
    python_requires=">=3.10",
    # the task families the runtime finds by name (training_runtime.registry.families)
    entry_points={"training_runtime.families": ["attr = imbalanced_attr.family:FAMILY",
                                                 "fgvc = fgvc_gluon.family:FAMILY"]},
    install_requires=[
        "gluoncv==0.10.5.post0",
        "numpy<1.24",          # mxnet 1.9.1 breaks on numpy >= 1.24
        # keep gluoncv's own dependencies on numpy 1.x releases
        "scipy<1.12",
        "opencv-python<4.9",
        "pandas<2.2",
        "matplotlib<3.9",
        "tqdm",
        "Pillow",
        "pyyaml",              # --config FILE.yaml (already required by gluoncv)
    ],
    extras_require={
        "cpu": ["mxnet==1.9.1"],
        "gpu": ["mxnet-cu112==1.9.1"],
        # scikit-learn is a test-only cross-check of our own AP code; 1.3.2 is the
        # version the golden cases were computed with.
        # python -m training_runtime.export --format onnx: mx.onnx (MXNet 1.9.1) needs onnx;
        # 1.14.1: Python 3.11 wheels and still onnx.mapping, which mx.onnx uses (see export.py)
        "export": ["onnx==1.14.1"],
        # onnxruntime runs the exported models in tests/test_export.py; 1.18.1 is the first
        # Python 3.11 release that accepts numpy 1.23 (1.15-1.17 require numpy >= 1.24.2)
        # pytest-xdist: the suite runs its test files on every core (pytest.ini), which
        # keeps it under 10 minutes on a 2-core machine
        "test": ["pytest", "pytest-xdist>=3.5", "scikit-learn==1.3.2", "onnx==1.14.1",
                 "onnxruntime==1.18.1"],
    },
)
