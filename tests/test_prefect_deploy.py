"""What is shipped for production, checked without a server: prefect.yaml, the flows' parameter forms,
the Kubernetes GPU job template, `make up` / `make down`, and how a failed training child is reported."""

from __future__ import annotations

import importlib
import json
import subprocess
from types import SimpleNamespace
from uuid import uuid4
from zoneinfo import ZoneInfo

import pytest
import yaml

from kd.config import RunConfig, load_config
from tests.conftest import REPO

PREFECT_YAML = yaml.safe_load((REPO / "prefect.yaml").read_text())
NODE_DEPLOYMENTS = [d for d in PREFECT_YAML["deployments"] if d["entrypoint"] == "flows/multinode.py:kd_train_node"]
DEPLOYMENTS = {d["name"]: d for d in PREFECT_YAML["deployments"] if d not in NODE_DEPLOYMENTS}
K8S_TEMPLATE = json.loads((REPO / "deploy" / "k8s-gpu-job-template.json").read_text())


def _flow(entrypoint: str):
    path, name = entrypoint.split(":")
    return getattr(importlib.import_module(path.removesuffix(".py").replace("/", ".")), name)


def test_deployments_pools_and_entrypoints():
    expected = {"manual": ("distill", "cpu"), "nightly-smoke": ("distill", "cpu"), "gpu": ("kd-train", "gpu"),
                "sweep": ("sweep", "cpu")}
    expected.update({p.stem: ("distill", "cpu") for p in (REPO / "configs").glob("*.yaml")})  # one per preset
    assert set(DEPLOYMENTS) == set(expected)
    for name, (flow_name, pool) in expected.items():
        d = DEPLOYMENTS[name]
        assert _flow(d["entrypoint"]).name == flow_name, name
        assert d["work_pool"]["name"] == pool
        assert d["enforce_parameter_schema"] is True  # the server refuses invalid parameters before a run
    (node,) = NODE_DEPLOYMENTS  # kd-train-node/gpu: the per-node flow of a multi-node training (issue 19)
    assert _flow(node["entrypoint"]).name + "/" + node["name"] == "kd-train-node/gpu"
    assert node["work_pool"]["name"] == "gpu" and node["enforce_parameter_schema"] is True


def test_nightly_smoke_is_the_smoke_preset_on_a_cron_with_a_timezone():
    d = DEPLOYMENTS["nightly-smoke"]
    (schedule,) = d["schedules"]
    assert schedule["cron"] == "0 2 * * *" and ZoneInfo(schedule["timezone"])
    params = RunConfig.model_validate(d["parameters"]["config"])
    smoke = load_config(REPO / "configs" / "smoke.yaml")
    # the preset itself, plus: cache off (a nightly proof must really run) and training on the gpu pool
    assert params.orchestration.refresh_cache is True
    assert params.orchestration.train_deployment == "kd-train/gpu"
    assert params.model_dump(exclude={"orchestration"}) == smoke.model_dump(exclude={"orchestration"})
    # the delegated deployment name points at a deployment this file defines
    flow_name, dep_name = params.orchestration.train_deployment.split("/")
    assert _flow(DEPLOYMENTS[dep_name]["entrypoint"]).name == flow_name


def test_manual_deployment_form_has_descriptions_and_defaults():
    """The UI builds its run form from this schema: every RunConfig field shows help text and its default."""
    from prefect.utilities.callables import parameter_schema

    from flows.distill import distill

    schema = parameter_schema(distill.fn).model_dump_for_openapi()
    assert schema["required"] == ["config"]
    defs = schema["definitions"]
    assert {"RunConfig", "ModelRef", "DataConfig", "KDConfig", "TrainConfig", "EvalConfig",
            "OrchestrationConfig"} <= set(defs)

    def described(p: dict) -> bool:  # pydantic drops a $ref field's description when it repeats the model's
        ref = p.get("$ref", "").rsplit("/", 1)[-1]
        return bool(p.get("description") or (ref and defs[ref].get("description")))

    undocumented = [f"{m}.{f}" for m, d in defs.items() for f, p in d["properties"].items() if not described(p)]
    assert undocumented == []
    assert defs["KDConfig"]["properties"]["temperature"]["default"] == 4.0
    assert defs["OrchestrationConfig"]["properties"]["gpu_slots"]["default"] == "gpu-0"


def test_kd_train_flow_persists_its_result_and_names_runs_after_the_parent():
    from flows.train import kd_train

    assert kd_train.name == "kd-train" and kd_train.persist_result is True
    assert kd_train.flow_run_name == "train-{run_name}"
    from prefect.utilities.callables import parameter_schema

    assert set(parameter_schema(kd_train.fn).model_dump_for_openapi()["required"]) == {
        "config", "teacher", "student", "alignment", "run_name"}


