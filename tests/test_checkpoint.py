"""Checkpoint reading, adaptation and writing (spec §1.3, §2 resolution change, Q9, Q11)."""

import os
import pickle

import pytest
import torch

import vlmo_fast as vf
from vlmo_fast.checkpoint import CheckpointError, adapt_state_dict, load_checkpoint, read_state_dict, save_checkpoint
from vlmo_fast.config import loss_names
from vlmo_fast.model import relpos


def tiny(**kw):
    m = vf.VLMo(vf.preset("vlmo_tiny_patch16", **kw))
    with torch.no_grad():
        if m.relative_position_bias_table is not None:
            m.relative_position_bias_table.normal_()
    return m


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize(
    "wrap,ext",
    [(w, e) for w in ("raw", "state_dict", "module", "model") for e in (".pt", ".ckpt")] + [("raw", ".safetensors")],
)
def test_round_trips(tmp_path, wrap, ext):
    src = tiny()
    sd = src.state_dict()
    path = str(tmp_path / f"m{ext}")
    if ext == ".safetensors":
        save_checkpoint(src, path)
    else:
        payload = {
            "raw": sd,
            "state_dict": {"state_dict": sd, "epoch": 3, "global_step": 10},
            "module": {"module": {f"module.{k}": v for k, v in sd.items()}},
            "model": {"model": sd, "args": {"lr": 1e-4}},
        }[wrap]
        torch.save(payload, path)
    dst = vf.VLMo(vf.preset("vlmo_tiny_patch16"))
    report = load_checkpoint(dst, path)
    assert not report.missing_keys and not report.unexpected_keys
    assert_same_weights(src, dst)


def test_save_writes_official_layout_atomically(tmp_path):
    m = tiny()
    path = tmp_path / "ckpt.pt"
    save_checkpoint(m, path)
    raw = torch.load(path, weights_only=True)
    # the state dict plus the index tensors released checkpoints carry, which the official loader pops (Q9)
    assert list(raw) == list(m.state_dict()) + list(vf.checkpoint.LEGACY_INDEX_KEYS)
    for key in vf.checkpoint.LEGACY_INDEX_KEYS:
        assert torch.equal(raw.pop(key), getattr(m, key))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temporary file left behind
    umask = os.umask(0o022)
    try:
        save_checkpoint(m, path)
    finally:
        os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o644  # readable by others, as any file written under that umask
    path.chmod(0o600)  # a rewrite keeps the file's mode (as torch.save writing into it would)
    save_checkpoint(m, path)
    assert path.stat().st_mode & 0o777 == 0o600
    umask = os.umask(0o077)  # the umask now, not the one at import
    try:
        save_checkpoint(m, tmp_path / "private.pt")
    finally:
        os.umask(umask)
    assert (tmp_path / "private.pt").stat().st_mode & 0o777 == 0o600
    (tmp_path / "private.pt").unlink()
    # a failing write leaves the previous file intact and no temporary file
    before = path.read_bytes()
    with pytest.raises(Exception):
        save_checkpoint({"x": object()}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]
    st = tmp_path / "ckpt.safetensors"
    save_checkpoint(m, st)
    assert vf.checkpoint.read_metadata(st)["vlmo_fast_config"]["model_arch"] == "vlmo_tiny_patch16"


def test_metadata_of_other_tools_is_read_as_text(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "hf.safetensors"), metadata={"format": "pt"})
    assert vf.checkpoint.read_metadata(tmp_path / "hf.safetensors") == {"format": "pt"}


def test_legacy_index_tensors_are_ignored(tmp_path):
    src = tiny()
    sd = dict(src.state_dict())
    sd["relative_position_index"] = src.relative_position_index.clone()
    sd["text_relative_position_index"] = src.text_relative_position_index.clone()
    sd["text_imag_relative_position_index"] = src.text_imag_relative_position_index.clone()
    torch.save(sd, tmp_path / "legacy.pt")
    dst = vf.VLMo(vf.preset("vlmo_tiny_patch16"))
    report = load_checkpoint(dst, tmp_path / "legacy.pt")  # strict
    assert sorted(report.ignored_keys) == sorted(
        ["relative_position_index", "text_relative_position_index", "text_imag_relative_position_index"]
    )
    assert_same_weights(src, dst)


