"""Tiny random-weight classifiers of every supported encoder family, built in code.

BERT-vocabulary families (BERT, DistilBERT, ELECTRA) use the packaged MiniLM WordPiece tokenizer;
the others get a tiny tokenizer trained here on the test sentences: byte-level BPE with RoBERTa's
special tokens (``<pad>`` = 1) for RoBERTa, XLM-R, MPNet, DeBERTa v1 and ModernBERT (whose pad id
is set high, as in the real model), and a unigram model (sentencepiece style, DeBERTa-v2/v3,
ALBERT) so that the pad ids differ from BERT's 0."""
from __future__ import annotations

from pathlib import Path

WIDTH = dict(hidden_size=32, num_attention_heads=4, intermediate_size=37, num_hidden_layers=3)

# family -> (config class name, tokenizer kind, config overrides)
FAMILIES = {
    "bert": ("BertConfig", "wordpiece", {}),
    "distilbert": ("DistilBertConfig", "wordpiece",
                   dict(dim=32, n_heads=4, hidden_dim=37, n_layers=3)),
    "roberta": ("RobertaConfig", "bpe", dict(max_position_embeddings=130, type_vocab_size=1)),
    "xlm-roberta": ("XLMRobertaConfig", "bpe", dict(max_position_embeddings=130, type_vocab_size=1)),
    "electra": ("ElectraConfig", "wordpiece", dict(embedding_size=16)),
    "albert": ("AlbertConfig", "unigram", dict(embedding_size=16)),
    "deberta": ("DebertaConfig", "bpe", dict(relative_attention=True, max_relative_positions=64,
                                             pos_att_type=["c2p", "p2c"], type_vocab_size=0)),
    "deberta-v2": ("DebertaV2Config", "unigram", dict(relative_attention=True, position_buckets=32,
                                                      max_relative_positions=-1, pos_att_type=["p2c", "c2p"],
                                                      norm_rel_ebd="layer_norm", share_att_key=True,
                                                      position_biased_input=False, type_vocab_size=0)),
    "mpnet": ("MPNetConfig", "bpe", dict(max_position_embeddings=130)),
    "modernbert": ("ModernBertConfig", "bpe", dict(global_attn_every_n_layers=2, local_attention=16,
                                                   num_hidden_layers=4)),
}


def _corpus() -> list[str]:
    from conftest import make_texts

    return make_texts(600, seed=7)[0]


def _wordpiece(packaged_model_dir: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(packaged_model_dir)


def _trained_fast(kind: str):
    """A byte-level BPE (RoBERTa specials) or unigram (ALBERT/DeBERTa-v2 specials) tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if kind == "bpe":
        specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        cls, sep = "<s>", "</s>"
        names = dict(bos_token="<s>", eos_token="</s>", cls_token="<s>", sep_token="</s>", pad_token="<pad>",
                     unk_token="<unk>", mask_token="<mask>")
    else:
        specials = ["<unk>", "[PAD]", "[CLS]", "[SEP]", "[MASK]"]  # pad id 1, unk 0 (DeBERTa-v2 order)
        tok = Tokenizer(models.Unigram())
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(vocab_size=300, special_tokens=specials, unk_token="<unk>")
        cls, sep = "[CLS]", "[SEP]"
        names = dict(cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]", unk_token="<unk>",
                     mask_token="[MASK]")
    tok.train_from_iterator(_corpus(), trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} $B {sep}",
        special_tokens=[(cls, tok.token_to_id(cls)), (sep, tok.token_to_id(sep))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=512, **names)


def build(family: str, out_dir: Path, packaged_model_dir: str, seed: int = 0) -> Path:
    """Write a tiny ``family`` classifier (2 labels, random weights) and its tokenizer to ``out_dir``."""
    import torch
    import transformers

    cls_name, kind, overrides = FAMILIES[family]
    tok = _wordpiece(packaged_model_dir) if kind == "wordpiece" else _trained_fast(kind)
    kwargs = dict(WIDTH, vocab_size=len(tok), max_position_embeddings=128, num_labels=2,
                  pad_token_id=tok.pad_token_id)
    if kind != "wordpiece":
        kwargs.update(bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id)
    if family == "modernbert":
        kwargs.update(cls_token_id=tok.cls_token_id, sep_token_id=tok.sep_token_id)
    kwargs.update(overrides)
    if family == "distilbert":
        for k in ("hidden_size", "num_attention_heads", "intermediate_size", "num_hidden_layers"):
            kwargs.pop(k)
    config = getattr(transformers, cls_name)(**kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForSequenceClassification.from_config(config)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir
