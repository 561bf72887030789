"""Issue 26: the JobSet pod entry point (`python -m kd.train.distributed.pod CONFIG.json`, kd/jobset.py) run as a pod
would run it: the command, environment and config the rendered JobSet gives it, a shared folder standing in
for the ReadWriteMany claim. It had never run; it called pull_model(cfg.student, "student") without the
teacher, so every `from-teacher` student (both SmolLM2 presets) failed in a pod.

One pod (world size 1, CPU, gloo) keeps it cheap; the multi-node rendezvous itself is tested in
tests/test_multinode.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kd.config import load_config
from kd.jobset import render_jobset

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_pod_trains_a_from_teacher_student_from_the_jobset_config(tiny_pair, tmp_path):
    teacher_dir, _ = tiny_pair
    shared = tmp_path / "shared"  # the claim every pod mounts
    cfg = load_config(REPO / "configs" / "smoke.yaml", [
        f"teacher.repo={teacher_dir}", "student.repo=from-teacher", "student.init.from_teacher.keep_layers=1",
        f"work_dir={shared}/runs", f"evidence_dir={shared}/evidence",
        "train.distributed=ddp", "train.nproc_per_node=1", "train.device=cpu", "train.steps=2",
        "train.warmup_steps=1", "train.checkpoint_every=2", "train.batch_size=2", "train.rendezvous.nnodes=2"])
    rendered = render_jobset(cfg, run_name="pod-test", image="kdflow:test", mount=str(shared))
    config_map, jobset = rendered["items"]
    container = jobset["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]["containers"][0]
    # the ConfigMap's config, as mounted at /etc/kdflow/config.json; a single pod here, so one node
    config = json.loads(config_map["data"]["config.json"])
    config["train"]["rendezvous"]["nnodes"] = 1
    (tmp_path / "etc-kdflow").mkdir()
    config_path = tmp_path / "etc-kdflow" / "config.json"
    config_path.write_text(json.dumps(config))

    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    for var in container["env"]:  # the pod's variables; KDFLOW_NODE_RANK comes from the job-index label
        env[var["name"]] = var.get("value", "0")
    assert env["KDFLOW_HOME"] == f"{shared}/kdflow-home" and env["KDFLOW_NODE_RANK"] == "0"
    command = container["command"]
    assert command[:3] == ["python", "-m", "kd.train.distributed.pod"]
    workdir = tmp_path / "workdir"  # the image's workingDir: not the repository
    workdir.mkdir()
    proc = subprocess.run([sys.executable, *command[1:-1], str(config_path)], cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    run_dir = shared / "runs" / "pod-test"
    spec = json.loads((run_dir / "launch" / "spec-node0.json").read_text())
    student_dir = Path(spec["student_dir"])
    # the student was built from the teacher, in the shared KDFLOW_HOME (so other nodes reuse it)
    assert student_dir.is_relative_to(shared / "kdflow-home" / "pruned"), student_dir
    assert json.loads((student_dir / "config.json").read_text())["num_hidden_layers"] == 1
    result = json.loads((run_dir / "launch" / "result.json").read_text())
    assert result["steps"] == 2 and Path(result["checkpoint_dir"]).is_dir(), result
