"""DiT models on megatron-core, one subpackage per architecture (qwen_image/, sana/) over the
shared pieces in common/. Which models exist, their presets and how to build one:
megatron_apex.families."""
