"""Which GPUs the installed MXNet can run: the wheel's CUDA architectures against each GPU's.

A CUDA binary holds machine code (cubins) for a list of architectures and, optionally,
PTX that the driver can compile for newer ones. A cubin for sm_XY runs on sm_XZ with
Z >= Y (same major X) and on nothing else. The official MXNet 1.9.1 GPU wheels carry
cubins only, no PTX (``MXNET_CUDA_ARCH`` of apache/mxnet ``config/distribution/linux_cu*.cmake``;
:data:`WHEEL_ARCHS`), so a GPU whose major version has no cubin at or below its minor
fails at the first kernel with ``no kernel image is available for execution on the
device``: with ``mxnet-cu112`` .. ``cu117`` (sm_50, 60, 70, 80, 86) a T4 (sm_75) runs the
sm_70 code, an L4 / RTX 40 (sm_89) the sm_86 code, an H100 (sm_90) or a Blackwell GPU
(sm_100, sm_120) nothing.

- :func:`installed_build`: the installed MXNet distribution's name, version, CUDA or not;
- :func:`wheel_architectures`: the sm list of that distribution (None: unknown, e.g.
  a source build; ``TRAINING_RUNTIME_GPU_ARCHS=80,90`` declares a custom build's list);
- :func:`query_devices`: every visible GPU's name, compute capability and memory (CUDA
  driver API through ctypes, else ``nvidia-smi``); the one place tests fake;
- :func:`runnable`: whether cubins for ``archs`` run on capability ``(major, minor)``;
- :func:`check_gpus`: the ``--gpus`` check (:func:`training_runtime.cli.contexts`):
  a one-line UserError for a GPU the wheel has no kernels for.
"""
import ctypes
import os
import shutil
import subprocess
from importlib import metadata

import mxnet as mx

from .errors import UserError

#: distribution name -> sm architectures of its cubins (no PTX); () = a CPU build.
#: Read from apache/mxnet config/distribution/linux_cu*.cmake (MXNET_CUDA_ARCH), not measured.
WHEEL_ARCHS = {"mxnet": (), "mxnet-mkl": (), "mxnet-native": ()}
WHEEL_ARCHS.update({"mxnet-cu10%d" % v: (30, 50, 60, 70, 75) for v in (1, 2)})
WHEEL_ARCHS["mxnet-cu110"] = (50, 60, 70, 80)
WHEEL_ARCHS.update({"mxnet-cu11%d" % v: (50, 60, 70, 80, 86) for v in range(2, 8)})
ARCHS_ENV = "TRAINING_RUNTIME_GPU_ARCHS"


def installed_wheel():
    """(distribution name, version) of the installed MXNet, or (None, None)."""
    for dist in metadata.distributions():
        name = (dist.metadata.get("Name") or "").lower().replace("_", "-")
        if name == "mxnet" or name.startswith("mxnet-"):
            if name in WHEEL_ARCHS or name.startswith("mxnet-cu"):
                return name, dist.version
    return None, None


def installed_build():
    """(distribution name, version, CUDA compiled in) of the installed MXNet. Tests replace it."""
    name, version = installed_wheel()
    return name, version, mx.runtime.Features().is_enabled("CUDA")


def parse_archs(text):
    """'50,60,8.6' -> (50, 60, 86); ValueError naming the env variable otherwise."""
    archs = []
    for item in text.replace(";", ",").split(","):
        item = item.strip().lower().replace("sm_", "")
        if not item:
            continue
        try:
            archs.append(int(round(float(item) * 10)) if "." in item else int(item))
        except ValueError:
            raise ValueError("%s: expected sm numbers like 70,80,86, got %r" % (ARCHS_ENV, text))
    return tuple(sorted(set(archs)))


def wheel_architectures(name, cuda=True):
    """The sm architectures (tuple of ints like 86) the MXNet build ``name`` has kernels for:
    () for a build without CUDA, None when unknown (a source build: no refusal).
    ``$TRAINING_RUNTIME_GPU_ARCHS`` overrides the table."""
    if os.environ.get(ARCHS_ENV, "").strip():
        return parse_archs(os.environ[ARCHS_ENV])
    if not cuda:
        return ()
    archs = WHEEL_ARCHS.get(name)
    return archs if archs else None  # a CUDA-enabled 'mxnet' is a source build


