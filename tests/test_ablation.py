"""The contrastive objective across processes, the ablation variants, and examples/ablation.py end to end."""

import datetime
import socket

import pytest
import torch
from torch.nn import functional as F

from modeling_cmal import CmalConfig, CmalForPreTraining
from modeling_cmal.modeling_cmal import CmalContrastiveHead

WORLD_SIZE, N, M, H = 2, 5, 4, 8
# Per rank: batch size and which pairs are matched (unequal batch sizes and unequal matched counts).
RANK_PAIRS = {0: [True, False, True, True], 1: [False, True, False]}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _head_inputs(rank: int) -> dict:
    generator = torch.Generator().manual_seed(100 + rank)
    batch_size = len(RANK_PAIRS[rank])
    attention_mask = torch.ones(batch_size, N, dtype=torch.long)
    attention_mask[0, 3:] = 0
    visual_attention_mask = torch.ones(batch_size, M, dtype=torch.long)
    visual_attention_mask[-1, 2:] = 0
    return {
        "text_embeds": F.normalize(torch.randn(batch_size, N, H, generator=generator), dim=-1),
        "attention_mask": attention_mask,
        "image_embeds": F.normalize(torch.randn(batch_size, M, H, generator=generator), dim=-1),
        "visual_attention_mask": visual_attention_mask,
        "pair_mask": torch.tensor(RANK_PAIRS[rank]),
    }


def _run_head(head: CmalContrastiveHead, inputs: dict) -> dict:
    """Forward, a summed symmetric loss (rows without a matched pair ignored), backward: logits, targets and the
    gradients."""
    inputs = {key: value.clone().requires_grad_(value.is_floating_point()) for key, value in inputs.items()}
    head.zero_grad()
    logits_per_text, logits_per_image, targets = head(**inputs)
    loss = (F.cross_entropy(logits_per_text, targets, reduction="sum", ignore_index=-100)
            + F.cross_entropy(logits_per_image, targets, reduction="sum", ignore_index=-100))
    loss.backward()
    return {"logits_per_text": logits_per_text.detach(), "logits_per_image": logits_per_image.detach(),
            "targets": targets, "text_grad": inputs["text_embeds"].grad, "image_grad": inputs["image_embeds"].grad,
            "scale_grad": head.logit_scale.grad.clone()}


def _tiny_pretraining_config() -> CmalConfig:
    return CmalConfig(vocab_size=50, hidden_size=16, num_attention_heads=2, intermediate_size=32, num_text_layers=1,
                      num_visual_layers=1, num_unified_layers=1, visual_feat_dim=6, num_anchor_concepts=7,
                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, itc_loss_weight=1.0)


