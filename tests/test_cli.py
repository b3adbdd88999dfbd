"""The command line: one spelling of options (snake_case, as the bundle's), the old one read for a release."""

from __future__ import annotations

from liver_fcn.cli import build_parser, option_strings, snake_case_options


def test_every_option_is_snake_case():
    options = {o for o in option_strings(build_parser()) if o.startswith("--")}
    assert "--tracking_uri" in options and "--dataset_dir" in options and "--no_scanner_shift" in options
    assert [o for o in options if "-" in o[2:]] == []


def test_kebab_options_are_read_with_a_deprecation_message(capsys):
    argv = ["crossval", "--dataset-dir", "d", "--name", "x", "--extra-weight=0.1", "--", "--val-x", "1"]
    assert snake_case_options(build_parser(), argv) == [
        "crossval", "--dataset_dir", "d", "--name", "x", "--extra_weight=0.1", "--", "--val-x", "1",
    ]  # fmt: skip
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "liver-fcn: --dataset-dir is deprecated, use --dataset_dir",
        "liver-fcn: --extra-weight is deprecated, use --extra_weight",
    ]
    args = build_parser().parse_args(snake_case_options(build_parser(), ["summary", "--run-name", "r"]))
    assert args.run_name == "r"
