"""Export a finetuned model of this repo as a GGUF file for llama.cpp and Ollama, with a Modelfile.

    python export_gguf.py gpt2-medium355M-sft-standalone.pth gpt2-medium-sft-gguf
    ollama create my-gpt2-sft -f gpt2-medium-sft-gguf/Modelfile
    ollama run my-gpt2-sft "Name three primary colors."
    ollama run my-gpt2-sft $'Rewrite the sentence.\\n\\n### Input:\\nThe cake was baked by me.'

The folder holds MODEL-OUTTYPE.gguf (llama.cpp's GPT-2 architecture, written with the `gguf`
package, llama.cpp's own writer) and a Modelfile for Ollama. The GGUF file carries GPT-2's
tokenizer and a chat template (the one export_hf.py writes) for the run's prompt style; the
Modelfile's TEMPLATE writes the prompt the finetuning script writes for an entry, followed by
the response header. A prompt is the instruction, or the instruction, the prompt style's input
separator and the input (above, Alpaca's "\\n\\n### Input:\\n"; Phi-3's is a newline), as
the Modelfile's first lines say. A model saved with unmerged LoRA layers is merged first.

The answer equals the one the script saves for the same entry (up to the spaces it strips at
the ends) when the model, asked the script's prompt, writes the response header itself before
its answer (a finetuned model does; the random test-mode model does not), the weights are f32
(f16 and q8_0 round them, so a near tie between two tokens can go the other way), and the
answer ends at <|endoftext|> before the script's 256 new tokens, header included, run out and
before the style's next instruction tag ("### Instruction:", "<|user|>"), where Ollama stops
and the script does not.

--outtype f32 keeps the weights exactly; f16 (the default) halves the file; q8_0 stores the
matrices in 8 bits with a scale per 32 values, about a quarter of f32. Biases, norms and the
position embedding stay f32, as llama.cpp's own converter keeps them.
"""

import argparse
import json
import math
import os

import gguf
import numpy as np
import torch
from tqdm import tqdm

from export_hf import (
    ANSWER_TOKENS,
    bpe_vocab_and_merges,
    chat_template,
    is_tied,
    prompt_parts,
    user_message,
)
from gpt_download import END_OF_TEXT, gpt2_tokenizer
from kit.data import PROMPT_STYLES
from kit.export_folder import (
    add_export_arguments,
    check_export_arguments,
    check_out_dir,
    load_for_export,
    run_export,
    write_new_folder,
)
from kit.files import DataError

EXAMPLE_WITH_INPUT = ("Rewrite the sentence.", "The cake was baked by me.")  # printed, asked
OUTTYPES = {  # --outtype -> (file type in the metadata, the matrices' tensor type)
    "f32": (gguf.LlamaFileType.ALL_F32, gguf.GGMLQuantizationType.F32),
    "f16": (gguf.LlamaFileType.MOSTLY_F16, gguf.GGMLQuantizationType.F16),
    "q8_0": (gguf.LlamaFileType.MOSTLY_Q8_0, gguf.GGMLQuantizationType.Q8_0),
}
ARCH = gguf.MODEL_ARCH.GPT2


#####################################
# The model: GPTModel's weights under llama.cpp's GPT-2 names
#####################################


def tensor_name(kind, suffix, block=None):
    """llama.cpp's name of a GPT-2 tensor, e.g. (ATTN_QKV, "weight", 0) -> blk.0.attn_qkv.weight."""
    if kind not in gguf.MODEL_TENSORS[ARCH]:
        raise ValueError(f"llama.cpp's GPT-2 has no {kind.name} tensor")
    return f"{gguf.TENSOR_NAMES[kind].format(bid=block)}.{suffix}"


