"""Presets, task switches, state-dict keys/shapes and parameter counts (spec §1.1, §1.3)."""

import math

import pytest
import torch

import vlmo_fast as vf
from vlmo_fast.config import loss_names


def build_meta(name, **kw):
    with torch.device("meta"):
        return vf.VLMo(vf.preset(name, **kw))


def n_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "arch,keys,params",
    [("vlmo_base_patch16", 293, 202.45), ("vlmo_large_patch16", 551, 599.13), ("vlmo_base_plus_patch16", 503, 184.98)],
)
def test_pretraining_module_keys_and_params(arch, keys, params):
    m = build_meta(arch)
    assert len(m.state_dict()) == keys
    assert n_params(m) / 1e6 == pytest.approx(params, abs=0.005)


def test_backbone_parameter_counts_match_readme():
    # "backbone + text embeddings + token-type embedding + relative position table" (spec §1.1)
    for arch, expected in (("vlmo_base_patch16", 175.43), ("vlmo_base_plus_patch16", 166.57), ("vlmo_large_patch16", 561.54)):
        m = build_meta(arch)
        core = n_params(m.transformer) + n_params(m.text_embeddings) + n_params(m.token_type_embeddings)
        if m.relative_position_bias_table is not None:
            core += m.relative_position_bias_table.numel()
        assert core / 1e6 == pytest.approx(expected, abs=0.005), arch


def test_base_pretraining_key_order_and_shapes():
    sd = build_meta("vlmo_base_patch16").state_dict()
    keys = list(sd)
    assert keys[:3] == ["relative_position_bias_table", "logit_scale", "logit_vl_scale"]
    assert tuple(sd["relative_position_bias_table"].shape) == (1126, 144)
    assert sd["logit_scale"].shape == ()
    block0 = [k[len("transformer.blocks.0."):] for k in keys if k.startswith("transformer.blocks.0.")]
    assert block0 == [
        "gamma_1", "gamma_2", "norm1.weight", "norm1.bias", "attn.q_bias", "attn.v_bias", "attn.qkv.weight",
        "attn.proj.weight", "attn.proj.bias", "norm2_text.weight", "norm2_text.bias", "norm2_imag.weight",
        "norm2_imag.bias", "mlp_text.fc1.weight", "mlp_text.fc1.bias", "mlp_text.fc2.weight", "mlp_text.fc2.bias",
        "mlp_imag.fc1.weight", "mlp_imag.fc1.bias", "mlp_imag.fc2.weight", "mlp_imag.fc2.bias",
    ]
    block10 = [k[len("transformer.blocks.10."):] for k in keys if k.startswith("transformer.blocks.10.")]
    assert block10[-6:] == [
        "mlp_vl.fc1.weight", "mlp_vl.fc1.bias", "mlp_vl.fc2.weight", "mlp_vl.fc2.bias", "norm2_vl.weight", "norm2_vl.bias"
    ]
    assert not any(k.startswith("transformer.blocks.9.mlp_vl") for k in keys)
    shapes = {
        "transformer.cls_token": (1, 1, 768),
        "transformer.patch_embed.proj.weight": (768, 3, 16, 16),
        "transformer.blocks.0.attn.qkv.weight": (2304, 768),
        "transformer.blocks.0.mlp_text.fc1.weight": (3072, 768),
        "transformer.blocks.0.mlp_text.fc2.weight": (768, 3072),
        "text_embeddings.position_ids": (1, 40),
        "text_embeddings.word_embeddings.weight": (30522, 768),
        "text_embeddings.position_embeddings.weight": (40, 768),
        "text_embeddings.token_type_embeddings.weight": (2, 768),
        "token_type_embeddings.weight": (2, 768),
        "mlm_score.bias": (30522,),
        "mlm_score.decoder.weight": (30522, 768),
        "itm_score.fc.weight": (2, 768),
        "itc_vl_image_proj.fc.weight": (768, 768),
    }
    for k, shape in shapes.items():
        assert tuple(sd[k].shape) == shape, k
    assert sd["text_embeddings.position_ids"].dtype == torch.int64
    assert keys[-4:] == ["itc_text_proj.fc.weight", "itc_image_proj.fc.weight", "itc_vl_text_proj.fc.weight",
                         "itc_vl_image_proj.fc.weight"]


