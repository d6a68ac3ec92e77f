"""The typed run definition: everything that defines a training run.

:class:`RunConfig` = :class:`ModelConfig` (method, backbone, size, ImageNet
weights, the method's knobs) + :class:`DataConfig` (dataset, where it is,
splits, limits, loading) + :class:`OptimConfig` (optimizer, lr, momentum,
wd, epochs, lr rule) + :class:`RuntimeConfig` (batch, seed, devices,
BatchNorm mode, checkpointing, smoke-run limits).

- The command line is generated from these dataclasses and the family's
  registered methods (:func:`add_arguments`): one flag per field, with its
  help, type and choices; method knobs come from their :class:`Knob` specs.
- A run is resolved in layers (:func:`resolve`): field defaults <- the
  method's upstream recipe <- its demo overrides (on the embedded demo data)
  <- the flags given. Every value is validated here, before any work.
- Every checkpoint stores the resolved definition (``RunConfig.to_dict``);
  ``--resume``, ``--test`` and ``--predict`` rebuild the run from it
  (:func:`reconcile`): a flag that contradicts it is refused, except those
  marked ``resumable`` (lr, epochs, devices, checkpoint interval, ...),
  which a resume applies and reports.

Every field has a unique name, which is also its flag (``_`` -> ``-``) and
its key in the recipes.
"""
import argparse
import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Union

from .errors import UserError
from .records import packed_dataset_name


def _field(default, help, flag=None, choices=None, minimum=None, maximum=None, resumable=False,
           test=False, nargs=None, aliases=(), positive=False, below=None, metavar=None):
    """A dataclass field with its command-line metadata.

    resumable: may differ on --resume (applied and logged); test: may differ
    for --test / --predict (it does not change the model or its inputs);
    below: an exclusive upper bound.
    """
    meta = dict(help=help, flag=flag, choices=choices, minimum=minimum, maximum=maximum,
                resumable=resumable, test=test, nargs=nargs, aliases=tuple(aliases), positive=positive,
                below=below, metavar=metavar)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    """What network is trained: method, backbone, input size, weights, knobs."""
    method: Optional[str] = _field(None, "method of the family (see the recipes below)")
    backbone: Optional[str] = _field(None, "network (default: the method's upstream one; demo: small)")
    image_size: Optional[int] = _field(None, "network input side in pixels (default: the method's; "
                                             "a method may derive it from the backbone)", positive=True,
                                       aliases=("--input-size",))
    #: True: the model store's ImageNet weights; a str: the absolute path of a .params file in the
    #: model zoo's layout (training_runtime.pretrained); False / None: none
    pretrained: Optional[Union[bool, str]] = _field(
        None, "load ImageNet weights into the backbone: --pretrained alone = the model store's "
              "($MXNET_HOME/models, default ~/.mxnet/models; downloaded if absent), --pretrained FILE "
              "= that .params file of the model zoo's layout (offline machines; checked names and "
              "shapes); default: as upstream; never for the demo (docs/PRETRAINED.md)")
    #: the method's knobs by name (typed by its registered Knob specs)
    options: Dict[str, Any] = field(default_factory=dict)


@dataclass
class DataConfig:
    """Which data and how it is read."""
    dataset: Optional[str] = _field(None, "dataset (default: the embedded demo data without "
                                          "--data-dir / --records)", test=True)
    data_dir: Optional[str] = _field(None, "dataset root (default: the embedded demo data)",
                                     resumable=True, test=True)
    records: Optional[str] = _field(None, "read each split from DIR/<split>.rec/.idx/.json "
                                          "(packed by python -m training_runtime.records --out-dir DIR)",
                                    resumable=True, test=True)
    train_split: Optional[str] = _field(None, "split to train on (default: the dataset's)", test=True)
    val_split: Optional[str] = _field(None, "split evaluated after every epoch (default: the dataset's)",
                                      test=True)
    test_split: Optional[str] = _field(None, "split of the final test (default: the dataset's)", test=True)
    train_limit: Optional[int] = _field(None, "use the first N training images", positive=True, test=True)
    val_limit: Optional[int] = _field(None, "use the first N validation images", positive=True, test=True)
    test_limit: Optional[int] = _field(None, "use the first N test images", positive=True,
                                       resumable=True, test=True)
    skip_bad_images: bool = _field(False, "drop missing/corrupt images (listed) instead of stopping",
                                   test=True)
    num_workers: int = _field(0, "data loading processes (results do not depend on it)", minimum=0,
                              resumable=True, test=True)


