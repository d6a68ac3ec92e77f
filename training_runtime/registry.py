"""Registries: methods, datasets and task families, found by name.

A model package registers what it offers; the runtime finds it here and
never imports the package by name:

- :class:`Registry`: name -> entry, with a clear error listing the choices;
- :class:`Knob`: one typed option of a method (its flag, type, default,
  help and range), from which the command line is generated;
- :class:`MethodEntry`: a method's build function, its knobs, its upstream
  recipe (the settings of the published code), whether upstream loads
  ImageNet weights, and its overrides for the embedded demo;
- :class:`DatasetEntry`: a reader, its default splits, whether it is the demo;
- :class:`TaskFamily`: what one training script trains (the attribute model,
  the fine-grained methods): its methods, datasets and label layout.

Families are discovered through the ``training_runtime.families`` entry
point group (``setup.py``), so ``python -m training_runtime.records`` can
pack any registered dataset without importing a model package itself.

Adding a method is one module plus one :meth:`Registry.register` call of a
:class:`MethodEntry` in it (see docs/ARCHITECTURE.md).
"""
import collections
import math
from importlib import metadata

ENTRY_POINT_GROUP = "training_runtime.families"


class Registry(object):
    """Ordered name -> entry; ``kind`` words the error of an unknown name."""

    def __init__(self, kind):
        self.kind = kind
        self._entries = collections.OrderedDict()

    def register(self, entry, name=None):
        """Add ``entry`` under ``name`` (default ``entry.name``); returns the entry
        (so it can decorate). A name registered twice is a ValueError."""
        name = name or entry.name
        if name in self._entries:
            raise ValueError("%s %r is registered twice" % (self.kind, name))
        self._entries[name] = entry
        return entry

    def get(self, name):
        if name not in self._entries:
            raise KeyError("unknown %s %r; expected one of %s" % (self.kind, name, ", ".join(self._entries)))
        return self._entries[name]

    def __contains__(self, name):
        return name in self._entries

    def __iter__(self):
        return iter(self._entries)

    def __len__(self):
        return len(self._entries)

    def names(self):
        return tuple(self._entries)

    def values(self):
        return tuple(self._entries.values())


def _range_error(value, minimum, maximum, allow_none):
    if value is None:
        return None if allow_none else "a value"
    if isinstance(value, float) and not math.isfinite(value):
        return "a finite number"
    if minimum is not None and value < minimum:
        return "at least %g" % minimum
    if maximum is not None and value > maximum:
        return "at most %g" % maximum
    return None


class Knob(object):
    """One typed option of a method.

    name: the option's name in the run definition and its flag (``--name``
    with ``_`` as ``-``); keyword: the build function's keyword (default
    ``name``); type: int, float, str or bool (bool knobs are on/off flags);
    default: the upstream value; choices: allowed values; minimum/maximum:
    inclusive range for numbers; allow_none: None is a valid value (e.g.
    "derive it"); help: one line for ``--help``.
    """

    def __init__(self, name, type, default, help, choices=None, minimum=None, maximum=None,
                 keyword=None, allow_none=False, none_flag_value=None):
        self.name, self.type, self.default, self.help = name, type, default, help
        self.choices, self.minimum, self.maximum = choices, minimum, maximum
        self.keyword = keyword or name
        self.allow_none = allow_none or default is None or none_flag_value is not None
        #: a flag value that means None (e.g. --smooth-ratio 1 = plain cross entropy)
        self.none_flag_value = none_flag_value

    @property
    def flag(self):
        return "--" + self.name.replace("_", "-")

    def check(self, value):
        """The value converted to the knob's type; ValueError naming what was expected."""
        if value is None or (self.none_flag_value is not None and value == self.none_flag_value):
            if self.allow_none:
                return None
            raise ValueError("%s: expected a value, got None" % self.flag)
        try:
            value = self.type(value)
        except (TypeError, ValueError):
            raise ValueError("%s: expected %s, got %r" % (self.flag, self.type.__name__, value))
        if self.choices is not None and value not in self.choices:
            raise ValueError("%s: expected one of %s, got %r"
                             % (self.flag, ", ".join(map(str, self.choices)), value))
        if self.type in (int, float):
            expected = _range_error(value, self.minimum, self.maximum, self.allow_none)
            if expected:
                raise ValueError("%s: expected %s, got %r" % (self.flag, expected, value))
        return value


