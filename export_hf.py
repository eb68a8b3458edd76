"""Export a finetuned model of this repo as a Hugging Face folder: GPT2LMHeadModel + tokenizer.

    python export_hf.py gpt2-medium355M-sft-standalone.pth gpt2-medium-sft-hf

The folder holds config.json, model.safetensors and generation_config.json for
`transformers.GPT2LMHeadModel`, and vocab.json, merges.txt and tokenizer_config.json for
`transformers.AutoTokenizer`, whose chat template writes the run's own prompt (Alpaca or Phi-3).
A model saved with unmerged LoRA layers is merged first (`--lora_alpha` gives their alpha when
the JSON beside the weights, which records it, is gone). The logits are those of the `.pth`.

The chat template takes one user message, whose `content` is the entry's instruction and whose
optional `input` key is the entry's input; an assistant message after it is the response:

    [{"role": "user", "content": "Rewrite the sentence.", "input": "The cake was baked by me."}]

Tools that send only `role` and `content` (pipelines, servers) give the input in `content`,
after the instruction and the prompt style's input separator, which renders the same text:

    [{"role": "user", "content": "Rewrite the sentence.\\n\\n### Input:\\nThe cake was baked."}]

(Phi-3's separator is a newline.) With `add_generation_prompt=True` the text is the prompt
style's `format_input(entry)` followed by the response header that training put before each
output ("\\n\\n### Response:\\n" for Alpaca, "\\n<|assistant|>:\\n" for Phi-3), so the model's
first new token begins the answer. A user message followed by an assistant message renders the
whole training text, ending in <|endoftext|>: it tokenizes to the ids that finetuning trained
on.

Generated with generation_config.json (greedy, at most 256 new tokens, ending at
<|endoftext|>), the answer equals the one the finetuning script saves for the same entry (up to
the spaces it strips at the ends) when the model, asked the script's prompt, writes the
response header itself before its answer (a finetuned model does; the random test-mode model
does not), the weights compute in float32, and the answer ends before the script's 256 new
tokens, header included, run out.
"""

import argparse
import json
import os

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from tqdm import tqdm

from gpt_download import END_OF_TEXT, gpt2_tokenizer
from kit.export_folder import (
    add_export_arguments,
    check_export_arguments,
    check_out_dir,
    current_umask,
    load_for_export,
    run_export,
    write_new_folder,
)
from kit.files import save_json

FILES = ("config.json", "model.safetensors", "generation_config.json", "vocab.json",
         "merges.txt", "tokenizer_config.json")
ANSWER_TOKENS = 256  # the chapter's answer length (the default of --max_new_tokens)
INSTRUCTION_MARK = "\x00instruction\x00"  # stand-ins that no prompt style writes itself
INPUT_MARK = "\x00input\x00"


#####################################
# The tokenizer: GPT-2's byte-level BPE as vocab.json and merges.txt
#####################################