@dataclass
class OptimConfig:
    """How the parameters are updated (one Trainer per parameter group)."""
    optimizer: str = _field("sgd", "optimizer of every trainer", choices=("sgd", "nag"))
    lr: Optional[float] = _field(None, "base learning rate", positive=True, resumable=True)
    momentum: Optional[float] = _field(None, "momentum", minimum=0.0)
    wd: Optional[float] = _field(None, "weight decay", minimum=0.0)
    epochs: Optional[int] = _field(None, "number of epochs", positive=True, resumable=True)
    schedule: Optional[str] = _field(None, "lr rule: plateau (the attribute original's: /10 after 10 "
                                           "epochs without a better metric, at most 3 times), step "
                                           "(x --lr-factor at each --lr-steps epoch) or cosine (lr/2 x "
                                           "(cos(pi ((e+1) mod E) / E) + 1) at 0-based epoch e of "
                                           "E = --epochs)",
                                     choices=("plateau", "step", "cosine"))
    lr_steps: List[int] = _field([], "0-based epochs where the step rule multiplies the lr by "
                                     "--lr-factor", nargs="*", minimum=0)
    lr_factor: float = _field(0.1, "lr multiplier of the step rule", positive=True)
    ema: Optional[float] = _field(None, "keep an exponential moving average of the weights and "
                                        "BatchNorm statistics, ema = DECAY ema + (1 - DECAY) w after "
                                        "every step (e.g. 0.9998); evaluation, the final test, the "
                                        "checkpoints' --test / --predict / export use it "
                                        "(docs/EMA.md; default: off)",
                                  positive=True, below=1.0, metavar="DECAY")


@dataclass
class RuntimeConfig:
    """Where and how the steps run."""
    batch_size: Optional[int] = _field(None, "total batch size (split over the devices)", positive=True,
                                       test=True)
    seed: int = _field(0, "all randomness is a function of (seed, epoch, step)", minimum=0,
                       maximum=2 ** 31 - 1)
    gpus: str = _field("", "comma-separated GPU ids, e.g. 0,1 (default: CPU)", resumable=True, test=True)
    cpus: int = _field(1, "number of CPU contexts cpu(0..N-1) when no --gpus", positive=True,
                       resumable=True, test=True)
    batchnorm: str = _field("batch", "BatchNorm statistics in training: batch = per device (Gluon's "
                                     "usual data parallelism), sync = SyncBatchNorm over the devices "
                                     "(GPUs), frozen = running statistics only (exact across any "
                                     "device split)", choices=("batch", "sync", "frozen"), test=True)
    kvstore: str = _field("device", "gradient reduction: device / local = Gluon's kvstore over this "
                                    "process's devices; dist_sync / dist_device_sync = MXNet's parameter "
                                    "server over the processes of python -m training_runtime.launch "
                                    "(--batch-size is then per worker)",
                          choices=("device", "local", "dist_sync", "dist_device_sync", "dist_async"),
                          resumable=True, test=True)
    checkpoint_every: int = _field(0, "also save the last checkpoint every N steps (0: each epoch)",
                                   minimum=0, resumable=True)
    max_steps: int = _field(0, "stop after N training steps in total (smoke runs; 0: no limit); "
                               "still evaluates and writes a checkpoint", minimum=0, resumable=True)
    picture_images: Optional[int] = _field(None, "validation images the method's pictures show after "
                                                 "each evaluation, in RUN/pictures (default: the "
                                                 "method's own number; 0: no pictures)", minimum=0,
                                           resumable=True, test=True)
    figures: str = _field("all", "figures a run draws: all = curves.png after every evaluation and the "
                                 "method's final-test figures; none = neither (smoke runs, tests)",
                          choices=("all", "none"), resumable=True, test=True)
    log_every: int = _field(20, "check the loss for NaN/inf and update the progress every K steps",
                            positive=True, resumable=True, test=True)
    tensorboard: bool = _field(False, "also write the logged steps' loss, lr and samples/s and every "
                                      "evaluation's metrics as TensorBoard scalars in RUN/tensorboard "
                                      "(tensorboard --logdir runs; docs/LOGGING.md)",
                               resumable=True, test=True)
    amp: bool = _field(False, "float16 mixed precision (mxnet.contrib.amp, one dynamic loss scale for "
                              "all trainers; GPUs only, refused on CPU): training_runtime.mixed_precision")


