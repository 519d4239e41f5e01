import json
import sysconfig

import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordWriter

from sparsetrain.config import DataConfig
from sparsetrain.data import iter_documents, stdlib_files, tokenize_documents
from sparsetrain.data.tokenizers import ByteTokenizer

VOCAB = ByteTokenizer.vocab_size


def documents(source, path, **kwargs):
    return list(iter_documents(DataConfig(source=source, path=str(path), **kwargs), VOCAB))


def write_array_record(path, docs):
    writer = ArrayRecordWriter(str(path), "group_size:1")
    for doc in docs:
        writer.write(np.asarray(doc, dtype="<i4").tobytes())
    writer.close()


def test_stdlib_corpus_is_sorted_python_without_tests_or_site_packages():
    files = stdlib_files()
    assert files == sorted(files) and len(files) > 100
    stdlib = sysconfig.get_paths()["stdlib"]
    for path in files:
        parts = path.relative_to(stdlib).parts[:-1]
        assert path.suffix == ".py"
        assert not {"site-packages", "test", "tests", "idle_test"} & set(parts)


def test_stdlib_max_documents_reads_only_the_first_files():
    docs = tokenize_documents(DataConfig(max_documents=3), ByteTokenizer())
    assert len(docs) == 3 and all(d.dtype == np.int32 and len(d) > 0 for d in docs)


def test_directory_of_text_and_jsonl_files(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "sub" / "b.md").write_text("beta")
    (tmp_path / "c.jsonl").write_text('{"body": "gamma"}\n\n{"body": "delta", "id": 2}\n')
    (tmp_path / "d.py").write_text("print('epsilon')\n")
    (tmp_path / "ignored.csv").write_text("x,y")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "e.txt").write_text("hidden")
    docs = documents("files", tmp_path, jsonl_field="body")
    assert docs == ["alpha", "gamma", "delta", "print('epsilon')\n", "beta"]


def test_glob_selects_matching_files(tmp_path):
    for name in ("one.txt", "two.txt", "three.md"):
        (tmp_path / name).write_text(name)
    assert documents("files", tmp_path / "*.txt") == ["one.txt", "two.txt"]


def test_jsonl_keeps_unicode_line_separators_inside_strings(tmp_path):
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": "a\u2028b"}, ensure_ascii=False) + "\n")
    assert documents("files", tmp_path) == ["a\u2028b"]


def test_undecodable_bytes_become_replacement_characters(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"ok \xff\xfe end")
    assert documents("files", tmp_path) == ["ok \ufffd\ufffd end"]


def test_files_that_are_not_text_are_skipped_with_a_warning_naming_them(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "b.txt").write_bytes(bytes(range(256)) * 4)                        # binary: NUL bytes
    (tmp_path / "c.txt").write_bytes(b"x" + bytes(range(0x80, 0x100)) * 2)   # no NUL, not UTF-8
    (tmp_path / "d.txt").write_text("caf\u00e9 gamma")
    assert documents("files", tmp_path) == ["alpha", "caf\u00e9 gamma"]
    err = capsys.readouterr().err
    assert f"skipping {tmp_path / 'b.txt'}: not text (4 NUL byte(s)); 1 file(s) skipped so far" in err
    assert f"skipping {tmp_path / 'c.txt'}: not text (" in err and "2 file(s) skipped so far" in err


def test_on_bad_file_error_stops_at_a_binary_file(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"\x00\x01\x02")
    with pytest.raises(ValueError, match=r"a.txt is not text \(1 NUL byte\(s\)\); data.on_bad_file=error"):
        documents("files", tmp_path, on_bad_file="error")


def test_on_bad_file_names_its_allowed_values():
    with pytest.raises(ValueError, match="on_bad_file='ignore' is not allowed; choose one of 'skip' | 'error'"):
        DataConfig(on_bad_file="ignore")


def test_npy_one_document_per_1d_file_and_per_padded_2d_row(tmp_path):
    np.save(tmp_path / "a.npy", np.array([5, 6, 7], dtype=np.int64))
    np.save(tmp_path / "b.npy", np.array([[1, 2, -1], [-1, -1, -1], [3, 4, 9]], dtype=np.int32))
    assert [d.tolist() for d in documents("tokens", tmp_path)] == [[5, 6, 7], [1, 2], [3, 4, 9]]


def test_array_record_one_document_per_record(tmp_path):
    write_array_record(tmp_path / "docs.array_record", [[1, 2, 3], [200, 10]])
    docs = documents("tokens", tmp_path)
    assert [d.tolist() for d in docs] == [[1, 2, 3], [200, 10]]
    assert all(d.dtype == np.int32 for d in docs)


def test_missing_path_is_named(tmp_path):
    with pytest.raises(ValueError, match="nowhere"):
        documents("files", tmp_path / "nowhere")


def test_glob_matching_nothing_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"\*\.txt"):
        documents("files", tmp_path / "*.txt")


@pytest.mark.parametrize("name, content", [("empty.txt", b""), ("blank.md", b"  \n\n"),
                                           ("nothing.jsonl", b"\n"), ("empties.jsonl", b'{"text": ""}\n')])
def test_empty_file_is_named(tmp_path, name, content):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError, match=name):
        documents("files", tmp_path)


@pytest.mark.parametrize("line, problem", [('{"text": "ok"', "invalid JSON"), ('["text"]', "field 'text'"),
                                           ('{"other": "x"}', "field 'text'"), ('{"text": 3}', "not a string")])
def test_corrupt_jsonl_names_file_and_line(tmp_path, line, problem):
    (tmp_path / "data.jsonl").write_text('{"text": "fine"}\n' + line + "\n")
    with pytest.raises(ValueError, match=f"data.jsonl:2: .*{problem}"):
        documents("files", tmp_path)


@pytest.mark.parametrize("write", [
    lambda p: p.write_bytes(b"\x93NUMPY garbage"),
    lambda p: p.write_bytes(np.lib.format.magic(1, 0) + b"\x00"),
    lambda p: np.save(p, np.array([[1], [2, 3]], dtype=object)),
    lambda p: np.save(p, np.array([1.5, 2.5])),
    lambda p: np.save(p, np.zeros((2, 2, 2), dtype=np.int32)),
    lambda p: np.save(p, np.zeros(0, dtype=np.int32)),
    lambda p: np.save(p, np.array([1, 999], dtype=np.int32)),   # id outside the byte vocabulary
])
def test_corrupt_npy_is_named(tmp_path, write):
    write(tmp_path / "tokens.npy")
    with pytest.raises(ValueError, match="tokens.npy"):
        documents("tokens", tmp_path)


def test_corrupt_array_record_is_named(tmp_path):
    (tmp_path / "junk.array_record").write_bytes(b"not an array record" * 10)
    with pytest.raises(ValueError, match="junk.array_record"):
        documents("tokens", tmp_path)


def test_array_record_with_partial_int32_is_named(tmp_path):
    writer = ArrayRecordWriter(str(tmp_path / "odd.array_record"), "group_size:1")
    writer.write(b"\x01\x00\x00")
    writer.close()
    with pytest.raises(ValueError, match="odd.array_record: record 0"):
        documents("tokens", tmp_path)
