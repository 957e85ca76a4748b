"""The main job's design, shared by the programs that run it: `examples/quickstart.py` (the main job) and
`examples/ablation.py --preset main` (the study of its components on the same design).
"""

PRESETS = {
    # The world: task scenes (labels) and six times as many more scenes whose captions only pre-training sees (VLP's
    # regime: captions are cheap, labels are not), whose captions name every object (captions that name only some, as
    # people's do, did not help: docs/research.md); its own word-piece vocabulary; pre-training steps (4,000: held-out
    # ITM and AMC have flattened before the schedule ends, where at 2,000 ITM was still climbing); the two label budgets
    # of fine-tuning (the same from pre-trained and from scratch); model sizes; MRFR and ITC beside AMC, MLM and ITM
    # (without MRFR pre-training leaves a region's colour a few percent of its state's variance; ITC keeps the colour
    # that AMC's class targets compress away and lifts VQA and RefCOCO+: docs/research.md).
    "default": dict(num_scenes=1000, validation_fraction=0.2, questions_per_scene=4, pretrain_scenes=6000,
                    partial_caption_probability=0.0,
                    pretrain_steps=4000, pretrain_learning_rate=1e-3, finetune_epochs=8, finetune_samples=3000,
                    scarce_epochs=20, scarce_samples=300, finetune_learning_rate=3e-4, hidden_size=128,
                    num_attention_heads=4, intermediate_size=256, num_text_layers=2, num_visual_layers=1,
                    num_unified_layers=2, mrfr_loss_weight=1.0, itc_loss_weight=1.0),
    "smoke": dict(num_scenes=200, validation_fraction=0.2, questions_per_scene=4, pretrain_scenes=200,
                  partial_caption_probability=0.0,
                  pretrain_steps=20, pretrain_learning_rate=5e-4, finetune_epochs=1, finetune_samples=200,
                  scarce_epochs=2, scarce_samples=50, finetune_learning_rate=3e-4, hidden_size=32,
                  num_attention_heads=2, intermediate_size=64, num_text_layers=1, num_visual_layers=1,
                  num_unified_layers=1, mrfr_loss_weight=1.0, itc_loss_weight=1.0),
}
# The two label budgets: samples and epochs of each fine-tuning run.
BUDGETS = {"full": ("finetune_samples", "finetune_epochs"), "scarce": ("scarce_samples", "scarce_epochs")}
MODEL_FIELDS = ("hidden_size", "num_attention_heads", "intermediate_size", "num_text_layers", "num_visual_layers",
                "num_unified_layers", "mrfr_loss_weight", "itc_loss_weight")
# Warm-up steps of every fine-tuning run of the main job.
FINETUNE_WARMUP_STEPS = 20