def test_never_unpickles_arbitrary_objects(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": {"x": Evil()}}, f, protocol=2)
    with pytest.raises(CheckpointError, match="weights_only=True"):
        read_state_dict(path)
    assert not (tmp_path / "pwned").exists()


class _NotATensor:
    pass


@pytest.mark.parametrize("kind", ["zip class", "zip object", "legacy object", "pickle", "jpeg"])
@pytest.mark.parametrize("mmap", [False, True])
def test_unreadable_files_give_one_line_with_the_unpicklers_reason(tmp_path, kind, mmap):
    """torch's messages start with advice to unpickle anyway (weights_only=False, allowlisting), in bold, over many
    lines; the error keeps one line and the reason. With mmap the reason is the plain read's, not mmap's."""
    from vlmo_fast.checkpoint import torch_load

    path = tmp_path / "x.pt"
    if kind == "zip class":
        torch.save({"a": _NotATensor}, path)
    elif kind == "zip object":
        torch.save({"a": _NotATensor()}, path)
    elif kind == "legacy object":
        torch.save({"a": _NotATensor()}, path, _use_new_zipfile_serialization=False)
    elif kind == "pickle":
        with open(path, "wb") as f:
            pickle.dump({"a": _NotATensor()}, f, protocol=2)
    else:
        path.write_bytes(b"\xff\xd8\xff\xe0 a jpeg")
    if kind.startswith("zip"):  # objects of classes the unpickler refuses stand as placeholders (a Lightning
        # .ckpt's callbacks): the file loads, and a state dict with one is refused naming the entry
        loaded = torch_load(str(path), mmap=mmap)["a"]  # a stand-in, never the class itself or its instance
        assert loaded is not _NotATensor and not isinstance(loaded, _NotATensor)
        with pytest.raises(CheckpointError, match=r"these entries are not tensors: \['a'\]") as info:
            read_state_dict(path)
        assert len(str(info.value).splitlines()) == 1
        return
    with pytest.raises(CheckpointError) as info:
        torch_load(str(path), mmap=mmap)
    msg = str(info.value)
    if kind == "jpeg":  # neither a torch file nor safetensors: said so, not the unpickler's first-byte complaint
        assert len(msg.splitlines()) == 1 and "it is not a checkpoint (neither a torch file nor safetensors)" in msg
        return
    assert len(msg.splitlines()) == 1 and "the safe unpickler refused it (" in msg, msg
    assert "_NotATensor" in msg, msg
    for advice in ("False", "safe_globals", "Please", "mmap", "\x1b", ".."):
        assert advice not in msg, (advice, msg)
    legacy = tmp_path / "legacy.pt"  # a readable legacy-format file: mmap falls back to a plain read
    torch.save({"w": torch.ones(2)}, legacy, _use_new_zipfile_serialization=False)
    assert torch.equal(torch_load(str(legacy), mmap=mmap)["w"], torch.ones(2))


def test_a_checkpoint_matching_no_key_is_refused_even_without_strict():
    dst = vf.VLMo(vf.preset("vlmo_tiny_patch16"))
    for sd in ({"encoder.layer.0.weight": torch.zeros(3), "head.bias": torch.zeros(2)}, {}):
        with pytest.raises(CheckpointError, match="no key of the checkpoint matches the model") as info:
            load_checkpoint(dst, sd, strict=False)
        assert ("encoder.layer.0.weight" in str(info.value)) == bool(sd) and "in all)" in str(info.value)
    partial = {k: v for k, v in tiny().state_dict().items() if k.startswith("transformer.blocks.0.")}
    assert load_checkpoint(dst, partial, strict=False).missing_keys  # some overlap: loads, reporting the rest


def test_checkpoint_paths_may_be_str_bytes_or_pathlike(tmp_path):
    src = tiny()
    for name in ("m.pt", "m.safetensors"):
        save_checkpoint(src, tmp_path / name)
        for path in (tmp_path / name, str(tmp_path / name), os.fsencode(tmp_path / name)):
            dst = vf.VLMo(vf.preset("vlmo_tiny_patch16"))
            load_checkpoint(dst, path)
            assert_same_weights(src, dst)
    with pytest.raises(TypeError, match="path must be a str, bytes or os.PathLike, got int"):
        read_state_dict(3)
    with pytest.raises(FileNotFoundError, match="checkpoint file not found"):
        read_state_dict(os.fsencode(tmp_path / "absent.pt"))


def test_missing_unexpected_and_mismatched_keys_are_reported():
    src = tiny()
    sd = dict(src.state_dict())
    sd.pop("pooler.dense.bias")
    sd["some.extra.weight"] = torch.zeros(3)
    dst = vf.VLMo(vf.preset("vlmo_tiny_patch16"))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(dst, sd)
    msg = str(info.value)
    assert "missing" in msg and "pooler.dense.bias" in msg and "unexpected" in msg and "some.extra.weight" in msg
    report = load_checkpoint(dst, sd, strict=False)
    assert report.missing_keys == ["pooler.dense.bias"] and report.unexpected_keys == ["some.extra.weight"]
    assert torch.equal(dst.pooler.dense.weight, src.pooler.dense.weight)
    bad = dict(src.state_dict())
    bad["pooler.dense.weight"] = torch.zeros(5, 5)
    with pytest.raises(CheckpointError, match="pooler.dense.weight: checkpoint \\(5, 5\\) vs model \\(64, 64\\)"):
        load_checkpoint(dst, bad)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(dst, "/nonexistent/ckpt.pt")


def test_resize_224_to_384_to_480_on_load():
    kw = dict(loss_names=loss_names(irtr=1))
    m224 = tiny(image_size=224, **kw)
    m384 = vf.VLMo(vf.preset("vlmo_tiny_patch16", image_size=384, **kw))
    report = load_checkpoint(m384, m224.state_dict())
    assert any("relative_position_bias_table" in a for a in report.adapted)
    t224, t384 = m224.relative_position_bias_table, m384.relative_position_bias_table
    assert t384.shape == (relpos.num_table_rows(24), 16)
    expected = relpos.resize_table(t224.detach(), relpos.num_table_rows(24), 24)
    assert torch.equal(t384.detach(), expected)
    assert torch.equal(t384[-397:], t224[-397:])  # the non-patch rows are kept
    # the centre of the grid (offset 0) keeps its value: the geometric grid maps 0 -> 0
    centre_src, centre_dst = (27 * 27) // 2, (47 * 47) // 2
    assert torch.allclose(t384[centre_dst], t224[centre_src], atol=1e-5)
    m480 = vf.VLMo(vf.preset("vlmo_tiny_patch16", image_size=480, **kw))
    load_checkpoint(m480, m384.state_dict())
    assert m480.relative_position_bias_table.shape == (relpos.num_table_rows(30), 16)
    batch = {"image": [torch.randn(1, 3, 480, 480)]}
    with torch.no_grad():
        assert torch.isfinite(m480.eval().infer_image_ft(batch)["cls_feats"]).all()


def test_a_table_of_the_official_text_length_into_a_model_of_another_is_refused():
    """A model built with another max_text_len_of_initckpt than the checkpoint's (196 in every official one) has
    other non-patch rows: the resize took text and CLS rows for patch offsets whenever the row counts left a square
    (446 rows at 64 px: a 7x7 grid at L0 196, read as a 9x9 one at L0 180) and resampled them silently; otherwise
    (an official 224 px table into such a model) it failed with a message about grids."""
    with pytest.raises(CheckpointError, match=r"relative_position_bias_table: the checkpoint's 1126 rows fit a table "
                                              r"made with max_text_len_of_initckpt=196 \(the official value\), not "
                                              r"one made with the model's 180"):
        load_checkpoint(vf.VLMo(vf.preset("vlmo_tiny_patch16", max_text_len_of_initckpt=180)),
                        tiny(image_size=224).state_dict())
    # a table of the model's own L0 at another size loads; where its rows also fit an official-L0 table (446 rows: a
    # 7x7 grid at L0 196, or a 9x9 one at L0 180; 926: 23x23 at 196, 29x29 at 40), it is read as the model's, and
    # the report says so (the first version of the check refused these)
    for size_src, size_dst, l0, ambiguous in ((80, 64, 180, True), (240, 192, 40, True), (192, 240, 40, False)):
        src = vf.VLMo(vf.preset("vlmo_tiny_patch16", image_size=size_src, max_text_len=12,
                                max_text_len_of_initckpt=l0))
        dst = vf.VLMo(vf.preset("vlmo_tiny_patch16", image_size=size_dst, max_text_len=12,
                                max_text_len_of_initckpt=l0))
        report = load_checkpoint(dst, src.state_dict())
        note = next(a for a in report.adapted if a.startswith("relative_position_bias_table"))
        assert ("though its rows also fit the official 196" in note) == ambiguous, note
        extra = 2 * l0 + 5
        assert torch.equal(dst.relative_position_bias_table[-extra:], src.relative_position_bias_table[-extra:])
        window = size_dst // 16
        want = relpos.resize_table(src.relative_position_bias_table.detach(), relpos.num_table_rows(window, l0), window)
        assert torch.equal(dst.relative_position_bias_table.detach(), want)


def test_text_positions_truncated_and_extended():
    m196 = tiny(max_text_len=196, loss_names=loss_names(textmlm=1))
    m40 = vf.VLMo(vf.preset("vlmo_tiny_patch16", max_text_len=40))
    report = load_checkpoint(m40, m196.state_dict(), strict=False)
    w = m40.text_embeddings.position_embeddings.weight
    assert torch.equal(w, m196.text_embeddings.position_embeddings.weight[:40])
    assert torch.equal(m40.text_embeddings.position_ids, torch.arange(40)[None])
    assert all("mlp_vl" in k or "norm2_vl" in k or k.startswith(("itm_score", "itc_", "logit_")) for k in report.missing_keys)
    m60 = vf.VLMo(vf.preset("vlmo_tiny_patch16", max_text_len=60))
    init_tail = m60.text_embeddings.position_embeddings.weight[40:].clone()
    load_checkpoint(m60, m40.state_dict())
    assert torch.equal(m60.text_embeddings.position_embeddings.weight[:40], w)
    assert torch.equal(m60.text_embeddings.position_embeddings.weight[40:], init_tail)


def test_nlvr2_token_types_from_a_two_row_checkpoint():
    src = tiny()
    dst = vf.VLMo(vf.preset("vlmo_tiny_patch16", loss_names=loss_names(nlvr2=1)))
    load_checkpoint(dst, src.state_dict(), strict=False)
    w, s = dst.token_type_embeddings.weight, src.token_type_embeddings.weight
    assert torch.equal(w[:2], s) and torch.equal(w[2], s[1])


def test_base_plus_pos_embed_resized_bicubically():
    cfg = dict(depth=2, vlffn_start_layer_index=1, embed_dim=32, num_heads=2, max_text_len=12)
    src = vf.VLMo(vf.preset("vlmo_base_plus_patch16", image_size=64, **cfg))
    dst = vf.VLMo(vf.preset("vlmo_base_plus_patch16", image_size=96, **cfg))
    sd, report = adapt_state_dict(src.state_dict(), dst)
    pos = sd["transformer.pos_embed"]
    assert pos.shape == (1, 37, 32)
    assert torch.equal(pos[:, 0], src.transformer.pos_embed[:, 0])
    grid = src.transformer.pos_embed[:, 1:].reshape(1, 4, 4, 32).permute(0, 3, 1, 2)
    expected = torch.nn.functional.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False)
    assert torch.allclose(pos[:, 1:], expected.permute(0, 2, 3, 1).reshape(1, 36, 32))


