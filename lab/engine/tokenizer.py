"""Text <-> token ids for the server: the checkpoint's `tokenizer.json` (Hugging Face `tokenizers`)
when present, else a byte-level tokenizer (id = byte value) that works with any vocabulary >= 256.

Streaming decodes incrementally: a token that ends inside a multi-byte character yields "" until the
character completes, so concatenating the streamed pieces gives exactly the full decoded text.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from lab.errors import LabError

BYTE_VOCAB = 256


class Tokenizer(Protocol):
    name: str

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255. Ids the model produces above 255 (its vocabulary may be larger) have no
    text: they decode to the visible placeholder `<|id|>` so nothing is silently dropped."""

    name = "byte-level"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        out: list[str] = []
        buf = bytearray()
        for i in ids:
            if 0 <= i < BYTE_VOCAB:
                buf.append(i)
                continue
            if buf:
                out.append(buf.decode("utf-8", errors="replace"))
                buf.clear()
            out.append(f"<|{i}|>")
        if buf:
            out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)


class HFTokenizer:
    """A `tokenizer.json` loaded with the `tokenizers` library (no network, no transformers)."""

    def __init__(self, path: Path):
        from tokenizers import Tokenizer as _Tok

        try:
            self._tok = _Tok.from_file(str(path))
        except Exception as e:  # the library raises a bare Exception on a malformed file
            raise LabError(f"{path}: not a valid tokenizer.json ({e}); fix or remove the file") from None
        self.name = str(path)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)


def find_tokenizer_json(model_path: str | None) -> Path | None:
    """tokenizer.json inside a checkpoint directory, or beside a checkpoint file."""
    if not model_path:
        return None
    p = Path(model_path)
    for cand in (p / "tokenizer.json", p.parent / "tokenizer.json"):
        if cand.is_file():
            return cand
    return None


def load_tokenizer(model_path: str | None, vocab_size: int) -> Tokenizer:
    path = find_tokenizer_json(model_path)
    if path is not None:
        return HFTokenizer(path)
    if vocab_size < BYTE_VOCAB:
        raise LabError(
            f"the model's vocabulary ({vocab_size}) is smaller than 256 and no tokenizer.json was found "
            "beside the checkpoint; add tokenizer.json or send prompts as token ids"
        )
    return ByteTokenizer()


class IncrementalDecoder:
    """Decode one streamed token at a time; returns the new text (possibly "") for each token."""

    def __init__(self, tokenizer: Tokenizer):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.emitted = 0  # characters of the decoded text already returned

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the rest
            return ""
        new = text[self.emitted :]
        self.emitted = len(text)
        return new

    def flush(self) -> str:
        text = self.tok.decode(self.ids)
        new = text[self.emitted :]
        self.emitted = len(text)
        return new