def bytes_to_unicode():
    """GPT-2's table from each byte to a printable character, the alphabet of vocab.json.

    Printable Latin-1 bytes stand for themselves; the others (control bytes, space, ...) are
    given the characters from U+0100 on, in byte order.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    table, shifted = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + shifted)
            shifted += 1
    return table


def bpe_vocab_and_merges(encoding):
    """Return (vocab, merges) of a byte-level BPE tiktoken Encoding in Hugging Face's layout.

    vocab maps each token, its bytes written with `bytes_to_unicode`, to its id (the special
    tokens as they are); merges lists the pairs "left right" in the order BPE applies them. A
    token's rank is the order in which it was merged, so its pair is what BPE makes of its bytes
    with only the lower-ranked merges.
    """
    table = bytes_to_unicode()
    ranks = {token: encoding.encode_single_token(token)
             for token in encoding.token_byte_values()}

    def spell(token):
        return "".join(table[byte] for byte in token)

    vocab = {spell(token): rank for token, rank in sorted(ranks.items(), key=lambda t: t[1])}
    for special in sorted(encoding.special_tokens_set):
        vocab[special] = encoding.encode_single_token(special)
    merges = [" ".join(spell(part) for part in _merged_pair(token, rank, ranks))
              for token, rank in sorted(ranks.items(), key=lambda t: t[1]) if len(token) > 1]
    return vocab, merges


def _merged_pair(token, rank, ranks):
    """The two tokens that merge into `token` (of rank `rank`): its bytes merged by BPE, always
    the lowest-ranked adjacent pair first, with the merges ranked below `rank` only."""
    parts = [bytes([byte]) for byte in token]
    while True:
        pairs = [(ranks.get(left + right, rank), i)
                 for i, (left, right) in enumerate(zip(parts, parts[1:], strict=False))]
        best_rank, i = min(pairs)
        if best_rank >= rank:
            break
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    if len(parts) != 2:
        raise ValueError(f"token {token!r} (rank {rank}) is not one merge of two lower tokens")
    return parts


#####################################
# The prompt's fixed text, and the chat template in Jinja
#####################################


def prompt_parts(prompt_style):
    """The fixed text that `prompt_style` writes around an entry: {"prefix", "middle", "tail",
    "header"}.

    format_input(entry) is prefix + instruction + tail without an input, and prefix +
    instruction + middle + input + tail with one; header is the response header that training
    put after the prompt. Read off the style's own `format_input` and `format_response`, so the
    exported templates cannot drift from the prompts the model learned.
    """
    plain = prompt_style.format_input({"instruction": INSTRUCTION_MARK, "input": ""})
    full = prompt_style.format_input({"instruction": INSTRUCTION_MARK, "input": INPUT_MARK})
    prefix, tail = plain.split(INSTRUCTION_MARK)
    middle = full.removeprefix(prefix + INSTRUCTION_MARK).removesuffix(INPUT_MARK + tail)
    if full != prefix + INSTRUCTION_MARK + middle + INPUT_MARK + tail:
        raise ValueError(f"prompt style {prompt_style.name!r} does not put the input after the "
                         "instruction")
    return {"prefix": prefix, "middle": middle, "tail": tail,
            "header": prompt_style.format_response({"output": ""})}


def user_message(prompt_style, instruction, input_text=""):
    """The text of a chat message that asks `instruction` about `input_text`: the instruction,
    then, when there is an input, the prompt style's own separator ("\\n\\n### Input:\\n" for
    Alpaca, a newline for Phi-3) and the input. The exported templates put a message's text
    where the instruction goes, so this fills them with the style's prompt for the entry."""
    if not input_text:
        return instruction
    return instruction + prompt_parts(prompt_style)["middle"] + input_text


def chat_template(prompt_style):
    """A Jinja chat template that renders a conversation as `prompt_style` formats an entry
    (see the module's docstring for the messages it takes)."""
    text = {name: json.dumps(value) for name, value in prompt_parts(prompt_style).items()}
    return (
        "{%- if messages | length not in [1, 2] or messages[0]['role'] != 'user'"
        " or (messages | length == 2 and messages[1]['role'] != 'assistant') -%}"
        "{{- raise_exception('This model takes one user message (content: the instruction,"
        " optional input: the input), optionally followed by one assistant message') -}}"
        "{%- endif -%}"
        f"{{{{- {text['prefix']} -}}}}{{{{- messages[0]['content'] -}}}}"
        "{%- if messages[0]['input'] is defined and messages[0]['input'] -%}"
        f"{{{{- {text['middle']} -}}}}{{{{- messages[0]['input'] -}}}}"
        "{%- endif -%}"
        f"{{{{- {text['tail']} -}}}}"
        "{%- if messages | length == 2 -%}"
        f"{{{{- {text['header']} -}}}}{{{{- messages[1]['content'] -}}}}{{{{- eos_token -}}}}"
        "{%- elif add_generation_prompt -%}"
        f"{{{{- {text['header']} -}}}}"
        "{%- endif -%}"
    )


