"""`benchmarks/gpu_check.py`'s command line (the measurements need a GPU and are not part of CI): its flags are a
dataclass read by `HfArgumentParser`, and a bad one stops the script with exit status 2 and its name."""

from __future__ import annotations

import pytest
from conftest import load_benchmark


@pytest.fixture(scope="module")
def gpu_check():
    yield from load_benchmark("gpu_check")


def test_the_documented_command_lines_parse(gpu_check):
    args = gpu_check.parse_args([])
    assert (args.device, args.batch_size, args.num_regions, args.num_pieces, args.steps) == ("cuda", 64, 36, 40, 20)
    assert args.peak_tflops is None and args.smoke is False
    assert gpu_check.parse_args(["--peak_tflops", "989"]).peak_tflops == 989.0
    args = gpu_check.parse_args(["--device", "cpu", "--smoke"])
    assert args.device == "cpu" and args.smoke is True


@pytest.mark.parametrize(("argv", "message"), [
    (["--batch_size", "0"], "--batch_size must be >= 1, got 0"),
    (["--steps", "-3"], "--steps must be >= 1, got -3"),
    (["--peak_tflops", "0"], "--peak_tflops must be > 0, got 0.0"),
    (["--num_pieces", "forty"], "argument --num_pieces/--num-pieces: invalid int value: 'forty'"),
    (["--gpus", "2"], "unrecognized arguments: --gpus 2"),
])
def test_a_bad_flag_stops_with_exit_status_2_and_its_name(gpu_check, argv, message, capsys):
    with pytest.raises(SystemExit) as exited:
        gpu_check.parse_args(argv)
    assert exited.value.code == 2 and message in capsys.readouterr().err