def gguf_tensors(model):
    """GPTModel's weights as llama.cpp's GPT-2 names them, float32 numpy arrays.

    nn.Linear's (out, in) weight is the layout llama.cpp reads (ggml lists the dimensions the
    other way round: {in, out}), so nothing is transposed; the query, key and value
    projections are one fused attn_qkv (3 * emb_dim, emb_dim). GPT-2 always has query/key/
    value biases, so a model without them gets zeros. output.weight is written only when the
    head is not the embedding (llama.cpp then reads the embedding twice).
    """
    T = gguf.MODEL_TENSOR

    def linear(kind, layer, block):
        return {tensor_name(kind, "weight", block): layer.weight,
                tensor_name(kind, "bias", block): layer.bias}

    def norm(kind, layer, block=None):
        return {tensor_name(kind, "weight", block): layer.scale,
                tensor_name(kind, "bias", block): layer.shift}

    tensors = {tensor_name(T.TOKEN_EMBD, "weight"): model.tok_emb.weight,
               tensor_name(T.POS_EMBD, "weight"): model.pos_emb.weight}
    for i, block in enumerate(model.trf_blocks):
        att, ff = block.att, block.ff
        projections = (att.W_query, att.W_key, att.W_value)
        biases = [torch.zeros(p.out_features) if p.bias is None else p.bias for p in projections]
        tensors.update({
            **norm(T.ATTN_NORM, block.norm1, i),
            tensor_name(T.ATTN_QKV, "weight", i): torch.cat([p.weight for p in projections]),
            tensor_name(T.ATTN_QKV, "bias", i): torch.cat(biases),
            **linear(T.ATTN_OUT, att.out_proj, i),
            **norm(T.FFN_NORM, block.norm2, i),
            **linear(T.FFN_UP, ff.layers[0], i),
            **linear(T.FFN_DOWN, ff.layers[2], i),
        })
    tensors.update(norm(T.OUTPUT_NORM, model.final_norm))
    if not is_tied(model):
        tensors[tensor_name(T.OUTPUT, "weight")] = model.out_head.weight
    return {name: tensor.detach().float().cpu().contiguous().numpy()
            for name, tensor in tensors.items()}


def stored_type(name, array, qtype):
    """The tensor type a tensor is stored in.

    1-D tensors (biases, norms) and the position embedding stay f32, as llama.cpp's converter
    keeps them; the other matrices take `qtype`. A matrix whose rows do not split into the
    blocks of a quantized type (32 values for q8_0) is stored f16 instead, as the converter
    does.
    """
    if array.ndim == 1 or name == tensor_name(gguf.MODEL_TENSOR.POS_EMBD, "weight"):
        return gguf.GGMLQuantizationType.F32
    block_size, _ = gguf.GGML_QUANT_SIZES[qtype]
    if array.shape[-1] % block_size:
        return gguf.GGMLQuantizationType.F16
    return qtype


F16_MAX = float(np.finfo(np.float16).max)  # 65504
LARGEST_STORED = {gguf.GGMLQuantizationType.F16: F16_MAX,  # beyond it f16 holds infinity
                  gguf.GGMLQuantizationType.Q8_0: F16_MAX * 127}  # q8_0's f16 scale: max / 127


def check_storable(tensors, types, outtype):
    """Raise DataError when a tensor holds values that its stored type turns into infinity
    (f16 ends at 65504): weights that large come only from a broken merge (a LoRA alpha far
    from the trained one), and the exported model would answer nothing but noise."""
    for name, array in tensors.items():
        largest = LARGEST_STORED.get(types[name])
        if largest is not None and array.size and float(np.abs(array).max()) > largest:
            raise DataError(f"{name} holds values up to {float(np.abs(array).max()):.3g}, "
                            f"more than --outtype {outtype} can store (its largest is "
                            f"{largest:.6g}), so the exported weights would be infinite; check "
                            "the LoRA alpha, or pass --outtype f32")


def stored_nbytes(array, qtype):
    """The bytes that `array` takes stored as `qtype` (q8_0: 34 bytes per 32 values)."""
    return math.prod(gguf.quant_shape_to_byte_shape(array.shape, qtype))


#####################################
# The tokenizer: GPT-2's byte-level BPE, as llama.cpp reads it
#####################################


def tokenizer_fields(encoding):
    """(tokens, token types, merges) of a byte-level BPE tiktoken Encoding: the tokens by id,
    spelled as in vocab.json, <|endoftext|> a control token, the merges in rank order."""
    vocab, merges = bpe_vocab_and_merges(encoding)
    tokens = sorted(vocab, key=vocab.get)
    if [vocab[token] for token in tokens] != list(range(encoding.n_vocab)):
        raise ValueError("the tokenizer's ids are not 0 to n_vocab - 1")
    types = [gguf.TokenType.CONTROL if token in encoding.special_tokens_set
             else gguf.TokenType.NORMAL for token in tokens]
    return tokens, types, merges