def tokenizer_config(prompt_style, context_length, end_token):
    """tokenizer_config.json: GPT-2's tokenizer, <|endoftext|> as every special token (the
    chapter pads with it too), and the run's chat template."""
    return {
        "tokenizer_class": "GPT2Tokenizer",
        "bos_token": end_token, "eos_token": end_token, "unk_token": end_token,
        "pad_token": end_token,
        "add_bos_token": False, "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,  # decode to the exact text, as tiktoken does
        "errors": "replace",
        "model_max_length": context_length,
        "added_tokens_decoder": {str(END_OF_TEXT): {
            "content": end_token, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": True}},
        "chat_template": chat_template(prompt_style),
    }


#####################################
# The model: GPTModel's weights under GPT-2's names
#####################################


def is_tied(model):
    """True when the output head equals the token embedding, as in OpenAI's GPT-2 before
    finetuning; finetuning changes the two apart."""
    return torch.equal(model.out_head.weight, model.tok_emb.weight)


def hf_state_dict(model):
    """GPTModel's weights as GPT2LMHeadModel names and lays them out.

    The reverse of `previous_chapters.load_weights_into_gpt`: Hugging Face's Conv1D holds
    (in, out) where nn.Linear holds (out, in), and the query, key and value projections are one
    fused `c_attn`. GPT-2 always has query/key/value biases, so a model without them gets zeros,
    which add nothing. `lm_head.weight` is written only when the head is not the embedding.
    """
    def linear(prefix, layer):
        return {f"{prefix}.weight": layer.weight.T, f"{prefix}.bias": layer.bias}

    def norm(prefix, layer):
        return {f"{prefix}.weight": layer.scale, f"{prefix}.bias": layer.shift}

    tensors = {"wte.weight": model.tok_emb.weight, "wpe.weight": model.pos_emb.weight}
    for i, block in enumerate(model.trf_blocks):
        att, ff = block.att, block.ff
        projections = (att.W_query, att.W_key, att.W_value)
        biases = [torch.zeros(p.out_features) if p.bias is None else p.bias for p in projections]
        tensors.update({
            **norm(f"h.{i}.ln_1", block.norm1),
            f"h.{i}.attn.c_attn.weight": torch.cat([p.weight.T for p in projections], dim=1),
            f"h.{i}.attn.c_attn.bias": torch.cat(biases),
            **linear(f"h.{i}.attn.c_proj", att.out_proj),
            **norm(f"h.{i}.ln_2", block.norm2),
            **linear(f"h.{i}.mlp.c_fc", ff.layers[0]),
            **linear(f"h.{i}.mlp.c_proj", ff.layers[2]),
        })
    tensors.update(norm("ln_f", model.final_norm))
    tensors = {f"transformer.{name}": tensor for name, tensor in tensors.items()}
    if not is_tied(model):
        tensors["lm_head.weight"] = model.out_head.weight
    return {name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}


def hf_config(config, tied):
    """config.json of a GPT2LMHeadModel with GPTModel `config`'s shape.

    "gelu_new" is the tanh approximation of GELU that GPTModel uses; dropout is the run's.
    """
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config["vocab_size"],
        "n_positions": config["context_length"],
        "n_ctx": config["context_length"],  # OpenAI's configs carry both; llama.cpp reads n_ctx
        "n_embd": config["emb_dim"],
        "n_layer": config["n_layers"],
        "n_head": config["n_heads"],
        "n_inner": None,  # 4 * n_embd, as GPTModel's feedforward
        "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5,
        "resid_pdrop": config["drop_rate"],
        "embd_pdrop": config["drop_rate"],
        "attn_pdrop": config["drop_rate"],
        "initializer_range": 0.02,
        "bos_token_id": END_OF_TEXT,
        "eos_token_id": END_OF_TEXT,
        "tie_word_embeddings": tied,
        "use_cache": True,
    }


def generation_config(max_new_tokens=ANSWER_TOKENS):
    """generation_config.json: greedy decoding up to the chapter's answer length, stopping at
    (and padding with) <|endoftext|>, as the chapter generates the test set's answers."""
    return {"bos_token_id": END_OF_TEXT, "eos_token_id": END_OF_TEXT,
            "pad_token_id": END_OF_TEXT, "do_sample": False, "num_beams": 1,
            "max_new_tokens": max_new_tokens}


#####################################
# The Hugging Face folder
#####################################


def write_folder(folder, model, info, prompt_style, encoding):
    """Write the Hugging Face files of `model` into the existing folder `folder`."""
    config = info["config"]
    tied = is_tied(model)
    end_token = encoding.decode_single_token_bytes(END_OF_TEXT).decode("utf-8")
    with tqdm(total=len(FILES), desc="Writing", unit="file") as progress:
        def done(name):
            progress.set_postfix_str(name)
            progress.update()

        save_json(hf_config(config, tied), os.path.join(folder, "config.json"))
        done("config.json")
        weights_path = os.path.join(folder, "model.safetensors")
        save_weights(hf_state_dict(model), weights_path)
        done("model.safetensors")
        save_json(generation_config(), os.path.join(folder, "generation_config.json"))
        done("generation_config.json")
        vocab, merges = bpe_vocab_and_merges(encoding)
        with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
            json.dump(vocab, f, ensure_ascii=False)
        done("vocab.json")
        with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
        done("merges.txt")
        save_json(tokenizer_config(prompt_style, config["context_length"], end_token),
                  os.path.join(folder, "tokenizer_config.json"))
        done("tokenizer_config.json")


def save_weights(tensors, path):
    """Write `tensors` as safetensors at `path`, readable as other files are; a failed write
    (safetensors reports a full disk as its own error) is an OSError."""
    try:
        save_file(tensors, path, metadata={"format": "pt"})
    except SafetensorError as exc:
        raise OSError(str(exc).removeprefix("Error while serializing: ")) from None
    os.chmod(path, 0o666 & ~current_umask())  # safetensors writes it private


def export(model_path, out_dir, lora_alpha=None):
    """Export the finetuned model at `model_path` to the Hugging Face folder `out_dir` (new or
    empty), whole or not at all. Returns the prompt style's name and whether the head is tied.
    """
    check_out_dir(out_dir)
    encoding = gpt2_tokenizer()  # the vocabulary's one source: the tokenizer the chapter uses
    model, info, prompt_style = load_for_export(model_path, encoding, lora_alpha)
    write_new_folder(out_dir, lambda folder: write_folder(folder, model, info, prompt_style,
                                                          encoding))
    return prompt_style.name, is_tied(model)


def print_summary(out_dir, style_name, tied):
    """Say what was written and how to load it."""
    head = "tied to the token embedding" if tied else "its own lm_head.weight"
    print(f"Wrote {out_dir}: {', '.join(FILES)}")
    print(f"Prompt style: {style_name} (in the chat template); output head: {head}")
    print("Load it with:")
    print("    from transformers import AutoTokenizer, GPT2LMHeadModel")
    print(f"    tokenizer = AutoTokenizer.from_pretrained({out_dir!r})")
    print(f"    model = GPT2LMHeadModel.from_pretrained({out_dir!r})")
    print('    messages = [{"role": "user", "content": "INSTRUCTION", '
          '"input": "INPUT (optional)"}]')
    print("    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, "
          "return_tensors=\"pt\", return_dict=True)")
    print("    answer = model.generate(**ids)[0, ids[\"input_ids\"].shape[1]:]")
    print("    print(tokenizer.decode(answer, skip_special_tokens=True))")


def build_parser():
    """The command line: the .pth to export and the folder to create."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_export_arguments(parser, "folder to create for the Hugging Face files (new or empty)")
    return parser


def export_checked(args):
    """The export of the command line's arguments, checked first."""
    check_export_arguments(args)
    return export(args.model_path, args.out_dir, args.lora_alpha)


def main(argv=None):
    """Export; or end with one line: exit 2 on bad input, 1 when writing fails, 130 when
    interrupted."""
    args = build_parser().parse_args(argv)
    style_name, tied = run_export(lambda: export_checked(args), args.out_dir)
    print_summary(args.out_dir, style_name, tied)


if __name__ == "__main__":
    main()
