"""bimode's token controls inside vLLM: a vLLM (v1) logits processor, for `LLM(...)` and `vllm serve`.

What the transformers engine does between tokens and vLLM does not do by itself:
- **media placeholders are never sampled**: image / video placeholder and marker ids (the same set the
  transformers engine bans, `engine.media_token_ids`) get -inf in every row. An untrained model samples them,
  and a placeholder in a completion breaks the model's image-token count when a trainer feeds it back.
- **auto mode's decision**: a request whose prompt ends with `<think>` (auto mode) draws its first token from
  the decision tokens only (`modes.mode_decision`: a single newline opens the thinking block, two or more
  newlines or `</think>` close it), with the model's own probabilities among them, as the transformers
  engine's `constrain_decision`.
- **the thinking budget**, as the transformers engine counts it: a request with
  `{"bimode_max_thinking_tokens": N}` whose prompt ends inside an open think block (auto or think mode) may
  generate N tokens in the block; if it has not written `</think>` by then, the closing text
  (`bimode_budget_closing`, default types.BUDGET_CLOSING) and `</think>\n\n` are forced, then it goes on.
A request turns the first two off with `extra_args` (`vllm_xargs` through the server):
`{"bimode_ban_media": false}`, `{"bimode_constrain_decision": false}`.

Why not vLLM's own `thinking_token_budget`: vLLM 0.31 detects the model's own end of thinking by the whole
forced string (`reasoning_config.reasoning_end_str`). With a closing sentence before `</think>`, a model
that closes its block by itself is not seen to, and still gets the closing text forced after its `</think>`.
With `reasoning_end_str="</think>"` it works, but then no closing sentence is written (docs/vllm.md).
Loaded in vLLM's worker process: `LLM(..., logits_processors=[BimodeControls])`, or
`vllm serve ... --logits-processors bimode.generation.vllm_controls:BimodeControls`.
This module imports vLLM: import it only where vLLM is installed (`make setup-vllm`).
"""

from __future__ import annotations

import torch

from bimode.compat.vllm_api import logits_processor_interface, tokenizer_of
from bimode.errors import UsageError
from bimode.generation.engine import media_token_ids
from bimode.generation.types import BUDGET_CLOSING
from bimode.modes import THINK_CLOSE, mode_decision

LogitsProcessor, BatchUpdate, MoveDirectionality = logits_processor_interface()  # imports vLLM

CONSTRAIN_DECISION_ARG = "bimode_constrain_decision"
BAN_MEDIA_ARG = "bimode_ban_media"
BUDGET_ARG = "bimode_max_thinking_tokens"
CLOSING_ARG = "bimode_budget_closing"


def control_token_ids(tokenizer, hf_config) -> tuple[list[int], list[int], int]:
    """(banned media ids, decision ids, `<think>` id) for a tokenizer and the model's config."""
    decision = mode_decision(tokenizer)
    banned = media_token_ids(None, tokenizer, hf_config)
    return banned, sorted(decision.think_ids | decision.no_think_ids), decision.think_open_id


class _Budget:
    """One request's thinking budget, replayed from its output ids as the engine counts (rows.advance)."""

    def __init__(self, budget: int, closing: list[int], close_id: int, output: list[int]):
        self.budget, self.closing, self.close_id, self.output = budget, closing, close_id, output
        self.seen = 0  # output ids already counted
        self.thinking = 0  # generated tokens in the open block, forced ones not counted
        self.closed = False
        self.force_start: int | None = None  # output position where the closing text starts

    def next_forced(self) -> int | None:
        """The token to force at the next position, or None (the model samples)."""
        output = self.output
        while self.seen < len(output) and output[self.seen] != -1:  # -1: async scheduling's placeholder
            token, position = output[self.seen], self.seen
            forced = self.force_start is not None and position < self.force_start + len(self.closing)
            if not self.closed and not forced:
                self.thinking += 1
            self.closed = self.closed or token == self.close_id
            self.seen += 1
        position = self.seen
        if self.force_start is None and not self.closed and self.thinking >= self.budget:
            self.force_start = position
        if self.force_start is not None and position < self.force_start + len(self.closing):
            return self.closing[position - self.force_start]
        return None

    @property
    def done(self) -> bool:
        return self.closed and (self.force_start is None or self.seen >= self.force_start + len(self.closing))


