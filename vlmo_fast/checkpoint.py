"""Reading and writing VLMo checkpoints in the official layout (spec §1.3, §2 "Resolution change", Q9, Q11).

- Files: ``.safetensors``, or ``.pt``/``.pth``/``.ckpt`` read with ``torch.load(weights_only=True)``: no arbitrary
  object is ever unpickled.
- Nesting: the state dict may sit under ``state_dict`` (Lightning), ``module`` (DeepSpeed, ``module.`` prefix
  stripped) or ``model``, tried in that order, else the file is the state dict.
- Adaptation to the target model: the three legacy index tensors some released checkpoints carry are dropped; the
  relative-position table is resampled to a new image size (BEiT geometric grid + bicubic spline, without SciPy);
  base_plus absolute ``pos_embed`` is resized bicubically; text position embeddings are truncated or extended; a
  2-row ``token_type_embeddings`` is extended to NLVR2's 3 rows (row 2 = row 1).
- Writes are atomic (temporary file + rename).
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import zipfile
import zlib
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .fileio import atomic_write  # noqa: F401 - public here too (checkpoint.atomic_write)
from .model import relpos

LEGACY_INDEX_KEYS = ("relative_position_index", "text_relative_position_index", "text_imag_relative_position_index")
StateDict = Dict[str, torch.Tensor]
PathLike = Union[str, "os.PathLike[str]"]


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model."""


def read_state_dict(path: PathLike) -> StateDict:
    """The tensors of a checkpoint file, unwrapped from ``state_dict``/``module``/``model`` nesting."""
    try:
        path = os.fsdecode(path)  # str, bytes or PathLike
    except TypeError:
        raise TypeError(f"path must be a str, bytes or os.PathLike, got {type(path).__name__}") from None
    require_file(path)
    if is_safetensors(path):
        from safetensors.torch import load_file

        try:
            tensors = load_file(path, device="cpu")
        except Exception as exc:  # a damaged header or body
            short = _safetensors_shortfall(path)
            if short:
                raise CheckpointError(f"cannot read {path}: the file is truncated (an interrupted copy or "
                                      f"download?): {short}") from exc
            raise CheckpointError(f"cannot read {path} as safetensors: {first_line(exc)}") from exc
        return unwrap_state_dict(tensors, source=path)
    verify_checksums(path)  # (a load reads no checksum: a file damaged inside a tensor would load)
    return unwrap_state_dict(torch_load(path), source=path)


def require_file(path: str, what: str = "checkpoint") -> None:
    """A FileNotFoundError, or a CheckpointError for a folder, unless ``path`` is a file."""
    if os.path.isdir(path):
        raise CheckpointError(f"{what} {path} is a folder, not a file (a DeepSpeed checkpoint folder? Its "
                              f"zero_to_fp32.py writes the weights as one file)")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} file not found: {path}")


