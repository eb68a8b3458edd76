"""The GPT-2 model and the helpers of chapters 2 to 5 that chapter 7 builds on.

Chapter 2: text <-> token ids, and the sliding-window pretraining data loader. Chapter 3: causal
multi-head attention. Chapter 4: the GPT model and text generation. Chapter 5: the loss, the
training loop, the loss plot, and loading OpenAI's pretrained weights. Every public name of the
book's chapter-7 `previous_chapters.py` is here with the book's signature, and a `.pth` file
saved by either loads into the other's GPTModel.

Beyond the book, `generate` keeps a key/value cache so that each new token costs one position
instead of the whole sequence, and it can generate for several left-padded prompts at once;
`generate_stream` yields one prompt's tokens as they are chosen (for chat.py); the loss computes
the output head only where a target counts; and `train_model_simple` takes optional `hooks`,
through which the chapter script adds resuming, Ctrl-C and torchrun.
"""

from types import SimpleNamespace

import matplotlib.pyplot as plt
import numpy as np
import tiktoken
import torch
import torch.nn as nn
import torch.nn.functional as F
from matplotlib.ticker import MaxNLocator
from torch.utils.data import DataLoader, Dataset

from kit.files import atomic_write, image_format

#####################################
# Chapter 2: text <-> token ids
#####################################


def text_to_token_ids(text, tokenizer):
    """Encode `text` into a (1, num_tokens) tensor; `<|endoftext|>` is allowed in the text."""
    encoded = tokenizer.encode(text, allowed_special={"<|endoftext|>"})
    return torch.tensor(encoded).unsqueeze(0)  # (1, num_tokens): add the batch dimension


def token_ids_to_text(token_ids, tokenizer):
    """Decode a (1, num_tokens) or (num_tokens,) tensor of token ids back into text."""
    flat = token_ids.squeeze(0)  # (num_tokens,)
    return tokenizer.decode(flat.tolist())


class GPTDatasetV1(Dataset):
    """Chapter 2's pretraining samples: windows of `max_length` tokens, `stride` tokens apart.

    Each item is (input_ids, target_ids), both (max_length,), the targets shifted by one token.
    """

    def __init__(self, txt, tokenizer, max_length, stride):
        token_ids = tokenizer.encode(txt, allowed_special={"<|endoftext|>"})
        self.input_ids = []
        self.target_ids = []
        for start in range(0, len(token_ids) - max_length, stride):
            window = token_ids[start:start + max_length + 1]  # one more for the last target
            self.input_ids.append(torch.tensor(window[:-1]))
            self.target_ids.append(torch.tensor(window[1:]))

    def __len__(self):
        return len(self.input_ids)

    def __getitem__(self, idx):
        return self.input_ids[idx], self.target_ids[idx]


def create_dataloader_v1(txt, batch_size=4, max_length=256, stride=128, shuffle=True,
                         drop_last=True, num_workers=0):
    """A DataLoader of `GPTDatasetV1` windows over `txt`, tokenized with GPT-2's encoding."""
    tokenizer = tiktoken.get_encoding("gpt2")
    dataset = GPTDatasetV1(txt, tokenizer, max_length, stride)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
                      num_workers=num_workers)


#####################################
# Chapter 3: causal multi-head attention
#####################################


def causal_mask(context_length):
    """(context_length, context_length) bool, True above the diagonal: the keys after each query.

    Always built on the CPU (also while a model is built on the meta device), as loading fills
    it in for files that do not hold it.
    """
    ones = torch.ones(context_length, context_length, dtype=torch.bool, device="cpu")
    return torch.triu(ones, 1)


def _load_mask(module, state_dict, prefix, *args):
    """Let every state dict load its causal mask with `strict=True`, also with `assign=True`.

    The book's attention saves its mask in the state dict, and so does this one, so `.pth` files
    load both ways: the book's 1.0/0.0 floats become booleans, and files written before the mask
    was saved get a new causal mask (a model built on the meta device has none of its own).
    """
    saved = state_dict.get(prefix + "mask")
    state_dict[prefix + "mask"] = (causal_mask(module.mask.shape[0]) if saved is None
                                   else saved.bool())


