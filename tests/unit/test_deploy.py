"""Rendered deployment files pass their own tools' checks and carry the plan's limits."""

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from allinone.cli import main
from allinone.planner.deploy import DeployOptions, render
from allinone.planner.plan import PlanRequest, make_plan

BIN = Path(sys.executable).parent
CPU = make_plan(PlanRequest(context=2048, concurrency=4))
GPU = make_plan(
    PlanRequest(model="Qwen2.5-7B-Instruct", devices="4x24GiB", context=32768, concurrency=16)
)


def _tool(name: str) -> str:
    path = shutil.which(name) or (str(BIN / name) if (BIN / name).exists() else None)
    if path is None:
        pytest.skip(f"{name} is not installed")
    return path


def test_systemd_unit_verifies_and_enforces_the_plan(tmp_path):
    exe = str(BIN / "allinone")
    unit = render("systemd", CPU, DeployOptions(exec_path=exe))["allinone.service"]
    path = tmp_path / "allinone.service"
    path.write_text(unit)
    res = subprocess.run(
        [_tool("systemd-analyze"), "verify", str(path)], capture_output=True, text=True
    )
    # verify exits 0 on values it ignores, so any message at all is a failure
    assert res.returncode == 0 and res.stderr.strip() == "", res.stderr
    limit_mib = CPU["host"]["memory_limit_bytes"] // 2**20
    for line in (
        f"MemoryMax={limit_mib}M",
        "Restart=always",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "CPUQuota=200%",
        "User=allinone",
        f"Environment=ALLINONE_MEMORY_HARD_LIMIT_MB={CPU['server']['memory_hard_limit_mb']}",
        "Environment=ALLINONE_PARALLEL=4",
        "Environment=ALLINONE_CTX_PER_SEQ=2048",
    ):
        assert line in unit.splitlines(), line
    assert CPU["server"]["memory_hard_limit_mb"] < limit_mib


def test_dockerfile_passes_hadolint_and_runs_as_non_root(tmp_path):
    files = render("docker", CPU)
    (tmp_path / "Dockerfile").write_text(files["Dockerfile"])
    res = subprocess.run(
        [_tool("hadolint"), str(tmp_path / "Dockerfile")], capture_output=True, text=True
    )
    assert res.returncode == 0, res.stdout + res.stderr
    text = files["Dockerfile"]
    assert "USER 10001" in text and "HEALTHCHECK" in text and 'VOLUME ["/models"]' in text
    run = files["docker-run.sh"]
    assert f"--memory {CPU['host']['memory_limit_bytes'] // 2**20}m" in run
    assert "--cpus 2" in run and "--shm-size 64m" in run


KEDA_SCHEMA = Path(__file__).parent / "schemas" / "keda-scaledobject-v1alpha1.schema.json"


def _validate_k8s(tmp_path: Path, files: dict[str, str]) -> None:
    """kubernetes-validate --strict (bundled Kubernetes schemas, up to 1.37) on every file; it
    has no schema for KEDA's custom resource and only warns about it, so the ScaledObject is
    checked against the JSON schema written from KEDA's CRD fields (tests/unit/schemas)."""
    import jsonschema

    for name, text in files.items():
        path = tmp_path / name
        path.write_text(text)
        res = subprocess.run(
            [_tool("kubernetes-validate"), "--strict", str(path)], capture_output=True, text=True
        )
        assert res.returncode == 0, res.stdout + res.stderr
        for doc in yaml.safe_load_all(text):
            if doc["kind"] == "ScaledObject":
                assert "Couldn't find schema" in res.stdout + res.stderr  # not checked there
                jsonschema.validate(doc, json.loads(KEDA_SCHEMA.read_text()))
            else:
                assert f"passed for resource {doc['kind'].lower()}/" in res.stdout, res.stdout


def test_kubernetes_manifests_validate_with_replicas_probes_limits_and_autoscalers(tmp_path):
    files = render("k8s", CPU, DeployOptions(drain_timeout_s=45, replicas=3, max_replicas=6))
    assert set(files) == {"allinone.k8s.yaml", "allinone-hpa.yaml", "allinone-keda.yaml"}
    _validate_k8s(tmp_path, files)
    deployment, service = yaml.safe_load_all(files["allinone.k8s.yaml"])
    assert deployment["spec"]["replicas"] == 3
    spec = deployment["spec"]["template"]["spec"]
    c = spec["containers"][0]
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert c["resources"]["limits"] == c["resources"]["requests"]
    limit_mib = CPU["host"]["memory_limit_bytes"] // 2**20
    assert c["resources"]["limits"] == {"memory": f"{limit_mib}Mi", "cpu": "2"}
    assert spec["terminationGracePeriodSeconds"] == 55
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert service["kind"] == "Service"
    hpa = yaml.safe_load(files["allinone-hpa.yaml"])["spec"]
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (3, 6)
    assert hpa["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "allinone",
    }
    assert hpa["metrics"][0]["resource"]["name"] == "cpu"
    keda = yaml.safe_load(files["allinone-keda.yaml"])["spec"]
    assert (keda["minReplicaCount"], keda["maxReplicaCount"]) == (3, 6)
    trigger = keda["triggers"][0]
    assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
    assert trigger["metadata"]["threshold"] == str(CPU["concurrency"])
    # the query reads the queue-depth gauge this server exports, by its real name
    from allinone.observability.metrics import EngineCollector

    exported = {m.name for m in EngineCollector(lambda: {"queue_depth": 3}).collect()}
    metric = trigger["metadata"]["query"].split("(", 1)[1].split("{", 1)[0]
    assert metric == "allinone_engine_queue_depth" and metric in exported
    # pods are scraped where the query looks (the kubernetes-pods labelmap of the pod's label)
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == "8000"
    assert 'app_kubernetes_io_name="allinone"' in trigger["metadata"]["query"]