def _distributed_worker(rank: int, port: int, output_dir) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=WORLD_SIZE, timeout=datetime.timedelta(seconds=60))
    try:
        torch.manual_seed(0)
        result = _run_head(CmalContrastiveHead(_tiny_pretraining_config()), _head_inputs(rank))
        # Whole model: rank 1 has no matched pair at all, so only rank 0 has ITC targets; the step must not hang.
        torch.manual_seed(0)
        model = CmalForPreTraining(_tiny_pretraining_config())
        generator = torch.Generator().manual_seed(rank)
        outputs = model(input_ids=torch.randint(1, 50, (3, N), generator=generator),
                        visual_feats=torch.randn(3, M, 6, generator=generator), visual_pos=torch.rand(3, M, 4),
                        itm_labels=torch.tensor([1, 1, 0]) if rank == 0 else torch.zeros(3, dtype=torch.long))
        outputs.loss.backward()
        result["model_itc_logits_shape"] = tuple(outputs.itc_logits.shape)
        result["model_itc_loss"] = float(outputs.itc_loss)
        result["model_scale_grad"] = float(model.itc_head.logit_scale.grad)
        torch.save(result, output_dir / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_contrastive_head_gathers_unequal_matched_pairs_across_processes(tmp_path):
    torch.multiprocessing.spawn(_distributed_worker, args=(_free_port(), tmp_path), nprocs=WORLD_SIZE, join=True)
    results = {rank: torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD_SIZE)}

    # One process over the concatenated batch.
    concatenated = {key: torch.cat([_head_inputs(rank)[key] for rank in range(WORLD_SIZE)])
                    for key in _head_inputs(0)}
    torch.manual_seed(0)
    single = _run_head(CmalContrastiveHead(_tiny_pretraining_config()), concatenated)
    single_matched = concatenated["pair_mask"]
    assert single["logits_per_text"].shape == (7, 7)

    # Gathered layout: every rank's rows padded to the largest batch (4), in rank order; a fixed number of columns.
    largest = max(len(pairs) for pairs in RANK_PAIRS.values())
    gathered_matched = torch.tensor(sum((pairs + [False] * (largest - len(pairs)) for pairs in RANK_PAIRS.values()),
                                        []))
    batch_start = 0
    for rank in range(WORLD_SIZE):
        batch_size = len(RANK_PAIRS[rank])
        batch = slice(batch_start, batch_start + batch_size)
        result = results[rank]
        assert result["logits_per_text"].shape == (batch_size, WORLD_SIZE * largest)
        matched = torch.tensor(RANK_PAIRS[rank])
        for name in ("logits_per_text", "logits_per_image"):
            # The matched rows against the matched columns are the single-process logits; the rest is masked.
            torch.testing.assert_close(result[name][matched][:, gathered_matched],
                                       single[name][batch][matched][:, single_matched])
            assert (result[name][:, ~gathered_matched] == torch.finfo(torch.float32).min).all()
        columns = (torch.arange(batch_size) + rank * largest).tolist()
        assert result["targets"].tolist() == [c if m else -100 for c, m in zip(columns, RANK_PAIRS[rank])]
        # Gradients reach every process's embeddings exactly as in the single-process computation.
        torch.testing.assert_close(result["text_grad"], single["text_grad"][batch])
        torch.testing.assert_close(result["image_grad"], single["image_grad"][batch])
        batch_start += batch_size
    torch.testing.assert_close(sum(results[rank]["scale_grad"] for rank in range(WORLD_SIZE)), single["scale_grad"])

    # Whole model: every rank has a row per pair and a column per gathered pair; rank 1's loss is 0 (no targets),
    # and it still takes part in the backward gather.
    assert results[0]["model_itc_logits_shape"] == (3, 6) and results[0]["model_itc_loss"] > 0
    assert results[1]["model_itc_logits_shape"] == (3, 6) and results[1]["model_itc_loss"] == 0.0
    assert results[0]["model_scale_grad"] != 0.0 and results[1]["model_scale_grad"] == 0.0


def test_contrastive_head_single_process_targets_and_symmetry():
    head = CmalContrastiveHead(_tiny_pretraining_config())
    inputs = _head_inputs(0)
    logits_per_text, logits_per_image, targets = head(**inputs)
    assert logits_per_text.shape == (4, 4) and targets.tolist() == [0, -100, 2, 3]
    matched = inputs["pair_mask"]
    torch.testing.assert_close(logits_per_image[matched][:, matched], logits_per_text[matched][:, matched].t())
    assert (logits_per_text[:, ~matched] == torch.finfo(torch.float32).min).all()


# --------------------------------------------------------------------------------------------------------------
# examples/ablation.py: the variants
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ablation():
    import sys

    from conftest import REPO_ROOT

    sys.path.insert(0, str(REPO_ROOT / "examples"))
    import ablation

    return ablation


@pytest.fixture(scope="module")
def variant_setup(ablation, tokenizer, synthetic_corpus, synthetic_corpus_info):
    """The processor, full CMAL's fields (tiny, no dropout) and a batch of pre-training rows."""
    from cmal_processing.corpus import load_corpus

    from modeling_cmal.processing_cmal import CmalProcessor

    processor = CmalProcessor(tokenizer=tokenizer, max_regions=36)
    fields = ablation.base_fields("tiny", processor, synthetic_corpus_info["feature_dim"])
    fields.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    rows = list(load_corpus(synthetic_corpus / "pretrain")["train"].select(range(16)))
    return processor, fields, rows


def _pretraining_step(ablation, variant_setup, name: str):
    """One forward and backward of a variant on the same rows: (model, batch, outputs)."""
    from modeling_cmal.collator_cmal import CmalPretrainingCollator

    processor, fields, rows = variant_setup
    config = CmalConfig(**ablation.variant_fields(name, fields))
    torch.manual_seed(0)
    model = CmalForPreTraining(config).train()
    batch = CmalPretrainingCollator(processor, config, seed=3, max_length=32)(rows)
    outputs = model(**batch)
    outputs.loss.backward()
    return model, batch, outputs


def _actions(batch) -> set[int]:
    return set(batch["anchor_actions"][batch["anchor_pairs"][..., 0] >= 0].tolist())