SECTIONS = (("model", ModelConfig), ("data", DataConfig), ("optim", OptimConfig),
            ("runtime", RuntimeConfig))


@dataclass
class RunConfig:
    """The whole run definition (see the module docstring)."""
    family: str
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data):
        """Inverse of :meth:`to_dict`; ValueError for a malformed dict."""
        if not isinstance(data, dict) or "family" not in data:
            raise ValueError("a run definition is a dict with 'family', got %r" % (type(data).__name__,))
        parts = {}
        for section, klass in SECTIONS:
            values = dict(data.get(section) or {})
            names = {f.name for f in dataclasses.fields(klass)}
            unknown = set(values) - names
            if unknown:
                raise ValueError("run definition section %s: unknown fields %s" % (section, sorted(unknown)))
            parts[section] = klass(**values)
        return cls(family=data["family"], **parts)

    def flat(self):
        """name -> value of every field and knob (the names the flags and recipes use)."""
        values = {}
        for section, _ in SECTIONS:
            part = getattr(self, section)
            for f in dataclasses.fields(part):
                if f.name == "options":
                    values.update(part.options)
                else:
                    values[f.name] = getattr(part, f.name)
        return values


def config_fields():
    """(section, dataclasses.Field) of every flag-backed field, in order."""
    for section, klass in SECTIONS:
        for f in dataclasses.fields(klass):
            if f.name != "options":
                yield section, f


def field_flag(f):
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _field_type(f):
    """The scalar type of a field: Optional[int] -> int, List[int] -> int."""
    kind = f.type
    while typing.get_args(kind):
        kind = [a for a in typing.get_args(kind) if a is not type(None)][0]
    return kind


def _add_bool(group, flag, dest, help_text):
    group.add_argument(flag, dest=dest, action="store_true", default=argparse.SUPPRESS, help=help_text)


def _metavar(name, kind):
    return {int: "N", float: "X"}.get(kind, name.split("_")[-1].upper())


def add_arguments(parser, family, method_flag=True):
    """Add one flag per run-definition field and per method knob of ``family``.

    Flags left out of the command line are absent from the parsed namespace
    (``argparse.SUPPRESS``), so :func:`given_values` tells what was given.
    """
    titles = {"model": "model", "data": "data", "optim": "optimisation", "runtime": "runtime"}
    groups = {section: parser.add_argument_group(title) for section, title in titles.items()}
    for section, f in config_fields():
        group, flag, meta = groups[section], field_flag(f), f.metadata
        if f.name == "method":
            if not method_flag:
                continue
            # no argparse choices: resolve() words the error in one line
            group.add_argument(flag, dest="method", metavar="{%s}" % ",".join(family.methods),
                               default=argparse.SUPPRESS,
                               help="%s (default %s)" % (meta["help"], family.methods.names()[0]))
            continue
        if f.name == "dataset":
            group.add_argument(flag, dest="dataset", choices=family.datasets.names(),
                               default=argparse.SUPPRESS, help="%s; with --data-dir the default is %s"
                               % (meta["help"], family.default_dataset))
            continue
        if f.name == "pretrained":
            group.add_argument("--pretrained", dest="pretrained", nargs="?", const=True, metavar="FILE",
                               type=pretrained_file_arg, default=argparse.SUPPRESS, help=meta["help"])
            group.add_argument("--no-pretrained", dest="pretrained", action="store_false",
                               default=argparse.SUPPRESS, help="train the backbone from scratch")
            continue
        kind = _field_type(f)
        if kind is bool:
            _add_bool(group, flag, f.name, meta["help"])
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = meta["help"] + ("" if default in (None, [], "") else " (default %s)" % (default,))
        group.add_argument(flag, *meta["aliases"], dest=f.name, type=kind, choices=meta["choices"],
                           nargs=meta["nargs"], default=argparse.SUPPRESS, help=help_text,
                           metavar=None if meta["choices"] else meta.get("metavar") or _metavar(f.name, kind))
    _add_knob_arguments(parser, family)
    return parser


