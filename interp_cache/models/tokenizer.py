"""An offline byte-level tokenizer: one token per UTF-8 byte, plus pad / bos / eos / unk.

It needs no files and no hub, so every zoo model has a real tokenizer (padding side, special tokens,
stop strings in `generate`) without a network. Token strings use the printable byte-to-character map
of byte-level BPE, so transformers' stop-string matcher reads them as bytes.
"""

from __future__ import annotations

import json
import os

from transformers import PreTrainedTokenizer

NUM_BYTES = 256
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 256, 257, 258, 259
VOCAB_SIZE = 260
_SPECIALS = {"<pad>": PAD_ID, "<s>": BOS_ID, "</s>": EOS_ID, "<unk>": UNK_ID}


def _byte_to_char() -> dict[int, str]:
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    shift = 0
    for byte in range(NUM_BYTES):
        if byte not in printable:
            printable.append(byte)
            chars.append(NUM_BYTES + shift)
            shift += 1
    return {byte: chr(char) for byte, char in zip(printable, chars)}


class ByteTokenizer(PreTrainedTokenizer):
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, padding_side: str = "left", **kwargs):
        self._byte_to_char = _byte_to_char()
        self._char_to_byte = {c: b for b, c in self._byte_to_char.items()}
        kwargs.setdefault("pad_token", "<pad>")
        kwargs.setdefault("bos_token", "<s>")
        kwargs.setdefault("eos_token", "</s>")
        kwargs.setdefault("unk_token", "<unk>")
        super().__init__(padding_side=padding_side, **kwargs)

    @property
    def vocab_size(self) -> int:
        return VOCAB_SIZE

    def get_vocab(self) -> dict[str, int]:
        vocab = {self._byte_to_char[b]: b for b in range(NUM_BYTES)}
        vocab.update(_SPECIALS)
        return vocab

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        return [self._byte_to_char[b] for b in text.encode("utf-8")]

    def _convert_token_to_id(self, token: str) -> int:
        if token in _SPECIALS:
            return _SPECIALS[token]
        byte = self._char_to_byte.get(token)
        return UNK_ID if byte is None else byte

    def _convert_id_to_token(self, index: int) -> str:
        if index < NUM_BYTES:
            return self._byte_to_char[index]
        for token, token_id in _SPECIALS.items():
            if token_id == index:
                return token
        return "<unk>"

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        data = bytearray()
        text = []
        for token in tokens:
            if token in _SPECIALS:
                text.append(data.decode("utf-8", errors="replace"))
                data = bytearray()
                text.append(token)
            else:
                data.append(self._char_to_byte[token])
        text.append(data.decode("utf-8", errors="replace"))
        return "".join(text)

    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        return token_ids_0 if token_ids_1 is None else token_ids_0 + token_ids_1

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None):
        path = os.path.join(save_directory, (filename_prefix or "") + "byte_vocab.json")
        with open(path, "w") as f:
            json.dump({"type": "byte-level", "specials": _SPECIALS}, f)
        return (path,)