def torch_load(path: str, mmap: bool = False, what: str = "") -> object:
    """``torch.load(weights_only=True)`` on the CPU, or a one-line ``CheckpointError`` naming the file. With ``mmap``
    the file is mapped, not read (a caller needing only the model never reads a training checkpoint's optimizer
    state), falling back to a plain read for the legacy non-zip format, which cannot be mapped; an error is then the
    plain read's, and for a zip with compressed records (torch writes them stored; a file re-zipped by another
    tool may deflate them), whose mapped bytes would be taken for the tensors' data."""
    mmap = mmap and _all_records_stored(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:  # not a torch file, truncated, or objects the safe unpickler refuses
        error = exc
    if mmap:
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            error = exc
    kind = _file_kind(path)
    if kind in ("zip", "pickle"):
        try:  # e.g. a Lightning .ckpt of the official code: its callbacks and hyper-parameters are objects of classes
            return _load_with_placeholders(path, kind)  # (pytorch_lightning, sacred) that the safe unpickler refuses
        except Exception:  # noqa: BLE001 - the first reason is the one to give
            pass
    if kind == "truncated zip":
        raise CheckpointError(f"cannot read {what or 'checkpoint'} {path}: the file is truncated or damaged (a torch "
                              f"zip file without its end record; an interrupted copy or download?)")
    if kind == "pickle" and (isinstance(error, EOFError) or "unexpected EOF" in str(error)):
        raise CheckpointError(f"cannot read {what or 'checkpoint'} {path}: the file is truncated (a torch file of the "
                              f"legacy format that ends early; an interrupted copy or download?)")
    if kind is None:
        raise CheckpointError(f"cannot read {what or 'checkpoint'} {path}: it is not a checkpoint (neither a torch "
                              f"file nor safetensors)")
    raise CheckpointError(
        f"cannot read {what or 'checkpoint'} {path} with torch.load(weights_only=True): {first_line(error)}. "
        f"vlmo_fast never unpickles arbitrary objects; a checkpoint must be a plain state dict or safetensors.")


def torch_save(obj: object, path: str) -> None:
    """``torch.save`` through an open file: the zip's records are named ``archive/...`` (torch's name for a file
    object), not after the temporary name an atomic write gives the file."""
    with open(path, "wb") as f:
        torch.save(obj, f)


def _all_records_stored(path: str) -> bool:
    """Whether no record of a torch zip file is compressed (so its tensors can be mapped); True for other files."""
    try:
        with zipfile.ZipFile(path) as archive:
            return all(info.compress_type == zipfile.ZIP_STORED for info in archive.infolist())
    except (zipfile.BadZipFile, OSError, EOFError, ValueError):
        return True  # (not a zip, or a damaged one: the load says why)


def _load_with_placeholders(path: str, kind: str) -> object:
    """``torch.load(weights_only=True)`` with every global the safe unpickler refuses (listed from the file's
    opcodes, nothing executed) standing for an inert placeholder: an object that keeps its arguments and state as
    data, or a plain dict for a dict subclass (which the unpickler fills only as a dict). No code of the file's
    classes runs; tensors and containers load as usual, so the state dict of a file whose other entries are such
    objects (a Lightning checkpoint's callbacks, a sacred config) is read. ``kind``: ``_file_kind(path)`` (a zip is
    mapped)."""
    names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    if not names:
        raise CheckpointError("no refused global to stand in for")
    as_dict: set = set()
    for _ in range(len(names) + 1):
        stand_ins = [(_placeholder(name, name in as_dict), name) for name in names]
        try:
            with torch.serialization.safe_globals(stand_ins):  # mapped: a .ckpt's optimizer state is not read
                return torch.load(path, map_location="cpu", weights_only=True,
                                  mmap=kind == "zip" and _all_records_stored(path))
        except pickle.UnpicklingError as exc:
            found = re.search(r"Can only SETITEMS? for dict.*?but got <class '([^']+)'>", str(exc), re.S)
            if found is None or found.group(1) not in names or found.group(1) in as_dict:
                raise
            as_dict.add(found.group(1))  # filled with SETITEMS: a dict subclass
    raise CheckpointError("placeholders did not converge")


def _placeholder(name: str, as_dict: bool) -> type:
    module, _, qualname = name.rpartition(".")

    if as_dict:
        class Placeholder:
            def __new__(cls, *args, **kwargs):
                return dict(*args[:1], **kwargs)
    else:
        class Placeholder:
            """An object of a class that was not loaded: its arguments and state, as data."""

            def __init__(self, *args, **kwargs):
                self.args, self.kwargs, self.state = args, kwargs, None

            def __setstate__(self, state):
                self.state = state

            def __repr__(self) -> str:
                return f"<placeholder for {name}>"

    Placeholder.__module__, Placeholder.__qualname__, Placeholder.__name__ = module, qualname, qualname
    Placeholder.placeholder_for = name
    return Placeholder


def _safetensors_shortfall(path: str) -> Optional[str]:
    """How a safetensors file is shorter than its header says (its header cut, or tensor data missing), else None."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if size < 8 + n:
                return f"its header is {n} bytes, the file {size} bytes in all"
            header = json.loads(f.read(n))
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError, RecursionError):
        return None
    if size < 8 + n + end:
        return f"its tensors need {8 + n + end} bytes, the file has {size}"
    return None


def is_safetensors(path: str) -> bool:
    """Whether ``path`` is a safetensors file: by its name, or by its content under another name (e.g. ``.bin``)."""
    return path.endswith(".safetensors") or _file_kind(path) == "safetensors"


def _file_kind(path: str) -> Optional[str]:
    """What a file's first bytes say it is: "zip" (torch.save), "truncated zip" (a zip start without the end record),
    "pickle" (torch's legacy format), "safetensors" (an 8-byte header length, then a JSON header), or None."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return None
    if head[:4] == b"PK\x03\x04":
        return "zip" if zipfile.is_zipfile(path) else "truncated zip"
    if len(head) == 9 and head[8:9] == b"{" and 8 < int.from_bytes(head[:8], "little") + 8 <= size:
        return "safetensors"  # (asked before the pickle: a header length's low byte may be 0x80)
    if head[:1] == b"\x80":
        return "pickle"
    return None


def verify_checksums(path: str) -> None:
    """Every record of a torch (zip) file checked against the CRC-32 ``torch.save`` stored for it: a CheckpointError
    naming the first damaged one. A load reads no checksum (a mapped load reads the tensors' bytes only when used),
    so a file damaged inside its data loaded without complaint. A file of the legacy format is left to the load, and
    records saved without a checksum (``torch.serialization.set_crc32_options(False)``: CRC 0) are not checked."""
    if not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if info.CRC == 0 and info.file_size:  # saved without checksums (set_crc32_options(False))
                    continue
                with archive.open(info) as record:  # (reading to the end checks the CRC)
                    while record.read(1 << 24):
                        pass
    except zipfile.BadZipFile as exc:
        found = re.search(r"Bad CRC-32 for file '([^']*)'", str(exc))
        if found:
            raise CheckpointError(f"{path} is damaged: its record {found.group(1)} does not match its "
                                  f"checksum") from exc
        raise CheckpointError(f"{path} is damaged: {first_line(exc)}") from exc
    except (OSError, EOFError, zlib.error, NotImplementedError) as exc:
        raise CheckpointError(f"{path} is damaged: {first_line(exc)}") from exc


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, without terminal colour codes or a final period. torch's safe
    unpickler explains itself over many lines that start with advice to unpickle anyway: only the first sentence of
    its reason is kept."""
    lines = [line.strip() for line in re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).splitlines() if line.strip()]
    if lines and lines[0].startswith("Weights only load failed"):
        found = re.search(r"WeightsUnpickler error:\s*(.+)", "\n".join(lines[1:]))
        reason = found.group(1) if found else next(
            (line for line in lines[1:] if not line.startswith(("(", "Please file", "Check the documentation"))), "")
        reason = re.split(r"(?<=\.)\s", reason)[0].rstrip(".")
        lines = [f"the safe unpickler refused it ({reason})" if reason else "the safe unpickler refused it"]
    return f"{type(exc).__name__}: {lines[0].rstrip('.') if lines else ''}"


WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def unwrap_state_dict(obj: object, source: str = "checkpoint") -> StateDict:
    if not isinstance(obj, Mapping):
        pickled = getattr(type(obj), "placeholder_for", None)
        got = f"a pickled {pickled} object (not unpickled: save its state_dict())" if pickled else type(obj).__name__
        raise CheckpointError(f"{source}: expected a dict of tensors, got {got}")
    for key in ("state_dict", "module", "model"):
        if key in obj and isinstance(obj[key], Mapping):
            sd = dict(obj[key])
            if key == "module":
                sd = {k[len("module.") :] if k.startswith("module.") else k: v for k, v in sd.items()}
            break
    else:
        sd = dict(obj)
    keys = [k for k in sd if not isinstance(k, str)]
    if keys:
        raise CheckpointError(f"{source}: parameter names must be strings, got {keys[:10]}")
    # the state dict of a wrapped model: every key under DDP's / DataParallel's "module." or torch.compile's
    # "_orig_mod." (the official loader would silently load nothing)
    while sd and (prefix := next((p for p in WRAPPER_PREFIXES if all(k.startswith(p) for k in sd)), None)):
        sd = {k[len(prefix) :]: v for k, v in sd.items()}
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        kinds = sorted({getattr(type(sd[k]), "placeholder_for", None) or type(sd[k]).__name__ for k in bad[:10]})
        raise CheckpointError(f"{source}: these entries are not tensors: {bad[:10]} ({', '.join(kinds)})")
    return sd


@dataclass
class LoadReport:
    missing_keys: List[str] = field(default_factory=list)
    unexpected_keys: List[str] = field(default_factory=list)
    ignored_keys: List[str] = field(default_factory=list)
    adapted: List[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = []
        for title, keys in (
            ("missing (kept at their initial values)", self.missing_keys),
            ("unexpected (not loaded)", self.unexpected_keys),
            ("ignored (legacy index tensors)", self.ignored_keys),
            ("adapted", self.adapted),
        ):
            if keys:
                lines.append(f"{title}: {len(keys)}\n  " + "\n  ".join(keys))
        return "\n".join(lines) if lines else "all keys matched"


def _resize_pos_embed(pos: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Bicubic resize of the patch part of an absolute (1, 1+P, D) position embedding; the CLS entry is kept. In fp32
    at least; the caller rounds to the model's dtype."""
    src = int(round((pos.shape[1] - 1) ** 0.5))
    dst = int(round((num_tokens - 1) ** 0.5))
    if src * src != pos.shape[1] - 1 or dst * dst != num_tokens - 1:
        raise CheckpointError(f"transformer.pos_embed: cannot map {pos.shape[1]} positions to {num_tokens}")
    wide = torch.promote_types(pos.dtype, torch.float32)  # fp32 at least (fp16/bf16 values are exact in it)
    grid = pos[:, 1:].reshape(1, src, src, -1).permute(0, 3, 1, 2).to(wide)
    grid = F.interpolate(grid, size=(dst, dst), mode="bicubic", align_corners=False)
    return torch.cat([pos[:, :1].to(wide), grid.permute(0, 2, 3, 1).flatten(1, 2)], dim=1)


OFFICIAL_L0 = 196  # max_text_len_of_initckpt of every official config (spec §2)


def _odd_square(n: int) -> bool:
    root = math.isqrt(n) if n > 0 else 0
    return root * root == n and root % 2 == 1


ADAPTED_KEYS = ("text_embeddings.position_embeddings.weight", "transformer.pos_embed", "relative_position_bias_table",
                "token_type_embeddings.weight")


def adapt_state_dict(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> tuple:
    """Make an official state dict fit ``model`` (image size, text length, task heads). Returns (dict, report)."""
    sd = dict(state_dict)
    target = model.state_dict()
    report = LoadReport()
    for key in LEGACY_INDEX_KEYS:
        if key in sd and key not in target:
            sd.pop(key)
            report.ignored_keys.append(key)
    why = _other_architecture(sd, target)
    if why is not None:
        raise CheckpointError(why)
    # the tensors resized below may differ in length, never in rank or (but the table's columns, checked there) width
    for key in ADAPTED_KEYS:
        if key in sd and key in target and (sd[key].dim() != target[key].dim() or (
                key != "relative_position_bias_table" and sd[key].shape[-1] != target[key].shape[-1])):
            raise CheckpointError(f"{key}: the checkpoint's {tuple(sd[key].shape)} cannot be adapted to the model's "
                                  f"{tuple(target[key].shape)}")

    _adapt_text_positions(sd, target, report)
    _adapt_image_positions(sd, target, report)
    _adapt_relpos_table(sd, target, model, report)
    _adapt_token_types(sd, target, report)
    return sd, report


def _adapt_text_positions(sd: Dict[str, torch.Tensor], target: Mapping[str, torch.Tensor], report: LoadReport) -> None:
    """base_plus's absolute text positions: the ids buffer that newer transformers versions do not save (spec §1.3),
    and the table cut or extended (with the model's rows) to the model's text length."""
    key = "text_embeddings.position_ids"
    if key in target and key not in sd and any(k.startswith("text_embeddings.") for k in sd):
        sd[key] = target[key].clone()
    key = "text_embeddings.position_embeddings.weight"
    if key in sd and key in target and sd[key].shape[0] != target[key].shape[0]:
        want = target[key].shape[0]
        src = sd[key].to(target[key].dtype)
        sd[key] = src[:want] if src.shape[0] >= want else torch.cat([src, target[key][src.shape[0] :]], 0)
        sd["text_embeddings.position_ids"] = torch.arange(want).unsqueeze(0)
        report.adapted.append(f"{key}: {src.shape[0]} -> {want} rows")


def _adapt_image_positions(sd: Dict[str, torch.Tensor], target: Mapping[str, torch.Tensor],
                           report: LoadReport) -> None:
    """The patch position embeddings resized (bicubic) to the model's image size."""
    key = "transformer.pos_embed"
    if key in sd and key in target and sd[key].shape != target[key].shape:
        old = sd[key].shape
        sd[key] = _resize_pos_embed(sd[key], target[key].shape[1]).to(target[key].dtype)
        report.adapted.append(f"{key}: {tuple(old)} -> {tuple(sd[key].shape)} (bicubic)")


def _adapt_relpos_table(sd: Dict[str, torch.Tensor], target: Mapping[str, torch.Tensor], model: nn.Module,
                        report: LoadReport) -> None:
    """The relative-position table resampled (bicubic, on BEiT's grid) to the model's image window."""
    key = "relative_position_bias_table"
    if not (key in sd and key in target and sd[key].shape != target[key].shape):
        return
    src, want = sd[key], target[key]
    if src.shape[1] != want.shape[1]:
        raise CheckpointError(
            f"{key}: the checkpoint has {src.shape[1]} columns (heads x layers), the model {want.shape[1]}: "
            f"a different architecture"
        )
    window, l0 = _table_geometry(model, want.shape[0])
    # resize_table takes the rows after the patch offsets (image CLS, text, cross-modal: 3 + 2 L0 + 2) to be the
    # model's: a checkpoint made with another L0 (196 in every official one) would have text rows resampled as
    # patch offsets. The rows tell the layouts apart unless both fit.
    assumed = ""
    if l0 != OFFICIAL_L0 and _odd_square(src.shape[0] - (2 * OFFICIAL_L0 + 5)):
        if not _odd_square(src.shape[0] - (2 * l0 + 5)):
            raise CheckpointError(
                f"{key}: the checkpoint's {src.shape[0]} rows fit a table made with max_text_len_of_initckpt="
                f"{OFFICIAL_L0} (the official value), not one made with the model's {l0} (its text rows would be "
                f"resampled as image rows): build the model with max_text_len_of_initckpt={OFFICIAL_L0}")
        # both layouts fit the row count: read as the model's (a checkpoint of this configuration), said
        assumed = (f"; read as made with the model's max_text_len_of_initckpt={l0}, though its rows also fit "
                   f"the official {OFFICIAL_L0}")
    try:  # resampled from the checkpoint's values in float64, rounded once, to the model's dtype
        sd[key] = relpos.resize_table(src.double(), want.shape[0], window).to(want.dtype)
    except ValueError as exc:
        raise CheckpointError(f"{key}: {exc}") from exc
    report.adapted.append(f"{key}: {tuple(src.shape)} -> {tuple(sd[key].shape)} (bicubic, BEiT grid{assumed})")


def _adapt_token_types(sd: Dict[str, torch.Tensor], target: Mapping[str, torch.Tensor], report: LoadReport) -> None:
    """NLVR2's third token type (the second image), started as the image type."""
    key = "token_type_embeddings.weight"
    if key in sd and key in target and sd[key].shape[0] == 2 and target[key].shape[0] == 3:
        sd[key] = torch.cat([sd[key], sd[key][1:2]], dim=0)
        report.adapted.append(f"{key}: 2 -> 3 rows (NLVR2: row 2 starts as row 1)")


def _table_geometry(model: nn.Module, rows: int) -> tuple:
    """(W, L0) of ``model``'s relative-position table of ``rows`` rows: from a vlmo_fast config, else (a module laid
    out as the official one, e.g. accelerated official code) from its patch embedding's grid and its
    ``hparams["config"]["max_text_len_of_initckpt"]`` (the official 196 when it has none), checked against the rows."""
    config = getattr(model, "config", None)
    if hasattr(config, "window_size") and hasattr(config, "max_text_len_of_initckpt"):
        return config.window_size, config.max_text_len_of_initckpt
    hparams = getattr(model, "hparams", None)
    official = hparams.get("config") if isinstance(hparams, Mapping) else getattr(hparams, "config", None)
    l0 = official.get("max_text_len_of_initckpt", OFFICIAL_L0) if isinstance(official, Mapping) else OFFICIAL_L0
    shape = getattr(getattr(getattr(model, "transformer", None), "patch_embed", None), "patch_shape", None)
    if shape is not None:
        window = int(shape[0])
    else:  # solve (2W-1)² = R - 2 L0 - 5
        side = math.isqrt(max(rows - 2 * l0 - 5, 0))
        window = (side + 1) // 2
    if not isinstance(l0, int) or relpos.num_table_rows(window, l0) != rows:
        raise CheckpointError(
            f"relative_position_bias_table: cannot tell the model's patch grid from its {rows}-row table (no vlmo_fast "
            f"config; patch grid {shape}, max_text_len_of_initckpt {l0!r}): load into a vlmo_fast model, or give "
            f"the model a transformer.patch_embed.patch_shape")
    return window, l0


def _other_architecture(sd: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]) -> Optional[str]:
    """Why a checkpoint is of another architecture than the model (another width), or None: said first, in those
    terms, rather than through the first tensor that cannot be adapted (a dead text position table, spec Q8)."""
    key = "transformer.cls_token"
    if key not in sd or key not in target or sd[key].shape[-1:] == target[key].shape[-1:]:
        return None

    def depth(keys) -> int:
        found = {int(m.group(1)) for m in map(re.compile(r"transformer\.blocks\.(\d+)\.").match, keys) if m}
        return max(found) + 1 if found else 0

    return (f"the checkpoint is a model of width {sd[key].shape[-1]} with {depth(sd)} blocks, the model has width "
            f"{target[key].shape[-1]} with {depth(target)} blocks: a different architecture (the official presets: "
            f"base 768 x 12, large 1024 x 24, base_plus 544 x 24)")


def trained_image_size(state_dict: Mapping[str, torch.Tensor], patch_size: int = 16,
                       max_text_len_of_initckpt: int = 196) -> Optional[int]:
    """The image side a state dict was trained at, read from its position parameters: the relative-position table's
    rows R = (2W-1)² + 3 + 2·max_text_len_of_initckpt + 2 (1126 at 224 px, 2606 at 384, 3878 at 480 with patch 16)
    or the absolute ``transformer.pos_embed``'s 1 + W² entries. None when it has neither, or they fit no grid."""
    table = state_dict.get("relative_position_bias_table")
    if table is not None and table.dim() == 2:
        distances = table.shape[0] - 2 * max_text_len_of_initckpt - 2 - 3  # (2W-1)²
        side = int(round(max(distances, 0) ** 0.5))
        if distances > 0 and side * side == distances and side % 2 == 1:
            return (side + 1) // 2 * patch_size
    pos = state_dict.get("transformer.pos_embed")
    if pos is not None and pos.dim() == 3:
        window = int(round(max(pos.shape[1] - 1, 0) ** 0.5))
        if window > 0 and window * window == pos.shape[1] - 1:
            return window * patch_size
    return None


def load_checkpoint(
    model: nn.Module, checkpoint: Union[PathLike, Mapping[str, torch.Tensor]], strict: bool = True
) -> LoadReport:
    """Load an official (or vlmo_fast) checkpoint into ``model``, adapting it as the official loader does.

    With ``strict`` every model key must be present and every checkpoint key used (legacy index tensors aside);
    otherwise missing and unexpected keys are reported in the returned ``LoadReport``. Shape mismatches that cannot
    be adapted always raise a ``CheckpointError`` listing them.
    """
    if not isinstance(checkpoint, (str, bytes, os.PathLike, Mapping)):
        raise TypeError(f"checkpoint must be a file path or a state dict (a mapping of tensors), "
                        f"got {type(checkpoint).__name__}")
    model = plain_module(model)
    sd = read_state_dict(checkpoint) if not isinstance(checkpoint, Mapping) else unwrap_state_dict(checkpoint)
    sd, report = adapt_state_dict(sd, model)
    target = model.state_dict()
    report.missing_keys = [k for k in target if k not in sd]
    report.unexpected_keys = [k for k in sd if k not in target]
    mismatched = [
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(target[k].shape)}"
        for k in sd
        if k in target and sd[k].shape != target[k].shape
    ]
    if mismatched:
        raise CheckpointError("checkpoint does not fit the model; shape mismatches:\n  " + "\n  ".join(mismatched))
    if strict and (report.missing_keys or report.unexpected_keys):
        raise CheckpointError(f"checkpoint does not match the model (strict=True):\n{report}")
    if target and len(report.missing_keys) == len(target):  # loading nothing is never meant, even without strict
        raise CheckpointError(f"no key of the checkpoint matches the model: not a VLMo checkpoint, or nested under "
                              f"an unknown prefix (checkpoint keys: {_some(report.unexpected_keys)}; model keys: "
                              f"{_some(list(target))})")
    model.load_state_dict({k: v for k, v in sd.items() if k in target}, strict=False)  # (VLMo then makes its index
    # buffers again: derived, never loaded, garbage in a model materialised from the meta device)
    return report


def _some(keys: List[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "") if keys else "none"


def plain_module(model: nn.Module) -> nn.Module:
    """The model inside ``torch.compile``'s and (Distributed)DataParallel's wrappers, whose state-dict keys gain
    ``_orig_mod.`` and ``module.``: checkpoints hold the model's own keys, and load into a wrapped model as into the
    plain one."""
    while True:
        if isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        else:
            return model


def save_checkpoint(
    model_or_state: Union[nn.Module, Mapping[str, torch.Tensor]],
    path: PathLike,
    metadata: Optional[Mapping[str, object]] = None,
) -> None:
    """Write the official state-dict layout atomically and durably (synced to disk before it replaces ``path``):
    safetensors for ``*.safetensors``, else a plain ``torch.save`` dict of tensors that
    ``torch.load(weights_only=True)`` (and the official loader) reads.

    From a model, the file also carries its three relative-position index tensors, as the released official
    checkpoints do: the official loader pops them without a default when it changes the resolution (Q9).
    ``metadata`` (JSON-serialisable values; a ``.safetensors`` path only, else a ``ValueError``) is stored in the
    safetensors header; without it a vlmo_fast model's file records ``{"vlmo_fast_config": config}``, from which
    ``vlmo-fast evaluate`` reads the architecture, image size and text length."""
    path = os.fspath(path)
    safetensors = path.endswith(".safetensors")
    if metadata is not None and not safetensors:
        raise ValueError(f"metadata: only a .safetensors file carries metadata; {path} would be written as a "
                         f"torch.save file of tensors (the official layout), without it")
    if isinstance(model_or_state, nn.Module):
        model_or_state = plain_module(model_or_state)
        sd = model_or_state.state_dict()
        for key in LEGACY_INDEX_KEYS:
            index = getattr(model_or_state, key, None)
            if isinstance(index, torch.Tensor) and key not in sd:
                sd[key] = index
    else:
        sd = dict(model_or_state)
    if metadata is None and isinstance(model_or_state, nn.Module) and hasattr(model_or_state, "config"):
        metadata = {"vlmo_fast_config": model_or_state.config.to_dict()}
    if safetensors:
        from safetensors.torch import save_file

        tensors = _unshared({k: v.detach().cpu().contiguous() for k, v in sd.items()})
        meta = {k: json.dumps(v) for k, v in (metadata or {}).items()}
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta), durable=True)
    else:
        tensors = {k: v.detach().cpu() for k, v in sd.items()}
        atomic_write(path, lambda tmp: torch_save(tensors, tmp), durable=True)


