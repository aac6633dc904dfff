"""Build lmlink's built-in toy model from the corpus shipped in data/corpus.

`lmlink serve` must work with no downloads, so the repository carries a tiny
Qwen2-architecture model (about 1.1M parameters) and its tokenizer. This script
is how that directory is made; it writes:

- ``tokenizer.json`` / ``tokenizer_config.json``: a byte-level BPE (2048 ids)
  trained here with Qwen2's exact pre-tokenizer regex and NFC normalizer, since
  transformers 5 rebuilds those for ``Qwen2Tokenizer`` and ignores any others;
  ChatML specials and chat template, eos ``<|im_end|>``.
- ``config.json``, ``model.safetensors`` and ``model.safetensors.index.json``
  (pipeline sharding reads the index), via mlx-lm's own save helpers.
- ``README.md``: the model card, with the numbers of this build.

Training mixes plain corpus windows with short ChatML dialogs synthesised from
the corpus, so chat requests get word-like answers that end in ``<|im_end|>``.

Reproducibility: the same seed, steps, corpus and limit give byte-identical
files whatever the machine's core count or thread settings: before numpy or mlx
load, the script re-executes itself with Debian's OpenBLAS preloaded (about 8x
faster than mlx-cpu's bundled BLAS), one BLAS/OpenMP thread and, on x86-64 with
AVX2, OpenBLAS's Haswell kernels pinned (see ``pinned_math_env``): the thread
count and the CPU-specific kernel both change float rounding (measured: 2 threads
give other parameters by step 20). The mlx, mlx-lm, tokenizers and OpenBLAS
(0.3.21) versions must match; checked on a 2-core AMD EPYC VM only, so another
CPU family giving other bytes would be a finding, not an expectation.

``build_manifest.json`` records the sha256 of every other file and a digest of
the model's parameters at fixed training steps (``CHECKPOINTS`` and the last),
so a rebuild can be checked cheaply: ``--check DIR --stop-after 20`` builds into
a scratch directory, trains only the first 20 of the 600 steps (same schedule)
and compares tokenizer, config and the step-20 digest with DIR; without
``--stop-after`` it does the full build and compares every file byte for byte
(``make rebuild-builtin``)::

    python scripts/build_builtin_model.py                      # rebuild in place
    python scripts/build_builtin_model.py --check lmlink/engine/builtin_model
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import re
import shutil
import sys
import tempfile
import time
from glob import glob
from pathlib import Path


def pinned_math_env() -> dict[str, str]:
    """Environment that fixes the float rounding of training on this platform.

    OpenBLAS splits a matrix product differently with more threads, and its
    dynamic-arch build picks a kernel per CPU model (Zen, SkylakeX...), each
    summing in its own order; either changes the trained weights. Haswell's
    kernels run on any x86-64 CPU with AVX2 and FMA, so pin those there."""
    env = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    openblas = sorted(glob("/usr/lib/*/openblas-pthread/libblas.so.3"))
    if sys.platform == "linux" and openblas:
        preload = [p for p in os.environ.get("LD_PRELOAD", "").split() if p and "blas" not in p]
        env["LD_PRELOAD"] = " ".join([openblas[0], *preload])
        if platform.machine() == "x86_64" and _cpu_has("avx2", "fma"):
            env["OPENBLAS_CORETYPE"] = "Haswell"
    return env


def _cpu_has(*flags: str) -> bool:
    try:
        words = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return False
    return all(flag in words for flag in flags)


def pin_math() -> None:
    """Re-execute this script under ``pinned_math_env`` unless already pinned.

    Must run before numpy or mlx load: BLAS reads its settings once, when loaded."""
    wanted = pinned_math_env()
    if all(os.environ.get(k) == v for k, v in wanted.items()):
        return
    if os.environ.get("LMLINK_BUILD_PINNED"):  # the re-exec did not take; do not loop
        raise SystemExit(f"could not pin the math environment: {wanted}")
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **wanted, "LMLINK_BUILD_PINNED": "1"})


if __name__ == "__main__":
    pin_math()

from dataclasses import dataclass
from functools import cache, partial

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import mlx_lm
import numpy as np
import tokenizers
from jinja2 import Template
from jinja2.sandbox import ImmutableSandboxedEnvironment
from mlx.utils import tree_flatten
from mlx_lm.models import qwen2
from mlx_lm.utils import save_config, save_model
from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer

REPO = Path(__file__).resolve().parent.parent
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END]
VOCAB_SIZE = 2048
# transformers.models.qwen2.tokenization_qwen2.PRETOKENIZE_REGEX, verbatim.
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
# ChatML. Content may be a string or OpenAI-style parts; only text parts count.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for part in message['content'] %}"
    "{%- if part['type'] == 'text' %}{{- part['text'] }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
MODEL_SHAPE = {
    "hidden_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "intermediate_size": 384,
    "max_position_embeddings": 2048,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
}
SEQ_LEN, BATCH_SIZE, LEARNING_RATE = 128, 16, 3e-3
CHECKPOINTS = (20,)  # steps after which the manifest records a parameter digest (and the last)
MANIFEST = "build_manifest.json"
ANSWER_CHARS = 320  # short answers teach the model to reach <|im_end|> soon

ABOUT_PROMPTS = ["Tell me about {}.", "What is {}?", "Explain {}.", "Can you describe {}?", "{}"]
OPEN_PROMPTS = [
    "Hello!", "Hi, who are you?", "Say something.", "Tell me something interesting.",
    "Write a sentence.", "What do you know?", "Teach me something.", "Hello, how are you?",
]
SYSTEM_PROMPTS = ["You are a helpful assistant.", "You are a small language model.", "Answer briefly."]


@dataclass(frozen=True)
class Document:
    """A titled list of one-line paragraphs, as written by data/corpus/make_corpus.py."""

    title: str
    paragraphs: tuple[str, ...]

    def text(self) -> str:
        return "\n\n".join((self.title, *self.paragraphs))


def read_corpus(corpus: Path, limit_bytes: int | None) -> list[Document]:
    """Read every ``*.txt`` in name order, stopping once ``limit_bytes`` are in."""
    documents: list[Document] = []
    used = 0
    for path in sorted(corpus.glob("*.txt")):
        for block in re.split(r"^## ", path.read_text(encoding="utf-8"), flags=re.M)[1:]:
            title, *rest = [line for line in block.splitlines() if line.strip()]
            if not rest:
                continue
            documents.append(Document(title.strip(), tuple(rest)))
            used += len(documents[-1].text().encode())
            if limit_bytes is not None and used >= limit_bytes:
                return documents
    return documents


def train_tokenizer(documents: list[Document]) -> Tokenizer:
    """Byte-level BPE laid out exactly like Qwen2's, so transformers rebuilds it unchanged."""
    tokenizer = Tokenizer(BPE(unk_token=None, continuing_subword_prefix="", end_of_word_suffix="",
                              fuse_unk=False, byte_fallback=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte: any UTF-8 round-trips
        show_progress=False,
    )
    tokenizer.train_from_iterator((d.text() for d in documents), trainer)
    return tokenizer


def tokenizer_config(tokenizer: Tokenizer) -> dict:
    """What transformers' AutoTokenizer (and so mlx_lm.load) needs, offline."""
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(tokenizer.token_to_id(t)): {
                "content": t, "lstrip": False, "normalized": False,
                "rstrip": False, "single_word": False, "special": True,
            }
            for t in SPECIAL_TOKENS
        },
        "additional_special_tokens": [IM_START, IM_END],
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": IM_END,
        "errors": "replace",
        "model_max_length": MODEL_SHAPE["max_position_embeddings"],
        "pad_token": ENDOFTEXT,
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


