"""The device a run computes on, and how it computes there.

- Which device: `pick_device` turns --device (auto, cpu, cuda, cuda:N, mps) into a torch
  device, or refuses it in one line.
- Precision: the autocast context the losses and the answers are computed in (bf16, fp16),
  TF32 matmuls (tf32), the gradient scaler that fp16 trains with, and the checks that refuse a
  precision the device cannot run.
- The GPU path: each training batch prepared on the CPU (padded to a few lengths, the counted
  positions as indices, copied without waiting), attention kernels, torch.compile for the
  training steps, and how many test entries are answered at once.
"""

import importlib.util
import sys
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kit.files import DataError
from previous_chapters import IGNORE_INDEX

MPS_MIN_TORCH = (2, 9)  # the book's notebook picks Apple's GPU from this version on


LENGTH_MULTIPLE = 16  # rows padded to a multiple of this many tokens on the GPU path


GEN_CACHE_BUDGET = 4 << 30  # bytes of keys and values that one answering batch may hold


def torch_version():
    """(major, minor) of the installed torch."""
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int(minor)


def pick_device(name):
    """Return the torch device for `name`; 'auto' prefers cuda, then mps, then cpu.

    As the book's notebook does, 'auto' takes Apple's GPU (MPS) only from torch 2.9 on: older
    versions gave wrong losses there (19.88 instead of 3.83). It says so when it skips MPS, and
    `--device mps` on an older torch runs with a warning.
    """
    mps_trusted = torch_version() >= MPS_MIN_TORCH
    version = ".".join(map(str, MPS_MIN_TORCH))
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            if mps_trusted:
                return torch.device("mps")
            print(f"Note: running on the CPU, not Apple's GPU: torch {torch.__version__} "
                  f"computes wrong losses on MPS (fixed in {version}); upgrade torch, or pass "
                  "--device mps to use it anyway")
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
    if device.type == "mps" and not mps_trusted:
        print(f"Warning: torch {torch.__version__} computes wrong losses on MPS (fixed in "
              f"{version}); upgrade torch, or use --device cpu")
    return device


def device_type(device):
    """'cpu', 'cuda', ... of a torch.device or a device name."""
    return torch.device(device).type


def check_precision(precision, compile_model, device):
    """Refuse a precision the device cannot run, and --compile where it cannot run; warn where
    a 16-bit autocast is slower than fp32 (a CPU: bf16 without bfloat16 instructions, fp16).

    bf16 needs bfloat16 units (Ampere GPUs and newer); fp16, for the GPUs without them (T4,
    V100), runs everywhere; tf32 is a matmul mode of NVIDIA GPUs from Ampere on and is refused
    elsewhere, since it would change nothing.
    """
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise DataError(f"--precision bf16: {torch.cuda.get_device_name(device)} has no "
                        "bfloat16 units (they came with Ampere GPUs); use --precision fp16")
    if precision == "tf32" and device.type != "cuda":
        raise DataError(f"--precision tf32: TF32 is a mode of NVIDIA GPUs (Ampere and newer), "
                        f"not of {device.type}; use --precision fp32")
    if precision == "tf32" and torch.cuda.get_device_capability(device)[0] < 8:
        raise DataError(f"--precision tf32: {torch.cuda.get_device_name(device)} has no TF32 "
                        "units (they came with Ampere GPUs); use --precision fp32 or fp16")
    if precision == "bf16" and device.type == "cpu" and not cpu_has_bf16():
        print("Warning: this CPU has no bfloat16 instructions; --precision bf16 will be slower "
              "than fp32 here")
    if precision == "fp16" and device.type == "cpu":
        print("Warning: --precision fp16 is for GPUs without bfloat16 (T4, V100); on a CPU it "
              "is slower than fp32")
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


AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def precision_context(device, precision):
    """The context the loss and the generation are computed in: a 16-bit autocast, or nothing.

    Under autocast the matrix products run in bfloat16 (bf16) or float16 (fp16) while the
    weights, the optimizer and the loss stay float32 (cross-entropy runs in float32 under
    autocast). Entered where the loss is computed and around generation. tf32 needs no context:
    it switches the process's float32 matrix products to TF32 here, for the backward passes too,
    which run outside any context.
    """
    if precision == "tf32":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if precision in AUTOCAST_DTYPES:
        return torch.autocast(device.type, dtype=AUTOCAST_DTYPES[precision])
    return nullcontext()


