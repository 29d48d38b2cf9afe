"""Local model loading shared by the LLM trainer and TokenLMPolicy."""

from __future__ import annotations

import pytest
import torch

from erc_gym.envs.tokenizer import CharTokenizer
from erc_gym.llm.model import load_model_and_tokenizer, make_tiny_lm


def _save(tmp_path, tok, vocab: int, dtype: torch.dtype = torch.float32):
    make_tiny_lm(vocab).to(dtype).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    return tmp_path


def test_bf16_padded_checkpoint_without_pad_token(tmp_path):
    tok = CharTokenizer.build("0123456789+=")
    tok.pad_token = None
    path = _save(tmp_path, tok, len(tok) + 20, torch.bfloat16)
    model, loaded = load_model_and_tokenizer(path, dtype=torch.float32)
    assert loaded.pad_token_id == loaded.eos_token_id is not None
    assert next(model.parameters()).dtype == torch.float32
    assert model.get_output_embeddings().weight.shape[0] == len(loaded) + 20


def test_tokenizer_without_eos_is_refused_up_front(tmp_path):
    tok = CharTokenizer.build("0123456789+=")
    tok.eos_token = None
    path = _save(tmp_path, tok, len(tok))
    with pytest.raises(ValueError, match="has no EOS token"):
        load_model_and_tokenizer(path)


def test_hub_name_says_not_a_local_folder():
    from erc_gym.llm.model import load_causal_lm

    with pytest.raises(FileNotFoundError, match=r"'Qwen/Qwen2\.5-0\.5B' is not a local folder"):
        load_causal_lm("Qwen/Qwen2.5-0.5B")
