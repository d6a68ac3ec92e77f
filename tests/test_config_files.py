"""--config FILE and --print-config (training_runtime.config.read_config_file, app.print_config).

Layers: field defaults <- recipe <- demo <- FILE <- flags; every value of the file
checked as its flag's, errors in one line naming the file and the field; a run
started from another run's args.json reproduces it bitwise.
"""
import json
import os

import numpy as np
import pytest

import train_attr
import train_fgvc
from resume_harness import params_of
from training_runtime import checkpoint
from training_runtime import config as run_config
from training_runtime.errors import UserError
from fgvc_gluon.family import FAMILY

#: a tiny MC-Loss run (small network, a random channel mask per step) with a non-default seed
#: and lr: a run that ignored the file would differ
TINY = ["--method", "mcloss", "--train-limit", "16", "--val-limit", "8", "--test-limit", "8",
        "--epochs", "1", "--image-size", "32", "--batch-size", "8", "--picture-images", "0",
        "--figures", "none", "--seed", "3", "--lr", "0.002"]


def printed(capsys, argv, main=train_fgvc.main):
    """The definition --print-config prints (checked equal to what main returns)."""
    capsys.readouterr()
    returned = main(argv + ["--print-config"])
    out = json.loads(capsys.readouterr().out)
    assert out == json.loads(json.dumps(returned))
    return out


def write(tmp_path, name, value):
    path = str(tmp_path / name)
    with open(path, "w") as f:
        f.write(value if isinstance(value, str) else json.dumps(value))
    return path


def error_of(argv, main=train_fgvc.main):
    with pytest.raises(UserError) as err:
        main(argv)
    message = str(err.value)
    assert "\n" not in message
    return message


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, fashion_mnist_dir):
    save = str(tmp_path_factory.mktemp("config") / "run")
    train_fgvc.main(TINY + ["--save-dir", save])
    return save


def test_a_run_started_from_args_json_reproduces_it_bitwise(tiny_run, tmp_path):
    again = str(tmp_path / "again")
    args_file = os.path.join(tiny_run, "args.json")
    train_fgvc.main(["--config", args_file, "--save-dir", again])
    _, first = params_of(os.path.join(tiny_run, checkpoint.LAST))
    record, second = params_of(os.path.join(again, checkpoint.LAST))
    assert record["progress"]["step"] == 2 and first.keys() == second.keys()
    for key in first:
        np.testing.assert_array_equal(first[key], second[key], err_msg=key)
    with open(args_file) as f:
        original = json.load(f)
    with open(os.path.join(again, "args.json")) as f:
        written = json.load(f)
    assert "config_file" not in original
    assert written["config"] == original["config"]
    assert written["config_file"] == os.path.abspath(args_file)
    assert written["argv"] == ["--config", args_file, "--save-dir", again]


def test_file_is_layered_between_the_demo_values_and_the_flags(tmp_path, capsys):
    plain = printed(capsys, ["--method", "mcloss"])
    path = write(tmp_path, "c.json", {"method": "mcloss", "lr": 0.01, "epochs": 7, "lr-steps": [2, 5],
                                      "--input-size": 40, "seed": 9, "xi": 2})
    layered = printed(capsys, ["--config", path, "--epochs", "5", "--seed", "4"])
    assert layered["optim"]["lr"] == 0.01 and layered["optim"]["lr_steps"] == [2, 5]
    assert layered["model"]["image_size"] == 40 and layered["model"]["options"]["xi"] == 2
    assert layered["optim"]["epochs"] == 5 and layered["runtime"]["seed"] == 4   # the flags win
    # everything the file leaves out is the demo's / the recipe's
    for section in ("data", "runtime"):
        for name, value in plain[section].items():
            if name != "seed":
                assert layered[section][name] == value, name
    assert layered["optim"]["momentum"] == plain["optim"]["momentum"]


