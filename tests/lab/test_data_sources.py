"""Data at scale: record formats through `datasets`, hf: datasets from a local folder, pretrained tokenizers,
uint32 shards, parallel workers, max_tokens, sharded reading."""

import json
import random

import numpy as np
import pytest

from layerwise.lab import data as D
from layerwise.lab import sources as S
from layerwise.lab.tokens import ShardedTokens, load_pretrained

DOCS = [
    f"document {i}: " + " ".join(random.Random(i).choice("abc def ghi jkl".split()) for _ in range(8))
    for i in range(25)
]


def _write_jsonl(path, docs, field="text"):
    path.write_text("".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs)))
    return path


def _wordlevel_tokenizer(path, vocab_size, specials=("[UNK]", "</s>")):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {s: i for i, s in enumerate(specials)}
    for i in range(vocab_size - len(specials)):
        vocab[f"w{i}"] = i + len(specials)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece()
    tok.add_special_tokens(list(specials))
    tok.save(str(path))
    return tok


def test_held_out_rule_every_tenth_document(tmp_path):
    train, val, info = D.load_documents(str(_write_jsonl(tmp_path / "a.jsonl", DOCS)))
    assert val == [DOCS[9], DOCS[19]] and train == [d for i, d in enumerate(DOCS) if i not in (9, 19)]
    assert "every 10th" in info["split"]
    few_train, few_val, _ = D.load_documents(str(_write_jsonl(tmp_path / "b.jsonl", DOCS[:4])))
    assert few_val == [DOCS[3]] and few_train == DOCS[:3]


