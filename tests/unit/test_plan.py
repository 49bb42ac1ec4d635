"""The planner's arithmetic: weights per format, grouped-query KV cache, device fit and layouts."""

import json

import pytest

from allinone.cli import main
from allinone.planner.formats import weight_groups
from allinone.planner.plan import GiB, PlanRequest, make_plan, valid_tp_sizes
from allinone.planner.shapes import SHAPES

Q7 = SHAPES["Qwen2.5-7B-Instruct"]


def plan(**kw):
    return make_plan(PlanRequest(**kw))


def test_design_document_weights_for_qwen2_5_7b():
    fp16 = sum(weight_groups(Q7, "fp16").values())
    assert fp16 / 1e9 == pytest.approx(15.23, abs=0.01)  # design: "FP16 ~15 GB"
    int4 = sum(weight_groups(Q7, "awq-int4").values())
    # design: "INT4 ~6 GB"; the fp16 embeddings and output head are 2.2 GB of it
    assert 5.0e9 < int4 < 6.0e9
    groups = weight_groups(Q7, "awq-int4")
    assert groups["embeddings"] == groups["output_head"] == 152064 * 3584 * 2


def test_kv_cache_at_128k_tokens_and_the_gqa_saving():
    p = plan(model="Qwen2.5-7B-Instruct", devices="1x80GiB", context=131072, concurrency=1)
    assert p["kv_bytes_per_token"] == 57344
    assert p["kv_bytes_total"] == 57344 * 131072  # 7 GiB
    assert p["kv_bytes_total"] / GiB == pytest.approx(7.0)
    assert p["gqa_saving"] == 7
    assert any("YaRN" in w for w in p["warnings"])  # beyond the native 32,768 tokens
    fp8 = plan(model="Qwen2.5-7B-Instruct", devices="1x80GiB", kv_dtype="fp8")
    assert fp8["kv_bytes_per_token"] == 57344 / 2


def test_qwen1_5_has_no_gqa_saving():
    p = plan(model="Qwen1.5-0.5B-Chat", devices="cpu:8GiB")
    assert p["gqa_saving"] == 1
    assert p["kv_bytes_per_token"] == 2 * 24 * 16 * 64 * 2


def test_tensor_parallel_sizes_divide_attention_and_kv_heads():
    assert valid_tp_sizes(Q7, 8) == [1, 2, 4]  # 28 heads, 4 KV heads
    assert valid_tp_sizes(SHAPES["Qwen2.5-0.5B-Instruct"], 8) == [1, 2]  # 14 heads, 2 KV heads
    bad = plan(model="Qwen2.5-7B-Instruct", devices="3x24GiB")
    assert bad["fits"] is False and "does not divide" in bad["warnings"][0]


def test_design_layouts_on_four_24gb_cards():
    p = plan(
        model="Qwen2.5-7B-Instruct", dtype="fp16", devices="4x24GiB", context=8192, concurrency=16
    )
    layouts = {(lay["instances"], lay["tensor_parallel"]): lay for lay in p["layouts"]}
    assert set(layouts) == {(4, 1), (2, 2), (1, 4)}
    assert layouts[(1, 4)]["fits"] and layouts[(2, 2)]["fits"]
    assert not layouts[(4, 1)]["fits"]  # 15 GB of weights + 16 x 8k of KV on one 24 GB card
    # more GPUs per instance leave more room for sequences
    assert layouts[(1, 4)]["max_concurrency"] > layouts[(2, 2)]["max_concurrency"]
    assert p["host"]["shm_bytes"] == 8 * GiB  # the design's --shm-size 8g


def test_cpu_plan_for_the_default_model_has_the_engine_buffers():
    p = plan(context=2048, concurrency=4)
    assert p["engine"] == "llama_cpp"
    assert p["weights_bytes"] == 485_452_288  # exactly the default GGUF's tensor bytes
    assert p["kv_tokens"] == 4 * 2048 + 4096 + 4 * 256
    for key in ("weights_bytes", "kv_bytes_per_token", "kv_bytes_total", "total_bytes", "fits"):
        assert key in p
    s = p["server"]
    assert s["memory_soft_limit_mb"] < s["memory_hard_limit_mb"]
    assert s["memory_hard_limit_mb"] * 2**20 < p["host"]["memory_limit_bytes"]
    assert p["predicted_rss"]["after_fill"] < s["memory_soft_limit_mb"] * 2**20


def test_a_model_that_does_not_fit_says_so():
    p = plan(model="Qwen2.5-7B-Instruct", dtype="q4_k_m", devices="cpu:2GiB")
    assert p["fits"] is False


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"devices": "4xlots"}, "bad --devices"),
        ({"model": "nope"}, "unknown model"),
        ({"dtype": "int3"}, "unknown dtype"),
        ({"kv_dtype": "fp4"}, "--kv-dtype"),
        ({"context": 0}, "at least 1"),
        ({"model": "Qwen2.5-7B-Instruct", "devices": "4x24GiB", "instances": 3}, "cannot be split"),
        ({"dtype": "awq-int4"}, "runs on GPUs"),
    ],
)
def test_bad_plan_requests_say_what_to_fix(kw, message):
    with pytest.raises(ValueError, match=message):
        plan(**kw)


def test_plan_cli_json_and_exit_status(capsys):
    assert main(["plan", "--json", "--model", "Qwen2.5-7B-Instruct", "--devices", "4x24GiB"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["tensor_parallel"]["size"] == 4 and out["fits"] is True
    assert main(["plan", "--model", "Qwen2.5-7B-Instruct", "--devices", "1x8GiB"]) == 1
    text = capsys.readouterr().out
    assert "DOES NOT FIT" in text and "GQA saves 7x" in text
    assert main(["plan", "--devices", "lots"]) == 2
    assert "bad --devices" in capsys.readouterr().err