class MethodEntry(object):
    """A registered method (see the module docstring).

    build: ``build(model_config, num_classes, ctx) -> TrainingTask`` where
    model_config is a :class:`training_runtime.config.ModelConfig` whose
    ``options`` hold every knob by name; recipe: dict of run-definition
    field name -> upstream value (backbone, image_size, lr, momentum, wd,
    batch_size, epochs, schedule, lr_steps, lr_factor, ...); demo: overrides
    of the recipe for the embedded demo data; pretrained: upstream loads
    ImageNet weights into the backbone; backbones: the accepted backbone
    names; summary: one line for ``--help``; foreign_weights: what other
    weight files the task's ``load_foreign_weights`` reads (None: none);
    backbone_recipes: backbone name -> the run-definition values (recipe
    fields, ``pretrained``) of the upstream script that trains that backbone,
    layered over ``recipe`` when a run uses it (e.g. MC-Loss's resnet50_mc:
    448 px, batch 64, cosine lr, ImageNet weights).
    """

    def __init__(self, name, build, knobs=(), recipe=None, demo=None, pretrained=False,
                 backbones=(), summary="", foreign_weights=None, backbone_recipes=None):
        self.foreign_weights = foreign_weights
        self.backbone_recipes = {k: dict(v) for k, v in (backbone_recipes or {}).items()}
        unknown = sorted(set(self.backbone_recipes) - set(backbones))
        if unknown:
            raise ValueError("method %s: backbone_recipes for unknown backbones %s" % (name, unknown))
        self.name, self.build, self.knobs = name, build, tuple(knobs)
        self.recipe, self.demo = dict(recipe or {}), dict(demo or {})
        self.pretrained, self.backbones, self.summary = bool(pretrained), tuple(backbones), summary
        names = [k.name for k in self.knobs]
        if len(set(names)) != len(names):
            raise ValueError("method %s: knob names repeat: %s" % (name, names))

    def knob(self, name):
        for knob in self.knobs:
            if knob.name == name:
                return knob
        raise KeyError(name)

    def recipe_for(self, backbone):
        """The upstream values of a run with ``backbone``: ``pretrained``, the recipe, then the
        backbone's own recipe when it has one."""
        values = dict(pretrained=self.pretrained)
        values.update(self.recipe)
        values.update(self.backbone_recipes.get(backbone, {}))
        return values

    def default_options(self):
        return collections.OrderedDict((k.name, k.default) for k in self.knobs)


class DatasetEntry(object):
    """A registered dataset reader.

    reader: ``reader(data_dir, split, **opts) -> Dataset`` (opts: limit,
    skip_bad_images); splits: (train split, split evaluated every epoch,
    test split); demo: True for the embedded demo data (read without
    --data-dir); label_names: the labels when they are fixed by the dataset
    (e.g. WIDER's 14 attributes; None when they come from the files).
    """

    def __init__(self, name, reader, splits=("train", "val", "test"), demo=False, summary="",
                 label_names=None):
        self.name, self.reader, self.splits, self.demo, self.summary = name, reader, tuple(splits), demo, summary
        self.label_names = tuple(label_names) if label_names is not None else None


class TaskFamily(object):
    """What one training script trains.

    name: the label layout and records task ('attr': float attribute vectors,
    'fgvc': int classes); script: the script's name (checkpoints remember
    it); methods, datasets: :class:`Registry` objects; default_dataset: the
    dataset of a --data-dir run without --dataset; schedule: 'plateau' or
    'step' (the family's lr rule); actions: the family's own command-line
    actions besides train / --test / --predict, objects with
    ``add_arguments(group)``, ``requested(args)`` and ``run(family, args, given)``
    (e.g. the attribute family's ``--explain``).
    """

    def __init__(self, name, script, methods, datasets, default_dataset, description="", actions=()):
        self.actions = tuple(actions)
        self.name, self.script, self.methods, self.datasets = name, script, methods, datasets
        self.default_dataset, self.description = default_dataset, description

    @property
    def demo_dataset(self):
        for entry in self.datasets.values():
            if entry.demo:
                return entry.name
        return None


def families():
    """name -> TaskFamily of every installed family (entry point group
    ``training_runtime.families``)."""
    found = collections.OrderedDict()
    for point in sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda p: p.name):
        found[point.name] = point.load()
    return found


def family(name):
    """The installed family ``name``; KeyError listing the installed ones."""
    found = families()
    if name not in found:
        raise KeyError("no task family %r installed (found: %s; reinstall with pip install -e .)"
                       % (name, ", ".join(found) or "none"))
    return found[name]