class MultiHeadAttention(nn.Module):
    """Causal self-attention with `num_heads` heads of size `d_out // num_heads`.

    With `fused=True` the attention itself runs in PyTorch's fused
    `scaled_dot_product_attention`; with `fused=False` it is spelled out as in the book
    (scores, mask, softmax, weighted sum). Both give the same result up to float rounding.
    """

    def __init__(self, d_in, d_out, context_length, dropout, num_heads, qkv_bias=False,
                 fused=True):
        super().__init__()
        if d_out % num_heads != 0:
            raise ValueError(f"d_out ({d_out}) must be divisible by num_heads ({num_heads})")
        self.d_out = d_out
        self.num_heads = num_heads
        self.head_dim = d_out // num_heads
        self.fused = fused
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out)
        self.dropout = nn.Dropout(dropout)
        # True above the diagonal: a token must not see the tokens after it. Saved in the state
        # dict as the book's is (its 1.0/0.0 floats load into these booleans and back).
        causal = torch.triu(torch.ones(context_length, context_length, dtype=torch.bool), 1)
        self.register_buffer("mask", causal)
        self.register_load_state_dict_pre_hook(_load_mask)

    def _split_heads(self, x):
        """(b, num_tokens, d_out) -> (b, num_heads, num_tokens, head_dim)."""
        b, num_tokens, _ = x.shape
        return x.view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x, layer_cache=None, blocked=None, segments=None):
        """Attend over `x` (b, num_tokens, d_in) and return (b, num_tokens, d_out).

        `layer_cache` (a `LayerKVCache`) holds the keys and values of earlier positions; the new
        ones are appended to it. `blocked` (broadcastable to (b, 1, num_tokens, num_keys)) marks
        the keys each query must not see: bool, True where blocked, or (fused attention only)
        the same as a float mask added to the scores, -inf where blocked and 0 elsewhere, which
        `GPTModel.features` builds once for all layers. None means plain causal attention
        starting at position 0, the training case. `segments` (token counts summing to
        num_tokens) says that `x` holds several sequences one after another: each one attends
        causally to itself only.
        """
        b, num_tokens, _ = x.shape
        queries = self._split_heads(self.W_query(x))  # (b, num_heads, num_tokens, head_dim)
        keys = self._split_heads(self.W_key(x))  # (b, num_heads, num_tokens, head_dim)
        values = self._split_heads(self.W_value(x))  # (b, num_heads, num_tokens, head_dim)
        if layer_cache is not None:
            keys, values = layer_cache.append(keys, values)  # (b, num_heads, num_keys, head_dim)

        if segments is None:
            context = self._attend(queries, keys, values, blocked)
        else:
            parts = zip(queries.split(segments, dim=2), keys.split(segments, dim=2),
                        values.split(segments, dim=2), strict=True)
            context = torch.cat([self._attend(q, k, v, None) for q, k, v in parts], dim=2)
        # context: (b, num_heads, num_tokens, head_dim)
        context = context.transpose(1, 2).contiguous().view(b, num_tokens, self.d_out)
        return self.out_proj(context)  # (b, num_tokens, d_out)

    def _attend(self, queries, keys, values, blocked):
        """Weighted sum of `values` for each query: (b, num_heads, num_queries, head_dim)."""
        if self.fused:
            if blocked is not None and blocked.dtype == torch.bool:
                blocked = ~blocked  # scaled_dot_product_attention's masks say which keys count
            return F.scaled_dot_product_attention(
                queries, keys, values, attn_mask=blocked,
                dropout_p=self.dropout.p if self.training else 0.0,
                is_causal=blocked is None,
            )
        num_queries, num_keys = queries.shape[2], keys.shape[2]
        if blocked is None:
            blocked = self.mask[:num_queries, :num_keys]
        attn_scores = queries @ keys.transpose(2, 3)  # (b, num_heads, num_queries, num_keys)
        attn_scores = attn_scores.masked_fill(blocked, -torch.inf)
        attn_weights = torch.softmax(attn_scores / self.head_dim**0.5, dim=-1)
        attn_weights = self.dropout(attn_weights)
        return attn_weights @ values  # (b, num_heads, num_queries, head_dim)


#####################################
# Chapter 4: the GPT model
#####################################


class LayerNorm(nn.Module):
    """Normalize each token's embedding to mean 0 and variance 1, then scale and shift.

    `fused=True` runs the same formula as PyTorch's single layer_norm kernel.
    """

    def __init__(self, emb_dim, fused=True):
        super().__init__()
        self.eps = 1e-5
        self.fused = fused
        self.scale = nn.Parameter(torch.ones(emb_dim))
        self.shift = nn.Parameter(torch.zeros(emb_dim))

    def forward(self, x):
        if self.fused:
            return F.layer_norm(x, self.scale.shape, self.scale, self.shift, self.eps)
        mean = x.mean(dim=-1, keepdim=True)
        var = x.var(dim=-1, keepdim=True, unbiased=False)
        norm_x = (x - mean) / torch.sqrt(var + self.eps)
        return self.scale * norm_x + self.shift


class GELU(nn.Module):
    """GELU activation in the tanh approximation that GPT-2 was trained with.

    `fused=True` runs the same approximation as PyTorch's single gelu kernel.
    """

    def __init__(self, fused=True):
        super().__init__()
        self.fused = fused

    def forward(self, x):
        if self.fused:
            return F.gelu(x, approximate="tanh")
        return 0.5 * x * (1 + torch.tanh(
            torch.sqrt(torch.tensor(2.0 / torch.pi)) * (x + 0.044715 * torch.pow(x, 3))
        ))


def uses_fused_kernels(cfg):
    """The config's optional "fused" key (default True): one PyTorch kernel each for attention,
    layer norm and GELU, or False for the book's spelled-out math."""
    return cfg.get("fused", True)


