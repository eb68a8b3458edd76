"""The device a run computes on, and how it computes there.

- Which device: `pick_device` turns --device (auto, cpu, cuda, cuda:N, mps) into a torch
  device, or refuses it in one line.
- Precision: the autocast context the losses and the answers are computed in, and the checks
  that refuse a precision the device cannot run.
- The GPU path: attention kernels, torch.compile for the training steps, how many test entries
  are answered at once, and the chapter's evaluation batches in one forward pass.
"""

import importlib.util
import sys
from contextlib import nullcontext
from itertools import islice

import torch
import torch.nn.functional as F

from previous_chapters import IGNORE_INDEX
from script_utils import DataError


def pick_device(name):
    """Return the torch device for `name`; 'auto' prefers cuda, then mps, then cpu."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise DataError(f"--device {name}: not a device; use cpu, cuda, cuda:N, mps or auto")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DataError(f"--device {name}: CUDA is not available on this machine; "
                        "use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise DataError(f"--device {name}: this machine has {torch.cuda.device_count()} "
                        "CUDA device(s); use --device cuda")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise DataError(f"--device {name}: MPS is not available on this machine; "
                        "use --device cpu")
    return device

def check_precision(precision, compile_model, device):
    """Refuse bf16 on a GPU without bfloat16 units and --compile where it cannot run; warn that
    bf16 on a CPU without bfloat16 instructions is slower than fp32."""
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise DataError(f"--precision bf16: {torch.cuda.get_device_name(device)} has no "
                        "bfloat16 units (they came with Ampere GPUs); use --precision fp32")
    if precision == "bf16" and device.type == "cpu" and not cpu_has_bf16():
        print("Warning: this CPU has no bfloat16 instructions; --precision bf16 will be slower "
              "than fp32 here")
    if compile_model and sys.platform == "win32":
        raise DataError("--compile: torch.compile does not run on Windows; leave --compile "
                        "out (or run under WSL)")
    if compile_model and device.type == "cuda" and importlib.util.find_spec("triton") is None:
        raise DataError("--compile: torch.compile needs Triton on a GPU and it is not "
                        "installed; pip install triton, or leave --compile out")

def cpu_has_bf16():
    """Whether this CPU computes in bfloat16 natively (AVX-512 BF16 or AMX on x86)."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)

def device_type(device):
    """'cpu', 'cuda', ... of a torch.device or a device name."""
    return torch.device(device).type

def precision_context(device, precision):
    """The context the loss and the generation are computed in: bf16 autocast, or nothing.

    Under autocast the matrix products run in bfloat16 while the weights, the optimizer and
    the loss stay float32 (cross-entropy runs in float32 under autocast). Entered where the
    loss is computed (`ChapterTraining`, `print_initial_losses`) and around generation.
    """
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()

def choose_attention_kernels(device):
    """On CUDA, leave the cuDNN kernel out of `scaled_dot_product_attention`.

    PyTorch picks it first under bf16 on recent GPUs, and it builds a graph for every new shape:
    generation meets a new one at every step, and each batch brings its own length. The flash
    and memory-efficient kernels, chosen instead, need no such preparation.
    """
    if device.type == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(False)

def compiled_for_training(model, device):
    """`model` compiled with torch.compile, for the training loop only (generation runs the
    eager model, whose KV cache changes shape every step).

    Rows come padded to a few lengths (`GPTModel.length_multiple`), so after the second shape
    one dynamic-shape graph serves them all; on CUDA, "reduce-overhead" replays each step as
    CUDA graphs instead of launching hundreds of small kernels from Python.
    """
    mode = "reduce-overhead" if device.type == "cuda" else None
    return torch.compile(model, mode=mode)

def default_gen_batch_size(model, prompt_lengths, max_new_tokens):
    """Test entries answered at once when --gen_batch_size is not given: 8 on a CPU; on CUDA
    the whole test set, or as many as half the free memory holds float32 keys and values for."""
    device = model.pos_emb.weight.device
    if device.type != "cuda":
        return 8
    positions = min(model.pos_emb.num_embeddings, max(prompt_lengths) + max_new_tokens)
    emb_dim, vocab_size = model.tok_emb.embedding_dim, model.tok_emb.num_embeddings
    row_bytes = 2 * len(model.trf_blocks) * positions * emb_dim * 4
    row_bytes += 2 * vocab_size * 4  # the last position's logits, twice over
    free_bytes, _ = torch.cuda.mem_get_info(device)
    return max(1, min(len(prompt_lengths), free_bytes // 2 // row_bytes))

def mean_batch_losses(batches, model):
    """The mean loss of each (input_batch, target_batch) in `batches`, from one forward pass.

    The batches are padded at the end to a common length and stacked, so a GPU runs one pass
    instead of one per batch. Each batch's value is its own mean over its counted targets, as
    `calc_loss_batch` gives it (up to float rounding).
    """
    width = max(inputs.shape[1] for inputs, _ in batches)
    inputs = torch.cat([F.pad(x, (0, width - x.shape[1])) for x, _ in batches])  # (rows, width)
    targets = torch.cat([F.pad(y, (0, width - y.shape[1]), value=IGNORE_INDEX)
                         for _, y in batches])  # (rows, width)
    sizes = torch.tensor([len(x) for x, _ in batches], device=inputs.device)
    batch_of_row = torch.repeat_interleave(torch.arange(len(batches), device=inputs.device),
                                           sizes)  # (rows,)
    keep = targets != IGNORE_INDEX
    logits = model(inputs, keep=keep)  # (num_kept, vocab_size)
    losses = F.cross_entropy(logits.float(), targets[keep], reduction="none")  # (num_kept,)
    batch_of_token = batch_of_row[:, None].expand_as(keep)[keep]  # (num_kept,)
    sums = torch.zeros(len(batches), device=inputs.device).index_add_(0, batch_of_token, losses)
    counts = torch.bincount(batch_of_token, minlength=len(batches))
    return (sums / counts).tolist()

def evaluate_in_one_pass(model, train_loader, val_loader, eval_iter):
    """(train_loss, val_loss) over `eval_iter` batches of each loader, as `evaluate_model` gives
    them, in one forward pass. The loaders are iterated as `calc_loss_loader` iterates them,
    so the random draws of the shuffled training loader stay the same."""
    train = list(islice(train_loader, eval_iter))
    val = list(islice(val_loader, eval_iter))
    model.eval()
    with torch.no_grad():
        losses = mean_batch_losses(train + val, model) if train or val else []
    model.train()
    train_losses, val_losses = losses[:len(train)], losses[len(train):]
    return (sum(train_losses) / len(train) if train else float("nan"),
            sum(val_losses) / len(val) if val else float("nan"))