def _unshared(tensors: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Each tensor whose memory another entry shares (tied weights, views of one buffer) copied: safetensors
    refuses shared memory, and a file of tensors holds each one whole anyway."""
    seen: set = set()
    out = {}
    for key, value in tensors.items():
        storage = value.untyped_storage().data_ptr() if value.numel() else None
        out[key] = value.clone() if storage in seen else value
        if storage is not None:
            seen.add(storage)
    return out


def read_metadata(path: PathLike) -> Dict[str, object]:
    """Metadata stored by ``save_checkpoint`` in a safetensors file (e.g. the model config)."""
    from safetensors import safe_open

    if not os.fspath(path).endswith(".safetensors") and os.path.isfile(path):
        with open(path, "rb") as f:
            if f.read(4) == b"PK\x03\x04":  # a torch.save (zip) file
                raise CheckpointError(f"{os.fspath(path)} is a torch.save file: only a .safetensors file carries "
                                      f"metadata")
    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:  # a missing or damaged file
        raise CheckpointError(f"cannot read the metadata of {os.fspath(path)}: {first_line(exc)}") from exc
    out: Dict[str, object] = {}
    for k, v in meta.items():  # other tools store plain strings (e.g. {"format": "pt"}): kept as they are
        try:
            out[k] = json.loads(v)
        except (ValueError, RecursionError):  # (not JSON, or nested past the parser's depth)
            out[k] = v
    return out


# ---- BEiT (vision-only) checkpoints for the text-only stage (spec §5.1 "Language stage") -------------------------


def looks_like_beit(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """A BEiT/ViT state dict: block keys at the top level (no ``transformer.`` prefix)."""
    return any(k.startswith("blocks.") for k in state_dict) and not any(k.startswith("transformer.") for k in state_dict)


def text_stage_state(state_dict: StateDict, model: nn.Module, notes: Optional[List[str]] = None) -> StateDict:
    """``state_dict`` as the official loader starts ``model`` from it: converted (``convert_beit_checkpoint``) when
    the model is the text-only stage's (textmlm on) and the checkpoint a BEiT one, else unchanged."""
    if model.config.task_on("textmlm") and looks_like_beit(state_dict):
        return convert_beit_checkpoint(state_dict, model, notes)
    return state_dict


def convert_beit_checkpoint(state_dict: Mapping[str, torch.Tensor], model: nn.Module,
                            notes: Optional[List[str]] = None) -> StateDict:
    """Remap a BEiT checkpoint to VLMo names as the official ``convert_to_textpt_ckpt`` does: every key gets the
    ``transformer.`` prefix, ``mlp`` becomes ``mlp_imag`` and ``norm2`` ``norm2_imag``; the per-layer tables
    ``blocks.{l}.attn.relative_position_bias_table`` (D_img, H) are concatenated along columns in layer order and
    written into the image rows of (a copy of) the model's table, whose text rows stay as they are (zeros at init).
    A BEiT checkpoint of another image size has its patch offsets resampled to the model's grid (said in ``notes``).
    Other BEiT keys (fc_norm, head, per-layer relative_position_index) come out as unexpected keys."""
    out: StateDict = {}
    tables: Dict[int, torch.Tensor] = {}
    for key, value in state_dict.items():
        if "relative_position_bias_table" in key:
            if ".attn." not in key:
                raise CheckpointError(f"{key}: only per-layer BEiT tables (blocks.<l>.attn.…) can be converted")
            tables[int(key.split(".attn.")[0].split(".")[-1])] = value
            continue
        if "mlp" in key:
            key = key.replace("mlp", "mlp_imag")
        elif "norm2" in key:
            key = key.replace("norm2", "norm2_imag")
        out["transformer." + key] = value
    if tables:
        table = model.relative_position_bias_table
        if table is None:
            raise CheckpointError("the BEiT checkpoint has relative position tables but the model has none")
        merged = torch.cat([tables[i] for i in sorted(tables)], dim=1)
        if merged.shape[1] != table.shape[1]:
            raise CheckpointError(
                f"BEiT tables give a ({merged.shape[0]}, {merged.shape[1]}) block; the model table is "
                f"{tuple(table.shape)}")
        window = model.config.window_size
        rows = relpos.num_image_distances(window)
        if merged.shape[0] != rows:  # another image size: its patch offsets resampled to the model's grid, as a
            src_rows = merged.shape[0]  # VLMo table is on loading (the 3 CLS rows kept); copied as they were, the
            try:  # rows landed on other offsets, and a larger grid's on the text rows
                merged = relpos.resize_table(merged, rows, window)
            except ValueError as exc:
                raise CheckpointError(f"BEiT tables: {exc}") from exc
            if notes is not None:
                notes.append(f"BEiT relative_position_bias_table blocks: {src_rows} -> {rows} rows (bicubic, BEiT "
                             f"grid: the model's {window}x{window} patches)")
        full = table.detach().clone().cpu()
        full[: merged.shape[0]] = merged.to(full.dtype)
        out["relative_position_bias_table"] = full
    return out
