"""Bi-mode Policy Optimization: GRPO with every query rolled out in both modes (docs/bpo.md).

trainer.py wires it into TRL's GRPOTrainer; core.py holds the pure algorithm (advantages over the mixed
group, mode-token weights), rewards.py the guarded reward functions, rollouts.py what one rollout returns,
shared_forward.py the shared-prefix log-prob forward, vllm_fit.py the fixes vLLM's rollouts need.
"""
