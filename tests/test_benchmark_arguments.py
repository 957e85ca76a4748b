"""The command lines of `benchmarks/bench_data.py`, `bench_model.py` and `bench_processor.py` (the measurements are
not part of CI): their flags are dataclasses read by `HfArgumentParser`, every documented command line parses, and a
bad flag stops the script with exit status 2 and its name. Nothing is measured here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import load_benchmark


@pytest.fixture(scope="module")
def bench_data():
    yield from load_benchmark("bench_data")


@pytest.fixture(scope="module")
def bench_model():
    yield from load_benchmark("bench_model")


@pytest.fixture(scope="module")
def bench_processor():
    yield from load_benchmark("bench_processor")


def test_bench_data_documented_command_lines_parse(bench_data):
    args = bench_data.parse_args([])
    assert (args.num_images, args.captions_per_image, args.batch_size, args.steps) == (256, 2, 32, 3)
    assert (args.data_epochs, args.threads, args.work_dir, args.json, args.seed, args.workers) == (1, None, None,
                                                                                                   None, 0, 1)
    assert args.quick is False and args.streaming is False
    args = bench_data.parse_args(["--quick"])
    assert (args.quick, args.num_images, args.batch_size, args.steps) == (True, 64, 16, 1)
    args = bench_data.parse_args("--num-images 512 --batch-size 32 --steps 5 --threads 2 --json out.json".split())
    assert (args.num_images, args.batch_size, args.steps, args.threads, args.json) == (512, 32, 5, 2, "out.json")
    assert bench_data.parse_args(["--streaming"]).streaming is True
    args = bench_data.parse_args("--streaming --num-images 512 --threads 1".split())
    assert (args.streaming, args.num_images, args.threads) == (True, 512, 1)
    assert bench_data.parse_args(["--threads", "2"]).threads == 2
    # The underscore spelling of HfArgumentParser works too.
    assert bench_data.parse_args(["--num_images", "8", "--batch_size", "4"]).num_images == 8


@pytest.mark.parametrize(("argv", "message"), [
    (["--num-images", "0"], "--num-images must be a positive integer, got 0"),
    (["--workers", "-1"], "--workers must be a positive integer, got -1"),
    (["--num-images", "4"], "--num-images x --captions-per-image (8 rows) must give at least two batches of "
                            "--batch-size 32"),
    (["--steps", "three"], "argument --steps: invalid int value: 'three'"),
    (["--rounds", "3"], "unrecognized arguments: --rounds 3"),
])
def test_bench_data_bad_flag_stops_with_exit_status_2_and_its_name(bench_data, argv, message, capsys):
    with pytest.raises(SystemExit) as exited:
        bench_data.parse_args(argv)
    assert exited.value.code == 2 and message in capsys.readouterr().err


def test_bench_data_refuses_a_work_dir_with_files(bench_data, tmp_path, capsys):
    (tmp_path / "old.tsv").write_text("")
    with pytest.raises(SystemExit) as exited:
        bench_data.parse_args(["--work-dir", str(tmp_path)])
    assert exited.value.code == 2 and f"--work-dir {str(tmp_path)!r} exists and is not empty" in capsys.readouterr().err
    assert bench_data.parse_args(["--work-dir", str(tmp_path / "new")]).work_dir == str(tmp_path / "new")


def test_bench_model_documented_command_lines_parse(bench_model):
    args = bench_model.parse_args([])
    assert args.quick is False and args.sections.split(",") == list(bench_model.SECTIONS) and args.json is None
    assert args.threads >= 1 and args.cmal_root is None and args.memory_child is None
    assert bench_model.parse_args(["--quick"]).quick is True
    args = bench_model.parse_args("--sections train,attn --json results.json".split())
    assert args.section_list == ["train", "attn"] and args.json == Path("results.json")
    assert bench_model.parse_args("--cmal-root /tmp/patched".split()).cmal_root == "/tmp/patched"
    # What run_memory gives its subprocesses.
    spec = {"checkpointing": True, "batch_size": 2, "threads": 1, "quick": True, "cmal_root": None}
    assert json.loads(bench_model.parse_args(["--memory-child", json.dumps(spec)]).memory_child) == spec


@pytest.mark.parametrize(("argv", "message"), [
    (["--sections", "train,speed"], "--sections must be a subset of ('train', 'infer', 'memory', 'attn'), got "
                                    "['speed']"),
    (["--threads", "0"], "--threads must be >= 1, got 0"),
    (["--threads", "all"], "argument --threads: invalid int value: 'all'"),
    (["--gpu"], "unrecognized arguments: --gpu"),
])
def test_bench_model_bad_flag_stops_with_exit_status_2_and_its_name(bench_model, argv, message, capsys):
    with pytest.raises(SystemExit) as exited:
        bench_model.parse_args(argv)
    assert exited.value.code == 2 and message in capsys.readouterr().err


def test_bench_processor_documented_command_lines_parse(bench_processor):
    args = bench_processor.parse_args([])
    assert (args.tokenizer, args.batch_size, args.batches, args.rounds, args.threads) == (None, 64, 8, 30, None)
    args = bench_processor.parse_args("--rounds 50 --batch-size 128".split())
    assert (args.rounds, args.batch_size) == (50, 128)


@pytest.mark.parametrize(("argv", "message"), [
    (["--batches", "0"], "--batches must be a positive integer, got 0"),
    (["--batch-size", "-4"], "--batch-size must be a positive integer, got -4"),
    (["--rounds", "many"], "argument --rounds: invalid int value: 'many'"),
    (["--quick"], "unrecognized arguments: --quick"),
])
def test_bench_processor_bad_flag_stops_with_exit_status_2_and_its_name(bench_processor, argv, message, capsys):
    with pytest.raises(SystemExit) as exited:
        bench_processor.parse_args(argv)
    assert exited.value.code == 2 and message in capsys.readouterr().err
