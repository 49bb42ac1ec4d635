"""`allinone plan` and `allinone deploy`: memory and limits of a deployment, and its files."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from allinone.cli.common import FlagGroups, add_command


def _plan_from_args(args: argparse.Namespace) -> dict:
    from allinone.planner.plan import PlanRequest, make_plan

    if getattr(args, "plan", None):
        return json.loads(Path(args.plan).read_text(encoding="utf-8"))
    return make_plan(
        PlanRequest(
            model=args.model,
            dtype=args.dtype,
            kv_dtype=args.kv_dtype,
            context=args.context,
            concurrency=args.concurrency,
            devices=args.devices,
            instances=args.instances,
            headroom=args.headroom,
            # the target's threads, not this machine's: deploy files set the container's CPU
            # limit to the same number, and the server's own count (cpu_budget) agrees with it
            threads=args.threads,
        )
    )


def cmd_plan(args: argparse.Namespace) -> int:
    from allinone.planner.report import format_plan

    plan = _plan_from_args(args)
    print(json.dumps(plan, indent=2) if args.json else format_plan(plan))
    return 0 if plan["fits"] else 1


def cmd_image(args: argparse.Namespace) -> int:
    """`deploy image`: build the OCI image with podman (allinone.container.image)."""
    from allinone.container.image import ImageError, ImageOptions, build_image
    from allinone.models.fetch import default_cache_dir

    opts = ImageOptions(mirror=args.mirror, llama_wheel=args.llama_wheel)
    if args.image:
        opts.tag = args.image
    if args.out:
        opts.work = args.out
    try:
        report = build_image(opts, default_cache_dir())
    except ImageError as exc:
        print(f"allinone: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(report.__dict__, indent=2))
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    from allinone.planner.deploy import DeployOptions, render

    if args.target == "image":
        return cmd_image(args)
    plan = _plan_from_args(args)
    if args.target == "ray":
        return _write_files(_render_ray(args, plan), args.out, plan)
    opts = DeployOptions(
        drain_timeout_s=args.drain_timeout,
        gpus_per_node=args.gpus_per_node,
        replicas=args.replicas,
        max_replicas=args.autoscale_max,
    )
    if args.prometheus_url:
        opts.prometheus_url = args.prometheus_url
    if args.image:
        opts.image = args.image
    if args.exec_path:
        opts.exec_path = args.exec_path
    return _write_files(render(args.target, plan, opts), args.out, plan)


def _render_ray(args: argparse.Namespace, plan: dict) -> dict[str, str]:
    from allinone.scaleout.ray_config import RayServeOptions, render_serve_config

    options = RayServeOptions.from_plan(
        plan, min_replicas=args.min_replicas, max_replicas=args.max_replicas
    )
    return render_serve_config(options, plan)


def _write_files(files: dict[str, str], out: Path | None, plan: dict) -> int:
    from allinone.planner.deploy import write

    if not plan["fits"]:
        print("allinone: warning: the plan does not fit its devices", file=sys.stderr)
    if out is None:
        for name, text in files.items():
            print(f"# ---- {name}\n{text}")
    else:
        for path in write(files, out):
            print(path)
    return 0


def add_commands(sub: argparse._SubParsersAction, flags: FlagGroups) -> None:
    """plan, deploy: the shape of a deployment (not this process's settings)."""
    from allinone.planner.deploy import TARGETS
    from allinone.planner.formats import DTYPES, KV_DTYPES

    shape = argparse.ArgumentParser(add_help=False)
    shape.add_argument(
        "--model", default="default", help="catalog name, known model, config.json or GGUF"
    )
    shape.add_argument("--dtype", choices=DTYPES, help="weight format (cpu: q4_k_m, gpu: bf16)")
    shape.add_argument(
        "--kv-dtype", choices=list(KV_DTYPES), default="fp16", help="KV cache format"
    )
    shape.add_argument("--context", type=int, default=2048, help="tokens per sequence")
    shape.add_argument("--concurrency", type=int, default=4, help="sequences at once")
    shape.add_argument("--devices", default="cpu", help="cpu, cpu:16GiB, 4x24GiB, 1x80GiB")
    shape.add_argument("--instances", type=int, default=1, help="instances on those devices")
    shape.add_argument("--headroom", type=float, default=0.10, help="memory kept free")
    shape.add_argument(
        "--threads",
        type=int,
        default=2,
        help="CPU threads per instance; deploy files give each instance that many CPUs",
    )

    pl = add_command(sub, "plan", cmd_plan, "memory and limits for a model deployment", [shape])
    pl.add_argument("--json", action="store_true", help="print one JSON object")

    dp = add_command(
        sub, "deploy", cmd_deploy, "render deployment files from a plan", [shape, flags.replicas]
    )
    dp.add_argument(
        "target",
        choices=(*TARGETS, "ray", "image"),
        help="files to render (ray: a Ray Serve config), or `image`: build this server's OCI "
        "image with podman",
    )
    dp.add_argument("--plan", type=Path, help="a plan from `allinone plan --json` (else the flags)")
    dp.add_argument(
        "--out", type=Path, help="folder to write (default: print); image: its work folder"
    )
    dp.add_argument("--image", help="container image of this server (image: the tag to build)")
    dp.add_argument("--exec-path", help="allinone executable for the systemd unit")
    dp.add_argument("--drain-timeout", type=int, default=30, help="seconds to drain")
    dp.add_argument("--gpus-per-node", type=int, help="GPUs per machine (vllm multi-node)")
    dp.add_argument(
        "--replicas",
        type=int,
        default=2,
        help="k8s: the Deployment's replicas (autoscaler minimum)",
    )
    dp.add_argument("--autoscale-max", type=int, default=8, help="k8s: autoscaler maximum")
    dp.add_argument("--prometheus-url", help="k8s: the Prometheus server KEDA queries")
    dp.add_argument("--mirror", help="image: Debian mirror URL (default: this machine's apt's)")
    dp.add_argument(
        "--llama-wheel",
        type=Path,
        help="image: llama-cpp-python wheel (default: the wheelhouse's, as this venv runs)",
    )