def test_task_switches_decide_heads():
    def keys(**on):
        return set(build_meta("vlmo_base_patch16", loss_names=loss_names(**on)).state_dict())

    vqa = keys(vqa=1)
    assert {"vqa_classifier.0.weight", "vqa_classifier.1.weight", "vqa_classifier.3.weight"} <= vqa
    assert not any(k.startswith(("mlm_score", "itm_score", "itc_", "logit_")) for k in vqa)
    irtr = keys(irtr=1)
    assert {"itc_text_proj.fc.weight", "itc_image_proj.fc.weight", "logit_scale"} <= irtr
    assert "logit_vl_scale" not in irtr and "itc_vl_text_proj.fc.weight" not in irtr
    nlvr2 = build_meta("vlmo_base_patch16", image_size=384, loss_names=loss_names(nlvr2=1)).state_dict()
    assert tuple(nlvr2["token_type_embeddings.weight"].shape) == (3, 768)
    assert tuple(nlvr2["nlvr2_classifier.0.weight"].shape) == (1536, 1536)
    assert tuple(nlvr2["nlvr2_classifier.3.weight"].shape) == (2, 1536)
    assert tuple(nlvr2["relative_position_bias_table"].shape) == (2606, 144)
    vqa480 = build_meta("vlmo_base_patch16", image_size=480, loss_names=loss_names(vqa=1)).state_dict()
    assert tuple(vqa480["relative_position_bias_table"].shape) == (3878, 144)
    assert tuple(vqa480["vqa_classifier.3.weight"].shape) == (3129, 1536)


def test_textmlm_stage_has_no_vlffn():
    m = build_meta("vlmo_base_patch16", max_text_len=196, loss_names=loss_names(textmlm=1))
    sd = m.state_dict()
    assert len(sd) == 273
    assert not any("mlp_vl" in k or "norm2_vl" in k for k in sd)
    assert tuple(sd["text_embeddings.position_ids"].shape) == (1, 196)
    assert m.vlffn_start_layer_index == 12


def test_base_plus_structure():
    sd = build_meta("vlmo_base_plus_patch16").state_dict()
    assert "relative_position_bias_table" not in sd
    assert tuple(sd["transformer.pos_embed"].shape) == (1, 197, 544)
    assert not any(k.endswith(("gamma_1", "gamma_2")) for k in sd)
    assert vf.preset("vlmo_base_plus_patch16").head_dim == 34


def test_initial_values():
    m = vf.VLMo(vf.preset("vlmo_tiny_patch16"))
    assert m.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    assert torch.all(m.relative_position_bias_table == 0)
    assert torch.allclose(m.transformer.blocks[0].gamma_1, torch.full((64,), 0.1))
    tt = m.token_type_embeddings.weight
    assert tt.shape[0] == 2
    m3 = vf.VLMo(vf.preset("vlmo_tiny_patch16", loss_names=loss_names(nlvr2=1)))
    assert torch.equal(m3.token_type_embeddings.weight[2], m3.token_type_embeddings.weight[1])
    dpr = [b.drop_path for b in vf.VLMo(vf.preset("vlmo_tiny_patch16", drop_path_rate=0.3)).transformer.blocks]
    assert dpr == pytest.approx([0.0, 0.1, 0.2, 0.3])


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(image_size=100), "multiple of patch_size"),
        (dict(max_text_len=197), "max_text_len_of_initckpt"),
        (dict(drop_path_rate=1.0), "drop_path_rate"),
        (dict(embed_dim=65), "divisible"),
        (dict(loss_names={"bogus": 1}), "unknown task"),
        (dict(depth=0), "depth"),
    ],
)
def test_bad_configs(kw, match):
    with pytest.raises(ValueError, match=match):
        vf.preset("vlmo_tiny_patch16", **kw)


def test_unknown_preset_and_config_roundtrip():
    with pytest.raises(ValueError, match="unknown architecture"):
        vf.preset("vit_large_patch16_224")
    cfg = vf.preset("vlmo_large_patch16", image_size=384)
    assert vf.VLMoConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(TypeError):
        vf.VLMo({"model_arch": "vlmo_base_patch16"})
