def test_clip_bpe_ids_match_openai_clip(clip_tokenizer_dir):
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(clip_tokenizer_dir)
    assert len(tokenizer) == 49408
    assert tokenizer("hello world").input_ids == [49406, 3306, 1002, 49407]
    assert tokenizer.tokenize("a photograph of an astronaut")[:2] == ["a</w>", "photograph</w>"]
    padded = tokenizer("a star", padding="max_length", max_length=77).input_ids
    assert len(padded) == 77 and padded[-1] == 49407