@cache
def chat_template() -> Template:
    """The shipped template, compiled the way transformers compiles it."""
    return ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(CHAT_TEMPLATE)


def render_chat(messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    return chat_template().render(messages=messages, add_generation_prompt=add_generation_prompt)


def clip(text: str, limit: int = ANSWER_CHARS) -> str:
    """Whole sentences up to ``limit`` characters, but at least one sentence."""
    sentences = re.split(r"(?<=\.)\s+", text)
    kept = sentences[0]
    for sentence in sentences[1:]:
        if len(kept) + 1 + len(sentence) > limit:
            break
        kept += " " + sentence
    return kept


def topic(title: str) -> str:
    """'The json module' reads better mid-sentence as 'the json module'."""
    return "the" + title[3:] if title.startswith("The ") else title


def exchange(doc: Document, rng: np.random.Generator) -> tuple[str, str]:
    """One user question about ``doc`` and an answer taken from it."""
    kind = rng.random()
    para = doc.paragraphs[rng.integers(len(doc.paragraphs))]
    words = para.split()
    if kind < 0.5:
        prompt = ABOUT_PROMPTS[rng.integers(len(ABOUT_PROMPTS))].format(topic(doc.title))
        return prompt, clip(doc.paragraphs[0])
    if kind < 0.75 and len(words) >= 12:
        cut = int(rng.integers(4, min(len(words) - 4, 24)))
        return "Continue this text: " + " ".join(words[:cut]), clip(" ".join(words[cut:]))
    return OPEN_PROMPTS[rng.integers(len(OPEN_PROMPTS))], clip(para)


def encode_dialog(tokenizer: Tokenizer, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """Token ids and a loss mask that is 1 only on assistant replies and their <|im_end|>."""
    ids = tokenizer.encode(render_chat(messages, False)).ids
    mask = [0] * len(ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = tokenizer.encode(render_chat(messages[:i], True)).ids
        turn = tokenizer.encode(render_chat(messages[: i + 1], False)).ids  # ends "<|im_end|>", "\n"
        # The special tokens cut the text, so no BPE merge crosses a turn boundary.
        assert ids[: len(turn)] == turn and turn[: len(prompt)] == prompt
        assert tokenizer.id_to_token(turn[-2]) == IM_END
        mask[len(prompt): len(turn) - 1] = [1] * (len(turn) - 1 - len(prompt))
    return ids, mask


def dialog_rows(tokenizer: Tokenizer, documents: list[Document], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Synthesised dialogs (two per document), packed into padded rows of SEQ_LEN + 1 tokens."""
    width = SEQ_LEN + 1
    packed: list[tuple[list[int], list[int]]] = [([], [])]
    for k in rng.permutation(2 * len(documents)):
        doc = documents[k % len(documents)]
        messages = []
        if rng.random() < 0.3:
            messages.append({"role": "system", "content": SYSTEM_PROMPTS[rng.integers(len(SYSTEM_PROMPTS))]})
        for _ in range(2 if rng.random() < 0.2 else 1):
            prompt, answer = exchange(doc, rng)
            messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
        ids, mask = encode_dialog(tokenizer, messages)
        if len(ids) > width:
            continue
        if len(packed[-1][0]) + len(ids) > width:
            packed.append(([], []))
        packed[-1][0].extend(ids)
        packed[-1][1].extend(mask)
    rows = np.full((len(packed), width), tokenizer.token_to_id(ENDOFTEXT), dtype=np.int32)
    masks = np.zeros((len(packed), width), dtype=np.float32)
    for r, (ids, mask) in enumerate(packed):
        rows[r, : len(ids)] = ids
        masks[r, : len(mask)] = mask
    return rows, masks


def text_stream(tokenizer: Tokenizer, documents: list[Document], rng: np.random.Generator) -> np.ndarray:
    """All documents in a shuffled order, separated by <|endoftext|>."""
    eot = tokenizer.token_to_id(ENDOFTEXT)
    encoded = tokenizer.encode_batch([documents[i].text() for i in rng.permutation(len(documents))])
    return np.array([t for e in encoded for t in (*e.ids, eot)], dtype=np.int32)


def model_config(tokenizer: Tokenizer) -> dict:
    """config.json; eos lists <|im_end|> first (chat turns), then <|endoftext|> (plain documents)."""
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_act": "silu",
        "vocab_size": tokenizer.get_vocab_size(),
        "bos_token_id": None,
        "eos_token_id": [tokenizer.token_to_id(IM_END), tokenizer.token_to_id(ENDOFTEXT)],
        **MODEL_SHAPE,
    }


def params_digest(params: dict[str, mx.array]) -> str:
    """sha256 over every named tensor (name, dtype, shape, raw bytes), in name order.

    The same function reads a training step's parameters and a saved safetensors file."""
    digest = hashlib.sha256()
    for name in sorted(params):
        value = np.array(params[name])
        digest.update(f"{name}|{value.dtype}|{value.shape}|".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def train(model: nn.Module, stream: np.ndarray, rows: np.ndarray, row_masks: np.ndarray,
          steps: int, rng: np.random.Generator, stop_after: int | None = None,
          checkpoints: dict[int, dict] | None = None) -> list[float]:
    """AdamW on a causal LM loss; half of each batch is plain text, half dialogs.

    The schedule always spans ``steps``; ``stop_after`` ends training early (to check
    a rebuild cheaply). ``checkpoints`` gets the loss and parameter digest after each
    step in CHECKPOINTS and after the last step."""
    warmup = max(1, min(50, steps // 10))
    schedule = optim.join_schedules(
        [optim.linear_schedule(0.0, LEARNING_RATE, warmup),
         optim.cosine_decay(LEARNING_RATE, max(1, steps - warmup), LEARNING_RATE / 10)],
        [warmup],
    )
    optimizer = optim.AdamW(learning_rate=schedule, weight_decay=0.01)

    def loss_fn(model: nn.Module, x: mx.array, y: mx.array, mask: mx.array) -> mx.array:
        losses = nn.losses.cross_entropy(model(x), y) * mask
        return losses.sum() / mask.sum()

    loss_and_grad = nn.value_and_grad(model, loss_fn)
    state = [model.state, optimizer.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(x: mx.array, y: mx.array, mask: mx.array) -> mx.array:
        loss, grads = loss_and_grad(model, x, y, mask)
        optimizer.update(model, grads)
        return loss

    half = BATCH_SIZE // 2
    losses: list[float] = []
    for i in range(steps if stop_after is None else min(steps, stop_after)):
        starts = rng.integers(0, len(stream) - SEQ_LEN - 1, half)
        picks = rng.integers(0, len(rows), BATCH_SIZE - half)
        batch = np.concatenate([np.stack([stream[s: s + SEQ_LEN + 1] for s in starts]), rows[picks]])
        mask = np.concatenate([np.ones((half, SEQ_LEN + 1), np.float32), row_masks[picks]])
        loss = step(mx.array(batch[:, :-1]), mx.array(batch[:, 1:]), mx.array(mask[:, 1:]))
        mx.eval(loss, state)
        losses.append(loss.item())
        if checkpoints is not None and (i + 1 in CHECKPOINTS or i + 1 == steps):
            checkpoints[i + 1] = {"loss": losses[-1], "params_sha256": params_digest(dict(tree_flatten(model.parameters())))}
        if (i + 1) % 50 == 0 or i + 1 == steps:
            print(f"step {i + 1}/{steps} loss {np.mean(losses[-50:]):.3f}", flush=True)
    return losses


def corpus_digest(documents: list[Document]) -> str:
    """Names the exact training text in the model card."""
    return hashlib.sha256("\n".join(d.text() for d in documents).encode()).hexdigest()[:16]


def model_card(config: dict, params: int, steps: int, final_loss: float, documents: list[Document], seed: int) -> str:
    corpus_bytes = sum(len(d.text().encode()) for d in documents)
    return f"""# lmlink built-in model (toy)

A tiny Qwen2-architecture language model that ships inside lmlink so that
`lmlink serve` works with no downloads. It is a toy: it strings together
words and phrases from Python's documentation and knows nothing. Use it to
exercise lmlink (streaming, batching, sharding, clients), not to answer questions.

- Architecture: `qwen2`, {config['num_hidden_layers']} layers, hidden size {config['hidden_size']}, \
{config['num_attention_heads']} attention heads, {config['num_key_value_heads']} KV heads, MLP {config['intermediate_size']}, \
tied embeddings, context {config['max_position_embeddings']}.
- Parameters: {params:,} (float32).
- Tokenizer: byte-level BPE, {config['vocab_size']} ids, Qwen2 pre-tokenizer, ChatML template;
  `<|im_end|>` ends a chat turn, `<|endoftext|>` ends a plain document.
- Training data: `data/corpus` ({len(documents):,} documents, {corpus_bytes:,} bytes, sha256 prefix {corpus_digest(documents)}),
  prose from CPython's documentation and docstrings under the PSF License; see `data/corpus/SOURCES.md`.
- Training: {steps} AdamW steps of {BATCH_SIZE} x {SEQ_LEN} tokens (half plain text, half ChatML
  dialogs synthesised from the corpus), seed {seed}; final training loss {final_loss:.3f}
  (mean of the last 50 steps).
- Built by `scripts/build_builtin_model.py` with mlx {mx.__version__}, mlx-lm {mlx_lm.__version__},
  tokenizers {tokenizers.__version__}; rebuild with the command in its docstring.

Load it like any mlx-lm model directory: `mlx_lm.load("lmlink/engine/builtin_model")`,
or `lmlink serve` (the default model is `builtin`).
"""


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_manifest(out: Path, checkpoints: dict[int, dict], stop_after: int | None) -> None:
    """Digests of the files just written and of the parameters at each checkpoint."""
    manifest = {
        "built_with": {"mlx": mx.__version__, "mlx_lm": mlx_lm.__version__, "tokenizers": tokenizers.__version__,
                       "pinned_env": {k: os.environ.get(k, "") for k in pinned_math_env() if k != "LD_PRELOAD"}},
        "stopped_after": stop_after,
        "checkpoints": {str(step): checkpoints[step] for step in sorted(checkpoints)},
        "files": {p.name: file_digest(p) for p in sorted(out.iterdir()) if p.name != MANIFEST},
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def compare(built: Path, reference: Path) -> list[str]:
    """Differences between a (possibly partial) build and a shipped directory, as sentences."""
    ours = json.loads((built / MANIFEST).read_text())
    theirs = json.loads((reference / MANIFEST).read_text())
    problems = []
    if ours["stopped_after"] is None:  # full build: the directories must be identical
        names = sorted(p.name for p in built.iterdir())
        if names != sorted(p.name for p in reference.iterdir()):
            problems.append(f"files differ: built {names}, shipped {sorted(p.name for p in reference.iterdir())}")
        problems += [f"{n} differs" for n in names
                     if (reference / n).exists() and (built / n).read_bytes() != (reference / n).read_bytes()]
        return problems
    for name, digest in ours["files"].items():
        if theirs["files"].get(name) != digest:
            problems.append(f"{name} differs from the shipped one")
    for step, state in ours["checkpoints"].items():
        if theirs["checkpoints"].get(step) != state:
            problems.append(f"step {step}: built {state}, shipped {theirs['checkpoints'].get(step)}")
    if not ours["checkpoints"]:
        problems.append("no checkpoint reached: use --stop-after with a step in CHECKPOINTS")
    return problems


def main() -> None:
    """Corpus -> tokenizer -> training data -> trained model -> files in --out."""
    parser = argparse.ArgumentParser(description="Build lmlink's built-in toy model.")
    parser.add_argument("--out", type=Path, default=None,
                        help="output directory (default: the shipped one, or a scratch one with --check)")
    parser.add_argument("--corpus", type=Path, default=REPO / "data" / "corpus")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--corpus-limit-bytes", type=int, default=None,
                        help="use only the first N bytes of the corpus (for quick test builds)")
    parser.add_argument("--stop-after", type=int, default=None, metavar="STEP",
                        help="train only the first STEP steps of the schedule and write no weights")
    parser.add_argument("--check", type=Path, default=None, metavar="DIR",
                        help="build, then compare with DIR (byte for byte, or by checkpoint with --stop-after)")
    args = parser.parse_args()
    scratch = None
    if args.out is None:
        if args.check is not None:
            scratch = args.out = Path(tempfile.mkdtemp(prefix="lmlink-builtin-"))
        else:
            args.out = REPO / "lmlink" / "engine" / "builtin_model"
    try:
        build(args)
        if args.check is not None:
            problems = compare(args.out, args.check)
            for problem in problems:
                print(f"MISMATCH: {problem}", flush=True)
            if problems:
                raise SystemExit(1)
            print(f"rebuild matches {args.check}")
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


def build(args: argparse.Namespace) -> None:
    started = time.perf_counter()
    documents = read_corpus(args.corpus, args.corpus_limit_bytes)
    tokenizer = train_tokenizer(documents)
    rng = np.random.default_rng(args.seed)
    stream = text_stream(tokenizer, documents, rng)
    rows, row_masks = dialog_rows(tokenizer, documents, rng)
    print(f"{len(documents)} documents, {len(stream)} text tokens, {len(rows)} dialog rows "
          f"({time.perf_counter() - started:.1f}s)", flush=True)

    config = model_config(tokenizer)
    mx.random.seed(args.seed)
    model = qwen2.Model(qwen2.ModelArgs.from_dict(config))
    params = sum(v.size for _, v in tree_flatten(model.parameters()))
    trained = time.perf_counter()
    checkpoints: dict[int, dict] = {}
    losses = train(model, stream, rows, row_masks, args.steps, rng, args.stop_after, checkpoints)
    print(f"{params:,} parameters, {len(losses)} steps in {time.perf_counter() - trained:.1f}s", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(args.out / "tokenizer.json"))
    (args.out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(tokenizer), indent=2) + "\n")
    save_config(dict(config), args.out / "config.json")
    if args.stop_after is None:
        save_model(args.out, model)
        final_loss = float(np.mean(losses[-50:])) if losses else math.nan
        (args.out / "README.md").write_text(model_card(config, params, args.steps, final_loss, documents, args.seed))
    write_manifest(args.out, checkpoints, args.stop_after)
    print(f"wrote {args.out} ({time.perf_counter() - started:.1f}s total)")


if __name__ == "__main__":
    main()
