"""Deployment files rendered from a plan: every hard limit in them comes from the plan's arithmetic.

CPU plans deploy this project's server (llama.cpp engine); GPU plans deploy vLLM's OpenAI server
(``vllm serve``), which this project's API can front with its remote backend.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from pathlib import Path

from allinone import __version__
from allinone.planner.plan import GiB, MiB

TARGETS = ("systemd", "docker", "compose", "k8s", "vllm")
# Hugging Face repositories vLLM loads for each (shape, dtype).
_HF_SUFFIX = {"awq-int4": "-AWQ", "gptq-int4": "-GPTQ-Int4"}


@dataclass
class DeployOptions:
    """Names and paths the files use."""

    image: str = f"allinone:{__version__}"
    port: int = 8000
    user: str = "allinone"
    exec_path: str = "/opt/allinone/.venv/bin/allinone"
    model_dir: str = "/var/lib/allinone"
    drain_timeout_s: int = 30
    gpus_per_node: int | None = None
    vllm_image: str = "vllm/vllm-openai:v0.11.0"
    # Kubernetes: replicas of the Deployment (at least the plan's instances) and the ceiling the
    # autoscalers may reach; the Prometheus server KEDA asks for the queue depth.
    replicas: int = 2
    max_replicas: int = 8
    prometheus_url: str = "http://prometheus-server.monitoring.svc:9090"


def _mb(n: int) -> str:
    return f"{int(n // MiB)}M"


def _server_env(plan: dict, cache_dir: str, opts: DeployOptions) -> dict[str, str]:
    s = plan["server"]
    return {
        "ALLINONE_MODEL": _model_ref(plan, cache_dir),
        "ALLINONE_CACHE_DIR": cache_dir,
        "ALLINONE_PARALLEL": str(s["parallel"]),
        "ALLINONE_CTX_PER_SEQ": str(s["ctx_per_seq"]),
        "ALLINONE_THREADS": str(s["threads"]),
        "ALLINONE_MEMORY_SOFT_LIMIT_MB": str(s["memory_soft_limit_mb"]),
        "ALLINONE_MEMORY_HARD_LIMIT_MB": str(s["memory_hard_limit_mb"]),
        "ALLINONE_DRAIN_TIMEOUT_S": str(opts.drain_timeout_s),
    }


def _model_ref(plan: dict, cache_dir: str) -> str:
    """ALLINONE_MODEL inside the deployment: a catalog name, or the GGUF in the volume."""
    ref = plan.get("model_ref", "default")
    if ref.endswith(".gguf"):
        return f"{cache_dir}/models/{Path(ref).name}"
    return ref


def _header(plan: dict) -> list[str]:
    return [
        f"# Rendered by allinone {__version__} from a plan: {plan['model']} ({plan['dtype']}), "
        f"context {plan['context']} x {plan['concurrency']} sequences on "
        f"{plan['devices']['label']}.",
        f"# Predicted per instance: {plan['total_bytes'] / GiB:.2f} GiB; fits: {plan['fits']}.",
    ]


def render_systemd(plan: dict, opts: DeployOptions) -> dict[str, str]:
    """A hardened unit whose MemoryMax is the plan's limit and whose server budget sits below it."""
    _require_cpu(plan, "systemd")
    limit = plan["host"]["memory_limit_bytes"]
    env = _server_env(plan, opts.model_dir, opts)
    lines = [
        *_header(plan),
        "[Unit]",
        f"Description=allinone LLM service ({plan['model']})",
        "After=network-online.target",
        "Wants=network-online.target",
        "",
        "[Service]",
        "Type=exec",
        f"User={opts.user}",
        f"Group={opts.user}",
        *(f"Environment={k}={v}" for k, v in env.items()),
        f"ExecStart={opts.exec_path} serve --host 0.0.0.0 --port {opts.port}",
        # Restart on any exit: the server exits non-zero above its hard memory limit on purpose.
        "Restart=always",
        "RestartSec=5",
        "KillSignal=SIGTERM",
        f"TimeoutStopSec={opts.drain_timeout_s + 10}",
        f"MemoryMax={_mb(limit)}",
        f"MemoryHigh={_mb(int(limit * 0.95))}",
        "MemorySwapMax=0",
        f"CPUQuota={plan['host']['cpus'] * 100}%",
        "TasksMax=512",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "PrivateDevices=yes",
        "ProtectKernelTunables=yes",
        "ProtectControlGroups=yes",
        "RestrictSUIDSGID=yes",
        "StateDirectory=allinone",
        f"ReadWritePaths={opts.model_dir}",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
    ]
    return {"allinone.service": "\n".join(lines) + "\n"}