class ScaledOptimizer:
    """`optimizer` stepping through a `torch.amp.GradScaler`, for fp16 training.

    float16 gradients of small values round to zero, so the loss is multiplied by the scaler's
    scale before the backward pass (`scale`). `unscale` divides the gradients back, before they
    are clipped; `step` skips the update when a gradient is not finite, and lowers the scale
    then (raising it again after a run of good steps). With the fused AdamW the skip happens on
    the device, without waiting for it. The state dict holds the scaler's state beside the
    optimizer's, so that a resumed run continues with the same scale.
    """

    def __init__(self, optimizer, device):
        self.optimizer = optimizer
        self.scaler = torch.amp.GradScaler(device_type(device))

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def scale(self, loss):
        """`loss` times the scale, to backpropagate."""
        return self.scaler.scale(loss)

    def unscale(self):
        """Divide this step's gradients by the scale (once per step, before clipping)."""
        self.scaler.unscale_(self.optimizer)

    def step(self):
        """Apply the update unless a gradient is not finite; adjust the scale."""
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def zero_grad(self, set_to_none=True):
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return {**self.optimizer.state_dict(), "grad_scaler": self.scaler.state_dict()}

    def load_state_dict(self, state_dict):
        """Load a state saved by `state_dict`; KeyError when it holds no scaler state."""
        state_dict = dict(state_dict)
        self.scaler.load_state_dict(state_dict.pop("grad_scaler"))
        self.optimizer.load_state_dict(state_dict)


def with_precision(optimizer, precision, device):
    """The optimizer the training loop steps: `optimizer` itself, or for fp16 wrapped in a
    `ScaledOptimizer`."""
    return ScaledOptimizer(optimizer, device) if precision == "fp16" else optimizer


@dataclass(frozen=True)
class Precision:
    """How a run computes, decided once from --precision: `ctx`, the autocast context the
    losses and the answers are computed in (nothing for fp32 and tf32, whose TF32 matrix
    products are switched on when it is made), and the gradient scaler, which does something
    under fp16 only (`stepping`, `loss_scaler`)."""

    name: str
    device: torch.device
    ctx: object

    @classmethod
    def of(cls, name, device):
        """The precision `name` (fp32, tf32, bf16, fp16) on `device`."""
        return cls(name, device, precision_context(device, name))

    def stepping(self, optimizer):
        """The optimizer the training loop steps: under fp16 `optimizer` behind the gradient
        scaler (`ScaledOptimizer`), else `optimizer` itself."""
        return with_precision(optimizer, self.name, self.device)

    @staticmethod
    def loss_scaler(optimizer):
        """The scaler of the losses and gradients: `optimizer` when it is fp16's
        `ScaledOptimizer` (from `stepping`), else None."""
        return optimizer if isinstance(optimizer, ScaledOptimizer) else None


