"""Code the CMAL example programs share, installed with the project as `cmal_examples`.

The programs in `examples/` import this package and `modeling_cmal`, never one another. It is not part of the runtime
package `modeling_cmal` (whose files are copied next to the weights of a saved folder):

- `arguments`: how every program reads its flags (`HfArgumentParser`, from the command line or one JSON file);
- `checkpoints`: atomic Accelerate checkpoints of `pretrain.py`, their verification before a resume, the final save;
- `finetuning`: the fine-tuning programs' arguments, task description, collator, `Trainer` and `run_finetuning`;
- `tasks`: the four downstream tasks (`VqaTask`, `Nlvr2Task`, `SnliVeTask`, `RefcocoTask`) and VQA's scores per
  question type;
- `main_job`: the main job's design (world, model, pre-training, label budgets), which `quickstart.py` runs and
  `ablation.py --preset main` studies;
- `models`: the default tokenizer, new processors, configs from a size or a JSON file, AdamW parameter groups;
- `figures`: what the two figure programs (`visualize_attention.py`, `tsne.py`) share: scenes, model loading;
- `figure_arguments`: the figure programs' common flags (`FigureArguments`) and their `--help`;
- `hub_export`: Hub-ready folders (auto maps, custom pipelines, code files, model card), also a command line.
"""