def _require_cpu(plan: dict, target: str) -> None:
    if plan["engine"] != "llama_cpp":
        raise ValueError(
            f"{target} renders this project's CPU server; for a GPU plan use `deploy vllm` "
            "(or docker/compose/k8s, which run vLLM's image)"
        )


DOCKERFILE = """\
# syntax=docker/dockerfile:1
# Build stage: compiles llama-cpp-python (no OpenMP, so the slim runtime needs no libgomp).
FROM python:3.11-slim-bookworm AS build
WORKDIR /src
COPY requirements.txt pyproject.toml README.md ./
COPY src ./src
ENV CMAKE_ARGS="-DGGML_OPENMP=OFF -DGGML_NATIVE=OFF" \\
    PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN pip wheel --wheel-dir /wheels -r requirements.txt .

FROM python:3.11-slim-bookworm
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 \\
    ALLINONE_CACHE_DIR=/models ALLINONE_DOWNLOAD=false
COPY --from=build /wheels /wheels
RUN pip install --no-index /wheels/*.whl && rm -rf /wheels \\
    && useradd --system --uid 10001 --home-dir /models --shell /usr/sbin/nologin allinone
# The model is not in the image: mount the cache with the verified GGUF at /models.
VOLUME ["/models"]
USER 10001
EXPOSE {port}
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \\
  CMD ["python", "-c", \\
       "import urllib.request; urllib.request.urlopen('http://127.0.0.1:{port}/health', timeout=4)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["allinone", "serve", "--host", "0.0.0.0", "--port", "{port}"]
"""


def _docker_run(plan: dict, opts: DeployOptions) -> str:
    host = plan["host"]
    mem = _mb(host["memory_limit_bytes"]).lower()
    args = [
        "docker run -d --name allinone --restart unless-stopped",
        f"--memory {mem} --memory-swap {mem}",
        f"--cpus {host['cpus']}",
        f"--shm-size {_mb(host['shm_bytes']).lower()}",
        "--pids-limit 512 --read-only --tmpfs /tmp --cap-drop ALL --security-opt no-new-privileges",
        f"--stop-timeout {opts.drain_timeout_s + 10}",
        f"-p {opts.port}:{opts.port}",
    ]
    if plan["engine"] == "llama_cpp":
        env = _server_env(plan, "/models", opts)
        env.pop("ALLINONE_CACHE_DIR")
        args += ["-v $HOME/.cache/allinone:/models:ro"]
        args += [f"-e {k}={shlex.quote(v)}" for k, v in env.items()]
        args += [opts.image]
    else:
        args += [
            f"--gpus {plan['tensor_parallel']['size']}",
            "-v $HOME/.cache/huggingface:/root/.cache/huggingface",
        ]
        args += [opts.vllm_image, *_vllm_args(plan, opts)]
    return " \\\n  ".join(args) + "\n"


def render_docker(plan: dict, opts: DeployOptions) -> dict[str, str]:
    """Dockerfile (slim, non-root, model in a volume, HEALTHCHECK) and the `docker run` line."""
    files = {
        "docker-run.sh": "#!/bin/sh\n" + "\n".join(_header(plan)) + "\n" + _docker_run(plan, opts)
    }
    if plan["engine"] == "llama_cpp":
        files["Dockerfile"] = DOCKERFILE.replace("{port}", str(opts.port))
    return files


