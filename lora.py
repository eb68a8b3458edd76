"""LoRA, the book's Appendix E: low-rank updates added to a model's linear layers.

Exercise 7.4 finetunes with them (exercise_experiments.py --exercise_solution lora), and
finetuned_model.load_finetuned_model rebuilds them for a model saved unmerged. The
rank and alpha of a saved model are recorded in the "lora" entry of the config in its JSON.
"""

import math

import torch
import torch.nn as nn

from kit.files import DataError


class LoRALayer(nn.Module):
    """The low-rank update alpha * (x @ A @ B), with A (in, rank) and B (rank, out).

    A starts random (kaiming-uniform, as in the book) and B at zero, so the update is zero until
    training moves B: finetuning starts from the pretrained model's exact outputs.
    """

    def __init__(self, in_dim, out_dim, rank, alpha):
        super().__init__()
        self.A = nn.Parameter(torch.empty(in_dim, rank))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.B = nn.Parameter(torch.zeros(rank, out_dim))
        self.alpha = alpha

    def forward(self, x):
        return self.alpha * (x @ self.A @ self.B)  # (..., in) -> (..., out)


class LinearWithLoRA(nn.Module):
    """An nn.Linear plus a LoRA update: linear(x) + alpha * (x @ A @ B)."""

    def __init__(self, linear, rank, alpha):
        super().__init__()
        self.linear = linear
        self.lora = LoRALayer(linear.in_features, linear.out_features, rank, alpha)

    def forward(self, x):
        return self.linear(x) + self.lora(x)


def replace_linear_with_lora(model, rank, alpha):
    """Wrap every nn.Linear in `model` (attention, feedforward, output head) in LinearWithLoRA."""
    for name, module in model.named_children():
        if isinstance(module, nn.Linear):
            setattr(model, name, LinearWithLoRA(module, rank, alpha))
        else:
            replace_linear_with_lora(module, rank, alpha)


def count_trainable(model):
    """Number of parameters that training updates (those with requires_grad)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def merge_lora(model, prefix=""):
    """Fold each LoRA update into its linear layer and unwrap it; return `model`, changed.

    linear(x) + alpha * x @ A @ B equals a linear layer with weight W + alpha * (A @ B).T (W is
    (out, in)), so the merged model computes the same and is a plain GPTModel again. An alpha
    so large that a merged weight is not a finite number (it overflows) raises DataError
    naming the layer, before that layer is changed: such weights answer nothing but noise.
    """
    for name, module in model.named_children():
        if isinstance(module, LinearWithLoRA):
            lora = module.lora
            with torch.no_grad():
                merged = module.linear.weight + lora.alpha * (lora.A @ lora.B).T
                if not torch.isfinite(merged).all():
                    raise DataError(f"merging the LoRA layers with alpha {lora.alpha:g} makes "
                                    f"{prefix}{name}.weight hold values that are not finite "
                                    "numbers: the alpha is far too large for these weights; "
                                    "use the alpha the model was trained with (the book's "
                                    "is 16)")
                module.linear.weight.copy_(merged)
            setattr(model, name, module.linear)
        else:
            merge_lora(module, f"{prefix}{name}.")
    return model


def lora_config(model):
    """{"rank", "alpha"} of the LoRA layers in `model`, or None when it has none.

    Saved in the "lora" entry of the model's config so that loading rebuilds the same layers.
    """
    for module in model.modules():
        if isinstance(module, LinearWithLoRA):
            return {"rank": module.lora.A.shape[1], "alpha": module.lora.alpha}
    return None


def lora_rank(state_dict):
    """The rank of the unmerged LoRA layers in a state dict (the width of their A matrices), or
    None when it holds none. Their alpha is not in the weights: the model's JSON records it."""
    for name, tensor in state_dict.items():
        if name.endswith(".lora.A"):
            return tensor.shape[1]
    return None
