from diffusion_dpo.models.build import build_clip_tokenizer


def test_every_word_is_one_token_and_other_text_still_tokenizes():
    words = ["triangle", "right", "circle", "red", "green", "square", "top", "left", "centre", "bottom", "the", "at"]
    tok = build_clip_tokenizer(words)
    for w in words:
        assert tok.tokenize(w) == [w + "</w>"], (w, tok.tokenize(w))
    ids = tok("a red triangle at the top right").input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id and len(ids) == 2 + 7
    assert tok.unk_token_id not in tok("zebra 42").input_ids[1:-1]  # unknown words fall back to characters