def test_full_cmal_fills_and_trains_every_head(ablation, variant_setup):
    model, batch, outputs = _pretraining_step(ablation, variant_setup, "cmal")
    assert {1, 2, 4, 5} <= _actions(batch)
    assert outputs.amc_loss is not None and outputs.itc_loss is None and model.itc_head is None
    assert outputs.amc_pairing_loss is not None
    for head in (model.amc_head, model.amc_pairing_head):
        assert all(parameter.grad is not None for parameter in head.parameters())
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(outputs.text_embeds.norm(dim=-1)[real], torch.ones(int(real.sum())))


def test_confidence_intervals_and_the_share_that_reaches_a_score(ablation):
    stats = ablation.interval([0.5, 0.6, 0.7])
    # mean 0.6, sample std 0.1, t(0.975, 2) = 4.303: half-width 4.303 * 0.1 / sqrt(3)
    assert stats["mean"] == pytest.approx(0.6) and stats["std"] == pytest.approx(0.1)
    assert stats["ci95"] == pytest.approx(4.302653 * 0.1 / 3 ** 0.5, rel=1e-5)
    curve = {"fractions": [0.0, 0.1, 0.3, 1.0],
             "summary": [{"mean": value} for value in (0.40, 0.44, 0.52, 0.56)]}
    assert ablation.fraction_reaching(curve, 0.48) == pytest.approx(0.2)
    assert ablation.fraction_reaching(curve, 0.40) == 0.0
    assert ablation.fraction_reaching(curve, 0.60) is None
    # No pre-training at or above the contrastive full-data score: said so, not read as "CMAL reaches it at 0 %".
    results = {"data_efficiency": {"cmal": curve, "contrastive": {**curve, "summary": [{"mean": 0.40}] * 3}}}
    assert "Without pre-training the model already scores" in ablation.efficiency_finding(results)


def test_without_amc_there_is_no_amc_head(ablation, variant_setup):
    model, batch, outputs = _pretraining_step(ablation, variant_setup, "no_amc")
    assert model.config.amc_loss_weight == 0
    assert outputs.amc_loss is None and outputs.amc_logits is None
    torch.testing.assert_close(outputs.loss, outputs.mlm_loss + outputs.itm_loss)
    # No head without its objective: every parameter that exists gets a gradient (DDP without
    # find_unused_parameters needs that).
    assert model.amc_head is None and model.amc_pairing_head is None
    assert all(parameter.grad is not None for parameter in model.parameters())
    assert {1, 2, 4, 5} <= _actions(batch), "without AMC the anchors are still filled and masked"


def test_without_filling_no_anchor_is_filled(ablation, variant_setup):
    _, fields, _ = variant_setup
    _, batch, outputs = _pretraining_step(ablation, variant_setup, "no_filling")
    assert _actions(batch) <= {0, 4, 5} and {4, 5} <= _actions(batch)
    no_filling, full = (CmalConfig(**ablation.variant_fields(name, fields)) for name in ("no_filling", "cmal"))
    assert no_filling.anchor_keep_rate == pytest.approx(
        full.anchor_keep_rate + full.anchor_fill_text_rate + full.anchor_fill_region_rate)
    assert outputs.amc_loss is not None


def test_single_stream_has_no_unimodal_encoder_layers(ablation, variant_setup):
    _, fields, _ = variant_setup
    model, batch, outputs = _pretraining_step(ablation, variant_setup, "single_stream")
    trunk = model.cmal
    assert len(trunk.text_encoder.layer) == 0 and len(trunk.visual_encoder.layer) == 0
    full = CmalConfig(**fields)
    assert len(trunk.unified_encoder.layer) == full.num_text_layers + full.num_unified_layers
    assert not any(name.startswith(("cmal.text_encoder.", "cmal.visual_encoder.")) for name in model.state_dict())
    # The hypersphere embeddings are then those of the (normalised) input embeddings themselves.
    embeddings = trunk.text_embeddings(batch["input_ids"], batch["token_type_ids"])
    torch.testing.assert_close(outputs.text_embeds, F.normalize(embeddings, dim=-1))
    assert torch.isfinite(outputs.loss) and outputs.amc_loss is not None


def test_contrastive_variant_trains_itc_without_amc_or_filling(ablation, variant_setup):
    model, batch, outputs = _pretraining_step(ablation, variant_setup, "contrastive")
    assert model.itc_head is not None and model.config.amc_loss_weight == 0
    assert _actions(batch) == {0}
    assert outputs.itc_loss is not None and outputs.amc_loss is None
    batch_size = batch["itm_labels"].shape[0]
    assert outputs.itc_logits.shape == (batch_size, batch_size)
    assert model.itc_head.logit_scale.grad is not None


