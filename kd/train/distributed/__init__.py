"""Training on several processes with torch.distributed: torchrun, DDP, FSDP2, distributed checkpoints.

    python -m torch.distributed.run --standalone --nproc-per-node 8 -m kd.train.distributed.worker SPEC.json

`train.distributed: ddp | fsdp` in the config makes the `train_student` task launch that command
(kd.train.distributed.launch) instead of training in-process. Modules, one idea each:

    launch.py      the torchrun command line and a supervisor: streams rank 0's lines, kills the
                   process group on timeout or cancellation, turns the exit code into an error class
    runtime.py     process-group set-up from torchrun's environment (gloo on CPU, nccl on CUDA)
    model.py       the KD objective as one module (so FSDP2 has the output matrix unsharded while the
                   fused loss reads it) and its DDP / FSDP2 wrapping
    checkpoint.py  torch.distributed.checkpoint save/load (resumable at another world size) and the
                   consolidated Hugging Face folder written by rank 0
    loop.py        the training loop: rank-sharded data, token-weighted loss, reduced metrics
    worker.py      the torchrun entry point

`kd/` never imports prefect; tasks/train.py is the Prefect side.
"""