class FeedForward(nn.Module):
    """Position-wise MLP: expand to 4x the embedding size, GELU, project back."""

    def __init__(self, cfg):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(cfg["emb_dim"], 4 * cfg["emb_dim"]),
            GELU(fused=uses_fused_kernels(cfg)),
            nn.Linear(4 * cfg["emb_dim"], cfg["emb_dim"]),
        )

    def forward(self, x):
        return self.layers(x)


class TransformerBlock(nn.Module):
    """Pre-norm transformer block: x + attention(norm(x)), then x + feedforward(norm(x))."""

    def __init__(self, cfg):
        super().__init__()
        self.att = MultiHeadAttention(
            d_in=cfg["emb_dim"],
            d_out=cfg["emb_dim"],
            context_length=cfg["context_length"],
            num_heads=cfg["n_heads"],
            dropout=cfg["drop_rate"],
            qkv_bias=cfg["qkv_bias"],
            fused=uses_fused_kernels(cfg),
        )
        self.ff = FeedForward(cfg)
        self.norm1 = LayerNorm(cfg["emb_dim"], fused=uses_fused_kernels(cfg))
        self.norm2 = LayerNorm(cfg["emb_dim"], fused=uses_fused_kernels(cfg))
        self.drop_shortcut = nn.Dropout(cfg["drop_rate"])

    def forward(self, x, layer_cache=None, blocked=None, segments=None):
        x = x + self.drop_shortcut(self.att(self.norm1(x), layer_cache, blocked, segments))
        x = x + self.drop_shortcut(self.ff(self.norm2(x)))
        return x  # (b, num_tokens, emb_dim)


class LayerKVCache:
    """One layer's keys and values, in a buffer with room for `capacity` positions.

    Writing new positions in place (instead of concatenating) keeps each generation step's
    cost independent of how many positions are already cached.
    """

    def __init__(self, capacity):
        self.capacity = capacity
        self.length = 0
        self.keys = None
        self.values = None

    def append(self, keys, values):
        """Store (b, heads, new, head_dim) keys and values; return all cached ones so far."""
        start, end = self.length, self.length + keys.shape[2]
        if end > self.capacity:
            raise ValueError(f"KV cache holds {self.capacity} positions, {end} were requested")
        if self.keys is None:
            b, heads, _, head_dim = keys.shape
            self.keys = keys.new_empty(b, heads, self.capacity, head_dim)
            self.values = values.new_empty(b, heads, self.capacity, head_dim)
        self.keys[:, :, start:end] = keys
        self.values[:, :, start:end] = values
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]


class KVCache:
    """The keys and values of every layer for the positions a model has already processed."""

    def __init__(self, n_layers, capacity):
        self.layers = [LayerKVCache(capacity) for _ in range(n_layers)]

    @property
    def length(self):
        """Number of positions cached so far."""
        return self.layers[0].length


def _blocked_keys(num_tokens, start, pad_lengths, device):
    """Return which keys each query must not see, or None for plain causal attention from 0.

    Queries are positions start..start+num_tokens-1; keys are positions 0..start+num_tokens-1.
    A key is blocked when it lies after the query, or when it is left padding of its row
    (`pad_lengths`, shape (b,)). A padding query still sees itself, so no softmax row is empty.
    Result: bool (1 or b, 1, num_tokens, start + num_tokens).
    """
    if start == 0 and pad_lengths is None:
        return None
    query_pos = torch.arange(start, start + num_tokens, device=device)[:, None]  # (num_tokens, 1)
    key_pos = torch.arange(start + num_tokens, device=device)[None, :]  # (1, num_keys)
    blocked = (key_pos > query_pos)[None]  # (1, num_tokens, num_keys)
    if pad_lengths is not None:
        is_pad_key = key_pos[None] < pad_lengths[:, None, None]  # (b, 1, num_keys)
        blocked = blocked | (is_pad_key & (key_pos != query_pos)[None])  # (b, num_tokens, num_keys)
    return blocked[:, None]  # (1 or b, 1, num_tokens, num_keys): broadcast over heads


