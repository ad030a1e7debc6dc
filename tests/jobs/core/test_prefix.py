import subprocess
import sys

from jobs.core.prefix import (
    MIN_SHARED_PREFIX,
    PREFIX_BLOCK,
    common_prefix_len,
    prefix_key,
    shared_prefix_len,
    text_prefix_key,
)


def test_prefix_key_names_the_first_tokens_only():
    head = list(range(MIN_SHARED_PREFIX))
    assert prefix_key(head + [1, 2]) == prefix_key(head + [9])
    assert prefix_key(head) != prefix_key([7, *head[1:]])
    assert prefix_key(head[:-1]) is None  # too short to share


def test_keys_are_the_same_in_another_process():
    """Not Python's hash(): the driver and every replica must agree."""
    code = "from jobs.core.prefix import prefix_key, text_prefix_key; print(prefix_key(list(range(64))), text_prefix_key('abc'))"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert other == [str(prefix_key(list(range(64)))), str(text_prefix_key("abc"))]


def test_text_key_reads_only_the_first_chars():
    assert text_prefix_key("x" * 10 + "a", chars=10) == text_prefix_key("x" * 10 + "b", chars=10)
    assert text_prefix_key("a" + "x" * 10, chars=10) != text_prefix_key("b" + "x" * 10, chars=10)


def test_common_prefix_len():
    assert common_prefix_len([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix_len([1, 2], [1, 2, 3]) == 2
    assert common_prefix_len([], [1]) == 0


def test_shared_prefix_len_is_whole_blocks_and_leaves_each_prompt_a_token():
    system = list(range(1000, 1000 + 3 * PREFIX_BLOCK + 5))
    prompts = [system + [1, 2], system + [3], system + [4, 5, 6]]
    assert shared_prefix_len(prompts) == 3 * PREFIX_BLOCK
    # a prompt that is all prefix keeps its last token for itself
    exact = list(range(2 * PREFIX_BLOCK))
    assert shared_prefix_len([exact, exact + [1]]) == PREFIX_BLOCK
    assert shared_prefix_len([system]) == 0
    assert shared_prefix_len([system, [5, *system]]) == 0
    assert shared_prefix_len([list(range(MIN_SHARED_PREFIX - 1)) + [1], list(range(MIN_SHARED_PREFIX - 1)) + [2]]) == 0