def test_print_config_output_and_yaml_are_config_files(tmp_path, capsys):
    first = printed(capsys, ["--method", "s3n", "--lr", "0.003", "--batch-size", "4"])
    path = write(tmp_path, "printed.json", first)
    assert printed(capsys, ["--config", path]) == first      # nested sections, with "family"
    yaml_path = write(tmp_path, "c.yaml", "method: s3n\nlr: 3e-3\nbatch_size: 4\n")
    assert printed(capsys, ["--config", yaml_path]) == first  # 3e-3 read as a number
    # the attribute script reads its own family's definitions
    attr = printed(capsys, ["--epochs", "2"], train_attr.main)
    assert printed(capsys, ["--config", write(tmp_path, "attr.json", attr)], train_attr.main) == attr


@pytest.mark.parametrize("content, expected", [
    ({"learning_rate": 0.1}, "learning_rate: unknown field (closest: lr"),
    ({"optim": {"epoch": 3}}, "optim.epoch: unknown field (closest: epochs"),
    ({"lr": "0.01"}, "lr: expected a number, got \"0.01\""),
    ({"epochs": 2.5}, "epochs: expected an integer, got 2.5"),
    ({"lr": -1}, "lr: expected a positive number, got -1.0"),
    ({"lr": None}, "lr: expected a number, got null"),
    ({"optimizer": "adam"}, "optimizer: expected one of sgd, nag, got 'adam'"),
    ({"lr_steps": 3}, "lr_steps: expected a list of integers, got 3"),
    ({"method": "baseline", "xi": 2}, "xi: a knob of --method mcloss (this run is --method baseline)"),
    ({"method": "mcloss", "xi": 0}, "xi: expected at least 1"),
    ({"model": {"lr": 0.1}}, "model.lr: lr belongs in section optim"),
    ({"family": "attr", "model": {}}, "family: a run definition of another script's family"),
    ({"script": "train_attr", "config": {}, "argv": []}, "the args.json of a train_attr run"),
    ([1, 2], "expected an object of run-definition fields"),
    ('{"lr": 0.1, "lr": 0.2}', "key 'lr' appears twice"),
    ('{"lr": 0.1,}', "not valid JSON (line 1 column"),
])
def test_bad_files_are_one_line_errors_naming_file_and_field(tmp_path, content, expected):
    path = write(tmp_path, "bad.json", content)
    message = error_of(["--config", path, "--print-config"])
    assert message.startswith("--config %s: " % path) and expected in message, message


def test_knob_of_the_files_method_is_refused_when_a_flag_changes_the_method(tmp_path):
    path = write(tmp_path, "m.json", {"method": "mcloss", "xi": 2})
    message = error_of(["--config", path, "--method", "s3n", "--print-config"])
    assert message == "--config %s: xi: a knob of --method mcloss (this run is --method s3n)" % path
    assert error_of(["--config", str(tmp_path / "none.json")]).endswith("none.json: file not found")


def test_config_with_a_checkpoint_is_refused_and_print_config_shows_a_resume(tiny_run, tmp_path, capsys):
    args_file = os.path.join(tiny_run, "args.json")
    for extra in (["--resume", tiny_run], ["--test", tiny_run], ["--predict", "x.png", "--weights", tiny_run]):
        message = error_of(["--config", args_file] + extra)
        assert message.startswith("--config: not with %s: its run definition is the checkpoint's"
                                  % extra[0]), message
    resumed = printed(capsys, ["--resume", tiny_run, "--epochs", "3"])
    with open(args_file) as f:
        saved = json.load(f)["config"]
    assert resumed == dict(saved, optim=dict(saved["optim"], epochs=3))
    assert error_of(["--test", tiny_run, "--print-config"]).startswith("--print-config: with a new run")


def test_read_config_file_values_are_the_flags_types(tmp_path):
    path = write(tmp_path, "t.json", {"lr": 1, "pretrained": "w.params", "gpus": "", "skip_bad_images": True})
    values = run_config.read_config_file(path, FAMILY).values
    assert values["lr"] == 1.0 and isinstance(values["lr"], float)
    assert values["pretrained"] == os.path.abspath("w.params") and values["skip_bad_images"] is True