def _add_knob_arguments(parser, family):
    """One flag per knob name; a knob several methods share gets one flag."""
    by_name = {}
    for entry in family.methods.values():
        for knob in entry.knobs:
            by_name.setdefault(knob.name, []).append((entry, knob))
    if not by_name:
        return
    several = len(family.methods) > 1
    group = parser.add_argument_group("method knobs (default: the method's upstream value)"
                                      if several else "%s knobs" % family.methods.names()[0])
    for name, owners in by_name.items():
        knob = owners[0][1]
        where = ""
        if several:
            where = "%s: " % ", ".join(entry.name for entry, _ in owners)
        defaults = "; ".join("%s%s" % ("%s " % entry.name if several else "", k.default)
                             for entry, k in owners)
        help_text = "%s%s (default %s)" % (where, knob.help, defaults)
        if knob.type is bool:
            _add_bool(group, knob.flag, name, where + knob.help)
        else:
            group.add_argument(knob.flag, dest=name, type=knob.type, choices=knob.choices,
                               default=argparse.SUPPRESS, help=help_text,
                               metavar=None if knob.choices else _metavar(name, knob.type))


def pretrained_file_arg(text):
    """``--pretrained FILE``: the file's absolute path (the run definition does not depend on the
    directory a run, a resume or a test is started from; existence is checked when it is loaded)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected the path of a .params file, got an empty string")
    return os.path.abspath(os.path.expanduser(text))


def knob_names(family):
    return {knob.name for entry in family.methods.values() for knob in entry.knobs}


def given_values(namespace, family):
    """name -> value of the run-definition flags and knobs present on the command line."""
    names = {f.name for _, f in config_fields()} | knob_names(family)
    return {k: v for k, v in vars(namespace).items() if k in names}


# ---------------------------------------------------------------------------- resolution

def _flag(name):
    return "--" + name.replace("_", "-")


def _check_field(f, value):
    """UserError for a value outside the field's range or choices."""
    meta = f.metadata
    if value is None:
        return
    values = value if isinstance(value, list) else [value]
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if isinstance(v, float) and not math.isfinite(v):
            raise UserError("%s: expected a finite number, got %r" % (field_flag(f), v))
        if meta["positive"] and not v > 0:
            raise UserError("%s: expected a positive number, got %r" % (field_flag(f), v))
        if meta["minimum"] is not None and v < meta["minimum"]:
            raise UserError("%s: expected at least %g, got %r" % (field_flag(f), meta["minimum"], v))
        if meta["maximum"] is not None and v > meta["maximum"]:
            raise UserError("%s: expected at most %g, got %r" % (field_flag(f), meta["maximum"], v))
        if meta.get("below") is not None and not v < meta["below"]:
            raise UserError("%s: expected less than %g, got %r" % (field_flag(f), meta["below"], v))
    if meta["choices"] is not None and value not in meta["choices"]:
        raise UserError("%s: expected one of %s, got %r" % (field_flag(f), ", ".join(meta["choices"]), value))


def is_demo(family, dataset):
    return dataset in family.datasets and family.datasets.get(dataset).demo


def default_dataset(family, given):
    """The dataset of a run: --dataset, else the packed records', else the
    family's default with --data-dir, else the embedded demo data."""
    if given.get("dataset"):
        return given["dataset"]
    if given.get("records"):
        return packed_dataset_name(given["records"], family.name)
    return family.default_dataset if given.get("data_dir") else family.demo_dataset


