"""Model shapes: parameter counts and KV-cache bytes match the public figures."""

import json

import pytest

from allinone.planner.shapes import SHAPES, resolve_shape, shape_from_config


@pytest.mark.parametrize(
    ("name", "billions"),
    [
        ("Qwen2.5-0.5B-Instruct", 0.494),  # model card: 0.49B
        ("Qwen2.5-1.5B-Instruct", 1.54),  # 1.54B
        ("Qwen2.5-7B-Instruct", 7.62),  # 7.61B
        ("Qwen1.5-0.5B-Chat", 0.62),  # 0.62B with untied embeddings
    ],
)
def test_parameter_counts(name, billions):
    assert SHAPES[name].total_params() / 1e9 == pytest.approx(billions, rel=0.01)


def test_grouped_query_attention_shrinks_the_kv_cache():
    q7 = SHAPES["Qwen2.5-7B-Instruct"]
    assert q7.head_dim == 128
    per_token = q7.kv_bytes_per_token(2)  # fp16
    assert per_token == 2 * 28 * 4 * 128 * 2 == 57_344
    full_mha = 2 * 28 * 28 * 128 * 2
    assert full_mha / per_token == 7  # 28 query heads share 4 KV heads
    assert per_token * 131_072 / 2**30 == pytest.approx(7.0)  # 7 GiB at 128k tokens
    assert SHAPES["Qwen2.5-0.5B-Instruct"].kv_bytes_per_token(2) == 12_288


def test_shapes_resolve_from_aliases_and_config_files(tmp_path):
    assert resolve_shape("default").name == "Qwen2.5-Coder-0.5B-Instruct"
    cfg = {
        "hidden_size": 896,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "intermediate_size": 4864,
        "vocab_size": 151936,
        "tie_word_embeddings": True,
        "max_position_embeddings": 32768,
        "model_type": "qwen2",
    }
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    shape = shape_from_config(path)
    assert shape.total_params() == SHAPES["Qwen2.5-0.5B-Instruct"].total_params()
    assert resolve_shape(str(tmp_path)).kv_heads == 2
    with pytest.raises(ValueError, match="unknown model"):
        resolve_shape("nope")


def test_shape_from_the_default_gguf(default_model_path):
    shape = resolve_shape(str(default_model_path))
    ref = SHAPES["Qwen2.5-Coder-0.5B-Instruct"]
    for attr in ("hidden", "layers", "heads", "kv_heads", "head_dim", "intermediate", "vocab"):
        assert getattr(shape, attr) == getattr(ref, attr), attr
    # This GGUF stores the output head as its own tensor even though the model ties it.
    assert shape.tied_embeddings is False
