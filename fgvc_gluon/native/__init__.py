"""Native CPU kernels, built on first use as MXNet extension libraries (``mx.library.load``).

One kernel today: ``s3n_bilinear_sampler`` (``bilinear_sampler.cc``), S3N's bilinear
sampling of N×C×H×W images at an N×2×H'×W' grid with OpenMP, because MXNet 1.9.1's CPU
``BilinearSampler`` runs on one thread and dominates S3N's map generation. Same formula as
``BilinearSampler`` (equal to float32 rounding, tests/test_native_sampler.py); CPU only (on GPUs MXNet's
own kernel is parallel and is used).

Build: ``g++ -shared -fPIC -O3 -fopenmp`` against the headers and ``src/lib_api.cc`` that
the mxnet wheel ships, into ``$FGVC_NATIVE_DIR`` (default ``~/.cache/imbalanced-attr-gluon/
native``), one file per (source, mxnet version, machine): about 20 s once, then loaded.
Concurrent builders (pytest-xdist workers) take a file lock; the library is written under a
temporary name and renamed, so a half-written file is never loaded. ``scripts/install.sh``
builds it (``python -m fgvc_gluon.native``). Without a C++ compiler, or with
``FGVC_NATIVE=0``, :func:`bilinear_sampler_available` is False and S3N uses
``BilinearSampler`` (the same numbers, slower on CPU).
"""
import fcntl
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile

import mxnet as mx

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bilinear_sampler.cc")
OP_NAME = "s3n_bilinear_sampler"
_state = {"loaded": None, "reason": None}


def cache_dir():
    """Where built libraries live: $FGVC_NATIVE_DIR or ~/.cache/imbalanced-attr-gluon/native."""
    return os.environ.get("FGVC_NATIVE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "imbalanced-attr-gluon", "native")


def _mxnet_dir():
    return os.path.dirname(os.path.abspath(mx.__file__))


def library_path():
    """The library file for this source, mxnet version and machine."""
    digest = hashlib.sha1()
    with open(SOURCE, "rb") as source:
        digest.update(source.read())
    digest.update(("%s %s %s" % (mx.__version__, platform.machine(), sys.version_info[:2])).encode())
    return os.path.join(cache_dir(), "libs3n_sampler-%s.so" % digest.hexdigest()[:16])


def build(path=None, compiler=None):
    """Compile the library to ``path`` (default :func:`library_path`); returns the path.

    Raises RuntimeError naming the compiler command and its output when the build fails.
    """
    path = path or library_path()
    compiler = compiler or os.environ.get("CXX") or "g++"
    if shutil.which(compiler) is None:
        raise RuntimeError("no C++ compiler %r on PATH (set CXX)" % compiler)
    mxnet_dir = _mxnet_dir()
    lib_api = os.path.join(mxnet_dir, "src", "lib_api.cc")
    include = os.path.join(mxnet_dir, "include")
    for needed in (lib_api, os.path.join(include, "mxnet", "lib_api.h")):
        if not os.path.isfile(needed):
            raise RuntimeError("the mxnet package has no %s (needed to build extension operators)" % needed)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".so.part")
    os.close(handle)
    command = [compiler, "-shared", "-fPIC", "-O3", "-fopenmp", "-std=c++11", "-I", include,
               SOURCE, lib_api, "-o", temporary]
    try:
        done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              universal_newlines=True)
        if done.returncode != 0:
            raise RuntimeError("%s failed (exit %d):\n%s" % (" ".join(command), done.returncode,
                                                             done.stdout[-4000:]))
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    return path


def bilinear_sampler_available():
    """True when ``mx.nd.s3n_bilinear_sampler`` / ``mx.sym.s3n_bilinear_sampler`` exist
    (built and loaded on the first call; never raises). :func:`unavailable_reason` says why not."""
    if _state["loaded"] is None:
        if os.environ.get("FGVC_NATIVE", "1") == "0":
            _state.update(loaded=False, reason="disabled by FGVC_NATIVE=0")
            return False
        try:
            path = library_path()
            if not os.path.isfile(path):
                os.makedirs(cache_dir(), exist_ok=True)
                with open(os.path.join(cache_dir(), ".build.lock"), "w") as lock:
                    fcntl.flock(lock, fcntl.LOCK_EX)       # another process may be building it
                    if not os.path.isfile(path):
                        build(path)
            mx.library.load(path, verbose=False)
            _state.update(loaded=hasattr(mx.nd, OP_NAME), reason=None)
            if not _state["loaded"]:
                _state["reason"] = "%s loaded but registered no %s operator" % (path, OP_NAME)
        except (OSError, RuntimeError, mx.base.MXNetError) as err:
            _state.update(loaded=False, reason=str(err).strip().splitlines()[0])
    return _state["loaded"]


def unavailable_reason():
    """Why :func:`bilinear_sampler_available` is False (None when it is True or not yet asked)."""
    return _state["reason"]


def main():
    """``python -m fgvc_gluon.native``: build and load the kernels, print where they are."""
    if bilinear_sampler_available():
        print("[native] %s: %s" % (OP_NAME, library_path()))
        return 0
    print("[native] %s unavailable (%s): S3N uses MXNet's BilinearSampler on CPU (slower)"
          % (OP_NAME, unavailable_reason()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