class BimodeControls(LogitsProcessor):
    """Bans media placeholders everywhere; auto-mode requests' first token is a mode decision; thinking budgets."""

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        model_config = vllm_config.model_config
        tokenizer = tokenizer_of(model_config)
        banned, decision, self.think_open_id = control_token_ids(tokenizer, model_config.hf_config)
        self.tokenizer = tokenizer
        self.think_close_id = tokenizer.convert_tokens_to_ids(THINK_CLOSE)
        self.closings: dict[str, list[int]] = {}  # closing text -> forced ids
        self.budgets: dict[int, _Budget] = {}  # batch index -> its budget
        self.banned = torch.tensor(banned, dtype=torch.long, device=device)
        self.decision = torch.tensor(decision, dtype=torch.long, device=device)
        self.first_token: dict[int, list[int]] = {}  # batch index -> its output ids (a live reference)
        self.unbanned: set[int] = set()  # batch indices that turned the media ban off

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        args = sampling_params.extra_args or {}
        for name in (CONSTRAIN_DECISION_ARG, BAN_MEDIA_ARG):
            if not isinstance(args.get(name, True), bool):
                raise UsageError(f"{name} must be a bool, got {args[name]!r}")
        budget = args.get(BUDGET_ARG)
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 0):
            raise UsageError(f"{BUDGET_ARG} must be an integer >= 0, got {budget!r}")
        if not isinstance(args.get(CLOSING_ARG, ""), str):
            raise UsageError(f"{CLOSING_ARG} must be a string, got {args[CLOSING_ARG]!r}")

    def _closing_ids(self, closing: str) -> list[int]:
        if closing not in self.closings:
            self.closings[closing] = self.tokenizer.encode(closing + THINK_CLOSE + "\n\n", add_special_tokens=False)
        return self.closings[closing]

    def _block_open(self, prompt_ids) -> bool:
        """The prompt ends inside a think block: its last `<think>` comes after its last `</think>`."""
        ids = list(prompt_ids or [])
        last_open = max((i for i, t in enumerate(ids) if t == self.think_open_id), default=-1)
        return last_open >= 0 and self.think_close_id not in ids[last_open:]

    def is_argmax_invariant(self) -> bool:
        return False  # both controls change the argmax

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if not batch_update:
            return
        for index in batch_update.removed:
            self.first_token.pop(index, None)
            self.unbanned.discard(index)
            self.budgets.pop(index, None)
        for index, params, prompt_ids, output_ids in batch_update.added:
            args = params.extra_args or {}
            if args.get(CONSTRAIN_DECISION_ARG, True) and prompt_ids and prompt_ids[-1] == self.think_open_id:
                self.first_token[index] = output_ids
            else:
                self.first_token.pop(index, None)
            if args.get(BAN_MEDIA_ARG, True):
                self.unbanned.discard(index)
            else:
                self.unbanned.add(index)
            self.budgets.pop(index, None)
            if args.get(BUDGET_ARG) is not None and self._block_open(prompt_ids):
                closing = self._closing_ids(args.get(CLOSING_ARG, BUDGET_CLOSING))
                self.budgets[index] = _Budget(args[BUDGET_ARG], closing, self.think_close_id, output_ids)
        for a, b, direction in batch_update.moved:
            first_a, first_b = self.first_token.pop(a, None), self.first_token.pop(b, None)
            if first_a is not None:
                self.first_token[b] = first_a
            if direction == MoveDirectionality.SWAP and first_b is not None:
                self.first_token[a] = first_b
            budget_a, budget_b = self.budgets.pop(a, None), self.budgets.pop(b, None)
            if budget_a is not None:
                self.budgets[b] = budget_a
            if direction == MoveDirectionality.SWAP and budget_b is not None:
                self.budgets[a] = budget_b
            unbanned_a, unbanned_b = a in self.unbanned, b in self.unbanned
            self.unbanned -= {a, b}
            if unbanned_a:
                self.unbanned.add(b)
            if direction == MoveDirectionality.SWAP and unbanned_b:
                self.unbanned.add(a)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if self.banned.numel():
            if not self.unbanned:
                logits.index_fill_(1, self.banned, float("-inf"))
            else:
                rows = [i for i in range(logits.shape[0]) if i not in self.unbanned]
                if rows:
                    rows_t = torch.tensor(rows, dtype=torch.long, device=logits.device)
                    logits[rows_t.unsqueeze(1), self.banned.unsqueeze(0)] = float("-inf")
        rows = [index for index, output in self.first_token.items() if not output and index < logits.shape[0]]
        if rows:
            rows_t = torch.tensor(rows, dtype=torch.long, device=logits.device)
            keep = logits[rows_t][:, self.decision]
            logits[rows_t] = float("-inf")
            logits[rows_t.unsqueeze(1), self.decision.unsqueeze(0)] = keep
        # requests past their first token need no further check
        for index in [index for index, output in self.first_token.items() if output]:
            del self.first_token[index]
        for index, budget in list(self.budgets.items()):
            token = budget.next_forced() if index < logits.shape[0] else None
            if token is not None:  # the closing text: the one token the row may take
                logits[index] = float("-inf")
                logits[index, token] = 0.0
            elif budget.done:
                del self.budgets[index]
        return logits
