"""One sample: decode encoded image bytes, tokenise a caption to exactly ``max_text_len`` (spec §7).

Shared by the arrow datasets and the WebDataset reader so both produce the same item dictionary.
"""

from __future__ import annotations

import io
import logging
from typing import Dict

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

logger = logging.getLogger("vlmo_fast.data")

# Text keys of one item; the collate stacks them (special_tokens_mask only feeds the plain MLM collator).
TEXT_KEYS = ("text_ids", "text_masks", "special_tokens_mask")


# the formats an image of a dataset is decoded from (JPEG's reader opens a phone camera's MPO too); PIL would also
# hand PostScript to Ghostscript, or open a dozen other formats a downloaded file could claim to be
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF", "PPM")


def open_image(data: bytes) -> Image.Image:
    """``Image.open`` of encoded bytes in one of ``IMAGE_FORMATS``; other bytes raise ``PIL.UnidentifiedImageError``
    saying which formats are read."""
    Image.init()  # (registers every plugin once: Image.open alone registers only the common few, not WebP's)
    try:
        return Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except UnidentifiedImageError:
        raise UnidentifiedImageError(f"not an image of a format read here ({', '.join(IMAGE_FORMATS)}; "
                                     f"{len(data)} bytes starting {bytes(data[:8])!r})") from None


def decode_image(data) -> Image.Image:
    """Encoded bytes (JPEG/PNG/...) -> RGB PIL image, fully decoded (so a truncated file raises here)."""
    if isinstance(data, str):
        raise ValueError(f"expected encoded image bytes, got the string {data[:20]!r}")
    img = open_image(bytes(data))
    img.load()
    return img if img.mode == "RGB" else img.convert("RGB")  # (convert copies even an RGB image)


def mixed_seed(*words: int) -> int:
    """A seed in [0, 2**62) from integer words (e.g. seed, epoch, index), hashed by numpy's SeedSequence: distinct
    words give unrelated seeds (an affine mix such as seed·M² + epoch·M + index repeats once an index reaches M)."""
    return int(np.random.SeedSequence([int(w) % 2**64 for w in words]).generate_state(1, np.uint64)[0] % 2**62)


def encode_text(tokenizer, text: str, max_text_len: int) -> Dict[str, torch.Tensor]:
    """``[CLS] text [SEP] [PAD]...`` of exactly ``max_text_len`` tokens (truncated if longer), each 1-D int64."""
    enc = tokenizer(text, max_length=max_text_len)
    return {
        "text": text,
        "text_ids": enc["input_ids"][0],
        "text_masks": enc["attention_mask"][0],
        "special_tokens_mask": enc["special_tokens_mask"][0],
    }


class BadSampleLog:
    """Logs the first few unreadable samples of a dataset (per process), then stays quiet."""

    def __init__(self, name: str, first: int = 5):
        self.name, self.first, self.count = name, first, 0

    def __call__(self, where: str, exc: BaseException) -> None:
        self.count += 1
        if self.count <= self.first:
            more = " (further ones are not logged)" if self.count == self.first else ""
            logger.warning("%s: skipping unreadable sample %s: %s: %s%s", self.name, where, type(exc).__name__, exc,
                           more)
