"""A multi-node training as a Kubernetes JobSet (jobset.x-k8s.io/v1alpha2), rendered from the config.

    kdflow render-jobset configs/qwen2.5-7b-to-0.5b.yaml --set train.distributed=fsdp \
        --set train.rendezvous.nnodes=4 --image registry.example.com/kdflow:0.1.0-cuda12 --gpus-per-node 8 > js.yaml
    kubectl apply -f js.yaml

Two objects (a `v1/List`): a ConfigMap holding the run's config (JSON, rendezvous filled in) and the
JobSet. The JobSet has one replicated job `node` with M replicas (one single-pod Job per node, so node
i is pod `<name>-node-<i>-0`), `nvidia.com/gpu` requested and limited per node, the shared
ReadWriteMany claim mounted at /shared (work_dir, evidence_dir, KDFLOW_HOME and HF_HOME live there),
a memory-backed /dev/shm, and `network.enableDNSHostnames` so the JobSet controller creates the
headless Service `<subdomain>`: the rendezvous endpoint is node 0's stable name
`<name>-node-0-0.<subdomain>:29400`, known before any pod exists. Node 0 hosts the c10d store
(`is_host` from the JobSet job-index label). Every pod runs `python -m kd.train.distributed.pod` (pull the
models into the shared caches, write its spec, exec torchrun). `failurePolicy.maxRestarts` restarts
all nodes together when one fails; training resumes from the last DCP checkpoint in work_dir.
Nothing here talks to a cluster; tests/test_jobset.py validates the output against the published CRD
schema vendored in deploy/k8s/schemas/.
"""

from __future__ import annotations

import json
import re

from kd.config import RunConfig
from kd.errors import ConfigError

API_VERSION = "jobset.x-k8s.io/v1alpha2"
RDZV_PORT = 29400
JOB = "node"
INDEX_LABEL = "jobset.sigs.k8s.io/job-index"


def dns_name(text: str, limit: int = 40) -> str:
    """An RFC 1123 label from a run name (JobSet names end up in pod host names: keep them short)."""
    name = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")[:limit].strip("-")
    if not name:
        raise ConfigError(f"name: {text!r} gives no usable Kubernetes name")
    return name


def render_jobset(cfg: RunConfig, *, run_name: str, image: str, namespace: str = "default", pvc: str = "kdflow-shared",
                  mount: str = "/shared", gpus_per_node: int | None = None, shm_size: str = "16Gi",
                  max_restarts: int = 2, service_account: str | None = None) -> dict:
    """The ConfigMap + JobSet (a v1 List) for `cfg` trained on train.rendezvous.nnodes nodes."""
    nnodes = cfg.train.rendezvous.nnodes
    if nnodes < 2:
        raise ConfigError(f"train.rendezvous.nnodes: {nnodes}; a JobSet is for several nodes (give 2 or more)")
    if cfg.train.distributed == "none":
        raise ConfigError("train.distributed: none; several nodes need ddp or fsdp")
    for field in ("work_dir", "evidence_dir"):  # every node must see them: on the shared claim
        value = getattr(cfg, field)
        if not value.startswith(mount.rstrip("/") + "/"):
            raise ConfigError(f"{field}: {value!r} is not under {mount} (the shared volume every node mounts); "
                              f"e.g. --set {field}={mount}/{'runs' if field == 'work_dir' else 'evidence'}")
    gpus = gpus_per_node if gpus_per_node is not None else cfg.train.nproc_per_node
    if gpus == "auto":
        raise ConfigError("train.nproc_per_node: auto needs --gpus-per-node N to size the pods' nvidia.com/gpu")
    gpus = int(gpus)
    name = dns_name(run_name)
    endpoint = f"{name}-{JOB}-0-0.{name}:{RDZV_PORT}"
    run_cfg = cfg.model_copy(update={"name": run_name, "train": cfg.train.model_copy(update={
        "nproc_per_node": gpus, "device": "cuda" if cfg.train.device == "auto" else cfg.train.device,
        "rendezvous": cfg.train.rendezvous.model_copy(update={"endpoint": endpoint, "id": name})})})
    RunConfig.model_validate(run_cfg.model_dump())  # still a valid config (endpoint pattern, bounds)
    labels = {"app.kubernetes.io/name": "kdflow", "app.kubernetes.io/component": "train", "kdflow/run": name}
    config_map = {
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": f"{name}-config", "namespace": namespace, "labels": dict(labels)},
        "data": {"config.json": json.dumps(run_cfg.model_dump(mode="json"), indent=1)},
    }
    env = [
        {"name": "KDFLOW_NODE_RANK", "valueFrom": {"fieldRef": {"fieldPath": f"metadata.labels['{INDEX_LABEL}']"}}},
        {"name": "KDFLOW_HOME", "value": f"{mount}/kdflow-home"},
        {"name": "HF_HOME", "value": f"{mount}/hf-home"},
        {"name": "PREFECT_RESULTS_LOCAL_STORAGE_PATH", "value": f"{mount}/prefect-results"},
        {"name": "OMP_NUM_THREADS", "value": "1"},
    ]
    container = {
        "name": "trainer", "image": image, "imagePullPolicy": "IfNotPresent", "workingDir": "/opt/kdflow",
        "command": ["python", "-m", "kd.train.distributed.pod", "/etc/kdflow/config.json"],
        "env": env,
        "ports": [{"name": "rendezvous", "containerPort": RDZV_PORT, "protocol": "TCP"}],
        "resources": {"limits": {"nvidia.com/gpu": gpus}, "requests": {"nvidia.com/gpu": gpus}},
        "volumeMounts": [{"name": "shared", "mountPath": mount}, {"name": "dshm", "mountPath": "/dev/shm"},
                         {"name": "config", "mountPath": "/etc/kdflow", "readOnly": True}],
    }
    pod_spec = {
        "restartPolicy": "Never",
        "containers": [container],
        "volumes": [{"name": "shared", "persistentVolumeClaim": {"claimName": pvc}},
                    {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": shm_size}},
                    {"name": "config", "configMap": {"name": f"{name}-config"}}],
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    }
    if service_account:
        pod_spec["serviceAccountName"] = service_account
    jobset = {
        "apiVersion": API_VERSION, "kind": "JobSet",
        "metadata": {"name": name, "namespace": namespace, "labels": dict(labels)},
        "spec": {
            "network": {"enableDNSHostnames": True, "subdomain": name, "publishNotReadyAddresses": True},
            # one node fails -> every node restarts (resuming from the last checkpoint), at most max_restarts times
            "failurePolicy": {"maxRestarts": max_restarts},
            "successPolicy": {"operator": "All", "targetReplicatedJobs": [JOB]},
            "replicatedJobs": [{
                "name": JOB, "replicas": nnodes,
                "template": {
                    "metadata": {"labels": dict(labels)},
                    "spec": {"parallelism": 1, "completions": 1, "backoffLimit": 0,
                             "template": {"metadata": {"labels": dict(labels)}, "spec": pod_spec}},
                },
            }],
        },
    }
    return {"apiVersion": "v1", "kind": "List", "items": [config_map, jobset]}
