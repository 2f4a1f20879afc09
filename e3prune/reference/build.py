"""Build the shipped reference model: a small Qwen3 causal LM trained on the standard library.

No model can be downloaded where this project is developed and tested, so the project trains
its own. The corpus is the Python standard library's own source,
which exists on every machine with Python. Files are split into train / held-out by a hash of
their relative path, so the split does not depend on file order or on which other files exist.

Everything is seeded; with the same Python (hence the same stdlib), torch version and thread
count the build is bit-for-bit repeatable.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import math
import platform
import random
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from e3prune.config import StepConfig
from e3prune.errors import E3PruneError

log = logging.getLogger(__name__)

EOS = "<|endoftext|>"
# A minimal chat template so that chat-formatted sources can be rendered with this tokenizer.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "__pycache__", "idlelib"}


class ReferenceModelConfig(StepConfig):
    """Shape and training budget of the reference model (defaults are what is shipped)."""

    num_layers: int = Field(24, ge=2, le=64)
    hidden_size: int = Field(128, ge=16, le=1024)
    intermediate_size: int = Field(384, ge=16, le=4096)
    num_attention_heads: int = Field(4, ge=1)
    num_key_value_heads: int = Field(2, ge=1)
    head_dim: int = Field(32, ge=8)
    vocab_size: int = Field(4096, ge=300, le=8192)
    max_position_embeddings: int = Field(512, ge=32)
    seq_len: int = Field(256, ge=16)
    batch_size: int = Field(16, ge=1)
    train_steps: int = Field(900, ge=1)
    warmup_steps: int = Field(60, ge=0)
    learning_rate: float = Field(3e-3, gt=0, le=1.0)
    min_learning_rate_ratio: float = Field(0.1, ge=0, le=1.0)
    weight_decay: float = Field(0.1, ge=0)
    heldout_every: int = Field(10, ge=2, description="one file in N (by path hash) is held out")
    heldout_tokens: int = Field(131072, ge=1024)
    log_every_steps: int = Field(100, ge=1)
    threads: int = Field(2, ge=1)
    seed: int = 0
    architecture: Literal["qwen3", "llama"] = Field(
        "qwen3", description="qwen3 (the shipped model: tied embeddings, q/k norm) or llama (untied)"
    )
    split_salt: str = Field(
        "", description="mixed into the path hash that holds files out: another salt is another split"
    )
    exclude_near_copies: bool = Field(
        False,
        description="leave out of training every file that is a near-copy of a held-out file (word 16-grams), "
        "so held-out text is not seen text; also writes train_corpus.jsonl.gz",
    )


@dataclass(frozen=True)
class Document:
    path: str  # relative to the stdlib root, posix separators
    text: str


def stdlib_documents(root: Path | None = None) -> list[Document]:
    """The standard library's ``.py`` files (tests and vendored packages excluded), sorted."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    docs = []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root)
        if SKIP_DIRS & set(rel.parts):
            continue
        text = p.read_bytes().decode("utf-8", errors="replace")
        if text.strip():
            docs.append(Document(rel.as_posix(), text))
    if not docs:
        raise E3PruneError(f"no Python source found under {root}", field="stdlib")
    return docs


def is_heldout(path: str, every: int, salt: str = "") -> bool:
    """Stable split: a file is held out when the hash of its relative path (after ``salt``) says so."""
    return int(hashlib.sha256((salt + path).encode()).hexdigest()[:8], 16) % every == 0


def without_near_copies(docs: list[Document], heldout_texts: list[str]) -> list[Document]:
    """``docs`` less every file that is a near-copy of a held-out text (the 16-gram rule of
    ``builtin:reference-train``, :data:`e3prune.data_sources.NEAR_COPY_SHARE`)."""
    from e3prune.data_sources import NEAR_COPY_SHARE, _word_ngrams

    heldout: set[int] = set()
    for text in heldout_texts:
        heldout |= _word_ngrams(text)
    kept = []
    for d in docs:
        grams = _word_ngrams(d.text)
        if not grams or len(grams & heldout) <= NEAR_COPY_SHARE * len(grams):
            kept.append(d)
    return kept


def train_documents(root: Path | None = None, every: int | None = None) -> list[Document]:
    """The files ``build_reference_model`` trains on: the standard library's minus the held-out ones.

    The same selection as the build (``stdlib_documents`` and ``is_heldout``, one file in
    ``heldout_every`` held out by path hash), so with the Python the model was built with (its card
    says which) these are exactly its training files, and never a held-out file whatever the Python.
    """
    every = every or ReferenceModelConfig.model_fields["heldout_every"].default
    return [d for d in stdlib_documents(root) if not is_heldout(d.path, every)]