class GPTModel(nn.Module):
    """GPT-2: token + position embeddings, `n_layers` transformer blocks, final norm, output head.

    cfg keys: vocab_size, context_length, emb_dim, n_heads, n_layers, drop_rate, qkv_bias, and
    optionally fused (default True: attention, layer norm and GELU each run as one PyTorch
    kernel; False spells them out as in the book, same results up to float rounding). The output
    head has its own weights, not tied to the token embedding.
    """

    def __init__(self, cfg):
        super().__init__()
        self.tok_emb = nn.Embedding(cfg["vocab_size"], cfg["emb_dim"])
        self.pos_emb = nn.Embedding(cfg["context_length"], cfg["emb_dim"])
        self.drop_emb = nn.Dropout(cfg["drop_rate"])
        self.trf_blocks = nn.Sequential(*[TransformerBlock(cfg) for _ in range(cfg["n_layers"])])
        self.final_norm = LayerNorm(cfg["emb_dim"], fused=uses_fused_kernels(cfg))
        self.out_head = nn.Linear(cfg["emb_dim"], cfg["vocab_size"], bias=False)

    def _check_length(self, num_tokens):
        """Raise ValueError when `num_tokens` positions do not fit the context length."""
        context_length = self.pos_emb.num_embeddings
        if num_tokens > context_length:
            raise ValueError(f"Sequence of {num_tokens} tokens is longer than the "
                             f"model's context length of {context_length}")

    def features(self, in_idx, cache=None, pad_lengths=None):
        """Return the final-normed hidden states (b, num_tokens, emb_dim) for token ids `in_idx`.

        With a `cache`, `in_idx` holds only the positions after the cached ones. `pad_lengths`
        (b,) counts the left-padding tokens of each row: positions are counted from each row's
        first real token and padding is never attended to, so a padded row computes what the
        same row would compute alone.
        """
        _, num_tokens = in_idx.shape
        start = 0 if cache is None else cache.length
        self._check_length(start + num_tokens)
        positions = torch.arange(start, start + num_tokens, device=in_idx.device)  # (num_tokens,)
        if pad_lengths is not None:
            positions = (positions[None, :] - pad_lengths[:, None]).clamp(min=0)  # (b, num_tokens)
        x = self.tok_emb(in_idx) + self.pos_emb(positions)  # (b, num_tokens, emb_dim)
        x = self.drop_emb(x)
        blocked = self._attention_mask(_blocked_keys(num_tokens, start, pad_lengths,
                                                     in_idx.device))
        for i, block in enumerate(self.trf_blocks):
            x = block(x, None if cache is None else cache.layers[i], blocked)
        return self.final_norm(x)

    def _attention_mask(self, blocked):
        """`blocked` (bool) as the layers take it: for fused attention, once for all layers, the
        float mask that `scaled_dot_product_attention` would otherwise make from it in every
        layer (0 where a key counts, -inf where blocked), in the dtype the queries have."""
        if blocked is None or not self.trf_blocks[0].att.fused:
            return blocked
        device_type = blocked.device.type
        dtype = (torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type)
                 else self.tok_emb.weight.dtype)
        return torch.zeros(blocked.shape, dtype=dtype, device=blocked.device).masked_fill_(
            blocked, -torch.inf)  # (1 or b, 1, num_tokens, num_keys)

    def packed_features(self, in_idx, lengths):
        """Final-normed hidden states (sum(lengths), emb_dim) of the first `lengths[i]` tokens of
        each row of `in_idx` (b, num_tokens), rows one after another.

        The rows are packed into one sequence in which each row attends only to itself, so the
        positions after a row's length cost nothing; under causal attention a position never
        depends on later ones, so the states equal those of `features` up to float rounding.
        With dropout on, the masks are drawn for the computed positions only, so they differ
        from those `features` would draw.
        """
        b, num_tokens = in_idx.shape
        self._check_length(num_tokens)
        positions = torch.arange(num_tokens, device=in_idx.device).expand(b, num_tokens)
        tokens = pack_rows(in_idx, lengths)  # (packed,)
        x = self.tok_emb(tokens) + self.pos_emb(pack_rows(positions, lengths))  # (packed, emb)
        x = self.drop_emb(x[None])  # (1, packed, emb_dim)
        segments = lengths.tolist()
        for block in self.trf_blocks:
            x = block(x, segments=segments)
        return self.final_norm(x[0])  # (packed, emb_dim)

    # Device types on which `forward(keep=mask)` packs rows. On a CPU, skipping the padding
    # saves its compute; on a GPU one call over whole rows beats a Python loop of calls per row.
    pack_on = ("cpu",)

    def forward(self, in_idx, cache=None, pad_lengths=None, keep=None):
        """Return next-token logits (b, num_tokens, vocab_size) for token ids (b, num_tokens).

        `keep` returns logits only at some positions, as (num_kept, vocab_size) in row-major
        order: that is all a loss with ignored targets needs, and the output head, the largest
        matrix, runs only there. It is either a bool mask (b, num_tokens), True where a target
        counts, or the indices (num_kept,) of those positions among the b * num_tokens ones, as
        `kit.device.prepare_batch` builds them on the CPU for a GPU: with indices, the device
        never waits for the host to count the kept positions, and torch.compile sees no
        data-dependent shape. With a mask, on the device types in `pack_on` the positions after
        a row's last kept one are not computed at all (see `packed_features`); elsewhere whole
        rows are computed in one pass.
        """
        if keep is None:
            return self.out_head(self.features(in_idx, cache, pad_lengths))
        if cache is not None or pad_lengths is not None:
            raise ValueError("keep= computes whole rows from position 0, without cache or padding")
        if keep.dtype != torch.bool:
            hidden = self.features(in_idx).flatten(0, 1)  # (b * num_tokens, emb_dim)
            return self.out_head(hidden.index_select(0, keep))  # (num_kept, vocab_size)
        if in_idx.device.type in self.pack_on:
            lengths = needed_lengths(keep)  # (b,)
            hidden = self.packed_features(in_idx, lengths)  # (packed, emb_dim)
            return self.out_head(hidden[pack_rows(keep, lengths)])
        return self.out_head(self.features(in_idx)[keep])  # (num_kept, vocab_size)


