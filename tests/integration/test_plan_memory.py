"""The planner's memory model against a real server: predicted RSS within 15% of measured."""

import concurrent.futures as cf
import time

import httpx
import psutil
import pytest

from allinone.planner.plan import PlanRequest, make_plan
from conftest import ServerProcess

CONTEXT, CONCURRENCY = 1024, 2


def _rss(pid: int) -> int:
    time.sleep(0.5)
    return psutil.Process(pid).memory_info().rss


@pytest.mark.slow
def test_predicted_rss_matches_the_server_after_load_and_after_filling_context(
    default_model_path,
):
    plan = make_plan(
        PlanRequest(model=str(default_model_path), context=CONTEXT, concurrency=CONCURRENCY)
    )
    srv = ServerProcess(
        str(default_model_path),
        {
            "ALLINONE_MODEL_ID": "m",
            "ALLINONE_PARALLEL": str(CONCURRENCY),
            "ALLINONE_CTX_PER_SEQ": str(CONTEXT),
        },
    )
    try:
        srv.wait_ready()
        after_load = _rss(srv.proc.pid)

        def fill(i: int) -> dict:
            # ~920 tokens each (checked from the usage below)
            text = " ".join(f"item{i}x{j}" for j in range(160))
            r = httpx.post(
                f"{srv.url}/v1/chat/completions",
                json={
                    "model": "m",
                    "messages": [{"role": "user", "content": text}],
                    "max_tokens": 4,
                },
                timeout=300,
            )
            assert r.status_code == 200, r.text
            return r.json()["usage"]

        with cf.ThreadPoolExecutor(CONCURRENCY) as pool:
            usages = list(pool.map(fill, range(CONCURRENCY)))
        assert all(u["prompt_tokens"] > 0.8 * CONTEXT for u in usages), usages
        after_fill = _rss(srv.proc.pid)
    finally:
        srv.stop()
    predicted = plan["predicted_rss"]
    report = (
        f"after load: predicted {predicted['after_load'] / 2**20:.0f} MiB, measured "
        f"{after_load / 2**20:.0f} MiB; after fill: predicted "
        f"{predicted['after_fill'] / 2**20:.0f} MiB, measured {after_fill / 2**20:.0f} MiB"
    )
    print(report)
    assert predicted["after_load"] == pytest.approx(after_load, rel=0.15), report
    assert predicted["after_fill"] == pytest.approx(after_fill, rel=0.15), report
