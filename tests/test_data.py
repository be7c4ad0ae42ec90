"""Text sources and token windows."""

import pytest

from vllm_spon.calibration.data import DataError, load_text, same_source, token_windows


class CharTokenizer:
    """One token per character: enough to check windowing without a model."""

    def __call__(self, text, add_special_tokens=False, return_attention_mask=False):
        return {"input_ids": [ord(c) for c in text]}


def test_builtin_corpus_and_python_docs_are_offline_text():
    austen = load_text("builtin:sense-and-sensibility")
    assert austen.startswith("SENSE AND SENSIBILITY") and len(austen) > 600_000
    assert "Elinor" in austen
    assert "Persuasion" in load_text("builtin:persuasion")[:100]
    assert "for" in load_text("python-docs")


def test_file_and_folder(tmp_path):
    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "a.md").write_text("first")
    (tmp_path / "skip.bin").write_bytes(b"\x00\x01")
    assert load_text(str(tmp_path / "b.txt")) == "second"
    assert load_text(str(tmp_path)) == "first\n\nsecond"


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: str(p / "missing"), "neither an existing file or folder"),
        (lambda p: "builtin:emma", "unknown builtin corpus 'emma'"),
        (lambda p: (p / "e.txt").write_text(" \n") and str(p / "e.txt"), "holds no text"),
        (lambda p: (p / "x.bin").write_bytes(b"\xff\xfe\xfa") and str(p / "x.bin"), "is not UTF-8 text"),
        (lambda p: (p / "d").mkdir() or str(p / "d"), "has no .txt/.md/.text files"),
    ],
)
def test_bad_sources_are_refused_with_the_reason(tmp_path, make, message):
    with pytest.raises(DataError, match=message):
        load_text(make(tmp_path))


def test_windows_are_consecutive_and_disjoint():
    tok = CharTokenizer()
    text = "".join(chr(65 + i % 26) for i in range(100))
    w = token_windows(tok, text, window=10, num_windows=3)
    assert w.shape == (3, 10) and w[1, 0] == ord(text[10])
    assert token_windows(tok, text, 10, 2, offset_windows=3)[0, 0] == ord(text[30])
    assert token_windows(tok, text, 10, None).shape == (10, 10)
    with pytest.raises(DataError, match="has 100 tokens, too short for 11 windows of 10 tokens"):
        token_windows(tok, text, 10, 11)


def test_builtin_mixed_prose_keeps_the_novel_at_three_quarters_in_every_part():
    """builtin:mixed-prose holds the whole novel at 3/4 of the characters, the code and prose cut to the rest,
    and every slice (statistics from the start, check windows from the end) still holds code and the novel;
    builtin:mixed is unchanged by the share (the novel about half)."""
    from vllm_spon.calibration.data import MIXED_PIECES, MIXED_PROSE_NOVEL_SHARE, _pieces, mixed_text

    novel = load_text("builtin:sense-and-sensibility")
    text = load_text("builtin:mixed-prose")
    assert MIXED_PROSE_NOVEL_SHARE == 0.75
    assert len(novel) / len(text) == pytest.approx(0.75, abs=0.01)
    assert all(piece in text for piece in _pieces(novel, MIXED_PIECES))  # the novel whole, in order
    head, tail = text[:len(text) // 10], text[-len(text) // 10:]
    for part in (head, tail):
        assert "def " in part and "Elinor" in part
    assert "PYTHON SOFTWARE FOUNDATION LICENSE" in text and "Anne Elliot" not in text
    assert len(novel) / len(mixed_text()) < 0.6
    assert len(novel) / len(mixed_text(0.9)) == pytest.approx(0.9, abs=0.01)
    with pytest.raises(DataError, match="novel_share"):
        mixed_text(0.0)


def test_same_source_sees_through_aliases_and_paths(tmp_path, monkeypatch):
    text = tmp_path / "notes.txt"
    text.write_text("some text")
    monkeypatch.chdir(tmp_path)
    assert same_source("notes.txt", str(text)) and same_source("wikitext-2", "hf:wikitext:wikitext-2-raw-v1:test")
    assert not same_source("builtin:persuasion", "builtin:sense-and-sensibility")
    assert not same_source("notes.txt", "builtin:persuasion")
