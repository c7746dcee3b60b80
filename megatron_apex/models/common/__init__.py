"""Pieces shared by the DiT families: the pipeline-stage skeleton of a model (staged_dit.py),
the attention kernels of our core attention (attention.py), timestep embedding, multi-axis
RoPE, adaLN modulation, norms with megatron's constructor signature, the condition shift of
APEX."""