def test_variants_differ_from_full_cmal_only_where_intended(ablation, variant_setup):
    _, fields, _ = variant_setup
    full = CmalConfig(**fields).to_dict()
    changed = {}
    for name in ablation.VARIANTS:
        variant = CmalConfig(**ablation.variant_fields(name, fields)).to_dict()
        changed[name] = {key for key in full if variant[key] != full[key]}
    assert changed["cmal"] == set() and changed["no_pretraining"] == set()
    assert changed["no_amc"] == {"amc_loss_weight"}
    assert changed["no_filling"] == {"anchor_fill_text_rate", "anchor_fill_region_rate"}
    assert changed["single_stream"] == {"num_text_layers", "num_visual_layers", "num_unified_layers"}
    # (anchor_mask_both_rate is 0 in full CMAL already)
    assert changed["contrastive"] == {"amc_loss_weight", "itc_loss_weight", "anchor_fill_text_rate",
                                      "anchor_fill_region_rate", "anchor_mask_text_rate", "anchor_mask_region_rate"}
    with pytest.raises(ValueError, match="variant must be one of"):
        ablation.variant_fields("no_such_variant", fields)


@pytest.mark.parametrize("flags, message", [
    (["--seeds", "0,0"], "--seeds"),
    (["--variants", "cmal,bogus"], "--variants"),
    (["--tasks", "gqa"], "--tasks"),
    (["--data_fractions", "0,1"], "--data_fractions"),
    (["--data_fractions", "0,0.5,2"], "--data_fractions"),
    (["--efficiency_variants", "no_pretraining"], "--efficiency_variants"),
    (["--pretrain_steps", "0"], "--pretrain_steps"),
    (["--finetune_learning_rate", "-1"], "--finetune_learning_rate"),
    (["--model_config", "huge"], "--model_config"),
    (["--corpus_dir", "/nonexistent/corpus"], "--corpus_dir"),
    (["--keep_runs", "maybe"], "--keep_runs"),
    (["--no_such_flag", "1"], "--no_such_flag"),
    (["--seeds", "0,one"], "--seeds"),
    (["--scarce_samples", "30"], "--scarce_samples"),
    (["--scarce_epochs", "2", "--warmup_steps", "1"], "--scarce_epochs"),
    (["--finetune_steps", "3", "--finetune_epochs", "2"], "not both"),
    (["--finetune_epochs", "2"], "--warmup_steps"),
    (["--finetune_epochs", "-2", "--warmup_steps", "1"], "--finetune_epochs"),
    (["--validation_fraction", "1.5"], "--validation_fraction"),
    (["--pretrain_scenes", "-1"], "--pretrain_scenes"),
    (["--partial_caption_probability", "1.5"], "--partial_caption_probability must be in [0, 1], got 1.5"),
])
def test_arguments_are_validated(ablation, capsys, flags, message):
    with pytest.raises(SystemExit):
        ablation.parse_args(["--output_dir", "unused", "--preset", "tiny", *flags])
    assert message in capsys.readouterr().err


def test_the_main_preset_is_the_main_jobs_design(ablation, tmp_path):
    """`--preset main` runs the study on examples/quickstart.py's design: its world, model (with MRFR), pre-training
    and both label budgets, flag for flag where the two programs share a flag."""
    import quickstart  # examples/ (the ablation fixture puts it on the path)
    from cmal_examples import main_job as design  # what both programs take the design from

    main_job = design.PRESETS["default"]
    args = ablation.parse_args(["--output_dir", str(tmp_path), "--preset", "main"])
    assert args.world_tokenizer and args.seeds == [0, 1, 2, 3, 4] and args.data_fractions == [0.0, 0.1, 0.3, 1.0]
    assert (args.corpus_scenes, args.pretrain_scenes, args.partial_caption_probability, args.validation_fraction,
            args.questions_per_scene) == (main_job["num_scenes"], main_job["pretrain_scenes"],
                                          main_job["partial_caption_probability"], main_job["validation_fraction"],
                                          main_job["questions_per_scene"])
    assert ablation.EXTRA_SIZES[args.model_config] == {name: main_job[name] for name in design.MODEL_FIELDS}
    assert ablation.EXTRA_SIZES[args.model_config]["mrfr_loss_weight"] > 0
    assert (args.pretrain_steps, args.pretrain_learning_rate) == (main_job["pretrain_steps"],
                                                                 main_job["pretrain_learning_rate"])

    def flags(argv: list[str]) -> dict:
        return {argv[i]: argv[i + 1] for i in range(len(argv) - 1) if argv[i].startswith("--")
                and not argv[i + 1].startswith("--")}

    for budget in ("full", "scarce"):
        ours = flags(ablation.finetuning_arguments("vqa", tmp_path, tmp_path, tmp_path / "out", args, 3, budget))
        theirs = flags(quickstart.finetune_command("vqa", tmp_path, tmp_path / "vqa", tmp_path / "out", main_job, 3,
                                                   budget)[2:])
        assert ours["--dataset_path"] == theirs["--dataset_path"]
        for flag in ("--num_train_epochs", "--max_train_samples", "--learning_rate", "--warmup_steps",
                     "--per_device_train_batch_size", "--seed"):
            assert float(ours[flag]) == float(theirs[flag]), (budget, flag)
        assert "--max_steps" not in ours


