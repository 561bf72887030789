"""`kdflow render-jobset`: the multi-node training as a JobSet, validated against the published CRD schema
(deploy/k8s/schemas/, vendored from kubernetes-sigs/jobset) with jsonschema, plus a strict unknown-field
check (kubectl --validate=strict). No cluster runs it here."""

from __future__ import annotations

import copy
import json

import jsonschema
import pytest
import yaml

from flows.cli import main
from kd.config import RunConfig, load_config
from kd.errors import ConfigError
from kd.jobset import render_jobset
from tests.conftest import REPO

SCHEMA = json.loads((REPO / "deploy" / "k8s" / "schemas" / "jobset.x-k8s.io_v1alpha2.json").read_text())
MULTI = ["train.distributed=fsdp", "train.rendezvous.nnodes=4", "work_dir=/shared/runs", "evidence_dir=/shared/evidence"]


def unknown_fields(instance, schema, path="$") -> list[str]:
    """Keys the schema does not declare (the API server would prune them; --validate=strict refuses them)."""
    out = []
    if isinstance(instance, dict) and schema.get("type") == "object":
        props, extra = schema.get("properties"), schema.get("additionalProperties")
        for key, value in instance.items():
            if props is not None and key in props:
                out += unknown_fields(value, props[key], f"{path}.{key}")
            elif isinstance(extra, dict):
                out += unknown_fields(value, extra, f"{path}.{key}")
            elif props is not None and not schema.get("x-kubernetes-preserve-unknown-fields"):
                out.append(f"{path}.{key}")
    elif isinstance(instance, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(instance):
            out += unknown_fields(item, schema["items"], f"{path}[{i}]")
    return out


def problems(jobset: dict) -> list[str]:
    errs = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
            for e in jsonschema.Draft7Validator(SCHEMA).iter_errors(jobset)]
    return errs + [f"unknown field {p}" for p in unknown_fields(jobset, SCHEMA)]


def _render(*extra: str, **kw) -> tuple[dict, dict]:
    cfg = load_config(REPO / "configs" / "qwen2.5-7b-to-0.5b.yaml", MULTI + list(extra))
    manifest = render_jobset(cfg, run_name="qwen-7b-to-0.5b-4x8", image="registry.example.com/kdflow:0.1.0-cuda12",
                             namespace="ml", pvc="kd-shared", gpus_per_node=8, **kw)
    assert manifest["kind"] == "List"
    config_map, jobset = manifest["items"]
    return config_map, jobset


def test_rendered_jobset_validates_against_the_published_schema():
    config_map, jobset = _render()
    assert problems(jobset) == []
    assert jobset["apiVersion"] == "jobset.x-k8s.io/v1alpha2" and jobset["kind"] == "JobSet"
    spec = jobset["spec"]
    (rjob,) = spec["replicatedJobs"]
    assert rjob["replicas"] == 4  # one single-pod Job per node
    pod = rjob["template"]["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == c["resources"]["requests"]["nvidia.com/gpu"] == 8
    vols = {v["name"]: v for v in pod["volumes"]}
    assert vols["shared"]["persistentVolumeClaim"]["claimName"] == "kd-shared"
    assert vols["dshm"]["emptyDir"]["medium"] == "Memory"
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert mounts["/shared"] == "shared" and mounts["/dev/shm"] == "dshm"
    # the headless Service is JobSet's own: node 0's DNS name is the rendezvous, known before any pod exists
    assert spec["network"] == {"enableDNSHostnames": True, "subdomain": "qwen-7b-to-0-5b-4x8",
                               "publishNotReadyAddresses": True}
    cfg = RunConfig.model_validate_json(config_map["data"]["config.json"])
    assert cfg.train.rendezvous.endpoint == "qwen-7b-to-0-5b-4x8-node-0-0.qwen-7b-to-0-5b-4x8:29400"
    assert cfg.train.rendezvous.nnodes == 4 and cfg.train.nproc_per_node == 8 and cfg.train.device == "cuda"
    assert c["ports"][0]["containerPort"] == 29400
    assert c["command"][-1] == "/etc/kdflow/config.json" and vols["config"]["configMap"]["name"] == config_map["metadata"]["name"]
    env = {e["name"]: e for e in c["env"]}
    assert env["KDFLOW_NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.labels['jobset.sigs.k8s.io/job-index']"
    assert spec["failurePolicy"]["maxRestarts"] == 2  # one node fails: all restart, resuming from the checkpoint


def test_the_validation_catches_what_the_api_server_would_refuse():
    _, jobset = _render()
    typo = copy.deepcopy(jobset)
    job = typo["spec"]["replicatedJobs"][0]["template"]["spec"]
    job["paralelism"] = job.pop("parallelism")
    assert problems(typo) == ["unknown field $.spec.replicatedJobs[0].template.spec.paralelism"]
    wrong = copy.deepcopy(jobset)
    wrong["spec"]["replicatedJobs"][0]["replicas"] = "4"
    assert any("replicas" in p and "integer" in p for p in problems(wrong)), problems(wrong)
    no_image = copy.deepcopy(jobset)
    no_image["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]["containers"] = [{"image": "x"}]
    assert any("'name' is a required property" in p for p in problems(no_image))
    bad_pod = copy.deepcopy(jobset)
    bad_pod["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]["volumes"][1]["emptyDir"]["sizeLimt"] = 1
    assert problems(bad_pod) == [
        "unknown field $.spec.replicatedJobs[0].template.spec.template.spec.volumes[1].emptyDir.sizeLimt"]


def test_render_refuses_what_no_cluster_could_run():
    cfg = load_config(REPO / "configs" / "smoke.yaml", ["train.distributed=ddp", "train.rendezvous.nnodes=2"])
    with pytest.raises(ConfigError, match="work_dir: 'runs' is not under /shared"):
        render_jobset(cfg, run_name="x", image="i")
    shared = load_config(REPO / "configs" / "smoke.yaml", MULTI)
    with pytest.raises(ConfigError, match="train.nproc_per_node: auto needs --gpus-per-node"):
        render_jobset(shared, run_name="x", image="i")
    one = load_config(REPO / "configs" / "smoke.yaml", ["work_dir=/shared/r", "evidence_dir=/shared/e"])
    with pytest.raises(ConfigError, match="train.rendezvous.nnodes"):
        render_jobset(one, run_name="x", image="i", gpus_per_node=1)


def test_cli_prints_yaml_and_exits_2_on_bad_input(capsys):
    sets = [a for s in MULTI for a in ("--set", s)]
    assert main(["render-jobset", str(REPO / "configs" / "smoke.yaml"), "--image", "img:1", "--gpus-per-node", "2",
                 "--run-name", "smoke-2x2", *sets]) == 0
    docs = yaml.safe_load(capsys.readouterr().out)
    assert problems(docs["items"][1]) == [] and docs["items"][1]["metadata"]["name"] == "smoke-2x2"
    assert main(["render-jobset", str(REPO / "configs" / "smoke.yaml"), "--image", "img:1"]) == 2
    assert "train.rendezvous.nnodes" in capsys.readouterr().err