def needed_lengths(keep):
    """Positions each row of `keep` (bool, (b, num_tokens)) needs: one past its last True."""
    counts = torch.arange(1, keep.shape[1] + 1, device=keep.device)  # (num_tokens,)
    return (keep * counts).amax(dim=1)  # (b,), 0 for a row without any True


def pack_rows(rows, lengths):
    """The first `lengths[i]` entries of each row of `rows` (b, num_tokens), one row after
    another: (sum(lengths),), aligned with the output of `GPTModel.packed_features`."""
    positions = torch.arange(rows.shape[1], device=rows.device)  # (num_tokens,)
    return rows[positions[None, :] < lengths[:, None]]


def generate_text_simple(model, idx, max_new_tokens, context_size):
    """Chapter 4's greedy loop: append `max_new_tokens` most likely next tokens to `idx` (b, n).

    Every step runs the model over the last `context_size` tokens again; `generate` below gives
    the same tokens with a key/value cache.
    """
    for _ in range(max_new_tokens):
        idx_cond = idx[:, -context_size:]  # (b, min(num_tokens, context_size))
        with torch.no_grad():
            logits = model(idx_cond)  # (b, num_tokens, vocab_size)
        idx_next = torch.argmax(logits[:, -1, :], dim=-1, keepdim=True)  # (b, 1)
        idx = torch.cat((idx, idx_next), dim=1)  # (b, num_tokens + 1)
    return idx


def _last_position_logits(model, hidden):
    """Next-token logits (b, vocab_size) at the last position of `hidden` (b, num_tokens, emb).

    With a few rows, weight @ hidden.T is several times faster on a CPU than the usual
    hidden @ weight.T: the BLAS library then repacks the few hidden rows rather than the whole
    (vocab_size, emb_dim) head matrix on every generated token. Same product, same result up to
    float rounding.
    """
    last = hidden[:, -1, :]  # (b, emb_dim)
    head = model.out_head
    if isinstance(head, nn.Linear) and head.bias is None:
        return (head.weight @ last.T).T  # (vocab_size, b) -> (b, vocab_size)
    return head(last)  # a wrapped head, e.g. with LoRA


def _window_logits(model, idx, context_size, pad_lengths):
    """Next-token logits (b, vocab_size) recomputed over the last `context_size` tokens of `idx`.

    A model that only returns logits, such as the book's own GPTModel, is called as it is.
    """
    if not hasattr(model, "features"):
        return model(idx[:, -context_size:])[:, -1, :]
    dropped = max(idx.shape[1] - context_size, 0)
    window_pad = None if pad_lengths is None else (pad_lengths - dropped).clamp(min=0)
    hidden = model.features(idx[:, -context_size:], pad_lengths=window_pad)
    return _last_position_logits(model, hidden)


def _next_token(logits, temperature, top_k):
    """Pick the next token id (b, 1) from last-position logits (b, vocab_size)."""
    if top_k is not None:
        top_logits, _ = torch.topk(logits, top_k)  # (b, top_k)
        min_val = top_logits[:, -1:]  # (b, 1)
        logits = torch.where(logits < min_val, torch.tensor(-torch.inf, device=logits.device),
                             logits)
    if temperature > 0.0:
        probs = torch.softmax(logits / temperature, dim=-1)  # (b, vocab_size)
        return torch.multinomial(probs, num_samples=1)  # (b, 1)
    return torch.argmax(logits, dim=-1, keepdim=True)  # (b, 1)


def generate(model, idx, max_new_tokens, context_size, temperature=0.0, top_k=None, eos_id=None,
             use_cache=True, pad_lengths=None):
    """Append up to `max_new_tokens` generated token ids to `idx` (b, num_tokens) and return it.

    Greedy when `temperature` is 0; otherwise samples from the softmax of logits / temperature,
    keeping only the `top_k` most likely tokens when `top_k` is given. Generation stops once every
    row has produced `eos_id` (which is not appended for the row that finishes last; rows that
    finished earlier are filled with `eos_id`).

    With `use_cache=True` the keys and values of processed positions are kept, so each step
    feeds only the newest token. Once the sequence is longer than `context_size`, the model sees
    only the last `context_size` tokens with positions counted anew, as the book's recompute loop
    does; the cache cannot be reused then, so those steps recompute the window. With
    `use_cache=False` every step recomputes the whole window (the book's loop).

    `pad_lengths` (b,) gives the number of left-padding tokens in each row of `idx`. A model that
    only returns logits (the book's GPTModel) works too, without cache and padding.
    """
    new_tokens = list(_generation_steps(model, idx, max_new_tokens, context_size, temperature,
                                        top_k, eos_id, use_cache, pad_lengths))  # each (b, 1)
    if not new_tokens:
        return idx
    tokens = torch.cat(new_tokens, dim=1)  # (b, steps)
    if eos_id is not None:
        tokens = _until_all_ended(tokens, eos_id)
    return torch.cat([idx, tokens], dim=1)  # (b, num_tokens + new ones)


