import pytest
import torch

from vlrl_cli.data.images import to_data_uri
from vlrl_cli.data.records import RecordWriter, iter_rows, load_schema, schema_errors, write_rows
from vlrl_cli.errors import UserError
from vlrl_cli.model.render import model_inputs, render_prompt
from vlrl_cli.model.tiny import FAMILIES, build_tiny_model


@pytest.mark.model
@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_model_loads_and_runs_with_an_image(family, tmp_path, cli):
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from PIL import Image

    r = cli("tiny-model", tmp_path / family, "--family", family)
    assert r.exit_code == 0, r.output
    size = sum(f.stat().st_size for f in (tmp_path / family).iterdir())
    assert size < 20e6
    proc = AutoProcessor.from_pretrained(tmp_path / family)
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / family)
    assert model.config.model_type == family
    from vlrl_cli.model.families import FAMILY
    from vlrl_cli.model.render import image_factor, processor_size

    tok = proc.tokenizer
    tokens = FAMILY[family].tokens  # the placeholders the config names, by id, are the tokenizer's
    assert [k for k in tokens if k.endswith(("token_id", "token_index"))], tokens
    for name, token in tokens.items():
        if name.endswith(("token_id", "token_index")):
            assert getattr(model.config, name) == tok.convert_tokens_to_ids(token) != tok.unk_token_id, name
    factor = image_factor(proc)
    import io

    buf = io.BytesIO()
    Image.new("RGB", (factor * 3, factor * 2), (10, 200, 10)).save(buf, format="PNG")
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": to_data_uri(buf.getvalue(), "image/png")}},
                                             {"type": "text", "text": "What colour is it?"}]}]
    rendered = render_prompt(proc, messages)
    # Qwen-VL keeps a 3x2 grid of merged patches as it is; Gemma 4 scales it to its token budget, aspect kept
    w, h = processor_size(proc, factor * 3, factor * 2)
    assert rendered.num_image_tokens == rendered.expected_image_tokens == (w // factor) * (h // factor)
    assert family == "gemma4" or (w, h) == (factor * 3, factor * 2)
    assert messages[0]["content"][0]["type"] == "image_url"  # the caller's messages are left alone
    ids = torch.tensor([rendered.input_ids])
    with torch.no_grad():
        out = model(**model_inputs(proc, ids, torch.ones_like(ids), rendered.tensors, "cpu"))
    assert out.logits.shape == (1, len(rendered.input_ids), model.config.text_config.vocab_size)
    assert torch.isfinite(out.logits).all()


def test_same_seed_same_weights(tmp_path):
    from safetensors.torch import load_file

    a = load_file(build_tiny_model(tmp_path / "a", seed=3) / "model.safetensors")
    b = load_file(build_tiny_model(tmp_path / "b", seed=3) / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_schema_is_valid_2020_12_and_round_trips(colors_data, tmp_path):
    import jsonschema

    schema = load_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["$schema"].endswith("2020-12/schema")
    rows = list(iter_rows(colors_data / "train.parquet"))
    for fmt in ("parquet", "jsonl"):
        path = tmp_path / f"rt.{fmt}"
        write_rows(path, rows)
        back = list(iter_rows(path))
        assert back == rows
        assert all(schema_errors(r) == [] for r in back)


def test_string_content_is_accepted_and_nested_parquet_columns(tmp_path):
    import pyarrow.parquet as pq

    row = {"prompt": [{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": [{"type": "text", "text": "hi"}]}],
           "env_class": "colors", "reward_spec": {"method": "rule", "ground_truth": 3}, "extra_info": {"k": 1}}
    assert schema_errors(row) == []
    write_rows(tmp_path / "s.parquet", [row])
    t = pq.read_table(tmp_path / "s.parquet")
    assert str(t.schema.field("prompt").type).startswith("list<element: struct<role: string, content: list")
    back = next(iter_rows(tmp_path / "s.parquet"))
    assert back["prompt"][0]["content"] == [{"type": "text", "text": "Be brief."}]
    assert back["reward_spec"]["ground_truth"] == "3"


def test_schema_errors_name_the_field():
    bad = {"prompt": [{"role": "wizard", "content": [{"type": "image_url"}]}], "env_class": "colors",
           "reward_spec": {"method": "rule"}}
    fields = [f for f, _ in schema_errors(bad)]
    assert "prompt[0].role" in fields and any(f.startswith("prompt[0].content") for f in fields)


def test_writer_refuses_fields_its_first_rows_lacked(tmp_path):
    w = RecordWriter(tmp_path / "w.parquet", row_group_size=1)
    base = {"prompt": [{"role": "user", "content": "x"}], "env_class": "colors",
            "reward_spec": {"method": "rule", "ground_truth": "a"}}
    w.write({**base, "extra_info": {"a": 1}})
    with pytest.raises(UserError, match="fields"):
        w.write({**base, "extra_info": {"a": 1, "b": 2}})


def test_tiny_model_family_names_are_forgiving_about_case_and_dashes_but_not_typos(tmp_path, cli):
    r = cli("tiny-model", tmp_path / "g", "--family", "Gemma4")
    assert r.exit_code == 0 and "tiny gemma4 model" in r.output, r.output
    r = cli("tiny-model", tmp_path / "q", "--family", "Qwen9")
    assert r.exit_code == 2 and "not 'Qwen9'" in r.output and "qwen2_5_vl" in r.output, r.output
    assert not (tmp_path / "q").exists()


def test_random_real_size_weights_give_unscaled_attention_the_spread_trained_weights_have(family_models):
    """Gemma 4 does not divide attention scores by sqrt(head size) (its trained q/k norms carry the scale): with
    random norm weights of one, two bf16 kernels parted by 0.6 nats a token at E2B's size, measuring the random
    weights instead of the code. The real-size builder sets the q/k norms to d^-1/4; models that scale their
    scores themselves (Qwen-VL) are left as built."""
    import torch

    from vlrl_cli.model.loading import load_vlm
    from vlrl_cli.model.tiny import temper_unscaled_attention

    gemma = load_vlm(str(family_models["gemma4"]), torch.float32)
    assert temper_unscaled_attention(gemma) > 0
    attention = [m for m in gemma.modules() if getattr(m, "scaling", None) == 1.0 and hasattr(m, "q_norm")]
    assert attention and all(torch.allclose(m.q_norm.weight, torch.full_like(m.q_norm.weight, m.head_dim ** -0.25))
                             for m in attention)
    qwen = load_vlm(str(family_models["qwen2_5_vl"]), torch.float32)
    before = {k: v.clone() for k, v in qwen.state_dict().items()}
    assert temper_unscaled_attention(qwen) == 0
    assert all(torch.equal(before[k], v) for k, v in qwen.state_dict().items())