def render_compose(plan: dict, opts: DeployOptions) -> dict[str, str]:
    """A compose file with the same limits as `docker run`."""
    import yaml

    host = plan["host"]
    mem = _mb(host["memory_limit_bytes"]).lower()
    health = {
        "test": [
            "CMD",
            "python3",
            "-c",
            f"import urllib.request; urllib.request.urlopen("
            f"'http://127.0.0.1:{opts.port}/health', timeout=4)",
        ],
        "interval": "15s",
        "timeout": "5s",
        "retries": 3,
        "start_period": "60s",
    }
    svc: dict = {
        "restart": "always",
        "ports": [f"{opts.port}:{opts.port}"],
        "mem_limit": mem,
        "memswap_limit": mem,
        "cpus": host["cpus"],
        "shm_size": _mb(host["shm_bytes"]).lower(),
        "stop_grace_period": f"{opts.drain_timeout_s + 10}s",
        "healthcheck": health,
    }
    if plan["engine"] == "llama_cpp":
        env = _server_env(plan, "/models", opts)
        svc.update(
            {
                "image": opts.image,
                "build": ".",
                "read_only": True,
                "tmpfs": ["/tmp"],
                "cap_drop": ["ALL"],
                "security_opt": ["no-new-privileges:true"],
                "environment": env,
                "volumes": ["${HOME}/.cache/allinone:/models:ro"],
            }
        )
        name = "allinone"
    else:
        svc.update(
            {
                "image": opts.vllm_image,
                "command": _vllm_args(plan, opts),
                "ipc": "host" if plan["tensor_parallel"]["size"] > 1 else "private",
                "volumes": ["${HOME}/.cache/huggingface:/root/.cache/huggingface"],
                "deploy": {
                    "resources": {
                        "reservations": {
                            "devices": [
                                {
                                    "driver": "nvidia",
                                    "count": plan["tensor_parallel"]["size"],
                                    "capabilities": ["gpu"],
                                }
                            ]
                        }
                    }
                },
            }
        )
        svc.pop("shm_size") if svc["ipc"] == "host" else None
        name = "vllm"
    doc = {"services": {name: svc}}
    text = "\n".join(_header(plan)) + "\n" + yaml.safe_dump(doc, sort_keys=False)
    return {"compose.yaml": text}


# Requests waiting for an engine sequence, per pod: this server's gauge
# (observability/metrics.py, EngineCollector) and vLLM's.
QUEUE_METRIC = {"llama_cpp": "allinone_engine_queue_depth", "vllm": "vllm:num_requests_waiting"}