def runnable(capability, archs):
    """True when cubins for ``archs`` run on a GPU of ``capability`` (major, minor): one of
    the same major at or below its minor. ``archs`` None (unknown) counts as runnable."""
    if archs is None:
        return True
    major, minor = capability
    return any(a // 10 == major and a % 10 <= minor for a in archs)


def sm(capability):
    return "sm_%d%d" % tuple(capability)


# ------------------------------------------------------------------ capability query

def _driver_devices():
    """Via libcuda (the driver API: present wherever an NVIDIA driver is; no CUDA toolkit
    needed); same device order and CUDA_VISIBLE_DEVICES as MXNet. None if unavailable."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    if lib.cuInit(0) != 0:
        return None
    count = ctypes.c_int()
    if lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return None
    devices = []
    for i in range(count.value):
        device, major, minor = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
        name, memory = ctypes.create_string_buffer(256), ctypes.c_size_t()
        if lib.cuDeviceGet(ctypes.byref(device), i) != 0:
            return None
        lib.cuDeviceGetName(name, 256, device)
        lib.cuDeviceGetAttribute(ctypes.byref(major), 75, device)  # COMPUTE_CAPABILITY_MAJOR
        lib.cuDeviceGetAttribute(ctypes.byref(minor), 76, device)  # COMPUTE_CAPABILITY_MINOR
        lib.cuDeviceTotalMem_v2(ctypes.byref(memory), device)
        devices.append({"index": i, "name": name.value.decode(errors="replace"),
                        "capability": (major.value, minor.value), "memory_mb": memory.value // 2 ** 20})
    return devices


def _smi_devices():
    """Via ``nvidia-smi`` (PCI bus order: may differ from CUDA's unless
    CUDA_DEVICE_ORDER=PCI_BUS_ID); None if unavailable or too old for compute_cap."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index,name,compute_cap,memory.total",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    devices = []
    for line in out.stdout.strip().splitlines():
        index, name, cap, memory = [p.strip() for p in line.split(",")]
        major, _, minor = cap.partition(".")
        devices.append({"index": int(index), "name": name, "capability": (int(major), int(minor)),
                        "memory_mb": int(float(memory))})
    return devices


def query_devices():
    """Every visible GPU as {index, name, capability (major, minor), memory_mb}; [] when
    none can be queried. Tests replace this function (monkeypatch)."""
    for query in (_driver_devices, _smi_devices):
        try:
            found = query()
        except (OSError, ValueError, AttributeError):
            found = None
        if found is not None:
            return found
    return []


def unsupported_message(device, wheel, archs):
    """The one line for a GPU the installed build has no kernels for."""
    return ("--gpus: GPU %d (%s, %s) has no kernels in the installed %s (built for %s, no PTX): "
            "MXNet would stop with 'no kernel image is available'; use a GPU of an architecture "
            "listed (or a newer minor of the same major), or an MXNet built for %s "
            "(see docs/GPU.md)" % (device["index"], device["name"], sm(device["capability"]),
                                   wheel, ", ".join("sm_%d" % a for a in archs) or "no GPU",
                                   sm(device["capability"])))


def check_gpus(ids):
    """UserError (one line) when a GPU of ``ids`` has no kernels in the installed build.

    Unknown (a source build, a GPU that cannot be queried) passes: only a certain
    mismatch is refused, before any work."""
    name, version, cuda = installed_build()
    archs = wheel_architectures(name, cuda)
    if archs is None:
        return
    devices = {d["index"]: d for d in query_devices()}
    for i in ids:
        device = devices.get(i)
        if device is not None and not runnable(device["capability"], archs):
            wheel = "%s %s" % (name, version) if name else "MXNet build"
            raise UserError(unsupported_message(device, wheel, archs))
