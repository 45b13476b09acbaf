"""The caption tokenizer, for captions in any language: ``tokenize("A dog's toy")`` is
``["a", "dogs", "toy"]``, ``tokenize("赤い円")`` is ``["赤", "い", "円"]``.

The rules, in order:

1. Unicode normalisation NFKC (as SentencePiece does by default): a decomposed "e" + U+0301 becomes
   "é", full-width "Ｔ３" becomes "T3", half-width katakana become full-width ones. Then lower case.
2. Hyphens and the Unicode dashes separate words; so does whitespace.
3. French and Italian elisions are split at the apostrophe ("d'un" -> "d" "un", "l’homme" ->
   "l" "homme", "dell'acqua" -> "dell" "acqua"): a short elided word (l d j m n s t c qu jusqu
   lorsqu puisqu ... dell all un ...) at the start of a word, before a vowel or "h". The elided
   word loses its apostrophe as every other word does, so that "d'" alone stays "d" as "rock n'
   roll" stays "rock" "n" "roll".
4. Letters and digits of every script are kept with their combining marks (Devanagari vowel signs,
   Thai tone marks, Arabic harakat). Scripts written without spaces (Han, Hiragana, Katakana, Thai,
   Lao, Khmer, Myanmar) give one token per character; the others give words.
5. Emoji are tokens of their own; skin tones, ZWJ sequences and flags stay whole, variation
   selectors are dropped.
6. Other punctuation and symbols are dropped without splitting the word ("dog's" -> "dogs"),
   except ``( ) # & : =``, which are kept: this is the "Karpathy split" JSON tokenisation, and on
   English captions the result is exactly the tokenizer's before these rules (the Flickr8k Karpathy
   file's 40000 token lists are reproduced). CJK punctuation (U+3000-U+303F) separates tokens.

The tokens of a caption, joined by spaces, tokenize back to the same tokens; so does
:func:`join_tokens`, which writes a caption's tokens for people: no space around characters of the
scripts written without spaces ("赤い円", not "赤 い 円").
"""

from __future__ import annotations

import re
import unicodedata

__all__ = ["tokenize", "join_tokens"]

# Hyphen and the Unicode dashes separate words.
_DASHES = str.maketrans({c: " " for c in "-\u2010\u2011\u2012\u2013\u2014\u2015"})
# Everything that is not a letter, digit, whitespace or one of ( ) # & : = is dropped (``\w`` also
# matches "_", which is dropped too): the rule of the Karpathy JSON files, for ASCII words.
_DROP = re.compile(r"[^\w\s()#&:=]|_")
_KEPT_SYMBOLS = frozenset("()#&:=")

_ELISION = re.compile(
    r"(qu|jusqu|lorsqu|puisqu|quoiqu|presqu|[cdjlmnst]|dell|dall|nell|sull|all|coll|quell|quest|un|nessun)"
    r"['\u2019](?=[aeiouyhàâäéèêëîïôöûùüÿœæ])"
)
# Scripts written without spaces between words: one token per character.
_PER_CHARACTER = re.compile(
    "[\u0e00-\u0eff"  # Thai, Lao
    "\u1000-\u109f"  # Myanmar
    "\u1780-\u17ff"  # Khmer
    "\u2e80-\u2fdf\u3005-\u3007\u3021-\u3029\u3038-\u303c"  # CJK radicals, ideographic marks and numbers
    "\u3040-\u30ff\u31f0-\u31ff"  # Hiragana, Katakana
    "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f]"  # Han
)
_ZWJ, _ZWNJ = "\u200d", "\u200c"
_VARIATION_SELECTORS = frozenset("\ufe0e\ufe0f")
_SKIN_TONES = range(0x1F3FB, 0x1F400)
_REGIONAL_INDICATORS = range(0x1F1E6, 0x1F200)
_EMOJI_TAGS = range(0xE0020, 0xE0080)  # subdivision flags (England, Scotland)


def _is_emoji(char: str, category: str) -> bool:
    code = ord(char)
    return category == "So" and (0x1F000 <= code <= 0x1FAFF or 0x2600 <= code <= 0x27BF
                                 or 0x2300 <= code <= 0x23FF or 0x2B00 <= code <= 0x2BFF)  # fmt: skip


def _continues_emoji(token: list[str], char: str, category: str) -> bool:
    """Whether ``char`` belongs to the emoji being read (a skin tone, a ZWJ sequence, a flag's second half)."""
    code = ord(char)
    if code in _SKIN_TONES or code in _EMOJI_TAGS or char == _ZWJ:
        return True
    if token[-1] == _ZWJ:
        return _is_emoji(char, category)
    return code in _REGIONAL_INDICATORS and len(token) == 1 and ord(token[0]) in _REGIONAL_INDICATORS


def _split_word(chunk: str) -> list[str]:
    """The tokens of one whitespace-free piece of non-ASCII text (rules 4-6)."""
    tokens: list[str] = []
    token: list[str] = []
    kind = ""  # what ``token`` holds: "word", "char" (a character of a script without spaces) or "emoji"

    def flush() -> None:  # NFC again: a mark may now follow a letter it was kept from by a dropped character
        text = unicodedata.normalize("NFC", "".join(token).rstrip(_ZWJ + _ZWNJ))
        if text:
            tokens.append(text)
        token.clear()

    for char in chunk:
        category = unicodedata.category(char)
        if char in _VARIATION_SELECTORS:
            continue
        if kind == "emoji" and token and _continues_emoji(token, char, category):
            token.append(char)
        elif category[0] == "M" or (char in (_ZWJ, _ZWNJ) and kind == "word"):
            if token:  # marks stay on their letter; a mark with no letter before it is dropped
                token.append(char)
        elif _is_emoji(char, category) or ord(char) in _REGIONAL_INDICATORS:
            flush()
            token.append(char)
            kind = "emoji"
        elif category[0] in "LN" and _PER_CHARACTER.match(char):
            flush()
            token.append(char)
            kind = "char"
        elif category[0] in "LN" or char in _KEPT_SYMBOLS:
            if kind != "word":
                flush()
                kind = "word"
            token.append(char)
        elif 0x3000 <= ord(char) <= 0x303F:  # CJK punctuation separates
            flush()
            kind = ""
        # anything else (punctuation, other symbols, "_") is dropped and the word goes on
    flush()
    return tokens


def tokenize(caption: str) -> list[str]:
    """Split a raw caption into lower-case tokens: words, or characters of scripts written without
    spaces, or emoji (the rules are in this module's docstring)."""
    if caption.isascii():
        text = caption.lower()
    else:
        text = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", caption).lower())
    tokens: list[str] = []
    for chunk in text.translate(_DASHES).split():
        while "'" in chunk or "\u2019" in chunk:
            elided = _ELISION.match(chunk)
            if elided is None:
                break
            tokens.append(elided.group(1))
            chunk = chunk[elided.end() :]
        if chunk.isascii():
            word = _DROP.sub("", chunk)
            if word:
                tokens.append(word)
        else:
            tokens.extend(_split_word(chunk))
    return tokens


def join_tokens(tokens: list[str]) -> str:
    """A caption's tokens as text: separated by spaces, except next to a character of a script written
    without spaces. ``tokenize(join_tokens(t)) == t`` for the tokens ``t`` of any caption."""
    parts: list[str] = []
    glued = True  # no space before the first token
    for token in tokens:
        per_character = _PER_CHARACTER.match(token) is not None
        if parts and not (glued or per_character):
            parts.append(" ")
        parts.append(token)
        glued = per_character
    return "".join(parts)