def _until_all_ended(tokens, eos_id):
    """`tokens` (b, steps) without the steps from the first one at which every row has produced
    `eos_id` on: the steps that `_generation_steps` takes past the end before it checks."""
    ended = (tokens == eos_id).cummax(dim=1).values  # (b, steps): the row has ended by then
    all_ended = ended.all(dim=0)  # (steps,)
    if not all_ended.any():
        return tokens
    return tokens[:, :int(all_ended.int().argmax())]


def generate_stream(model, idx, max_new_tokens, context_size, temperature=0.0, top_k=None,
                    eos_id=None):
    """Yield the ids (ints) of the tokens that `generate` appends to one prompt `idx` (1, n), each
    as soon as it is chosen, so that a caller can show the answer while it is written.

    The same steps and random draws as `generate` with the key/value cache: the ids yielded are
    those that `generate` returns after the prompt. `eos_id` ends the stream and is not yielded.
    """
    if idx.shape[0] != 1:
        raise ValueError(f"generate_stream continues one prompt, got a batch of {idx.shape[0]}")
    for idx_next in _generation_steps(model, idx, max_new_tokens, context_size, temperature,
                                      top_k, eos_id, use_cache=True, pad_lengths=None):
        token = idx_next.item()
        if token == eos_id:
            return
        yield token


END_CHECK_EVERY = 8  # greedy generation steps between two checks that every row has ended


@torch.no_grad()
def _generation_steps(model, idx, max_new_tokens, context_size, temperature, top_k, eos_id,
                      use_cache, pad_lengths):
    """Yield the token ids (b, 1) that each generation step of `generate` appends to `idx`.

    Rows that have produced `eos_id` get `eos_id` from then on, and the steps go on a little
    past the end, which callers cut off: asking whether every row has ended makes the host wait
    for the device, so greedy generation asks only every `END_CHECK_EVERY` steps. Sampling asks
    at every step, so that it draws the same random numbers as the book's loop. Under
    `torch.no_grad()` as a decorator, gradients are off only while a step runs, not in the
    caller's code between two steps.
    """
    cache = None
    finished = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
    check_every = 1 if temperature > 0.0 else END_CHECK_EVERY
    for step in range(max_new_tokens):
        if use_cache and idx.shape[1] <= context_size and hasattr(model, "features"):
            if cache is None:
                capacity = min(context_size, idx.shape[1] + max_new_tokens)
                cache = KVCache(len(model.trf_blocks), capacity)
                hidden = model.features(idx, cache=cache, pad_lengths=pad_lengths)
            else:
                hidden = model.features(idx[:, -1:], cache=cache, pad_lengths=pad_lengths)
            logits = _last_position_logits(model, hidden)  # (b, vocab_size)
        else:
            logits = _window_logits(model, idx, context_size, pad_lengths)
        idx_next = _next_token(logits, temperature, top_k)  # (b, 1)
        if eos_id is not None:
            idx_next = idx_next.masked_fill(finished[:, None], eos_id)
            finished |= idx_next[:, 0] == eos_id
        idx = torch.cat((idx, idx_next), dim=1)  # (b, num_tokens + 1)
        yield idx_next
        if eos_id is not None and (step + 1) % check_every == 0 and finished.all():
            return


def generate_batch(model, prompts, max_new_tokens, context_size, eos_id=None, pad_token_id=50256):
    """Greedily continue several prompts (lists of token ids) at once; return the new token lists.

    Prompts are left-padded to a common length, so each row's answer is the one `generate` gives
    for that prompt alone; each list ends before the row's first `eos_id`.
    """
    device = next(model.parameters()).device
    longest = max(len(p) for p in prompts)
    idx = torch.tensor([[pad_token_id] * (longest - len(p)) + list(p) for p in prompts],
                       device=device)  # (b, longest)
    pad_lengths = torch.tensor([longest - len(p) for p in prompts], device=device)  # (b,)
    out = generate(model, idx, max_new_tokens, context_size, eos_id=eos_id,
                   pad_lengths=pad_lengths)
    answers = []
    for row in out[:, longest:].tolist():
        if eos_id is not None and eos_id in row:
            row = row[:row.index(eos_id)]
        answers.append(row)
    return answers


#####################################
# Chapter 5: loss, training, plotting, pretrained weights
#####################################


IGNORE_INDEX = -100  # target value that the loss skips (padding, and masked prompts)


def calc_loss_batch(input_batch, target_batch, model, device):
    """Mean cross-entropy of the next-token predictions; IGNORE_INDEX targets are skipped.

    Logits are computed only at the positions whose target counts, which gives the same loss as
    cross-entropy over all positions with ignore_index=-100, for less work. A model that only
    returns logits (the book's GPTModel) gets the book's computation.
    """
    input_batch, target_batch = input_batch.to(device), target_batch.to(device)
    if not hasattr(getattr(model, "module", model), "packed_features"):  # e.g. the book's model
        logits = model(input_batch)  # (b, num_tokens, vocab_size)
        return F.cross_entropy(logits.flatten(0, 1), target_batch.flatten(),
                               ignore_index=IGNORE_INDEX)
    keep = target_batch != IGNORE_INDEX  # (b, num_tokens)
    logits = model(input_batch, keep=keep)  # (num_kept, vocab_size)
    return F.cross_entropy(logits, target_batch[keep])