def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE (GPT-2 style) trained with ``tokenizers``; returned as a HF fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS, bos_token=None)
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = 1 << 30
    return fast


def encode_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    """Concatenate documents, each followed by EOS, into one 1-D int64 tensor of token ids."""
    ids: list[int] = []
    eos = tokenizer.eos_token_id
    for enc in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids.extend(enc)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.int64)


def lr_at(step: int, cfg: ReferenceModelConfig) -> float:
    """Linear warmup, then cosine decay to ``min_learning_rate_ratio`` of the peak."""
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.train_steps - cfg.warmup_steps)
    floor = cfg.min_learning_rate_ratio
    return cfg.learning_rate * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def make_model(cfg: ReferenceModelConfig, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    config_cls, model_cls = (LlamaConfig, LlamaForCausalLM) if cfg.architecture == "llama" else (Qwen3Config, Qwen3ForCausalLM)
    config = config_cls(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.architecture == "qwen3",
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
    )
    return model_cls(config)


@torch.no_grad()
def perplexity(model, tokens: torch.Tensor, seq_len: int, batch_size: int = 16) -> float:
    """Token-weighted perplexity of ``model`` over ``tokens`` cut into non-overlapping sequences."""
    n = tokens.numel() // seq_len
    seqs = tokens[: n * seq_len].view(n, seq_len)
    total, count = 0.0, 0
    model.eval()
    for i in range(0, n, batch_size):
        batch = seqs[i : i + batch_size]
        logits = model(input_ids=batch).logits.float()
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1), reduction="sum"
        )
        total += loss.item()
        count += batch[:, 1:].numel()
    return math.exp(total / count)


