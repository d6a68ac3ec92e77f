"""DataLoader settings for the run's devices.

:func:`pinning`: the loaders' ``pin_memory`` / ``pin_device_id`` for the
run's contexts: batches are copied into page-locked host memory when the
contexts are GPUs (the host-to-device copies of ``split_and_load`` are then
DMA transfers that need no staging copy), never on CPU contexts.
"""


def pinning(ctx):
    """``{"pin_memory", "pin_device_id"}`` for a DataLoader feeding ``ctx`` (a list of
    contexts): pinned memory on the first GPU's id when the contexts are GPUs."""
    gpus = [c for c in ctx if c.device_type == "gpu"]
    return {"pin_memory": bool(gpus), "pin_device_id": gpus[0].device_id if gpus else 0}
