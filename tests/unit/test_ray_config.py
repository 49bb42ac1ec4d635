"""The Ray Serve deployment's pieces that need no cluster: the affinity key, the home ranking,
the gathered metrics, the options from a plan and the rendered Serve config."""

from __future__ import annotations

import json

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from allinone.cli import main
from allinone.planner.plan import PlanRequest, make_plan
from allinone.scaleout.ray_config import (
    IMPORT_PATH,
    RayServeOptions,
    affinity_key,
    gather_metrics,
    render_serve_config,
    rendezvous_order,
)


def _key(body: dict, path: str = "/v1/chat/completions", headers=()) -> str | None:
    return affinity_key(path, json.dumps(body).encode(), headers)


def test_a_tasks_requests_share_a_key_and_tasks_differ():
    a = _key({"task": "sentiment", "input": "good"}, "/v1/classify")
    b = _key({"task": "sentiment", "input": ["bad", "worse"]}, "/v1/classify")
    c = _key({"task": "triage", "input": "good"}, "/v1/classify")
    assert a == b == "task:sentiment" and c == "task:triage"


def test_a_conversation_keeps_its_key_as_it_grows():
    first = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
    later = [*first, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "?"}]
    other = [first[0], {"role": "user", "content": "something else"}]
    k1, k2 = _key({"model": "chat", "messages": first}), _key({"model": "chat", "messages": later})
    assert k1 == k2 and k1.startswith("conv:chat:")
    assert _key({"model": "chat", "messages": other}) != k1
    # Anthropic's system field and content blocks
    m1 = _key({"model": "chat", "system": "s", "messages": [{"role": "user", "content": "q"}]})
    m2 = _key(
        {
            "model": "chat",
            "system": "s",
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "q"}]},
                {"role": "assistant", "content": "a"},
            ],
        }
    )
    assert m1 == m2


def test_a_session_header_wins_and_no_body_has_no_key():
    assert _key({"task": "x"}, headers=[(b"X-Session-Id", b"abc")]) == "session:abc"
    assert affinity_key("/v1/models", b"") is None
    assert affinity_key("/v1/chat/completions", b"not json") is None
    assert affinity_key("/health", b'{"task": "x"}') is None


def test_rendezvous_ranks_alike_and_moves_only_a_lost_replicas_keys():
    reps = ["r1", "r2", "r3"]
    keys = [f"task:{i}" for i in range(200)]
    home = {k: rendezvous_order(k, reps)[0] for k in keys}
    assert home == {k: rendezvous_order(k, list(reversed(reps)))[0] for k in keys}
    assert set(home.values()) == set(reps)  # all replicas get keys
    after = {k: rendezvous_order(k, ["r1", "r3"])[0] for k in keys}
    moved = {k for k in keys if home[k] != after[k]}
    assert moved == {k for k in keys if home[k] == "r2"}


def test_gathered_metrics_have_a_replica_label_and_one_header_per_family():
    text = (
        "# HELP allinone_engine_prefix_hits_total Requests served from a cached task prefix\n"
        "# TYPE allinone_engine_prefix_hits_total counter\n"
        "allinone_engine_prefix_hits_total {}\n"
    )
    body = gather_metrics({"a": text.format(3), "b": text.format(5), "c": None}).decode()
    assert body.count("# TYPE allinone_engine_prefix_hits_total counter") == 1
    samples = {
        (s.name, s.labels.get("replica")): s.value
        for fam in text_string_to_metric_families(body)
        for s in fam.samples
    }
    assert samples[("allinone_engine_prefix_hits_total", "a")] == 3
    assert samples[("allinone_engine_prefix_hits_total", "b")] == 5
    assert samples[("allinone_replica_up", "c")] == 0
    assert samples[("allinone_replica_up", "a")] == 1


def test_options_come_from_the_plan():
    plan = make_plan(PlanRequest(context=1024, concurrency=3, threads=2))
    o = RayServeOptions.from_plan(plan, min_replicas=2, max_replicas=5)
    assert o.num_cpus == 2 and o.memory_bytes > plan["host"]["memory_limit_bytes"]
    assert o.env["ALLINONE_PARALLEL"] == "3" and o.env["ALLINONE_CTX_PER_SEQ"] == "1024"
    eng = o.engine_options()
    assert eng["autoscaling_config"] == {
        "min_replicas": 2,
        "max_replicas": 5,
        "target_ongoing_requests": 3.0,
    }
    assert eng["ray_actor_options"]["memory"] == o.memory_bytes
    gpu = make_plan(PlanRequest(model="Qwen2.5-7B-Instruct", devices="1x80GiB"))
    with pytest.raises(ValueError, match="cpu"):
        RayServeOptions.from_plan(gpu)


def test_deploy_ray_renders_a_serve_config(tmp_path, capsys):
    assert main(["deploy", "ray", "--max-replicas", "4", "--out", str(tmp_path)]) == 0
    config = yaml.safe_load((tmp_path / "serve.yaml").read_text())
    app = config["applications"][0]
    assert app["import_path"] == IMPORT_PATH
    assert app["args"]["engine"]["autoscaling_config"]["max_replicas"] == 4
    schema = pytest.importorskip("ray.serve.schema", reason="ray[serve] not installed")
    schema.ServeDeploySchema.model_validate(config)  # what `serve deploy` checks


def test_the_application_builds_from_the_config_args():
    pytest.importorskip("ray.serve", reason="ray[serve] not installed")
    from allinone.scaleout.ray_serve import app_builder

    plan = make_plan(PlanRequest())
    args = yaml.safe_load(render_serve_config(RayServeOptions.from_plan(plan))["serve.yaml"])
    app = app_builder(args["applications"][0]["args"])
    engine = app._bound_deployment.init_args[0]._bound_deployment
    router = engine._deployment_config.request_router_config
    assert router.get_request_router_class().__name__ == "AffinityRouter"
    assert engine._deployment_config.autoscaling_config.max_replicas == 2
