"""lora.py: LoRA layers that start as the original model, train alone, and merge back."""

import pytest
import torch

import lora
from previous_chapters import GPTModel, calc_loss_batch


@pytest.fixture
def models(tiny_cfg):
    """(LoRA-wrapped model, the same model unwrapped), both in eval mode."""
    torch.manual_seed(0)
    original = GPTModel(tiny_cfg).eval()
    wrapped = GPTModel(tiny_cfg).eval()
    wrapped.load_state_dict(original.state_dict())
    wrapped.requires_grad_(False)
    lora.replace_linear_with_lora(wrapped, rank=4, alpha=8)
    return wrapped, original


def test_only_lora_parameters_get_gradients(models, tiny_cfg):
    wrapped, _ = models
    idx = torch.randint(0, tiny_cfg["vocab_size"], (2, 7))
    calc_loss_batch(idx[:, :-1], idx[:, 1:], wrapped, "cpu").backward()
    names = {name for name, p in wrapped.named_parameters() if p.grad is not None}
    assert names == {name for name, _ in wrapped.named_parameters()
                     if name.endswith((".lora.A", ".lora.B"))}
    assert "out_head.lora.B" in names and "trf_blocks.1.ff.layers.2.lora.A" in names
    assert all(p.requires_grad == (name in names) for name, p in wrapped.named_parameters())


def test_merged_model_gives_the_wrapped_logits(models, tiny_cfg):
    wrapped, _ = models
    with torch.no_grad():
        for module in wrapped.modules():
            if isinstance(module, lora.LoRALayer):
                module.B.normal_(0, 0.05)  # as if trained
    idx = torch.randint(0, tiny_cfg["vocab_size"], (2, 7))
    expected = wrapped(idx)
    merged = lora.merge_lora(wrapped)
    plain = GPTModel(tiny_cfg).eval()
    plain.load_state_dict(merged.state_dict())  # strict: exactly a plain GPTModel's weights
    assert not any(isinstance(m, lora.LinearWithLoRA) for m in merged.modules())
    assert torch.allclose(plain(idx), expected, atol=1e-5)
    assert not torch.allclose(plain(idx), GPTModel(tiny_cfg).eval()(idx), atol=1e-3)


def test_lora_rank_reads_the_width_of_the_a_matrices(tiny_cfg):
    model = GPTModel(tiny_cfg)
    assert lora.lora_rank(model.state_dict()) is None
    lora.replace_linear_with_lora(model, rank=3, alpha=1)
    assert lora.lora_rank(model.state_dict()) == 3
    assert lora.lora_config(model) == {"rank": 3, "alpha": 1}
