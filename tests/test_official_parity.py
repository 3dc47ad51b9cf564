"""Parity with the official VLMo code: outputs of microsoft/unilm vlmo/ (recorded in
tests/fixtures/official_outputs.safetensors by tests/fixtures/make_official_fixture.py) for deterministic weights
and inputs, against vlmo_fast on the same weights and inputs: base, base_plus, the text-only stage, VQA at 480 px
and NLVR2 at 384 px, every forward path and head. fp32, relative error <= 1e-5 (the acceptance bar)."""

import os

import pytest
from safetensors import safe_open

import official_fixture as fx
import vlmo_fast as vf
from vlmo_fast.config import loss_names

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "official_outputs.safetensors")


def load_fixture(name):
    with safe_open(FIXTURE, framework="pt") as f:
        meta = f.metadata()
        return {k.split("/", 1)[1]: f.get_tensor(k) for k in f.keys() if k.startswith(name + "/")}, int(meta[name])


@pytest.mark.parametrize("name", list(fx.CONFIGS))
def test_matches_official_outputs(name):
    arch, size, lt, tasks = fx.CONFIGS[name]
    expected, n_keys = load_fixture(name)
    model = vf.VLMo(vf.preset(arch, image_size=size, max_text_len=lt, loss_names=loss_names(**{t: 1 for t in tasks})))
    template = model.state_dict()
    assert len(template) == n_keys  # the official module had exactly this many state-dict entries
    sd = fx.fill_state_dict([(k, tuple(v.shape), v.dtype) for k, v in template.items()])
    vf.load_checkpoint(model, sd, strict=True)
    model.eval()
    got = fx.outputs(model, fx.make_batch(lt, size, "nlvr2" in tasks), tasks)
    assert set(got) == set(expected)
    for key, ref in expected.items():
        err = (got[key].double() - ref.double()).abs().max() / ref.double().abs().max()
        assert err <= 1e-5, f"{name} {key}: relative error {err:.2e}"
