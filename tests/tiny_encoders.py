"""Tiny random text encoders with tokenizers trained in-process (no Qwen or Gemma tokenizer
offline), shared by unit and integration tests."""


def corpus_tokenizer(corpus, bos: bool):
    """A cased BPE tokenizer trained on the Qwen-Image template, Sana's instruction and
    ``corpus``; ``bos`` adds a leading <bos> as Gemma's does (Qwen2's adds nothing)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from megatron_apex.data.encoders import QWEN_TEMPLATE, SANA_COMPLEX_HUMAN_INSTRUCTION

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([QWEN_TEMPLATE, *SANA_COMPLEX_HUMAN_INSTRUCTION, *corpus],
                            trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<bos>", "<unk>"]))
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", unk_token="<unk>")


def tiny_text_encoder(kind: str, folder, corpus, hidden_size: int = None):
    """A random Qwen2.5-VL (``kind`` "qwen2_5_vl", 32 wide by default) or Gemma-2 ("gemma2", 24
    wide) saved to ``folder`` with its tokenizer; returns (model, tokenizer)."""
    import torch
    import transformers

    tok = corpus_tokenizer(corpus, bos=kind == "gemma2")
    torch.manual_seed(0)
    if kind == "qwen2_5_vl":
        hidden = hidden_size or 32
        half_head = hidden // 4 // 2  # 4 heads; the mrope sections sum to half a head
        text = dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, bos_token_id=None, eos_token_id=None,
                    pad_token_id=0, rope_scaling={"type": "mrope", "mrope_section": [half_head // 4, half_head // 4,
                                                                                    half_head - half_head // 4 * 2]})
        model = transformers.Qwen2_5_VLForConditionalGeneration(transformers.Qwen2_5_VLConfig(
            text_config=text, vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2,
                                                 out_hidden_size=hidden)))
    else:
        hidden = hidden_size or 24
        model = transformers.Gemma2Model(transformers.Gemma2Config(
            vocab_size=len(tok), hidden_size=hidden, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=hidden // 3, pad_token_id=0))
    model.eval().save_pretrained(folder)
    tok.save_pretrained(folder)
    return model, tok