# --------------------------------------------------------------------------------------------------------------
# examples/ablation.py: the runs (pretrain.py and the fine-tuning code path)
# --------------------------------------------------------------------------------------------------------------


def _metrics_lines(rows: list[dict]) -> str:
    import json

    return "".join(json.dumps(row) + "\n" for row in rows)


def test_pretraining_losses_come_from_metrics_jsonl(ablation, tmp_path):
    """The last quarter's means of every logged loss; a loss of weight 0 (logged as 0) is left out."""
    steps = 8
    rows = []
    for step in range(1, steps + 1):
        amc, mlm, itm, itc = 0.0, 10.0 - step, 0.7, 2.0 + step
        rows.append({"step": step, "train/loss": 0.5 * mlm + itm + 2.0 * itc, "train/amc_loss": amc,
                     "train/mlm_loss": mlm, "train/itm_loss": itm, "train/itc_loss": itc, "train/learning_rate": 1e-3})
        if step % 4 == 0:  # evaluation lines have no training loss
            rows.append({"step": step, "eval/mlm_loss": 9.0, "eval/mlm_accuracy": 0.1})
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(_metrics_lines(rows))
    config = CmalConfig(vocab_size=50, hidden_size=16, num_attention_heads=2, intermediate_size=32,
                        visual_feat_dim=6, num_anchor_concepts=7, amc_loss_weight=0.0, mlm_loss_weight=0.5,
                        itc_loss_weight=2.0)
    losses = ablation.pretraining_losses(metrics, config, steps)
    assert set(losses) == {"loss", "mlm_loss", "itm_loss", "itc_loss"}
    assert losses["mlm_loss"] == pytest.approx(10.0 - 7.5)  # steps 7 and 8
    assert losses["itc_loss"] == pytest.approx(2.0 + 7.5)
    assert losses["loss"] == pytest.approx(0.5 * 2.5 + 0.7 + 2.0 * 9.5)
    # Every step must have its line (a logging interval above 1 would average over the wrong steps).
    metrics.write_text(_metrics_lines(rows[::2]))
    with pytest.raises(SystemExit, match="steps 1..8"):
        ablation.pretraining_losses(metrics, config, steps)


def test_pruning_keeps_the_records_only(ablation, tmp_path):
    run = tmp_path / "cmal-10-seed0"
    files = ["model_config.json", "pretrain_args.json", "pretrain.log", "run.json", "pretrained/config.json",
             "pretrained/metrics.jsonl", "pretrained/model.safetensors", "pretrained/tokenizer.json",
             "pretrained/checkpoints/step_0000004/model.safetensors", "finetuned/vqa/eval_results.json",
             "finetuned/vqa/finetune.log", "finetuned/vqa/model.safetensors", "finetuned/vqa/training_args.bin",
             "finetuned/vqa/modeling_cmal.py", "finetuned/vqa/trainer_state.json"]
    for name in files:
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text("x")
    ablation.prune_run(run)
    kept = sorted(str(path.relative_to(run)) for path in run.rglob("*") if path.is_file())
    assert kept == sorted(["model_config.json", "pretrain_args.json", "pretrain.log", "run.json",
                           "pretrained/config.json", "pretrained/metrics.jsonl", "finetuned/vqa/eval_results.json",
                           "finetuned/vqa/finetune.log", "finetuned/vqa/trainer_state.json"])
    assert not (run / "pretrained" / "checkpoints").exists()