def test_record_formats_agree(tmp_path):
    pytest.importorskip("datasets")
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"body": DOCS, "n": list(range(len(DOCS)))})
    pq.write_table(table, tmp_path / "d.parquet")
    import csv

    with open(tmp_path / "d.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["body", "n"])
        w.writerows([d, i] for i, d in enumerate(DOCS))
    (tmp_path / "d.json").write_text("".join(json.dumps({"body": d}) + "\n" for d in DOCS))
    with pa.OSFile(str(tmp_path / "d.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    folder = tmp_path / "shards"
    folder.mkdir()
    pq.write_table(table.slice(0, 12), folder / "part-0.parquet")
    pq.write_table(table.slice(12), folder / "part-1.parquet")
    from datasets import Dataset

    Dataset.from_dict({"body": DOCS}).save_to_disk(str(tmp_path / "saved"))
    _write_jsonl(tmp_path / "d.jsonl", DOCS, field="body")
    expected = D.load_documents(str(tmp_path / "d.jsonl"), text_field="body")[:2]
    for name in ("d.parquet", "d.csv", "d.json", "d.arrow", "shards", "saved"):
        got = D.load_documents(str(tmp_path / name), text_field="body")[:2]
        assert got == expected, name
    with pytest.raises(D.DataError, match=r"no field 'text'.*body"):
        D.load_documents(str(tmp_path / "d.parquet"))
    with pytest.raises(D.DataError, match=r"d.jsonl:1.*'text'"):
        D.load_documents(str(tmp_path / "d.jsonl"))
    with pytest.raises(D.DataError, match="is int"):
        D.load_documents(str(tmp_path / "d.parquet"), text_field="n")


def test_hf_source_from_a_local_dataset_folder(tmp_path):
    pytest.importorskip("datasets")
    ds = tmp_path / "my_dataset"
    ds.mkdir()
    _write_jsonl(ds / "train.jsonl", DOCS[:20])
    _write_jsonl(ds / "validation.jsonl", DOCS[20:])
    train, val, info = D.load_documents(f"hf:{ds}", valid="validation")
    assert train == DOCS[:20] and val == DOCS[20:] and info["split"] == "split 'validation'"
    train2, val2, _ = D.load_documents(f"hf:{ds}")  # no data.valid: every 10th training document
    assert val2 == [DOCS[9], DOCS[19]] and len(train2) == 18
    with pytest.raises(D.DataError, match="cannot open split 'test'"):
        D.load_documents(f"hf:{ds}", valid="test")
    assert S.parse_hub("hf:allenai/c4:en") == ("allenai/c4", "en") and S.parse_hub("hf:wikitext") == ("wikitext", None)


def test_text_file_streamed_in_pieces_is_the_whole_text(tmp_path, monkeypatch, corpus_file):
    monkeypatch.setattr(S, "PIECE_BYTES", 1000)
    src = S.open_source(str(corpus_file))
    items = list(src.items())
    assert sum(1 for s, _, _ in items if s == "train") > 10  # really in pieces
    ends = [e for s, _, e in items if s == "train"]
    assert ends[-1] and not any(ends[:-1])
    train, val = S.collect(src)
    text = corpus_file.read_text()
    assert train[0] + val[0] == text and val[0].startswith(text.splitlines()[len(train[0].splitlines())])


def test_pretrained_tokenizer_uint32_parallel_sharded(tmp_path):
    rng = random.Random(0)
    docs = [
        " ".join(f"w{rng.choice([rng.randrange(100), rng.randrange(65000, 69998)])}" for _ in range(12))
        for _ in range(300)
    ]
    corpus = _write_jsonl(tmp_path / "c.jsonl", docs)
    tok = _wordlevel_tokenizer(tmp_path / "tokenizer.json", 70000)
    td = D.prepare(str(corpus), tokenizer=str(tmp_path / "tokenizer.json"), num_proc=2, shard_tokens=1000)
    assert td.vocab_size == 70000 and td.train.dtype == np.uint32 and td.meta["dtype"] == "uint32"
    assert td.meta["eos_token"] == "</s>" and td.eos_id == 1 and td.meta["num_proc"] == 2
    assert isinstance(td.train, ShardedTokens) and len(td.meta["shards"]["train"]) > 2
    # expected stream written by hand: each training document's ids, then EOS
    train_docs = [d for i, d in enumerate(docs) if i % 10 != 9]
    expected = np.concatenate([tok.encode(d).ids + [1] for d in train_docs]).astype(np.uint32)
    np.testing.assert_array_equal(np.asarray(td.train), expected)
    assert int(expected.max()) > 65535  # the ids uint16 could not hold
    # fancy indexing across shard boundaries and the batch sampler see the same tokens as one array
    idx = np.arange(990, 1012)[None, :] + np.array([0, 1000, 2000])[:, None]
    np.testing.assert_array_equal(td.train[idx], expected[idx])
    a = D.BatchSampler(td.train, 16, 4, seed=1).get(3)[0]
    b = D.BatchSampler(expected, 16, 4, seed=1).get(3)[0]
    assert (a == b).all()
    # the same options reuse the entry; max_tokens makes a new one, capped exactly
    assert D.prepare(str(corpus), tokenizer=str(tmp_path / "tokenizer.json"), num_proc=2).dir == td.dir
    capped = D.prepare(str(corpus), tokenizer=str(tmp_path / "tokenizer.json"), max_tokens=500, num_proc=1)
    assert capped.dir != td.dir and capped.train.size == 500
    np.testing.assert_array_equal(np.asarray(capped.train), expected[:500])
    # one worker gives the same tokens as two
    one = D.prepare(str(corpus), tokenizer=str(tmp_path / "tokenizer.json"), num_proc=1, force=True)
    np.testing.assert_array_equal(np.asarray(one.train), expected)


def test_tokenizer_folder_and_eos_errors(tmp_path):
    transformers = pytest.importorskip("transformers")
    _wordlevel_tokenizer(tmp_path / "plain.json", 50, specials=("[UNK]", "[END]"))
    with pytest.raises(D.DataError, match="data.eos_token"):
        load_pretrained(tmp_path / "plain.json")
    assert load_pretrained(tmp_path / "plain.json", "[END]")[1] == "[END]"
    with pytest.raises(D.DataError, match="not in the vocabulary"):
        load_pretrained(tmp_path / "plain.json", "<nope>")
    folder = tmp_path / "hf_tok"
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "plain.json"), eos_token="[END]")
    fast.save_pretrained(str(folder))
    tok, eos, info = load_pretrained(folder)  # EOS from the folder's tokenizer_config.json
    assert eos == "[END]" and tok.get_vocab_size() == 50
    with pytest.raises(D.DataError, match="does not exist"):
        load_pretrained(tmp_path / "missing")
    with pytest.raises(D.DataError, match="trained BPE"):
        D.prepare(str(_write_jsonl(tmp_path / "x.jsonl", DOCS)), vocab_size=300, eos_token="[END]")
