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
  <- a ``--config FILE`` (:func:`read_config_file`: JSON or YAML fields, the
  sections ``--print-config`` writes, or a run's args.json) <- the flags
  given. Every value is validated here, before any work.
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
import difflib
import json
import math
import os
import re
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


def _check_field(f, value, label=None):
    """UserError for a value outside the field's range or choices; the message starts with
    ``label`` (default: the field's flag)."""
    meta = f.metadata
    if value is None:
        return
    if label is not None:
        try:
            return _check_field(f, value)
        except UserError as err:
            raise UserError(_relabel(str(err), field_flag(f), label))
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


def resolve(family, given, config_file=None):
    """The RunConfig of a new run: field defaults <- the method's recipe (with the
    run's backbone's own recipe over it, when it has one) <- its demo overrides
    (demo data only) <- ``config_file`` (a :class:`ConfigFile`, ``--config``) <-
    ``given`` (name -> value). UserError naming the flag (or the file and its
    field) for any invalid value or combination."""
    if config_file is not None:
        given = config_file.under(family, given)
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


#: fields every resolved run has a value of (the recipes give them)
REQUIRED_FIELDS = ("lr", "momentum", "wd", "epochs", "batch_size", "schedule", "backbone")


def validate(config):
    """UserError for a missing or out-of-range value of any field."""
    for section, f in config_fields():
        value = getattr(getattr(config, section), f.name)
        if value is None and f.name in REQUIRED_FIELDS:
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


# ---------------------------------------------------------------------------- config files

SECTION_NAMES = tuple(name for name, _ in SECTIONS)
_KINDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
_BAD = object()


def _json(value):
    """``value`` as the file would spell it (JSON; repr for what JSON cannot hold, e.g. YAML dates)."""
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


def _relabel(message, flag, label):
    """``message`` of ``flag`` ("--lr: expected ...") with ``label`` in place of the flag."""
    if message.startswith(flag + ":"):
        return label + message[len(flag):]
    return "%s: %s" % (label, message)


def _typed(kind, value):
    """``value`` as a ``kind`` (int, float, str, bool) when it is one (an int is a float), else _BAD.
    Strict: no conversion of strings or of true/false to numbers."""
    if isinstance(value, bool):
        return value if kind is bool else _BAD
    if kind is float and isinstance(value, (int, float)):
        return float(value)
    return value if isinstance(value, kind) else _BAD


def _optional(f):
    return type(None) in typing.get_args(f.type)


def _file_field(family, f, value, label):
    """The value of field ``f`` read from a file: type-checked as the flag's, range-checked."""
    if value is None:
        if not _optional(f) or f.name in REQUIRED_FIELDS:
            raise UserError("%s: expected %s, got null (leave the field out for the default or the "
                            "method's recipe)" % (label, _expected(f)))
        return None
    if f.name == "pretrained":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip():
            return pretrained_file_arg(value)
        raise UserError("%s: expected true, false or the path of a .params file, got %s"
                        % (label, _json(value)))
    kind = _field_type(f)
    if f.metadata["nargs"]:
        items = [_typed(kind, v) for v in value] if isinstance(value, list) else [_BAD]
        if any(v is _BAD for v in items):
            raise UserError("%s: expected a list of %s, got %s" % (label, _expected(f, plural=True),
                                                                  _json(value)))
        value = items
    else:
        typed = _typed(kind, value)
        if typed is _BAD:
            raise UserError("%s: expected %s, got %s" % (label, _expected(f), _json(value)))
        value = typed
    for name, registry in (("method", family.methods), ("dataset", family.datasets)):
        if f.name == name and value not in registry:
            raise UserError("%s: expected one of %s, got %r" % (label, ", ".join(registry), value))
    _check_field(f, value, label)
    return value


def _expected(f, plural=False):
    kind = _field_type(f)
    if plural:
        return {int: "integers", float: "numbers"}.get(kind, "strings")
    return _KINDS.get(kind, kind.__name__)


#: names other trainers' files use (timm's args.yaml, ...) -> ours: suggested, never read as ours
PEER_NAMES = {"learning_rate": "lr", "weight_decay": "wd", "model": "backbone", "arch": "backbone",
              "img_size": "image_size", "opt": "optimizer", "sched": "schedule", "decay_epochs": "lr_steps",
              "decay_rate": "lr_factor", "workers": "num_workers", "num_epochs": "epochs",
              "batch": "batch_size", "model_ema_decay": "ema"}


def _closest(name, known):
    close = difflib.get_close_matches(name, sorted(known), n=3, cutoff=0.6)
    if PEER_NAMES.get(name) in known:
        close = [PEER_NAMES[name]] + [k for k in close if k != PEER_NAMES[name]][:2]
    if not close:  # a name that shares a word with ours
        words = set(name.split("_"))
        close = [k for k in sorted(known) if words & set(k.split("_"))][:3]
    return "closest: %s" % ", ".join(close) if close else "see --print-config for every field"


class ConfigFile(object):
    """The run-definition values of a ``--config`` file (:func:`read_config_file`).

    values: name -> value (field values checked; knob values checked against the
    run's method in :meth:`under`); where: name -> ``--config FILE: key`` (errors);
    source: 'file', or 'args.json' for a run's record.
    """

    def __init__(self, path, values, where, source):
        self.path, self.values, self.where, self.source = path, values, where, source

    def under(self, family, given):
        """The values of a run: this file's <- ``given`` (the flags). A flag --data-dir or
        --records replaces the file's data_dir and records both (one says where the data
        is). The file's knobs are checked against the run's method."""
        values = dict(self.values)
        if given.get("data_dir") or given.get("records"):
            values.pop("data_dir", None)
            values.pop("records", None)
        method = given.get("method") or values.get("method") or family.methods.names()[0]
        if method in family.methods:  # else resolve() refuses the flag
            entry = family.methods.get(method)
            mine = {k.name: k for k in entry.knobs}
            for name in sorted(set(values) & knob_names(family)):
                label = self.where[name]
                if name not in mine:
                    owners = [e.name for e in family.methods.values() if any(k.name == name for k in e.knobs)]
                    raise UserError("%s: a knob of --method %s (this run is --method %s)"
                                    % (label, " or ".join(owners), method))
                knob, value = mine[name], values[name]
                if value is not None and _typed(knob.type, value) is _BAD:
                    raise UserError("%s: expected %s, got %s" % (label, _KINDS.get(knob.type, "a value"),
                                                                _json(value)))
                try:
                    values[name] = knob.check(value)
                except ValueError as err:
                    raise UserError(_relabel(str(err), knob.flag, label))
        values.update(given)
        return values


class _YamlNumbers(object):
    """A PyYAML SafeLoader that also reads 1e-3 and 1.0e3 as floats (YAML 1.1, which PyYAML
    implements, reads them as strings: a classic trap for learning rates)."""

    loader = None

    @classmethod
    def get(cls, yaml):
        if cls.loader is None:
            class Loader(yaml.SafeLoader):
                pass
            Loader.add_implicit_resolver(
                "tag:yaml.org,2002:float",
                re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
                list("-+0123456789."))
            cls.loader = Loader
        return cls.loader


def _parse(text, path, label):
    """The file's top-level value: YAML for .yaml/.yml, else JSON (duplicate keys refused)."""
    if path.lower().endswith((".yaml", ".yml")):
        try:
            import yaml  # PyYAML: a dependency of gluoncv, declared in setup.py
        except ImportError:
            raise UserError("%s: reading YAML needs PyYAML (pip install pyyaml); or write the file as "
                            "JSON" % label)
        try:
            return yaml.load(text, Loader=_YamlNumbers.get(yaml))
        except yaml.YAMLError as err:
            raise UserError("%s: not valid YAML (%s)" % (label, " ".join(str(err).split())))

    def no_duplicates(pairs):
        keys = [k for k, _ in pairs]
        for key in keys:
            if keys.count(key) > 1:
                raise UserError("%s: key %r appears twice" % (label, key))
        return dict(pairs)
    try:
        return json.loads(text, object_pairs_hook=no_duplicates)
    except json.JSONDecodeError as err:
        raise UserError("%s: not valid JSON (line %d column %d: %s)%s"
                        % (label, err.lineno, err.colno, err.msg,
                           "; YAML files end in .yaml or .yml" if ":" in text and "{" not in text else ""))


def read_config_file(path, family):
    """The run-definition values of ``--config FILE``: a :class:`ConfigFile`.

    FILE is JSON (YAML when it ends in .yaml / .yml) holding an object of
    run-definition fields and knobs by name (``{"lr": 0.01, "epochs": 3}``;
    ``image-size`` and ``--image-size`` are read as ``image_size``), or nested
    by section as :meth:`RunConfig.to_dict` (``--print-config``) writes them
    (``{"family": ..., "model": {..., "options": {knobs}}, "data": {...}, ...}``),
    or a run's args.json (``{"script", "config", "argv"}``: its ``config``).
    Every value is checked as its flag's; UserError ``--config FILE: field: ...``
    naming the closest known names of an unknown one.
    """
    label = "--config %s" % path
    if not os.path.exists(path):
        raise UserError("%s: file not found" % label)
    if os.path.isdir(path):
        raise UserError("%s: is a directory; expected a JSON or YAML file (a run's definition is "
                        "RUN/args.json)" % label)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as err:
        raise UserError("%s: cannot read it (%s)" % (label, err))
    data = _parse(text, path, label)
    source = "file"
    if isinstance(data, dict) and "script" in data and "config" in data:  # a run's args.json
        if data["script"] != family.script:
            raise UserError("%s: the args.json of a %s run; this is %s" % (label, data["script"], family.script))
        data, source = data["config"], "args.json"
    if not isinstance(data, dict):
        raise UserError("%s: expected an object of run-definition fields (e.g. {\"lr\": 0.01}), got %s"
                        % (label, "null" if data is None else type(data).__name__))
    data = dict(data)
    if "family" in data:
        if data.pop("family") != family.name:
            raise UserError("%s: family: a run definition of another script's family; this is %s "
                            "(family %s)" % (label, family.script, family.name))
    fields = {f.name: (section, f) for section, f in config_fields()}
    aliases = {alias.lstrip("-").replace("-", "_"): f.name for _, f in config_fields()
               for alias in f.metadata["aliases"]}
    knobs = knob_names(family)
    raw, where, places = {}, {}, {}

    def add(key, value, place, section):
        if not isinstance(key, str):
            raise UserError("%s: %s: keys are field names, got %r" % (label, place, key))
        name = key.lstrip("-").replace("-", "_")
        name = aliases.get(name, name)
        if name in fields:
            home = fields[name][0]
            if section not in (None, home):
                raise UserError("%s: %s: %s belongs in section %s" % (label, place, name, home))
        elif name in knobs:
            if section not in (None, "options"):
                raise UserError("%s: %s: %s is a method knob: put it in model.options or at the top "
                                "level" % (label, place, name))
        else:
            known = set(fields) | knobs | (set(SECTION_NAMES) if section is None else set())
            if section == "options":
                known = knobs
            raise UserError("%s: %s: unknown field (%s)" % (label, place, _closest(name, known)))
        if name in raw:
            raise UserError("%s: %s: %s is given twice (also as %s)" % (label, place, name, places[name]))
        raw[name], places[name], where[name] = value, place, "%s: %s" % (label, place)

    for key, value in data.items():
        if key in SECTION_NAMES and isinstance(value, dict):
            for inner, item in value.items():
                if key == "model" and inner == "options":
                    if not isinstance(item, dict):
                        raise UserError("%s: model.options: expected an object of knobs, got %s"
                                        % (label, _json(item)))
                    for knob, setting in item.items():
                        add(knob, setting, "model.options.%s" % knob, "options")
                else:
                    add(inner, item, "%s.%s" % (key, inner), key)
        elif key in SECTION_NAMES:
            raise UserError("%s: %s: expected an object of the section's fields, got %s%s"
                            % (label, key, _json(value),
                               " (the network is 'backbone')" if key == "model" else ""))
        else:
            add(key, value, key, None)
    values = {}
    for name, value in raw.items():
        values[name] = _file_field(family, fields[name][1], value, where[name]) if name in fields else value
    return ConfigFile(path, values, where, source)
