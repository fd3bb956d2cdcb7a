"""rlhf-engine: SFT, reward modelling and RL (PPO, GRPO, RLOO, REINFORCE++) on DeepSpeed.

Importing the package changes nothing in the process: CPU tuning (allocator, huge pages, malloc
thresholds, oneDNN linears, lean activations, the fused decoder) is applied at the start of a run by
`rlhf_engine.backends.cpu.start_run`, on CPU only.
"""
