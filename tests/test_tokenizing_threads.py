"""Sessions tokenize at once on the server's threads: one session's typed text never changes how
another's chat is read (the tokenizer's special-token switch is shared)."""
import threading

from unipixel.model import processing as P


def test_typed_and_control_text_tokenized_at_once_keep_their_meaning(tiny_model):
    tokenizer = tiny_model[1].tokenizer
    ours = "[1]: <1> <|mem|>\n" * 20  # control tokens: one id each
    typed = "What is <|mem|> in [1]? " * 20  # typed: the same characters, read as text
    expected = {False: P.encode(tokenizer, ours, typed=False), True: P.encode(tokenizer, typed, typed=True)}
    mem = tokenizer.convert_tokens_to_ids("<|mem|>")
    assert expected[False].count(mem) == 20 and mem not in expected[True]
    wrong = []

    def tokenize(is_typed: bool):
        for _ in range(300):
            ids = P.encode(tokenizer, typed if is_typed else ours, typed=is_typed)
            if ids != expected[is_typed]:
                wrong.append(is_typed)

    threads = [threading.Thread(target=tokenize, args=(k % 2 == 1,)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not wrong, f"{len(wrong)} of 1200 encodings read with another thread's setting"
