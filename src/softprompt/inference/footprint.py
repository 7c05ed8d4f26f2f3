"""Working-memory estimates for the engine's forwards, from the model's dimensions alone.

Pure arithmetic, no tensors: the server checks a request's estimate against its budget before
any model work (``score_bytes``, ``generate_bytes``), and scoring sizes its label groups with
``Dims.pair_bytes``. Each figure is an upper bound of what the engine allocates on top of the
weights: the key/value cache of the rows, one layer's activations of the largest forward (with
eager attention its scores and softmax in fp32; PyTorch's SDPA kernels work in blocks and
make neither), the logits it keeps, and the copies the batch makes while rows join and leave.
``tests/test_request_memory.py`` checks the estimates against measured peaks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from softprompt.models import LoadedModel

MiB = 2**20


@dataclass(frozen=True)
class Dims:
    """The sizes that set a forward's memory."""

    layers: int
    kv_heads: int
    head_dim: int
    heads: int
    hidden: int
    inter: int  # MLP width
    vocab: int
    dtype_bytes: int
    score_copies: int = 2  # (rows, heads, width, keys) fp32 tensors of one attention: 2 eager, 0 SDPA

    @classmethod
    def of(cls, lm: LoadedModel) -> Dims:
        c, model = lm.model.config, lm.model
        dtype_bytes = next(model.parameters()).element_size()
        hidden = int(lm.hidden_size)
        heads = int(getattr(c, "num_attention_heads", None) or getattr(c, "num_heads", 1))
        if lm.kv_shape is not None:
            layers, kv_heads, head_dim = lm.kv_shape
        else:  # encoder-decoder: both stacks, full heads
            layers = int(getattr(c, "num_layers", 1)) + int(getattr(c, "num_decoder_layers", None) or 0)
            kv_heads, head_dim = heads, int(getattr(c, "d_kv", None) or hidden // heads)
        inter = getattr(c, "intermediate_size", None) or getattr(c, "n_inner", None) or getattr(c, "d_ff", None)
        blocked = getattr(c, "_attn_implementation", None) in ("sdpa", "flash_attention_2", "flex_attention")
        return cls(int(layers), int(kv_heads), int(head_dim), heads, hidden, int(inter or 4 * hidden),
                   int(c.vocab_size), dtype_bytes, 0 if blocked else 2)

    @property
    def kv_token(self) -> int:
        """Bytes of keys and values one token keeps in the cache, all layers."""
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype_bytes

    def forward(self, rows: int, width: int, keys: int) -> int:
        """One forward of ``rows`` x ``width`` new tokens over ``keys`` cache columns: one layer's
        activations at a time, its attention scores (``score_copies``), its keys and values
        repeated to every query head (grouped-query attention), and one layer's cache copied
        while it grows."""
        slots = rows * width
        act = slots * (8 * self.hidden + 3 * self.inter + 2 * self.kv_heads * self.head_dim) * self.dtype_bytes
        attn = self.score_copies * rows * self.heads * width * keys * 4
        repeated = 2 * rows * keys * self.heads * self.head_dim * self.dtype_bytes
        return act + attn + repeated + rows * keys * self.kv_token // self.layers

    def token_flops(self, keys: int, head: bool = False) -> int:
        """Multiply-adds x 2 of one token through every layer over ``keys`` cache columns (its
        attention scores and weighted values), plus the output head when ``head``."""
        per_layer = 2 * self.hidden * (self.heads + self.kv_heads) * self.head_dim + 3 * self.hidden * self.inter
        attn = 2 * self.heads * self.head_dim * keys
        return 2 * self.layers * (per_layer + attn) + (2 * self.hidden * self.vocab if head else 0)

    def logits(self, n: int) -> int:
        """``n`` rows of logits: raw, as float and as log-probabilities."""
        return 3 * n * self.vocab * 4

    def pair_bytes(self, keys: int, rest: int) -> int:
        """One (input, target) pair scored past its first token: a copy of the input's cache,
        the ``rest`` target tokens' forward over it, and their logits."""
        return (keys + rest) * self.kv_token + self.forward(1, rest, keys + rest) + self.logits(rest)


def score_bytes(dims: Dims, rows: list[tuple[int, int, list[int]]], max_rows: int, forward_tokens: int,
                group_bytes: int) -> int:
    """Peak working memory of scoring ``rows`` (virtual tokens N, context tokens T, target
    lengths), run as ``Engine.score_rows`` runs them: chunks of ``max_rows`` rows by length, each
    prefilled in forwards of at most ``forward_tokens`` token slots, then the targets' later
    tokens in groups of pairs of at most ``group_bytes`` (at least one pair per group)."""
    order = sorted(rows, key=lambda r: r[0] + r[1])
    peak = 0
    for s in range(0, len(order), max_rows):
        chunk = order[s : s + max_rows]
        B = len(chunk)
        keys = max(n for n, _, _ in chunk) + max(t for _, t, _ in chunk)
        width = min(max(1, forward_tokens // B), max(t for _, t, _ in chunk))
        base = B * keys * dims.kv_token + dims.logits(B)
        pairs = sorted((dims.pair_bytes(keys, len_t - 1) for _, _, ts in chunk for len_t in ts if len_t > 1),
                       reverse=True)
        group, used = 0, 0
        for p in pairs:  # the largest group the scorer can form
            if used and used + p > group_bytes:
                break
            used += p
        group = used
        peak = max(peak, base + max(dims.forward(B, width, keys), group))
    return peak


def generate_bytes(dims: Dims, rows: list[tuple[int, int, int]], chunk: int) -> int:
    """Peak working memory ``rows`` (virtual tokens N, input tokens T, max_tokens) bring into a
    decoding batch: their cache at full length, held twice while prefilled rows move into the
    decoding batch, one prefill forward of at most ``chunk`` token slots per row group, and the
    per-step logits."""
    if not rows:
        return 0
    full = sum(n + t + m for n, t, m in rows) * dims.kv_token
    keys = max(n + t for n, t, _ in rows)
    width = min(max(1, chunk // len(rows)), max(t for _, t, _ in rows) or 1)
    return 2 * full + dims.forward(len(rows), width, keys) + dims.logits(len(rows))
