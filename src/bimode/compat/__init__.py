"""Every use bimode makes of a library's non-public or version-dependent API, one module per library.

A library release that changes one of these breaks here, in one place, and the contract tests in
tests/unit/test_compat.py (run at both ends of the supported range by `make test`) say which. docs/internals.md lists
each internal, what bimode relies on, the versions it was checked on and what upstream change would retire it,
together with the extension points built on elsewhere (custom cache layers in the shared-prefix forward, vLLM's
logits-processor interface in generation/vllm_controls.py, the fields of TRL's GRPO batch that BPO writes).
"""