def render_k8s(plan: dict, opts: DeployOptions) -> dict[str, str]:
    """Deployment + Service: requests equal limits (Guaranteed QoS), probes on /health, /ready,
    ``opts.replicas`` replicas; and two autoscalers to choose from: a HorizontalPodAutoscaler on
    CPU (CPU plans) and a KEDA ScaledObject on the queue depth."""
    import yaml

    host = plan["host"]
    gpu = plan["engine"] == "vllm"
    limits = {
        "memory": _mb(host["memory_limit_bytes"]).replace("M", "Mi"),
        "cpu": str(host["cpus"]),
    }
    if gpu:
        limits["nvidia.com/gpu"] = str(plan["tensor_parallel"]["size"])
    probe = {
        "httpGet": {"path": "/health", "port": opts.port},
        "periodSeconds": 10,
        "timeoutSeconds": 5,
        "failureThreshold": 3,
    }
    container: dict = {
        "name": "vllm" if gpu else "allinone",
        "image": opts.vllm_image if gpu else opts.image,
        "ports": [{"containerPort": opts.port, "name": "http"}],
        "resources": {"requests": dict(limits), "limits": limits},
        "livenessProbe": probe,
        "readinessProbe": {
            **probe,
            "httpGet": {"path": "/health" if gpu else "/ready", "port": opts.port},
            "periodSeconds": 5,
        },
        "startupProbe": {**probe, "failureThreshold": 60},
        "volumeMounts": [
            {"name": "models", "mountPath": "/models", "readOnly": not gpu},
            {"name": "shm", "mountPath": "/dev/shm"},
        ],
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": not gpu,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    if gpu:
        container["args"] = _vllm_args(plan, opts)
        container["env"] = [{"name": "HF_HOME", "value": "/models"}]
    else:
        env = _server_env(plan, "/models", opts)
        container["env"] = [{"name": k, "value": v} for k, v in env.items()]
        container["volumeMounts"].append({"name": "tmp", "mountPath": "/tmp"})
    volumes = [
        {"name": "models", "persistentVolumeClaim": {"claimName": "allinone-models"}},
        {
            "name": "shm",
            "emptyDir": {
                "medium": "Memory",
                "sizeLimit": _mb(host["shm_bytes"]).replace("M", "Mi"),
            },
        },
    ]
    if not gpu:
        volumes.append({"name": "tmp", "emptyDir": {}})
    labels = {"app.kubernetes.io/name": "allinone"}
    pod_security = {"runAsNonRoot": True, "runAsUser": 10001, "fsGroup": 10001} if not gpu else {}
    replicas = max(opts.replicas, plan["instances"])
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "allinone", "labels": labels},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
            },
            "template": {
                "metadata": {
                    "labels": labels,
                    # the common scrape convention (Prometheus' kubernetes-pods job): KEDA's
                    # query below reads the queue depth these scrapes collect
                    "annotations": {
                        "prometheus.io/scrape": "true",
                        "prometheus.io/port": str(opts.port),
                        "prometheus.io/path": "/metrics",
                    },
                },
                "spec": {
                    # Matches the server's drain: in-flight requests finish before SIGKILL.
                    "terminationGracePeriodSeconds": opts.drain_timeout_s + 10,
                    "securityContext": pod_security,
                    "containers": [container],
                    "volumes": volumes,
                },
            },
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "allinone", "labels": labels},
        "spec": {
            "selector": labels,
            "ports": [{"name": "http", "port": opts.port, "targetPort": "http"}],
        },
    }
    header = "\n".join(_header(plan)) + "\n"
    text = header + yaml.safe_dump_all([deployment, service], sort_keys=False)
    files = {"allinone.k8s.yaml": text}
    target = {"apiVersion": "apps/v1", "kind": "Deployment", "name": "allinone"}
    # Scale down slowly: a new pod loads its model before it is ready, and an idle one still
    # holds its prefix and prompt caches.
    behavior = {
        "scaleDown": {
            "stabilizationWindowSeconds": 300,
            "policies": [{"type": "Pods", "value": 1, "periodSeconds": 60}],
        }
    }
    bounds = (replicas, max(replicas, opts.max_replicas))
    if not gpu:
        hpa = {
            "apiVersion": "autoscaling/v2",
            "kind": "HorizontalPodAutoscaler",
            "metadata": {"name": "allinone", "labels": labels},
            "spec": {
                "scaleTargetRef": target,
                "minReplicas": bounds[0],
                "maxReplicas": bounds[1],
                # llama.cpp's threads keep their CPUs busy while sequences decode: CPU use is
                # load, and requests equal limits, so 70 % of the request is 70 % of the quota
                "metrics": [
                    {
                        "type": "Resource",
                        "resource": {
                            "name": "cpu",
                            "target": {"type": "Utilization", "averageUtilization": 70},
                        },
                    }
                ],
                "behavior": behavior,
            },
        }
        files["allinone-hpa.yaml"] = (
            header
            + "# Autoscaler, choice 1 of 2: CPU use. Apply this OR allinone-keda.yaml, not both\n"
            + "# (KEDA makes its own HorizontalPodAutoscaler for the same Deployment).\n"
            + yaml.safe_dump(hpa, sort_keys=False)
        )
    metric = QUEUE_METRIC[plan["engine"]]
    # AverageValue: KEDA divides the sum over pods by this, so each pod is asked to hold about one
    # batch of waiting requests (its engine's sequences) before another pod is added.
    scaled = {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": {"name": "allinone", "labels": labels},
        "spec": {
            "scaleTargetRef": target,
            "pollingInterval": 15,
            "cooldownPeriod": 300,
            "minReplicaCount": bounds[0],
            "maxReplicaCount": bounds[1],
            "advanced": {"horizontalPodAutoscalerConfig": {"behavior": behavior}},
            "triggers": [
                {
                    "type": "prometheus",
                    "metricType": "AverageValue",
                    "metadata": {
                        "serverAddress": opts.prometheus_url,
                        "query": f'sum({metric}{{app_kubernetes_io_name="allinone"}})',
                        "threshold": str(plan["concurrency"]),
                        "activationThreshold": "0",
                    },
                }
            ],
        },
    }
    files["allinone-keda.yaml"] = (
        header
        + "# Autoscaler, choice 2 of 2: requests waiting for an engine sequence (KEDA, Prometheus\n"
        + f"# scaler, metric {metric}). Apply this OR allinone-hpa.yaml, not both.\n"
        + yaml.safe_dump(scaled, sort_keys=False)
    )
    return files


def _hf_model(plan: dict) -> str:
    name = plan["model"]
    return f"Qwen/{name}{_HF_SUFFIX.get(plan['dtype'], '')}" if name.startswith("Qwen") else name