def make_optimizer(model, lr, weight_decay):
    """AdamW over the trainable parameters, in its fused form where the device has one.

    The fused kernel updates every parameter in one pass instead of a Python loop of small
    operations per tensor: the same update up to float rounding, in a fraction of the time.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    except RuntimeError:  # no fused AdamW for this device
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def pad_to_multiple(in_idx, multiple, context_length):
    """`in_idx` (b, num_tokens) with token 0 appended to each row up to a multiple of `multiple`
    tokens (at most `context_length`). Under causal attention no position sees the ones after
    it, so the original positions compute the same as without the padding."""
    num_tokens = in_idx.shape[1]
    target = min(-(-num_tokens // multiple) * multiple, max(context_length, num_tokens))
    return F.pad(in_idx, (0, target - num_tokens))  # (b, target)


def prepare_batch(input_batch, target_batch, device, context_length):
    """A batch of the book's collate, as the GPU path computes it: (inputs, kept, targets).

    Built on the CPU, so that the device never waits for the host: `inputs` (b, padded) are the
    rows padded to a multiple of `LENGTH_MULTIPLE` tokens (a compiled step meets a few lengths
    only); `kept` (num_kept,) are the indices, among the b * padded positions, of the targets
    the loss counts, for `GPTModel.forward(keep=...)`; `targets` (num_kept,) are those targets.
    On a GPU they are copied from pinned memory without blocking.
    """
    input_batch, target_batch = input_batch.cpu(), target_batch.cpu()
    inputs = pad_to_multiple(input_batch, LENGTH_MULTIPLE, context_length)  # (b, padded)
    counted = target_batch != IGNORE_INDEX  # (b, num_tokens)
    rows, columns = counted.nonzero(as_tuple=True)  # each (num_kept,)
    kept = rows * inputs.shape[1] + columns  # (num_kept,): flat positions in (b * padded)
    targets = target_batch[counted]  # (num_kept,)
    device = torch.device(device)
    if device.type != "cuda":
        return inputs.to(device), kept.to(device), targets.to(device)
    return tuple(t.pin_memory().to(device, non_blocking=True) for t in (inputs, kept, targets))


def prepared_loss(input_batch, target_batch, model, device, context_length):
    """The mean cross-entropy of a batch of the book's collate, computed as `prepare_batch`
    prepares it: the same value as `calc_loss_batch` up to float rounding."""
    inputs, kept, targets = prepare_batch(input_batch, target_batch, device, context_length)
    return F.cross_entropy(model(inputs, keep=kept), targets)


def eager_model(model):
    """The model itself under its training wrappers (DistributedDataParallel, torch.compile):
    evaluation and initial losses run it eagerly, apart from the training steps' graphs."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def choose_attention_kernels(device):
    """On CUDA, leave the cuDNN kernel out of `scaled_dot_product_attention`.

    PyTorch picks it first under bf16 on recent GPUs, and it builds a graph for every new shape:
    generation meets a new one at every step, and each batch brings its own length. The flash
    and memory-efficient kernels, chosen instead, need no such preparation.
    """
    if device.type == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(False)


def compiled_for_training(model, device):
    """`model` compiled with torch.compile, for the training steps only (generation runs the
    eager model, whose KV cache changes shape every step; evaluation runs it too).

    The steps' batches come from `prepare_batch`: lengths padded to a few multiples, the kept
    positions as indices. Compiled with dynamic shapes, one graph serves every length and
    count of kept positions, on every `device`. No CUDA graphs ("reduce-overhead"): the count
    of kept positions differs from batch to batch, and each new shape would record a new CUDA
    graph.
    """
    return torch.compile(model, dynamic=True)


def generation_dtype(model):
    """The dtype the model's keys and values have while it generates: the autocast's where one
    is active around generation, else the weights'."""
    weight = model.tok_emb.weight
    if torch.is_autocast_enabled(weight.device.type):
        return torch.get_autocast_dtype(weight.device.type)
    return weight.dtype


def default_gen_batch_size(model, prompt_lengths, max_new_tokens):
    """Test entries answered at once when --gen_batch_size is not given: 8 on a CPU or MPS; on
    CUDA as many as `GEN_CACHE_BUDGET` holds keys and values for, in the dtype generation
    computes them in (called under the run's precision context), and at most the whole set.

    A fixed budget keeps the answering phase's memory below the training's, whatever else the
    GPU holds, and the same on every GPU large enough for the training.
    """
    device = model.pos_emb.weight.device
    if device.type != "cuda":
        return 8
    positions = min(model.pos_emb.num_embeddings, max(prompt_lengths) + max_new_tokens)
    emb_dim, vocab_size = model.tok_emb.embedding_dim, model.tok_emb.num_embeddings
    itemsize = torch.finfo(generation_dtype(model)).bits // 8
    row_bytes = 2 * len(model.trf_blocks) * positions * emb_dim * itemsize  # keys and values
    row_bytes += 2 * vocab_size * 4  # the last position's logits, twice over
    return max(1, min(len(prompt_lengths), GEN_CACHE_BUDGET // row_bytes))
