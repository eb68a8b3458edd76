"""Score the finetuned model's test set responses with a local LLM judge (section 7.8).

    ollama serve &  ollama pull llama3          # the judge, as in the chapter
    python ollama_evaluate.py --file_path instruction-data-with-response-standalone.json

The judge sees the chapter's prompt for each entry (instruction, input, correct output, the
model's response) and answers with a number from 0 to 100; the script prints how many replies
were scores and their average, median, spread, a bootstrap interval and the lowest-scored
entries. `--prompt rubric` asks with a rubric instead: a 1-5 scale with each score's criterion
spelled out, the correct output defining a 5, and brief feedback before a final "Score: N"
line. `--backend openai` talks to any OpenAI-compatible server (llama.cpp server, vLLM, LM
Studio) instead of Ollama. `--url` takes a chat endpoint or a server address as OLLAMA_HOST is
written (127.0.0.1:11434, http://judge-host:11434); an address without a path gets the
backend's API path. Without --url, Ollama is found where OLLAMA_HOST says, as its own clients
find it. A warning counts the prompts that may be longer than the judge's context (num_ctx 2048
tokens, estimated from their length), which Ollama cuts without saying so. Each reply must be
complete within --timeout seconds and is capped at --max_reply_tokens tokens, so that a judge
that rambles or a server that never finishes cannot stall the run.

Every complete reply is saved as it arrives, one JSON line naming the judge (backend/model),
the SHA-256 of the exact prompt sent and the entry (index, instruction), in
<input>-scores.jsonl beside the input (or --output); a reply cut short is not saved. A rerun
reuses a saved score only when both judge and prompt match: an interrupted run (Ctrl-C, a full
disk, a judge gone away) continues where it stopped, while new responses (a new finetuning run),
another judge (--model phi3) or the other prompt are asked again. Lines are only ever appended,
so earlier judges' scores stay on disk, and the summary counts only the current judge's scores
for the current responses and prompt. A rerun whose scores are all saved prints its summary
without asking, or even checking, the judge. `--write_scores` writes a copy of the responses
with each entry's score and the judge's reply beside its response.

Compare runs by giving several files (each with its own score file, or all in one --output)
or several keys of one file (the book's model-evaluation data: --json_key "model 1 response"
"model 2 response"). Each is scored by the same judge, and a table ends the output: the number
of scores and average per file or key, and for each one after the first its paired difference
to the first over the entries both scored (matched by instruction, input and output), with a
95% bootstrap interval.

`--pairwise` compares two files' (or two keys') responses side by side instead: the judge says
which is better, [[A]], [[B]] or [[C]] for a tie, with each entry asked in both orders, and the
summary gives wins, losses, ties and the win rate of A over B (kit/pairwise.py).
`--agreement X Y` prints how far two judges' scores agree (kit/agreement.py).
"""

from functools import partial

from kit import agreement, pairwise
from kit.files import fail, save_json
from kit.judge_cli import asker, build_parser, check_flags, judge_url, require_judge
from kit.judge_client import OLLAMA_URL, judge_name, query_model
from kit.judge_files import check_outputs, load_runs, open_stores, scored_copy, write_failure
from kit.judge_prompts import JUDGE_PROMPTS, entry_prompts, warn_long_prompts
from kit.judge_store import (
    ignore_stop_signals,
    out_of_scale,
    reported_failures,
    saved_replies,
    score_prompts,
    unanswered,
)
from kit.judge_summary import comparison_lines, plot_scores, preload, report_run

#####################################
# 7.8 Evaluating the finetuned LLM: checking the judge runs
#####################################


def check_judge_when_needed(args, url, runs, prompts_per_run, stores, judge, style):
    """Check that the judge runs and has the model (check_judge: one line, exit 1, when not)
    only when some prompt has no saved reply: a rerun whose scores are all saved prints its
    summary without a judge running."""
    if any(unanswered(prompts, stores[run.store_path], judge, style)
           for run, prompts in zip(runs, prompts_per_run, strict=True)):
        require_judge(url, args.model, args.backend)
        preload("numpy")


#####################################
# 7.8 Evaluating the finetuned LLM: querying the judge
#####################################