def _study_flags(tmp_path, synthetic_corpus, bert_dir, *flags) -> list[str]:
    return ["--preset", "tiny", "--output_dir", str(tmp_path / "study"), "--corpus_dir", str(synthetic_corpus),
            "--tokenizer", str(bert_dir), "--seeds", "0,1", *flags]


def test_a_failing_pretraining_stops_the_study_with_its_log_tail(ablation, tmp_path, monkeypatch, synthetic_corpus,
                                                                 bert_dir):
    # A pre-training program that writes 100 lines and fails: the error quotes the last ones, and nothing runs on.
    failing = tmp_path / "failing_pretrain.py"
    failing.write_text("import sys\nfor i in range(100):\n    print(f'log line {i}')\nsys.exit(3)\n")
    monkeypatch.setattr(ablation, "PRETRAIN_SCRIPT", failing)
    flags = _study_flags(tmp_path, synthetic_corpus, bert_dir, "--variants", "cmal", "--efficiency_variants", "",
                         "--tasks", "vqa")
    with pytest.raises(SystemExit) as raised:
        ablation.main(flags)
    message = str(raised.value)
    assert "pre-training cmal-" in message and "exit 3" in message and "pretrain.log" in message
    assert "log line 99" in message and "log line 60" in message and "log line 59\n" not in message
    study = tmp_path / "study"
    assert not (study / "results.json").exists()
    assert not list(study.glob("runs/*/finetuned"))


@pytest.mark.slow
def test_pretrain_py_refusing_its_arguments_stops_the_study(ablation, tmp_path, monkeypatch, synthetic_corpus,
                                                            bert_dir):
    """The real program: its own message (naming the flag) reaches the study's error."""
    arguments = ablation.pretraining_arguments
    monkeypatch.setattr(ablation, "pretraining_arguments",
                        lambda *args, **kwargs: {**arguments(*args, **kwargs), "warmup_steps": -1})
    flags = _study_flags(tmp_path, synthetic_corpus, bert_dir, "--variants", "cmal", "--efficiency_variants", "",
                         "--tasks", "vqa")
    with pytest.raises(SystemExit, match=r"(?s)exit 2.*--warmup_steps must be an integer"):
        ablation.main(flags)


def test_runs_without_pretraining_fine_tune_a_random_folder_and_keep_runs_keeps_it(ablation, tmp_path,
                                                                                    synthetic_corpus, bert_dir):
    import json

    flags = _study_flags(tmp_path, synthetic_corpus, bert_dir, "--variants", "no_pretraining",
                         "--efficiency_variants", "", "--tasks", "refcoco", "--keep_runs")
    results = ablation.main(flags)
    runs = results["variants"]["no_pretraining"]["runs"]
    assert [run["folder"] for run in runs] == ["runs/no_pretraining-0-seed0", "runs/no_pretraining-0-seed1"]
    study = tmp_path / "study"
    for run in runs:
        folder = study / run["folder"]
        # The start: the full CMAL config (the variant's fields) with random weights and the processor.
        start = folder / "untrained"
        assert json.loads((start / "config.json").read_text())["hidden_size"] == results["base_config"]["hidden_size"]
        assert (start / "model.safetensors").is_file() and (start / "processor_config.json").is_file()
        finetuned = folder / "finetuned" / "refcoco"
        assert (finetuned / "model.safetensors").is_file(), "--keep_runs keeps the fine-tuned weights"
        evaluated = json.loads((finetuned / "eval_results.json").read_text())
        assert run["scores"]["refcoco"] == pytest.approx(evaluated["eval_iou_accuracy"])
        assert not list(finetuned.glob("checkpoint-*")), "no checkpoint beyond the saved model"
        assert json.loads((folder / "run.json").read_text()) == run
    # The seeds draw different random trunks.
    from safetensors.torch import load_file

    first, second = (load_file(study / run["folder"] / "untrained" / "model.safetensors") for run in runs)
    name = "cmal.text_embeddings.word_embeddings.weight"
    assert not torch.equal(first[name], second[name])