def resolve(family, given):
    """The RunConfig of a new run: field defaults <- the method's recipe (with the
    run's backbone's own recipe over it, when it has one) <- its demo overrides
    (demo data only) <- ``given`` (name -> value). UserError naming the
    flag for any invalid value or combination."""
    if given.get("records") and given.get("data_dir"):
        raise UserError("--records and --data-dir: give one or the other (the records hold the images)")
    method = given.get("method") or family.methods.names()[0]
    if method not in family.methods:
        raise UserError("--method: expected one of %s, got %r" % (", ".join(family.methods), method))
    entry = family.methods.get(method)
    dataset = default_dataset(family, given)
    if dataset not in family.datasets:
        raise UserError("--dataset: expected one of %s, got %r" % (", ".join(family.datasets), dataset))
    foreign = sorted(set(given) & (knob_names(family) - {k.name for k in entry.knobs}))
    if foreign:
        owners = [e.name for e in family.methods.values() if any(k.name == foreign[0] for k in e.knobs)]
        raise UserError("%s: only for --method %s (this run is --method %s)"
                        % (_flag(foreign[0]), " or ".join(owners), method))
    demo = is_demo(family, dataset)
    # the backbone decides which upstream recipe applies (a method may have one per backbone)
    backbone = given.get("backbone") or (entry.demo.get("backbone") if demo else None) \
        or entry.recipe.get("backbone")
    layered = entry.recipe_for(backbone)
    if demo:
        layered.update(pretrained=False)
        layered.update(entry.demo)
    layered.update(given)
    layered.update(method=method, dataset=dataset)
    splits = family.datasets.get(dataset).splits
    for name, split in zip(("train_split", "val_split", "test_split"), splits):
        layered.setdefault(name, split)
        if layered[name] is None:
            layered[name] = split
    return build_config(family, entry, layered)


def build_config(family, entry, values):
    """RunConfig from flat ``values``; the knobs are checked by their specs."""
    config = RunConfig(family=family.name)
    for section, f in config_fields():
        if f.name in values:
            setattr(getattr(config, section), f.name, values[f.name])
    options = entry.default_options()
    for knob in entry.knobs:
        if knob.name in values:
            try:
                options[knob.name] = knob.check(values[knob.name])
            except ValueError as err:
                raise UserError(str(err))
    config.model.options = dict(options)
    validate(config)
    return config


def validate(config):
    """UserError for a missing or out-of-range value of any field."""
    for section, f in config_fields():
        value = getattr(getattr(config, section), f.name)
        if value is None and f.name in ("lr", "momentum", "wd", "epochs", "batch_size", "schedule",
                                        "backbone"):
            raise UserError("%s: no value (the method's recipe has none): give %s"
                            % (field_flag(f), field_flag(f)))
        _check_field(f, value)
    return config


def _same(a, b):
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return list(a) == list(b)
    return a == b


def reconcile(saved, given, family, purpose, source):
    """The run definition of ``--resume``/``--test``/``--predict``: ``saved`` (a
    RunConfig from a checkpoint) with the ``given`` flags that may change.

    purpose: 'resume' (fields marked resumable change and are reported),
    'test' (fields marked test change). A given flag that contradicts the
    saved definition otherwise is a UserError naming it and ``source``.
    Returns (config, changes) with changes a list of (name, old, new).
    """
    allowed_key = "resumable" if purpose == "resume" else "test"
    values = saved.flat()
    entry = family.methods.get(saved.model.method)
    fields = {f.name: f for _, f in config_fields()}
    changes = []
    for name, value in sorted(given.items()):
        old = values.get(name)
        if name not in values and name in knob_names(family):
            raise UserError("%s: only for other methods (%s trained --method %s)"
                            % (_flag(name), source, saved.model.method))
        if _same(old, value):
            continue
        if name in fields and fields[name].metadata[allowed_key]:
            changes.append((name, old, value))
            values[name] = value
            continue
        raise UserError("%s %s: %s was trained with %s %s; this setting cannot change for --%s "
                        "(start a new run instead)" % (_flag(name), _show(value), source, _flag(name),
                                                       _show(old), purpose))
    return build_config(family, entry, values), changes


def _show(value):
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value)) or "(none)"
    return str(value)


def describe_changes(changes):
    return ", ".join("%s %s -> %s" % (_flag(n), _show(a), _show(b)) for n, a, b in changes)