def score_run(prompts, entries, store, judge, ask, workers, backend, style):
    """Ask the judge about one run's prompts, saying first what is reused (when anything is)
    and which saved scores lie outside the scale; return the score per entry. When no answer
    comes the message says that a rerun continues; other judge errors get their own advice."""
    if backend == "ollama":
        warn_long_prompts(prompts)
    ignored = out_of_scale(prompts, store, judge, style)
    if ignored:
        print(f"Ignoring {ignored} saved score{'s' if ignored > 1 else ''} outside the "
              f"{style.low}-{style.high} scale in {store.path}; asking the judge again")
    asked = unanswered(prompts, store, judge, style)
    reused = sum(p is not None for p in prompts) - asked
    if reused:
        print(f"Reusing saved scores for {reused} of {len(prompts)} entries from "
              f"{store.path}; asking the judge about {asked}")
    so_far = f"The scores so far are in {store.path}; run again to continue."
    with reported_failures(so_far, lambda exc: write_failure(store.path, exc, [store.path])):
        return score_prompts(prompts, entries, judge, ask, workers, store, style)


#####################################
# 7.8 Evaluating the finetuned LLM: scoring the responses
#####################################


def generate_model_scores(json_data, json_key, model="llama3", url=OLLAMA_URL, workers=1,
                          store=None, backend="ollama", prompt="score", **query_options):
    """Score every entry's `json_key` response with the judge and return the scores, in entry
    order (the book's function). Replies that are not scores are reported and left out.
    `prompt` names one of JUDGE_PROMPTS: "score" (the chapter's 0-100 prompt) or "rubric"
    (1-5); `store` (a ScoreStore) reuses and keeps this judge's replies; `query_options` go to
    query_model (timeout, retries, backoff, max_tokens: the prompt's cap unless given)."""
    style = JUDGE_PROMPTS[prompt]
    ask = partial(query_model, model=model, url=url, backend=backend,
                  **{"max_tokens": style.max_tokens, **query_options})
    scores = score_prompts(entry_prompts(json_data, json_key, style), json_data,
                           judge_name(backend, model), ask, workers, store, style)
    return [score for score in scores if score is not None]


#####################################
# The command line
#####################################


def write_scored_copy(args, runs, prompts_per_run, scores_per_run, stores, judge, style):
    """--write_scores: the responses with each run's score and the judge's reply beside them."""
    replies_per_run = [saved_replies(prompts, stores[run.store_path], judge, style)
                       for run, prompts in zip(runs, prompts_per_run, strict=True)]
    try:
        save_json(scored_copy(runs[0].entries, runs, scores_per_run, replies_per_run),
                  args.write_scores)
    except OSError as exc:
        fail(write_failure(args.write_scores, exc, list(stores)), code=1)
    print(f"Responses with their scores and the judge's replies saved as {args.write_scores}")


def main(argv=None):
    """Check flags, files and the judge, score every entry, print the summary (and with several
    files or keys the comparison). Exit 2 on bad input, 1 when the judge is down or fails, or
    when most of its replies hold no score. The judge is checked only when there is something
    to ask it: a rerun whose scores are all saved prints its summary without a judge running."""
    args = build_parser(__doc__).parse_args(argv)
    check_flags(args)
    if args.agreement is not None:
        return agreement.run(args.agreement, args.plot)
    if args.pairwise:
        return pairwise.run(args)
    url = judge_url(args)
    style = JUDGE_PROMPTS[args.prompt]
    runs = load_runs(args)
    check_outputs(args, runs)
    stores = open_stores(args, runs)

    judge = judge_name(args.backend, args.model)
    prompts_per_run = [entry_prompts(run.entries, run.key, style) for run in runs]
    check_judge_when_needed(args, url, runs, prompts_per_run, stores, judge, style)

    ask = asker(args, url, style.max_tokens)
    scores_per_run = []
    warned = False
    for run, prompts in zip(runs, prompts_per_run, strict=True):
        if len(runs) > 1:
            print(f"--- {run.label} ---")
        store = stores[run.store_path]
        scores = score_run(prompts, run.entries, store, judge, ask, args.workers, args.backend,
                           style)
        warned |= report_run(run, prompts, scores, store.path, style)
        scores_per_run.append(scores)
    if len(runs) > 1:
        header = "Key" if len(args.file_path) == 1 else (
            "File" if runs[0].label in args.file_path else "Run")
        print("\n".join(comparison_lines(header, runs, scores_per_run, style)))
    if args.write_scores:
        write_scored_copy(args, runs, prompts_per_run, scores_per_run, stores, judge, style)
    labeled = [(run.label if len(runs) > 1 else None, [s for s in scores if s is not None])
               for run, scores in zip(runs, scores_per_run, strict=True)]
    if args.plot and any(scores for _, scores in labeled):
        try:
            plot_scores(labeled, args.plot, style)
        except OSError as exc:
            fail(write_failure(args.plot, exc, list(stores)), code=1)
    if warned:
        raise SystemExit(1)


if __name__ == "__main__":
    try:
        main()
    finally:
        ignore_stop_signals()