def test_k8s_template_requests_a_gpu_and_renders():
    from prefect.utilities.templating import apply_values, find_placeholders

    variables = K8S_TEMPLATE["variables"]
    names = {p.name for p in find_placeholders(K8S_TEMPLATE["job_configuration"])}
    assert names <= set(variables["properties"]), names - set(variables["properties"])
    defaults = {k: v.get("default") for k, v in variables["properties"].items()}
    defaults.update(image="registry.example.com/kdflow:test", command="python -m prefect.engine", labels={})
    job = apply_values(K8S_TEMPLATE["job_configuration"], defaults)
    (container,) = job["job_manifest"]["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1  # an int after rendering, as k8s wants
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert job["env"]["PREFECT_RESULTS_LOCAL_STORAGE_PATH"].startswith("/shared/")
    assert any(v.get("persistentVolumeClaim") for v in job["job_manifest"]["spec"]["template"]["spec"]["volumes"])


def test_make_up_and_down_call_the_local_stack_script():
    makefile = (REPO / "Makefile").read_text()
    assert "\nup:" in makefile and "deploy/local.sh up" in makefile
    assert "\ndown:" in makefile and "deploy/local.sh down" in makefile
    script = REPO / "deploy" / "local.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    for needle in ("--install-policy never", "--analytics-off", "deploy --all", "flows.up pools", "flows.up check"):
        assert needle in text, needle  # what flows.up does on a real server: tests/test_prefect_server.py


def test_every_preset_is_a_deployment_with_the_presets_values():
    """distill/<preset> for each configs/*.yaml, its parameters equal to the YAML (the generated block of
    prefect.yaml is current: `python -m flows.presets --write` regenerates it)."""
    from flows.presets import main as presets_check

    assert presets_check([]) == 0, "prefect.yaml is stale: run `python -m flows.presets --write`"
    for path in sorted((REPO / "configs").glob("*.yaml")):
        d = DEPLOYMENTS[path.stem]
        assert d["entrypoint"] == "flows/distill.py:distill" and d["enforce_parameter_schema"] is True
        params = RunConfig.model_validate(d["parameters"]["config"])
        assert params == load_config(path), path.name


def _snapshots():
    from kd.results import ModelSnapshot, VocabAlignment

    snap = lambda role: ModelSnapshot(role=role, repo=f"tiny:{role}", revision="main", kind="tiny",  # noqa: E731
                                      resolved_commit="local", local_dir="/nonexistent", files={}, total_bytes=0)
    al = VocabAlignment(verdict="identical", teacher_rows=8, student_rows=8, teacher_tokenizer_size=8,
                        student_tokenizer_size=8, rows_kept=8, valid_vocab=8)
    return snap("teacher"), snap("student"), al


def test_crashed_child_fails_the_parent_naming_the_run(monkeypatch):
    """A child that crashed (worker lost, no exception to load) raises TrainingDeploymentFailed with
    the deployment, the child run's name and id, and its final state."""
    import prefect.deployments
    from prefect.states import Crashed

    from flows.train import TrainingDeploymentFailed, train_via_deployment

    child = SimpleNamespace(id=uuid4(), name="train-x", state=Crashed(message="worker process exited with -9"))
    seen = {}

    def fake_run_deployment(name, parameters, timeout, poll_interval):
        seen.update(name=name, parameters=parameters, timeout=timeout)
        return child

    monkeypatch.setattr(prefect.deployments, "run_deployment", fake_run_deployment)
    cfg = load_config(REPO / "configs" / "smoke.yaml", ["orchestration.train_deployment=kd-train/gpu"])
    with pytest.raises(TrainingDeploymentFailed) as err:
        train_via_deployment(cfg, *_snapshots(), "run-1")
    msg = str(err.value)
    assert "kd-train/gpu" in msg and "train-x" in msg and str(child.id) in msg and "Crashed" in msg
    assert "worker process exited with -9" in msg
    assert seen["timeout"] is None  # waits as long as training takes
    assert seen["parameters"]["run_name"] == "run-1" and seen["parameters"]["config"] == cfg.model_dump(mode="json")
    json.dumps(seen["parameters"])  # plain JSON: what the API and the UI's parameter view get


def test_sweep_deployment_is_the_smoke_sweep_preset_and_its_form_validates():
    """sweep/sweep's form is prefilled with configs/sweeps/smoke-alpha-temperature.yaml, and that spec
    passes the flow's parameter schema (what the server enforces) and expands into its 6 trials."""
    from prefect.utilities.callables import parameter_schema

    from flows.sweep import sweep
    from kd.sweep.spec import expand, load_spec

    spec = load_spec(REPO / "configs" / "sweeps" / "smoke-alpha-temperature.yaml")
    params = DEPLOYMENTS["sweep"]["parameters"]["spec"]
    assert params == yaml.safe_load((REPO / "configs" / "sweeps" / "smoke-alpha-temperature.yaml").read_text())
    schema = parameter_schema(sweep).model_dump_for_openapi()
    assert "spec" in schema["required"]
    spec_def = schema["definitions"]["SweepSpec"]
    assert spec_def["additionalProperties"] is False
    assert all(f.get("description") for f in spec_def["properties"].values())
    assert len(expand(spec)) == 6