def demo_tokens(heldout: torch.Tensor, seq_len: int, sequences: int) -> torch.Tensor:
    """``sequences`` held-out sequences spread evenly over the held-out stream (not just its first
    file), flattened: a cheap but representative sample for the card's comparisons."""
    n = heldout.numel() // seq_len
    stride = max(1, n // sequences)
    return heldout[: n * seq_len].view(n, seq_len)[::stride][:sequences].reshape(-1)


def _importance_demo(model, heldout: torch.Tensor, seq_len: int, seed: int) -> dict:
    """Held-out perplexity after removing 25 % of layers: the last ones vs. random choices."""
    from e3prune.masking import masked_view

    n_layers = model.config.num_hidden_layers
    n_remove = round(0.25 * n_layers)
    tokens = demo_tokens(heldout, seq_len, 64)
    rows = {"full": perplexity(model, tokens, seq_len)}
    last = list(range(n_layers - n_remove, n_layers))
    with masked_view(model, [i for i in range(n_layers) if i not in last]):
        rows["last"] = perplexity(model, tokens, seq_len)
    rng = random.Random(seed)
    randoms = []
    for _ in range(5):
        removed = sorted(rng.sample(range(n_layers), n_remove))
        with masked_view(model, [i for i in range(n_layers) if i not in removed]):
            randoms.append({"removed": removed, "ppl": perplexity(model, tokens, seq_len)})
    # Single-layer sensitivity: how much held-out perplexity rises when one layer is skipped.
    single = []
    for layer in range(n_layers):
        with masked_view(model, [i for i in range(n_layers) if i != layer]):
            single.append(perplexity(model, demo_tokens(heldout, seq_len, 16), seq_len))
    return {"n_remove": n_remove, "tokens": tokens.numel(), "ppl": rows, "random": randoms, "single_layer_ppl": single}


def build_reference_model(cfg: ReferenceModelConfig, output_dir: Path, stdlib_root: Path | None = None) -> dict:
    """Train the tokenizer and the model, and write the shipped files into ``output_dir``.

    Writes: the HF checkpoint (safetensors), tokenizer, ``heldout_tokens.safetensors``,
    ``heldout_corpus.jsonl.gz`` (held-out documents, the built-in data source),
    ``training_log.json`` and ``README.md`` (the card).
    """
    from safetensors.torch import save_file

    output_dir = Path(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()):
        raise E3PruneError(f"{output_dir} exists and is not empty; choose a new directory", field="output")
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    started = time.time()

    docs = stdlib_documents(stdlib_root)
    train_docs = [d for d in docs if not is_heldout(d.path, cfg.heldout_every, cfg.split_salt)]
    heldout_docs = [d for d in docs if is_heldout(d.path, cfg.heldout_every, cfg.split_salt)]
    if cfg.exclude_near_copies:
        before = len(train_docs)
        train_docs = without_near_copies(train_docs, [d.text for d in heldout_docs])
        log.info("left out %d training files that are near-copies of held-out files", before - len(train_docs))
    log.info("corpus: %d train files, %d held-out files", len(train_docs), len(heldout_docs))

    tokenizer = train_tokenizer([d.text for d in train_docs], cfg.vocab_size)
    train_ids = encode_stream(tokenizer, [d.text for d in train_docs])
    heldout_ids = encode_stream(tokenizer, [d.text for d in heldout_docs])
    if heldout_ids.numel() < cfg.heldout_tokens:
        raise E3PruneError(
            f"the held-out files give {heldout_ids.numel()} tokens, fewer than {cfg.heldout_tokens}",
            field="heldout_tokens",
        )
    heldout = heldout_ids[: cfg.heldout_tokens]
    log.info("tokens: %d train, %d held-out", train_ids.numel(), heldout_ids.numel())

    model = make_model(cfg, tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.learning_rate,
        betas=(0.9, 0.95),
    )
    n_seq = train_ids.numel() // cfg.seq_len
    train_seqs = train_ids[: n_seq * cfg.seq_len].view(n_seq, cfg.seq_len)
    gen = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(n_seq, generator=gen)
    pos = 0
    history = []
    skipped: list[int] = []
    model.train()
    t0 = time.time()
    for step in range(cfg.train_steps):
        if pos + cfg.batch_size > n_seq:
            order, pos = torch.randperm(n_seq, generator=gen), 0
        batch = train_seqs[order[pos : pos + cfg.batch_size]]
        pos += cfg.batch_size
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if not torch.isfinite(norm):
            # A non-finite gradient would make every weight NaN through the clip and AdamW (the Llama
            # validation model hit one late in training): skip the update, as a loss scaler does.
            skipped.append(step)
            log.warning("step %d: non-finite gradient norm; update skipped", step)
            continue
        opt.step()
        if step % cfg.log_every_steps == 0 or step == cfg.train_steps - 1:
            elapsed = time.time() - t0
            row = {
                "step": step,
                "loss": round(loss.item(), 4),
                "lr": round(lr_at(step, cfg), 6),
                "tokens": (step + 1) * cfg.batch_size * cfg.seq_len,
                "seconds": round(elapsed, 1),
            }
            history.append(row)
            log.info("step %(step)d loss %(loss).4f lr %(lr).2e tokens %(tokens)d %(seconds).0fs", row)
    train_seconds = time.time() - t0
    model.eval()

    heldout_ppl = perplexity(model, heldout, cfg.seq_len)
    if not math.isfinite(heldout_ppl):
        raise E3PruneError(f"training diverged: held-out perplexity {heldout_ppl}; nothing was written", field="learning_rate")
    demo = _importance_demo(model, heldout, cfg.seq_len, cfg.seed)
    log.info("held-out perplexity %.2f", heldout_ppl)

    output_dir.mkdir(parents=True, exist_ok=True)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.eos_token_id
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    save_file({"input_ids": heldout.to(torch.int32).contiguous()}, str(output_dir / "heldout_tokens.safetensors"))
    corpora = {"heldout_corpus.jsonl.gz": heldout_docs}
    if cfg.exclude_near_copies:  # its training text, for search and distillation data of its own split
        corpora["train_corpus.jsonl.gz"] = train_docs
    for name, corpus in corpora.items():
        with gzip.GzipFile(output_dir / name, "wb", mtime=0) as fh:
            for d in corpus:
                fh.write((json.dumps({"path": d.path, "text": d.text}) + "\n").encode())
    summary = {
        "config": cfg.model_dump(),
        "parameters": n_params,
        "corpus": {
            "python": platform.python_version(),
            "train_files": len(train_docs),
            "heldout_files": len(heldout_docs),
            "train_tokens": train_ids.numel(),
            "heldout_tokens_available": heldout_ids.numel(),
        },
        "trained_tokens": cfg.train_steps * cfg.batch_size * cfg.seq_len,
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.time() - started, 1),
        "torch": torch.__version__,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "heldout_perplexity": heldout_ppl,
        "skipped_steps": skipped,
        "importance_demo": demo,
        "history": history,
    }
    (output_dir / "training_log.json").write_text(json.dumps(summary, indent=1))
    (output_dir / "README.md").write_text(render_card(summary))
    return summary