def test_the_keda_schema_catches_what_the_api_server_would_refuse():
    import jsonschema

    schema = json.loads(KEDA_SCHEMA.read_text())
    good = yaml.safe_load(render("k8s", CPU)["allinone-keda.yaml"])
    jsonschema.validate(good, schema)
    bad = copy.deepcopy(good)
    bad["spec"]["triggers"][0]["metadata"]["threshold"] = 4  # map[string]string in the CRD
    with pytest.raises(jsonschema.ValidationError, match="is not of type 'string'"):
        jsonschema.validate(bad, schema)
    bad = copy.deepcopy(good)
    bad["spec"]["minReplicas"] = bad["spec"].pop("minReplicaCount")  # the HPA's name, not KEDA's
    with pytest.raises(jsonschema.ValidationError, match="minReplicas"):
        jsonschema.validate(bad, schema)
    bad = copy.deepcopy(good)
    del bad["spec"]["triggers"][0]["metadata"]["query"]
    with pytest.raises(jsonschema.ValidationError, match="'query' is a required property"):
        jsonschema.validate(bad, schema)


def test_gpu_plan_renders_vllm_with_tensor_parallel_and_gpus(tmp_path):
    _validate_k8s(tmp_path, render("k8s", GPU))
    cmd = render("vllm", GPU)["vllm-serve.sh"]
    assert "--tensor-parallel-size 4" in cmd and "--max-model-len 32768" in cmd
    assert "--max-num-seqs 16" in cmd and "--gpu-memory-utilization 0.9" in cmd
    assert "Qwen/Qwen2.5-7B-Instruct" in cmd
    compose = yaml.safe_load(render("compose", GPU)["compose.yaml"])
    dev = compose["services"]["vllm"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert dev["count"] == 4
    files = render("k8s", GPU)
    k8s = list(yaml.safe_load_all(files["allinone.k8s.yaml"]))
    assert (
        k8s[0]["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
        == "4"
    )
    # no CPU autoscaler for a GPU server; KEDA scales on vLLM's own waiting-requests gauge
    assert "allinone-hpa.yaml" not in files
    assert "vllm:num_requests_waiting" in files["allinone-keda.yaml"]
    awq = make_plan(
        PlanRequest(model="Qwen2.5-7B-Instruct", dtype="awq-int4", devices="2x24GiB", instances=2)
    )
    two = render("vllm", awq)["vllm-serve.sh"]
    assert "CUDA_VISIBLE_DEVICES=0 " in two and "CUDA_VISIBLE_DEVICES=1 " in two
    assert "--quantization awq" in two and "Qwen2.5-7B-Instruct-AWQ" in two


def test_one_instance_across_nodes_uses_ray():
    script = render("vllm", GPU, DeployOptions(gpus_per_node=2))["vllm-ray.sh"]
    assert "ray start --head" in script and "--pipeline-parallel-size 2" in script
    assert "--tensor-parallel-size 2" in script and "--distributed-executor-backend ray" in script


def test_cpu_only_targets_refuse_a_gpu_plan():
    with pytest.raises(ValueError, match="deploy vllm"):
        render("systemd", GPU)
    with pytest.raises(ValueError, match="GPU plan"):
        render("vllm", CPU)


def test_deploy_cli_from_a_saved_plan(tmp_path, capsys):
    assert main(["plan", "--json", "--context", "1024", "--concurrency", "2"]) == 0
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(capsys.readouterr().out)
    assert main(["deploy", "compose", "--plan", str(plan_file), "--out", str(tmp_path)]) == 0
    svc = yaml.safe_load((tmp_path / "compose.yaml").read_text())["services"]["allinone"]
    assert svc["environment"]["ALLINONE_CTX_PER_SEQ"] == "1024"
    assert svc["read_only"] is True and svc["healthcheck"]["test"][0] == "CMD"
