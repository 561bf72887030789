"""The `train_student` DAG step: distil the teacher into the student.

    from kd.train.loop import train_student
    result = train_student(cfg, teacher_dir, student_dir, alignment, packed, run_dir, teacher_cache=cache)

Modules, one idea each (tasks/train.py is the Prefect side; nothing here imports prefect):

    loop.py                the single-process loop: AdamW, warm-up + cosine, accumulation, clipping, resume
    objectives.py          the `Objective` protocol both loops call: online teacher, teacher cache (offline),
                           on-policy around either
    losses.py              the KD losses as pure functions (fused-linear, sparse top-k, the reference)
    loss_normalization.py  every trained token of a step weighs the same, however the step is split
    checkpoint.py          checkpoints and the trainer state, without pickle
    on_policy/             GKD: prompts, generation, the per-micro-batch draw (kd.on_policy in the config)
    distributed/           the same step on several processes or nodes (torchrun, DDP, FSDP2)

The package itself imports nothing, so `kd.train.losses` can be used (by the teacher cache, the vocab
check, evaluation) without loading the loop.
"""