def render_card(s: dict) -> str:
    cfg = s["config"]
    demo = s["importance_demo"]
    rnd = demo["random"]
    rnd_mean = sum(r["ppl"] for r in rnd) / len(rnd)
    arch = {"qwen3": "Qwen3", "llama": "Llama"}[cfg.get("architecture", "qwen3")]
    tied = "tied embeddings" if cfg.get("architecture", "qwen3") == "qwen3" else "untied embeddings"
    lines = [
        "# e3prune reference model",
        "",
        f"A small {arch}-architecture causal LM that e3-pruner trains itself (`e3prune reference-model build`),",
        "because no model can be downloaded where the project is built and tested. "
        + (
            "This one is the second, independent validation model of the benchmarks "
            "(`benchmarks/validation_model.py`): it checks their claims and is never used to tune."
            if cfg.get("split_salt")
            else "It is the embedded default of the demo, the tests that need real weights, and the benchmarks."
        ),
        "",
        "| | |",
        "|---|---|",
        f"| architecture | `{arch}ForCausalLM`, {cfg['num_layers']} layers, hidden {cfg['hidden_size']}, "
        f"MLP {cfg['intermediate_size']}, {cfg['num_attention_heads']} heads / {cfg['num_key_value_heads']} KV heads |",
        f"| parameters | {s['parameters']:,} ({tied}), fp32 |",
        f"| tokenizer | byte-level BPE, {cfg['vocab_size']} tokens, trained with `tokenizers`; EOS `{EOS}` |",
        f"| corpus | Python {s['corpus']['python']} standard library `.py` files (tests excluded): "
        f"{s['corpus']['train_files']} train files ({s['corpus']['train_tokens']:,} tokens), "
        f"{s['corpus']['heldout_files']} held-out files (1 in {cfg['heldout_every']} by path hash"
        + (f", salt `{cfg['split_salt']}`" if cfg.get("split_salt") else "")
        + ("; training files that are near-copies of held-out files left out" if cfg.get("exclude_near_copies") else "")
        + ") |",
        f"| training | {s['trained_tokens']:,} tokens: {cfg['train_steps']} steps × {cfg['batch_size']} × {cfg['seq_len']}, "
        f"AdamW lr {cfg['learning_rate']} warmup {cfg['warmup_steps']} + cosine, seed {cfg['seed']} |",
        f"| time | {s['train_seconds'] / 60:.1f} min training, {s['total_seconds'] / 60:.1f} min in all, "
        f"on {s['machine']}, torch {s['torch']} |",
        f"| held-out perplexity | **{s['heldout_perplexity']:.2f}** on the first {cfg['heldout_tokens']:,} held-out tokens "
        f"(`heldout_tokens.safetensors`, sequences of {cfg['seq_len']}) |",
        "",
        "## Its layers differ in importance",
        "",
        f"Held-out perplexity on {demo['tokens']:,} held-out tokens (64 sequences spread over the held-out set) "
        f"after skipping {demo['n_remove']} of "
        f"{cfg['num_layers']} layers (25 %), no retraining:",
        "",
        "| layers removed | perplexity |",
        "|---|---|",
        f"| none | {demo['ppl']['full']:.2f} |",
        f"| the last {demo['n_remove']} | {demo['ppl']['last']:.2f} |",
    ]
    for r in rnd:
        lines.append(f"| random {r['removed']} | {r['ppl']:.2f} |")
    lines += [
        f"| random, mean of {len(rnd)} | {rnd_mean:.2f} |",
        "",
        "Skipping one layer at a time (perplexity on 16 held-out sequences spread over the held-out set):",
        "",
        "| layer | " + " | ".join(str(i) for i in range(len(demo["single_layer_ppl"]))) + " |",
        "|---|" + "---|" * len(demo["single_layer_ppl"]),
        "| ppl | " + " | ".join(f"{p:.1f}" for p in demo["single_layer_ppl"]) + " |",
        "",
        "## Training log",
        "",
        "| step | tokens | loss | lr | seconds |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {h['step']} | {h['tokens']:,} | {h['loss']:.3f} | {h['lr']:.2e} | {h['seconds']} |" for h in s["history"]
    ]
    lines += [
        "",
        "## Files",
        "",
        "- `model.safetensors`, `config.json`, `generation_config.json`: the checkpoint (`AutoModelForCausalLM`).",
        "- `tokenizer.json`, `tokenizer_config.json`: the tokenizer (`AutoTokenizer`), with a minimal chat template.",
        "- `heldout_tokens.safetensors`: `input_ids`, int32, the held-out token stream used for perplexity.",
        "- `heldout_corpus.jsonl.gz`: the held-out documents (`path`, `text`); the built-in data source.",
        "- `training_log.json`: everything above, machine-readable.",
        "",
        f"Rebuild: `e3prune reference-model build --output DIR` (Python {s['corpus']['python']}; another Python "
        "version has another standard library, hence another model).",
        "",
    ]
    return "\n".join(lines)