def test_a_failing_finetuning_stops_the_study_with_its_log_tail(ablation, tmp_path, monkeypatch, synthetic_corpus,
                                                                bert_dir):
    arguments = ablation.finetuning_arguments
    monkeypatch.setattr(ablation, "finetuning_arguments",
                        lambda *args, **kwargs: [*arguments(*args, **kwargs), "--metric_for_best_model", "bleu"])
    flags = _study_flags(tmp_path, synthetic_corpus, bert_dir, "--variants", "no_pretraining",
                         "--efficiency_variants", "", "--tasks", "nlvr2")
    with pytest.raises(SystemExit) as raised:
        ablation.main(flags)
    message = str(raised.value)
    assert "fine-tuning nlvr2 of no_pretraining-0-seed0 failed" in message and "finetune.log" in message
    assert "--metric_for_best_model must be one of" in message
    assert not (tmp_path / "study" / "results.json").exists()


@pytest.mark.slow
def test_tiny_preset_end_to_end(tmp_path, synthetic_corpus, bert_dir):
    """The program as docs/research.md runs it (tiny preset, two seeds, four variants, two tasks, full CMAL's curve,
    both label budgets): every pre-training through pretrain.py with the variant's config, every fine-tuning through
    run_finetuning, VQA scored per question type."""
    import json
    import os
    import subprocess
    import sys

    import numpy as np
    from conftest import REPO_ROOT

    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    command = [sys.executable, str(REPO_ROOT / "examples" / "ablation.py"), "--preset", "tiny",
               "--output_dir", str(tmp_path), "--corpus_dir", str(synthetic_corpus), "--tokenizer", str(bert_dir),
               "--seeds", "0,1", "--variants", "cmal,no_amc,contrastive,no_pretraining",
               "--efficiency_variants", "cmal", "--tasks", "vqa,refcoco", "--scarce_samples", "24",
               "--scarce_epochs", "1", "--warmup_steps", "1"]
    result = subprocess.run(command, check=False, capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=900)
    assert result.returncode == 0, result.stderr[-5000:]
    for name in ("results.json", "ablation.md", "ablation.png", "data_efficiency.md", "data_efficiency.png"):
        assert (tmp_path / name).is_file() and (tmp_path / name).stat().st_size > 0, name
    assert (tmp_path / "ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| CMAL (full) |" in result.stdout and "Wrote results.json" in result.stdout
    results = json.loads((tmp_path / "results.json").read_text())
    variants = results["variants"]
    assert list(variants) == ["cmal", "no_amc", "contrastive", "no_pretraining"]
    seeds = results["settings"]["seeds"]
    assert seeds == [0, 1] and results["settings"]["keep_runs"] is False
    steps, size = results["settings"]["pretrain_steps"], results["pretrain_rows"]
    for name, variant in variants.items():
        assert [run["seed"] for run in variant["runs"]] == seeds
        for run in variant["runs"]:
            assert set(run["scores"]) == {"vqa", "refcoco"}
            assert all(0.0 <= score <= 1.0 for score in run["scores"].values())
            assert ("pretrain_losses" in run) == (name != "no_pretraining")
            folder = tmp_path / run["folder"]
            assert folder.name == (f"{name}-{size}-seed{run['seed']}" if name != "no_pretraining"
                                   else f"no_pretraining-0-seed{run['seed']}")
            # The scores are the fine-tuning code path's own evaluation, at each budget.
            for task, metric in (("vqa", "vqa_accuracy"), ("refcoco", "iou_accuracy")):
                evaluated = json.loads((folder / "finetuned" / task / "eval_results.json").read_text())
                assert run["scores"][task] == pytest.approx(evaluated[f"eval_{metric}"])
                evaluated = json.loads((folder / "finetuned_scarce" / task / "eval_results.json").read_text())
                assert run["scarce_scores"][task] == pytest.approx(evaluated[f"eval_{metric}"])
                # 24 labelled rows, batch 8, one epoch: 3 steps.
                state = json.loads((folder / "finetuned_scarce" / task / "trainer_state.json").read_text())
                assert state["max_steps"] == 3
            # VQA per question type, over the rows evaluated (the first 16): a share of each type's questions.
            assert set(run["vqa_types"]) == set(results["vqa_types"])
            for kind, accuracy in run["vqa_types"].items():
                questions = results["vqa_types"][kind]["questions"]
                assert accuracy * questions == pytest.approx(round(accuracy * questions))
            assert ("pretrain_accuracies" in run) == (name != "no_pretraining")
    # Pre-training went through pretrain.py with the variant's config: its saved config, its arguments, and the
    # recorded losses are the last quarter of its metrics.jsonl.
    for name, variant in variants.items():
        if name == "no_pretraining":
            continue
        for run in variant["runs"]:
            folder = tmp_path / run["folder"]
            config = json.loads((folder / "pretrained" / "config.json").read_text())
            for key, value in variant["config"].items():
                assert config[key] == value, (name, key)
            arguments = json.loads((folder / "pretrain_args.json").read_text())
            assert arguments["max_steps"] == steps and arguments["seed"] == run["seed"]
            assert arguments["model_config"] == str(folder / "model_config.json")
            assert arguments["report_to"] == "none" and arguments["max_regions"] == 36
            rows = [json.loads(line) for line in (folder / "pretrained" / "metrics.jsonl").read_text().splitlines()]
            logged = [row for row in rows if "train/loss" in row]
            assert [row["step"] for row in logged] == list(range(1, steps + 1))
            tail = logged[-max(1, steps // 4):]
            assert run["pretrain_losses"]["loss"] == pytest.approx(np.mean([row["train/loss"] for row in tail]))
    no_amc_config = json.loads((tmp_path / variants["no_amc"]["runs"][0]["folder"] / "pretrained" / "config.json")
                               .read_text())
    assert no_amc_config["amc_loss_weight"] == 0.0
    assert json.loads((tmp_path / variants["cmal"]["runs"][0]["folder"] / "pretrained" / "config.json")
                      .read_text())["amc_loss_weight"] > 0
    contrastive = variants["contrastive"]["runs"][0]["pretrain_losses"]
    assert "itc_loss" in contrastive and "amc_loss" not in contrastive and contrastive["itc_loss"] > 0
    assert "amc_loss" not in variants["no_amc"]["runs"][0]["pretrain_losses"]
    assert "amc_loss" in variants["cmal"]["runs"][0]["pretrain_losses"]
    # Once scored, a run keeps its records and loses its weights, checkpoints and copied files.
    assert not list(tmp_path.glob("runs/**/*.safetensors")) and not list(tmp_path.glob("runs/**/checkpoint*"))
    assert not list(tmp_path.glob("runs/**/tokenizer.json")) and not (tmp_path / "pretrain_subsets").exists()
    assert results["budgets"] == ["full", "scarce"]
    assert sum(row["questions"] for row in results["vqa_types"].values()) == results["settings"]["max_eval_samples"]
    assert all(0 <= row["chance"] <= 1 for row in results["vqa_types"].values())
    table = (tmp_path / "ablation.md").read_text()
    assert "## Scarce labels (24 labelled samples × 1 epochs per task)" in table
    assert "## VQA per question type" in table and "| chance |" in table
    for name in ("no_amc", "contrastive", "no_pretraining"):
        assert set(variants[name]["vqa_types_difference_to_cmal"]) == set(results["vqa_types"])
        assert set(variants[name]["scarce_difference_to_cmal"]) == {"vqa", "refcoco", "mean"}
    assert "| CMAL (full) |" in table and "±" in table and "| contrastive (ITC + MLM + ITM) |" in table
    assert "95 % confidence interval" in table and "variant − full CMAL" in table
    # Paired differences: seed by seed against full CMAL, with their own interval.
    for name, variant in variants.items():
        if name != "cmal":
            difference = variant["difference_to_cmal"]["mean"]
            expected = [run["mean_score"] - ref["mean_score"]
                        for run, ref in zip(variant["runs"], variants["cmal"]["runs"])]
            assert difference["mean"] == pytest.approx(sum(expected) / len(expected))
            assert difference["n"] == len(seeds) and difference["ci95"] >= 0
    curves = results["data_efficiency"]
    assert set(curves) == {"cmal"}
    curve = curves["cmal"]
    sizes = curve["pretrain_rows"]
    assert len(sizes) >= 3 and sizes == sorted(sizes) and sizes[-1] == size and sizes[0] == 0
    assert len(curve["summary"]) == len(sizes)
    # The full-size point of the curve is the ablation's own run; the no-pre-training point the reference run; the
    # point between pre-trained on its own subset.
    assert curve["runs"][-1] == variants["cmal"]["runs"]
    assert curve["runs"][0] == variants["no_pretraining"]["runs"]
    for run in curve["runs"][1]:
        assert run["pretrain_rows"] == sizes[1] and run["folder"] == f"runs/cmal-{sizes[1]}-seed{run['seed']}"
        arguments = json.loads((tmp_path / run["folder"] / "pretrain_args.json").read_text())
        assert arguments["dataset_path"] == str(tmp_path / "pretrain_subsets" / f"{sizes[1]}_captions")
    assert "no pre-training" in (tmp_path / "data_efficiency.md").read_text()
