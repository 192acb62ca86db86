"""The command line's spellings: one name per flag across commands, --json where a result is printed,
--no-progress where a bar is shown, and train --help in groups."""
import json
import subprocess
import sys

import pytest

from moderncnn.cli import COMMANDS, build_parser
from moderncnn.report.summary import count_parameters

PRINTS_A_RESULT = ["models", "summary", "train", "eval", "predict", "report", "compare", "bench", "export", "lr-find"]
SHOWS_A_BAR = ["train", "compare", "lr-find"]


def _subparser(command: str):
    parser = build_parser()
    return next(a for a in parser._subparsers._group_actions if a.dest == "command").choices[command]


def _options(command: str):
    return {s for a in _subparser(command)._actions for s in a.option_strings}


def test_every_command_is_covered_by_these_lists():
    assert set(PRINTS_A_RESULT) == set(COMMANDS)


@pytest.mark.parametrize("command", PRINTS_A_RESULT)
def test_every_command_that_prints_a_result_has_json(command):
    assert "--json" in _options(command)


@pytest.mark.parametrize("command", SHOWS_A_BAR)
def test_every_command_that_shows_a_bar_takes_no_progress(command):
    assert "--no-progress" in _options(command)


@pytest.mark.parametrize("command, new, old", [("summary", "--batch-size", "--batch"),
                                               ("bench", "--batch-size", "--batch"),
                                               ("bench", "--eval-batch-size", "--eval-batch"),
                                               ("export", "--out", "--output")])
def test_renamed_flags_keep_their_old_spelling(command, new, old):
    parser = build_parser()
    required = {"summary": ["nin"], "bench": [], "export": ["runs/x"]}[command]
    a = parser.parse_args([command, *required, new, "7"])
    b = parser.parse_args([command, *required, old, "7"])
    assert vars(a) == vars(b)
    assert "--batch" not in _options("train") and "--batch-size" in _options("train")


@pytest.mark.parametrize("value, expected", [(None, "auto"), ("auto", "auto"), ("bf16", "bf16"), ("fp16", "fp16"),
                                             ("off", "off")])
def test_amp_takes_the_same_values_in_train_and_bench(value, expected):
    parser = build_parser()
    flag = ["--amp"] if value is None else ["--amp", value]
    assert parser.parse_args(["train", *flag]).amp == expected
    assert parser.parse_args(["bench", *flag]).amp == expected
    assert parser.parse_args(["bench", "--no-amp"]).amp == parser.parse_args(["train", "--no-amp"]).amp == "off"


def test_train_help_lists_its_flags_in_groups_without_a_doubled_default():
    text = _subparser("train").format_help()
    groups = ["model:", "data:", "optimisation:", "schedule:", "precision:", "output:", "run control:"]
    positions = [text.index("\n" + g + "\n") for g in groups]
    assert positions == sorted(positions)
    assert positions[2] < text.index("\n  --muon-lr") < positions[3] and positions[4] < text.index("\n  --amp ") < positions[5]
    assert "(default: time-model-dataset)" in text and "(default: none)\n  --resume" not in text
    doubled = [a.option_strings for a in _subparser("train")._actions if (a.help or "").count("(default") > 1]
    assert not doubled


def test_summary_json_totals_match_the_model():
    from moderncnn import create_model
    out = subprocess.run([sys.executable, "-m", "moderncnn", "summary", "nin", "--input", "1x224x224",
                          "--batch-size", "2", "--json"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["params"] == count_parameters(create_model("nin", num_classes=10, in_chans=1))
    assert data["input_size"] == [2, 1, 224, 224] and data["output_shape"] == [2, 10]
    assert data["layers"] and {"name", "output_shape", "params", "flops"} <= set(data["layers"][0])


def test_train_cli_has_every_flag():
    from moderncnn.cli import build_parser
    text = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    for flag in ["--model", "--dataset", "--data-dir", "--image-size", "--epochs", "--batch-size", "--lr",
                 "--optimizer", "--schedule", "--warmup", "--weight-decay", "--label-smoothing", "--ema",
                 "--grad-clip", "--subset", "--recipe", "--seed", "--device", "--amp", "--channels-last",
                 "--compile", "--out", "--name", "--resume", "--no-progress", "--tta", "--progressive-size",
                 "--progressive-fraction"]:
        assert flag in text, flag


def test_model_args_are_python_literals():
    from moderncnn.cli import parse_model_args
    assert parse_model_args(["small_input=True", "drop_rate=0.2", "block_config=(4, 8, 8)", "style=d2l"]) == {
        "small_input": True, "drop_rate": 0.2, "block_config": (4, 8, 8), "style": "d2l"}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_model_args(["small_input"])


def test_an_unknown_export_format_is_one_line_listing_the_formats(tmp_path, capsys):
    from moderncnn.cli import main
    from moderncnn.exported import FORMATS
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(tmp_path), "--format", "tflite"])
    assert exit_info.value.code == 2
    error = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(error) == 1 and "invalid choice: 'tflite'" in error[0]
    assert all(f"'{fmt}'" in error[0] for fmt in FORMATS)


@pytest.mark.parametrize("value", ["0", "1.5", "half"])
def test_eval_tta_below_takes_a_probability(value, capsys):
    from moderncnn.cli import main
    assert _subparser("eval").parse_args(["run", "--tta", "2", "--tta-below", "0.7"]).tta_below == 0.7
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "run", "--tta-below", value])
    assert exit_info.value.code == 2
    error = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert error == [f"moderncnn eval: error: argument --tta-below: expected a probability in (0, 1], got '{value}'"]
