"""Run by `torch.distributed.run` (2 gloo processes) from tests/test_distributed.py: trains every scenario under DDP
with `find_unused_parameters=False` (DDP's default, and Trainer's under gradient checkpointing), two steps, or three
where a batch without anchor inputs comes between two with them; and under FSDP2 (`fully_shard` on each `CmalLayer`
and the root). A parameter without a gradient in one step makes DDP raise in the next; FSDP2 refuses 0-dim
parameters at `fully_shard`. Writes one JSON line per scenario to the file named by argv[1] (rank 0):
{"scenario": ..., "ok": bool, "error": str | null}."""

import json
import os
import sys
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).parent))  # the tests' shared input makers; a test helper, not a program

from test_common import head_config, head_inputs  # noqa: E402
from test_model_core import make_config, make_inputs  # noqa: E402

from modeling_cmal import (  # noqa: E402
    CmalForImageTextMatching,
    CmalForPreTraining,
    CmalForQuestionAnswering,
    CmalForReferringExpression,
    CmalForVisualEntailment,
    CmalForVisualReasoning,
)
from modeling_cmal.collator_cmal import mlm_prediction_positions  # noqa: E402
from modeling_cmal.modeling_cmal import CmalLayer  # noqa: E402


def pretraining_batch(step: int, anchors: str) -> dict:
    """`anchors`: "anchors", "empty" (the collator's layout of a batch without anchors: zero rows) or "absent" (no
    anchor inputs at all, as a caller's batch with nothing to anchor)."""
    rank = dist.get_rank()
    inputs = make_inputs(seed=10 * step + rank, with_anchors=anchors == "anchors")
    if anchors == "empty":
        inputs.update(anchor_pairs=torch.full((3, 0, 2), -1), anchor_concept_ids=torch.full((3, 0), -1))
    labels = torch.full(inputs["input_ids"].shape, -100)
    labels[:, 2] = inputs["input_ids"][:, 2]
    inputs.update(labels=labels, itm_labels=torch.tensor([1, 0, 1]), mlm_positions=mlm_prediction_positions(labels))
    return inputs


PRETRAINING = {
    "pretraining": {},
    "amc_off": {"amc_loss_weight": 0.0},
    "mlm_off": {"mlm_loss_weight": 0.0},
    "itm_off": {"itm_loss_weight": 0.0},
    "contrastive": {"itc_loss_weight": 1.0, "amc_loss_weight": 0.0},
    "contrastive_with_amc": {"itc_loss_weight": 0.5},
}
HEADS = (CmalForQuestionAnswering, CmalForVisualEntailment, CmalForVisualReasoning, CmalForReferringExpression,
         CmalForImageTextMatching)


def train_steps(model, batches) -> None:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for batch in batches:
        optimizer.zero_grad()
        loss = model(**batch).loss
        if not torch.isfinite(loss):
            raise AssertionError(f"loss is {loss}")
        loss.backward()
        optimizer.step()


def ddp(model):
    return DistributedDataParallel(model, find_unused_parameters=False)


def scenarios():
    for name, overrides in PRETRAINING.items():
        for anchors in ("anchors", "no_anchors", "mixed", "absent_between"):
            def run(overrides=overrides, anchors=anchors):
                torch.manual_seed(0)
                model = ddp(CmalForPreTraining(make_config(**overrides)).train())
                steps = {"anchors": ("anchors", "anchors"), "no_anchors": ("empty", "empty"),
                         "mixed": ("anchors", "empty"), "absent_between": ("anchors", "absent", "anchors")}[anchors]
                train_steps(model, [pretraining_batch(step, kind) for step, kind in enumerate(steps)])
            yield f"ddp/{name}/{anchors}", run
    for head in HEADS:
        for checkpointing in (False, True):
            def run(head=head, checkpointing=checkpointing):
                torch.manual_seed(0)
                model = head(head_config(head)).train()
                if checkpointing:
                    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
                batches = []
                for step in range(2):
                    batch = head_inputs(head, seed=10 * step + dist.get_rank())
                    if step == 1:  # the second batch has no anchors
                        for key in ("anchor_pairs", "anchor_concept_ids", "anchor_actions"):
                            batch.pop(key)
                    batches.append(batch)
                train_steps(ddp(model), batches)
            yield f"ddp/{head.__name__}/{'checkpointing' if checkpointing else 'plain'}", run

    def fsdp2():
        from torch.distributed.fsdp import fully_shard

        torch.manual_seed(0)
        model = CmalForPreTraining(make_config(itc_loss_weight=0.5)).train()
        for module in model.modules():
            if isinstance(module, CmalLayer):
                fully_shard(module)
        fully_shard(model)
        train_steps(model, [pretraining_batch(step, "anchors") for step in range(2)])
    yield "fsdp2/pretraining", fsdp2


def main() -> None:
    # A rank that fails while the other waits in a collective must not hang the test run.
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    torch.set_num_threads(1)
    results = []
    for name, run in scenarios():
        try:
            run()
            error = None
        except Exception as exc:  # reported per scenario, so that one failure does not hide the others
            error = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=3)}"
        # A scenario fails if it fails on any rank.
        errors = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)
        results.append({"scenario": name, "ok": all(e is None for e in errors),
                        "error": next((e for e in errors if e), None)})
        dist.barrier()
    if dist.get_rank() == 0:
        Path(sys.argv[1]).write_text("\n".join(json.dumps(r) for r in results) + "\n")
    dist.barrier()  # rank 0's results are on disk before any rank leaves
    dist.destroy_process_group()
    # Leave without the interpreter's teardown. Once, on a loaded machine, rank 1 aborted there ("terminate called
    # without an active exception", SIGABRT: a C++ thread of torch's gloo or FSDP still joinable while destructors
    # ran) after every scenario had passed and the results were written; the test reads the results, not the
    # exit of the runtime's destructors.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