def test_different_architecture_is_rejected():
    src = tiny()
    dst = vf.VLMo(vf.preset("vlmo_tiny_patch16", depth=3, vlffn_start_layer_index=2))
    with pytest.raises(CheckpointError, match="a different architecture"):
        load_checkpoint(dst, src.state_dict())
    # another width (base into large, say) is said in those terms, not through the first tensor that does not fit
    wide = vf.VLMo(vf.preset("vlmo_tiny_patch16", embed_dim=src.config.embed_dim * 2))
    with pytest.raises(CheckpointError, match=r"^the checkpoint is a model of width (\d+) with (\d+) blocks, the model "
                       r"has width (\d+) with \2 blocks: a different architecture"):
        load_checkpoint(wide, src.state_dict(), strict=False)


def test_files_are_read_by_their_content_and_damage_is_named(tmp_path):
    from safetensors.torch import save_file

    m = tiny()
    sd = {k: v.contiguous() for k, v in m.state_dict().items()}
    save_file(sd, str(tmp_path / "weights.bin"))  # safetensors under another name
    dst = vf.VLMo(m.config)
    load_checkpoint(dst, tmp_path / "weights.bin")
    assert_same_weights(m, dst)
    from vlmo_fast.train.finetune import read_checkpoint

    save_checkpoint(m, tmp_path / "model.safetensors")  # with its config as metadata
    os.replace(tmp_path / "model.safetensors", tmp_path / "model.bin")
    state, recorded, training = read_checkpoint(str(tmp_path / "model.bin"))  # what evaluate and export read
    assert recorded["arch"] == m.config.model_arch and not training and set(state) >= set(sd)
    torch.save(sd, tmp_path / "full.pt")
    data = (tmp_path / "full.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 3])  # an interrupted copy
    with pytest.raises(CheckpointError, match=r"cut.pt: the file is truncated or damaged"):
        read_state_dict(tmp_path / "cut.pt")
    (tmp_path / "junk.pt").write_bytes(b"xmlns junk")
    with pytest.raises(CheckpointError, match=r"junk.pt: it is not a checkpoint"):
        read_state_dict(tmp_path / "junk.pt")
    data = (tmp_path / "weights.bin").read_bytes()  # safetensors cut in its tensors, and in its header
    for cut, what in ((len(data) // 2, "its tensors need"), (20, "its header is")):
        (tmp_path / "cut.safetensors").write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match=f"cut.safetensors: the file is truncated .*{what}"):
            read_state_dict(tmp_path / "cut.safetensors")


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod."])
def test_state_dicts_of_wrapped_models_load(prefix):
    """torch.save(ddp_model.state_dict()) or a compiled model's: every key under the wrapper's prefix."""
    m = tiny()
    dst = vf.VLMo(m.config)
    report = load_checkpoint(dst, {prefix + k: v for k, v in m.state_dict().items()})
    assert not report.missing_keys and not report.unexpected_keys
    assert_same_weights(m, dst)


def test_damaged_files_and_malformed_entries_are_checkpoint_errors(tmp_path):
    """Each names the file or the key, in one line (the CLI prints it as it is), instead of a library's own error."""
    from safetensors.torch import save_file

    from vlmo_fast.train.state import load_training_checkpoint

    model = tiny()
    good = tmp_path / "good.safetensors"
    save_file({"x": torch.zeros(3)}, str(good))
    data = good.read_bytes()
    for name, content in (("cut.safetensors", data[: len(data) // 2]), ("header.safetensors", b"\xff" * 16 + data),
                          ("cut.pt", b"PK\x03\x04 not really a zip")):
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(CheckpointError, match="cannot read") as err:
            read_state_dict(path)
        assert str(path) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(CheckpointError, match="cannot read the training checkpoint") as err:
        load_training_checkpoint(str(tmp_path / "cut.pt"))
    assert "\n" not in str(err.value)
    with pytest.raises(CheckpointError, match="parameter names must be strings"):
        load_checkpoint(model, {0: torch.zeros(3)})
    sd = model.state_dict()
    for key, bad in (("relative_position_bias_table", torch.zeros(7)),
                     ("text_embeddings.position_embeddings.weight", torch.zeros(5, sd[
                         "text_embeddings.position_embeddings.weight"].shape[1] + 1)),
                     ("token_type_embeddings.weight", torch.zeros(2))):
        with pytest.raises(CheckpointError, match=f"{key}: the checkpoint's"):
            load_checkpoint(model, {**sd, key: bad}, strict=False)


def test_a_checkpoint_that_is_neither_a_path_nor_a_mapping_is_a_type_error():
    model = torch.nn.Linear(2, 2)
    for bad in (None, 5, [torch.zeros(2)]):
        with pytest.raises(TypeError, match="checkpoint must be a file path or a state dict .*, got"):
            load_checkpoint(model, bad)


def test_a_write_that_fails_on_a_full_disk_says_so(tmp_path, monkeypatch):
    """torch.save on a full disk fails with "basic_ios::clear: iostream error": the error now says the disk is full
    (checked while the partial file exists), leaving no partial file; on a disk with room the writer's own error
    stands."""
    import errno
    import types

    from vlmo_fast import fileio

    def failing(tmp):
        with open(tmp, "wb") as f:
            f.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:858] . PytorchStreamWriter failed writing file "
                           "data/3: file write failed\nmore")

    target = tmp_path / "ckpt.pt"
    with pytest.raises(RuntimeError, match="file write failed"):
        fileio.atomic_write(str(target), failing)
    monkeypatch.setattr(fileio.os, "statvfs", lambda d: types.SimpleNamespace(f_bavail=3, f_frsize=4096))
    with pytest.raises(OSError, match=r"writing .*ckpt.pt: no space left on device \(\[enforce fail .*file write "
                                      r"failed\)") as info:
        fileio.atomic_write(str(target), failing)
    assert info.value.errno == errno.ENOSPC and isinstance(info.value.__cause__, RuntimeError)
    assert os.listdir(tmp_path) == []

    def pyarrow_like(tmp):  # an ENOSPC that names no file (pyarrow: "Error writing bytes to file")
        raise OSError(errno.ENOSPC, "Error writing bytes to file. Detail: [errno 28] No space left on device")

    with pytest.raises(OSError, match=r"writing .*ckpt.pt: no space left on device \(\[Errno 28\] Error writing"):
        fileio.atomic_write(str(target), pyarrow_like)


def test_save_to_a_name_without_extension_or_a_folder(tmp_path):
    """torch.save named its archive after the temporary file's name up to its last ".", the prefix's leading one for
    a target without extension: "invalid file name". A folder is refused by name."""
    m = tiny()
    save_checkpoint(m, tmp_path / "vlmo_tiny")
    dst = vf.VLMo(vf.preset("vlmo_tiny_patch16"))
    load_checkpoint(dst, tmp_path / "vlmo_tiny")
    assert_same_weights(m, dst)
    (tmp_path / "adir.pt").mkdir()
    with pytest.raises(IsADirectoryError, match="is a folder"):
        save_checkpoint(m, tmp_path / "adir.pt")
    assert sorted(os.listdir(tmp_path)) == ["adir.pt", "vlmo_tiny"]


def test_compiled_and_ddp_wrapped_models_save_and_load_their_own_keys(tmp_path):
    """torch.compile's wrapper prefixes every key with "_orig_mod.": saved as such, the file was not the official
    layout, and a plain file did not load into a compiled model."""
    m = tiny()
    compiled = torch.compile(m, backend="eager")
    save_checkpoint(compiled, tmp_path / "c.pt")
    raw = torch.load(tmp_path / "c.pt", weights_only=True)
    assert list(raw) == list(m.state_dict()) + list(vf.checkpoint.LEGACY_INDEX_KEYS)
    dst = torch.compile(vf.VLMo(vf.preset("vlmo_tiny_patch16")), backend="eager")
    report = load_checkpoint(dst, tmp_path / "c.pt")
    assert not report.missing_keys and not report.unexpected_keys
    assert_same_weights(m, dst._orig_mod)

    class FakeDDP(torch.nn.parallel.DistributedDataParallel):  # the unwrapping, without a process group
        def __init__(self, module):
            torch.nn.Module.__init__(self)
            self.module = module

    dst = vf.VLMo(vf.preset("vlmo_tiny_patch16"))
    load_checkpoint(FakeDDP(dst), tmp_path / "c.pt")
    assert_same_weights(m, dst)
    assert vf.checkpoint.plain_module(torch.compile(FakeDDP(dst), backend="eager")) is dst
    dp = torch.nn.DataParallel(vf.VLMo(vf.preset("vlmo_tiny_patch16")))  # (on a CPU, a plain wrapper)
    load_checkpoint(dp, tmp_path / "c.pt")
    assert_same_weights(m, dp.module)
    save_checkpoint(dp, tmp_path / "dp.pt")
    assert list(torch.load(tmp_path / "dp.pt", weights_only=True)) == list(raw)


def test_metadata_needs_safetensors(tmp_path):
    """Metadata given for a .pt file was dropped silently; read_metadata of a .pt file said "header too large"."""
    m = tiny()
    with pytest.raises(ValueError, match="metadata: only a .safetensors file carries metadata"):
        save_checkpoint(m, tmp_path / "m.pt", metadata={"note": 1})
    assert not os.listdir(tmp_path)
    save_checkpoint(m, tmp_path / "m.pt")
    with pytest.raises(CheckpointError, match="is a torch.save file: only a .safetensors file carries metadata"):
        vf.checkpoint.read_metadata(tmp_path / "m.pt")
    save_checkpoint(m, tmp_path / "m.safetensors", metadata={"note": 1})
    assert vf.checkpoint.read_metadata(tmp_path / "m.safetensors") == {"note": 1}


def test_a_model_built_on_meta_loads_with_its_index_buffers(tmp_path):
    """The relative-position index buffers are derived, not saved: after ``to_empty()`` they held garbage, and
    loading ignored the index tensors in the file, so the model read the table at garbage rows."""
    src = tiny(loss_names=loss_names(irtr=1)).eval()
    save_checkpoint(src, tmp_path / "m.safetensors")
    with torch.device("meta"):
        m = vf.VLMo(src.config)
    m = m.to_empty(device="cpu").eval()
    names = ("relative_position_index", "text_relative_position_index", "text_imag_relative_position_index")
    for name in names:
        assert torch.equal(getattr(m, name), getattr(src, name)), name  # to_empty makes them again
    img = torch.randn(2, 3, src.config.image_size, src.config.image_size)
    for load in (lambda: load_checkpoint(m, tmp_path / "m.safetensors"),
                 lambda: m.load_state_dict(src.state_dict())):  # the plain route (FSDP's and DCP's loading too)
        for name in names:
            getattr(m, name).fill_(-12345)  # what uninitialised memory may hold
        load()
        for name, buf in src.named_buffers():
            assert torch.equal(dict(m.named_buffers())[name], buf), name
        with torch.no_grad():
            assert torch.equal(m.image_embedding(img), src.image_embedding(img))
    # loaded with assign=True (what DCP does for a model holding meta tensors): the buffers were left on meta
    with torch.device("meta"):
        m = vf.VLMo(src.config)
    m.load_state_dict(src.state_dict(), assign=True)
    assert all(getattr(m, name).device.type == "cpu" and torch.equal(getattr(m, name), getattr(src, name))
               for name in names)
    # materialised by a parent module (which calls its children's _apply, not their to_empty)
    with torch.device("meta"):
        wrapper = torch.nn.Sequential(vf.VLMo(src.config))
    wrapper.to_empty(device="cpu")
    assert all(torch.equal(getattr(wrapper[0], name), getattr(src, name)) for name in names)


def test_a_base_plus_model_built_on_meta_gets_its_text_position_ids(tmp_path):
    """base_plus adds absolute text positions through the ``position_ids`` buffer (0, 1, ...). After ``to_empty()``
    it held garbage, and a checkpoint without it (newer transformers do not save it) kept that garbage: the text
    read wrong position rows, or past the table. It is made again as the relative indices are."""
    src = tiny(use_rel_pos=False, use_abs_pos_emb=True).eval()
    assert src.relative_position_bias_table is None and src.text_embeddings.use_abs_pos
    state = {k: v for k, v in src.state_dict().items() if k != "text_embeddings.position_ids"}
    torch.save(state, tmp_path / "no_ids.pt")
    ids = torch.randint(1000, 2000, (2, src.config.max_text_len))
    masks = torch.ones_like(ids)
    with torch.device("meta"):
        m = vf.VLMo(src.config)
    m = m.to_empty(device="cpu").eval()
    assert torch.equal(m.text_embeddings.position_ids, src.text_embeddings.position_ids)  # made again
    m.text_embeddings.position_ids.fill_(-12345)  # what uninitialised memory may hold
    load_checkpoint(m, tmp_path / "no_ids.pt")
    assert torch.equal(m.text_embeddings.position_ids, src.text_embeddings.position_ids)
    with torch.no_grad():
        assert torch.equal(m.text_embedding(ids, masks), src.text_embedding(ids, masks))
    with torch.device("meta"):  # loaded with assign=True from a state without them: they were left on meta
        m = vf.VLMo(src.config)
    m.load_state_dict(state, strict=False, assign=True)
    assert m.text_embeddings.position_ids.device.type == "cpu"
    assert torch.equal(m.text_embeddings.position_ids, src.text_embeddings.position_ids)


def test_a_lightning_checkpoint_of_the_official_code_loads_without_its_classes(tmp_path):
    """A .ckpt saved by the official (Lightning) training holds, besides the state dict, callbacks keyed by their
    class, a sacred config and Lightning's AttributeDict: the safe unpickler refused the whole file. Those objects now
    stand as inert placeholders (no code of theirs runs; the classes need not be installed) and the state dict
    loads."""
    import subprocess
    import sys
    import textwrap

    fake = tmp_path / "fake"
    (fake / "pytorch_lightning" / "callbacks").mkdir(parents=True)
    (fake / "sacred").mkdir()
    (fake / "pytorch_lightning" / "__init__.py").write_text("")
    (fake / "pytorch_lightning" / "callbacks" / "__init__.py").write_text(textwrap.dedent("""
        class ModelCheckpoint:
            def __init__(self):
                self.monitor = "val/the_metric"
    """))
    (fake / "pytorch_lightning" / "utilities.py").write_text("class AttributeDict(dict):\n    pass\n")
    (fake / "sacred" / "__init__.py").write_text(textwrap.dedent("""
        class ReadOnlyDict(dict):
            def __reduce__(self):
                return (ReadOnlyDict, (dict(self),))
    """))
    m = tiny()
    torch.save(m.state_dict(), tmp_path / "sd.pt")
    script = textwrap.dedent(f"""
        import torch
        from pytorch_lightning.callbacks import ModelCheckpoint
        from pytorch_lightning.utilities import AttributeDict
        from sacred import ReadOnlyDict
        torch.save({{"epoch": 3, "global_step": 100, "state_dict": torch.load({str(tmp_path / 'sd.pt')!r}),
                    "callbacks": {{ModelCheckpoint: {{"best_model_score": torch.tensor(0.5)}}}},
                    "hyper_parameters": AttributeDict(config=ReadOnlyDict(loss_names={{"itm": 1}})),
                    "checkpoint_callback": ModelCheckpoint()}}, {str(tmp_path / 'official.ckpt')!r})
    """)
    subprocess.run([sys.executable, "-c", script], check=True, env={**os.environ, "PYTHONPATH": str(fake)})
    with pytest.raises(Exception):
        torch.load(tmp_path / "official.ckpt", weights_only=True)  # what a plain safe load says
    dst = vf.VLMo(m.config)
    load_checkpoint(dst, tmp_path / "official.ckpt")
    assert_same_weights(m, dst)
    raw = vf.checkpoint.torch_load(str(tmp_path / "official.ckpt"))
    hparams = raw["hyper_parameters"]  # a dict subclass filled item by item: a plain dict
    assert type(hparams) is dict and hparams["config"].args == ({"loss_names": {"itm": 1}},)  # a reduced object
    (callback_class,) = raw["callbacks"]
    assert callback_class.__module__ == "pytorch_lightning.callbacks" and "pytorch_lightning" not in sys.modules
    assert raw["checkpoint_callback"].state == {"monitor": "val/the_metric"}  # an object: its state, as data


def test_a_whole_pickled_model_is_refused_by_name(tmp_path):
    """torch.save(model) pickles the module object: it is not unpickled (its class stands as a placeholder), and the
    error says what the file holds and what to save instead."""
    path = tmp_path / "model.pt"
    torch.save(tiny(), path)
    with pytest.raises(CheckpointError, match=r"got a pickled vlmo_fast\.model\.vlmo\.VLMo object \(not unpickled: "
                                              r"save its state_dict\(\)\)"):
        read_state_dict(path)


def test_an_official_like_module_without_a_config_resizes_its_table_on_load(tmp_path):
    """Official code (accelerated or not) has no vlmo_fast ``config``: the window comes from its patch embedding (and
    L0 from its hparams, else the official 196), as the official loader reads it, and gives what a vlmo_fast model
    loads. A module whose grid cannot be told is a CheckpointError saying so, not an AttributeError."""
    from vlmo_fast.reference import ReferenceVLMo

    class OfficialLike(torch.nn.Module):
        def __init__(self, cfg, hparams=True):
            super().__init__()
            ref = ReferenceVLMo(cfg)
            for name, child in ref.named_children():
                setattr(self, name, child)
            self.relative_position_bias_table = ref.relative_position_bias_table
            if hparams:
                self.hparams = {"config": {"image_size": cfg.image_size, "max_text_len_of_initckpt": 196}}

    kw = dict(loss_names=loss_names(irtr=1))
    src = tiny(image_size=224, **kw)
    save_checkpoint(src, tmp_path / "m224.pt")
    cfg = vf.preset("vlmo_tiny_patch16", image_size=384, **kw)
    fast = vf.VLMo(cfg)
    load_checkpoint(fast, tmp_path / "m224.pt")
    for hparams in (True, False):
        official = OfficialLike(cfg, hparams)
        vf.accelerate(official)
        report = load_checkpoint(official, tmp_path / "m224.pt", strict=False)
        assert any("relative_position_bias_table" in a for a in report.adapted)
        assert torch.equal(official.relative_position_bias_table, fast.relative_position_bias_table)
    official = OfficialLike(cfg)
    del official.transformer.patch_embed.patch_shape
    official.relative_position_bias_table = torch.nn.Parameter(torch.zeros(1000, cfg.num_heads * cfg.depth))  # none
    # fits: (2W-1)² = 1000 - 2·196 - 5 has no solution
    with pytest.raises(CheckpointError, match="cannot tell the model's patch grid from its 1000-row table"):
        load_checkpoint(official, tmp_path / "m224.pt", strict=False)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_half_precision_checkpoint_is_resampled_from_its_values_not_rounded_again(dtype):
    """The resized table and pos_embed of an fp16/bf16 checkpoint loaded into an fp32 model: the resampling of its
    (exact in fp32) values, rounded once to fp32, not rounded to the checkpoint's dtype first."""
    kw = dict(loss_names=loss_names(irtr=1))
    src = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tiny(image_size=224, **kw).state_dict().items()}
    want = {k: v.float() if v.is_floating_point() else v for k, v in src.items()}
    for model in (lambda: vf.VLMo(vf.preset("vlmo_tiny_patch16", image_size=384, **kw)),):
        a, b = model(), model()
        load_checkpoint(a, src), load_checkpoint(b, want)
        assert a.relative_position_bias_table.dtype == torch.float32
        assert torch.equal(a.relative_position_bias_table, b.relative_position_bias_table)
    cfg = dict(depth=2, vlffn_start_layer_index=1, embed_dim=32, num_heads=2, max_text_len=12)
    plus = vf.VLMo(vf.preset("vlmo_base_plus_patch16", image_size=64, **cfg)).state_dict()
    dst = vf.VLMo(vf.preset("vlmo_base_plus_patch16", image_size=96, **cfg))
    half = adapt_state_dict({k: v.to(dtype) for k, v in plus.items()}, dst)[0]["transformer.pos_embed"]
    full = adapt_state_dict({k: v.to(dtype).float() for k, v in plus.items()}, dst)[0]["transformer.pos_embed"]
    assert half.dtype == torch.float32 and torch.equal(half, full)


def test_a_file_damaged_inside_a_tensor_is_named_on_every_read(tmp_path):
    """torch.save stores a CRC-32 per record that a load never reads: a flipped byte in a tensor's data loaded as a
    wrong weight. Every reader of weights checks them (load_checkpoint, and what evaluate, export and --load-path
    read). The records are named archive/..., not after the temporary file of the atomic write."""
    import zipfile

    from vlmo_fast.train.finetune import read_checkpoint

    m = tiny()
    path = tmp_path / "m.pt"
    save_checkpoint(m, path)
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        info = max(archive.infolist(), key=lambda i: i.file_size)
    assert all(name.startswith("archive/") for name in names), names
    data = bytearray(path.read_bytes())
    data[info.header_offset + 30 + len(info.filename) + len(info.extra) + info.file_size // 2] ^= 0x10
    path.write_bytes(bytes(data))
    for read in (read_state_dict, lambda p: load_checkpoint(tiny(), p), lambda p: read_checkpoint(str(p))):
        with pytest.raises(CheckpointError, match=f"m.pt is damaged: its record {info.filename} does not match"):
            read(path)


def test_a_torch_file_rezipped_with_compression_reads_its_weights_on_every_path(tmp_path):
    """torch writes its records stored; another tool re-zipping the file may deflate them. A mapped load took the
    compressed bytes for the tensors' data (wrong weights, silently: the CRCs are of the uncompressed data), on the
    paths that map (evaluate, export, --resume); they read such a file without mapping."""
    import zipfile

    from vlmo_fast.checkpoint import torch_load
    from vlmo_fast.train.finetune import read_checkpoint

    # incompressible data: deflate keeps the records' sizes, so a mapped load reads the compressed bytes as tensor
    # data without noticing (compressible ones come out shorter, and the map failed, then fell back to a plain read)
    g = torch.Generator().manual_seed(0)
    sd = {"w": torch.randint(0, 256, (1 << 16,), dtype=torch.uint8, generator=g),
          "b": torch.randint(-2**31, 2**31 - 1, (4096,), dtype=torch.int32, generator=g)}
    plain = tmp_path / "plain.pt"
    torch.save({"model": sd, "config": {"model_arch": "vlmo_base_patch16"}}, plain)
    packed = tmp_path / "packed.pt"
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(packed, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info), compress_type=zipfile.ZIP_DEFLATED)
    for got in (torch_load(str(packed), mmap=True)["model"], read_checkpoint(str(packed))[0], read_state_dict(packed)):
        assert set(got) == set(sd) and all(torch.equal(got[k], v) for k, v in sd.items())


def test_writes_of_model_files_are_durable(tmp_path, monkeypatch):
    """save_checkpoint (vf.save_checkpoint, ``vlmo-fast export``) syncs the file and its folder before it returns,
    as training checkpoints do: after a power loss the name holds the whole new file or the old one."""
    from vlmo_fast import fileio

    synced = []
    real = fileio._fsync
    monkeypatch.setattr(fileio, "_fsync", lambda p, directory=False: (synced.append(directory), real(p, directory)))
    for name in ("m.pt", "m.safetensors"):
        synced.clear()
        save_checkpoint({"w": torch.ones(3)}, tmp_path / name)
        assert synced == [False, True], name


def test_tied_tensors_are_written_to_safetensors(tmp_path):
    """Entries that share memory (a decoder tied to the word embeddings in user code, views of one buffer):
    safetensors refuses shared memory; each is written whole, and reads back equal."""
    w = torch.randn(4, 3)
    sd = {"a": w, "tied": w, "view": w.view(-1)[:6].view(2, 3), "other": torch.randn(2)}
    save_checkpoint(sd, tmp_path / "t.safetensors")
    back = read_state_dict(tmp_path / "t.safetensors")
    assert set(back) == set(sd) and all(torch.equal(back[k], v) for k, v in sd.items())


def test_a_folder_or_a_cut_legacy_file_is_named_as_such(tmp_path):
    folder = tmp_path / "deepspeed.ckpt"
    folder.mkdir()
    with pytest.raises(CheckpointError, match="deepspeed.ckpt is a folder, not a file"):
        read_state_dict(folder)
    torch.save(tiny().state_dict(), tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    data = (tmp_path / "legacy.pt").read_bytes()
    for cut in (len(data) // 2, 200):
        (tmp_path / "cut.pt").write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match=r"cut.pt: the file is truncated \(a torch file of the legacy"):
            read_state_dict(tmp_path / "cut.pt")


def test_a_file_saved_without_checksums_loads(tmp_path):
    """torch.serialization.set_crc32_options(False) (faster saves) stores CRC 0: not taken for damage."""
    sd = tiny().state_dict()
    torch.serialization.set_crc32_options(False)
    try:
        torch.save(sd, tmp_path / "nocrc.pt")
    finally:
        torch.serialization.set_crc32_options(True)
    back = read_state_dict(tmp_path / "nocrc.pt")
    assert all(torch.equal(back[k], v) for k, v in sd.items())


def test_the_umask_is_read_without_setting_it_where_linux_tells_it(tmp_path, monkeypatch):
    """Written files get the mode a plain open() would give (the umask applied). Reading the umask by setting it, as
    vlmo_fast's import did, races with other threads' file creation (a file made meanwhile gets none); on Linux it is
    read from /proc, at import and at each write, and only elsewhere read once by setting it."""
    from vlmo_fast import fileio

    real = os.umask
    before = real(0o027)
    try:
        calls = []
        monkeypatch.setattr(os, "umask", lambda mask: calls.append(mask) or real(mask))
        assert fileio._proc_umask() == 0o027  # (the CI machines are Linux)
        assert fileio._import_umask() == 0o027 and calls == []  # what the import runs: nothing set
        save_checkpoint(tiny(), tmp_path / "m.safetensors")
        assert os.stat(tmp_path / "m.safetensors").st_mode & 0o777 == 0o640 and calls == []
        monkeypatch.setattr(fileio, "_proc_umask", lambda: None)  # no /proc: set once, and restored
        assert fileio._import_umask() == 0o027 and calls == [0, 0o027]
    finally:
        real(before)
