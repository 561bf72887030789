"""One node of a Kubernetes JobSet training (kd/jobset.py): `python -m kd.train.distributed.pod CONFIG.json`.

Pulls both models (into the shared KDFLOW_HOME / HF_HOME, so the first node downloads and the others
reuse), checks the vocabularies, writes this node's spec under work_dir/<run>/launch/ and replaces
itself with torchrun for this node (train.rendezvous: the endpoint and id the JobSet was rendered
with; node 0, KDFLOW_NODE_RANK=0, hosts the c10d store). The ranks pack data.source themselves.
Exit status: torchrun's (0 done; non-zero: the JobSet's failurePolicy restarts every node, which
resume from the last checkpoint); 2 when the config or a model is invalid.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    from kd.config import RunConfig
    from kd.train.distributed.launch import torchrun_command, worker_env, write_spec
    from kd.errors import InputError
    from kd.gguf import gguf_dtype
    from kd.hub import pull_model
    from kd.vocab import align_vocab

    try:
        cfg = RunConfig.model_validate_json(Path(argv[0]).read_text())
        node = int(os.environ.get("KDFLOW_NODE_RANK", "0"))
        # as the pull_models step does: a `from-teacher` student is built from the teacher's snapshot (without
        # it every pruned student failed here), and a GGUF is dequantized to the run's training dtype
        dtype = gguf_dtype(cfg.train.dtype, cfg.train.device)
        teacher = pull_model(cfg.teacher, "teacher", dtype=dtype)
        student = pull_model(cfg.student, "student", teacher=teacher, dtype=dtype, data=cfg.data)
        alignment = align_vocab(teacher.local_dir, student.local_dir, cross_tokenizer=cfg.kd.cross_tokenizer.enabled)
        run_dir = Path(cfg.work_dir).expanduser().resolve() / (cfg.name or cfg.train.rendezvous.id)
        spec = write_spec(cfg, teacher.local_dir, student.local_dir, alignment, run_dir,
                          name=f"spec-node{node}.json", clear_result=False)
        cmd = torchrun_command(cfg, spec)
        if "--rdzv-conf" in cmd:  # nnodes = 1 runs `torchrun --standalone`: no store to host
            conf = cmd.index("--rdzv-conf") + 1
            cmd[conf] += f",is_host={'true' if node == 0 else 'false'}"
    except InputError as err:
        print(f"kdflow node: error: {err}", file=sys.stderr)
        return 2
    print("kdflow node %d: %s" % (node, " ".join(cmd)), flush=True)
    os.execvpe(cmd[0], cmd, worker_env())


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
