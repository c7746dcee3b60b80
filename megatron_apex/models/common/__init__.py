"""Pieces shared by the DiT families: timestep embedding, multi-axis RoPE, adaLN modulation,
norms with megatron's constructor signature, the condition shift of APEX."""