def _vllm_args(plan: dict, opts: DeployOptions) -> list[str]:
    """`vllm serve` arguments for the plan's model, parallelism, context and memory."""
    if plan["engine"] != "vllm":
        raise ValueError("vllm flags need a GPU plan: pass --devices NxSIZE (e.g. 4x24GiB)")
    args = [
        "serve",
        _hf_model(plan),
        "--host",
        "0.0.0.0",
        "--port",
        str(opts.port),
        "--tensor-parallel-size",
        str(plan["tensor_parallel"]["size"]),
        "--max-model-len",
        str(plan["context"]),
        "--max-num-seqs",
        str(plan["concurrency"]),
        "--gpu-memory-utilization",
        str(plan["gpu_memory_utilization"]),
        "--enable-prefix-caching",
    ]
    if plan["dtype"] in ("bf16", "fp16", "fp32"):
        args += [
            "--dtype",
            {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[plan["dtype"]],
        ]
    elif plan["dtype"] in ("awq-int4", "gptq-int4"):
        args += ["--quantization", plan["dtype"].split("-")[0]]
    if plan["kv_dtype"] == "fp8":
        args += ["--kv-cache-dtype", "fp8"]
    if plan["context"] > plan["shape"]["context"]:
        factor = plan["context"] / plan["shape"]["context"]
        rope = {
            "rope_type": "yarn",
            "factor": factor,
            "original_max_position_embeddings": plan["shape"]["context"],
        }
        args += ["--hf-overrides", json.dumps({"rope_scaling": rope})]
    return args


def render_vllm(plan: dict, opts: DeployOptions) -> dict[str, str]:
    """The `vllm serve` command per instance, and a Ray multi-node script when GPUs span nodes."""
    tp = plan["tensor_parallel"]["size"]
    per_node = opts.gpus_per_node or plan["devices"]["count"]
    lines = ["#!/bin/sh", *_header(plan), "set -e"]
    files: dict[str, str] = {}
    if tp <= per_node:
        for i in range(plan["instances"]):
            gpus = ",".join(str(g) for g in range(i * tp, (i + 1) * tp))
            o = DeployOptions(**{**opts.__dict__, "port": opts.port + i})
            cmd = " ".join(shlex.quote(a) for a in _vllm_args(plan, o))
            lines.append(f"CUDA_VISIBLE_DEVICES={gpus} vllm {cmd} &")
        lines.append("wait")
        files["vllm-serve.sh"] = "\n".join(lines) + "\n"
        return files
    # One instance larger than a node: tensor parallel inside a node, pipeline parallel across
    # nodes, over a Ray cluster (vLLM's multi-node recipe).
    nodes = -(-tp // per_node)
    args = _vllm_args(plan, opts)
    i = args.index("--tensor-parallel-size")
    args[i + 1] = str(per_node)
    args += ["--pipeline-parallel-size", str(nodes), "--distributed-executor-backend", "ray"]
    cmd = " ".join(shlex.quote(a) for a in args)
    files["vllm-ray.sh"] = (
        "\n".join(
            [
                *lines,
                f"# {nodes} nodes x {per_node} GPUs. On the head node:",
                'if [ "$1" = head ]; then',
                "  ray start --head --port=6379",
                f"  vllm {cmd}",
                "else",
                '  ray start --address="${HEAD_IP:?set HEAD_IP}:6379" --block',
                "fi",
            ]
        )
        + "\n"
    )
    return files


RENDERERS = {
    "systemd": render_systemd,
    "docker": render_docker,
    "compose": render_compose,
    "k8s": render_k8s,
    "vllm": render_vllm,
}


def render(target: str, plan: dict, opts: DeployOptions | None = None) -> dict[str, str]:
    """File name -> contents for ``target``."""
    if target not in RENDERERS:
        raise ValueError(f"unknown deploy target {target!r}; valid: {', '.join(TARGETS)}")
    return RENDERERS[target](plan, opts or DeployOptions())


def write(files: dict[str, str], out: Path) -> list[Path]:
    """Write rendered files under ``out`` (scripts executable)."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, text in files.items():
        path = out / name
        path.write_text(text, encoding="utf-8")
        if name.endswith(".sh"):
            path.chmod(0o755)
        paths.append(path)
    return paths