def calc_loss_loader(data_loader, model, device, num_batches=None):
    """Average `calc_loss_batch` over the first `num_batches` batches (all when None)."""
    if len(data_loader) == 0:
        return float("nan")
    num_batches = len(data_loader) if num_batches is None else min(num_batches, len(data_loader))
    total_loss = 0.0
    for i, (input_batch, target_batch) in enumerate(data_loader):
        if i >= num_batches:
            break
        total_loss += calc_loss_batch(input_batch, target_batch, model, device).item()
    return total_loss / num_batches


def evaluate_model(model, train_loader, val_loader, device, eval_iter):
    """Return (train_loss, val_loss) over `eval_iter` batches each, in eval mode and no grad."""
    model.eval()
    with torch.no_grad():
        train_loss = calc_loss_loader(train_loader, model, device, num_batches=eval_iter)
        val_loss = calc_loss_loader(val_loader, model, device, num_batches=eval_iter)
    model.train()
    return train_loss, val_loss


def generate_and_print_sample(model, tokenizer, device, start_context, max_new_tokens=50):
    """Print the greedy continuation of `start_context` on one line, to watch training progress."""
    model.eval()
    context_size = model.pos_emb.weight.shape[0]
    encoded = text_to_token_ids(start_context, tokenizer).to(device)
    token_ids = generate(model, encoded, max_new_tokens=max_new_tokens, context_size=context_size)
    print(token_ids_to_text(token_ids, tokenizer).replace("\n", " "))
    model.train()


class TrainingHooks:
    """The points where `train_model_simple` can be extended; these defaults are the book's loop.

    The chapter script passes a subclass (kit/chapter_training.py) that resumes interrupted runs,
    stops cleanly on Ctrl-C, trains under torchrun and shows a progress bar.
    """

    def start(self):
        """The progress to start from: a fresh run's counters and empty loss curves."""
        return SimpleNamespace(epoch=0, global_step=-1, tokens_seen=0,
                               train_losses=[], val_losses=[], track_tokens_seen=[])

    def epoch_batches(self, train_loader, progress):
        """The (input_batch, target_batch) pairs of one epoch."""
        return train_loader

    def batch_loss(self, input_batch, target_batch, model, device):
        """The loss to backpropagate for one batch."""
        return calc_loss_batch(input_batch, target_batch, model, device)

    def batch_tokens(self, input_batch):
        """Tokens one step trains on, padding included, for the 'tokens seen' curve."""
        return input_batch.numel()

    def evaluate(self, model, train_loader, val_loader, device, eval_iter):
        """(train_loss, val_loss) for the loss curves."""
        return evaluate_model(model, train_loader, val_loader, device, eval_iter)

    def before_update(self, model, optimizer, progress):
        """Called between the backward pass and the optimizer step (the book's loop does
        nothing here; Appendix D sets the learning rate and clips the gradients)."""

    def step_done(self, progress):
        """Called after every optimizer step."""

    def epoch_done(self, model, tokenizer, device, start_context, progress):
        """Called after every epoch: print a sample of what the model writes now."""
        generate_and_print_sample(model, tokenizer, device, start_context)


def train_model_simple(model, train_loader, val_loader, optimizer, device, num_epochs,
                       eval_freq, eval_iter, start_context, tokenizer, hooks=None):
    """Train for `num_epochs`, evaluating every `eval_freq` steps; return the loss curves.

    Returns (train_losses, val_losses, track_tokens_seen), one entry per evaluation, and prints
    a greedy sample continuing `start_context` after each epoch. `hooks` (a TrainingHooks)
    extends the loop; without it this is the book's loop.
    """
    hooks = hooks or TrainingHooks()
    progress = hooks.start()  # the book's counters; a resumed run starts from saved ones
    for epoch in range(progress.epoch, num_epochs):
        model.train()
        for input_batch, target_batch in hooks.epoch_batches(train_loader, progress):
            optimizer.zero_grad()
            loss = hooks.batch_loss(input_batch, target_batch, model, device)
            loss.backward()
            hooks.before_update(model, optimizer, progress)
            optimizer.step()
            progress.tokens_seen += hooks.batch_tokens(input_batch)
            progress.global_step += 1
            if progress.global_step % eval_freq == 0:
                train_loss, val_loss = hooks.evaluate(model, train_loader, val_loader, device,
                                                      eval_iter)
                progress.train_losses.append(train_loss)
                progress.val_losses.append(val_loss)
                progress.track_tokens_seen.append(progress.tokens_seen)
                print(f"Ep {epoch+1} (Step {progress.global_step:06d}): "
                      f"Train loss {train_loss:.3f}, Val loss {val_loss:.3f}")
            hooks.step_done(progress)
        progress.epoch = epoch + 1
        hooks.epoch_done(model, tokenizer, device, start_context, progress)
    return progress.train_losses, progress.val_losses, progress.track_tokens_seen


