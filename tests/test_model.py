"""GPT-2 model, weight loading, generation with and without the KV cache, loss helpers."""

from unittest import mock

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from previous_chapters import (
    GPTModel,
    KVCache,
    MultiHeadAttention,
    assign,
    calc_loss_batch,
    calc_loss_loader,
    generate,
    generate_batch,
    load_weights_into_gpt,
    text_to_token_ids,
    token_ids_to_text,
)


def hf_params(hf_model, n_layers):
    """OpenAI-layout params (as download_and_load_gpt2 returns them) from a transformers GPT-2."""
    sd = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}

    def block(i):
        def wb(name):
            return {"w": sd[f"transformer.h.{i}.{name}.weight"],
                    "b": sd[f"transformer.h.{i}.{name}.bias"]}

        def gb(name):
            return {"g": sd[f"transformer.h.{i}.{name}.weight"],
                    "b": sd[f"transformer.h.{i}.{name}.bias"]}

        return {"attn": {"c_attn": wb("attn.c_attn"), "c_proj": wb("attn.c_proj")},
                "ln_1": gb("ln_1"), "ln_2": gb("ln_2"),
                "mlp": {"c_fc": wb("mlp.c_fc"), "c_proj": wb("mlp.c_proj")}}

    return {"wte": sd["transformer.wte.weight"], "wpe": sd["transformer.wpe.weight"],
            "blocks": [block(i) for i in range(n_layers)],
            "g": sd["transformer.ln_f.weight"], "b": sd["transformer.ln_f.bias"]}