#####################################
# The Modelfile: Ollama asks as the finetuning script does
#####################################


def modelfile(gguf_name, prompt_style, context_length):
    """The Modelfile text that makes Ollama run the GGUF file as the chapter runs the model.

    TEMPLATE is the prompt style's prompt for an entry whose instruction is Ollama's prompt,
    followed by the response header; a prompt that holds an instruction, the style's input
    separator and an input (`export_hf.user_message`) fills it with the entry's prompt with that
    input, as a comment in the Modelfile says. The finetuning script asks without the
    header, and the finetuned model writes it first; asking with it gives the same answer
    tokens, and Ollama then shows the answer without the header, as the script's
    extract_response does. After {{ .Response }} (cut away when asking) earlier turns of a chat
    are whole training examples, each ending in <|endoftext|>. Generation stops at
    <|endoftext|> or where the model starts a new instruction; decoding is greedy.
    """
    parts = prompt_parts(prompt_style)
    template = (parts["prefix"] + "{{ .Prompt }}" + parts["tail"] + parts["header"]
                + "{{ .Response }}<|endoftext|>")
    fixed = "".join(parts.values())
    if "{{" in fixed or '"""' in fixed:
        raise ValueError(f"prompt style {prompt_style.name!r} writes text that a Modelfile "
                         "cannot quote")
    new_instruction = parts["prefix"].strip().splitlines()[-1]  # "### Instruction:", "<|user|>"
    return "\n".join([
        f"# The finetuned model, asked in its {prompt_style.name} prompt style",
        f"# An input goes after the instruction in the prompt, separated by "
        f"{json.dumps(parts['middle'])}",
        f"FROM ./{gguf_name}",
        f'TEMPLATE """{template}"""',
        'PARAMETER stop "<|endoftext|>"',
        f'PARAMETER stop "{new_instruction}"',
        f"PARAMETER num_ctx {context_length}",
        "PARAMETER temperature 0",
        f"PARAMETER num_predict {ANSWER_TOKENS}",
        "",
    ])


#####################################
# Writing the folder
#####################################


def gguf_filename(model_path, outtype):
    """gpt2-medium355M-sft-standalone.pth, f16 -> gpt2-medium355M-sft-standalone-f16.gguf."""
    return f"{os.path.splitext(os.path.basename(model_path))[0]}-{outtype}.gguf"


def write_gguf(path, model, info, prompt_style, encoding, outtype):
    """Write the GGUF file of `model` at `path`; return the names of the matrices that had to
    be stored f16 instead of q8_0."""
    config = info["config"]
    file_type, qtype = OUTTYPES[outtype]
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[ARCH])
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(os.path.splitext(os.path.basename(path))[0])
    writer.add_context_length(config["context_length"])
    writer.add_embedding_length(config["emb_dim"])
    writer.add_block_count(config["n_layers"])
    writer.add_feed_forward_length(4 * config["emb_dim"])  # GPTModel's feedforward
    writer.add_head_count(config["n_heads"])
    writer.add_layer_norm_eps(model.final_norm.eps)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    tokens, token_types, merges = tokenizer_fields(encoding)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges(merges)
    for add_id in (writer.add_bos_token_id, writer.add_eos_token_id, writer.add_pad_token_id):
        add_id(END_OF_TEXT)  # the chapter pads with <|endoftext|> too
    writer.add_add_bos_token(False)
    writer.add_chat_template(chat_template(prompt_style))

    tensors = gguf_tensors(model)
    types = {name: stored_type(name, array, qtype) for name, array in tensors.items()}
    check_storable(tensors, types, outtype)
    for name, array in tensors.items():
        writer.add_tensor_info(name, array.shape, array.dtype, stored_nbytes(array, types[name]),
                               raw_dtype=types[name])
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        total = sum(stored_nbytes(array, types[name]) for name, array in tensors.items())
        with tqdm(total=total, desc="Writing", unit="B", unit_scale=True) as progress:
            for name, array in tensors.items():  # converted one at a time: no second model
                data = gguf.quants.quantize(array, types[name])
                writer.write_tensor_data(data)
                progress.update(data.nbytes)
    finally:
        writer.close()
    f16 = gguf.GGMLQuantizationType.F16
    return [name for name, kind in types.items() if kind == f16 and qtype != f16]