def plot_losses(epochs_seen, tokens_seen, train_losses, val_losses, save_path="loss-plot.pdf"):
    """Plot training and validation loss against epochs, with tokens seen on a second x axis.

    Saves the figure to `save_path` (the book's loss-plot.pdf; format from the extension; None
    saves nothing) and returns it, so a notebook shows it.
    """
    fig, ax1 = plt.subplots(figsize=(5, 3))
    ax1.plot(epochs_seen, train_losses, label="Training loss")
    ax1.plot(epochs_seen, val_losses, linestyle="-.", label="Validation loss")
    ax1.set_xlabel("Epochs")
    ax1.set_ylabel("Loss")
    ax1.legend(loc="upper right")
    ax1.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax2 = ax1.twiny()  # same y axis, second x axis for tokens seen
    ax2.plot(tokens_seen, train_losses, alpha=0)  # invisible: only aligns the ticks
    ax2.set_xlabel("Tokens seen")
    fig.tight_layout()
    if save_path is not None:
        with atomic_write(save_path) as f:
            fig.savefig(f, format=image_format(save_path, "pdf"))
        print(f"Plot saved as {save_path}")
    return fig


def assign(left, right):
    """Return `right` (array or tensor) as a Parameter, refusing it unless its shape is `left`'s."""
    if tuple(left.shape) != tuple(right.shape):
        raise ValueError(f"Shape mismatch. Left: {tuple(left.shape)}, Right: {tuple(right.shape)}")
    return nn.Parameter(torch.tensor(np.asarray(right), dtype=left.dtype))


def load_weights_into_gpt(gpt, params):
    """Copy OpenAI's GPT-2 weights (`params` from `download_and_load_gpt2`) into `gpt`.

    OpenAI stores one fused query/key/value matrix per layer as (emb_dim, 3 * emb_dim) and every
    linear weight as (in, out); PyTorch's nn.Linear holds (out, in), hence the transposes. Each
    assignment checks the shape. The output head gets its own copy of the token embedding, or
    `params["lm_head"]` where the file has a head of its own (a finetuned model's export).
    """
    if len(params["blocks"]) != len(gpt.trf_blocks):
        raise ValueError(f"Checkpoint has {len(params['blocks'])} layers, "
                         f"the model has {len(gpt.trf_blocks)}")
    gpt.pos_emb.weight = assign(gpt.pos_emb.weight, params["wpe"])
    gpt.tok_emb.weight = assign(gpt.tok_emb.weight, params["wte"])

    for block, p in zip(gpt.trf_blocks, params["blocks"], strict=True):
        att, ff = block.att, block.ff
        q_w, k_w, v_w = np.split(p["attn"]["c_attn"]["w"], 3, axis=-1)  # 3 x (emb_dim, emb_dim)
        att.W_query.weight = assign(att.W_query.weight, q_w.T)
        att.W_key.weight = assign(att.W_key.weight, k_w.T)
        att.W_value.weight = assign(att.W_value.weight, v_w.T)
        q_b, k_b, v_b = np.split(p["attn"]["c_attn"]["b"], 3, axis=-1)  # 3 x (emb_dim,)
        if att.W_query.bias is None:
            raise ValueError("OpenAI's GPT-2 has query/key/value biases: set qkv_bias=True")
        att.W_query.bias = assign(att.W_query.bias, q_b)
        att.W_key.bias = assign(att.W_key.bias, k_b)
        att.W_value.bias = assign(att.W_value.bias, v_b)
        att.out_proj.weight = assign(att.out_proj.weight, p["attn"]["c_proj"]["w"].T)
        att.out_proj.bias = assign(att.out_proj.bias, p["attn"]["c_proj"]["b"])

        ff.layers[0].weight = assign(ff.layers[0].weight, p["mlp"]["c_fc"]["w"].T)
        ff.layers[0].bias = assign(ff.layers[0].bias, p["mlp"]["c_fc"]["b"])
        ff.layers[2].weight = assign(ff.layers[2].weight, p["mlp"]["c_proj"]["w"].T)
        ff.layers[2].bias = assign(ff.layers[2].bias, p["mlp"]["c_proj"]["b"])

        block.norm1.scale = assign(block.norm1.scale, p["ln_1"]["g"])
        block.norm1.shift = assign(block.norm1.shift, p["ln_1"]["b"])
        block.norm2.scale = assign(block.norm2.scale, p["ln_2"]["g"])
        block.norm2.shift = assign(block.norm2.shift, p["ln_2"]["b"])

    gpt.final_norm.scale = assign(gpt.final_norm.scale, params["g"])
    gpt.final_norm.shift = assign(gpt.final_norm.shift, params["b"])
    gpt.out_head.weight = assign(gpt.out_head.weight, params.get("lm_head", params["wte"]))