@pytest.fixture(scope="module")
def hf_gpt2():
    """transformers' GPT-2 with random weights everywhere (biases and norms too), eval mode."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=500, n_positions=64, n_embd=48, n_layer=3, n_head=4,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        layer_norm_epsilon=1e-5, activation_function="gelu_new")
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.2)
    return model


@pytest.mark.parametrize("fused", [True, False])
def test_logits_match_transformers_gpt2(hf_gpt2, fused):
    cfg = {"vocab_size": 500, "context_length": 64, "emb_dim": 48, "n_heads": 4, "n_layers": 3,
           "drop_rate": 0.0, "qkv_bias": True, "fused": fused}
    model = GPTModel(cfg).eval()
    load_weights_into_gpt(model, hf_params(hf_gpt2, 3))
    idx = torch.randint(0, 500, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(idx)
        theirs = hf_gpt2(idx).logits
    assert ours.shape == (2, 40, 500)
    assert torch.allclose(ours, theirs, atol=1e-4, rtol=0), (ours - theirs).abs().max()


def test_output_head_is_not_tied_to_token_embedding(hf_gpt2):
    cfg = {"vocab_size": 500, "context_length": 64, "emb_dim": 48, "n_heads": 4, "n_layers": 3,
           "drop_rate": 0.0, "qkv_bias": True}
    model = GPTModel(cfg)
    load_weights_into_gpt(model, hf_params(hf_gpt2, 3))
    assert torch.equal(model.out_head.weight, model.tok_emb.weight)
    assert model.out_head.weight.data_ptr() != model.tok_emb.weight.data_ptr()
    assert sum(p.numel() for p in model.parameters()) == (
        sum(p.numel() for p in hf_gpt2.parameters()) + 500 * 48)


def test_gpt2_124m_parameter_count():
    cfg = {"vocab_size": 50257, "context_length": 1024, "emb_dim": 768, "n_heads": 12,
           "n_layers": 12, "drop_rate": 0.0, "qkv_bias": True}
    model = GPTModel(cfg)
    assert sum(p.numel() for p in model.parameters()) == 163_037_184
    assert model.out_head.weight.shape == (50257, 768)


def test_assign_refuses_wrong_shapes(tiny_cfg, hf_gpt2):
    with pytest.raises(ValueError, match=r"Shape mismatch. Left: \(3, 4\), Right: \(4, 3\)"):
        assign(torch.zeros(3, 4), torch.zeros(4, 3).numpy())
    with pytest.raises(ValueError, match="Checkpoint has 3 layers, the model has 2"):
        load_weights_into_gpt(GPTModel(tiny_cfg), hf_params(hf_gpt2, 3))


def test_fused_kernels_and_spelled_out_math_agree(tiny_cfg):
    torch.manual_seed(0)
    fast = GPTModel(tiny_cfg).eval()
    slow = GPTModel({**tiny_cfg, "fused": False}).eval()
    slow.load_state_dict(fast.state_dict())
    idx = torch.randint(0, 50257, (3, 20))
    assert torch.allclose(fast(idx), slow(idx), atol=1e-5)


def test_state_dict_saves_the_causal_mask_as_the_book_does(tiny_cfg):
    torch.manual_seed(0)
    model = GPTModel(tiny_cfg)
    state = model.state_dict()
    n = tiny_cfg["context_length"]
    masks = [k for k in state if k.endswith(".mask")]
    assert masks == [f"trf_blocks.{i}.att.mask" for i in range(tiny_cfg["n_layers"])]
    book_mask = torch.triu(torch.ones(n, n), diagonal=1)
    for key in masks:  # the book registered the mask as a float 0/1 buffer
        assert torch.equal(state[key].float(), book_mask)
        state[key] = book_mask
    fresh = GPTModel(tiny_cfg)
    fresh.load_state_dict(state, strict=True)
    assert torch.equal(fresh.out_head.weight, model.out_head.weight)
    assert torch.equal(fresh.trf_blocks[0].att.mask.float(), book_mask)


def test_state_dict_without_masks_still_loads(tiny_cfg):
    torch.manual_seed(0)
    model = GPTModel(tiny_cfg)
    state = {k: v for k, v in model.state_dict().items() if not k.endswith(".mask")}
    fresh = GPTModel(tiny_cfg)
    fresh.load_state_dict(state, strict=True)
    assert torch.equal(fresh.trf_blocks[0].att.mask, model.trf_blocks[0].att.mask)


def test_attention_is_causal(tiny_cfg):
    torch.manual_seed(0)
    mha = MultiHeadAttention(8, 8, context_length=10, dropout=0.0, num_heads=2).eval()
    x = torch.randn(1, 6, 8)
    changed = x.clone()
    changed[0, 4:] += 1.0  # only later tokens change
    assert torch.allclose(mha(x)[0, :4], mha(changed)[0, :4])
    assert not torch.allclose(mha(x)[0, 4:], mha(changed)[0, 4:])


def test_text_token_round_trip(tokenizer):
    ids = text_to_token_ids("Every effort moves you<|endoftext|>", tokenizer)
    assert ids.tolist() == [[6109, 3626, 6100, 345, 50256]]
    assert token_ids_to_text(ids, tokenizer) == "Every effort moves you<|endoftext|>"


@pytest.fixture
def tiny_model(tiny_cfg):
    torch.manual_seed(123)
    return GPTModel(tiny_cfg).eval()


@pytest.mark.parametrize("batch", [1, 3])
def test_cached_greedy_generation_equals_recompute(tiny_model, batch):
    idx = torch.randint(0, 50257, (batch, 7), generator=torch.Generator().manual_seed(5))
    cached = generate(tiny_model, idx, max_new_tokens=15, context_size=32)
    recomputed = generate(tiny_model, idx, max_new_tokens=15, context_size=32, use_cache=False)
    assert cached.shape == (batch, 22)
    assert torch.equal(cached, recomputed)


def test_cached_generation_equals_recompute_past_the_context(tiny_model):
    idx = torch.randint(0, 50257, (2, 10), generator=torch.Generator().manual_seed(6))
    # 10 + 40 tokens slide well past the 32-token context: the window moves every step.
    cached = generate(tiny_model, idx, max_new_tokens=40, context_size=32)
    recomputed = generate(tiny_model, idx, max_new_tokens=40, context_size=32, use_cache=False)
    assert cached.shape == (2, 50)
    assert torch.equal(cached, recomputed)


def test_generation_stops_at_eos(tiny_model):
    idx = torch.tensor([[11, 22, 33]])
    free = generate(tiny_model, idx, max_new_tokens=12, context_size=32)
    eos = free[0, 3 + 4].item()  # the 5th generated token becomes the end-of-text token
    first = free[0, 3:].tolist().index(eos)
    for use_cache in (True, False):
        out = generate(tiny_model, idx, max_new_tokens=12, context_size=32, eos_id=eos,
                       use_cache=use_cache)
        assert out[0].tolist() == free[0, :3 + first].tolist()  # eos itself is not appended


def test_batched_eos_rows_finish_independently(tiny_model):
    prompts = torch.tensor([[11, 22, 33], [44, 55, 66]])
    free = generate(tiny_model, prompts, max_new_tokens=10, context_size=32)
    eos = free[0, 3 + 2].item()
    out = generate(tiny_model, prompts, max_new_tokens=10, context_size=32, eos_id=eos)
    for row in range(2):
        alone = generate(tiny_model, prompts[row:row + 1], max_new_tokens=10, context_size=32,
                         eos_id=eos)
        produced = out[row, 3:].tolist()
        answer = produced[:produced.index(eos)] if eos in produced else produced
        assert answer == alone[0, 3:].tolist()


def test_generate_batch_with_different_lengths_equals_one_at_a_time(tiny_model):
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14], [15], [16, 17, 18, 19, 20]]
    free = generate(tiny_model, torch.tensor([prompts[1]]), max_new_tokens=8, context_size=32)
    eos = free[0, 7 + 3].item()
    batched = generate_batch(tiny_model, prompts, max_new_tokens=20, context_size=32,
                             eos_id=eos)
    for prompt, answer in zip(prompts, batched, strict=True):
        alone = generate(tiny_model, torch.tensor([prompt]), max_new_tokens=20, context_size=32,
                         eos_id=eos, use_cache=False)
        assert answer == alone[0, len(prompt):].tolist()
    assert len(batched[1]) == 3


def test_greedy_generation_checks_for_the_end_every_few_tokens(tiny_model):
    free = generate(tiny_model, torch.tensor([[5, 6, 7]]), max_new_tokens=8,
                    context_size=32)[0, 3:].tolist()
    # Row 1 continues row 0 two tokens on: both produce free[3] soon, row 1 first.
    prompts, eos = [[5, 6, 7], [5, 6, 7, *free[:2]]], free[3]
    with mock.patch("previous_chapters.END_CHECK_EVERY", 1):
        every_token = generate_batch(tiny_model, prompts, max_new_tokens=20, context_size=32,
                                     eos_id=eos)
    calls = []
    features = tiny_model.features
    with mock.patch.object(tiny_model, "features",
                           side_effect=lambda *a, **k: calls.append(1) or features(*a, **k)):
        every_eight = generate_batch(tiny_model, prompts, max_new_tokens=20, context_size=32,
                                     eos_id=eos)
    assert every_eight == every_token == [free[:3], free[2:3]]
    assert len(calls) == 8  # every row had ended at step 4; that was seen after step 8


def test_attention_mask_is_built_once_per_step_for_all_layers(tiny_model):
    masks = []
    attention = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, attn_mask=None, **kwargs):
        masks.append(attn_mask)
        return attention(*args, attn_mask=attn_mask, **kwargs)

    with mock.patch("torch.nn.functional.scaled_dot_product_attention", side_effect=spy):
        generate_batch(tiny_model, [[5, 6, 7], [8]], max_new_tokens=3, context_size=32)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            generate_batch(tiny_model, [[5, 6, 7], [8]], max_new_tokens=1, context_size=32)
    assert len(masks) == 2 * 4  # 2 layers, 3 + 1 steps
    for first, second in zip(masks[::2], masks[1::2], strict=True):
        assert second is first  # one mask for both layers
    prompt_mask = masks[0]  # (2, 1, 3, 3): row 1 has two padding keys
    assert prompt_mask.dtype == torch.float32
    assert prompt_mask[1, 0].tolist() == [[0.0, float("-inf"), float("-inf")],
                                          [float("-inf"), 0.0, float("-inf")],
                                          [float("-inf"), float("-inf"), 0.0]]
    assert masks[-1].dtype == torch.bfloat16  # the dtype of the queries under autocast


def test_generate_batch_slides_past_the_context(tiny_model):
    prompts = [[1, 2, 3, 4, 5, 6], [7, 8]]
    batched = generate_batch(tiny_model, prompts, max_new_tokens=35, context_size=32)
    for prompt, answer in zip(prompts, batched, strict=True):
        alone = generate(tiny_model, torch.tensor([prompt]), max_new_tokens=35, context_size=32,
                         use_cache=False)
        assert answer == alone[0, len(prompt):].tolist()


def test_sampling_is_reproducible_under_a_seed(tiny_model):
    idx = torch.tensor([[1, 2, 3]])
    torch.manual_seed(42)
    first = generate(tiny_model, idx, 20, 32, temperature=1.5, top_k=50)
    torch.manual_seed(42)
    second = generate(tiny_model, idx, 20, 32, temperature=1.5, top_k=50)
    torch.manual_seed(43)
    other = generate(tiny_model, idx, 20, 32, temperature=1.5, top_k=50)
    greedy = generate(tiny_model, idx, 20, 32)
    assert torch.equal(first, second)
    assert not torch.equal(first, other)
    assert not torch.equal(first, greedy)
    torch.manual_seed(7)
    assert torch.equal(generate(tiny_model, idx, 20, 32, temperature=1.0, top_k=1), greedy)


def test_kv_cache_refuses_more_than_its_capacity(tiny_model):
    cache = KVCache(n_layers=2, capacity=4)
    tiny_model(torch.tensor([[1, 2, 3]]), cache=cache)
    assert cache.length == 3
    with pytest.raises(ValueError, match="KV cache holds 4 positions, 5 were requested"):
        tiny_model(torch.tensor([[4, 5]]), cache=cache)


def test_model_refuses_sequences_longer_than_its_context(tiny_model):
    with pytest.raises(ValueError, match="33 tokens is longer than the model's context length"):
        tiny_model(torch.zeros(1, 33, dtype=torch.long))


def kept_positions_batch():
    """Inputs (3, 10) and a keep mask: a masked instruction, trailing padding, a row kept whole."""
    inputs = torch.randint(0, 50257, (3, 10), generator=torch.Generator().manual_seed(4))
    keep = torch.zeros(3, 10, dtype=torch.bool)
    keep[0, 3:6] = True  # instruction masked before, padding after
    keep[1, :4] = True  # padding after position 3
    keep[2, :] = True
    return inputs, keep


@pytest.mark.parametrize("fused", [True, False])
def test_keep_gives_the_full_logits_and_gradients_at_kept_positions(tiny_cfg, fused):
    inputs, keep = kept_positions_batch()
    torch.manual_seed(123)
    model = GPTModel({**tiny_cfg, "fused": fused})
    full = model(inputs)[keep]  # (17, vocab_size)
    full.square().mean().backward()
    full_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    kept = model(inputs, keep=keep)
    kept.square().mean().backward()
    assert kept.shape == (17, 50257)
    assert torch.allclose(kept, full, atol=1e-5)
    for (name, param), expected in zip(model.named_parameters(), full_grads, strict=True):
        assert torch.allclose(param.grad, expected, atol=1e-6), name


@pytest.mark.parametrize("fused", [True, False])
def test_kept_indices_give_the_kept_masks_logits(tiny_cfg, fused):
    inputs, keep = kept_positions_batch()
    torch.manual_seed(123)
    model = GPTModel({**tiny_cfg, "fused": fused})
    model.pack_on = ()  # whole rows, as on a GPU
    indices = keep.flatten().nonzero()[:, 0]  # (17,): positions among the 3 x 10
    assert torch.allclose(model(inputs, keep=indices), model(inputs, keep=keep), atol=1e-6)
    assert torch.allclose(model(inputs, keep=indices), model(inputs)[keep], atol=1e-5)


def test_keep_computes_no_position_after_a_rows_last_kept_one(tiny_model):
    inputs, keep = kept_positions_batch()
    seen = []
    tiny_model.trf_blocks[0].register_forward_hook(lambda m, args, out: seen.append(out.shape))
    tiny_model(inputs, keep=keep)
    assert seen == [(1, 6 + 4 + 10, 16)]  # rows of 6, 4 and 10 positions, packed in one sequence
    keep[:] = False
    assert tiny_model(inputs, keep=keep).shape == (0, 50257)


def test_keep_refuses_a_cache_and_long_sequences(tiny_model):
    inputs, keep = kept_positions_batch()
    with pytest.raises(ValueError, match="keep= computes whole rows from position 0"):
        tiny_model(inputs, cache=KVCache(n_layers=2, capacity=32), keep=keep)
    long_inputs = torch.zeros(1, 33, dtype=torch.long)
    with pytest.raises(ValueError, match="33 tokens is longer than the model's context length"):
        tiny_model(long_inputs, keep=torch.ones(1, 33, dtype=torch.bool))


def test_loss_ignores_targets_of_minus_100(tiny_model):
    torch.manual_seed(0)
    inputs = torch.randint(0, 50257, (2, 6))
    targets = torch.randint(0, 50257, (2, 6))
    targets[0, 4:] = -100
    targets[1, 2:] = -100
    loss = calc_loss_batch(inputs, targets, tiny_model, "cpu")
    logits = tiny_model(inputs)
    kept = [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1)]
    expected = torch.stack([-torch.log_softmax(logits[b, t], -1)[targets[b, t]]
                            for b, t in kept]).mean()
    assert torch.allclose(loss, expected, atol=1e-6)


def test_calc_loss_loader_honours_num_batches(tiny_model):
    torch.manual_seed(0)
    inputs = torch.randint(0, 50257, (8, 5))
    targets = torch.randint(0, 50257, (8, 5))
    loader = DataLoader(TensorDataset(inputs, targets), batch_size=2)
    per_batch = [calc_loss_batch(inputs[i:i + 2], targets[i:i + 2], tiny_model, "cpu").item()
                 for i in range(0, 8, 2)]
    assert calc_loss_loader(loader, tiny_model, "cpu", num_batches=2) == pytest.approx(
        sum(per_batch[:2]) / 2)
    assert calc_loss_loader(loader, tiny_model, "cpu") == pytest.approx(sum(per_batch) / 4)
    assert calc_loss_loader(loader, tiny_model, "cpu", num_batches=99) == pytest.approx(
        sum(per_batch) / 4)
    empty = DataLoader(TensorDataset(inputs[:0], targets[:0]), batch_size=2)
    assert calc_loss_loader(empty, tiny_model, "cpu") != calc_loss_loader(empty, tiny_model, "cpu")


def test_fast_training_path_matches_the_books_first_five_losses(tiny_cfg):
    """Fused kernels, head only where targets count and fused AdamW change nothing but speed."""
    import torch.nn.functional as F

    from kit.device import make_optimizer

    gen = torch.Generator().manual_seed(3)
    batches = []
    for _ in range(5):
        inputs = torch.randint(0, 50257, (4, 12), generator=gen)
        targets = torch.randint(0, 50257, (4, 12), generator=gen)
        targets[1:, 7:] = -100  # padding, as the collate function marks it
        batches.append((inputs, targets))

    def losses(fused):
        torch.manual_seed(0)
        model = GPTModel({**tiny_cfg, "fused": fused}).train()
        if fused:
            optimizer = make_optimizer(model, 5e-3, 0.1)
            assert optimizer.defaults["fused"]
        else:
            optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.1)
        result = []
        for inputs, targets in batches:
            optimizer.zero_grad()
            if fused:
                loss = calc_loss_batch(inputs, targets, model, "cpu")
            else:  # the book's loss: logits everywhere, cross-entropy skips -100
                loss = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
            loss.backward()
            optimizer.step()
            result.append(loss.item())
        return result

    book, fast = losses(False), losses(True)
    assert book[4] < book[0]
    assert fast == pytest.approx(book, abs=1e-4)