def write_folder(folder, model_path, model, info, prompt_style, encoding, outtype):
    """Write the GGUF file and the Modelfile into the existing folder `folder`; return the GGUF
    file's name and the matrices kept f16."""
    name = gguf_filename(model_path, outtype)
    kept_f16 = write_gguf(os.path.join(folder, name), model, info, prompt_style, encoding,
                          outtype)
    with open(os.path.join(folder, "Modelfile"), "w", encoding="utf-8") as f:
        f.write(modelfile(name, prompt_style, info["config"]["context_length"]))
    return name, kept_f16


def export(model_path, out_dir, outtype="f16", lora_alpha=None):
    """Export the finetuned model at `model_path` to the folder `out_dir` (new or empty), whole
    or not at all. Returns (GGUF file name, prompt style name, tied head, matrices kept f16)."""
    check_out_dir(out_dir)
    encoding = gpt2_tokenizer()  # the vocabulary's one source: the tokenizer the chapter uses
    model, info, prompt_style = load_for_export(model_path, encoding, lora_alpha)
    name, kept_f16 = write_new_folder(out_dir, lambda folder: write_folder(
        folder, model_path, model, info, prompt_style, encoding, outtype))
    return name, prompt_style.name, is_tied(model), kept_f16


def bash_quoted(text):
    """`text` as one bash word in $'...' quotes, its newlines written as \\n."""
    escaped = text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n")
    return f"$'{escaped}'"


def print_summary(out_dir, outtype, result):
    """Say what was written and the commands that run it."""
    name, style_name, tied, kept_f16 = result
    path = os.path.join(out_dir, name)
    size_mb = os.path.getsize(path) / 1e6
    head = "tied to the token embedding" if tied else "its own output.weight"
    print(f"Wrote {out_dir}: {name} ({outtype}, {size_mb:.1f} MB), Modelfile")
    if kept_f16:
        print(f"{len(kept_f16)} matrices are stored f16: their rows are not a multiple of "
              "q8_0's 32 values")
    print(f"Prompt style: {style_name} (in the Modelfile's TEMPLATE and the GGUF chat "
          f"template); output head: {head}")
    print("Run it with Ollama:")
    print(f"    ollama create my-gpt2-sft -f {os.path.join(out_dir, 'Modelfile')}")
    print('    ollama run my-gpt2-sft "Name three primary colors."')
    asked = user_message(PROMPT_STYLES[style_name], *EXAMPLE_WITH_INPUT)
    print(f"    ollama run my-gpt2-sft {bash_quoted(asked)}   # with an input")
    print("or with llama.cpp (greedy, as the chapter generates):")
    print(f"    llama-server -m {path} --temp 0    # chat at http://127.0.0.1:8080")
    print(f"    llama-cli -m {path} --temp 0       # chat in the terminal")


def build_parser():
    """The command line: the .pth to export, the folder to create, the tensor type."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_export_arguments(parser, "folder to create for the GGUF file and the Modelfile (new or "
                                 "empty)")
    parser.add_argument("--outtype", default="f16",
                        help="how the weight matrices are stored: f32 (exact), f16 (the "
                             "default) or q8_0 (8 bits)")
    return parser


def export_checked(args):
    """The export of the command line's arguments, checked first."""
    if args.outtype not in OUTTYPES:
        raise DataError(f"--outtype {args.outtype}: choose one of {', '.join(OUTTYPES)}")
    check_export_arguments(args)
    return export(args.model_path, args.out_dir, args.outtype, args.lora_alpha)


def main(argv=None):
    """Export; or end with one line: exit 2 on bad input, 1 when writing fails, 128 + the
    signal when interrupted (130 for Ctrl-C)."""
    args = build_parser().parse_args(argv)
    result = run_export(lambda: export_checked(args), args.out_dir)
    print_summary(args.out_dir, args.outtype, result)


if __name__ == "__main__":
    main()
