"""The fine-grained family's registries: its methods and its datasets.

Each method module (baseline, mcloss, s3n, center_loss) calls
:func:`register_method` once at its bottom; :mod:`fgvc_gluon.data`
registers the dataset readers; :mod:`fgvc_gluon.family` imports them all
and builds ``FAMILY`` (what train_fgvc.py and ``python -m
training_runtime.records --task fgvc`` use).

A registered method's ``build(model_config, label_names, ctx)`` calls the
module's ``build_method(num_classes, backbone=..., image_size=...,
pretrained=..., ctx=..., **knobs)`` (knob values by their ``keyword``) and
returns the :class:`fgvc_gluon.task.FGVCTask` (the runtime applies the BatchNorm mode and
hybridizes it).
"""
import inspect

from training_runtime.registry import MethodEntry, Registry

__all__ = ["METHODS", "DATASETS", "DEMO_COMMON", "register_method", "signature_defaults"]

METHODS = Registry("method")
DATASETS = Registry("dataset")

#: the embedded demo's settings shared by every method (Fashion-MNIST, CPU, minutes);
#: each method adds its own overrides (backbone, image_size, lr, ...)
DEMO_COMMON = dict(epochs=3, batch_size=32, schedule="step", lr_steps=[], lr_factor=0.1,
                   train_limit=3000, val_limit=1000, test_limit=2000)


def _copied(values):
    """A copy of ``values`` whose list values are copies too (recipes are module constants)."""
    return {key: list(value) if isinstance(value, list) else value for key, value in values.items()}


def signature_defaults(build_method):
    """keyword -> default of every keyword of ``build_method`` that has one."""
    return {name: p.default for name, p in inspect.signature(build_method).parameters.items()
            if p.default is not inspect.Parameter.empty}


def _builder(build_method, knobs):
    """``build(model_config, label_names, ctx)`` of a MethodEntry over ``build_method``."""
    names = {knob.name for knob in knobs}

    def build(model_config, label_names, ctx):
        unknown = sorted(set(model_config.options) - names)
        if unknown:
            raise ValueError("options: unknown knob(s) %s; expected some of %s"
                             % (", ".join(unknown), ", ".join(sorted(names)) or "none"))
        kwargs = {knob.keyword: model_config.options.get(knob.name, knob.default) for knob in knobs}
        for field in ("backbone", "image_size"):   # None: the method's own default
            value = getattr(model_config, field)
            if value is not None:
                kwargs[field] = value
        # False, True (the model store's ImageNet weights) or a weights file (training_runtime.pretrained)
        pretrained = model_config.pretrained if isinstance(model_config.pretrained, str) \
            else bool(model_config.pretrained)
        task = build_method(len(label_names), pretrained=pretrained, ctx=ctx,
                            **kwargs)
        task.class_names = tuple(label_names)  # the pictures name the classes
        return task

    build.__doc__ = ("Build %s.%s(len(label_names), ...) from a ModelConfig; returns the task."
                     % (build_method.__module__, build_method.__name__))
    return build


def register_method(name, build_method, knobs, recipe, demo, pretrained, backbones, summary,
                    backbone_recipes=None):
    """Register method ``name`` in :data:`METHODS`; returns its MethodEntry.

    build_method: ``build_method(num_classes, backbone=, image_size=, pretrained=,
    ctx=, **knob keywords) -> FGVCTask``; knobs: :class:`training_runtime.registry.Knob`
    specs (each ``keyword`` a keyword of build_method, each default its
    signature's); recipe: upstream run-definition values (backbone,
    image_size, lr, momentum, wd, batch_size, epochs, schedule, lr_steps,
    lr_factor); demo: the method's demo overrides, merged over
    :data:`DEMO_COMMON`; pretrained: upstream loads ImageNet weights;
    backbones: the names build_method accepts; summary: one line;
    backbone_recipes: backbone -> the values of another upstream script that
    trains that backbone (recipe fields, ``pretrained``), layered over
    ``recipe`` when a run uses it.
    """
    knobs = tuple(knobs)
    accepted = signature_defaults(build_method)
    for knob in knobs:
        if knob.keyword not in accepted:
            raise ValueError("method %s: knob %s: build_method has no keyword %r with a default"
                             % (name, knob.name, knob.keyword))
    entry = MethodEntry(name, _builder(build_method, knobs), knobs=knobs, recipe=_copied(recipe),
                        demo=_copied(dict(DEMO_COMMON, **demo)), pretrained=pretrained,
                        backbones=tuple(backbones), summary=summary,
                        backbone_recipes={k: _copied(v) for k, v in (backbone_recipes or {}).items()})
    entry.build_method = build_method
    return METHODS.register(entry)
