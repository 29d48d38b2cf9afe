"""A character-level Hugging Face tokenizer, built locally with the ``tokenizers`` library."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

__all__ = ["SPECIAL_TOKENS", "CharTokenizer", "prepare_tokenizer"]

#: Special tokens, in id order: padding, beginning of sequence, end of sequence, unknown.
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")

#: Characters of the default alphabet (enough for arithmetic and short English answers).
DEFAULT_ALPHABET = "0123456789+-*/=()., abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ?!:;'\n"


class CharTokenizer:
    """Factory of character-level ``PreTrainedTokenizerFast`` tokenizers.

    One token per character, ids ``0..3`` for ``<pad> <bos> <eos> <unk>``, then the alphabet, then
    optional filler tokens ``<extra_i>`` that pad the vocabulary to a chosen size (e.g. 32k) so a
    model's output layer and entropy behave like an LLM's. The result is an ordinary Hugging Face
    tokenizer: ``save_pretrained(dir)`` and ``AutoTokenizer.from_pretrained(dir)`` work offline.

    Example:
        >>> tok = CharTokenizer.build("0123456789+=", vocab_size=64)
        >>> tok("12+7=")["input_ids"]
        [5, 6, 14, 11, 15]
        >>> len(tok)
        64
    """

    @staticmethod
    def build(
        alphabet: Iterable[str] = DEFAULT_ALPHABET, *, vocab_size: int | None = None
    ) -> PreTrainedTokenizerFast:
        """Build the tokenizer.

        Args:
            alphabet: the characters to encode (duplicates are dropped, order kept).
            vocab_size: pad the vocabulary to exactly this many tokens; ``None`` keeps it at
                ``4 + len(alphabet)``.

        Raises:
            ValueError: if an alphabet entry is not a single character, or ``vocab_size`` is
                smaller than the special tokens plus the alphabet.
        """
        from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        chars = list(dict.fromkeys(alphabet))
        bad = [c for c in chars if len(c) != 1]
        if bad:
            raise ValueError(f"alphabet entries must be single characters, got {bad[:5]}")
        vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
        for c in chars:
            vocab.setdefault(c, len(vocab))
        needed = len(vocab)
        if vocab_size is not None:
            if vocab_size < needed:
                raise ValueError(
                    f"vocab_size={vocab_size} is smaller than the {needed} tokens the alphabet "
                    f"and the special tokens need"
                )
            for i in range(vocab_size - needed):
                vocab[f"<extra_{i}>"] = len(vocab)
        model = models.WordLevel(vocab=vocab, unk_token="<unk>")
        tok = Tokenizer(model)
        tok.pre_tokenizer = pre_tokenizers.Split(Regex("(?m)."), behavior="isolated")
        tok.decoder = decoders.Fuse()
        tok.add_special_tokens(list(SPECIAL_TOKENS))
        return PreTrainedTokenizerFast(
            tokenizer_object=tok,
            pad_token="<pad>",
            bos_token="<bos>",
            eos_token="<eos>",
            unk_token="<unk>",
            clean_up_tokenization_spaces=False,
        )


def prepare_tokenizer(tokenizer: Any) -> Any:
    """Check that ``tokenizer`` can end and pad sequences; pad with EOS when it has no pad token.

    Generation stops at EOS and batches are right-padded, so both ids are needed. Many causal-LM
    tokenizers (GPT-2, Llama) define EOS but no pad token: EOS then doubles as padding (padded
    positions are masked out everywhere), as in TRL and verl. Returns the same tokenizer.

    Raises:
        ValueError: if the tokenizer has no EOS token.
    """
    if getattr(tokenizer, "eos_token_id", None) is None:
        raise ValueError(
            f"the tokenizer ({type(tokenizer).__name__}) has no EOS token, so responses cannot "
            "end; set one (tokenizer.eos_token = '...', or eos_token in tokenizer_config.json)"
        )
    if getattr(tokenizer, "pad_token_id", None) is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
