"""graph/roles.py: a decoder's value, down and output projections and their layers, found from the data flow."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from click.testing import CliRunner
from onnx import numpy_helper

from mixq_onnx.cli import main
from mixq_onnx.graph.roles import DecoderRoles, decoder_roles

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"


def _reader_names(model: onnx.ModelProto) -> dict[str, str]:
    """Each initializer's first reader's node name (through a Transpose, for a tied table)."""
    out: dict[str, str] = {}
    for n in model.graph.node:
        for i in n.input:
            out.setdefault(i, n.name)
    return out


def test_the_roles_agree_with_the_module_names_the_torchscript_export_kept():
    """The cache export keeps PyTorch's module scopes in its node names (its weights are 'onnx::MatMul_N'): the
    structure alone finds every layer's v_proj and down_proj, in order, and the tied output projection."""
    model = onnx.load(str(MODELS / "tiny_decoder_kv.onnx"))
    roles = decoder_roles(model)
    names = _reader_names(model)
    assert roles.layers == 4
    assert {names[w]: i for w, i in roles.attention_values.items()} == {f"/layers.{i}/v_proj/MatMul": i for i in range(4)}
    assert {names[w]: i for w, i in roles.mlp_downs.items()} == {f"/layers.{i}/down_proj/MatMul": i for i in range(4)}
    (out,) = roles.outputs
    producer = next(n for n in model.graph.node if out in n.input)
    assert producer.output[0] == "logits"


def test_the_dynamo_export_gets_the_same_roles_for_the_same_weights():
    """The dynamo export names its weights val_N: the roles match the cache export's by the weights' values."""
    plain, cached = (onnx.load(str(MODELS / n)) for n in ("tiny_decoder.onnx", "tiny_decoder_kv.onnx"))
    values = [{t.name: numpy_helper.to_array(t) for t in m.graph.initializer} for m in (plain, cached)]
    a, b = decoder_roles(plain), decoder_roles(cached)
    for role in ("attention_values", "mlp_downs"):
        by_layer = [{i: values[k][w] for w, i in getattr(r, role).items()} for k, r in enumerate((a, b))]
        assert by_layer[0].keys() == by_layer[1].keys() == set(range(4))
        assert all(np.array_equal(by_layer[0][i], by_layer[1][i]) for i in range(4))
    assert a.outputs == ("embed.weight",)  # the tied table, read through a Transpose


def test_an_encoder_with_a_gelu_mlp_and_a_cnn():
    roles = decoder_roles(onnx.load(str(MODELS / "tiny_transformer.onnx")))
    assert roles.layers == 2 and sorted(roles.attention_values.values()) == sorted(roles.mlp_downs.values()) == [0, 1]
    assert roles.outputs == ("cls.weight",)
    cnn = decoder_roles(onnx.load(str(MODELS / "digits_cnn.onnx")))
    assert cnn.layers == 0 and not cnn.attention_values and not cnn.mlp_downs


def test_use_more_bits_is_llama_cpps_rule():
    """i < n/8, i >= 7n/8, or (i - n/8) % 3 == 2, integer division: 14 of 30 layers, and the output."""
    roles = DecoderRoles(30, {f"v{i}": i for i in range(30)}, {f"d{i}": i for i in range(30)}, ("out",))
    layers = sorted(int(n[1:]) for n in roles.use_more_bits() if n.startswith("v"))
    assert layers == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]
    assert {n for n in roles.use_more_bits() if n.startswith("d")} == {f"d{i}" for i in layers}
    assert "out" in roles.use_more_bits()


def test_the_kquant_mixed_rule_from_the_cli(tmp_path):
    out = tmp_path / "kq.onnx"
    res = CliRunner().invoke(main, [str(MODELS / "tiny_decoder.onnx"), "-o", str(out), "--rule", "kquant-mixed",
                                    "--report", str(out) + ".json", "-q"])
    assert res.exit_code == 0, res.output
    import json

    report = json.loads(Path(str(out) + ".json").read_text())
    promoted = set(report["search"]["promoted"])
    roles = decoder_roles(onnx.load(str(MODELS / "tiny_decoder.onnx")))
    # 4 layers: n/8 = 0 and 7n/8 = 3, so layers 2 ((2 - 0) % 3 == 2) and 3 get more bits, and the tied output table.
    assert promoted == {w for r in (roles.attention_values, roles.mlp_downs) for w, i in r.items() if i >= 2} | {"embed.weight"}
    for t in report["tensors"]:
        chosen = t["chosen"]
        if t["name"] in promoted:
            assert (chosen["bits"], chosen["granularity"]) == (8, "channel")
        else:  # block 128 where the reduction axis is long enough (K = 176 for down projections), else per channel
            assert chosen["bits"] == 4 and chosen["granularity"] in ("block128", "channel")
    assert "end_to_end" not in report or not report["end_to_end"]  # a fixed rule measures nothing end to end
    # A model without attention gets one clear line, and a rule with a search is refused.
    bad = CliRunner().invoke(main, [str(MODELS / "digits_cnn.onnx"), "-o", str(tmp_path / "d.onnx"), "--rule", "kquant-mixed"])
    assert bad.exit_code != 0 and "no attention core" in bad.output and "Traceback" not in bad.output
    both = CliRunner().invoke(main, [str(MODELS / "tiny_decoder.onnx"), "-o", str(tmp_path / "e.onnx"), "--rule", "kquant-mixed",
                                     "--bits", "4"])
    assert both.exit_code != 0 and "give only one" in both.output
    assert not (tmp_path / "d.onnx").exists() and not (tmp_path / "e.onnx").exists()


def test_shared_input_groups_are_each_layers_qkv_and_gate_up_by_module_name():
    """Weights whose MatMuls read one activation: in the cache export (module names kept) each layer's q/k/v and its
    gate/up; not o_proj or down_proj (alone on their input), not the tied table (a Gather reads it too)."""
    from mixq_onnx.graph.roles import shared_input_groups

    model = onnx.load(str(MODELS / "tiny_decoder_kv.onnx"))
    names = _reader_names(model)
    weights = {t.name for t in model.graph.initializer if len(t.dims) == 2}
    groups = shared_input_groups(model, weights)
    modules = [tuple(names[w].split("/")[2] for w in g) for g in groups]
    assert [tuple(names[g[0]].split("/")[1] for _ in g) for g in groups] == [(f"layers.{i}",) * len(g)
                                                                           for i in range(4) for g in ((0, 0, 0), (0, 0))]
    assert modules == [("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")] * 4
    assert shared_input_groups(onnx.load(str(MODELS / "digits_cnn.onnx")), weights) == ()
