"""bimode's commands, one module each (TRL's layout: `make_parser(prog)` and `main(*configs)`).

A command's configuration is its dataclass(es): `make_parser` returns a parser over them (flags, `--config
RECIPE.yaml`, `--help` from the fields' help) and `main` receives the parsed instances.
"""

from __future__ import annotations

# command words -> (module under bimode.commands, one-line help); "eval compare" runs before "eval"
COMMANDS: dict[tuple[str, ...], tuple[str, str]] = {
    ("tiny",): ("tiny", "build the embedded tiny VLM (SigLIP + Qwen3, LLaVA layout) offline"),
    ("compose",): ("compose", "a LLaVA-style VLM from a vision encoder and a language model (R-4B's architecture)"),
    ("data", "synth"): ("data_synth", "generate the synthetic multimodal reasoning world"),
    ("data", "convert"): ("data_convert", "convert LLaVA / ShareGPT / QA files into records"),
    ("chat",): ("chat", "chat with a model: streamed, reasoning shown apart from the answer"),
    ("serve",): ("serve", "OpenAI-compatible server (/v1/chat/completions, /v1/models, /health) and a chat page at /"),
    ("eval",): ("eval", "evaluate a model in each mode, local or at an endpoint"),
    ("eval", "compare"): ("eval_compare", "two eval runs side by side (say, before and after BPO)"),
    ("eval", "calibrate"): ("eval_calibrate", "pick auto mode's think threshold from an eval run"),
    ("eval", "merge"): ("eval_merge", "combine the shard folders of a `bimode eval --num_shards K` run"),
    ("curate",): ("curate", "label samples thinking / non-thinking (R-4B's heuristics) and build targets"),
    ("curate", "merge"): ("curate_merge", "combine the shard folders of a `bimode curate --num_shards K` run"),
    ("anneal",): ("anneal", "bi-mode annealing on TRL's SFTTrainer: --config RECIPE.yaml [--field value ...]"),
    ("bpo",): ("bpo", "Bi-mode Policy Optimization on TRL's GRPOTrainer: --config RECIPE.yaml [--field value ...]"),
    ("export",): ("export", "merge a LoRA adapter folder into its base: a plain checkpoint"),
    ("demo",): ("demo", "run the recipe on the embedded default"),
    ("configs",): ("configs", "list the recipes and launch configs bimode ships, or print one's path"),
    ("plan",): ("plan", "per-GPU memory of an anneal or BPO run, and whether it fits, before it starts"),
}


def find_command(argv: list[str]) -> tuple[tuple[str, ...] | None, list[str]]:
    """The longest command named at the start of argv, and the arguments after it."""
    for words in sorted(COMMANDS, key=len, reverse=True):
        if tuple(argv[:len(words)]) == words:
            return words, argv[len(words):]
    return None, argv


def help_text(*words: str) -> str:
    return COMMANDS[words][1]
